//! The relay's frame store: frames held per epoch under one byte limit, driven by the
//! shared [`EpochLedger`] so the relay obeys exactly the same epoch rules as the plug.
//!
//! Pure data structure (no I/O): the relay task feeds it frames and commands and writes to
//! the tap whatever it hands back. Memory is bounded by the limit: a frame that would push
//! the held bytes over it is dropped and counted, like the plug qdisc does.

use std::collections::VecDeque;

use crate::epoch::{EgressStats, Epoch, EpochError, EpochLedger, EpochStats};

/// What to do with a frame the guest sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Accept {
    /// Held in the open epoch.
    Held,
    /// Dropped at the limit.
    Dropped,
    /// Not holding: send it now.
    Pass(Vec<u8>),
}

/// Frames held per epoch.
#[derive(Debug)]
pub struct Hold {
    /// The epoch rules and counters.
    ledger: EpochLedger,
    /// The most bytes held at once.
    limit: u64,
    /// Bytes held now (open and closed epochs).
    held_bytes: u64,
    /// Frames of the open epoch.
    open: Vec<Vec<u8>>,
    /// Frames of the closed epochs, oldest first (parallel to the ledger's closed list).
    closed: VecDeque<Vec<Vec<u8>>>,
}

impl Hold {
    /// An empty store that starts holding.
    pub fn new(max_closed: usize, limit: u64) -> Self {
        Self {
            ledger: EpochLedger::new(max_closed, limit),
            limit,
            held_bytes: 0,
            open: Vec::new(),
            closed: VecDeque::new(),
        }
    }

    /// Takes a frame from the guest.
    pub fn accept(&mut self, frame: Vec<u8>) -> Accept {
        match self.ledger.mode() {
            crate::epoch::Mode::Passthrough => {
                self.ledger.record_passed(1);
                Accept::Pass(frame)
            }
            crate::epoch::Mode::TornDown => Accept::Dropped,
            crate::epoch::Mode::Holding => {
                let len = frame.len() as u64;
                if self.held_bytes + len > self.limit {
                    self.ledger.record_dropped();
                    return Accept::Dropped;
                }
                self.held_bytes += len;
                self.ledger.record_held(len);
                self.open.push(frame);
                Accept::Held
            }
        }
    }

    /// Closes `epoch`.
    pub fn close(&mut self, epoch: Epoch) -> Result<(), EpochError> {
        self.ledger.close(epoch)?;
        self.closed.push_back(std::mem::take(&mut self.open));
        Ok(())
    }

    /// Releases closed epoch `epoch` (the oldest); returns its frames in arrival order.
    pub fn release(&mut self, epoch: Epoch) -> Result<(EpochStats, Vec<Vec<u8>>), EpochError> {
        let stats = self.ledger.release(epoch)?;
        let frames = self.closed.pop_front().unwrap_or_default();
        self.held_bytes -= frames.iter().map(|f| f.len() as u64).sum::<u64>();
        Ok((stats, frames))
    }

    /// Stops holding; returns every held frame, oldest first.
    pub fn release_indefinite(&mut self) -> Result<Vec<Vec<u8>>, EpochError> {
        self.ledger.release_indefinite()?;
        let mut out: Vec<Vec<u8>> = self.closed.drain(..).flatten().collect();
        out.append(&mut self.open);
        self.held_bytes = 0;
        Ok(out)
    }

    /// Sets the limit for frames accepted from now on.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
        self.ledger.set_limit(limit);
    }

    /// Drops everything and refuses further operations.
    pub fn tear_down(&mut self) {
        self.ledger.tear_down();
        self.open.clear();
        self.closed.clear();
        self.held_bytes = 0;
    }

    /// A snapshot.
    pub fn stats(&self) -> EgressStats {
        self.ledger.stats()
    }

    /// The most closed epochs kept apart.
    pub fn max_closed(&self) -> usize {
        self.ledger.max_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(tag: u8, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[0] = tag;
        v
    }

    #[test]
    fn releases_exactly_the_closed_epoch_in_order() {
        let mut h = Hold::new(4, 10_000);
        for t in 1..=3 {
            assert_eq!(h.accept(f(t, 100)), Accept::Held);
        }
        h.close(10).unwrap();
        for t in 4..=5 {
            h.accept(f(t, 100));
        }
        h.close(11).unwrap();
        h.accept(f(6, 100));
        let (s, frames) = h.release(10).unwrap();
        assert_eq!(s.counters.packets, 3);
        assert_eq!(
            frames.iter().map(|x| x[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(h.release(12).is_err());
        let (_, frames) = h.release(11).unwrap();
        assert_eq!(frames.iter().map(|x| x[0]).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(h.stats().held_now_packets, 1);
    }

    #[test]
    fn limit_drops_and_counts() {
        let mut h = Hold::new(2, 250);
        assert_eq!(h.accept(f(1, 100)), Accept::Held);
        assert_eq!(h.accept(f(2, 100)), Accept::Held);
        assert_eq!(h.accept(f(3, 100)), Accept::Dropped);
        assert_eq!(h.accept(f(4, 50)), Accept::Held);
        h.close(1).unwrap();
        assert_eq!(
            h.accept(f(5, 1)),
            Accept::Dropped,
            "closed epochs still count"
        );
        let (s, frames) = h.release(1).unwrap();
        assert_eq!((s.counters.packets, s.counters.dropped_packets), (3, 1));
        assert_eq!(frames.len(), 3);
        assert_eq!(
            h.accept(f(6, 200)),
            Accept::Held,
            "released bytes free the limit"
        );
        assert_eq!(h.stats().totals.held.dropped_packets, 2);
    }

    #[test]
    fn indefinite_flushes_then_passes() {
        let mut h = Hold::new(2, 10_000);
        h.accept(f(1, 10));
        h.close(1).unwrap();
        h.accept(f(2, 10));
        let out = h.release_indefinite().unwrap();
        assert_eq!(out.iter().map(|x| x[0]).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(h.accept(f(3, 10)), Accept::Pass(f(3, 10)));
        h.close(2).unwrap();
        assert_eq!(h.accept(f(4, 10)), Accept::Held);
        let (s, frames) = h.release(2).unwrap();
        assert_eq!((s.counters.packets, frames.len()), (0, 0));
    }
}
