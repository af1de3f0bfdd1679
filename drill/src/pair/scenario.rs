//! The failures the pair drill injects, and how each trial is judged.
//!
//! Every trial: the client keeps one connection to the guest through the trial; the failure
//! comes at a random (seeded) moment after an acknowledgement; the observer's samples of the
//! trial window give "never two running"; the scenario's own verdicts follow. A step that
//! cannot be carried out (a daemon that never answers, a VM that never comes back) ends the
//! trial with the verdict `trial_completed` failed and the error as its detail.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use super::config::{DISK_BYTES, DOMAIN};
use super::hosts::{describe_pid, qemu_alive, qemu_pids_under};
use super::observe::{self, RunState, Tick};
use super::report::{ProtectionFigures, TrialReport};
use super::{checks_in, console_since, counters_in, PairDrill};
use crate::client::{analyse, Client, ClientLog, Moments, STALL_LIMIT};
use crate::net::Host;
use remus_agent::api::{DaemonStatus, Request, Response};

/// A failure scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// SIGKILL the primary's daemon (and its QEMU) and cut its uplink: the backup must
    /// take over from a committed checkpoint, the client must not notice lost state.
    KillPrimary,
    /// SIGKILL the backup's daemon: the primary keeps serving (output released after
    /// detection); the restarted backup is re-protected with a dirty-region resync.
    KillBackup,
    /// Cut the backup's uplink entirely (its daemon lives on, its connections stay open and
    /// silent): the primary declares it lost by its heartbeats, ends protection without
    /// waiting out the ACK timeout, renews its lease exclusive and serves on; the isolated
    /// backup cannot win the lease and never runs the VM. Healed, it returns as backup.
    IsolateBackup,
    /// Cut pri and bak from each other (both still reach the witness and the client) for a
    /// while, then heal: never two VMs; exactly one afterwards; the client kept.
    Partition,
    /// Cut the primary's uplink entirely: it must stop releasing output when its lease
    /// lapses, and the backup activates only after winning the lease.
    IsolatePrimary,
    /// Planned switchover: no lost reply, no broken connection, the VM on the other node.
    Switchover,
    /// Kill the backup's daemon while it is activating (held in `activated`), restart it:
    /// it must not resume the checkpoint a second time.
    RestartMidFailover,
    /// Test activation on the backup: the primary's protection never stops.
    TestActivate,
    /// Both hosts fail, one after the other: the primary (the backup takes over and the
    /// guest moves on), then the new primary. The old primary's daemon restarts alone:
    /// `start` there must be refused on the witness's record of the newer copy. Then the
    /// other daemon restarts, both with the VM stopped; `start` must refuse the node whose
    /// copy is older, naming the other (from the heartbeats), and start the guest from
    /// the newer copy with nothing the client saw lost.
    DoubleFailure,
}

impl Scenario {
    /// The CLI spelling.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::KillPrimary => "kill-primary",
            Scenario::KillBackup => "kill-backup",
            Scenario::IsolateBackup => "isolate-backup",
            Scenario::Partition => "partition",
            Scenario::IsolatePrimary => "isolate-primary",
            Scenario::Switchover => "switchover",
            Scenario::RestartMidFailover => "restart-mid-failover",
            Scenario::TestActivate => "test-activate",
            Scenario::DoubleFailure => "double-failure",
        }
    }

    /// Whether the next trial can run on the same pair (false when the trial leaves no VM
    /// running anywhere on purpose).
    pub fn reuses_pair(&self) -> bool {
        !matches!(self, Scenario::RestartMidFailover)
    }
}

/// Roles in which a node has not (yet) started a VM of its own after a failure.
fn pre_activation(role: Option<&str>) -> bool {
    matches!(
        role,
        Some("backup" | "fencing" | "fenced" | "activating" | "stopped")
    )
}

/// Client replies that arrived after `t`.
fn replies_after(log: &ClientLog, t: Instant) -> usize {
    log.replies.iter().filter(|r| r.at >= t).count()
}

fn failovers_of(s: Option<&DaemonStatus>) -> Vec<remus_agent::api::FailoverRecord> {
    s.and_then(|s| s.domains.first())
        .map(|d| d.failovers.clone())
        .unwrap_or_default()
}

/// (milliseconds the domain ran unprotected on that node, whether a window is open now).
fn unprotected_of(s: Option<&DaemonStatus>) -> (u64, bool) {
    s.and_then(|s| s.domains.first()).map_or((0, false), |d| {
        (
            d.counters.unprotected_ms,
            d.unprotected.last().is_some_and(|w| w.to_ms.is_none()),
        )
    })
}

/// Whether the primary stayed protected between two observations of
/// [`unprotected_of`]: no window open at either, and no time added in between (a window
/// that opened and closed again in between added some).
fn steady_state_stayed_protected(start: (u64, bool), end: (u64, bool)) -> bool {
    !start.1 && !end.1 && end.0 == start.0
}

fn resyncs_of(s: Option<&DaemonStatus>) -> Vec<remus_agent::api::ResyncRecord> {
    s.and_then(|s| s.domains.first())
        .map(|d| d.resyncs.clone())
        .unwrap_or_default()
}

