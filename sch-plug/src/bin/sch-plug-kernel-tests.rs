//! The plug backend's tests against the real sch_plug, run inside the Debian kernel booted
//! by `tests/kernel-harness/run.sh` (this machine's kernel lacks sch_plug).
//!
//! Protocol of the kernel harness: `--list` prints one test name per line; `NAME` runs one
//! test and prints exactly one line `HARNESS-RESULT NAME pass|fail|skip DETAIL`.
//!
//! Topology per test: namespaces S and R joined by a veth pair (static neighbours, IPv6
//! off); the egress buffer is set up on R's veth, whose *incoming* traffic plays the role of
//! the frames a guest sends into its tap. S sends numbered UDP datagrams; R's socket shows
//! exactly which ones the plug let through.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use sch_plug::ctl::{self, CtlTarget};
use sch_plug::plug::{msg, setup, PlugBuffer};
use sch_plug::testkit::{link_exists, veth_pair, TempNetns};
use sch_plug::{Backend, EgressBuffer, EgressError, EpochError};

/// A test's detail line: what it measured, or why it failed.
type Outcome = anyhow::Result<String>;

const TESTS: &[&str] = &[
    "plug_hold_release_exact",
    "plug_wrong_order_refused",
    "plug_release_indefinite",
    "plug_limit_drops",
    "plug_teardown_clean",
    "plug_adopt_after_restart",
    "plug_ctl_roundtrip",
    "plug_probe_and_auto",
    "plug_bench_buffer_release",
];

struct Pair {
    /// The sender namespace, alive as long as the pair.
    _s: TempNetns,
    r: TempNetns,
    tx: UdpSocket,
    rx: UdpSocket,
    dev: String,
}

const R_ADDR: &str = "10.77.0.2:9000";

async fn pair() -> anyhow::Result<Pair> {
    let s = TempNetns::new().context("netns")?;
    let r = TempNetns::new().context("netns")?;
    let dev = "vr0".to_string();
    veth_pair(&s, "vs0", [10, 77, 0, 1], &r, &dev, [10, 77, 0, 2])
        .await
        .context("veth")?;
    let tx = s.udp("10.77.0.1:0").context("udp")?;
    let rx = r.udp(R_ADDR).context("udp")?;
    rx.set_nonblocking(true)?;
    Ok(Pair {
        _s: s,
        r,
        tx,
        rx,
        dev,
    })
}

impl Pair {
    fn send(&self, seqs: std::ops::Range<u32>) -> anyhow::Result<()> {
        for i in seqs {
            let mut p = b"PLUGTEST".to_vec();
            p.extend_from_slice(&i.to_be_bytes());
            self.tx.send_to(&p, R_ADDR).context("send")?;
        }
        Ok(())
    }

    /// Datagrams already queued on the receiver (does not wait).
    fn drain(&self) -> usize {
        let mut buf = [0u8; 64];
        let mut n = 0;
        while let Ok(len) = self.rx.recv(&mut buf) {
            if len == 12 && &buf[..8] == b"PLUGTEST" {
                n += 1;
            }
        }
        n
    }

    /// Datagrams received within `wait`.
    fn received(&self, wait: Duration) -> Vec<u32> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            match self.rx.recv(&mut buf) {
                Ok(n) if n == 12 && &buf[..8] == b"PLUGTEST" => {
                    out.push(u32::from_be_bytes(buf[8..12].try_into().unwrap()))
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        out
    }
}

fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> anyhow::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(anyhow!("{what}: got {got:?}, want {want:?}"))
    }
}

