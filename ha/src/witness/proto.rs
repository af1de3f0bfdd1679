//! The witness wire format: one UDP datagram per request and per response, fixed layout,
//! big-endian integers, names as length-prefixed UTF-8, an HMAC-SHA256 tag at the end.
//!
//! ```text
//! request  (magic "RMWQ"):
//!   0 magic[4] | 4 version u8 (2 or 3) | 5 op u8 | 6 node_len u8 | 7 domain_len u8
//!   8 nonce u64 | 16 generation u64 | 24 ttl_ms u32 | 28 copy_generation u64
//!   36 copy_holder u8 | 37 flags u8 | 38 peer_len u8 | 39 reserved u8 = 0
//!   40 node | domain | peer | tag[32]
//! response (magic "RMWR"):
//!   0 magic[4] | 4 version u8 (the request's) | 5 status u8 | 6 node_len u8
//!   7 domain_len u8 | 8 nonce u64 | 16 generation u64 | 24 ttl_ms u32 | 28 holder_len u8
//!   29 reason u8 | 30 copy_holder u8 | 31 flags u8 | 32 copy_generation u64
//!   40 node | domain | holder | tag[32]
//! ```
//!
//! **Versions.** Version 2 (v0.1.0) has no flags and no peer: bytes 37–39 of a request and
//! byte 31 of a response are zero. Version 3 adds the takeover flags ([`flags`]): an
//! acquire may declare the lease *preemptible by* the named `peer` (the holder's output
//! waits for that peer's acknowledgements), or ask to *preempt* such a lease; a response's
//! flags say whether the lease granted is preemptible. The witness answers in the version
//! of the request, so a v0.1.0 node is served as before; a client that does not know its
//! witness's version tries 3, then 2 (see the client).
//!
//! `generation` is the lease's; `copy_*` is a copy stamp ([`crate::lineage`]): in a
//! `record` request the sender's, in every response the newest the witness recorded for
//! the domain (with `holder` naming the node that recorded it, in a `recorded` answer).
//!
//! The tag is checked before any field is interpreted; names are bounded by [`MAX_NAME`], so
//! a datagram never exceeds 1 KiB and decoding never allocates more than that.

use thiserror::Error;

use crate::auth::{HaKey, TAG_LEN};
use crate::lineage::{CopyHolder, CopyStamp};

/// Longest node or domain name, in bytes.
pub const MAX_NAME: usize = 64;
/// Largest datagram either side sends (receivers size their buffers from it).
pub const MAX_DATAGRAM: usize = 40 + 3 * MAX_NAME + TAG_LEN;

const REQ_MAGIC: &[u8; 4] = b"RMWQ";
const RESP_MAGIC: &[u8; 4] = b"RMWR";
/// The version of v0.1.0 (2 added the copy stamps and the `record` op).
pub const VERSION_2: u8 = 2;
/// The newest version: the takeover flags and the peer name.
pub const VERSION_3: u8 = 3;
const REQ_HEADER: usize = 40;
const RESP_HEADER: usize = 40;

/// Why a datagram was not accepted.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// The tag does not match (wrong key, tampered, or not ours).
    #[error("authentication tag mismatch")]
    BadTag,
    /// Too short for its header or its declared names.
    #[error("truncated datagram")]
    Truncated,
    /// Neither a request nor a response of this protocol.
    #[error("unknown magic")]
    BadMagic,
    /// A version this build does not speak.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// An unknown operation or status code.
    #[error("unknown code {0}")]
    BadCode(u8),
    /// A name is empty where required, not UTF-8, or the lengths do not add up.
    #[error("malformed name")]
    BadName,
    /// A reserved byte is not zero.
    #[error("reserved bytes not zero")]
    Reserved,
    /// Flags this version does not define, or flags that contradict each other or the op.
    #[error("bad flags {0:#04x}")]
    BadFlags(u8),
}

