//! The relay backend, for kernels without sch_plug: the agent sits between QEMU's
//! `-netdev stream` socket and a tap it owns, and holds guest→network frames per epoch in
//! memory. Network→guest frames pass straight through.
//!
//! Tasks (all aborted by teardown or drop):
//! - *acceptor*: listens on the unix socket before QEMU starts (QEMU 7.2 connects once and
//!   never reconnects) and accepts one connection at a time; more are refused and counted;
//! - *guest reader* (per connection): splits the stream into frames ([`frame`]) and hands
//!   them, in batches, to the relay task; a malformed stream closes the connection;
//! - *relay task*: the only owner of the held frames ([`hold::Hold`]) and of writes to the
//!   tap; commands (`buffer`, `release`, …) arrive on a channel, so a command and the frames
//!   around it are ordered without locks. A frame read before `buffer(k)` was processed may
//!   be counted in epoch `k + 1`: output is only ever held longer, never released early;
//! - *tap reader*: tap → stream, dropping (and counting) frames while QEMU is not connected.
//!
//! The channel from the guest reader is bounded: when frames pass through (not holding) a
//! slow tap pushes back on QEMU instead of growing memory; when holding, the byte limit
//! bounds memory.

pub mod frame;
pub mod hold;
pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::{JoinHandle, JoinSet};

use crate::buffer::{BackendKind, EgressBuffer, EgressError};
use crate::epoch::{EgressStats, Epoch, EpochError, EpochStats};
use crate::netns::Netns;
use crate::plug::msg;
use crate::plug::rtnl::{Rtnl, RtnlError};
use frame::FrameReader;
use hold::{Accept, Hold};

/// How long a start waits for a just-dropped relay of the same NIC to close its tap.
const TAP_BUSY_WAIT: Duration = Duration::from_secs(3);

/// Failures of the relay backend.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error("relay {tap}: listen on {}: {source}", path.display())]
    Listen {
        tap: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("relay {tap}: {} is in use by a live listener", path.display())]
    SocketInUse { tap: String, path: PathBuf },
    #[error("relay {tap}: create tap in {netns}: {source}")]
    Tap {
        tap: String,
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("relay {tap}: {source}")]
    Netlink {
        tap: String,
        #[source]
        source: RtnlError,
    },
    #[error("relay {tap}: bridge {bridge} not found")]
    BridgeNotFound { tap: String, bridge: String },
    #[error("relay {tap}: {op}: the relay task has stopped")]
    Stopped { tap: String, op: &'static str },
}

/// How to build a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The unix socket QEMU connects to (`addr.path=`).
    pub socket_path: PathBuf,
    /// The tap the relay creates and owns.
    pub tap: String,
    /// A bridge to attach the tap to (in the same namespace).
    pub bridge: Option<String>,
    /// The namespace of the tap (and bridge).
    pub netns: Netns,
    /// The most bytes held at once.
    pub limit_bytes: u64,
    /// How many closed epochs may await release at once (the engine's pipeline depth).
    pub max_closed_epochs: usize,
}

impl RelayConfig {
    /// A relay on `socket_path` ↔ `tap` in the current namespace with default limits.
    pub fn new(socket_path: impl Into<PathBuf>, tap: impl Into<String>) -> Self {
        Self {
            socket_path: socket_path.into(),
            tap: tap.into(),
            bridge: None,
            netns: Netns::current(),
            limit_bytes: crate::plug::DEFAULT_LIMIT_BYTES,
            max_closed_epochs: DEFAULT_MAX_CLOSED,
        }
    }
}

/// The default pipeline depth of the relay.
pub const DEFAULT_MAX_CLOSED: usize = 8;

/// Whether QEMU is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Listening; QEMU has not connected yet.
    Waiting,
    /// QEMU is connected.
    Connected,
    /// QEMU was connected and went away.
    Disconnected,
}

/// Relay-specific counters (besides the epoch statistics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Frames written to the tap (released or passed).
    pub to_network_frames: u64,
    /// Bytes written to the tap.
    pub to_network_bytes: u64,
    /// Frames the tap refused (e.g. the tap is down).
    pub tap_write_errors: u64,
    /// Frames forwarded from the tap to QEMU.
    pub to_guest_frames: u64,
    /// Frames from the tap dropped because QEMU was not connected.
    pub to_guest_dropped: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Connections refused because one was active.
    pub rejected_connections: u64,
    /// Connections closed for a malformed stream.
    pub stream_errors: u64,
}

