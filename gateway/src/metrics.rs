//! The gateway's Prometheus metrics, one registry per gateway instance (tests run several in
//! one process), and the `/metrics` + `/healthz` endpoint.
//!
//! Names follow Prometheus conventions (`_total` counters, base units, help on every metric);
//! `docs/metrics.md` lists them and the dashboards in `grafana/` query exactly these names.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every metric the gateway exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry they are all in.
    pub registry: Registry,
    /// `gateway_node_info{node,version}`: always 1; joins a scrape target (`instance`) to the
    /// node id that the connection map and the device service's metrics use.
    pub node_info: IntGaugeVec,
    /// `gateway_connections_open{protocol}`
    pub connections_open: IntGaugeVec,
    /// `gateway_connections_accepted_total{protocol}`
    pub connections_accepted: IntCounterVec,
    /// `gateway_accept_errors_total{protocol}`
    pub accept_errors: IntCounterVec,
    /// `gateway_admission_delays_total{protocol,reason}`: accepts held back by the limit or the pacing.
    pub admission_delays: IntCounterVec,
    /// `gateway_tls_handshake_failures_total{protocol}`
    pub tls_failures: IntCounterVec,
    /// `gateway_logins_total{protocol,result}`
    pub logins: IntCounterVec,
    /// `gateway_frames_received_total{protocol,type}`
    pub frames_in: IntCounterVec,
    /// `gateway_frames_sent_total{protocol,type}`
    pub frames_out: IntCounterVec,
    /// `gateway_frames_rejected_total{protocol,reason}`
    pub frames_rejected: IntCounterVec,
    /// `gateway_bytes_received_total{protocol}`
    pub bytes_in: IntCounterVec,
    /// `gateway_bytes_sent_total{protocol}`
    pub bytes_out: IntCounterVec,
    /// `gateway_takeovers_total{protocol,scope}`
    pub takeovers: IntCounterVec,
    /// `gateway_sessions_closed_total{protocol,reason}` (idle timeouts, slow readers, ...)
    pub sessions_closed: IntCounterVec,
    /// `gateway_flapping_cooldowns_total{protocol}`: devices that logged in too often and were
    /// refused for a cool-down (a clone, or firmware reconnecting in a loop).
    pub flapping_cooldowns: IntCounterVec,
    /// `gateway_credential_changes_total{change}`: credential changes this node applied.
    pub credential_changes: IntCounterVec,
    /// `gateway_mqtt_acl_denied_total{action}`
    pub acl_denied: IntCounterVec,
    /// `gateway_heartbeats_total`
    pub heartbeats: IntCounter,
    /// `gateway_commands_total{protocol,outcome}`
    pub commands: IntCounterVec,
    /// `gateway_command_duration_seconds{protocol}`: from reading the command to the device's answer.
    pub command_duration: HistogramVec,
    /// `gateway_upstream_events_total{type}`: entries written to the upstream streams.
    pub upstream_events: IntCounterVec,
    /// `gateway_upstream_dropped_total{reason}`
    pub upstream_dropped: IntCounterVec,
    /// `gateway_upstream_buffer_events`: entries accepted and not yet in Redis.
    pub upstream_buffer: IntGauge,
    /// `gateway_reply_buffer_entries`: command replies accepted and not yet in Redis.
    pub reply_buffer: IntGauge,
    /// `gateway_replies_written_total{outcome}`
    pub replies_written: IntCounterVec,
    /// `gateway_redis_errors_total{op}`
    pub redis_errors: IntCounterVec,
    /// `gateway_redis_data_losses_total`: times this node found Redis had lost its data (the run
    /// marker vanished or changed, or the server restarted) and wrote its sessions back.
    pub redis_data_losses: IntCounter,
    /// `gateway_stream_cap_holds_total{op}`: write rounds held back because a stream was at its
    /// length cap (its consumers behind).
    pub stream_cap_holds: IntCounterVec,
    /// `gateway_backpressure_pauses_total{protocol}`: a device's reading paused because the
    /// upstream buffer was full.
    pub backpressure: IntCounterVec,
    /// `gateway_mqtt_stored_downlinks_total{action}`: persistent-session downlinks kept and resent.
    pub stored_downlinks: IntCounterVec,
    /// The MQTT listener's byte and frame counters, resolved once.
    pub mqtt: Traffic,
    /// The cabinet listener's byte and frame counters, resolved once.
    pub cabinet: Traffic,
}

/// Frame types counted on the hot paths without a label lookup; others fall back to it.
const HOT_FRAMES: [&str; 11] = [
    "publish",
    "puback",
    "pingreq",
    "pingresp",
    "subscribe",
    "suback",
    "heartbeat",
    "heartbeat_ack",
    "weight_report",
    "door_event",
    "ack",
];

/// One protocol's byte and frame counters (`gateway_bytes_*_total`,
/// `gateway_frames_*_total`), each resolved on first use: a packet counted on a session's hot
/// path costs an atomic add, not a hash of its label values (`with_label_values`) each time.
#[derive(Debug, Clone)]
pub struct Traffic(Arc<TrafficCounters>);

