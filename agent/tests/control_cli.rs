//! `remusctl status|start|switchover|failover|test-activate|reload` as an operator runs them: the
//! real binary against the real control server (with a stub daemon behind it).

mod control_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use control_support::{sample_status, Stub};
use remus_agent::api::Request;
use remus_agent::control::ControlServer;
use tokio::sync::oneshot;

const REMUSCTL: &str = env!("CARGO_BIN_EXE_remusctl");

/// The human status of [`sample_status`], exactly.
const HUMAN: &str = "\
node alpha, peer beta: alive (1/2 links); replication heard 40 ms ago; up 1h 2m 5s
lease arbiter: etcd at https://192.0.2.5:2379,https://192.0.2.6:2379 /remus, lease 2000 ms
  renew: 900 ok, 0 denied, 2 failed; latency mean 2.0 ms, max 41.0 ms, last 1.9 ms
refused: heartbeats 7 bad tag, 0 malformed, 0 unknown node, 2 replayed; replication 3 handshakes refused, 468 connections shed
domain web: primary (backup beta, protected since epoch 10)
  vm: pid 4242, running, output held
  protection: running epoch 812, last acked epoch 811, 1 in flight, tracker compare
  pause p50 12.3 ms, p99 25.0 ms; ack latency p50 1.2 ms, p99 3.4 ms; output held p50 30.0 ms, p99 61.5 ms (last 800 epochs)
  lease: held
  data copy: generation 4, ran the VM
  checkpoints 801, refused 0, protection lost 1, failovers 0
  unprotected 3.5 s in all; last window 3.5 s (primary: first checkpoint not yet acknowledged)
  alarms: none
domain db: backup (primary beta)
  vm: none
  replica: committed epoch 300; receiver: committed checkpoint 300, receiving 301
  data copy: generation 7, received as backup
  checkpoints 290, refused 2, protection lost 0, failovers 1
  last failover: from epoch 120, detection 520 ms, fencing 35 ms, activation 780 ms, proof command
  alarms:
    ! fencing command failed twice: fence-beta exited 1
domain idle: stopped
  vm: none
  data copy: no copy
  checkpoints 0, refused 0, protection lost 0, failovers 0
  alarms: none
";

/// A stub daemon serving on a socket in its own temporary directory.
struct Daemon {
    /// Runs the server; dropping it ends the server (and removes the socket file).
    _rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    path: PathBuf,
    stub: Arc<Stub>,
    stop: Option<oneshot::Sender<()>>,
}

impl Daemon {
    fn start() -> Daemon {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remusd.sock");
        let stub = Stub::new();
        let server = rt.block_on(ControlServer::bind(&path)).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        rt.spawn(server.run(stub.clone(), async {
            let _ = stopped.await;
        }));
        Daemon {
            _rt: rt,
            dir,
            path,
            stub,
            stop: Some(stop),
        }
    }

    fn commands(&self) -> Vec<Request> {
        self.stub.commands.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Runs remusctl with `args`, standard input closed (not a terminal).
fn remusctl(args: &[&str]) -> Output {
    Command::new(REMUSCTL)
        .args(args)
        .env_remove("REMUS_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `remusctl status | head`: a reader that goes away must end remusctl quietly (killed by
/// SIGPIPE, as any Unix tool), never with a panic on stderr.
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let d = Daemon::start();
    let mut child = Command::new(REMUSCTL)
        .args(["status", "--socket", s(&d.path)])
        .env_remove("REMUS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader is gone before remusctl has asked the daemon anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(
        out.status.signal() == Some(libc::SIGPIPE) || out.status.code() == Some(0),
        "{:?}, stderr: {err}",
        out.status
    );
}

#[test]
fn status_human() {
    let d = Daemon::start();
    let out = remusctl(&["status", "--socket", s(&d.path)]);
    assert_eq!(text(&out.stderr), "");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), HUMAN);
}

#[test]
fn status_json_is_the_snapshot() {
    let d = Daemon::start();
    let out = remusctl(&["status", "--json", "--socket", s(&d.path)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, serde_json::to_value(sample_status()).unwrap());
}

#[test]
fn commands_exit_codes_and_messages() {
    let d = Daemon::start();
    let sock = s(&d.path).to_string();
    // (args, exit code, stdout, stderr, request the daemon must have received)
    let cases: &[(&[&str], i32, &str, &str, Request)] = &[
        (
            &["start", "idle"],
            0,
            "idle: started on alpha, protection to beta pending\n",
            "",
            Request::Start {
                domain: "idle".into(),
                older_copy: false,
            },
        ),
        (
            &["start", "web"],
            1,
            "",
            "remusctl start: start web: refused: role is not stopped\n",
            Request::Start {
                domain: "web".into(),
                older_copy: false,
            },
        ),
        (
            &["start", "web", "--older-copy"],
            1,
            "",
            "remusctl start: start web: refused: role is not stopped\n",
            Request::Start {
                domain: "web".into(),
                older_copy: true,
            },
        ),
        (
            &["switchover", "web", "--timeout", "30"],
            0,
            "web: primary role handed to beta at epoch 812\n",
            "",
            Request::Switchover {
                domain: "web".into(),
            },
        ),
        (
            &["failover", "db", "--yes"],
            0,
            "db: activated from checkpoint 300\n",
            "",
            Request::Failover {
                domain: "db".into(),
            },
        ),
        (
            &["failover", "--yes", "web"],
            1,
            "",
            "remusctl failover: failover web: refused: this node is not the backup\n",
            Request::Failover {
                domain: "web".into(),
            },
        ),
        (
            &["test-activate", "db"],
            0,
            "db: test activation passed\n",
            "",
            Request::TestActivate {
                domain: "db".into(),
            },
        ),
        (
            &["reload"],
            1,
            "",
            "remusctl reload: reload of /etc/remus/remus.toml refused, the running policy stays:\n/etc/remus/remus.toml:12:1: error: [heartbeat] changed: not applied live\n",
            Request::Reload,
        ),
    ];
    for (i, (args, code, stdout, stderr, request)) in cases.iter().enumerate() {
        let mut all = args.to_vec();
        all.extend(["--socket", &sock]);
        let out = remusctl(&all);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), *stdout, "{args:?}");
        assert_eq!(text(&out.stderr), *stderr, "{args:?}");
        assert_eq!(d.commands().get(i), Some(request), "{args:?}");
    }
}

