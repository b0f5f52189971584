"""The demo's money loop, after the fleet has run: a refund of one item of a settled order,
and an unpaid order (an extra charge the shopper's balance cannot cover) that blocks the
shopper's next purchase until the account service, retrying, is paid.

  python3 scripts/lib/money_demo.py <api host:port> <database url>

Keys from the environment (IOTGW_OPERATOR_KEY, IOTGW_SHOP_KEY, IOTGW_SHOP_TENANT), as the
demo exports them. Exits non-zero if the loop does not behave as docs/api.md says.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

API, DB = sys.argv[1], sys.argv[2]


def call(method, path, body=None, key=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{API}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {key or os.environ['IOTGW_OPERATOR_KEY']}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def sql(query):
    return subprocess.run(["psql", DB, "-XAtq", "-c", query], check=True, capture_output=True, text=True).stdout.strip()


def wait_order(order_id, what, ok, seconds=30):
    for _ in range(seconds * 5):
        _, o = call("GET", f"/v1/orders/{order_id}")
        if ok(o):
            return o
        time.sleep(0.2)
    sys.exit(f"order {order_id}: {what} did not happen in {seconds} s: {o}")


def say(text):
    print(f"==> {text}", file=sys.stderr)


rows = sql("SELECT o.id || ' ' || o.user_id FROM orders o JOIN settlements s ON s.order_id = o.id "
           "WHERE o.payment = 'paid' AND s.amount_cents > 0 ORDER BY o.created_at LIMIT 2").split("\n")
if len(rows) < 2 or not rows[1]:
    sys.exit("the fleet settled fewer than two paid orders with goods")
(refunded, _), (unpaid, shopper) = (r.split(" ") for r in rows)

# A refund of one item, priced from the settlement, confirmed by the account service.
_, order = call("GET", f"/v1/orders/{refunded}")
line = order["payments"][0]["lines"][0]
code, refund = call("POST", f"/v1/orders/{refunded}/refunds",
                    {"operator": "demo", "reason": "crushed on the shelf", "key": "demo-1",
                     "lines": [{"lane_id": line["lane_id"], "items": 1}]})
if code != 201:
    sys.exit(f"refund refused: {code} {refund}")
o = wait_order(refunded, "refund paid", lambda o: o["refunded_cents"] > 0)
say(f"refund: order {refunded} charged {o['charged_cents']} cents, refunded {o['refunded_cents']} "
    f"(one {line['product_id']}), payment {o['payment']}")

# An unpaid order: the shopper's balance is 0, an operator adds a charge, the account side fails it.
tenant = os.environ["IOTGW_SHOP_TENANT"]
sql(f"INSERT INTO account_funds (tenant, user_id, balance_cents) VALUES ('{tenant}', '{shopper}', 0) "
    f"ON CONFLICT (tenant, user_id) DO UPDATE SET balance_cents = 0")
code, charge = call("POST", f"/v1/orders/{unpaid}/charges",
                    {"operator": "demo", "reason": "second item seen on camera", "amount_cents": 150,
                     "key": "demo-1"})
if code != 201:
    sys.exit(f"charge refused: {code} {charge}")
o = wait_order(unpaid, "payment unpaid", lambda o: o["payment"] == "unpaid")
failure = [p["failure"] for p in o["payments"] if p["result"] == "failed"]
code, refused = call("POST", "/v1/orders", {"user_id": shopper, "cabinet_id": o["cabinet_id"], "door_id": 1},
                     key=os.environ["IOTGW_SHOP_KEY"])
if refused.get("error") != "unpaid_order":
    sys.exit(f"an unpaid shopper's next order was not refused as unpaid_order: {code} {refused}")
say(f"unpaid: order {unpaid}'s extra charge failed ({', '.join(failure)}); the shopper's next order: "
    f"{code} {refused['error']}")

# The shopper tops up; the account service retries the failed charge and pays it.
sql(f"UPDATE account_funds SET balance_cents = 100000 WHERE tenant = '{tenant}' AND user_id = '{shopper}'")
o = wait_order(unpaid, "payment paid after the top-up", lambda o: o["payment"] == "paid")
code, answer = call("POST", "/v1/orders", {"user_id": shopper, "cabinet_id": o["cabinet_id"], "door_id": 1},
                    key=os.environ["IOTGW_SHOP_KEY"])
if answer and answer.get("error") == "unpaid_order":
    sys.exit(f"the shopper is still blocked after paying: {answer}")
say(f"paid: after a top-up the account service retried; order {unpaid} charged {o['charged_cents']} cents; "
    f"the shopper may buy again (next order: {code} {(answer or {}).get('error', 'created')})")
