# Shared by the pinned side-by-side benchmarks (loadtest/bench/vs-mosquitto.sh,
# cabinet-frames.sh, redis-round-cost.sh); source after scripts/lib/services.sh. The caller
# sets WORK (a scratch directory) and traps EXIT to bench_stop_servers.

SERVER_PID="" REDIS_PID="" REDIS_PORT=""

# bench_redis CPU: a fresh private Redis with the append-only file (fsync every second, as
# production runs it) pinned to CPU; sets REDIS_PORT, REDIS_PID and REDIS_URL.
bench_redis() {
  REDIS_PORT=$(free_port)
  rm -rf "$WORK/redis" && mkdir -p "$WORK/redis"
  taskset -c "$1" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes \
    --appendfsync everysec --dir "$WORK/redis" --daemonize yes --pidfile "$WORK/redis/pid" \
    --logfile "$WORK/redis/log" >/dev/null
  for _ in $(seq 1 50); do redis_answers "$REDIS_PORT" && break; sleep 0.1; done
  redis_answers "$REDIS_PORT" || die "the private Redis did not come up"
  REDIS_PID=$(cat "$WORK/redis/pid")
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
}

# bench_stop_servers: stops the server under test (SERVER_PID) and the private Redis, and
# waits until both are gone, so the next run starts on a quiet core.
bench_stop_servers() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && { wait "$SERVER_PID" 2>/dev/null || true; }
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && while kill -0 "$REDIS_PID" 2>/dev/null; do sleep 0.05; done
  SERVER_PID="" REDIS_PID=""
}

BENCH_PG_DATA=""

# bench_postgres: a fresh private PostgreSQL set up as a deployment runs it (fsync and
# synchronous commit on, autovacuum on, shared_buffers 1 GB, checkpoints at most every 4 GB of
# WAL), so a run measures neither a throwaway test server nor a shared server's own settings
# (the machine's server on 5432 runs with autovacuum off, which a queue table like the outbox
# does not survive). Sets ADMIN_DB (a URL where CREATE DATABASE is allowed); bench_stop_postgres
# stops it. BENCH_PG_STATEMENTS=1 loads pg_stat_statements, for runs that report which
# statements PostgreSQL spent its time on.
bench_postgres() {
  pg_bin || die "PostgreSQL server binaries not found under /usr/lib/postgresql"
  local port; port=$(free_port)
  BENCH_PG_DATA="$WORK/pg"
  mkdir -p "$BENCH_PG_DATA"
  [ "$(id -u)" = 0 ] && chown postgres "$BENCH_PG_DATA" "$WORK"
  as_pg_user "$PG_BIN/initdb" -D "$BENCH_PG_DATA" -U postgres --auth=trust -E UTF8 >"$WORK/initdb.log" 2>&1 \
    || die "initdb failed (log: $WORK/initdb.log)"
  as_pg_user "$PG_BIN/pg_ctl" -D "$BENCH_PG_DATA" -l "$WORK/postgres.log" -w -t 30 \
    -o "-p $port -k $WORK -c listen_addresses=127.0.0.1 -c shared_buffers=1GB -c max_wal_size=4GB -c max_connections=200${BENCH_PG_STATEMENTS:+ -c shared_preload_libraries=pg_stat_statements}" \
    start >/dev/null || die "PostgreSQL did not start (log: $WORK/postgres.log)"
  ADMIN_DB="postgres://postgres@127.0.0.1:$port/postgres"
}

bench_stop_postgres() {
  [ -n "$BENCH_PG_DATA" ] && as_pg_user "$PG_BIN/pg_ctl" -D "$BENCH_PG_DATA" -m fast -w stop >/dev/null 2>&1 || true
  BENCH_PG_DATA=""
}
