//! Replication sessions and background work: the replica's receiving sessions, the end of
//! a protection session, fencing results, and the recovery at start.

use super::*;

impl Supervisor {
    // ---------------------------------------------------------------- restart

    /// Restart: raises the alarms the persisted role calls for and reopens the replica. The
    /// role changes (a VM that died with the previous daemon: `Stop`; never activating
    /// twice) are `decide`'s, taken by the step that follows.
    pub(super) async fn recover(&mut self) {
        let role = self.role();
        info!(domain = %self.d.name, role = role.name(), "recovering from the persisted role");
        match role {
            Role::Stopped => {}
            Role::Standalone | Role::Primary { .. } | Role::Resyncing { .. } => {
                self.alarm(
                    "the VM died with the previous remusd; the peer takes over or must be started",
                );
            }
            Role::Activated { epoch } => {
                self.alarm(&format!(
                    "restarted after resuming checkpoint {epoch}: not activating it again (the guest may have run from it); an operator must decide"
                ));
            }
            Role::Backup { .. }
            | Role::Fencing { .. }
            | Role::Fenced { .. }
            | Role::Activating { .. } => {
                if let Err(e) = self.open_replica() {
                    self.alarm(&format!("cannot open the replica: {e:#}"));
                }
                if matches!(role, Role::Fencing { .. }) {
                    // Resume fencing for the loss that was being handled.
                    self.loss = Some(Loss::now(0, None));
                }
            }
        }
    }

    /// Ends the session being received, if any, and takes the replica back. The receiver
    /// stops between records (a checkpoint being committed completes first); one that does
    /// not stop within 5 s is aborted and the replica reopened from its files (an
    /// interrupted apply is redone there).
    pub(super) async fn end_session(&mut self) {
        let Runtime::Replica(r) = &mut self.runtime else {
            return;
        };
        let Some(mut s) = r.session.take() else {
            return;
        };
        let _ = s.cancel.send(true);
        match tokio::time::timeout(Duration::from_secs(5), &mut s.task).await {
            Ok(Ok((rd, res))) => {
                info!(domain = %self.d.name, result = ?res.map(|_| ()).map_err(|e| e.to_string()), "replication session ended");
                r.committed = rd.committed();
                r.replica = Some(rd);
            }
            other => {
                warn!(domain = %self.d.name, timed_out = other.is_err(), "the receiver did not stop; reopening the replica");
                s.task.abort();
                let _ = s.task.await;
                self.runtime = Runtime::Idle;
                if let Err(e) = self.open_replica() {
                    self.alarm(&format!("cannot reopen the replica: {e:#}"));
                }
            }
        }
    }

    pub(super) fn open_replica(&mut self) -> Result<()> {
        if matches!(self.runtime, Runtime::Replica(_)) {
            return Ok(());
        }
        let rd = ReplicaDomain::open(&self.d, self.paths.clone())?;
        let committed = rd.committed();
        self.runtime = Runtime::Replica(Box::new(ReplicaRuntime {
            files: rd.files(),
            replica: Some(rd),
            session: None,
            committed,
        }));
        Ok(())
    }

    // ---------------------------------------------------------------- inputs

    pub(super) async fn on_session(&mut self, session: BackupSession) {
        let role = self.role();
        match incoming_session(&role) {
            SessionVerdict::BecomeBackup => {
                if !self.apply(
                    Event::BackupStarted {
                        peer: self.shared.config.peer.name.clone(),
                    },
                    "the peer started protecting the domain to this node",
                ) {
                    return;
                }
                self.alarms.clear();
            }
            SessionVerdict::Continue => {}
            SessionVerdict::EndFencing => {
                // The primary is evidently alive: stop fencing it.
                if let FenceRun::Running(t) = std::mem::replace(&mut self.fence, FenceRun::Idle) {
                    t.abort();
                }
                self.loss = None;
                if !self.apply(
                    Event::PeerReturned,
                    "the primary opened a replication session",
                ) {
                    return;
                }
            }
            SessionVerdict::Refuse => {
                warn!(
                    domain = %self.d.name,
                    role = role.name(),
                    "refusing the peer's replication session: this node runs or is taking over the VM"
                );
                return;
            }
        }
        // The replicas are about to receive the peer's data: from now on they, not the
        // images, are this node's newest copy. Recorded before the first write can land.
        if let Err(e) = self.disk_copy.set(
            DiskCopy::Replica,
            CopyStamp::received_from(self.peer_stamp()),
            &format!("backup of {}", self.shared.config.peer.name),
        ) {
            self.alarm(&format!("refusing replication: {e}"));
            return;
        }
        // A new session supersedes a half-open one (the primary reconnected).
        self.end_session().await;
        if let Err(e) = self.open_replica() {
            self.alarm(&format!("cannot open the replica: {e:#}"));
            return;
        }
        let Runtime::Replica(r) = &mut self.runtime else {
            return;
        };
        let Some(mut rd) = r.replica.take() else {
            return;
        };
        let (st_tx, st_rx) = watch::channel(None);
        let (cancel, cancel_rx) = watch::channel(false);
        let (quiesce, quiesce_rx) = mpsc::channel(1);
        let controls = ReceiveControls {
            status: Some(st_tx),
            cancel: Some(cancel_rx),
            quiesce: Some(quiesce_rx),
        };
        let task = tokio::spawn(async move {
            let res = rd.receive(session, controls).await;
            (rd, res)
        });
        tokio::spawn(report_backup_traffic(
            st_rx.clone(),
            self.shared.traffic.clone(),
        ));
        r.session = Some(Receiving {
            task,
            status: st_rx,
            cancel,
            quiesce,
        });
        self.clear_alarms("replication");
    }

