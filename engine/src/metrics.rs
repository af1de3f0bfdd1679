//! What each epoch cost, and rolling summaries of it.
//!
//! The primary produces one [`EpochReport`] per checkpoint; the daemon logs it, exposes the
//! latest and the summaries through its control API and Prometheus. Percentiles are computed
//! over a bounded window so a long-running domain's memory stays constant.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Costs of one checkpoint on the primary. Durations are in microseconds in the serialised
/// form so that `remusctl` and scripts need no duration parser.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// The checkpoint's epoch number.
    pub epoch: u64,
    /// Time waiting at the boundary for the previous epoch's ACK (a late backup).
    #[serde(with = "micros")]
    pub ack_wait: Duration,
    /// QMP `stop` (includes draining in-flight guest block I/O).
    #[serde(with = "micros")]
    pub stop: Duration,
    /// Finding and copying the dirty pages (the tracker).
    #[serde(with = "micros")]
    pub capture: Duration,
    /// Disk barrier: every write of the epoch handed to the stream.
    #[serde(with = "micros")]
    pub disk_barrier: Duration,
    /// Saving the device state.
    #[serde(with = "micros")]
    pub device_save: Duration,
    /// QMP `cont`.
    #[serde(with = "micros")]
    pub resume: Duration,
    /// The VM's whole pause: from `stop` issued to `cont` returned.
    #[serde(with = "micros")]
    pub pause: Duration,
    /// Pages that changed in the epoch.
    pub dirty_pages: u64,
    /// Pages the audit found the tracker had missed (resent in this checkpoint).
    pub audit_repaired: u64,
    /// Device-state bytes.
    pub device_bytes: u64,
    /// Page bytes before encoding.
    pub page_bytes_raw: u64,
    /// Page bytes after encoding (zero, LZ4, XOR+LZ4).
    pub page_bytes_encoded: u64,
    /// Encoding and queueing the checkpoint for transmission (while the VM runs).
    #[serde(with = "micros")]
    pub transmit: Duration,
    /// From `cont` to the backup's ACK.
    #[serde(with = "micros")]
    pub ack_latency: Duration,
    /// From closing the epoch's network output to releasing it: how long the epoch's
    /// packets were held.
    #[serde(with = "micros")]
    pub output_commit_delay: Duration,
}

mod micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// p50/p99/max of one quantity over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median, microseconds.
    pub p50_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Maximum, microseconds.
    pub max_us: u64,
}

/// Summaries over the last [`EpochWindow::CAPACITY`] epochs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// Epochs in the window.
    pub epochs: u64,
    /// The VM's pause.
    pub pause: Percentiles,
    /// Output held per epoch.
    pub output_commit_delay: Percentiles,
    /// ACK latency.
    pub ack_latency: Percentiles,
    /// Mean dirty pages per epoch.
    pub mean_dirty_pages: u64,
}

/// A bounded window of recent reports.
#[derive(Debug, Default, Clone)]
pub struct EpochWindow {
    reports: VecDeque<EpochReport>,
}

impl EpochWindow {
    /// Reports kept.
    pub const CAPACITY: usize = 1024;

    /// Adds a report, dropping the oldest beyond the capacity.
    pub fn push(&mut self, r: EpochReport) {
        if self.reports.len() == Self::CAPACITY {
            self.reports.pop_front();
        }
        self.reports.push_back(r);
    }

    /// The most recent report.
    pub fn last(&self) -> Option<&EpochReport> {
        self.reports.back()
    }

    /// Percentiles over the window.
    pub fn summary(&self) -> EpochSummary {
        let pct = |f: fn(&EpochReport) -> Duration| percentiles(self.reports.iter().map(f));
        let n = self.reports.len() as u64;
        EpochSummary {
            epochs: n,
            pause: pct(|r| r.pause),
            output_commit_delay: pct(|r| r.output_commit_delay),
            ack_latency: pct(|r| r.ack_latency),
            mean_dirty_pages: self
                .reports
                .iter()
                .map(|r| r.dirty_pages)
                .sum::<u64>()
                .checked_div(n)
                .unwrap_or(0),
        }
    }
}

/// Nearest-rank percentiles of a set of durations.
pub fn percentiles(values: impl Iterator<Item = Duration>) -> Percentiles {
    let mut v: Vec<u64> = values.map(|d| d.as_micros() as u64).collect();
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_unstable();
    let rank = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[i - 1]
    };
    Percentiles {
        p50_us: rank(0.50),
        p99_us: rank(0.99),
        max_us: *v.last().expect("non-empty"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms = |v: &[u64]| percentiles(v.iter().map(|&m| Duration::from_millis(m)));
        // (values, p50, p99, max) in ms
        let cases: &[(&[u64], u64, u64, u64)] = &[
            (&[], 0, 0, 0),
            (&[5], 5, 5, 5),
            (&[1, 2, 3, 4], 2, 4, 4),
            (&[10, 1, 7, 3, 5], 5, 10, 10),
        ];
        for (vals, p50, p99, max) in cases {
            let p = ms(vals);
            assert_eq!(
                (p.p50_us, p.p99_us, p.max_us),
                (p50 * 1000, p99 * 1000, max * 1000),
                "{vals:?}"
            );
        }
    }

    #[test]
    fn window_is_bounded() {
        let mut w = EpochWindow::default();
        for e in 0..(EpochWindow::CAPACITY as u64 + 10) {
            w.push(EpochReport {
                epoch: e,
                dirty_pages: 2,
                ..Default::default()
            });
        }
        let s = w.summary();
        assert_eq!(s.epochs, EpochWindow::CAPACITY as u64);
        assert_eq!(s.mean_dirty_pages, 2);
        assert_eq!(w.last().unwrap().epoch, EpochWindow::CAPACITY as u64 + 9);
    }

    #[test]
    fn report_serialises_durations_as_micros() {
        let r = EpochReport {
            pause: Duration::from_millis(12),
            ..Default::default()
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["pause"], 12_000);
        let back: EpochReport = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
    }
}
