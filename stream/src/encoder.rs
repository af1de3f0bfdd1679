//! The sending side: appends a header and records to a buffer.
//!
//! [`Encoder`] writes into any [`BufMut`] (a `Vec<u8>` or a `BytesMut` handed to a socket
//! writer) and never reads back what it wrote: each record's CRC is computed while its
//! pieces are put. It numbers records (the trailer's index) and keeps the per-epoch account
//! from which [`Encoder::checkpoint_end`] fills `CHECKPOINT_END`, so a sender cannot declare
//! counts that differ from what it sent. [`StreamWriter`] wraps it for `std::io::Write`.
//!
//! `PAGE_DATA` is the hot path: [`Encoder::page_data`] packs straight from the caller's page
//! buffer, reusing scratch buffers owned by the encoder (no allocation per page or, after
//! warm-up, per batch).

use std::collections::BTreeMap;
use std::io::Write;

use bytes::BufMut;
use thiserror::Error;

use crate::epoch::{Counted, EpochAccount};
use crate::header::HeaderError;
use crate::pages::{PackError, PackScratch, Packed};
use crate::record::{check_owned, check_pfns, BodyError, PAGE_DATA_FIXED};
use crate::{
    pad8, CheckpointEnd, DiskBarrier, DiskOpRef, DiskWriteRef, EncodingChoice, PageEncoding,
    PageError, PageReference, Record, RecordType, StreamHeader, DEFAULT_MAX_RECORD_BODY,
    MAX_BATCH_PAGES, PAGE_SIZE,
};

/// Why a record could not be encoded. Nothing is written when an error is returned.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// The header is invalid.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The body would exceed the record size limit.
    #[error("{record}: body of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        record: RecordType,
        len: usize,
        limit: u32,
    },
    /// The record's content is invalid (same checks as the decoder's).
    #[error("{record}: {source}")]
    Body {
        record: RecordType,
        #[source]
        source: BodyError,
    },
    /// The page buffer does not hold exactly one page per frame number.
    #[error("PAGE_DATA: {pfns} frame numbers but {bytes} bytes of pages")]
    PageBuffer { pfns: usize, bytes: usize },
    /// `Fixed(Zero)` was asked for pages that are not all zero.
    #[error("PAGE_DATA: ZERO encoding requested for pages that are not all zero")]
    NotZero,
    /// LZ4 refused the input.
    #[error("PAGE_DATA: LZ4 compression failed: {0}")]
    Compress(String),
    /// A reference copy was unusable.
    #[error("PAGE_DATA: {0}")]
    Page(#[from] PageError),
    /// [`Record::Unknown`] has no body to write.
    #[error("{0}: an unknown record cannot be encoded")]
    Unknown(RecordType),
}

/// Encoder state for one stream.
pub struct Encoder {
    /// Index the next record carries in its trailer (wraps at 2^32).
    index: u32,
    /// Largest body this encoder writes; match the receiver's decoder limit.
    max_record_body: u32,
    /// Accounts of epochs with records written and no `CHECKPOINT_END` yet.
    accounts: BTreeMap<u64, EpochAccount>,
    /// Highest epoch ended; later records of older epochs are not accounted.
    last_ended: Option<u64>,
    /// Reused buffers for packing pages.
    scratch: PackScratch,
    /// Reused buffer for the little-endian pfn array.
    pfn_buf: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes one framed record: header, body pieces, padding, index, CRC. Returns the CRC.
fn put_record<B: BufMut>(
    out: &mut B,
    index: &mut u32,
    limit: u32,
    rtype: RecordType,
    parts: &[&[u8]],
) -> Result<u32, EncodeError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > limit as usize {
        return Err(EncodeError::TooLarge {
            record: rtype,
            len,
            limit,
        });
    }
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&rtype.0.to_le_bytes());
    // Fits: len <= limit, a u32.
    head[4..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&head);
    out.put_slice(&head);
    for part in parts {
        crc = crc32c::crc32c_append(crc, part);
        out.put_slice(part);
    }
    let pad = [0u8; 8];
    let pad = &pad[..pad8(len)];
    let idx = index.to_le_bytes();
    crc = crc32c::crc32c_append(crc, pad);
    crc = crc32c::crc32c_append(crc, &idx);
    out.put_slice(pad);
    out.put_slice(&idx);
    out.put_u32_le(crc);
    *index = index.wrapping_add(1);
    Ok(crc)
}

