#!/usr/bin/env bash
# How long the operator console's pages and the list routes take with a large fleet: a
# database filled with DEVICES devices (half cabinets with two doors, half vehicles) and ORDERS
# orders (defaults 100,000 and 1,000,000), one device-service instance, and each page fetched
# RUNS times (default 15) by curl with a signed-in session; prints the median and the slowest
# per page, in ms, as a Markdown table (BENCHMARKS.md "Console pages").
#
#   loadtest/bench/console-pages.sh                  # builds the release binary
#   BIN=path/to/device-svc DEVICES=100000 ORDERS=1000000 RUNS=15 loadtest/bench/console-pages.sh
#
# The rows are written by SQL (generate_series), as the service would have written them, then
# ANALYZEd; filling a million orders takes a minute or two. Servers as for scripts/test.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh

DEVICES=${DEVICES:-100000}
ORDERS=${ORDERS:-1000000}
RUNS=${RUNS:-15}
services_up
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q -p device-svc
  BIN=target/release/device-svc
fi
WORK=$(mktemp -d)
DB=iotgw_benchconsole_$$
PREFIX="benchconsole$$:"
SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill "$SVC_PID" 2>/dev/null && wait "$SVC_PID" 2>/dev/null
  psql "$DATABASE_URL" -Xq -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  services_down
}
trap cleanup EXIT

psql "$DATABASE_URL" -Xq -c "CREATE DATABASE $DB" >/dev/null
URL=$(url_with_db "$DATABASE_URL" "$DB")
PORT=$(free_port)
DEVICE_SVC_KEY_PREFIX=$PREFIX RUST_LOG=warn "$BIN" --http-listen "127.0.0.1:$PORT" --database-url "$URL" \
  --redis-url "$REDIS_URL" >"$WORK/svc.log" 2>&1 &
SVC_PID=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null || die "the device service did not start: $(tail -5 "$WORK/svc.log")"

say "filling $DEVICES devices and $ORDERS orders"
HALF=$(( DEVICES / 2 ))
psql "$URL" -Xq -v ON_ERROR_STOP=1 <<SQL
INSERT INTO products (id, name, unit_grams, price_cents) VALUES ('cola', 'Cola', 350, 300);
INSERT INTO devices (key, kind, status, status_reason, status_changed_at, node, enabled)
SELECT 'cab:C' || lpad(i::text, 7, '0'), 'cab', (ARRAY['online', 'online', 'online', 'offline'])[1 + i % 4],
       'bench', now() - make_interval(secs => i), 'gw-' || (i % 8), i % 500 <> 0
  FROM generate_series(1, $HALF) i;
INSERT INTO cabinets (id, device_key) SELECT 'C' || lpad(i::text, 7, '0'), 'cab:C' || lpad(i::text, 7, '0')
  FROM generate_series(1, $HALF) i;
INSERT INTO doors (cabinet_id, door_id) SELECT 'C' || lpad(i::text, 7, '0'), d FROM generate_series(1, $HALF) i, generate_series(1, 2) d;
INSERT INTO lanes (cabinet_id, door_id, lane_id, product_id)
SELECT 'C' || lpad(i::text, 7, '0'), d, l, 'cola' FROM generate_series(1, $HALF) i, generate_series(1, 2) d, generate_series(1, 4) l;
INSERT INTO devices (key, kind, status, status_reason, status_changed_at, node)
SELECT 'veh:LSVB' || lpad(i::text, 13, '0'), 'veh', (ARRAY['online', 'offline'])[1 + i % 2], 'bench',
       now() - make_interval(secs => i), 'gw-' || (i % 8)
  FROM generate_series(1, $HALF) i;
INSERT INTO vehicles (vin, device_key, state, sw_version)
SELECT 'LSVB' || lpad(i::text, 13, '0'), 'veh:LSVB' || lpad(i::text, 13, '0'),
       (ARRAY['delivered', 'activated'])[1 + i % 2], '1.' || (i % 5) || '.0'
  FROM generate_series(1, $HALF) i;
