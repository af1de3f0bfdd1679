//! An async QMP client over a unix socket that can pass file descriptors.
//!
//! Why not qapi's own transport: the checkpoint path hands QEMU a socket with `getfd`, which
//! needs the descriptor sent as `SCM_RIGHTS` ancillary data together with the command bytes.
//! So the wire is ours; the commands and their replies are qapi-qmp's generated types.
//!
//! Shape: one reader task owns the receiving half. Each command gets a fresh numeric id and a
//! oneshot slot in the pending table before its bytes are written; the reader completes the
//! slot whose id the reply carries. Events go to a broadcast channel. Invariants:
//! - a caller waits at most its timeout: on expiry its slot is removed, a late reply is
//!   dropped by the reader;
//! - when the connection ends (EOF, I/O error, over-long line) every pending command fails
//!   with [`QmpError::Closed`] naming the cause, and later commands fail the same way;
//! - a line is at most [`MAX_LINE`] bytes: QEMU's input cannot make us allocate without bound.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use qapi_qmp::QmpCommand;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::message::{parse, Event, Message};

/// Longest QMP line accepted from QEMU (schema introspection replies are ~200 KiB).
pub const MAX_LINE: u64 = 16 << 20;
/// Events buffered per subscriber before the oldest are dropped (subscribers see `Lagged`).
const EVENT_CAPACITY: usize = 1024;
/// Default time a command may take before [`QmpError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the QMP client; each names the socket or the command.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp {path}: connect: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("qmp {path}: no greeting: {reason}")]
    Handshake { path: PathBuf, reason: String },
    #[error("qmp: {command}: QEMU replied {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("qmp: {command}: no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("qmp: {command}: connection closed: {reason}")]
    Closed { command: String, reason: String },
    #[error("qmp: {command}: send: {source}")]
    Send {
        command: String,
        source: std::io::Error,
    },
    #[error("qmp: {command}: encode arguments: {source}")]
    Encode {
        command: String,
        source: serde_json::Error,
    },
    #[error("qmp: {command}: unexpected reply {reply}: {source}")]
    Decode {
        command: String,
        reply: String,
        source: serde_json::Error,
    },
}

/// What the reader hands a waiting command.
type Reply = Result<Value, (String, String)>;

/// Commands in flight, and why the connection ended once it has.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    closed: Option<String>,
}

