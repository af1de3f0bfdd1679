//! The authenticated, encrypted channel between the two agents.
//!
//! The replication stream carries the whole of a VM's memory and its disk writes, so it must
//! never travel in the clear and must never be accepted from a host that is not the
//! configured peer. Both agents hold the same pre-shared key (the policy's `psk_file`); the
//! channel runs the Noise protocol `NNpsk0_25519_AESGCM_SHA256` (via the `snow` crate, not by
//! hand): ephemeral Diffie-Hellman for forward secrecy, the PSK mixed in before the first
//! message so that a peer without the key cannot produce or read a single message.
//!
//! Handshake (initiator = the side that connects):
//! 1. initiator → responder: Noise message 1, payload = the initiator's [`Hello`];
//! 2. responder → initiator: Noise message 2, payload = the responder's [`Hello`];
//! 3. initiator → responder: the first transport frame, payload = the literal `CONFIRM`.
//!
//! Step 3 exists because message 1 alone can be replayed by an eavesdropper; only a peer
//! that holds the PSK can produce a transport frame under the fresh session keys, so the
//! responder treats the channel as authenticated only after it decrypted that frame. Both
//! hellos name the node, the domain and the protocol version, and are also bound into the
//! handshake's prologue context: a peer for another domain is refused, not mixed up.
//!
//! # Per-node keys (`[auth] mode = "keys"`)
//! With one shared key, any holder of it (either node, and the witness that was given the
//! same file) could claim either node's name. In keys mode each node has its own static
//! X25519 key pair ([`NodeKey`], `remusctl keygen`) and pins its peer's public keys (the
//! WireGuard model); the channel runs `Noise_XX_25519_AESGCM_SHA256` — or
//! `Noise_XXpsk0_…` when a pre-shared key is configured too, as an extra layer that keeps
//! anyone without it from getting past message 1. XX sends each side's static key
//! encrypted, so no side needs to know in advance which of the peer's pinned keys is in
//! use: during a rotation two pinned keys are accepted ([`ChannelAuth::Keys`]).
//!
//! 1. initiator → responder: message 1 (`e`), payload = the initiator's [`Hello`] —
//!    readable by an eavesdropper when there is no PSK (names only, no secret), and bound
//!    into the handshake hash, so a change to it fails message 2;
//! 2. responder → initiator: message 2 (`e, ee, s, es`), payload = the responder's hello;
//!    the initiator refuses a static key that is not pinned for the expected node;
//! 3. initiator → responder: message 3 (`s, se`), payload = `CONFIRM`; the responder
//!    refuses a static key that is not pinned, and only then treats the channel as
//!    authenticated.
//!
//! The two modes never talk to each other (different patterns and prologues): a node in
//! keys mode and a node in psk mode refuse each other as unauthenticated.
//!
//! After the handshake, bytes travel in frames: `u16 big-endian ciphertext length`, then the
//! ciphertext (payload ≤ [`MAX_PAYLOAD`] bytes + 16-byte tag). Each direction numbers its
//! frames from 0 (the Noise nonce), so a dropped, reordered or replayed frame fails
//! authentication and closes the channel.

use std::io;
use std::path::Path;
use std::time::Duration;

use remus_stream::version::{self, Negotiated, NegotiationError, VersionRange};
use serde::{Deserialize, Serialize};
use snow::{HandshakeState, StatelessTransportState};
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The Noise protocol name. AES-GCM because every host that runs VMs has AES-NI.
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Keys mode without a pre-shared key.
const NOISE_PARAMS_KEYS: &str = "Noise_XX_25519_AESGCM_SHA256";
/// Keys mode with a pre-shared key as an extra layer.
const NOISE_PARAMS_KEYS_PSK: &str = "Noise_XXpsk0_25519_AESGCM_SHA256";
pub use remus_keys::KEY_LEN;
/// Largest Noise message (the protocol's limit).
const MAX_MESSAGE: usize = 65535;
/// AEAD tag appended to every encrypted payload.
const TAG_LEN: usize = 16;
/// Largest plaintext carried by one frame.
pub const MAX_PAYLOAD: usize = MAX_MESSAGE - TAG_LEN;
/// The version an initiator's hello names in `version`: what a responder that predates
/// negotiation (v0.1.0, which checks `version` for equality) requires.
pub const CHANNEL_VERSION: u32 = 1;
/// The channel protocol versions this build speaks (announced in `Hello::versions`).
pub const CHANNEL_VERSIONS: VersionRange = VersionRange::only(1);
/// The channel capabilities this build offers. None is defined at version 1: the one
/// optional feature so far (online disk verify) announces itself inside the stream (a
/// `CONTROL` record, `verify.rs`), which v0.1.0 peers already skip.
pub const CHANNEL_CAPABILITIES: &[&str] = &[];
/// Literal payload of the initiator's first transport frame.
const CONFIRM: &[u8] = b"CONFIRM";
/// A pre-shared key file must hold at least this many bytes.
pub const MIN_PSK_FILE_LEN: usize = 32;

