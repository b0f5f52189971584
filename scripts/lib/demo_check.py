#!/usr/bin/env python3
"""Judges a fleet run's report (scripts/demo's target/demo/report.json): every device
connected, every order of the purchase storm settled, every activation done, the OTA campaign
finished with every vehicle accepted (for a stored package: its bytes downloaded by every
vehicle with resumes, every wave released, and the automatic pause the injected failures
cause), and nothing lost (uplinks without PUBACK, heartbeats
unanswered, commands without a reply or not delivered). What was still in flight when the
harness stopped is reported, not judged. Prints one line per finding and exits 1 if any.

    python3 scripts/lib/demo_check.py target/demo/report.json
"""

import json
import sys


def findings(report):
    results = report["results"]
    details = results["details"]
    params = report.get("parameters", {})
    out = []
    expected = params.get("cabinets", 0) + params.get("vehicles", 0)
    if results["connected"] < expected:
        out.append(f"{results['connected']} of {expected} devices connected")
    storm = details.get("purchase_storm")
    if storm:
        others = {k: v for k, v in storm["outcomes"].items() if k != "settled"}
        if others or sum(storm["outcomes"].values()) < storm["orders"]:
            out.append(f"purchase storm: {storm['orders']} orders, outcomes {storm['outcomes']}")
    wave = details.get("activation_wave")
    if wave and (wave["activated"] < wave["vehicles"] or wave["rejected"] or wave["app_calls_failed"]):
        out.append(f"activation wave: {wave}")
    ota = details.get("ota_campaign")
    if ota and ("error" in ota or ota.get("rejected") or ota.get("finished_after_s") is None):
        out.append(f"OTA campaign: {ota}")
    if ota and ota.get("package_bytes"):
        # A stored package: real bytes moved, resumed, in waves, with the automatic pause the
        # injected failures must cause.
        counters = results["details"].get("counters", {})
        if counters.get("ota_download_bytes", 0) < ota["package_bytes"] * ota.get("accepted", 0):
            out.append(f"OTA downloads: {counters.get('ota_download_bytes', 0)} bytes for {ota.get('accepted')} "
                       f"vehicles of a {ota['package_bytes']}-byte package")
        if params.get("ota_vehicles", {}).get("cut_ratio", 0) > 0 and not counters.get("ota_download_resumes"):
            out.append("OTA downloads: cut but never resumed")
        if counters.get("ota_download_failures"):
            out.append(f"OTA downloads: {counters['ota_download_failures']} failed (digest, signature or refused)")
        ended = {k: v for k, v in (ota.get("counts") or {}).items() if k != "success"}
        if ended:
            out.append(f"OTA campaign: vehicles not upgraded (injected failures are re-pushed and must succeed): {ended}")
        waves = ota.get("waves", [0, 1])
        if waves[0] + 1 < waves[1]:
            out.append(f"OTA rollout: only {waves[0] + 1} of {waves[1]} waves released")
        if params.get("ota_vehicles", {}).get("failure_ratio", 0) > 0 and not ota.get("automatic_pauses"):
            out.append("OTA rollout: failures injected but the task never paused itself")
    lost = details.get("lost", {})
    for key in ("uplinks_unacknowledged", "heartbeats_unanswered", "commands_without_reply", "commands_not_delivered"):
        if lost.get(key, 0):
            out.append(f"lost: {key} = {lost[key]}")
    return out


def main():
    with open(sys.argv[1]) as f:
        report = json.load(f)
    problems = findings(report)
    for p in problems:
        print(f"FAIL {p}")
    lost = report["results"]["details"].get("lost", {})
    in_flight = lost.get("uplinks_in_flight_at_stop", 0) + lost.get("door_events_unacknowledged_at_stop", 0)
    if not problems:
        print(f"PASS every device connected, every order settled, every activation and upgrade done, "
              f"nothing lost ({in_flight} in flight when the harness stopped)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
