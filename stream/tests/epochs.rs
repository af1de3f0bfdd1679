//! Table-driven tests of the epoch rules: which record sequences prove a checkpoint complete.

mod common;

use common::header;
use remus_stream::{
    CheckpointEnd, Decoder, DecoderConfig, DeviceState, DiskBarrier, DiskOp, DiskWrite,
    DomainConfig, Encoder, EncodingChoice, EpochError, EpochVerifier, Item, NoReference, Record,
    StreamKind, PAGE_SIZE,
};

/// One step a test sender takes.
#[derive(Clone)]
enum Step {
    Rec(Record),
    Pages(u64, Vec<u64>),
    Device(u64, usize),
    /// `CHECKPOINT_END` filled by the encoder from its own account.
    End(u64),
    /// `CHECKPOINT_END` filled by the encoder, then tampered with.
    EndWith(u64, fn(&mut CheckpointEnd)),
    Barrier(u64),
}

fn write(enc: &mut Encoder, out: &mut Vec<u8>, step: &Step) {
    match step {
        Step::Rec(r) => enc.record(out, r).unwrap(),
        Step::Pages(epoch, pfns) => {
            let pages = vec![1u8; pfns.len() * PAGE_SIZE];
            enc.page_data(
                out,
                *epoch,
                pfns,
                &pages,
                EncodingChoice::Auto { xor: false },
                &mut NoReference,
            )
            .unwrap();
        }
        Step::Device(epoch, len) => {
            enc.device_state(out, *epoch, &vec![3u8; *len], 1000)
                .unwrap();
        }
        Step::End(epoch) => {
            enc.checkpoint_end(out, *epoch).unwrap();
        }
        Step::EndWith(epoch, tamper) => {
            let mut honest = enc.pending_end(*epoch);
            tamper(&mut honest);
            enc.record(out, &Record::CheckpointEnd(honest)).unwrap();
        }
        Step::Barrier(epoch) => {
            enc.disk_barrier(out, *epoch).unwrap();
        }
    }
}

/// Runs the steps through encoder → decoder → verifier; returns completed epochs or the
/// first verifier error.
fn run(steps: &[Step]) -> Result<Vec<u64>, EpochError> {
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    enc.header(&mut out, &header(StreamKind::Replication))
        .unwrap();
    for s in steps {
        write(&mut enc, &mut out, s);
    }
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut ver = EpochVerifier::new(3);
    let mut done = Vec::new();
    let mut input = &out[..];
    while let Some(item) = dec.decode_frame(&mut input).unwrap() {
        if let Item::Record(f) = item {
            if let Some(summary) = ver.observe(&f.record, f.crc)? {
                done.push(summary.end.epoch);
            }
        }
    }
    Ok(done)
}

fn begin(epoch: u64) -> Step {
    Step::Rec(Record::CheckpointBegin { epoch })
}

fn handoff(epoch: u64) -> Step {
    Step::Rec(Record::HandOff { epoch })
}

fn dw(epoch: u64) -> Step {
    Step::Rec(Record::DiskWrite(DiskWrite {
        epoch,
        disk: 0,
        offset: 0,
        op: DiskOp::Data(vec![1; 512]),
    }))
}

