//! The etcd arbiter against a real etcd (Debian's `etcd-server`, started by each test on
//! random ports): the witness's promises, kept by etcd's leases and transactions.

mod support;

use std::sync::Arc;
use std::time::Duration;

use remus_etcd_arbiter::{EtcdArbiter, EtcdError, EtcdSettings};
use remus_ha::lineage::{CopyHolder, CopyStamp};
use remus_ha::witness::{LeaseArbiter, LeaseKeeper, LeaseMode, LeaseState, WitnessError};
use support::Etcd;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);

fn settings(etcd: &Etcd, node: &str, prefix: &str) -> EtcdSettings {
    EtcdSettings::new(node, vec![etcd.endpoint.clone()], prefix, TTL)
}

async fn arbiter(etcd: &Etcd, node: &str) -> Arc<EtcdArbiter> {
    Arc::new(
        EtcdArbiter::connect(settings(etcd, node, "/remus"))
            .await
            .unwrap(),
    )
}

fn denied_holder(r: Result<remus_ha::witness::Lease, WitnessError>) -> String {
    match r {
        Err(WitnessError::Denied { holder, .. }) => holder,
        other => panic!("expected a denial, got {other:?}"),
    }
}

/// Acquire, renew (same generation, nothing written), a second node refused while held,
/// release, and then the second node gets it. A stale release frees nothing.
#[tokio::test]
async fn acquire_renew_release_and_a_second_node_refused() {
    let etcd = Etcd::start().await;
    let (a, b) = (arbiter(&etcd, "a").await, arbiter(&etcd, "b").await);
    let before = Instant::now();
    let l = a.acquire("web").await.unwrap();
    assert!(l.generation > 0);
    assert!(!l.preemptible);
    assert!(l.sent_at >= before);
    assert_eq!(l.expires_at_local, l.sent_at + TTL - TTL / 100);
    assert_eq!(denied_holder(b.acquire("web").await), "a");
    let r = a.renew(&l).await.unwrap();
    assert_eq!(r.generation, l.generation, "a renewal keeps the generation");
    assert!(r.expires_at_local > l.expires_at_local);
    let info = b.query("web").await.unwrap();
    assert_eq!(info.holder.as_deref(), Some("a"));
    assert_eq!(info.generation, l.generation);
    assert!(info.remaining > Duration::ZERO && info.remaining <= TTL);
    // Acquired again by its holder: a new generation; the old one's release frees nothing.
    let again = a.acquire("web").await.unwrap();
    assert!(again.generation > l.generation);
    assert!(
        !a.release(&l).await.unwrap(),
        "a stale release freed the lease"
    );
    assert_eq!(denied_holder(b.acquire("web").await), "a");
    assert!(a.release(&again).await.unwrap());
    assert_eq!(b.query("web").await.unwrap().holder, None);
    let lb = b.acquire("web").await.unwrap();
    assert!(lb.generation > again.generation);
    // Domains are independent.
    a.acquire("db").await.unwrap();
}

