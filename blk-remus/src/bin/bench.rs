//! Benchmark: 4 KiB write throughput through the replicated NBD path, beside the same
//! `qemu-img bench` run on a raw file and on our NBD server without replication, in one run.
//!
//! Replicated path: qemu-img → NBD (unix socket) → `Primary` (local raw image + forward) →
//! in-process channel → `BackupStore` (memory backlog), with an engine loop that runs
//! `barrier(k)`, `commit(k)` (WAL append + fdatasync + apply to the replica) and
//! `acknowledged(k)` every `--interval-ms`. The "scattered" pattern is qemu-img bench with a
//! stride of 4099 blocks, which (being odd) visits every block of the image in a scattered
//! order; qemu-img bench has no random mode.
//!
//! Usage: `blk-remus-bench [--dir DIR] [--size-mib N] [--count N] [--depth N] [--interval-ms N]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blk_remus::nbd::{Export, NbdServer};
use blk_remus::{BackupConfig, BackupStore, BlockBackend, FileBackend, Primary, PrimaryConfig};

struct Opts {
    dir: PathBuf,
    size_mib: u64,
    count: u64,
    depth: u64,
    interval_ms: u64,
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        dir: std::env::temp_dir(),
        size_mib: 256,
        count: 40000,
        depth: 16,
        interval_ms: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--dir" => o.dir = v.into(),
            "--size-mib" => o.size_mib = v.parse()?,
            "--count" => o.count = v.parse()?,
            "--depth" => o.depth = v.parse()?,
            "--interval-ms" => o.interval_ms = v.parse()?,
            _ => bail!("unknown option {a}"),
        }
    }
    Ok(o)
}

/// Runs `qemu-img bench` and returns the seconds it reports.
fn qemu_bench(target: &str, step: u64, o: &Opts) -> anyhow::Result<f64> {
    let out = Command::new("qemu-img")
        .args(["bench", "-f", "raw", "-w", "-s", "4096"])
        .args(["-S", &step.to_string()])
        .args(["-c", &o.count.to_string(), "-d", &o.depth.to_string()])
        .arg(target)
        .output()
        .context("run qemu-img bench")?;
    let so = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench {target}: {so}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let secs = so
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .with_context(|| format!("no timing in qemu-img output: {so}"))?;
    Ok(secs)
}

fn fresh(path: &Path, size: u64) -> anyhow::Result<()> {
    FileBackend::create(path, size)?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = parse()?;
    let size = o.size_mib << 20;
    let work = o
        .dir
        .join(format!("blk-remus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let _cleanup = Cleanup(work.clone());
    let raw = work.join("raw.img");
    let plain = work.join("plain.img");
    let pimg = work.join("primary.img");
    let rimg = work.join("replica.img");
    let sock = work.join("nbd.sock");

    // Servers: "plain" (NBD over a raw file) and "vm" (replicated).
    fresh(&plain, size)?;
    fresh(&pimg, size)?;
    fresh(&rimg, size)?;
    let primary = Arc::new(Primary::new(
        Arc::new(FileBackend::open(&pimg, false)?),
        &PrimaryConfig::default(),
    )?);
    let backup = Arc::new(BackupStore::open(BackupConfig::new(
        work.join("state"),
        &rimg,
    ))?);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    primary.connect(Arc::new(tx));
    let b2 = backup.clone();
    let pump = tokio::task::spawn_blocking(move || {
        while let Some(ev) = rx.blocking_recv() {
            b2.receive(ev)?;
        }
        Ok::<_, blk_remus::BackupError>(())
    });
    let server = NbdServer::new(vec![
        Export {
            name: "plain".into(),
            description: String::new(),
            backend: Arc::new(FileBackend::open(&plain, false)?),
        },
        Export {
            name: "vm".into(),
            description: String::new(),
            backend: primary.clone() as Arc<dyn BlockBackend>,
        },
    ]);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(async move {
        server
            .serve_unix_listener(listener, async {
                let _ = stop_rx.await;
            })
            .await
    });

    // The engine: barrier + commit + ack every interval.
    let stop_engine = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p2, b3, s2) = (primary.clone(), backup.clone(), stop_engine.clone());
    let interval = Duration::from_millis(o.interval_ms);
    let engine = tokio::spawn(async move {
        let mut k = 1;
        let mut commit_times = Vec::new();
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(interval).await;
            p2.barrier_async(k).await?;
            while b3.status().complete < k {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let r = b3.commit_async(k).await?;
            commit_times.push(r.durable_after);
            p2.acknowledged(k);
            k += 1;
        }
        Ok::<_, anyhow::Error>((k - 1, commit_times))
    });

    let url = |e: &str| format!("nbd+unix:///{e}?socket={}", sock.display());
    let patterns = [("sequential", 4096u64), ("scattered", 4096 * 4099)];
    let mut rows = Vec::new();
    for (name, step) in patterns {
        fresh(&raw, size)?;
        let t_raw = qemu_bench(raw.to_str().context("path")?, step, &o)?;
        let t_plain = qemu_bench(&url("plain"), step, &o)?;
        let t_repl = qemu_bench(&url("vm"), step, &o)?;
        rows.push((name, t_raw, t_plain, t_repl));
    }
    stop_engine.store(true, std::sync::atomic::Ordering::Relaxed);
    let (epochs, commits) = engine.await??;
    let _ = stop_tx.send(());
    srv.await??;
    primary.disconnect()?;
    pump.await??;
    // Final: commit what is left and check the replica caught up.
    let st = backup.status();
    if st.complete > backup.committed() {
        backup.commit(st.complete)?;
    }

    let iops = |t: f64| o.count as f64 / t;
    println!(
        "blk-remus write benchmark: {} x 4 KiB writes, queue depth {}, image {} MiB, commit every {} ms",
        o.count, o.depth, o.size_mib, o.interval_ms
    );
    println!(
        "{:<11} | {:>12} | {:>12} | {:>12} | {:>10} | {:>10}",
        "pattern", "raw file", "NBD plain", "NBD+repl", "repl/raw", "repl/plain"
    );
    println!(
        "{:-<11}-+-{:->12}-+-{:->12}-+-{:->12}-+-{:->10}-+-{:->10}",
        "", "", "", "", "", ""
    );
    for (name, r, p, x) in &rows {
        println!(
            "{:<11} | {:>8.0} IOPS | {:>8.0} IOPS | {:>8.0} IOPS | {:>10.2} | {:>10.2}",
            name,
            iops(*r),
            iops(*p),
            iops(*x),
            iops(*x) / iops(*r),
            iops(*x) / iops(*p)
        );
    }
    let mut c: Vec<Duration> = commits;
    c.sort();
    if !c.is_empty() {
        println!(
            "epochs committed: {epochs}; commit durable-after (WAL fdatasync) p50 {:?}, max {:?}",
            c[c.len() / 2],
            c[c.len() - 1]
        );
    }
    let identical = std::fs::read(&pimg)? == std::fs::read(&rimg)?;
    println!("replica identical to primary after final commit: {identical}");
    if !identical {
        bail!("replica differs from primary");
    }
    Ok(())
}

/// Removes the work directory on exit.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
