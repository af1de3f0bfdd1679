//! `remusctl status [--json]`: the running daemon's snapshot, for a person or a script.
//!
//! The human form is [`render`], a pure function of the [`DaemonStatus`] so it is tested
//! without a daemon; `--json` prints the snapshot itself (the same document the control
//! protocol carries), for scripts.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;

use super::daemon_cmd::{block_on, DaemonArgs};
use super::{EXIT_OK, EXIT_PROBLEMS};
use crate::api::{DaemonStatus, DomainStatus, PeerLiveness, Percentiles, Role};
use crate::control::ControlClient;

/// `remusctl status` arguments.
#[derive(Debug, Args)]
pub struct StatusCmd {
    /// Print the snapshot as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl StatusCmd {
    /// Asks the daemon and prints its answer.
    pub fn run(self) -> ExitCode {
        let socket = match self.daemon.socket_path() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("remusctl status: {e}");
                return ExitCode::from(EXIT_PROBLEMS);
            }
        };
        let status = match block_on("status", async {
            ControlClient::connect(&socket).await?.status().await
        }) {
            Ok(s) => s,
            Err(code) => return code,
        };
        if self.json {
            match serde_json::to_string_pretty(&status) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("remusctl status: cannot encode the status: {e}");
                    return ExitCode::from(EXIT_PROBLEMS);
                }
            }
        } else {
            print!("{}", render(&status));
        }
        ExitCode::from(EXIT_OK)
    }
}

/// The human-readable status: a header line for the node and its peer, then a block per
/// domain.
pub fn render(s: &DaemonStatus) -> String {
    let mut out = String::new();
    let peer = match s.peer_liveness {
        PeerLiveness::Starting => "starting (nothing heard yet)".to_string(),
        PeerLiveness::Alive {
            links_up,
            links_total,
        } => format!("alive ({links_up}/{links_total} links)"),
        PeerLiveness::Suspect => "suspect (silent, not yet past the timeout)".to_string(),
        PeerLiveness::Lost { detected_after_ms } => {
            format!("lost (declared after {detected_after_ms} ms of silence)")
        }
    };
    let mut replication = s
        .replication_heard_ms_ago
        .map_or_else(String::new, |ms| format!("; replication heard {ms} ms ago"));
    if let Some(ms) = s.peer_longest_silence_ms {
        let _ = write!(replication, "; longest silence {ms} ms");
    }
    if let Some(ms) = s.heartbeat_longest_gap_ms {
        let _ = write!(replication, " (heartbeat gap {ms} ms)");
    }
    let _ = writeln!(
        out,
        "node {}, peer {}: {}{replication}; up {}",
        s.node,
        s.peer,
        peer,
        uptime(s.uptime_s)
    );
    if let Some(a) = &s.arbiter {
        let what = match a.backend.as_str() {
            "witness" => "remus-witness",
            other => other,
        };
        let _ = writeln!(
            out,
            "lease arbiter: {what} at {}, lease {} ms",
            a.location, a.lease_ms
        );
        for r in &a.requests {
            let n = r.ok + r.denied + r.failed;
            let _ = writeln!(
                out,
                "  {}: {} ok, {} denied, {} failed; latency mean {:.1} ms, max {:.1} ms, last {:.1} ms",
                r.op,
                r.ok,
                r.denied,
                r.failed,
                r.latency_sum_us as f64 / n.max(1) as f64 / 1000.0,
                r.latency_max_us as f64 / 1000.0,
                r.latency_last_us as f64 / 1000.0
            );
        }
    }
    if !s.doors.is_quiet() {
        let d = &s.doors;
        let _ = writeln!(
            out,
            "refused: heartbeats {} bad tag, {} malformed, {} unknown node, {} replayed; \
             replication {} handshakes refused, {} connections shed",
            d.heartbeat_bad_tag,
            d.heartbeat_malformed,
            d.heartbeat_unknown_node,
            d.heartbeat_replayed,
            d.handshakes_refused,
            d.connections_shed
        );
    }
    if s.domains.is_empty() {
        let _ = writeln!(out, "no domains configured");
    }
    for d in &s.domains {
        domain(&mut out, d);
    }
    out
}

