#!/usr/bin/env bash
# Proves grafana/ against real data (run by scripts/test; also on its own):
#   1. promtool: the scrape configuration and the alert rules are valid, and the rules' unit
#      tests (rules/alerts_test.yml) pass;
#   2. a small stack (the device service, two gateway nodes) under a small simulated fleet
#      (loadtest: heartbeats, weights, commands, purchases, activations, an OTA campaign),
#      scraped every second by a real Prometheus that also evaluates the alert rules;
#   3. grafana/check.py: every dashboard importable, every panel query valid and with data
#      (unless grafana/expect-empty.txt says why not), every alert rule healthy;
#   4. alerts reach someone: amtool checks grafana/alertmanager.yml, a real Alertmanager runs
#      it (its webhooks pointed at a receiver here), the stack's run marker is deleted (Redis
#      "lost its data"), and the critical RedisLostItsData alert must arrive at the on-call
#      webhook, and not at the team's.
# Prometheus and promtool come from Debian's `prometheus` package, Alertmanager and amtool from
# `prometheus-alertmanager`, installed when missing.
#
#   grafana/check.sh
#
# Uses REDIS_URL / DATABASE_URL (or finds or starts servers as scripts/test does); a database
# and a Redis key prefix of its own, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

STANDALONE=0
if [ -z "${REDIS_URL:-}" ] || [ -z "${DATABASE_URL:-}" ]; then
  STANDALONE=1
  services_up
fi
RUN=${TEST_RUN_ID:-obs$$}
DB="iotgw_${RUN}_obs"
PREFIX="iotgw_${RUN}_obs:"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/iotgw-obs.XXXXXX")
PIDS=()

