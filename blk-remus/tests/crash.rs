//! SIGKILL of the backup at random points while it commits: after restart and WAL replay the
//! replica must equal exactly the image of one epoch boundary, and never an epoch older than
//! one already reported durable.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blk_remus::wal::Record;
use blk_remus::{BackupConfig, BackupStore, WriteKind};
use bytes::Bytes;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 4 << 20;
const EPOCHS: u64 = 6;
const WRITES: usize = 40;
const TRIALS: usize = 24;

/// Generates the events file and returns the expected image after each epoch (index 0 = base).
fn workload(rng: &mut rand::rngs::StdRng, events: &Path, base: &[u8]) -> Vec<Vec<u8>> {
    let mut images = vec![base.to_vec()];
    let mut img = base.to_vec();
    let mut enc = Vec::new();
    for epoch in 1..=EPOCHS {
        for _ in 0..WRITES {
            let len = rng.random_range(1..=65536u64);
            let offset = rng.random_range(0..SIZE - len);
            let range = offset as usize..(offset + len) as usize;
            let kind = match rng.random_range(0..10) {
                0 => {
                    img[range].fill(0);
                    WriteKind::Zeroes { len }
                }
                1 => {
                    img[range].fill(0);
                    WriteKind::Trim { len }
                }
                _ => {
                    let mut d = vec![0u8; len as usize];
                    rng.fill(&mut d[..]);
                    img[range].copy_from_slice(&d);
                    WriteKind::Data(Bytes::from(d))
                }
            };
            Record::Write {
                epoch,
                offset,
                kind,
            }
            .encode(0, &mut enc);
        }
        Record::Commit { epoch }.encode(0, &mut enc);
        images.push(img.clone());
    }
    std::fs::write(events, enc).unwrap();
    images
}

#[test]
fn sigkill_during_commit_leaves_an_epoch_boundary() {
    let bin = env!("CARGO_BIN_EXE_blk-remus-apply-test");
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed),
    );
    let mut seen = std::collections::BTreeMap::<u64, usize>::new();
    // Kills that hit after a commit was durable but before its apply finished.
    let mut mid_apply = 0;
    for trial in 0..TRIALS {
        let dir = tempfile::tempdir().unwrap();
        let replica = dir.path().join("replica.img");
        let state = dir.path().join("state");
        let events = dir.path().join("events");
        let mut base = vec![0u8; SIZE as usize];
        rng.fill(&mut base[..]);
        std::fs::write(&replica, &base).unwrap();
        let images = workload(&mut rng, &events, &base);
        // Small WAL rewind threshold so header rotations happen under the kill too.
        let wal_reset = if trial % 2 == 0 { 1 << 20 } else { 256 << 20 };
        let mut child = Command::new(bin)
            .arg(&events)
            .arg(&state)
            .arg(&replica)
            .arg("1500")
            .arg(wal_reset.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        // Wait for "ready", then kill at a random point of the ~400 ms of commits.
        let t0 = Instant::now();
        while !lines.lock().unwrap().iter().any(|l| l == "ready") {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "helper never got ready"
            );
            if let Some(st) = child.try_wait().unwrap() {
                panic!("helper exited early: {st}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..450_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let durable = lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                l.strip_prefix("durable ")
                    .map(|k| k.parse::<u64>().unwrap())
            })
            .max()
            .unwrap_or(0);
        let applied = lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                l.strip_prefix("applied ")
                    .map(|k| k.parse::<u64>().unwrap())
            })
            .max()
            .unwrap_or(0);
        if durable > applied {
            mid_apply += 1;
        }
        // Restart: open replays the WAL.
        let store = BackupStore::open(BackupConfig::new(&state, &replica)).unwrap();
        let committed = store.committed();
        drop(store);
        let got = std::fs::read(&replica).unwrap();
        let matching: Vec<usize> = (0..images.len()).filter(|&i| images[i] == got).collect();
        println!("trial {trial}: durable before kill {durable}, committed after replay {committed}, image matches epochs {matching:?}");
        assert!(
            matching.contains(&(committed as usize)),
            "trial {trial}: replica is not the image of committed epoch {committed} (matches {matching:?})"
        );
        assert!(
            committed >= durable,
            "trial {trial}: epoch {durable} was durable but replay says {committed}"
        );
        assert!(
            committed <= durable + 1,
            "trial {trial}: committed {committed} beyond durable {durable} + 1"
        );
        *seen.entry(committed).or_default() += 1;
    }
    println!(
        "committed epochs seen after kills: {seen:?}; kills in the middle of an apply: {mid_apply}"
    );
    assert!(
        mid_apply >= TRIALS / 4,
        "too few kills landed mid-apply: {mid_apply}"
    );
    assert!(
        seen.len() >= 3,
        "kills should land in different epochs: {seen:?}"
    );
}
