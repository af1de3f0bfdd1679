//! Record types and their bodies: typed views over validated bytes.
//!
//! Every record body has a fixed little-endian layout documented in `docs/stream-format.md`.
//! Parsing ([`RecordRef::parse`]) validates everything that can be checked from the body
//! alone (lengths, reserved bytes, enumerations, UTF-8, JSON syntax, ranges) so that the
//! typed values handed to callers are always internally consistent; what needs several
//! records (epoch order, counts, digests) is checked by [`crate::EpochVerifier`].
//!
//! Extension rule: a layout never changes inside a version. New information is a new record
//! type; types with the high bit set are optional and a reader that does not know them skips
//! them ([`Record::Unknown`]).

use std::fmt;

use thiserror::Error;

use crate::header::{le_u16, le_u32, le_u64};
use crate::pages::{PageData, PageDataRef, PageEncoding};
use crate::{StreamKind, MAX_BATCH_PAGES, MAX_PFN, PAGE_SIZE};

/// A record type code. Codes with [`RecordType::OPTIONAL`] set may be skipped by readers that
/// do not know them; any other unknown code is fatal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordType(pub u32);

impl RecordType {
    /// High bit: readers that do not know the type skip the record.
    pub const OPTIONAL: u32 = 0x8000_0000;

    /// Clean end of the stream; nothing may follow.
    pub const END: Self = Self(0x0000_0001);
    /// The domain's configuration (JSON), part of a checkpoint.
    pub const DOMAIN_CONFIG: Self = Self(0x0000_0002);
    /// Opens checkpoint `epoch`.
    pub const CHECKPOINT_BEGIN: Self = Self(0x0000_0003);
    /// A batch of guest pages of one checkpoint.
    pub const PAGE_DATA: Self = Self(0x0000_0004);
    /// A chunk of the device state blob of one checkpoint.
    pub const DEVICE_STATE: Self = Self(0x0000_0005);
    /// A guest disk write issued during an epoch.
    pub const DISK_WRITE: Self = Self(0x0000_0006);
    /// Closes the disk writes of an epoch: how many there were.
    pub const DISK_BARRIER: Self = Self(0x0000_0007);
    /// Closes checkpoint `epoch` with counts and a digest of everything it contained.
    pub const CHECKPOINT_END: Self = Self(0x0000_0008);
    /// Control-protocol message (JSON).
    pub const CONTROL: Self = Self(0x0000_0009);
    /// Backup → primary: checkpoint `epoch` is durable.
    pub const CHECKPOINT_ACK: Self = Self(0x0000_0010);
    /// Backup → primary: checkpoint `epoch` was refused.
    pub const CHECKPOINT_NACK: Self = Self(0x0000_0011);
    /// Primary → backup: planned switchover. Checkpoint `epoch` is the final one: the VM is
    /// stopped at it and the backup is to take over from it. Mandatory: a backup that does
    /// not know it must fail rather than keep waiting as a replica.
    pub const HANDOFF: Self = Self(0x0000_000A);
    /// Primary → backup: the digest of a disk region as checkpoint `epoch` leaves it, to be
    /// compared with the replica once that checkpoint commits (online verify). Optional, and
    /// outside every epoch's counts and digest, so an older backup skips it without failing
    /// the checkpoint; the primary sends it only to a backup that announced it can answer.
    pub const DISK_VERIFY: Self = Self(0x8000_0012);
    /// Backup → primary: the outcome of one `DISK_VERIFY`. Optional.
    pub const DISK_VERIFY_RESULT: Self = Self(0x8000_0013);

    /// Every type this version defines, for tables and tests.
    pub const KNOWN: [RecordType; 14] = [
        Self::END,
        Self::DOMAIN_CONFIG,
        Self::CHECKPOINT_BEGIN,
        Self::PAGE_DATA,
        Self::DEVICE_STATE,
        Self::DISK_WRITE,
        Self::DISK_BARRIER,
        Self::CHECKPOINT_END,
        Self::CONTROL,
        Self::CHECKPOINT_ACK,
        Self::CHECKPOINT_NACK,
        Self::HANDOFF,
        Self::DISK_VERIFY,
        Self::DISK_VERIFY_RESULT,
    ];

    /// Whether a reader that does not know this type may skip it.
    pub fn is_optional(self) -> bool {
        self.0 & Self::OPTIONAL != 0
    }

    /// The type's name, if this version defines it.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::END => "END",
            Self::DOMAIN_CONFIG => "DOMAIN_CONFIG",
            Self::CHECKPOINT_BEGIN => "CHECKPOINT_BEGIN",
            Self::PAGE_DATA => "PAGE_DATA",
            Self::DEVICE_STATE => "DEVICE_STATE",
            Self::DISK_WRITE => "DISK_WRITE",
            Self::DISK_BARRIER => "DISK_BARRIER",
            Self::CHECKPOINT_END => "CHECKPOINT_END",
            Self::CONTROL => "CONTROL",
            Self::CHECKPOINT_ACK => "CHECKPOINT_ACK",
            Self::CHECKPOINT_NACK => "CHECKPOINT_NACK",
            Self::HANDOFF => "HANDOFF",
            Self::DISK_VERIFY => "DISK_VERIFY",
            Self::DISK_VERIFY_RESULT => "DISK_VERIFY_RESULT",
            _ => return None,
        })
    }

    /// Whether a stream of `kind` may carry this (known) type.
    pub fn allowed_in(self, kind: StreamKind) -> bool {
        match self {
            Self::END | Self::CONTROL => true,
            Self::CHECKPOINT_ACK | Self::CHECKPOINT_NACK | Self::DISK_VERIFY_RESULT => {
                kind == StreamKind::Reply
            }
            _ => kind == StreamKind::Replication,
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None if self.is_optional() => write!(f, "0x{:08x} (unknown, optional)", self.0),
            None => write!(f, "0x{:08x} (unknown, mandatory)", self.0),
        }
    }
}

