//! The epoch state machine shared by every egress buffer.
//!
//! Output commit needs one invariant: a packet the guest emitted during epoch `k` leaves the
//! host only after the backup acknowledged checkpoint `k` (or after protection ended). The
//! buffer therefore sees three operations: *close* epoch `k` (packets from now on belong to
//! `k + 1`), *release* the oldest closed epoch, and *release indefinitely* (stop holding).
//!
//! [`EpochLedger`] is the single place that decides whether an operation is legal, so the
//! plug qdisc (which can track one closed epoch only, see `notes/kernel-harness.md`: a second
//! `buffer` before a `release` silently merges two epochs) and the relay (which tracks many)
//! reject the same wrong orders with the same typed errors. Backends call `check_*` before
//! their side effect and the matching mutating method after it succeeded, so a failed netlink
//! request never advances the ledger.
//!
//! Epoch numbers are chosen by the engine; the ledger only demands that each closed epoch is
//! the successor of the previous one (the first close fixes the numbering).

use std::collections::VecDeque;

use thiserror::Error;

/// A checkpoint epoch number, as the engine counts them.
pub type Epoch = u64;

/// Packets and bytes counted for one epoch (or for a total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochCounters {
    /// Packets accepted into the buffer (held) during the epoch.
    pub packets: u64,
    /// Bytes of those packets (Ethernet frames, without any stream framing).
    pub bytes: u64,
    /// Packets refused because the buffer was at its byte limit.
    pub dropped_packets: u64,
}

impl EpochCounters {
    fn add(&mut self, other: &EpochCounters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.dropped_packets += other.dropped_packets;
    }
}

/// One epoch and what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStats {
    /// The engine's epoch number.
    pub epoch: Epoch,
    /// What the epoch held (for a released epoch: what was released).
    pub counters: EpochCounters,
}

/// Whether the buffer is holding output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Packets are held per epoch until released.
    Holding,
    /// Packets pass straight through (backup gone, or protection not started).
    Passthrough,
    /// The buffer was torn down; every operation fails.
    TornDown,
}

/// Totals since the buffer was set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressTotals {
    /// Everything ever accepted into an epoch (held), including what is still held.
    pub held: EpochCounters,
    /// Packets released by `release` (epoch by epoch).
    pub released_packets: u64,
    /// Bytes released by `release`.
    pub released_bytes: u64,
    /// Packets that were held and then let go by `release_indefinite`.
    pub flushed_packets: u64,
    /// Packets that passed without being held (passthrough mode).
    pub passed_packets: u64,
    /// Epochs released one by one.
    pub epochs_released: u64,
}

/// A snapshot of an egress buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressStats {
    /// Holding, passing, or torn down.
    pub mode: Mode,
    /// The byte limit of the held output.
    pub limit_bytes: u64,
    /// The epoch collecting packets now, once the numbering is known.
    pub open_epoch: Option<Epoch>,
    /// What the open epoch holds so far.
    pub open: EpochCounters,
    /// Closed epochs awaiting release, oldest first.
    pub closed: Vec<EpochStats>,
    /// The last epoch released by `release`.
    pub last_released: Option<EpochStats>,
    /// Packets held right now (open and closed epochs).
    pub held_now_packets: u64,
    /// Bytes held right now.
    pub held_now_bytes: u64,
    /// Totals since setup.
    pub totals: EgressTotals,
}

/// An operation the ledger refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EpochError {
    #[error(
        "egress epoch {epoch}: cannot close it while epoch {unreleased} is closed and unreleased \
         (this buffer tracks at most {max} closed epoch(s): release {unreleased} first)"
    )]
    TooManyClosed {
        epoch: Epoch,
        unreleased: Epoch,
        max: usize,
    },
    #[error("egress epoch {epoch}: cannot close it, the next epoch to close is {expected}")]
    OutOfOrderClose { epoch: Epoch, expected: Epoch },
    #[error("egress epoch {epoch}: cannot release it, the oldest closed epoch is {oldest}")]
    NotOldest { epoch: Epoch, oldest: Epoch },
    #[error("egress epoch {epoch}: cannot release it, no epoch is closed")]
    NothingClosed { epoch: Epoch },
    #[error("egress epoch {epoch}: cannot release it, the buffer is not holding (released indefinitely)")]
    NotHolding { epoch: Epoch },
    #[error("egress buffer: {op} after teardown")]
    TornDown { op: &'static str },
}

