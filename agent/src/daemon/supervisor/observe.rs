//! Observing: what the supervisor knows, turned into a [`Situation`] for [`decide`].

use super::*;

impl Supervisor {
    // ---------------------------------------------------------------- observing

    pub(super) fn role(&self) -> Role {
        self.roles.current().clone()
    }

    /// Everything [`decide`] looks at, as observed now.
    pub(super) fn situation<'r>(&self, role: &'r Role) -> Situation<'r> {
        let (vm, acks, acks_fresh) = match &self.runtime {
            Runtime::Vm(v) => (
                if v.paused { Vm::Paused } else { Vm::Running },
                v.acks,
                v.protection.is_some()
                    && self.last_ack_at.elapsed() < self.shared.config.heartbeat.timeout,
            ),
            _ => (Vm::Absent, Acks::Stopped, false),
        };
        Situation {
            role,
            peer: Peer::from(&*self.shared.liveness.borrow()),
            claim: self.peer_claim(),
            acks,
            acks_fresh,
            lease: self.lease(),
            fencing: self.fencing(),
            fence: self.fence.progress(),
            failover: match self.d.failover {
                Failover::Automatic => HaFailover::Automatic,
                Failover::Manual => HaFailover::Manual,
            },
            has_committed_checkpoint: self.committed().is_some(),
            replication_ended_here: self.session_ended_here
                && matches!(&self.runtime, Runtime::Replica(r) if r.session.is_none()),
            vm,
        }
    }

    /// What the peer's heartbeats say of this domain.
    pub(super) fn peer_claim(&self) -> PeerClaim {
        self.peer_advert().map_or(PeerClaim::Unknown, |a| a.claim())
    }

    /// The peer's advert of this domain (`None`: never heard, it does not advertise the
    /// domain, or in a form this node cannot read: logged at debug, the rules then see
    /// [`PeerClaim::Unknown`]).
    pub(super) fn peer_advert(&self) -> Option<DomainAdvert> {
        let view = self.shared.peer_view.borrow();
        let dv = view
            .as_ref()?
            .domains
            .iter()
            .find(|x| x.domain == self.d.name)?;
        match DomainAdvert::decode(&dv.payload) {
            Ok(a) => Some(a),
            Err(e) => {
                debug!(domain = %self.d.name, error = %e, "unreadable peer advert");
                None
            }
        }
    }

    /// The lease as [`decide`] must see it: held only with [`LEASE_MARGIN`] to spare, so
    /// that no decision to release output or resume the VM is taken on a lease about to
    /// expire (the peer may win it right after).
    pub(super) fn lease(&self) -> Lease {
        match &self.lease {
            None => Lease::NotHeld,
            Some(k) => match &*k.state().borrow() {
                LeaseState::Held {
                    until, preemptible, ..
                } if tokio::time::Instant::now() + LEASE_MARGIN < *until => {
                    if *preemptible {
                        Lease::HeldPreemptible
                    } else {
                        Lease::Held
                    }
                }
                LeaseState::Denied { .. } => Lease::Denied,
                _ => Lease::NotHeld,
            },
        }
    }

    /// Tells the lease keeper how to hold the lease now ([`lease_preemptible`] decides):
    /// preemptible by the backup while it gates this node's output, exclusive otherwise.
    pub(super) fn set_lease_mode(&self, s: &Situation<'_>) {
        let Some(k) = &self.lease else {
            return;
        };
        let preemptible =
            lease_preemptible(s.role, s.acks, s.fencing, self.d.netbuf.output_buffering);
        k.set_mode(if preemptible {
            LeaseMode::PreemptibleBy(self.shared.config.peer.name.clone())
        } else {
            LeaseMode::Exclusive
        });
    }

    pub(super) fn fencing(&self) -> HaFencing {
        match self.d.fencing {
            FencingPolicy::Command { .. } => HaFencing::Command,
            FencingPolicy::Witness => HaFencing::Witness,
            FencingPolicy::None => HaFencing::None,
        }
    }

    pub(super) fn committed(&self) -> Option<u64> {
        match &self.runtime {
            Runtime::Replica(r) => r.committed,
            _ => None,
        }
    }

    pub(super) async fn observe_vm(&mut self) {
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        if let Ok(Some(status)) = v.vm.qemu.try_wait() {
            let tail = v.vm.qemu.stderr_tail();
            error!(domain = %self.d.name, %status, stderr = %tail, "QEMU exited");
            if let Some(p) = v.protection.take() {
                p.task.abort();
            }
            self.runtime = Runtime::Idle;
            self.stop_lease(false).await;
            self.alarm(&format!(
                "QEMU exited ({status}); the VM is down on this node"
            ));
            // The role still says the VM runs here: `decide` records the stop.
            return;
        }
        if self.last_query.elapsed() >= QUERY_PERIOD {
            self.last_query = Instant::now();
            let control = v.vm.control.clone();
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(1), control.query_status()).await
            {
                v.running = s == remus_qemu::RunState::running
                    // The epoch loop's own brief stops are not a stopped VM.
                    || (v.protection.is_some() && !v.paused);
            }
        }
    }

    /// Follows the first acknowledgement of a protection session into the role.
    pub(super) fn observe_protection(&mut self) {
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        let Some(p) = &v.protection else {
            return;
        };
        let st = p.handle.status.borrow().clone();
        self.observe_verify(&st);
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        let Some(p) = &v.protection else {
            return;
        };
        if let Some(k) = st.last_acked {
            let new = match self.seen_acked {
                Some(s) if k >= s => k - s,
                _ => 1,
            };
            self.counters.checkpoints += new;
            if new > 0 {
                self.last_ack_at = Instant::now();
            }
            self.seen_acked = Some(k);
        }
        // A session's resync counts once the backup acknowledged its first checkpoint
        // (attempts that failed before are retried and would only repeat it).
        let syncs: Vec<_> = if st.last_acked.is_none() {
            Vec::new()
        } else {
            p.disk_syncs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect()
        };
        for s in syncs {
            self.resyncs.push(ResyncRecord {
                disk: s.disk,
                mode: match s.mode {
                    SyncMode::Full => "full".into(),
                    SyncMode::Dirty => "dirty".into(),
                },
                regions: s.report.regions,
                bytes_copied: s.report.bytes_copied,
                bytes_zero: s.report.bytes_zero,
            });
        }
        if let (Some(k), Role::Resyncing { .. }) = (st.last_acked, self.roles.current()) {
            if self.apply(
                Event::ResyncDone { epoch: k },
                "the backup acknowledged the first checkpoint",
            ) {
                self.peer_in_lineage = true;
                self.protect_failures = 0;
                self.clear_alarms("running unprotected");
            }
        }
    }

    pub(super) fn observe_replica(&mut self) {
        let Runtime::Replica(r) = &mut self.runtime else {
            return;
        };
        if let Some(s) = &r.session {
            if let Some(st) = s.status.borrow().as_ref() {
                let st = st.borrow();
                if let ReplicaState::Committed(k) = st.replica {
                    if r.committed != Some(k) {
                        self.counters.checkpoints += 1;
                    }
                    r.committed = Some(k);
                } else {
                    // A new session's first checkpoint is being written over the replica:
                    // nothing is activatable until it commits.
                    r.committed = None;
                }
            }
        }
    }

    /// The peer's last advertised stamp on its copy of this domain (`None`: never heard,
    /// or it does not advertise the domain).
    pub(super) fn peer_stamp(&self) -> Option<CopyStamp> {
        self.peer_advert().map(|a| a.copy)
    }
}