/// Why a record body is malformed. The decoder wraps it with the record's offset and type.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    /// A fixed-size body has the wrong length.
    #[error("body is {found} bytes, expected exactly {expected}")]
    Length { expected: usize, found: usize },
    /// A variable body is shorter than its fixed part.
    #[error("body is {found} bytes, shorter than the {min}-byte fixed part")]
    TooShort { min: usize, found: usize },
    /// Reserved bytes must be zero so they can be given a meaning later.
    #[error("reserved field at body offset {at} is not zero")]
    Reserved { at: usize },
    /// PAGE_DATA page count outside 1..=1024.
    #[error("page count {0} outside 1..=1024")]
    PageCount(u32),
    /// PAGE_DATA encoding code unknown.
    #[error("unknown page encoding {0}")]
    Encoding(u8),
    /// PAGE_DATA frame numbers must increase strictly (no duplicates in a batch).
    #[error("pfn #{index} ({pfn:#x}) does not follow {prev:#x} in increasing order")]
    PfnOrder { index: usize, pfn: u64, prev: u64 },
    /// PAGE_DATA frame number beyond the 52-bit physical address space.
    #[error("pfn #{index} ({pfn:#x}) beyond the largest frame number {max:#x}", max = MAX_PFN)]
    PfnRange { index: usize, pfn: u64 },
    /// PAGE_DATA payload length does not fit the encoding.
    #[error("{encoding} payload of {found} bytes, expected {expected}")]
    Payload {
        encoding: PageEncoding,
        expected: String,
        found: usize,
    },
    /// DEVICE_STATE chunk reaches past the blob's declared total.
    #[error("device state chunk at offset {offset} of {len} bytes exceeds the total of {total}")]
    DeviceChunk { offset: u64, len: u64, total: u64 },
    /// DISK_WRITE kind unknown.
    #[error("unknown disk write kind {0}")]
    DiskKind(u8),
    /// DISK_WRITE of zero bytes, or one whose end overflows 64 bits.
    #[error("disk write of {len} bytes at offset {offset} is empty or overflows")]
    DiskRange { offset: u64, len: u32 },
    /// DISK_WRITE data length does not match the declared length.
    #[error("disk write declares {declared} bytes but carries {found}")]
    DiskData { declared: u32, found: usize },
    /// DISK_VERIFY / DISK_VERIFY_RESULT digest algorithm unknown.
    #[error("unknown digest algorithm {0}")]
    DigestAlgorithm(u8),
    /// DISK_VERIFY digest bytes past the algorithm's length are not zero.
    #[error("digest bytes past the algorithm's {used} are not zero")]
    DigestPadding { used: usize },
    /// DISK_VERIFY / DISK_VERIFY_RESULT region of zero bytes, over the limit, or overflowing.
    #[error("verify region of {len} bytes at offset {offset} is empty, over {max} bytes, or overflows", max = MAX_VERIFY_REGION)]
    VerifyRange { offset: u64, len: u32 },
    /// A text field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    Utf8 { field: &'static str },
    /// A JSON field does not parse.
    #[error("{field} is not valid JSON: {reason}")]
    Json { field: &'static str, reason: String },
    /// A text field exceeds its limit.
    #[error("{field} is {len} bytes, longer than {max}")]
    TextLength {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// Longest NACK message a reader accepts.
pub const MAX_NACK_MESSAGE: usize = 4096;

/// `DISK_BARRIER`: the end of epoch `epoch`'s disk writes on this stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskBarrier {
    /// Epoch whose writes this closes.
    pub epoch: u64,
    /// How many `DISK_WRITE` records of the epoch precede it.
    pub writes: u64,
    /// Sum of their `DATA` payload bytes.
    pub data_bytes: u64,
}

/// Largest region one `DISK_VERIFY` may cover (bounds the backup's work per record).
pub const MAX_VERIFY_REGION: u32 = 64 << 20;

/// Digest algorithms of `DISK_VERIFY`. The digest field is 32 bytes; an algorithm with a
/// shorter digest uses the first bytes and leaves the rest zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    /// XXH3-128 (seed 0), little-endian: 16 bytes.
    Xxh3_128,
}

impl DigestAlgorithm {
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            DigestAlgorithm::Xxh3_128 => 1,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(DigestAlgorithm::Xxh3_128),
            _ => None,
        }
    }

    /// Bytes of the digest field the algorithm uses.
    pub fn digest_len(self) -> usize {
        match self {
            DigestAlgorithm::Xxh3_128 => 16,
        }
    }
}

/// A disk region named by a verify record: `length` bytes at `offset` of disk `disk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerifyRegion {
    /// Index of the disk in the domain's disk list.
    pub disk: u16,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes covered, `1 ..= MAX_VERIFY_REGION`.
    pub length: u32,
}

/// `DISK_VERIFY`: the primary's digest of a region as checkpoint `epoch` leaves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskVerify {
    /// The checkpoint whose committed replica the region is compared with.
    pub epoch: u64,
    /// The verify run (chosen by the primary; echoed in the result).
    pub run: u32,
    /// The region.
    pub region: VerifyRegion,
    /// How `digest` was computed.
    pub algorithm: DigestAlgorithm,
    /// The digest, `algorithm.digest_len()` bytes used, the rest zero.
    pub digest: [u8; 32],
}

/// What the backup found for one `DISK_VERIFY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyVerdict {
    /// The replica's region has the same digest at the checkpoint.
    Match,
    /// The replica's region differs.
    Differ,
    /// Not compared: the replica was already past the checkpoint when the request came.
    Stale,
    /// Not compared: the replica is mid-synchronisation (not an image the VM had).
    Inconsistent,
    /// Not compared: the backup could not read the region (no such disk, out of range, I/O).
    Unreadable,
    /// Not compared: the backup does not know the digest algorithm.
    Algorithm,
    /// A code this version does not know; kept so it can be reported.
    Other(u8),
}

impl VerifyVerdict {
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            VerifyVerdict::Match => 0,
            VerifyVerdict::Differ => 1,
            VerifyVerdict::Stale => 2,
            VerifyVerdict::Inconsistent => 3,
            VerifyVerdict::Unreadable => 4,
            VerifyVerdict::Algorithm => 5,
            VerifyVerdict::Other(c) => c,
        }
    }

    /// From a wire code; unknown codes are kept (and count as "not compared").
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => VerifyVerdict::Match,
            1 => VerifyVerdict::Differ,
            2 => VerifyVerdict::Stale,
            3 => VerifyVerdict::Inconsistent,
            4 => VerifyVerdict::Unreadable,
            5 => VerifyVerdict::Algorithm,
            c => VerifyVerdict::Other(c),
        }
    }
}

impl fmt::Display for VerifyVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyVerdict::Match => f.write_str("match"),
            VerifyVerdict::Differ => f.write_str("differ"),
            VerifyVerdict::Stale => f.write_str("stale"),
            VerifyVerdict::Inconsistent => f.write_str("inconsistent"),
            VerifyVerdict::Unreadable => f.write_str("unreadable"),
            VerifyVerdict::Algorithm => f.write_str("unknown-algorithm"),
            VerifyVerdict::Other(c) => write!(f, "code-{c}"),
        }
    }
}

/// `DISK_VERIFY_RESULT`: the backup's answer to one `DISK_VERIFY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskVerifyResult {
    /// The checkpoint the request named.
    pub epoch: u64,
    /// The request's run.
    pub run: u32,
    /// The request's region.
    pub region: VerifyRegion,
    /// What the backup found.
    pub verdict: VerifyVerdict,
}