impl Encoder {
    /// An encoder with the default record size limit.
    pub fn new() -> Self {
        Self::with_max_record_body(DEFAULT_MAX_RECORD_BODY)
    }

    /// An encoder refusing bodies over `limit` bytes.
    pub fn with_max_record_body(limit: u32) -> Self {
        Encoder {
            index: 0,
            max_record_body: limit,
            accounts: BTreeMap::new(),
            last_ended: None,
            scratch: PackScratch::default(),
            pfn_buf: Vec::with_capacity(MAX_BATCH_PAGES * 8),
        }
    }

    /// Index the next record will carry.
    pub fn next_index(&self) -> u32 {
        self.index
    }

    /// Writes the stream header. Must come first.
    ///
    /// # Errors
    /// Names empty or longer than 255 bytes.
    pub fn header<B: BufMut>(
        &mut self,
        out: &mut B,
        header: &StreamHeader,
    ) -> Result<(), EncodeError> {
        let mut bytes = Vec::with_capacity(header.encoded_len());
        header.encode(&mut bytes)?;
        out.put_slice(&bytes);
        Ok(())
    }

    fn account(&mut self, epoch: Option<u64>, what: Counted, crc: u32) {
        let Some(epoch) = epoch else { return };
        if self.last_ended.is_some_and(|last| epoch <= last) {
            return;
        }
        self.accounts.entry(epoch).or_default().count(what, crc);
    }

    /// Writes any record as given. `CHECKPOINT_END` is written verbatim (tests use this to
    /// produce wrong ones); prefer [`Encoder::checkpoint_end`].
    ///
    /// # Errors
    /// Invalid content, too large, or [`Record::Unknown`].
    pub fn record<B: BufMut>(&mut self, out: &mut B, record: &Record) -> Result<(), EncodeError> {
        let rtype = record.record_type();
        check_owned(record).map_err(|source| EncodeError::Body {
            record: rtype,
            source,
        })?;
        let crc = match record {
            Record::Unknown { record_type, .. } => return Err(EncodeError::Unknown(*record_type)),
            Record::PageData(p) => {
                let head = page_head(p.epoch, p.pfns.len(), p.encoding);
                self.pfn_buf.clear();
                for pfn in &p.pfns {
                    self.pfn_buf.extend_from_slice(&pfn.to_le_bytes());
                }
                put_record(
                    out,
                    &mut self.index,
                    self.max_record_body,
                    rtype,
                    &[&head, &self.pfn_buf, &p.payload],
                )?
            }
            other => {
                let parts = other.body_parts();
                put_record(
                    out,
                    &mut self.index,
                    self.max_record_body,
                    rtype,
                    &[&parts.fixed[..parts.fixed_len], parts.tail],
                )?
            }
        };
        if let Record::CheckpointEnd(end) = record {
            self.accounts.remove(&end.epoch);
            self.last_ended = Some(self.last_ended.map_or(end.epoch, |l| l.max(end.epoch)));
        } else if let Record::HandOff { .. } = record {
            // Names a completed checkpoint; it is not part of any epoch's account.
        } else {
            self.account(record.epoch(), Counted::of_record(record), crc);
        }
        Ok(())
    }