INSERT INTO device_status_history (device_key, from_status, to_status, reason, epoch, node, at)
SELECT 'cab:C0000042', 'online', 'offline', 'bench', i, 'gw-1', now() - make_interval(secs => i * 60)
  FROM generate_series(1, 200) i;
INSERT INTO weight_reports (cabinet_id, door_id, sample_time, lane_ids, grams, stable, received_at)
SELECT 'C0000042', 1, now() - make_interval(secs => i * 5), '{1}', ARRAY[3500 - (i / 60) * 350], '{t}', now()
  FROM generate_series(1, 17000) i;
INSERT INTO orders (id, user_id, cabinet_id, door_id, state, lock_token, created_at, payment, amount_cents, tenant, review)
SELECT 'o' || lpad(i::text, 9, '0'), 'u' || (i % 20000), 'C' || lpad((1 + i % $HALF)::text, 7, '0'), 1 + i % 2,
       CASE WHEN i % 1000 = 0 THEN 'abnormal' WHEN i % 10 = 0 THEN 'cancelled' ELSE 'settled' END, 't',
       now() - make_interval(secs => i), CASE WHEN i % 10 <> 0 THEN (CASE WHEN i % 97 = 0 THEN 'unpaid' ELSE 'paid' END) END,
       CASE WHEN i % 10 <> 0 THEN 300 END, 'shop-1', CASE WHEN i % 1000 = 0 THEN '{weights_not_stable}'::text[] ELSE '{}' END
  FROM generate_series(1, $ORDERS) i;
ANALYZE;
SQL

KEY=$("$BIN" --database-url "$URL" keys create --role operator --name bench 2>/dev/null)
BASE="http://127.0.0.1:$PORT"
curl -s -o /dev/null -c "$WORK/cookies" --data-urlencode "key=$KEY" "$BASE/console/login"
grep -q console "$WORK/cookies" || die "signing in failed"

# time PATH: RUNS fetches (after one to warm up); prints "median max" in ms.
time_page() {
  local path=$1 t
  curl -s -o /dev/null -b "$WORK/cookies" -H "Authorization: Bearer $KEY" "$BASE$path"
  for _ in $(seq "$RUNS"); do
    code_and_t=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -b "$WORK/cookies" -H "Authorization: Bearer $KEY" "$BASE$path")
    [ "${code_and_t%% *}" = 200 ] || die "$path answered ${code_and_t%% *}"
    t=${code_and_t#* }
    awk -v t="$t" 'BEGIN { printf "%.1f\n", t * 1000 }'
  done | sort -n | awk '{ a[NR] = $1 } END { printf "%s %s\n", a[int((NR + 1) / 2)], a[NR] }'
}

DEEP=$(curl -s -H "Authorization: Bearer $KEY" "$BASE/v1/orders?limit=500" | python3 -c 'import json,sys; print(json.load(sys.stdin)["next_cursor"])')
printf '| page | median ms | slowest ms |\n|---|---|---|\n'
for path in \
  /console \
  "/console?status=offline" \
  "/console?q=cab:C00421" \
  /console/devices/cab:C0000042 \
  "/console/devices/cab:C0000042?door=1&lane=1&hours=24" \
  /console/orders \
  "/console/orders?review=true" \
  "/console/orders?cabinet_id=C0000042" \
  "/console/orders?user_id=u42" \
  /console/orders/o000000042 \
  /console/ota \
  /console/audit \
  /console/anomalies \
  "/v1/devices?status=offline&sort=changed&limit=50" \
  "/v1/orders?limit=50" \
  "/v1/orders?limit=50&cursor=$DEEP" \
  "/v1/orders?payment=unpaid&limit=50" \
  "/v1/vehicles?state=activated&limit=50"; do
  read -r median max < <(time_page "$path")
  printf '| `%s` | %s | %s |\n' "${path/$DEEP/(page 2)}" "$median" "$max"
done