/// `CHECKPOINT_END`: everything the receiver needs to prove checkpoint `epoch` is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointEnd {
    /// The checkpoint being closed.
    pub epoch: u64,
    /// Pages carried by the epoch's `PAGE_DATA` records.
    pub pages: u64,
    /// Number of `PAGE_DATA` records of the epoch.
    pub page_records: u64,
    /// Device state bytes of the epoch (sum of chunk lengths).
    pub device_state_bytes: u64,
    /// `DISK_WRITE` records of the epoch.
    pub disk_writes: u64,
    /// Chained CRC32C over the record checksums of the epoch, in stream order.
    pub digest: u32,
}

/// Why the backup refused a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackReason {
    /// `CHECKPOINT_END`'s digest did not match the records received.
    DigestMismatch,
    /// `CHECKPOINT_END`'s counts did not match the records received.
    CountMismatch,
    /// A record broke the ordering rules.
    Protocol,
    /// The backup could not make the checkpoint durable (disk error, fsync failure).
    Storage,
    /// The backup ran out of memory or space.
    Resources,
    /// The backup is shutting down.
    ShuttingDown,
    /// A code this version does not know; kept so it can be reported.
    Other(u32),
}

impl NackReason {
    /// Wire code.
    pub fn code(self) -> u32 {
        match self {
            NackReason::DigestMismatch => 1,
            NackReason::CountMismatch => 2,
            NackReason::Protocol => 3,
            NackReason::Storage => 4,
            NackReason::Resources => 5,
            NackReason::ShuttingDown => 6,
            NackReason::Other(c) => c,
        }
    }

    /// From a wire code; unknown codes are kept, not rejected.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => NackReason::DigestMismatch,
            2 => NackReason::CountMismatch,
            3 => NackReason::Protocol,
            4 => NackReason::Storage,
            5 => NackReason::Resources,
            6 => NackReason::ShuttingDown,
            c => NackReason::Other(c),
        }
    }
}

impl fmt::Display for NackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NackReason::DigestMismatch => f.write_str("digest-mismatch"),
            NackReason::CountMismatch => f.write_str("count-mismatch"),
            NackReason::Protocol => f.write_str("protocol"),
            NackReason::Storage => f.write_str("storage"),
            NackReason::Resources => f.write_str("resources"),
            NackReason::ShuttingDown => f.write_str("shutting-down"),
            NackReason::Other(c) => write!(f, "code-{c}"),
        }
    }
}

/// `CHECKPOINT_NACK` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    /// Refused checkpoint.
    pub epoch: u64,
    /// Machine-readable reason.
    pub reason: NackReason,
    /// Human-readable detail for the primary's log (≤ 4096 bytes).
    pub message: String,
}

/// `DOMAIN_CONFIG` body: the domain definition the checkpoint was taken with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Checkpoint this configuration belongs to.
    pub epoch: u64,
    /// JSON text (validated syntax; the schema belongs to the agent).
    pub json: String,
}

/// `DEVICE_STATE` chunk, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// Checkpoint the blob belongs to.
    pub epoch: u64,
    /// Length of the whole blob; the same in every chunk of the epoch.
    pub total_len: u64,
    /// Byte offset of this chunk in the blob; chunks arrive in order without gaps.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

/// `DEVICE_STATE` chunk, borrowed from the decoder's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStateRef<'a> {
    /// See [`DeviceState::epoch`].
    pub epoch: u64,
    /// See [`DeviceState::total_len`].
    pub total_len: u64,
    /// See [`DeviceState::offset`].
    pub offset: u64,
    /// See [`DeviceState::data`].
    pub data: &'a [u8],
}

/// What a disk write does, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskOp {
    /// Write these bytes.
    Data(Vec<u8>),
    /// Write this many zero bytes.
    Zeroes(u32),
    /// Discard this many bytes (contents become unspecified, reading zeroes is allowed).
    Trim(u32),
}

/// What a disk write does, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOpRef<'a> {
    /// See [`DiskOp::Data`].
    Data(&'a [u8]),
    /// See [`DiskOp::Zeroes`].
    Zeroes(u32),
    /// See [`DiskOp::Trim`].
    Trim(u32),
}

impl DiskOpRef<'_> {
    /// Bytes of the disk this operation covers.
    pub fn len(&self) -> u32 {
        match self {
            // Validated at parse: data length equals the declared u32 length.
            DiskOpRef::Data(d) => d.len() as u32,
            DiskOpRef::Zeroes(n) | DiskOpRef::Trim(n) => *n,
        }
    }

    /// Whether the operation covers no bytes (never true for a parsed record).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn kind(&self) -> u8 {
        match self {
            DiskOpRef::Data(_) => DISK_DATA,
            DiskOpRef::Zeroes(_) => DISK_ZEROES,
            DiskOpRef::Trim(_) => DISK_TRIM,
        }
    }
}

const DISK_DATA: u8 = 0;
const DISK_ZEROES: u8 = 1;
const DISK_TRIM: u8 = 2;

/// `DISK_WRITE`, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    /// Epoch during which the guest issued the write.
    pub epoch: u64,
    /// Index of the disk in the domain's disk list.
    pub disk: u16,
    /// Byte offset on the disk.
    pub offset: u64,
    /// The operation.
    pub op: DiskOp,
}

/// `DISK_WRITE`, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskWriteRef<'a> {
    /// See [`DiskWrite::epoch`].
    pub epoch: u64,
    /// See [`DiskWrite::disk`].
    pub disk: u16,
    /// See [`DiskWrite::offset`].
    pub offset: u64,
    /// See [`DiskWrite::op`].
    pub op: DiskOpRef<'a>,
}

/// A decoded record, owned. Produced by [`crate::Decoder::decode`]; consumed by
/// [`crate::Encoder::record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `END`.
    End,
    /// `DOMAIN_CONFIG`.
    DomainConfig(DomainConfig),
    /// `CHECKPOINT_BEGIN`.
    CheckpointBegin {
        /// The checkpoint being opened.
        epoch: u64,
    },
    /// `PAGE_DATA`.
    PageData(PageData),
    /// `DEVICE_STATE`.
    DeviceState(DeviceState),
    /// `DISK_WRITE`.
    DiskWrite(DiskWrite),
    /// `DISK_BARRIER`.
    DiskBarrier(DiskBarrier),
    /// `CHECKPOINT_END`.
    CheckpointEnd(CheckpointEnd),
    /// `CONTROL`: JSON text.
    Control(String),
    /// `CHECKPOINT_ACK`.
    CheckpointAck {
        /// The acknowledged checkpoint.
        epoch: u64,
    },
    /// `CHECKPOINT_NACK`.
    CheckpointNack(Nack),
    /// `HANDOFF`: checkpoint `epoch` is the final one of a planned switchover.
    HandOff {
        /// The final checkpoint (the last one completed in this stream).
        epoch: u64,
    },
    /// `DISK_VERIFY`.
    DiskVerify(DiskVerify),
    /// `DISK_VERIFY_RESULT`.
    DiskVerifyResult(DiskVerifyResult),
    /// An optional record this version does not know; skipped.
    Unknown {
        /// Its type code (high bit set).
        record_type: RecordType,
        /// Its body length.
        length: u32,
    },
}

