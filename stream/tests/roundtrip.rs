//! Property tests: every record type survives encode → decode at random split points.

mod common;

use common::{decode_chunked, encode, header};
use proptest::collection::vec;
use proptest::prelude::*;
use remus_stream::{
    CheckpointEnd, Decoder, DecoderConfig, DeviceState, DiskBarrier, DiskOp, DiskWrite,
    DomainConfig, Encoder, EncodingChoice, FlatMemory, Item, Nack, NackReason, PageData,
    PageEncoding, Record, RecordRef, StreamKind, MAX_PFN, PAGE_SIZE,
};

fn json() -> impl Strategy<Value = String> {
    ("[a-z0-9 ]{0,24}", any::<u32>(), any::<bool>())
        .prop_map(|(s, n, b)| format!(r#"{{"name":"{s}","n":{n},"flag":{b},"list":[1,2,3]}}"#))
}

fn pfns(max: usize) -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::btree_set(0..=MAX_PFN, 1..=max).prop_map(|s| s.into_iter().collect())
}

fn disk_op() -> impl Strategy<Value = DiskOp> {
    prop_oneof![
        vec(any::<u8>(), 1..300).prop_map(DiskOp::Data),
        (1..=u32::MAX).prop_map(DiskOp::Zeroes),
        (1..=u32::MAX).prop_map(DiskOp::Trim),
    ]
}

/// Any record allowed in a replication stream (pages as RAW so the payload is valid).
fn replication_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (any::<u64>(), json())
            .prop_map(|(epoch, json)| Record::DomainConfig(DomainConfig { epoch, json })),
        any::<u64>().prop_map(|epoch| Record::CheckpointBegin { epoch }),
        (any::<u64>(), pfns(4), any::<u8>()).prop_map(|(epoch, pfns, fill)| {
            let payload = vec![fill; pfns.len() * PAGE_SIZE];
            Record::PageData(PageData {
                epoch,
                encoding: PageEncoding::Raw,
                pfns,
                payload,
            })
        }),
        (any::<u64>(), pfns(16)).prop_map(|(epoch, pfns)| Record::PageData(PageData {
            epoch,
            encoding: PageEncoding::Zero,
            pfns,
            payload: Vec::new(),
        })),
        (
            any::<u64>(),
            vec(any::<u8>(), 0..500),
            0..1000u64,
            0..1000u64
        )
            .prop_map(
                |(epoch, data, offset, extra)| Record::DeviceState(DeviceState {
                    epoch,
                    total_len: offset + data.len() as u64 + extra,
                    offset,
                    data,
                })
            ),
        (any::<u64>(), any::<u16>(), 0..u64::MAX / 2, disk_op()).prop_map(
            |(epoch, disk, offset, op)| Record::DiskWrite(DiskWrite {
                epoch,
                disk,
                offset,
                op
            })
        ),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, writes, data_bytes)| {
            Record::DiskBarrier(DiskBarrier {
                epoch,
                writes,
                data_bytes,
            })
        }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(epoch, pages, page_records, dsb, disk_writes, digest)| {
                Record::CheckpointEnd(CheckpointEnd {
                    epoch,
                    pages,
                    page_records,
                    device_state_bytes: dsb,
                    disk_writes,
                    digest,
                })
            }),
        json().prop_map(Record::Control),
        any::<u64>().prop_map(|epoch| Record::HandOff { epoch }),
    ]
}

/// Any record allowed in a reply stream.
fn reply_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        any::<u64>().prop_map(|epoch| Record::CheckpointAck { epoch }),
        (any::<u64>(), any::<u32>(), "\\PC{0,80}").prop_map(|(epoch, code, message)| {
            Record::CheckpointNack(Nack {
                epoch,
                reason: NackReason::from_code(code),
                message,
            })
        }),
        json().prop_map(Record::Control),
    ]
}

