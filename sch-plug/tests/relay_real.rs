//! The relay backend against this machine's kernel: a real tap in a real namespace, a frame
//! generator speaking QEMU's stream protocol on the unix socket, and a packet socket on the
//! tap observing exactly what reaches the network.

use std::time::Duration;

use sch_plug::relay::{ConnState, RelayBuffer, RelayConfig};
use sch_plug::testkit::{frame_seq, link_index, test_frame, PacketSocket, TempNetns};
use sch_plug::{EgressBuffer, EgressError, EpochError, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MARK: &[u8; 8] = b"RELAYTST";
const IPV4: u16 = 0x0800;
const IPV6: u16 = 0x86dd;
const ARP: u16 = 0x0806;

struct Rig {
    _ns: TempNetns,
    relay: RelayBuffer,
    qemu: UnixStream,
    sniff: PacketSocket,
    _dir: tempfile::TempDir,
}

async fn rig(tag: &str, max_closed: usize, limit: u64) -> Rig {
    let ns = TempNetns::new().expect("netns");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net0.sock");
    let tap = format!("rt{tag}{}", std::process::id() % 100_000);
    let mut cfg = RelayConfig::new(&socket, &tap);
    cfg.netns = ns.netns();
    cfg.max_closed_epochs = max_closed;
    cfg.limit_bytes = limit;
    let mut relay = RelayBuffer::start(cfg).await.expect("relay start");
    assert_eq!(relay.connection(), ConnState::Waiting);
    let qemu = UnixStream::connect(&socket).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), relay.wait_connected())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(relay.connection(), ConnState::Connected);
    let rtnl = ns.rtnl().unwrap();
    let idx = link_index(&rtnl, &tap).await.unwrap();
    assert_eq!(idx, relay.tap_index());
    let sniff = PacketSocket::open(&ns.netns(), idx).unwrap();
    Rig {
        _ns: ns,
        relay,
        qemu,
        sniff,
        _dir: dir,
    }
}

async fn send(qemu: &mut UnixStream, frames: &[Vec<u8>]) {
    let mut wire = Vec::new();
    for f in frames {
        sch_plug::relay::frame::encode(f, &mut wire);
    }
    qemu.write_all(&wire).await.unwrap();
}

/// Waits until the relay has taken `n` frames into its open epoch.
async fn until_open(relay: &mut RelayBuffer, n: u64) {
    for _ in 0..500 {
        let s = relay.stats().await.unwrap();
        if s.open.packets + s.open.dropped_packets >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "relay never saw {n} frames: {:?}",
        relay.stats().await.unwrap()
    );
}

async fn observed(sniff: &PacketSocket, wait_ms: u64) -> Vec<u32> {
    let frames = tokio::task::block_in_place(|| {
        sniff.collect(Duration::from_millis(wait_ms), |f| {
            frame_seq(f, MARK).is_some()
        })
    })
    .unwrap();
    frames.iter().filter_map(|f| frame_seq(f, MARK)).collect()
}