/// A decoded record borrowing from the decoder's buffer: the zero-copy view for hot paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordRef<'a> {
    /// `END`.
    End,
    /// `DOMAIN_CONFIG`.
    DomainConfig {
        /// See [`DomainConfig::epoch`].
        epoch: u64,
        /// See [`DomainConfig::json`].
        json: &'a str,
    },
    /// `CHECKPOINT_BEGIN`.
    CheckpointBegin {
        /// The checkpoint being opened.
        epoch: u64,
    },
    /// `PAGE_DATA`.
    PageData(PageDataRef<'a>),
    /// `DEVICE_STATE`.
    DeviceState(DeviceStateRef<'a>),
    /// `DISK_WRITE`.
    DiskWrite(DiskWriteRef<'a>),
    /// `DISK_BARRIER`.
    DiskBarrier(DiskBarrier),
    /// `CHECKPOINT_END`.
    CheckpointEnd(CheckpointEnd),
    /// `CONTROL`.
    Control(&'a str),
    /// `CHECKPOINT_ACK`.
    CheckpointAck {
        /// The acknowledged checkpoint.
        epoch: u64,
    },
    /// `CHECKPOINT_NACK`.
    CheckpointNack {
        /// See [`Nack::epoch`].
        epoch: u64,
        /// See [`Nack::reason`].
        reason: NackReason,
        /// See [`Nack::message`].
        message: &'a str,
    },
    /// `HANDOFF`.
    HandOff {
        /// The final checkpoint.
        epoch: u64,
    },
    /// `DISK_VERIFY`.
    DiskVerify(DiskVerify),
    /// `DISK_VERIFY_RESULT`.
    DiskVerifyResult(DiskVerifyResult),
    /// An optional record this version does not know.
    Unknown {
        /// Its type code.
        record_type: RecordType,
        /// Its body length.
        length: u32,
    },
}

/// Fixed part of each variable-length body.
pub(crate) const PAGE_DATA_FIXED: usize = 16;
pub(crate) const DEVICE_STATE_FIXED: usize = 24;
pub(crate) const DISK_WRITE_FIXED: usize = 24;
pub(crate) const DOMAIN_CONFIG_FIXED: usize = 8;
pub(crate) const NACK_FIXED: usize = 16;

fn exact(body: &[u8], expected: usize) -> Result<(), BodyError> {
    if body.len() != expected {
        return Err(BodyError::Length {
            expected,
            found: body.len(),
        });
    }
    Ok(())
}

fn at_least(body: &[u8], min: usize) -> Result<(), BodyError> {
    if body.len() < min {
        return Err(BodyError::TooShort {
            min,
            found: body.len(),
        });
    }
    Ok(())
}

fn json_text<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, BodyError> {
    let text = std::str::from_utf8(bytes).map_err(|_| BodyError::Utf8 { field })?;
    // Syntax check without building a tree: IgnoredAny walks the input once. serde_json's
    // recursion limit (128) keeps hostile nesting from exhausting the stack.
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| BodyError::Json {
        field,
        reason: e.to_string(),
    })?;
    Ok(text)
}

impl<'a> RecordRef<'a> {
    /// Parses and validates the body of a record of known type `rtype`. Unknown types are
    /// the decoder's business (skip or fail); here they come back as [`RecordRef::Unknown`].
    pub fn parse(rtype: RecordType, body: &'a [u8]) -> Result<Self, BodyError> {
        Ok(match rtype {
            RecordType::END => {
                exact(body, 0)?;
                RecordRef::End
            }
            RecordType::DOMAIN_CONFIG => {
                at_least(body, DOMAIN_CONFIG_FIXED)?;
                RecordRef::DomainConfig {
                    epoch: le_u64(body, 0),
                    json: json_text(&body[DOMAIN_CONFIG_FIXED..], "domain config")?,
                }
            }
            RecordType::CHECKPOINT_BEGIN => {
                exact(body, 8)?;
                RecordRef::CheckpointBegin {
                    epoch: le_u64(body, 0),
                }
            }
            RecordType::PAGE_DATA => RecordRef::PageData(parse_page_data(body)?),
            RecordType::DEVICE_STATE => {
                at_least(body, DEVICE_STATE_FIXED)?;
                let epoch = le_u64(body, 0);
                let total_len = le_u64(body, 8);
                let offset = le_u64(body, 16);
                let data = &body[DEVICE_STATE_FIXED..];
                let len = data.len() as u64;
                if offset.checked_add(len).is_none_or(|end| end > total_len) {
                    return Err(BodyError::DeviceChunk {
                        offset,
                        len,
                        total: total_len,
                    });
                }
                RecordRef::DeviceState(DeviceStateRef {
                    epoch,
                    total_len,
                    offset,
                    data,
                })
            }
            RecordType::DISK_WRITE => RecordRef::DiskWrite(parse_disk_write(body)?),
            RecordType::DISK_BARRIER => {
                exact(body, 24)?;
                RecordRef::DiskBarrier(DiskBarrier {
                    epoch: le_u64(body, 0),
                    writes: le_u64(body, 8),
                    data_bytes: le_u64(body, 16),
                })
            }
            RecordType::CHECKPOINT_END => {
                exact(body, 48)?;
                if le_u32(body, 44) != 0 {
                    return Err(BodyError::Reserved { at: 44 });
                }
                RecordRef::CheckpointEnd(CheckpointEnd {
                    epoch: le_u64(body, 0),
                    pages: le_u64(body, 8),
                    page_records: le_u64(body, 16),
                    device_state_bytes: le_u64(body, 24),
                    disk_writes: le_u64(body, 32),
                    digest: le_u32(body, 40),
                })
            }
            RecordType::CONTROL => RecordRef::Control(json_text(body, "control message")?),
            RecordType::CHECKPOINT_ACK => {
                exact(body, 8)?;
                RecordRef::CheckpointAck {
                    epoch: le_u64(body, 0),
                }
            }
            RecordType::HANDOFF => {
                exact(body, 8)?;
                RecordRef::HandOff {
                    epoch: le_u64(body, 0),
                }
            }
            RecordType::DISK_VERIFY => RecordRef::DiskVerify(parse_disk_verify(body)?),
            RecordType::DISK_VERIFY_RESULT => {
                RecordRef::DiskVerifyResult(parse_disk_verify_result(body)?)
            }
            RecordType::CHECKPOINT_NACK => {
                at_least(body, NACK_FIXED)?;
                if le_u32(body, 12) != 0 {
                    return Err(BodyError::Reserved { at: 12 });
                }
                let text = &body[NACK_FIXED..];
                if text.len() > MAX_NACK_MESSAGE {
                    return Err(BodyError::TextLength {
                        field: "nack message",
                        len: text.len(),
                        max: MAX_NACK_MESSAGE,
                    });
                }
                RecordRef::CheckpointNack {
                    epoch: le_u64(body, 0),
                    reason: NackReason::from_code(le_u32(body, 8)),
                    message: std::str::from_utf8(text).map_err(|_| BodyError::Utf8 {
                        field: "nack message",
                    })?,
                }
            }
            other => RecordRef::Unknown {
                record_type: other,
                // The decoder bounds bodies far below 4 GiB.
                length: body.len() as u32,
            },
        })
    }

    /// The epoch this record belongs to, for records that carry one.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            RecordRef::DomainConfig { epoch, .. }
            | RecordRef::CheckpointBegin { epoch }
            | RecordRef::HandOff { epoch }
            | RecordRef::CheckpointAck { epoch }
            | RecordRef::CheckpointNack { epoch, .. } => Some(*epoch),
            RecordRef::PageData(p) => Some(p.epoch),
            RecordRef::DeviceState(d) => Some(d.epoch),
            RecordRef::DiskWrite(d) => Some(d.epoch),
            RecordRef::DiskBarrier(b) => Some(b.epoch),
            RecordRef::CheckpointEnd(e) => Some(e.epoch),
            // Verify records name a checkpoint but belong to none (outside its counts).
            RecordRef::End
            | RecordRef::Control(_)
            | RecordRef::DiskVerify(_)
            | RecordRef::DiskVerifyResult(_)
            | RecordRef::Unknown { .. } => None,
        }
    }

    /// Copies the record out of the decoder's buffer.
    pub fn to_owned_record(&self) -> Record {
        match *self {
            RecordRef::End => Record::End,
            RecordRef::DomainConfig { epoch, json } => Record::DomainConfig(DomainConfig {
                epoch,
                json: json.to_owned(),
            }),
            RecordRef::CheckpointBegin { epoch } => Record::CheckpointBegin { epoch },
            RecordRef::PageData(p) => Record::PageData(p.to_owned_data()),
            RecordRef::DeviceState(d) => Record::DeviceState(DeviceState {
                epoch: d.epoch,
                total_len: d.total_len,
                offset: d.offset,
                data: d.data.to_vec(),
            }),
            RecordRef::DiskWrite(w) => Record::DiskWrite(DiskWrite {
                epoch: w.epoch,
                disk: w.disk,
                offset: w.offset,
                op: match w.op {
                    DiskOpRef::Data(d) => DiskOp::Data(d.to_vec()),
                    DiskOpRef::Zeroes(n) => DiskOp::Zeroes(n),
                    DiskOpRef::Trim(n) => DiskOp::Trim(n),
                },
            }),
            RecordRef::DiskBarrier(b) => Record::DiskBarrier(b),
            RecordRef::CheckpointEnd(e) => Record::CheckpointEnd(e),
            RecordRef::Control(json) => Record::Control(json.to_owned()),
            RecordRef::CheckpointAck { epoch } => Record::CheckpointAck { epoch },
            RecordRef::HandOff { epoch } => Record::HandOff { epoch },
            RecordRef::DiskVerify(v) => Record::DiskVerify(v),
            RecordRef::DiskVerifyResult(r) => Record::DiskVerifyResult(r),
            RecordRef::CheckpointNack {
                epoch,
                reason,
                message,
            } => Record::CheckpointNack(Nack {
                epoch,
                reason,
                message: message.to_owned(),
            }),
            RecordRef::Unknown {
                record_type,
                length,
            } => Record::Unknown {
                record_type,
                length,
            },
        }
    }

    /// Type code of the record.
    pub fn record_type(&self) -> RecordType {
        match self {
            RecordRef::End => RecordType::END,
            RecordRef::DomainConfig { .. } => RecordType::DOMAIN_CONFIG,
            RecordRef::CheckpointBegin { .. } => RecordType::CHECKPOINT_BEGIN,
            RecordRef::PageData(_) => RecordType::PAGE_DATA,
            RecordRef::DeviceState(_) => RecordType::DEVICE_STATE,
            RecordRef::DiskWrite(_) => RecordType::DISK_WRITE,
            RecordRef::DiskBarrier(_) => RecordType::DISK_BARRIER,
            RecordRef::CheckpointEnd(_) => RecordType::CHECKPOINT_END,
            RecordRef::Control(_) => RecordType::CONTROL,
            RecordRef::CheckpointAck { .. } => RecordType::CHECKPOINT_ACK,
            RecordRef::CheckpointNack { .. } => RecordType::CHECKPOINT_NACK,
            RecordRef::HandOff { .. } => RecordType::HANDOFF,
            RecordRef::DiskVerify(_) => RecordType::DISK_VERIFY,
            RecordRef::DiskVerifyResult(_) => RecordType::DISK_VERIFY_RESULT,
            RecordRef::Unknown { record_type, .. } => *record_type,
        }
    }
}

