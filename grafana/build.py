#!/usr/bin/env python3
"""Writes the Grafana dashboards (grafana/dashboards/*.json) from the definitions below, so the
four dashboards share one layout, one set of variables and one datasource, and every panel
has a unit. Run it after changing a definition and commit its output:

    python3 grafana/build.py

Query variables: $datasource (the Prometheus), $node (gateway instances), $kind (cab, veh).
Per-node gateway series are labelled with the node id through gateway_node_info.
$__rate_interval is Grafana's; grafana/check.py substitutes it when it runs the queries.
"""

import json
import pathlib

RATE = "$__rate_interval"
NODE = 'instance=~"$node"'
DS = {"type": "prometheus", "uid": "${datasource}"}


def q(expr, legend=""):
    return {"expr": expr, "legend": legend}


def panel(title, unit, *queries, kind="timeseries", description=""):
    return {"title": title, "unit": unit, "queries": list(queries), "kind": kind, "description": description}


def per_s(metric, by, matcher=""):
    """Rate per second of a counter, summed by `by` (comma-separated labels), one series per
    label combination, named by those labels."""
    sel = f"{{{matcher}}}" if matcher else ""
    legend = " ".join("{{" + label.strip() + "}}" for label in by.split(","))
    return q(f"sum by ({by}) (rate({metric}{sel}[{RATE}]))", legend)


def named(expr):
    """Adds the gateway's node id (label `node`) to a per-instance series, for the legend."""
    return f"{expr} * on (instance) group_left (node) max by (instance, node) (gateway_node_info)"


def quantiles(metric, matcher=""):
    sel = f"{{{matcher}}}" if matcher else ""
    return [
        q(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{sel}[{RATE}])))", f"p{int(p * 100)}")
        for p in (0.5, 0.99)
    ]


