//! Every request the daemon makes of its lease arbiter, counted and timed.
//!
//! Why a wrapper: renewals are the arbiter's heartbeat — a renewal that takes a third of the
//! lease is a failover waiting to happen, whichever backend answers — so the operator needs
//! their count, failures and latency for `remus-witness` and etcd alike. Wrapping the
//! [`LeaseArbiter`] the supervisors share counts every request without either backend, the
//! lease keeper or the fencing knowing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use remus_ha::lineage::CopyStamp;
use remus_ha::witness::{Lease, LeaseArbiter, LeaseInfo, LeaseMode, RecordedCopy, WitnessError};

use crate::api::ArbiterOpStats;

/// The operations counted, in the order they are reported.
const OPS: [&str; 6] = ["acquire", "renew", "preempt", "release", "query", "record"];

/// An arbiter whose requests are counted and timed.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn LeaseArbiter>,
    stats: Mutex<[ArbiterOpStats; OPS.len()]>,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn LeaseArbiter>) -> Self {
        Self {
            inner,
            stats: Mutex::new(OPS.map(|op| ArbiterOpStats {
                op: op.to_string(),
                ..ArbiterOpStats::default()
            })),
        }
    }

    /// The counts so far, one entry per operation ever requested.
    pub fn snapshot(&self) -> Vec<ArbiterOpStats> {
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|s| s.ok + s.denied + s.failed > 0)
            .cloned()
            .collect()
    }

    fn count<T>(&self, op: usize, took: Duration, r: &Result<T, WitnessError>) {
        let mut all = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &mut all[op];
        match r {
            Ok(_) => s.ok += 1,
            Err(WitnessError::Denied { .. }) => s.denied += 1,
            Err(_) => s.failed += 1,
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        s.latency_sum_us = s.latency_sum_us.saturating_add(us);
        s.latency_max_us = s.latency_max_us.max(us);
        s.latency_last_us = us;
    }

    async fn timed<T>(
        &self,
        op: usize,
        f: impl std::future::Future<Output = Result<T, WitnessError>>,
    ) -> Result<T, WitnessError> {
        let t = Instant::now();
        let r = f.await;
        self.count(op, t.elapsed(), &r);
        r
    }
}

#[async_trait]
impl LeaseArbiter for Metered {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn node(&self) -> &str {
        self.inner.node()
    }

    fn ttl(&self) -> Duration {
        self.inner.ttl()
    }

    async fn acquire_as(&self, domain: &str, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        self.timed(0, self.inner.acquire_as(domain, mode)).await
    }

    async fn preempt(&self, domain: &str) -> Result<Lease, WitnessError> {
        self.timed(2, self.inner.preempt(domain)).await
    }

    async fn renew_as(&self, lease: &Lease, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        self.timed(1, self.inner.renew_as(lease, mode)).await
    }

    async fn release(&self, lease: &Lease) -> Result<bool, WitnessError> {
        self.timed(3, self.inner.release(lease)).await
    }

    async fn query(&self, domain: &str) -> Result<LeaseInfo, WitnessError> {
        self.timed(4, self.inner.query(domain)).await
    }

    async fn record_copy(
        &self,
        domain: &str,
        copy: CopyStamp,
    ) -> Result<RecordedCopy, WitnessError> {
        self.timed(5, self.inner.record_copy(domain, copy)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arbiter that grants renewals, denies acquisitions and fails the rest, slowly.
    #[derive(Debug)]
    struct Scripted;

    #[async_trait]
    impl LeaseArbiter for Scripted {
        fn backend(&self) -> &'static str {
            "scripted"
        }
        fn location(&self) -> String {
            "here".into()
        }
        fn node(&self) -> &str {
            "a"
        }
        fn ttl(&self) -> Duration {
            Duration::from_secs(2)
        }
        async fn acquire_as(&self, domain: &str, _: &LeaseMode) -> Result<Lease, WitnessError> {
            Err(WitnessError::Denied {
                at: "here".into(),
                domain: domain.into(),
                holder: "b".into(),
                remaining: Duration::ZERO,
            })
        }
        async fn preempt(&self, _: &str) -> Result<Lease, WitnessError> {
            Err(WitnessError::Backend("down".into()))
        }
        async fn renew_as(&self, l: &Lease, _: &LeaseMode) -> Result<Lease, WitnessError> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(l.clone())
        }
        async fn release(&self, _: &Lease) -> Result<bool, WitnessError> {
            Ok(true)
        }
        async fn query(&self, _: &str) -> Result<LeaseInfo, WitnessError> {
            Err(WitnessError::Backend("down".into()))
        }
        async fn record_copy(&self, _: &str, _: CopyStamp) -> Result<RecordedCopy, WitnessError> {
            Err(WitnessError::Backend("down".into()))
        }
    }

    /// Counting only: the decorator's own logic (the arbiters themselves are tested against
    /// a real witness and a real etcd).
    #[tokio::test]
    async fn requests_are_counted_by_outcome_and_timed() {
        let m = Metered::new(Arc::new(Scripted));
        let now = tokio::time::Instant::now();
        let lease = Lease {
            domain: "web".into(),
            generation: 1,
            ttl: Duration::from_secs(2),
            sent_at: now,
            expires_at_local: now,
            preemptible: false,
        };
        m.renew(&lease).await.unwrap();
        m.renew(&lease).await.unwrap();
        assert!(m.acquire("web").await.is_err());
        assert!(m.preempt("web").await.is_err());
        let s = m.snapshot();
        let by = |op: &str| s.iter().find(|x| x.op == op).cloned().unwrap();
        assert_eq!((by("renew").ok, by("renew").failed), (2, 0));
        assert!(by("renew").latency_max_us >= 20_000);
        assert!(by("renew").latency_sum_us >= 40_000);
        assert_eq!(by("acquire").denied, 1);
        assert_eq!(by("preempt").failed, 1);
        assert!(
            s.iter().all(|x| x.op != "query"),
            "unasked operations are not listed"
        );
    }
}
