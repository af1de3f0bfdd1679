//! What a pair drill found: per trial, the figures it measured and the verdicts computed
//! from its observations; human-readable and JSON (serde).
//!
//! A verdict is a name, whether it held, and the observation it rests on, so a failed drill
//! says what was seen, not just "failed". A trial passes when every verdict held.

use serde::Serialize;

use super::observe::Tick;
use super::scenario::Scenario;
use crate::client::ClientVerdict;
use crate::net::Host;
use remus_agent::api::{FailoverRecord, ResyncRecord};

/// One verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// What is claimed ("never_two_releasing", "clients_kept", …).
    pub name: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// The observation behind it.
    pub detail: String,
}

impl Verdict {
    /// A verdict from a condition and its evidence.
    pub fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok,
            detail: detail.into(),
        }
    }
}

/// One trial of a scenario.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrialReport {
    /// The scenario.
    pub scenario: Option<Scenario>,
    /// 1-based trial number.
    pub trial: u32,
    /// Every verdict held.
    pub passed: bool,
    /// The verdicts.
    pub verdicts: Vec<Verdict>,
    /// The node that ran the VM when the trial started.
    pub primary_before: Option<Host>,
    /// The node that runs it at the end.
    pub primary_after: Option<Host>,
    /// The failure was injected this long after an acknowledgement (ms).
    pub injected_after_ack_ms: Option<u64>,
    /// The primary's last acknowledged checkpoint seen before the failure.
    pub acked_before: Option<u64>,
    /// The protecting primary's checkpoint figures, read from its daemon just before the
    /// failure.
    pub protection: Option<ProtectionFigures>,
    /// The backup's last committed checkpoint seen before the failure.
    pub committed_before: Option<u64>,
    /// The survivor's record of the failover, when one happened.
    pub failover: Option<FailoverRecord>,
    /// From the failure to the first sample showing the survivor's VM running (ms).
    pub failure_to_running_ms: Option<u64>,
    /// From the failure to the client's first reply after it (ms): the client-visible
    /// recovery.
    pub failure_to_first_reply_ms: Option<u64>,
    /// The resynchronisation that brought a returning node back, when one was seen.
    pub resync: Option<ResyncRecord>,
    /// From the returning node's daemon start to protection flowing again (ms).
    pub reprotect_ms: Option<u64>,
    /// After a failover: how long the survivor ran the guest without a backup
    /// acknowledging its checkpoints (its status's unprotected time).
    pub unprotected_after_failure_ms: Option<u64>,
    /// What the client saw.
    pub client: Option<ClientVerdict>,
    /// Samples of both daemons taken during the trial.
    pub samples: usize,
    /// Samples in which both nodes ran a VM (or one could not be proven not to).
    pub two_running_samples: usize,
    /// Samples in which a node's daemon did not answer and a QEMU of it was alive.
    pub unknown_samples: usize,
    /// Samples in which both VMs released output.
    pub two_releasing_samples: usize,
    /// `check` lines the guest printed after the failover, and how many said `ok`.
    pub checks_after: Option<(usize, usize)>,
    /// Anything else worth reading (what was waited for and not seen, daemon restarts …).
    pub notes: Vec<String>,
    /// The last samples of the trial (for a failed trial's post-mortem).
    pub last_samples: Vec<Tick>,
}

impl TrialReport {
    /// Adds a verdict.
    pub fn verdict(&mut self, name: &'static str, ok: bool, detail: impl Into<String>) {
        self.verdicts.push(Verdict::new(name, ok, detail));
    }

    /// Sets `passed` from the verdicts (a trial without verdicts did not pass).
    pub fn conclude(&mut self) {
        self.passed = !self.verdicts.is_empty() && self.verdicts.iter().all(|v| v.ok);
    }

    /// From the survivor's VM running to the client's first reply (ms): the part of the
    /// client-visible recovery that is the client's own TCP waiting to retransmit.
    pub fn running_to_first_reply(&self) -> Option<u64> {
        Some(
            self.failure_to_first_reply_ms?
                .saturating_sub(self.failure_to_running_ms?),
        )
    }
}

/// A protecting primary's checkpoint figures, as its daemon reports them (over its last
/// epochs; see `remus_engine::metrics::EpochSummary`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProtectionFigures {
    /// Checkpoints acknowledged on this domain since the daemon started.
    pub checkpoints: u64,
    /// VM pause per checkpoint, median and 99th percentile (µs).
    pub pause_p50_us: u64,
    /// See `pause_p50_us`.
    pub pause_p99_us: u64,
    /// How long guest output was held, median (µs).
    pub output_held_p50_us: u64,
    /// Checkpoint sent → ACK, median (µs).
    pub ack_latency_p50_us: u64,
}