#[derive(Default)]
struct Shared {
    to_network_frames: AtomicU64,
    to_network_bytes: AtomicU64,
    tap_write_errors: AtomicU64,
    to_guest_frames: AtomicU64,
    to_guest_dropped: AtomicU64,
    connections: AtomicU64,
    rejected_connections: AtomicU64,
    stream_errors: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> RelayCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayCounters {
            to_network_frames: g(&self.to_network_frames),
            to_network_bytes: g(&self.to_network_bytes),
            tap_write_errors: g(&self.tap_write_errors),
            to_guest_frames: g(&self.to_guest_frames),
            to_guest_dropped: g(&self.to_guest_dropped),
            connections: g(&self.connections),
            rejected_connections: g(&self.rejected_connections),
            stream_errors: g(&self.stream_errors),
        }
    }
}

enum Cmd {
    Buffer(Epoch, oneshot::Sender<Result<(), EpochError>>),
    Release(Epoch, oneshot::Sender<Result<EpochStats, EpochError>>),
    Indefinite(oneshot::Sender<Result<(), EpochError>>),
    SetLimit(u64, oneshot::Sender<()>),
    Stats(oneshot::Sender<EgressStats>),
    TearDown(oneshot::Sender<()>),
}

/// An egress buffer relaying QEMU's stream netdev to a tap.
pub struct RelayBuffer {
    /// The configuration it was started with.
    cfg: RelayConfig,
    /// Commands to the relay task.
    cmds: mpsc::Sender<Cmd>,
    /// QEMU's connection state.
    conn: watch::Receiver<ConnState>,
    /// Counters updated by the tasks.
    shared: Arc<Shared>,
    /// The tap's ifindex.
    tap_index: u32,
    /// Every task, aborted on teardown/drop.
    tasks: Vec<JoinHandle<()>>,
    /// From `max_closed_epochs`.
    max_closed: usize,
}

impl Drop for RelayBuffer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.cfg.socket_path);
    }
}

