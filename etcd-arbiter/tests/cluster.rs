//! The etcd arbiter on a three-member etcd cluster (Debian's `etcd-server`, local ports):
//! the loss of one member — the leader, the worst case — leaves a held lease held and, once
//! a new leader is elected, every request answered (by the live members); the loss
//! of the quorum makes the holder give it up by its own clock, and when the quorum returns
//! the lease is never held by two nodes at once.

mod support;

use std::sync::Arc;
use std::time::Duration;

use remus_etcd_arbiter::{EtcdArbiter, EtcdSettings};
use remus_ha::witness::{LeaseArbiter, LeaseKeeper, LeaseState, WitnessError};
use support::Cluster;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
/// Time allowed for electing a new leader after the leader was killed (etcd's default
/// election timeout is 1 s, randomised up to 2 s).
const ELECTION: Duration = Duration::from_secs(3);

async fn arbiter(c: &Cluster, node: &str) -> Arc<EtcdArbiter> {
    Arc::new(
        EtcdArbiter::connect(EtcdSettings::new(node, c.endpoints(), "/remus", TTL))
            .await
            .unwrap(),
    )
}

async fn held(k: &LeaseKeeper) {
    let mut st = k.state();
    tokio::time::timeout(
        Duration::from_secs(5),
        st.wait_for(|s| matches!(s, LeaseState::Held { .. })),
    )
    .await
    .expect("the keeper did not acquire the lease")
    .unwrap();
}