/// Errors of the peer channel. Every message names the peer address where it is known.
#[derive(Debug, Error)]
pub enum PeerError {
    /// The PSK file could not be read.
    #[error("peer key {path}: cannot read: {source}")]
    KeyRead { path: String, source: io::Error },
    /// The PSK file is too short to be a key.
    #[error("peer key {path}: {len} bytes, at least {MIN_PSK_FILE_LEN} are required")]
    KeyTooShort { path: String, len: usize },
    /// I/O on the underlying connection failed.
    #[error("peer {peer}: {op}: {source}")]
    Io {
        peer: String,
        op: &'static str,
        source: io::Error,
    },
    /// The other side does not hold our pre-shared key (or the bytes were tampered with).
    #[error("peer {peer}: authentication failed during {stage}: the peer does not hold this node's pre-shared key, or the data was altered")]
    Unauthenticated { peer: String, stage: &'static str },
    /// The hello did not parse or does not match what this side expects.
    #[error("peer {peer}: refused: {reason}")]
    Refused { peer: String, reason: String },
    /// A frame violates the framing rules.
    #[error("peer {peer}: malformed frame: {reason}")]
    Malformed { peer: String, reason: String },
    /// The handshake did not complete in time.
    #[error("peer {peer}: handshake timed out after {0:?}", timeout)]
    HandshakeTimeout { peer: String, timeout: Duration },
    /// The Noise library refused an operation (should not happen with valid parameters).
    #[error("peer {peer}: noise: {source}")]
    Noise { peer: String, source: snow::Error },
    /// The peer closed the connection.
    #[error("peer {peer}: connection closed")]
    Closed { peer: String },
    /// A node key file or a public key does not parse.
    #[error("{what}: {reason}")]
    BadKey { what: String, reason: String },
    /// The peer proved a static key that is not pinned for it.
    #[error("peer {peer}: refused: it presented the static key {key}, which is not pinned for node {node:?} (pinned: {pinned})")]
    UnpinnedKey {
        peer: String,
        node: String,
        /// The presented key, as text (kept small: this error travels inside `BackupLoss`).
        key: String,
        pinned: String,
    },
}

pub use remus_keys::{NodeKey, PublicKey};

impl From<remus_keys::KeyError> for PeerError {
    fn from(e: remus_keys::KeyError) -> Self {
        PeerError::BadKey {
            what: e.what,
            reason: e.reason,
        }
    }
}

/// How this node authenticates the peer channel: the policy's `[auth]`.
#[derive(Clone, Debug)]
pub enum ChannelAuth {
    /// One pre-shared key held by both nodes (`Noise_NNpsk0`; what v0.1.0 speaks).
    Psk(PreSharedKey),
    /// Per-node static keys (`Noise_XX`, `Noise_XXpsk0` with `psk`).
    Keys {
        /// This node's key pair.
        local: Arc<NodeKey>,
        /// The peer's public keys this node accepts: one, or two during a rotation.
        peer_keys: Vec<PublicKey>,
        /// An optional extra layer.
        psk: Option<PreSharedKey>,
    },
}

impl From<PreSharedKey> for ChannelAuth {
    fn from(psk: PreSharedKey) -> Self {
        Self::Psk(psk)
    }
}

/// A 32-byte pre-shared key, derived from the key file with SHA-256 so that any file of at
/// least 32 random bytes (e.g. `head -c 64 /dev/urandom`) is a valid key.
#[derive(Clone)]
pub struct PreSharedKey([u8; 32]);

impl std::fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreSharedKey(..)")
    }
}

impl PreSharedKey {
    /// Reads and derives the key from a file.
    ///
    /// # Errors
    /// [`PeerError::KeyRead`] if unreadable, [`PeerError::KeyTooShort`] under 32 bytes.
    pub fn from_file(path: &Path) -> Result<Self, PeerError> {
        let raw = std::fs::read(path).map_err(|source| PeerError::KeyRead {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&raw).ok_or(PeerError::KeyTooShort {
            path: path.display().to_string(),
            len: raw.len(),
        })
    }

    /// Derives the key from raw key material; `None` if shorter than 32 bytes.
    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        use sha2::Digest;
        if raw.len() < MIN_PSK_FILE_LEN {
            return None;
        }
        let mut h = sha2::Sha256::new();
        h.update(b"remus-agent peer key v1\0");
        h.update(raw);
        Some(Self(h.finalize().into()))
    }
}

/// What each side says about itself in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The initiator: [`CHANNEL_VERSION`] (what a responder that predates negotiation
    /// requires). The responder: the version chosen for the channel.
    pub version: u32,
    /// The sender's node name (from its policy).
    pub node: String,
    /// The domain this channel replicates.
    pub domain: String,
    /// What the channel is for (e.g. "replication", "control").
    pub purpose: String,
    /// The versions the sender speaks; absent from a peer that predates negotiation
    /// (v0.1.0), which speaks `version` only. Such a peer's parser ignores fields it does not
    /// know (serde's default), so the new fields cost it nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<VersionRange>,
    /// The capabilities the sender offers; unknown ones are ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

