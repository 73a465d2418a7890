//! Latency histograms and the record of one run, as printed and as written to JSON.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies in microseconds, 1 us to 10 min, 3 significant digits.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// An empty histogram.
    pub fn new() -> Self {
        // Bounds are constants inside hdrhistogram's supported range, so this cannot fail.
        let histogram = Histogram::new_with_bounds(1, 600_000_000, 3)
            .unwrap_or_else(|e| unreachable!("constant histogram bounds are valid: {e}"));
        Self(histogram)
    }

    /// Records one latency (saturating at the upper bound).
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// The percentiles reported for every run.
    pub fn summary(&self) -> LatencySummary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p99: ms(self.0.value_at_quantile(0.99)),
            p999: ms(self.0.value_at_quantile(0.999)),
            max: ms(self.0.max()),
            mean: self.0.mean() / 1000.0,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// One run of one scenario against one system: one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// `write`, `fanout`, `failover` or `scale`.
    pub scenario: String,
    /// `cellchat`, `cellchat-signed`, `cellchat-base`, `etcd`, `nats`, `nats-sync` or `nats-tls`.
    pub system: String,
    /// Server nodes.
    pub nodes: usize,
    /// Concurrent senders (closed loop for `write`).
    pub clients: usize,
    /// Subscribers (`fanout`, `scale`).
    pub subscribers: usize,
    /// Offered rate in messages/s (`fanout`, `scale`); 0 for closed loop.
    pub rate_per_s: f64,
    /// Message body size in bytes.
    pub body_bytes: usize,
    /// Measured seconds (after warm-up).
    pub duration_s: f64,
    /// Operations completed in the measured window (sends acknowledged, or deliveries).
    pub ops: u64,
    /// Operations that failed in the measured window.
    pub errors: u64,
    /// `ops / duration_s`.
    pub throughput_per_s: f64,
    /// Acknowledgement latency (`write`, `failover`) or send-to-delivery latency (`fanout`,
    /// `scale`).
    pub latency_ms: LatencySummary,
    /// Deliveries that never arrived (`fanout`, `scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<u64>,
    /// Deliveries that arrived more than once (`fanout`, `scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
    /// Scenario-specific figures (failover times, RSS, CPU, subscriber spread).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// UTC time the run ended, RFC 3339.
    pub at: String,
}

impl RunResult {
    /// A result with the common fields filled and nothing measured yet.
    pub fn new(scenario: &str, system: &str, nodes: usize) -> Self {
        Self {
            scenario: scenario.to_owned(),
            system: system.to_owned(),
            nodes,
            clients: 0,
            subscribers: 0,
            rate_per_s: 0.0,
            body_bytes: 0,
            duration_s: 0.0,
            ops: 0,
            errors: 0,
            throughput_per_s: 0.0,
            latency_ms: LatencySummary::default(),
            missing: None,
            duplicates: None,
            extra: serde_json::Map::new(),
            at: now_rfc3339(),
        }
    }

    /// Sets a scenario-specific figure.
    pub fn set(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.extra.insert(key.to_owned(), value.into());
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    cellchat_client::time::utc_rfc3339(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_samples() {
        let mut latencies = Latencies::new();
        for ms in 1..=100 {
            latencies.record(Duration::from_millis(ms));
        }
        let summary = latencies.summary();
        assert!((summary.p50 - 50.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p99 - 99.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max - 100.0).abs() < 0.1, "{summary:?}");
        assert_eq!(Latencies::new().summary(), LatencySummary::default());
    }
}
