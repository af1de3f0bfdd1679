//! Helpers shared by the stream integration tests.
#![allow(dead_code)]

use remus_stream::{
    DecodeError, Decoded, Decoder, DecoderConfig, Encoder, Record, StreamHeader, StreamKind,
};

pub fn header(kind: StreamKind) -> StreamHeader {
    StreamHeader {
        kind,
        session_id: 0xfeed_f00d_dead_beef,
        node: "alpha".into(),
        domain: "web-1".into(),
    }
}

/// Encodes a header and `records` into one buffer.
pub fn encode(kind: StreamKind, records: &[Record]) -> Vec<u8> {
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    enc.header(&mut out, &header(kind)).unwrap();
    for r in records {
        enc.record(&mut out, r).unwrap();
    }
    out
}

/// Result of decoding a whole buffer.
pub struct Outcome {
    pub header: Option<StreamHeader>,
    pub records: Vec<Record>,
    pub error: Option<DecodeError>,
}

/// Decodes `bytes` fed in chunks of the given sizes (cycled), then calls `finish`.
pub fn decode_chunked(bytes: &[u8], chunks: &[usize]) -> Outcome {
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut out = Outcome {
        header: None,
        records: Vec::new(),
        error: None,
    };
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        i += 1;
        let mut input = &rest[..n];
        rest = &rest[n..];
        loop {
            match dec.decode(&mut input) {
                Ok(Some(Decoded::Header(h))) => out.header = Some(h),
                Ok(Some(Decoded::Record { record, .. })) => out.records.push(record),
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        assert!(
            input.is_empty(),
            "decoder left input unconsumed without an error"
        );
    }
    if let Err(e) = dec.finish() {
        out.error = Some(e);
    }
    out
}