fn splits() -> impl Strategy<Value = Vec<usize>> {
    vec(1usize..200, 1..20)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn replication_records_roundtrip(mut records in vec(replication_record(), 0..12), chunks in splits()) {
        records.push(Record::End);
        let bytes = encode(StreamKind::Replication, &records);
        let out = decode_chunked(&bytes, &chunks);
        prop_assert_eq!(out.error, None);
        prop_assert_eq!(out.header, Some(header(StreamKind::Replication)));
        prop_assert_eq!(out.records, records);
    }

    #[test]
    fn reply_records_roundtrip(mut records in vec(reply_record(), 0..12), chunks in splits()) {
        records.push(Record::End);
        let bytes = encode(StreamKind::Reply, &records);
        let out = decode_chunked(&bytes, &chunks);
        prop_assert_eq!(out.error, None);
        prop_assert_eq!(out.records, records);
    }

    /// Pages packed with every encoding unpack to the same bytes, with the same reference.
    #[test]
    fn page_batches_roundtrip(
        pfns in pfns(24),
        kinds in vec(0u8..4, 24),
        seed in any::<u64>(),
        choice in prop_oneof![
            Just(EncodingChoice::Fixed(PageEncoding::Raw)),
            Just(EncodingChoice::Fixed(PageEncoding::Lz4)),
            Just(EncodingChoice::Fixed(PageEncoding::XorLz4)),
            Just(EncodingChoice::Auto { xor: false }),
            Just(EncodingChoice::Auto { xor: true }),
        ],
        chunks in splits(),
    ) {
        // Reference memory: 64 pages of pseudo-random bytes; pfns beyond it have no copy.
        let mut x = seed | 1;
        let mut next = move || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        let reference: Vec<u8> = (0..64 * PAGE_SIZE).map(|_| next() as u8).collect();
        let mut pages = vec![0u8; pfns.len() * PAGE_SIZE];
        for (i, page) in pages.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let pfn = pfns[i] as usize;
            match kinds[i] {
                0 => {} // zero page
                1 => page.iter_mut().enumerate().for_each(|(j, b)| *b = b"lorem ipsum "[j % 12]),
                2 => {
                    // Small change against the reference copy (or zero if none).
                    if pfn < 64 { page.copy_from_slice(&reference[pfn * PAGE_SIZE..][..PAGE_SIZE]); }
                    page[(next() as usize) % PAGE_SIZE] ^= 0x5a;
                }
                _ => page.iter_mut().for_each(|b| *b = next() as u8),
            }
        }
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        enc.header(&mut bytes, &header(StreamKind::Replication)).unwrap();
        let used = enc
            .page_data(&mut bytes, 9, &pfns, &pages, choice, &mut FlatMemory(&reference))
            .unwrap();
        if let EncodingChoice::Fixed(e) = choice { prop_assert_eq!(used, e); }
        enc.record(&mut bytes, &Record::End).unwrap();

        let mut dec = Decoder::new(DecoderConfig::default());
        let mut got = None;
        let mut rest = &bytes[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = chunks[i % chunks.len()].min(rest.len());
            i += 1;
            let mut input = &rest[..n];
            rest = &rest[n..];
            while let Some(item) = dec.decode_frame(&mut input).unwrap() {
                if let Item::Record(f) = item {
                    if let RecordRef::PageData(p) = f.record {
                        prop_assert_eq!(p.encoding, used);
                        prop_assert_eq!(p.pfns().collect::<Vec<_>>(), pfns.clone());
                        let mut out = vec![0xeeu8; p.count() * PAGE_SIZE];
                        p.decode_into(&mut out, &mut FlatMemory(&reference)).unwrap();
                        got = Some(out);
                    }
                }
            }
        }
        dec.finish().unwrap();
        prop_assert!(got == Some(pages), "unpacked pages differ");
    }
}

#[test]
fn zero_batches_are_detected_and_carry_no_payload() {
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    let pages = vec![0u8; 3 * PAGE_SIZE];
    let e = enc
        .page_data(
            &mut out,
            1,
            &[1, 2, 3],
            &pages,
            EncodingChoice::Auto { xor: true },
            &mut remus_stream::NoReference,
        )
        .unwrap();
    assert_eq!(e, PageEncoding::Zero);
    // header 8 + fixed 16 + 3 pfns 24 + trailer 8, no payload.
    assert_eq!(out.len(), 8 + 16 + 24 + 8);
}

