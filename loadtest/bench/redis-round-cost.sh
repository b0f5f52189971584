#!/usr/bin/env bash
# What Redis itself spends per upstream entry, by the way a write round is sent: a private
# Redis (append-only file, fsync every second) pinned to core 0, a client pinned to core 1
# sending ROUNDS rounds of ENTRIES entries of a vehicle uplink's 7 fields (as the gateway
# writes them) each way, alternated twice; Redis's CPU (utime + stime from /proc) per entry:
#   script:  the round as one Lua script, an XADD per entry (the gateway's retries);
#   multi:   MULTI, an XADD per entry, SET of the round mark, XLEN, EXEC (its first attempts);
#   packed:  every entry of the round in one XADD field (not what the gateway does: the
#            format change BENCHMARKS.md names as the next step).
#
#   loadtest/bench/redis-round-cost.sh          (ROUNDS=3000 ENTRIES=40)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh
. scripts/lib/bench.sh
command -v taskset >/dev/null 2>&1 || install_packages util-linux
command -v redis-server >/dev/null 2>&1 || install_packages redis-server
ensure_pip 'import redis' 'redis>=5,<6'
WORK=$(mktemp -d)
cleanup() { bench_stop_servers || true; rm -rf "$WORK"; }
trap cleanup EXIT
bench_redis 0
taskset -c 1 python3 - "$REDIS_PORT" "$REDIS_PID" "${ROUNDS:-3000}" "${ENTRIES:-40}" <<'PY'
import sys, redis
port, pid, rounds, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = redis.Redis(port=port)
def ticks():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
SCRIPT = """
if redis.call('GET', KEYS[2]) == ARGV[1] then return -1 end
local n = tonumber(ARGV[5])
local i = 6
for _ = 1, n do
  local k = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + 2 * k))
  i = i + 1 + 2 * k
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
return redis.call('XLEN', KEYS[1])
"""
sha = r.script_load(SCRIPT)
fields = [b"t", b"veh", b"dev", b"LTV00000000000042", b"e", b"1796026092421", b"n", b"bench",
          b"at", b"1796026092421", b"k", b"ota_status", b"p", b'{"state":"downloading","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}']
def script(i):
    args = [f"w/{i}", 100000000, 1, 600000, n]
    for _ in range(n):
        args.append(7)
        args.extend(fields)
    r.evalsha(sha, 2, "s:script", "{s:script}:round:w", *args)
def multi(i):
    p = r.pipeline(transaction=True)
    for _ in range(n):
        p.execute_command("XADD", "s:multi", "*", *fields)
    p.execute_command("SET", "{s:multi}:round:w", f"w/{i}", "PX", 600000)
    p.execute_command("XLEN", "s:multi")
    p.execute()
def packed(i):
    p = r.pipeline(transaction=True)
    p.execute_command("XADD", "s:packed", "*", "b", b"".join(fields) * n)
    p.execute_command("SET", "{s:packed}:round:w", f"w/{i}", "PX", 600000)
    p.execute()
hz = 100  # USER_HZ, the unit of /proc/<pid>/stat
for name, f in (("script", script), ("multi", multi), ("packed", packed)) * 2:
    t0 = ticks()
    for i in range(rounds):
        f(i)
    print(f"{name}: Redis {(ticks() - t0) * 1e6 / hz / (rounds * n):.2f} us per entry")
PY
