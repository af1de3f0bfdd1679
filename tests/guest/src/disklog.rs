//! The counter's write-ahead log on a raw block device.
//!
//! Every increment is first written here, then applied in memory, so at any instant the last
//! record on disk is either the value in memory or one more. After a failover the restored RAM
//! and the replica disk (both as of the same checkpoint) must still satisfy that relation; the
//! `CHECK` command and the ticker's check lines verify it.
//!
//! Layout: the first `slots` 512-byte sectors of the device form a ring; record `seq` lives in
//! sector `seq % slots`. A record is `magic "RMSC" | seq u64 | value u64 | crc32 u32` (little
//! endian), the rest of the sector is zero. The last record is the valid one with the highest
//! sequence number. Writes use `O_DIRECT | O_DSYNC` so an acknowledged record has reached the
//! virtual disk (and therefore the disk replication under it), not just the guest page cache.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Size of one record slot: the virtio-blk logical block size.
pub const SLOT_SIZE: usize = 512;
const MAGIC: [u8; 4] = *b"RMSC";
/// Sectors read per `pread` while scanning the ring.
const SCAN_SLOTS: usize = 128;

/// One decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub value: u64,
}

impl Record {
    /// Encodes into one slot.
    pub fn encode(&self, slot: &mut [u8; SLOT_SIZE]) {
        slot.fill(0);
        slot[0..4].copy_from_slice(&MAGIC);
        slot[4..12].copy_from_slice(&self.seq.to_le_bytes());
        slot[12..20].copy_from_slice(&self.value.to_le_bytes());
        let crc = crc32(&slot[0..20]);
        slot[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one slot; `None` for an empty or corrupt slot.
    pub fn decode(slot: &[u8]) -> Option<Record> {
        if slot.len() < 24 || slot[0..4] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(slot[20..24].try_into().ok()?);
        if crc != crc32(&slot[0..20]) {
            return None;
        }
        Some(Record {
            seq: u64::from_le_bytes(slot[4..12].try_into().ok()?),
            value: u64::from_le_bytes(slot[12..20].try_into().ok()?),
        })
    }
}

/// A buffer aligned for `O_DIRECT` transfers.
#[repr(C, align(4096))]
struct Aligned<const N: usize>([u8; N]);

/// Errors of the disk log, naming the device and the operation.
#[derive(Debug)]
pub enum LogError {
    Open(String, io::Error),
    Size(String, io::Error),
    TooSmall(String, u64),
    Write(String, u64, io::Error),
    Read(String, u64, io::Error),
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Open(p, e) => write!(f, "disk log {p}: open: {e}"),
            LogError::Size(p, e) => write!(f, "disk log {p}: size: {e}"),
            LogError::TooSmall(p, n) => {
                write!(f, "disk log {p}: device of {n} bytes holds no record slot")
            }
            LogError::Write(p, seq, e) => write!(f, "disk log {p}: write of record {seq}: {e}"),
            LogError::Read(p, off, e) => write!(f, "disk log {p}: read at {off}: {e}"),
        }
    }
}

/// The log on one device.
pub struct DiskLog {
    /// Device path, for messages.
    path: String,
    file: File,
    /// Number of ring slots (bounded so a scan stays cheap on a large disk).
    slots: u64,
}

impl DiskLog {
    /// Opens `path` and uses at most `max_slots` sectors of it.
    /// Falls back to `O_DSYNC` alone where `O_DIRECT` is refused (tmpfs files in host tests).
    pub fn open(path: &str, max_slots: u64) -> Result<DiskLog, LogError> {
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let file = match open(libc::O_DIRECT | libc::O_DSYNC) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(libc::O_DSYNC),
            other => other,
        }
        .map_err(|e| LogError::Open(path.to_string(), e))?;
        let size = io::Seek::seek(&mut &file, io::SeekFrom::End(0))
            .map_err(|e| LogError::Size(path.to_string(), e))?;
        let slots = (size / SLOT_SIZE as u64).min(max_slots);
        if slots == 0 {
            return Err(LogError::TooSmall(path.to_string(), size));
        }
        Ok(DiskLog {
            path: path.to_string(),
            file,
            slots,
        })
    }

    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Writes `record` durably into its slot.
    pub fn append(&self, record: Record) -> Result<(), LogError> {
        let mut buf = Aligned([0u8; SLOT_SIZE]);
        record.encode(&mut buf.0);
        let offset = (record.seq % self.slots) * SLOT_SIZE as u64;
        self.file
            .write_all_at(&buf.0, offset)
            .map_err(|e| LogError::Write(self.path.clone(), record.seq, e))
    }

    /// Scans the ring and returns the record with the highest sequence number.
    pub fn last(&self) -> Result<Option<Record>, LogError> {
        let mut buf = Box::new(Aligned([0u8; SCAN_SLOTS * SLOT_SIZE]));
        let mut best: Option<Record> = None;
        let mut slot = 0u64;
        while slot < self.slots {
            let n = (self.slots - slot).min(SCAN_SLOTS as u64) as usize;
            let offset = slot * SLOT_SIZE as u64;
            let chunk = &mut buf.0[..n * SLOT_SIZE];
            self.file
                .read_exact_at(chunk, offset)
                .map_err(|e| LogError::Read(self.path.clone(), offset, e))?;
            for sector in chunk.chunks_exact(SLOT_SIZE) {
                if let Some(r) = Record::decode(sector) {
                    if best.is_none_or(|b| r.seq > b.seq) {
                        best = Some(r);
                    }
                }
            }
            slot += n as u64;
        }
        Ok(best)
    }
}

/// CRC-32 (IEEE, reflected), bitwise: records are tiny, no table needed.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip_and_corruption_is_rejected() {
        let mut slot = [0u8; SLOT_SIZE];
        let r = Record { seq: 7, value: 7 };
        r.encode(&mut slot);
        assert_eq!(Record::decode(&slot), Some(r));
        // (mutated byte, why it must be rejected)
        let cases = [
            (0usize, "magic"),
            (5, "sequence number"),
            (13, "value"),
            (21, "checksum"),
        ];
        for (byte, what) in cases {
            let mut bad = slot;
            bad[byte] ^= 0x40;
            assert_eq!(Record::decode(&bad), None, "corrupt {what} accepted");
        }
        assert_eq!(Record::decode(&[0u8; SLOT_SIZE]), None, "empty slot");
        assert_eq!(Record::decode(&slot[..10]), None, "short slot");
    }
}
