//! Watching both daemons: a sampler that asks each node's daemon for its status every
//! [`SAMPLE_PERIOD`] and, whenever a daemon cannot answer, looks at `/proc` for a QEMU of that
//! node; and the pure functions that turn the samples into verdicts.
//!
//! The one rule of the observer: a node whose daemon does not answer is **unknown**, not
//! stopped. Only `/proc` showing no QEMU process of that node (nothing alive whose command
//! line names the node's run directory) proves it runs no VM. So "two VMs running at once"
//! is counted whenever both nodes were running *or unknown* in one sample, and a daemon that
//! hangs cannot hide a split brain.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::control::Control;
use super::hosts::qemu_pids_under;
use crate::net::Host;
use remus_agent::api::{DaemonStatus, DomainStatus};

/// Time between two samples.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(50);
/// How long a status call may take before the daemon counts as unreachable for the sample.
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(400);

/// What one sample saw of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeObs {
    /// The daemon answered.
    pub reachable: bool,
    /// Its role for the domain ("primary", "backup", …).
    pub role: Option<String>,
    /// `vm.running` as the daemon reported it (`None`: no VM, or unreachable).
    pub vm_running: Option<bool>,
    /// `vm.output_held`.
    pub output_held: Option<bool>,
    /// `vm.pid`.
    pub vm_pid: Option<u32>,
    /// The primary's last acknowledged checkpoint.
    pub last_acked: Option<u64>,
    /// The backup's last committed checkpoint.
    pub committed: Option<u64>,
    /// QEMU processes of this node alive in `/proc` (looked at when the daemon did not
    /// answer, or reported a VM).
    pub qemu_pids: Vec<u32>,
}

/// Whether a node ran a VM in one sample, as far as the drill can prove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// The daemon reports its VM running.
    Running,
    /// The daemon reports no running VM, or it did not answer and `/proc` holds no QEMU of
    /// the node.
    NotRunning,
    /// The daemon did not answer and a QEMU of the node is alive: it may be running.
    Unknown,
}

impl NodeObs {
    /// What this observation proves.
    pub fn run_state(&self) -> RunState {
        if self.reachable {
            if self.vm_running == Some(true) {
                RunState::Running
            } else {
                RunState::NotRunning
            }
        } else if self.qemu_pids.is_empty() {
            RunState::NotRunning
        } else {
            RunState::Unknown
        }
    }

    /// The node may release guest output on its own: its VM runs with output not held in
    /// a role that releases without a backup's ACKs (standalone, resyncing, activated), or
    /// the daemon did not answer while a QEMU of the node lives (it may). A *primary*'s
    /// output leaves only on its backup's ACKs, and a backup stops acknowledging before it
    /// fences: a primary beside an activated peer is silent. That it released nothing its
    /// peer does not hold is the scenario's own verdict (acknowledged ≤ resumed checkpoint).
    pub fn releasing(&self) -> bool {
        match self.run_state() {
            RunState::Unknown => true,
            RunState::NotRunning => false,
            RunState::Running => {
                self.output_held != Some(true) && self.role.as_deref() != Some("primary")
            }
        }
    }

    fn from_status(s: &DomainStatus) -> Self {
        Self {
            reachable: true,
            role: Some(s.role.name().to_string()),
            vm_running: s.vm.map(|v| v.running),
            output_held: s.vm.map(|v| v.output_held),
            vm_pid: s.vm.map(|v| v.pid),
            last_acked: s.protection.as_ref().and_then(|p| p.last_acked),
            committed: s.committed_epoch,
            qemu_pids: Vec::new(),
        }
    }
}

/// One sample of both nodes.
#[derive(Clone, Debug, Serialize)]
pub struct Tick {
    /// When the sample was taken (its start), for slicing; not serialised.
    #[serde(skip)]
    pub at: Instant,
    /// Host "pri".
    pub pri: NodeObs,
    /// Host "bak".
    pub bak: NodeObs,
}

impl Tick {
    /// The observation of `host`.
    pub fn of(&self, host: Host) -> &NodeObs {
        match host {
            Host::Pri => &self.pri,
            Host::Bak => &self.bak,
        }
    }

    /// Both nodes were running or unknown.
    pub fn two_running(&self) -> bool {
        self.pri.run_state() != RunState::NotRunning && self.bak.run_state() != RunState::NotRunning
    }