#[derive(Debug)]
struct TrafficCounters {
    protocol: &'static str,
    bytes_in_vec: IntCounterVec,
    bytes_out_vec: IntCounterVec,
    frames_in_vec: IntCounterVec,
    frames_out_vec: IntCounterVec,
    bytes_in: OnceLock<IntCounter>,
    bytes_out: OnceLock<IntCounter>,
    frames_in: [OnceLock<IntCounter>; HOT_FRAMES.len()],
    frames_out: [OnceLock<IntCounter>; HOT_FRAMES.len()],
}

impl Traffic {
    fn new(protocol: &'static str, m: &MetricsVecs<'_>) -> Self {
        Self(Arc::new(TrafficCounters {
            protocol,
            bytes_in_vec: m.bytes_in.clone(),
            bytes_out_vec: m.bytes_out.clone(),
            frames_in_vec: m.frames_in.clone(),
            frames_out_vec: m.frames_out.clone(),
            bytes_in: OnceLock::new(),
            bytes_out: OnceLock::new(),
            frames_in: std::array::from_fn(|_| OnceLock::new()),
            frames_out: std::array::from_fn(|_| OnceLock::new()),
        }))
    }

    /// Counts `n` bytes received (nothing for 0).
    pub fn bytes_in(&self, n: usize) {
        if n > 0 {
            let t = &self.0;
            t.bytes_in.get_or_init(|| t.bytes_in_vec.with_label_values(&[t.protocol])).inc_by(n as u64);
        }
    }

    /// Counts `n` bytes sent (nothing for 0).
    pub fn bytes_out(&self, n: usize) {
        if n > 0 {
            let t = &self.0;
            t.bytes_out.get_or_init(|| t.bytes_out_vec.with_label_values(&[t.protocol])).inc_by(n as u64);
        }
    }

    /// Counts one frame of type `label` received.
    pub fn frame_in(&self, label: &str) {
        let t = &self.0;
        match HOT_FRAMES.iter().position(|h| *h == label) {
            Some(i) => t.frames_in[i].get_or_init(|| t.frames_in_vec.with_label_values(&[t.protocol, label])).inc(),
            None => t.frames_in_vec.with_label_values(&[t.protocol, label]).inc(),
        }
    }

    /// Counts one frame of type `label` sent.
    pub fn frame_out(&self, label: &str) {
        let t = &self.0;
        match HOT_FRAMES.iter().position(|h| *h == label) {
            Some(i) => t.frames_out[i].get_or_init(|| t.frames_out_vec.with_label_values(&[t.protocol, label])).inc(),
            None => t.frames_out_vec.with_label_values(&[t.protocol, label]).inc(),
        }
    }
}

