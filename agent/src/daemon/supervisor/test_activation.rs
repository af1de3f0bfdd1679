//! Test activation: a throwaway copy of the committed replica, booted in an isolated
//! network namespace while protection goes on.

use super::*;

impl Supervisor {
    /// Boots a throwaway copy of the committed replica in a network namespace of its own
    /// (its NICs reach nothing), checks that it runs, and discards it. `reply` is answered
    /// when the check is over (by a task of its own; the supervisor goes on meanwhile).
    ///
    /// Protection goes on throughout: while a session runs, the receiver is held still
    /// right after its next checkpoint commits, the RAM and disk files of that checkpoint are
    /// copied, and the receiver goes on (the primary's next ACK is late by the copy time).
    /// Between sessions the replica is copied as it is.
    pub(super) async fn test_activate(&mut self, reply: oneshot::Sender<Response>) {
        match self.start_test_activation().await {
            Ok(run) => {
                let name = self.d.name.clone();
                self.test_run = Some(tokio::spawn(async move {
                    let r = run.await;
                    info!(domain = %name, result = ?r, "test activation");
                    let _ = reply.send(match r {
                        Ok(message) => Response::Done { message },
                        Err(e) => Response::Error {
                            message: format!("domain {name}: test activation: {e:#}"),
                        },
                    });
                }));
            }
            Err(e) => {
                let _ = reply.send(Response::Error {
                    message: format!("domain {}: test activation: {e:#}", self.d.name),
                });
            }
        }
    }

    /// Takes (or arranges) the copy and returns the rest of the test as a future.
    pub(super) async fn start_test_activation(
        &mut self,
    ) -> Result<impl std::future::Future<Output = Result<String>> + Send + 'static> {
        admit(
            HaCommand::TestActivate,
            &self.role(),
            self.peer_claim(),
            self.committed().is_some(),
        )?;
        if self.test_run.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(anyhow!("a test activation is already running"));
        }
        let Runtime::Replica(r) = &mut self.runtime else {
            return Err(anyhow!("the replica is not open"));
        };
        let scratch = Scratch::new(
            self.shared
                .config
                .node
                .run_dir
                .join(format!("{}-test-activation", self.d.name)),
        );
        let files = r.files.clone();
        let copied = match &r.session {
            // Both passes run in the task; the receiver is held still for the second.
            Some(s) => Copy::WhileReceiving(s.quiesce.clone()),
            None => {
                if r.committed.is_none() {
                    return Err(anyhow!("the replica holds no committed checkpoint"));
                }
                // No session can start while the supervisor awaits this.
                let (f, dir) = (files.clone(), scratch.path.clone());
                let copy = tokio::task::spawn_blocking(move || f.finish(f.precopy(&dir)?))
                    .await
                    .context("the copying task failed")??;
                Copy::Done(Box::new(copy))
            }
        };
        let d = self.d.clone();
        Ok(async move {
            let started = Instant::now();
            let (copy, held) = match copied {
                Copy::Done(c) => (*c, None),
                Copy::WhileReceiving(quiesce) => {
                    let (f, dir) = (files.clone(), scratch.path.clone());
                    let pre = tokio::task::spawn_blocking(move || f.precopy(&dir))
                        .await
                        .context("the copying task failed")??;
                    let (request, quiesced, resume) = QuiesceRequest::new();
                    quiesce
                        .try_send(request)
                        .map_err(|_| {
                            anyhow!("the replication session ended during the copy (or another copy holds the receiver)")
                        })?;
                    let at = tokio::time::timeout(QUIESCE_WAIT, quiesced)
                        .await
                        .map_err(|_| {
                            anyhow!("no checkpoint committed within {QUIESCE_WAIT:?} (is the session's first checkpoint still on its way?)")
                        })?
                        .map_err(|_| anyhow!("the replication session ended before a checkpoint committed"))?;
                    let held_from = Instant::now();
                    let copy = tokio::task::spawn_blocking(move || files.finish(pre))
                        .await
                        .context("the copying task failed");
                    drop(resume);
                    let held = held_from.elapsed();
                    let copy = copy??;
                    if copy.epoch != at {
                        return Err(anyhow!(
                            "copied checkpoint {}, but the receiver held {at}",
                            copy.epoch
                        ));
                    }
                    (copy, Some(held))
                }
            };
            let epoch = copy.epoch;
            let final_pass = copy.final_pass_bytes;
            let (test_domain, test_paths) = (copy.domain, copy.paths);
            let copied_in = started.elapsed();
            let netns = IsolatedNetns::create(&d)?;
            let (mut vm, from) = ReplicaDomain::open(&test_domain, test_paths)?
                .activate(&netns.netns())
                .await?;
            vm.resume_activated().await?;
            let console = vm.paths.console();
            let before = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
            tokio::time::sleep(TEST_RUN).await;
            let state = vm.control.query_status().await?;
            let after = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
            let alive = vm.qemu.try_wait().ok().flatten().is_none();
            let _ = vm.qemu.kill_and_wait().await;
            drop(netns);
            drop(scratch);
            if !alive || state != remus_qemu::RunState::running {
                return Err(anyhow!(
                    "the test copy of checkpoint {from} is not running ({state:?})"
                ));
            }
            let held = held.map_or_else(
                || "copied between sessions".to_string(),
                |h| {
                    format!(
                        "receiver held still {} ms for the last {final_pass} bytes of the copy, protection uninterrupted",
                        h.as_millis()
                    )
                },
            );
            Ok(format!(
                "test activation of checkpoint {epoch}: {held}; copied in {} ms; ran {} s in an isolated network, console output {} bytes in that time; discarded",
                copied_in.as_millis(),
                TEST_RUN.as_secs(),
                after.saturating_sub(before)
            ))
        })
    }
}

/// How a test activation gets its copy.
enum Copy {
    /// Already taken (between sessions).
    Done(Box<crate::domain::backup::ReplicaCopy>),
    /// To be taken while a session runs: first pass alongside it, second pass with its
    /// receiver held still through this channel.
    WhileReceiving(mpsc::Sender<QuiesceRequest>),
}

/// A test activation's scratch directory, removed on drop (also when the test is aborted).
struct Scratch {
    path: std::path::PathBuf,
}

impl Scratch {
    pub(super) fn new(path: std::path::PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&path);
        Self { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A network namespace of its own for a test activation, with the bridges the domain's
/// NICs join, deleted on drop.
struct IsolatedNetns {
    name: String,
}

impl IsolatedNetns {
    pub(super) fn create(d: &DomainConfig) -> Result<Self> {
        let name = format!("remus-test-{}-{}", d.name, std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).context("test activation: creating its namespace")?;
        let me = Self { name };
        for nic in &d.nics {
            let _ = ip_in(&me.name, &["link", "add", &nic.bridge, "type", "bridge"]);
            ip_in(&me.name, &["link", "set", &nic.bridge, "up"])
                .with_context(|| format!("test activation: bridge {}", nic.bridge))?;
        }
        Ok(me)
    }

    pub(super) fn netns(&self) -> Netns {
        Netns::named(&self.name)
    }
}

impl Drop for IsolatedNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