    /// Writes one `DISK_WRITE` from borrowed data: the guest's write is copied once, into
    /// `out`, with no owned [`Record`] built first (the primary's disk path).
    ///
    /// # Errors
    /// An empty or overflowing range, data over 4 GiB, too large a record.
    pub fn disk_write<B: BufMut>(
        &mut self,
        out: &mut B,
        write: &DiskWriteRef<'_>,
    ) -> Result<(), EncodeError> {
        let rtype = RecordType::DISK_WRITE;
        let (len, kind, tail): (Option<u32>, u8, &[u8]) = match write.op {
            DiskOpRef::Data(d) => (u32::try_from(d.len()).ok(), 0, d),
            DiskOpRef::Zeroes(n) => (Some(n), 1, &[]),
            DiskOpRef::Trim(n) => (Some(n), 2, &[]),
        };
        let len = len.filter(|&l| l > 0 && write.offset.checked_add(u64::from(l)).is_some());
        let Some(len) = len else {
            return Err(EncodeError::Body {
                record: rtype,
                source: BodyError::DiskRange {
                    offset: write.offset,
                    len: write.op.len(),
                },
            });
        };
        // Layout as `Record::DiskWrite`'s body: epoch, offset, length, disk, kind, 0, data.
        let mut fixed = [0u8; 24];
        fixed[..8].copy_from_slice(&write.epoch.to_le_bytes());
        fixed[8..16].copy_from_slice(&write.offset.to_le_bytes());
        fixed[16..20].copy_from_slice(&len.to_le_bytes());
        fixed[20..22].copy_from_slice(&write.disk.to_le_bytes());
        fixed[22] = kind;
        let crc = put_record(
            out,
            &mut self.index,
            self.max_record_body,
            rtype,
            &[&fixed, tail],
        )?;
        let data_bytes = if kind == 0 { tail.len() as u64 } else { 0 };
        self.account(Some(write.epoch), Counted::DiskWrite { data_bytes }, crc);
        Ok(())
    }

    /// Writes a record of any type with `body` as is, without checks or accounting: for
    /// emitting types this crate does not know (extensions) and for tests that need invalid
    /// records.
    ///
    /// # Errors
    /// Body over the record limit.
    pub fn raw<B: BufMut>(
        &mut self,
        out: &mut B,
        rtype: RecordType,
        body: &[u8],
    ) -> Result<u32, EncodeError> {
        put_record(out, &mut self.index, self.max_record_body, rtype, &[body])
    }