/// With a lease of 4 s (what `config check` asks of a cluster): renewed every 1.3 s, it
/// outlives the election of a new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_of_three_leaves_the_lease_held() {
    const TTL: Duration = Duration::from_secs(4);
    let mut c = Cluster::start(3).await;
    let arbiter = |node: &'static str| {
        let eps = c.endpoints();
        async move {
            Arc::new(
                EtcdArbiter::connect(EtcdSettings::new(node, eps, "/remus", TTL))
                    .await
                    .unwrap(),
            )
        }
    };
    let (a, b) = (arbiter("a").await, arbiter("b").await);
    let keeper = LeaseKeeper::spawn(a.clone(), "web".into(), None);
    held(&keeper).await;
    let leader = c.leader().await;
    c.kill(leader);
    let killed_at = Instant::now();
    // Through the election and well past a TTL: held all along, never granted to b.
    let mut denied = 0;
    while killed_at.elapsed() < TTL * 3 {
        assert!(
            keeper.is_held(),
            "the lease was lost {:?} after the leader (member {leader}) was killed: {:?}",
            killed_at.elapsed(),
            *keeper.state().borrow()
        );
        let asked_at = killed_at.elapsed();
        match b.acquire("web").await {
            Err(WitnessError::Denied { holder, .. }) => {
                assert_eq!(holder, "a");
                denied += 1;
            }
            Ok(l) => panic!("b was granted a held lease: {l:?}"),
            // A request that met the election is not a grant; once a leader is elected,
            // the dead member must not fail requests (they go to the live ones).
            Err(e) => assert!(
                asked_at < ELECTION,
                "b's request sent {asked_at:?} after the kill failed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(denied > 0, "b was never even answered");
    keeper.stop(true).await.unwrap();
    b.acquire("web").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_then_back_never_two_holders() {
    let mut c = Cluster::start(3).await;
    let (a, b) = (arbiter(&c, "a").await, arbiter(&c, "b").await);
    let ka = LeaseKeeper::spawn(a.clone(), "web".into(), None);
    held(&ka).await;
    let kb = LeaseKeeper::spawn(b.clone(), "web".into(), None);
    let (sa, sb) = (ka.state(), kb.state());
    let both = |now| sa.borrow().held_at(now) && sb.borrow().held_at(now);
    let watch_for = |d: Duration| {
        let (sa, sb) = (sa.clone(), sb.clone());
        async move {
            let end = Instant::now() + d;
            let mut a_lost_at = None;
            while Instant::now() < end {
                let now = Instant::now();
                let (ha, hb) = (sa.borrow().held_at(now), sb.borrow().held_at(now));
                assert!(!(ha && hb), "a and b both hold the lease");
                if !ha && a_lost_at.is_none() {
                    a_lost_at = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            a_lost_at
        }
    };
    assert!(!both(Instant::now()));
    // Quorum lost: a can renew nowhere; it must give the lease up by its own clock, at most
    // a TTL after its last renewal, and b must not get it.
    c.kill(0);
    c.kill(1);
    let lost_at = Instant::now();
    let a_lost = watch_for(TTL * 2)
        .await
        .expect("a kept the lease without a quorum");
    assert!(
        a_lost - lost_at <= TTL,
        "a noticed after {:?}",
        a_lost - lost_at
    );
    assert!(
        !sb.borrow().held_at(Instant::now()),
        "b holds without a quorum"
    );
    // Quorum back: exactly one holds from then on, never both.
    c.restart(0);
    c.restart(1);
    c.wait_ready().await;
    watch_for(TTL * 4).await;
    let now = Instant::now();
    let holders = [sa.borrow().held_at(now), sb.borrow().held_at(now)];
    assert_eq!(
        holders.iter().filter(|h| **h).count(),
        1,
        "after the quorum returned: a {:?}, b {:?}",
        *sa.borrow(),
        *sb.borrow()
    );
    ka.stop(false).await.unwrap();
    kb.stop(false).await.unwrap();
}

/// Two pairs (nodes a1/b1 protecting `web`, a2/b2 protecting `db`) share one etcd cluster
/// and fail over at the same moment: each backup takes its own domain's lease at once (held
/// preemptible by it), neither touches the other pair's, and each domain ends on exactly one
/// node. Then both pairs race a takeover against an exclusive renewal at once: still one
/// holder per domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pairs_on_one_cluster_fail_over_at_once() {
    use remus_ha::witness::LeaseMode;
    let c = Cluster::start(3).await;
    let (a1, b1, a2, b2) = (
        arbiter(&c, "a1").await,
        arbiter(&c, "b1").await,
        arbiter(&c, "a2").await,
        arbiter(&c, "b2").await,
    );
    let k1 = LeaseKeeper::spawn(a1.clone(), "web".into(), None);
    let k2 = LeaseKeeper::spawn(a2.clone(), "db".into(), None);
    k1.set_mode(LeaseMode::PreemptibleBy("b1".into()));
    k2.set_mode(LeaseMode::PreemptibleBy("b2".into()));
    for k in [&k1, &k2] {
        let mut st = k.state();
        tokio::time::timeout(
            Duration::from_secs(5),
            st.wait_for(|s| {
                matches!(
                    s,
                    LeaseState::Held {
                        preemptible: true,
                        ..
                    }
                )
            }),
        )
        .await
        .expect("not held preemptible")
        .unwrap();
    }
    // A backup of one pair cannot take the other pair's domain.
    assert!(matches!(
        b2.preempt("web").await,
        Err(WitnessError::Denied { .. })
    ));
    // Both primaries die (their keepers stop, the leases are not released) and both
    // backups take over at the same moment.
    k1.stop(false).await.unwrap();
    k2.stop(false).await.unwrap();
    let (r1, r2) = tokio::join!(b1.preempt("web"), b2.preempt("db"));
    let (l1, l2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(a1.query("web").await.unwrap().holder.as_deref(), Some("b1"));
    assert_eq!(a2.query("db").await.unwrap().holder.as_deref(), Some("b2"));
    assert!(matches!(
        a1.acquire("web").await,
        Err(WitnessError::Denied { holder, .. }) if holder == "b1"
    ));
    assert!(matches!(
        a2.acquire("db").await,
        Err(WitnessError::Denied { holder, .. }) if holder == "b2"
    ));
    // The new primaries hold their leases preemptible by their old primaries, which race
    // a takeover against the exclusive renewals, both pairs at once.
    let l1 = b1
        .renew_as(&l1, &LeaseMode::PreemptibleBy("a1".into()))
        .await
        .unwrap();
    let l2 = b2
        .renew_as(&l2, &LeaseMode::PreemptibleBy("a2".into()))
        .await
        .unwrap();
    let (x1, y1, x2, y2) = tokio::join!(
        b1.renew(&l1),
        a1.preempt("web"),
        b2.renew(&l2),
        a2.preempt("db")
    );
    for (domain, renewal, takeover) in [("web", x1, y1), ("db", x2, y2)] {
        assert!(
            renewal.is_ok() != takeover.is_ok(),
            "{domain}: renewal {renewal:?}, takeover {takeover:?}"
        );
    }
    for (domain, pair) in [("web", ["a1", "b1"]), ("db", ["a2", "b2"])] {
        let holder = a1.query(domain).await.unwrap().holder.unwrap();
        assert!(pair.contains(&holder.as_str()), "{domain} held by {holder}");
    }
}
