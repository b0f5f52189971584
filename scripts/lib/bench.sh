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
