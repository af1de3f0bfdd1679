//! Two real detectors on loopback, each link through a UDP relay the test can cut.
//!
//! Timing is printed, not asserted tightly: the bounds below are generous enough for a
//! loaded 2-core machine. The one exact assertion is the safety one: the detector never
//! declares the peer lost before it has been silent for the full timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remus_ha::heartbeat::{
    Beat, Detector, DomainView, HeartbeatConfig, Link, PeerLiveness, DOMAIN_PAYLOAD_LEN,
};
use remus_ha::{HaKey, PeerKeys};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

fn key() -> HaKey {
    HaKey::derive(b"heartbeat test key, at least 32 bytes long").unwrap()
}

/// A loopback address unlikely to be used by another test process at the same time.
fn lo(i: u8) -> std::net::IpAddr {
    let b = (std::process::id() % 200) as u8 + 20;
    std::net::IpAddr::from([127, b, i, 1])
}

/// A UDP relay between two detectors: datagrams arriving on side A go out of side B to the
/// last address heard on side B, and back. `cut` drops everything (a partitioned link);
/// dropping the relay closes its sockets.
struct Relay {
    a: SocketAddr,
    b: SocketAddr,
    cut: Arc<AtomicBool>,
    /// The last datagram that crossed from A to B (for the replay test).
    last_a_to_b: Arc<Mutex<Option<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn new(ip: std::net::IpAddr) -> Relay {
        let sa = Arc::new(UdpSocket::bind((ip, 0)).await.unwrap());
        let sb = Arc::new(UdpSocket::bind((ip, 0)).await.unwrap());
        let (a, b) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let last = Arc::new(Mutex::new(None));
        let (c, l) = (cut.clone(), last.clone());
        let task = tokio::spawn(async move {
            let mut peer_a: Option<SocketAddr> = None;
            let mut peer_b: Option<SocketAddr> = None;
            let mut ba = [0u8; 2048];
            let mut bb = [0u8; 2048];
            loop {
                tokio::select! {
                    Ok((n, from)) = sa.recv_from(&mut ba) => {
                        peer_a = Some(from);
                        *l.lock().unwrap() = Some(ba[..n].to_vec());
                        if let (false, Some(to)) = (c.load(Ordering::Relaxed), peer_b) {
                            let _ = sb.send_to(&ba[..n], to).await;
                        }
                    }
                    Ok((n, from)) = sb.recv_from(&mut bb) => {
                        peer_b = Some(from);
                        if let (false, Some(to)) = (c.load(Ordering::Relaxed), peer_a) {
                            let _ = sa.send_to(&bb[..n], to).await;
                        }
                    }
                }
            }
        });
        Relay {
            a,
            b,
            cut,
            last_a_to_b: last,
            task,
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Pair {
    a: Detector,
    b: Detector,
    relays: Vec<Relay>,
}

async fn pair(links: u8, interval: Duration, timeout: Duration) -> Pair {
    let shared = PeerKeys::shared(key());
    pair_keyed(links, interval, timeout, shared.clone(), shared).await
}

async fn pair_keyed(
    links: u8,
    interval: Duration,
    timeout: Duration,
    keys_a: PeerKeys,
    keys_b: PeerKeys,
) -> Pair {
    let mut relays = Vec::new();
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    for i in 0..links {
        let r = Relay::new(lo(i + 1)).await;
        la.push(Link {
            local: SocketAddr::new(lo(i + 1), 0),
            remote: r.a,
        });
        lb.push(Link {
            local: SocketAddr::new(lo(i + 1), 0),
            remote: r.b,
        });
        relays.push(r);
    }
    let cfg = |node: &str, peer: &str, links, keys| HeartbeatConfig {
        interval,
        timeout,
        ..HeartbeatConfig::new(node, peer, links, keys)
    };
    let a = Detector::start(cfg("alpha", "beta", la, keys_a))
        .await
        .unwrap();
    let b = Detector::start(cfg("beta", "alpha", lb, keys_b))
        .await
        .unwrap();
    Pair { a, b, relays }
}

/// Waits until `pred` holds for the detector's verdict; returns it and when it was seen.
async fn wait_for(
    d: &Detector,
    limit: Duration,
    pred: impl Fn(&PeerLiveness) -> bool,
) -> (PeerLiveness, Instant) {
    let mut rx = d.liveness();
    timeout(limit, async {
        loop {
            let v = *rx.borrow_and_update();
            if pred(&v) {
                return (v, Instant::now());
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("verdict not reached in {limit:?}; now {:?}", *rx.borrow()))
}

fn all_links_up(v: &PeerLiveness, n: usize) -> bool {
    matches!(v, PeerLiveness::Alive { links_up, .. } if *links_up == n)
}

/// Asserts that the verdict never becomes Lost for `dur`.
async fn never_lost_for(d: &Detector, dur: Duration) {
    let mut rx = d.liveness();
    let end = Instant::now() + dur;
    loop {
        assert!(!rx.borrow_and_update().is_lost(), "peer declared lost");
        match tokio::time::timeout_at(end, rx.changed()).await {
            Err(_) => return,
            Ok(r) => r.unwrap(),
        }
    }
}

const IV: Duration = Duration::from_millis(100);
const TO: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_link_cut_is_not_a_lost_peer_all_cut_is_and_recovery_is_seen() {
    let p = pair(3, IV, TO).await;
    wait_for(&p.a, Duration::from_secs(5), |v| all_links_up(v, 3)).await;
    wait_for(&p.b, Duration::from_secs(5), |v| all_links_up(v, 3)).await;

    // One link partitioned, another closed outright: the peer stays alive.
    p.relays[0].set_cut(true);
    let mut relays = p.relays;
    let closed = relays.remove(1);
    drop(closed);
    wait_for(&p.b, Duration::from_secs(5), |v| {
        matches!(v, PeerLiveness::Alive { links_up: 1, .. })
    })
    .await;
    never_lost_for(&p.b, TO * 3).await;
    let s = p.b.stats();
    assert!(!s.links[0].up && !s.links[1].up && s.links[2].up, "{s:#?}");
    assert_eq!(s.links[0].went_down, 1);
    assert_eq!(s.losses, 0);
    // The peer was never silent as long as the timeout: the closest call is below it, and
    // each link's longest gap is at least one interval.
    assert!(s.longest_silence < TO, "{:?}", s.longest_silence);
    assert!(
        s.links[2].longest_gap >= IV / 2,
        "{:?}",
        s.links[2].longest_gap
    );

    // The last link cut: lost within timeout (+ interval + generous slack).
    relays[1].set_cut(true);
    let cut_at = Instant::now();
    let (v, seen) = wait_for(&p.b, Duration::from_secs(5), PeerLiveness::is_lost).await;
    let PeerLiveness::Lost {
        detected_after,
        declared_at,
        since,
    } = v
    else {
        unreachable!()
    };
    println!(
        "3 links, interval {IV:?}, timeout {TO:?}: last heard -> declared {detected_after:?}; \
         cut -> declared {:?}; declared -> watcher woke {:?}",
        declared_at - cut_at,
        seen - declared_at
    );
    assert!(
        detected_after >= TO,
        "declared after only {detected_after:?}"
    );
    assert_eq!(declared_at - since, detected_after);
    assert!(declared_at - cut_at < TO + IV + Duration::from_secs(1));
    // Both sides see it.
    wait_for(&p.a, Duration::from_secs(5), PeerLiveness::is_lost).await;

    // Healing one link brings the peer back.
    relays[0].set_cut(false);
    wait_for(&p.b, Duration::from_secs(5), |v| {
        matches!(v, PeerLiveness::Alive { .. })
    })
    .await;
    let s = p.b.stats();
    assert_eq!((s.losses, s.recoveries), (1, 1), "{s:#?}");
    assert!(s.last_detection.unwrap() >= TO);
    // The healed link was silent for about a second: that shows as missed heartbeats, and
    // as its longest gap; the silence that ended in a loss is not a "close call".
    assert!(s.links[0].missed_estimate >= 5, "{:#?}", s.links[0]);
    assert!(s.links[0].longest_gap >= TO, "{:?}", s.links[0].longest_gap);
    assert!(s.longest_silence < TO, "{:?}", s.longest_silence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_accepted_and_counted() {
    let r = Relay::new(lo(7)).await;
    let cfg = |node: &str, peer: &str, remote| HeartbeatConfig {
        interval: IV,
        timeout: TO,
        ..HeartbeatConfig::new(
            node,
            peer,
            vec![Link {
                local: SocketAddr::new(lo(7), 0),
                remote,
            }],
            PeerKeys::shared(key()),
        )
    };
    let b = Detector::start(cfg("beta", "alpha", r.b)).await.unwrap();
    let a = Detector::start(cfg("alpha", "beta", r.a)).await.unwrap();
    wait_for(&b, Duration::from_secs(5), |v| all_links_up(v, 1)).await;
    // Let the first incarnation run a while: a restart shows as the peer's uptime going
    // backwards, which needs its last beat to be older than the new one's first (a loaded
    // machine can delay that first beat by milliseconds).
    sleep(IV * 5).await;
    // Alpha's agent restarts (new process state, new sequence source, new port): its
    // sequence numbers start from its clock, above everything it sent before, so beta
    // accepts them without any reset rule a replay could abuse.
    a.shutdown().await;
    let a = Detector::start(cfg("alpha", "beta", r.a)).await.unwrap();
    let s = timeout(Duration::from_secs(5), async {
        loop {
            let s = b.stats();
            if s.peer_restarts == 1 {
                return s;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{:#?}", b.stats()));
    assert_eq!(s.links[0].dropped_replay, 0);
    never_lost_for(&b, TO * 2).await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_traffic_counts_as_proof_of_life() {
    let p = pair(1, IV, TO).await;
    wait_for(&p.b, Duration::from_secs(5), |v| all_links_up(v, 1)).await;
    p.relays[0].set_cut(true);
    let probe = p.b.traffic_probe();
    // Checkpoint data keeps arriving while the heartbeat link is dead.
    let feeding = tokio::spawn(async move {
        for _ in 0..30 {
            probe.seen();
            sleep(Duration::from_millis(50)).await;
        }
    });
    wait_for(&p.b, Duration::from_secs(5), |v| {
        matches!(v, PeerLiveness::Alive { links_up: 0, .. })
    })
    .await;
    never_lost_for(&p.b, Duration::from_millis(1200)).await;
    feeding.await.unwrap();
    let (v, _) = wait_for(&p.b, Duration::from_secs(5), PeerLiveness::is_lost).await;
    println!("replication stopped: {v:?}");
    assert!(p.b.stats().replication_last_seen.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_and_replayed_datagrams_are_dropped_and_counted() {
    let p = pair(1, IV, TO).await;
    wait_for(&p.b, Duration::from_secs(5), |v| all_links_up(v, 1)).await;
    // The peer's view travels with the heartbeats.
    let payload: [u8; DOMAIN_PAYLOAD_LEN] = std::array::from_fn(|i| i as u8 + 41);
    p.a.set_view(vec![DomainView {
        domain: "web".into(),
        payload,
    }])
    .unwrap();
    let mut pv = p.b.peer_view();
    timeout(Duration::from_secs(5), async {
        while pv
            .borrow_and_update()
            .as_ref()
            .is_none_or(|v| v.domains.is_empty())
        {
            pv.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    let seen = pv.borrow().as_ref().unwrap().domains[0].clone();
    assert_eq!((seen.domain.as_str(), seen.payload), ("web", payload));

    // Stop the real traffic so only the test's datagrams reach B.
    p.relays[0].set_cut(true);
    let target = p.b.stats().links[0].link.local;
    let attacker = UdpSocket::bind((lo(1), 0)).await.unwrap();
    let forged = Beat {
        node: "alpha".into(),
        seq: u64::MAX - 1,
        uptime_us: 1,
        domains: vec![],
    };
    let wrong_key = HaKey::derive(b"another key of at least thirty-two bytes").unwrap();
    let recorded = p.relays[0].last_a_to_b.lock().unwrap().clone().unwrap();
    let mut tampered = recorded.clone();
    tampered[10] ^= 1;
    let sends: Vec<Vec<u8>> = vec![
        forged.encode(&wrong_key),
        tampered,
        Beat {
            node: "mallory".into(),
            ..forged.clone()
        }
        .encode(&key()),
        // Our own heartbeat reflected back.
        Beat {
            node: "beta".into(),
            ..forged.clone()
        }
        .encode(&key()),
        recorded.clone(),
        recorded,
        b"not a heartbeat".to_vec(),
    ];
    for d in &sends {
        attacker.send_to(d, target).await.unwrap();
    }
    let want = |s: &remus_ha::heartbeat::LinkStats| {
        (s.dropped_bad_tag, s.dropped_unknown_node, s.dropped_replay)
    };
    let got = timeout(Duration::from_secs(5), async {
        loop {
            let s = p.b.stats().links[0].clone();
            if want(&s) == (3, 2, 2) {
                return s;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("counters: {:#?}", p.b.stats().links[0]));
    println!("dropped: {got:#?}");
    // None of it counts as proof of life.
    let (v, _) = wait_for(&p.b, Duration::from_secs(5), PeerLiveness::is_lost).await;
    if let PeerLiveness::Lost { detected_after, .. } = v {
        assert!(detected_after >= TO);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_speaks_is_lost_after_the_timeout_from_start() {
    let silent = UdpSocket::bind((lo(9), 0)).await.unwrap();
    let cfg = HeartbeatConfig {
        interval: IV,
        timeout: TO,
        ..HeartbeatConfig::new(
            "beta",
            "alpha",
            vec![Link {
                local: SocketAddr::new(lo(9), 0),
                remote: silent.local_addr().unwrap(),
            }],
            PeerKeys::shared(key()),
        )
    };
    let started = Instant::now();
    let d = Detector::start(cfg).await.unwrap();
    assert_eq!(*d.liveness().borrow(), PeerLiveness::Starting);
    let (_, at) = wait_for(&d, Duration::from_secs(5), PeerLiveness::is_lost).await;
    assert!(at - started >= TO);
    d.shutdown().await;
}

/// Detection time over repeated trials; prints min / median / max. The interval and
/// timeout default to 100 ms / 500 ms; `REMUS_HA_HB_MS=interval,timeout` measures others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detection_time_over_trials() {
    let (iv, to) = std::env::var("REMUS_HA_HB_MS")
        .ok()
        .and_then(|v| {
            let (i, t) = v.split_once(',')?;
            Some((
                Duration::from_millis(i.trim().parse().ok()?),
                Duration::from_millis(t.trim().parse().ok()?),
            ))
        })
        .unwrap_or((IV, TO));
    let trials = 10;
    let (mut after_last, mut after_cut) = (Vec::new(), Vec::new());
    for t in 0..trials {
        let p = pair(2, iv, to).await;
        wait_for(&p.b, Duration::from_secs(5), |v| all_links_up(v, 2)).await;
        // Cut at a different phase of the heartbeat period each trial.
        sleep(iv * t / trials + Duration::from_millis(150)).await;
        for r in &p.relays {
            r.set_cut(true);
        }
        let cut = Instant::now();
        let (v, _) = wait_for(&p.b, Duration::from_secs(5), PeerLiveness::is_lost).await;
        let PeerLiveness::Lost {
            detected_after,
            declared_at,
            ..
        } = v
        else {
            unreachable!()
        };
        assert!(detected_after >= to, "trial {t}: {detected_after:?}");
        assert!(declared_at - cut < to + iv + Duration::from_secs(1));
        after_last.push(detected_after);
        after_cut.push(declared_at - cut);
    }
    let summary = |v: &mut Vec<Duration>| {
        v.sort();
        format!(
            "min {:?} / median {:?} / max {:?}",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        )
    };
    println!(
        "detection, 2 links, interval {iv:?}, timeout {to:?}, {trials} trials:\n  \
         last heartbeat -> declared lost: {}\n  link cut -> declared lost:       {}",
        summary(&mut after_last),
        summary(&mut after_cut)
    );
}

/// Per-node keys (`[auth] mode = "keys"`): heartbeats keyed by the two nodes' X25519 secret
/// flow; a heartbeat forged with the pre-shared key (which the witness also holds) is
/// dropped as a bad tag; during a rotation (alpha pins beta's old and new keys, beta already
/// uses the new one) the peers stay alive on every link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_keys_keep_heartbeats_flowing_through_a_rotation_and_refuse_the_shared_key() {
    let (old, new) = ([11u8; 32], [12u8; 32]);
    let psk = key();
    let a = PeerKeys::per_node(&[old, new], Some(&psk), "alpha", "beta").unwrap();
    let b = PeerKeys::per_node(&[new], Some(&psk), "beta", "alpha").unwrap();
    let p = pair_keyed(2, IV, TO, a, b).await;
    wait_for(&p.a, Duration::from_secs(5), |v| all_links_up(v, 2)).await;
    wait_for(&p.b, Duration::from_secs(5), |v| all_links_up(v, 2)).await;
    never_lost_for(&p.b, Duration::from_millis(1500)).await;
    // Alpha sent under both pins until beta's first heartbeat proved the new one: at most a
    // few copies under the old key reached beta as bad tags, then none.
    let early: u64 = p.b.stats().links.iter().map(|l| l.dropped_bad_tag).sum();
    sleep(Duration::from_millis(600)).await;
    let later: u64 = p.b.stats().links.iter().map(|l| l.dropped_bad_tag).sum();
    println!("bad tags at beta during the rotation: {early}, after: {later}");
    assert_eq!(early, later, "alpha kept sending under the stale pin");

    // The witness's view: it holds the pre-shared key, not the nodes' secret.
    p.relays[0].set_cut(true);
    let target = p.b.stats().links[0].link.local;
    let before = p.b.stats().links[0].dropped_bad_tag;
    let forged = Beat {
        node: "alpha".into(),
        seq: u64::MAX - 1,
        uptime_us: 1,
        domains: vec![],
    };
    let attacker = UdpSocket::bind((lo(1), 0)).await.unwrap();
    attacker
        .send_to(&forged.encode(&psk), target)
        .await
        .unwrap();
    let got = timeout(Duration::from_secs(5), async {
        loop {
            let n = p.b.stats().links[0].dropped_bad_tag;
            if n > before {
                return n - before;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the forged heartbeat must be counted as a bad tag");
    assert_eq!(got, 1);
}
