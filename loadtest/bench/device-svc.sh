#!/usr/bin/env bash
# The device-service benchmarks of BENCHMARKS.md, on this machine: release builds, a real
# device service, gateway, Redis and PostgreSQL, and the load harness. Every run is bounded in
# time; results go to loadtest/results/*.json.
#
#   loadtest/bench/device-svc.sh                 all of them (about 20 minutes)
#   loadtest/bench/device-svc.sh weights         only the named ones: weights stream offline ...
#   OPEN_DOORS_PER_S="100 200" loadtest/bench/device-svc.sh weights
#   CLOSED_REPORT_MS="800" loadtest/bench/device-svc.sh stream
#   WEIGHT_CABINETS=10000 ...                    more cabinets for either (5,000 by default; a
#            door is open 11 s, so 5,000 cabinets of 2 doors carry about 900 openings a second)
#
# weights  cabinets -> gateway -> stream -> device service -> PostgreSQL with doors being
#          opened by commands at OPEN_DOORS_PER_S (each open door reports 4 lanes every 300 ms
#          for 11 s; no order is behind an opening, so each door event is also an anomaly):
#          readings stored per second, stream lag, CPU of each part, and whether every reading
#          sent was stored.
# stream   the same path with readings alone: every door of every cabinet reports its 4 stable
#          lanes every CLOSED_REPORT_MS (1600 800 600: 25,000 to 66,700 readings a second from
#          5,000 cabinets), no door traffic.
# combined 100,000 devices on the box (80,000 cabinets, 20,000 vehicles, 6 gateway processes):
#          heartbeats, weights, vehicle uplinks and a purchase storm at once, with what was
#          lost and stored (not in "all": about 15 minutes).
# logins   a login wave: LOGIN_CABINETS cabinets (36,000) log in over 2 gateways at LOGIN_RAMP_PER_S
#          (4,000), are held 30 s, then all leave: how fast the device service applies their
#          session opens and closes (entries per second, backlog, time until all applied after
#          the last login or leave) and its, PostgreSQL's and Redis's CPU per login.
# offline  100,000 cabinets behind 6 synthetic gateway nodes (30 s heartbeats), 1,000 of them
#          going silent: CPU of the device service and Redis per second of heartbeats, and
#          how long after its deadline each silent cabinet was marked offline.
# uplink   2,000 vehicles publishing QoS 1 uplinks (OTA status reports) at 10/s each through a
#          gateway to the device service, which stores each one: uplinks acknowledged per
#          second, gateway CPU, uplinks per gateway core-second, and whether all were stored.
# purchases the purchase storm alone: 1,000 cabinets, 500 doors opened for orders at once.
# scenarios 1,000 cabinets and 2,000 vehicles registered through the API: a purchase storm
#          (1,000 doors opened for orders at once), an activation wave (1,000 vehicles), an
#          OTA campaign (2,000 vehicles, notices at 500/s), with their end-to-end times.
#
# UPSTREAM_SHARDS (4, the default of both services): the upstream shards the gateways write and
# the device service reads, one reader each, e.g. UPSTREAM_SHARDS=16 loadtest/bench/device-svc.sh combined.
#
# Redis: REDIS_URL, or the local one (keys under a prefix of their own, removed at the end).
# PostgreSQL: DATABASE_URL (a server where CREATE DATABASE is allowed), or a private server
# started for the run with a deployment's settings (scripts/lib/bench.sh, bench_postgres); a
# database of its own, dropped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
# api_parties: the API keys and payment secret the harness plays the flows' parties with.
. scripts/lib/services.sh
. scripts/lib/bench.sh
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
PREFIX="benchsvc$$:"
DB="iotgw_bench_$$"
OUT=loadtest/results
SHARDS="${UPSTREAM_SHARDS:-4}"
RUNS=("$@")
[ "${#RUNS[@]}" -gt 0 ] || RUNS=(weights stream logins offline uplink purchases scenarios)  # combined: by name only
read -r -a RATES <<<"${OPEN_DOORS_PER_S:-100 200 400 800}"
read -r -a STREAM_MS <<<"${CLOSED_REPORT_MS:-1600 800 600}"
WORK=$(mktemp -d)

cargo build --release -q -p gateway -p device-svc -p loadtest
GW=target/release/gateway
SVC=target/release/device-svc
LT=target/release/loadtest

PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}
cleanup() {
  stop_all
  [ -n "${ADMIN_DB:-}" ] && psql "$ADMIN_DB" -Xq -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  bench_stop_postgres
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ -n "${DATABASE_URL:-}" ]; then ADMIN_DB=$DATABASE_URL; else bench_postgres; fi
DB_URL="${ADMIN_DB%/*}/$DB"


