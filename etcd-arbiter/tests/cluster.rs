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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_of_three_leaves_the_lease_held() {
    let mut c = Cluster::start(3).await;
    let (a, b) = (arbiter(&c, "a").await, arbiter(&c, "b").await);
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