impl PairDrill {
    /// Runs one trial of `scenario` and judges it.
    pub async fn trial(&mut self, scenario: Scenario, trial: u32) -> TrialReport {
        let mut t = TrialReport {
            scenario: Some(scenario),
            trial,
            primary_before: Some(self.primary),
            ..TrialReport::default()
        };
        let from = self.observer().len();
        let r = match scenario {
            Scenario::KillPrimary => self.kill_primary(&mut t, false).await,
            Scenario::IsolatePrimary => self.kill_primary(&mut t, true).await,
            Scenario::KillBackup => self.kill_backup(&mut t, false).await,
            Scenario::IsolateBackup => self.kill_backup(&mut t, true).await,
            Scenario::Partition => self.partition(&mut t).await,
            Scenario::Switchover => self.switchover(&mut t).await,
            Scenario::RestartMidFailover => self.restart_mid_failover(&mut t).await,
            Scenario::TestActivate => self.test_activate(&mut t).await,
            Scenario::DoubleFailure => self.double_failure(&mut t).await,
        };
        let ticks = self.observer().ticks_from(from);
        t.samples = ticks.len();
        let (both, unknown) = observe::two_running(&ticks);
        t.two_running_samples = both;
        t.unknown_samples = unknown;
        t.two_releasing_samples = observe::two_releasing(&ticks);
        t.last_samples = ticks.iter().rev().take(10).rev().cloned().collect();
        if scenario != Scenario::TestActivate {
            // The rule is "never two VMs releasing output": a taken-over primary may run on,
            // silent (its output waits for ACKs that stopped), until the witness tells it
            // the lease is gone. Two *running* is reported, not judged.
            t.verdict(
                "never_two_releasing",
                t.two_releasing_samples == 0 && !ticks.is_empty(),
                format!(
                    "{} of {} samples had both nodes able to release output alone (a node unknown counts as able); {both} had both running or unknown ({unknown} with a node unknown)",
                    t.two_releasing_samples,
                    ticks.len(),
                ),
            );
        }
        match r {
            Ok(()) => t.verdict("trial_completed", true, "every step ran"),
            Err(e) => {
                t.verdict("trial_completed", false, format!("{e:#}"));
                t.notes.push(self.logs_text());
            }
        }
        t.conclude();
        t
    }

    /// Nothing in the steady state before the failure may have left the guest running on
    /// `p` without acknowledged checkpoints: such a window is lost time the scenario did
    /// not cause. `start` is `p`'s (total ms, window open) when the trial began; returns
    /// the same now.
    fn judge_steady_state(&self, t: &mut TrialReport, p: Host, start: (u64, bool)) -> (u64, bool) {
        let now = self.observer().with(|l| unprotected_of(l.latest(p)));
        t.verdict(
            "no_unexpected_unprotected_window",
            steady_state_stayed_protected(start, now),
            format!(
                "{p} unprotected (ms in all, window open) when the trial started {start:?}, at the failure {now:?}"
            ),
        );
        now
    }

    /// After a takeover from checkpoint `resumed`: the old primary `p` (which may have run
    /// on, silent, until it heard the lease was taken) never had a checkpoint acknowledged
    /// beyond the one the survivor resumed, so nothing it released is missing there.
    fn judge_old_primary_silent(&self, t: &mut TrialReport, p: Host, since: Instant, resumed: u64) {
        let acked = self.observer().with(|l| {
            l.ticks
                .iter()
                .filter(|x| x.at >= since)
                .filter_map(|x| x.of(p).last_acked)
                .max()
        });
        t.verdict(
            "old_primary_released_only_acknowledged",
            acked.is_none_or(|a| a <= resumed),
            format!(
                "{p} reported checkpoint {acked:?} acknowledged after the failure; the survivor resumed checkpoint {resumed}"
            ),
        );
    }

    /// Waits until `h` is seen running the VM (after `since`); returns the sample's time.
    async fn wait_running(&self, h: Host, since: Instant, timeout: Duration) -> Option<Instant> {
        let found = |l: &observe::ObsLog| {
            l.ticks
                .iter()
                .find(|t| t.at >= since && t.of(h).run_state() == RunState::Running)
                .map(|t| t.at)
        };
        if self
            .observer()
            .wait_for(timeout, |l| found(l).is_some())
            .await
        {
            self.observer().with(found)
        } else {
            None
        }
    }

    /// The moment after which the new VM on `h` may have produced output: the last sample
    /// after `since` in which `h` was still in a pre-activation role.
    fn activation_moment(&self, h: Host, since: Instant) -> Instant {
        self.observer().with(|l| {
            l.ticks
                .iter()
                .filter(|t| t.at >= since)
                .take_while(|t| t.of(h).run_state() != RunState::Running)
                .filter(|t| pre_activation(t.of(h).role.as_deref()))
                .map(|t| t.at)
                .last()
                .unwrap_or(since)
        })
    }

