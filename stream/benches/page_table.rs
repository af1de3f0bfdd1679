//! Prints a table of PAGE_DATA encode/decode throughput for each page mix and encoding,
//! beside memcpy of the same bytes measured in the same run.
//!
//! Run: `cargo bench -p remus-stream --bench page_table` (or `scripts/bench-stream.sh`).
use std::hint::black_box;
use std::time::{Duration, Instant};

use remus_stream::{Encoder, EncodingChoice, PageEncoding, PAGE_SIZE};

mod mix;

/// Mean seconds per call of `f`, over at least `min` of wall time (after one warm-up call).
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < min || n < 3 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(n)
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let min = Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(400),
    );
    let choices = [
        ("RAW", EncodingChoice::Fixed(PageEncoding::Raw)),
        ("LZ4", EncodingChoice::Fixed(PageEncoding::Lz4)),
        ("XOR_LZ4", EncodingChoice::Fixed(PageEncoding::XorLz4)),
        ("AUTO(xor)", EncodingChoice::Auto { xor: true }),
    ];
    println!(
        "{:<13} {:<10} {:>7} {:>10} {:>9} {:>10} {:>9}",
        "mix", "encoding", "size%", "enc GB/s", "x memcpy", "dec GB/s", "x memcpy"
    );
    for m in mix::mixes() {
        let bytes = m.pages.len() as f64;
        let mut dst = vec![0u8; m.pages.len()];
        let memcpy = bytes / time(min, || dst.copy_from_slice(black_box(&m.pages))) / 1e9;
        println!(
            "{:<13} {:<10} {:>7} {:>10.2} {:>9} {:>10} {:>9}",
            m.name, "memcpy", "100.0", memcpy, "1.00", "", ""
        );
        for (name, choice) in choices {
            let mut enc = Encoder::new();
            let mut out = Vec::with_capacity(m.pages.len() * 2);
            let enc_gbs = bytes / time(min, || mix::encode(&mut enc, &mut out, &m, choice)) / 1e9;
            // Re-encode with a fresh encoder: the timed one's record index has moved on.
            mix::encode(&mut Encoder::new(), &mut out, &m, choice);
            let mut stream = mix::header_bytes();
            stream.extend_from_slice(&out);
            let mut ram = vec![0u8; m.pfns.len() * PAGE_SIZE];
            let dec_gbs = bytes
                / time(min, || {
                    mix::decode(black_box(&stream), &mut ram, &m.reference)
                })
                / 1e9;
            assert!(ram == m.pages, "{} {name}: decoded pages differ", m.name);
            println!(
                "{:<13} {:<10} {:>7.1} {:>10.2} {:>9.2} {:>10.2} {:>9.2}",
                m.name,
                name,
                100.0 * out.len() as f64 / bytes,
                enc_gbs,
                enc_gbs / memcpy,
                dec_gbs,
                dec_gbs / memcpy
            );
        }
    }
}