    pub(super) async fn on_finished(&mut self, f: Finished) {
        match f {
            Finished::Protection(r) => {
                let Runtime::Vm(v) = &mut self.runtime else {
                    return;
                };
                v.protection = None;
                v.acks = Acks::Stopped;
                self.counters.protection_lost += 1;
                match r {
                    Ok(Ok(PrimaryExit::BackupLost { reason, last_acked })) => {
                        warn!(domain = %self.d.name, %reason, ?last_acked, "protection lost");
                        self.alarm("running unprotected: the backup is lost");
                    }
                    Ok(Ok(PrimaryExit::HandedOff { epoch })) => {
                        // Only a switchover asks for a hand-off, and it awaits the task itself.
                        warn!(domain = %self.d.name, epoch, "unexpected hand-off");
                    }
                    Ok(Ok(PrimaryExit::Shutdown { last_acked })) => {
                        info!(domain = %self.d.name, ?last_acked, "protection ended");
                    }
                    Ok(Err(e)) => {
                        error!(domain = %self.d.name, error = %e, "protection failed");
                        self.alarm(&format!("protection failed: {e}"));
                    }
                    Err(e) => error!(domain = %self.d.name, error = %e, "protection task failed"),
                }
                // Still resyncing (no checkpoint acknowledged): the backup cannot activate
                // from this session; `decide` releases output when the lease allows.
            }
            Finished::Receiving(r) => {
                let r = *r;
                let Runtime::Replica(rr) = &mut self.runtime else {
                    return;
                };
                rr.session = None;
                self.session_ended_here = true;
                match r {
                    Ok((rd, res)) => {
                        rr.committed = rd.committed();
                        rr.replica = Some(rd);
                        match res {
                            Ok(BackupExit::Ended { committed }) => {
                                info!(domain = %self.d.name, ?committed, "the primary ended replication")
                            }
                            Ok(BackupExit::HandedOff { epoch }) => {
                                info!(domain = %self.d.name, epoch, "the primary handed the VM over");
                                self.loss = Some(Loss::now(0, Some(0)));
                                self.apply(
                                    Event::SwitchoverTakeOver,
                                    &format!("switchover: the primary stopped its VM after checkpoint {epoch}"),
                                );
                            }
                            Err(e) => {
                                warn!(domain = %self.d.name, error = %e, "replication session ended");
                            }
                        }
                    }
                    Err(e) => {
                        error!(domain = %self.d.name, error = %e, "receiving task failed; reopening the replica");
                        self.runtime = Runtime::Idle;
                        if let Err(e) = self.open_replica() {
                            self.alarm(&format!("cannot reopen the replica: {e:#}"));
                        }
                    }
                }
            }
            Finished::Fence(r) => {
                let outcome = match r {
                    Ok(x) => x,
                    Err(e) => Err(FenceError::CommandFailed {
                        domain: self.d.name.clone(),
                        peer: self.shared.config.peer.name.clone(),
                        program: "the fencing task".into(),
                        attempts: 1,
                        last: remus_ha::fence::AttemptFailure::Spawn(e.to_string()),
                    }),
                };
                self.on_fenced(outcome);
            }
        }
    }

    pub(super) fn on_fenced(&mut self, outcome: Result<FenceOutcome, FenceError>) {
        match outcome {
            Ok(o) => {
                info!(domain = %self.d.name, proof = ?o.proof, elapsed_ms = o.elapsed.as_millis() as u64, "peer fenced");
                if let (Some(lease), Some(client)) = (o.lease.clone(), self.shared.witness.clone())
                {
                    self.lease = Some(self.spawn_keeper(client, Some(lease)));
                }
                self.fence = FenceRun::Succeeded;
                if let Some(l) = &mut self.loss {
                    l.fencing_ms = Some(l.fence_started.elapsed().as_millis() as u64);
                }
                if matches!(self.role(), Role::Fencing { .. }) {
                    self.apply(Event::Fenced { by: o.proof }, "fencing succeeded");
                }
                self.clear_alarms("fencing");
            }
            Err(e) => {
                warn!(domain = %self.d.name, error = %e, "fencing failed");
                self.fence = FenceRun::Failed {
                    retry_at: Instant::now() + FENCE_RETRY,
                };
                if matches!(self.role(), Role::Fencing { .. }) {
                    self.apply(Event::FenceFailed, &e.to_string());
                }
                self.alarms.retain(|a| !a.starts_with("fencing"));
                self.alarm(&format!("fencing failing: {e}"));
            }
        }
    }
}

/// Reports every record the peer's primary makes this receiver act on (a checkpoint begun,
/// committed or refused) to the heartbeat detector as proof of life, as it happens; ends
/// with the session.
pub(super) async fn report_backup_traffic(
    mut status: watch::Receiver<Option<watch::Receiver<BackupStatus>>>,
    probe: remus_ha::heartbeat::TrafficProbe,
) {
    let mut st = loop {
        if let Some(st) = status.borrow_and_update().clone() {
            break st;
        }
        if status.changed().await.is_err() {
            return;
        }
    };
    while st.changed().await.is_ok() {
        probe.seen();
    }
}

/// Reports every acknowledgement from the peer's backup to the heartbeat detector as proof
/// of life (the epoch loop's own phase changes are not traffic); ends with the session.
pub(super) async fn report_primary_traffic(
    mut status: watch::Receiver<remus_engine::primary::PrimaryStatus>,
    probe: remus_ha::heartbeat::TrafficProbe,
) {
    let mut acked = status.borrow_and_update().last_acked;
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().last_acked;
        if now > acked {
            probe.seen();
            acked = now;
        }
    }
}