    /// After a failover onto `h` at `activation`: waits for the guest's check lines and the
    /// client's replies, then judges disk vs memory, resumption and the client.
    async fn judge_takeover(
        &self,
        t: &mut TrialReport,
        h: Host,
        mut client: Client,
        mark: &str,
        m: Moments,
    ) {
        let console = self.files(h).console();
        let _ = crate::guest::wait_for(
            &console,
            Duration::from_secs(30),
            "two check lines",
            |text| checks_in(&console_since(text, mark)).len() >= 2,
        )
        .await;
        let max_before = client
            .log()
            .replies
            .iter()
            .filter(|r| r.at < m.activation)
            .map(|r| r.value)
            .max()
            .unwrap_or(0);
        let _ = client
            .wait_for(STALL_LIMIT + Duration::from_secs(5), |l| {
                replies_after(l, m.activation) >= 5
            })
            .await;
        let _ = crate::guest::wait_for(
            &console,
            Duration::from_secs(10),
            "counter past the client's",
            |text| {
                counters_in(&console_since(text, mark))
                    .iter()
                    .any(|&v| v > max_before)
            },
        )
        .await;
        let log = client.stop().await;
        let text = console_since(&self.console(h), mark);
        let after = counters_in(&text);
        let checks = checks_in(&text);
        let ok_checks = checks.iter().filter(|c| c.starts_with("ok ")).count();
        t.checks_after = Some((checks.len(), ok_checks));
        t.verdict(
            "disk_agrees_with_memory",
            !checks.is_empty() && ok_checks == checks.len(),
            format!(
                "{ok_checks} of {} check lines after the takeover said ok",
                checks.len()
            ),
        );
        t.verdict(
            "resumed_not_rebooted",
            !text.contains("remus-guest: start") && !after.is_empty(),
            format!(
                "console after the takeover: {} counter lines, first {:?}, boot banner {}",
                after.len(),
                after.first(),
                text.contains("remus-guest: start")
            ),
        );
        let c = analyse(&log, &m, &after);
        // From the failure to the first reply the new VM could have sent (a reply the old
        // primary released just before it died may still arrive after the failure).
        t.failure_to_first_reply_ms = log
            .replies
            .iter()
            .find(|r| r.at >= m.activation)
            .map(|r| r.at.duration_since(m.killed).as_millis() as u64);
        t.verdict(
            "clients_kept",
            c.lost_replies == 0
                && c.broken_connections == 0
                && c.values_increasing
                && c.replies_before_failover > 0
                && c.replies_after_failover > 0,
            format!(
                "lost {}, broken {}, increasing {}, replies before {} / after {}",
                c.lost_replies,
                c.broken_connections,
                c.values_increasing,
                c.replies_before_failover,
                c.replies_after_failover
            ),
        );
        t.client = Some(c);
    }

    /// Puts a host back after a failover (uplink, daemon), waits until the survivor protects
    /// the VM to it again, and records the resync and the time it took.
    async fn rejoin(&mut self, t: &mut TrialReport, dead: Host) -> Result<()> {
        let survivor = dead.other();
        self.topology().restore_uplink(dead)?;
        let resyncs_before = self
            .observer()
            .with(|l| resyncs_of(l.latest(survivor)).len());
        if !self.node_mut_running(dead) {
            self.start_daemon(dead, None).await?;
        }
        let n = self.options().checkpoints.min(5);
        let took = self
            .wait_protected(survivor, n, Duration::from_secs(90))
            .await?;
        t.reprotect_ms = Some(took.as_millis() as u64);
        let resyncs = self.observer().with(|l| resyncs_of(l.latest(survivor)));
        t.resync = resyncs
            .get(resyncs_before..)
            .and_then(|r| r.last().cloned());
        let role = self
            .observer()
            .with(|l| l.ticks.last().and_then(|t| t.of(dead).role.clone()));
        t.verdict(
            "rejoined_as_backup",
            role.as_deref() == Some("backup"),
            format!("{dead}'s role after rejoining: {role:?}; {survivor} protects again ({n} acknowledged checkpoints in {} ms)", took.as_millis()),
        );
        self.primary = survivor;
        t.primary_after = Some(survivor);
        Ok(())
    }

    fn node_mut_running(&mut self, h: Host) -> bool {
        self.nodes[h as usize].daemon_running()
    }