finish() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql "$DATABASE_URL" -Xq -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" 2>/dev/null \
      | xargs -r -n 500 redis-cli -u "$REDIS_URL" unlink >/dev/null 2>&1 || true
  fi
  if [ "$status" != 0 ]; then
    for log in "$WORK"/*.log; do echo "--- $log (last lines)" >&2; tail -n 15 "$log" >&2; done
  fi
  rm -rf "$WORK"
  [ "$STANDALONE" = 1 ] && services_down
  exit "$status"
}
trap finish EXIT

command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || install_packages prometheus
command -v prometheus-alertmanager >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 \
  || install_packages prometheus-alertmanager
say "promtool and amtool: configuration, rules, rule unit tests, alert routing"
# The shipped configuration reads the device service's metrics key from a file beside it.
mkdir -p "$WORK/shipped"
cp grafana/prometheus.yml "$WORK/shipped/" && ln -s "$PWD/grafana/rules" "$WORK/shipped/rules"
echo "iotk_placeholder" >"$WORK/shipped/device-svc-metrics.key"
promtool check config "$WORK/shipped/prometheus.yml" >/dev/null
promtool check rules grafana/rules/alerts.yml >/dev/null
promtool test rules grafana/rules/alerts_test.yml >/dev/null
amtool check-config grafana/alertmanager.yml >/dev/null

say "observability check: a small stack under a simulated fleet, scraped by Prometheus"
cargo build --locked -q -p gateway -p device-svc -p loadtest -p account-ref --bins
PGOPTIONS="-c client_min_messages=warning" psql "$DATABASE_URL" -Xq -c "DROP DATABASE IF EXISTS \"$DB\"" -c "CREATE DATABASE \"$DB\"" >/dev/null
DB_URL=$(url_with_db "$DATABASE_URL" "$DB")
api_parties target/debug/device-svc "$DB_URL" obs

SVC_PORT=$(free_port)
# Stored OTA packages on (keys of this check only), so the download and rollout panels have data.
ota_package_keys obs "$WORK/ota-packages"
export DEVICE_SVC_OTA_REPUSH_DELAY_S=1
DEVICE_SVC_KEY_PREFIX=$PREFIX target/debug/device-svc --instance-id obs-svc \
  --http-listen "127.0.0.1:$SVC_PORT" --database-url "$DB_URL" --redis-url "$REDIS_URL" >"$WORK/device-svc.log" 2>&1 &
PIDS+=($!)
wait_port "$SVC_PORT" "the device service"
# The reference account service answers the settlements (payment results have data).
target/debug/account-consumer --database-url "$DB_URL" --key-prefix "$PREFIX" --redis-url "$REDIS_URL" \
  >"$WORK/account.log" 2>&1 &
PIDS+=($!)

CAB=() MQTT=() TARGETS=""
for n in 1 2; do
  cab=$(free_port) mqtt=$(free_port) metrics=$(free_port)
  GATEWAY_KEY_PREFIX=$PREFIX target/debug/gateway --node-id "obs-gw-$n" --redis-url "$REDIS_URL" \
    --cabinet-listen "127.0.0.1:$cab" --mqtt-listen "127.0.0.1:$mqtt" --metrics-listen "127.0.0.1:$metrics" \
    >"$WORK/gateway-$n.log" 2>&1 &
  PIDS+=($!)
  wait_port "$cab" "gateway node $n"
  CAB+=(--cabinet-addr "127.0.0.1:$cab")
  MQTT+=(--mqtt-addr "127.0.0.1:$mqtt")
  TARGETS="$TARGETS\"127.0.0.1:$metrics\", "
done

# The webhook receiver: each POST's body, one line per call, in a file named by its path.
HOOK_PORT=$(free_port)
python3 - "$HOOK_PORT" "$WORK" >"$WORK/webhook.log" 2>&1 <<'PY' &
import http.server, sys
port, work = int(sys.argv[1]), sys.argv[2]
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(f"{work}/webhook{self.path.replace('/', '-')}.jsonl", "ab") as f:
            f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", port), Hook).serve_forever()
PY
PIDS+=($!)
wait_port "$HOOK_PORT" "the webhook receiver"
# The shipped routing, its webhooks pointed here; a critical alert waits 10 s to be grouped.
AM_PORT=$(free_port)
sed "s#http://127.0.0.1:9095/#http://127.0.0.1:$HOOK_PORT/#" grafana/alertmanager.yml >"$WORK/alertmanager.yml"
prometheus-alertmanager --config.file "$WORK/alertmanager.yml" --storage.path "$WORK/alertmanager" \
  --web.listen-address "127.0.0.1:$AM_PORT" --cluster.listen-address "" >"$WORK/alertmanager.log" 2>&1 &
PIDS+=($!)
wait_port "$AM_PORT" "Alertmanager"

PROM_PORT=$(free_port)
cat > "$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/grafana/rules/alerts.yml
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["127.0.0.1:$AM_PORT"]
scrape_configs:
  - job_name: gateway
    static_configs:
      - targets: [${TARGETS%, }]
  - job_name: device-svc
    authorization:
      credentials: $IOTGW_METRICS_KEY
    static_configs:
      - targets: ["127.0.0.1:$SVC_PORT"]
EOF
prometheus --config.file "$WORK/prometheus.yml" --storage.tsdb.path "$WORK/tsdb" \
  --web.listen-address "127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_port "$PROM_PORT" "Prometheus"

target/debug/loadtest fleet --label observability-check --key-prefix "$PREFIX" --redis-url "$REDIS_URL" \
  "${CAB[@]}" "${MQTT[@]}" --api "127.0.0.1:$SVC_PORT" --seed --cabinets 30 --vehicles 20 \
  --ramp-per-s 200 --hold-s 25 --commands-per-s 5 --purchases 30 --activations 10 --ota --ota-step-ms 200 \
  --ota-package-mib 1 --ota-cut-ratio 0.5 --ota-waves 20,100 --ota-failure-ratio 0.2 --ota-error-threshold 10 \
  --ota-progress-ms 1000 \
  --max-duration-s 240 --out "$WORK/fleet.json" >"$WORK/loadtest.log" 2>&1 \
  || die "the simulated fleet failed (see $WORK/loadtest.log)"
# Wait until every target was scraped after the fleet stopped.
python3 - "http://127.0.0.1:$PROM_PORT" "$(date +%s)" <<'PY'
import json, sys, time, urllib.parse, urllib.request
base, since = sys.argv[1], float(sys.argv[2]) + 1
for _ in range(300):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": "min(timestamp(up))"})
    result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
    if result and float(result[0]["value"][1]) > since:
        sys.exit(0)
    time.sleep(0.1)
sys.exit("Prometheus did not scrape the stack after the fleet")
PY
python3 grafana/check.py "http://127.0.0.1:$PROM_PORT"

say "alerts reach someone: Redis loses the stack's data, the on-call webhook is told"
redis-cli -u "$REDIS_URL" del "${PREFIX}bus:run" >/dev/null
python3 - "$WORK" <<'PY'
import json, os, sys, time
work = sys.argv[1]
def alerts(receiver):
    path = f"{work}/webhook-{receiver}.jsonl"
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [a for line in f for a in json.loads(line)["alerts"]]
deadline = time.time() + 90
while time.time() < deadline:
    fired = [a for a in alerts("oncall") if a["labels"]["alertname"] == "RedisLostItsData" and a["status"] == "firing"]
    if fired:
        assert fired[0]["labels"]["severity"] == "critical", fired[0]
        assert not any(a["labels"]["alertname"] == "RedisLostItsData" for a in alerts("team")), "a critical alert went to the team"
        print(f"RedisLostItsData reached the on-call webhook ({len(alerts('team'))} warnings at the team's)")
        sys.exit(0)
    time.sleep(0.5)
sys.exit("RedisLostItsData did not reach the on-call webhook within 90 s")
PY

