//! Reporting and teardown: the status snapshot published to the control socket.
//!
//! The snapshot is in the control protocol's own types: the engine's and ha's are converted
//! here, through `crate::api`'s conversions, as they are read.

use super::*;
use crate::api::{ProtectionStatus, ReplicaStatus, UnprotectedWindow, MAX_UNPROTECTED_WINDOWS};

impl Supervisor {
    // ---------------------------------------------------------------- reporting

    pub(super) fn publish(&mut self) {
        let (vm, protection, replica) = match &self.runtime {
            Runtime::Vm(v) => (
                Some(VmStatus {
                    pid: v.vm.qemu.pid(),
                    running: v.running && !v.paused,
                    output_held: v.output_held,
                }),
                v.protection
                    .as_ref()
                    .map(|p| ProtectionStatus::from(&*p.handle.status.borrow())),
                None,
            ),
            Runtime::Replica(r) => (
                None,
                None,
                r.session.as_ref().and_then(|s| {
                    s.status
                        .borrow()
                        .as_ref()
                        .map(|st| ReplicaStatus::from(&*st.borrow()))
                }),
            ),
            Runtime::Idle => (None, None, None),
        };
        let now = tokio::time::Instant::now();
        let left = |until: tokio::time::Instant| {
            format!(
                "{:.1} s left by this node's clock",
                until.saturating_duration_since(now).as_secs_f64()
            )
        };
        let lease = self.lease.as_ref().map(|k| match &*k.state().borrow() {
            s @ LeaseState::Held {
                preemptible: true,
                until,
                ..
            } if s.held_at(now) => format!(
                "held, {} (preemptible by {}: the output waits for its ACKs)",
                left(*until),
                self.shared.config.peer.name
            ),
            s @ LeaseState::Held { until, .. } if s.held_at(now) => {
                format!("held, {}", left(*until))
            }
            LeaseState::Acquiring => "acquiring".into(),
            LeaseState::Denied { holder } => format!("denied by {holder}"),
            _ => "lost".into(),
        });
        self.track_unprotected();
        let mut counters = self.counters;
        counters.unprotected_ms = self.unprotected_ms();
        let st = DomainStatus {
            name: self.d.name.clone(),
            role: (&self.role()).into(),
            vm,
            protection,
            replica,
            committed_epoch: self.committed(),
            lease,
            alarms: self.alarms.iter().cloned().collect(),
            failovers: self.failovers.clone(),
            resyncs: self.resyncs.clone(),
            counters,
            copy: self.disk_copy.stamp().into(),
            unprotected: self.unprotected.clone(),
            verify: self.verify_status(),
        };
        self.status.send_replace(st);
    }

    /// Why the guest runs here unprotected right now, or `None` when it does not run here
    /// or a backup acknowledges its checkpoints (output then waits for the backup, and a
    /// failure loses nothing a client saw).
    fn exposure(&self) -> Option<String> {
        let Runtime::Vm(v) = &self.runtime else {
            return None;
        };
        if !v.running || v.paused {
            return None;
        }
        let role = self.role();
        match &v.protection {
            Some(p) if p.handle.status.borrow().last_acked.is_some() => None,
            Some(_) => Some(format!(
                "{}: first checkpoint not yet acknowledged",
                role.name()
            )),
            None => Some(format!("{}: no protection session", role.name())),
        }
    }

    /// Opens or closes the current unprotected window (called with every publish, so a
    /// window is as precise as the loop's 100 ms tick).
    fn track_unprotected(&mut self) {
        let now = unix_millis();
        let open = self.unprotected.last().is_some_and(|w| w.to_ms.is_none());
        match (self.exposure(), open) {
            (Some(reason), false) => {
                warn!(domain = %self.d.name, %reason, "the guest runs unprotected");
                self.unprotected.push(UnprotectedWindow {
                    from_ms: now,
                    to_ms: None,
                    reason,
                });
                if self.unprotected.len() > MAX_UNPROTECTED_WINDOWS {
                    let old = self.unprotected.remove(0);
                    self.unprotected_dropped_ms += old.to_ms.unwrap_or(now) - old.from_ms;
                }
            }
            (None, true) => {
                if let Some(w) = self.unprotected.last_mut() {
                    w.to_ms = Some(now);
                    info!(domain = %self.d.name, unprotected_ms = now - w.from_ms, reason = %w.reason, "the guest is protected again");
                }
            }
            _ => {}
        }
    }

    /// Every millisecond of every window, the open one up to now.
    fn unprotected_ms(&self) -> u64 {
        let now = unix_millis();
        self.unprotected_dropped_ms
            + self
                .unprotected
                .iter()
                .map(|w| w.to_ms.unwrap_or(now).saturating_sub(w.from_ms))
                .sum::<u64>()
    }

    pub(super) async fn teardown(&mut self) {
        info!(domain = %self.d.name, "stopping");
        if let Some(t) = self.test_run.take() {
            // Dropping the test's future kills its QEMU and removes its namespace and files.
            t.abort();
            let _ = t.await;
        }
        match std::mem::replace(&mut self.runtime, Runtime::Idle) {
            Runtime::Vm(mut v) => {
                if let Some(p) = v.protection.take() {
                    let _ = p.handle.shutdown.send(true);
                    let _ = tokio::time::timeout(Duration::from_secs(5), p.task).await;
                }
                // Output not acknowledged stays unreleased: it dies with the VM.
                let _ = v.vm.qemu.kill_and_wait().await;
            }
            Runtime::Replica(mut r) => {
                if let Some(s) = r.session.take() {
                    s.task.abort();
                }
            }
            Runtime::Idle => {}
        }
        self.stop_lease(false).await;
    }
}