#[test]
fn epoch_rules() {
    type Check = fn(&Result<Vec<u64>, EpochError>) -> bool;
    let cases: Vec<(&str, Vec<Step>, Check)> = vec![
        (
            "complete checkpoint with everything",
            vec![
                dw(1),
                begin(1),
                Step::Rec(Record::DomainConfig(DomainConfig {
                    epoch: 1,
                    json: "{}".into(),
                })),
                Step::Pages(1, vec![1, 2, 3]),
                Step::Device(1, 2500),
                Step::Barrier(1),
                Step::End(1),
            ],
            |r| r == &Ok(vec![1]),
        ),
        (
            "disk writes of k+1 interleaved with checkpoint k",
            vec![
                begin(1),
                dw(2),
                Step::Pages(1, vec![5]),
                dw(2),
                Step::End(1),
                begin(2),
                Step::End(2),
            ],
            |r| r == &Ok(vec![1, 2]),
        ),
        (
            "pages before begin",
            vec![Step::Pages(1, vec![1]), begin(1)],
            |r| matches!(r, Err(EpochError::NotBegun { epoch: 1, .. })),
        ),
        ("second begin", vec![begin(1), begin(1)], |r| {
            matches!(r, Err(EpochError::DuplicateBegin { epoch: 1 }))
        }),
        ("end without begin", vec![Step::End(4)], |r| {
            matches!(r, Err(EpochError::NotBegun { epoch: 4, .. }))
        }),
        (
            "checkpoints end out of order",
            vec![begin(1), Step::End(1), begin(3), Step::End(3)],
            |r| {
                matches!(
                    r,
                    Err(EpochError::OutOfOrder {
                        epoch: 3,
                        expected: 2
                    })
                )
            },
        ),
        (
            "record of a completed epoch",
            vec![begin(1), Step::End(1), dw(1)],
            |r| {
                matches!(
                    r,
                    Err(EpochError::Stale {
                        epoch: 1,
                        completed: 1,
                        ..
                    })
                )
            },
        ),
        (
            "too many open epochs",
            vec![dw(1), dw(2), dw(3), dw(4)],
            |r| {
                matches!(
                    r,
                    Err(EpochError::TooManyOpen {
                        epoch: 4,
                        max: 3,
                        ..
                    })
                )
            },
        ),
        (
            "disk write after barrier",
            vec![begin(1), dw(1), Step::Barrier(1), dw(1)],
            |r| matches!(r, Err(EpochError::AfterBarrier { epoch: 1, .. })),
        ),
        (
            "barrier with wrong counts",
            vec![
                dw(1),
                Step::Rec(Record::DiskBarrier(DiskBarrier {
                    epoch: 1,
                    writes: 2,
                    data_bytes: 1024,
                })),
            ],
            |r| matches!(r, Err(EpochError::Barrier { writes: 1, .. })),
        ),
        (
            "device state with a gap",
            vec![
                begin(1),
                Step::Rec(Record::DeviceState(DeviceState {
                    epoch: 1,
                    total_len: 10,
                    offset: 0,
                    data: vec![0; 4],
                })),
                Step::Rec(Record::DeviceState(DeviceState {
                    epoch: 1,
                    total_len: 10,
                    offset: 5,
                    data: vec![0; 5],
                })),
            ],
            |r| {
                matches!(
                    r,
                    Err(EpochError::DeviceChunk {
                        offset: 5,
                        expected_offset: 4,
                        ..
                    })
                )
            },
        ),
        (
            "device state incomplete at end",
            vec![
                begin(1),
                Step::Rec(Record::DeviceState(DeviceState {
                    epoch: 1,
                    total_len: 10,
                    offset: 0,
                    data: vec![0; 4],
                })),
                Step::End(1),
            ],
            |r| {
                matches!(
                    r,
                    Err(EpochError::DeviceIncomplete {
                        have: 4,
                        total: 10,
                        ..
                    })
                )
            },
        ),
        (
            "end declares too few pages",
            vec![
                begin(1),
                Step::Pages(1, vec![1, 2]),
                Step::EndWith(1, |e| e.pages = 0),
            ],
            |r| {
                matches!(
                    r,
                    Err(EpochError::Count {
                        field: "pages",
                        declared: 0,
                        received: 2,
                        ..
                    })
                )
            },
        ),
        (
            "end with a wrong digest",
            vec![begin(1), Step::EndWith(1, |e| e.digest = 0xdead)],
            |r| {
                matches!(
                    r,
                    Err(EpochError::Digest {
                        declared: 0xdead,
                        ..
                    })
                )
            },
        ),
        (
            "hand-off of the last completed checkpoint",
            vec![
                begin(1),
                Step::End(1),
                begin(2),
                Step::End(2),
                handoff(2),
                Step::Rec(Record::End),
            ],
            |r| r == &Ok(vec![1, 2]),
        ),
        (
            "hand-off of an earlier checkpoint",
            vec![begin(1), Step::End(1), begin(2), Step::End(2), handoff(1)],
            |r| matches!(r, Err(EpochError::HandOff { epoch: 1, .. })),
        ),
        (
            "hand-off of a checkpoint not completed",
            vec![begin(1), Step::End(1), begin(2), handoff(2)],
            |r| matches!(r, Err(EpochError::HandOff { epoch: 2, .. })),
        ),
        ("hand-off before any checkpoint", vec![handoff(1)], |r| {
            matches!(r, Err(EpochError::HandOff { epoch: 1, .. }))
        }),
        (
            "hand-off while the next epoch has disk writes (the VM ran on)",
            vec![begin(1), dw(2), Step::End(1), handoff(1)],
            |r| matches!(r, Err(EpochError::HandOff { epoch: 1, .. })),
        ),
        (
            "a checkpoint record after the hand-off",
            vec![begin(1), Step::End(1), handoff(1), begin(2)],
            |r| {
                matches!(
                    r,
                    Err(EpochError::AfterHandOff {
                        handed_off: 1,
                        record: "CHECKPOINT_BEGIN"
                    })
                )
            },
        ),
    ];
    for (name, steps, check) in cases {
        let result = run(&steps);
        assert!(check(&result), "{name}: got {result:?}");
    }
}

