#!/usr/bin/env bash
# What PostgreSQL spends per weight reading, by the way readings are laid out and written: a
# private server with a deployment's settings (scripts/lib/bench.sh) pinned to core 0, a client
# pinned to core 1 writing REPORTS reports of 4 lanes from 5,000 cabinets in batches of BATCH
# reports (as the device service gets them from a stream read), each way, alternated twice;
# the server's CPU (all its processes: backend, WAL writer, checkpointer) per reading:
#   lanes-insert:  one row per lane, primary key per lane, INSERT ... SELECT unnest(...) ON
#                  CONFLICT DO NOTHING (the device service before migration 0021);
#   lanes-copy:    the same rows and key by binary COPY (what COPY alone changes);
#   lanes-nokey:   the same rows by binary COPY into a table with no index (what the key costs);
#   reports-copy:  one row per report, the lanes as arrays, key per report, binary COPY (the
#                  device service now).
#
#   loadtest/bench/readings-layout.sh          (REPORTS=200000 BATCH=250)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/services.sh
. scripts/lib/bench.sh
command -v taskset >/dev/null 2>&1 || install_packages util-linux
ensure_pip 'import psycopg' 'psycopg[binary]>=3.1,<4'
WORK=$(mktemp -d)
cleanup() { bench_stop_postgres; rm -rf "$WORK"; }
trap cleanup EXIT
bench_postgres
PM=$(head -n 1 "$BENCH_PG_DATA/postmaster.pid")
taskset -p -a -c 0 "$PM" >/dev/null
for p in $(pgrep -P "$PM"); do taskset -p -c 0 "$p" >/dev/null; done
psql "$ADMIN_DB" -Xq -c "CREATE DATABASE readings"
taskset -c 1 python3 - "${ADMIN_DB%/*}/readings" "$PM" "${REPORTS:-200000}" "${BATCH:-250}" <<'PY'
import datetime, json, os, subprocess, sys, time
import psycopg
url, pm, reports, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
LANES = 4
hz = os.sysconf("SC_CLK_TCK")

def server_cpu():
    # The postmaster and its children (backends started before the measured phase stay).
    pids = [pm] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pm)], capture_output=True, text=True).stdout.split()]
    total = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except OSError:
            pass
    return total / hz

SCHEMAS = {
    "lanes": """CREATE TABLE t (cabinet_id text NOT NULL, door_id smallint NOT NULL, lane_id smallint NOT NULL,
                  grams integer NOT NULL, stable boolean NOT NULL, sample_time timestamptz NOT NULL,
                  received_at timestamptz NOT NULL, PRIMARY KEY (cabinet_id, door_id, lane_id, sample_time))""",
    "lanes-nokey": """CREATE TABLE t (cabinet_id text NOT NULL, door_id smallint NOT NULL, lane_id smallint NOT NULL,
                  grams integer NOT NULL, stable boolean NOT NULL, sample_time timestamptz NOT NULL,
                  received_at timestamptz NOT NULL)""",
    "reports": """CREATE TABLE t (cabinet_id text NOT NULL, door_id smallint NOT NULL, sample_time timestamptz NOT NULL,
                  lane_ids smallint[] NOT NULL, grams integer[] NOT NULL, stable boolean[] NOT NULL,
                  received_at timestamptz NOT NULL, PRIMARY KEY (cabinet_id, door_id, sample_time, lane_ids))""",
}
WAYS = {"lanes-insert": "lanes", "lanes-copy": "lanes", "lanes-nokey": "lanes-nokey", "reports-copy": "reports"}
t0 = datetime.datetime(2026, 11, 30, tzinfo=datetime.timezone.utc)

def report(i):
    cab = f"LT-CAB-{i % 5000:06d}"
    at = t0 + datetime.timedelta(milliseconds=300 * (i // 5000))
    grams = [1000 + (i + l) % 700 for l in range(LANES)]
    return cab, 1 + i % 2, at, grams

def run(way):
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS t")
        c.execute(SCHEMAS[WAYS[way]])
        c.execute("CHECKPOINT")
        cpu0, w0 = server_cpu(), time.time()
        for start in range(0, reports, batch):
            rows = [report(i) for i in range(start, min(start + batch, reports))]
            now = datetime.datetime.now(datetime.timezone.utc)
            if way == "lanes-insert":
                cols = [[], [], [], [], [], [], []]
                for cab, door, at, grams in rows:
                    for l, g in enumerate(grams):
                        for col, v in zip(cols, (cab, door, l + 1, g, g % 2 == 0, at, now)):
                            col.append(v)
                c.execute("""INSERT INTO t SELECT * FROM unnest(%s::text[], %s::smallint[], %s::smallint[], %s::int[],
                             %s::bool[], %s::timestamptz[], %s::timestamptz[]) ON CONFLICT DO NOTHING""", cols)
            elif way in ("lanes-copy", "lanes-nokey"):
                with c.cursor().copy("COPY t FROM STDIN (FORMAT binary)") as cp:
                    cp.set_types(["text", "int2", "int2", "int4", "bool", "timestamptz", "timestamptz"])
                    for cab, door, at, grams in rows:
                        for l, g in enumerate(grams):
                            cp.write_row((cab, door, l + 1, g, g % 2 == 0, at, now))
            else:
                with c.cursor().copy("COPY t (cabinet_id, door_id, sample_time, lane_ids, grams, stable, received_at) FROM STDIN (FORMAT binary)") as cp:
                    cp.set_types(["text", "int2", "timestamptz", "int2[]", "int4[]", "bool[]", "timestamptz"])
                    for cab, door, at, grams in rows:
                        cp.write_row((cab, door, at, list(range(1, LANES + 1)), grams, [g % 2 == 0 for g in grams], now))
        cpu1, w1 = server_cpu(), time.time()
        n = c.execute("SELECT count(*) FROM t").fetchone()[0]
        size = c.execute("SELECT pg_total_relation_size('t')").fetchone()[0]
    readings = reports * LANES
    return {"server_cpu_us_per_reading": round((cpu1 - cpu0) / readings * 1e6, 2),
            "readings_per_server_core_s": round(readings / max(cpu1 - cpu0, 1e-9)),
            "wall_s": round(w1 - w0, 1), "rows": n, "bytes_per_reading": round(size / readings, 1)}

results = {way: [] for way in WAYS}
for _ in range(2):
    for way in WAYS:
        results[way].append(run(way))
        print(way, json.dumps(results[way][-1]), file=sys.stderr)
print(json.dumps({"reports": reports, "lanes_per_report": LANES, "batch_reports": batch, "results": results}, indent=2))
PY
