//! The device service's Prometheus metrics, one registry per instance (tests run several in one
//! process). Names follow Prometheus conventions; `docs/metrics.md` lists them.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the device service exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry.
    pub registry: Registry,
    /// `devsvc_devices{kind,status}`
    pub devices: IntGaugeVec,
    /// `devsvc_status_changes_total{kind,to,reason}`
    pub status_changes: IntCounterVec,
    /// `devsvc_node_heartbeats_received{node}`: heartbeats over the health window.
    pub node_received: GaugeVec,
    /// `devsvc_node_heartbeats_expected{node}`
    pub node_expected: GaugeVec,
    /// `devsvc_node_healthy{node}`: 1 when the node delivered at least its share.
    pub node_healthy: IntGaugeVec,
    /// `devsvc_offline_suppressed_total{node}`
    pub offline_suppressed: IntCounterVec,
    /// `devsvc_offline_decisions_total{kind}`
    pub offline_decisions: IntCounterVec,
    /// `devsvc_deadline_checks_total`: expired deadlines this instance took for judgement.
    pub deadline_checks: IntCounter,
    /// `devsvc_stream_lag_entries{shard}`
    pub stream_lag: IntGaugeVec,
    /// `devsvc_http_connections_open`: API connections held now (at most `http.max_connections`).
    pub http_connections_open: prometheus::IntGauge,
    /// `devsvc_http_requests_total{route,method,status}`: API requests answered, by route
    /// pattern (`/v1/orders/{id}`; `unmatched` for a path no route has), method and status.
    pub http_requests: IntCounterVec,
    /// `devsvc_http_request_duration_seconds{route,method}`: time to answer an API request.
    pub http_duration: HistogramVec,
    /// `devsvc_api_auth_total{result}`: API requests by authentication and authorisation result
    /// (`ok`, `missing`, `malformed`, `unknown`, `wrong_secret`, `revoked`, `forbidden`,
    /// `rate_limited`, `unavailable`).
    pub api_auth: IntCounterVec,
    /// `devsvc_payment_callbacks_total{result}`: `authorised`, `refused`, or why the callback
    /// changed nothing (`unsigned`, `unknown_provider`, `stale`, `bad_signature`, `replayed`,
    /// `amount_mismatch`, `invalid`).
    pub payment_callbacks: IntCounterVec,
    /// `devsvc_dead_letters_total{type}`: upstream entries set aside because PostgreSQL refuses
    /// what they carry (their shard moves on).
    pub dead_letters: IntCounterVec,
    /// `devsvc_audit_rows_total{written}`: `in_transaction` (with the change), `before_change`
    /// (a command), `after` (a refusal or failure).
    pub audit_rows: IntCounterVec,
    /// `devsvc_stream_pending_entries{shard}`
    pub stream_pending: IntGaugeVec,
    /// `devsvc_stream_entries_total{type,result}`
    pub stream_entries: IntCounterVec,
    /// `devsvc_stream_set_entries{type}`: entries per set the consumer applied at once.
    pub stream_sets: HistogramVec,
    /// `devsvc_stream_pg_wait_seconds_total`: time the shards' readers waited for their share
    /// of the PostgreSQL pool (`streams.pg_connections`).
    pub stream_pg_wait: prometheus::Counter,
    /// `devsvc_stream_claimed_entries_total`
    pub claimed: IntCounter,
    /// `devsvc_stream_trimmed_entries_total`: upstream entries removed once every consumer
    /// group had acknowledged them.
    pub trimmed: IntCounter,
    /// `devsvc_redis_data_losses_total`: times this instance found Redis had lost its data (or
    /// restarted) and wrote the credentials and heartbeat deadlines back.
    pub redis_data_losses: IntCounter,
    /// `devsvc_weight_readings_persisted_total`
    pub readings_persisted: IntCounter,
    /// `devsvc_weight_reports_duplicate_total`: reports delivered again (a redelivered entry, a
    /// resent frame) and not stored a second time.
    pub reports_duplicate: IntCounter,
    /// `devsvc_retention_deleted_rows_total{table}`
    pub retention_deleted: IntCounterVec,
    /// `devsvc_commands_total{outcome}`
    pub commands: IntCounterVec,
    /// `devsvc_command_duration_seconds`
    pub command_duration: HistogramVec,
    /// `devsvc_startup_grace_active`: 1 while offline decisions are held after start-up.
    pub grace: Gauge,
    /// `devsvc_orders{state}`: orders by state (fleet-wide, from PostgreSQL).
    pub orders: IntGaugeVec,
    /// `devsvc_order_transitions_total{to}`
    pub order_transitions: IntCounterVec,
    /// `devsvc_order_door_open_seconds`: authorisation to the door open.
    pub door_open_seconds: Histogram,
    /// `devsvc_order_settlement_seconds`: door closed to settled.
    pub settlement_seconds: Histogram,
    /// `devsvc_anomalies_total{kind}`
    pub anomalies: IntCounterVec,
    /// `devsvc_door_lock_attempts_total{result}`: acquired, busy, lost.
    pub door_locks: IntCounterVec,
    /// `devsvc_restock_orders_total`
    pub restock_orders: IntCounter,
    /// `devsvc_outbox_published_total{stream}`
    pub outbox_published: IntCounterVec,
    /// `devsvc_outbox_resent_total{stream}`: messages published again (settlements not yet
    /// confirmed, or a relay that stopped before recording them).
    pub outbox_resent: IntCounterVec,
    /// `devsvc_order_action_failures_total`: due-order actions that failed on storage.
    pub order_action_failures: IntCounter,
    /// `devsvc_outbox_relay_failures_total`: relay rounds that failed (PostgreSQL or Redis);
    /// their rows are tried again at once.
    pub outbox_relay_failures: IntCounter,
    /// `devsvc_outbox_confirmed_total`: settlements the account service confirmed.
    pub outbox_confirmed: IntCounter,
    /// `devsvc_outbox_unconfirmed`: settlements published and not yet confirmed.
    pub outbox_unconfirmed: prometheus::IntGauge,
    /// `devsvc_payment_results_total{kind,result}`: the account service's answers that changed a
    /// payment (`settlement`, `refund`, `charge`; `paid`, `failed`).
    pub payment_results: IntCounterVec,
    /// `devsvc_payment_adjustments_total{kind}`: operators' refunds, charges and waivers.
    pub payment_adjustments: IntCounterVec,
    /// `devsvc_contract_events_total{state}`: deduction contract events applied (`signed`,
    /// `suspended`, `terminated`) or `stale` (older than the one applied).
    pub contract_events: IntCounterVec,
    /// `devsvc_orders_unpaid`: orders whose charge failed and was neither paid nor waived.
    pub orders_unpaid: prometheus::IntGauge,
    /// `devsvc_operator_notices_total{kind}`: calibration and inspection notices raised.
    pub operator_notices: IntCounterVec,
    /// `devsvc_activation_steps_total{step,result}`: QR requests, scans, confirmations,
    /// cancellations and reports, by result (`ok` or the refusal's reason).
    pub activation_steps: IntCounterVec,
    /// `devsvc_activation_seconds`: QR id issued to the vehicle activated.
    pub activation_seconds: Histogram,
    /// `devsvc_vehicle_downlinks_total{kind,outcome}`
    pub vehicle_downlinks: IntCounterVec,
    /// `devsvc_ota_tasks{state}` (fleet-wide, from PostgreSQL).
    pub ota_tasks: IntGaugeVec,
    /// `devsvc_ota_vehicles{state}`: vehicles of unfinished tasks by state (fleet-wide).
    pub ota_vehicles: IntGaugeVec,
    /// `devsvc_ota_validation_rejections_total{reason}`
    pub ota_rejections: IntCounterVec,
    /// `devsvc_ota_pushes_total{kind,outcome}`: upgrade and cancel notices sent.
    pub ota_pushes: IntCounterVec,
    /// `devsvc_ota_reports_total{kind,result}`
    pub ota_reports: IntCounterVec,
    /// `devsvc_ota_timeouts_total{phase}`
    pub ota_timeouts: IntCounterVec,
    /// `devsvc_ota_auto_pauses_total`: tasks paused by their error threshold.
    pub ota_auto_pauses: IntCounter,
    /// `devsvc_ota_waves_released_total`
    pub ota_waves_released: IntCounter,
    /// `devsvc_ota_repushes_total`: failed upgrades notified again (compensation).
    pub ota_repushes: IntCounter,
    /// `devsvc_ota_gave_up_total`: failed upgrades handed to the task's publisher.
    pub ota_gave_up: IntCounter,
    /// `devsvc_ota_package_uploads_total{result}`
    pub ota_uploads: IntCounterVec,
    /// `devsvc_ota_package_upload_bytes_total`
    pub ota_upload_bytes: IntCounter,
    /// `devsvc_ota_downloads_total{kind}`: downloads begun, `full` or `range`.
    pub ota_downloads: IntCounterVec,
    /// `devsvc_ota_download_resumes_total`: range requests not starting at byte 0.
    pub ota_download_resumes: IntCounter,
    /// `devsvc_ota_download_bytes_total`: package bytes sent to vehicles.
    pub ota_download_bytes: IntCounter,
    /// `devsvc_ota_downloads_active`: downloads being served by this instance.
    pub ota_downloads_active: prometheus::IntGauge,
    /// `devsvc_ota_download_refusals_total{reason}`
    pub ota_download_refusals: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