# metrics PORT: the /metrics text of the service on PORT, read with the metrics key
# (api_parties; printf is a builtin, so the key never shows in a process list).
metrics() {
  exec 3<>"/dev/tcp/127.0.0.1/$1"
  printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n\r\n' "${IOTGW_METRICS_KEY:-}" >&3
  cat <&3
  exec 3<&-
}
# metric PORT NAME: the sum of NAME's samples (any labels).
metric() { metrics "$1" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%.6f\n", s + 0 }'; }
# group_sum FIELD: FIELD of the device service's consumer group summed over the upstream
# streams (XINFO GROUPS): `lag` (not yet read) or `pending` (read, not yet acknowledged).
group_sum() {
  local s total=0 n
  for ((s = 0; s < SHARDS; s++)); do
    n=$(redis-cli -u "$REDIS_URL" xinfo groups "${PREFIX}up:$s" 2>/dev/null | awk -v f="$1" 'prev == f { print; exit } { prev = $0 }')
    total=$((total + ${n:-0}))
  done
  echo "$total"
}
redis_cpu() { redis-cli -u "$REDIS_URL" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.6f\n", s }'; }
# pg_cpu: CPU seconds of the PostgreSQL server's processes now running: the private server's,
# or every postgres process given DATABASE_URL (the device service's pooled connections live
# through a run; short-lived ones are not counted).
pg_cpu() {
  local hz pids; hz=$(getconf CLK_TCK)
  if [ -n "$BENCH_PG_DATA" ]; then
    local pm; pm=$(head -n 1 "$BENCH_PG_DATA/postmaster.pid")
    pids="$pm $(pgrep -P "$pm" | tr '\n' ' ')"
  else
    pids=$(pgrep -x postgres | tr '\n' ' ')
  fi
  for p in $pids; do cat "/proc/$p/stat" 2>/dev/null; done \
    | awk -v hz="$hz" '{ sub(/^.*\) /, ""); s += $12 + $13 } END { printf "%.3f\n", s / hz }'
}
# machine_cpu: "busy total" CPU seconds of the whole machine so far (/proc/stat).
machine_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; printf "%.3f %.3f\n", (t - $5 - $6) / hz, t / hz }' /proc/stat
}

fresh_db() {
  PGOPTIONS="-c client_min_messages=warning" psql "$ADMIN_DB" -Xq -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null || true
}

# start_svc PORT [HEARTBEAT_TOML] [OTA_TOML]
start_svc() {
  cat > "$WORK/svc.toml" <<TOML
instance_id = "bench-svc"
key_prefix = "$PREFIX"
[http]
listen = "127.0.0.1:$1"
[postgres]
url = "$DB_URL"
[redis]
url = "$REDIS_URL"
[heartbeat]
${2:-}
[ota]
${3:-}
[auth]
# The harness's parties send bursts (a storm polls its orders): measure the service, not the
# per-key rate limit.
rate_per_s = 0
[streams]
shards = $SHARDS
TOML
  api_parties "$SVC" "$DB_URL" bench
  RUST_LOG=warn "$SVC" --config "$WORK/svc.toml" >"$WORK/svc.log" 2>&1 &
  PIDS+=("$!")
  SVC_PID=$!
  wait_port "$1" "a benchmark process"
}

# start_gateway CABINET_PORT METRICS_PORT [MQTT_PORT] [NODE_ID]
start_gateway() {
  local node=${4:-bench-gw}
  cat > "$WORK/$node.toml" <<TOML
node_id = "$node"
key_prefix = "$PREFIX"
[redis]
url = "$REDIS_URL"
[cabinet]
listen = "127.0.0.1:$1"
[mqtt]
listen = "${3:+127.0.0.1:$3}"
[metrics]
listen = "127.0.0.1:$2"
[upstream]
shards = $SHARDS
TOML
  RUST_LOG=warn "$GW" --config "$WORK/$node.toml" >"$WORK/$node.log" 2>&1 &
  PIDS+=("$!")
  wait_port "$1" "a benchmark process"
}

# register_fleet N: the load harness's cabinets (LT-CAB-000000 ...), 2 doors x 4 lanes, with
# the secrets the harness derives.
register_fleet() {
  psql "$DB_URL" -Xq -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE TEMP TABLE ids AS SELECT 'LT-CAB-' || lpad(n::text, 6, '0') AS id FROM generate_series(0, $1 - 1) n;
INSERT INTO devices (key, kind) SELECT 'cab:' || id, 'cab' FROM ids;
INSERT INTO cabinets (id, device_key) SELECT id, 'cab:' || id FROM ids;
INSERT INTO doors (cabinet_id, door_id) SELECT id, d FROM ids, generate_series(1, 2) d;
INSERT INTO lanes (cabinet_id, door_id, lane_id) SELECT id, d, l FROM ids, generate_series(1, 2) d, generate_series(1, 4) l;
INSERT INTO device_credentials (device_key, secret)
  SELECT 'cab:' || id, sha256(convert_to('iotgw-loadtest-cabinet:' || id, 'UTF8')) FROM ids;
SQL
}

