#!/usr/bin/env bash
# What authentication costs the device service per API request: the same request
# (GET /v1/alerts, one small PostgreSQL query) against a build without the guard and against
# this build with an operator key (verified from the key cache, rate-limited with a limit it
# never reaches, authorised by the route table). The headline is the device service's CPU per
# request (utime + stime from /proc, so PostgreSQL's share is left out), median and range.
#
#   loadtest/bench/api-auth.sh BEFORE_BINARY [RUNS]
#
# BEFORE_BINARY is a release device-svc built from a commit before the guard, for example:
#   git worktree add /tmp/before 3a6a0c0 && (cd /tmp/before && cargo build --release -p device-svc)
#   loadtest/bench/api-auth.sh /tmp/before/target/release/device-svc
# Fair by construction: both services pinned to core 1 and `ab` (keep-alive, 8 connections,
# REQUESTS requests, default 30,000) to core 0, runs alternated before/after RUNS times (default
# 5), each on a database of its own. PostgreSQL and Redis are not pinned (shared by both).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh

BEFORE=${1:?usage: loadtest/bench/api-auth.sh BEFORE_BINARY [RUNS]}
RUNS=${2:-5}
REQUESTS=${REQUESTS:-30000}
[ -x "$BEFORE" ] || die "$BEFORE is not an executable device-svc"
command -v ab >/dev/null 2>&1 || install_packages apache2-utils
services_up
cargo build --release --locked -q -p device-svc
AFTER=target/release/device-svc
WORK=$(mktemp -d)
PREFIX="benchauth$$:"
SVC_PID=""
cleanup() {
  [ -n "$SVC_PID" ] && kill "$SVC_PID" 2>/dev/null && wait "$SVC_PID" 2>/dev/null
  for db in before after; do
    psql "$DATABASE_URL" -Xq -c "DROP DATABASE IF EXISTS iotgw_benchauth_$db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
  services_down
}
trap cleanup EXIT

for db in before after; do
  psql "$DATABASE_URL" -Xq -c "DROP DATABASE IF EXISTS iotgw_benchauth_$db" -c "CREATE DATABASE iotgw_benchauth_$db" >/dev/null
done
AFTER_DB=$(url_with_db "$DATABASE_URL" iotgw_benchauth_after)
BEFORE_DB=$(url_with_db "$DATABASE_URL" iotgw_benchauth_before)
KEY=$("$AFTER" --database-url "$AFTER_DB" keys create --role operator --name bench 2>/dev/null)
cat >"$WORK/after.toml" <<TOML
[auth]
# Exercised on every request, never reached.
rate_per_s = 100000000
burst = 100000000
TOML

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run LABEL: starts that build pinned, warms it up, measures; prints "cpu_us_per_request rps".
run() {
  local port; port=$(free_port)
  if [ "$1" = before ]; then
    DEVICE_SVC_KEY_PREFIX=$PREFIX RUST_LOG=warn taskset -c 1 "$BEFORE" --http-listen "127.0.0.1:$port" \
      --database-url "$BEFORE_DB" --redis-url "$REDIS_URL" >"$WORK/svc.log" 2>&1 &
    HEADER=()
  else
    DEVICE_SVC_KEY_PREFIX=$PREFIX RUST_LOG=warn taskset -c 1 "$AFTER" --config "$WORK/after.toml" \
      --http-listen "127.0.0.1:$port" --database-url "$AFTER_DB" --redis-url "$REDIS_URL" >"$WORK/svc.log" 2>&1 &
    HEADER=(-H "Authorization: Bearer $KEY")
  fi
  SVC_PID=$!
  wait_port "$port" "the $1 device service"
  local url="http://127.0.0.1:$port/v1/alerts"
  taskset -c 0 ab -q -k -c 8 -n 2000 "${HEADER[@]}" "$url" >/dev/null
  local t0; t0=$(cpu_ticks "$SVC_PID")
  local out; out=$(taskset -c 0 ab -q -k -c 8 -n "$REQUESTS" "${HEADER[@]}" "$url")
  local t1; t1=$(cpu_ticks "$SVC_PID")
  grep -q "^Non-2xx responses" <<<"$out" && die "the $1 run got refusals: $out"
  local rps; rps=$(awk '/^Requests per second/ {print $4}' <<<"$out")
  kill "$SVC_PID"; wait "$SVC_PID" 2>/dev/null || true; SVC_PID=""
  local hz; hz=$(getconf CLK_TCK)
  awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$REQUESTS" -v rps="$rps" 'BEGIN {printf "%.1f %s\n", d / hz * 1e6 / n, rps}'
}

declare -A CPU RPS
for i in $(seq 1 "$RUNS"); do
  for label in before after; do
    read -r cpu rps < <(run "$label")
    CPU[$label]+="$cpu "; RPS[$label]+="$rps "
    say "run $i $label: ${cpu} us CPU per request, ${rps} requests/s"
  done
done
summary() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {printf "median %s (range %s-%s)", v[int((NR+1)/2)], v[1], v[NR]}'; }
for label in before after; do
  printf '%-6s device-svc CPU per request, us: %s; requests/s: %s\n' "$label" "$(summary "${CPU[$label]}")" "$(summary "${RPS[$label]}")"
done
