//! Acting: carrying out what [`decide`] chose (each action persists its role change
//! first).

use super::sessions::report_primary_traffic;
use super::*;

impl Supervisor {
    /// [`Action::RunUnprotected`]: resume the VM if it was paused, release output that no
    /// protection session holds.
    pub(super) async fn run_unprotected(&mut self) {
        self.resume_if_paused().await;
        if let Runtime::Vm(v) = &self.runtime {
            if v.output_held && v.protection.is_none() {
                self.release_output().await;
            }
        }
    }

    /// [`Action::PauseVm`]: QMP `stop`, ending protection; output of unacknowledged epochs
    /// stays held. A VM that cannot be stopped is killed.
    pub(super) async fn pause_vm(&mut self, role: &Role) {
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        if v.paused {
            return;
        }
        warn!(domain = %self.d.name, role = role.name(), "pausing the VM: nothing proves the peer cannot run it");
        if let Some(p) = v.protection.take() {
            let _ = p.handle.shutdown.send(true);
            p.task.abort();
            v.acks = Acks::Stopped;
        }
        if let Err(e) = v.vm.control.stop().await {
            error!(domain = %self.d.name, error = %e, "QMP stop failed; killing QEMU");
            self.kill_vm("QMP stop failed").await;
            return;
        }
        v.paused = true;
        v.running = false;
        self.alarm("VM paused: neither backup ACKs nor the witness lease prove it safe to run");
    }

    pub(super) async fn resume_if_paused(&mut self) {
        if let Runtime::Vm(v) = &mut self.runtime {
            if v.paused {
                match v.vm.control.cont().await {
                    Ok(_) => {
                        info!(domain = %self.d.name, "VM resumed: running is proven safe again");
                        v.paused = false;
                        self.alarms.retain(|a| !a.starts_with("VM paused"));
                    }
                    Err(e) => error!(domain = %self.d.name, error = %e, "QMP cont failed"),
                }
            }
        }
    }

    pub(super) async fn release_output(&mut self) {
        if let Runtime::Vm(v) = &mut self.runtime {
            let mut nics = v.vm.nics.clone();
            if let Err(e) = remus_engine::ports::OutputBuffer::release_all(&mut nics).await {
                error!(domain = %self.d.name, error = %e, "releasing held output");
                return;
            }
            v.output_held = false;
        }
    }

    pub(super) async fn kill_vm(&mut self, why: &str) {
        if let Runtime::Vm(mut v) = std::mem::replace(&mut self.runtime, Runtime::Idle) {
            warn!(domain = %self.d.name, why, "killing this node's QEMU");
            if let Some(p) = v.protection.take() {
                p.task.abort();
            }
            let _ = v.vm.qemu.kill_and_wait().await;
        }
        self.stop_lease(false).await;
        self.alarm(&format!("VM killed: {why}"));
        self.apply(Event::Stop, why);
    }

    pub(super) async fn stop_lease(&mut self, release: bool) {
        if let Some(k) = self.lease.take() {
            let _ = k.stop(release).await;
        }
    }