    /// Kill-primary, or (with `isolate`) isolate-primary.
    async fn kill_primary(&mut self, t: &mut TrialReport, isolate: bool) -> Result<()> {
        let p = self.primary;
        let b = p.other();
        let client = self.start_client().await?;
        let protected_at = Instant::now();
        let unprotected_start = self.observer().with(|l| unprotected_of(l.latest(p)));
        let (acked, edge) = self.wait_ack_edge(p).await?;
        let delay = self.random_delay();
        tokio::time::sleep_until((edge + delay).into()).await;
        let committed_before = self
            .observer()
            .with(|l| l.latest(b).and_then(|s| s.domains.first()?.committed_epoch));
        let old_vm = self
            .observer()
            .with(|l| l.latest(p).and_then(|s| s.domains.first()?.vm));
        t.protection = self.observer().with(|l| {
            let d = l.latest(p)?.domains.first()?;
            let sum = &d.protection.as_ref()?.summary;
            Some(ProtectionFigures {
                checkpoints: d.counters.checkpoints,
                pause_p50_us: sum.pause.p50_us,
                pause_p99_us: sum.pause.p99_us,
                output_held_p50_us: sum.output_commit_delay.p50_us,
                ack_latency_p50_us: sum.ack_latency.p50_us,
            })
        });
        let mark = self.console(b);
        let failovers_before = self.observer().with(|l| failovers_of(l.latest(b)).len());
        // Both daemons count the replication traffic as proof of life: the backup its
        // checkpoints, the primary its ACKs (each at least every ACK timeout while protected).
        let heard = self.observer().with(|l| {
            let of = |h| l.latest(h).and_then(|s| s.replication_heard_ms_ago);
            (of(p), of(b))
        });
        t.verdict(
            "replication_counts_as_proof_of_life",
            matches!(heard, (Some(x), Some(y)) if x < 2000 && y < 2000),
            format!(
                "replication last heard as proof of life before the failure: {p} {:?} ms ago, {b} {:?} ms ago",
                heard.0, heard.1
            ),
        );
        self.judge_steady_state(t, p, unprotected_start);
        let survivor_unprotected = self.observer().with(|l| unprotected_of(l.latest(b)).0);
        let killed_at = Instant::now();
        self.topology().cut_uplink(p)?;
        if !isolate {
            self.kill_daemon(p)?;
        }
        if self.options().kill_etcd_leader_with_primary {
            let leader = self.etcd_leader()?;
            self.kill_etcd_member(leader)?;
            t.verdict(
                "etcd_leader_killed_with_the_primary",
                true,
                format!(
                    "etcd member m{leader} (the leader) killed {} ms after the primary",
                    killed_at.elapsed().as_millis()
                ),
            );
        }
        t.injected_after_ack_ms = Some(killed_at.duration_since(edge).as_millis() as u64);
        t.acked_before = Some(acked);
        t.committed_before = committed_before;
        if !isolate {
            let left = qemu_pids_under(&self.files(p).run_dir);
            let old_alive = old_vm.is_some_and(|v| qemu_alive(v.pid));
            let old_now = old_vm.map(|v| describe_pid(v.pid));
            t.verdict(
                "old_primary_gone",
                left.is_empty() && !old_alive,
                format!(
                    "after SIGKILL of {p}'s daemon group: QEMU pids of {p} alive {left:?}, its VM pid {:?} a live QEMU {old_alive} (that pid now: {old_now:?})",
                    old_vm.map(|v| v.pid)
                ),
            );
        }
        let Some(running_at) = self
            .wait_running(b, killed_at, Duration::from_secs(45))
            .await
        else {
            bail!(
                "{b} did not run the VM within 45 s of the failure; last samples: {}",
                self.last_samples_text()
            );
        };
        t.failure_to_running_ms = Some(running_at.duration_since(killed_at).as_millis() as u64);
        let activation = self.activation_moment(b, killed_at);
        if isolate {
            // The isolated primary must have stopped releasing output (or its VM) before
            // the backup's VM was first seen running.
            let ticks = self.observer().ticks_from(0);
            let after: Vec<&Tick> = ticks.iter().filter(|x| x.at >= killed_at).collect();
            let started = after
                .iter()
                .position(|x| x.of(b).run_state() == RunState::Running);
            let releasing_after_start =
                started.is_some_and(|s| after.iter().skip(s).any(|x| x.of(p).releasing()));
            let last_release = after
                .iter()
                .take(started.unwrap_or(after.len()))
                .rposition(|x| x.of(p).releasing());
            let since_cut = |i: usize| after[i].at.duration_since(killed_at).as_millis();
            t.verdict(
                "isolated_primary_stopped_releasing_first",
                started.is_some() && !releasing_after_start,
                format!(
                    "{p} last seen releasing output {}; {b}'s VM first seen running {} ms after the cut; {p} seen releasing after that: {releasing_after_start}",
                    last_release.map_or_else(
                        || "never after the cut".to_string(),
                        |i| format!("{} ms after the cut", since_cut(i))
                    ),
                    started.map_or(0, since_cut),
                ),
            );
        }
        let failovers = self.observer().with(|l| failovers_of(l.latest(b)));
        let f = failovers
            .get(failovers_before..)
            .and_then(|f| f.last().cloned());
        t.verdict(
            "failover_recorded",
            f.is_some(),
            format!(
                "{b} recorded {} new failover(s)",
                failovers.len().saturating_sub(failovers_before)
            ),
        );
        if let Some(f) = &f {
            self.judge_old_primary_silent(t, p, killed_at, f.from_epoch);
            let committed_ok =
                f.from_epoch >= acked && committed_before.is_none_or(|c| f.from_epoch >= c);
            t.verdict(
                "activated_from_committed_checkpoint",
                committed_ok,
                format!(
                    "resumed checkpoint {}; the primary had {acked} acknowledged and the backup {committed_before:?} committed before the failure",
                    f.from_epoch
                ),
            );
            if isolate {
                t.verdict(
                    "won_the_lease",
                    f.fence_proof == "lease",
                    format!("fence proof {:?}", f.fence_proof),
                );
            }
        }
        t.failover = f;
        self.judge_takeover(
            t,
            b,
            client,
            &mark,
            Moments {
                protected: protected_at,
                killed: killed_at,
                activation,
            },
        )
        .await;
        if isolate {
            // Back on the network, the old primary must give the VM up, not run a second.
            self.topology().restore_uplink(p)?;
            let settled = self
                .observer()
                .wait_for(Duration::from_secs(15), |l| {
                    l.ticks.last().is_some_and(|x| {
                        x.of(p).reachable && x.of(p).run_state() == RunState::NotRunning
                    })
                })
                .await;
            let role = self
                .observer()
                .with(|l| l.ticks.last().and_then(|x| x.of(p).role.clone()));
            t.verdict(
                "old_primary_gave_up_the_vm",
                settled,
                format!(
                    "{p} after its uplink came back: role {role:?}, VM running {}",
                    !settled
                ),
            );
            // It must give the VM up for good and rejoin as the backup by itself: it hears
            // the survivor run the VM, and the witness refuses it the lease.
            let rejoined = self
                .observer()
                .wait_for(Duration::from_secs(30), |l| {
                    l.ticks.last().is_some_and(|x| {
                        x.of(p).role.as_deref() == Some("backup")
                            && x.of(p).vm_pid.is_none()
                            && x.of(b).last_acked.is_some()
                    })
                })
                .await;
            let after = self.observer().with(|l| {
                l.ticks
                    .last()
                    .map(|x| (x.of(p).role.clone(), x.of(p).vm_pid))
            });
            t.verdict(
                "old_primary_rejoined_by_itself",
                rejoined,
                format!(
                    "{p} within 30 s of the uplink's return: (role, VM pid) {after:?}; {b} protecting to it: {rejoined}"
                ),
            );
            if !rejoined {
                // Restart its daemon so that the rest of the trials have a pair.
                self.kill_daemon(p)?;
            }
        }
        self.rejoin(t, p).await?;
        // The time the survivor ran the guest without a backup: from its activation until
        // the returning node acknowledged its first checkpoint.
        t.unprotected_after_failure_ms = self
            .observer()
            .with(|l| unprotected_of(l.latest(b)).0)
            .checked_sub(survivor_unprotected);
        Ok(())
    }