/// The per-epoch bookkeeping and transition rules (see the module doc).
#[derive(Debug, Clone)]
pub struct EpochLedger {
    /// How many closed, unreleased epochs the backend can keep apart (plug: 1).
    max_closed: usize,
    /// Holding / passthrough / torn down.
    mode: Mode,
    /// The last epoch closed; the next close must be its successor.
    last_closed: Option<Epoch>,
    /// Counters of the epoch collecting packets now.
    open: EpochCounters,
    /// Closed epochs awaiting release, oldest first.
    closed: VecDeque<EpochStats>,
    /// The last epoch released one by one.
    last_released: Option<EpochStats>,
    /// Totals since creation.
    totals: EgressTotals,
    /// The byte limit reported in stats.
    limit_bytes: u64,
}

impl EpochLedger {
    /// A ledger that starts holding (output is never released before someone says so).
    pub fn new(max_closed: usize, limit_bytes: u64) -> Self {
        Self {
            max_closed: max_closed.max(1),
            mode: Mode::Holding,
            last_closed: None,
            open: EpochCounters::default(),
            closed: VecDeque::new(),
            last_released: None,
            totals: EgressTotals::default(),
            limit_bytes,
        }
    }

    /// The most closed, unreleased epochs this ledger allows.
    pub fn max_closed(&self) -> usize {
        self.max_closed
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Closed epochs awaiting release, oldest first.
    pub fn closed(&self) -> impl Iterator<Item = &EpochStats> {
        self.closed.iter()
    }

    /// Whether closing `epoch` now is legal.
    pub fn check_close(&self, epoch: Epoch) -> Result<(), EpochError> {
        if self.mode == Mode::TornDown {
            return Err(EpochError::TornDown { op: "buffer" });
        }
        if let Some(last) = self.last_closed {
            let expected = last.wrapping_add(1);
            if epoch != expected {
                return Err(EpochError::OutOfOrderClose { epoch, expected });
            }
        }
        if self.closed.len() >= self.max_closed {
            let unreleased = self.closed.front().map(|e| e.epoch).unwrap_or_default();
            return Err(EpochError::TooManyClosed {
                epoch,
                unreleased,
                max: self.max_closed,
            });
        }
        Ok(())
    }

    /// Closes `epoch`: what the open epoch collected becomes `epoch`'s content.
    /// From passthrough, the closed epoch is empty and holding resumes.
    pub fn close(&mut self, epoch: Epoch) -> Result<(), EpochError> {
        self.check_close(epoch)?;
        let counters = std::mem::take(&mut self.open);
        self.closed.push_back(EpochStats { epoch, counters });
        self.last_closed = Some(epoch);
        self.mode = Mode::Holding;
        Ok(())
    }

    /// Whether releasing `epoch` now is legal.
    pub fn check_release(&self, epoch: Epoch) -> Result<(), EpochError> {
        match self.mode {
            Mode::TornDown => return Err(EpochError::TornDown { op: "release" }),
            Mode::Passthrough => return Err(EpochError::NotHolding { epoch }),
            Mode::Holding => {}
        }
        match self.closed.front() {
            None => Err(EpochError::NothingClosed { epoch }),
            Some(oldest) if oldest.epoch != epoch => Err(EpochError::NotOldest {
                epoch,
                oldest: oldest.epoch,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Releases the oldest closed epoch, which must be `epoch`; returns what it held.
    pub fn release(&mut self, epoch: Epoch) -> Result<EpochStats, EpochError> {
        self.check_release(epoch)?;
        let released = self.closed.pop_front().expect("checked non-empty");
        self.totals.released_packets += released.counters.packets;
        self.totals.released_bytes += released.counters.bytes;
        self.totals.epochs_released += 1;
        self.last_released = Some(released);
        Ok(released)
    }

    /// Whether releasing indefinitely is legal (always, before teardown).
    pub fn check_release_indefinite(&self) -> Result<(), EpochError> {
        if self.mode == Mode::TornDown {
            return Err(EpochError::TornDown {
                op: "release_indefinite",
            });
        }
        Ok(())
    }

    /// Stops holding: every closed epoch and the open one are let go.
    ///
    /// Pass-through also ends the epoch sequence: the next protection session (after a
    /// lost backup returns) numbers its epochs from its own first one, so the next close
    /// may name any epoch.
    pub fn release_indefinite(&mut self) -> Result<(), EpochError> {
        self.check_release_indefinite()?;
        self.last_closed = None;
        let mut flushed = std::mem::take(&mut self.open).packets;
        flushed += self
            .closed
            .drain(..)
            .map(|e| e.counters.packets)
            .sum::<u64>();
        self.totals.flushed_packets += flushed;
        self.mode = Mode::Passthrough;
        Ok(())
    }

    /// Marks the buffer torn down.
    pub fn tear_down(&mut self) {
        self.mode = Mode::TornDown;
        self.open = EpochCounters::default();
        self.closed.clear();
    }

    /// Counts a packet accepted into the open epoch.
    pub fn record_held(&mut self, bytes: u64) {
        self.open.packets += 1;
        self.open.bytes += bytes;
        self.totals.held.packets += 1;
        self.totals.held.bytes += bytes;
    }

    /// Counts a packet dropped at the limit (charged to the open epoch).
    pub fn record_dropped(&mut self) {
        self.open.dropped_packets += 1;
        self.totals.held.dropped_packets += 1;
    }

    /// Counts a packet that passed without being held.
    pub fn record_passed(&mut self, packets: u64) {
        self.totals.passed_packets += packets;
    }

    /// Adds counters observed elsewhere (the kernel's, for the plug) to the open epoch.
    pub fn add_to_open(&mut self, delta: &EpochCounters) {
        self.open.add(delta);
        self.totals.held.add(delta);
    }

    /// Sets the limit reported in stats.
    pub fn set_limit(&mut self, limit_bytes: u64) {
        self.limit_bytes = limit_bytes;
    }

    /// A snapshot.
    pub fn stats(&self) -> EgressStats {
        let closed: Vec<EpochStats> = self.closed.iter().copied().collect();
        let held_now_packets =
            self.open.packets + closed.iter().map(|e| e.counters.packets).sum::<u64>();
        let held_now_bytes = self.open.bytes + closed.iter().map(|e| e.counters.bytes).sum::<u64>();
        EgressStats {
            mode: self.mode,
            limit_bytes: self.limit_bytes,
            open_epoch: match (self.mode, self.last_closed) {
                (Mode::Holding, Some(last)) => Some(last.wrapping_add(1)),
                _ => None,
            },
            open: self.open,
            closed,
            last_released: self.last_released,
            held_now_packets,
            held_now_bytes,
            totals: self.totals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Close(Epoch),
        Release(Epoch),
        Indefinite,
        TearDown,
    }

    fn apply(l: &mut EpochLedger, op: Op) -> Result<(), EpochError> {
        match op {
            Op::Close(e) => l.close(e),
            Op::Release(e) => l.release(e).map(|_| ()),
            Op::Indefinite => l.release_indefinite(),
            Op::TearDown => {
                l.tear_down();
                Ok(())
            }
        }
    }

    /// Each row: max closed epochs, a sequence of operations, and the expected result of the
    /// last one (all earlier ones must succeed).
    #[test]
    fn transitions_table() {
        use Op::*;
        let rows: Vec<(usize, Vec<Op>, Result<(), EpochError>)> = vec![
            (1, vec![Close(5)], Ok(())),
            (1, vec![Close(5), Release(5)], Ok(())),
            (1, vec![Close(5), Release(5), Close(6)], Ok(())),
            (
                1,
                vec![Close(5), Close(6)],
                Err(EpochError::TooManyClosed {
                    epoch: 6,
                    unreleased: 5,
                    max: 1,
                }),
            ),
            (3, vec![Close(5), Close(6), Close(7)], Ok(())),
            (
                3,
                vec![Close(5), Close(6), Close(7), Close(8)],
                Err(EpochError::TooManyClosed {
                    epoch: 8,
                    unreleased: 5,
                    max: 3,
                }),
            ),
            (
                3,
                vec![Close(5), Close(6), Release(6)],
                Err(EpochError::NotOldest {
                    epoch: 6,
                    oldest: 5,
                }),
            ),
            (3, vec![Close(5), Close(6), Release(5), Release(6)], Ok(())),
            (
                1,
                vec![Release(1)],
                Err(EpochError::NothingClosed { epoch: 1 }),
            ),
            (
                1,
                vec![Close(5), Release(5), Close(7)],
                Err(EpochError::OutOfOrderClose {
                    epoch: 7,
                    expected: 6,
                }),
            ),
            (
                1,
                vec![Close(5), Indefinite, Release(5)],
                Err(EpochError::NotHolding { epoch: 5 }),
            ),
            (1, vec![Close(5), Indefinite, Close(6), Release(6)], Ok(())),
            (
                1,
                vec![Close(5), TearDown, Close(6)],
                Err(EpochError::TornDown { op: "buffer" }),
            ),
            (
                1,
                vec![TearDown, Indefinite],
                Err(EpochError::TornDown {
                    op: "release_indefinite",
                }),
            ),
        ];
        for (i, (max, ops, want)) in rows.into_iter().enumerate() {
            let mut l = EpochLedger::new(max, 1000);
            let (last, init) = ops.split_last().unwrap();
            for op in init {
                apply(&mut l, *op).unwrap_or_else(|e| panic!("row {i}: {op:?} failed: {e}"));
            }
            assert_eq!(apply(&mut l, *last), want, "row {i}: {ops:?}");
        }
    }

    #[test]
    fn a_refused_operation_changes_nothing() {
        let mut l = EpochLedger::new(1, 1000);
        l.record_held(100);
        l.close(1).unwrap();
        l.record_held(50);
        let before = l.stats();
        assert!(l.close(2).is_err());
        assert!(l.release(2).is_err());
        assert_eq!(l.stats(), before);
    }

    #[test]
    fn a_new_session_after_pass_through_starts_its_own_sequence() {
        let mut l = EpochLedger::new(2, 1000);
        for k in 55..=57 {
            l.close(k).unwrap();
            l.release(k).unwrap();
        }
        assert!(matches!(
            l.close(1),
            Err(EpochError::OutOfOrderClose { expected: 58, .. })
        ));
        l.release_indefinite().unwrap();
        l.close(1).unwrap();
        assert!(
            l.close(3).is_err(),
            "within a session epochs stay consecutive"
        );
        l.close(2).unwrap();
    }

    #[test]
    fn counters_follow_the_epochs() {
        let mut l = EpochLedger::new(2, 1000);
        l.record_held(100);
        l.record_held(60);
        l.record_dropped();
        l.close(1).unwrap();
        l.record_held(10);
        let s = l.stats();
        assert_eq!(s.open_epoch, Some(2));
        assert_eq!(s.closed[0].counters.packets, 2);
        assert_eq!(s.closed[0].counters.bytes, 160);
        assert_eq!(s.closed[0].counters.dropped_packets, 1);
        assert_eq!(s.held_now_packets, 3);
        let r = l.release(1).unwrap();
        assert_eq!(r.counters.packets, 2);
        let s = l.stats();
        assert_eq!(s.totals.released_packets, 2);
        assert_eq!(s.totals.released_bytes, 160);
        assert_eq!(s.held_now_packets, 1);
        l.release_indefinite().unwrap();
        let s = l.stats();
        assert_eq!(s.mode, Mode::Passthrough);
        assert_eq!(s.totals.flushed_packets, 1);
        assert_eq!(s.held_now_packets, 0);
        assert_eq!(s.open_epoch, None);
    }
}