/// Every trial of one pair drill.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairReport {
    /// Every trial passed.
    pub passed: bool,
    /// The scenario.
    pub scenario: Option<Scenario>,
    /// The seed the failure moments came from.
    pub seed: u64,
    /// The daemons ran with output buffering off (UNSAFE: lost state is expected).
    pub unsafe_no_output_buffering: bool,
    /// The impairment of both hosts' uplinks, if any (as `--impair` printed it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impairment: Option<String>,
    /// The trials.
    pub trials: Vec<TrialReport>,
    /// Where the daemons' and the witness's logs are (kept when the drill fails).
    pub work_dir: String,
    /// Summary figures over the trials (min / median / max), by name.
    pub summary: Vec<(String, Figure)>,
}

/// Reads one figure of a trial, if the trial measured it.
type Getter = dyn Fn(&TrialReport) -> Option<u64>;

/// Min / median / max of one figure over the trials that measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Figure {
    /// Trials that measured it.
    pub n: usize,
    /// Smallest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// Largest.
    pub max: u64,
}

impl Figure {
    /// The figure over `values`, or `None` if there are none.
    pub fn of(values: impl IntoIterator<Item = u64>) -> Option<Self> {
        let mut v: Vec<u64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(Self {
            n: v.len(),
            min: v[0],
            p50: v[v.len() / 2],
            max: v[v.len() - 1],
        })
    }
}

