//! A QEMU child process whose life is tied to the agent's.
//!
//! Lifetime decision: a primary's QEMU must never outlive its agent. Without the agent
//! nothing checkpoints the VM and nothing holds its network output, so a VM left running
//! would talk to clients unprotected while the backup, seeing the primary's agent gone, may
//! activate its replica: two live copies. Hence:
//! - every QEMU gets `PR_SET_PDEATHSIG(SIGKILL)` before `exec`, and checks that its parent
//!   did not die before that call (else it exits at once);
//! - the death signal fires when the *thread* that forked exits, not the process. Tokio's
//!   blocking-pool threads come and go, so all QEMUs are forked from one launcher thread
//!   that lives as long as the process;
//! - each QEMU runs in its own process group, so a terminal's signals to the agent do not
//!   reach it directly and the agent alone decides when it ends;
//! - the systemd unit's `KillMode=control-group` backs this up: stopping or killing the
//!   service kills every QEMU in its cgroup;
//! - dropping a [`QemuProcess`] kills the QEMU (SIGKILL).
//!
//! Consequence to accept: restarting remusd kills its VMs (a primary's VM then fails over to
//! the backup, which is the safe outcome).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::qmp::{Qmp, QmpError};
use crate::spec::{QemuSpec, SpecError};

/// Bytes of QEMU's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;
/// Default wait for QEMU's QMP socket to accept connections.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the QEMU process, naming the VM.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("qemu {name}: spawn {binary}: {source}")]
    Spawn {
        name: String,
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("qemu {name}: exited during start-up ({status}); stderr: {stderr}")]
    ExitedEarly {
        name: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("qemu {name}: QMP socket {path} not ready after {after:?}")]
    StartTimeout {
        name: String,
        path: PathBuf,
        after: Duration,
    },
    #[error("qemu {name}: wait: {source}")]
    Wait {
        name: String,
        source: std::io::Error,
    },
    #[error("qemu {name}: kill: {source}")]
    Kill {
        name: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// A fork request for the launcher thread.
struct SpawnRequest {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: tokio::sync::oneshot::Sender<std::io::Result<Child>>,
}

/// The long-lived thread all QEMUs are forked from (see the module doc for why).
fn launcher() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static LAUNCHER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("qemu-launcher".into())
            .spawn(move || {
                for mut req in rx {
                    // The child is registered with the caller's runtime (its SIGCHLD driver).
                    let _guard = req.runtime.enter();
                    let _ = req.reply.send(req.command.spawn());
                }
            })
            .expect("spawning the qemu launcher thread");
        Mutex::new(tx)
    })
}

/// QEMU's stderr: logged line by line, the tail kept for error messages.
#[derive(Default)]
struct StderrTail(VecDeque<u8>);

impl StderrTail {
    fn push_line(&mut self, line: &str) {
        self.0.extend(line.as_bytes());
        self.0.push_back(b'\n');
        let excess = self.0.len().saturating_sub(STDERR_TAIL);
        self.0.drain(..excess);
    }

    fn text(&self) -> String {
        let (a, b) = self.0.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).trim_end().to_string()
    }
}

/// A running QEMU.
pub struct QemuProcess {
    /// The spec's name, for messages.
    name: String,
    child: Child,
    pid: u32,
    qmp_socket: PathBuf,
    stderr: Arc<Mutex<StderrTail>>,
    /// Set once the exit was reaped.
    status: Option<ExitStatus>,
}

impl QemuProcess {
    /// Starts QEMU and waits until its QMP socket file exists (connect with
    /// [`connect_qmp`](Self::connect_qmp)). Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// An invalid spec, a failed fork/exec, a QEMU that exits during start-up (with its
    /// stderr), or no socket within [`DEFAULT_START_TIMEOUT`].
    pub async fn spawn(spec: &QemuSpec) -> Result<QemuProcess, ProcessError> {
        let argv = spec.argv()?;
        // A stale socket file from an earlier run would look ready before QEMU is.
        let _ = std::fs::remove_file(&spec.qmp_socket);
        let mut command = Command::new(&spec.binary);
        command
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec in the child, where only
        // async-signal-safe calls are allowed: prctl and getppid are plain system calls, and
        // the error is built from a raw errno without allocating.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl: then no signal will ever come.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let spawn_err = |source| ProcessError::Spawn {
            name: spec.name.clone(),
            binary: spec.binary.clone(),
            source,
        };
        launcher()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(SpawnRequest {
                command,
                runtime: tokio::runtime::Handle::current(),
                reply,
            })
            .map_err(|_| spawn_err(std::io::Error::other("launcher thread gone")))?;
        let mut child = rx
            .await
            .map_err(|_| spawn_err(std::io::Error::other("launcher thread gone")))?
            .map_err(spawn_err)?;
        let pid = child.id().unwrap_or(0);
        debug!(name = %spec.name, pid, ?argv, "qemu started");

        let stderr = Arc::new(Mutex::new(StderrTail::default()));
        if let Some(pipe) = child.stderr.take() {
            let tail = stderr.clone();
            let name = spec.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    warn!(name, pid, "qemu: {line}");
                    tail.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_line(&line);
                }
            });
        }
        let mut process = QemuProcess {
            name: spec.name.clone(),
            child,
            pid,
            qmp_socket: spec.qmp_socket.clone(),
            stderr,
            status: None,
        };
        let start = Instant::now();
        while !process.qmp_socket.exists() {
            process.check_alive().await?;
            if start.elapsed() > DEFAULT_START_TIMEOUT {
                return Err(ProcessError::StartTimeout {
                    name: process.name.clone(),
                    path: process.qmp_socket.clone(),
                    after: DEFAULT_START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(process)
    }

    /// Connects to QMP, retrying while QEMU has the socket file but does not listen yet.
    pub async fn connect_qmp(&mut self) -> Result<Qmp, ProcessError> {
        let start = Instant::now();
        loop {
            match Qmp::connect(&self.qmp_socket).await {
                Ok(qmp) => return Ok(qmp),
                Err(QmpError::Connect { .. }) if start.elapsed() < DEFAULT_START_TIMEOUT => {
                    self.check_alive().await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => {
                    // A QEMU that fails during start-up may accept the connection and then
                    // exit: report its exit and stderr rather than the broken handshake.
                    for _ in 0..50 {
                        self.check_alive().await?;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// Errors with QEMU's exit status and stderr if it has exited.
    async fn check_alive(&mut self) -> Result<(), ProcessError> {
        if let Some(status) = self.try_wait()? {
            // Let the stderr task catch up with QEMU's last words.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(ProcessError::ExitedEarly {
                name: self.name.clone(),
                status,
                stderr: self.stderr_tail(),
            });
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// The last few KiB QEMU wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).text()
    }

    /// Sends SIGKILL (no-op once exited).
    pub fn kill(&mut self) -> Result<(), ProcessError> {
        if self.status.is_some() {
            return Ok(());
        }
        self.child
            .start_kill()
            .map_err(|source| ProcessError::Kill {
                name: self.name.clone(),
                source,
            })
    }

    /// Waits for QEMU to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self
            .child
            .wait()
            .await
            .map_err(|source| ProcessError::Wait {
                name: self.name.clone(),
                source,
            })?;
        self.status = Some(s);
        Ok(s)
    }

    /// The exit status if QEMU has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| ProcessError::Wait {
                name: self.name.clone(),
                source,
            })?;
        }
        Ok(self.status)
    }

    /// Kills QEMU and reaps it.
    pub async fn kill_and_wait(&mut self) -> Result<ExitStatus, ProcessError> {
        self.kill()?;
        self.wait().await
    }
}
