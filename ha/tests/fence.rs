//! Fencers with real processes and a real witness.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use remus_ha::fence::{
    AttemptFailure, CommandFencer, FenceError, Fencer, NoFencer, RandomDelay, WitnessFencer,
};
use remus_ha::role::FenceProof;
use remus_ha::witness::{WitnessClient, WitnessClientConfig, WitnessServer, WitnessServerConfig};
use remus_ha::HaKey;
use tokio::time::Instant;

fn cmd(argv: &[&str], timeout_ms: u64, retries: u32) -> CommandFencer {
    CommandFencer::new(
        argv.iter().map(|s| s.to_string()).collect(),
        Duration::from_millis(timeout_ms),
        retries,
    )
    .unwrap()
    .with_retry_delay(Duration::from_millis(50))
}

#[tokio::test]
async fn true_fences_false_fails_with_its_status() {
    let ok = cmd(&["/bin/true"], 2000, 0)
        .fence("web", "nodeb")
        .await
        .unwrap();
    assert_eq!((ok.proof, ok.attempts), (FenceProof::Command, 1));

    let e = cmd(&["/bin/false"], 2000, 2)
        .fence("web", "nodeb")
        .await
        .unwrap_err();
    match &e {
        FenceError::CommandFailed {
            attempts: 3,
            last: AttemptFailure::Exit { status, .. },
            ..
        } => assert!(status.contains("exit status: 1"), "{status}"),
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("web") && msg.contains("nodeb") && msg.contains("/bin/false"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_command_past_its_timeout_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("child-survived");
    // The shell starts a child that would write the marker after 1.5 s; the timeout must
    // kill the whole group so the marker never appears.
    let script = format!("(sleep 1.5; touch {}) & sleep 30", marker.display());
    let started = Instant::now();
    let e = cmd(&["/bin/sh", "-c", &script], 300, 0)
        .fence("web", "nodeb")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            e,
            FenceError::CommandFailed {
                last: AttemptFailure::TimedOut(_),
                ..
            }
        ),
        "{e:?}"
    );
    println!("timed out and killed after {took:?}");
    assert!(took < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        !marker.exists(),
        "a child of the fencing command outlived the kill"
    );
}

#[tokio::test]
async fn a_script_that_fails_twice_then_succeeds_gets_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let log = dir.path().join("log");
    let script = dir.path().join("fence.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\n\
             echo \"$REMUS_DOMAIN $REMUS_PEER $REMUS_ATTEMPT\" >> {l}\n\
             echo \"attempt $n\" >&2\n\
             [ $n -ge 3 ]\n",
            c = count.display(),
            l = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Run through sh rather than exec'ing the file just written: another test of this
    // binary forking at that moment holds its write fd until its exec, and exec of a file
    // open for writing fails with ETXTBSY (a spawn failure that counts as an attempt).
    let f = cmd(&["/bin/sh", script.to_str().unwrap()], 2000, 3);
    let out = f.fence("web", "nodeb").await.unwrap();
    assert_eq!(out.attempts, 3);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "web nodeb 1\nweb nodeb 2\nweb nodeb 3\n"
    );
    // With fewer retries it fails, and the error carries the command's output.
    std::fs::remove_file(&count).unwrap();
    let e = cmd(&["/bin/sh", script.to_str().unwrap()], 2000, 1)
        .fence("web", "nodeb")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("attempt 2"), "{e}");
}

#[tokio::test]
async fn missing_program_and_empty_argv_are_errors() {
    let e = cmd(&["/nonexistent/fence-agent"], 1000, 0)
        .fence("web", "nodeb")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FenceError::CommandFailed {
                last: AttemptFailure::Spawn(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(matches!(
        CommandFencer::new(vec![], Duration::from_secs(1), 0),
        Err(FenceError::EmptyCommand)
    ));
}

#[tokio::test]
async fn none_always_succeeds_unfenced() {
    let out = NoFencer.fence("web", "nodeb").await.unwrap();
    assert_eq!(out.proof, FenceProof::Unfenced);
}

#[tokio::test]
async fn random_delay_waits_within_its_bound() {
    let max = Duration::from_millis(300);
    let mut delays = Vec::new();
    for _ in 0..5 {
        let f = RandomDelay::new(NoFencer, max);
        let t = Instant::now();
        let out = f.fence("web", "nodeb").await.unwrap();
        delays.push(t.elapsed());
        assert!(out.elapsed <= t.elapsed());
    }
    println!("random fencing delays: {delays:?}");
    assert!(delays.iter().all(|d| *d < max + Duration::from_millis(200)));
    // Boxed trait objects work for the daemon's per-domain policy.
    let boxed: Box<dyn Fencer> = Box::new(RandomDelay::new(cmd(&["/bin/true"], 1000, 0), max));
    assert_eq!(
        boxed.fence("web", "nodeb").await.unwrap().proof,
        FenceProof::Command
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_fencing_is_winning_the_lease() {
    let key = HaKey::derive(b"fence test key material, >= 32 bytes").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = WitnessServer::bind(WitnessServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        key.clone(),
        dir.path().join("w.json"),
    ))
    .await
    .unwrap();
    let addr: SocketAddr = server.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let mk = |node: &str| {
        let cfg = WitnessClientConfig {
            ttl: Duration::from_millis(500),
            ..WitnessClientConfig::new(node, addr, key.clone())
        };
        async move { Arc::new(WitnessClient::new(cfg).await.unwrap()) }
    };
    let (a, b) = (mk("nodea").await, mk("nodeb").await);
    // The primary holds the lease: the backup's fencing fails, naming the holder.
    a.acquire("web").await.unwrap();
    let fb = WitnessFencer::new(b.clone());
    match fb.fence("web", "nodea").await {
        Err(FenceError::LeaseDenied { holder, .. }) => assert_eq!(holder, "nodea"),
        other => panic!("{other:?}"),
    }
    // The primary stops renewing: after the TTL the backup's fencing wins the lease.
    tokio::time::sleep(Duration::from_millis(550)).await;
    let out = fb.fence("web", "nodea").await.unwrap();
    assert_eq!(out.proof, FenceProof::Lease);
    assert!(out.lease.is_some());
    // The witness gone: fencing fails with the reason.
    drop(tx);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = WitnessFencer::new(a)
        .fence("web", "nodeb")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FenceError::LeaseDenied { .. } | FenceError::Witness { .. }
        ),
        "{e:?}"
    );
}
