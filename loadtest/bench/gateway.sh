#!/usr/bin/env bash
# The gateway benchmarks of BENCHMARKS.md, end to end on this machine: release builds, real
# gateway processes on loopback, a real Redis, the load harness, and Mosquitto for comparison.
# Every run is bounded in time; results go to loadtest/results/*.json.
#
#   loadtest/bench/gateway.sh            all of them (about 20 minutes)
#   loadtest/bench/gateway.sh idle       only the named ones: idle tls login nodes four storm tls-storm mqtt
#   SOAK_S=3600 loadtest/bench/gateway.sh soak   19,000 cabinets on one node for an hour (not in "all")
#   loadtest/bench/gateway.sh failover           19,000 cabinets of a killed node onto a healthy one
#
# Redis: REDIS_URL, or the local one; keys go under a prefix of their own, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
PREFIX="bench$$:"
OUT=loadtest/results
RUNS=("$@")
[ "${#RUNS[@]}" -gt 0 ] || RUNS=(idle tls login nodes four storm tls-storm mqtt)

cargo build --release -q -p gateway -p loadtest
GW=target/release/gateway
LT=target/release/loadtest
command -v mosquitto >/dev/null || { echo "mosquitto is needed for the comparison (apt install mosquitto)"; exit 1; }

PIDS=()
TLS_DIR=$(mktemp -d)
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TLS_DIR"
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null || true
}
trap cleanup EXIT

