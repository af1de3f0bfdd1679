//! Rate-limited logging of what anyone on the network can cause.
//!
//! A datagram with a bad tag, a refused handshake or a connection shed at the cap costs an
//! attacker one packet; if each one wrote a log line, a flood would fill the journal and
//! keep the heartbeat thread busy formatting. So such events are *counted* always (the
//! counters are exported) and *logged* at most once per period, the line saying how many
//! were folded into it. Used by the heartbeat detector, the witness and the daemon's
//! replication listener.

use std::time::{Duration, Instant};

/// Default: at most one line per kind of event every ten seconds.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);

/// Decides when one kind of event may be logged again.
#[derive(Debug, Clone)]
pub struct LogLimit {
    period: Duration,
    last: Option<Instant>,
    folded: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new(DEFAULT_PERIOD)
    }
}

impl LogLimit {
    /// At most one line per `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            folded: 0,
        }
    }

    /// Records one event at `now`. `Some(n)` means log it now, saying `n` more events of the
    /// kind happened since the last line and were not logged; `None` means stay silent (the
    /// event is folded into the next line).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.period => {
                self.folded += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.folded))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_counting_the_silent_ones() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut l = LogLimit::new(Duration::from_secs(1));
        // (time, verdict)
        let rows = [
            (0, Some(0)),
            (1, None),
            (500, None),
            (999, None),
            (1000, Some(3)),
            (1001, None),
            (5000, Some(1)),
            (6000, Some(0)),
        ];
        for (at, want) in rows {
            assert_eq!(l.admit(ms(at)), want, "at {at} ms");
        }
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(Duration::from_secs(10));
        // 100 000 events over 30 s: three lines (0, 10, 20 s), every event accounted for.
        let mut lines = 0;
        let mut accounted = 0;
        for i in 0..100_000u64 {
            if let Some(folded) = l.admit(t0 + Duration::from_micros(i * 300)) {
                lines += 1;
                accounted += folded + 1;
            }
        }
        assert_eq!(lines, 3);
        assert_eq!(accounted + l.folded, 100_000);
    }
}