# pg_statements: with BENCH_PG_STATEMENTS=1 (scripts/lib/bench.sh), the statements PostgreSQL
# spent most time on during the run, printed.
pg_statements() {
  [ -n "${BENCH_PG_STATEMENTS:-}" ] || return 0
  psql "$DB_URL" -Xq -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" \
    -c "SELECT calls, round(total_exec_time) AS ms, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS query
          FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15" || true
}

# cpu_s PID: CPU seconds (user + system) the process has used.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f\n", ($14 + $15) / hz }' "/proc/$1/stat"; }

run_uplink() {
  local svc_port=18080 cab_port=17300 mqtt_port=11983 gw_metrics=19300 vehicles=2000 rate=10 hold=40
  fresh_db
  start_svc "$svc_port"
  start_gateway "$cab_port" "$gw_metrics" "$mqtt_port"
  local gw=$!
  # Registered through the API (vehicles need rows for their reports to be stored).
  "$LT" fleet --label uplink-seed --redis-url "$REDIS_URL" --key-prefix "$PREFIX" --mqtt-addr "127.0.0.1:$mqtt_port" \
    --api "127.0.0.1:$svc_port" --seed --vehicles "$vehicles" --hold-s 1 --out "$WORK/seed.json" 2>/dev/null
  local c0; c0=$(cpu_s "$gw")
  "$LT" fleet --label devsvc-uplink --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
    --mqtt-addr "127.0.0.1:$mqtt_port" --vehicles "$vehicles" --ramp-per-s 2000 --hold-s "$hold" \
    --publish-per-s "$rate" --server-pid "$gw" --max-duration-s 300 --out "$WORK/uplink.json" 2>"$WORK/uplink.log"
  local c1; c1=$(cpu_s "$gw")
  local acked; acked=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"]["details"]["counters"].get("uplinks_acked", 0))' "$WORK/uplink.json")
  # What the device service had stored when the fleet stopped: it kept pace if that is all.
  local n0; n0=$(psql "$DB_URL" -XAtq -c "SELECT count(*) FROM ota_reports")
  for _ in $(seq 1 1200); do
    [ "$(psql "$DB_URL" -XAtq -c "SELECT count(*) FROM ota_reports")" -ge "$acked" ] && break
    sleep 0.1
  done
  local stored; stored=$(psql "$DB_URL" -XAtq -c "SELECT count(*) FROM ota_reports")
  python3 - "$WORK/uplink.json" "$c0" "$c1" "$stored" "$OUT/devsvc-uplink.json" "$n0" <<'PY'
import json, sys
report, c0, c1, stored, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
stored_at_stop = int(sys.argv[6])
r = json.load(open(report))
d = r["results"]["details"]
acked = d["counters"].get("uplinks_acked", 0)
# The gateway's CPU over the whole fleet run (ramp, hold, stop), against the uplinks of the run.
run_s = r["results"]["ramp_s"] + d["hold_s"] + 5
cpu_per_s = (c1 - c0) / run_s
r["results"]["forwarding"] = {
    "uplinks_acked": acked,
    "stored_by_device_service": stored,
    "all_stored": stored >= acked,
    "stored_when_the_fleet_stopped": stored_at_stop,
    "reports_stored_per_s_during_the_run": round(stored_at_stop / run_s),
    "uplinks_acked_per_s_in_hold": d["uplinks_acked_per_s_in_hold"],
    "gateway_cpu_s": round(c1 - c0, 3),
    "gateway_cores_busy": round(cpu_per_s, 3),
    "uplinks_per_gateway_core_s": round(acked / max(c1 - c0, 0.001)),
}
json.dump(r, open(out, "w"), indent=2)
print(json.dumps(r["results"]["forwarding"], indent=2))
PY
  stop_all
}

run_purchases() {
  local svc_port=18080 cab_port=17300 gw_metrics=19300
  fresh_db
  start_svc "$svc_port"
  start_gateway "$cab_port" "$gw_metrics"
  "$LT" fleet --label devsvc-purchase-storm --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
    --cabinet-addr "127.0.0.1:$cab_port" --api "127.0.0.1:$svc_port" --seed --cabinets 1000 \
    --ramp-per-s 2000 --hold-s 45 --purchases 500 --server-pid "$SVC_PID" --max-duration-s 300 \
    --out "$OUT/devsvc-purchase-storm.json"
  stop_all
}