    /// Packs and writes one `PAGE_DATA` record: `pages` holds one 4096-byte page per entry of
    /// `pfns` (strictly increasing, 1..=1024 of them). `reference` gives the previous copy of
    /// each page for `XOR_LZ4`. Returns the encoding used.
    ///
    /// # Errors
    /// Bad batch shape, `Fixed(Zero)` on non-zero pages, a bad reference copy, too large.
    pub fn page_data<'r, B: BufMut>(
        &mut self,
        out: &mut B,
        epoch: u64,
        pfns: &[u64],
        pages: &[u8],
        choice: EncodingChoice,
        reference: &mut impl PageReference<'r>,
    ) -> Result<PageEncoding, EncodeError> {
        let body_err = |source| EncodeError::Body {
            record: RecordType::PAGE_DATA,
            source,
        };
        if pfns.is_empty() || pfns.len() > MAX_BATCH_PAGES {
            return Err(body_err(BodyError::PageCount(pfns.len() as u32)));
        }
        if pages.len() != pfns.len() * PAGE_SIZE {
            return Err(EncodeError::PageBuffer {
                pfns: pfns.len(),
                bytes: pages.len(),
            });
        }
        check_pfns(pfns.iter().copied()).map_err(body_err)?;
        self.pfn_buf.clear();
        for pfn in pfns {
            self.pfn_buf.extend_from_slice(&pfn.to_le_bytes());
        }
        let packed = self
            .scratch
            .pack(pfns, pages, choice, reference)
            .map_err(|e| match e {
                PackError::NotZero => EncodeError::NotZero,
                PackError::Compress(s) => EncodeError::Compress(s),
                PackError::Page(p) => EncodeError::Page(p),
            })?;
        let (encoding, payload): (PageEncoding, &[u8]) = match packed {
            Packed::Raw => (PageEncoding::Raw, pages),
            Packed::Zero => (PageEncoding::Zero, &[]),
            Packed::Compressed(e, p) => (e, p),
        };
        let head = page_head(epoch, pfns.len(), encoding);
        let crc = put_record(
            out,
            &mut self.index,
            self.max_record_body,
            RecordType::PAGE_DATA,
            &[&head, &self.pfn_buf, payload],
        )?;
        self.account(Some(epoch), Counted::Pages(pfns.len() as u64), crc);
        Ok(encoding)
    }

    /// Writes a device state blob as `DEVICE_STATE` chunks of at most `chunk` bytes (an
    /// empty blob is one empty chunk). Returns the number of records written.
    ///
    /// # Errors
    /// A chunk over the record limit.
    pub fn device_state<B: BufMut>(
        &mut self,
        out: &mut B,
        epoch: u64,
        blob: &[u8],
        chunk: usize,
    ) -> Result<usize, EncodeError> {
        let room =
            (self.max_record_body as usize).saturating_sub(crate::record::DEVICE_STATE_FIXED);
        let chunk = chunk.min(room).max(1);
        let total = blob.len() as u64;
        let mut records = 0;
        let mut offset = 0usize;
        loop {
            let end = (offset + chunk).min(blob.len());
            let mut head = [0u8; 24];
            head[..8].copy_from_slice(&epoch.to_le_bytes());
            head[8..16].copy_from_slice(&total.to_le_bytes());
            head[16..].copy_from_slice(&(offset as u64).to_le_bytes());
            let data = &blob[offset..end];
            let crc = put_record(
                out,
                &mut self.index,
                self.max_record_body,
                RecordType::DEVICE_STATE,
                &[&head, data],
            )?;
            self.account(
                Some(epoch),
                Counted::Device {
                    offset: offset as u64,
                    len: data.len() as u64,
                    total,
                },
                crc,
            );
            records += 1;
            offset = end;
            if offset >= blob.len() {
                return Ok(records);
            }
        }
    }

    /// Writes `DISK_BARRIER(epoch)` with the counts of the disk writes this encoder wrote
    /// for the epoch.
    ///
    /// # Errors
    /// None in practice (fixed-size record); kept for uniformity.
    pub fn disk_barrier<B: BufMut>(
        &mut self,
        out: &mut B,
        epoch: u64,
    ) -> Result<DiskBarrier, EncodeError> {
        let acct = self.accounts.get(&epoch).cloned().unwrap_or_default();
        let barrier = DiskBarrier {
            epoch,
            writes: acct.disk_writes,
            data_bytes: acct.disk_data_bytes,
        };
        self.record(out, &Record::DiskBarrier(barrier))?;
        Ok(barrier)
    }

    /// The `CHECKPOINT_END` that [`Encoder::checkpoint_end`] would write for `epoch` now.
    pub fn pending_end(&self, epoch: u64) -> CheckpointEnd {
        self.accounts
            .get(&epoch)
            .cloned()
            .unwrap_or_default()
            .end_record(epoch)
    }

    /// Writes `CHECKPOINT_END(epoch)` with the counts and digest of what this encoder wrote
    /// for the epoch, and closes the epoch's account.
    ///
    /// # Errors
    /// None in practice (fixed-size record); kept for uniformity.
    pub fn checkpoint_end<B: BufMut>(
        &mut self,
        out: &mut B,
        epoch: u64,
    ) -> Result<CheckpointEnd, EncodeError> {
        let end = self.pending_end(epoch);
        self.record(out, &Record::CheckpointEnd(end))?;
        Ok(end)
    }
}

fn page_head(epoch: u64, count: usize, encoding: PageEncoding) -> [u8; PAGE_DATA_FIXED] {
    let mut head = [0u8; PAGE_DATA_FIXED];
    head[..8].copy_from_slice(&epoch.to_le_bytes());
    // count <= 1024, checked by callers.
    head[8..12].copy_from_slice(&(count as u32).to_le_bytes());
    head[12] = encoding.code();
    head
}

