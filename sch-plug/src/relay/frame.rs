//! QEMU's `-netdev stream` framing: each Ethernet frame is preceded by its length as a
//! 4-byte big-endian integer (no virtio-net header). Verified against QEMU 7.2 (see
//! `notes/e2e-failover.md`).
//!
//! [`FrameReader`] splits a byte stream into frames without trusting the peer: a length
//! shorter than an Ethernet header or longer than QEMU's own buffer (`NET_BUFSIZE`) is an
//! error, and the reader never allocates more than one frame of at most that size.

use thiserror::Error;

/// QEMU's `NET_BUFSIZE` (4096 + 65536): the largest frame its stream netdev handles.
pub const MAX_FRAME: usize = 4096 + 65536;
/// An Ethernet header: destination, source, ethertype.
pub const MIN_FRAME: usize = 14;

/// A malformed stream.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("stream frame of {len} bytes is shorter than an Ethernet header ({MIN_FRAME})")]
    TooShort { len: usize },
    #[error("stream frame of {len} bytes exceeds the {MAX_FRAME}-byte maximum")]
    TooLong { len: usize },
}

/// Appends the stream encoding of `frame` to `out`.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// Incremental decoder of the stream framing.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Bytes received and not yet consumed as frames.
    pending: Vec<u8>,
    /// Read position in `pending`.
    pos: usize,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.pending.drain(..self.pos);
            self.pos = 0;
        }
        self.pending.extend_from_slice(data);
    }

    /// The next complete frame, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let avail = &self.pending[self.pos..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len < MIN_FRAME {
            return Err(FrameError::TooShort { len });
        }
        if len > MAX_FRAME {
            return Err(FrameError::TooLong { len });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let start = self.pos + 4;
        self.pos = start + len;
        Ok(Some(&self.pending[start..start + len]))
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.pending.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    #[test]
    fn encode_is_big_endian_length_then_frame() {
        let mut out = Vec::new();
        encode(&[0xaa; 60], &mut out);
        assert_eq!(&out[..4], &[0, 0, 0, 60]);
        assert_eq!(out.len(), 64);
    }

    #[test]
    fn decodes_across_arbitrary_splits() {
        let frames = [frame(60, 1), frame(1514, 2), frame(14, 3), frame(9000, 4)];
        let mut wire = Vec::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        for chunk in [1usize, 3, 4, 5, 7, 100, 4096, wire.len()] {
            let mut r = FrameReader::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                r.push(piece);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, frames, "chunk {chunk}");
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn rejects_bad_lengths_table() {
        let rows: [(u32, FrameError); 3] = [
            (0, FrameError::TooShort { len: 0 }),
            (13, FrameError::TooShort { len: 13 }),
            (
                (MAX_FRAME + 1) as u32,
                FrameError::TooLong { len: MAX_FRAME + 1 },
            ),
        ];
        for (len, want) in rows {
            let mut r = FrameReader::new();
            r.push(&len.to_be_bytes());
            assert_eq!(r.next_frame(), Err(want), "{len}");
        }
        // The maximum itself is fine (and waits for its bytes rather than allocating).
        let mut r = FrameReader::new();
        r.push(&(MAX_FRAME as u32).to_be_bytes());
        assert_eq!(r.next_frame(), Ok(None));
    }
}