fn parse_page_data(body: &[u8]) -> Result<PageDataRef<'_>, BodyError> {
    at_least(body, PAGE_DATA_FIXED)?;
    let epoch = le_u64(body, 0);
    let count = le_u32(body, 8);
    if count == 0 || count as usize > MAX_BATCH_PAGES {
        return Err(BodyError::PageCount(count));
    }
    let encoding = PageEncoding::from_code(body[12]).ok_or(BodyError::Encoding(body[12]))?;
    if let Some(at) = (13..16).find(|&i| body[i] != 0) {
        return Err(BodyError::Reserved { at });
    }
    let count = count as usize;
    let pfn_end = PAGE_DATA_FIXED + 8 * count;
    at_least(body, pfn_end)?;
    let pfn_bytes = &body[PAGE_DATA_FIXED..pfn_end];
    check_pfns(pfn_bytes.chunks_exact(8).map(|c| le_u64(c, 0)))?;
    let payload = &body[pfn_end..];
    check_payload(encoding, count, payload.len())?;
    Ok(PageDataRef::from_parts(epoch, encoding, pfn_bytes, payload))
}

/// Frame numbers must be in range and strictly increasing.
pub(crate) fn check_pfns(pfns: impl Iterator<Item = u64>) -> Result<(), BodyError> {
    let mut prev = None;
    for (index, pfn) in pfns.enumerate() {
        if pfn > MAX_PFN {
            return Err(BodyError::PfnRange { index, pfn });
        }
        if let Some(prev) = prev {
            if pfn <= prev {
                return Err(BodyError::PfnOrder { index, pfn, prev });
            }
        }
        prev = Some(pfn);
    }
    Ok(())
}

