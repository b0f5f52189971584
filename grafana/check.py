#!/usr/bin/env python3
"""Proves the dashboards and alert rules against a real Prometheus that scrapes a running
stack (grafana/check.sh sets it up):

1. every dashboard has what Grafana needs to import it: uid, title, schemaVersion, panels
   with a datasource, targets with an expression, and a unit;
2. every panel query is valid, and returns data unless grafana/expect-empty.txt names the
   panel (events a small healthy fleet does not produce, each with its reason);
3. every alert rule is loaded, healthy after an evaluation, and its expression valid.

    python3 grafana/check.py http://127.0.0.1:9090
"""

import json
import pathlib
import sys
import time
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).parent
SUBSTITUTIONS = {"$__rate_interval": "1m", "${datasource}": "", "$node": ".*", "$kind": ".*"}


def query(base, expr):
    for k, v in SUBSTITUTIONS.items():
        expr = expr.replace(k, v)
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        return None, body.get("error", "query failed")
    return body["data"]["result"], None


def expected_empty():
    names = set()
    for line in (HERE / "expect-empty.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            uid, title, _why = (p.strip() for p in line.split("|", 2))
            names.add((uid, title))
    return names


def check_structure(d, name, problems):
    for key in ("uid", "title", "schemaVersion", "panels"):
        if not d.get(key):
            problems.append(f"{name}: no {key}")
    titles = set()
    for p in d.get("panels", []):
        where = f"{name} / {p.get('title')}"
        if p.get("title") in titles:
            problems.append(f"{where}: duplicate title")
        titles.add(p.get("title"))
        if not p.get("datasource"):
            problems.append(f"{where}: no datasource")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit")
        targets = p.get("targets") or []
        if not targets or not all(t.get("expr") and t.get("refId") for t in targets):
            problems.append(f"{where}: targets without refId or expr")


def main():
    base = sys.argv[1].rstrip("/")
    problems = []
    may_be_empty = expected_empty()
    seen = set()
    panels = with_data = 0
    for path in sorted((HERE / "dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        check_structure(d, path.name, problems)
        for p in d.get("panels", []):
            panels += 1
            key = (d.get("uid"), p.get("title"))
            seen.add(key)
            series = 0
            for t in p.get("targets", []):
                result, error = query(base, t["expr"])
                if error:
                    problems.append(f"{path.name} / {p['title']}: invalid query {t['expr']!r}: {error}")
                else:
                    series += len(result)
            if series:
                with_data += 1
            elif key not in may_be_empty:
                problems.append(f"{path.name} / {p['title']}: no data (not listed in expect-empty.txt)")
    for key in sorted(may_be_empty - seen):
        problems.append(f"expect-empty.txt names a panel that does not exist: {key}")

    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as r:
        groups = json.load(r)["data"]["groups"]
    rules = [rule for g in groups for rule in g["rules"]]
    if not rules:
        problems.append("Prometheus loaded no alert rules")
    for rule in rules:
        if rule.get("health") != "ok":
            problems.append(f"alert {rule['name']}: health {rule.get('health')}: {rule.get('lastError')}")
        _, error = query(base, rule["query"])
        if error:
            problems.append(f"alert {rule['name']}: invalid expression: {error}")

    print(f"{panels} panels ({with_data} with data), {len(rules)} alert rules checked against {base}")
    for p in problems:
        print(f"FAIL {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