/// The vectors [`Traffic`] resolves from.
struct MetricsVecs<'a> {
    bytes_in: &'a IntCounterVec,
    bytes_out: &'a IntCounterVec,
    frames_in: &'a IntCounterVec,
    frames_out: &'a IntCounterVec,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry (plus process CPU and memory).
    ///
    /// # Panics
    /// Never for the fixed definitions below.
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        let node_info = IntGaugeVec::new(
            Opts::new("gateway_node_info", "Always 1: this node's id and the gateway's version."),
            &["node", "version"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(node_info.clone())).expect("registered once");
        let connections_open = IntGaugeVec::new(
            Opts::new("gateway_connections_open", "Device connections currently open, by protocol."),
            &["protocol"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(connections_open.clone())).expect("registered once");
        let upstream_buffer = IntGauge::new(
            "gateway_upstream_buffer_events",
            "Device events accepted and not yet written to the upstream streams.",
        )
        .expect("valid metric definition");
        registry.register(Box::new(upstream_buffer.clone())).expect("registered once");
        let reply_buffer = IntGauge::new(
            "gateway_reply_buffer_entries",
            "Command replies accepted and not yet written to the reply streams.",
        )
        .expect("valid metric definition");
        registry.register(Box::new(reply_buffer.clone())).expect("registered once");
        let heartbeats = IntCounter::new("gateway_heartbeats_total", "Cabinet heartbeats received.")
            .expect("valid metric definition");
        registry.register(Box::new(heartbeats.clone())).expect("registered once");
        let command_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_command_duration_seconds",
                "Time from reading a command off the command stream to the device's answer.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["protocol"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(command_duration.clone())).expect("registered once");

        let r = &registry;
        let frames_in = counter_vec(
            r,
            "gateway_frames_received_total",
            "Frames (cabinet) or packets (MQTT) received, by type.",
            &["protocol", "type"],
        );
        let frames_out = counter_vec(
            r,
            "gateway_frames_sent_total",
            "Frames (cabinet) or packets (MQTT) sent, by type.",
            &["protocol", "type"],
        );
        let bytes_in = counter_vec(r, "gateway_bytes_received_total", "Bytes received from devices.", &["protocol"]);
        let bytes_out = counter_vec(r, "gateway_bytes_sent_total", "Bytes sent to devices.", &["protocol"]);
        let vecs =
            MetricsVecs { bytes_in: &bytes_in, bytes_out: &bytes_out, frames_in: &frames_in, frames_out: &frames_out };
        let mqtt = Traffic::new("mqtt", &vecs);
        let cabinet = Traffic::new("cabinet", &vecs);
        Self {
            connections_accepted: counter_vec(
                r,
                "gateway_connections_accepted_total",
                "TCP connections accepted.",
                &["protocol"],
            ),
            accept_errors: counter_vec(r, "gateway_accept_errors_total", "Failed accept calls.", &["protocol"]),
            admission_delays: counter_vec(
                r,
                "gateway_admission_delays_total",
                "Accepts held back by the connection limit or the accept pacing.",
                &["protocol", "reason"],
            ),
            tls_failures: counter_vec(
                r,
                "gateway_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out.",
                &["protocol"],
            ),
            logins: counter_vec(r, "gateway_logins_total", "Login attempts by result.", &["protocol", "result"]),
            frames_in,
            frames_out,
            frames_rejected: counter_vec(
                r,
                "gateway_frames_rejected_total",
                "Frames or packets rejected, by reason.",
                &["protocol", "reason"],
            ),
            bytes_in,
            bytes_out,
            takeovers: counter_vec(
                r,
                "gateway_takeovers_total",
                "Sessions ended because the device logged in again, on this node (local) or another (remote).",
                &["protocol", "scope"],
            ),
            sessions_closed: counter_vec(
                r,
                "gateway_sessions_closed_total",
                "Sessions ended, by reason (idle_timeout, slow_reader, taken_over, peer_closed, ...).",
                &["protocol", "reason"],
            ),
            flapping_cooldowns: counter_vec(
                r,
                "gateway_flapping_cooldowns_total",
                "Cool-downs started for devices that logged in too often (clones, reconnect loops).",
                &["protocol"],
            ),
            credential_changes: counter_vec(
                r,
                "gateway_credential_changes_total",
                "Credential changes applied from the change stream (registered, rotated, disabled, enabled, resync).",
                &["change"],
            ),
            acl_denied: counter_vec(
                r,
                "gateway_mqtt_acl_denied_total",
                "MQTT publishes or subscriptions outside the vehicle's own topics.",
                &["action"],
            ),
            heartbeats,
            commands: counter_vec(
                r,
                "gateway_commands_total",
                "Commands handled, by outcome.",
                &["protocol", "outcome"],
            ),
            command_duration,
            upstream_events: counter_vec(
                r,
                "gateway_upstream_events_total",
                "Entries written to the upstream streams, by type.",
                &["type"],
            ),
            upstream_dropped: counter_vec(
                r,
                "gateway_upstream_dropped_total",
                "Device events not accepted because the upstream buffer was full, by reason.",
                &["reason"],
            ),
            upstream_buffer,
            reply_buffer,
            replies_written: counter_vec(
                r,
                "gateway_replies_written_total",
                "Command replies written to the reply streams, by outcome.",
                &["outcome"],
            ),
            redis_errors: counter_vec(r, "gateway_redis_errors_total", "Failed Redis operations.", &["op"]),
            redis_data_losses: {
                let c = IntCounter::new(
                    "gateway_redis_data_losses_total",
                    "Times Redis was found to have lost its data (run marker gone) or restarted, and this node wrote its sessions back.",
                )
                .expect("valid");
                r.register(Box::new(c.clone())).expect("registered once");
                c
            },
            stream_cap_holds: counter_vec(
                r,
                "gateway_stream_cap_holds_total",
                "Write rounds held back because a stream was at its length cap (its consumers behind).",
                &["op"],
            ),
            backpressure: counter_vec(
                r,
                "gateway_backpressure_pauses_total",
                "Times a device's input was paused because the upstream buffer was full.",
                &["protocol"],
            ),
            stored_downlinks: counter_vec(
                r,
                "gateway_mqtt_stored_downlinks_total",
                "QoS 1 downlinks kept for persistent sessions (stored) and sent again after a reconnect (resent).",
                &["action"],
            ),
            connections_open,
            node_info,
            registry,
            mqtt,
            cabinet,
        }
    }

    /// The registry rendered in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: CancellationToken) {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response() }
            }),
        )
        .route("/healthz", get(|| async { StatusCode::OK }));
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}

/// Binds the metrics listener, if configured.
///
/// # Errors
/// The bind error.
pub async fn bind(listen: &str) -> std::io::Result<Option<(TcpListener, SocketAddr)>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    Ok(Some((listener, addr)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_catalogue_lists_exactly_the_exported_metrics() {
        let exported = testkit::quoted_metric_names(include_str!("metrics.rs"), "gateway_", '"');
        let documented = testkit::quoted_metric_names(include_str!("../../docs/metrics.md"), "gateway_", '`');
        assert!(exported.len() > 20, "{exported:?}");
        assert_eq!(exported, documented, "docs/metrics.md and src/metrics.rs disagree");
    }
}
