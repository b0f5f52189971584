#!/usr/bin/env bash
# The gateway beside Mosquitto, measured fairly: the server (the gateway with its own Redis,
# both counted; or Mosquitto) pinned to core 0, the probe (`loadtest probe`, one thread) pinned
# to core 1, a fresh server (and a fresh Redis) for every run, the two servers alternated run by
# run, medians with ranges. The headline is the servers' CPU per operation from /proc over the
# measured phase only; the machine's idle share and the share other processes used over the
# same phase are recorded with every run, so a run on a busy machine shows as one.
#
#   loadtest/bench/vs-mosquitto.sh [RUNS] [LOAD ...]  (LOAD: qos1 paced churn idle; default all)
#
# qos1:  QOS1_CONNS (100) connections x INFLIGHT (10) QoS 1 publishes of PAYLOAD (64) bytes
#        outstanding, MEASURE_S (10) measured; CPU per acknowledged publish. The gateway
#        acknowledges once its Redis holds the uplink (append-only file, fsync every second).
# paced: the same connections offering RATE (40000) publishes a second in all, below both
#        servers' capacity: CPU per publish at the same load, neither server saturated.
# churn: CHURN_TOTAL (20000) connect + authenticate + subscribe + disconnect, CHURN_CONC (50)
#        at a time; CPU per connection. The gateway's accept pacing is raised out of the way.
# idle:  IDLE_CONNS (15000) subscribed connections held HOLD_S (20) s; RSS growth per
#        connection of the server (and of the gateway's Redis).
# PROFILE=DIR records the gateway's profile during each gateway run (perf, cpu-clock, call
# graphs) into DIR/LOAD-RUN.data, read with `perf report -i DIR/LOAD-RUN.data`.
# COUNT=1 counts, over each whole probe, the servers' system calls and context switches
# (`perf stat`) and the gateway's Redis commands and Redis's time in each (`INFO commandstats`,
# which also holds the probe's credential writes: one HSET per device); the summary gives them
# per operation.
# perf attached costs CPU: take CPU figures from runs without COUNT.
# Mosquitto is Debian's, without persistence or authentication, logging off. Results:
# loadtest/results/vs-mosquitto.json (every run and the summary, the commit checked out, the
# gateway binary measured (GATEWAY, default this checkout's release build) and the CPU model).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh
. scripts/lib/bench.sh