/// A negotiated QMP connection (capabilities already exchanged).
pub struct Qmp {
    /// Socket path, for messages.
    path: PathBuf,
    /// QEMU's version from the greeting.
    version: String,
    /// Sending half; the lock keeps each command's bytes (and its fd) contiguous.
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    /// Per-command timeout.
    timeout: Duration,
    reader: JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    ///
    /// # Errors
    /// [`QmpError::Connect`] if nothing listens there, [`QmpError::Handshake`] if QEMU does not
    /// greet within the timeout, any command error of `qmp_capabilities`.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::handshake(path, stream, DEFAULT_TIMEOUT).await
    }

    /// Performs the greeting and capability negotiation on a connected stream.
    pub async fn handshake(
        path: &Path,
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<Qmp, QmpError> {
        let (read, writer) = stream.into_split();
        let mut reader = BufReader::new(read);
        let handshake = |reason: String| QmpError::Handshake {
            path: path.to_owned(),
            reason,
        };
        let line = tokio::time::timeout(timeout, read_line(&mut reader))
            .await
            .map_err(|_| handshake(format!("nothing within {timeout:?}")))?
            .map_err(handshake)?;
        let version = match parse(&line) {
            Ok(Message::Greeting { version }) => version,
            Ok(other) => return Err(handshake(format!("first message was {other:?}"))),
            Err(e) => return Err(handshake(e.to_string())),
        };
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let reader = tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            path.display().to_string(),
        ));
        let qmp = Qmp {
            path: path.to_owned(),
            version,
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            events,
            timeout,
            reader,
        };
        qmp.execute(qapi_qmp::qmp_capabilities { enable: None })
            .await?;
        debug!(path = %qmp.path.display(), version = %qmp.version, "qmp connected");
        Ok(qmp)
    }

    /// QEMU's version as reported in the greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Changes how long each later command may wait for its reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs one command and decodes its reply.
    pub async fn execute<C: QmpCommand>(&self, command: C) -> Result<C::Ok, QmpError> {
        self.run(command, None).await
    }

    /// Runs one command with `fd` attached as `SCM_RIGHTS` (for `getfd`, `add-fd`).
    pub async fn execute_with_fd<C: QmpCommand>(
        &self,
        command: C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Ok, QmpError> {
        self.run(command, Some(fd)).await
    }

    async fn run<C: QmpCommand>(
        &self,
        command: C,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<C::Ok, QmpError> {
        let name = C::NAME;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes =
            serde_json::to_vec(&qapi_spec::Execute::with_id(command, id)).map_err(|source| {
                QmpError::Encode {
                    command: name.into(),
                    source,
                }
            })?;
        bytes.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if let Some(reason) = &pending.closed {
                return Err(QmpError::Closed {
                    command: name.into(),
                    reason: reason.clone(),
                });
            }
            pending.waiting.insert(id, tx);
        }
        // Removes the slot however this call ends (error, timeout, cancellation).
        let _slot = SlotGuard {
            pending: &self.pending,
            id,
        };
        {
            let writer = self.writer.lock().await;
            send_all(writer.as_ref(), &bytes, fd)
                .await
                .map_err(|source| QmpError::Send {
                    command: name.into(),
                    source,
                })?;
        }
        let reply = match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: name.into(),
                    after: self.timeout,
                })
            }
            Ok(Err(_)) => {
                let reason = lock(&self.pending)
                    .closed
                    .clone()
                    .unwrap_or_else(|| "reader stopped".into());
                return Err(QmpError::Closed {
                    command: name.into(),
                    reason,
                });
            }
            Ok(Ok(reply)) => reply,
        };
        match reply {
            Ok(value) => {
                serde_json::from_value::<C::Ok>(value.clone()).map_err(|source| QmpError::Decode {
                    command: name.into(),
                    reply: truncate(&value.to_string(), 200),
                    source,
                })
            }
            Err((class, desc)) => Err(QmpError::Command {
                command: name.into(),
                class,
                desc,
            }),
        }
    }
}

struct SlotGuard<'a> {
    pending: &'a Mutex<Pending>,
    id: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).waiting.remove(&self.id);
    }
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // The table stays consistent under every panic point (single inserts/removes).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Writes all of `bytes`; `fd` rides on the first `sendmsg` so QEMU has it when it parses
/// the command.
async fn send_all(
    stream: &UnixStream,
    bytes: &[u8],
    mut fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let res = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&bytes[sent..])];
            let fds = fd.map(|f| [f.as_raw_fd()]);
            let cmsgs: Vec<ControlMessage<'_>> = fds
                .as_ref()
                .map(|f| vec![ControlMessage::ScmRights(f)])
                .unwrap_or_default();
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match res {
            Ok(n) => {
                sent += n;
                fd = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one line of at most [`MAX_LINE`] bytes; the error says why there is none.
async fn read_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("end of stream".into());
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() as u64 > MAX_LINE {
            format!("message longer than {MAX_LINE} bytes")
        } else {
            "end of stream inside a message".into()
        });
    }
    Ok(line)
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    pending: Arc<Mutex<Pending>>,
    events: broadcast::Sender<Event>,
    path: String,
) {
    let reason = loop {
        let line = match read_line(&mut reader).await {
            Ok(line) => line,
            Err(reason) => break reason,
        };
        match parse(&line) {
            Ok(Message::Return { id, value }) => complete(&pending, &path, id, Ok(value)),
            Ok(Message::Error { id, class, desc }) => {
                complete(&pending, &path, id, Err((class, desc)))
            }
            Ok(Message::Event(event)) => {
                debug!(path, ?event, "qmp event");
                // No subscriber is fine: events nobody waits for are dropped.
                let _ = events.send(event);
            }
            Ok(Message::Greeting { .. }) => warn!(path, "qmp: second greeting ignored"),
            Err(e) => warn!(
                path,
                error = %e,
                line = %truncate(&String::from_utf8_lossy(&line), 200),
                "qmp: unparsable message ignored"
            ),
        }
    };
    debug!(path, reason, "qmp connection ended");
    let mut p = lock(&pending);
    p.closed = Some(reason);
    // Dropping the senders wakes every waiter with the close reason.
    p.waiting.clear();
}

