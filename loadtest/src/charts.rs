//! PNG charts of a run, drawn from its JSON report alone (so any report can be charted again):
//! one chart of latency distributions (every series' percentile curve, log scale) and one of
//! connections and acknowledged uplinks over time.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use serde_json::Value;

/// Fonts tried for the labels (Debian: `fonts-dejavu-core`).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let path =
        FONTS.iter().find(|p| Path::new(p).exists()).context("no DejaVuSans.ttf found (install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// Every latency series of a report's `details`: `(name, [(percentile, ms)])`.
fn latency_series(details: &Value) -> Vec<(String, Vec<(f64, f64)>)> {
    let curve = |v: &Value| -> Vec<(f64, f64)> {
        v["curve"]
            .as_array()
            .map_or_else(Vec::new, |c| c.iter().filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?))).collect())
    };
    let mut out = Vec::new();
    if let Some(map) = details["latency"].as_object() {
        out.extend(map.iter().map(|(k, v)| (k.clone(), curve(v))));
    }
    for (name, path) in [
        ("command round trip", &details["commands"]["round_trip"]),
        ("order to door open", &details["purchase_storm"]["order_to_door_open"]),
        ("order to settled", &details["purchase_storm"]["order_to_settled"]),
    ] {
        out.push((name.to_owned(), curve(path)));
    }
    out.retain(|(_, c)| !c.is_empty());
    out
}

/// x position of a percentile on a "nines" axis: 0 -> 0, 90 -> 1, 99 -> 2, 99.9 -> 3 ...
fn nines(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.99999)).log10()
}

/// Writes the charts next to `report` (`<stem>-latency.png`, `<stem>-timeline.png`); returns
/// their paths.
///
/// # Errors
/// No font, or the files cannot be written.
pub fn write(report: &Path, details: &Value) -> anyhow::Result<Vec<PathBuf>> {
    register_font()?;
    let stem = report.with_extension("");
    let mut written = Vec::new();
    let series = latency_series(details);
    if !series.is_empty() {
        let path = PathBuf::from(format!("{}-latency.png", stem.display()));
        latency_chart(&path, &series)?;
        written.push(path);
    }
    if let Some(timeline) = details["timeline"].as_array().filter(|t| t.len() > 1) {
        let path = PathBuf::from(format!("{}-timeline.png", stem.display()));
        timeline_chart(&path, timeline)?;
        written.push(path);
    }
    Ok(written)
}

fn latency_chart(path: &Path, series: &[(String, Vec<(f64, f64)>)]) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let max_ms = series.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)).fold(1.0f64, f64::max);
    let min_ms = series.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)).fold(max_ms, f64::min).max(0.01);
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency distributions (ms, log scale)", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..nines(99.999), (min_ms * 0.8..max_ms * 1.25).log_scale())
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("milliseconds")
        .x_label_formatter(&|x| format!("{:.3}", 100.0 * (1.0 - 10f64.powf(-x))))
        .draw()
        .map_err(draw)?;
    for (i, (name, curve)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                curve.iter().map(|(p, ms)| (nines(*p), ms.max(min_ms))),
                color.stroke_width(2),
            ))
            .map_err(draw)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn timeline_chart(path: &Path, timeline: &[Value]) -> anyhow::Result<()> {
    let points: Vec<(f64, f64, f64)> = timeline
        .iter()
        .filter_map(|s| Some((s["t_s"].as_f64()?, s["connected"].as_f64()?, s["acked"].as_f64()?)))
        .collect();
    let rates: Vec<(f64, f64)> =
        points.windows(2).map(|w| (w[1].0, (w[1].2 - w[0].2).max(0.0) / (w[1].0 - w[0].0).max(0.001))).collect();
    let t_max = points.last().map_or(1.0, |p| p.0).max(1.0);
    let c_max = points.iter().map(|p| p.1).fold(1.0, f64::max);
    let r_max = rates.iter().map(|p| p.1).fold(1.0, f64::max);
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let (top, bottom) = root.split_vertically(325);
    let mut conn = ChartBuilder::on(&top)
        .caption("Devices connected", ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..c_max * 1.1)
        .map_err(draw)?;
    conn.configure_mesh().x_desc("seconds").draw().map_err(draw)?;
    conn.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), BLUE.stroke_width(2))).map_err(draw)?;
    let mut rate = ChartBuilder::on(&bottom)
        .caption("Uplinks acknowledged per second", ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..r_max * 1.1)
        .map_err(draw)?;
    rate.configure_mesh().x_desc("seconds").draw().map_err(draw)?;
    rate.draw_series(LineSeries::new(rates, RED.stroke_width(2))).map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("failed to draw a chart: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::nines;

    #[test]
    fn nines_spread_the_tail() {
        assert!(nines(0.0).abs() < 1e-9);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-6);
    }
}
