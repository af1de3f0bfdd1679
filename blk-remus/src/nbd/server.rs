//! The NBD connection state machine: `Handshake → Transmission → Closed`.
//!
//! Each connection runs a reader (the task that called [`NbdServer::serve_connection`]), one
//! task per request in flight (the backend call runs on the blocking pool), and a single writer
//! task that owns the write half and sends replies as requests complete. Requests in flight are
//! bounded by a byte budget ([`IN_FLIGHT_BUDGET`]) so a client cannot make us allocate without
//! limit. On `NBD_CMD_DISC`, EOF or a fatal protocol error the reader stops; the writer still
//! answers every request already accepted, then the connection closes.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn, Instrument};

use super::proto::*;
use crate::backend::{BackendError, BlockBackend};

/// Byte budget of requests in flight per connection (read buffers and write payloads).
pub const IN_FLIGHT_BUDGET: u32 = 128 << 20;
/// Unit of the in-flight budget semaphore (1 KiB, so the permit count fits `u32`).
const BUDGET_UNIT: u32 = 1024;

/// Fatal errors of an NBD connection. Each one ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket I/O failed.
    #[error("nbd: {during}: {source}")]
    Io {
        /// What the server was doing.
        during: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The client set handshake flags we do not know.
    #[error("nbd: handshake: unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The client did not ask for fixed newstyle negotiation.
    #[error("nbd: handshake: client flags {0:#x} lack FIXED_NEWSTYLE")]
    NotFixedNewstyle(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("nbd: handshake: bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// An option's payload is longer than we accept.
    #[error("nbd: handshake: option {opt} payload of {len} bytes exceeds {MAX_OPTION_LEN}")]
    OptionTooLong {
        /// Option number.
        opt: u32,
        /// Announced length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have (the protocol can only close).
    #[error("nbd: handshake: EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// A request did not start with the request magic.
    #[error("nbd: request: bad magic {0:#010x}")]
    BadRequestMagic(u32),
    /// A write announced a payload above the maximum; its payload cannot be trusted to be
    /// skipped, so the stream is unusable.
    #[error("nbd: request {cookie:#x}: write of {len} bytes at {offset} exceeds maximum payload {MAX_PAYLOAD}")]
    OversizeWrite {
        /// Client cookie.
        cookie: u64,
        /// Offset.
        offset: u64,
        /// Announced length.
        len: u32,
    },
}

fn io_err(during: &'static str) -> impl FnOnce(std::io::Error) -> NbdError {
    move |source| NbdError::Io { during, source }
}

/// One export the server offers.
#[derive(Clone)]
pub struct Export {
    /// Name clients ask for (`""` is the default export when it is configured so).
    pub name: String,
    /// Free-text description (sent in LIST and INFO replies when non-empty).
    pub description: String,
    /// The device served.
    pub backend: Arc<dyn BlockBackend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .finish()
    }
}

impl Export {
    /// Transmission flags for this export, derived from what the backend really does.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        if self.backend.read_only() {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if self.backend.can_multi_conn() {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// An NBD server offering a fixed set of exports.
#[derive(Debug, Clone)]
pub struct NbdServer {
    /// The exports, looked up by name during negotiation.
    exports: Arc<Vec<Export>>,
}

/// Outcome of negotiation.
enum Negotiated {
    /// Enter transmission with this export.
    Transmit(Export),
    /// The client aborted or went away cleanly.
    Closed,
}

/// One reply queued for the writer task.
struct Reply {
    cookie: u64,
    errno: u32,
    data: Option<Vec<u8>>,
    /// Released once the reply is written, so queued read data counts against the budget.
    _permit: Option<OwnedSemaphorePermit>,
}

impl NbdServer {
    /// A server offering `exports`.
    pub fn new(exports: Vec<Export>) -> Self {
        NbdServer {
            exports: Arc::new(exports),
        }
    }

    fn find(&self, name: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.name == name)
    }

    /// Accepts connections on a unix socket at `path` until `shutdown` completes. The socket
    /// file is created (a stale one removed) and removed again on return.
    ///
    /// # Errors
    /// [`NbdError::Io`] when the socket cannot be bound or accepting fails.
    pub async fn serve_unix(
        &self,
        path: &Path,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NbdError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(io_err("bind unix socket"))?;
        let r = self.serve_unix_listener(listener, shutdown).await;
        let _ = std::fs::remove_file(path);
        r
    }

    /// Accepts connections on a bound unix listener until `shutdown` completes.
    ///
    /// # Errors
    /// [`NbdError::Io`] when accepting fails.
    pub async fn serve_unix_listener(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NbdError> {
        tokio::pin!(shutdown);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => {
                    let (stream, _) = r.map_err(io_err("accept"))?;
                    let server = self.clone();
                    conns.spawn(async move { server.serve_logged(stream).await });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
        Ok(())
    }

    /// Accepts connections on a TCP listener until `shutdown` completes (tests, tools).
    ///
    /// # Errors
    /// [`NbdError::Io`] when accepting fails.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NbdError> {
        tokio::pin!(shutdown);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => {
                    let (stream, _) = r.map_err(io_err("accept"))?;
                    let _ = stream.set_nodelay(true);
                    let server = self.clone();
                    conns.spawn(async move { server.serve_logged(stream).await });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
        Ok(())
    }

    async fn serve_logged<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match self.serve_connection(stream).await {
            Ok(()) => debug!("nbd: connection closed"),
            Err(e) => warn!(error = %e, "nbd: connection closed on error"),
        }
    }

    /// Runs one connection to completion: negotiation, then transmission.
    ///
    /// # Errors
    /// The fatal [`NbdError`] that ended the connection; a clean close (DISC, ABORT, EOF
    /// between requests) is `Ok`.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::new(wr);
        let export = match self.negotiate(&mut rd, &mut wr).await? {
            Negotiated::Transmit(e) => e,
            Negotiated::Closed => return Ok(()),
        };
        info!(export = %export.name, size = export.backend.size(), "nbd: transmission");
        transmit(export, rd, wr).await
    }

    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Negotiated, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&hello)
            .await
            .map_err(io_err("send greeting"))?;
        wr.flush().await.map_err(io_err("send greeting"))?;

        let cflags = rd.read_u32().await.map_err(io_err("read client flags"))?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::UnknownClientFlags(cflags));
        }
        if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::NotFixedNewstyle(cflags));
        }
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;

        loop {
            let magic = match rd.read_u64().await {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(Negotiated::Closed)
                }
                Err(e) => return Err(io_err("read option")(e)),
            };
            if magic != IHAVEOPT {
                return Err(NbdError::BadOptionMagic(magic));
            }
            let opt = rd.read_u32().await.map_err(io_err("read option"))?;
            let len = rd.read_u32().await.map_err(io_err("read option"))?;
            if len > MAX_OPTION_LEN {
                return Err(NbdError::OptionTooLong { opt, len });
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data)
                .await
                .map_err(io_err("read option data"))?;
            debug!(opt, len, "nbd: option");
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = self.find(&name).cloned() else {
                        return Err(NbdError::UnknownExport(name));
                    };
                    let mut b = Vec::with_capacity(10 + 124);
                    b.extend_from_slice(&export.backend.size().to_be_bytes());
                    b.extend_from_slice(&export.transmission_flags().to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    wr.write_all(&b).await.map_err(io_err("send export"))?;
                    wr.flush().await.map_err(io_err("send export"))?;
                    return Ok(Negotiated::Transmit(export));
                }
                OPT_ABORT => {
                    // The client may already have closed; a failed ACK is not an error.
                    let _ = opt_reply(wr, opt, REP_ACK, &[]).await;
                    return Ok(Negotiated::Closed);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        opt_reply(wr, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                        continue;
                    }
                    for e in self.exports.iter() {
                        let mut b = Vec::new();
                        b.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        b.extend_from_slice(e.name.as_bytes());
                        b.extend_from_slice(e.description.as_bytes());
                        opt_reply(wr, opt, REP_SERVER, &b).await?;
                    }
                    opt_reply(wr, opt, REP_ACK, &[]).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, infos)) = parse_info_request(&data) else {
                        opt_reply(wr, opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                        continue;
                    };
                    let Some(export) = self.find(&name).cloned() else {
                        let msg = format!("unknown export {name:?}");
                        opt_reply(wr, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                        continue;
                    };
                    let mut b = Vec::new();
                    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    b.extend_from_slice(&export.backend.size().to_be_bytes());
                    b.extend_from_slice(&export.transmission_flags().to_be_bytes());
                    opt_reply(wr, opt, REP_INFO, &b).await?;
                    for info in infos {
                        let mut b = Vec::new();
                        b.extend_from_slice(&info.to_be_bytes());
                        match info {
                            INFO_NAME => b.extend_from_slice(export.name.as_bytes()),
                            INFO_DESCRIPTION if !export.description.is_empty() => {
                                b.extend_from_slice(export.description.as_bytes())
                            }
                            INFO_BLOCK_SIZE => {
                                b.extend_from_slice(&1u32.to_be_bytes());
                                b.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                                b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                            }
                            _ => continue,
                        }
                        opt_reply(wr, opt, REP_INFO, &b).await?;
                    }
                    opt_reply(wr, opt, REP_ACK, &[]).await?;
                    if opt == OPT_GO {
                        return Ok(Negotiated::Transmit(export));
                    }
                }
                _ => {
                    let msg = format!("option {opt} not supported");
                    opt_reply(wr, opt, REP_ERR_UNSUP, msg.as_bytes()).await?;
                }
            }
        }
    }
}

