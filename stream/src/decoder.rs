//! The receiving side: an incremental, sans-IO decoder.
//!
//! Bytes arrive in slices of any size and split at any point; [`Decoder::decode_frame`]
//! takes from the slice only what the current item (header or record) still needs, so the
//! decoder never holds more than one record. A record's declared length is checked against
//! [`DecoderConfig::max_record_body`] as soon as its 8-byte header is in, before any buffer
//! is grown for it. A complete record is checked in this order: CRC (so corruption is
//! reported as corruption, whatever field it hit), record index, padding, type, body.
//!
//! Every failure is a [`DecodeError`] carrying the stream byte offset where the offending
//! header or record starts. After an error the decoder is poisoned: it returns the same
//! error forever, because nothing after a corrupt record can be trusted.

use thiserror::Error;

use crate::header::{le_u16, le_u32, HeaderError, MAX_HEADER_LEN, MIN_HEADER_LEN, PREFIX_LEN};
use crate::record::{BodyError, RecordRef, RecordType};
use crate::{
    pad8, record_size, PageError, Record, StreamHeader, StreamKind, DEFAULT_MAX_RECORD_BODY, MAGIC,
    RECORD_HEADER_LEN, VERSION,
};

/// Decoder limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Largest record body accepted; larger declared lengths fail before allocation.
    pub max_record_body: u32,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            max_record_body: DEFAULT_MAX_RECORD_BODY,
        }
    }
}

/// What went wrong, without the position (see [`DecodeError`]).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The stream does not start with the remus magic.
    #[error("bad magic {found:02x?}: not a remus stream")]
    BadMagic { found: Vec<u8> },
    /// Version other than 1.
    #[error("unsupported stream version {0} (this reader supports {VERSION})")]
    UnsupportedVersion(u16),
    /// Header length field out of range or not a multiple of 8.
    #[error("invalid header length {0} (must be a multiple of 8 in {MIN_HEADER_LEN}..={MAX_HEADER_LEN})")]
    HeaderLength(u16),
    /// Header CRC mismatch.
    #[error("header CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    /// Header content invalid.
    #[error(transparent)]
    Header(HeaderError),
    /// Declared body length over the limit.
    #[error(
        "record of type {record_type} declares a {length}-byte body, over the limit of {limit}"
    )]
    RecordTooLarge {
        record_type: RecordType,
        length: u32,
        limit: u32,
    },
    /// Record CRC mismatch (any byte of the record, including its type, may be the bad one).
    #[error("CRC mismatch in record of type {record_type} with a {length}-byte body: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        record_type: RecordType,
        length: u32,
        stored: u32,
        computed: u32,
    },
    /// Record index out of sequence: a record was lost, repeated or reordered.
    #[error(
        "record index {found}, expected {expected}: a record is missing, repeated or out of order"
    )]
    Index { expected: u32, found: u32 },
    /// Non-zero padding.
    #[error("record of type {0}: padding is not zero")]
    Padding(RecordType),
    /// Unknown type without the optional bit.
    #[error("unknown mandatory record type {0}")]
    UnknownMandatory(RecordType),
    /// Known type in the wrong direction.
    #[error("record type {record_type} is not allowed in a {} stream", kind.as_str())]
    NotAllowed {
        record_type: RecordType,
        kind: StreamKind,
    },
    /// Body malformed.
    #[error("malformed {record_type} record: {source}")]
    Body {
        record_type: RecordType,
        #[source]
        source: BodyError,
    },
    /// Pages of a `PAGE_DATA` record do not unpack (reported by consumers that unpack).
    #[error("PAGE_DATA record: {0}")]
    Pages(PageError),
    /// Input ended inside the stream header.
    #[error("truncated stream header: {have} of {need} bytes")]
    TruncatedHeader { have: usize, need: usize },
    /// Input ended inside a record.
    #[error("truncated {}: {have} of {need} bytes", match record_type {
        Some(t) => format!("record of type {t}"),
        None => "record header".to_owned(),
    })]
    TruncatedRecord {
        record_type: Option<RecordType>,
        have: usize,
        need: usize,
    },
    /// Input ended at a record boundary without `END`: the sender stopped mid-stream.
    #[error("stream ends without an END record")]
    MissingEnd,
    /// Bytes after `END`.
    #[error("data after the END record")]
    TrailingData,
}

