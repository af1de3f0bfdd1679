//! The decoder on hostile input: random bytes and mutated valid streams. It must never
//! panic, and it must either return exactly the records that were written (a prefix of
//! them, up to the damage) or an error — never a record that was not written.

mod common;

use common::{decode_chunked, header};
use proptest::collection::vec;
use proptest::prelude::*;
use remus_stream::{
    fuzzing, DecodeErrorKind, DeviceState, Encoder, Nack, NackReason, Record, StreamKind,
};

/// The crate's sample stream (every record type and page encoding) and its records.
fn sample_stream() -> (Vec<u8>, Vec<Record>) {
    let out = fuzzing::sample_stream();
    let decoded = decode_chunked(&out, &[4096]);
    assert_eq!(decoded.error, None, "sample stream must be valid");
    (out, decoded.records)
}

fn assert_prefix(got: &[Record], all: &[Record]) -> Result<(), TestCaseError> {
    prop_assert!(got.len() <= all.len(), "more records than written");
    prop_assert_eq!(
        got,
        &all[..got.len()],
        "a decoded record differs from the written one"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048), chunk in 1usize..100) {
        let out = decode_chunked(&bytes, &[chunk]);
        prop_assert!(out.error.is_some(), "random bytes accepted as a stream");
        fuzzing::decode_all(&bytes);
    }

    #[test]
    fn random_records_after_a_valid_header_never_panic(body in vec(any::<u8>(), 0..4096)) {
        let mut bytes = Vec::new();
        Encoder::new().header(&mut bytes, &header(StreamKind::Replication)).unwrap();
        bytes.extend_from_slice(&body);
        let out = decode_chunked(&bytes, &[17]);
        prop_assert!(out.error.is_some());
        let mut with_step = vec![7u8];
        with_step.extend_from_slice(&bytes);
        fuzzing::decode_all(&with_step);
    }

    #[test]
    fn every_bit_flip_is_detected(bit in 0usize..(1 << 20), chunk in 1usize..300) {
        let (mut bytes, records) = sample_stream();
        let bit = bit % (bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let out = decode_chunked(&bytes, &[chunk]);
        prop_assert!(out.error.is_some(), "flip of bit {} undetected", bit);
        let err = out.error.unwrap();
        prop_assert!(err.offset <= (bit / 8) as u64, "error at {} after the flipped byte {}", err.offset, bit / 8);
        assert_prefix(&out.records, &records)?;
    }

    #[test]
    fn every_bit_flip_of_a_reply_stream_is_detected(bit in 0usize..(1 << 16), chunk in 1usize..100) {
        let bytes = fuzzing::sample_reply_stream();
        let records = decode_chunked(&bytes, &[4096]).records;
        let mut bytes = bytes;
        let bit = bit % (bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let out = decode_chunked(&bytes, &[chunk]);
        prop_assert!(out.error.is_some(), "flip of bit {} undetected", bit);
        assert_prefix(&out.records, &records)?;
        let mut with_step = vec![3u8];
        with_step.extend_from_slice(&bytes);
        fuzzing::decode_all(&with_step);
    }

    #[test]
    fn truncation_is_detected(cut in 0usize..(1 << 20), chunk in 1usize..300) {
        let (bytes, records) = sample_stream();
        let cut = cut % bytes.len();
        let out = decode_chunked(&bytes[..cut], &[chunk]);
        let err = out.error.expect("truncated stream accepted");
        prop_assert!(
            matches!(err.kind, DecodeErrorKind::TruncatedHeader { .. }
                | DecodeErrorKind::TruncatedRecord { .. }
                | DecodeErrorKind::MissingEnd),
            "unexpected error {}", err
        );
        assert_prefix(&out.records, &records)?;
    }

    #[test]
    fn insertions_and_deletions_are_detected(
        at in 0usize..(1 << 20),
        insert in vec(any::<u8>(), 0..16),
        delete in 0usize..16,
    ) {
        prop_assume!(!insert.is_empty() || delete > 0);
        let (bytes, records) = sample_stream();
        let at = at % (bytes.len() + 1);
        let end = (at + delete).min(bytes.len());
        let mut mutated = bytes[..at].to_vec();
        mutated.extend_from_slice(&insert);
        mutated.extend_from_slice(&bytes[end..]);
        prop_assume!(mutated != bytes);
        let out = decode_chunked(&mutated, &[64]);
        prop_assert!(out.error.is_some(), "mutation at {} undetected", at);
        assert_prefix(&out.records, &records)?;
        fuzzing::decode_all(&mutated);
    }
}

#[test]
fn nack_text_and_reason_codes_survive() {
    let rec = Record::CheckpointNack(Nack {
        epoch: 5,
        reason: NackReason::Storage,
        message: "fsync of /var/lib/remus/web/wal failed: EIO".into(),
    });
    let bytes = common::encode(StreamKind::Reply, &[rec.clone(), Record::End]);
    assert_eq!(decode_chunked(&bytes, &[3]).records, vec![rec, Record::End]);
}

#[test]
fn reply_sample_is_valid_and_carries_verify_results() {
    let bytes = fuzzing::sample_reply_stream();
    let out = decode_chunked(&bytes, &[5]);
    assert_eq!(out.error, None);
    assert_eq!(
        out.records
            .iter()
            .filter(|r| matches!(r, Record::DiskVerifyResult(_)))
            .count(),
        2
    );
    let mut seeded = vec![5u8];
    seeded.extend_from_slice(&bytes);
    assert_eq!(fuzzing::decode_all(&seeded), out.records.len());
}

/// Checkpoints proved complete by the epoch verifier over `bytes`.
fn proved(bytes: &[u8]) -> Vec<u64> {
    let mut dec = remus_stream::Decoder::new(remus_stream::DecoderConfig::default());
    let mut verifier = remus_stream::EpochVerifier::default();
    let mut input = bytes;
    let mut done = Vec::new();
    while let Some(item) = dec.decode_frame(&mut input).expect("valid stream") {
        if let remus_stream::Item::Record(f) = item {
            if let Some(s) = verifier
                .observe(&f.record, f.crc)
                .expect("epoch rules hold")
            {
                done.push(s.end.epoch);
            }
        }
    }
    done
}

/// The verify records are outside every epoch's counts and digest, so an older backup,
/// which skips them as unknown optional records, still proves the checkpoint complete: the
/// sample stream checks with its DISK_VERIFY as is (a reader that knows it), and with the
/// same record renumbered to a type this version does not know (a reader that does not).
#[test]
fn verify_records_are_outside_the_epoch_digest() {
    let (_, records) = sample_stream();
    assert!(records.iter().any(|r| matches!(r, Record::DiskVerify(_))));
    let encode = |unknown: bool| {
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        enc.header(&mut bytes, &header(StreamKind::Replication))
            .unwrap();
        for r in &records {
            match r {
                Record::DiskVerify(_) if unknown => {
                    enc.raw(
                        &mut bytes,
                        remus_stream::RecordType(0x8000_7777),
                        &[0u8; 64],
                    )
                    .unwrap();
                }
                other => enc.record(&mut bytes, other).unwrap(),
            }
        }
        bytes
    };
    assert_eq!(proved(&encode(false)), vec![1]);
    assert_eq!(proved(&encode(true)), vec![1]);
}

#[test]
fn trailing_data_after_end_is_an_error() {
    let (mut bytes, _) = sample_stream();
    let end = bytes.len() as u64;
    bytes.push(0);
    let err = decode_chunked(&bytes, &[1 << 20]).error.unwrap();
    assert_eq!(err.offset, end);
    assert_eq!(err.kind, DecodeErrorKind::TrailingData);
}

#[test]
fn crc_errors_name_the_record_offset() {
    let (mut bytes, _) = sample_stream();
    // The first record starts right after the 48-byte header; corrupt its body.
    bytes[48 + 8 + 3] ^= 0x10;
    let err = decode_chunked(&bytes, &[10]).error.unwrap();
    assert_eq!(err.offset, 48);
    assert!(matches!(err.kind, DecodeErrorKind::Crc { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("stream offset 48: CRC mismatch"),
        "{err}"
    );
}

#[test]
fn header_errors_are_specific() {
    let (bytes, _) = sample_stream();
    type Mutate = Box<dyn Fn(&mut Vec<u8>)>;
    type Check = fn(&DecodeErrorKind) -> bool;
    let cases: Vec<(&str, Mutate, Check)> = vec![
        ("magic", Box::new(|b| b[1] = b'X'), |k| {
            matches!(k, DecodeErrorKind::BadMagic { .. })
        }),
        ("version", Box::new(|b| b[8] = 2), |k| {
            matches!(k, DecodeErrorKind::UnsupportedVersion(2))
        }),
        ("length", Box::new(|b| b[10] = 41), |k| {
            matches!(k, DecodeErrorKind::HeaderLength(41))
        }),
        ("crc", Box::new(|b| b[33] ^= 1), |k| {
            matches!(k, DecodeErrorKind::HeaderCrc { .. })
        }),
        ("empty", Box::new(|b| b.clear()), |k| {
            matches!(k, DecodeErrorKind::TruncatedHeader { have: 0, .. })
        }),
    ];
    for (name, mutate, check) in cases {
        let mut b = bytes.clone();
        mutate(&mut b);
        let err = decode_chunked(&b, &[7])
            .error
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(check(&err.kind), "{name}: {err}");
        assert_eq!(err.offset, 0, "{name}");
    }
}

#[test]
fn big_endian_streams_are_refused_with_a_reason() {
    let (mut bytes, _) = sample_stream();
    bytes[12] = 1; // options bit 0: big-endian
    let crc = crc32c::crc32c(&bytes[..44]);
    bytes[44..48].copy_from_slice(&crc.to_le_bytes());
    let err = decode_chunked(&bytes, &[100]).error.unwrap();
    assert!(err.to_string().contains("big-endian"), "{err}");
}

#[test]
fn device_state_sample_is_consistent() {
    let (_, records) = sample_stream();
    let chunks: Vec<&DeviceState> = records
        .iter()
        .filter_map(|r| match r {
            Record::DeviceState(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[2].offset + chunks[2].data.len() as u64, 3000);
}