RUNS=${1:-5}
shift || true
LOADS=("$@")
[ ${#LOADS[@]} -gt 0 ] || LOADS=(qos1 paced churn idle)
QOS1_CONNS=${QOS1_CONNS:-100} INFLIGHT=${INFLIGHT:-10} PAYLOAD=${PAYLOAD:-64} MEASURE_S=${MEASURE_S:-10}
RATE=${RATE:-40000} CHURN_TOTAL=${CHURN_TOTAL:-20000} CHURN_CONC=${CHURN_CONC:-50}
IDLE_CONNS=${IDLE_CONNS:-15000} HOLD_S=${HOLD_S:-20} IDLE_RAMP=${IDLE_RAMP:-5000}
GATEWAY=${GATEWAY:-target/release/gateway}
command -v taskset >/dev/null 2>&1 || install_packages util-linux
command -v redis-server >/dev/null 2>&1 || install_packages redis-server
command -v mosquitto >/dev/null 2>&1 || install_packages mosquitto
[ "$(nproc)" -ge 2 ] || die "needs two cores: the server on one, the probe on the other"
if [ -z "${NO_BUILD:-}" ]; then cargo build --release --locked -q -p gateway -p loadtest; fi
LT=target/release/loadtest
COUNT_EVENTS=context-switches,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_writev
COUNT_EVENTS+=,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait
ulimit -n 20000
WORK=$(mktemp -d)
cleanup() { bench_stop_servers || true; rm -rf "$WORK"; }
trap cleanup EXIT

# start_gateway: a fresh Redis and gateway on core 0; sets PORT, SERVER_PID, REDIS_PID, REDIS_URL.
start_gateway() {
  bench_redis 0
  PORT=$(free_port)
  cat >"$WORK/gw.toml" <<TOML
node_id = "bench"
[redis]
url = "$REDIS_URL"
[cabinet]
listen = ""
[mqtt]
listen = "127.0.0.1:$PORT"
accept_rate_per_s = 100000
max_connections = 19000
[metrics]
listen = ""
[upstream]
# Nobody consumes here: far above what a run writes, so the stream neither holds nor trims.
stream_maxlen = 100000000
TOML
  RUST_LOG=warn taskset -c 0 "$GATEWAY" --config "$WORK/gw.toml" 2>"$WORK/gw.log" &
  SERVER_PID=$!
  wait_port "$PORT" gateway
}

# start_mosquitto: a fresh Mosquitto on core 0; sets PORT, SERVER_PID.
start_mosquitto() {
  PORT=$(free_port)
  cat >"$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
max_inflight_messages 32
log_dest none
CONF
  taskset -c 0 mosquitto -c "$WORK/mosquitto.conf" &
  SERVER_PID=$!
  wait_port "$PORT" mosquitto
}

# one_run SERVER LOAD RUN: appends one line of JSON to $WORK/runs.jsonl.
one_run() {
  local server=$1 load=$2 run=$3 pids redis_arg=() args=()
  if [ "$server" = gateway ]; then start_gateway; pids=(--server-pid "$SERVER_PID" --server-pid "$REDIS_PID")
    redis_arg=(--redis-url "$REDIS_URL")
  else start_mosquitto; pids=(--server-pid "$SERVER_PID"); fi
  case "$load" in
    qos1) args=(--conns "$QOS1_CONNS" --inflight "$INFLIGHT" --payload "$PAYLOAD" --seconds "$MEASURE_S") ;;
    paced) args=(--conns "$QOS1_CONNS" --inflight "$INFLIGHT" --payload "$PAYLOAD" --seconds "$MEASURE_S" --rate "$RATE") ;;
    churn) args=(--total "$CHURN_TOTAL" --concurrency "$CHURN_CONC") ;;
    idle) args=(--conns "$IDLE_CONNS" --seconds "$HOLD_S" --ramp-per-s "$IDLE_RAMP") ;;
  esac
  local perf_pid=""
  if [ -n "${PROFILE:-}" ] && [ "$server" = gateway ]; then
    mkdir -p "$PROFILE"
    perf record -q -e cpu-clock -F 1999 -g -p "$SERVER_PID" -o "$PROFILE/$load-$run.data" 2>/dev/null &
    perf_pid=$!
  fi
  local stat_pids=()
  rm -f "$WORK/server.stat" "$WORK/redis.stat" "$WORK/commandstats"
  if [ -n "${COUNT:-}" ]; then
    perf stat -x, -e "$COUNT_EVENTS" -p "$SERVER_PID" -o "$WORK/server.stat" 2>/dev/null &
    stat_pids+=($!)
    if [ "$server" = gateway ]; then
      perf stat -x, -e "$COUNT_EVENTS" -p "$REDIS_PID" -o "$WORK/redis.stat" 2>/dev/null &
      stat_pids+=($!)
      redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    fi
  fi
  taskset -c 1 "$LT" probe --load "${load/paced/qos1}" --addr "127.0.0.1:$PORT" "${pids[@]}" "${redis_arg[@]}" "${args[@]}" \
    >"$WORK/probe.json" 2>"$WORK/probe.err" || { cat "$WORK/probe.err" >&2; bench_stop_servers; die "probe failed"; }
  [ -n "$perf_pid" ] && { kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; }
  if [ ${#stat_pids[@]} -gt 0 ]; then
    kill -INT "${stat_pids[@]}"
    wait "${stat_pids[@]}" 2>/dev/null || true
    [ "$server" != gateway ] || redis-cli -p "$REDIS_PORT" INFO commandstats >"$WORK/commandstats"
  fi
  bench_stop_servers
  python3 - "$WORK/probe.json" "$server" "$run" "$load" "$WORK" >>"$WORK/runs.jsonl" <<'PY'
import json, os, sys
d = json.load(open(sys.argv[1]))
d["server"], d["run"], d["load"] = sys.argv[2], int(sys.argv[3]), sys.argv[4]
work = sys.argv[5]
def perf_counts(path):
    # `perf stat -x,` lines: value,unit,event,...
    out = {}
    for line in open(path):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].isdigit():
            out[f[2].replace("syscalls:sys_enter_", "")] = int(f[0])
    return out
counts = {}
for name in ("server", "redis"):
    if os.path.exists(f"{work}/{name}.stat"):
        counts[name] = perf_counts(f"{work}/{name}.stat")
if os.path.exists(f"{work}/commandstats"):
    stats = [l for l in open(f"{work}/commandstats") if l.startswith("cmdstat_")]
    field = lambda line, name: int(line.split(f"{name}=")[1].split(",")[0])
    name = lambda line: line.split(":")[0].removeprefix("cmdstat_")
    counts["redis_commands"] = {name(l): field(l, "calls") for l in stats}
    # Redis's time in each command, us (a script's includes the commands it calls).
    counts["redis_command_us"] = {name(l): field(l, "usec") for l in stats}
if counts:
    d["counts"] = counts
print(json.dumps(d))
PY
  say "$server $load run $run: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["report"]; print({k: r[k] for k in r if k.endswith(("per_op","per_s","per_conn_after_ramp","per_conn_after_hold"))}, "idle", round(r.get("cpu", r.get("ramp_cpu", {})).get("machine_idle_share", 0), 3))' "$WORK/probe.json")"
}