fn mixed(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range
        .map(|i| test_frame([IPV4, IPV6, ARP][i as usize % 3], MARK, i, 60 + i as usize))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_every_frame_type_until_its_epoch_is_released() {
    let mut r = rig("e", 4, 1 << 20).await;
    // Epoch 1: frames 0..6 (IPv4, IPv6, ARP twice each).
    send(&mut r.qemu, &mixed(0..6)).await;
    until_open(&mut r.relay, 6).await;
    assert!(
        observed(&r.sniff, 150).await.is_empty(),
        "nothing leaves while epoch 1 is open"
    );
    r.relay.buffer(1).await.unwrap();
    // Epoch 2: frames 6..9.
    send(&mut r.qemu, &mixed(6..9)).await;
    until_open(&mut r.relay, 3).await;
    r.relay.buffer(2).await.unwrap();
    assert!(
        observed(&r.sniff, 150).await.is_empty(),
        "nothing leaves before release"
    );
    let stats = r.relay.stats().await.unwrap();
    let held: Vec<u64> = stats.closed.iter().map(|e| e.counters.packets).collect();
    println!("held per closed epoch: {held:?}");
    assert_eq!(held, vec![6, 3]);

    let s1 = r.relay.release(1).await.unwrap();
    let seen = observed(&r.sniff, 300).await;
    println!(
        "release(1): relay says {} frames, tap saw {:?}",
        s1.counters.packets, seen
    );
    assert_eq!(
        seen,
        (0..6).collect::<Vec<_>>(),
        "exactly epoch 1, in order"
    );
    assert_eq!(s1.counters.packets, 6);

    let s2 = r.relay.release(2).await.unwrap();
    let seen = observed(&r.sniff, 300).await;
    println!(
        "release(2): relay says {} frames, tap saw {:?}",
        s2.counters.packets, seen
    );
    assert_eq!(seen, vec![6, 7, 8]);
    let c = r.relay.relay_counters();
    assert_eq!(c.to_network_frames, 9);
    r.relay.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_order_is_refused_and_changes_nothing() {
    let mut r = rig("o", 2, 1 << 20).await;
    send(&mut r.qemu, &mixed(0..2)).await;
    until_open(&mut r.relay, 2).await;
    r.relay.buffer(10).await.unwrap();
    r.relay.buffer(11).await.unwrap();
    let e = r.relay.buffer(12).await.unwrap_err();
    assert!(
        matches!(
            e,
            EgressError::Epoch(EpochError::TooManyClosed {
                epoch: 12,
                unreleased: 10,
                max: 2
            })
        ),
        "{e}"
    );
    let e = r.relay.release(11).await.unwrap_err();
    assert!(
        matches!(
            e,
            EgressError::Epoch(EpochError::NotOldest {
                epoch: 11,
                oldest: 10
            })
        ),
        "{e}"
    );
    assert!(observed(&r.sniff, 150).await.is_empty());
    r.relay.release(10).await.unwrap();
    assert_eq!(observed(&r.sniff, 300).await, vec![0, 1]);
    r.relay.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_drops_are_counted_and_indefinite_passes() {
    // 5 frames of 100 bytes fit in 550; frames 5..8 are dropped.
    let mut r = rig("l", 2, 550).await;
    let frames: Vec<Vec<u8>> = (0..8).map(|i| test_frame(IPV4, MARK, i, 100)).collect();
    send(&mut r.qemu, &frames).await;
    until_open(&mut r.relay, 8).await;
    r.relay.buffer(1).await.unwrap();
    let s = r.relay.stats().await.unwrap();
    println!(
        "limit 550: held {} dropped {}",
        s.closed[0].counters.packets, s.closed[0].counters.dropped_packets
    );
    assert_eq!(
        (
            s.closed[0].counters.packets,
            s.closed[0].counters.dropped_packets
        ),
        (5, 3)
    );
    assert_eq!(s.totals.held.dropped_packets, 3);
    r.relay.release_indefinite().await.unwrap();
    assert_eq!(observed(&r.sniff, 300).await, vec![0, 1, 2, 3, 4]);
    assert_eq!(r.relay.stats().await.unwrap().mode, Mode::Passthrough);
    // Passthrough: frames go out at once, no buffer call needed.
    send(&mut r.qemu, &[test_frame(ARP, MARK, 100, 60)]).await;
    assert_eq!(observed(&r.sniff, 500).await, vec![100]);
    r.relay.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_guest_passes_straight_through() {
    let mut r = rig("g", 1, 1 << 20).await;
    // Holding, and still the other direction flows.
    let f = test_frame(IPV4, MARK, 42, 80);
    r.sniff.send(&f).unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut buf = vec![0u8; 4096];
    while frame_seq_in(&got).is_none() && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), r.qemu.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(
        frame_seq_in(&got),
        Some(42),
        "QEMU got the frame from the network"
    );
    assert!(r.relay.relay_counters().to_guest_frames >= 1);
    r.relay.teardown().await.unwrap();
}

/// Finds a test frame in stream bytes (length-prefixed frames).
fn frame_seq_in(stream: &[u8]) -> Option<u32> {
    let mut rd = sch_plug::relay::frame::FrameReader::new();
    rd.push(stream);
    while let Ok(Some(f)) = rd.next_frame() {
        if let Some(s) = frame_seq(f, MARK) {
            return Some(s);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_removes_the_tap_and_socket() {
    let ns = TempNetns::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let tap = format!("rtt{}", std::process::id() % 100_000);
    let mut cfg = RelayConfig::new(&socket, &tap);
    cfg.netns = ns.netns();
    let mut relay = RelayBuffer::start(cfg.clone()).await.unwrap();
    // A second relay on the same live socket is refused.
    let mut cfg2 = cfg.clone();
    cfg2.tap = format!("rtu{}", std::process::id() % 100_000);
    let e = RelayBuffer::start(cfg2)
        .await
        .err()
        .expect("second relay must fail");
    assert!(e.to_string().contains("in use"), "{e}");
    let rtnl = ns.rtnl().unwrap();
    assert!(sch_plug::testkit::link_exists(&rtnl, &tap).await);
    relay.teardown().await.unwrap();
    assert!(!socket.exists());
    assert!(
        !sch_plug::testkit::link_exists(&rtnl, &tap).await,
        "tap gone after teardown"
    );
    assert!(relay.buffer(1).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_right_after_one_was_dropped_gets_the_tap() {
    let ns = TempNetns::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tap = format!("rtd{}", std::process::id() % 100_000);
    let mut cfg = RelayConfig::new(dir.path().join("a.sock"), &tap);
    cfg.netns = ns.netns();
    // Dropped, not torn down (a killed VM's runtime): its tasks close the tap later.
    for round in 0..5 {
        let relay = RelayBuffer::start(cfg.clone())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        drop(relay);
    }
    // A tap held by a live relay is still refused (after the wait), naming the tap.
    let held = RelayBuffer::start(cfg.clone()).await.unwrap();
    let mut other = cfg.clone();
    other.socket_path = dir.path().join("b.sock");
    let e = RelayBuffer::start(other)
        .await
        .err()
        .expect("a tap in use must be refused");
    assert!(
        e.to_string().contains(&tap) && e.to_string().contains("busy"),
        "{e}"
    );
    drop(held);
}