    /// The backup's loss: its daemon killed, or (`isolate`) its host cut off the network.
    async fn kill_backup(&mut self, t: &mut TrialReport, isolate: bool) -> Result<()> {
        let p = self.primary;
        let b = p.other();
        let mut client = self.start_client().await?;
        let protected_at = Instant::now();
        let unprotected_start = self.observer().with(|l| unprotected_of(l.latest(p)));
        let (acked, edge) = self.wait_ack_edge(p).await?;
        let delay = self.random_delay();
        tokio::time::sleep_until((edge + delay).into()).await;
        let unprotected_at_failure = self.judge_steady_state(t, p, unprotected_start);
        let killed_at = Instant::now();
        if isolate {
            self.topology().cut_uplink(b)?;
        } else {
            self.kill_daemon(b)?;
        }
        t.injected_after_ack_ms = Some(killed_at.duration_since(edge).as_millis() as u64);
        t.acked_before = Some(acked);
        let kept = client
            .wait_for(Duration::from_secs(20), |l| {
                replies_after(l, killed_at) >= 10
            })
            .await;
        let log = client.log();
        let first = log.replies.iter().find(|r| r.at >= killed_at);
        t.failure_to_first_reply_ms =
            first.map(|r| r.at.duration_since(killed_at).as_millis() as u64);
        t.verdict(
            "primary_kept_answering",
            kept,
            format!(
                "{} replies within 20 s of the backup's death, first after {:?} ms",
                replies_after(&log, killed_at),
                t.failure_to_first_reply_ms
            ),
        );
        let left_primary = self
            .observer()
            .wait_for(Duration::from_secs(10), |l| {
                l.ticks.iter().rev().take(1).any(|x| {
                    x.of(p).role.as_deref() == Some("standalone")
                        && x.of(p).output_held == Some(false)
                })
            })
            .await;
        t.verdict(
            "runs_unprotected_with_output_released",
            left_primary,
            format!("{p} seen standalone with output released: {left_primary}"),
        );
        let resyncs_before = self.observer().with(|l| resyncs_of(l.latest(p)).len());
        let start = Instant::now();
        if isolate {
            // Isolated, the backup could not win the lease: it never ran the VM.
            let ran = self.observer().with(|l| {
                l.ticks
                    .iter()
                    .filter(|x| x.at >= killed_at)
                    .any(|x| x.of(b).run_state() != RunState::NotRunning)
            });
            t.verdict(
                "isolated_backup_never_ran",
                !ran,
                format!("{b} seen with a VM after its isolation: {ran}"),
            );
            self.topology().restore_uplink(b)?;
        } else {
            self.start_daemon(b, None).await?;
        }
        let n = self.options().checkpoints.min(5);
        self.wait_protected(p, n, Duration::from_secs(90)).await?;
        t.reprotect_ms = Some(start.elapsed().as_millis() as u64);
        // The time the primary ran the guest without a backup: from its backup's death
        // until the returning backup acknowledged its first checkpoint.
        t.unprotected_after_failure_ms = self
            .observer()
            .with(|l| unprotected_of(l.latest(p)).0)
            .checked_sub(unprotected_at_failure.0);
        let resyncs = self.observer().with(|l| resyncs_of(l.latest(p)));
        let r = resyncs
            .get(resyncs_before..)
            .and_then(|r| r.last().cloned());
        t.verdict(
            "dirty_resync",
            r.as_ref()
                .is_some_and(|r| r.mode == "dirty" && r.bytes_copied < DISK_BYTES / 4),
            match &r {
                Some(r) => format!(
                    "{} resync: {} regions, {} bytes copied of a {DISK_BYTES}-byte disk",
                    r.mode, r.regions, r.bytes_copied
                ),
                None => format!("{p} recorded no new resync"),
            },
        );
        t.resync = r;
        t.verdict(
            "acks_flowing_again",
            true,
            format!("{p} protected again: {n} checkpoints acknowledged after the restart"),
        );
        let log = client.stop().await;
        let far = Instant::now() + Duration::from_secs(3600);
        let c = analyse(
            &log,
            &Moments {
                protected: protected_at,
                killed: killed_at,
                activation: far,
            },
            &[],
        );
        t.verdict(
            "clients_kept",
            c.broken_connections == 0 && c.values_increasing && replies_after(&log, killed_at) > 0,
            format!(
                "broken {}, increasing {}, {} replies after the kill",
                c.broken_connections,
                c.values_increasing,
                replies_after(&log, killed_at)
            ),
        );
        t.client = Some(c);
        t.primary_after = Some(p);
        Ok(())
    }

