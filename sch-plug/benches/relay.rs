//! Relay benchmark (needs root: real taps in throwaway namespaces). Prints a table:
//! - relay throughput in passthrough and in holding mode (epochs of 64 frames), beside a
//!   plain socket→tap copy (same framing, no epochs) measured in the same run, as ratios;
//! - the cost of buffer + release per epoch on the relay.
//!
//! `cargo bench -p sch-plug --bench relay` (the plug's cost is measured in the kernel
//! harness: `plug_bench_buffer_release`).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::{Duration, Instant};

use sch_plug::relay::frame::{encode, FrameReader};
use sch_plug::relay::{tap, RelayBuffer, RelayConfig};
use sch_plug::testkit::{test_frame, TempNetns};
use sch_plug::EgressBuffer;

const FRAMES: u32 = 100_000;
const LEN: usize = 1514;

fn wire(n: u32) -> Vec<u8> {
    let mut w = Vec::new();
    for i in 0..n {
        encode(&test_frame(0x0800, b"BENCHMRK", i, LEN), &mut w);
    }
    w
}

/// Plain copy: unix socket → frame split → tap write, one thread, no epochs.
fn plain_copy(w: &[u8]) -> Duration {
    let ns = TempNetns::new().unwrap();
    let name = format!("bp{}", std::process::id() % 100_000);
    let fd = tap::create(&name, &ns.netns()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let rtnl = ns.rtnl().unwrap();
        let idx = sch_plug::testkit::link_index(&rtnl, &name).await.unwrap();
        rtnl.request("up", sch_plug::plug::msg::set_link_up(idx))
            .await
            .unwrap();
    });
    let (mut a, mut b) = StdUnixStream::pair().unwrap();
    let data = w.to_vec();
    let writer = std::thread::spawn(move || a.write_all(&data).unwrap());
    let t0 = Instant::now();
    let mut r = FrameReader::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    while n < FRAMES {
        let k = b.read(&mut buf).unwrap();
        r.push(&buf[..k]);
        while let Some(f) = r.next_frame().unwrap() {
            // SAFETY: valid slice, owned tap fd.
            unsafe { libc::write(fd.as_raw_fd(), f.as_ptr().cast(), f.len()) };
            n += 1;
        }
    }
    let d = t0.elapsed();
    writer.join().unwrap();
    d
}

async fn relay_run(w: &[u8], hold_epochs: bool) -> (Duration, Option<Duration>) {
    let ns = TempNetns::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let mut cfg = RelayConfig::new(
        &sock,
        format!("br{}{}", hold_epochs as u8, std::process::id() % 100_000),
    );
    cfg.netns = ns.netns();
    cfg.limit_bytes = 64 << 20;
    let mut relay = RelayBuffer::start(cfg).await.unwrap();
    let mut qemu = tokio::net::UnixStream::connect(&sock).await.unwrap();
    relay.wait_connected().await.unwrap();
    if !hold_epochs {
        relay.release_indefinite().await.unwrap();
    }
    let t0 = Instant::now();
    let mut epoch_cost = Duration::ZERO;
    let mut epochs = 0u32;
    use tokio::io::AsyncWriteExt;
    if hold_epochs {
        // 64 frames per epoch: send, wait until held, close, release.
        let per = 64usize;
        let frame_wire = 4 + LEN;
        for (e, chunk) in w.chunks(per * frame_wire).enumerate() {
            qemu.write_all(chunk).await.unwrap();
            let want = (chunk.len() / frame_wire) as u64;
            while relay.stats().await.unwrap().open.packets < want {
                tokio::task::yield_now().await;
            }
            let t = Instant::now();
            relay.buffer(e as u64 + 1).await.unwrap();
            relay.release(e as u64 + 1).await.unwrap();
            epoch_cost += t.elapsed();
            epochs += 1;
        }
    } else {
        qemu.write_all(w).await.unwrap();
    }
    while relay.relay_counters().to_network_frames < u64::from(FRAMES) {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let d = t0.elapsed();
    relay.teardown().await.unwrap();
    (d, hold_epochs.then(|| epoch_cost / epochs.max(1)))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let w = wire(FRAMES);
    let mb = (FRAMES as f64) * LEN as f64 / 1e6;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let plain = plain_copy(&w);
    let (pass, _) = rt.block_on(relay_run(&w, false));
    let (held, per_epoch) = rt.block_on(relay_run(&w, true));
    let row = |name: &str, d: Duration| {
        let s = d.as_secs_f64();
        println!(
            "{name:<38} {:>10.0} {:>8.1} {:>8.2}",
            FRAMES as f64 / s,
            mb / s,
            plain.as_secs_f64() / s
        );
    };
    println!("{FRAMES} frames of {LEN} bytes, socket -> tap in a fresh namespace");
    println!(
        "{:<38} {:>10} {:>8} {:>8}",
        "path", "frames/s", "MB/s", "vs plain"
    );
    row("plain socket->tap copy", plain);
    row("relay, passthrough", pass);
    row("relay, holding (64-frame epochs)", held);
    let pe = per_epoch.unwrap();
    println!(
        "relay buffer+release per epoch (64 frames): {:.1} us",
        pe.as_secs_f64() * 1e6
    );
}