#[test]
fn incompressible_auto_batches_fall_back_to_raw() {
    let mut x = 0x1234_5678_9abc_def1u64;
    let pages: Vec<u8> = (0..2 * PAGE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut enc = Encoder::new();
    let e = enc
        .page_data(
            &mut Vec::new(),
            1,
            &[7, 8],
            &pages,
            EncodingChoice::Auto { xor: false },
            &mut remus_stream::NoReference,
        )
        .unwrap();
    assert_eq!(e, PageEncoding::Raw);
}

#[test]
fn unknown_optional_records_are_skipped_and_mandatory_ones_fail() {
    use remus_stream::{DecodeErrorKind, RecordType};
    for (rtype, optional) in [(0x8000_0042u32, true), (0x0000_0042u32, false)] {
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        enc.header(&mut bytes, &header(StreamKind::Replication))
            .unwrap();
        enc.raw(&mut bytes, RecordType(rtype), b"future stuff")
            .unwrap();
        enc.record(&mut bytes, &Record::CheckpointBegin { epoch: 3 })
            .unwrap();
        enc.record(&mut bytes, &Record::End).unwrap();
        let out = decode_chunked(&bytes, &[5]);
        if optional {
            assert_eq!(out.error, None);
            assert_eq!(
                out.records,
                vec![
                    Record::Unknown {
                        record_type: RecordType(rtype),
                        length: 12
                    },
                    Record::CheckpointBegin { epoch: 3 },
                    Record::End
                ]
            );
        } else {
            let err = out.error.expect("mandatory unknown type must fail");
            assert_eq!(err.offset, 48, "record right after the 48-byte header");
            assert_eq!(
                err.kind,
                DecodeErrorKind::UnknownMandatory(RecordType(rtype))
            );
            assert!(out.records.is_empty());
        }
    }
}

#[test]
fn records_are_checked_against_the_stream_direction() {
    use remus_stream::DecodeErrorKind;
    let bytes = encode(
        StreamKind::Replication,
        &[Record::CheckpointAck { epoch: 1 }],
    );
    let err = decode_chunked(&bytes, &[1000]).error.unwrap();
    assert!(
        matches!(err.kind, DecodeErrorKind::NotAllowed { .. }),
        "{err}"
    );
    let bytes = encode(StreamKind::Reply, &[Record::HandOff { epoch: 1 }]);
    let err = decode_chunked(&bytes, &[1000]).error.unwrap();
    assert!(
        matches!(err.kind, DecodeErrorKind::NotAllowed { .. }),
        "HANDOFF travels primary to backup only: {err}"
    );
    let bytes = encode(StreamKind::Reply, &[Record::CheckpointBegin { epoch: 1 }]);
    let err = decode_chunked(&bytes, &[1000]).error.unwrap();
    assert!(
        matches!(err.kind, DecodeErrorKind::NotAllowed { .. }),
        "{err}"
    );
}

#[test]
fn device_state_is_chunked_and_reassembles() {
    let blob: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let mut enc = Encoder::new();
    let mut bytes = Vec::new();
    enc.header(&mut bytes, &header(StreamKind::Replication))
        .unwrap();
    assert_eq!(enc.device_state(&mut bytes, 4, &blob, 4096).unwrap(), 3);
    enc.record(&mut bytes, &Record::End).unwrap();
    let out = decode_chunked(&bytes, &[333]);
    assert_eq!(out.error, None);
    let mut joined = Vec::new();
    for r in &out.records {
        if let Record::DeviceState(d) = r {
            assert_eq!(d.total_len, 10_000);
            assert_eq!(d.offset, joined.len() as u64);
            joined.extend_from_slice(&d.data);
        }
    }
    assert_eq!(joined, blob);
}

#[test]
fn oversized_records_fail_before_allocation() {
    use remus_stream::DecodeErrorKind;
    let mut bytes = encode(StreamKind::Replication, &[]);
    let at = bytes.len() as u64;
    // A record header declaring a 3 GiB body, and nothing else.
    bytes.extend_from_slice(&4u32.to_le_bytes());
    bytes.extend_from_slice(&(3u32 << 30).to_le_bytes());
    let mut dec = Decoder::new(DecoderConfig {
        max_record_body: 1 << 20,
    });
    let mut input = &bytes[..];
    let err = loop {
        match dec.decode(&mut input) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("must fail on the header alone"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.offset, at);
    assert!(
        matches!(err.kind, DecodeErrorKind::RecordTooLarge { length, limit: 1048576, .. } if length == 3 << 30),
        "{err}"
    );
}
