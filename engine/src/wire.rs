//! Moving records between the engine and the peer channel.
//!
//! Sending is split in two so that CPU work never stalls I/O and the other way round:
//! - an **encoder thread** owns the stream [`Encoder`] (which numbers records, keeps each
//!   epoch's counts and digest, and compresses pages) and turns [`Outgoing`] items into
//!   bytes;
//! - an **I/O task** writes those bytes to the encrypted channel.
//!
//! Both queues are bounded, so a slow backup slows the producer instead of growing memory.
//! One encoder serves every producer (checkpoints and disk writes), which is what makes a
//! `DISK_BARRIER(k)` or `CHECKPOINT_END(k)` count exactly the records of epoch k that precede
//! it in the stream.
//!
//! Receiving is a [`RecordReader`]: decrypted frames are fed to the incremental
//! [`Decoder`], which never holds more than one record; on the backup each record is also
//! checked by the [`EpochVerifier`] before the engine sees it.

use std::sync::Arc;

use remus_stream::{
    DecodeError, Decoder, DecoderConfig, DiskOpRef, DiskWriteRef, Encoder, EncodingChoice,
    EpochError, EpochSummary, EpochVerifier, Item, PageDataRef, PageEncoding, Record, RecordRef,
    StreamHeader, StreamKind, PAGE_SIZE,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use crate::copies;
use crate::peer::{PeerError, SecureReader, SecureWriter};

/// Device state is sent in chunks of this size, so no record is huge.
pub const DEVICE_STATE_CHUNK: usize = 1 << 20;
/// Encoded bytes accumulated before they are handed to the I/O task.
const FLUSH_BYTES: usize = 1 << 20;

/// Errors moving records.
#[derive(Debug, Error)]
pub enum WireError {
    /// The channel failed.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The peer sent bytes that are not a valid stream.
    #[error("stream from {peer}: {source}")]
    Decode { peer: String, source: DecodeError },
    /// The stream's header does not belong here.
    #[error("stream from {peer}: {reason}")]
    Header { peer: String, reason: String },
    /// A record could not be encoded (a bug: the engine built an invalid record).
    #[error("encoding {what}: {reason}")]
    Encode { what: String, reason: String },
    /// Connecting to the backup failed.
    #[error("connecting to the backup at {addr}: {source}")]
    Connect {
        /// The backup's address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The backup did not accept the connection in time.
    #[error("connecting to the backup at {addr}: timed out after {timeout:?}")]
    ConnectTimeout {
        /// The backup's address.
        addr: String,
        /// How long we waited.
        timeout: std::time::Duration,
    },
    /// The sender's encoder thread could not be started.
    #[error("starting the replication encoder thread: {0}")]
    EncoderThread(#[source] std::io::Error),
    /// The sender's threads stopped on this failure (the connection failed earlier).
    #[error("replication sender stopped: {0}")]
    SenderFailed(#[source] Arc<WireError>),
    /// The sender was closed without a failure (protection ended, or the connection was
    /// shut down in order).
    #[error("replication sender stopped: the connection was closed")]
    SenderClosed,
    /// The primary closed the replication stream after its `END` record, while the backup
    /// still expected records.
    #[error("stream from {peer}: the primary closed the stream after END")]
    ClosedAfterEnd {
        /// The primary's address.
        peer: String,
    },
}

/// One thing to send, in stream order.
#[derive(Debug)]
pub enum Outgoing {
    /// A record sent as is (CHECKPOINT_BEGIN, DOMAIN_CONFIG, DISK_WRITE, END, ACK …).
    Record(Record),
    /// A batch of pages to encode: `new` holds one page per pfn (ascending), `old` the
    /// previous copy of each for XOR-delta encoding.
    Pages {
        /// Epoch of the checkpoint.
        epoch: u64,
        /// Page frame numbers, strictly ascending, 1..=1024.
        pfns: Vec<u64>,
        /// New contents, `pfns.len() * 4096` bytes.
        new: Vec<u8>,
        /// Previous contents, same layout, when XOR-delta is allowed.
        old: Option<Vec<u8>>,
        /// How to encode.
        choice: EncodingChoice,
    },
    /// The device state of a checkpoint, sent in chunks.
    DeviceState {
        /// Epoch of the checkpoint.
        epoch: u64,
        /// The saved state.
        blob: Arc<Vec<u8>>,
    },
    /// A guest disk write, its data still in the buffer the NBD server read it into (the
    /// encoder copies it into the record: the one copy before encryption).
    DiskWrite {
        /// The epoch the VM was in when it wrote.
        epoch: u64,
        /// Which disk (index in the domain's disk list).
        disk: u16,
        /// Byte offset on the disk.
        offset: u64,
        /// What the write does.
        op: DiskWriteOp,
    },
    /// `DISK_BARRIER(epoch)` with the encoder's own counts of the epoch's disk writes.
    DiskBarrier(u64),
    /// `CHECKPOINT_END(epoch)` with the encoder's counts and digest; the reply carries what
    /// the epoch cost on the wire.
    CheckpointEnd {
        /// The checkpoint being closed.
        epoch: u64,
        /// Gets the epoch's encoded sizes once the END is encoded.
        done: Option<oneshot::Sender<SentStats>>,
    },
}

/// What a queued disk write does.
#[derive(Debug)]
pub enum DiskWriteOp {
    /// These bytes (shared with `blk-remus`, not copied).
    Data(bytes::Bytes),
    /// Zeroes over this many bytes.
    Zeroes(u32),
    /// Discard this many bytes.
    Trim(u32),
}

impl Outgoing {
    /// Names the item for errors: "PAGE_DATA of epoch 4", "CheckpointBegin record".
    pub fn describe(&self) -> String {
        match self {
            Outgoing::Record(r) => format!("{:?} record", r.record_type()),
            Outgoing::Pages { epoch, pfns, .. } => {
                format!("PAGE_DATA of epoch {epoch} ({} pages)", pfns.len())
            }
            Outgoing::DeviceState { epoch, .. } => format!("DEVICE_STATE of epoch {epoch}"),
            Outgoing::DiskWrite {
                epoch,
                disk,
                offset,
                ..
            } => format!("DISK_WRITE of epoch {epoch} (disk {disk}, offset {offset})"),
            Outgoing::DiskBarrier(epoch) => format!("DISK_BARRIER of epoch {epoch}"),
            Outgoing::CheckpointEnd { epoch, .. } => format!("CHECKPOINT_END of epoch {epoch}"),
        }
    }
}

/// What one checkpoint took on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SentStats {
    /// Page bytes before encoding.
    pub page_bytes_raw: u64,
    /// Page bytes in the stream (record bodies), after encoding.
    pub page_bytes_encoded: u64,
    /// Pages by encoding: raw, zero, lz4, xor+lz4.
    pub pages_by_encoding: [u64; 4],
}

/// The producing end of a replication stream.
#[derive(Clone, Debug)]
pub struct StreamSender {
    tx: mpsc::Sender<Outgoing>,
    failure: Failure,
    /// When the stream was opened: its progress until a [`DeliveryProbe`] says more.
    opened: std::time::Instant,
    delivery: Option<DeliveryProbe>,
}

/// A TCP socket's `TCP_INFO`, with the number of bytes the kernel filled in (older kernels
/// fill in fewer fields: check the offset of a field before reading it). The one place
/// that reads it (the drill's client uses it too).
pub fn tcp_info(socket: &impl std::os::fd::AsRawFd) -> Option<(libc::tcp_info, usize)> {
    // SAFETY: `tcp_info` is plain old data, so all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large and
    // lives across the call; `len` is updated to the size the kernel wrote. The fd belongs
    // to a socket the caller holds open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len as usize))
}

/// The bytes the peer's TCP acknowledged on a connection (Linux `TCP_INFO`,
/// `tcpi_bytes_acked`), and when that count last grew: progress that a local socket buffer
/// cannot fake. A peer that is gone or cut off acknowledges nothing, however much the
/// sender still manages to queue locally; a peer whose application stopped reading stops
/// once its receive window is full.
#[derive(Clone, Debug)]
pub struct DeliveryProbe {
    fd: Arc<std::os::fd::OwnedFd>,
    seen: Arc<std::sync::Mutex<(u64, std::time::Instant)>>,
}

impl DeliveryProbe {
    /// A probe of the TCP connection `socket` (its fd is duplicated).
    ///
    /// # Errors
    /// The fd cannot be duplicated.
    pub fn of(socket: &impl std::os::fd::AsFd) -> std::io::Result<Self> {
        Ok(Self {
            fd: Arc::new(socket.as_fd().try_clone_to_owned()?),
            seen: Arc::new(std::sync::Mutex::new((0, std::time::Instant::now()))),
        })
    }

    /// `tcpi_bytes_acked` now, if the kernel reports it.
    pub fn bytes_acked(&self) -> Option<u64> {
        let (info, len) = tcp_info(&*self.fd)?;
        // Kernels before 4.1 report a shorter struct without the field.
        (len >= std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8)
            .then_some(info.tcpi_bytes_acked)
    }

    /// When the peer last acknowledged new bytes (the probe's creation before any did).
    pub fn last_progress(&self) -> std::time::Instant {
        let acked = self.bytes_acked();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = acked.filter(|&b| b > seen.0) {
            *seen = (b, std::time::Instant::now());
        }
        seen.1
    }
}

/// The first failure of a sender's encoder thread or I/O task, shared with every
/// [`StreamSender`] so a producer learns why its queue closed.
type Failure = Arc<std::sync::Mutex<Option<Arc<WireError>>>>;

/// Records `e` as the sender's failure unless an earlier one is already recorded.
fn record_failure(failure: &Failure, e: WireError) {
    let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_none() {
        *f = Some(Arc::new(e));
    }
}

impl StreamSender {
    /// Queues one item; waits while the queue is full.
    ///
    /// # Errors
    /// [`WireError::SenderFailed`] with the cause when the connection has failed,
    /// [`WireError::SenderClosed`] when it was closed without one.
    pub async fn send(&self, item: Outgoing) -> Result<(), WireError> {
        self.tx.send(item).await.map_err(|_| self.gone())
    }

    /// The failure that stopped the sender, if one did.
    pub fn failure(&self) -> Option<Arc<WireError>> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the sender is gone: its recorded failure, or an orderly close.
    pub fn gone(&self) -> WireError {
        match self.failure() {
            Some(cause) => WireError::SenderFailed(cause),
            None => WireError::SenderClosed,
        }
    }

    /// True once the sending side has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// When the stream last made progress towards the peer: its TCP acknowledged new
    /// bytes ([`DeliveryProbe`]). Without a probe (a stream that is not a TCP connection)
    /// it never progressed past its opening, so an ACK deadline runs from the checkpoint
    /// alone: bytes merely written locally prove nothing.
    pub fn last_progress(&self) -> std::time::Instant {
        self.delivery
            .as_ref()
            .map_or(self.opened, DeliveryProbe::last_progress)
    }

    /// Measures progress by what the peer's TCP acknowledges from now on.
    pub fn set_delivery_probe(&mut self, probe: DeliveryProbe) {
        self.delivery = Some(probe);
    }
}

/// Starts the encoder thread and the I/O task for one stream; the header is sent first.
/// Dropping every [`StreamSender`] flushes and ends both.
///
/// # Errors
/// The header cannot be encoded (names too long).
pub fn spawn_sender<W>(
    header: StreamHeader,
    mut writer: SecureWriter<W>,
) -> Result<(StreamSender, tokio::task::JoinHandle<Result<(), WireError>>), WireError>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Outgoing>(256);
    let (btx, mut brx) = mpsc::channel::<Vec<u8>>(16);
    let failure: Failure = Arc::new(std::sync::Mutex::new(None));
    let mut encoder = Encoder::new();
    let mut first = Vec::new();
    encoder
        .header(&mut first, &header)
        .map_err(|e| WireError::Encode {
            what: "stream header".into(),
            reason: e.to_string(),
        })?;
    let fail = failure.clone();
    std::thread::Builder::new()
        .name(format!("remus-enc-{}", header.domain))
        .spawn(move || {
            let mut buf = first;
            let mut stats = SentStats::default();
            while let Some(item) = rx.blocking_recv() {
                if let Err(e) = encode_item(&mut encoder, &mut buf, item, &mut stats) {
                    tracing::error!(error = %e, "replication encoder stopped");
                    record_failure(&fail, e);
                    return;
                }
                if (buf.len() >= FLUSH_BYTES || rx.is_empty())
                    && btx.blocking_send(std::mem::take(&mut buf)).is_err()
                {
                    return;
                }
            }
            if !buf.is_empty() {
                let _ = btx.blocking_send(buf);
            }
        })
        .map_err(WireError::EncoderThread)?;
    let fail = failure.clone();
    let io = tokio::spawn(async move {
        let result: Result<(), WireError> = async {
            while let Some(bytes) = brx.recv().await {
                writer.send(&bytes).await?;
                if brx.is_empty() {
                    writer.flush().await?;
                }
            }
            writer.shutdown().await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = Arc::new(e);
                {
                    let mut f = fail.lock().unwrap_or_else(|p| p.into_inner());
                    if f.is_none() {
                        *f = Some(e.clone());
                    }
                }
                Err(WireError::SenderFailed(e))
            }
        }
    });
    Ok((
        StreamSender {
            tx,
            failure,
            opened: std::time::Instant::now(),
            delivery: None,
        },
        io,
    ))
}

fn encode_item(
    enc: &mut Encoder,
    buf: &mut Vec<u8>,
    item: Outgoing,
    stats: &mut SentStats,
) -> Result<(), WireError> {
    let err = |what: String| {
        move |e: remus_stream::EncodeError| WireError::Encode {
            what,
            reason: e.to_string(),
        }
    };
    match item {
        Outgoing::Record(r) => {
            let what = format!("{:?} record", r.record_type());
            enc.record(buf, &r).map_err(err(what))?;
        }
        Outgoing::Pages {
            epoch,
            pfns,
            new,
            old,
            choice,
        } => {
            let before = buf.len();
            let encoding = match &old {
                Some(old) => {
                    let mut reference = |pfn: u64| {
                        pfns.binary_search(&pfn)
                            .ok()
                            .map(|i| &old[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                    };
                    enc.page_data(buf, epoch, &pfns, &new, choice, &mut reference)
                }
                None => enc.page_data(
                    buf,
                    epoch,
                    &pfns,
                    &new,
                    choice,
                    &mut remus_stream::NoReference,
                ),
            }
            .map_err(err(format!("PAGE_DATA of epoch {epoch}")))?;
            stats.page_bytes_raw += new.len() as u64;
            stats.page_bytes_encoded += (buf.len() - before) as u64;
            copies::add(copies::Stage::Encode, (buf.len() - before) as u64);
            let slot = match encoding {
                PageEncoding::Raw => 0,
                PageEncoding::Zero => 1,
                PageEncoding::Lz4 => 2,
                PageEncoding::XorLz4 => 3,
            };
            stats.pages_by_encoding[slot] += pfns.len() as u64;
        }
        Outgoing::DeviceState { epoch, blob } => {
            enc.device_state(buf, epoch, &blob, DEVICE_STATE_CHUNK)
                .map_err(err(format!("DEVICE_STATE of epoch {epoch}")))?;
        }
        Outgoing::DiskWrite {
            epoch,
            disk,
            offset,
            op,
        } => {
            let op = match &op {
                DiskWriteOp::Data(d) => DiskOpRef::Data(d),
                DiskWriteOp::Zeroes(n) => DiskOpRef::Zeroes(*n),
                DiskWriteOp::Trim(n) => DiskOpRef::Trim(*n),
            };
            let write = DiskWriteRef {
                epoch,
                disk,
                offset,
                op,
            };
            enc.disk_write(buf, &write)
                .map_err(err(format!("DISK_WRITE of epoch {epoch}")))?;
        }
        Outgoing::DiskBarrier(epoch) => {
            enc.disk_barrier(buf, epoch)
                .map_err(err(format!("DISK_BARRIER of epoch {epoch}")))?;
        }
        Outgoing::CheckpointEnd { epoch, done } => {
            enc.checkpoint_end(buf, epoch)
                .map_err(err(format!("CHECKPOINT_END of epoch {epoch}")))?;
            let s = std::mem::take(stats);
            if let Some(done) = done {
                let _ = done.send(s);
            }
        }
    }
    Ok(())
}

/// One record as received.
#[derive(Debug)]
pub struct Received {
    /// Stream offset of the record (for error messages).
    pub offset: u64,
    /// The record.
    pub record: Record,
    /// The verifier's verdict, when the reader verifies epochs: `Ok(Some(summary))` on a
    /// `CHECKPOINT_END` that proves its checkpoint complete, an error when a rule broke.
    pub verdict: Result<Option<EpochSummary>, EpochError>,
}

/// Where a reader puts `PAGE_DATA` batches instead of returning them as owned records: the
/// backup decodes each batch straight out of the decoder's buffer into its staging place.
pub trait PageSink {
    /// Why the sink refused a batch.
    type Error;
    /// Takes one batch (already checked by the epoch verifier, when the reader verifies);
    /// `offset` is the record's stream offset, for messages.
    ///
    /// # Errors
    /// The sink's own refusal (a batch of the wrong checkpoint, pages that do not decode).
    fn pages(&mut self, offset: u64, batch: &PageDataRef<'_>) -> Result<(), Self::Error>;
}

/// A sink that takes no batch: [`RecordReader::next`] returns them as owned records.
struct NoSink;

impl PageSink for NoSink {
    type Error = std::convert::Infallible;
    fn pages(&mut self, _offset: u64, _batch: &PageDataRef<'_>) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// What [`RecordReader::next_with`] delivers.
#[derive(Debug)]
pub enum Incoming<E> {
    /// Any record but `PAGE_DATA`, owned.
    Record(Received),
    /// A `PAGE_DATA` batch, handed to the sink (unless the verifier refused it).
    Pages {
        /// Stream offset of the record.
        offset: u64,
        /// The batch's checkpoint.
        epoch: u64,
        /// The verifier's verdict on the record; the sink saw the batch only if it is `Ok`.
        verdict: Result<(), EpochError>,
        /// What the sink made of it.
        sunk: Result<(), E>,
    },
}

/// What one decoding step produced.
enum Step<E> {
    /// The stream header (kept in the reader).
    Header,
    /// A record or a sunk batch.
    Incoming(Incoming<E>),
}

/// Reads records from an encrypted channel.
pub struct RecordReader<R> {
    reader: SecureReader<R>,
    decoder: Decoder,
    verifier: Option<EpochVerifier>,
    chunk: Vec<u8>,
    pos: usize,
    header: Option<StreamHeader>,
    expect_kind: StreamKind,
    peer: String,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// A reader expecting a stream of `kind`; `verify` enables the epoch verifier (the
    /// backup verifies the replication stream).
    pub fn new(reader: SecureReader<R>, kind: StreamKind, verify: bool, peer: &str) -> Self {
        Self {
            reader,
            decoder: Decoder::new(DecoderConfig::default()),
            verifier: verify.then(EpochVerifier::default),
            chunk: Vec::new(),
            pos: 0,
            header: None,
            expect_kind: kind,
            peer: peer.to_string(),
        }
    }

    /// The peer's address, as errors name it.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The stream's header, once read.
    pub fn header(&self) -> Option<&StreamHeader> {
        self.header.as_ref()
    }

    /// Reads until the stream header has arrived and returns it.
    ///
    /// # Errors
    /// As [`next`](Self::next); a record before the header.
    pub async fn read_header(&mut self) -> Result<StreamHeader, WireError> {
        loop {
            if let Some(h) = &self.header {
                return Ok(h.clone());
            }
            match self.decode_buffered::<NoSink>(None)? {
                Some(Step::Header) => {}
                Some(Step::Incoming(_)) => {
                    return Err(WireError::Header {
                        peer: self.peer.clone(),
                        reason: "a record arrived before the stream header".into(),
                    })
                }
                None => self.refill().await?,
            }
        }
    }

    /// The next record; `Ok(None)` when the peer closed the channel after `END`.
    ///
    /// # Errors
    /// Channel failures, malformed streams, a header of the wrong kind.
    pub async fn next(&mut self) -> Result<Option<Received>, WireError> {
        loop {
            match self.decode_buffered::<NoSink>(None)? {
                Some(Step::Header) => {}
                Some(Step::Incoming(Incoming::Record(r))) => return Ok(Some(r)),
                // Without a sink every record comes back owned.
                Some(Step::Incoming(Incoming::Pages { .. })) => {}
                None => match self.refill().await {
                    Ok(()) => {}
                    Err(WireError::Peer(PeerError::Closed { .. })) if self.decoder.is_ended() => {
                        return Ok(None)
                    }
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// As [`next`](Self::next), but `PAGE_DATA` batches go to `sink`, decoded from the
    /// receive buffer without an owned copy of the record.
    ///
    /// # Errors
    /// As [`next`](Self::next).
    pub async fn next_with<S: PageSink>(
        &mut self,
        sink: &mut S,
    ) -> Result<Option<Incoming<S::Error>>, WireError> {
        loop {
            match self.decode_buffered(Some(&mut *sink))? {
                Some(Step::Header) => {}
                Some(Step::Incoming(i)) => return Ok(Some(i)),
                None => match self.refill().await {
                    Ok(()) => {}
                    Err(WireError::Peer(PeerError::Closed { .. })) if self.decoder.is_ended() => {
                        return Ok(None)
                    }
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Decodes the next item from the bytes already received; `None` when more are needed.
    fn decode_buffered<S: PageSink>(
        &mut self,
        mut sink: Option<&mut S>,
    ) -> Result<Option<Step<S::Error>>, WireError> {
        while self.pos < self.chunk.len() {
            let mut input = &self.chunk[self.pos..];
            let before = input.len();
            let item = self.decoder.decode_frame(&mut input);
            self.pos += before - input.len();
            copies::add(copies::Stage::Assemble, (before - input.len()) as u64);
            match item.map_err(|source| WireError::Decode {
                peer: self.peer.clone(),
                source,
            })? {
                Some(Item::Header(h)) => {
                    let h = h.clone();
                    self.accept_header(h)?;
                    return Ok(Some(Step::Header));
                }
                Some(Item::Record(frame)) => {
                    let verdict = match &mut self.verifier {
                        Some(v) => v.observe(&frame.record, frame.crc),
                        None => Ok(None),
                    };
                    if let (Some(sink), RecordRef::PageData(batch)) =
                        (sink.as_deref_mut(), &frame.record)
                    {
                        let verdict = verdict.map(|_| ());
                        let sunk = match verdict {
                            Ok(()) => sink.pages(frame.offset, batch),
                            Err(_) => Ok(()),
                        };
                        return Ok(Some(Step::Incoming(Incoming::Pages {
                            offset: frame.offset,
                            epoch: batch.epoch,
                            verdict,
                            sunk,
                        })));
                    }
                    if let RecordRef::PageData(pd) = &frame.record {
                        copies::add(
                            copies::Stage::OwnedRecord,
                            (pd.payload().len() + pd.count() * 8) as u64,
                        );
                    }
                    return Ok(Some(Step::Incoming(Incoming::Record(Received {
                        offset: frame.offset,
                        record: frame.record.to_owned_record(),
                        verdict,
                    }))));
                }
                None => {}
            }
        }
        Ok(None)
    }

    /// Receives the next frame's plaintext.
    async fn refill(&mut self) -> Result<(), WireError> {
        self.reader.recv(&mut self.chunk).await?;
        self.pos = 0;
        Ok(())
    }

    fn accept_header(&mut self, h: StreamHeader) -> Result<(), WireError> {
        if h.kind != self.expect_kind {
            return Err(WireError::Header {
                peer: self.peer.clone(),
                reason: format!(
                    "a {} stream arrived where a {} stream was expected",
                    h.kind.as_str(),
                    self.expect_kind.as_str()
                ),
            });
        }
        self.header = Some(h);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// Real loopback TCP: the probe sees the peer's kernel acknowledge bytes while it
    /// reads, and stops seeing progress once a peer that does not read has a full window.
    #[test]
    fn delivery_probe_follows_what_the_peer_acknowledges() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let probe = DeliveryProbe::of(&c).unwrap();
        // Every kernel this product supports (Linux >= 4.1) reports it: no skip.
        let start = probe
            .bytes_acked()
            .expect("TCP_INFO without tcpi_bytes_acked (Linux older than 4.1)");
        let born = probe.last_progress();
        c.write_all(&[7u8; 64 << 10]).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        server.read_exact(&mut buf).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(probe.bytes_acked().unwrap() >= start + (64 << 10));
        assert!(probe.last_progress() > born);
        // The server stops reading: fill its window and our buffer, then no more progress.
        c.set_nonblocking(true).unwrap();
        let chunk = vec![1u8; 64 << 10];
        loop {
            match c.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let stalled = probe.last_progress();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(probe.last_progress(), stalled, "no new bytes acknowledged");
        drop(server);
    }
}