/// The payload length each encoding allows for `count` pages.
pub(crate) fn check_payload(
    encoding: PageEncoding,
    count: usize,
    len: usize,
) -> Result<(), BodyError> {
    let raw = count * PAGE_SIZE;
    let max_lz4 = lz4_flex::block::get_maximum_output_size(raw);
    let (ok, expected) = match encoding {
        PageEncoding::Raw => (len == raw, format!("{raw}")),
        PageEncoding::Zero => (len == 0, "0".to_owned()),
        PageEncoding::Lz4 | PageEncoding::XorLz4 => {
            (len > 0 && len <= max_lz4, format!("1..={max_lz4}"))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(BodyError::Payload {
            encoding,
            expected,
            found: len,
        })
    }
}

/// Checks what the encoder cannot express in the layout itself, for records built by
/// callers (the decoder checks the same through [`RecordRef::parse`]).
pub(crate) fn check_owned(record: &Record) -> Result<(), BodyError> {
    match record {
        Record::DomainConfig(c) => json_text(c.json.as_bytes(), "domain config").map(drop),
        Record::Control(json) => json_text(json.as_bytes(), "control message").map(drop),
        Record::PageData(p) => {
            if p.pfns.is_empty() || p.pfns.len() > MAX_BATCH_PAGES {
                return Err(BodyError::PageCount(
                    u32::try_from(p.pfns.len()).unwrap_or(u32::MAX),
                ));
            }
            check_pfns(p.pfns.iter().copied())?;
            check_payload(p.encoding, p.pfns.len(), p.payload.len())
        }
        Record::DeviceState(d) => {
            let len = d.data.len() as u64;
            if d.offset
                .checked_add(len)
                .is_none_or(|end| end > d.total_len)
            {
                return Err(BodyError::DeviceChunk {
                    offset: d.offset,
                    len,
                    total: d.total_len,
                });
            }
            Ok(())
        }
        Record::DiskWrite(w) => {
            let len = match &w.op {
                DiskOp::Data(d) => u32::try_from(d.len()).unwrap_or(0),
                DiskOp::Zeroes(n) | DiskOp::Trim(n) => *n,
            };
            if len == 0 || w.offset.checked_add(u64::from(len)).is_none() {
                return Err(BodyError::DiskRange {
                    offset: w.offset,
                    len,
                });
            }
            Ok(())
        }
        Record::DiskVerify(v) => {
            check_verify_region(&v.region)?;
            if v.digest[v.algorithm.digest_len()..].iter().any(|&b| b != 0) {
                return Err(BodyError::DigestPadding {
                    used: v.algorithm.digest_len(),
                });
            }
            Ok(())
        }
        Record::DiskVerifyResult(r) => check_verify_region(&r.region),
        Record::CheckpointNack(n) if n.message.len() > MAX_NACK_MESSAGE => {
            Err(BodyError::TextLength {
                field: "nack message",
                len: n.message.len(),
                max: MAX_NACK_MESSAGE,
            })
        }
        _ => Ok(()),
    }
}

/// Body length of `DISK_VERIFY`.
pub(crate) const DISK_VERIFY_LEN: usize = 64;
/// Body length of `DISK_VERIFY_RESULT`.
pub(crate) const DISK_VERIFY_RESULT_LEN: usize = 32;

fn check_verify_region(r: &VerifyRegion) -> Result<(), BodyError> {
    if r.length == 0
        || r.length > MAX_VERIFY_REGION
        || r.offset.checked_add(u64::from(r.length)).is_none()
    {
        return Err(BodyError::VerifyRange {
            offset: r.offset,
            len: r.length,
        });
    }
    Ok(())
}

/// The part both verify records share: epoch, offset, length, disk, a code byte, a
/// reserved byte, run, four reserved bytes. Returns the region, the code and the run.
fn parse_verify_head(body: &[u8]) -> Result<(u64, VerifyRegion, u8, u32), BodyError> {
    if body[23] != 0 {
        return Err(BodyError::Reserved { at: 23 });
    }
    if le_u32(body, 28) != 0 {
        return Err(BodyError::Reserved { at: 28 });
    }
    let region = VerifyRegion {
        offset: le_u64(body, 8),
        length: le_u32(body, 16),
        disk: le_u16(body, 20),
    };
    check_verify_region(&region)?;
    Ok((le_u64(body, 0), region, body[22], le_u32(body, 24)))
}

fn parse_disk_verify(body: &[u8]) -> Result<DiskVerify, BodyError> {
    exact(body, DISK_VERIFY_LEN)?;
    let (epoch, region, code, run) = parse_verify_head(body)?;
    let algorithm = DigestAlgorithm::from_code(code).ok_or(BodyError::DigestAlgorithm(code))?;
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&body[32..64]);
    if digest[algorithm.digest_len()..].iter().any(|&b| b != 0) {
        return Err(BodyError::DigestPadding {
            used: algorithm.digest_len(),
        });
    }
    Ok(DiskVerify {
        epoch,
        run,
        region,
        algorithm,
        digest,
    })
}

fn parse_disk_verify_result(body: &[u8]) -> Result<DiskVerifyResult, BodyError> {
    exact(body, DISK_VERIFY_RESULT_LEN)?;
    let (epoch, region, code, run) = parse_verify_head(body)?;
    Ok(DiskVerifyResult {
        epoch,
        run,
        region,
        verdict: VerifyVerdict::from_code(code),
    })
}

fn parse_disk_write(body: &[u8]) -> Result<DiskWriteRef<'_>, BodyError> {
    at_least(body, DISK_WRITE_FIXED)?;
    let epoch = le_u64(body, 0);
    let offset = le_u64(body, 8);
    let len = le_u32(body, 16);
    let disk = le_u16(body, 20);
    let kind = body[22];
    if body[23] != 0 {
        return Err(BodyError::Reserved { at: 23 });
    }
    if len == 0 || offset.checked_add(u64::from(len)).is_none() {
        return Err(BodyError::DiskRange { offset, len });
    }
    let data = &body[DISK_WRITE_FIXED..];
    let op = match kind {
        DISK_DATA => {
            if data.len() != len as usize {
                return Err(BodyError::DiskData {
                    declared: len,
                    found: data.len(),
                });
            }
            DiskOpRef::Data(data)
        }
        DISK_ZEROES | DISK_TRIM => {
            if !data.is_empty() {
                return Err(BodyError::DiskData {
                    declared: 0,
                    found: data.len(),
                });
            }
            if kind == DISK_ZEROES {
                DiskOpRef::Zeroes(len)
            } else {
                DiskOpRef::Trim(len)
            }
        }
        other => return Err(BodyError::DiskKind(other)),
    };
    Ok(DiskWriteRef {
        epoch,
        disk,
        offset,
        op,
    })
}