impl PairReport {
    /// Fills `passed` and `summary` from the trials.
    pub fn conclude(&mut self) {
        self.passed = !self.trials.is_empty() && self.trials.iter().all(|t| t.passed);
        let fig =
            |f: &dyn Fn(&TrialReport) -> Option<u64>| Figure::of(self.trials.iter().filter_map(f));
        let mut s = Vec::new();
        let rows: [(&str, &Getter); 12] = [
            ("pause_p50_us", &|t| t.protection.map(|p| p.pause_p50_us)),
            ("pause_p99_us", &|t| t.protection.map(|p| p.pause_p99_us)),
            ("detection_ms", &|t| {
                t.failover.as_ref().map(|f| f.detection_ms)
            }),
            ("fencing_ms", &|t| t.failover.as_ref().map(|f| f.fencing_ms)),
            ("activation_ms", &|t| {
                t.failover.as_ref().map(|f| f.activation_ms)
            }),
            ("failure_to_running_ms", &|t| t.failure_to_running_ms),
            ("failure_to_first_reply_ms", &|t| {
                t.failure_to_first_reply_ms
            }),
            ("running_to_first_reply_ms", &|t| t.running_to_first_reply()),
            ("client_tcp_retransmits", &|t| {
                t.client.as_ref().map(|c| u64::from(c.tcp_retransmits))
            }),
            ("reprotect_ms", &|t| t.reprotect_ms),
            ("unprotected_after_failure_ms", &|t| {
                t.unprotected_after_failure_ms
            }),
            ("client_lost_replies", &|t| {
                t.client.as_ref().map(|c| c.lost_replies)
            }),
        ];
        for (name, f) in rows {
            if let Some(x) = fig(f) {
                s.push((name.to_string(), x));
            }
        }
        self.summary = s;
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let scenario = self.scenario.as_ref().map_or("?", Scenario::name);
        let _ = writeln!(
            s,
            "remus pair drill ({scenario}, {} trial(s), seed {}): {}",
            self.trials.len(),
            self.seed,
            if self.passed { "PASSED" } else { "FAILED" }
        );
        if let Some(i) = &self.impairment {
            let _ = writeln!(s, "  both uplinks impaired: {i} (each way)");
        }
        if self.unsafe_no_output_buffering {
            let _ = writeln!(
                s,
                "  UNSAFE: output buffering was off; clients may have seen state the failover lost"
            );
        }
        for t in &self.trials {
            let _ = writeln!(
                s,
                "  trial {}: {} (VM on {} -> {})",
                t.trial,
                if t.passed { "passed" } else { "FAILED" },
                t.primary_before.map_or("?", Host::name),
                t.primary_after.map_or("?", Host::name)
            );
            let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |m| format!("{m} ms"));
            if let Some(a) = t.injected_after_ack_ms {
                let _ = writeln!(
                    s,
                    "    failure injected {a} ms after an ACK (acked {:?}, committed {:?})",
                    t.acked_before, t.committed_before
                );
            }
            if let Some(p) = &t.protection {
                let ms = |us: u64| us as f64 / 1000.0;
                let _ = writeln!(
                    s,
                    "    protected: {} checkpoints, pause p50/p99 {:.1}/{:.1} ms, output held p50 {:.1} ms, ACK p50 {:.1} ms",
                    p.checkpoints,
                    ms(p.pause_p50_us),
                    ms(p.pause_p99_us),
                    ms(p.output_held_p50_us),
                    ms(p.ack_latency_p50_us)
                );
            }
            if let Some(f) = &t.failover {
                let _ = writeln!(
                    s,
                    "    failover: detection {} ms, fencing {} ms ({}), activation {} ms, from checkpoint {}",
                    f.detection_ms, f.fencing_ms, f.fence_proof, f.activation_ms, f.from_epoch
                );
            }
            if t.failure_to_running_ms.is_some() || t.failure_to_first_reply_ms.is_some() {
                let waited = match (t.running_to_first_reply(), &t.client) {
                    (Some(w), Some(c)) => format!(
                        " ({w} ms after the VM ran: the client's TCP retransmitting, {} retransmission(s))",
                        c.tcp_retransmits
                    ),
                    _ => String::new(),
                };
                let _ = writeln!(
                    s,
                    "    failure -> VM running {}, -> first client reply {}{waited}",
                    ms(t.failure_to_running_ms),
                    ms(t.failure_to_first_reply_ms)
                );
            }
            if let Some(r) = &t.resync {
                let _ = writeln!(
                    s,
                    "    resync {} of disk {}: {} regions, {} bytes copied, {} zero",
                    r.mode, r.disk, r.regions, r.bytes_copied, r.bytes_zero
                );
            }
            if t.reprotect_ms.is_some() {
                let _ = writeln!(s, "    re-protected in {}", ms(t.reprotect_ms));
            }
            if t.unprotected_after_failure_ms.is_some() {
                let _ = writeln!(
                    s,
                    "    survivor ran unprotected {} (from the failure's effect to the returning node's first acknowledged checkpoint)",
                    ms(t.unprotected_after_failure_ms)
                );
            }
            if let Some(c) = &t.client {
                let _ = writeln!(
                    s,
                    "    client: {} replies ({} before, {} after), lost {}, broken {}, increasing {}, stall {}",
                    c.replies,
                    c.replies_before_failover,
                    c.replies_after_failover,
                    c.lost_replies,
                    c.broken_connections,
                    c.values_increasing,
                    ms(c.client_stall_ms)
                );
                for b in &c.breaks {
                    let _ = writeln!(s, "      - {b}");
                }
            }
            let _ = writeln!(
                s,
                "    samples {}: two running {}, unknown {}, two releasing {}",
                t.samples, t.two_running_samples, t.unknown_samples, t.two_releasing_samples
            );
            for v in &t.verdicts {
                let _ = writeln!(
                    s,
                    "    [{}] {}: {}",
                    if v.ok { "ok" } else { "FAILED" },
                    v.name,
                    v.detail
                );
            }
            for n in &t.notes {
                let _ = writeln!(s, "    note: {n}");
            }
        }
        if !self.summary.is_empty() {
            let _ = writeln!(s, "  over the trials (n / min / median / max):");
            for (name, f) in &self.summary {
                let _ = writeln!(
                    s,
                    "    {name:<27} {} / {} / {} / {}",
                    f.n, f.min, f.p50, f.max
                );
            }
        }
        let _ = writeln!(s, "  logs: {}", self.work_dir);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_passes_only_with_every_verdict() {
        type Case = (&'static str, &'static [bool], bool);
        let cases: &[Case] = &[
            ("all held", &[true, true], true),
            ("one failed", &[true, false], false),
            ("no verdicts", &[], false),
        ];
        for (name, vs, want) in cases {
            let mut t = TrialReport::default();
            for &ok in *vs {
                t.verdict("x", ok, "");
            }
            t.conclude();
            assert_eq!(t.passed, *want, "{name}");
        }
    }

    #[test]
    fn summary_and_render() {
        let mut r = PairReport {
            scenario: Some(Scenario::KillPrimary),
            ..PairReport::default()
        };
        for (i, ms) in [300u64, 100, 200].into_iter().enumerate() {
            let mut t = TrialReport {
                trial: i as u32 + 1,
                failure_to_running_ms: Some(ms),
                ..TrialReport::default()
            };
            t.verdict("never_two_releasing", true, "0 of 10 samples");
            t.conclude();
            r.trials.push(t);
        }
        r.conclude();
        assert!(r.passed);
        let f = r
            .summary
            .iter()
            .find(|(n, _)| n == "failure_to_running_ms")
            .unwrap()
            .1;
        assert_eq!((f.n, f.min, f.p50, f.max), (3, 100, 200, 300));
        let text = r.render();
        assert!(
            text.contains("PASSED") && text.contains("[ok] never_two_releasing"),
            "{text}"
        );
        r.trials[1].verdict("clients_kept", false, "broken 1");
        r.trials[1].conclude();
        r.conclude();
        assert!(!r.passed);
        assert!(r.render().contains("[FAILED] clients_kept: broken 1"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenario"], "kill_primary");
        assert_eq!(Figure::of([]), None);
    }
}
