#!/usr/bin/env bash
# Cabinet frames per gateway core-second, measured the way vs-mosquitto.sh measures MQTT: the
# gateway with its own Redis (both counted) pinned to core 0, the probe (`loadtest probe --load
# cabinet`, one thread) pinned to core 1, a fresh gateway and Redis each run. There is no peer
# for the cabinet protocol; the comparison is the floor: the same frames against a bare echo
# server (`loadtest echo-server`) on the same core, runs alternated, medians with ranges.
#
#   loadtest/bench/cabinet-frames.sh [RUNS]
#
# Two shapes (SHAPES, CONNSxINFLIGHT): 100x10, 100 cabinets with 10 weight reports of 4 lanes
# each outstanding (several frames per read: the batched case), and 1000x1, 1,000 cabinets
# with one each (a frame per read, as a fleet of quiet cabinets sends them). The cabinets log
# in first (version 2: HELLO, CHALLENGE, LOGIN signed with the cabinet's secret; CPU per login
# from the 1,000), then MEASURE_S (10) s are measured. Every report is parsed, checked, written to its upstream stream in
# Redis (append-only file, fsync every second) and acknowledged once Redis has it. Headline:
# server CPU per acknowledged frame (from /proc), frames per server core-second, and CPU per
# login. Results: loadtest/results/cabinet-frames.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh
. scripts/lib/bench.sh

RUNS=${1:-5}
SHAPES=${SHAPES:-100x10 1000x1} MEASURE_S=${MEASURE_S:-10}
GATEWAY=${GATEWAY:-target/release/gateway}
command -v taskset >/dev/null 2>&1 || install_packages util-linux
command -v redis-server >/dev/null 2>&1 || install_packages redis-server
[ "$(nproc)" -ge 2 ] || die "needs two cores: the server on one, the probe on the other"
if [ -z "${NO_BUILD:-}" ]; then cargo build --release --locked -q -p gateway -p loadtest; fi
LT=target/release/loadtest
WORK=$(mktemp -d)
cleanup() { bench_stop_servers || true; rm -rf "$WORK"; }
trap cleanup EXIT

one_run() {
  local server=$1 run=$2 shape=$3 pids=() extra=()
  local conns=${shape%x*} inflight=${shape#*x}
  PORT=$(free_port)
  if [ "$server" = gateway ]; then
    bench_redis 0
    cat >"$WORK/gw.toml" <<TOML
node_id = "bench"
[redis]
url = "$REDIS_URL"
[cabinet]
listen = "127.0.0.1:$PORT"
[mqtt]
listen = ""
[metrics]
listen = ""
[upstream]
stream_maxlen = 100000000
TOML
    RUST_LOG=warn taskset -c 0 "$GATEWAY" --config "$WORK/gw.toml" 2>"$WORK/gw.log" &
    SERVER_PID=$!
    pids=(--server-pid "$SERVER_PID" --server-pid "$REDIS_PID")
    extra=(--load cabinet --redis-url "$REDIS_URL")
  else
    taskset -c 0 "$LT" echo-server --listen "127.0.0.1:$PORT" &
    SERVER_PID=$!
    pids=(--server-pid "$SERVER_PID")
    extra=(--load floor)
  fi
  wait_port "$PORT" "$server"
  taskset -c 1 "$LT" probe --addr "127.0.0.1:$PORT" "${pids[@]}" "${extra[@]}" --conns "$conns" \
    --inflight "$inflight" --seconds "$MEASURE_S" >"$WORK/probe.json" 2>"$WORK/probe.err" \
    || { cat "$WORK/probe.err" >&2; bench_stop_servers; die "probe failed"; }
  bench_stop_servers
  python3 - "$WORK/probe.json" "$server" "$run" "$shape" >>"$WORK/runs.jsonl" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["server"], d["run"], d["shape"] = sys.argv[2], int(sys.argv[3]), sys.argv[4]
print(json.dumps(d))
PY
  say "$server $shape run $run: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["report"]; print(round(r["server_cpu_us_per_op"], 2), "us/frame", round(r["frames_per_server_core_s"]), "frames/core-s", round(r["login_server_cpu_us_per_login"]), "us/login", "idle", round(r["cpu"]["machine_idle_share"], 3))' "$WORK/probe.json")"
}

for shape in $SHAPES; do
  for run in $(seq 1 "$RUNS"); do
    if [ $((run % 2)) = 1 ]; then order=(gateway floor); else order=(floor gateway); fi
    for server in "${order[@]}"; do one_run "$server" "$run" "$shape"; done
  done
done

mkdir -p loadtest/results
python3 - "$WORK/runs.jsonl" "$(git rev-parse --short HEAD)" <<'PY' | tee loadtest/results/cabinet-frames.json
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def stat(v):
    v = [x for x in v if x is not None]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} if v else None
summary = {}
for shape in sorted({r["shape"] for r in runs}):
  for server in ("gateway", "floor"):
    rs = [r["report"] for r in runs if r["server"] == server and r["shape"] == shape]
    if not rs:
        continue
    key = f"{shape}/{server}"
    summary[key] = {
        "server_cpu_us_per_frame": stat([r["server_cpu_us_per_op"] for r in rs]),
        "frames_per_server_core_s": stat([r["frames_per_server_core_s"] for r in rs]),
        "acked_per_s": stat([r["acked_per_s"] for r in rs]),
        "ack_p50_ms": stat([r["ack"]["p50_ms"] for r in rs]),
        "ack_p99_ms": stat([r["ack"]["p99_ms"] for r in rs]),
        "machine_idle_share": stat([r["cpu"]["machine_idle_share"] for r in rs]),
        "other_processes_share": stat([r["cpu"]["other_processes_share"] for r in rs]),
    }
    if server == "gateway":
        summary[key]["server_cpu_us_per_login"] = stat([r["login_server_cpu_us_per_login"] for r in rs])
        summary[key]["gateway_cpu_us_per_frame"] = stat([r["cpu"]["server_cpu_s_each"][0] * 1e6 / r["acked"] for r in rs])
        summary[key]["redis_cpu_us_per_frame"] = stat([r["cpu"]["server_cpu_s_each"][1] * 1e6 / r["acked"] for r in rs])
  g, f = summary.get(f"{shape}/gateway"), summary.get(f"{shape}/floor")
  if g and f:
    summary[f"{shape}/gateway over floor (CPU per frame, medians)"] = g["server_cpu_us_per_frame"]["median"] / f["server_cpu_us_per_frame"]["median"]
print(json.dumps({"commit": sys.argv[2], "summary": summary, "runs": runs}, indent=1))
PY
