//! Bytes of guest page data written on the way from guest RAM to the replica, by stage.
//!
//! Why it exists: a checkpoint's cost is dominated by moving pages, and every extra copy of a
//! page between the tracker and the replica is memory bandwidth taken from the guest. These
//! counters make each copy visible, so a change to the page path can be measured (bytes
//! copied per dirty page, `cargo bench -p remus-engine --bench page_copies`) instead of
//! argued. They are process-wide relaxed atomics, bumped once per batch or per buffer, not
//! per byte: cheap enough to stay on in production.
//!
//! A stage counts the bytes the engine (or a call it makes) writes into a buffer that holds
//! page data, raw or encoded: a memcpy, a gather, an XOR or LZ4 output, an encryption
//! output, a socket or file write (a kernel copy). Reading a buffer is not a copy.

use std::sync::atomic::{AtomicU64, Ordering};

/// One place page data is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Stage {
    /// Primary: pages the tracker copied from guest RAM into the shadow, plus the old
    /// copies it kept for XOR-delta.
    Capture,
    /// Primary: dirty pages gathered from the shadow (and old copies) into a batch.
    Gather,
    /// Primary: `PAGE_DATA` records encoded into the stream buffer.
    Encode,
    /// Primary: bytes encrypted into channel frames (the backup's replies, a few bytes an
    /// epoch, count here too).
    Seal,
    /// Primary: frames written to the socket (and the backup's reply frames).
    SocketWrite,
    /// Backup: frames read from the socket (and the primary's reading of replies).
    SocketRead,
    /// Backup: bytes decrypted out of channel frames (and the primary's replies).
    Open,
    /// Backup: plaintext copied into the stream decoder's record buffer.
    Assemble,
    /// Backup: `PAGE_DATA` payloads copied out of the decoder into an owned record.
    OwnedRecord,
    /// Backup: pages decoded (decompressed, XORed) out of a record.
    Decode,
    /// Backup: decoded pages copied into the checkpoint's staged pages.
    Stage,
    /// Backup: staged pages copied into the staging file's buffer.
    StagingBuffer,
    /// Backup: staged pages written to the staging file.
    StagingWrite,
    /// Backup: pages written into the replica RAM.
    Apply,
}

impl Stage {
    /// Every stage, primary first, in path order.
    pub const ALL: [Stage; 14] = [
        Stage::Capture,
        Stage::Gather,
        Stage::Encode,
        Stage::Seal,
        Stage::SocketWrite,
        Stage::SocketRead,
        Stage::Open,
        Stage::Assemble,
        Stage::OwnedRecord,
        Stage::Decode,
        Stage::Stage,
        Stage::StagingBuffer,
        Stage::StagingWrite,
        Stage::Apply,
    ];

    /// Whether the stage runs on the primary.
    pub fn on_primary(self) -> bool {
        (self as usize) <= Stage::SocketWrite as usize
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Capture => "capture (RAM -> shadow, old copy)",
            Stage::Gather => "gather (shadow -> batch)",
            Stage::Encode => "encode (batch -> record)",
            Stage::Seal => "encrypt (record -> frame)",
            Stage::SocketWrite => "socket write",
            Stage::SocketRead => "socket read",
            Stage::Open => "decrypt (frame -> plaintext)",
            Stage::Assemble => "assemble (plaintext -> decoder buffer)",
            Stage::OwnedRecord => "owned record (decoder -> record)",
            Stage::Decode => "decode (record -> pages)",
            Stage::Stage => "stage (pages -> staged)",
            Stage::StagingBuffer => "staging buffer (staged -> buffer)",
            Stage::StagingWrite => "staging file write",
            Stage::Apply => "apply (-> replica RAM)",
        }
    }
}

const STAGES: usize = Stage::ALL.len();

static BYTES: [AtomicU64; STAGES] = [const { AtomicU64::new(0) }; STAGES];
static PAGES_SENT: AtomicU64 = AtomicU64::new(0);
static PAGES_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Counts `bytes` written at `stage`.
#[inline]
pub fn add(stage: Stage, bytes: u64) {
    BYTES[stage as usize].fetch_add(bytes, Ordering::Relaxed);
}

/// Counts pages the primary put into `PAGE_DATA` batches.
#[inline]
pub fn pages_sent(n: u64) {
    PAGES_SENT.fetch_add(n, Ordering::Relaxed);
}

/// Counts pages the backup decoded out of `PAGE_DATA` records.
#[inline]
pub fn pages_received(n: u64) {
    PAGES_RECEIVED.fetch_add(n, Ordering::Relaxed);
}

/// The counters at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Copies {
    /// Bytes per stage, indexed like [`Stage::ALL`].
    pub bytes: [u64; STAGES],
    /// Pages the primary sent.
    pub pages_sent: u64,
    /// Pages the backup received.
    pub pages_received: u64,
}

impl Copies {
    /// The counters now.
    pub fn now() -> Self {
        Self {
            bytes: std::array::from_fn(|i| BYTES[i].load(Ordering::Relaxed)),
            pages_sent: PAGES_SENT.load(Ordering::Relaxed),
            pages_received: PAGES_RECEIVED.load(Ordering::Relaxed),
        }
    }

    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Copies) -> Copies {
        Copies {
            bytes: std::array::from_fn(|i| self.bytes[i] - earlier.bytes[i]),
            pages_sent: self.pages_sent - earlier.pages_sent,
            pages_received: self.pages_received - earlier.pages_received,
        }
    }

    /// Bytes written at `stage` per page of that side (sent on the primary, received on
    /// the backup).
    pub fn per_page(&self, stage: Stage) -> f64 {
        let pages = if stage.on_primary() {
            self.pages_sent
        } else {
            self.pages_received
        };
        self.bytes[stage as usize] as f64 / pages.max(1) as f64
    }

    /// Total bytes written per page on one side.
    pub fn per_page_total(&self, primary: bool) -> f64 {
        Stage::ALL
            .iter()
            .filter(|s| s.on_primary() == primary)
            .map(|&s| self.per_page(s))
            .sum()
    }
}