/// Binds `path`, replacing a stale socket file but never a live listener.
async fn listen(tap: &str, path: &Path) -> Result<UnixListener, RelayError> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(RelayError::SocketInUse {
                tap: tap.to_string(),
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| RelayError::Listen {
        tap: tap.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

impl RelayBuffer {
    /// Creates the tap (attached to the bridge, up), listens on the socket and starts the
    /// tasks. QEMU may connect as soon as this returns. Must run inside a tokio runtime.
    pub async fn start(cfg: RelayConfig) -> Result<Self, RelayError> {
        let tap_name = cfg.tap.clone();
        let nl = |source| RelayError::Netlink {
            tap: tap_name.clone(),
            source,
        };
        // A relay of the same NIC dropped a moment ago (its VM killed, a new one started)
        // closes its tap asynchronously (its tasks are aborted, not joined): until then the
        // exclusive create reports EBUSY. Wait for it a little; a tap held for longer
        // belongs to someone else and is an error.
        let busy_until = tokio::time::Instant::now() + TAP_BUSY_WAIT;
        let tap_fd = loop {
            match tap::create(&cfg.tap, &cfg.netns) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && tokio::time::Instant::now() < busy_until =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                r => {
                    break r.map_err(|source| RelayError::Tap {
                        tap: cfg.tap.clone(),
                        netns: cfg.netns.to_string(),
                        source,
                    })?
                }
            }
        };
        let rtnl = Rtnl::open(&cfg.netns).map_err(nl)?;
        let tap_index = link_index(&rtnl, &cfg.tap)
            .await
            .map_err(nl)?
            .ok_or_else(|| RelayError::Tap {
                tap: cfg.tap.clone(),
                netns: cfg.netns.to_string(),
                source: io::Error::other("created but not visible over netlink"),
            })?;
        if let Some(bridge) = &cfg.bridge {
            let br = link_index(&rtnl, bridge)
                .await
                .map_err(nl)?
                .ok_or_else(|| RelayError::BridgeNotFound {
                    tap: cfg.tap.clone(),
                    bridge: bridge.clone(),
                })?;
            rtnl.request(
                format!("attach {} to {bridge}", cfg.tap),
                msg::set_link_master(tap_index, br),
            )
            .await
            .map_err(nl)?;
        }
        rtnl.request(format!("set {} up", cfg.tap), msg::set_link_up(tap_index))
            .await
            .map_err(nl)?;
        let listener = listen(&cfg.tap, &cfg.socket_path).await?;
        // SAFETY: an OwnedFd's raw fd is valid, open and unchanging for as long as the
        // OwnedFd lives, and the AsyncFd owns it from here on.
        let registered = unsafe { AsyncFd::register(tap_fd) };
        let tap = Arc::new(registered.map_err(|e| RelayError::Tap {
            tap: cfg.tap.clone(),
            netns: cfg.netns.to_string(),
            source: e.into_parts().1,
        })?);

        let shared = Arc::new(Shared::default());
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (frames_tx, frames_rx) = mpsc::channel(64);
        let (conn_tx, conn_rx) = watch::channel(ConnState::Waiting);
        let writer: Arc<Mutex<Option<OwnedWriteHalf>>> = Arc::new(Mutex::new(None));
        let hold = Hold::new(cfg.max_closed_epochs, cfg.limit_bytes);
        let max_closed = hold.max_closed();

        let tasks = vec![
            tokio::spawn(relay_task(
                hold,
                cmd_rx,
                frames_rx,
                tap.clone(),
                shared.clone(),
            )),
            tokio::spawn(tap_reader(tap, writer.clone(), shared.clone())),
            tokio::spawn(acceptor(
                listener,
                frames_tx,
                writer,
                conn_tx,
                shared.clone(),
            )),
        ];
        tracing::info!(tap = %cfg.tap, socket = %cfg.socket_path.display(), "relay egress buffer listening");
        Ok(Self {
            cfg,
            cmds: cmd_tx,
            conn: conn_rx,
            shared,
            tap_index,
            tasks,
            max_closed,
        })
    }

    /// The socket QEMU must connect to.
    pub fn socket_path(&self) -> &Path {
        &self.cfg.socket_path
    }

    /// The tap's name.
    pub fn tap(&self) -> &str {
        &self.cfg.tap
    }

    /// The tap's ifindex (in its namespace).
    pub fn tap_index(&self) -> u32 {
        self.tap_index
    }

    /// The QEMU `-netdev` value for this relay, e.g. `stream,id=n0,server=off,...`.
    pub fn qemu_netdev(&self, id: &str) -> String {
        format!(
            "stream,id={id},server=off,addr.type=unix,addr.path={}",
            self.cfg.socket_path.display()
        )
    }

    /// QEMU's connection state now.
    pub fn connection(&self) -> ConnState {
        *self.conn.borrow()
    }

    /// Waits until QEMU has connected (returns at once if it already did).
    pub async fn wait_connected(&mut self) -> Result<(), RelayError> {
        self.conn
            .wait_for(|s| *s != ConnState::Waiting)
            .await
            .map(|_| ())
            .map_err(|_| self.stopped("wait_connected"))
    }

    /// The relay's own counters.
    pub fn relay_counters(&self) -> RelayCounters {
        self.shared.snapshot()
    }

    fn stopped(&self, op: &'static str) -> RelayError {
        RelayError::Stopped {
            tap: self.cfg.tap.clone(),
            op,
        }
    }

    async fn call<T>(
        &self,
        op: &'static str,
        make: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, RelayError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(make(tx))
            .await
            .map_err(|_| self.stopped(op))?;
        rx.await.map_err(|_| self.stopped(op))
    }
}

async fn link_index(rtnl: &Rtnl, name: &str) -> Result<Option<u32>, RtnlError> {
    match rtnl
        .request(format!("get link {name}"), msg::get_link(name))
        .await
    {
        Ok(answers) => Ok(answers.into_iter().find_map(|a| match a {
            netlink_packet_route::RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
            _ => None,
        })),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl EgressBuffer for RelayBuffer {
    fn kind(&self) -> BackendKind {
        BackendKind::Relay
    }

    fn max_closed_epochs(&self) -> usize {
        self.max_closed
    }

    async fn buffer(&mut self, epoch: Epoch) -> Result<(), EgressError> {
        Ok(self.call("buffer", |tx| Cmd::Buffer(epoch, tx)).await??)
    }

    async fn release(&mut self, epoch: Epoch) -> Result<EpochStats, EgressError> {
        Ok(self.call("release", |tx| Cmd::Release(epoch, tx)).await??)
    }

    async fn release_indefinite(&mut self) -> Result<(), EgressError> {
        Ok(self.call("release_indefinite", Cmd::Indefinite).await??)
    }

    async fn set_limit(&mut self, bytes: u64) -> Result<(), EgressError> {
        Ok(self
            .call("set_limit", |tx| Cmd::SetLimit(bytes, tx))
            .await?)
    }

    async fn stats(&mut self) -> Result<EgressStats, EgressError> {
        Ok(self.call("stats", Cmd::Stats).await?)
    }

    async fn teardown(&mut self) -> Result<(), EgressError> {
        // The relay task may already be gone; teardown still stops everything.
        let _ = self.call("teardown", Cmd::TearDown).await;
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.cfg.socket_path);
        Ok(())
    }
}

/// Writes one frame to the tap.
async fn tap_write(tap: &AsyncFd<OwnedFd>, frame: &[u8]) -> io::Result<()> {
    loop {
        let mut guard = tap.writable().await?;
        let r = guard.try_io(|fd| {
            // SAFETY: `frame` is a valid, initialised slice for the duration of the call and
            // the fd is the tap we own; a tap write consumes exactly one frame.
            let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        match r {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all_frames(tap: &AsyncFd<OwnedFd>, frames: &[Vec<u8>], shared: &Shared) {
    for f in frames {
        match tap_write(tap, f).await {
            Ok(()) => {
                shared.to_network_frames.fetch_add(1, Ordering::Relaxed);
                shared
                    .to_network_bytes
                    .fetch_add(f.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                shared.tap_write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "relay: tap write failed");
            }
        }
    }
}

async fn relay_task(
    mut hold: Hold,
    mut cmds: mpsc::Receiver<Cmd>,
    mut frames: mpsc::Receiver<Vec<Vec<u8>>>,
    tap: Arc<AsyncFd<OwnedFd>>,
    shared: Arc<Shared>,
) {
    let mut frames_open = true;
    loop {
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    Cmd::Buffer(e, tx) => { let _ = tx.send(hold.close(e)); }
                    Cmd::Release(e, tx) => {
                        match hold.release(e) {
                            Ok((stats, out)) => {
                                write_all_frames(&tap, &out, &shared).await;
                                let _ = tx.send(Ok(stats));
                            }
                            Err(err) => { let _ = tx.send(Err(err)); }
                        }
                    }
                    Cmd::Indefinite(tx) => {
                        match hold.release_indefinite() {
                            Ok(out) => {
                                write_all_frames(&tap, &out, &shared).await;
                                let _ = tx.send(Ok(()));
                            }
                            Err(err) => { let _ = tx.send(Err(err)); }
                        }
                    }
                    Cmd::SetLimit(l, tx) => { hold.set_limit(l); let _ = tx.send(()); }
                    Cmd::Stats(tx) => { let _ = tx.send(hold.stats()); }
                    Cmd::TearDown(tx) => { hold.tear_down(); let _ = tx.send(()); return; }
                }
            }
            batch = frames.recv(), if frames_open => {
                let Some(batch) = batch else { frames_open = false; continue };
                let mut pass = Vec::new();
                for f in batch {
                    if let Accept::Pass(f) = hold.accept(f) {
                        pass.push(f);
                    }
                }
                if !pass.is_empty() {
                    write_all_frames(&tap, &pass, &shared).await;
                }
            }
        }
    }
}

async fn tap_reader(
    tap: Arc<AsyncFd<OwnedFd>>,
    writer: Arc<Mutex<Option<OwnedWriteHalf>>>,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 4 + 65536];
    loop {
        let Ok(mut guard) = tap.readable().await else {
            return;
        };
        let r = guard.try_io(|fd| {
            let dst = &mut buf[4..];
            // SAFETY: `dst` is a valid writable buffer of `dst.len()` bytes for the call;
            // the fd is the tap we own; a tap read returns at most one frame.
            let n = unsafe { libc::read(fd.as_raw_fd(), dst.as_mut_ptr().cast(), dst.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let n = match r {
            Err(_would_block) => continue,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "relay: tap read failed; network->guest direction stops");
                return;
            }
        };
        buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
        let mut w = writer.lock().await;
        match w.as_mut() {
            Some(stream) => {
                if stream.write_all(&buf[..4 + n]).await.is_ok() {
                    shared.to_guest_frames.fetch_add(1, Ordering::Relaxed);
                } else {
                    *w = None;
                    shared.to_guest_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                shared.to_guest_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn acceptor(
    listener: UnixListener,
    frames: mpsc::Sender<Vec<Vec<u8>>>,
    writer: Arc<Mutex<Option<OwnedWriteHalf>>>,
    conn: watch::Sender<ConnState>,
    shared: Arc<Shared>,
) {
    let conn = Arc::new(conn);
    let mut readers = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        while readers.try_join_next().is_some() {}
        if *conn.borrow() == ConnState::Connected {
            shared.rejected_connections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("relay: refused a second connection while QEMU is connected");
            continue;
        }
        let (rd, wr) = stream.into_split();
        *writer.lock().await = Some(wr);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        conn.send_replace(ConnState::Connected);
        readers.spawn(guest_reader(
            rd,
            frames.clone(),
            writer.clone(),
            conn.clone(),
            shared.clone(),
        ));
    }
}

async fn guest_reader(
    mut rd: OwnedReadHalf,
    frames: mpsc::Sender<Vec<Vec<u8>>>,
    writer: Arc<Mutex<Option<OwnedWriteHalf>>>,
    conn: Arc<watch::Sender<ConnState>>,
    shared: Arc<Shared>,
) {
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 256 * 1024];
    'conn: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        reader.push(&buf[..n]);
        let mut batch = Vec::new();
        loop {
            match reader.next_frame() {
                Ok(Some(f)) => batch.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    shared.stream_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "relay: malformed stream from QEMU; closing it");
                    if !batch.is_empty() {
                        let _ = frames.send(batch).await;
                    }
                    break 'conn;
                }
            }
        }
        if !batch.is_empty() && frames.send(batch).await.is_err() {
            break;
        }
    }
    *writer.lock().await = None;
    conn.send_replace(ConnState::Disconnected);
}