/// The fixed part of a body, built on the stack, followed by a borrowed variable part.
/// The encoder writes `fixed[..fixed_len]` then `tail`.
pub(crate) struct BodyParts<'a> {
    pub fixed: [u8; 64],
    pub fixed_len: usize,
    pub tail: &'a [u8],
}

impl<'a> BodyParts<'a> {
    fn new(tail: &'a [u8]) -> Self {
        BodyParts {
            fixed: [0; 64],
            fixed_len: 0,
            tail,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.fixed[self.fixed_len..self.fixed_len + bytes.len()].copy_from_slice(bytes);
        self.fixed_len += bytes.len();
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_le_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_le_bytes());
        self
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_le_bytes());
        self
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.put(&[v]);
        self
    }
}

impl Record {
    /// Type code of the record.
    pub fn record_type(&self) -> RecordType {
        match self {
            Record::End => RecordType::END,
            Record::DomainConfig(_) => RecordType::DOMAIN_CONFIG,
            Record::CheckpointBegin { .. } => RecordType::CHECKPOINT_BEGIN,
            Record::PageData(_) => RecordType::PAGE_DATA,
            Record::DeviceState(_) => RecordType::DEVICE_STATE,
            Record::DiskWrite(_) => RecordType::DISK_WRITE,
            Record::DiskBarrier(_) => RecordType::DISK_BARRIER,
            Record::CheckpointEnd(_) => RecordType::CHECKPOINT_END,
            Record::Control(_) => RecordType::CONTROL,
            Record::CheckpointAck { .. } => RecordType::CHECKPOINT_ACK,
            Record::CheckpointNack(_) => RecordType::CHECKPOINT_NACK,
            Record::HandOff { .. } => RecordType::HANDOFF,
            Record::DiskVerify(_) => RecordType::DISK_VERIFY,
            Record::DiskVerifyResult(_) => RecordType::DISK_VERIFY_RESULT,
            Record::Unknown { record_type, .. } => *record_type,
        }
    }