DASHBOARDS = {
    "fleet": {
        "title": "IoT gateway / Fleet",
        "description": "Devices by status, connects and disconnects, heartbeat intake per node, offline decisions.",
        "panels": [
            panel("Devices by status", "short",
                  q('max by (kind, status) (devsvc_devices{kind=~"$kind"})', "{{kind}} {{status}}")),
            panel("Online devices", "short",
                  q('max by (kind) (devsvc_devices{kind=~"$kind", status="online"})', "{{kind}}"), kind="stat"),
            panel("Connects per second", "ops",
                  per_s("gateway_logins_total", "protocol", f'{NODE}, result="accepted"')),
            panel("Disconnects per second by reason", "ops",
                  per_s("gateway_sessions_closed_total", "protocol, reason", NODE)),
            panel("Heartbeat intake vs expected, per node", "short",
                  q("max by (node) (devsvc_node_heartbeats_received)", "{{node}} received"),
                  q("max by (node) (devsvc_node_heartbeats_expected)", "{{node}} expected"),
                  description="Over the health window. Below healthy_share of expected, offline decisions behind the node are held."),
            panel("Node heartbeat health (1 = healthy)", "short",
                  q("min by (node) (devsvc_node_healthy)", "{{node}}")),
            panel("Offline decisions per second", "ops",
                  per_s("devsvc_offline_decisions_total", "kind")),
            panel("Offline decisions suppressed (storms averted)", "short",
                  q(f"sum by (node) (increase(devsvc_offline_suppressed_total[{RATE}]))", "{{node}}")),
            panel("Takeovers per second", "ops",
                  per_s("gateway_takeovers_total", "protocol, scope", NODE)),
            panel("API requests per second by route and status", "reqps",
                  per_s("devsvc_http_requests_total", "method, route, status"),
                  description="The device service's HTTP API; route is the pattern, unmatched for paths no route has."),
            panel("API latency", "s", *quantiles("devsvc_http_request_duration_seconds")),
        ],
    },
    "gateway": {
        "title": "IoT gateway / Gateway nodes",
        "description": "Per node: connections, logins, traffic, commands, Redis, process CPU and memory.",
        "panels": [
            panel("Connections per node", "short",
                  q(named(f"sum by (instance, protocol) (gateway_connections_open{{{NODE}}})"), "{{node}} {{protocol}}")),
            panel("Logins per second by result", "ops",
                  per_s("gateway_logins_total", "protocol, result", NODE)),
            panel("Login rejections per second by reason", "ops",
                  per_s("gateway_logins_total", "protocol, result", f'{NODE}, result!="accepted"')),
            panel("Frames received per second by type", "ops",
                  per_s("gateway_frames_received_total", "protocol, type", NODE)),
            panel("Frames sent per second by type", "ops",
                  per_s("gateway_frames_sent_total", "protocol, type", NODE)),
            panel("Bytes per second", "Bps",
                  q(f"sum by (protocol) (rate(gateway_bytes_received_total{{{NODE}}}[{RATE}]))", "{{protocol}} in"),
                  q(f"sum by (protocol) (rate(gateway_bytes_sent_total{{{NODE}}}[{RATE}]))", "{{protocol}} out")),
            panel("Frames rejected per second by reason", "ops",
                  per_s("gateway_frames_rejected_total", "protocol, reason", NODE)),
            panel("Slow readers dropped per second", "ops",
                  q(named(f'sum by (instance) (rate(gateway_sessions_closed_total{{{NODE}, reason="slow_reader"}}[{RATE}]))'),
                    "{{node}}")),
            panel("Commands per second by outcome", "ops",
                  per_s("gateway_commands_total", "protocol, outcome", NODE)),
            panel("Command latency at the node", "s", *quantiles("gateway_command_duration_seconds", NODE)),
            panel("Redis errors per second", "ops",
                  q(named(f"sum by (instance, op) (rate(gateway_redis_errors_total{{{NODE}}}[{RATE}]))"), "{{node}} {{op}}")),
            panel("Upstream buffer depth", "short",
                  q(named(f"sum by (instance) (gateway_upstream_buffer_events{{{NODE}}})"), "{{node}}"),
                  description="Events accepted and not yet in Redis: grows while Redis is away."),
            panel("Process CPU", "percentunit",
                  q(named(f'rate(process_cpu_seconds_total{{job="gateway", {NODE}}}[{RATE}])'), "{{node}}")),
            panel("Process memory", "bytes",
                  q(named(f'process_resident_memory_bytes{{job="gateway", {NODE}}}'), "{{node}}")),
        ],
    },
    "purchases": {
        "title": "IoT gateway / Purchases",
        "description": "Orders by state, door-open and settlement latency, payment results and unpaid orders, refunds, anomalies, door locks, restocks, weights.",
        "panels": [
            panel("Orders by state", "short", q("max by (state) (devsvc_orders)", "{{state}}")),
            panel("Order transitions per second", "ops",
                  per_s("devsvc_order_transitions_total", "to")),
            panel("Authorised to door open", "s", *quantiles("devsvc_order_door_open_seconds")),
            panel("Door closed to settled", "s", *quantiles("devsvc_order_settlement_seconds")),
            panel("Payment results per second", "ops",
                  per_s("devsvc_payment_results_total", "kind, result"),
                  description="The account service's answers: settlements, refunds and charges, paid or failed."),
            panel("Unpaid orders", "short", q("max(devsvc_orders_unpaid)", "unpaid"),
                  description="Charges the account service failed, neither paid later nor waived: their users cannot buy."),
            panel("Refunds, charges and waivers per second", "ops",
                  per_s("devsvc_payment_adjustments_total", "kind")),
            panel("Anomalies per second by kind", "ops",
                  per_s("devsvc_anomalies_total", "kind")),
            panel("Calibration and inspection notices per second", "ops",
                  per_s("devsvc_operator_notices_total", "kind")),
            panel("Door lock attempts per second (contention)", "ops",
                  per_s("devsvc_door_lock_attempts_total", "result")),
            panel("Restock orders opened per second", "ops",
                  q(f"sum(rate(devsvc_restock_orders_total[{RATE}]))", "restock orders")),
            panel("Weight readings stored per second", "ops",
                  q(f"sum(rate(devsvc_weight_readings_persisted_total[{RATE}]))", "readings")),
            panel("Upstream stream lag", "short",
                  q("max by (shard) (devsvc_stream_lag_entries)", "shard {{shard}}")),
        ],
    },
    "vehicles": {
        "title": "IoT gateway / Vehicles",
        "description": "Activations by outcome, OTA tasks and vehicles by state, push and report rates, package downloads and rollouts.",
        "panels": [
            panel("Vehicles connected", "short",
                  q(f'sum(gateway_connections_open{{{NODE}, protocol="mqtt"}})', "vehicles"), kind="stat"),
            panel("Activation steps per second by result", "ops",
                  per_s("devsvc_activation_steps_total", "step, result")),
            panel("QR id issued to activated", "s", *quantiles("devsvc_activation_seconds")),
            panel("OTA tasks by state", "short", q("max by (state) (devsvc_ota_tasks)", "{{state}}")),
            panel("OTA vehicles by state", "short", q("max by (state) (devsvc_ota_vehicles)", "{{state}}")),
            panel("OTA notices per second by outcome", "ops",
                  per_s("devsvc_ota_pushes_total", "kind, outcome")),
            panel("OTA reports per second by result", "ops",
                  per_s("devsvc_ota_reports_total", "kind, result")),
            panel("OTA validation rejections per second", "ops",
                  per_s("devsvc_ota_validation_rejections_total", "reason")),
            panel("OTA vehicles timed out per second", "ops",
                  per_s("devsvc_ota_timeouts_total", "phase")),
            panel("Downlinks to vehicles per second", "ops",
                  per_s("devsvc_vehicle_downlinks_total", "kind, outcome")),
            panel("OTA package bytes sent per second", "Bps",
                  q(f"sum(rate(devsvc_ota_download_bytes_total[{RATE}]))", "sent")),
            panel("OTA downloads and resumes per second", "ops",
                  per_s("devsvc_ota_downloads_total", "kind"),
                  q(f"sum(rate(devsvc_ota_download_resumes_total[{RATE}]))", "resumes")),
            panel("OTA downloads being served", "short",
                  q("sum by (instance) (devsvc_ota_downloads_active)", "{{instance}}")),
            panel("OTA downloads refused per second by reason", "ops",
                  per_s("devsvc_ota_download_refusals_total", "reason")),
            panel("OTA rollouts: waves, automatic pauses, re-pushes, given up (per minute)", "short",
                  q(f"sum(increase(devsvc_ota_waves_released_total[1m]))", "waves released"),
                  q(f"sum(increase(devsvc_ota_auto_pauses_total[1m]))", "automatic pauses"),
                  q(f"sum(increase(devsvc_ota_repushes_total[1m]))", "re-pushes"),
                  q(f"sum(increase(devsvc_ota_gave_up_total[1m]))", "given up")),
        ],
    },
}


