//! Setting up one replication session between the two agents: connect or accept, run the
//! peer-channel handshake, exchange stream headers, and hand the engine its ends.

use std::time::Duration;

use remus_stream::{Record, StreamHeader, StreamKind};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::warn;

use crate::backup::ReplyWriter;
use crate::peer::{self, ChannelAuth, Expect, Hello};
use crate::primary::{RepliesEnded, Reply};
use crate::wire::{spawn_sender, RecordReader, StreamSender, WireError};

/// Who is talking to whom about what.
#[derive(Clone, Debug)]
pub struct Identity {
    /// This node's name.
    pub node: String,
    /// The peer node's name (from the policy).
    pub peer_node: String,
    /// The replicated domain.
    pub domain: String,
}

/// The primary's ends of a session.
pub struct PrimarySession {
    /// Queue of outgoing records.
    pub sender: StreamSender,
    /// The I/O task writing them (its error says why the connection failed).
    pub io: tokio::task::JoinHandle<Result<(), WireError>>,
    /// Replies from the backup.
    pub replies: mpsc::Receiver<Reply>,
    /// The random id of this session.
    pub session_id: u64,
}

/// Connects to the backup at `addr` and starts a replication session.
///
/// # Errors
/// Connection, authentication and header errors.
pub async fn open_primary(
    addr: &str,
    auth: &ChannelAuth,
    id: &Identity,
    timeout: Duration,
) -> Result<PrimarySession, WireError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| WireError::ConnectTimeout {
            addr: addr.to_string(),
            timeout,
        })?
        .map_err(|source| WireError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let delivery = crate::wire::DeliveryProbe::of(&stream).ok();
    let (r, w) = stream.into_split();
    let hello = Hello::new(&id.node, &id.domain, "replication");
    let ch = peer::connect(r, w, auth, &hello, &id.peer_node, addr, timeout).await?;
    let session_id = rand::random::<u64>();
    let header = StreamHeader {
        kind: StreamKind::Replication,
        session_id,
        node: id.node.clone(),
        domain: id.domain.clone(),
    };
    let (mut sender, io) = spawn_sender(header, ch.writer)?;
    if let Some(d) = delivery {
        sender.set_delivery_probe(d);
    }
    let mut reader = RecordReader::new(ch.reader, StreamKind::Reply, false, addr);
    let (tx, replies) = mpsc::channel(64);
    tokio::spawn(async move {
        match reader.read_header().await {
            Ok(h) if h.session_id != session_id => {
                let _ = tx
                    .send(Reply::lost(RepliesEnded::WrongSession {
                        got: h.session_id,
                        expected: session_id,
                    }))
                    .await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Reply::lost(RepliesEnded::Stream(e))).await;
                return;
            }
        }
        loop {
            let reply = match reader.next().await {
                Ok(Some(r)) => match r.record {
                    Record::CheckpointAck { epoch } => Reply::Ack(epoch),
                    Record::CheckpointNack(n) => Reply::Nack {
                        epoch: n.epoch,
                        reason: format!("{}: {}", n.reason, n.message),
                    },
                    Record::DiskVerifyResult(r) => Reply::Verified(r),
                    Record::Control(json) => {
                        match serde_json::from_str::<crate::disk::Capabilities>(&json) {
                            Ok(c) => Reply::Capabilities(c),
                            Err(_) => {
                                warn!(%json, "ignoring an unknown control record on the reply stream");
                                continue;
                            }
                        }
                    }
                    Record::End => Reply::lost(RepliesEnded::Ended),
                    other => {
                        warn!(record = ?other.record_type(), "ignoring an unexpected reply record");
                        continue;
                    }
                },
                Ok(None) => Reply::lost(RepliesEnded::Closed),
                Err(e) => Reply::lost(RepliesEnded::Stream(e)),
            };
            let last = matches!(reply, Reply::Lost(_));
            if tx.send(reply).await.is_err() || last {
                return;
            }
        }
    });
    Ok(PrimarySession {
        sender,
        io,
        replies,
        session_id,
    })
}

/// The backup's ends of a session.
pub struct BackupSession {
    /// The replication stream (header already read).
    pub reader: RecordReader<OwnedReadHalf>,
    /// The reply stream (header already sent).
    pub replies: ReplyWriter<OwnedWriteHalf>,
    /// The primary's hello.
    pub remote: Hello,
    /// The replication header.
    pub header: StreamHeader,
}

/// Runs the responder's handshake on an accepted connection and exchanges headers.
///
/// # Errors
/// Authentication failures (an unauthenticated peer is refused before it sees any of our
/// data), a replication header for another domain, I/O errors.
pub async fn accept_backup(
    stream: TcpStream,
    auth: &ChannelAuth,
    node: &str,
    peer_node: &str,
    domains: Option<Vec<String>>,
    timeout: Duration,
) -> Result<BackupSession, WireError> {
    let addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let expect = Expect {
        local_node: node.to_string(),
        purpose: "replication".into(),
        peer_node: peer_node.to_string(),
        domains,
    };
    let ch = match peer::accept(r, w, auth, &expect, &addr, timeout).await {
        Ok(ch) => ch,
        // Not logged here: anyone can cause this, so the caller counts it and logs at a
        // limited rate (remusd's listener); the error names the address.
        Err(e) => return Err(e.into()),
    };
    let mut reader = RecordReader::new(ch.reader, StreamKind::Replication, true, &addr);
    let header = tokio::time::timeout(timeout, reader.read_header())
        .await
        .map_err(|_| WireError::Header {
            peer: addr.clone(),
            reason: format!("no stream header within {timeout:?}"),
        })??;
    if header.domain != ch.remote.domain || header.node != ch.remote.node {
        return Err(WireError::Header {
            peer: addr,
            reason: format!(
                "stream header names node {:?} domain {:?}, the handshake said {:?} {:?}",
                header.node, header.domain, ch.remote.node, ch.remote.domain
            ),
        });
    }
    let replies = ReplyWriter::start(ch.writer, node, &header.domain, header.session_id).await?;
    Ok(BackupSession {
        reader,
        replies,
        remote: ch.remote,
        header,
    })
}
