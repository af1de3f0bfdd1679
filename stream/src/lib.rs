//! The remus replication stream format.
//!
//! Everything the primary sends the backup (checkpoints, disk writes, configuration) and
//! everything the backup answers (acknowledgements) is a stream header followed by a sequence
//! of checksummed records. The normative specification is `docs/stream-format.md`; this crate
//! is its implementation, and the two must change together.
//!
//! The crate is sans-IO: [`Encoder`] appends bytes to any [`bytes::BufMut`] and [`Decoder`]
//! consumes byte slices of any size, so the same code serves a TCP connection, a file written
//! by `remusctl stream dump`, a fuzzer and a benchmark.
//!
//! Invariants the modules keep:
//! - a decoder never holds more than one record's bytes and checks a record's declared length
//!   against its limit before it allocates for it;
//! - every malformed input becomes a [`DecodeError`] carrying the stream byte offset; no input
//!   makes any function of this crate panic;
//! - page decompression is bounded by the page count of the record (`count × 4096` bytes);
//! - the [`EpochVerifier`] accepts a `CHECKPOINT_END(k)` only when every record of epoch `k`
//!   arrived, in order, as counted and digested by the sender's [`Encoder`].

mod decoder;
mod encoder;
mod epoch;
#[doc(hidden)]
pub mod fuzzing;
mod header;
mod pages;
mod record;
pub mod version;

pub use decoder::{DecodeError, DecodeErrorKind, Decoded, Decoder, DecoderConfig, Frame, Item};
pub use encoder::{EncodeError, Encoder, StreamWriter, WriteError};
pub use epoch::{EpochError, EpochSummary, EpochVerifier};
pub use header::{HeaderError, StreamHeader, StreamKind};
pub use pages::{
    EncodingChoice, FlatMemory, NoReference, PageData, PageDataRef, PageEncoding, PageError,
    PageReference,
};
pub use record::{
    BodyError, CheckpointEnd, DeviceState, DeviceStateRef, DigestAlgorithm, DiskBarrier, DiskOp,
    DiskOpRef, DiskVerify, DiskVerifyResult, DiskWrite, DiskWriteRef, DomainConfig, Nack,
    NackReason, Record, RecordRef, RecordType, VerifyRegion, VerifyVerdict, MAX_VERIFY_REGION,
};

/// The 8 bytes every stream starts with. The non-ASCII first byte and the CR LF pair make a
/// stream that went through a text-mode transformation (or a text protocol talking to the
/// wrong port) fail on the first bytes instead of deep inside a record.
pub const MAGIC: [u8; 8] = *b"\x89REMUS\r\n";

/// The stream format version this crate writes and the only one it reads.
pub const VERSION: u16 = 1;

/// Guest page size (x86-64 base page): the unit of the guest RAM mapping (remus-qemu), of
/// dirty tracking (remus-tracker), of transfer (this crate) and of the replica (remus-engine).
/// Defined here, the one crate all of them depend on, and imported by the others so they
/// cannot disagree. Fixed; declared in the stream header so a reader can refuse a stream
/// from a sender with a different page size instead of misplacing every page.
pub const PAGE_SIZE: usize = 4096;

/// Most pages one `PAGE_DATA` record may carry. Bounds the decoder's work per record and the
/// decompression buffer (4 MiB).
pub const MAX_BATCH_PAGES: usize = 1024;

/// Default limit on a record body, as in Xen's stream v2. A decoder may lower or raise it.
pub const DEFAULT_MAX_RECORD_BODY: u32 = 128 << 20;

/// Bytes before a record body: `u32 type, u32 body length`.
pub const RECORD_HEADER_LEN: usize = 8;

/// Bytes after the padded body: `u32 record index, u32 CRC32C`.
pub const RECORD_TRAILER_LEN: usize = 8;

/// Highest page frame number a `PAGE_DATA` record may carry (a 64-bit physical address space
/// of 4 KiB pages).
pub const MAX_PFN: u64 = (1 << 52) - 1;

/// Zero bytes needed after `len` bytes to reach a multiple of 8.
#[inline]
pub(crate) fn pad8(len: usize) -> usize {
    (8 - (len % 8)) % 8
}

/// Bytes a record with a body of `body_len` bytes occupies in the stream.
#[inline]
pub fn record_size(body_len: usize) -> usize {
    RECORD_HEADER_LEN + body_len + pad8(body_len) + RECORD_TRAILER_LEN
}