# A throwaway CA and a server certificate for localhost and 127.0.0.1 (ECDSA P-256), for the
# TLS runs.
make_certificates() {
  command -v openssl >/dev/null || { echo "openssl is needed for the TLS run (apt install openssl)"; exit 1; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=iotgw bench CA" \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$TLS_DIR/san.ext"
  openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" -CAcreateserial \
    -days 2 -extfile "$TLS_DIR/san.ext" -out "$TLS_DIR/server.pem" 2>/dev/null
}

# Extra settings for the [cabinet] and [mqtt] sections of the next gateway started.
CABINET_EXTRA="" MQTT_EXTRA=""

# start_gateway NODE CABINET_PORT MQTT_PORT METRICS_PORT [ACCEPT_RATE]
start_gateway() {
  local conf; conf=$(mktemp)
  cat > "$conf" <<TOML
node_id = "$1"
key_prefix = "$PREFIX"
[redis]
url = "$REDIS_URL"
[cabinet]
listen = "0.0.0.0:$2"
accept_rate_per_s = ${5:-2000}
$CABINET_EXTRA
[mqtt]
listen = "0.0.0.0:$3"
accept_rate_per_s = ${5:-2000}
$MQTT_EXTRA
[metrics]
listen = "127.0.0.1:$4"
TOML
  RUST_LOG=warn "$GW" --config "$conf" >"/tmp/bench-$1.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && break; sleep 0.1; done
  LAST_PID=$!
}

stop_gateways() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

# run_storm LABEL PORT_A PORT_B [FLEET FLAGS...]: 2 nodes x 15,000 cabinets on PORT_A and PORT_B;
# node A is killed (SIGKILL) 25 s into the hold and started again 1 s later: its cabinets
# reconnect with backoff and jitter while B's keep beating. A TLS listener is one port above
# the plain one, so the second node's configuration follows from CABINET_EXTRA.
run_storm() {
  local label=$1 a_port=$2 b_port=$3; shift 3
  local a_extra=$CABINET_EXTRA b_extra=${CABINET_EXTRA//17101/17201}
  CABINET_EXTRA=$a_extra start_gateway bench-a 17100 11883 19100 5000; local A=$LAST_PID
  CABINET_EXTRA=$b_extra start_gateway bench-b 17200 11983 19200 5000; local B=$LAST_PID
  local log; log=$(mktemp)
  "$LT" fleet --label "$label" --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
    --cabinet-addr "127.0.0.1:$a_port" --cabinet-addr "127.0.0.1:$b_port" --cabinets 30000 --heartbeat-s 30 \
    --ramp-per-s 3000 --hold-s 150 --server-pid "$B" --max-duration-s 600 "$@" \
    --out "$OUT/gateway-$label.json" 2> >(tee "$log" >&2) &
  local fleet=$!
  until grep -q '^ramp done' "$log"; do sleep 1; done
  sleep 25
  kill -KILL "$A"; wait "$A" 2>/dev/null || true
  sleep 1
  CABINET_EXTRA=$a_extra start_gateway bench-a 17100 11883 19100 5000
  wait "$fleet"
  rm -f "$log"
  stop_gateways
}

for run in "${RUNS[@]}"; do
  case "$run" in
    idle)
      start_gateway bench-a 17100 11883 19100
      "$LT" fleet --label idle-cabinets-15k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --cabinet-addr 127.0.0.1:17100 --cabinets 15000 --ramp-per-s 2000 --hold-s 60 \
        --commands-per-s 200 --server-pid "$LAST_PID" --out "$OUT/gateway-idle-cabinets-15k.json"
      stop_gateways
      start_gateway bench-a 17100 11883 19100
      "$LT" fleet --label idle-vehicles-15k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --mqtt-addr 127.0.0.1:11883 --vehicles 15000 --ramp-per-s 2000 --hold-s 60 \
        --commands-per-s 200 --server-pid "$LAST_PID" --out "$OUT/gateway-idle-vehicles-15k.json"
      stop_gateways
      ;;
    failover)
      # The devices of a killed node back on a healthy one: 19,000 cabinets log in to node A
      # (node B starts only once all of them have), then A is killed (SIGKILL, not restarted)
      # and they reconnect to B as the harness's devices do (the next address after a failure,
      # backoff from 1 s with full jitter). Both nodes pace accepts at the default, 8,000/s.
      start_gateway bench-a 17100 11883 19100 8000; a_pid=$LAST_PID
      log=$(mktemp)
      "$LT" fleet --label failover-19k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --cabinet-addr 127.0.0.1:17100 --cabinet-addr 127.0.0.1:17200 --cabinets 19000 --heartbeat-s 30 \
        --ramp-per-s 3000 --hold-s 60 --max-duration-s 600 --out "$OUT/gateway-failover-19k.json" \
        2> >(tee "$log" >&2) &
      fleet=$!
      until grep -q ' 19000/19000 connected' "$log"; do sleep 1; done
      start_gateway bench-b 17200 11983 19200 8000
      sleep 10
      kill -KILL "$a_pid"; wait "$a_pid" 2>/dev/null || true
      wait "$fleet"
      rm -f "$log"
      stop_gateways
      ;;
    soak)
      # A long hold at the file limit's worth of cabinets on one node: heartbeats every 30 s,
      # weights every 90 s, 50 commands/s; memory per connection after the ramp and at the end
      # (its slope per hour), and what was lost. SOAK_S (3600) seconds.
      start_gateway bench-a 17100 11883 19100
      "$LT" fleet --label soak-cabinets-19k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --cabinet-addr 127.0.0.1:17100 --cabinets 19000 --ramp-per-s 2000 --hold-s "${SOAK_S:-3600}" \
        --commands-per-s 50 --server-pid "$LAST_PID" --max-duration-s $(( ${SOAK_S:-3600} + 600 )) \
        --out "$OUT/gateway-soak-cabinets-19k.json"
      stop_gateways
      ;;
    tls)
      # The idle runs over TLS: the same fleets on the TLS listeners (ports 17101, 18883).
      make_certificates
      tls_files="tls_cert = \"$TLS_DIR/server.pem\"
tls_key = \"$TLS_DIR/server.key\""
      CABINET_EXTRA="tls_listen = \"0.0.0.0:17101\"