/// Parses the payload of INFO/GO: `u32 name_len, name, u16 n, n × u16`.
fn parse_info_request(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = String::from_utf8(d.get(4..name_end)?.to_vec()).ok()?;
    let n = u16::from_be_bytes(d.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let rest = d.get(name_end + 2..)?;
    if rest.len() != n * 2 {
        return None;
    }
    let infos = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    wr.write_all(&b)
        .await
        .map_err(io_err("send option reply"))?;
    wr.flush().await.map_err(io_err("send option reply"))
}

/// Checks a request against the export; `Some(errno)` when it must be refused.
fn validate(req: &Request, export: &Export) -> Option<i32> {
    let size = export.backend.size();
    let known_flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;
    if req.flags & !known_flags != 0 {
        return Some(libc::EINVAL);
    }
    if req.flags & CMD_FLAG_NO_HOLE != 0 && req.cmd != CMD_WRITE_ZEROES {
        return Some(libc::EINVAL);
    }
    let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match req.cmd {
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {}
        CMD_FLUSH => return None,
        _ => return Some(libc::EINVAL),
    }
    if writes && export.backend.read_only() {
        return Some(libc::EPERM);
    }
    if req.len == 0 {
        return Some(libc::EINVAL);
    }
    if req.cmd == CMD_READ && req.len > MAX_PAYLOAD {
        return Some(libc::EINVAL);
    }
    match req.offset.checked_add(u64::from(req.len)) {
        Some(end) if end <= size => None,
        _ if req.cmd == CMD_READ => Some(libc::EINVAL),
        _ => Some(libc::ENOSPC),
    }
}

fn budget_permits(len: u32) -> u32 {
    len.div_ceil(BUDGET_UNIT).max(1)
}

async fn transmit<R, W>(export: Export, mut rd: R, wr: BufWriter<W>) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(rx, wr));
    let budget = Arc::new(Semaphore::new((IN_FLIGHT_BUDGET / BUDGET_UNIT) as usize));
    let result = read_requests(&export, &mut rd, &tx, &budget).await;
    drop(tx);
    let wres = writer.await;
    result?;
    match wres {
        Ok(r) => r,
        Err(join) => Err(NbdError::Io {
            during: "reply writer",
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

async fn read_requests<R: AsyncRead + Unpin>(
    export: &Export,
    rd: &mut R,
    tx: &mpsc::UnboundedSender<Reply>,
    budget: &Arc<Semaphore>,
) -> Result<(), NbdError> {
    loop {
        let mut hdr = [0u8; Request::SIZE];
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_err("read request")(e)),
        }
        let req = Request::parse(&hdr).map_err(NbdError::BadRequestMagic)?;
        if req.cmd == CMD_DISC {
            debug!(cookie = req.cookie, "nbd: disconnect requested");
            return Ok(());
        }
        if req.cmd == CMD_WRITE && req.len > MAX_PAYLOAD {
            return Err(NbdError::OversizeWrite {
                cookie: req.cookie,
                offset: req.offset,
                len: req.len,
            });
        }
        let payload_len = if matches!(req.cmd, CMD_READ | CMD_WRITE) {
            req.len.min(MAX_PAYLOAD)
        } else {
            0
        };
        let permit = budget
            .clone()
            .acquire_many_owned(budget_permits(payload_len))
            .await
            .expect("budget semaphore is never closed");
        let payload = if req.cmd == CMD_WRITE {
            let mut buf = BytesMut::zeroed(req.len as usize);
            rd.read_exact(&mut buf)
                .await
                .map_err(io_err("read write payload"))?;
            Some(buf.freeze())
        } else {
            None
        };
        let span = tracing::debug_span!(
            "nbd_request",
            cookie = req.cookie,
            cmd = cmd_name(req.cmd),
            offset = req.offset,
            len = req.len
        );
        if let Some(errno) = validate(&req, export) {
            debug!(parent: &span, errno, "nbd: request refused");
            let _ = tx.send(Reply {
                cookie: req.cookie,
                errno: errno as u32,
                data: None,
                _permit: Some(permit),
            });
            continue;
        }
        let backend = export.backend.clone();
        let tx = tx.clone();
        tokio::spawn(
            async move {
                let cookie = req.cookie;
                let res = tokio::task::spawn_blocking(move || execute(&*backend, &req, payload))
                    .await
                    .unwrap_or_else(|join| {
                        Err(BackendError::Refused {
                            op: cmd_name(req.cmd),
                            offset: req.offset,
                            len: u64::from(req.len),
                            reason: format!("backend task failed: {join}"),
                        })
                    });
                let (errno, data) = match res {
                    Ok(data) => (0, data),
                    Err(e) => {
                        warn!(error = %e, "nbd: request {cookie:#x} failed");
                        (e.errno() as u32, None)
                    }
                };
                let _ = tx.send(Reply {
                    cookie,
                    errno,
                    data,
                    _permit: Some(permit),
                });
            }
            .instrument(span),
        );
    }
}

/// Runs one validated request against the backend (on a blocking thread).
fn execute(
    backend: &dyn BlockBackend,
    req: &Request,
    payload: Option<Bytes>,
) -> Result<Option<Vec<u8>>, BackendError> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    match req.cmd {
        CMD_READ => {
            let mut buf = vec![0u8; req.len as usize];
            backend.read_at(req.offset, &mut buf)?;
            Ok(Some(buf))
        }
        CMD_WRITE => {
            backend.write_at(req.offset, payload.unwrap_or_default(), fua)?;
            Ok(None)
        }
        CMD_FLUSH => backend.flush().map(|()| None),
        CMD_TRIM => backend.trim(req.offset, len, fua).map(|()| None),
        CMD_WRITE_ZEROES => {
            let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            backend
                .write_zeroes(req.offset, len, fua, may_unmap)
                .map(|()| None)
        }
        _ => Err(BackendError::Refused {
            op: cmd_name(req.cmd),
            offset: req.offset,
            len,
            reason: "unsupported command".into(),
        }),
    }
}

