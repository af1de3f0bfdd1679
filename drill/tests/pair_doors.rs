//! The doors under a flood, on a real protected pair: for 30 s the client's namespace holds
//! 500 TCP connections open to each host's replication port (reopening any the daemon
//! closes) and sends random datagrams at both heartbeat ports and the witness. Protection
//! must not notice: checkpoints keep being acknowledged, nobody fails over or loses its
//! peer, the refusals are counted, and each daemon's log stays bounded (lines per second
//! reported beside the datagram and connection rates).

mod pair_support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rand::RngCore;
use remus_agent::api::{DaemonStatus, DomainStatus, Role};
use remus_drill::net::Host;
use remus_drill::pair::config::{HEARTBEAT_PORT, REPLICATION_PORT, WITNESS_PORT};
use remus_drill::pair::{PairDrill, Scenario};

const FLOOD: Duration = Duration::from_secs(30);
const IDLE_CONNECTIONS: usize = 500;

/// What the flood did.
#[derive(Debug, Default)]
struct Flood {
    datagrams: u64,
    connects: u64,
    connect_errors: u64,
}

/// Holds `IDLE_CONNECTIONS` open to each of `tcp` and sprays `udp` with random datagrams,
/// for `FLOOD`. Runs on a thread entered into the client's namespace.
fn flood(tcp: &[SocketAddr], udp: &[SocketAddr]) -> std::io::Result<Flood> {
    let mut f = Flood::default();
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let mut rng = rand::rng();
    let mut conns: Vec<Option<TcpStream>> =
        (0..IDLE_CONNECTIONS * tcp.len()).map(|_| None).collect();
    let start = Instant::now();
    let mut buf = [0u8; 512];
    let mut reopened = None::<Instant>;
    while start.elapsed() < FLOOD {
        // Once a second, reopen what the daemons closed (shed at the cap, or past the
        // handshake deadline).
        if reopened.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            reopened = Some(Instant::now());
            for (i, c) in conns.iter_mut().enumerate() {
                let closed = match c {
                    None => true,
                    Some(s) => match s.read(&mut [0u8; 1]) {
                        Ok(_) => true,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    },
                };
                if closed {
                    let to = tcp[i % tcp.len()];
                    f.connects += 1;
                    *c = match TcpStream::connect_timeout(&to, Duration::from_millis(200)) {
                        Ok(s) => {
                            s.set_nonblocking(true)?;
                            Some(s)
                        }
                        Err(_) => {
                            f.connect_errors += 1;
                            None
                        }
                    };
                }
            }
        }
        // About 3,000 datagrams a second in all: a flood for a 100 ms heartbeat, without
        // starving the two TCG guests of this 2-core machine.
        for _ in 0..150 {
            for to in udp {
                let len = 16 + (rng.next_u32() as usize % 400);
                rng.fill_bytes(&mut buf[..len]);
                if sock.send_to(&buf[..len], to).is_ok() {
                    f.datagrams += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    Ok(f)
}

fn web(s: &DaemonStatus) -> Result<&DomainStatus> {
    s.domains.first().context("no domain in the status")
}

fn log_lines(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |t| t.lines().count())
}

/// The most frequent lines of `p` after line `from`, without their timestamps.
fn frequent_lines(p: &std::path::Path, from: usize) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for l in text.lines().skip(from) {
        // "2026-12-03T13:40:00.123Z  INFO span: target: message key=value …": drop the
        // timestamp and the field values, keep level and message.
        let rest = l.split_once(' ').map_or(l, |x| x.1);
        let key: String = rest
            .split_whitespace()
            .filter(|w| !w.contains('='))
            .take(12)
            .collect::<Vec<_>>()
            .join(" ");
        *counts.entry(key).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().map(|(k, n)| (n, k)).collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.0));
    v.truncate(5);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_the_doors_does_not_disturb_protection() -> Result<()> {
    // Kept unless the test passes, so the daemons' logs can be read.
    let work = pair_support::scratch("pair-doors")?.keep();
    println!("pair-doors work directory: {}", work.display());
    let o = pair_support::options(Scenario::KillBackup, &work)?;
    let mut pair = PairDrill::setup(&o, 1).await?;
    pair.start_vm().await?;
    let addrs = pair
        .topology()
        .addrs
        .context("pair topology without addresses")?;
    let tcp: Vec<SocketAddr> = [addrs.pri, addrs.bak]
        .iter()
        .map(|&ip| SocketAddr::from((ip, REPLICATION_PORT)))
        .collect();
    let udp: Vec<SocketAddr> = [
        (addrs.pri, HEARTBEAT_PORT),
        (addrs.bak, HEARTBEAT_PORT),
        (addrs.witness, WITNESS_PORT),
    ]
    .iter()
    .map(|&a| SocketAddr::from(a))
    .collect();

    // The daemons' own pace of logging, for comparison.
    let quiet_from = Host::BOTH.map(|h| log_lines(&pair.files(h).log));
    let quiet = Duration::from_secs(10);
    tokio::time::sleep(quiet).await;
    let before = [pair.status(Host::Pri).await?, pair.status(Host::Bak).await?];
    let lines_before = Host::BOTH.map(|h| log_lines(&pair.files(h).log));
    let baseline: Vec<f64> = (0..2)
        .map(|i| (lines_before[i] - quiet_from[i]) as f64 / quiet.as_secs_f64())
        .collect();
    let client = pair.topology().client_netns();
    let t = Instant::now();
    let f = tokio::task::spawn_blocking(move || client.run(|| flood(&tcp, &udp)))
        .await
        .context("flood thread")??;
    let took = t.elapsed().as_secs_f64();
    let after = [pair.status(Host::Pri).await?, pair.status(Host::Bak).await?];
    let lines_after = Host::BOTH.map(|h| log_lines(&pair.files(h).log));
    let frequent = Host::BOTH.map(|h| frequent_lines(&pair.files(h).log, lines_before[h as usize]));
    drop(pair);

    let (p0, p1) = (web(&before[0])?, web(&after[0])?);
    let (b0, b1) = (web(&before[1])?, web(&after[1])?);
    let acked = p1.counters.checkpoints - p0.counters.checkpoints;
    let lines: Vec<f64> = (0..2)
        .map(|i| (lines_after[i] - lines_before[i]) as f64 / took)
        .collect();
    println!(
        "flood {took:.1} s: {} datagrams ({:.0}/s), {} connections opened ({} failed); \
         checkpoints acknowledged during it {acked}; log lines/s pri {:.2} bak {:.2} \
         (before the flood {:.2} / {:.2}); doors pri {:?}; doors bak {:?}\n\
         most frequent lines during it: pri {:?}\nbak {:?}",
        f.datagrams,
        f.datagrams as f64 / took,
        f.connects,
        f.connect_errors,
        lines[0],
        lines[1],
        baseline[0],
        baseline[1],
        after[0].doors,
        after[1].doors,
        frequent[0],
        frequent[1],
    );
    ensure!(
        matches!(p1.role, Role::Primary { .. }),
        "pri is no longer primary: {:?}",
        p1.role
    );
    ensure!(
        matches!(b1.role, Role::Backup { .. }),
        "bak is no longer backup: {:?}",
        b1.role
    );
    ensure!(
        p1.counters.protection_lost == p0.counters.protection_lost
            && b1.counters.failovers == b0.counters.failovers,
        "the flood made a node give up on its peer: pri lost protection {} -> {}, bak failovers {} -> {}",
        p0.counters.protection_lost,
        p1.counters.protection_lost,
        b0.counters.failovers,
        b1.counters.failovers
    );
    // One checkpoint per 200 ms interval would be 150; a TCG guest under a flood on two
    // cores does fewer, but protection must keep going.
    ensure!(
        acked >= 20,
        "only {acked} checkpoints acknowledged in {took:.1} s of flood"
    );
    for (h, s) in Host::BOTH.iter().zip(&after) {
        ensure!(
            s.doors.heartbeat_bad_tag + s.doors.heartbeat_malformed > 1000,
            "{h}: the datagrams were not counted: {:?}",
            s.doors
        );
        ensure!(
            s.doors.connections_shed + s.doors.handshakes_refused >= 400,
            "{h}: the idle connections were not refused: {:?}",
            s.doors
        );
    }
    // The flood may add a few rate-limited lines (each kind at most once per 10 s), not one
    // per datagram or connection.
    for ((h, l), b) in Host::BOTH.iter().zip(&lines).zip(&baseline) {
        ensure!(
            *l < b + 1.0,
            "{h}: {l:.2} log lines per second under the flood, {b:.2} before it"
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