run_scenarios() {
  local svc_port=18080 cab_port=17300 mqtt_port=11983 gw_metrics=19300
  fresh_db
  start_svc "$svc_port" "" "push_rate_per_s = 500"
  start_gateway "$cab_port" "$gw_metrics" "$mqtt_port"
  "$LT" fleet --label devsvc-scenarios --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
    --cabinet-addr "127.0.0.1:$cab_port" --mqtt-addr "127.0.0.1:$mqtt_port" --api "127.0.0.1:$svc_port" --seed \
    --cabinets 1000 --vehicles 2000 --ramp-per-s 2000 --hold-s 90 --purchases 1000 --activations 1000 \
    --ota --ota-step-ms 500 --server-pid "$SVC_PID" --max-duration-s 600 --out "$OUT/devsvc-scenarios.json"
  stop_all
}

# weights_run NAME SETTING_JSON FLEET_ARGS...: one run of the readings benchmark (a fresh
# database, device service and gateway; the fleet with FLEET_ARGS held 60 s; then until every
# reading sent is stored), its figures appended to ROWS as JSON with SETTING_JSON's fields.
weights_run() {
  local name=$1 setting=$2; shift 2
  local cabinets=${WEIGHT_CABINETS:-5000} hold=60 svc_port=18080 cab_port=17300 gw_metrics=19300
  fresh_db
  start_svc "$svc_port"
  register_fleet "$cabinets"
  start_gateway "$cab_port" "$gw_metrics"
  local gw=$!
  local samples="$WORK/$name.tsv"
  : > "$samples"
  ( while kill -0 "$SVC_PID" 2>/dev/null; do
      printf '%s\t%s\t%s\t%s\n' "$(date +%s.%N)" "$(metric $svc_port devsvc_weight_readings_persisted_total)" \
        "$(group_sum lag)" "$(group_sum pending)" >> "$samples"
      sleep 2
    done ) &
  local sampler=$!
  local t0; t0=$(date +%s.%N)
  local cpu0; cpu0="$(cpu_s "$SVC_PID") $(cpu_s "$gw") $(redis_cpu) $(pg_cpu) $(machine_cpu)"
  "$LT" fleet --label "devsvc-$name" --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
    --cabinet-addr "127.0.0.1:$cab_port" --cabinets "$cabinets" --ramp-per-s 2000 --hold-s "$hold" \
    --server-pid "$SVC_PID" --max-duration-s 300 "$@" --out "$WORK/$name.json" 2>"$WORK/$name.log"
  local t1; t1=$(date +%s.%N)
  # Let the device service store what is still in the streams (at most ten minutes), watched
  # through its counter: counting the table every moment would load the server it measures.
  local sent; sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"]["details"]["counters"].get("weight_reports", 0) * 4)' "$WORK/$name.json")
  for _ in $(seq 1 3000); do
    awk -v n="$(metric $svc_port devsvc_weight_readings_persisted_total)" -v s="$sent" 'BEGIN { exit !(n >= s) }' && break
    sleep 0.2
  done
  local t2; t2=$(date +%s.%N)
  local cpu1; cpu1="$(cpu_s "$SVC_PID") $(cpu_s "$gw") $(redis_cpu) $(pg_cpu) $(machine_cpu)"
  local stored; stored=$(psql "$DB_URL" -XAtq -c "SELECT count(*) FROM weight_readings")
  kill "$sampler" 2>/dev/null || true
  stop_all
  ROWS+=("$(python3 - "$setting" "$samples" "$WORK/$name.json" "$t0" "$t1" "$t2" "$stored" "$cabinets" "$cpu0" "$cpu1" <<'PY'
import json, sys
setting, samples, fleet, t0, t1, t2, stored, cabinets, cpu0, cpu1 = sys.argv[1:]
# CPU seconds from the fleet's start until every reading was stored: device service, gateway,
# Redis, PostgreSQL, and the machine (busy, total); the harness is the machine's remainder.
cpu = [b - a for a, b in zip(map(float, cpu0.split()), map(float, cpu1.split()))]
t0, t1, t2, stored = float(t0), float(t1), float(t2), int(stored)
report = json.load(open(fleet))["results"]
sent = report["details"]["counters"].get("weight_reports", 0) * 4
rows = [tuple(map(float, l.split("\t"))) for l in open(samples) if l.count("\t") == 3]
# The steady part of the hold: after the ramp and the first door cycle, before the end.
start, end = t0 + report["ramp_s"] + 15, t1 - 5
steady = [r for r in rows if start <= r[0] <= end]
rate_steady = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 1 else 0.0
peak = max(((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(rows, rows[1:]) if b[0] > a[0]), default=0.0)
# After the load generator stopped: the device service and PostgreSQL alone, working off the lag.
after = [r for r in rows if t1 <= r[0] <= t2]
drain_rate = (after[-1][1] - after[0][1]) / (after[-1][0] - after[0][0]) if len(after) > 2 else None
print(json.dumps({
    **json.loads(setting),
    "cabinets": int(cabinets),
    "readings_sent": sent,
    "readings_stored": stored,
    "all_stored": stored == sent,
    "offered_per_s_in_hold": round(sent / (t1 - t0)),
    "stored_per_s_steady": round(rate_steady),
    "stored_per_s_peak_2s": round(peak),
    "max_lag_entries": max((r[2] for r in rows), default=0),
    "max_pending_entries": max((r[3] for r in rows), default=0),
    "drain_after_load_s": round(t2 - t1, 1),
    "stored_per_s_while_draining": round(drain_rate) if drain_rate else None,
    "commands": report["details"].get("commands", {}).get("outcomes", {}),
    "cpu_s": {"device_svc": round(cpu[0], 1), "gateway": round(cpu[1], 1), "redis": round(cpu[2], 1),
              "postgres": round(cpu[3], 1), "machine_busy": round(cpu[4], 1),
              "rest_of_machine": round(cpu[4] - sum(cpu[:4]), 1)},
    "machine_idle_share": round(1 - cpu[4] / cpu[5], 3) if cpu[5] else None,
    "readings_per_cpu_s": {"device_svc": round(stored / max(cpu[0], 1e-3)), "postgres": round(stored / max(cpu[3], 1e-3)),
                           "device_svc_redis_postgres": round(stored / max(cpu[0] + cpu[2] + cpu[3], 1e-3))},
}))
PY
)")
  echo "$name: ${ROWS[-1]}" >&2
}

# weights_write FILE: ROWS as FILE, with the commit and the machine.
weights_write() {
  python3 - "$1" "${ROWS[@]}" <<'PY'
import json, subprocess, sys
out, rows = sys.argv[1], [json.loads(r) for r in sys.argv[2:]]
sh = lambda *c: subprocess.run(c, capture_output=True, text=True).stdout.strip()
json.dump({
    "commit": sh("git", "rev-parse", "--short", "HEAD"),
    "date": sh("date", "-u", "+%Y-%m-%dT%H:%M:%SZ"),
    "machine": f"{sh('nproc')} cores, " + sh("sh", "-c", "grep MemTotal /proc/meminfo | awk '{print $2}'") + " kB",
    "parameters": {"cabinets": rows[0]["cabinets"] if rows else 0, "doors": 2, "lanes_per_door": 4, "hold_s": 60,
                   "report_every_ms_while_open": 300, "door_cycle_s": 11},
    "results": rows,
}, open(out, "w"), indent=2)
PY
}

# Doors opened by commands (no order behind them: each door event is also an
# event_without_order anomaly, with its notice and inspection check).
run_weights() {
  ROWS=()
  local rate
  for rate in "${RATES[@]}"; do
    weights_run "weights-$rate" "{\"open_doors_per_s\": $rate}" --commands-per-s "$rate" --open-doors
  done
  weights_write "$OUT/devsvc-weights.json"
}

# Readings alone: every door reports its stable weights every CLOSED_REPORT_MS, no door traffic.
run_stream() {
  ROWS=()
  local ms
  for ms in "${STREAM_MS[@]}"; do
    weights_run "stream-$ms" "{\"report_every_ms\": $ms}" --closed-report-ms "$ms"
  done
  weights_write "$OUT/devsvc-weights-stream.json"
}

# 100,000 devices at once: COMBINED_CABINETS cabinets and COMBINED_VEHICLES vehicles registered
# through the API, spread over COMBINED_NODES gateway processes (the file limit allows about
# 19,000 connections each), one device service; during the hold heartbeats every 30 s, closed
# doors' weights every 90 s, an uplink every 10 s from each vehicle, and a purchase storm at the
# start of the hold (COMBINED_PURCHASES doors opened for orders, weights every 300 ms while open).
# Devices connect from 127.0.0.2..11: a source address has about 28,000 ports, and 4 of them
# (the harness's default) run out at 100,000 devices with reconnections.
run_combined() {
  local cabinets=${COMBINED_CABINETS:-80000} vehicles=${COMBINED_VEHICLES:-20000} nodes=${COMBINED_NODES:-6}
  local purchases=${COMBINED_PURCHASES:-1000} hold=${COMBINED_HOLD_S:-120} svc_port=18080 n
  fresh_db
  start_svc "$svc_port"
  local addrs=() servers=()
  for ((n = 0; n < nodes; n++)); do
    start_gateway $((17300 + n * 100)) $((19300 + n * 100)) $((11983 + n * 100)) "bench-gw-$n"
    servers+=(--server-pid "$!")
    addrs+=(--cabinet-addr "127.0.0.1:$((17300 + n * 100))" --mqtt-addr "127.0.0.1:$((11983 + n * 100))")
  done
  local cpu0; cpu0="$(cpu_s "$SVC_PID") $(redis_cpu) $(pg_cpu) $(machine_cpu)"
  # The device service's backlog (upstream entries not yet read) every 2 s: what a door event
  # written now waits behind.
  ( while kill -0 "$SVC_PID" 2>/dev/null; do
      printf '%s\t%s\n' "$(date +%s.%N)" "$(group_sum lag)" >> "$WORK/backlog.tsv"
      sleep 2
    done ) &
  local sampler=$!
  "$LT" fleet --label devsvc-combined-100k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
    --api "127.0.0.1:$svc_port" --seed "${addrs[@]}" --cabinets "$cabinets" --vehicles "$vehicles" \
    --ramp-per-s 2000 --hold-s "$hold" --purchases "$purchases" --publish-per-s 0.1 "${servers[@]}" \
    --source-ips 10 --max-duration-s 3600 --out "$WORK/combined.json" 2> >(tee "$WORK/combined.log" >&2)
  local sent; sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"]["details"]["counters"].get("weight_reports", 0) * 4)' "$WORK/combined.json")
  for _ in $(seq 1 1500); do
    awk -v n="$(metric $svc_port devsvc_weight_readings_persisted_total)" -v s="$sent" 'BEGIN { exit !(n >= s) }' && break
    sleep 0.2
  done
  local cpu1; cpu1="$(cpu_s "$SVC_PID") $(redis_cpu) $(pg_cpu) $(machine_cpu)"
  local stored; stored=$(psql "$DB_URL" -XAtq -c "SELECT count(*) FROM weight_readings")
  local orders; orders=$(psql "$DB_URL" -XAtq -c "SELECT coalesce(json_object_agg(k, n), '{}') FROM (SELECT state || ': ' || coalesce(reason, '') k, count(*) n FROM orders GROUP BY 1) s")
  local online; online=$(psql "$DB_URL" -XAtq -c "SELECT count(*) FROM devices WHERE status = 'online'")
  # How long orders took to each step, by how they ended.
  local steps; steps=$(psql "$DB_URL" -XAtq -c "SELECT coalesce(json_object_agg(k, v), '{}') FROM (
      SELECT state || ': ' || coalesce(reason, '') k, json_build_object('orders', count(*),
        'authorised_s', round(avg(extract(epoch FROM authorised_at - created_at))::numeric, 1),
        'door_open_s', round(avg(extract(epoch FROM door_open_at - created_at))::numeric, 1),
        'door_closed_s', round(avg(extract(epoch FROM door_closed_at - created_at))::numeric, 1),
        'finished_s', round(avg(extract(epoch FROM finished_at - created_at))::numeric, 1)) v
      FROM orders GROUP BY 1) s")
  kill "$sampler" 2>/dev/null || true
  # How many entries the consumer applied together, by kind: sets (count) and entries (sum).
  local sets; sets=$(metrics $svc_port | awk '/^devsvc_stream_set_entries_(count|sum)\{/ { print $1, $NF }')
  # What the device service's commands (the storm's door opens and queries) came to, by outcome.
  local commands; commands=$(metrics $svc_port | awk '/^devsvc_commands_total\{/ { print $1, $NF }')
  pg_statements
  stop_all
  python3 - "$WORK/combined.json" "$OUT/devsvc-combined-100k.json" "$sent" "$stored" "$orders" "$online" "$cpu0" "$cpu1" \
    "$steps" "$WORK/backlog.tsv" "$sets" "$SHARDS" "$commands" <<'PY'
import json, re, sys
src, out, sent, stored, orders, online, cpu0, cpu1, steps, backlog, sets, shards, commands = sys.argv[1:]
by_kind = {}
for name, value in (l.split() for l in sets.splitlines() if l.strip()):
    m = re.match(r'devsvc_stream_set_entries_(count|sum)\{type="([a-z_]+)"\}', name)
    if m:
        by_kind.setdefault(m.group(2), {})["sets" if m.group(1) == "count" else "entries"] = int(float(value))
outcomes = {}
for name, value in (l.split() for l in commands.splitlines() if l.strip()):
    m = re.match(r'devsvc_commands_total\{outcome="([a-z_]+)"\}', name)
    if m:
        outcomes[m.group(1)] = int(float(value))
r = json.load(open(src))
cpu = [b - a for a, b in zip(map(float, cpu0.split()), map(float, cpu1.split()))]
samples = [tuple(map(float, l.split("\t"))) for l in open(backlog) if l.count("\t") == 1]
peak = max(samples, key=lambda s: s[1], default=(0, 0))
r["results"]["device_service"] = {
    # A report sent as its cabinet was disconnecting may be stored without the harness counting it.
    "weight_readings_sent": int(sent), "weight_readings_stored": int(stored), "all_stored": int(stored) >= int(sent),
    "order_steps_s_by_outcome": json.loads(steps),
    "backlog_peak_entries": int(peak[1]),
    "backlog_peak_after_start_s": round(peak[0] - samples[0][0], 1) if samples else None,
    "backlog_cleared_after_start_s": next((round(t - samples[0][0], 1) for t, n in samples if t > peak[0] and n < 1000), None),
    "orders_by_state_and_reason": json.loads(orders), "devices_online_at_the_end": int(online),
    "applied_in_sets": by_kind, "upstream_shards": int(shards), "commands_by_outcome": outcomes,
    "cpu_s": {"device_svc": round(cpu[0], 1), "redis": round(cpu[1], 1), "postgres": round(cpu[2], 1),
              "machine_busy": round(cpu[3], 1)},
    "machine_idle_share": round(1 - cpu[3] / cpu[4], 3) if cpu[4] else None,
}
json.dump(r, open(out, "w"), indent=2)
print(json.dumps(r["results"]["device_service"], indent=2))
PY
}

# metric_where PORT NAME LABEL: the sum of NAME's samples whose labels contain LABEL
# (for example 'type="open"').
metric_where() {
  metrics "$1" | awk -v n="$2" -v l="$3" 'index($1, n "{") == 1 && index($1, l) { s += $NF } END { printf "%.0f\n", s + 0 }'
}

# A login wave and the leave after it, through real gateways, and how the device service keeps
# up with the session events they write (see the header).
run_logins() {
  local cabinets=${LOGIN_CABINETS:-36000} ramp=${LOGIN_RAMP_PER_S:-4000} svc_port=18080 n
  fresh_db
  start_svc "$svc_port"
  register_fleet "$cabinets"
  local addrs=() servers=()
  for n in 0 1; do
    start_gateway $((17300 + n * 100)) $((19300 + n * 100)) "" "bench-gw-$n"
    servers+=(--server-pid "$!")
    addrs+=(--cabinet-addr "127.0.0.1:$((17300 + n * 100))")
  done
  local samples="$WORK/logins.tsv"
  : > "$samples"
  # time, opens applied, closes applied (any result), entries not yet read, CPU of the parts
  ( while kill -0 "$SVC_PID" 2>/dev/null; do
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date +%s.%N)" \
        "$(metric_where $svc_port devsvc_stream_entries_total 'type="open"')" \
        "$(metric_where $svc_port devsvc_stream_entries_total 'type="close"')" "$(group_sum lag)" \
        "$(cpu_s "$SVC_PID")" "$(pg_cpu)" "$(redis_cpu)" >> "$samples"
      sleep 0.25
    done ) &
  local sampler=$!
  "$LT" fleet --label devsvc-logins --redis-url "$REDIS_URL" --key-prefix "$PREFIX" "${addrs[@]}" \
    --cabinets "$cabinets" --ramp-per-s "$ramp" --hold-s 30 "${servers[@]}" --source-ips 4 \
    --max-duration-s 600 --out "$WORK/logins.json" 2>"$WORK/logins.log"
  local left; left=$(date +%s.%N)
  for _ in $(seq 1 2400); do
    [ "$(metric_where $svc_port devsvc_stream_entries_total 'type="close"')" -ge "$cabinets" ] && break
    sleep 0.25
  done
  sleep 1
  kill "$sampler" 2>/dev/null || true
  pg_statements
  stop_all
  python3 - "$WORK/logins.json" "$samples" "$cabinets" "$left" "$OUT/devsvc-logins.json" <<'PY'
import json, sys
report, samples, n, left, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
r = json.load(open(report))
rows = [tuple(map(float, l.split("\t"))) for l in open(samples) if l.count("\t") == 6]
t0 = rows[0][0]
def first(col, at_least):
    return next((row for row in rows if row[col] >= at_least), None)
def wave(col, start_row, end_row):
    if start_row is None or end_row is None:
        return None
    span = end_row[0] - start_row[0]
    events = end_row[col] - start_row[col]
    return {
        "applied": int(end_row[col]),
        "seconds": round(span, 2),
        "applied_per_s": round(events / span) if span > 0 else None,
        "device_svc_us_per_event": round((end_row[4] - start_row[4]) / events * 1e6, 1) if events else None,
        "postgres_us_per_event": round((end_row[5] - start_row[5]) / events * 1e6, 1) if events else None,
        "redis_us_per_event": round((end_row[6] - start_row[6]) / events * 1e6, 1) if events else None,
    }
opens = wave(1, first(1, 1), first(1, n))
first_open = first(1, 1)
all_open = first(1, n)
closes = wave(2, first(2, 1), first(2, n))
all_closed = first(2, n)
r["results"]["device_service"] = {
    "opens": opens,
    "opens_all_applied_after_first_s": round(all_open[0] - first_open[0], 2) if all_open and first_open else None,
    "ramp_s": r["results"]["ramp_s"],
    "opens_behind_the_ramp_s": round(all_open[0] - first_open[0] - r["results"]["ramp_s"], 2) if all_open and first_open else None,
    "closes": closes,
    "closes_all_applied_after_the_fleet_left_s": round(all_closed[0] - left, 2) if all_closed else None,
    "max_unread_entries": int(max(row[3] for row in rows)),
}
json.dump(r, open(out, "w"), indent=2)
print(json.dumps(r["results"]["device_service"], indent=2))
PY
}

