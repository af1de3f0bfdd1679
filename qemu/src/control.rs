//! Checkpoint operations on one QEMU over QMP: stop, cont, device state out and in.
//!
//! The recipe (measured on QEMU 7.2, see the project notes): guest RAM lives in a shared
//! file that the agent reads itself, so migration runs with `x-ignore-shared` and carries only
//! device state plus the small non-shared RAM blocks (firmware, option ROMs, ACPI tables).
//!
//! Primary, per epoch: [`VmControl::stop`] → (agent copies dirty RAM) →
//! [`VmControl::save_device_state`] → [`VmControl::cont`]. Backup, on activation: a QEMU
//! started with `-incoming defer` on the replica RAM → [`VmControl::enable_checkpointing`] →
//! [`VmControl::load_device_state`] → `cont` → [`VmControl::announce_self`].
//!
//! Invariants the caller keeps (QEMU enforces them by refusing, not by waiting):
//! - `save_device_state` on a stopped VM only: `migrate` on a running VM stops it only at the
//!   end, so RAM copied before that is inconsistent with the device state;
//! - `cont` between two saves: after a save QEMU is in `postmigrate` and refuses another
//!   `migrate` until it ran again;
//! - one save or load at a time per QEMU (they share QEMU's single migration state).
//!
//! Every operation reports how long it took; the engine publishes these as stop/save/cont
//! times.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qapi_qmp::{MigrationCapability, MigrationCapabilityStatus, MigrationStatus, RunState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tracing::debug;

use crate::qmp::{Event, Qmp, QmpError};

/// Name under which the state socket is handed to QEMU with `getfd`. Reusing one name is
/// safe: `getfd` replaces (and closes) a previous fd of that name, and `migrate` consumes it.
const STATE_FD_NAME: &str = "remus-state";
/// How often `query-migrate` is polled when no MIGRATION event arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Default bound on one device-state blob (it is ~0.3–1 MiB in practice).
pub const DEFAULT_MAX_STATE: usize = 256 << 20;
/// Default bound on one save or load.
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a checkpoint operation, naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("{op}: state socket: {source}")]
    Socket {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{op}: migration ended {status:?}: {desc}")]
    MigrationFailed {
        op: &'static str,
        status: MigrationStatus,
        desc: String,
    },
    #[error("{op}: not finished after {after:?} (last status {status:?})")]
    Timeout {
        op: &'static str,
        after: Duration,
        status: Option<MigrationStatus>,
    },
    #[error("save device state: more than {limit} bytes")]
    StateTooLarge { limit: usize },
}

/// Device state saved from a stopped VM.
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// QEMU's migration stream (without the shared RAM block).
    pub bytes: Vec<u8>,
    /// From `getfd` to the stream's end and `completed`.
    pub elapsed: Duration,
}

/// Parameters of `announce-self` (gratuitous ARP/RARP so switches learn the VM's new port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    pub initial_ms: i64,
    pub max_ms: i64,
    pub rounds: i64,
    pub step_ms: i64,
}

impl Default for Announce {
    /// The values that worked on QEMU 7.2, which requires all four.
    fn default() -> Self {
        Announce {
            initial_ms: 50,
            max_ms: 550,
            rounds: 5,
            step_ms: 100,
        }
    }
}

/// Checkpoint-level control of one QEMU.
pub struct VmControl {
    qmp: Qmp,
    /// Bound on one saved device state: QEMU's output must not grow our memory without limit.
    max_state: usize,
    /// Bound on one save or load.
    migration_timeout: Duration,
}

impl VmControl {
    pub fn new(qmp: Qmp) -> VmControl {
        VmControl {
            qmp,
            max_state: DEFAULT_MAX_STATE,
            migration_timeout: DEFAULT_MIGRATION_TIMEOUT,
        }
    }

    /// Changes the bounds on a save (size) and on a save or load (time).
    pub fn with_limits(mut self, max_state: usize, migration_timeout: Duration) -> VmControl {
        self.max_state = max_state;
        self.migration_timeout = migration_timeout;
        self
    }

