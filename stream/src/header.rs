//! The stream header: what a reader must know before it can interpret a single record.
//!
//! Layout (little-endian, see `docs/stream-format.md` § Stream header):
//!
//! ```text
//!  0  8  magic            "\x89REMUS\r\n"
//!  8  2  version          1
//! 10  2  header_length    total header bytes, multiple of 8, 40..=4096
//! 12  4  options          bit 0: big-endian (unsupported, must be 0); others reserved, 0
//! 16  4  page_size        4096
//! 20  1  kind             1 = replication (primary → backup), 2 = reply (backup → primary)
//! 21  1  node_name_len    1..=255
//! 22  1  domain_name_len  1..=255
//! 23  1  reserved         0
//! 24  8  session_id       random, chosen by the primary; a reply stream repeats it
//! 32  n  node name        UTF-8
//!  …  m  domain name      UTF-8
//!  …     extension area   zero in version 1; readers ignore it
//! header_length-4  4  CRC32C of every header byte before it
//! ```
//!
//! The header is checksummed like records are, so a corrupted session id or name is caught
//! before it can bind a stream to the wrong domain.

use thiserror::Error;

use crate::{MAGIC, PAGE_SIZE, VERSION};

/// Bytes of the fixed part, before the names.
pub(crate) const FIXED_LEN: usize = 32;
/// Bytes a reader needs to learn the header's total length.
pub(crate) const PREFIX_LEN: usize = 16;
/// Smallest possible header: fixed part, two 1-byte names, CRC, padded to 8.
pub(crate) const MIN_HEADER_LEN: usize = 40;
/// Largest header a reader accepts (bounds the allocation made from the length field).
pub const MAX_HEADER_LEN: usize = 4096;

/// Options bit 0: the sender's byte order is big-endian. This version only has little-endian
/// streams; the bit exists so that a big-endian writer cannot be misread silently.
pub(crate) const OPTION_BIG_ENDIAN: u32 = 1;

/// Which direction a stream flows; decides which record types it may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Primary → backup: configuration, checkpoints, disk writes, control.
    Replication,
    /// Backup → primary: acknowledgements, refusals, control.
    Reply,
}

impl StreamKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            StreamKind::Replication => 1,
            StreamKind::Reply => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(StreamKind::Replication),
            2 => Some(StreamKind::Reply),
            _ => None,
        }
    }

    /// Lower-case name used in dumps and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Replication => "replication",
            StreamKind::Reply => "reply",
        }
    }
}

/// The decoded stream header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// Direction of the stream; records not allowed in it are rejected.
    pub kind: StreamKind,
    /// Random id of the replication session; the backup echoes it in its reply stream so an
    /// acknowledgement can never be applied to another session's checkpoints.
    pub session_id: u64,
    /// Name of the sending node (`[node] name`), for logs and to catch crossed wires.
    pub node: String,
    /// Name of the protected domain this stream replicates.
    pub domain: String,
}

