//! The witness for real: the server in-process and as the `remus-witness` binary, clients
//! over loopback UDP.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use remus_ha::lineage::{CopyHolder, CopyStamp};
use remus_ha::witness::{
    LeaseKeeper, LeaseMode, LeaseState, Op, Request, Response, Status, WitnessClient,
    WitnessClientConfig, WitnessError, WitnessServer, WitnessServerConfig,
};
use remus_ha::HaKey;
use remus_keys::NodeKey;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout, Instant};

const MATERIAL: &[u8] = b"witness test key material, 32+ bytes";

fn key() -> HaKey {
    HaKey::derive(MATERIAL).unwrap()
}

fn lo() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, (std::process::id() % 250) as u8 + 1, 7])
}

struct Running {
    addr: SocketAddr,
    stats: Arc<remus_ha::witness::WitnessStats>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn witness() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WitnessServerConfig::new(
        SocketAddr::new(lo(), 0),
        key(),
        dir.path().join("witness.json"),
    );
    let server = WitnessServer::bind(cfg).await.unwrap();
    let (addr, stats) = (server.local_addr(), server.stats());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running {
        addr,
        stats,
        stop: Some(tx),
        _dir: dir,
    }
}

async fn client(node: &str, addr: SocketAddr, ttl: Duration) -> Arc<WitnessClient> {
    let cfg = WitnessClientConfig {
        ttl,
        attempt_timeout: Duration::from_millis(400),
        ..WitnessClientConfig::new(node, addr, key())
    };
    Arc::new(WitnessClient::new(cfg).await.unwrap())
}

fn denied_by(r: Result<remus_ha::witness::Lease, WitnessError>) -> String {
    match r {
        Err(WitnessError::Denied { holder, .. }) => holder,
        other => panic!("expected denial, got {other:?}"),
    }
}

