//! Entry points shared by the cargo-fuzz target (`fuzz/fuzz_targets/decode.rs`) and the
//! tests that run the same code on stable, so the fuzz target cannot rot unnoticed.

use crate::{Decoder, DecoderConfig, EpochVerifier, Item, PAGE_SIZE};

/// Decodes `data` as a whole stream, fed in pieces whose sizes come from the data itself,
/// unpacking every page batch and running the epoch verifier. Returns the number of records
/// decoded before the first error (or the end). Must never panic.
pub fn decode_all(data: &[u8]) -> usize {
    // First byte picks a split size so the fuzzer explores partial reads.
    let (step, data) = match data.split_first() {
        Some((&b, rest)) => (usize::from(b) % 64 + 1, rest),
        None => (1, data),
    };
    let mut decoder = Decoder::new(DecoderConfig {
        max_record_body: 1 << 24,
    });
    let mut verifier = EpochVerifier::default();
    let mut pages = Vec::new();
    let reference = vec![0xa5u8; PAGE_SIZE];
    let mut records = 0;
    for chunk in data.chunks(step) {
        let mut input = chunk;
        loop {
            match decoder.decode_frame(&mut input) {
                Ok(Some(Item::Record(frame))) => {
                    records += 1;
                    if let crate::RecordRef::PageData(p) = frame.record {
                        pages.resize(p.count() * PAGE_SIZE, 0);
                        let reference = reference.as_slice();
                        // Even frames have a reference copy, odd ones are "never sent".
                        let mut r = |pfn: u64| (pfn & 1 == 0).then_some(reference);
                        let _ = p.decode_into(&mut pages, &mut r);
                    }
                    if verifier.observe(&frame.record, frame.crc).is_err() {
                        return records;
                    }
                }
                Ok(Some(Item::Header(_))) => {}
                Ok(None) => break,
                Err(_) => return records,
            }
        }
    }
    let _ = decoder.finish();
    records
}

fn sample_verify() -> crate::DiskVerify {
    let mut digest = [0u8; 32];
    digest[..16].copy_from_slice(&0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128.to_le_bytes());
    crate::DiskVerify {
        epoch: 1,
        run: 7,
        region: crate::VerifyRegion {
            disk: 1,
            offset: 8 << 20,
            length: 1 << 20,
        },
        algorithm: crate::DigestAlgorithm::Xxh3_128,
        digest,
    }
}

/// A valid reply stream using every reply record type: the second seed of the fuzzer (the
/// decoder refuses reply records in a replication stream, so they need their own).
pub fn sample_reply_stream() -> Vec<u8> {
    use crate::{
        DiskVerifyResult, Encoder, Nack, NackReason, Record, StreamHeader, StreamKind,
        VerifyVerdict,
    };
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    let header = StreamHeader {
        kind: StreamKind::Reply,
        session_id: 0xfeed_f00d_dead_beef,
        node: "beta".into(),
        domain: "web-1".into(),
    };
    fn ok<T>(r: Result<T, crate::EncodeError>) -> T {
        r.expect("sample reply input is valid")
    }
    ok(enc.header(&mut out, &header));
    let v = sample_verify();
    let records = [
        Record::Control(r#"{"kind":"capabilities","disk_verify":1}"#.into()),
        Record::CheckpointAck { epoch: 1 },
        Record::DiskVerifyResult(DiskVerifyResult {
            epoch: v.epoch,
            run: v.run,
            region: v.region,
            verdict: VerifyVerdict::Differ,
        }),
        Record::DiskVerifyResult(DiskVerifyResult {
            epoch: 2,
            run: v.run,
            region: v.region,
            verdict: VerifyVerdict::Other(200),
        }),
        Record::CheckpointNack(Nack {
            epoch: 2,
            reason: NackReason::Storage,
            message: "fsync failed".into(),
        }),
        Record::End,
    ];
    for r in &records {
        ok(enc.record(&mut out, r));
    }
    out
}

/// A valid replication stream using every replication record type and every page
/// encoding: the seed for the fuzzer and the fixture of mutation tests.
pub fn sample_stream() -> Vec<u8> {
    use crate::{
        DiskOp, DiskWrite, DomainConfig, Encoder, EncodingChoice, FlatMemory, PageEncoding, Record,
        StreamHeader, StreamKind,
    };
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    let header = StreamHeader {
        kind: StreamKind::Replication,
        session_id: 0xfeed_f00d_dead_beef,
        node: "alpha".into(),
        domain: "web-1".into(),
    };
    // Every call below uses valid, fixed inputs, so none can fail.
    fn ok<T>(r: Result<T, crate::EncodeError>) -> T {
        r.expect("sample stream input is valid")
    }
    ok(enc.header(&mut out, &header));
    let reference: Vec<u8> = (0..8 * PAGE_SIZE).map(|i| (i / 3) as u8).collect();
    let mut pages = reference[..4 * PAGE_SIZE].to_vec();
    pages[100] ^= 1;
    pages[PAGE_SIZE + 7] ^= 0x80;
    let first = [
        Record::DiskWrite(DiskWrite {
            epoch: 2,
            disk: 0,
            offset: 4096,
            op: DiskOp::Data(vec![0xab; 512]),
        }),
        Record::CheckpointBegin { epoch: 1 },
        Record::DomainConfig(DomainConfig {
            epoch: 1,
            json: r#"{"name":"web-1","memory_mib":512}"#.into(),
        }),
    ];
    for r in &first {
        ok(enc.record(&mut out, r));
    }
    for e in [PageEncoding::Raw, PageEncoding::Lz4, PageEncoding::XorLz4] {
        ok(enc.page_data(
            &mut out,
            1,
            &[0, 1, 2, 3],
            &pages,
            EncodingChoice::Fixed(e),
            &mut FlatMemory(&reference),
        ));
    }
    ok(enc.page_data(
        &mut out,
        1,
        &[10, 11],
        &[0; 2 * PAGE_SIZE],
        EncodingChoice::Auto { xor: true },
        &mut FlatMemory(&reference),
    ));
    ok(enc.device_state(&mut out, 1, &[7u8; 3000], 1024));
    ok(enc.record(
        &mut out,
        &Record::DiskWrite(DiskWrite {
            epoch: 2,
            disk: 1,
            offset: 0,
            op: DiskOp::Trim(1 << 20),
        }),
    ));
    ok(enc.disk_barrier(&mut out, 1));
    // Outside the epoch's counts: the END below must still match without it.
    ok(enc.record(&mut out, &Record::DiskVerify(sample_verify())));
    ok(enc.checkpoint_end(&mut out, 1));
    ok(enc.record(&mut out, &Record::Control(r#"{"op":"noop"}"#.into())));
    ok(enc.record(&mut out, &Record::End));
    out
}