    /// The one node proven running while the other is proven not running.
    pub fn sole_runner(&self) -> Option<Host> {
        match (self.pri.run_state(), self.bak.run_state()) {
            (RunState::Running, RunState::NotRunning) => Some(Host::Pri),
            (RunState::NotRunning, RunState::Running) => Some(Host::Bak),
            _ => None,
        }
    }
}

/// What the sampler has seen.
#[derive(Debug, Default)]
pub struct ObsLog {
    /// Every sample, in order.
    pub ticks: Vec<Tick>,
    /// The latest full status of each node that answered ("pri", "bak").
    pub latest: [Option<DaemonStatus>; 2],
}

fn idx(h: Host) -> usize {
    match h {
        Host::Pri => 0,
        Host::Bak => 1,
    }
}

impl ObsLog {
    /// The latest full status of `host`, if it ever answered.
    pub fn latest(&self, host: Host) -> Option<&DaemonStatus> {
        self.latest[idx(host)].as_ref()
    }
}

/// The running sampler; stops when dropped.
pub struct Observer {
    log: Arc<Mutex<ObsLog>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A node the sampler watches.
#[derive(Clone, Debug)]
pub struct Watched {
    /// Its control socket.
    pub control: Control,
    /// Its run directory (the marker of its QEMUs in `/proc`).
    pub run_dir: PathBuf,
}

async fn observe(node: &Watched) -> (NodeObs, Option<DaemonStatus>) {
    match node.control.status(STATUS_TIMEOUT).await {
        Ok(s) => {
            let mut o = s
                .domains
                .first()
                .map(NodeObs::from_status)
                .unwrap_or(NodeObs {
                    reachable: true,
                    ..NodeObs::default()
                });
            if o.vm_pid.is_some() {
                o.qemu_pids = qemu_pids_under(&node.run_dir);
            }
            (o, Some(s))
        }
        Err(_) => (
            NodeObs {
                reachable: false,
                qemu_pids: qemu_pids_under(&node.run_dir),
                ..NodeObs::default()
            },
            None,
        ),
    }
}

impl Observer {
    /// Starts sampling `pri` and `bak`.
    pub fn start(pri: Watched, bak: Watched) -> Self {
        let log = Arc::new(Mutex::new(ObsLog::default()));
        let (stop, mut stop_rx) = watch::channel(false);
        let shared = log.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_PERIOD);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop_rx.wait_for(|s| *s) => return,
                }
                let at = Instant::now();
                let ((p, ps), (b, bs)) = tokio::join!(observe(&pri), observe(&bak));
                let mut l = shared.lock().unwrap_or_else(|e| e.into_inner());
                if ps.is_some() {
                    l.latest[0] = ps;
                }
                if bs.is_some() {
                    l.latest[1] = bs;
                }
                l.ticks.push(Tick { at, pri: p, bak: b });
            }
        });
        Self { log, stop, task }
    }

    /// Runs `f` on the log.
    pub fn with<T>(&self, f: impl FnOnce(&ObsLog) -> T) -> T {
        f(&self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Number of samples so far (a trial's samples are those from its start index on).
    pub fn len(&self) -> usize {
        self.with(|l| l.ticks.len())
    }

    /// Whether no sample was taken yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples from index `from` on.
    pub fn ticks_from(&self, from: usize) -> Vec<Tick> {
        self.with(|l| {
            l.ticks
                .get(from..)
                .map(<[Tick]>::to_vec)
                .unwrap_or_default()
        })
    }

    /// Waits until `pred` holds on the log (checked at every new sample), or `timeout`.
    /// Returns whether it held.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&ObsLog) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.with(&pred) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(SAMPLE_PERIOD / 2).await;
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// Samples in which both nodes ran a VM (or could not be proven not to), and samples in
/// which at least one node was unknown.
pub fn two_running(ticks: &[Tick]) -> (usize, usize) {
    let both = ticks.iter().filter(|t| t.two_running()).count();
    let unknown = ticks
        .iter()
        .filter(|t| {
            t.pri.run_state() == RunState::Unknown || t.bak.run_state() == RunState::Unknown
        })
        .count();
    (both, unknown)
}

/// Samples in which both nodes released output at once (both running with output not held).
pub fn two_releasing(ticks: &[Tick]) -> usize {
    ticks
        .iter()
        .filter(|t| t.pri.releasing() && t.bak.releasing())
        .count()
}

/// Whether `host`'s acknowledged checkpoints kept growing over `ticks`: every reachable
/// sample had the role `primary` and a `last_acked`, never going back, and the last is above
/// the first by at least `min_growth`.
pub fn protection_kept(ticks: &[Tick], host: Host, min_growth: u64) -> Result<(), String> {
    let mut first = None;
    let mut prev: Option<u64> = None;
    for (i, t) in ticks.iter().enumerate() {
        let o = t.of(host);
        if !o.reachable {
            return Err(format!("sample {i}: {host}'s daemon did not answer"));
        }
        if o.role.as_deref() != Some("primary") {
            return Err(format!("sample {i}: {host}'s role was {:?}", o.role));
        }
        let Some(a) = o.last_acked else {
            return Err(format!("sample {i}: {host} had no acknowledged checkpoint"));
        };
        if prev.is_some_and(|p| a < p) {
            return Err(format!(
                "sample {i}: last_acked went back from {prev:?} to {a}"
            ));
        }
        first.get_or_insert(a);
        prev = Some(a);
    }
    match (first, prev) {
        (Some(f), Some(l)) if l >= f + min_growth => Ok(()),
        (Some(f), Some(l)) => Err(format!(
            "last_acked grew from {f} to {l} only (wanted +{min_growth})"
        )),
        _ => Err("no samples".into()),
    }
}

/// The first sample (index into `ticks`) at which `pred` holds for `host`.
pub fn first_where(ticks: &[Tick], host: Host, pred: impl Fn(&NodeObs) -> bool) -> Option<usize> {
    ticks.iter().position(|t| pred(t.of(host)))
}

/// The number of `resuming` transitions in a role file's history (the role file is
/// `remus_ha::role`'s JSON; read as a value so a newer file with more fields still counts).
///
/// # Errors
/// The text is not a role file with a history.
pub fn resuming_count(role_file: &str) -> Result<usize, String> {
    let v: serde_json::Value =
        serde_json::from_str(role_file).map_err(|e| format!("role file is not JSON: {e}"))?;
    let h = v
        .get("history")
        .and_then(|h| h.as_array())
        .ok_or("role file has no history array")?;
    Ok(h.iter()
        .filter(|t| t.pointer("/event/event").and_then(|e| e.as_str()) == Some("resuming"))
        .count())
}

/// The role a role file holds now (its `role.role` tag), if the file is readable.
pub fn persisted_role(role_file: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(role_file).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.pointer("/role/role")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(spec: &str) -> NodeObs {
        // "R" running primary, "P" paused primary, "A" running activated, "S" running
        // standalone, "-" no VM, "?" unreachable with a QEMU alive, "x" unreachable and no
        // QEMU; "h" suffix: output held.
        let held = spec.ends_with('h');
        let role = match &spec[..1] {
            "A" => "activated",
            "S" => "standalone",
            _ => "primary",
        };
        match &spec[..1] {
            "R" | "P" | "A" | "S" => NodeObs {
                reachable: true,
                role: Some(role.into()),
                vm_running: Some(!spec.starts_with('P')),
                output_held: Some(held),
                vm_pid: Some(10),
                ..NodeObs::default()
            },
            "-" => NodeObs {
                reachable: true,
                role: Some("backup".into()),
                ..NodeObs::default()
            },
            "?" => NodeObs {
                reachable: false,
                qemu_pids: vec![10],
                ..NodeObs::default()
            },
            _ => NodeObs::default(),
        }
    }

    fn tick(p: &str, b: &str) -> Tick {
        Tick {
            at: Instant::now(),
            pri: obs(p),
            bak: obs(b),
        }
    }

    #[test]
    fn two_running_counts_unknown_as_running() {
        // (case, samples as (pri, bak), both-running samples, unknown samples, releasing both)
        type Case = (
            &'static str,
            &'static [(&'static str, &'static str)],
            usize,
            usize,
            usize,
        );
        let cases: &[Case] = &[
            (
                "clean failover",
                &[("R", "-"), ("x", "-"), ("x", "R")],
                0,
                0,
                0,
            ),
            ("both running", &[("R", "-"), ("S", "A")], 1, 0, 1),
            (
                "old primary running beside the activated survivor: silent",
                &[("R", "-"), ("R", "A")],
                1,
                0,
                0,
            ),
            (
                "standalone old primary beside the activated survivor",
                &[("S", "A")],
                1,
                0,
                1,
            ),
            ("unreachable with a QEMU alive", &[("?", "R")], 1, 1, 0),
            (
                "unreachable with a QEMU alive beside the survivor: may release",
                &[("?", "A")],
                1,
                1,
                1,
            ),
            ("held output does not release", &[("Sh", "A")], 1, 0, 0),
            ("unreachable, QEMU proven gone", &[("x", "R")], 0, 0, 0),
            ("paused old primary is not running", &[("P", "R")], 0, 0, 0),
            (
                "held output still counts as running",
                &[("Rh", "R")],
                1,
                0,
                0,
            ),
            ("both unknown", &[("?", "?")], 1, 1, 1),
        ];
        for (name, samples, both, unknown, releasing) in cases {
            let ticks: Vec<Tick> = samples.iter().map(|(p, b)| tick(p, b)).collect();
            assert_eq!(two_running(&ticks), (*both, *unknown), "{name}");
            assert_eq!(two_releasing(&ticks), *releasing, "{name}");
        }
        assert_eq!(tick("R", "x").sole_runner(), Some(Host::Pri));
        assert_eq!(tick("-", "R").sole_runner(), Some(Host::Bak));
        assert_eq!(tick("?", "R").sole_runner(), None);
        assert_eq!(tick("R", "R").sole_runner(), None);
    }

    #[test]
    fn protection_kept_table() {
        let t = |acked: Option<u64>, role: &str, reachable: bool| Tick {
            at: Instant::now(),
            pri: NodeObs {
                reachable,
                role: Some(role.into()),
                last_acked: acked,
                ..NodeObs::default()
            },
            bak: NodeObs::default(),
        };
        type Case = (&'static str, Vec<Tick>, u64, bool);
        let cases: Vec<Case> = vec![
            (
                "growing",
                vec![t(Some(3), "primary", true), t(Some(9), "primary", true)],
                5,
                true,
            ),
            (
                "too little",
                vec![t(Some(3), "primary", true), t(Some(4), "primary", true)],
                5,
                false,
            ),
            (
                "going back",
                vec![
                    t(Some(5), "primary", true),
                    t(Some(4), "primary", true),
                    t(Some(20), "primary", true),
                ],
                1,
                false,
            ),
            (
                "dropped to standalone",
                vec![t(Some(3), "primary", true), t(Some(9), "standalone", true)],
                1,
                false,
            ),
            (
                "daemon silent",
                vec![t(Some(3), "primary", true), t(None, "primary", false)],
                0,
                false,
            ),
            ("no samples", vec![], 0, false),
        ];
        for (name, ticks, growth, ok) in cases {
            assert_eq!(
                protection_kept(&ticks, Host::Pri, growth).is_ok(),
                ok,
                "{name}"
            );
        }
    }

    #[test]
    fn resuming_is_counted_in_the_history() {
        let one = r#"{"version":1,"domain":"d","role":{"role":"stopped"},"seq":3,"history":[
            {"seq":1,"at_ms":1,"from":{"role":"fenced","peer":"pri","by":"lease"},"event":{"event":"activation_started","from_epoch":4},"to":{"role":"activating","from_epoch":4},"cause":""},
            {"seq":2,"at_ms":2,"from":{"role":"activating","from_epoch":4},"event":{"event":"resuming"},"to":{"role":"activated","epoch":4},"cause":""},
            {"seq":3,"at_ms":3,"from":{"role":"activated","epoch":4},"event":{"event":"stop"},"to":{"role":"stopped"},"cause":""}]}"#;
        assert_eq!(resuming_count(one), Ok(1));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("role.json");
        assert_eq!(persisted_role(&f), None);
        std::fs::write(&f, one).unwrap();
        assert_eq!(persisted_role(&f).as_deref(), Some("stopped"));
        assert_eq!(resuming_count(r#"{"history":[]}"#), Ok(0));
        assert!(resuming_count("{}").is_err());
        assert!(resuming_count("not json").is_err());
    }
}