/// Why a header could not be written or read.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// A name is empty or longer than the one-byte length field allows.
    #[error("header: {field} name must be 1..=255 bytes, got {len}")]
    NameLength { field: &'static str, len: usize },
    /// A name is not UTF-8.
    #[error("header: {field} name is not valid UTF-8")]
    NameUtf8 { field: &'static str },
    /// The declared name lengths do not fit the declared header length.
    #[error("header: names ({node} + {domain} bytes) do not fit a header of {header_len} bytes")]
    NamesOverflow {
        node: usize,
        domain: usize,
        header_len: usize,
    },
    /// Big-endian bit set.
    #[error("header: big-endian streams are not supported (options 0x{0:08x})")]
    BigEndian(u32),
    /// Unknown option bits: features this reader does not have.
    #[error("header: unsupported option bits 0x{0:08x}")]
    UnsupportedOptions(u32),
    /// Page size other than 4096.
    #[error("header: unsupported page size {0} (only 4096)")]
    PageSize(u32),
    /// Unknown stream kind code.
    #[error("header: unknown stream kind {0} (1 = replication, 2 = reply)")]
    Kind(u8),
    /// Reserved byte not zero.
    #[error("header: reserved byte at offset 23 is 0x{0:02x}, must be 0")]
    Reserved(u8),
}

impl StreamHeader {
    /// Total encoded length of this header.
    pub fn encoded_len(&self) -> usize {
        (FIXED_LEN + self.node.len() + self.domain.len() + 4).next_multiple_of(8)
    }

    /// Appends the encoded header to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), HeaderError> {
        for (field, name) in [("node", &self.node), ("domain", &self.domain)] {
            if name.is_empty() || name.len() > 255 {
                return Err(HeaderError::NameLength {
                    field,
                    len: name.len(),
                });
            }
        }
        let len = self.encoded_len();
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        // Fits: at most 32 + 255 + 255 + 4 rounded up.
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out.push(self.kind.code());
        out.push(self.node.len() as u8);
        out.push(self.domain.len() as u8);
        out.push(0);
        out.extend_from_slice(&self.session_id.to_le_bytes());
        out.extend_from_slice(self.node.as_bytes());
        out.extend_from_slice(self.domain.as_bytes());
        out.resize(start + len - 4, 0);
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Parses a complete header whose magic, version, length and CRC the decoder has already
    /// checked. `bytes` is exactly `header_length` long.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let options = le_u32(bytes, 12);
        if options & OPTION_BIG_ENDIAN != 0 {
            return Err(HeaderError::BigEndian(options));
        }
        if options != 0 {
            return Err(HeaderError::UnsupportedOptions(options));
        }
        let page_size = le_u32(bytes, 16);
        if page_size as usize != PAGE_SIZE {
            return Err(HeaderError::PageSize(page_size));
        }
        let kind = StreamKind::from_code(bytes[20]).ok_or(HeaderError::Kind(bytes[20]))?;
        let node_len = bytes[21] as usize;
        let domain_len = bytes[22] as usize;
        if bytes[23] != 0 {
            return Err(HeaderError::Reserved(bytes[23]));
        }
        for (field, len) in [("node", node_len), ("domain", domain_len)] {
            if len == 0 {
                return Err(HeaderError::NameLength { field, len });
            }
        }
        if FIXED_LEN + node_len + domain_len + 4 > bytes.len() {
            return Err(HeaderError::NamesOverflow {
                node: node_len,
                domain: domain_len,
                header_len: bytes.len(),
            });
        }
        let session_id = le_u64(bytes, 24);
        let node = &bytes[FIXED_LEN..FIXED_LEN + node_len];
        let domain = &bytes[FIXED_LEN + node_len..FIXED_LEN + node_len + domain_len];
        let node =
            std::str::from_utf8(node).map_err(|_| HeaderError::NameUtf8 { field: "node" })?;
        let domain =
            std::str::from_utf8(domain).map_err(|_| HeaderError::NameUtf8 { field: "domain" })?;
        Ok(StreamHeader {
            kind,
            session_id,
            node: node.to_owned(),
            domain: domain.to_owned(),
        })
    }
}

/// Reads a little-endian `u32` at `at`; callers guarantee `bytes.len() >= at + 4`.
#[inline]
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Reads a little-endian `u64` at `at`; callers guarantee `bytes.len() >= at + 8`.
#[inline]
pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Reads a little-endian `u16` at `at`; callers guarantee `bytes.len() >= at + 2`.
#[inline]
pub(crate) fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StreamHeader {
        StreamHeader {
            kind: StreamKind::Replication,
            session_id: 0x0123_4567_89ab_cdef,
            node: "alpha".into(),
            domain: "web".into(),
        }
    }

    #[test]
    fn encoded_length_is_padded_and_checksummed() {
        let mut out = Vec::new();
        header().encode(&mut out).unwrap();
        assert_eq!(out.len(), 48, "32 + 5 + 3 + 4 = 44, padded to 48");
        assert_eq!(le_u16(&out, 10) as usize, out.len());
        let crc = le_u32(&out, out.len() - 4);
        assert_eq!(crc, crc32c::crc32c(&out[..out.len() - 4]));
        assert_eq!(StreamHeader::parse(&out).unwrap(), header());
    }

    #[test]
    fn names_are_bounded() {
        let mut h = header();
        h.node = String::new();
        assert!(matches!(
            h.encode(&mut Vec::new()),
            Err(HeaderError::NameLength { field: "node", .. })
        ));
        h.node = "x".repeat(256);
        assert!(h.encode(&mut Vec::new()).is_err());
        h.node = "x".repeat(255);
        h.domain = "y".repeat(255);
        let mut out = Vec::new();
        h.encode(&mut out).unwrap();
        assert!(out.len() <= MAX_HEADER_LEN);
        assert_eq!(StreamHeader::parse(&out).unwrap(), h);
    }
}