/// A decoding failure at a stream byte offset.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("stream offset {offset}: {kind}")]
pub struct DecodeError {
    /// Offset of the header or record in which the problem lies (for
    /// [`DecodeErrorKind::TrailingData`] and [`DecodeErrorKind::MissingEnd`], where it ends).
    pub offset: u64,
    /// The reason.
    pub kind: DecodeErrorKind,
}

/// A complete, verified record, borrowed from the decoder's buffer.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// Stream offset of the record's first byte.
    pub offset: u64,
    /// The record's index (its position among the stream's records).
    pub index: u32,
    /// Its body length.
    pub length: u32,
    /// Its CRC32C (the value epoch digests chain).
    pub crc: u32,
    /// The validated record.
    pub record: RecordRef<'a>,
}

impl Frame<'_> {
    /// Bytes the record occupies in the stream.
    pub fn size(&self) -> usize {
        record_size(self.length as usize)
    }

    /// Wraps a consumer-side error (e.g. page unpacking) with this record's offset.
    pub fn error(&self, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            offset: self.offset,
            kind,
        }
    }
}

/// One decoded item, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum Item<'a> {
    /// The stream header (always the first item).
    Header(&'a StreamHeader),
    /// A record.
    Record(Frame<'a>),
}

/// One decoded item, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The stream header.
    Header(StreamHeader),
    /// A record.
    Record {
        /// Stream offset of the record.
        offset: u64,
        /// Its index.
        index: u32,
        /// The record.
        record: Record,
    },
}

/// Where in the stream the decoder is.
#[derive(Clone, Debug)]
enum Stage {
    /// Reading magic, version and header length.
    HeaderPrefix,
    /// Reading the rest of the header (total length known).
    HeaderRest,
    /// Reading a record's type and length.
    RecordHead,
    /// Reading a record's body and trailer (total length known).
    RecordRest,
    /// `END` seen; only end of input may follow.
    Ended,
    /// A previous error; returned again forever.
    Failed(DecodeError),
}

