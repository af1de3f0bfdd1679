//! Reporting and teardown: the status snapshot published to the control socket.
//!
//! The snapshot is in the control protocol's own types: the engine's and ha's are converted
//! here, through `crate::api`'s conversions, as they are read.

use super::*;
use crate::api::{ProtectionStatus, ReplicaStatus};

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
        let lease = self.lease.as_ref().map(|k| match &*k.state().borrow() {
            s if s.held_at(tokio::time::Instant::now()) => "held".to_string(),
            LeaseState::Acquiring => "acquiring".into(),
            LeaseState::Denied { holder } => format!("denied by {holder}"),
            _ => "lost".into(),
        });
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
            counters: self.counters,
            copy: self.disk_copy.stamp().into(),
        };
        self.status.send_replace(st);
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