for load in "${LOADS[@]}"; do
  for run in $(seq 1 "$RUNS"); do
    # Alternate which server goes first, so drift on the machine falls on both.
    if [ $((run % 2)) = 1 ]; then order=(gateway mosquitto); else order=(mosquitto gateway); fi
    # SERVERS=gateway measures one side only (while iterating; a comparison needs both).
    [ -z "${SERVERS:-}" ] || order=($SERVERS)
    for server in "${order[@]}"; do one_run "$server" "$load" "$run"; done
  done
done

mkdir -p loadtest/results
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
python3 - "$WORK/runs.jsonl" "$(nproc)" "$(git rev-parse --short HEAD)" "$GATEWAY" "$CPU_MODEL" <<'PY' | tee loadtest/results/vs-mosquitto.json
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def stat(v):
    v = [x for x in v if x is not None]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} if v else None
headline = {
    "qos1": ["server_cpu_us_per_op", "acked_per_s", ("puback", "p50_ms"), ("puback", "p99_ms"), ("cpu", "machine_idle_share"), ("cpu", "other_processes_share")],
    "paced": ["server_cpu_us_per_op", "acked_per_s", "skipped_window_full", ("puback", "p50_ms"), ("puback", "p99_ms"), ("cpu", "machine_idle_share"), ("cpu", "other_processes_share")],
    "churn": ["server_cpu_us_per_op", "conns_per_s", ("connect_subscribe", "p99_ms"), ("cpu", "machine_idle_share"), ("cpu", "other_processes_share")],
    "idle": ["rss_per_conn_after_ramp", "rss_per_conn_after_hold", "ramp_server_cpu_us_per_conn", ("ramp_cpu", "machine_idle_share")],
}
summary = {}
for load, keys in headline.items():
    for server in ("gateway", "mosquitto"):
        rs = [r["report"] for r in runs if r["load"] == load and r["server"] == server]
        if not rs:
            continue
        out = {}
        for k in keys:
            name = k if isinstance(k, str) else ".".join(k)
            out[name] = stat([r.get(k) if isinstance(k, str) else (r.get(k[0]) or {}).get(k[1]) for r in rs])
        if server == "gateway" and load == "idle":
            out["rss_per_conn_each_after_ramp (gateway, redis)"] = [stat([r["rss_per_conn_each_after_ramp"][i] for r in rs]) for i in (0, 1)]
        counted = [r for r in runs if r["load"] == load and r["server"] == server and "counts" in r]
        if counted:
            # Per operation: connections (churn), acknowledged publishes (qos1, paced), held
            # connections (idle).
            def ops(r):
                rep = r["report"]
                return rep.get("total") or rep.get("acked") or rep.get("held") or 1
            per_op = {}
            for part in ("server", "redis", "redis_commands", "redis_command_us"):
                names = sorted({k for r in counted for k in r["counts"].get(part, {})})
                per_op[part] = {k: stat([r["counts"].get(part, {}).get(k, 0) / ops(r) for r in counted]) for k in names}
            out["counts_per_op"] = per_op
        summary[f"{load}/{server}"] = out
    g, m = summary.get(f"{load}/gateway"), summary.get(f"{load}/mosquitto")
    if g and m:
        k = keys[0]
        summary[f"{load}/ratio gateway over mosquitto ({k}, medians)"] = g[k]["median"] / m[k]["median"]
print(json.dumps({"commit": sys.argv[3], "gateway_binary": sys.argv[4], "cpu_model": sys.argv[5], "cores": int(sys.argv[2]),
                  "summary": summary, "runs": runs}, indent=1))
PY
