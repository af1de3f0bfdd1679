//! `remusctl stream dump` run as a real process on streams written by the encoder, intact,
//! truncated and bit-flipped.

use std::process::{Command, Output};

use remus_stream::fuzzing::sample_stream;
use remus_stream::{Decoded, Decoder, DecoderConfig};

fn dump(path: &std::path::Path, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_remusctl"));
    cmd.args(["stream", "dump", path.to_str().unwrap()]);
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("run remusctl")
}

/// Offsets of the records of `bytes`, as the decoder sees them.
fn record_offsets(bytes: &[u8]) -> Vec<u64> {
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut input = bytes;
    let mut offsets = Vec::new();
    while let Some(item) = dec.decode(&mut input).unwrap() {
        if let Decoded::Record { offset, .. } = item {
            offsets.push(offset);
        }
    }
    offsets
}

#[test]
fn lists_every_record_of_a_valid_stream() {
    let bytes = sample_stream();
    let offsets = record_offsets(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.stream");
    std::fs::write(&path, &bytes).unwrap();
    let out = dump(&path, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("HEADER") && stdout.contains("node alpha, domain web-1"),
        "{stdout}"
    );
    for off in &offsets {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{off} "))),
            "record at {off} not listed:\n{stdout}"
        );
    }
    for t in [
        "PAGE_DATA",
        "XOR_LZ4",
        "DEVICE_STATE",
        "DISK_WRITE",
        "DISK_BARRIER",
        "CHECKPOINT_END",
        "CONTROL",
        "END",
    ] {
        assert!(stdout.contains(t), "{t} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("1 complete checkpoint(s), clean END"),
        "{stdout}"
    );

    let out = dump(&path, true);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    // Header + records + a warning (the sample's epoch 2 has disk writes but never ends)
    // + the OK line.
    assert_eq!(lines.len(), offsets.len() + 3);
    assert_eq!(lines[1]["offset"], offsets[0]);
    let warning = &lines[lines.len() - 2];
    assert_eq!(warning["type"], "WARNING");
    assert!(
        warning["reason"].as_str().unwrap().contains("[2]"),
        "{warning}"
    );
    assert_eq!(lines.last().unwrap()["type"], "OK");
}

#[test]
fn truncated_stream_names_offset_and_reason() {
    let bytes = sample_stream();
    let offsets = record_offsets(&bytes);
    // Cut in the middle of the fifth record.
    let start = offsets[4] as usize;
    let cut = start + 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.stream");
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let out = dump(&path, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // The four complete records are listed, then the error at the fifth's offset.
    for off in &offsets[..4] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{off} "))),
            "{stdout}"
        );
    }
    let err = stdout.lines().last().unwrap();
    assert!(
        err.contains(&format!(
            "at offset {start}: truncated record of type PAGE_DATA: 20 of"
        )),
        "{stdout}"
    );
}

#[test]
fn bit_flipped_stream_names_offset_and_reason() {
    let mut bytes = sample_stream();
    let offsets = record_offsets(&bytes);
    let victim = offsets[6] as usize;
    bytes[victim + 40] ^= 0x04;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flip.stream");
    std::fs::write(&path, &bytes).unwrap();
    let out = dump(&path, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let err = stdout.lines().last().unwrap();
    assert!(
        err.contains(&format!("at offset {victim}: CRC mismatch")),
        "{stdout}"
    );
    // Nothing at or after the damaged record is listed as a record.
    assert!(
        !stdout
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{victim} "))),
        "{stdout}"
    );

    let out = dump(&path, true);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "ERROR");
    assert_eq!(last["offset"], victim as u64);
    assert!(last["reason"].as_str().unwrap().starts_with("CRC mismatch"));
}

#[test]
fn missing_file_and_garbage() {
    let out = Command::new(env!("CARGO_BIN_EXE_remusctl"))
        .args(["stream", "dump", "/nonexistent.stream"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage");
    std::fs::write(&path, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let out = dump(&path, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("at offset 0: bad magic"), "{stdout}");
}
