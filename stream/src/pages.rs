//! Page batches: the encodings of `PAGE_DATA` and the code that packs and unpacks them.
//!
//! A batch is up to 1024 pages with strictly increasing frame numbers and one encoding:
//!
//! | code | encoding  | payload                                                          |
//! |------|-----------|------------------------------------------------------------------|
//! | 0    | `RAW`     | the pages, `count × 4096` bytes                                  |
//! | 1    | `ZERO`    | nothing: every page is zero                                      |
//! | 2    | `LZ4`     | one LZ4 block of the concatenated pages                          |
//! | 3    | `XOR_LZ4` | one LZ4 block of the pages each XORed with its reference copy    |
//!
//! The *reference copy* of a page is the content the receiver's logical memory image holds
//! for that frame just before the record: the page as last sent in this stream, or zeroes if
//! it was never sent. The receiver supplies it through [`PageReference`], so decoding needs
//! only the pages of the batch, never all of RAM. Decompression writes into a caller buffer
//! of exactly `count × 4096` bytes and fails if the block would produce any other size.
//!
//! Hot-path rule: no allocation per page. The encoder reuses two scratch buffers per
//! [`crate::Encoder`]; the decoder writes straight into the caller's buffer.

use std::fmt;

use thiserror::Error;

use crate::header::le_u64;
use crate::PAGE_SIZE;

/// How a batch's pages are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageEncoding {
    /// Pages as they are.
    Raw,
    /// All pages are zero; no payload.
    Zero,
    /// One LZ4 block of the concatenated pages.
    Lz4,
    /// One LZ4 block of the pages XORed with their reference copies.
    XorLz4,
}

impl PageEncoding {
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            PageEncoding::Raw => 0,
            PageEncoding::Zero => 1,
            PageEncoding::Lz4 => 2,
            PageEncoding::XorLz4 => 3,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => PageEncoding::Raw,
            1 => PageEncoding::Zero,
            2 => PageEncoding::Lz4,
            3 => PageEncoding::XorLz4,
            _ => return None,
        })
    }
}

impl fmt::Display for PageEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageEncoding::Raw => "RAW",
            PageEncoding::Zero => "ZERO",
            PageEncoding::Lz4 => "LZ4",
            PageEncoding::XorLz4 => "XOR_LZ4",
        })
    }
}

/// What the encoder should do with a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodingChoice {
    /// Use exactly this encoding (`Zero` fails unless every page is zero).
    Fixed(PageEncoding),
    /// `ZERO` if every page is zero; otherwise `XOR_LZ4` (when `xor`) or `LZ4`, falling back
    /// to `RAW` when compression does not shrink the batch. With `xor`, plain `LZ4` is also
    /// tried when XOR saves less than half, and the smaller result is used.
    Auto {
        /// Whether the sender keeps reference copies, i.e. may use `XOR_LZ4`.
        xor: bool,
    },
}

/// Why pages could not be packed or unpacked.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PageError {
    /// The output buffer does not have room for exactly the batch.
    #[error("page batch of {count} pages needs a {needed}-byte buffer, got {got}")]
    BufferSize {
        count: usize,
        needed: usize,
        got: usize,
    },
    /// The LZ4 block is corrupt.
    #[error("{encoding} batch of {count} pages: LZ4 decompression failed: {reason}")]
    Decompress {
        encoding: PageEncoding,
        count: usize,
        reason: String,
    },
    /// The LZ4 block decodes to fewer bytes than the batch.
    #[error(
        "{encoding} batch of {count} pages: LZ4 block holds {found} bytes, expected {expected}"
    )]
    DecompressedSize {
        encoding: PageEncoding,
        count: usize,
        expected: usize,
        found: usize,
    },
    /// A reference copy has the wrong length.
    #[error("reference copy of pfn {pfn:#x} is {len} bytes, expected 4096")]
    ReferenceLength { pfn: u64, len: usize },
}

/// The receiver's (or sender's) previous copy of pages, for `XOR_LZ4`.
///
/// `page(pfn)` returns the content of `pfn` in the logical memory image just before the
/// current record, or `None` if the image holds zeroes there (never sent). The returned
/// slice must be exactly 4096 bytes.
pub trait PageReference<'r> {
    /// Reference copy of `pfn`.
    fn page(&mut self, pfn: u64) -> Option<&'r [u8]>;
}