/// Why writing to a [`StreamWriter`] failed.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The record could not be encoded (nothing was written).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The underlying writer failed; the stream is unusable.
    #[error("stream write: {0}")]
    Io(#[from] std::io::Error),
}

/// An [`Encoder`] writing to a [`std::io::Write`], one `write_all` per record.
pub struct StreamWriter<W: Write> {
    inner: W,
    encoder: Encoder,
    buf: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    /// Writes `header` to `inner` and returns a writer for the records.
    ///
    /// # Errors
    /// Invalid header or I/O failure.
    pub fn new(inner: W, header: &StreamHeader) -> Result<Self, WriteError> {
        let mut w = StreamWriter {
            inner,
            encoder: Encoder::new(),
            buf: Vec::new(),
        };
        w.with(|enc, buf| enc.header(buf, header))?;
        Ok(w)
    }

    /// Runs `f` with the encoder and a buffer, then writes what it produced.
    ///
    /// # Errors
    /// `f`'s error (nothing written) or I/O failure.
    pub fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Encoder, &mut Vec<u8>) -> Result<T, EncodeError>,
    ) -> Result<T, WriteError> {
        self.buf.clear();
        let value = f(&mut self.encoder, &mut self.buf)?;
        self.inner.write_all(&self.buf)?;
        Ok(value)
    }

    /// Writes one record.
    ///
    /// # Errors
    /// See [`Encoder::record`] and [`WriteError::Io`].
    pub fn record(&mut self, record: &Record) -> Result<(), WriteError> {
        self.with(|enc, buf| enc.record(buf, record))
    }

    /// Writes a device state blob in chunks; see [`Encoder::device_state`].
    ///
    /// # Errors
    /// See [`Encoder::device_state`] and [`WriteError::Io`].
    pub fn device_state(
        &mut self,
        epoch: u64,
        blob: &[u8],
        chunk: usize,
    ) -> Result<usize, WriteError> {
        self.with(|enc, buf| enc.device_state(buf, epoch, blob, chunk))
    }

    /// Writes `END`, flushes and returns the inner writer.
    ///
    /// # Errors
    /// I/O failure.
    pub fn finish(mut self) -> Result<W, WriteError> {
        self.record(&Record::End)?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskOp, DiskWrite};

    /// `disk_write` from borrowed data writes the very bytes (and accounts the same) as the
    /// owned record, for each kind; an empty range is refused.
    #[test]
    fn borrowed_disk_write_matches_the_owned_record() {
        let data = vec![7u8; 4096];
        let cases = [
            (DiskOp::Data(data.clone()), DiskOpRef::Data(&data)),
            (DiskOp::Zeroes(8192), DiskOpRef::Zeroes(8192)),
            (DiskOp::Trim(512), DiskOpRef::Trim(512)),
        ];
        for (owned, borrowed) in cases {
            let (mut a, mut b) = (Encoder::new(), Encoder::new());
            let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
            let record = Record::DiskWrite(DiskWrite {
                epoch: 3,
                disk: 1,
                offset: 1 << 20,
                op: owned,
            });
            a.record(&mut out_a, &record).unwrap();
            let write = DiskWriteRef {
                epoch: 3,
                disk: 1,
                offset: 1 << 20,
                op: borrowed,
            };
            b.disk_write(&mut out_b, &write).unwrap();
            assert_eq!(out_a, out_b, "{borrowed:?}");
            assert_eq!(a.pending_end(3), b.pending_end(3), "{borrowed:?}");
        }
        let empty = DiskWriteRef {
            epoch: 3,
            disk: 0,
            offset: 0,
            op: DiskOpRef::Data(&[]),
        };
        let err = Encoder::new().disk_write(&mut Vec::new(), &empty);
        assert!(matches!(err, Err(EncodeError::Body { .. })), "{err:?}");
    }
}