    /// The epoch this record belongs to, for records that carry one.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Record::DomainConfig(c) => Some(c.epoch),
            Record::CheckpointBegin { epoch }
            | Record::CheckpointAck { epoch }
            | Record::HandOff { epoch } => Some(*epoch),
            Record::CheckpointNack(n) => Some(n.epoch),
            Record::PageData(p) => Some(p.epoch),
            Record::DeviceState(d) => Some(d.epoch),
            Record::DiskWrite(d) => Some(d.epoch),
            Record::DiskBarrier(b) => Some(b.epoch),
            Record::CheckpointEnd(e) => Some(e.epoch),
            // Verify records name a checkpoint but belong to none (outside its counts).
            Record::End
            | Record::Control(_)
            | Record::DiskVerify(_)
            | Record::DiskVerifyResult(_)
            | Record::Unknown { .. } => None,
        }
    }

    /// The body split into a stack-built fixed part and a borrowed tail. `PAGE_DATA` is not
    /// handled here (its pfn array needs converting); the encoder special-cases it.
    pub(crate) fn body_parts(&self) -> BodyParts<'_> {
        match self {
            Record::End | Record::Unknown { .. } | Record::PageData(_) => BodyParts::new(&[]),
            Record::DomainConfig(c) => {
                let mut p = BodyParts::new(c.json.as_bytes());
                p.u64(c.epoch);
                p
            }
            Record::CheckpointBegin { epoch }
            | Record::CheckpointAck { epoch }
            | Record::HandOff { epoch } => {
                let mut p = BodyParts::new(&[]);
                p.u64(*epoch);
                p
            }
            Record::DeviceState(d) => {
                let mut p = BodyParts::new(&d.data);
                p.u64(d.epoch).u64(d.total_len).u64(d.offset);
                p
            }
            Record::DiskWrite(w) => {
                let (op, tail): (DiskOpRef<'_>, &[u8]) = match &w.op {
                    DiskOp::Data(d) => (DiskOpRef::Data(d), d),
                    DiskOp::Zeroes(n) => (DiskOpRef::Zeroes(*n), &[]),
                    DiskOp::Trim(n) => (DiskOpRef::Trim(*n), &[]),
                };
                let len = match &w.op {
                    // Checked by the encoder before writing (data over 4 GiB is refused).
                    DiskOp::Data(d) => u32::try_from(d.len()).unwrap_or(u32::MAX),
                    DiskOp::Zeroes(n) | DiskOp::Trim(n) => *n,
                };
                let mut p = BodyParts::new(tail);
                p.u64(w.epoch)
                    .u64(w.offset)
                    .u32(len)
                    .u16(w.disk)
                    .u8(op.kind())
                    .u8(0);
                p
            }
            Record::DiskBarrier(b) => {
                let mut p = BodyParts::new(&[]);
                p.u64(b.epoch).u64(b.writes).u64(b.data_bytes);
                p
            }
            Record::CheckpointEnd(e) => {
                let mut p = BodyParts::new(&[]);
                p.u64(e.epoch)
                    .u64(e.pages)
                    .u64(e.page_records)
                    .u64(e.device_state_bytes)
                    .u64(e.disk_writes)
                    .u32(e.digest)
                    .u32(0);
                p
            }
            Record::Control(json) => BodyParts::new(json.as_bytes()),
            Record::DiskVerify(v) => {
                let mut p = BodyParts::new(&[]);
                p.u64(v.epoch)
                    .u64(v.region.offset)
                    .u32(v.region.length)
                    .u16(v.region.disk)
                    .u8(v.algorithm.code())
                    .u8(0)
                    .u32(v.run)
                    .u32(0);
                p.put(&v.digest);
                p
            }
            Record::DiskVerifyResult(r) => {
                let mut p = BodyParts::new(&[]);
                p.u64(r.epoch)
                    .u64(r.region.offset)
                    .u32(r.region.length)
                    .u16(r.region.disk)
                    .u8(r.verdict.code())
                    .u8(0)
                    .u32(r.run)
                    .u32(0);
                p
            }
            Record::CheckpointNack(n) => {
                let mut p = BodyParts::new(n.message.as_bytes());
                p.u64(n.epoch).u32(n.reason.code()).u32(0);
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-byte DISK_VERIFY body, all zero but for `f`'s changes.
    fn verify(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = vec![0; 64];
        f(&mut b);
        b
    }

    #[test]
    fn verify_records_round_trip_and_unknown_verdicts_are_kept() {
        let mut digest = [0u8; 32];
        digest[..16].copy_from_slice(&[0xab; 16]);
        let v = Record::DiskVerify(DiskVerify {
            epoch: 9,
            run: 3,
            region: VerifyRegion {
                disk: 2,
                offset: 1 << 30,
                length: 1 << 20,
            },
            algorithm: DigestAlgorithm::Xxh3_128,
            digest,
        });
        let parts = v.body_parts();
        let body = parts.fixed[..parts.fixed_len].to_vec();
        assert_eq!(body.len(), DISK_VERIFY_LEN);
        let parsed = RecordRef::parse(RecordType::DISK_VERIFY, &body).unwrap();
        assert_eq!(parsed.to_owned_record(), v);
        assert_eq!(parsed.epoch(), None, "outside every epoch's account");
        let mut res = vec![0u8; 32];
        res[16] = 1;
        res[22] = 77;
        match RecordRef::parse(RecordType::DISK_VERIFY_RESULT, &res).unwrap() {
            RecordRef::DiskVerifyResult(r) => assert_eq!(r.verdict, VerifyVerdict::Other(77)),
            other => panic!("{other:?}"),
        }
        // A digest with bytes past its algorithm's length is refused by the encoder too.
        let mut bad = digest;
        bad[20] = 1;
        let Record::DiskVerify(mut dv) = v else {
            unreachable!()
        };
        dv.digest = bad;
        assert!(matches!(
            check_owned(&Record::DiskVerify(dv)),
            Err(BodyError::DigestPadding { .. })
        ));
        assert!(RecordType::DISK_VERIFY.is_optional());
        assert!(RecordType::DISK_VERIFY_RESULT.is_optional());
        assert!(!RecordType::DISK_VERIFY.allowed_in(StreamKind::Reply));
        assert!(!RecordType::DISK_VERIFY_RESULT.allowed_in(StreamKind::Replication));
    }

    /// Table of malformed bodies and the error each must produce.
    #[test]
    fn malformed_bodies_are_typed_errors() {
        let mut page_hdr = vec![0u8; 16];
        page_hdr[8..12].copy_from_slice(&2u32.to_le_bytes());
        let mut pfns_desc = page_hdr.clone();
        pfns_desc.extend_from_slice(&5u64.to_le_bytes());
        pfns_desc.extend_from_slice(&5u64.to_le_bytes());
        type Check = fn(&BodyError) -> bool;
        let cases: Vec<(&str, RecordType, Vec<u8>, Check)> = vec![
            ("END with a body", RecordType::END, vec![0], |e| {
                matches!(e, BodyError::Length { expected: 0, .. })
            }),
            (
                "BEGIN too short",
                RecordType::CHECKPOINT_BEGIN,
                vec![0; 7],
                |e| matches!(e, BodyError::Length { expected: 8, .. }),
            ),
            ("HANDOFF too long", RecordType::HANDOFF, vec![0; 9], |e| {
                matches!(e, BodyError::Length { expected: 8, .. })
            }),
            (
                "PAGE_DATA count 0",
                RecordType::PAGE_DATA,
                vec![0; 16],
                |e| matches!(e, BodyError::PageCount(0)),
            ),
            (
                "PAGE_DATA pfns missing",
                RecordType::PAGE_DATA,
                page_hdr.clone(),
                |e| matches!(e, BodyError::TooShort { min: 32, .. }),
            ),
            (
                "PAGE_DATA duplicate pfn",
                RecordType::PAGE_DATA,
                pfns_desc,
                |e| matches!(e, BodyError::PfnOrder { index: 1, .. }),
            ),
            (
                "CONTROL not JSON",
                RecordType::CONTROL,
                b"{nope".to_vec(),
                |e| matches!(e, BodyError::Json { .. }),
            ),
            (
                "CONTROL not UTF-8",
                RecordType::CONTROL,
                vec![0xff, 0xfe],
                |e| matches!(e, BodyError::Utf8 { .. }),
            ),
            (
                "DISK_WRITE zero length",
                RecordType::DISK_WRITE,
                vec![0; 24],
                |e| matches!(e, BodyError::DiskRange { len: 0, .. }),
            ),
            (
                "END reserved",
                RecordType::CHECKPOINT_END,
                {
                    let mut b = vec![0; 48];
                    b[47] = 1;
                    b
                },
                |e| matches!(e, BodyError::Reserved { at: 44 }),
            ),
            (
                "DISK_VERIFY short",
                RecordType::DISK_VERIFY,
                vec![0; 63],
                |e| matches!(e, BodyError::Length { expected: 64, .. }),
            ),
            (
                "DISK_VERIFY empty region",
                RecordType::DISK_VERIFY,
                verify(|_| {}),
                |e| matches!(e, BodyError::VerifyRange { len: 0, .. }),
            ),
            (
                "DISK_VERIFY region over the limit",
                RecordType::DISK_VERIFY,
                verify(|b| b[16..20].copy_from_slice(&(MAX_VERIFY_REGION + 1).to_le_bytes())),
                |e| matches!(e, BodyError::VerifyRange { .. }),
            ),
            (
                "DISK_VERIFY region overflows",
                RecordType::DISK_VERIFY,
                verify(|b| {
                    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                    b[16] = 1;
                }),
                |e| matches!(e, BodyError::VerifyRange { .. }),
            ),
            (
                "DISK_VERIFY unknown algorithm",
                RecordType::DISK_VERIFY,
                verify(|b| {
                    b[16] = 1;
                    b[22] = 9;
                }),
                |e| matches!(e, BodyError::DigestAlgorithm(9)),
            ),
            (
                "DISK_VERIFY digest padding",
                RecordType::DISK_VERIFY,
                verify(|b| {
                    b[16] = 1;
                    b[22] = 1;
                    b[63] = 1;
                }),
                |e| matches!(e, BodyError::DigestPadding { used: 16 }),
            ),
            (
                "DISK_VERIFY reserved",
                RecordType::DISK_VERIFY,
                verify(|b| {
                    b[16] = 1;
                    b[22] = 1;
                    b[29] = 1;
                }),
                |e| matches!(e, BodyError::Reserved { at: 28 }),
            ),
            (
                "DISK_VERIFY_RESULT long",
                RecordType::DISK_VERIFY_RESULT,
                vec![0; 33],
                |e| matches!(e, BodyError::Length { expected: 32, .. }),
            ),
            (
                "DISK_VERIFY_RESULT reserved",
                RecordType::DISK_VERIFY_RESULT,
                {
                    let mut b = vec![0; 32];
                    b[16] = 1;
                    b[23] = 1;
                    b
                },
                |e| matches!(e, BodyError::Reserved { at: 23 }),
            ),
        ];
        for (name, rtype, body, check) in cases {
            let err = RecordRef::parse(rtype, &body).expect_err(name);
            assert!(check(&err), "{name}: unexpected error {err:?}");
        }
    }
}