def variables():
    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "node", "label": "Gateway node", "type": "query", "datasource": DS,
         "query": {"query": "label_values(gateway_connections_open, instance)", "refId": "node"},
         "definition": "label_values(gateway_connections_open, instance)", "refresh": 2,
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0},
        {"name": "kind", "label": "Device kind", "type": "custom", "query": "cab,veh",
         "options": [{"text": "cab", "value": "cab", "selected": False}, {"text": "veh", "value": "veh", "selected": False}],
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0},
    ]}


def render(uid, d):
    panels = []
    for i, p in enumerate(d["panels"]):
        width = 12
        panels.append({
            "id": i + 1,
            "type": p["kind"],
            "title": p["title"],
            "description": p["description"],
            "datasource": DS,
            "gridPos": {"h": 8, "w": width, "x": (i % 2) * width, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
            "options": {},
            "targets": [
                {"refId": chr(ord("A") + j), "datasource": DS, "expr": t["expr"], "legendFormat": t["legend"]}
                for j, t in enumerate(p["queries"])
            ],
        })
    return {
        "uid": f"iotgw-{uid}",
        "title": d["title"],
        "description": d["description"],
        "tags": ["iotgw"],
        "schemaVersion": 38,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": variables(),
        "panels": panels,
    }


def main():
    out = pathlib.Path(__file__).parent / "dashboards"
    out.mkdir(exist_ok=True)
    for uid, d in DASHBOARDS.items():
        (out / f"{uid}.json").write_text(json.dumps(render(uid, d), indent=2) + "\n")


if __name__ == "__main__":
    main()
