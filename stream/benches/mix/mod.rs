//! Realistic page mixes for the PAGE_DATA benchmarks (shared by both bench targets).
#![allow(dead_code)]

use remus_stream::{
    Decoder, DecoderConfig, Encoder, EncodingChoice, FlatMemory, Item, RecordRef, StreamHeader,
    StreamKind, MAX_BATCH_PAGES, PAGE_SIZE,
};

/// Pages per mix: 16 MiB, enough to leave the L2 cache.
pub const PAGES: usize = 4096;

/// A page mix: the pages to send, their frame numbers, and the receiver's previous copies.
pub struct Mix {
    pub name: &'static str,
    pub pfns: Vec<u64>,
    pub pages: Vec<u8>,
    pub reference: Vec<u8>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "the",
    "guest",
    "kernel",
    "page",
    "cache",
    "buffer",
    "epoch",
    "checkpoint",
    "remus",
    "replica",
    "network",
    "packet",
    "disk",
    "write",
    "barrier",
    "0x7fff",
    "struct",
    "task",
    "inode",
    "=",
    "{",
    "}",
    "\n",
    "    ",
    "return",
    "error",
    "ok",
    "1234",
    "GET /index.html HTTP/1.1",
];

#[derive(Clone, Copy)]
enum Kind {
    Zero,
    Text,
    Small,
    Random,
}

fn fill(kind: Kind, page: &mut [u8], prev: &mut [u8], rng: &mut Rng) {
    match kind {
        Kind::Zero => {
            page.fill(0);
            // The previous copy had something: a freed page that was zeroed.
            prev.iter_mut().for_each(|b| *b = rng.next() as u8 & 0x3f);
        }
        Kind::Text => {
            let mut i = 0;
            while i < page.len() {
                let w = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
                let n = w.len().min(page.len() - i);
                page[i..i + n].copy_from_slice(&w[..n]);
                i += n;
                if i < page.len() {
                    page[i] = b' ';
                    i += 1;
                }
            }
            // Previous copy: unrelated text.
            prev.iter_mut()
                .for_each(|b| *b = b'a' + (rng.next() % 26) as u8);
        }
        Kind::Small => {
            // A page of counters/pointers that changed in a few places since the last epoch.
            for c in prev.chunks_exact_mut(8) {
                let v = 0xffff_8880_0000_0000u64 | (rng.next() & 0xfff_fff8);
                c.copy_from_slice(&v.to_le_bytes());
            }
            page.copy_from_slice(prev);
            for _ in 0..8 {
                let at = (rng.next() as usize % (PAGE_SIZE / 8)) * 8;
                page[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        Kind::Random => {
            page.iter_mut().for_each(|b| *b = rng.next() as u8);
            prev.iter_mut().for_each(|b| *b = rng.next() as u8);
        }
    }
}

/// Builds a mix where page `i` gets a kind by its share of each kind (percentages).
pub fn mix(name: &'static str, zero: u32, text: u32, small: u32, random: u32) -> Mix {
    assert_eq!(zero + text + small + random, 100);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut pages = vec![0u8; PAGES * PAGE_SIZE];
    let mut reference = vec![0u8; PAGES * PAGE_SIZE];
    for (i, (page, prev)) in pages
        .chunks_exact_mut(PAGE_SIZE)
        .zip(reference.chunks_exact_mut(PAGE_SIZE))
        .enumerate()
    {
        let r = (i as u32 * 37) % 100; // spread kinds through the batch
        let kind = if r < zero {
            Kind::Zero
        } else if r < zero + text {
            Kind::Text
        } else if r < zero + text + small {
            Kind::Small
        } else {
            let _ = random;
            Kind::Random
        };
        fill(kind, page, prev, &mut rng);
    }
    Mix {
        name,
        pfns: (0..PAGES as u64).collect(),
        pages,
        reference,
    }
}

/// The mixes every benchmark reports.
pub fn mixes() -> Vec<Mix> {
    vec![
        mix("realistic", 25, 35, 30, 10),
        mix("text", 0, 100, 0, 0),
        mix("small-change", 0, 0, 100, 0),
        mix("random", 0, 0, 0, 100),
    ]
}

/// Encodes the whole mix in batches of 1024 pages into `out` (cleared first).
pub fn encode(enc: &mut Encoder, out: &mut Vec<u8>, m: &Mix, choice: EncodingChoice) {
    out.clear();
    for (pfns, pages) in m
        .pfns
        .chunks(MAX_BATCH_PAGES)
        .zip(m.pages.chunks(MAX_BATCH_PAGES * PAGE_SIZE))
    {
        enc.page_data(out, 1, pfns, pages, choice, &mut FlatMemory(&m.reference))
            .expect("encode");
    }
}

/// Stream header bytes to put in front of encoded records for decoding.
pub fn header_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new()
        .header(
            &mut out,
            &StreamHeader {
                kind: StreamKind::Replication,
                session_id: 1,
                node: "bench".into(),
                domain: "bench".into(),
            },
        )
        .unwrap();
    out
}

/// Decodes `stream` (header + PAGE_DATA records) into `ram`, one batch at a time.
pub fn decode(stream: &[u8], ram: &mut [u8], reference: &[u8]) {
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut input = stream;
    let mut at = 0;
    while let Some(item) = dec.decode_frame(&mut input).expect("decode") {
        if let Item::Record(f) = item {
            if let RecordRef::PageData(p) = f.record {
                let n = p.count() * PAGE_SIZE;
                p.decode_into(&mut ram[at..at + n], &mut FlatMemory(reference))
                    .expect("unpack");
                at += n;
            }
        }
    }
}
