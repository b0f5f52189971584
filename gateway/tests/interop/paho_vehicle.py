"""A vehicle written with paho-mqtt (PyPI), for the gateway's interoperability tests.

Connects (optionally over TLS, optionally with a client certificate), subscribes to its own
downlinks, publishes one uplink at QoS 1, then waits for one downlink and prints its topic and
payload as a JSON line. Exits non-zero on any failure or after --timeout seconds.
"""

import argparse
import json
import ssl
import sys
import threading

import paho.mqtt.client as mqtt


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--vin", required=True)
    p.add_argument("--token")
    p.add_argument("--v5", action="store_true")
    p.add_argument("--cafile")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--uplink", required=True, help="JSON payload published on up/ota_status")
    p.add_argument("--timeout", type=float, default=15)
    args = p.parse_args()

    protocol = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.vin, protocol=protocol)
    if args.token:
        client.username_pw_set(args.vin, args.token)
    if args.cafile:
        client.tls_set(ca_certs=args.cafile, certfile=args.cert, keyfile=args.key, tls_version=ssl.PROTOCOL_TLS_CLIENT)

    subscribed = threading.Event()
    published = threading.Event()
    received = {}
    done = threading.Event()
    failure = []

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            failure.append(f"connect refused: {reason_code}")
            done.set()
            return
        c.subscribe(f"vehicles/{args.vin}/down/#", qos=1)

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            failure.append(f"subscribe refused: {reason_codes}")
            done.set()
            return
        subscribed.set()
        c.publish(f"vehicles/{args.vin}/up/ota_status", args.uplink, qos=1)

    def on_publish(c, userdata, mid, reason_code, properties):
        published.set()
        # Ready for the downlink: tell the test.
        print(json.dumps({"ready": True}), flush=True)

    def on_message(c, userdata, msg):
        received["topic"] = msg.topic
        received["payload"] = msg.payload.decode()
        received["qos"] = msg.qos
        done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    finished = done.wait(args.timeout)
    client.disconnect()
    client.loop_stop()
    if failure:
        print(failure[0], file=sys.stderr)
        return 1
    if not finished or not published.is_set():
        print("timed out", file=sys.stderr)
        return 2
    print(json.dumps(received), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
