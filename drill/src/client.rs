//! The drill's network client, and what its replies show about the failover.
//!
//! The client lives in its own network namespace: its socket is created on a thread that
//! entered the namespace ([`Netns::run`]) and then driven by tokio from any thread (a
//! socket stays in the namespace it was made in). It keeps one TCP connection to the
//! guest's counter service and sends `INC` every [`PERIOD`], one request at a time,
//! recording each reply's value and arrival time. A connection that ends (RST, EOF) or stays
//! silent for [`STALL_LIMIT`] counts as broken; the client reconnects and goes on until told
//! to stop.
//!
//! The verdicts ([`analyse`]) rest on one fact: counter values are unique within one
//! history of the guest. A value the client received from the primary that the activated
//! guest produces *again* (on its console, or in a later reply) is state the client saw and
//! the failover lost. With output held until the backup acknowledges, there is none.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sch_plug::Netns;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Time between two requests.
pub const PERIOD: Duration = Duration::from_millis(50);

/// Silence after which a connection counts as broken (a connection whose peer lost its
/// state hangs without a reset: see `docs/design.md`).
pub const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Longest accepted reply line: a reply is a decimal u64.
const MAX_REPLY: usize = 64;

/// One reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The counter value the guest replied.
    pub value: u64,
    /// When it arrived.
    pub at: Instant,
    /// Which connection (0 = the first) carried it.
    pub connection: u32,
}

/// What the client saw.
#[derive(Clone, Debug, Default)]
pub struct ClientLog {
    /// Every reply, in arrival order.
    pub replies: Vec<Reply>,
    /// Connections that ended or went silent while the client still wanted replies.
    pub broken_connections: u32,
    /// Why each one broke (for the report).
    pub breaks: Vec<String>,
    /// Round trip of each request (same order as `replies`).
    pub rtts: Vec<Duration>,
    /// Segments the client's TCP retransmitted, all connections (`TCP_INFO`
    /// `tcpi_total_retrans`, read after each reply): what a failover cost the client in
    /// retransmission timeouts.
    pub tcp_retransmits: u32,
}

/// `tcpi_total_retrans` of a TCP socket, if the kernel reports it.
fn total_retrans(s: &impl std::os::fd::AsRawFd) -> Option<u32> {
    let (info, len) = remus_engine::wire::tcp_info(s)?;
    (len >= std::mem::offset_of!(libc::tcp_info, tcpi_total_retrans) + 4)
        .then_some(info.tcpi_total_retrans)
}

impl ClientLog {
    /// The largest value among the replies that arrived before `t` (0 if none).
    pub fn max_value_before(&self, t: Instant) -> u64 {
        self.replies
            .iter()
            .filter(|r| r.at < t)
            .map(|r| r.value)
            .max()
            .unwrap_or(0)
    }
}