fn domain(out: &mut String, d: &DomainStatus) {
    let _ = writeln!(out, "domain {}: {}", d.name, role(&d.role));
    match &d.vm {
        Some(vm) => {
            let _ = writeln!(
                out,
                "  vm: pid {}, {}, output {}",
                vm.pid,
                if vm.running { "running" } else { "paused" },
                if vm.output_held { "held" } else { "released" }
            );
        }
        None => {
            let _ = writeln!(out, "  vm: none");
        }
    }
    if let Some(p) = &d.protection {
        let acked = p
            .last_acked
            .map_or_else(|| "none".to_string(), |e| e.to_string());
        let _ = writeln!(
            out,
            "  protection: {}, last acked epoch {acked}, {} in flight, tracker {}",
            tagged(&p.phase, "phase"),
            p.in_flight,
            p.tracker
        );
        if p.summary.epochs > 0 {
            let _ = writeln!(
                out,
                "  pause {}; ack latency {}; output held {} (last {} epochs)",
                pct(&p.summary.pause),
                pct(&p.summary.ack_latency),
                pct(&p.summary.output_commit_delay),
                p.summary.epochs
            );
        }
    }
    if d.committed_epoch.is_some() || d.replica.is_some() {
        let committed = d
            .committed_epoch
            .map_or_else(|| "none".to_string(), |e| e.to_string());
        let receiver = d.replica.as_ref().map_or_else(String::new, |r| {
            let receiving = r
                .receiving
                .map_or_else(String::new, |e| format!(", receiving {e}"));
            format!("; receiver: {}{receiving}", r.replica)
        });
        let _ = writeln!(out, "  replica: committed epoch {committed}{receiver}");
    }
    if let Some(lease) = &d.lease {
        let _ = writeln!(out, "  lease: {lease}");
    }
    let _ = writeln!(out, "  data copy: {}", d.copy);
    let c = &d.counters;
    let _ = writeln!(
        out,
        "  checkpoints {}, refused {}, protection lost {}, failovers {}",
        c.checkpoints, c.refused, c.protection_lost, c.failovers
    );
    match d.unprotected.last() {
        Some(w) if w.to_ms.is_none() => {
            let _ = writeln!(
                out,
                "  UNPROTECTED: the guest runs without acknowledged checkpoints ({}); {:.1} s in all",
                w.reason,
                c.unprotected_ms as f64 / 1000.0
            );
        }
        Some(w) => {
            let _ = writeln!(
                out,
                "  unprotected {:.1} s in all; last window {:.1} s ({})",
                c.unprotected_ms as f64 / 1000.0,
                w.to_ms.unwrap_or(w.from_ms).saturating_sub(w.from_ms) as f64 / 1000.0,
                w.reason
            );
        }
        None => {}
    }
    if let Some(f) = d.failovers.last() {
        let _ = writeln!(
            out,
            "  last failover: from epoch {}, detection {} ms, fencing {} ms, activation {} ms, \
             proof {}",
            f.from_epoch, f.detection_ms, f.fencing_ms, f.activation_ms, f.fence_proof
        );
    }
    if d.alarms.is_empty() {
        let _ = writeln!(out, "  alarms: none");
    } else {
        let _ = writeln!(out, "  alarms:");
        for a in &d.alarms {
            let _ = writeln!(out, "    ! {a}");
        }
    }
}

/// A role with the details an operator needs.
fn role(r: &Role) -> String {
    match r {
        Role::Primary { peer, since_epoch } => {
            format!("primary (backup {peer}, protected since epoch {since_epoch})")
        }
        Role::Backup { peer, .. } => format!("backup (primary {peer})"),
        Role::Fencing { peer, attempts, .. } => {
            format!("fencing {peer} ({attempts} failed attempts)")
        }
        Role::Fenced { peer, by } => {
            format!("fenced ({peer} proven gone by {})", tagged(by, ""))
        }
        Role::Activating { from_epoch } => {
            format!("activating (from checkpoint {from_epoch})")
        }
        Role::Activated { epoch } => format!("activated (resumed from checkpoint {epoch})"),
        Role::Resyncing { peer } => format!("resyncing (bringing {peer} up to date)"),
        other => other.name().to_string(),
    }
}

/// A serde-tagged enum as words: `{"phase":"awaiting_ack","epoch":7}` → "awaiting ack epoch
/// 7"; a plain string variant (`tag` empty) → its name.
fn tagged<T: serde::Serialize>(value: &T, tag: &str) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s.replace('_', " "),
        Ok(serde_json::Value::Object(map)) => {
            let mut words = map
                .get(tag)
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .replace('_', " ");
            for (k, v) in &map {
                if k != tag {
                    let _ = write!(words, " {} {v}", k.replace('_', " "));
                }
            }
            words
        }
        _ => "?".to_string(),
    }
}

/// "p50 12.3 ms, p99 25.0 ms".
fn pct(p: &Percentiles) -> String {
    format!("p50 {}, p99 {}", micros(p.p50_us), micros(p.p99_us))
}

/// Microseconds as ms (below a second) or s.
fn micros(us: u64) -> String {
    if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn uptime(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {sec}s")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_uptime() {
        let cases = [
            (0, "0.0 ms"),
            (12_345, "12.3 ms"),
            (999_949, "999.9 ms"),
            (1_500_000, "1.50 s"),
        ];
        for (us, text) in cases {
            assert_eq!(micros(us), text, "{us}");
        }
        let cases = [
            (5, "5s"),
            (65, "1m 5s"),
            (3_725, "1h 2m 5s"),
            (90_061, "1d 1h 1m"),
        ];
        for (s, text) in cases {
            assert_eq!(uptime(s), text, "{s}");
        }
    }
}