/// The connection's only writer: sends each completed reply, flushing when idle.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut rx: mpsc::UnboundedReceiver<Reply>,
    mut wr: BufWriter<W>,
) -> Result<(), NbdError> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(r) = next.take() {
            wr.write_all(&simple_reply(r.errno, r.cookie))
                .await
                .map_err(io_err("send reply"))?;
            if let Some(d) = &r.data {
                wr.write_all(d).await.map_err(io_err("send read data"))?;
            }
            next = rx.try_recv().ok();
        }
        wr.flush().await.map_err(io_err("send reply"))?;
    }
    let _ = wr.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FileBackend;

    fn export(size: u64, ro: bool) -> (tempfile::TempDir, Export) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        FileBackend::create(&p, size).unwrap();
        let b = FileBackend::open(&p, ro).unwrap();
        (
            dir,
            Export {
                name: "x".into(),
                description: String::new(),
                backend: Arc::new(b),
            },
        )
    }

    #[test]
    fn validate_table() {
        let (_d, rw) = export(1 << 20, false);
        let (_d2, ro) = export(1 << 20, true);
        let r = |cmd, flags, offset, len| Request {
            flags,
            cmd,
            cookie: 1,
            offset,
            len,
        };
        #[rustfmt::skip]
        let cases: &[(&Export, Request, Option<i32>)] = &[
            // in range, unaligned: fine
            (&rw, r(CMD_READ, 0, 1, 511), None),
            (&rw, r(CMD_WRITE, CMD_FLAG_FUA, 1000, 333), None),
            // read past the end: EINVAL; writes past the end: ENOSPC
            (&rw, r(CMD_READ, 0, (1 << 20) - 1, 2), Some(libc::EINVAL)),
            (&rw, r(CMD_WRITE, 0, 1 << 20, 1), Some(libc::ENOSPC)),
            (&rw, r(CMD_TRIM, 0, u64::MAX, 4096), Some(libc::ENOSPC)),
            (&rw, r(CMD_WRITE_ZEROES, 0, 1 << 19, (1 << 19) + 1), Some(libc::ENOSPC)),
            // zero length, oversize read, unknown command/flags
            (&rw, r(CMD_READ, 0, 0, 0), Some(libc::EINVAL)),
            (&rw, r(CMD_READ, 0, 0, MAX_PAYLOAD + 1), Some(libc::EINVAL)),
            (&rw, r(9, 0, 0, 1), Some(libc::EINVAL)),
            (&rw, r(CMD_WRITE, 1 << 4, 0, 1), Some(libc::EINVAL)),
            (&rw, r(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), Some(libc::EINVAL)),
            (&rw, r(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1), None),
            // flush ignores offset/len
            (&rw, r(CMD_FLUSH, 0, 0, 0), None),
            // read-only export: writes are EPERM, reads fine
            (&ro, r(CMD_WRITE, 0, 0, 1), Some(libc::EPERM)),
            (&ro, r(CMD_TRIM, 0, 0, 1), Some(libc::EPERM)),
            (&ro, r(CMD_READ, 0, 0, 1), None),
        ];
        for (i, (e, req, want)) in cases.iter().enumerate() {
            assert_eq!(validate(req, e), *want, "case {i}: {req:?}");
        }
        assert_eq!(ro.transmission_flags() & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        assert_eq!(ro.transmission_flags() & TFLAG_SEND_TRIM, 0);
        assert_ne!(rw.transmission_flags() & TFLAG_CAN_MULTI_CONN, 0);
    }

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("abc".into(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut huge = d.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&huge), None);
    }

    /// A raw client speaking the protocol by hand: malformed requests close the connection,
    /// and requests before them are still answered.
    #[tokio::test]
    async fn bad_magic_closes_after_answering() {
        let (_d, rw) = export(1 << 20, false);
        let server = NbdServer::new(vec![rw]);
        let (client, srv) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { server.serve_connection(srv).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut greet = [0u8; 18];
        rd.read_exact(&mut greet).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(greet[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        wr.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        // An unsupported option first (STARTTLS), then EXPORT_NAME.
        for (opt, data) in [(OPT_STARTTLS, &b""[..]), (OPT_EXPORT_NAME, &b"x"[..])] {
            wr.write_u64(IHAVEOPT).await.unwrap();
            wr.write_u32(opt).await.unwrap();
            wr.write_u32(data.len() as u32).await.unwrap();
            wr.write_all(data).await.unwrap();
        }
        let mut rep = [0u8; 20];
        rd.read_exact(&mut rep).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(rep[12..16].try_into().unwrap()),
            REP_ERR_UNSUP
        );
        let len = u32::from_be_bytes(rep[16..20].try_into().unwrap());
        let mut msg = vec![0u8; len as usize];
        rd.read_exact(&mut msg).await.unwrap();
        let mut exp = [0u8; 10];
        rd.read_exact(&mut exp).await.unwrap();
        assert_eq!(u64::from_be_bytes(exp[0..8].try_into().unwrap()), 1 << 20);
        let read = Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: 7,
            offset: 0,
            len: 8,
        };
        wr.write_all(&read.encode()).await.unwrap();
        wr.write_all(&[0xffu8; Request::SIZE]).await.unwrap();
        let mut r = [0u8; 16 + 8];
        rd.read_exact(&mut r).await.unwrap();
        assert_eq!(r[..16], simple_reply(0, 7));
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let err = task.await.unwrap().unwrap_err();
        assert!(
            matches!(err, NbdError::BadRequestMagic(0xffff_ffff)),
            "{err}"
        );
    }
}
