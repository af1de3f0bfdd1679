//! A user-space link impairer for the drill's network: loss, delay and jitter on one host's
//! uplink, where `tc … netem` is not available (this machine's kernel has no `sch_netem`).
//!
//! How: the host's veth port on the switch (`to-<host>`) leaves the switch bridge and joins
//! a bridge of its own (`ib-<host>`) with a tap (`it-<host>`); a second tap (`ia-<host>`)
//! joins the switch bridge in its place. One thread moves every frame between the two taps'
//! file descriptors, dropping each with the configured probability and holding it for
//! `delay ± jitter` (uniform) before writing it on, in each direction independently:
//!
//! ```text
//!   host --veth--> to-<h> == ib-<h> == it-<h> ~~[drop, delay]~~ ia-<h> == swbr --> others
//! ```
//!
//! Frames are released in the order of their due times, so jitter reorders them as netem
//! does. Everything the host sends or receives crosses it: the daemons' replication,
//! heartbeats and lease traffic, and the guest's bridged traffic. Dropping the [`Impairer`]
//! stops the thread and puts the veth back on the switch bridge.
//!
//! With a rate, frames also queue (at most [`QUEUE_FRAMES`]) and leave at that rate.
//!
//! Test tooling (this crate is not part of the product): shared by the false-failover soak
//! and the link-quality tests.

use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rand::Rng;
use sch_plug::Netns;

/// What to do to the frames of a link, in each direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Impairment {
    /// Probability that a frame is dropped (0.0..=1.0).
    pub loss: f64,
    /// Mean one-way delay added.
    pub delay: Duration,
    /// The delay varies uniformly within ± this.
    pub jitter: Duration,
    /// The link's rate in bits per second (`None`: as fast as the host): frames leave one
    /// after the other at this rate, then take their delay; at most [`QUEUE_FRAMES`] wait,
    /// the rest are dropped (a router's tail drop).
    pub rate_bps: Option<u64>,
}

/// Frames that may wait for a rate-limited link, per direction.
pub const QUEUE_FRAMES: usize = 1000;

impl Impairment {
    /// The link-quality issue's "real link": 1 % loss, 10 ms ± 5 ms.
    pub const LOSSY_WAN: Impairment = Impairment {
        loss: 0.01,
        delay: Duration::from_millis(10),
        jitter: Duration::from_millis(5),
        rate_bps: None,
    };

    /// Parses `loss=1%,delay=10ms,jitter=5ms,rate=40mbit` (any subset; missing fields are
    /// 0, or no rate limit).
    ///
    /// # Errors
    /// Names the field that is unknown or unreadable.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut i = Impairment {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: None,
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("impairment {part:?}: expected key=value"))?;
            let ms = |v: &str| -> Result<Duration, String> {
                v.trim_end_matches("ms")
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("impairment {k}={v:?}: expected milliseconds"))
            };
            match k {
                "loss" => {
                    let pct: f64 = v
                        .trim_end_matches('%')
                        .parse()
                        .map_err(|_| format!("impairment loss={v:?}: expected a percentage"))?;
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(format!("impairment loss={v:?}: outside 0..=100 %"));
                    }
                    i.loss = pct / 100.0;
                }
                "delay" => i.delay = ms(v)?,
                "jitter" => i.jitter = ms(v)?,
                "rate" => {
                    let mbit: u64 = v
                        .trim_end_matches("mbit")
                        .parse()
                        .ok()
                        .filter(|&m| m > 0)
                        .ok_or_else(|| {
                            format!("impairment rate={v:?}: expected Mbit/s, e.g. 40mbit")
                        })?;
                    i.rate_bps = Some(mbit * 1_000_000);
                }
                _ => {
                    return Err(format!(
                        "impairment {k:?}: unknown (loss, delay, jitter, rate)"
                    ))
                }
            }
        }
        if i.jitter > i.delay {
            return Err(format!(
                "impairment jitter {:?} exceeds delay {:?}",
                i.jitter, i.delay
            ));
        }
        Ok(i)
    }
}

impl std::fmt::Display for Impairment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loss {:.1} %, delay {:?} ± {:?}",
            self.loss * 100.0,
            self.delay,
            self.jitter
        )?;
        match self.rate_bps {
            Some(r) => write!(f, ", rate {} Mbit/s", r / 1_000_000),
            None => Ok(()),
        }
    }
}

/// Frames seen by an impairer, both directions together.
#[derive(Debug, Default)]
pub struct ImpairStats {
    /// Frames read from either side.
    pub frames: AtomicU64,
    /// Frames dropped on purpose.
    pub dropped: AtomicU64,
    /// Frames that could not be written on (the far tap was full or gone).
    pub write_errors: AtomicU64,
}

/// A running impairer; stops when dropped (the caller then restores the link).
#[derive(Debug)]
pub struct Impairer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<ImpairStats>,
}

impl Impairer {
    /// Starts moving frames between `a` and `b` (tap fds), impaired both ways.
    pub fn start(a: OwnedFd, b: OwnedFd, imp: Impairment) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ImpairStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("link-impairer".into())
            .spawn(move || forward(&a, &b, imp, &s, &st))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// What it has done so far.
    pub fn stats(&self) -> &ImpairStats {
        &self.stats
    }
}