$tls_files" MQTT_EXTRA="tls_listen = \"0.0.0.0:18883\"
$tls_files"
      start_gateway bench-a 17100 11883 19100
      "$LT" fleet --label tls-cabinets-15k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --cabinet-addr 127.0.0.1:17101 --tls-ca "$TLS_DIR/ca.pem" --cabinets 15000 --ramp-per-s 2000 --hold-s 60 \
        --commands-per-s 200 --server-pid "$LAST_PID" --out "$OUT/gateway-tls-cabinets-15k.json"
      stop_gateways
      start_gateway bench-a 17100 11883 19100
      "$LT" fleet --label tls-vehicles-15k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --mqtt-addr 127.0.0.1:18883 --tls-ca "$TLS_DIR/ca.pem" --vehicles 15000 --ramp-per-s 2000 --hold-s 60 \
        --commands-per-s 200 --server-pid "$LAST_PID" --out "$OUT/gateway-tls-vehicles-15k.json"
      stop_gateways
      # Login storm over TLS: handshake, then login, with the accept pacing raised.
      start_gateway bench-a 17100 11883 19100 50000
      "$LT" fleet --label tls-login-rate-15k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --cabinet-addr 127.0.0.1:17101 --tls-ca "$TLS_DIR/ca.pem" --cabinets 15000 --ramp-per-s 50000 --hold-s 10 \
        --server-pid "$LAST_PID" --out "$OUT/gateway-tls-login-rate-15k.json"
      stop_gateways
      CABINET_EXTRA="" MQTT_EXTRA=""
      ;;
    login)
      start_gateway bench-a 17100 11883 19100 50000
      "$LT" fleet --label login-rate-15k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --cabinet-addr 127.0.0.1:17100 --cabinets 15000 --ramp-per-s 50000 --hold-s 10 \
        --server-pid "$LAST_PID" --out "$OUT/gateway-login-rate-15k.json"
      stop_gateways
      ;;
    nodes)
      start_gateway bench-a 17100 11883 19100; A=$LAST_PID
      start_gateway bench-b 17200 11983 19200; B=$LAST_PID
      "$LT" fleet --label two-nodes-30k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --cabinet-addr 127.0.0.1:17100 --cabinet-addr 127.0.0.1:17200 --cabinets 30000 \
        --ramp-per-s 3000 --hold-s 60 --commands-per-s 500 --server-pid "$A" --server-pid "$B" \
        --out "$OUT/gateway-two-nodes-30k.json"
      stop_gateways
      ;;
    four)
      # 4 nodes x 15,000 cabinets: 7 worker processes over 4 source addresses.
      NODES=() ADDRS=()
      for n in 0 1 2 3; do
        start_gateway "bench-$n" $((17100 + n * 100)) $((11883 + n * 100)) $((19100 + n * 100)) 3000
        NODES+=(--server-pid "$LAST_PID"); ADDRS+=(--cabinet-addr "127.0.0.1:$((17100 + n * 100))")
      done
      "$LT" fleet --label four-nodes-60k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        "${ADDRS[@]}" --cabinets 60000 --ramp-per-s 1000 --hold-s 60 --commands-per-s 500 "${NODES[@]}" \
        --max-duration-s 900 --out "$OUT/gateway-four-nodes-60k.json"
      stop_gateways
      ;;
    storm)
      run_storm reconnect-storm-15k 17100 17200
      ;;
    tls-storm)
      # The same storm with every cabinet on TLS: each reconnection is a handshake.
      make_certificates
      tls_files="tls_cert = \"$TLS_DIR/server.pem\"
tls_key = \"$TLS_DIR/server.key\""
      CABINET_EXTRA="tls_listen = \"0.0.0.0:17101\"
$tls_files"
      run_storm tls-reconnect-storm-15k 17101 17201 --tls-ca "$TLS_DIR/ca.pem"
      CABINET_EXTRA=""
      ;;
    mqtt)
      start_gateway bench-a 17100 11883 19100
      "$LT" mqtt-compare --label mqtt-idle-15k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --mqtt-addr 127.0.0.1:11883 --vehicles 15000 --ramp-per-s 2000 --hold-s 30 --publish-per-s 0.1 \
        --server-pid "$LAST_PID" --mosquitto-port 18830 --out "$OUT/mqtt-vs-mosquitto-15k.json"
      stop_gateways
      start_gateway bench-a 17100 11883 19100
      "$LT" mqtt-compare --label mqtt-throughput-2k --redis-url "$REDIS_URL" --key-prefix "$PREFIX" \
        --mqtt-addr 127.0.0.1:11883 --vehicles 2000 --ramp-per-s 2000 --hold-s 20 --publish-per-s 100 \
        --server-pid "$LAST_PID" --mosquitto-port 18831 --out "$OUT/mqtt-vs-mosquitto-throughput.json"
      stop_gateways
      ;;
    *) echo "unknown run: $run (idle tls login nodes four storm tls-storm mqtt)"; exit 2 ;;
  esac
done
echo "results in $OUT/"