impl Hello {
    /// This build's hello for a channel: its version range and capabilities announced.
    pub fn new(node: &str, domain: &str, purpose: &str) -> Self {
        Hello {
            version: CHANNEL_VERSION,
            node: node.to_string(),
            domain: domain.to_string(),
            purpose: purpose.to_string(),
            versions: Some(CHANNEL_VERSIONS),
            capabilities: CHANNEL_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// The versions the sender announces (`version` alone for a peer that predates
    /// negotiation), checked for consistency: a hello whose `version` lies outside its own
    /// range claims a version it then violates.
    pub fn announced(&self) -> Result<VersionRange, NegotiationError> {
        let range = self.versions.unwrap_or(VersionRange::only(self.version));
        if range.min > range.max {
            return Err(NegotiationError::EmptyRange(range));
        }
        if !range.contains(self.version) {
            return Err(NegotiationError::Contradicts {
                version: self.version,
                range,
            });
        }
        Ok(range)
    }
}

/// The channel's version and capabilities, from the remote hello (the one rule of
/// [`remus_stream::version`]).
fn agree(remote: &Hello, peer: &str) -> Result<Negotiated, PeerError> {
    let refused = |reason: String| PeerError::Refused {
        peer: peer.to_string(),
        reason,
    };
    let theirs = remote
        .announced()
        .map_err(|e| refused(format!("channel {e}")))?;
    version::negotiate(
        CHANNEL_VERSIONS,
        CHANNEL_CAPABILITIES.iter().copied(),
        theirs,
        remote.capabilities.iter().map(String::as_str),
        &[],
    )
    .map_err(|e| refused(format!("channel {e}")))
}

/// The initiator's check of the responder's choice: it must be the highest common version,
/// since both sides apply the same rule to the same two ranges.
fn agree_with_answer(remote: &Hello, peer: &str) -> Result<Negotiated, PeerError> {
    let n = agree(remote, peer)?;
    if remote.version != n.version {
        return Err(PeerError::Refused {
            peer: peer.to_string(),
            reason: format!(
                "it chose channel version {}, but the highest version both speak is {}",
                remote.version, n.version
            ),
        });
    }
    Ok(n)
}

/// Who the accepting side is, and what it requires of the connecting side's hello.
#[derive(Clone, Debug)]
pub struct Expect {
    /// This node's name (sent in the answering hello).
    pub local_node: String,
    /// What the listener serves ("replication", "control"); the hello must say the same.
    pub purpose: String,
    /// The configured peer's node name.
    pub peer_node: String,
    /// Domains this side serves; `None` accepts any (the daemon dispatches by domain).
    pub domains: Option<Vec<String>>,
}

/// An authenticated channel, split into halves that can live in separate tasks.
pub struct SecureChannel<R, W> {
    /// Receives and decrypts frames.
    pub reader: SecureReader<R>,
    /// Encrypts and sends frames.
    pub writer: SecureWriter<W>,
    /// The other side's hello (who it is, for which domain).
    pub remote: Hello,
    /// The version and capabilities both sides use.
    pub negotiated: Negotiated,
}

/// The receiving half.
pub struct SecureReader<R> {
    io: R,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    peer: String,
    cipher: Vec<u8>,
}

/// The sending half.
pub struct SecureWriter<W> {
    io: W,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    peer: String,
    frame: Vec<u8>,
}

fn handshake_state(
    auth: &ChannelAuth,
    initiator: bool,
    peer: &str,
) -> Result<HandshakeState, PeerError> {
    let noise = |source| PeerError::Noise {
        peer: peer.to_string(),
        source,
    };
    let (name, psk, local, prologue): (_, _, _, &[u8]) = match auth {
        ChannelAuth::Psk(psk) => (NOISE_PARAMS, Some(psk), None, b"remus-agent peer channel"),
        ChannelAuth::Keys { local, psk, .. } => (
            if psk.is_some() {
                NOISE_PARAMS_KEYS_PSK
            } else {
                NOISE_PARAMS_KEYS
            },
            psk.as_ref(),
            Some(local),
            b"remus-agent peer channel, node keys",
        ),
    };
    let params: snow::params::NoiseParams = name.parse().map_err(noise)?;
    let mut b = snow::Builder::new(params);
    if let Some(psk) = psk {
        b = b.psk(0, &psk.0).map_err(noise)?;
    }
    if let Some(local) = local {
        b = b.local_private_key(local.private_bytes()).map_err(noise)?;
    }
    let b = b.prologue(prologue).map_err(noise)?;
    if initiator {
        b.build_initiator().map_err(noise)
    } else {
        b.build_responder().map_err(noise)
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    msg: &[u8],
    peer: &str,
) -> Result<(), PeerError> {
    let len = u16::try_from(msg.len()).map_err(|_| PeerError::Malformed {
        peer: peer.to_string(),
        reason: format!("outgoing frame of {} bytes exceeds 65535", msg.len()),
    })?;
    let mut buf = Vec::with_capacity(2 + msg.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(msg);
    io.write_all(&buf).await.map_err(|source| PeerError::Io {
        peer: peer.to_string(),
        op: "write",
        source,
    })?;
    io.flush().await.map_err(|source| PeerError::Io {
        peer: peer.to_string(),
        op: "flush",
        source,
    })
}

async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    peer: &str,
) -> Result<(), PeerError> {
    let mut len = [0u8; 2];
    match io.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(PeerError::Closed {
                peer: peer.to_string(),
            })
        }
        Err(source) => {
            return Err(PeerError::Io {
                peer: peer.to_string(),
                op: "read frame length",
                source,
            })
        }
    }
    let len = u16::from_be_bytes(len) as usize;
    if len < TAG_LEN {
        return Err(PeerError::Malformed {
            peer: peer.to_string(),
            reason: format!("frame of {len} bytes is shorter than the {TAG_LEN}-byte tag"),
        });
    }
    buf.resize(len, 0);
    io.read_exact(buf).await.map(|_| ()).map_err(|source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            PeerError::Malformed {
                peer: peer.to_string(),
                reason: format!("connection closed inside a {len}-byte frame"),
            }
        } else {
            PeerError::Io {
                peer: peer.to_string(),
                op: "read frame",
                source,
            }
        }
    })
}