impl Drop for Impairer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A frame waiting for its due time; the heap pops the earliest first.
struct Pending {
    due: Instant,
    seq: u64,
    to_b: bool,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// The delay of one frame: `delay ± jitter`, uniform.
fn one_delay(imp: &Impairment, rng: &mut impl Rng) -> Duration {
    let j = imp.jitter.as_micros() as i64;
    let d = imp.delay.as_micros() as i64 + if j > 0 { rng.random_range(-j..=j) } else { 0 };
    Duration::from_micros(d.max(0) as u64)
}

fn forward(a: &OwnedFd, b: &OwnedFd, imp: Impairment, stop: &AtomicBool, st: &ImpairStats) {
    let mut rng = rand::rng();
    let mut heap = BinaryHeap::<Pending>::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65_536];
    // Per direction (to b, to a): when the link is free again, and the frames queued on it.
    let mut free_at = [Instant::now(); 2];
    let mut queued = [0usize; 2];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Release what is due.
        while heap.peek().is_some_and(|p| p.due <= now) {
            let p = heap.pop().expect("peeked");
            queued[usize::from(!p.to_b)] -= 1;
            let to = if p.to_b { b } else { a };
            if nix::unistd::write(to, &p.frame).is_err() {
                st.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let wait = heap
            .peek()
            .map_or(Duration::from_millis(20), |p| {
                p.due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(20));
        let mut fds = [
            PollFd::new(a.as_fd(), PollFlags::POLLIN),
            PollFd::new(b.as_fd(), PollFlags::POLLIN),
        ];
        let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
        if poll(&mut fds, PollTimeout::from(ms)).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
            .collect();
        for (from_a, fd) in [(true, a), (false, b)] {
            if !ready[usize::from(!from_a)] {
                continue;
            }
            // Drain what is there (the fds are non-blocking).
            while let Ok(n) = nix::unistd::read(fd, &mut buf) {
                if n == 0 {
                    break;
                }
                st.frames.fetch_add(1, Ordering::Relaxed);
                if imp.loss > 0.0 && rng.random_bool(imp.loss) {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let dir = usize::from(!from_a);
                let now = Instant::now();
                let sent = match imp.rate_bps {
                    Some(bps) => {
                        if queued[dir] >= QUEUE_FRAMES {
                            st.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let on_wire = Duration::from_nanos(n as u64 * 8 * 1_000_000_000 / bps);
                        free_at[dir] = free_at[dir].max(now) + on_wire;
                        free_at[dir]
                    }
                    None => now,
                };
                seq += 1;
                queued[dir] += 1;
                heap.push(Pending {
                    due: sent + one_delay(&imp, &mut rng),
                    seq,
                    to_b: from_a,
                    frame: buf[..n].to_vec(),
                });
            }
        }
    }
}

/// Creates the two taps of an impaired link in `netns`.
pub fn taps(netns: &Netns, a: &str, b: &str) -> io::Result<(OwnedFd, OwnedFd)> {
    Ok((
        sch_plug::relay::tap::create(a, netns)?,
        sch_plug::relay::tap::create(b, netns)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ms = Duration::from_millis;
        // (input, expected or the word the error must contain)
        let ok: &[(&str, Impairment)] = &[
            ("loss=1%,delay=10ms,jitter=5ms", Impairment::LOSSY_WAN),
            (
                "delay=20",
                Impairment {
                    loss: 0.0,
                    delay: ms(20),
                    jitter: ms(0),
                    rate_bps: None,
                },
            ),
            (
                "rate=40mbit,delay=5ms",
                Impairment {
                    loss: 0.0,
                    delay: ms(5),
                    jitter: ms(0),
                    rate_bps: Some(40_000_000),
                },
            ),
            (
                "",
                Impairment {
                    loss: 0.0,
                    delay: ms(0),
                    jitter: ms(0),
                    rate_bps: None,
                },
            ),
        ];
        for (s, want) in ok {
            assert_eq!(Impairment::parse(s).as_ref(), Ok(want), "{s}");
        }
        let bad: &[(&str, &str)] = &[
            ("loss=150%", "outside"),
            ("loss=x", "percentage"),
            ("delay=fast", "milliseconds"),
            ("speed=1", "unknown"),
            ("rate=0mbit", "Mbit/s"),
            ("rate=fast", "Mbit/s"),
            ("loss", "key=value"),
            ("delay=5ms,jitter=6ms", "exceeds"),
        ];
        for (s, word) in bad {
            let e = Impairment::parse(s).unwrap_err();
            assert!(e.contains(word), "{s}: {e}");
        }
    }

    #[test]
    fn delays_stay_within_the_jitter() {
        let mut rng = rand::rng();
        let imp = Impairment::LOSSY_WAN;
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for _ in 0..10_000 {
            let d = one_delay(&imp, &mut rng);
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert!(lo >= Duration::from_millis(5) && hi <= Duration::from_millis(15));
        // Both ends are reached (uniform over ±5 ms): not a constant.
        assert!(lo < Duration::from_millis(6) && hi > Duration::from_millis(14));
    }
}
