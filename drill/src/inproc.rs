//! A real `remusd` inside the drill's process: [`remus_agent::daemon::serve`] on a tokio
//! runtime and a thread of its own, reached only through its control socket.
//!
//! Why in-process: the local drill runs the daemon's own supervisor (heartbeats, the
//! decision table, fencing at the witness, activation) for both nodes without building or
//! finding binaries, so `cargo test` of this crate exercises the code it links. Each daemon
//! owns its runtime, so losing a "host" is dropping that runtime at once
//! ([`InProcessDaemon::crash`]): every task of the daemon stops where it is, its sockets
//! close, its heartbeat thread ends and its QEMU is killed (a `QemuProcess` dropped kills
//! its child). Nothing runs the daemon's orderly teardown, as on a real host loss. A
//! graceful [`InProcessDaemon::stop`] is the SIGTERM path instead.
//!
//! What the two daemons share is only what one process cannot split: the QEMU launcher
//! thread (it forks for both alike) and the kernel. Their VMs' NICs are kept apart by
//! `[node] vm_netns`, their sockets by distinct loopback addresses.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use remus_agent::config::Config;
use tokio::sync::oneshot;

use crate::pair::control::Control;

/// How a daemon is to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// As on SIGTERM: supervisors tear their domains down.
    Graceful,
    /// As on a host loss: the runtime is dropped where it stands.
    Crash,
}

/// One daemon running in this process.
#[derive(Debug)]
pub struct InProcessDaemon {
    name: String,
    control: Control,
    stop: Option<oneshot::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl InProcessDaemon {
    /// Starts `config`'s daemon (read from `path`, which `reload` re-reads) and waits (up
    /// to `ready_within`) until its control socket answers a status request.
    ///
    /// # Errors
    /// The runtime or thread could not be made; the daemon ended during start-up (its
    /// error is returned); the socket did not answer in time.
    pub async fn start(
        config: Config,
        path: Option<std::path::PathBuf>,
        ready_within: Duration,
    ) -> Result<Self> {
        let name = config.node.name.clone();
        let control = Control::new(&config.node.control_socket);
        let (stop_tx, stop_rx) = oneshot::channel::<Stop>();
        let thread = std::thread::Builder::new()
            .name(format!("remusd-{name}"))
            .spawn({
                let name = name.clone();
                move || run_daemon(&name, config, path, stop_rx)
            })
            .with_context(|| format!("in-process remusd {name}: spawning its thread"))?;
        let mut me = Self {
            name,
            control,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        let deadline = Instant::now() + ready_within;
        loop {
            if me.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let r = me.join();
                bail!(
                    "in-process remusd {} ended during start-up: {}",
                    me.name,
                    r.err()
                        .map_or_else(|| "without an error".to_string(), |e| format!("{e:#}"))
                );
            }
            if me.control.status(Duration::from_millis(500)).await.is_ok() {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!(
                    "in-process remusd {}: control socket {} not answering within {ready_within:?}",
                    me.name,
                    me.control.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its control socket.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Its node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host is lost: the daemon's runtime is dropped where it stands (see the module
    /// doc). Returns once its thread has ended.
    ///
    /// # Errors
    /// The daemon had already failed (its error).
    pub fn crash(&mut self) -> Result<()> {
        self.end(Stop::Crash)
    }

    /// SIGTERM: the daemon stops its supervisors in order and returns.
    ///
    /// # Errors
    /// The daemon's own error, if it failed.
    pub fn stop(&mut self) -> Result<()> {
        self.end(Stop::Graceful)
    }

    fn end(&mut self, how: Stop) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(how);
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("in-process remusd {}: its thread panicked", self.name))?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.crash();
        }
    }
}

/// The daemon's thread: its runtime, `serve`, and the end `stop` asks for.
fn run_daemon(
    name: &str,
    config: Config,
    path: Option<std::path::PathBuf>,
    stop: oneshot::Receiver<Stop>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("remusd-{name}"))
        .enable_all()
        .build()
        .with_context(|| format!("in-process remusd {name}: building its runtime"))?;
    // Kept until the function returns: dropping it would start the orderly teardown,
    // which a crash must not run.
    let (graceful_tx, graceful_rx) = oneshot::channel::<()>();
    let mut graceful = Some(graceful_tx);
    let mut task = rt.spawn(remus_agent::daemon::serve(config, path, async move {
        let _ = graceful_rx.await;
    }));
    let ended = rt.block_on(async {
        tokio::select! {
            r = &mut task => Some(r),
            how = stop => match how {
                Ok(Stop::Crash) => None,
                // Asked to stop, or the owner is gone: the orderly way.
                Ok(Stop::Graceful) | Err(_) => {
                    if let Some(g) = graceful.take() {
                        let _ = g.send(());
                    }
                    Some((&mut task).await)
                }
            },
        }
    });
    match ended {
        None => {
            // Every task is dropped where it stands, without waiting for anything.
            rt.shutdown_background();
            Ok(())
        }
        Some(r) => {
            rt.shutdown_timeout(Duration::from_secs(5));
            r.with_context(|| format!("in-process remusd {name}: its task failed"))?
                .with_context(|| format!("in-process remusd {name}"))
        }
    }
}
