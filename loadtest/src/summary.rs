//! The few lines a person reads at the end of a run (the JSON report has everything).

use serde_json::Value;

fn ms(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 1000.0 => format!("{:.2} s", x / 1000.0),
        Some(x) => format!("{x:.2} ms"),
        None => "-".into(),
    }
}

fn latency(v: &Value) -> String {
    format!("p50 {} / p99 {} / max {} ({} samples)", ms(&v["p50_ms"]), ms(&v["p99_ms"]), ms(&v["max_ms"]), v["count"])
}

/// Summary lines of a fleet run's results.
pub fn lines(results: &Value) -> Vec<String> {
    let d = &results["details"];
    let mut out = vec![format!(
        "fleet: {} devices connected in {:.1} s ({:.0} logins/s); memory per connection {:.0} B",
        results["connected"],
        results["ramp_s"].as_f64().unwrap_or(0.0),
        results["login_rate_per_s"].as_f64().unwrap_or(0.0),
        results["rss_per_connection_bytes"].as_f64().unwrap_or(0.0)
    )];
    if let Some(c) = d["latency"].get("connect") {
        out.push(format!("connect: {}", latency(c)));
    }
    let storm = &d["reconnect_storm"];
    if storm.is_object() {
        let whole = storm["whole_again_after_s"]
            .as_f64()
            .map_or("not within the run".into(), |s| format!("whole again after {s:.0} s"));
        out.push(format!("reconnect storm: {} devices dropped, {whole}", storm["devices_dropped"]));
    }
    for (name, label) in [("reconnect", "reconnect (lost -> logged in again)"), ("heartbeat_ack", "heartbeat -> ack")] {
        if let Some(l) = d["latency"].get(name) {
            out.push(format!("{label}: {}", latency(l)));
        }
    }
    if d["commands"].is_object() {
        out.push(format!(
            "commands: {} sent, outcomes {}; round trip {}",
            d["commands"]["sent"],
            d["commands"]["outcomes"],
            latency(&d["commands"]["round_trip"])
        ));
    }
    let p = &d["purchase_storm"];
    if p.is_object() {
        out.push(format!("purchase storm: {} orders, outcomes {}", p["orders"], p["outcomes"]));
        out.push(format!("  order -> door open {}", latency(&p["order_to_door_open"])));
        out.push(format!("  order -> settled   {}", latency(&p["order_to_settled"])));
    }
    let a = &d["activation_wave"];
    if a.is_object() {
        out.push(format!(
            "activation wave: {} vehicles, {} QR ids, {} activated, {} refused",
            a["vehicles"], a["qr_ids_received"], a["activated"], a["rejected"]
        ));
        if let Some(l) = d["latency"].get("activation") {
            out.push(format!("  QR request -> activated {}", latency(l)));
        }
    }
    let o = &d["ota_campaign"];
    if o.is_object() {
        let finished =
            o["finished_after_s"].as_f64().map_or("not within the hold".into(), |s| format!("finished in {s:.1} s"));
        out.push(format!(
            "OTA campaign: {} accepted, {} refused, vehicles {}, {finished}",
            o["accepted"], o["rejected"], o["counts"]
        ));
        if let Some(l) = d["latency"].get("ota_upgrade") {
            out.push(format!("  notice -> success reported {}", latency(l)));
        }
        if o["package_bytes"].as_u64().unwrap_or(0) > 0 {
            let c = &d["counters"];
            out.push(format!(
                "  package of {} bytes: {} downloads, {} bytes, {} resumes; waves released {}/{}, {} automatic pauses",
                o["package_bytes"],
                c["ota_downloads"].as_u64().unwrap_or(0),
                c["ota_download_bytes"].as_u64().unwrap_or(0),
                c["ota_download_resumes"].as_u64().unwrap_or(0),
                o["waves"][0].as_i64().unwrap_or(0) + 1,
                o["waves"][1],
                o["automatic_pauses"],
            ));
        }
    }
    let lost = &d["lost"];
    if lost.is_object() {
        out.push(format!(
            "lost: {} uplinks unacknowledged ({} in flight at the stop), {} heartbeats unanswered, {} commands \
             without reply and {} not delivered, {} door events unacknowledged at the stop",
            lost["uplinks_unacknowledged"],
            lost["uplinks_in_flight_at_stop"],
            lost["heartbeats_unanswered"],
            lost["commands_without_reply"],
            lost["commands_not_delivered"],
            lost["door_events_unacknowledged_at_stop"]
        ));
    }
    if let Some(r) = d["uplinks_acked_per_s_in_hold"].as_f64().filter(|r| *r > 0.0) {
        out.push(format!("uplinks acknowledged: {r:.0}/s during the hold"));
    }
    out
}