/// Acquires repeatedly until granted; returns the lease and when the grant was seen.
async fn acquire_eventually(
    c: &WitnessClient,
    domain: &str,
) -> (remus_ha::witness::Lease, Instant) {
    timeout(Duration::from_secs(10), async {
        loop {
            match c.acquire(domain).await {
                Ok(l) => return (l, Instant::now()),
                Err(WitnessError::Denied { .. }) => sleep(Duration::from_millis(10)).await,
                // The witness fsyncs its table before every answer: on a loaded machine an
                // answer can take longer than this client's short attempt timeouts.
                Err(WitnessError::Unreachable { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("lease never granted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_of_two_competing_clients_holds_the_lease() {
    let w = witness().await;
    let ttl = Duration::from_millis(600);
    let (a, b) = (
        client("alpha", w.addr, ttl).await,
        client("beta", w.addr, ttl).await,
    );

    let la = a.acquire("web").await.unwrap();
    assert_eq!(denied_by(b.acquire("web").await), "alpha");
    // Another domain is independent.
    b.acquire("db").await.unwrap();
    // Renewal keeps the generation; the other node still cannot get it.
    let la = a.renew(&la).await.unwrap();
    assert_eq!(denied_by(b.acquire("web").await), "alpha");

    // Released: the other wins at once.
    assert!(a.release(&la).await.unwrap());
    let lb = b.acquire("web").await.unwrap();
    assert_eq!(denied_by(a.acquire("web").await), "beta");

    // Not renewed: the other wins only after the holder's own view has ended.
    let (la2, won_at) = acquire_eventually(&a, "web").await;
    println!(
        "beta's view ended {:?} after its request; alpha won {:?} after it",
        lb.expires_at_local - lb.sent_at,
        won_at - lb.sent_at
    );
    assert!(
        won_at > lb.expires_at_local,
        "granted before the holder's view expired"
    );
    assert!(won_at - lb.sent_at >= ttl);
    assert!(la2.generation > lb.generation);
    // The old holder's late release of its generation does nothing.
    assert!(!b.release(&lb).await.unwrap());
    assert_eq!(denied_by(b.acquire("web").await), "alpha");
    assert_eq!(
        w.stats
            .dropped_bad_tag
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holders_view_ends_before_the_witnesss() {
    let w = witness().await;
    let (a, b) = (
        client("alpha", w.addr, Duration::from_secs(2)).await,
        client("beta", w.addr, Duration::from_secs(2)).await,
    );
    let lease = a.acquire("web").await.unwrap();
    let before_query = Instant::now();
    let info = b.query("web").await.unwrap();
    assert_eq!(info.holder.as_deref(), Some("alpha"));
    // The witness's expiry is at least `before_query + remaining` (it measured `remaining`
    // after this instant); the holder's must come strictly earlier.
    let witness_expiry_lower_bound = before_query + info.remaining;
    println!(
        "holder's view ends {:?} before the witness's (at least)",
        witness_expiry_lower_bound - lease.expires_at_local
    );
    assert!(lease.expires_at_local < witness_expiry_lower_bound);
    assert!(lease.expires_at_local - lease.sent_at <= Duration::from_millis(1980));
}

/// Waits until the keeper reports the lease held in the given mode.
async fn held_as(st: &mut tokio::sync::watch::Receiver<LeaseState>, preemptible: bool) {
    timeout(
        Duration::from_secs(5),
        st.wait_for(|s| matches!(s, LeaseState::Held { preemptible: p, .. } if *p == preemptible)),
    )
    .await
    .expect("the keeper holds the lease in the mode asked")
    .unwrap();
}

/// The backup's fencing takes a lease its primary declared preemptible by it at once; the
/// primary's keeper hears "denied" at its next renewal. A lease held exclusive, or
/// preemptible by another node, is not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_a_preemptible_lease_at_once_and_only_that() {
    let w = witness().await;
    let ttl = Duration::from_millis(1500);
    let (a, b, c) = (
        client("alpha", w.addr, ttl).await,
        client("beta", w.addr, ttl).await,
        client("gamma", w.addr, ttl).await,
    );
    let keeper = LeaseKeeper::spawn(a.clone(), "web".into(), None);
    keeper.set_mode(LeaseMode::PreemptibleBy("beta".into()));
    let mut st = keeper.state();
    held_as(&mut st, true).await;
    // Only the named peer may take it, and only by asking to.
    assert_eq!(denied_by(c.preempt("web").await), "alpha");
    assert_eq!(denied_by(b.acquire("web").await), "alpha");
    // Exclusive again: the named peer is refused as well.
    keeper.set_mode(LeaseMode::Exclusive);
    held_as(&mut st, false).await;
    assert_eq!(denied_by(b.preempt("web").await), "alpha");
    // Preemptible again; the backup takes it long before the lease could run out.
    keeper.set_mode(LeaseMode::PreemptibleBy("beta".into()));
    held_as(&mut st, true).await;
    let asked = Instant::now();
    let taken = b
        .preempt("web")
        .await
        .expect("the named backup takes the lease");
    let took = asked.elapsed();
    assert!(!taken.preemptible, "the taker holds it exclusive");
    println!("preempted in {took:?} (lease {ttl:?})");
    // The old holder learns at its next renewal (TTL/3) that the peer has it.
    timeout(
        ttl,
        st.wait_for(|s| matches!(s, LeaseState::Denied { holder } if holder == "beta")),
    )
    .await
    .expect("the old holder hears that the lease was taken before it could expire")
    .unwrap();
    assert!(!keeper.is_held());
    // And cannot take it back.
    assert_eq!(denied_by(a.preempt("web").await), "beta");
    keeper.stop(false).await.unwrap();
}

/// What v0.1.0 sends (a version-2 acquire, no flags) is served as before, in version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_request_is_answered_in_version_2() {
    let w = witness().await;
    let raw = UdpSocket::bind((lo(), 0)).await.unwrap();
    let req = Request {
        op: Op::Acquire,
        node: "old-node".into(),
        domain: "web".into(),
        nonce: 1,
        generation: 0,
        ttl_ms: 1000,
        copy: CopyStamp::NONE,
        version: remus_ha::witness::VERSION_2,
        flags: 0,
        peer: String::new(),
    };
    let bytes = req.encode(&key()).unwrap();
    assert_eq!((bytes[4], &bytes[37..40]), (2, &[0u8, 0, 0][..]));
    raw.send_to(&bytes, w.addr).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = timeout(Duration::from_secs(5), raw.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    // Byte 4 is the version, byte 31 was reserved (zero) in version 2.
    assert_eq!((buf[4], buf[31]), (2, 0));
    let r = Response::decode(&key(), &buf[..n]).unwrap();
    assert_eq!((r.status, r.version, r.flags), (Status::Granted, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_holds_the_lease_and_reports_loss_at_local_expiry() {
    let w = witness().await;
    let ttl = Duration::from_millis(600);
    let (a, b) = (
        client("alpha", w.addr, ttl).await,
        client("beta", w.addr, ttl).await,
    );
    let keeper = LeaseKeeper::spawn(a.clone(), "web".into(), None);
    let mut st = keeper.state();
    timeout(
        Duration::from_secs(5),
        st.wait_for(|s| matches!(s, LeaseState::Held { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    // Renewed every TTL/3: the other node is denied for several TTLs.
    let end = Instant::now() + ttl * 3;
    while Instant::now() < end {
        assert_eq!(denied_by(b.acquire("web").await), "alpha");
        assert!(keeper.is_held());
        sleep(Duration::from_millis(100)).await;
    }
    // The witness goes away: the keeper says Lost at its local expiry, with no answer.
    let until = match &*st.borrow() {
        LeaseState::Held { until, .. } => *until,
        s => panic!("{s:?}"),
    };
    drop(w);
    timeout(
        Duration::from_secs(5),
        st.wait_for(|s| *s == LeaseState::Lost),
    )
    .await
    .unwrap()
    .unwrap();
    let late = Instant::now().saturating_duration_since(until);
    println!("keeper reported Lost {late:?} after the local expiry");
    assert!(Instant::now() >= until);
    assert!(!keeper.is_held());
    keeper.stop(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_stop_with_release_hands_over_at_once() {
    let w = witness().await;
    let ttl = Duration::from_secs(5);
    let (a, b) = (
        client("alpha", w.addr, ttl).await,
        client("beta", w.addr, ttl).await,
    );
    let keeper = LeaseKeeper::spawn(a.clone(), "web".into(), None);
    timeout(
        Duration::from_secs(5),
        keeper
            .state()
            .wait_for(|s| matches!(s, LeaseState::Held { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    let kb = LeaseKeeper::spawn(b.clone(), "web".into(), None);
    timeout(
        Duration::from_secs(5),
        kb.state()
            .wait_for(|s| matches!(s, LeaseState::Denied { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    keeper.stop(true).await.unwrap();
    // Far sooner than the 5 s TTL: beta's keeper retries every TTL/3 ≈ 1.7 s at most.
    let t = Instant::now();
    timeout(
        Duration::from_secs(4),
        kb.state()
            .wait_for(|s| matches!(s, LeaseState::Held { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    println!(
        "beta's keeper held the released lease {:?} later",
        t.elapsed()
    );
    kb.stop(true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tag_and_replayed_requests_are_refused() {
    let w = witness().await;
    let wrong = WitnessClientConfig {
        attempt_timeout: Duration::from_millis(100),
        ..WitnessClientConfig::new(
            "alpha",
            w.addr,
            HaKey::derive(b"not the witness key, but long enough").unwrap(),
        )
    };
    let wrong = WitnessClient::new(wrong).await.unwrap();
    match wrong.acquire("web").await {
        Err(WitnessError::Unreachable { attempts: 3, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        w.stats
            .dropped_bad_tag
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );

    // A captured request sent twice: answered once, then dropped as a replay.
    let raw = UdpSocket::bind((lo(), 0)).await.unwrap();
    let req = Request {
        op: Op::Acquire,
        node: "mallory-replay".into(),
        domain: "web".into(),
        nonce: 1_000,
        generation: 0,
        ttl_ms: 1000,
        copy: CopyStamp::NONE,
        version: remus_ha::witness::VERSION_3,
        flags: 0,
        peer: String::new(),
    }
    .encode(&key())
    .unwrap();
    let mut buf = [0u8; 2048];
    raw.send_to(&req, w.addr).await.unwrap();
    timeout(Duration::from_secs(2), raw.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    raw.send_to(&req, w.addr).await.unwrap();
    assert!(timeout(Duration::from_millis(300), raw.recv_from(&mut buf))
        .await
        .is_err());
    assert_eq!(
        w.stats
            .dropped_replay
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The replay did not extend anything: a legitimate client sees the first grant only.
    let b = client("beta", w.addr, Duration::from_secs(1)).await;
    assert_eq!(denied_by(b.acquire("web").await), "mallory-replay");
}

/// The `remus-witness` binary, started for real.
struct WitnessProcess {
    child: Child,
    addr: SocketAddr,
}

impl WitnessProcess {
    fn start(listen: SocketAddr, key_file: &Path, state: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_remus-witness"))
            .args(["--listen", &listen.to_string(), "--key-file"])
            .arg(key_file)
            .arg("--state-file")
            .arg(state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn remus-witness");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real `remus-witness` process with its key and state files in a temporary directory,
/// and clients "alpha" and "beta" of it with a 1.5 s lease.
struct ProcessPair {
    /// Kept for the witness's files; removed with the pair.
    _dir: tempfile::TempDir,
    key_file: std::path::PathBuf,
    state: std::path::PathBuf,
    w: WitnessProcess,
    addr: SocketAddr,
    ttl: Duration,
    a: Arc<WitnessClient>,
    b: Arc<WitnessClient>,
}

async fn process_pair() -> ProcessPair {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("psk");
    std::fs::write(&key_file, MATERIAL).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let state = dir.path().join("witness.json");
    let w = WitnessProcess::start(SocketAddr::new(lo(), 0), &key_file, &state);
    let addr = w.addr;
    let ttl = Duration::from_millis(1500);
    let (a, b) = (
        client("alpha", addr, ttl).await,
        client("beta", addr, ttl).await,
    );
    ProcessPair {
        _dir: dir,
        key_file,
        state,
        w,
        addr,
        ttl,
        a,
        b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_witness_does_not_grant_a_lease_again_within_its_ttl() {
    let mut p = process_pair().await;
    let la = p.a.acquire("web").await.unwrap();
    // The grant was durable before the answer.
    let persisted = std::fs::read_to_string(&p.state).unwrap();
    assert!(persisted.contains("\"holder\": \"alpha\""), "{persisted}");

    // Crash and restart on the same address.
    p.w.kill();
    let restarted_at = Instant::now();
    let _w2 = WitnessProcess::start(p.addr, &p.key_file, &p.state);
    assert_eq!(denied_by(p.b.acquire("web").await), "alpha");
    let (lb, won_at) = acquire_eventually(&p.b, "web").await;
    println!(
        "after restart: beta won {:?} after the restart began (TTL {:?}); alpha's own view had \
         ended {:?} before that",
        won_at - restarted_at,
        p.ttl,
        won_at.saturating_duration_since(la.expires_at_local)
    );
    assert!(won_at - restarted_at >= p.ttl, "re-granted early");
    assert!(
        lb.generation > la.generation,
        "generations continue across restarts"
    );
    // Replay counters survived too: alpha's old nonces are still refused, new ones work.
    assert_eq!(denied_by(p.a.acquire("web").await), "beta");
}

/// The real `remus-witness` keeps the newest copy stamp per domain, names the node that
/// recorded it, and still knows it after a crash and restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_witness_remembers_the_newest_copy_across_a_restart() {
    let mut p = process_pair().await;
    let stamp = |generation, holder| CopyStamp { generation, holder };
    let (ran1, ran2) = (stamp(1, CopyHolder::Ran), stamp(2, CopyHolder::Ran));
    // (who records, what, the newest the witness then answers, recorded by)
    let steps = [
        (&p.a, ran1, ran1, "alpha"),
        (&p.b, ran2, ran2, "beta"),
        // alpha, asking with its older copy, learns of beta's newer one.
        (&p.a, ran1, ran2, "beta"),
    ];
    for (i, (c, sent, newest, by)) in steps.into_iter().enumerate() {
        let r = c.record_copy("web", sent).await.unwrap();
        assert_eq!((r.stamp, r.node.as_deref()), (newest, Some(by)), "step {i}");
    }

    p.w.kill();
    let _w2 = WitnessProcess::start(p.addr, &p.key_file, &p.state);
    let r = p.a.record_copy("web", CopyStamp::NONE).await.unwrap();
    assert_eq!(
        (r.stamp, r.node.as_deref()),
        (stamp(2, CopyHolder::Ran), Some("beta")),
        "the newest stamp was durable before the answer"
    );
    let r = p.a.record_copy("db", CopyStamp::NONE).await.unwrap();
    assert_eq!((r.stamp, r.node), (CopyStamp::NONE, None));
}

/// Runs `remus-witness` with a key file holding `material` at `mode`; returns its stderr
/// (it must have refused to start) and the key file's path.
fn witness_with_key(material: &[u8], mode: u32) -> (String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("psk");
    std::fs::write(&key_file, material).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(mode),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_remus-witness"))
        .args(["--listen", "127.0.0.1:0", "--key-file"])
        .arg(&key_file)
        .arg("--state-file")
        .arg(dir.path().join("s.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    (String::from_utf8_lossy(&out.stderr).into_owned(), key_file)
}

#[test]
fn witness_binary_refuses_a_short_key_file() {
    let (err, _) = witness_with_key(b"short", 0o600);
    assert!(err.contains("at least 32 required"), "{err}");
}

#[test]
fn witness_binary_refuses_a_key_file_others_can_read() {
    let (err, key_file) = witness_with_key(MATERIAL, 0o640);
    let want = format!("{}: mode 0640 lets its group read it", key_file.display());
    assert!(err.contains(&want), "{err}");
}

/// A witness with per-node keys: alpha pinned twice (a rotation), beta once, and the shared
/// key for nodes it has no pin for.
async fn keyed_witness(witness: &NodeKey, pins: &[(&str, &NodeKey)]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = remus_ha::witness::WitnessKeys {
        shared: Some(key()),
        ..Default::default()
    };
    for (name, node) in pins {
        let secret = witness.shared_secret(&node.public()).unwrap();
        keys.nodes
            .entry((*name).to_owned())
            .or_default()
            .push(HaKey::for_witness(&secret, name));
    }
    let cfg = WitnessServerConfig::with_keys(
        SocketAddr::new(lo(), 0),
        keys,
        dir.path().join("witness.json"),
    );
    let server = WitnessServer::bind(cfg).await.unwrap();
    let (addr, stats) = (server.local_addr(), server.stats());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running {
        addr,
        stats,
        stop: Some(tx),
        _dir: dir,
    }
}

/// A client speaking as `name` under the key `node` shares with the witness.
async fn keyed_client(
    name: &str,
    node: &NodeKey,
    witness: &NodeKey,
    addr: SocketAddr,
) -> Arc<WitnessClient> {
    let secret = node.shared_secret(&witness.public()).unwrap();
    let cfg = WitnessClientConfig {
        ttl: Duration::from_millis(600),
        attempt_timeout: Duration::from_millis(200),
        attempts: 2,
        ..WitnessClientConfig::new(name, addr, HaKey::for_witness(&secret, name))
    };
    Arc::new(WitnessClient::new(cfg).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_keys_authenticate_each_node_and_refuse_impersonation() {
    let k = |b: u8| NodeKey::from_private([b; 32]);
    let (w_key, alpha_old, alpha_new, beta, mallory) = (k(1), k(2), k(3), k(4), k(5));
    let w = keyed_witness(
        &w_key,
        &[
            ("alpha", &alpha_old),
            ("alpha", &alpha_new),
            ("beta", &beta),
        ],
    )
    .await;
    let beta_c = keyed_client("beta", &beta, &w_key, w.addr).await;
    beta_c.acquire("web").await.unwrap();

    // Alpha under either of its pinned keys (a rotation) is answered as alpha.
    for alpha_key in [&alpha_old, &alpha_new] {
        let c = keyed_client("alpha", alpha_key, &w_key, w.addr).await;
        assert_eq!(denied_by(c.acquire("web").await), "beta");
    }

    // Refused, never answered: beta's key speaking as alpha (a node impersonating its
    // peer), an unpinned key as beta, and the shared key as a pinned node.
    let before = w
        .stats
        .dropped_bad_tag
        .load(std::sync::atomic::Ordering::Relaxed);
    let impostors = [
        keyed_client("alpha", &beta, &w_key, w.addr).await,
        keyed_client("beta", &mallory, &w_key, w.addr).await,
        {
            let cfg = WitnessClientConfig {
                attempt_timeout: Duration::from_millis(200),
                attempts: 2,
                ..WitnessClientConfig::new("beta", w.addr, key())
            };
            Arc::new(WitnessClient::new(cfg).await.unwrap())
        },
    ];
    for c in &impostors {
        match c.acquire("db").await {
            Err(WitnessError::Unreachable { .. }) => {}
            other => panic!("an impostor was answered: {other:?}"),
        }
    }
    let dropped = w
        .stats
        .dropped_bad_tag
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert!(dropped >= 3, "{dropped} datagrams dropped for a bad tag");

    // A node without a pin still uses the shared key (pairs not yet moved to keys mode).
    client("gamma", w.addr, Duration::from_millis(600))
        .await
        .acquire("db")
        .await
        .unwrap();
}