    pub(super) async fn fence_peer(&mut self, role: &Role) {
        if matches!(role, Role::Backup { .. }) {
            let detection_ms = match *self.shared.liveness.borrow() {
                PeerLiveness::Lost { detected_after, .. } => detected_after.as_millis() as u64,
                _ => 0,
            };
            self.loss = Some(Loss::now(detection_ms, None));
            // Stop receiving: the session is dead or half-open.
            self.end_session().await;
            if !self.apply(
                Event::PeerLost,
                &format!("no heartbeat for {detection_ms} ms"),
            ) {
                return;
            }
            self.fence = FenceRun::Idle;
        }
        match &self.fence {
            FenceRun::Running(_) | FenceRun::Succeeded => return,
            FenceRun::Failed { retry_at } if Instant::now() < *retry_at => return,
            _ => {}
        }
        let fencer: Arc<dyn Fencer> = match &self.d.fencing {
            FencingPolicy::Command {
                argv,
                timeout,
                retries,
            } => match CommandFencer::new(argv.clone(), *timeout, *retries) {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    self.on_fenced(Err(e));
                    return;
                }
            },
            FencingPolicy::Witness => match &self.shared.witness {
                Some(w) => Arc::new(WitnessFencer::new(w.clone())),
                None => {
                    self.alarm("fencing: witness fencing without a [witness] section");
                    return;
                }
            },
            FencingPolicy::None => {
                warn!(domain = %self.d.name, "UNSAFE: fencing mode none: nothing proves the peer gone");
                Arc::new(NoFencer)
            }
        };
        let domain = self.d.name.clone();
        let peer = self.shared.config.peer.name.clone();
        self.fence = FenceRun::Running(tokio::spawn(
            async move { fencer.fence(&domain, &peer).await },
        ));
    }

    /// Activates the replica: persisted in two steps around the moment the guest may run.
    pub(super) async fn activate(&mut self, acquire_lease: bool) -> Result<()> {
        let started = Instant::now();
        // Fencing with the lease held: decide says activate; record the proof first.
        if matches!(self.role(), Role::Fencing { .. }) {
            self.apply(
                Event::Fenced {
                    by: FenceProof::Lease,
                },
                "the witness lease is held",
            );
        }
        let proof = match self.role() {
            Role::Fenced { by, .. } => format!("{by:?}").to_lowercase(),
            Role::Activating { .. } => "redo".into(),
            other => return Err(anyhow!("activation in role {}", other.name())),
        };
        if acquire_lease {
            // Switchover or operator failover with a witness: the lease must be ours too.
            self.acquire_lease(LEASE_WAIT).await?;
        }
        self.end_session().await;
        let Runtime::Replica(r) = &mut self.runtime else {
            self.open_replica()?;
            return Err(anyhow!("the replica was not open; retrying"));
        };
        let rd = match r.replica.take() {
            Some(rd) => rd,
            None => ReplicaDomain::open(&self.d, self.paths.clone())?,
        };
        let epoch = match rd.replica().state() {
            ReplicaState::Committed(k) => k,
            other => {
                self.runtime = Runtime::Replica(Box::new(ReplicaRuntime {
                    files: rd.files(),
                    replica: Some(rd),
                    session: None,
                    committed: None,
                }));
                return Err(anyhow!(
                    "no committed checkpoint to activate (replica {other:?})"
                ));
            }
        };
        self.runtime = Runtime::Idle;
        if !self.apply(
            Event::ActivationStarted { from_epoch: epoch },
            "activating the last committed checkpoint",
        ) {
            return Err(anyhow!("the role refused activation"));
        }
        // Activation is one long step: say where it is as it goes.
        self.publish();
        test_hold("activating").await;
        // What this node launches. Not a reason to delay the takeover: a failure here only
        // leaves `domain config` without its file (it then stands in the policy's).
        if let Err(e) = self.templates().save(&Template::of(&self.d)) {
            warn!(domain = %self.d.name, error = %e, "activation: the stored configuration was not written");
        }
        let netns = self.vm_netns();
        let (vm, from) = match rd.activate(&netns).await {
            Ok(x) => x,
            Err(e) => {
                // Nothing ran: the role stays `activating` and the next attempt redoes it.
                self.open_replica().ok();
                return Err(e);
            }
        };
        if !self.apply(Event::Resuming, "resuming the activated guest") {
            return Err(anyhow!("the role refused resuming"));
        }
        // This node now runs the guest as its authority: a new generation of its data,
        // recorded before the guest can write to it. A failure to record it is an alarm,
        // not a reason to leave the guest stopped: the stamp only guides a later `start`.
        let stamp = CopyStamp::next_run(self.disk_copy.stamp(), self.peer_stamp());
        let copy = self.disk_copy.current();
        if let Err(e) = self.disk_copy.set(copy, stamp, "activated the replica") {
            self.alarm(&format!(
                "cannot record the copy's generation {}: {e}",
                stamp.generation
            ));
        }
        self.record_at_witness(stamp);
        self.publish();
        test_hold("activated").await;
        vm.resume_activated().await?;
        self.apply(Event::ActivationDone, "the activated VM runs");
        let activation_ms = started.elapsed().as_millis() as u64;
        let loss = self.loss.take();
        let rec = FailoverRecord {
            declared_at_ms: loss.map_or_else(unix_millis, |l| l.declared_at_ms),
            detection_ms: loss.map_or(0, |l| l.detection_ms),
            fencing_ms: loss.and_then(|l| l.fencing_ms).unwrap_or(0),
            activation_ms,
            fence_proof: proof,
            from_epoch: from,
        };
        info!(domain = %self.d.name, ?rec, "failover complete");
        self.failovers.push(rec);
        self.counters.failovers += 1;
        self.fence = FenceRun::Idle;
        self.peer_in_lineage = false;
        self.seen_acked = None;
        self.alarms.clear();
        self.alarm("running unprotected: waiting for the peer to return as backup");
        self.runtime = Runtime::Vm(Box::new(VmRuntime::unprotected(vm)));
        if self.fencing() == HaFencing::Witness && self.lease.is_none() {
            if let Some(w) = self.shared.witness.clone() {
                self.lease = Some(self.spawn_keeper(w, None));
            }
        }
        Ok(())
    }

    /// A lease keeper on the HA runtime (renewals must not wait for a busy main runtime).
    pub(super) fn spawn_keeper(
        &self,
        client: Arc<dyn remus_ha::witness::LeaseArbiter>,
        initial: Option<remus_ha::witness::Lease>,
    ) -> LeaseKeeper {
        let _in_ha = self.shared.ha.enter();
        LeaseKeeper::spawn(client, self.d.name.clone(), initial)
    }

    /// Starts a [`LeaseKeeper`] and waits until it holds the lease.
    pub(super) async fn acquire_lease(&mut self, wait: Duration) -> Result<()> {
        let Some(w) = self.shared.witness.clone() else {
            return Err(anyhow!("witness fencing without a [witness] section"));
        };
        if self.lease.is_none() {
            self.lease = Some(self.spawn_keeper(w, None));
        }
        let mut st = self.lease.as_ref().expect("just set").state();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = tokio::time::Instant::now();
            let state = st.borrow().clone();
            match state {
                s if s.held_exclusively_at(now) => return Ok(()),
                LeaseState::Denied { holder } => {
                    self.stop_lease(false).await;
                    return Err(anyhow!("the witness lease is held by {holder}"));
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, st.changed())
                .await
                .is_err()
            {
                self.stop_lease(false).await;
                return Err(anyhow!(
                    "the witness did not grant the lease within {wait:?}"
                ));
            }
        }
    }

    /// [`Action::Protect`]: offers the peer a protection session, at most once per
    /// [`PROTECT_RETRY`] (backing off while attempts fail).
    pub(super) async fn protect(&mut self) {
        if Instant::now() < self.next_protect {
            return;
        }
        let Runtime::Vm(v) = &self.runtime else {
            return;
        };
        if v.protection.is_some() {
            return;
        }
        // Attempts that keep failing (the peer refuses or loses every session) back off to
        // 16 s: each one costs a pre-copy of all RAM and a disk resync.
        self.next_protect = Instant::now() + PROTECT_RETRY * (1u32 << self.protect_failures.min(4));
        self.protect_failures += 1;
        let cfg = &self.shared.config;
        let opts = ProtectOptions {
            peer_addr: cfg.peer.address.to_string(),
            auth: self.shared.channel_auth(),
            identity: Identity {
                node: cfg.node.name.clone(),
                peer_node: cfg.peer.name.clone(),
                domain: self.d.name.clone(),
            },
            ack_timeout: self.d.ack_timeout,
            ack_wait_max: self.d.ack_wait_max,
            disk_sync: if self.peer_in_lineage {
                SyncMode::Dirty
            } else {
                SyncMode::Full
            },
        };
        let Runtime::Vm(v) = &mut self.runtime else {
            return;
        };
        match protect(&v.vm, &opts).await {
            Ok(p) => {
                info!(domain = %self.d.name, sync = ?opts.disk_sync, "protection session opened");
                tokio::spawn(report_primary_traffic(
                    p.handle.status.clone(),
                    self.shared.traffic.clone(),
                ));
                v.protection = Some(p);
                v.acks = Acks::Flowing;
                self.last_ack_at = Instant::now();
                // Held from now on, unless buffering is switched off (unsafe): then it never is.
                v.output_held = self.d.netbuf.output_buffering;
                self.seen_acked = None;
                // Verify run numbers restart with each session.
                self.seen_verify_session += 1;
                self.apply(
                    Event::BackupReturned {
                        peer: cfg.peer.name.clone(),
                    },
                    "the peer accepted a replication session",
                );
            }
            Err(e) => {
                tracing::debug!(domain = %self.d.name, error = %format!("{e:#}"), "protection attempt failed");
            }
        }
    }

    /// Sends a new stamp to the witness, if one is configured, in the background: the
    /// guest must not wait for it. The local record is already durable; the witness's copy
    /// lets a node whose peer is down for good learn that its own copy is older.
    pub(super) fn record_at_witness(&self, stamp: CopyStamp) {
        let Some(w) = self.shared.witness.clone() else {
            return;
        };
        let domain = self.d.name.clone();
        tokio::spawn(async move {
            match w.record_copy(&domain, stamp).await {
                Ok(r) if r.stamp > stamp => warn!(
                    %domain,
                    recorded = %r.stamp,
                    by = ?r.node,
                    "the witness holds a newer copy stamp than the one this node runs"
                ),
                Ok(_) => debug!(%domain, %stamp, "copy stamp recorded at the witness"),
                Err(e) => warn!(%domain, error = %e, "cannot record the copy stamp at the witness"),
            }
        });
    }
}