#[test]
fn failover_without_yes_and_without_a_terminal_is_refused_before_asking_the_daemon() {
    let d = Daemon::start();
    let out = remusctl(&["failover", "db", "--socket", s(&d.path)]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "remusctl failover: refusing to force a failover of db without confirmation: \
         standard input is not a terminal; pass --yes to confirm\n"
    );
    assert_eq!(text(&out.stdout), "");
    assert!(d.commands().is_empty(), "nothing may reach the daemon");
}

/// Runs remusctl under `script(1)` so that its standard input is a terminal, typing `typed`.
fn remusctl_on_a_tty(args: &str, typed: &str) -> Output {
    // script(1) is in Debian's bsdutils, which scripts/install-deps.sh installs: a missing
    // one is a broken set-up, not a reason to pass.
    let script = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("script(1) (Debian's bsdutils) is installed by scripts/install-deps.sh");
    let mut child = Command::new(script)
        .args(["-qec", &format!("{REMUSCTL} {args}"), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(typed.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn failover_on_a_terminal_asks_for_the_domain_name() {
    let d = Daemon::start();
    let args = format!("failover db --socket {}", s(&d.path));
    // a wrong name: nothing done
    let out = remusctl_on_a_tty(&args, "web\n");
    let seen = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{seen}");
    assert!(seen.contains("Type the domain name to confirm: "), "{seen}");
    assert!(
        seen.contains("confirmation did not match `db`; nothing done"),
        "{seen}"
    );
    assert!(d.commands().is_empty());
    // the right name: carried out
    let out = remusctl_on_a_tty(&args, "db\n");
    let seen = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{seen}");
    assert!(seen.contains("db: activated from checkpoint 300"), "{seen}");
    assert_eq!(
        d.commands(),
        vec![Request::Failover {
            domain: "db".into()
        }]
    );
}

#[test]
fn unreachable_daemon_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("remusd.sock");
    let out = remusctl(&["status", "--socket", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "remusctl status: no remusd listening on {}: no such socket (is remusd running?)\n",
            missing.display()
        )
    );
    // a socket file nobody listens on (a crashed daemon's)
    drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
    let out = remusctl(&["switchover", "web", "--socket", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "remusctl switchover: no remusd listening on {}: connection refused\n",
            missing.display()
        )
    );
}

#[test]
fn socket_from_the_configuration() {
    let d = Daemon::start();
    let minimal = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/minimal.toml"
    ))
    .unwrap();
    let config = minimal.replacen(
        "name = \"alpha\"\n",
        &format!(
            "name = \"alpha\"\ncontrol_socket = \"{}\"\n",
            d.path.display()
        ),
        1,
    );
    assert_ne!(
        config, minimal,
        "configs/minimal.toml no longer names node alpha"
    );
    let file = d.dir.path().join("remus.toml");
    std::fs::write(&file, config).unwrap();
    let out = remusctl(&["status", "--config", s(&file)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), HUMAN);

    // an unusable explicit configuration is reported, not silently replaced by the default
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, "[node]\nname = 3\n").unwrap();
    let out = remusctl(&["status", "--config", s(&bad)]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "remusctl status: cannot find the control socket: {} is unusable",
            bad.display()
        )),
        "{err}"
    );
    assert!(err.contains("pass --socket"), "{err}");

    // `reload` still finds the socket in a file the daemon is about to refuse (it names the
    // problems with their lines), as long as the file is TOML with [node] control_socket.
    let broken = d.dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        format!(
            "[node]\nname = 3\ncontrol_socket = \"{}\"\n",
            d.path.display()
        ),
    )
    .unwrap();
    let before = d.commands().len();
    let out = remusctl(&["reload", "--config", s(&broken)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("[heartbeat] changed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(d.commands().get(before), Some(&Request::Reload));
}