impl<'r, F> PageReference<'r> for F
where
    F: FnMut(u64) -> Option<&'r [u8]>,
{
    fn page(&mut self, pfn: u64) -> Option<&'r [u8]> {
        self(pfn)
    }
}

/// No reference copies: every page's reference is zero (first transfer of a page).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoReference;

impl<'r> PageReference<'r> for NoReference {
    fn page(&mut self, _pfn: u64) -> Option<&'r [u8]> {
        None
    }
}

/// A flat memory image: page `pfn` is at byte `pfn × 4096`; pages beyond the end are zero.
#[derive(Clone, Copy, Debug)]
pub struct FlatMemory<'r>(pub &'r [u8]);

impl<'r> PageReference<'r> for FlatMemory<'r> {
    fn page(&mut self, pfn: u64) -> Option<&'r [u8]> {
        let start = usize::try_from(pfn).ok()?.checked_mul(PAGE_SIZE)?;
        self.0.get(start..start.checked_add(PAGE_SIZE)?)
    }
}

/// `PAGE_DATA`, owned: the batch as it travels (payload still encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageData {
    /// Checkpoint the pages belong to.
    pub epoch: u64,
    /// How `payload` is packed.
    pub encoding: PageEncoding,
    /// Frame numbers, strictly increasing, 1..=1024 of them.
    pub pfns: Vec<u64>,
    /// Encoded pages.
    pub payload: Vec<u8>,
}

impl PageData {
    /// Unpacks the pages into `out` (`pfns.len() × 4096` bytes), page `i` at `i × 4096`.
    ///
    /// # Errors
    /// A corrupt or wrongly sized LZ4 block, a wrong `out` size, a bad reference copy.
    pub fn decode_into<'r>(
        &self,
        out: &mut [u8],
        reference: &mut impl PageReference<'r>,
    ) -> Result<(), PageError> {
        let pfns = &self.pfns;
        decode_pages(
            self.encoding,
            pfns.len(),
            |i| pfns[i],
            &self.payload,
            out,
            reference,
        )
    }
}

/// `PAGE_DATA`, borrowed from the decoder's buffer: decode straight into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageDataRef<'a> {
    /// Checkpoint the pages belong to.
    pub epoch: u64,
    /// How the payload is packed.
    pub encoding: PageEncoding,
    /// Frame numbers as little-endian `u64`s (validated: increasing, in range).
    pfn_bytes: &'a [u8],
    /// Encoded pages.
    payload: &'a [u8],
}

impl<'a> PageDataRef<'a> {
    pub(crate) fn from_parts(
        epoch: u64,
        encoding: PageEncoding,
        pfn_bytes: &'a [u8],
        payload: &'a [u8],
    ) -> Self {
        PageDataRef {
            epoch,
            encoding,
            pfn_bytes,
            payload,
        }
    }

    /// Number of pages in the batch.
    pub fn count(&self) -> usize {
        self.pfn_bytes.len() / 8
    }

    /// Frame number of page `i` (`i < count()`).
    pub fn pfn(&self, i: usize) -> u64 {
        le_u64(self.pfn_bytes, i * 8)
    }

    /// Frame numbers in order.
    pub fn pfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.pfn_bytes.chunks_exact(8).map(|c| le_u64(c, 0))
    }

    /// The encoded payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Unpacks the pages into `out` (`count() × 4096` bytes).
    ///
    /// # Errors
    /// See [`PageData::decode_into`].
    pub fn decode_into<'r>(
        &self,
        out: &mut [u8],
        reference: &mut impl PageReference<'r>,
    ) -> Result<(), PageError> {
        decode_pages(
            self.encoding,
            self.count(),
            |i| self.pfn(i),
            self.payload,
            out,
            reference,
        )
    }

    /// Checks that the payload unpacks to exactly the batch, without reference copies
    /// (`XOR_LZ4` is decompressed but not XORed). `scratch` is reused between calls.
    ///
    /// # Errors
    /// A corrupt or wrongly sized LZ4 block.
    pub fn validate(&self, scratch: &mut Vec<u8>) -> Result<(), PageError> {
        scratch.resize(self.count() * PAGE_SIZE, 0);
        self.decode_into(scratch, &mut NoReference)
    }

    pub(crate) fn to_owned_data(self) -> PageData {
        PageData {
            epoch: self.epoch,
            encoding: self.encoding,
            pfns: self.pfns().collect(),
            payload: self.payload.to_vec(),
        }
    }
}