/// The takeover flags of version 3 (request byte 37, response byte 31).
pub mod flags {
    /// Request (acquire): grant the lease *preemptible by* the request's `peer`: the
    /// holder releases output only on that peer's acknowledgements, so the peer, once it has
    /// stopped acknowledging, may take the lease at once. Response: the lease granted is
    /// preemptible.
    pub const PREEMPTIBLE: u8 = 1;
    /// Request (acquire): take the lease even if it is held, provided its holder declared
    /// it preemptible by the requester.
    pub const PREEMPT: u8 = 2;
    /// Every flag a request may carry.
    pub const REQUEST: u8 = PREEMPTIBLE | PREEMPT;
}

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Acquire or renew the domain's lease for `ttl_ms`.
    Acquire = 1,
    /// Give up the lease of the named generation.
    Release = 2,
    /// Who holds the lease, for how long.
    Query = 3,
    /// Record a copy stamp for the domain; the answer holds the newest recorded.
    Record = 4,
}

impl Op {
    fn from_u8(v: u8) -> Result<Self, ProtoError> {
        Ok(match v {
            1 => Op::Acquire,
            2 => Op::Release,
            3 => Op::Query,
            4 => Op::Record,
            o => return Err(ProtoError::BadCode(o)),
        })
    }

    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Op::Acquire => "acquire",
            Op::Release => "release",
            Op::Query => "query",
            Op::Record => "record",
        }
    }
}

/// The witness's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The lease is the requester's for `ttl_ms` from the witness's receipt of the request.
    Granted = 1,
    /// `holder` holds it for `ttl_ms` more.
    Denied = 2,
    /// The requester's lease of that generation was released.
    Released = 3,
    /// Release of a lease the requester does not hold (or of another generation): no-op.
    NotHolder = 4,
    /// Query: nobody holds the lease.
    Free = 5,
    /// Query: `holder` holds it for `ttl_ms` more.
    Held = 6,
    /// The request cannot be served; `reason` says why.
    Refused = 7,
    /// A `record` was served.
    Recorded = 8,
}

impl Status {
    fn from_u8(v: u8) -> Result<Self, ProtoError> {
        Ok(match v {
            1 => Status::Granted,
            2 => Status::Denied,
            3 => Status::Released,
            4 => Status::NotHolder,
            5 => Status::Free,
            6 => Status::Held,
            7 => Status::Refused,
            8 => Status::Recorded,
            o => return Err(ProtoError::BadCode(o)),
        })
    }
}

/// Reason codes of [`Status::Refused`].
pub mod reason {
    /// No reason (other statuses).
    pub const NONE: u8 = 0;
    /// The requested TTL is outside the witness's limits.
    pub const BAD_TTL: u8 = 1;
    /// The witness could not persist the change.
    pub const PERSIST_FAILED: u8 = 2;
    /// The witness's table is full.
    pub const TOO_MANY: u8 = 3;

    /// Text for a reason code.
    pub fn text(code: u8) -> &'static str {
        match code {
            BAD_TTL => "lease length outside the witness's limits",
            PERSIST_FAILED => "the witness cannot write its state file",
            TOO_MANY => "the witness's lease table is full",
            _ => "unspecified",
        }
    }
}

/// A request to the witness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub op: Op,
    /// The requesting node.
    pub node: String,
    /// The domain whose lease is meant.
    pub domain: String,
    /// Increasing per (node, domain): replay protection, echoed in the response.
    pub nonce: u64,
    /// Release: the generation given up. Acquire: the generation being renewed (0 = new).
    pub generation: u64,
    /// Acquire: the requested lease length.
    pub ttl_ms: u32,
    /// Record: the sender's copy stamp ([`CopyStamp::NONE`] otherwise).
    pub copy: CopyStamp,
    /// The wire version ([`VERSION_2`] or [`VERSION_3`]).
    pub version: u8,
    /// Version 3: [`flags`] of an acquire (0 otherwise).
    pub flags: u8,
    /// Version 3, with [`flags::PREEMPTIBLE`]: the node that may preempt the lease (empty
    /// otherwise).
    pub peer: String,
}

