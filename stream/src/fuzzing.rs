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
