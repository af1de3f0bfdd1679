//! The role file under SIGKILL: a child process applies transitions as fast as it can and
//! is killed at random instants; every reopen must find a complete, consistent role file.

use std::process::Command;
use std::time::Duration;

use rand::Rng;
use remus_ha::role::{Event, Role, RoleStore};

const WRITER_ENV: &str = "REMUS_HA_ROLE_WRITER_DIR";

/// Run only as the child of `sigkill_during_writes_never_leaves_a_torn_role`.
#[test]
#[ignore = "child process of sigkill_during_writes_never_leaves_a_torn_role"]
fn role_writer_child() {
    let dir = std::env::var(WRITER_ENV).expect("run by the crash test");
    let mut s = RoleStore::open(std::path::Path::new(&dir), "web").unwrap();
    let mut epoch = match s.current() {
        Role::Backup {
            last_committed: Some(e),
            ..
        } => *e,
        _ => {
            if *s.current() != Role::Stopped {
                s.apply(Event::Stop, "writer restart").unwrap();
            }
            s.apply(Event::BackupStarted { peer: "a".into() }, "writer")
                .unwrap();
            0
        }
    };
    loop {
        epoch += 1;
        s.apply(Event::Committed { epoch }, "writer").unwrap();
    }
}

#[test]
fn sigkill_during_writes_never_leaves_a_torn_role() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    let mut last_seen = 0u64;
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "role_writer_child", "--nocapture"])
            .env(WRITER_ENV, dir.path())
            .spawn()
            .unwrap();
        // Kill it while it writes: first wait until it has written (a loaded machine can
        // take longer than any fixed delay just to start the test binary), then a random
        // moment later.
        let role_file = dir.path().join("web").join("role.json");
        let written_since = |t: std::time::SystemTime| {
            std::fs::metadata(&role_file)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > t)
        };
        let spawned = std::time::SystemTime::now();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !written_since(spawned) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the writer wrote nothing within 30 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let s = RoleStore::open(dir.path(), "web").expect("role file readable after SIGKILL");
        let h = s.history();
        let last = h.last().expect("history");
        assert_eq!(&last.to, s.current(), "history and role disagree");
        for w in h.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1);
            assert_eq!(w[1].from, w[0].to);
        }
        let Role::Backup {
            last_committed: Some(e),
            ..
        } = s.current()
        else {
            panic!("round {round}: unexpected role {:?}", s.current());
        };
        println!(
            "round {round}: killed at committed epoch {e}, seq {}",
            last.seq
        );
        assert!(*e > last_seen, "no progress or went backwards");
        last_seen = *e;
    }
}