#[test]
fn a_record_missing_from_the_middle_breaks_the_digest() {
    // Write epoch 1 with three page records, then drop the middle one from the byte stream
    // and renumber nothing: the index check catches it first. Rebuild the stream instead
    // with the sender's END of the full epoch after only two records: the digest catches it.
    let mut enc = Encoder::new();
    let mut full = Vec::new();
    enc.header(&mut full, &header(StreamKind::Replication))
        .unwrap();
    enc.record(&mut full, &Record::CheckpointBegin { epoch: 1 })
        .unwrap();
    for pfn in [1, 2, 3] {
        enc.page_data(
            &mut full,
            1,
            &[pfn],
            &[9u8; PAGE_SIZE],
            EncodingChoice::Auto { xor: false },
            &mut NoReference,
        )
        .unwrap();
    }
    let mut tail = Vec::new();
    let end = enc.checkpoint_end(&mut tail, 1).unwrap();
    assert_eq!((end.pages, end.page_records), (3, 3));

    let mut short = Encoder::new();
    let mut out = Vec::new();
    short
        .header(&mut out, &header(StreamKind::Replication))
        .unwrap();
    short
        .record(&mut out, &Record::CheckpointBegin { epoch: 1 })
        .unwrap();
    for pfn in [1, 3] {
        short
            .page_data(
                &mut out,
                1,
                &[pfn],
                &[9u8; PAGE_SIZE],
                EncodingChoice::Auto { xor: false },
                &mut NoReference,
            )
            .unwrap();
    }
    // Same counts as the sender claims except pages/page_records: fix those so only the
    // digest can tell.
    short
        .record(
            &mut out,
            &Record::CheckpointEnd(CheckpointEnd {
                pages: 2,
                page_records: 2,
                ..end
            }),
        )
        .unwrap();
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut ver = EpochVerifier::default();
    let mut input = &out[..];
    let mut result = Ok(None);
    while let Some(item) = dec.decode_frame(&mut input).unwrap() {
        if let Item::Record(f) = item {
            result = ver.observe(&f.record, f.crc);
            if result.is_err() {
                break;
            }
        }
    }
    assert!(
        matches!(result, Err(EpochError::Digest { epoch: 1, .. })),
        "{result:?}"
    );
}
