//! The operator's commands: start, switchover, failover.

use super::*;

impl Supervisor {
    // ---------------------------------------------------------------- commands

    pub(super) async fn command(&mut self, req: Request) -> Response {
        if let Request::DomainConfig { .. } = req {
            return self.domain_config().await;
        }
        let r = match req {
            Request::Start { older_copy, .. } => self.start(older_copy).await,
            Request::Failover { .. } => self.operator_failover().await,
            Request::Switchover { .. } => self.switchover().await,
            Request::TestActivate { .. } => Err(anyhow!("a test activation answers by itself")),
            Request::Verify { .. } => Err(anyhow!("a verify answers by itself")),
            Request::Status | Request::Reload | Request::DomainConfig { .. } => {
                Err(anyhow!("not a domain command"))
            }
        };
        self.publish();
        match r {
            Ok(message) => Response::Done { message },
            Err(e) => Response::Error {
                message: format!("domain {}: {e:#}", self.d.name),
            },
        }
    }

    /// An operator's start: refused unless this node's role is `stopped`, the peer's is
    /// too, and the peer advertises no newer copy of the domain's data than this node's
    /// (`older_copy` overrides the last check only).
    pub(super) async fn start(&mut self, older_copy: bool) -> Result<String> {
        let role = self.role();
        // The role first (the peer's claim is checked once it has been heard).
        admit(HaCommand::Start, &role, PeerClaim::Unknown, false)?;
        // A daemon that has just started may not have heard the peer yet, and a peer that
        // has just started may not advertise its domains yet: wait until the peer's stamp
        // for this domain is known or the peer is declared lost (at most the heartbeat
        // timeout and a second), so that the copy check below sees the peer's stamp
        // whenever the peer is up.
        let deadline = tokio::time::Instant::now()
            + self.shared.config.heartbeat.timeout
            + Duration::from_secs(1);
        let mut live = self.shared.liveness.clone();
        let mut view = self.shared.peer_view.clone();
        loop {
            let lost = matches!(*live.borrow_and_update(), PeerLiveness::Lost { .. });
            view.borrow_and_update();
            if lost || self.peer_stamp().is_some() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = live.changed() => if r.is_err() { break },
                r = view.changed() => if r.is_err() { break },
            }
        }
        admit(HaCommand::Start, &role, self.peer_claim(), false)?;
        let own = self.disk_copy.stamp();
        let peer_stamp = self.peer_stamp();
        let peer = self.shared.config.peer.name.as_str();
        let mut lineage = match peer_stamp {
            Some(p) => start_verdict(own, p, older_copy, peer, &format!("{peer}'s copy"), || {
                format!(
                    "{peer} holds a newer copy of the domain's data ({p}) than this \
                         node ({own})"
                )
            })?,
            None => format!("{peer} not heard: could not check that its copy is not newer"),
        };
        // Then the witness, which keeps the newest stamp any node recorded: it knows of a
        // newer copy even when the node holding it is down for good.
        if let Some(w) = self.shared.witness.clone() {
            match w.record_copy(&self.d.name, own).await {
                Ok(r) => {
                    let by = r.node.unwrap_or_else(|| "another node".into());
                    let verdict = start_verdict(
                        own,
                        r.stamp,
                        older_copy,
                        &by,
                        "the witness's record",
                        || {
                            format!(
                                "the witness recorded a newer copy of the domain's data ({}) \
                                 from {by} than this node's ({own})",
                                r.stamp
                            )
                        },
                    )?;
                    lineage.push_str(&format!("; {verdict}"));
                }
                Err(e) => {
                    warn!(
                        domain = %self.d.name,
                        error = %e,
                        "start: cannot compare this node's copy with the witness's record"
                    );
                    lineage.push_str("; the witness could not be asked");
                }
            }
        }
        if must_win_lease(self.fencing(), self.lease()) {
            self.acquire_lease(LEASE_WAIT).await?;
        }
        let copy = self.disk_copy.current();
        let stamp = CopyStamp::next_run(own, peer_stamp);
        if let Err(e) = self.disk_copy.set(copy, stamp, "started by the operator") {
            self.stop_lease(true).await;
            return Err(e.into());
        }
        self.record_at_witness(stamp);
        self.runtime = Runtime::Idle;
        self.apply(Event::StartUnprotected, "operator: start");
        // What this node launches, recorded before QEMU starts (`domain config` merges it
        // with QEMU's devices; device changes record their steps in it).
        if let Err(e) = self.templates().save(&Template::of(&self.d)) {
            self.apply(Event::Stop, "start failed");
            self.stop_lease(true).await;
            return Err(e.into());
        }
        let vm = match RunningVm::start(&self.d, self.paths.clone(), &self.vm_netns(), copy).await {
            Ok(vm) => vm,
            Err(e) => {
                self.apply(Event::Stop, "start failed");
                self.stop_lease(true).await;
                return Err(e);
            }
        };
        let pid = vm.qemu.pid();
        self.runtime = Runtime::Vm(Box::new(VmRuntime::unprotected(vm)));
        self.peer_in_lineage = false;
        self.next_protect = Instant::now();
        self.alarm("running unprotected: waiting for the peer to accept as backup");
        Ok(format!(
            "VM started from its {}s (QEMU pid {pid}; copy {own}, {lineage}; now generation \
             {}); protecting it to {}",
            copy.name(),
            stamp.generation,
            self.shared.config.peer.name
        ))
    }

    /// Planned handover, asked of the primary: a final checkpoint with the VM left stopped,
    /// acknowledged by the backup, which then takes over from exactly that checkpoint.
    /// Nothing is lost (the final checkpoint holds everything the guest did) and nothing
    /// runs twice (this node's VM never resumes: it is killed once the backup has it).
    pub(super) async fn switchover(&mut self) -> Result<String> {
        admit(
            HaCommand::Switchover,
            &self.role(),
            self.peer_claim(),
            false,
        )?;
        let Runtime::Vm(v) = &mut self.runtime else {
            return Err(anyhow!("no VM runs here"));
        };
        let Some(p) = v.protection.take() else {
            return Err(anyhow!("the VM is not protected: nothing to hand over to"));
        };
        p.handle.hand_off();
        let exit = tokio::time::timeout(Duration::from_secs(60), p.task).await;
        let epoch = match exit {
            Ok(Ok(Ok(PrimaryExit::HandedOff { epoch }))) => epoch,
            other => {
                v.acks = Acks::Stopped;
                let why = match other {
                    Ok(Ok(Ok(x))) => format!("{x:?}"),
                    Ok(Ok(Err(e))) => e.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no hand-off within 60 s".into(),
                };
                return Err(anyhow!(
                    "the backup did not take the final checkpoint ({why}); the VM keeps running here"
                ));
            }
        };
        self.apply(Event::SwitchoverHandOff, "operator: switchover");
        if let Runtime::Vm(mut v) = std::mem::replace(&mut self.runtime, Runtime::Idle) {
            let _ = v.vm.qemu.kill_and_wait().await;
        }
        // Give the lease back at once so the new primary need not wait for it to expire.
        self.stop_lease(true).await;
        self.peer_in_lineage = false;
        self.alarms.clear();
        self.open_replica()?;
        Ok(format!(
            "handed over at checkpoint {epoch}; {} runs the VM, this node is its backup",
            self.shared.config.peer.name
        ))
    }

    /// An operator's failover, asked of the backup: wins the witness lease first (if the
    /// policy has one), records the operator as the proof, and activates.
    pub(super) async fn operator_failover(&mut self) -> Result<String> {
        admit(
            HaCommand::Failover,
            &self.role(),
            self.peer_claim(),
            self.committed().is_some(),
        )?;
        // Won before the role changes: a refusal leaves this node the backup.
        if must_win_lease(self.fencing(), self.lease()) {
            self.acquire_lease(LEASE_WAIT).await.context(
                "the primary still holds the witness lease (it is alive and running the VM)",
            )?;
        }
        if let FenceRun::Running(t) = std::mem::replace(&mut self.fence, FenceRun::Idle) {
            t.abort();
        }
        self.loss = Some(Loss::now(0, Some(0)));
        self.apply(Event::OperatorFailover, "operator: failover");
        self.activate(false).await?;
        let epoch = self.failovers.last().map_or(0, |f| f.from_epoch);
        Ok(format!(
            "activated checkpoint {epoch}; the VM runs on {}",
            self.shared.config.node.name
        ))
    }
}