fn parse_hello(payload: &[u8], peer: &str) -> Result<Hello, PeerError> {
    let hello: Hello = serde_json::from_slice(payload).map_err(|e| PeerError::Refused {
        peer: peer.to_string(),
        reason: format!("hello is not valid: {e}"),
    })?;
    Ok(hello)
}

fn into_transport(
    hs: HandshakeState,
    peer: &str,
) -> Result<Arc<StatelessTransportState>, PeerError> {
    hs.into_stateless_transport_mode()
        .map(Arc::new)
        .map_err(|source| PeerError::Noise {
            peer: peer.to_string(),
            source,
        })
}

impl<R, W> SecureChannel<R, W> {
    fn new(
        reader: R,
        writer: W,
        transport: Arc<StatelessTransportState>,
        peer: &str,
        remote: Hello,
        negotiated: Negotiated,
    ) -> Self {
        tracing::debug!(
            peer,
            node = %remote.node,
            version = negotiated.version,
            capabilities = ?negotiated.capabilities,
            "channel negotiated"
        );
        SecureChannel {
            reader: SecureReader {
                io: reader,
                transport: transport.clone(),
                nonce: 0,
                peer: peer.to_string(),
                cipher: Vec::new(),
            },
            writer: SecureWriter {
                io: writer,
                transport,
                nonce: 0,
                peer: peer.to_string(),
                frame: Vec::new(),
            },
            remote,
            negotiated,
        }
    }
}

/// Bounds a handshake by `timeout`.
async fn within<T>(
    timeout: Duration,
    peer: &str,
    fut: impl std::future::Future<Output = Result<T, PeerError>>,
) -> Result<T, PeerError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| PeerError::HandshakeTimeout {
            peer: peer.to_string(),
            timeout,
        })?
}

/// Refuses a hello from another node than the policy's peer.
fn check_node(remote: &Hello, expected: &str, peer: &str) -> Result<(), PeerError> {
    if remote.node == expected {
        return Ok(());
    }
    Err(PeerError::Refused {
        peer: peer.to_string(),
        reason: format!(
            "it is node {:?}, the policy names {:?} as the peer",
            remote.node, expected
        ),
    })
}

/// Writes one handshake message carrying `payload`.
async fn write_handshake<W: AsyncWrite + Unpin>(
    hs: &mut HandshakeState,
    writer: &mut W,
    payload: &[u8],
    peer: &str,
) -> Result<(), PeerError> {
    let mut msg = vec![0u8; MAX_MESSAGE];
    let n = hs
        .write_message(payload, &mut msg)
        .map_err(|source| PeerError::Noise {
            peer: peer.to_string(),
            source,
        })?;
    write_frame(writer, &msg[..n], peer).await
}

/// Reads one handshake message and returns its payload. A message that does not decrypt
/// means the other side does not hold our key.
async fn read_handshake<R: AsyncRead + Unpin>(
    hs: &mut HandshakeState,
    reader: &mut R,
    peer: &str,
    stage: &'static str,
) -> Result<Vec<u8>, PeerError> {
    let mut frame = Vec::new();
    read_frame(reader, &mut frame, peer).await?;
    let mut payload = vec![0u8; MAX_MESSAGE];
    let n = hs
        .read_message(&frame, &mut payload)
        .map_err(|_| PeerError::Unauthenticated {
            peer: peer.to_string(),
            stage,
        })?;
    payload.truncate(n);
    Ok(payload)
}