    /// The QMP connection, for commands this type does not wrap.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Turns on `x-ignore-shared` (skip the shared RAM file) and `events` (MIGRATION events
    /// signal completion without polling). Needed on the primary before the first save and on
    /// the backup before `load_device_state`.
    pub async fn enable_checkpointing(&self) -> Result<Duration, ControlError> {
        let start = Instant::now();
        let capabilities = [
            MigrationCapability::x_ignore_shared,
            MigrationCapability::events,
        ]
        .into_iter()
        .map(|capability| MigrationCapabilityStatus {
            capability,
            state: true,
        })
        .collect();
        self.qmp
            .execute(qapi_qmp::migrate_set_capabilities { capabilities })
            .await?;
        Ok(start.elapsed())
    }

    /// Pauses the vCPUs; returns once QEMU reports them stopped (in-flight guest disk I/O is
    /// drained first, which is what can make this take tens of milliseconds).
    pub async fn stop(&self) -> Result<Duration, ControlError> {
        let start = Instant::now();
        self.qmp.execute(qapi_qmp::stop {}).await?;
        Ok(start.elapsed())
    }

    /// Resumes the vCPUs (from `paused` or `postmigrate`).
    pub async fn cont(&self) -> Result<Duration, ControlError> {
        let start = Instant::now();
        self.qmp.execute(qapi_qmp::cont {}).await?;
        Ok(start.elapsed())
    }

    /// The VM's run state.
    pub async fn query_status(&self) -> Result<RunState, ControlError> {
        Ok(self.qmp.execute(qapi_qmp::query_status {}).await?.status)
    }

    /// Gives QEMU one end of a fresh socket pair under [`STATE_FD_NAME`] (`getfd`) and
    /// returns the other end. Our copy of QEMU's end is closed, so the stream ends when
    /// QEMU closes its own.
    async fn hand_state_socket(&self, op: &'static str) -> Result<UnixStream, ControlError> {
        let (ours, theirs) = state_socket(op)?;
        self.qmp
            .execute_with_fd(
                qapi_qmp::getfd {
                    fdname: STATE_FD_NAME.into(),
                },
                theirs.as_fd(),
            )
            .await?;
        drop(theirs);
        Ok(ours)
    }

    /// Saves the device state of the stopped VM (see the module invariants).
    ///
    /// Hands QEMU one end of a socket pair and reads the other until QEMU closes it, while
    /// watching the migration reach `completed`.
    pub async fn save_device_state(&self) -> Result<DeviceState, ControlError> {
        const OP: &str = "save device state";
        let start = Instant::now();
        let mut events = self.qmp.subscribe();
        let ours = self.hand_state_socket(OP).await?;
        let read = async {
            let mut bytes = Vec::new();
            let limit = self.max_state as u64;
            let mut ours = ours;
            (&mut ours)
                .take(limit + 1)
                .read_to_end(&mut bytes)
                .await
                .map_err(|source| ControlError::Socket { op: OP, source })?;
            if bytes.len() as u64 > limit {
                return Err(ControlError::StateTooLarge {
                    limit: self.max_state,
                });
            }
            Ok(bytes)
        };
        let run = async {
            self.qmp
                .execute(qapi_qmp::migrate {
                    uri: Some(format!("fd:{STATE_FD_NAME}")),
                    channels: None,
                    detach: None,
                    resume: None,
                })
                .await?;
            self.wait_migration(OP, &mut events).await
        };
        let (bytes, done) = tokio::time::timeout(self.migration_timeout, async {
            tokio::try_join!(read, run)
        })
        .await
        .map_err(|_| ControlError::Timeout {
            op: OP,
            after: self.migration_timeout,
            status: None,
        })??;
        let _: () = done;
        let elapsed = start.elapsed();
        debug!(bytes = bytes.len(), ?elapsed, "device state saved");
        Ok(DeviceState { bytes, elapsed })
    }