/// A running client.
pub struct Client {
    stop: watch::Sender<bool>,
    log: watch::Receiver<ClientLog>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts a client in `netns` against `guest:port`.
    pub fn start(netns: Netns, guest: Ipv4Addr, port: u16) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let (log_tx, log) = watch::channel(ClientLog::default());
        let addr = SocketAddr::from((guest, port));
        let task = tokio::spawn(run(netns, addr, stop_rx, log_tx));
        Self { stop, log, task }
    }

    /// What it saw so far.
    pub fn log(&self) -> ClientLog {
        self.log.borrow().clone()
    }

    /// Waits until `pred` holds for the log or `timeout` passes; says whether it held.
    pub async fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&ClientLog) -> bool) -> bool {
        tokio::time::timeout(timeout, self.log.wait_for(|l| pred(l)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops it and returns everything it saw.
    pub async fn stop(mut self) -> ClientLog {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
        self.log()
    }
}

impl Drop for Client {
    /// A drill that fails half-way must not leave its client running.
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(netns: &Netns, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let ns = netns.clone();
    let std = tokio::task::spawn_blocking(move || {
        ns.run(|| {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(std::io::Error::other)??;
    std.set_nodelay(true)?;
    TcpStream::from_std(std)
}

/// Why one request got no reply.
enum Broken {
    Io(std::io::Error),
    Eof,
    Silent,
    Garbage(String),
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Io(e) => write!(f, "{e}"),
            Broken::Eof => f.write_str("closed by the guest"),
            Broken::Silent => write!(f, "no reply within {STALL_LIMIT:?}"),
            Broken::Garbage(s) => write!(f, "unexpected reply {s:?}"),
        }
    }
}

async fn request(conn: &mut BufReader<TcpStream>) -> Result<u64, Broken> {
    conn.get_mut()
        .write_all(b"INC\n")
        .await
        .map_err(Broken::Io)?;
    let mut line = String::new();
    let read = async {
        // Bounded: a reply is short; anything longer is garbage.
        let mut limited = (&mut *conn).take(MAX_REPLY as u64);
        limited.read_line(&mut line).await
    };
    match tokio::time::timeout(STALL_LIMIT, read).await {
        Err(_) => Err(Broken::Silent),
        Ok(Err(e)) => Err(Broken::Io(e)),
        Ok(Ok(0)) => Err(Broken::Eof),
        Ok(Ok(_)) => line
            .trim()
            .parse::<u64>()
            .map_err(|_| Broken::Garbage(line.trim().chars().take(32).collect())),
    }
}

use tokio::io::AsyncReadExt as _;

async fn run(
    netns: Netns,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
    log: watch::Sender<ClientLog>,
) {
    let mut connection = 0u32;
    // Retransmissions of the connections that ended.
    let mut retrans_before = 0u32;
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'outer: while !*stop.borrow() {
        let conn = tokio::select! {
            c = connect(&netns, addr) => c,
            _ = stop.wait_for(|s| *s) => break,
        };
        let mut conn = match conn {
            Ok(c) => BufReader::new(c),
            Err(e) => {
                tracing::debug!(error = %e, "drill client: connect");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break 'outer,
            }
            let sent = Instant::now();
            let r = tokio::select! {
                r = request(&mut conn) => r,
                _ = stop.wait_for(|s| *s) => break 'outer,
            };
            let retrans = total_retrans(conn.get_ref()).unwrap_or(0);
            match r {
                Ok(value) => log.send_modify(|l| {
                    l.replies.push(Reply {
                        value,
                        at: Instant::now(),
                        connection,
                    });
                    l.rtts.push(sent.elapsed());
                    l.tcp_retransmits = retrans_before + retrans;
                }),
                Err(why) => {
                    retrans_before += retrans;
                    log.send_modify(|l| {
                        l.broken_connections += 1;
                        l.breaks.push(format!("connection {connection}: {why}"));
                    });
                    connection += 1;
                    continue 'outer;
                }
            }
        }
    }
}

/// What the client's replies show about a failover.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClientVerdict {
    /// Replies received in all.
    pub replies: u64,
    /// Replies received before the backup's VM was started (all from the primary).
    pub replies_before_failover: u64,
    /// Replies received after it.
    pub replies_after_failover: u64,
    /// The highest value the client saw from the primary.
    pub max_value_before_failover: u64,
    /// The lowest counter value seen after the failover (the activated guest's console, or a
    /// reply received after its start, which may be a retransmission of a reply the
    /// checkpoint already held).
    pub first_value_after_failover: u64,
    /// Replies from the primary whose value the activated guest produced again: output of
    /// state the failover lost.
    pub lost_replies: u64,
    /// Connections that ended or went silent.
    pub broken_connections: u32,
    /// Why they broke.
    pub breaks: Vec<String>,
    /// Longest gap between two replies around the failover (from the last reply before the
    /// kill to the first after it), i.e. the client-visible recovery time; `None` if no reply
    /// came after the kill.
    pub client_stall_ms: Option<u64>,
    /// From the kill to the first reply after it.
    pub kill_to_first_reply_ms: Option<u64>,
    /// Every reply greater than the one before it, across connections: the client never saw
    /// the counter go back.
    pub values_increasing: bool,
    /// Median request round trip before protection started (output passed straight through).
    pub rtt_unprotected_p50_us: u64,
    /// Median request round trip while protected (output held until acknowledged).
    pub rtt_protected_p50_us: u64,
    /// Segments the client's TCP retransmitted over the whole run.
    pub tcp_retransmits: u32,
}

/// Moments of the drill the verdicts are cut at.
#[derive(Clone, Copy, Debug)]
pub struct Moments {
    /// Protection started.
    pub protected: Instant,
    /// The primary's QEMU was killed.
    pub killed: Instant,
    /// The backup's VM was about to be started.
    pub activation: Instant,
}

fn p50(mut v: Vec<Duration>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort();
    v[v.len() / 2].as_micros() as u64
}

/// Computes the client verdicts from its log, the moments of the drill and the counter
/// values the activated guest printed on its console.
pub fn analyse(log: &ClientLog, m: &Moments, activated_console: &[u64]) -> ClientVerdict {
    let (before, after): (Vec<&Reply>, Vec<&Reply>) =
        log.replies.iter().partition(|r| r.at < m.activation);
    let max_before = log.max_value_before(m.activation);
    let regenerated: std::collections::HashSet<u64> = activated_console
        .iter()
        .copied()
        .chain(after.iter().map(|r| r.value))
        .collect();
    let lost = before
        .iter()
        .filter(|r| regenerated.contains(&r.value))
        .count() as u64;
    let first_after = regenerated.iter().copied().min().unwrap_or(0);
    let last_before_kill = log.replies.iter().rev().find(|r| r.at < m.killed);
    let first_after_kill = log.replies.iter().find(|r| r.at >= m.killed);
    let client_stall_ms = match (last_before_kill, first_after_kill) {
        (Some(a), Some(b)) => Some(b.at.duration_since(a.at).as_millis() as u64),
        (None, Some(b)) => Some(b.at.duration_since(m.killed).as_millis() as u64),
        _ => None,
    };
    let kill_to_first_reply_ms =
        first_after_kill.map(|b| b.at.duration_since(m.killed).as_millis() as u64);
    let values_increasing = log.replies.windows(2).all(|w| w[1].value > w[0].value);
    let rtt = |keep: &dyn Fn(&Reply) -> bool| {
        p50(log
            .replies
            .iter()
            .zip(&log.rtts)
            .filter(|(r, _)| keep(r))
            .map(|(_, d)| *d)
            .collect())
    };
    ClientVerdict {
        replies: log.replies.len() as u64,
        replies_before_failover: before.len() as u64,
        replies_after_failover: after.len() as u64,
        max_value_before_failover: max_before,
        first_value_after_failover: first_after,
        lost_replies: lost,
        broken_connections: log.broken_connections,
        breaks: log.breaks.clone(),
        client_stall_ms,
        kill_to_first_reply_ms,
        values_increasing,
        tcp_retransmits: log.tcp_retransmits,
        rtt_unprotected_p50_us: rtt(&|r| r.at < m.protected),
        rtt_protected_p50_us: rtt(&|r| r.at >= m.protected && r.at < m.killed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(t0: Instant, replies: &[(u64, u64, u32)], broken: u32) -> ClientLog {
        ClientLog {
            replies: replies
                .iter()
                .map(|&(value, ms, connection)| Reply {
                    value,
                    at: t0 + Duration::from_millis(ms),
                    connection,
                })
                .collect(),
            broken_connections: broken,
            breaks: Vec::new(),
            rtts: replies.iter().map(|_| Duration::from_millis(1)).collect(),
            tcp_retransmits: 0,
        }
    }

    /// (case, replies as (value, ms, connection), broken, console after activation,
    ///  expected lost, expected increasing, expected stall)
    #[test]
    fn verdicts() {
        type Case = (
            &'static str,
            &'static [(u64, u64, u32)],
            u32,
            &'static [u64],
            u64,
            bool,
            Option<u64>,
        );
        // protected at 100 ms, killed at 1000 ms, activation at 1200 ms.
        let cases: &[Case] = &[
            (
                "safe: the restored guest continues past everything the client saw",
                &[
                    (5, 50, 0),
                    (7, 900, 0),
                    (9, 980, 0),
                    (12, 1500, 0),
                    (14, 1550, 0),
                ],
                0,
                &[10, 11, 13],
                0,
                true,
                Some(520),
            ),
            (
                "a reply retransmitted by the restored guest is not lost state",
                &[(5, 50, 0), (7, 900, 0), (8, 1400, 0), (10, 1450, 0)],
                0,
                &[9, 11],
                0,
                true,
                Some(500),
            ),
            (
                "unsafe: the client saw 8 and 9, the restored guest produced them again",
                &[
                    (5, 50, 0),
                    (7, 900, 0),
                    (8, 950, 0),
                    (9, 990, 0),
                    (9, 12000, 1),
                ],
                1,
                &[8, 10, 11],
                2,
                false,
                Some(11010),
            ),
            (
                "no reply after the kill: no stall figure",
                &[(5, 50, 0), (7, 900, 0)],
                1,
                &[8, 9],
                0,
                true,
                None,
            ),
        ];
        for (name, replies, broken, console, lost, increasing, stall) in cases {
            let t0 = Instant::now();
            let m = Moments {
                protected: t0 + Duration::from_millis(100),
                killed: t0 + Duration::from_millis(1000),
                activation: t0 + Duration::from_millis(1200),
            };
            let v = analyse(&log_of(t0, replies, *broken), &m, console);
            assert_eq!(v.lost_replies, *lost, "{name}");
            assert_eq!(v.values_increasing, *increasing, "{name}");
            assert_eq!(v.client_stall_ms, *stall, "{name}");
            assert_eq!(v.broken_connections, *broken, "{name}");
            assert_eq!(v.replies, replies.len() as u64, "{name}");
        }
    }
}