/// The message of a start against another holder's stamp (the peer's, the witness's
/// record), by [`against_newer`]'s verdict: refused naming `by` as the node to start on,
/// saying `newer()`; otherwise the phrase for the start's message.
fn start_verdict(
    own: CopyStamp,
    other: CopyStamp,
    older_copy: bool,
    by: &str,
    whose: &str,
    newer: impl FnOnce() -> String,
) -> Result<String> {
    match against_newer(own, other, older_copy) {
        CopyVerdict::NotOlder => Ok(format!("not older than {whose}")),
        CopyVerdict::OlderOverridden => Ok(format!(
            "OLDER than {whose} ({other}): started anyway (--older-copy)"
        )),
        CopyVerdict::Refused => Err(anyhow!(
            "{}: start it on {by}; to go back to this node's copy instead, losing what only \
             {by}'s holds, pass --older-copy",
            newer()
        )),
    }
}

impl Supervisor {
    /// The domain's stored configuration.
    pub(super) fn templates(&self) -> TemplateStore {
        TemplateStore::new(&self.d.name, &self.paths.state)
    }

    /// `remusctl domain config`: QEMU's devices (when the VM runs here) merged with the
    /// stored configuration, which is repaired to match and saved (see
    /// [`crate::domain::template`]). Without a stored file (a VM launched by a release that
    /// wrote none) the policy's configuration stands in for it, and is saved if the VM runs.
    pub(super) async fn domain_config(&mut self) -> Response {
        let store = self.templates();
        let fail = |e: &dyn std::fmt::Display| Response::Error {
            message: format!("domain {}: {e}", self.d.name),
        };
        let (stored, had_file) = match store.load() {
            Ok(Some(t)) => (t, true),
            Ok(None) => (Template::of(&self.d), false),
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                }
            }
        };
        let live = match &self.runtime {
            Runtime::Vm(v) => match v.vm.control.inventory().await {
                Ok(i) => Some(i),
                Err(e) => return fail(&format_args!("asking QEMU for its devices: {e}")),
            },
            _ => None,
        };
        let (mut view, repaired) = merge(
            &stored,
            live.as_ref(),
            &self.shared.config.node.name,
            store.path(),
        );
        if live.is_some() {
            let copy = self.disk_copy.current();
            for d in &mut view.disks {
                d.backing = match copy {
                    DiskCopy::Image => d.image.clone(),
                    DiskCopy::Replica => d.replica.clone(),
                };
            }
        }
        if !had_file {
            view.warnings.insert(
                0,
                format!(
                    "no stored configuration at {}: the policy's stands in for it",
                    store.path().display()
                ),
            );
        }
        if live.is_some() && (!had_file || repaired != stored) {
            if let Err(e) = store.save(&repaired) {
                view.warnings
                    .push(format!("the repair could not be saved: {e}"));
            }
        }
        Response::DomainConfig(view)
    }
}