/// In keys mode, refuses a peer whose proven static key is not pinned; returns which pinned
/// key it was (for the log: a rotation shows which key each node uses).
fn check_static(
    hs: &HandshakeState,
    auth: &ChannelAuth,
    node: &str,
    peer: &str,
) -> Result<Option<PublicKey>, PeerError> {
    let ChannelAuth::Keys { peer_keys, .. } = auth else {
        return Ok(None);
    };
    let remote = hs
        .get_remote_static()
        .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
        .map(PublicKey::from_bytes)
        .ok_or_else(|| PeerError::Refused {
            peer: peer.to_string(),
            reason: "the handshake did not carry a static key".into(),
        })?;
    if peer_keys.contains(&remote) {
        return Ok(Some(remote));
    }
    Err(PeerError::UnpinnedKey {
        peer: peer.to_string(),
        node: node.to_string(),
        key: remote.to_string(),
        pinned: peer_keys
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Runs the initiator's side of the handshake on a connected stream.
///
/// `peer` names the remote end in errors and logs (usually its address).
///
/// # Errors
/// [`PeerError::Unauthenticated`] when the responder does not hold our key,
/// [`PeerError::UnpinnedKey`] when (keys mode) it proves a key not pinned for it,
/// [`PeerError::Refused`] when its hello is not the expected peer or domain,
/// [`PeerError::HandshakeTimeout`], I/O errors.
pub async fn connect<R, W>(
    mut reader: R,
    mut writer: W,
    auth: &ChannelAuth,
    hello: &Hello,
    expect_peer_node: &str,
    peer: &str,
    timeout: Duration,
) -> Result<SecureChannel<R, W>, PeerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let fut = async {
        let mut hs = handshake_state(auth, true, peer)?;
        let payload = serde_json::to_vec(hello).expect("hello serialises");
        write_handshake(&mut hs, &mut writer, &payload, peer).await?;

        let reply = read_handshake(&mut hs, &mut reader, peer, "handshake message 2").await?;
        let remote = parse_hello(&reply, peer)?;
        check_node(&remote, expect_peer_node, peer)?;
        let negotiated = agree_with_answer(&remote, peer)?;
        if remote.domain != hello.domain {
            return Err(PeerError::Refused {
                peer: peer.to_string(),
                reason: format!(
                    "it answered for domain {:?}, this channel is for {:?}",
                    remote.domain, hello.domain
                ),
            });
        }
        let keys_mode = matches!(auth, ChannelAuth::Keys { .. });
        if let Some(key) = check_static(&hs, auth, expect_peer_node, peer)? {
            tracing::debug!(peer, node = %remote.node, %key, "peer proved a pinned key");
            // Message 3 proves our static key; its payload is the confirmation.
            write_handshake(&mut hs, &mut writer, CONFIRM, peer).await?;
        }
        let transport = into_transport(hs, peer)?;
        let mut ch = SecureChannel::new(reader, writer, transport, peer, remote, negotiated);
        if !keys_mode {
            ch.writer.send(CONFIRM).await?;
            ch.writer.flush().await?;
        }
        Ok(ch)
    };
    within(timeout, peer, fut).await
}

/// Runs the responder's side of the handshake on an accepted stream.
///
/// This side's hello answers for the domain the initiator asked for.
///
/// # Errors
/// As [`connect`]; an unauthenticated peer is reported as [`PeerError::Unauthenticated`]
/// (psk mode: before any of this side's data is sent to it; keys mode without a PSK: after
/// message 2, which carries only names and this node's public key).
pub async fn accept<R, W>(
    mut reader: R,
    mut writer: W,
    auth: &ChannelAuth,
    expect: &Expect,
    peer: &str,
    timeout: Duration,
) -> Result<SecureChannel<R, W>, PeerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let fut = async {
        let mut hs = handshake_state(auth, false, peer)?;
        let first = read_handshake(&mut hs, &mut reader, peer, "handshake message 1").await?;
        let remote = parse_hello(&first, peer)?;
        check_node(&remote, &expect.peer_node, peer)?;
        let negotiated = agree(&remote, peer)?;
        if let Some(domains) = &expect.domains {
            if !domains.contains(&remote.domain) {
                return Err(PeerError::Refused {
                    peer: peer.to_string(),
                    reason: format!("domain {:?} is not protected on this node", remote.domain),
                });
            }
        }
        let (node, purpose) = (expect.local_node.as_str(), expect.purpose.as_str());
        if remote.purpose != purpose {
            return Err(PeerError::Refused {
                peer: peer.to_string(),
                reason: format!(
                    "channel purpose {:?}, this listener serves {:?}",
                    remote.purpose, purpose
                ),
            });
        }
        let mut hello = Hello::new(node, &remote.domain, purpose);
        hello.version = negotiated.version;
        let out = serde_json::to_vec(&hello).expect("hello serialises");
        write_handshake(&mut hs, &mut writer, &out, peer).await?;
        if matches!(auth, ChannelAuth::Keys { .. }) {
            let confirm = read_handshake(&mut hs, &mut reader, peer, "handshake message 3").await?;
            let key = check_static(&hs, auth, &expect.peer_node, peer)?;
            if confirm != CONFIRM {
                return Err(PeerError::Refused {
                    peer: peer.to_string(),
                    reason: "handshake message 3 is not the confirmation".into(),
                });
            }
            if let Some(key) = key {
                tracing::debug!(peer, node = %remote.node, %key, "peer proved a pinned key");
            }
            let transport = into_transport(hs, peer)?;
            return Ok(SecureChannel::new(
                reader, writer, transport, peer, remote, negotiated,
            ));
        }
        let transport = into_transport(hs, peer)?;
        let mut ch = SecureChannel::new(reader, writer, transport, peer, remote, negotiated);
        let mut first = Vec::new();
        match ch.reader.recv(&mut first).await {
            Ok(()) if first == CONFIRM => Ok(ch),
            Ok(()) => Err(PeerError::Refused {
                peer: peer.to_string(),
                reason: "first transport frame is not the handshake confirmation".into(),
            }),
            Err(PeerError::Malformed { .. }) | Err(PeerError::Unauthenticated { .. }) => {
                Err(PeerError::Unauthenticated {
                    peer: peer.to_string(),
                    stage: "handshake confirmation",
                })
            }
            Err(e) => Err(e),
        }
    };
    within(timeout, peer, fut).await
}

impl<W: AsyncWrite + Unpin> SecureWriter<W> {
    /// Encrypts and queues `data`, split into as many frames as needed. Frames are buffered
    /// until [`flush`](Self::flush) or until the buffer holds a few frames.
    ///
    /// # Errors
    /// I/O errors of the connection.
    pub async fn send(&mut self, mut data: &[u8]) -> Result<(), PeerError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_PAYLOAD);
            self.seal(&data[..n])?;
            data = &data[n..];
            if self.frame.len() >= 4 * MAX_MESSAGE {
                self.write_out().await?;
            }
        }
        Ok(())
    }

    /// Writes every queued frame to the connection.
    ///
    /// # Errors
    /// I/O errors of the connection.
    pub async fn flush(&mut self) -> Result<(), PeerError> {
        self.write_out().await?;
        self.io.flush().await.map_err(|source| PeerError::Io {
            peer: self.peer.clone(),
            op: "flush",
            source,
        })
    }

    /// Closes the sending direction.
    ///
    /// # Errors
    /// I/O errors of the connection.
    pub async fn shutdown(&mut self) -> Result<(), PeerError> {
        self.flush().await?;
        self.io.shutdown().await.map_err(|source| PeerError::Io {
            peer: self.peer.clone(),
            op: "shutdown",
            source,
        })
    }

    fn seal(&mut self, plain: &[u8]) -> Result<(), PeerError> {
        let start = self.frame.len();
        self.frame.resize(start + 2 + plain.len() + TAG_LEN, 0);
        let n = self
            .transport
            .write_message(self.nonce, plain, &mut self.frame[start + 2..])
            .map_err(|source| PeerError::Noise {
                peer: self.peer.clone(),
                source,
            })?;
        self.nonce += 1;
        crate::copies::add(crate::copies::Stage::Seal, n as u64);
        debug_assert_eq!(n, plain.len() + TAG_LEN);
        self.frame[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
        self.frame.truncate(start + 2 + n);
        Ok(())
    }

    async fn write_out(&mut self) -> Result<(), PeerError> {
        if self.frame.is_empty() {
            return Ok(());
        }
        crate::copies::add(crate::copies::Stage::SocketWrite, self.frame.len() as u64);
        self.io
            .write_all(&self.frame)
            .await
            .map_err(|source| PeerError::Io {
                peer: self.peer.clone(),
                op: "write",
                source,
            })?;
        self.frame.clear();
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> SecureReader<R> {
    /// Receives one frame and replaces `out` with its plaintext.
    ///
    /// # Errors
    /// [`PeerError::Closed`] at a clean end of stream between frames,
    /// [`PeerError::Unauthenticated`] when a frame fails authentication (tampering, replay,
    /// reordering), [`PeerError::Malformed`] for impossible lengths.
    pub async fn recv(&mut self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        read_frame(&mut self.io, &mut self.cipher, &self.peer).await?;
        out.resize(self.cipher.len(), 0);
        let n = self
            .transport
            .read_message(self.nonce, &self.cipher, out)
            .map_err(|_| PeerError::Unauthenticated {
                peer: self.peer.clone(),
                stage: "transport frame",
            })?;
        self.nonce += 1;
        out.truncate(n);
        crate::copies::add(
            crate::copies::Stage::SocketRead,
            2 + self.cipher.len() as u64,
        );
        crate::copies::add(crate::copies::Stage::Open, n as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PreSharedKey {
        PreSharedKey::from_bytes(&[b; 40]).unwrap()
    }

    fn hello(node: &str) -> Hello {
        Hello::new(node, "vm1", "replication")
    }

    fn expect() -> Expect {
        Expect {
            local_node: "bak".into(),
            purpose: "replication".into(),
            peer_node: "pri".into(),
            domains: Some(vec!["vm1".into()]),
        }
    }

    async fn pair(
        ki: PreSharedKey,
        kr: PreSharedKey,
        hi: Hello,
    ) -> (
        Result<SecureChannel<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>, PeerError>,
        Result<SecureChannel<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>, PeerError>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let t = Duration::from_secs(5);
        let ex = expect();
        let (ki, kr) = (ChannelAuth::from(ki), ChannelAuth::from(kr));
        tokio::join!(
            connect(ar, aw, &ki, &hi, "bak", "test-responder", t),
            accept(br, bw, &kr, &ex, "test-initiator", t)
        )
    }

    #[tokio::test]
    async fn same_key_carries_data_both_ways() {
        let (i, r) = pair(key(1), key(1), hello("pri")).await;
        let (mut i, mut r) = (i.unwrap(), r.unwrap());
        assert_eq!(r.remote.node, "pri");
        assert_eq!(i.remote.node, "bak");
        let big: Vec<u8> = (0..200_000u32).map(|x| x as u8).collect();
        i.writer.send(&big).await.unwrap();
        i.writer.flush().await.unwrap();
        let mut got = Vec::new();
        let mut chunk = Vec::new();
        while got.len() < big.len() {
            r.reader.recv(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, big);
        r.writer.send(b"ack").await.unwrap();
        r.writer.flush().await.unwrap();
        i.reader.recv(&mut chunk).await.unwrap();
        assert_eq!(chunk, b"ack");
    }

    #[tokio::test]
    async fn hellos_negotiate_the_highest_common_version_with_old_and_new_peers() {
        // This build with itself: its range, the version chosen, on both ends.
        let (i, r) = pair(key(1), key(1), hello("pri")).await;
        let (i, r) = (i.unwrap(), r.unwrap());
        assert_eq!((i.negotiated.version, r.negotiated.version), (1, 1));
        assert_eq!(r.remote.versions, Some(CHANNEL_VERSIONS));

        // A v0.1.0 initiator: its hello has no range, exactly what that release sent.
        let legacy: Hello = serde_json::from_str(
            r#"{"version":1,"node":"pri","domain":"vm1","purpose":"replication"}"#,
        )
        .unwrap();
        assert_eq!((legacy.versions, legacy.capabilities.len()), (None, 0));
        let (i, r) = pair(key(1), key(1), legacy).await;
        assert_eq!(r.unwrap().negotiated.version, 1);
        assert_eq!(i.unwrap().negotiated.version, 1);

        // A newer peer's unknown capabilities are ignored, not refused.
        let mut newer = hello("pri");
        newer.versions = Some(VersionRange { min: 1, max: 7 });
        newer.capabilities = vec!["from-the-future".into()];
        let (i, r) = pair(key(1), key(1), newer).await;
        let r = r.unwrap();
        assert_eq!(r.negotiated.version, 1);
        assert!(r.negotiated.capabilities.is_empty());
        assert_eq!(i.unwrap().negotiated.version, 1);

        // No common version: refused by the responder, both ranges named.
        let mut future = hello("pri");
        future.version = 2;
        future.versions = Some(VersionRange { min: 2, max: 3 });
        let (_, r) = pair(key(1), key(1), future).await;
        let e = r.err().expect("refused").to_string();
        assert!(
            e.contains("no common protocol version: this node speaks 1, the peer 2..=3"),
            "{e}"
        );

        // A hello claiming a version outside its own range.
        let mut liar = hello("pri");
        liar.version = 5;
        let (_, r) = pair(key(1), key(1), liar).await;
        let e = r.err().expect("refused").to_string();
        assert!(e.contains("says version 5 outside the range 1"), "{e}");
    }

    #[test]
    fn an_answer_that_is_not_the_highest_common_version_is_refused() {
        let mut answer = hello("bak");
        assert_eq!(agree_with_answer(&answer, "r").unwrap().version, 1);
        answer.version = 2;
        answer.versions = Some(VersionRange { min: 1, max: 2 });
        let e = agree_with_answer(&answer, "r").unwrap_err().to_string();
        assert!(
            e.contains("it chose channel version 2, but the highest version both speak is 1"),
            "{e}"
        );
        answer.versions = Some(VersionRange { min: 3, max: 1 });
        let e = agree_with_answer(&answer, "r").unwrap_err().to_string();
        assert!(e.contains("empty version range 3..=1"), "{e}");
    }

    #[tokio::test]
    async fn wrong_key_is_refused_as_unauthenticated() {
        let (i, r) = pair(key(1), key(2), hello("pri")).await;
        assert!(
            matches!(r, Err(PeerError::Unauthenticated { .. })),
            "{:?}",
            r.err()
        );
        assert!(i.is_err());
    }

    #[tokio::test]
    async fn wrong_node_is_refused() {
        let (_i, r) = pair(key(1), key(1), hello("intruder")).await;
        let err = r.err().expect("must refuse");
        assert!(err.to_string().contains("intruder"), "{err}");
    }

    #[tokio::test]
    async fn tampered_frame_fails_authentication() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let t = Duration::from_secs(5);
        let (k, h, ex) = (ChannelAuth::from(key(1)), hello("pri"), expect());
        let (i, r) = tokio::join!(
            connect(ar, aw, &k, &h, "bak", "r", t),
            accept(br, bw, &k, &ex, "i", t)
        );
        let (mut i, mut r) = (i.unwrap(), r.unwrap());
        // Seal a frame, flip one ciphertext bit, and write it raw.
        i.writer.seal(b"hello world").unwrap();
        let last = i.writer.frame.len() - 1;
        i.writer.frame[last] ^= 1;
        i.writer.flush().await.unwrap();
        let mut out = Vec::new();
        let err = r.reader.recv(&mut out).await.unwrap_err();
        assert!(matches!(err, PeerError::Unauthenticated { .. }), "{err}");
    }

    #[test]
    fn short_key_material_is_rejected() {
        assert!(PreSharedKey::from_bytes(&[7; 31]).is_none());
        assert!(PreSharedKey::from_bytes(&[7; 32]).is_some());
    }

    #[tokio::test]
    async fn garbage_instead_of_handshake_is_an_error_not_a_panic() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (br, bw) = tokio::io::split(b);
        let (_ar, mut aw) = tokio::io::split(a);
        aw.write_all(&[0, 20]).await.unwrap();
        aw.write_all(&[0xAB; 20]).await.unwrap();
        let (k, ex) = (ChannelAuth::from(key(1)), expect());
        let r = accept(br, bw, &k, &ex, "x", Duration::from_secs(2)).await;
        assert!(
            matches!(r, Err(PeerError::Unauthenticated { .. })),
            "{:?}",
            r.err()
        );
    }

    fn node_key(b: u8) -> Arc<NodeKey> {
        Arc::new(NodeKey::from_private([b; KEY_LEN]))
    }

    fn keys(local: u8, pinned: &[u8], psk: Option<PreSharedKey>) -> ChannelAuth {
        ChannelAuth::Keys {
            local: node_key(local),
            peer_keys: pinned.iter().map(|&b| node_key(b).public()).collect(),
            psk,
        }
    }

    async fn pair_auth(
        ai: ChannelAuth,
        ar_: ChannelAuth,
    ) -> (
        Result<SecureChannel<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>, PeerError>,
        Result<SecureChannel<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>, PeerError>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let t = Duration::from_secs(5);
        let (hi, ex) = (hello("pri"), expect());
        tokio::join!(
            connect(ar, aw, &ai, &hi, "bak", "test-responder", t),
            accept(br, bw, &ar_, &ex, "test-initiator", t)
        )
    }

    async fn carries_data(
        i: &mut SecureChannel<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>,
        r: &mut SecureChannel<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>,
    ) {
        i.writer.send(b"page data").await.unwrap();
        i.writer.flush().await.unwrap();
        let mut got = Vec::new();
        r.reader.recv(&mut got).await.unwrap();
        assert_eq!(got, b"page data");
        r.writer.send(b"ack").await.unwrap();
        r.writer.flush().await.unwrap();
        i.reader.recv(&mut got).await.unwrap();
        assert_eq!(got, b"ack");
    }

    #[tokio::test]
    async fn pinned_node_keys_carry_data_with_and_without_a_psk() {
        for psk in [None, Some(key(3))] {
            let (i, r) = pair_auth(keys(1, &[2], psk.clone()), keys(2, &[1], psk)).await;
            let (mut i, mut r) = (i.unwrap(), r.unwrap());
            assert_eq!(
                (r.remote.node.as_str(), i.remote.node.as_str()),
                ("pri", "bak")
            );
            carries_data(&mut i, &mut r).await;
        }
    }

    #[tokio::test]
    async fn an_unpinned_key_is_refused_by_either_side() {
        // The initiator (key 9) is not pinned by the responder: refused naming the key.
        let (_i, r) = pair_auth(keys(9, &[2], None), keys(2, &[1], None)).await;
        let err = r
            .err()
            .expect("responder must refuse an unpinned initiator");
        assert!(matches!(err, PeerError::UnpinnedKey { .. }), "{err}");
        assert!(
            err.to_string().contains(&node_key(9).public().to_string()),
            "{err}"
        );
        // The responder (key 9) is not pinned by the initiator: refused before message 3.
        let (i, _r) = pair_auth(keys(1, &[2], None), keys(9, &[1], None)).await;
        let err = i
            .err()
            .expect("initiator must refuse an unpinned responder");
        assert!(matches!(err, PeerError::UnpinnedKey { .. }), "{err}");
    }

    #[tokio::test]
    async fn during_a_rotation_both_pinned_keys_are_accepted() {
        // The responder pins the initiator's old (1) and new (5) keys.
        for current in [1, 5] {
            let (i, r) = pair_auth(keys(current, &[2], None), keys(2, &[1, 5], None)).await;
            let (mut i, mut r) = (i.unwrap(), r.unwrap());
            carries_data(&mut i, &mut r).await;
        }
    }

    #[tokio::test]
    async fn the_shared_key_alone_cannot_open_a_keys_channel() {
        // Whoever holds only the pre-shared key (the witness was given it) cannot pass as a
        // node to a node in keys mode, even when that node uses the same PSK as extra layer.
        let (_i, r) = pair_auth(key(3).into(), keys(2, &[1], Some(key(3)))).await;
        assert!(
            matches!(r, Err(PeerError::Unauthenticated { .. })),
            "{:?}",
            r.err()
        );
        // Nor can a keys-mode node without the extra layer's PSK.
        let (_i, r) = pair_auth(keys(1, &[2], None), keys(2, &[1], Some(key(3)))).await;
        assert!(
            matches!(r, Err(PeerError::Unauthenticated { .. })),
            "{:?}",
            r.err()
        );
        // And a keys-mode initiator does not get past a psk-mode responder.
        let (_i, r) = pair_auth(keys(1, &[2], None), key(3).into()).await;
        assert!(r.is_err());
    }
}
