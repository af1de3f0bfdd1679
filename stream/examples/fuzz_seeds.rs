//! Writes seed inputs for the `decode` fuzz target into a directory:
//! `cargo run -p remus-stream --example fuzz_seeds -- fuzz/corpus/decode`.
//! Each seed is a split-size byte (the target's first input byte) followed by a stream.
fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus/decode".into());
    std::fs::create_dir_all(&dir)?;
    let streams = [
        ("sample", remus_stream::fuzzing::sample_stream()),
        ("reply", remus_stream::fuzzing::sample_reply_stream()),
    ];
    for (name, stream) in &streams {
        for step in [0u8, 7, 63] {
            let mut seed = vec![step];
            seed.extend_from_slice(stream);
            std::fs::write(format!("{dir}/{name}-{step}"), &seed)?;
        }
    }
    println!("wrote 6 seeds to {dir}");
    Ok(())
}