    async fn partition(&mut self, t: &mut TrialReport) -> Result<()> {
        let p = self.primary;
        let b = p.other();
        let mut client = self.start_client().await?;
        let protected_at = Instant::now();
        let (acked, edge) = self.wait_ack_edge(p).await?;
        let delay = self.random_delay();
        tokio::time::sleep_until((edge + delay).into()).await;
        let mark = self.console(b);
        let failovers_before = self.observer().with(|l| failovers_of(l.latest(b)).len());
        let cut_at = Instant::now();
        self.topology().partition_hosts()?;
        t.injected_after_ack_ms = Some(cut_at.duration_since(edge).as_millis() as u64);
        t.acked_before = Some(acked);
        tokio::time::sleep(self.options().partition_hold).await;
        self.topology().heal()?;
        let healed_at = Instant::now();
        // Settle: exactly one node runs the VM and protects it to the other.
        let settled = self
            .observer()
            .wait_for(Duration::from_secs(60), |l| {
                l.ticks.last().and_then(Tick::sole_runner).is_some_and(|r| {
                    l.ticks.last().is_some_and(|x| {
                        x.of(r).role.as_deref() == Some("primary")
                            && x.of(r.other()).role.as_deref() == Some("backup")
                    })
                })
            })
            .await;
        let runner = self
            .observer()
            .with(|l| l.ticks.last().and_then(Tick::sole_runner));
        t.verdict(
            "exactly_one_running_after",
            runner.is_some(),
            format!(
                "after healing: VM on {runner:?}; pair settled (primary + backup) within 60 s: {settled}; last {}",
                self.last_samples_text()
            ),
        );
        let runner = runner.unwrap_or(p);
        let failovers = self.observer().with(|l| failovers_of(l.latest(b)));
        t.failover = failovers
            .get(failovers_before..)
            .and_then(|f| f.last().cloned());
        if let (Some(f), true) = (&t.failover, runner == b) {
            let from = f.from_epoch;
            self.judge_old_primary_silent(t, p, cut_at, from);
        }
        let activation = if runner == b {
            self.activation_moment(b, cut_at)
        } else {
            Instant::now() + Duration::from_secs(3600)
        };
        let _ = client
            .wait_for(STALL_LIMIT + Duration::from_secs(5), |l| {
                replies_after(l, healed_at) >= 5
            })
            .await;
        let log = client.stop().await;
        let after = if runner == b {
            counters_in(&console_since(&self.console(b), &mark))
        } else {
            Vec::new()
        };
        let c = analyse(
            &log,
            &Moments {
                protected: protected_at,
                killed: cut_at,
                activation,
            },
            &after,
        );
        t.failure_to_first_reply_ms = c.kill_to_first_reply_ms;
        t.verdict(
            "clients_kept",
            c.lost_replies == 0
                && c.broken_connections == 0
                && c.values_increasing
                && replies_after(&log, healed_at) > 0,
            format!(
                "lost {}, broken {}, increasing {}, {} replies after healing",
                c.lost_replies,
                c.broken_connections,
                c.values_increasing,
                replies_after(&log, healed_at)
            ),
        );
        t.client = Some(c);
        if !settled {
            // The non-runner did not come back as backup by itself: restart its daemon.
            let other = runner.other();
            t.notes.push(format!(
                "the pair did not settle within 60 s of healing; {other}'s daemon was restarted"
            ));
            self.kill_daemon(other)?;
            self.start_daemon(other, None).await?;
        }
        let n = self.options().checkpoints.min(5);
        let took = self
            .wait_protected(runner, n, Duration::from_secs(90))
            .await?;
        t.reprotect_ms = Some(took.as_millis() as u64);
        self.primary = runner;
        t.primary_after = Some(runner);
        Ok(())
    }

    async fn switchover(&mut self, t: &mut TrialReport) -> Result<()> {
        let p = self.primary;
        let b = p.other();
        let client = self.start_client().await?;
        let protected_at = Instant::now();
        let mark = self.console(b);
        let asked = Instant::now();
        let r = self
            .request(
                p,
                &Request::Switchover {
                    domain: DOMAIN.into(),
                },
                Duration::from_secs(120),
            )
            .await?;
        let took = asked.elapsed();
        t.verdict(
            "switchover_done",
            matches!(r, Response::Done { .. }),
            format!("{r:?} after {} ms", took.as_millis()),
        );
        let running = self.wait_running(b, asked, Duration::from_secs(30)).await;
        t.failure_to_running_ms = running.map(|r| r.duration_since(asked).as_millis() as u64);
        self.judge_takeover(
            t,
            b,
            client,
            &mark,
            Moments {
                protected: protected_at,
                killed: asked,
                activation: asked,
            },
        )
        .await;
        // On a switchover the two resumption checks are about the old VM's continuation.
        let n = self.options().checkpoints.min(5);
        let prot = self.wait_protected(b, n, Duration::from_secs(120)).await;
        let (vm_on, p_role) = self.observer().with(|l| {
            let last = l.ticks.last();
            (
                last.and_then(Tick::sole_runner),
                last.and_then(|x| x.of(p).role.clone()),
            )
        });
        t.verdict(
            "vm_now_on_the_other_node",
            vm_on == Some(b),
            format!("VM on {vm_on:?}"),
        );
        t.verdict(
            "old_primary_became_backup",
            p_role.as_deref() == Some("backup") && prot.is_ok(),
            format!(
                "{p}'s role {p_role:?}; {b} protects it: {}",
                prot.as_ref().map_or_else(
                    |e| format!("no ({e})"),
                    |d| format!("yes, in {} ms", d.as_millis())
                )
            ),
        );
        self.primary = b;
        t.primary_after = Some(b);
        Ok(())
    }