    /// Loads device state into a QEMU started with `-incoming defer` (after
    /// [`enable_checkpointing`](Self::enable_checkpointing)). The VM is `paused` afterwards:
    /// the state came from a stopped VM; `cont` starts it.
    pub async fn load_device_state(&self, state: &[u8]) -> Result<Duration, ControlError> {
        const OP: &str = "load device state";
        let start = Instant::now();
        let mut events = self.qmp.subscribe();
        let ours = self.hand_state_socket(OP).await?;
        let write = async {
            let mut ours = ours;
            ours.write_all(state)
                .await
                .map_err(|source| ControlError::Socket { op: OP, source })?;
            // Ends QEMU's input; QEMU may also stop reading first (it knows the stream's end).
            let _ = ours.shutdown().await;
            Ok::<_, ControlError>(ours)
        };
        let run = async {
            self.qmp
                .execute(qapi_qmp::migrate_incoming {
                    uri: Some(format!("fd:{STATE_FD_NAME}")),
                    channels: None,
                    exit_on_error: None,
                })
                .await?;
            self.wait_migration(OP, &mut events).await
        };
        tokio::time::timeout(self.migration_timeout, async {
            tokio::try_join!(write, run)
        })
        .await
        .map_err(|_| ControlError::Timeout {
            op: OP,
            after: self.migration_timeout,
            status: None,
        })??;
        let elapsed = start.elapsed();
        debug!(bytes = state.len(), ?elapsed, "device state loaded");
        Ok(elapsed)
    }

    /// Sends gratuitous announcements from every NIC so the network learns the VM's port.
    pub async fn announce_self(&self, a: Announce) -> Result<Duration, ControlError> {
        let start = Instant::now();
        self.qmp
            .execute(qapi_qmp::announce_self(qapi_qmp::AnnounceParameters {
                id: None,
                interfaces: None,
                initial: a.initial_ms,
                max: a.max_ms,
                rounds: a.rounds,
                step: a.step_ms,
            }))
            .await?;
        Ok(start.elapsed())
    }

    /// Asks QEMU to exit. QEMU may close the connection before replying: that is success.
    pub async fn quit(&self) -> Result<(), ControlError> {
        match self.qmp.execute(qapi_qmp::quit {}).await {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until the current migration is `completed`, using MIGRATION events and, in case
    /// events lag or are off, `query-migrate` every [`POLL_INTERVAL`].
    async fn wait_migration(
        &self,
        op: &'static str,
        events: &mut broadcast::Receiver<Event>,
    ) -> Result<(), ControlError> {
        loop {
            let status = tokio::select! {
                ev = events.recv() => match ev {
                    Ok(Event::Migration { status }) => status,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    // The client is gone; the next query reports why.
                    Err(broadcast::error::RecvError::Closed) => self.migration_status().await?.0,
                },
                _ = tokio::time::sleep(POLL_INTERVAL) => self.migration_status().await?.0,
            };
            match status {
                MigrationStatus::completed => return Ok(()),
                MigrationStatus::failed | MigrationStatus::cancelled => {
                    let (status, desc) = self.migration_status().await?;
                    return Err(ControlError::MigrationFailed {
                        op,
                        status,
                        desc: desc.unwrap_or_else(|| "QEMU gave no reason".into()),
                    });
                }
                _ => {}
            }
        }
    }

    async fn migration_status(&self) -> Result<(MigrationStatus, Option<String>), ControlError> {
        let info = self.qmp.execute(qapi_qmp::query_migrate {}).await?;
        Ok((
            info.status.unwrap_or(MigrationStatus::none),
            info.error_desc,
        ))
    }
}

/// A connected socket pair: ours as a tokio stream, QEMU's as a plain fd.
fn state_socket(op: &'static str) -> Result<(UnixStream, OwnedFd), ControlError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ControlError::Socket {
        op,
        source: e.into(),
    })?;
    let ours = std::os::unix::net::UnixStream::from(ours);
    ours.set_nonblocking(true)
        .map_err(|source| ControlError::Socket { op, source })?;
    let ours = UnixStream::from_std(ours).map_err(|source| ControlError::Socket { op, source })?;
    Ok((ours, theirs))
}