/// The witness's response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The answer.
    pub status: Status,
    /// The requester (echo).
    pub node: String,
    /// The domain (echo).
    pub domain: String,
    /// The request's nonce (echo).
    pub nonce: u64,
    /// Generation of the lease granted / held.
    pub generation: u64,
    /// Granted: the TTL granted. Denied/Held: the time the lease still has at the witness.
    pub ttl_ms: u32,
    /// Denied/Held: the holder; Recorded: the node that recorded `copy`; otherwise empty.
    pub holder: String,
    /// Refused: a [`reason`] code.
    pub reason: u8,
    /// The newest copy stamp the witness recorded for the domain.
    pub copy: CopyStamp,
    /// The wire version: the request's.
    pub version: u8,
    /// Version 3, Granted: [`flags::PREEMPTIBLE`] if the lease granted is preemptible.
    pub flags: u8,
}

fn name_len(s: &str) -> Result<u8, ProtoError> {
    if s.len() > MAX_NAME {
        return Err(ProtoError::BadName);
    }
    u8::try_from(s.len()).map_err(|_| ProtoError::BadName)
}

fn take_name(body: &[u8], at: &mut usize, len: usize) -> Result<String, ProtoError> {
    let end = at.checked_add(len).ok_or(ProtoError::Truncated)?;
    let bytes = body.get(*at..end).ok_or(ProtoError::Truncated)?;
    *at = end;
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::BadName)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn copy_at(b: &[u8], generation_at: usize, holder: u8) -> Result<CopyStamp, ProtoError> {
    Ok(CopyStamp {
        generation: u64_at(b, generation_at),
        holder: CopyHolder::from_u8(holder).ok_or(ProtoError::BadCode(holder))?,
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Request {
    /// Encodes and tags the request.
    ///
    /// # Errors
    /// [`ProtoError::BadName`] if a name is longer than [`MAX_NAME`].
    pub fn encode(&self, key: &HaKey) -> Result<Vec<u8>, ProtoError> {
        check_request_flags(self.version, self.op, self.flags, &self.peer)?;
        let mut b = Vec::with_capacity(MAX_DATAGRAM);
        b.extend_from_slice(REQ_MAGIC);
        b.push(self.version);
        b.push(self.op as u8);
        b.push(name_len(&self.node)?);
        b.push(name_len(&self.domain)?);
        b.extend_from_slice(&self.nonce.to_be_bytes());
        b.extend_from_slice(&self.generation.to_be_bytes());
        b.extend_from_slice(&self.ttl_ms.to_be_bytes());
        b.extend_from_slice(&self.copy.generation.to_be_bytes());
        b.push(self.copy.holder.to_u8());
        b.extend_from_slice(&[self.flags, name_len(&self.peer)?, 0]);
        b.extend_from_slice(self.node.as_bytes());
        b.extend_from_slice(self.domain.as_bytes());
        b.extend_from_slice(self.peer.as_bytes());
        key.seal(&mut b);
        Ok(b)
    }

    /// The node name a request datagram claims, read before authentication so the witness can
    /// pick that node's key (per-node keys). Nothing else is trusted from it: the request is
    /// then authenticated with the node's key and must decode to the same name.
    pub fn claimed_node(datagram: &[u8]) -> Option<&str> {
        let body = datagram.get(..datagram.len().checked_sub(TAG_LEN)?)?;
        if body.len() < REQ_HEADER || &body[0..4] != REQ_MAGIC {
            return None;
        }
        let len = usize::from(body[6]);
        std::str::from_utf8(body.get(REQ_HEADER..REQ_HEADER + len)?).ok()
    }

    /// Authenticates and decodes a request.
    ///
    /// # Errors
    /// [`ProtoError::BadTag`] first (nothing is parsed from an unauthentic datagram), then
    /// the format errors.
    pub fn decode(key: &HaKey, datagram: &[u8]) -> Result<Self, ProtoError> {
        let b = key.open(datagram).ok_or(ProtoError::BadTag)?;
        if b.len() < REQ_HEADER {
            return Err(ProtoError::Truncated);
        }
        if &b[0..4] != REQ_MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let version = b[4];
        if version != VERSION_2 && version != VERSION_3 {
            return Err(ProtoError::BadVersion(version));
        }
        let op = Op::from_u8(b[5])?;
        let copy = copy_at(b, 28, b[36])?;
        if b[39] != 0 || (version == VERSION_2 && b[37..39] != [0, 0]) {
            return Err(ProtoError::Reserved);
        }
        let mut at = REQ_HEADER;
        let node = take_name(b, &mut at, usize::from(b[6]))?;
        let domain = take_name(b, &mut at, usize::from(b[7]))?;
        let peer = take_name(b, &mut at, usize::from(b[38]))?;
        if at != b.len() || node.is_empty() || domain.is_empty() {
            return Err(ProtoError::BadName);
        }
        check_request_flags(version, op, b[37], &peer)?;
        Ok(Self {
            op,
            node,
            domain,
            nonce: u64_at(b, 8),
            generation: u64_at(b, 16),
            ttl_ms: u32_at(b, 24),
            copy,
            version,
            flags: b[37],
            peer,
        })
    }
}

impl Response {
    /// Encodes and tags the response.
    ///
    /// # Errors
    /// [`ProtoError::BadName`] if a name is longer than [`MAX_NAME`].
    pub fn encode(&self, key: &HaKey) -> Result<Vec<u8>, ProtoError> {
        if self.version != VERSION_3 && self.flags != 0 || self.flags & !flags::PREEMPTIBLE != 0 {
            return Err(ProtoError::BadFlags(self.flags));
        }
        let mut b = Vec::with_capacity(MAX_DATAGRAM);
        b.extend_from_slice(RESP_MAGIC);
        b.push(self.version);
        b.push(self.status as u8);
        b.push(name_len(&self.node)?);
        b.push(name_len(&self.domain)?);
        b.extend_from_slice(&self.nonce.to_be_bytes());
        b.extend_from_slice(&self.generation.to_be_bytes());
        b.extend_from_slice(&self.ttl_ms.to_be_bytes());
        b.push(name_len(&self.holder)?);
        b.push(self.reason);
        b.push(self.copy.holder.to_u8());
        b.push(self.flags);
        b.extend_from_slice(&self.copy.generation.to_be_bytes());
        b.extend_from_slice(self.node.as_bytes());
        b.extend_from_slice(self.domain.as_bytes());
        b.extend_from_slice(self.holder.as_bytes());
        key.seal(&mut b);
        Ok(b)
    }

    /// Authenticates and decodes a response.
    ///
    /// # Errors
    /// As [`Request::decode`].
    pub fn decode(key: &HaKey, datagram: &[u8]) -> Result<Self, ProtoError> {
        let b = key.open(datagram).ok_or(ProtoError::BadTag)?;
        if b.len() < RESP_HEADER {
            return Err(ProtoError::Truncated);
        }
        if &b[0..4] != RESP_MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let version = b[4];
        if version != VERSION_2 && version != VERSION_3 {
            return Err(ProtoError::BadVersion(version));
        }
        let status = Status::from_u8(b[5])?;
        let copy = copy_at(b, 32, b[30])?;
        if version == VERSION_2 && b[31] != 0 {
            return Err(ProtoError::Reserved);
        }
        if b[31] & !flags::PREEMPTIBLE != 0 {
            return Err(ProtoError::BadFlags(b[31]));
        }
        let mut at = RESP_HEADER;
        let node = take_name(b, &mut at, usize::from(b[6]))?;
        let domain = take_name(b, &mut at, usize::from(b[7]))?;
        let holder = take_name(b, &mut at, usize::from(b[28]))?;
        if at != b.len() {
            return Err(ProtoError::BadName);
        }
        Ok(Self {
            status,
            node,
            domain,
            nonce: u64_at(b, 8),
            generation: u64_at(b, 16),
            ttl_ms: u32_at(b, 24),
            holder,
            reason: b[29],
            copy,
            version,
            flags: b[31],
        })
    }
}

/// A request's flags and peer must fit its version and op: none in version 2; only
/// [`flags::REQUEST`] bits, only on an acquire, never both, and a peer exactly when the
/// lease is declared preemptible.
fn check_request_flags(version: u8, op: Op, f: u8, peer: &str) -> Result<(), ProtoError> {
    let fits = match version {
        VERSION_2 => f == 0 && peer.is_empty(),
        _ => {
            f & !flags::REQUEST == 0
                && f != flags::REQUEST
                && (f == 0 || op == Op::Acquire)
                && (f & flags::PREEMPTIBLE != 0) != peer.is_empty()
        }
    };
    if fits {
        Ok(())
    } else if !peer.is_empty() && f & flags::PREEMPTIBLE == 0 {
        Err(ProtoError::BadName)
    } else {
        Err(ProtoError::BadFlags(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> HaKey {
        HaKey::derive(&[3u8; 32]).unwrap()
    }

    fn req() -> Request {
        Request {
            op: Op::Acquire,
            node: "node-a".into(),
            domain: "web".into(),
            nonce: 77,
            generation: 0,
            ttl_ms: 2000,
            copy: CopyStamp::NONE,
            version: VERSION_3,
            flags: 0,
            peer: String::new(),
        }
    }

    #[test]
    fn roundtrip() {
        let k = key();
        let r = req();
        assert_eq!(Request::decode(&k, &r.encode(&k).unwrap()), Ok(r));
        let rec = Request {
            op: Op::Record,
            copy: CopyStamp {
                generation: u64::MAX,
                holder: CopyHolder::Received,
            },
            ..req()
        };
        assert_eq!(Request::decode(&k, &rec.encode(&k).unwrap()), Ok(rec));
        let resp = Response {
            status: Status::Denied,
            node: "node-b".into(),
            domain: "web".into(),
            nonce: 9,
            generation: 4,
            ttl_ms: 1500,
            holder: "node-a".into(),
            reason: reason::NONE,
            copy: CopyStamp {
                generation: 12,
                holder: CopyHolder::Ran,
            },
            version: VERSION_3,
            flags: flags::PREEMPTIBLE,
        };
        let bytes = resp.encode(&k).unwrap();
        assert!(bytes.len() <= MAX_DATAGRAM);
        assert_eq!(Response::decode(&k, &bytes), Ok(resp.clone()));
        let v2 = Response {
            version: VERSION_2,
            flags: 0,
            ..resp
        };
        assert_eq!(Response::decode(&k, &v2.encode(&k).unwrap()), Ok(v2));
        for r in [
            Request {
                flags: flags::PREEMPTIBLE,
                peer: "node-b".repeat(10),
                ..req()
            },
            Request {
                flags: flags::PREEMPT,
                ..req()
            },
            Request {
                version: VERSION_2,
                ..req()
            },
        ] {
            let bytes = r.encode(&k).unwrap();
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(Request::decode(&k, &bytes), Ok(r));
        }
    }

    #[test]
    fn version_2_is_the_layout_of_v0_1_0() {
        // v0.1.0 wrote bytes 37..40 of a request and byte 31 of a response as zero and
        // checked them; a version-2 datagram of this build must be that exact layout.
        let k = key();
        let r = Request {
            version: VERSION_2,
            ..req()
        };
        let b = r.encode(&k).unwrap();
        assert_eq!(b[4], 2);
        assert_eq!(&b[37..40], &[0, 0, 0]);
        assert_eq!(b.len(), 40 + "node-a".len() + "web".len() + TAG_LEN);
        let resp = Response {
            status: Status::Granted,
            node: "node-a".into(),
            domain: "web".into(),
            nonce: 1,
            generation: 1,
            ttl_ms: 1500,
            holder: String::new(),
            reason: reason::NONE,
            copy: CopyStamp::NONE,
            version: VERSION_2,
            flags: 0,
        };
        let b = resp.encode(&k).unwrap();
        assert_eq!((b[4], b[31]), (2, 0));
        // A version-2 response cannot carry flags.
        let bad = Response {
            flags: flags::PREEMPTIBLE,
            ..resp
        };
        assert_eq!(bad.encode(&k), Err(ProtoError::BadFlags(1)));
    }

    #[test]
    fn malformed_datagrams_are_typed_errors() {
        let k = key();
        // (what, datagram body before tagging, expected error)
        let good = req().encode(&k).unwrap();
        let body = &good[..good.len() - TAG_LEN];
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = body.to_vec();
            f(&mut b);
            k.seal(&mut b);
            b
        };
        let cases: Vec<(&str, Vec<u8>, ProtoError)> = vec![
            (
                "wrong key",
                req().encode(&HaKey::derive(&[4u8; 32]).unwrap()).unwrap(),
                ProtoError::BadTag,
            ),
            ("runt", vec![1, 2, 3], ProtoError::BadTag),
            (
                "truncated header",
                with(&|b| b.truncate(10)),
                ProtoError::Truncated,
            ),
            (
                "response magic",
                with(&|b| b[..4].copy_from_slice(b"RMWR")),
                ProtoError::BadMagic,
            ),
            ("version 1", with(&|b| b[4] = 1), ProtoError::BadVersion(1)),
            ("version 4", with(&|b| b[4] = 4), ProtoError::BadVersion(4)),
            (
                "copy holder 7",
                with(&|b| b[36] = 7),
                ProtoError::BadCode(7),
            ),
            ("reserved byte", with(&|b| b[39] = 1), ProtoError::Reserved),
            (
                "flags in version 2",
                with(&|b| {
                    b[4] = 2;
                    b[37] = 1
                }),
                ProtoError::Reserved,
            ),
            (
                "preemptible and preempt at once",
                with(&|b| b[37] = 3),
                ProtoError::BadFlags(3),
            ),
            (
                "unknown flag",
                with(&|b| b[37] = 4),
                ProtoError::BadFlags(4),
            ),
            (
                "preemptible without a peer",
                with(&|b| b[37] = 1),
                ProtoError::BadFlags(1),
            ),
            (
                "peer without preemptible",
                with(&|b| {
                    b[38] = 1;
                    b.push(b'x')
                }),
                ProtoError::BadName,
            ),
            (
                "preempt on a release",
                with(&|b| {
                    b[5] = 2;
                    b[37] = 2
                }),
                ProtoError::BadFlags(2),
            ),
            ("op 9", with(&|b| b[5] = 9), ProtoError::BadCode(9)),
            (
                "node length past end",
                with(&|b| b[6] = 200),
                ProtoError::Truncated,
            ),
            ("trailing byte", with(&|b| b.push(0)), ProtoError::BadName),
            (
                "empty node",
                with(&|b| {
                    b[6] = 0;
                    b[7] = 9
                }),
                ProtoError::BadName,
            ),
            (
                "non-UTF-8 node",
                with(&|b| b[40] = 0xff),
                ProtoError::BadName,
            ),
        ];
        for (what, d, want) in cases {
            assert_eq!(Request::decode(&k, &d), Err(want), "{what}");
        }
        let long = Request {
            node: "x".repeat(MAX_NAME + 1),
            ..req()
        };
        assert_eq!(long.encode(&k), Err(ProtoError::BadName));
    }
}
