//! Criterion benchmark of PAGE_DATA encode and decode beside memcpy of the same bytes.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use remus_stream::{Encoder, EncodingChoice, PageEncoding, PAGE_SIZE};

mod mix;

fn bench(c: &mut Criterion) {
    let m = mix::mix("realistic", 25, 35, 30, 10);
    let bytes = (m.pages.len()) as u64;
    let mut g = c.benchmark_group("page_data");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(20);
    let mut dst = vec![0u8; m.pages.len()];
    g.bench_function("memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&m.pages)))
    });
    for enc_kind in [PageEncoding::Raw, PageEncoding::Lz4, PageEncoding::XorLz4] {
        let choice = EncodingChoice::Fixed(enc_kind);
        let mut enc = Encoder::new();
        let mut out = Vec::with_capacity(m.pages.len() * 2);
        g.bench_function(format!("encode/{enc_kind}"), |b| {
            b.iter(|| mix::encode(&mut enc, &mut out, &m, choice))
        });
        let mut stream = mix::header_bytes();
        mix::encode(&mut Encoder::new(), &mut out, &m, choice);
        stream.extend_from_slice(&out);
        let mut ram = vec![0u8; m.pfns.len() * PAGE_SIZE];
        g.bench_function(format!("decode/{enc_kind}"), |b| {
            b.iter(|| mix::decode(black_box(&stream), &mut ram, &m.reference))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
