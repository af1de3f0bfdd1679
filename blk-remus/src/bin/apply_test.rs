//! Test helper for the crash-consistency test: feeds a file of recorded write events into a
//! backup store (every epoch spilled to disk), then commits the epochs one at a time with a
//! delay after each applied record, so the test can SIGKILL it at any point of a commit.
//!
//! Usage: `blk-remus-apply-test EVENTS STATE_DIR REPLICA DELAY_US WAL_RESET_BYTES`
//! EVENTS holds WAL-framed records (generation 0): `Write` records of epochs 1..=N in order,
//! each epoch ended by a `Commit` record standing for its barrier.
//! Prints `ready` once every epoch is buffered, `durable K` when commit K is durable, and
//! `applied K` when it is applied.

use std::io::{BufReader, Write};
use std::time::Duration;

use anyhow::Context;
use blk_remus::wal::{Record, RecordReader};
use blk_remus::{BackupConfig, BackupStore, DiskEvent};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 6,
        "usage: {} EVENTS STATE_DIR REPLICA DELAY_US WAL_RESET_BYTES",
        args[0]
    );
    let mut cfg = BackupConfig::new(&args[2], &args[3]);
    cfg.memory_limit = 0;
    cfg.apply_delay = Some(Duration::from_micros(args[4].parse().context("DELAY_US")?));
    cfg.wal_reset_bytes = args[5].parse().context("WAL_RESET_BYTES")?;
    let store = BackupStore::open(cfg).context("open backup store")?;
    let f = std::fs::File::open(&args[1]).context("open events")?;
    let mut rd = RecordReader::new(BufReader::new(f), 0);
    let (mut writes, mut bytes, mut last) = (0, 0, store.committed());
    while let Some((rec, _)) = rd.next_record()? {
        match rec {
            Record::Write {
                epoch,
                offset,
                kind,
            } => {
                writes += 1;
                bytes += kind.payload_len();
                store.receive(DiskEvent::Write {
                    epoch,
                    offset,
                    kind,
                })?;
            }
            Record::Commit { epoch } => {
                store.receive(DiskEvent::Barrier {
                    epoch,
                    writes,
                    bytes,
                })?;
                (writes, bytes, last) = (0, 0, epoch);
            }
            other => anyhow::bail!("unexpected record {other:?}"),
        }
    }
    let st = store.status();
    anyhow::ensure!(st.spilled_bytes > 0, "expected spilled epochs: {st:?}");
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    for k in store.committed() + 1..=last {
        store.commit_with(k, |k| {
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "durable {k}");
            let _ = o.flush();
        })?;
        println!("applied {k}");
    }
    Ok(())
}
