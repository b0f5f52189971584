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
                  q(f'sum by (protocol) (rate(gateway_logins_total{{{NODE}, result="accepted"}}[{RATE}]))', "{{protocol}}")),
            panel("Disconnects per second by reason", "ops",
                  q(f"sum by (protocol, reason) (rate(gateway_sessions_closed_total{{{NODE}}}[{RATE}]))",
                    "{{protocol}} {{reason}}")),
            panel("Heartbeat intake vs expected, per node", "short",
                  q("max by (node) (devsvc_node_heartbeats_received)", "{{node}} received"),
                  q("max by (node) (devsvc_node_heartbeats_expected)", "{{node}} expected"),
                  description="Over the health window. Below healthy_share of expected, offline decisions behind the node are held."),
            panel("Node heartbeat health (1 = healthy)", "short",
                  q("min by (node) (devsvc_node_healthy)", "{{node}}")),
            panel("Offline decisions per second", "ops",
                  q(f"sum by (kind) (rate(devsvc_offline_decisions_total[{RATE}]))", "{{kind}}")),
            panel("Offline decisions suppressed (storms averted)", "short",
                  q(f"sum by (node) (increase(devsvc_offline_suppressed_total[{RATE}]))", "{{node}}")),
            panel("Takeovers per second", "ops",
                  q(f"sum by (protocol, scope) (rate(gateway_takeovers_total{{{NODE}}}[{RATE}]))", "{{protocol}} {{scope}}")),
        ],
    },
    "gateway": {
        "title": "IoT gateway / Gateway nodes",
        "description": "Per node: connections, logins, traffic, commands, Redis, process CPU and memory.",
        "panels": [
            panel("Connections per node", "short",
                  q(named(f"sum by (instance, protocol) (gateway_connections_open{{{NODE}}})"), "{{node}} {{protocol}}")),
            panel("Logins per second by result", "ops",
                  q(f"sum by (protocol, result) (rate(gateway_logins_total{{{NODE}}}[{RATE}]))", "{{protocol}} {{result}}")),
            panel("Login rejections per second by reason", "ops",
                  q(f'sum by (protocol, result) (rate(gateway_logins_total{{{NODE}, result!="accepted"}}[{RATE}]))',
                    "{{protocol}} {{result}}")),
            panel("Frames received per second by type", "ops",
                  q(f"sum by (protocol, type) (rate(gateway_frames_received_total{{{NODE}}}[{RATE}]))", "{{protocol}} {{type}}")),
            panel("Frames sent per second by type", "ops",
                  q(f"sum by (protocol, type) (rate(gateway_frames_sent_total{{{NODE}}}[{RATE}]))", "{{protocol}} {{type}}")),
            panel("Bytes per second", "Bps",
                  q(f"sum by (protocol) (rate(gateway_bytes_received_total{{{NODE}}}[{RATE}]))", "{{protocol}} in"),
                  q(f"sum by (protocol) (rate(gateway_bytes_sent_total{{{NODE}}}[{RATE}]))", "{{protocol}} out")),
            panel("Frames rejected per second by reason", "ops",
                  q(f"sum by (protocol, reason) (rate(gateway_frames_rejected_total{{{NODE}}}[{RATE}]))", "{{protocol}} {{reason}}")),
            panel("Slow readers dropped per second", "ops",
                  q(named(f'sum by (instance) (rate(gateway_sessions_closed_total{{{NODE}, reason="slow_reader"}}[{RATE}]))'),
                    "{{node}}")),
            panel("Commands per second by outcome", "ops",
                  q(f"sum by (protocol, outcome) (rate(gateway_commands_total{{{NODE}}}[{RATE}]))", "{{protocol}} {{outcome}}")),
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
        "description": "Orders by state, door-open and settlement latency, anomalies, door locks, restocks, weights.",
        "panels": [
            panel("Orders by state", "short", q("max by (state) (devsvc_orders)", "{{state}}")),
            panel("Order transitions per second", "ops",
                  q(f"sum by (to) (rate(devsvc_order_transitions_total[{RATE}]))", "{{to}}")),
            panel("Authorised to door open", "s", *quantiles("devsvc_order_door_open_seconds")),
            panel("Door closed to settled", "s", *quantiles("devsvc_order_settlement_seconds")),
            panel("Anomalies per second by kind", "ops",
                  q(f"sum by (kind) (rate(devsvc_anomalies_total[{RATE}]))", "{{kind}}")),
            panel("Door lock attempts per second (contention)", "ops",
                  q(f"sum by (result) (rate(devsvc_door_lock_attempts_total[{RATE}]))", "{{result}}")),
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
        "description": "Activations by outcome, OTA tasks and vehicles by state, push and report rates.",
        "panels": [
            panel("Vehicles connected", "short",
                  q(f'sum(gateway_connections_open{{{NODE}, protocol="mqtt"}})', "vehicles"), kind="stat"),
            panel("Activation steps per second by result", "ops",
                  q(f"sum by (step, result) (rate(devsvc_activation_steps_total[{RATE}]))", "{{step}} {{result}}")),
            panel("QR id issued to activated", "s", *quantiles("devsvc_activation_seconds")),
            panel("OTA tasks by state", "short", q("max by (state) (devsvc_ota_tasks)", "{{state}}")),
            panel("OTA vehicles by state", "short", q("max by (state) (devsvc_ota_vehicles)", "{{state}}")),
            panel("OTA notices per second by outcome", "ops",
                  q(f"sum by (kind, outcome) (rate(devsvc_ota_pushes_total[{RATE}]))", "{{kind}} {{outcome}}")),
            panel("OTA reports per second by result", "ops",
                  q(f"sum by (kind, result) (rate(devsvc_ota_reports_total[{RATE}]))", "{{kind}} {{result}}")),
            panel("OTA validation rejections per second", "ops",
                  q(f"sum by (reason) (rate(devsvc_ota_validation_rejections_total[{RATE}]))", "{{reason}}")),
            panel("OTA vehicles timed out per second", "ops",
                  q(f"sum by (phase) (rate(devsvc_ota_timeouts_total[{RATE}]))", "{{phase}}")),
            panel("Downlinks to vehicles per second", "ops",
                  q(f"sum by (kind, outcome) (rate(devsvc_vehicle_downlinks_total[{RATE}]))", "{{kind}} {{outcome}}")),
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