/// The holder stops renewing (its keep-alives stop, as when its host dies): etcd deletes
/// the record when the node's etcd lease runs out, and only then does the other node win,
/// after the holder's own view of the lease had ended.
#[tokio::test]
async fn taken_when_the_holders_etcd_lease_expires() {
    let etcd = Etcd::start().await;
    let (a, b) = (arbiter(&etcd, "a").await, arbiter(&etcd, "b").await);
    let l = a.acquire("web").await.unwrap();
    let won = loop {
        match b.acquire("web").await {
            Ok(lb) => break lb,
            Err(WitnessError::Denied { holder, .. }) => assert_eq!(holder, "a"),
            Err(e) => panic!("{e}"),
        }
        assert!(
            l.sent_at.elapsed() < Duration::from_secs(10),
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let at = Instant::now();
    assert!(
        won.sent_at >= l.expires_at_local,
        "b won at {:?} after a's grant, before a's own view ended ({:?})",
        won.sent_at - l.sent_at,
        l.expires_at_local - l.sent_at
    );
    assert!(at - l.sent_at >= TTL, "etcd freed the lease before its TTL");
    // The old holder learns it at its next renewal.
    assert_eq!(denied_holder(a.renew(&l).await), "b");
}

/// A holder that declared its lease preemptible by its backup loses it to that backup at
/// once; not to anyone else, and not to a plain acquire. An exclusive renewal first makes
/// the takeover fail: etcd orders the two.
#[tokio::test]
async fn preemption_only_by_the_named_peer_and_serialised_with_an_exclusive_renewal() {
    let etcd = Etcd::start().await;
    let (a, b, c) = (
        arbiter(&etcd, "a").await,
        arbiter(&etcd, "b").await,
        arbiter(&etcd, "c").await,
    );
    let l = a
        .acquire_as("web", &LeaseMode::PreemptibleBy("b".into()))
        .await
        .unwrap();
    assert!(l.preemptible);
    assert_eq!(denied_holder(b.acquire("web").await), "a", "plain acquire");
    assert_eq!(denied_holder(c.preempt("web").await), "a", "not named");
    let taken = b.preempt("web").await.unwrap();
    assert!(!taken.preemptible);
    assert!(taken.generation > l.generation);
    assert_eq!(denied_holder(a.renew(&l).await), "b");
    assert!(!a.release(&l).await.unwrap());

    // The other order: the holder renews exclusive before the takeover arrives.
    let l = a
        .acquire_as("db", &LeaseMode::PreemptibleBy("b".into()))
        .await
        .unwrap();
    let ex = a.renew(&l).await.unwrap();
    assert!(!ex.preemptible);
    assert!(ex.generation > l.generation, "the mode change was written");
    assert_eq!(denied_holder(b.preempt("db").await), "a");
}

/// Both nodes race: the holder's exclusive renewal and the backup's takeover, many times at
/// once. Exactly one wins each round, never both.
#[tokio::test]
async fn a_racing_takeover_and_exclusive_renewal_never_both_win() {
    let etcd = Etcd::start().await;
    let (a, b) = (arbiter(&etcd, "a").await, arbiter(&etcd, "b").await);
    let mut by_a = 0;
    let mut by_b = 0;
    for round in 0..20 {
        let domain = format!("race{round}");
        let l = a
            .acquire_as(&domain, &LeaseMode::PreemptibleBy("b".into()))
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(a.renew(&l), b.preempt(&domain));
        match (ra, rb) {
            (Ok(_), Err(WitnessError::Denied { holder, .. })) => {
                assert_eq!(holder, "a");
                by_a += 1;
            }
            (Err(WitnessError::Denied { holder, .. }), Ok(_)) => {
                assert_eq!(holder, "b");
                by_b += 1;
            }
            (ra, rb) => panic!("round {round}: {ra:?} / {rb:?}"),
        }
        let holder = a.query(&domain).await.unwrap().holder;
        assert!(holder.is_some());
    }
    assert_eq!(by_a + by_b, 20);
}

/// Copy stamps: the newest recorded wins, older ones do not replace it, and racing
/// recorders leave the newest.
#[tokio::test]
async fn copy_stamps_only_grow() {
    let etcd = Etcd::start().await;
    let (a, b) = (arbiter(&etcd, "a").await, arbiter(&etcd, "b").await);
    let s = |generation, holder| CopyStamp { generation, holder };
    let r = a.record_copy("web", CopyStamp::NONE).await.unwrap();
    assert_eq!(r.stamp, CopyStamp::NONE);
    let r = a.record_copy("web", s(3, CopyHolder::Ran)).await.unwrap();
    assert_eq!(
        (r.stamp, r.node.as_deref()),
        (s(3, CopyHolder::Ran), Some("a"))
    );
    let r = b
        .record_copy("web", s(3, CopyHolder::Received))
        .await
        .unwrap();
    assert_eq!(
        (r.stamp, r.node.as_deref()),
        (s(3, CopyHolder::Ran), Some("a")),
        "an older stamp replaced a newer"
    );
    let r = b.record_copy("web", s(4, CopyHolder::Ran)).await.unwrap();
    assert_eq!(
        (r.stamp, r.node.as_deref()),
        (s(4, CopyHolder::Ran), Some("b"))
    );
    // Racing: 10 stamps from two nodes at once; the largest must remain.
    let mut tasks = Vec::new();
    for g in 5..15u64 {
        let n = if g % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            n.record_copy("web", s(g, CopyHolder::Ran)).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = a.record_copy("web", CopyStamp::NONE).await.unwrap();
    assert_eq!(r.stamp, s(14, CopyHolder::Ran));
    assert_eq!(r.node.as_deref(), Some("a"));
}

/// The lease keeper, unchanged, on the etcd arbiter: it acquires, keeps the lease over
/// several TTLs, switches mode, and hands it back on stop.
#[tokio::test]
async fn the_lease_keeper_keeps_an_etcd_lease() {
    let etcd = Etcd::start().await;
    let (a, b) = (arbiter(&etcd, "a").await, arbiter(&etcd, "b").await);
    let keeper = LeaseKeeper::spawn(a.clone(), "web".into(), None);
    let mut st = keeper.state();
    tokio::time::timeout(
        Duration::from_secs(3),
        st.wait_for(|s| matches!(s, LeaseState::Held { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    let until = Instant::now() + TTL * 3;
    while Instant::now() < until {
        assert!(
            keeper.is_held(),
            "the keeper lost the lease: {:?}",
            *st.borrow()
        );
        assert_eq!(denied_holder(b.acquire("web").await), "a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    keeper.set_mode(LeaseMode::PreemptibleBy("b".into()));
    tokio::time::timeout(
        Duration::from_secs(3),
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
    .unwrap()
    .unwrap();
    keeper.stop(true).await.unwrap();
    assert_eq!(b.query("web").await.unwrap().holder, None);
    b.acquire("web").await.unwrap();
}

/// One etcd lease per node: every domain's holder record hangs on it.
#[tokio::test]
async fn one_etcd_lease_per_node() {
    let etcd = Etcd::start().await;
    let a = arbiter(&etcd, "a").await;
    a.acquire("web").await.unwrap();
    a.acquire("db").await.unwrap();
    let mut c = etcd.client().await;
    let mut leases = Vec::new();
    for k in ["/remus/domains/web/holder", "/remus/domains/db/holder"] {
        leases.push(c.get(k, None).await.unwrap().kvs()[0].lease());
    }
    assert_ne!(leases[0], 0);
    assert_eq!(leases[0], leases[1]);
    assert_eq!(c.leases().await.unwrap().leases().len(), 1);
}

/// Wrong credentials are refused at connect, by name; the right ones work.
#[tokio::test]
async fn wrong_credentials_are_a_clear_error() {
    let etcd = Etcd::start().await;
    etcd.enable_auth("s3cret").await;
    let mut s = settings(&etcd, "a", "/remus");
    s.user = Some(("root".into(), "wrong".into()));
    let e = EtcdArbiter::connect(s.clone()).await.unwrap_err();
    assert!(matches!(e, EtcdError::Auth { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&etcd.endpoint) && msg.contains("\"root\"") && msg.contains("refused"),
        "{msg}"
    );
    s.user = Some(("root".into(), "s3cret".into()));
    let a = EtcdArbiter::connect(s).await.unwrap();
    a.check_domains(&["web".into()]).await.unwrap();
    a.acquire("web").await.unwrap();
    // Without credentials on an etcd that requires them: refused by the first request.
    let anon = EtcdArbiter::connect(settings(&etcd, "b", "/remus"))
        .await
        .unwrap();
    let e = anon.check_domains(&["web".into()]).await.unwrap_err();
    assert!(e.to_string().contains(&etcd.endpoint), "{e}");
}

/// An endpoint nobody listens on: a clear error naming it, in bounded time.
#[tokio::test]
async fn an_unreachable_endpoint_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let s = EtcdSettings::new("a", vec![endpoint.clone()], "/remus", TTL);
    let started = Instant::now();
    let e = match EtcdArbiter::connect(s).await {
        Err(e) => e,
        Ok(a) => a.check_domains(&["web".into()]).await.unwrap_err(),
    };
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains(&endpoint), "{e}");
    // With credentials the connection authenticates at once, so connect fails.
    let mut s = EtcdSettings::new("a", vec![endpoint.clone()], "/remus", TTL);
    s.user = Some(("root".into(), "x".into()));
    let e = EtcdArbiter::connect(s).await.unwrap_err();
    assert!(
        matches!(e, EtcdError::Connect { .. } | EtcdError::Timeout { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains(&endpoint), "{e}");
}

/// A prefix that holds another program's data is refused by name, at the start check and
/// at a grant; nothing of it is overwritten.
#[tokio::test]
async fn a_prefix_holding_foreign_data_is_a_clear_error() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.put("/site/registry/pods/x", "{\"kind\":\"Pod\"}", None)
        .await
        .unwrap();
    let a = EtcdArbiter::connect(settings(&etcd, "a", "/site"))
        .await
        .unwrap();
    let e = a.check_domains(&["web".into()]).await.unwrap_err();
    assert!(matches!(e, EtcdError::Foreign { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("/site/registry/pods/x") && msg.contains("prefix"),
        "{msg}"
    );
    // A holder key with a value that is not ours: the grant refuses, names the key, and the
    // value stays.
    c.put("/other/domains/web/holder", "leader=x", None)
        .await
        .unwrap();
    let a = EtcdArbiter::connect(settings(&etcd, "a", "/other"))
        .await
        .unwrap();
    let e = a.acquire("web").await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("/other/domains/web/holder") && msg.contains("not written by remus-agent"),
        "{msg}"
    );
    let v = c.get("/other/domains/web/holder", None).await.unwrap();
    assert_eq!(v.kvs()[0].value(), b"leader=x");
    assert!(a.check_domains(&["web".into()]).await.is_err());
    // A clean prefix passes.
    let a = EtcdArbiter::connect(settings(&etcd, "a", "/remus"))
        .await
        .unwrap();
    a.acquire("web").await.unwrap();
    a.record_copy("web", CopyStamp::NONE).await.unwrap();
    a.check_domains(&["web".into()]).await.unwrap();
}

/// etcd's role-based access: a node whose role may write only its own domain's keys holds
/// that domain's lease, is refused another's by a clear error, and passes the start check
/// on its own keys.
#[tokio::test]
async fn a_node_limited_to_its_own_domains_keys() {
    use etcd_client::{Permission, PermissionType};
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.role_add("remus-web").await.unwrap();
    c.role_grant_permission(
        "remus-web",
        Permission::new(PermissionType::Readwrite, "/remus/domains/web/").with_prefix(),
    )
    .await
    .unwrap();
    c.user_add("node-a", "pw-a", None).await.unwrap();
    c.user_grant_role("node-a", "remus-web").await.unwrap();
    etcd.enable_auth("rootpw").await;
    let mut s = settings(&etcd, "a", "/remus");
    s.user = Some(("node-a".into(), "pw-a".into()));
    let a = EtcdArbiter::connect(s).await.unwrap();
    a.check_domains(&["web".into()]).await.unwrap();
    a.acquire("web").await.unwrap();
    a.record_copy("web", CopyStamp::NONE).await.unwrap();
    let e = a.acquire("db").await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("permission denied") && msg.contains("/remus/domains/db/holder"),
        "{msg}"
    );
    let e = a.check_domains(&["db".into()]).await.unwrap_err();
    assert!(matches!(e, EtcdError::PermissionDenied { .. }), "{e:?}");
}

/// Names that cannot be part of a key are refused before anything is sent.
#[tokio::test]
async fn bad_names_and_prefixes_are_refused() {
    let etcd = Etcd::start().await;
    let e = EtcdArbiter::connect(settings(&etcd, "a", "remus"))
        .await
        .unwrap_err();
    assert!(matches!(e, EtcdError::BadPrefix { .. }), "{e:?}");
    let e = EtcdArbiter::connect(settings(&etcd, "a/b", "/remus"))
        .await
        .unwrap_err();
    assert!(matches!(e, EtcdError::BadName { .. }), "{e:?}");
    let a = arbiter(&etcd, "a").await;
    let e = a.acquire("web/../db").await.unwrap_err();
    assert!(e.to_string().contains("cannot be part of a key"), "{e}");
}