    async fn restart_mid_failover(&mut self, t: &mut TrialReport) -> Result<()> {
        let p = self.primary;
        let b = p.other();
        // The backup again, now held right before `cont` when it activates.
        self.kill_daemon(b)?;
        self.start_daemon(b, Some("activated:3000")).await?;
        let n = self.options().checkpoints.min(5);
        self.wait_protected(p, n, Duration::from_secs(90)).await?;
        let (acked, edge) = self.wait_ack_edge(p).await?;
        let delay = self.random_delay();
        tokio::time::sleep_until((edge + delay).into()).await;
        let killed_at = Instant::now();
        self.topology().cut_uplink(p)?;
        self.kill_daemon(p)?;
        t.injected_after_ack_ms = Some(killed_at.duration_since(edge).as_millis() as u64);
        t.acked_before = Some(acked);
        // The role file is persisted before the daemon acts, so it shows `activated` the
        // moment the hold starts; what the daemon's status said meanwhile is reported.
        let role_file = self.files(b).role_file();
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut held = false;
        while Instant::now() < deadline {
            if observe::persisted_role(&role_file).as_deref() == Some("activated") {
                held = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status_roles: Vec<String> = self.observer().with(|l| {
            let mut seen: Vec<String> = Vec::new();
            for x in l.ticks.iter().filter(|x| x.at >= killed_at) {
                if let Some(r) = &x.of(b).role {
                    if seen.last() != Some(r) {
                        seen.push(r.clone());
                    }
                }
            }
            seen
        });
        t.notes.push(format!(
            "{b}'s roles in its status between the failure and the hold: {status_roles:?}"
        ));
        if !held {
            bail!(
                "{b}'s role file never showed activated (REMUSD_TEST_HOLD); it shows {:?}; last samples: {}",
                observe::persisted_role(&role_file),
                self.last_samples_text()
            );
        }
        let qemu = qemu_pids_under(&self.files(b).run_dir);
        self.kill_daemon(b)?;
        t.notes.push(format!(
            "{b} killed while held in activated (QEMU pids then: {qemu:?})"
        ));
        let restart_from = self.observer().len();
        self.start_daemon(b, None).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let ticks = self.observer().ticks_from(restart_from);
        let seen: Vec<&observe::NodeObs> = ticks.iter().map(|x| x.of(b)).collect();
        let vm_ever = seen
            .iter()
            .any(|o| o.vm_pid.is_some() || !o.qemu_pids.is_empty());
        let qemu_now = qemu_pids_under(&self.files(b).run_dir);
        let last_role = seen.iter().rev().find_map(|o| o.role.clone());
        t.verdict(
            "no_second_activation",
            !vm_ever && qemu_now.is_empty(),
            format!(
                "after the restart ({} samples): VM reported or QEMU seen {vm_ever}; QEMU pids now {qemu_now:?}",
                seen.len()
            ),
        );
        t.verdict(
            "role_stopped",
            last_role.as_deref() == Some("stopped"),
            format!("{b}'s role after the restart: {last_role:?}"),
        );
        let resumed = std::fs::read_to_string(&role_file)
            .map_err(|e| e.to_string())
            .and_then(|s| observe::resuming_count(&s));
        t.verdict(
            "resumed_once",
            resumed == Ok(1),
            format!(
                "`resuming` transitions in {}: {resumed:?}",
                role_file.display()
            ),
        );
        t.primary_after = None;
        Ok(())
    }

    async fn double_failure(&mut self, t: &mut TrialReport) -> Result<()> {
        let p = self.primary;
        let b = p.other();
        let mut client = self.start_client().await?;
        let (acked, edge) = self.wait_ack_edge(p).await?;
        let delay = self.random_delay();
        tokio::time::sleep_until((edge + delay).into()).await;
        // First failure: the primary. The backup takes over and the guest moves on, so
        // the old primary's copy falls behind.
        let first = Instant::now();
        self.topology().cut_uplink(p)?;
        self.kill_daemon(p)?;
        t.injected_after_ack_ms = Some(first.duration_since(edge).as_millis() as u64);
        t.acked_before = Some(acked);
        if self
            .wait_running(b, first, Duration::from_secs(60))
            .await
            .is_none()
        {
            bail!(
                "{b} did not take over after {p} failed; last samples: {}",
                self.last_samples_text()
            );
        }
        if !client
            .wait_for(Duration::from_secs(30), |l| replies_after(l, first) >= 10)
            .await
        {
            bail!("the guest did not answer on {b} after the takeover");
        }
        // Second failure: the new primary, before the old one is back.
        self.kill_daemon(b)?;
        let log = client.stop().await;
        let last_seen = log.max_value_before(Instant::now());
        let seen_before_first = log.max_value_before(first);
        t.notes.push(format!(
            "client: last value before the first failure {seen_before_first}, last seen \
             {last_seen} (on {b} after its takeover)"
        ));
        let start = Request::Start {
            domain: DOMAIN.into(),
            older_copy: false,
        };
        // The old primary's host comes back first, alone: its peer is down, but the
        // witness recorded bak's newer copy when bak took over.
        self.topology().restore_uplink(p)?;
        self.start_daemon(p, None).await?;
        let alone = self.request(p, &start, Duration::from_secs(120)).await?;
        let ok = matches!(&alone, Response::Error { message }
            if message.contains("witness recorded a newer copy") && message.contains(b.name()));
        t.verdict(
            "witness_refuses_the_older_copy_while_the_peer_is_down",
            ok,
            format!("start on {p} with {b} down: {alone:?}"),
        );
        // Then the other host; nothing starts the guest by itself.
        self.start_daemon(b, None).await?;
        let stopped = self
            .observer()
            .wait_for(Duration::from_secs(30), |l| {
                l.ticks.last().is_some_and(|x| {
                    Host::BOTH
                        .iter()
                        .all(|&h| x.of(h).role.as_deref() == Some("stopped"))
                })
            })
            .await;
        t.verdict(
            "neither_starts_by_itself",
            stopped,
            format!(
                "both restarted daemons stopped: {stopped}; last samples: {}",
                self.last_samples_text()
            ),
        );
        // Each node's view of the other travels in heartbeats, a beat or two behind the
        // statuses just read: let a heartbeat timeout pass so neither still holds the
        // other's view from before its restart (`start` refuses while the peer's role is
        // not `stopped`, which is right, but not what this scenario is about).
        tokio::time::sleep(self.options().heartbeat_timeout * 2).await;
        let stamps = {
            let sp = self.status(p).await?;
            let sb = self.status(b).await?;
            (
                sp.domains.first().map(|d| d.copy),
                sb.domains.first().map(|d| d.copy),
            )
        };
        t.notes
            .push(format!("copies: {p} {:?}, {b} {:?}", stamps.0, stamps.1));
        t.verdict(
            "newer_copy_advertised",
            matches!(stamps, (Some(x), Some(y)) if y > x),
            format!("{p}: {:?}; {b}: {:?}", stamps.0, stamps.1),
        );
        // The operator starts the domain on the old primary again: refused, naming b.
        let refused = self.request(p, &start, Duration::from_secs(120)).await?;
        let ok = matches!(&refused, Response::Error { message }
            if message.contains(&format!("{} holds a newer copy", b.name())));
        t.verdict(
            "older_copy_refused",
            ok,
            format!("start on {p}: {refused:?}"),
        );
        let qemu_on_p = qemu_pids_under(&self.files(p).run_dir);
        t.verdict(
            "no_vm_on_the_refused_node",
            qemu_on_p.is_empty(),
            format!("QEMU pids on {p} after the refusal: {qemu_on_p:?}"),
        );
        // Then on the node that ran the guest last.
        let mark = self.console(b);
        match self.request(b, &start, Duration::from_secs(120)).await? {
            Response::Done { message } => t.notes.push(format!("start on {b}: {message}")),
            other => bail!("start on {b} (the newer copy) failed: {other:?}"),
        }
        let booted = crate::guest::wait_for(
            &self.files(b).console(),
            Duration::from_secs(120),
            "guest boot after the double failure",
            |text| console_since(text, &mark).contains("counter="),
        )
        .await;
        booted?;
        self.primary = b;
        let client = self.start_client().await?;
        let after = client.stop().await;
        let first_after = after.replies.first().map(|r| r.value).unwrap_or(0);
        t.verdict(
            "nothing_seen_was_lost",
            first_after > last_seen,
            format!(
                "first value after the restart {first_after}, last seen before {last_seen} \
                 (the old primary's copy ended near {seen_before_first})"
            ),
        );
        let n = self.options().checkpoints.min(5);
        self.wait_protected(b, n, Duration::from_secs(240)).await?;
        t.primary_after = Some(b);
        Ok(())
    }

    async fn test_activate(&mut self, t: &mut TrialReport) -> Result<()> {
        let p = self.primary;
        let b = p.other();
        let mut client = self.start_client().await?;
        let from = self.observer().len();
        let asked = Instant::now();
        let r = self
            .request(
                b,
                &Request::TestActivate {
                    domain: DOMAIN.into(),
                },
                Duration::from_secs(180),
            )
            .await?;
        t.verdict(
            "test_activate_done",
            matches!(r, Response::Done { .. }),
            format!("{r:?} after {} ms", asked.elapsed().as_millis()),
        );
        // Keep watching a little after the test VM is gone.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ticks = self.observer().ticks_from(from);
        let kept = observe::protection_kept(&ticks, p, 1);
        t.verdict(
            "protection_never_stopped",
            kept.is_ok(),
            kept.map_or_else(
                |e| e,
                |()| {
                    format!(
                        "{p} primary with growing acknowledgements in all {} samples",
                        ticks.len()
                    )
                },
            ),
        );
        let b_roles: std::collections::BTreeSet<String> =
            ticks.iter().filter_map(|x| x.of(b).role.clone()).collect();
        t.verdict(
            "backup_stayed_backup",
            b_roles.len() == 1 && b_roles.contains("backup"),
            format!("{b}'s roles seen: {b_roles:?}"),
        );
        let _ = client
            .wait_for(Duration::from_secs(5), |l| replies_after(l, asked) >= 5)
            .await;
        let log = client.stop().await;
        let c = analyse(
            &log,
            &Moments {
                protected: asked,
                killed: asked,
                activation: Instant::now() + Duration::from_secs(3600),
            },
            &[],
        );
        t.verdict(
            "clients_kept",
            c.broken_connections == 0 && c.values_increasing && replies_after(&log, asked) > 0,
            format!(
                "broken {}, increasing {}, {} replies after the request",
                c.broken_connections,
                c.values_increasing,
                replies_after(&log, asked)
            ),
        );
        t.client = Some(c);
        t.primary_after = Some(p);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn a_window_in_the_steady_state_fails_the_trial() {
        use super::steady_state_stayed_protected as judge;
        // (ms unprotected and window open: at the trial's start, at the failure; verdict)
        let rows = [
            ((1583, false), (1583, false), true), // the start's window, closed before
            ((1583, false), (1583, true), false), // protection dropped and is still down
            ((1583, false), (4120, false), false), // dropped and came back in between
            ((1583, true), (1900, false), false), // the trial began unprotected
            ((0, false), (0, false), true),
        ];
        for (start, end, ok) in rows {
            assert_eq!(judge(start, end), ok, "{start:?} -> {end:?}");
        }
    }

    #[test]
    fn cli_names_round_trip() {
        for s in Scenario::value_variants() {
            let v = s.to_possible_value().unwrap();
            assert_eq!(v.get_name(), s.name());
            assert_eq!(Scenario::from_str(s.name(), false).unwrap(), *s);
        }
        assert!(Scenario::from_str("explode", false).is_err());
        assert!(!Scenario::RestartMidFailover.reuses_pair());
        assert!(Scenario::KillPrimary.reuses_pair());
    }

    #[test]
    fn pre_activation_roles() {
        for (role, want) in [
            (Some("backup"), true),
            (Some("fencing"), true),
            (Some("activating"), true),
            (Some("activated"), false),
            (Some("standalone"), false),
            (None, false),
        ] {
            assert_eq!(pre_activation(role), want, "{role:?}");
        }
    }
}