impl Metrics {
    /// Creates and registers every metric (plus process CPU and memory).
    ///
    /// # Panics
    /// Never for the fixed definitions below.
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        let ig = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let g = |name: &str, help: &str, labels: &[&str]| {
            register(&r, GaugeVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let c = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let http_connections_open = prometheus::IntGauge::new(
            "devsvc_http_connections_open",
            "HTTP API connections held now (at most http.max_connections; more wait in the backlog).",
        )
        .expect("valid");
        r.register(Box::new(http_connections_open.clone())).expect("metric registered once");
        Self {
            http_connections_open,
            http_requests: c(
                "devsvc_http_requests_total",
                "API requests answered, by route pattern (unmatched: no route), method and status.",
                &["route", "method", "status"],
            ),
            http_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("devsvc_http_request_duration_seconds", "Time to answer an API request.")
                        .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                    &["route", "method"],
                )
                .expect("valid"),
            ),
            api_auth: c(
                "devsvc_api_auth_total",
                "API requests by authentication and authorisation result.",
                &["result"],
            ),
            payment_callbacks: c(
                "devsvc_payment_callbacks_total",
                "Payment provider callbacks by result (authorised, refused, or why nothing changed).",
                &["result"],
            ),
            dead_letters: c(
                "devsvc_dead_letters_total",
                "Upstream entries set aside as dead letters, by entry type.",
                &["type"],
            ),
            audit_rows: c("devsvc_audit_rows_total", "Audit trail rows written, by how.", &["written"]),
            devices: ig("devsvc_devices", "Registered devices by kind and status.", &["kind", "status"]),
            status_changes: c(
                "devsvc_status_changes_total",
                "Device status changes by kind, new status and reason.",
                &["kind", "to", "reason"],
            ),
            node_received: g(
                "devsvc_node_heartbeats_received",
                "Cabinet heartbeats a gateway node delivered over the health window.",
                &["node"],
            ),
            node_expected: g(
                "devsvc_node_heartbeats_expected",
                "Cabinet heartbeats a gateway node should have delivered over the health window.",
                &["node"],
            ),
            node_healthy: ig(
                "devsvc_node_healthy",
                "1 when a node delivered at least its share of heartbeats, 0 when offline decisions behind it are suppressed.",
                &["node"],
            ),
            offline_suppressed: c(
                "devsvc_offline_suppressed_total",
                "Offline decisions held back because the device's node was below its heartbeat share.",
                &["node"],
            ),
            offline_decisions: c(
                "devsvc_offline_decisions_total",
                "Devices marked offline because their heartbeats stopped.",
                &["kind"],
            ),
            deadline_checks: register(
                &r,
                IntCounter::new(
                    "devsvc_deadline_checks_total",
                    "Expired heartbeat deadlines this instance took for judgement (each is taken by one instance).",
                )
                .expect("valid"),
            ),
            stream_lag: ig(
                "devsvc_stream_lag_entries",
                "Upstream entries not yet delivered to the consumer group, by shard.",
                &["shard"],
            ),
            stream_pending: ig(
                "devsvc_stream_pending_entries",
                "Upstream entries delivered and not yet acknowledged, by shard.",
                &["shard"],
            ),
            stream_entries: c(
                "devsvc_stream_entries_total",
                "Upstream entries processed, by type and result.",
                &["type", "result"],
            ),
            stream_sets: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "devsvc_stream_set_entries",
                        "Upstream entries per set applied at once (session, weight_report, ota_report).",
                    )
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]),
                    &["type"],
                )
                .expect("valid"),
            ),
            stream_pg_wait: register(
                &r,
                prometheus::Counter::new(
                    "devsvc_stream_pg_wait_seconds_total",
                    "Time the upstream readers waited for their share of PostgreSQL connections (streams.pg_connections).",
                )
                .expect("valid"),
            ),
            claimed: register(
                &r,
                IntCounter::new(
                    "devsvc_stream_claimed_entries_total",
                    "Stream entries (upstream, account confirmations) taken over from an instance that stopped acknowledging.",
                )
                .expect("valid"),
            ),
            redis_data_losses: register(
                &r,
                IntCounter::new(
                    "devsvc_redis_data_losses_total",
                    "Times Redis was found to have lost its data (run marker gone) or restarted, and credentials and deadlines were written back.",
                )
                .expect("valid"),
            ),
            trimmed: register(
                &r,
                IntCounter::new(
                    "devsvc_stream_trimmed_entries_total",
                    "Upstream entries removed from their stream once every consumer group had acknowledged them.",
                )
                .expect("valid"),
            ),
            readings_persisted: register(
                &r,
                IntCounter::new("devsvc_weight_readings_persisted_total", "Lane weight readings stored.")
                    .expect("valid"),
            ),
            reports_duplicate: register(
                &r,
                IntCounter::new(
                    "devsvc_weight_reports_duplicate_total",
                    "Weight reports delivered again and not stored a second time.",
                )
                .expect("valid"),
            ),
            retention_deleted: c(
                "devsvc_retention_deleted_rows_total",
                "Rows of operational logs deleted past their retention, by table.",
                &["table"],
            ),
            commands: c("devsvc_commands_total", "Commands sent to devices, by outcome.", &["outcome"]),
            command_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("devsvc_command_duration_seconds", "Time from sending a command to its reply.")
                        .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            grace: register(
                &r,
                Gauge::new("devsvc_startup_grace_active", "1 while offline decisions are held after start-up.")
                    .expect("valid"),
            ),
            orders: ig("devsvc_orders", "Orders by state (fleet-wide: aggregate with max).", &["state"]),
            order_transitions: c(
                "devsvc_order_transitions_total",
                "Order state transitions made by this instance, by new state.",
                &["to"],
            ),
            door_open_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "devsvc_order_door_open_seconds",
                        "Time from an order's authorisation to its door reported open.",
                    )
                    .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0]),
                )
                .expect("valid"),
            ),
            settlement_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "devsvc_order_settlement_seconds",
                        "Time from a door-closed event to the order's settlement.",
                    )
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 60.0]),
                )
                .expect("valid"),
            ),
            anomalies: c("devsvc_anomalies_total", "Purchase anomalies recorded for operators, by kind.", &["kind"]),
            door_locks: c(
                "devsvc_door_lock_attempts_total",
                "Door lock attempts by result (acquired, busy: held by another order or restock, lost: found held by another holder at renewal).",
                &["result"],
            ),
            restock_orders: register(
                &r,
                IntCounter::new(
                    "devsvc_restock_orders_total",
                    "Restock orders opened for lanes below their threshold.",
                )
                .expect("valid"),
            ),
            outbox_published: c(
                "devsvc_outbox_published_total",
                "Outbox messages published to Redis streams, by stream.",
                &["stream"],
            ),
            outbox_resent: c(
                "devsvc_outbox_resent_total",
                "Outbox messages published again: settlements not yet confirmed, or rows a stopped relay had not recorded.",
                &["stream"],
            ),
            order_action_failures: register(
                &r,
                IntCounter::new(
                    "devsvc_order_action_failures_total",
                    "Actions on due orders (open, cancel, settle) that failed on PostgreSQL or Redis; the order is tried again.",
                )
                .expect("valid"),
            ),
            outbox_relay_failures: register(
                &r,
                IntCounter::new(
                    "devsvc_outbox_relay_failures_total",
                    "Outbox relay rounds that failed on PostgreSQL or Redis; their rows are tried again.",
                )
                .expect("valid"),
            ),
            outbox_confirmed: register(
                &r,
                IntCounter::new("devsvc_outbox_confirmed_total", "Settlements the account service confirmed.")
                    .expect("valid"),
            ),
            outbox_unconfirmed: register(
                &r,
                prometheus::IntGauge::new("devsvc_outbox_unconfirmed", "Settlements published and not yet confirmed by the account service.")
                    .expect("valid"),
            ),
            payment_results: c(
                "devsvc_payment_results_total",
                "The account service's answers that changed a payment, by kind (settlement, refund, charge) and result (paid, failed).",
                &["kind", "result"],
            ),
            payment_adjustments: c(
                "devsvc_payment_adjustments_total",
                "Operators' refunds, extra charges and waivers of unpaid orders, by kind.",
                &["kind"],
            ),
            contract_events: c(
                "devsvc_contract_events_total",
                "Deduction contract events from the payment provider: the state applied, or stale.",
                &["state"],
            ),
            orders_unpaid: register(
                &r,
                prometheus::IntGauge::new(
                    "devsvc_orders_unpaid",
                    "Orders whose charge the account service failed, neither paid later nor waived.",
                )
                .expect("valid"),
            ),
            operator_notices: c(
                "devsvc_operator_notices_total",
                "Operator notices raised besides anomalies and restock orders: calibration, inspection.",
                &["kind"],
            ),
            activation_steps: c(
                "devsvc_activation_steps_total",
                "Vehicle activation steps (qr_request, scan, confirm, cancel, report) by result: ok or the refusal's reason.",
                &["step", "result"],
            ),
            activation_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "devsvc_activation_seconds",
                        "Time from a QR id issued to the vehicle activated with it.",
                    )
                    .buckets(vec![1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
                )
                .expect("valid"),
            ),
            vehicle_downlinks: c(
                "devsvc_vehicle_downlinks_total",
                "Downlinks sent to vehicles, by kind and outcome (delivered = acknowledged by the vehicle).",
                &["kind", "outcome"],
            ),
            ota_tasks: ig("devsvc_ota_tasks", "OTA tasks by state (fleet-wide: aggregate with max).", &["state"]),
            ota_vehicles: ig(
                "devsvc_ota_vehicles",
                "Vehicles of scheduled and running OTA tasks by upgrade state (fleet-wide: aggregate with max).",
                &["state"],
            ),
            ota_rejections: c(
                "devsvc_ota_validation_rejections_total",
                "VINs refused by OTA task validation, by reason.",
                &["reason"],
            ),
            ota_pushes: c(
                "devsvc_ota_pushes_total",
                "OTA notices sent to vehicles (notify, cancel) by outcome.",
                &["kind", "outcome"],
            ),
            ota_reports: c(
                "devsvc_ota_reports_total",
                "OTA reports from vehicles by kind and result (applied, stale, duplicate, unknown_task, invalid).",
                &["kind", "result"],
            ),
            ota_timeouts: c(
                "devsvc_ota_timeouts_total",
                "Vehicles marked timed out, by the phase they fell silent in.",
                &["phase"],
            ),
            ota_auto_pauses: register(
                &r,
                IntCounter::new("devsvc_ota_auto_pauses_total", "OTA tasks that paused themselves at their error threshold.")
                    .expect("valid"),
            ),
            ota_waves_released: register(
                &r,
                IntCounter::new("devsvc_ota_waves_released_total", "OTA rollout waves released.").expect("valid"),
            ),
            ota_repushes: register(
                &r,
                IntCounter::new("devsvc_ota_repushes_total", "Failed OTA upgrades notified again as a new attempt.")
                    .expect("valid"),
            ),
            ota_gave_up: register(
                &r,
                IntCounter::new(
                    "devsvc_ota_gave_up_total",
                    "Failed OTA upgrades past ota.repush_max, handed to the task's publisher.",
                )
                .expect("valid"),
            ),
            ota_uploads: c(
                "devsvc_ota_package_uploads_total",
                "OTA package uploads by result (stored, digest_mismatch, too_large, truncated, broken, storage, refused).",
                &["result"],
            ),
            ota_upload_bytes: register(
                &r,
                IntCounter::new("devsvc_ota_package_upload_bytes_total", "Bytes of OTA packages stored.").expect("valid"),
            ),
            ota_downloads: c("devsvc_ota_downloads_total", "OTA package downloads begun, full or range.", &["kind"]),
            ota_download_resumes: register(
                &r,
                IntCounter::new(
                    "devsvc_ota_download_resumes_total",
                    "OTA package range requests starting past byte 0 (resumed downloads).",
                )
                .expect("valid"),
            ),
            ota_download_bytes: register(
                &r,
                IntCounter::new("devsvc_ota_download_bytes_total", "OTA package bytes sent to vehicles.").expect("valid"),
            ),
            ota_downloads_active: register(
                &r,
                prometheus::IntGauge::new("devsvc_ota_downloads_active", "OTA package downloads being served now.")
                    .expect("valid"),
            ),
            ota_download_refusals: c(
                "devsvc_ota_download_refusals_total",
                "OTA package downloads refused or broken off, by reason (bad_signature, expired, not_in_task, busy, \
                 range_not_satisfiable, tampered, digest_mismatch).",
                &["reason"],
            ),
            registry: r,
        }
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_catalogue_lists_exactly_the_exported_metrics() {
        let exported = testkit::quoted_metric_names(include_str!("metrics.rs"), "devsvc_", '"');
        let documented = testkit::quoted_metric_names(include_str!("../../docs/metrics.md"), "devsvc_", '`');
        assert!(exported.len() > 30, "{exported:?}");
        assert_eq!(exported, documented, "docs/metrics.md and src/metrics.rs disagree");
    }
}