fn decode_pages<'r>(
    encoding: PageEncoding,
    count: usize,
    pfn: impl Fn(usize) -> u64,
    payload: &[u8],
    out: &mut [u8],
    reference: &mut impl PageReference<'r>,
) -> Result<(), PageError> {
    let needed = count * PAGE_SIZE;
    if out.len() != needed {
        return Err(PageError::BufferSize {
            count,
            needed,
            got: out.len(),
        });
    }
    match encoding {
        PageEncoding::Raw => {
            if payload.len() != needed {
                return Err(PageError::DecompressedSize {
                    encoding,
                    count,
                    expected: needed,
                    found: payload.len(),
                });
            }
            out.copy_from_slice(payload);
        }
        PageEncoding::Zero => out.fill(0),
        PageEncoding::Lz4 | PageEncoding::XorLz4 => {
            // Bounded: the block can write at most `out.len()` bytes.
            let n = lz4_flex::block::decompress_into(payload, out).map_err(|e| {
                PageError::Decompress {
                    encoding,
                    count,
                    reason: e.to_string(),
                }
            })?;
            if n != needed {
                return Err(PageError::DecompressedSize {
                    encoding,
                    count,
                    expected: needed,
                    found: n,
                });
            }
            if encoding == PageEncoding::XorLz4 {
                for (i, page) in out.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    let pfn = pfn(i);
                    if let Some(r) = reference.page(pfn) {
                        if r.len() != PAGE_SIZE {
                            return Err(PageError::ReferenceLength { pfn, len: r.len() });
                        }
                        xor_in_place(page, r);
                    }
                }
            }
        }
    }
    Ok(())
}

/// `dst ^= src`, byte-wise; written so the compiler vectorises it.
#[inline]
pub(crate) fn xor_in_place(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= *s;
    }
}