/// Incremental stream decoder; see the module documentation.
pub struct Decoder {
    config: DecoderConfig,
    stage: Stage,
    /// Bytes of the current item received so far.
    buf: Vec<u8>,
    /// Bytes the current item needs in total, as far as known.
    want: usize,
    /// Stream offset of `buf[0]`.
    item_offset: u64,
    /// `buf` holds an item already returned; drop it before reading on.
    returned: bool,
    /// Index the next record must carry.
    index: u32,
    /// The header, once decoded.
    header: Option<StreamHeader>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DecoderConfig::default())
    }
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new(config: DecoderConfig) -> Self {
        Decoder {
            config,
            stage: Stage::HeaderPrefix,
            buf: Vec::with_capacity(PREFIX_LEN),
            want: PREFIX_LEN,
            item_offset: 0,
            returned: false,
            index: 0,
            header: None,
        }
    }

    /// The stream header, once decoded.
    pub fn header(&self) -> Option<&StreamHeader> {
        self.header.as_ref()
    }

    /// Stream offset up to which input has been consumed.
    pub fn position(&self) -> u64 {
        self.item_offset + self.buf.len() as u64
    }

    /// Whether `END` was decoded.
    pub fn is_ended(&self) -> bool {
        matches!(self.stage, Stage::Ended)
    }

    fn fail(&mut self, offset: u64, kind: DecodeErrorKind) -> DecodeError {
        let err = DecodeError { offset, kind };
        self.stage = Stage::Failed(err.clone());
        err
    }

    /// Consumes bytes from the front of `input` until an item is complete (returned) or
    /// `input` is exhausted (`Ok(None)`: call again with more bytes).
    ///
    /// # Errors
    /// Any malformed input; see [`DecodeErrorKind`]. The decoder is then poisoned.
    pub fn decode_frame<'s>(
        &'s mut self,
        input: &mut &[u8],
    ) -> Result<Option<Item<'s>>, DecodeError> {
        if self.returned {
            self.returned = false;
            self.item_offset += self.buf.len() as u64;
            self.buf.clear();
            self.want = match self.stage {
                Stage::HeaderPrefix | Stage::HeaderRest => PREFIX_LEN,
                _ => RECORD_HEADER_LEN,
            };
            // Give back memory after an unusually large record.
            if self.buf.capacity() > (16 << 20) {
                self.buf.shrink_to(1 << 20);
            }
        }
        match &self.stage {
            Stage::Failed(e) => return Err(e.clone()),
            Stage::Ended if !input.is_empty() => {
                let at = self.item_offset;
                return Err(self.fail(at, DecodeErrorKind::TrailingData));
            }
            Stage::Ended => return Ok(None),
            _ => {}
        }
        loop {
            let take = (self.want - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if matches!(self.stage, Stage::HeaderPrefix) {
                let n = self.buf.len().min(MAGIC.len());
                if self.buf[..n] != MAGIC[..n] {
                    let found = self.buf[..n].to_vec();
                    return Err(self.fail(0, DecodeErrorKind::BadMagic { found }));
                }
            }
            if self.buf.len() < self.want {
                return Ok(None);
            }
            match self.stage {
                Stage::HeaderPrefix => self.header_prefix()?,
                Stage::HeaderRest => {
                    self.header_rest()?;
                    self.returned = true;
                    // Set just above.
                    return Ok(self.header.as_ref().map(Item::Header));
                }
                Stage::RecordHead => self.record_head()?,
                Stage::RecordRest => {
                    self.returned = true;
                    return self.record_rest().map(|f| Some(Item::Record(f)));
                }
                Stage::Ended | Stage::Failed(_) => unreachable!("handled before the loop"),
            }
        }
    }

    fn header_prefix(&mut self) -> Result<(), DecodeError> {
        let version = le_u16(&self.buf, 8);
        if version != VERSION {
            return Err(self.fail(0, DecodeErrorKind::UnsupportedVersion(version)));
        }
        let len = le_u16(&self.buf, 10);
        let n = len as usize;
        if !(MIN_HEADER_LEN..=MAX_HEADER_LEN).contains(&n) || n & 7 != 0 {
            return Err(self.fail(0, DecodeErrorKind::HeaderLength(len)));
        }
        self.want = n;
        self.buf.reserve(n - self.buf.len());
        self.stage = Stage::HeaderRest;
        Ok(())
    }

    fn header_rest(&mut self) -> Result<(), DecodeError> {
        let crc_at = self.buf.len() - 4;
        let stored = le_u32(&self.buf, crc_at);
        let computed = crc32c::crc32c(&self.buf[..crc_at]);
        if stored != computed {
            return Err(self.fail(0, DecodeErrorKind::HeaderCrc { stored, computed }));
        }
        match StreamHeader::parse(&self.buf) {
            Ok(h) => {
                self.header = Some(h);
                self.stage = Stage::RecordHead;
                Ok(())
            }
            Err(e) => Err(self.fail(0, DecodeErrorKind::Header(e))),
        }
    }

    fn record_head(&mut self) -> Result<(), DecodeError> {
        let record_type = RecordType(le_u32(&self.buf, 0));
        let length = le_u32(&self.buf, 4);
        if length > self.config.max_record_body {
            let at = self.item_offset;
            return Err(self.fail(
                at,
                DecodeErrorKind::RecordTooLarge {
                    record_type,
                    length,
                    limit: self.config.max_record_body,
                },
            ));
        }
        self.want = record_size(length as usize);
        self.buf.reserve(self.want - self.buf.len());
        self.stage = Stage::RecordRest;
        Ok(())
    }

    fn record_rest(&mut self) -> Result<Frame<'_>, DecodeError> {
        let at = self.item_offset;
        let record_type = RecordType(le_u32(&self.buf, 0));
        let length = le_u32(&self.buf, 4);
        let crc_at = self.buf.len() - 4;
        let stored = le_u32(&self.buf, crc_at);
        let computed = crc32c::crc32c(&self.buf[..crc_at]);
        if stored != computed {
            return Err(self.fail(
                at,
                DecodeErrorKind::Crc {
                    record_type,
                    length,
                    stored,
                    computed,
                },
            ));
        }
        let found = le_u32(&self.buf, crc_at - 4);
        if found != self.index {
            let expected = self.index;
            return Err(self.fail(at, DecodeErrorKind::Index { expected, found }));
        }
        let body_end = RECORD_HEADER_LEN + length as usize;
        if self.buf[body_end..body_end + pad8(length as usize)]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(self.fail(at, DecodeErrorKind::Padding(record_type)));
        }
        let kind = self
            .header
            .as_ref()
            .map_or(StreamKind::Replication, |h| h.kind);
        if record_type.name().is_some() {
            if !record_type.allowed_in(kind) {
                return Err(self.fail(at, DecodeErrorKind::NotAllowed { record_type, kind }));
            }
        } else if !record_type.is_optional() {
            return Err(self.fail(at, DecodeErrorKind::UnknownMandatory(record_type)));
        }
        let index = self.index;
        self.index = self.index.wrapping_add(1);
        if record_type == RecordType::END {
            self.stage = Stage::Ended;
        } else {
            self.stage = Stage::RecordHead;
        }
        // Disjoint borrows: the frame borrows `buf` while a failure poisons `stage`.
        let body = &self.buf[RECORD_HEADER_LEN..body_end];
        let record = match RecordRef::parse(record_type, body) {
            Ok(record) => record,
            Err(source) => {
                let err = DecodeError {
                    offset: at,
                    kind: DecodeErrorKind::Body {
                        record_type,
                        source,
                    },
                };
                self.stage = Stage::Failed(err.clone());
                return Err(err);
            }
        };
        Ok(Frame {
            offset: at,
            index,
            length,
            crc: stored,
            record,
        })
    }

    /// Like [`Decoder::decode_frame`], returning owned items.
    ///
    /// # Errors
    /// See [`Decoder::decode_frame`].
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Decoded>, DecodeError> {
        Ok(self.decode_frame(input)?.map(|item| match item {
            Item::Header(h) => Decoded::Header(h.clone()),
            Item::Record(f) => Decoded::Record {
                offset: f.offset,
                index: f.index,
                record: f.record.to_owned_record(),
            },
        }))
    }

    /// Declares the end of input and says whether the stream ended cleanly.
    ///
    /// # Errors
    /// Input ended inside the header or a record ([`DecodeErrorKind::TruncatedHeader`],
    /// [`DecodeErrorKind::TruncatedRecord`]), at a record boundary without `END`
    /// ([`DecodeErrorKind::MissingEnd`]), or an earlier error.
    pub fn finish(&self) -> Result<(), DecodeError> {
        let (offset, have) = if self.returned {
            (self.item_offset + self.buf.len() as u64, 0)
        } else {
            (self.item_offset, self.buf.len())
        };
        let kind = match &self.stage {
            Stage::Failed(e) => return Err(e.clone()),
            Stage::Ended => return Ok(()),
            Stage::HeaderPrefix | Stage::HeaderRest if self.header.is_none() => {
                DecodeErrorKind::TruncatedHeader {
                    have,
                    need: if have < PREFIX_LEN {
                        PREFIX_LEN
                    } else {
                        self.want
                    },
                }
            }
            _ if have == 0 => DecodeErrorKind::MissingEnd,
            Stage::RecordRest => DecodeErrorKind::TruncatedRecord {
                record_type: Some(RecordType(le_u32(&self.buf, 0))),
                have,
                need: self.want,
            },
            _ => DecodeErrorKind::TruncatedRecord {
                record_type: None,
                have,
                need: RECORD_HEADER_LEN,
            },
        };
        Err(DecodeError { offset, kind })
    }
}
