//! What a worker measures, and how snapshots from many workers merge into one report.
//!
//! Latencies are HDR histograms in microseconds (1 µs to 10 min, 3 significant digits); they
//! travel between processes serialized (V2 format, hex) so that the orchestrator merges the
//! distributions, not percentiles.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Counters and histograms of one process, shared by its tasks.
#[derive(Debug, Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<&'static str, u64>>,
    histograms: Mutex<BTreeMap<&'static str, Histogram<u64>>>,
    /// Devices connected right now.
    pub connected: AtomicU64,
}

impl Stats {
    /// Adds `n` to counter `name`.
    pub fn add(&self, name: &'static str, n: u64) {
        *self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(name).or_default() += n;
    }

    /// The current value of counter `name`.
    pub fn count(&self, name: &str) -> u64 {
        self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).copied().unwrap_or(0)
    }

    /// Records a latency.
    pub fn record(&self, series: &'static str, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, 600_000_000);
        let mut h = self.histograms.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = h.entry(series).or_insert_with(histogram).record(micros);
    }

    /// A copy of everything, for the report.
    pub fn snapshot(&self) -> Snapshot {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        let histograms = self
            .histograms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, h)| {
                let mut bytes = Vec::new();
                let _ = V2Serializer::new().serialize(h, &mut bytes);
                ((*k).to_owned(), hex::encode(bytes))
            })
            .collect();
        Snapshot { connected: self.connected.load(Ordering::Relaxed), counters, histograms }
    }
}

/// A serializable copy of [`Stats`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Devices connected when taken.
    pub connected: u64,
    /// Counters by name.
    pub counters: BTreeMap<String, u64>,
    /// Histograms by series, V2-serialized, hex.
    pub histograms: BTreeMap<String, String>,
}

/// Percentiles of one series, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// The distribution for charts: `[percentile, ms]` at [`CURVE_PERCENTILES`].
    #[serde(default)]
    pub curve: Vec<[f64; 2]>,
}

/// Where a [`Summary`]'s curve samples the distribution.
pub const CURVE_PERCENTILES: [f64; 13] =
    [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0];

/// Merged snapshots.
#[derive(Debug, Default)]
pub struct Merged {
    /// Sum of connected devices.
    pub connected: u64,
    /// Summed counters.
    pub counters: BTreeMap<String, u64>,
    /// Merged histograms.
    pub histograms: BTreeMap<String, Histogram<u64>>,
}

impl Merged {
    /// Adds one process's snapshot.
    pub fn add(&mut self, s: &Snapshot) {
        self.connected += s.connected;
        for (k, v) in &s.counters {
            *self.counters.entry(k.clone()).or_default() += v;
        }
        for (k, hexed) in &s.histograms {
            let Ok(bytes) = hex::decode(hexed) else { continue };
            let Ok(h) = Deserializer::new().deserialize::<u64, _>(&mut &bytes[..]) else { continue };
            let _ = self.histograms.entry(k.clone()).or_insert_with(histogram).add(&h);
        }
    }

    /// Percentiles of every series.
    pub fn summaries(&self) -> BTreeMap<String, Summary> {
        self.histograms.iter().map(|(k, h)| (k.clone(), summarize(h))).collect()
    }
}

/// Percentiles of a histogram in ms.
pub fn summarize(h: &Histogram<u64>) -> Summary {
    let ms = |v: u64| v as f64 / 1000.0;
    Summary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        curve: if h.is_empty() {
            Vec::new()
        } else {
            CURVE_PERCENTILES.iter().map(|p| [*p, ms(h.value_at_percentile(*p))]).collect()
        },
    }
}

/// A fresh histogram with the fleet's bounds.
pub fn new_histogram() -> Histogram<u64> {
    histogram()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_merge_distributions() {
        let a = Stats::default();
        let b = Stats::default();
        for i in 1..=100 {
            a.record("command_rtt", Duration::from_millis(i));
            b.record("command_rtt", Duration::from_millis(100 + i));
        }
        a.add("logins", 3);
        b.add("logins", 4);
        let mut m = Merged::default();
        m.add(&a.snapshot());
        m.add(&b.snapshot());
        assert_eq!(m.counters["logins"], 7);
        let s = &m.summaries()["command_rtt"];
        assert_eq!(s.count, 200);
        assert!((s.p50_ms - 100.0).abs() < 1.0, "{s:?}");
        assert!((s.max_ms - 200.0).abs() < 1.0, "{s:?}");
    }
}