/// Whether every byte is zero; OR-folds a page at a time so it vectorises and stops at the
/// first non-zero page.
#[inline]
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(PAGE_SIZE)
        .all(|page| page.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Reusable buffers for packing batches, owned by the encoder.
#[derive(Default)]
pub(crate) struct PackScratch {
    /// Pages XORed with their references (XOR_LZ4 input).
    xor: Vec<u8>,
    /// LZ4 output; kept initialised at its largest size so no per-batch memset is needed.
    lz4: Vec<u8>,
    /// Second LZ4 output, for `Auto { xor: true }` trying plain LZ4 when XOR did poorly.
    lz4_alt: Vec<u8>,
}

/// Result of packing: which encoding was used and where its payload is.
pub(crate) enum Packed<'s> {
    /// Payload is the input pages themselves.
    Raw,
    /// No payload.
    Zero,
    /// Payload is in the scratch buffer.
    Compressed(PageEncoding, &'s [u8]),
}

impl PackScratch {
    /// Packs `pages` (frame numbers `pfns`) according to `choice`.
    pub(crate) fn pack<'s, 'r>(
        &'s mut self,
        pfns: &[u64],
        pages: &[u8],
        choice: EncodingChoice,
        reference: &mut impl PageReference<'r>,
    ) -> Result<Packed<'s>, PackError> {
        let zero = match choice {
            EncodingChoice::Fixed(PageEncoding::Zero) | EncodingChoice::Auto { .. } => {
                is_zero(pages)
            }
            _ => false,
        };
        let target = match choice {
            EncodingChoice::Fixed(PageEncoding::Zero) if !zero => return Err(PackError::NotZero),
            EncodingChoice::Fixed(e) => e,
            EncodingChoice::Auto { .. } if zero => PageEncoding::Zero,
            EncodingChoice::Auto { xor: true } => PageEncoding::XorLz4,
            EncodingChoice::Auto { xor: false } => PageEncoding::Lz4,
        };
        let input: &[u8] = match target {
            PageEncoding::Raw => return Ok(Packed::Raw),
            PageEncoding::Zero => return Ok(Packed::Zero),
            PageEncoding::Lz4 => pages,
            PageEncoding::XorLz4 => {
                self.xor.resize(pages.len(), 0);
                for ((dst, src), &pfn) in self
                    .xor
                    .chunks_exact_mut(PAGE_SIZE)
                    .zip(pages.chunks_exact(PAGE_SIZE))
                    .zip(pfns)
                {
                    match reference.page(pfn) {
                        Some(r) if r.len() == PAGE_SIZE => {
                            for ((d, a), b) in dst.iter_mut().zip(src).zip(r) {
                                *d = a ^ b;
                            }
                        }
                        Some(r) => {
                            return Err(PackError::Page(PageError::ReferenceLength {
                                pfn,
                                len: r.len(),
                            }))
                        }
                        None => dst.copy_from_slice(src),
                    }
                }
                &self.xor
            }
        };
        let max = lz4_flex::block::get_maximum_output_size(input.len());
        if self.lz4.len() < max {
            self.lz4.resize(max, 0);
        }
        let n = lz4_flex::block::compress_into(input, &mut self.lz4)
            .map_err(|e| PackError::Compress(e.to_string()))?;
        // XOR pays off on pages that changed a little; on rewritten pages (new text, freed
        // and reused memory) plain LZ4 can do far better. Try it when XOR saved under half.
        if choice == (EncodingChoice::Auto { xor: true }) && n * 2 > pages.len() {
            if self.lz4_alt.len() < max {
                self.lz4_alt.resize(max, 0);
            }
            let m = lz4_flex::block::compress_into(pages, &mut self.lz4_alt)
                .map_err(|e| PackError::Compress(e.to_string()))?;
            if m < n {
                if m >= pages.len() {
                    return Ok(Packed::Raw);
                }
                return Ok(Packed::Compressed(PageEncoding::Lz4, &self.lz4_alt[..m]));
            }
        }
        if matches!(choice, EncodingChoice::Auto { .. }) && n >= pages.len() {
            return Ok(Packed::Raw);
        }
        Ok(Packed::Compressed(target, &self.lz4[..n]))
    }
}

/// Why packing failed (wrapped into [`crate::EncodeError`]).
#[derive(Debug)]
pub(crate) enum PackError {
    NotZero,
    Compress(String),
    Page(PageError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_memory_bounds() {
        let ram = vec![7u8; 2 * PAGE_SIZE];
        let mut m = FlatMemory(&ram);
        assert_eq!(m.page(1).map(<[u8]>::len), Some(PAGE_SIZE));
        assert!(m.page(2).is_none());
        assert!(m.page(u64::MAX).is_none());
    }

    #[test]
    fn decompression_is_bounded_by_the_batch() {
        // A valid LZ4 block of 3 pages offered as a 2-page batch must fail, not overrun.
        let three = vec![1u8; 3 * PAGE_SIZE];
        let block = lz4_flex::block::compress(&three);
        let p = PageData {
            epoch: 1,
            encoding: PageEncoding::Lz4,
            pfns: vec![1, 2],
            payload: block,
        };
        let mut out = vec![0u8; 2 * PAGE_SIZE];
        let err = p.decode_into(&mut out, &mut NoReference).unwrap_err();
        assert!(matches!(err, PageError::Decompress { .. }), "{err:?}");
        // And a block of 1 page offered as 2 is too short.
        let one = lz4_flex::block::compress(&three[..PAGE_SIZE]);
        let p = PageData { payload: one, ..p };
        let err = p.decode_into(&mut out, &mut NoReference).unwrap_err();
        assert!(
            matches!(err, PageError::DecompressedSize { found: 4096, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn is_zero_sees_the_last_byte() {
        let mut b = vec![0u8; 3 * PAGE_SIZE];
        assert!(is_zero(&b));
        *b.last_mut().unwrap() = 1;
        assert!(!is_zero(&b));
    }
}