run_offline() {
  local devices=100000 svc_port=18081 duration=240 silent=1000 silence_after=90
  fresh_db
  start_svc "$svc_port" "startup_grace_s = 0"
  psql "$DB_URL" -Xq -v ON_ERROR_STOP=1 -c \
    "INSERT INTO devices (key, kind, status, status_epoch, initialised)
     SELECT 'cab:HB-' || lpad(n::text, 6, '0'), 'cab', 'online', 1, true FROM generate_series(0, $devices - 1) n" >/dev/null
  local samples="$WORK/offline.tsv"
  : > "$samples"
  ( while kill -0 "$SVC_PID" 2>/dev/null; do
      printf '%s\t%s\t%s\t%s\n' "$(date +%s.%N)" "$(metric $svc_port process_cpu_seconds_total)" "$(redis_cpu)" \
        "$(group_sum lag)" >> "$samples"
      sleep 5
    done ) &
  local sampler=$!
  local t0; t0=$(date +%s.%N)
  "$LT" hb-feed --redis-url "$REDIS_URL" --key-prefix "$PREFIX" --devices "$devices" --nodes 6 --interval-s 30 \
    --duration-s "$duration" --silent "$silent" --silence-after-s "$silence_after" --out "$WORK/hb-feed.json"
  kill "$sampler" 2>/dev/null || true
  psql "$DB_URL" -XAtq -F $'\t' -c \
    "SELECT device_key, (extract(epoch FROM at) * 1000)::bigint FROM device_status_history WHERE reason = 'heartbeat_timeout'" \
    > "$WORK/offline-decisions.tsv"
  local suppressed; suppressed=$(metric $svc_port devsvc_offline_suppressed_total)
  local checks; checks=$(metric $svc_port devsvc_deadline_checks_total)
  stop_all
  python3 - "$OUT/devsvc-offline-100k.json" "$samples" "$WORK/hb-feed.json" "$WORK/offline-decisions.tsv" \
    "$t0" "$silence_after" "$suppressed" "$checks" <<'PY'
import json, subprocess, sys
out, samples, feed, decisions, t0, silence_after, suppressed, checks = sys.argv[1:]
t0, silence_after = float(t0), float(silence_after)
feed = json.load(open(feed))
plan, result = feed["plan"], feed["result"]
rows = [tuple(map(float, l.split("\t"))) for l in open(samples) if l.count("\t") == 3]
# Steady state: the health window (60 s) filled, before the silent cabinets' deadlines.
steady = [r for r in rows if t0 + 70 <= r[0] <= t0 + silence_after + 60]
span = steady[-1][0] - steady[0][0]
svc_cpu = (steady[-1][1] - steady[0][1]) / span
redis_cpu = (steady[-1][2] - steady[0][2]) / span
hb_per_s = result["heartbeats"] / result["seconds"]
last = result["silent_last_ms"]
late = sorted(int(l.split("\t")[1]) - (last[l.split("\t")[0]] + 75_000) for l in open(decisions) if l.strip())
pct = lambda p: late[min(len(late) - 1, int(p * len(late)))] if late else None
sh = lambda *c: subprocess.run(c, capture_output=True, text=True).stdout.strip()
json.dump({
    "commit": sh("git", "rev-parse", "--short", "HEAD"),
    "date": sh("date", "-u", "+%Y-%m-%dT%H:%M:%SZ"),
    "machine": f"{sh('nproc')} cores",
    "parameters": plan,
    "results": {
        "heartbeats_per_s": round(hb_per_s),
        "device_svc_cpu_s_per_s": round(svc_cpu, 4),
        "redis_cpu_s_per_s": round(redis_cpu, 4),
        "cpu_us_per_heartbeat": round((svc_cpu + redis_cpu) / hb_per_s * 1e6, 1),
        "max_lag_entries": max((r[3] for r in rows), default=0),
        "silent": plan["silent"],
        "marked_offline": len(late),
        "deadline_checks": float(checks),
        "suppressed": float(suppressed),
        "offline_after_deadline_ms": {"min": late[0] if late else None, "p50": pct(0.5), "p99": pct(0.99), "max": late[-1] if late else None},
    },
}, open(out, "w"), indent=2)
print(json.dumps(json.load(open(out))["results"], indent=2))
PY
}

for run in "${RUNS[@]}"; do
  case "$run" in
    weights) run_weights ;;
    stream) run_stream ;;
    combined) run_combined ;;
    offline) run_offline ;;
    logins) run_logins ;;
    scenarios) run_scenarios ;;
    uplink) run_uplink ;;
    purchases) run_purchases ;;
    *) echo "unknown run: $run (weights stream logins offline uplink purchases scenarios combined)"; exit 2 ;;
  esac
done
echo "results in $OUT/"