fn complete(pending: &Mutex<Pending>, path: &str, id: Option<u64>, reply: Reply) {
    let slot = id.and_then(|id| lock(pending).waiting.remove(&id));
    match slot {
        Some(tx) => {
            let _ = tx.send(reply);
        }
        None => debug!(path, ?id, "qmp: reply for no waiting command (timed out?)"),
    }
}

#[cfg(test)]
mod tests {
    //! The client against a scripted peer on a socket pair (unit level; the integration tests
    //! run it against real QEMU).
    use super::*;
    use std::io::{BufRead, IoSliceMut, Write};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream as StdStream;

    use nix::sys::socket::{recvmsg, ControlMessageOwned};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}"#;

    /// Reads one command line from the peer side, with any fd that came with it.
    fn recv_command(peer: &StdStream) -> (serde_json::Value, Option<OwnedFd>) {
        let mut line = Vec::new();
        let mut fd = None;
        while !line.ends_with(b"\n") {
            let mut byte = [0u8; 1];
            let mut iov = [IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(
                peer.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .unwrap();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: the kernel just installed this descriptor for us; we own it.
                    fd = Some(unsafe { OwnedFd::from_raw_fd(fds[0]) });
                }
            }
            assert_eq!(msg.bytes, 1, "peer closed");
            line.push(byte[0]);
        }
        (serde_json::from_slice(&line).unwrap(), fd)
    }

    fn reply(peer: &mut StdStream, text: &str) {
        peer.write_all(text.as_bytes()).unwrap();
        peer.write_all(b"\r\n").unwrap();
    }

    /// Connects a client to a scripted peer that has answered the handshake.
    async fn connected() -> (Qmp, StdStream) {
        let (ours, mut peer) = StdStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = UnixStream::from_std(ours).unwrap();
        let peer_thread = std::thread::spawn(move || {
            reply(&mut peer, GREETING);
            let (cmd, _) = recv_command(&peer);
            assert_eq!(cmd["execute"], "qmp_capabilities");
            reply(
                &mut peer,
                &format!(r#"{{"return": {{}}, "id": {}}}"#, cmd["id"]),
            );
            peer
        });
        let qmp = Qmp::handshake(Path::new("test"), ours, Duration::from_secs(5))
            .await
            .unwrap();
        (qmp, peer_thread.join().unwrap())
    }

    #[tokio::test]
    async fn replies_errors_events_and_fds_travel_correctly() {
        let (qmp, peer) = connected().await;
        assert_eq!(qmp.version(), "7.2.0");
        let mut events = qmp.subscribe();
        let (probe_ours, probe_theirs) = StdStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut peer = peer;
            // getfd with an fd: reply after checking it arrived and is the probe socket.
            let (cmd, fd) = recv_command(&peer);
            assert_eq!(cmd["execute"], "getfd");
            assert_eq!(cmd["arguments"]["fdname"], "x");
            let mut got = StdStream::from(fd.expect("no fd with getfd"));
            got.write_all(b"through the passed fd\n").unwrap();
            // An event and a stray reply arrive before the answer.
            reply(
                &mut peer,
                r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}"#,
            );
            reply(&mut peer, r#"{"return": {}, "id": 999}"#);
            reply(&mut peer, "this is not json");
            reply(
                &mut peer,
                &format!(r#"{{"return": {{}}, "id": {}}}"#, cmd["id"]),
            );
            // stop fails with a typed error.
            let (cmd, fd) = recv_command(&peer);
            assert!(fd.is_none());
            assert_eq!(cmd["execute"], "stop");
            reply(
                &mut peer,
                &format!(
                    r#"{{"error": {{"class": "GenericError", "desc": "nope"}}, "id": {}}}"#,
                    cmd["id"]
                ),
            );
            // query-status: a reply of the wrong shape is a decode error.
            let (cmd, _) = recv_command(&peer);
            reply(
                &mut peer,
                &format!(r#"{{"return": {{"status": 3}}, "id": {}}}"#, cmd["id"]),
            );
            // cont: no reply, the connection closes.
            let (cmd, _) = recv_command(&peer);
            assert_eq!(cmd["execute"], "cont");
            drop(peer);
        });

        qmp.execute_with_fd(qapi_qmp::getfd { fdname: "x".into() }, probe_theirs.as_fd())
            .await
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&probe_ours)
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "through the passed fd\n");
        assert_eq!(events.recv().await.unwrap(), Event::Stop);

        match qmp.execute(qapi_qmp::stop {}).await {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("stop", "GenericError", "nope")
                );
            }
            other => panic!("stop: {other:?}"),
        }
        assert!(matches!(
            qmp.execute(qapi_qmp::query_status {}).await,
            Err(QmpError::Decode { .. })
        ));
        match qmp.execute(qapi_qmp::cont {}).await {
            Err(QmpError::Closed { command, reason }) => {
                assert_eq!(command, "cont");
                assert_eq!(reason, "end of stream");
            }
            other => panic!("cont: {other:?}"),
        }
        // Later commands fail at once with the same cause.
        assert!(matches!(
            qmp.execute(qapi_qmp::stop {}).await,
            Err(QmpError::Closed { .. })
        ));
        server.join().unwrap();
    }

    #[tokio::test]
    async fn handshake_fails_on_silence_or_a_non_greeting() {
        // (what the peer sends first, fragment of the expected error)
        let cases = [
            (None, "nothing within"),
            (Some(r#"{"return": {}}"#), "first message"),
        ];
        for (first, want) in cases {
            let (ours, mut peer) = StdStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            if let Some(line) = first {
                reply(&mut peer, line);
            }
            let ours = UnixStream::from_std(ours).unwrap();
            let err = Qmp::handshake(Path::new("peer"), ours, Duration::from_millis(100))
                .await
                .err()
                .unwrap();
            assert!(matches!(err, QmpError::Handshake { .. }), "{err}");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[tokio::test]
    async fn a_late_reply_is_not_taken_for_the_next_command() {
        let (mut qmp, peer) = connected().await;
        qmp.timeout = Duration::from_millis(100);
        let server = std::thread::spawn(move || {
            let mut peer = peer;
            let (first, _) = recv_command(&peer);
            let (second, _) = recv_command(&peer);
            // The first command's reply comes after its caller gave up, then the second's.
            reply(
                &mut peer,
                &format!(
                    r#"{{"return": {{"status": "paused", "running": false}}, "id": {}}}"#,
                    first["id"]
                ),
            );
            reply(
                &mut peer,
                &format!(
                    r#"{{"return": {{"status": "running", "running": true}}, "id": {}}}"#,
                    second["id"]
                ),
            );
            peer
        });
        assert!(matches!(
            qmp.execute(qapi_qmp::query_status {}).await,
            Err(QmpError::Timeout { .. })
        ));
        qmp.timeout = Duration::from_secs(5);
        let status = qmp.execute(qapi_qmp::query_status {}).await.unwrap();
        assert_eq!(status.status, qapi_qmp::RunState::running);
        drop(server.join().unwrap());
    }

    #[tokio::test]
    async fn over_long_line_closes_the_connection() {
        let (qmp, mut peer) = connected().await;
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..=(MAX_LINE >> 20) {
                if peer.write_all(&chunk).is_err() {
                    break;
                }
            }
            peer
        });
        let err = qmp.execute(qapi_qmp::stop {}).await.err().unwrap();
        match err {
            QmpError::Closed { reason, .. } => assert!(reason.contains("longer than"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(qmp);
        drop(writer.join().unwrap());
    }
}
