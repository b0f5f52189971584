#!/usr/bin/env bash
# OTA package downloads: one gateway node and one device-service instance (release builds),
# a package of MIB MiB uploaded with curl, then VEHICLES simulated vehicles downloading it at
# once through the load harness (each request broken off at a random point with probability
# CUT and resumed with Range; digest and Ed25519 signature checked by every vehicle).
# Prints, as a Markdown row for BENCHMARKS.md "OTA downloads": the upload's time and device-
# service CPU, then for the downloads: bytes, requests, resumes, wall time, device-service CPU
# seconds, MB/s per device-service CPU-second, requests per CPU-second, and the device
# service's peak resident memory (VmHWM) before and after.
#
#   loadtest/bench/ota-downloads.sh                              # 50 vehicles, 64 MiB, CUT 0.3
#   VEHICLES=4 MIB=1024 CUT=0.3 loadtest/bench/ota-downloads.sh  # memory with a 1 GiB package
#
# Servers as for scripts/test. Everything runs on loopback and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh

VEHICLES=${VEHICLES:-50}
MIB=${MIB:-64}
CUT=${CUT:-0.3}
HOLD=${HOLD:-300}
services_up
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q -p device-svc -p gateway -p loadtest
  BIN=target/release
fi
WORK=$(mktemp -d)
DB=iotgw_benchota_$$
PREFIX="benchota$$:"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  psql "$DATABASE_URL" -Xq -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" 2>/dev/null | xargs -r -n 500 redis-cli -u "$REDIS_URL" DEL >/dev/null 2>&1 || true
  rm -rf "$WORK"
  services_down
}
trap cleanup EXIT

psql "$DATABASE_URL" -Xq -c "CREATE DATABASE $DB" >/dev/null
URL=$(url_with_db "$DATABASE_URL" "$DB")
api_parties "$BIN/device-svc" "$URL" bench
ota_package_keys bench "$WORK/packages"
PORT=$(free_port) MQTT=$(free_port) CAB=$(free_port)
DEVICE_SVC_KEY_PREFIX=$PREFIX RUST_LOG=warn "$BIN/device-svc" --instance-id bench-svc \
  --http-listen "127.0.0.1:$PORT" --database-url "$URL" --redis-url "$REDIS_URL" >"$WORK/svc.log" 2>&1 &
SVC_PID=$!
PIDS+=("$SVC_PID")
GATEWAY_KEY_PREFIX=$PREFIX RUST_LOG=warn "$BIN/gateway" --node-id bench-gw --redis-url "$REDIS_URL" \
  --cabinet-listen "127.0.0.1:$CAB" --mqtt-listen "127.0.0.1:$MQTT" --metrics-listen "" >"$WORK/gw.log" 2>&1 &
PIDS+=($!)
wait_port "$PORT" "the device service ($(tail -3 "$WORK/svc.log"))"
wait_port "$MQTT" "the gateway ($(tail -3 "$WORK/gw.log"))"

# CPU seconds of a process (user + system), and its peak resident memory in KiB.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
hwm_kib() { awk '/VmHWM/ { print $2 }' "/proc/$1/status"; }

say "a package of $MIB MiB"
head -c "$(( MIB << 20 ))" /dev/urandom >"$WORK/pkg.bin"
SHA=$(sha256sum "$WORK/pkg.bin" | cut -d' ' -f1)
CPU0=$(cpu_s "$SVC_PID") HWM0=$(hwm_kib "$SVC_PID") T0=$(date +%s.%N)
# -T streams the file (--data-binary would read it all into curl's memory first).
CODE=$(curl -s -o "$WORK/upload.json" -w '%{http_code}' -X PUT -H "Authorization: Bearer $IOTGW_OPERATOR_KEY" \
  -H 'Content-Type: application/octet-stream' -T "$WORK/pkg.bin" \
  "http://127.0.0.1:$PORT/v1/ota/packages/bench-pkg?version=9.0.0&sha256=$SHA")
[ "$CODE" = 201 ] || die "upload answered $CODE: $(cat "$WORK/upload.json"; tail -3 "$WORK/svc.log")"
T1=$(date +%s.%N) CPU1=$(cpu_s "$SVC_PID")
rm -f "$WORK/pkg.bin"

say "$VEHICLES vehicles download it (cut probability $CUT)"
"$BIN/loadtest" fleet --label ota-bench --key-prefix "$PREFIX" --redis-url "$REDIS_URL" \
  --mqtt-addr "127.0.0.1:$MQTT" --server-pid "$SVC_PID" --api "127.0.0.1:$PORT" --seed \
  --cabinets 0 --vehicles "$VEHICLES" --ramp-per-s 500 --hold-s "$HOLD" --ota --ota-step-ms 100 \
  --ota-package-id bench-pkg --ota-cut-ratio "$CUT" --ota-progress-ms 10000 \
  --max-duration-s $(( HOLD + 120 )) --out "$WORK/report.json" >"$WORK/fleet.log" 2>&1 \
  || die "the fleet failed: $(tail -5 "$WORK/fleet.log")"
CPU2=$(cpu_s "$SVC_PID") HWM2=$(hwm_kib "$SVC_PID")
python3 - "$WORK/report.json" "$MIB" "$VEHICLES" "$CUT" "$CPU0" "$CPU1" "$CPU2" "$T0" "$T1" "$HWM0" "$HWM2" <<'PY'
import json, sys
report, mib, vehicles, cut, cpu0, cpu1, cpu2, t0, t1, hwm0, hwm2 = sys.argv[1:]
r = json.load(open(report))
d = r["results"]["details"]
c, o = d["counters"], d["ota_campaign"]
assert o.get("finished_after_s") is not None and o["counts"] == {"success": int(vehicles)}, o
cpu = float(cpu2) - float(cpu1)
wall = o["finished_after_s"]
mb = c["ota_download_bytes"] / 1e6
requests = c["ota_downloads"] + c.get("ota_download_resumes", 0)
print("| vehicles | package | cut | upload s (CPU s) | downloaded MB | requests (resumes) | campaign s | device-svc CPU s | MB/s per CPU-s | requests per CPU-s | VmHWM before -> after |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| {vehicles} | {mib} MiB | {cut} | {float(t1) - float(t0):.1f} ({float(cpu1) - float(cpu0):.1f}) | {mb:.0f} | "
      f"{requests} ({c.get('ota_download_resumes', 0)}) | {wall:.1f} | {cpu:.1f} | {mb / cpu:.0f} | {requests / cpu:.0f} | "
      f"{int(hwm0) // 1024} -> {int(hwm2) // 1024} MiB |")
PY