async fn setup_plug(p: &Pair, limit: u64) -> anyhow::Result<PlugBuffer> {
    PlugBuffer::setup(&p.dev, &p.r.netns(), limit)
        .await
        .context("setup")
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

async fn hold_release_exact() -> Outcome {
    let p = pair().await?;
    let mut b = setup_plug(&p, 1 << 20).await?;
    p.send(0..20)?;
    settle().await;
    let early = p.received(Duration::from_millis(200));
    expect("received while epoch 1 open", early.len(), 0)?;
    b.buffer(1).await?;
    p.send(20..27)?;
    settle().await;
    let st = b.stats().await?;
    let held1 = st.closed.first().map(|e| e.counters.packets).unwrap_or(0);
    expect("held in closed epoch 1", held1, 20)?;
    expect("held in open epoch 2", st.open.packets, 7)?;
    expect(
        "received before release",
        p.received(Duration::from_millis(200)).len(),
        0,
    )?;
    let r1 = b.release(1).await?;
    let got1 = p.received(Duration::from_millis(400));
    expect(
        "released by release(1)",
        got1.clone(),
        (0..20).collect::<Vec<_>>(),
    )?;
    b.buffer(2).await?;
    let r2 = b.release(2).await?;
    let got2 = p.received(Duration::from_millis(400));
    expect(
        "released by release(2)",
        got2.clone(),
        (20..27).collect::<Vec<_>>(),
    )?;
    b.teardown().await?;
    Ok(format!(
        "sent=20+7 held_epoch1={} released_epoch1={} received_epoch1={} held_epoch2={} released_epoch2={} received_epoch2={} before_release=0",
        held1,
        r1.counters.packets,
        got1.len(),
        st.open.packets,
        r2.counters.packets,
        got2.len()
    ))
}

async fn wrong_order_refused() -> Outcome {
    let p = pair().await?;
    let mut b = setup_plug(&p, 1 << 20).await?;
    expect("max closed epochs", b.max_closed_epochs(), 1)?;
    p.send(0..3)?;
    settle().await;
    b.buffer(1).await?;
    p.send(3..5)?;
    settle().await;
    match b.buffer(2).await {
        Err(EgressError::Epoch(EpochError::TooManyClosed {
            epoch: 2,
            unreleased: 1,
            max: 1,
        })) => {}
        other => bail!("buffer(2) before release(1): {other:?}"),
    }
    // The refused close sent nothing: release(1) still releases exactly epoch 1.
    b.release(1).await?;
    let got = p.received(Duration::from_millis(400));
    expect("released by release(1)", got.clone(), vec![0, 1, 2])?;
    b.teardown().await?;
    Ok(format!(
        "buffer(2) refused with TooManyClosed; release(1) released {} of 3",
        got.len()
    ))
}

async fn release_indefinite() -> Outcome {
    let p = pair().await?;
    let mut b = setup_plug(&p, 1 << 20).await?;
    p.send(0..10)?;
    settle().await;
    b.buffer(1).await?;
    p.send(10..15)?;
    settle().await;
    expect(
        "received while held",
        p.received(Duration::from_millis(200)).len(),
        0,
    )?;
    b.release_indefinite().await?;
    let drained = p.received(Duration::from_millis(400));
    expect("drained", drained.clone(), (0..15).collect::<Vec<_>>())?;
    p.send(15..20)?;
    let passed = p.received(Duration::from_millis(400));
    expect(
        "passed while not holding",
        passed.clone(),
        (15..20).collect::<Vec<_>>(),
    )?;
    let st = b.stats().await?;
    expect("flushed count", st.totals.flushed_packets, 15)?;
    b.teardown().await?;
    Ok(format!(
        "held=15 drained={} then passed={} unheld",
        drained.len(),
        passed.len()
    ))
}

async fn limit_drops() -> Outcome {
    let p = pair().await?;
    // Each datagram is 12 + 8 + 20 + 14 = 54 bytes on the wire: 5 fit in 300 bytes.
    let mut b = setup_plug(&p, 300).await?;
    p.send(0..12)?;
    settle().await;
    b.buffer(1).await?;
    let st = b.stats().await?;
    let c = st.closed[0].counters;
    expect("held at limit", c.packets, 5)?;
    expect("dropped at limit", c.dropped_packets, 7)?;
    b.release(1).await?;
    let got = p.received(Duration::from_millis(400));
    expect("released", got.clone(), (0..5).collect::<Vec<_>>())?;
    b.set_limit(1 << 20).await?;
    b.teardown().await?;
    Ok(format!(
        "sent=12 limit=300B held={} dropped={} received={}",
        c.packets,
        c.dropped_packets,
        got.len()
    ))
}

async fn teardown_clean() -> Outcome {
    let p = pair().await?;
    let rtnl = p.r.rtnl()?;
    let before = setup::status(&rtnl, &p.dev).await?;
    expect("ingress before setup", before.ingress, false)?;
    let mut b = setup_plug(&p, 1 << 20).await?;
    let during = setup::status(&rtnl, &p.dev).await?;
    if !during.complete() {
        bail!("layout incomplete after setup: {during}");
    }
    p.send(0..4)?;
    settle().await;
    b.teardown().await?;
    let after = setup::status(&rtnl, &p.dev).await?;
    let ifb_left = link_exists(&rtnl, &msg::ifb_name(&p.dev)).await;
    let prefs = setup::ingress_filter_prefs(&rtnl, &p.dev).await?;
    expect("ifb after teardown", ifb_left, false)?;
    expect("ingress after teardown", after.ingress, false)?;
    expect("filters after teardown", prefs.len(), 0)?;
    // With the layout gone, traffic flows unheld.
    p.send(4..6)?;
    let got = p.received(Duration::from_millis(400));
    expect("unheld after teardown", got, vec![4, 5])?;
    // A second teardown of nothing succeeds.
    let again = setup::teardown(&rtnl, &p.dev).await?;
    expect("second teardown removes nothing", again, Default::default())?;
    Ok("no ifb, no ingress qdisc, no filter left; traffic flows unheld".into())
}

async fn adopt_after_restart() -> Outcome {
    let p = pair().await?;
    let rtnl = p.r.rtnl()?;
    let first = setup_plug(&p, 1 << 20).await?;
    let ifb_index = first.device().ifb_index;
    p.send(0..5)?;
    settle().await;
    drop(first); // the agent "restarts": the kernel layout stays
    let mut second = setup_plug(&p, 1 << 20).await?;
    expect("adopted", second.device().adopted, true)?;
    expect("same ifb", second.device().ifb_index, ifb_index)?;
    let filters = setup::redirect_filter_count(&rtnl, &p.dev).await?;
    expect("redirect filters after second setup", filters, 1)?;
    let st = setup::status(&rtnl, &p.dev).await?;
    if !st.complete() {
        bail!("layout incomplete after adoption: {st}");
    }
    expect(
        "held across the restart",
        p.received(Duration::from_millis(200)).len(),
        0,
    )?;
    let s = second.stats().await?;
    expect("open epoch after adoption", s.open.packets, 5)?;
    second.buffer(1).await?;
    second.release(1).await?;
    let got = p.received(Duration::from_millis(400));
    expect(
        "released after adoption",
        got.clone(),
        (0..5).collect::<Vec<_>>(),
    )?;
    second.teardown().await?;
    let ifb_left = link_exists(&rtnl, &msg::ifb_name(&p.dev)).await;
    expect("ifb after teardown", ifb_left, false)?;
    Ok(format!(
        "setup twice: 1 ifb, {filters} redirect filter; held=5 across restart, released={}",
        got.len()
    ))
}

async fn ctl_roundtrip() -> Outcome {
    let p = pair().await?;
    let t = CtlTarget {
        dev: p.dev.clone(),
        backend: Backend::Auto,
        netns: p.r.netns(),
    };
    let st = ctl::setup(&t, 1 << 20).await?;
    if !st.complete() {
        bail!("ctl setup: {st}");
    }
    p.send(0..3)?;
    settle().await;
    let st = ctl::buffer(&t).await?;
    let queued = st.plug.map(|c| c.backlog_packets).unwrap_or(0);
    expect("queued after buffer", queued, 3)?;
    ctl::release(&t).await?;
    let got = p.received(Duration::from_millis(400));
    expect("released by ctl release", got.clone(), vec![0, 1, 2])?;
    p.send(3..5)?;
    settle().await;
    ctl::release_all(&t).await?;
    let got2 = p.received(Duration::from_millis(400));
    expect("released by ctl release-all", got2, vec![3, 4])?;
    let status = ctl::status(&t).await?;
    let report = ctl::teardown(&t).await?;
    if !(report.filter_removed && report.ingress_removed && report.ifb_removed) {
        bail!("ctl teardown: {report:?}");
    }
    match ctl::buffer(&t).await {
        Err(ctl::CtlError::NotSetUp { .. }) => {}
        other => bail!("buffer after teardown: {other:?}"),
    }
    Ok(format!("status: {status}"))
}

async fn probe_and_auto() -> Outcome {
    let ns = TempNetns::new()?;
    sch_plug::probe_plug(&ns.netns()).await?;
    let kind = sch_plug::resolve(Backend::Auto, &ns.netns()).await?;
    expect("auto backend", kind, sch_plug::BackendKind::Plug)?;
    let rtnl = ns.rtnl()?;
    let tag = std::process::id() % 100_000;
    expect(
        "probe ifb left",
        link_exists(&rtnl, &format!("rprba{tag}")).await,
        false,
    )?;
    Ok("probe found sch_plug, ifb, ingress, u32, mirred; auto -> plug; nothing left".into())
}

async fn bench_buffer_release() -> Outcome {
    let p = pair().await?;
    let mut b = setup_plug(&p, 1 << 20).await?;
    let mut buffer_us = Vec::new();
    let mut release_us = Vec::new();
    let mut received = 0;
    for epoch in 1..=200u64 {
        p.send(0..2)?;
        let t0 = Instant::now();
        b.buffer(epoch).await?;
        let t1 = Instant::now();
        b.release(epoch).await?;
        let t2 = Instant::now();
        buffer_us.push((t1 - t0).as_micros() as u64);
        release_us.push((t2 - t1).as_micros() as u64);
        // Keep the receiver's socket buffer from overflowing (400 datagrams exceed it).
        received += p.drain();
    }
    // Datagrams still in flight at the last close belong to the open epoch: let them go.
    b.release_indefinite().await?;
    received += p.received(Duration::from_millis(500)).len();
    b.teardown().await?;
    expect("datagrams through 200 epochs", received, 400)?;
    let med = |v: &mut Vec<u64>| {
        v.sort_unstable();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let (bm, bp) = med(&mut buffer_us);
    let (rm, rp) = med(&mut release_us);
    Ok(format!(
        "BENCH plug epochs=200 buffer_median_us={bm} buffer_p99_us={bp} release_median_us={rm} release_p99_us={rp} (TCG guest)"
    ))
}

/// The error and its causes on one line, each cause only where the text so far does not
/// already say it (the crate's errors repeat their cause in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

async fn run(name: &str) -> Option<Outcome> {
    Some(match name {
        "plug_hold_release_exact" => hold_release_exact().await,
        "plug_wrong_order_refused" => wrong_order_refused().await,
        "plug_release_indefinite" => release_indefinite().await,
        "plug_limit_drops" => limit_drops().await,
        "plug_teardown_clean" => teardown_clean().await,
        "plug_adopt_after_restart" => adopt_after_restart().await,
        "plug_ctl_roundtrip" => ctl_roundtrip().await,
        "plug_probe_and_auto" => probe_and_auto().await,
        "plug_bench_buffer_release" => bench_buffer_release().await,
        _ => return None,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--list") => {
            for t in TESTS {
                println!("{t}");
            }
        }
        Some(name) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            let outcome = rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(60), run(name)).await });
            let line = match outcome {
                Ok(Some(Ok(detail))) => format!("pass {detail}"),
                Ok(Some(Err(e))) => format!("fail {}", one_line(&e)),
                Ok(None) => format!("fail unknown test {name}"),
                Err(_) => "fail timed out after 60 s".to_string(),
            };
            println!("HARNESS-RESULT {name} {}", line.replace('\n', " "));
        }
        None => {
            eprintln!("usage: sch-plug-kernel-tests --list | TEST");
            std::process::exit(2);
        }
    }
}
