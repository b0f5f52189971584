#!/usr/bin/env bash
# What durable acknowledgements cost the uplink path: the same vehicle fleet publishing QoS 1
# uplinks against a gateway that answered PUBACK once the entry was in its memory (a build from
# before) and against this one, which answers once Redis confirmed the entry. Headline: the
# gateway's CPU per acknowledged uplink (utime + stime from /proc over the run), with uplinks
# acknowledged per second and PUBACK latency beside it; medians and ranges over RUNS runs.
#
#   loadtest/bench/uplink-ack.sh BEFORE_GATEWAY [RUNS]
#
# BEFORE_GATEWAY is a release gateway built from a commit before durable acknowledgements:
#   git worktree add /tmp/before 8c8bce5 && (cd /tmp/before && cargo build --release -p gateway)
#   loadtest/bench/uplink-ack.sh /tmp/before/target/release/gateway
# Two loads, each run alternating before/after: "steady" (1,000 vehicles x 10 publish/s, below
# saturation: latency and CPU) and "saturation" (1,000 vehicles x 100 publish/s offered: the
# most the gateway acknowledges). The gateway is pinned to core 1, the load harness to core 0;
# Redis is a private one with the append-only file (appendfsync everysec, as README requires),
# not pinned, shared by both. Results: loadtest/results/uplink-ack.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh

BEFORE=${1:?usage: loadtest/bench/uplink-ack.sh BEFORE_GATEWAY [RUNS]}
RUNS=${2:-3}
HOLD_S=${HOLD_S:-15}
[ -x "$BEFORE" ] || die "$BEFORE is not an executable gateway"
command -v taskset >/dev/null 2>&1 || install_packages util-linux
command -v redis-server >/dev/null 2>&1 || install_packages redis-server
cargo build --release --locked -q -p gateway -p loadtest
AFTER=target/release/gateway
LT=target/release/loadtest
WORK=$(mktemp -d)
REDIS_PORT=$(free_port)
GW_PID="" REDIS_PID=""
cleanup() {
  [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync everysec \
  --dir "$WORK" --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log" >/dev/null
for _ in $(seq 1 50); do redis_answers "$REDIS_PORT" && break; sleep 0.1; done
REDIS_PID=$(cat "$WORK/redis.pid")
REDIS="redis://127.0.0.1:$REDIS_PORT/"

# cpu_ticks PID: utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# one_run VARIANT BINARY LOAD RUN: a fresh gateway, the fleet, the gateway's CPU; appends a line
# of JSON to $WORK/runs.jsonl.
one_run() {
  local variant=$1 bin=$2 load=$3 run=$4 rate
  case "$load" in steady) rate=10 ;; saturation) rate=100 ;; esac
  local port; port=$(free_port)
  local prefix="benchack$$-$variant-$load-$run:"
  cat >"$WORK/gw.toml" <<TOML
node_id = "bench-$variant"
key_prefix = "$prefix"
[redis]
url = "$REDIS"
[cabinet]
listen = ""
[mqtt]
listen = "127.0.0.1:$port"
accept_rate_per_s = 5000
[metrics]
listen = ""
[upstream]
# Nobody consumes here: far above what a run writes, so neither build holds nor trims.
stream_maxlen = 100000000
TOML
  RUST_LOG=warn taskset -c 1 "$bin" --config "$WORK/gw.toml" 2>"$WORK/gw.log" &
  GW_PID=$!
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  taskset -c 0 "$LT" fleet --label "uplink-ack-$variant-$load" --redis-url "$REDIS" --key-prefix "$prefix" \
    --mqtt-addr "127.0.0.1:$port" --vehicles 1000 --ramp-per-s 2000 --hold-s "$HOLD_S" --publish-per-s "$rate" \
    --server-pid "$GW_PID" --out "$WORK/fleet.json" 2>/dev/null
  local ticks; ticks=$(cpu_ticks "$GW_PID")
  kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true; GW_PID=""
  python3 - "$WORK/fleet.json" "$variant" "$load" "$ticks" "$(getconf CLK_TCK)" >>"$WORK/runs.jsonl" <<'PY'
import json, sys
report, variant, load, ticks, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
d = json.load(open(report))["results"]["details"]
ack = d["latency"].get("publish_ack", {})
acked = ack.get("count", 0)
cpu_s = ticks / hz
print(json.dumps({"variant": variant, "load": load, "acked": acked,
                  "acked_per_s_in_hold": d["uplinks_acked_per_s_in_hold"],
                  "puback_p50_ms": ack.get("p50_ms"), "puback_p99_ms": ack.get("p99_ms"),
                  "gateway_cpu_s": cpu_s, "cpu_us_per_uplink": cpu_s * 1e6 / max(acked, 1),
                  "lost": d.get("lost", {})}))
PY
  redis-cli -p "$REDIS_PORT" --scan --pattern "${prefix}*" | xargs -r -n 1000 redis-cli -p "$REDIS_PORT" unlink >/dev/null
  say "$(tail -n 1 "$WORK/runs.jsonl")"
}

for load in steady saturation; do
  for run in $(seq 1 "$RUNS"); do
    # Alternate which build goes first, so drift on the machine falls on both.
    if [ $((run % 2)) = 1 ]; then order=(before after); else order=(after before); fi
    for variant in "${order[@]}"; do
      if [ "$variant" = before ]; then one_run before "$BEFORE" "$load" "$run"; else one_run after "$AFTER" "$load" "$run"; fi
    done
  done
done

mkdir -p loadtest/results
python3 - "$WORK/runs.jsonl" <<'PY' | tee loadtest/results/uplink-ack.json
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
out = {"runs": runs, "summary": {}}
for load in ("steady", "saturation"):
    for variant in ("before", "after"):
        rs = [r for r in runs if r["load"] == load and r["variant"] == variant]
        if not rs:
            continue
        def stat(k):
            v = [r[k] for r in rs if r[k] is not None]
            return {"median": statistics.median(v), "min": min(v), "max": max(v)}
        out["summary"][f"{load}/{variant}"] = {k: stat(k) for k in
            ("cpu_us_per_uplink", "acked_per_s_in_hold", "puback_p50_ms", "puback_p99_ms")}
print(json.dumps(out, indent=2))
PY
