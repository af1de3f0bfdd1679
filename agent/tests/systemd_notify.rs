//! remusd speaks systemd's readiness protocol (`sd_notify(3)`): a real remusd, started the
//! way systemd starts a `Type=notify` unit (with `NOTIFY_SOCKET` and `WATCHDOG_USEC`), must
//! say READY=1 once it serves, ping the watchdog, and say STOPPING=1 on SIGTERM. The test
//! plays systemd's part with a datagram socket of its own. Under systemd it also logs to
//! journald natively, with structured fields; the test plays journald's part too, in a
//! mount namespace of remusd's own where its socket is the journal's.

use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads datagrams until one contains `want` or `limit` passes; returns everything read.
fn read_until(sock: &UnixDatagram, want: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(deadline - Instant::now() + Duration::from_millis(1)))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }
    seen
}

/// One domain, stopped: its supervisor runs its loop without a VM.
const ONE_DOMAIN: &str = r#"
[[domain]]
name = "web"

[domain.qemu]
memory_mib = 64
boot_disk = "root"

[[domain.disk]]
id = "root"
image = "/nonexistent/root.img"
replica = "/nonexistent/root.replica"

[[domain.nic]]
id = "net0"
mac = "52:54:00:12:34:56"
bridge = "br0"

[domain.fencing]
mode = "command"
command = ["/bin/true"]
"#;

fn write_config(dir: &Path) -> std::path::PathBuf {
    write_config_with(dir, "")
}

fn write_config_with(dir: &Path, domains: &str) -> std::path::PathBuf {
    let key = dir.join("psk");
    std::fs::write(&key, [0x5au8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = dir.join("remus.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[node]
name = "alpha"
listen = "127.0.0.1:{listen}"
control_socket = "{dir}/remusd.sock"
state_dir = "{dir}/state"
run_dir = "{dir}/run"

[peer]
name = "beta"
address = "127.0.0.1:{peer}"

[[peer.link]]
local = "127.0.0.1:{local}"
remote = "127.0.0.1:{remote}"

[auth]
mode = "psk"
psk_file = "{key}"
{domains}"#,
            listen = free_tcp_port(),
            peer = free_tcp_port(),
            local = free_udp_port(),
            remote = free_udp_port(),
            dir = dir.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn remusd_says_ready_pings_the_watchdog_and_says_stopping() {
    // Started as from a permissive shell: remusd must not keep this umask.
    // SAFETY: umask(2) only replaces the file-creation mask of this test process; it cannot
    // fail and touches no memory. The other tests of this binary set their files' modes
    // explicitly, so a looser mask changes nothing for them.
    unsafe {
        libc::umask(0o022);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut remusd = spawn_notified(&cfg, &notify_path, &[]);

    let seen = read_until(&notify, "READY=1", Duration::from_secs(30));
    let ready = seen.iter().any(|m| m.lines().any(|l| l == "READY=1"));
    if !ready {
        let _ = remusd.kill();
        let out = remusd.wait_with_output().unwrap();
        panic!(
            "no READY=1 from remusd within 30 s; got {seen:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // By then the control socket answers.
    assert!(dir.path().join("remusd.sock").exists());
    // Whatever umask it was started with, remusd creates files for root only.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", remusd.id())).unwrap();
    assert!(
        proc_status.lines().any(|l| l == "Umask:\t0077"),
        "remusd's umask: {:?}",
        proc_status.lines().find(|l| l.starts_with("Umask"))
    );
    let status = seen.iter().find(|m| m.contains("STATUS=")).cloned();
    assert!(
        status.as_deref().is_some_and(|s| s.contains("peer beta")),
        "{seen:?}"
    );

    // Pinged at half of WATCHDOG_USEC (100 ms): several pings within a second.
    let pings: usize = (0..3)
        .map(|_| read_until(&notify, "WATCHDOG=1", Duration::from_secs(5)))
        .filter(|s| s.iter().any(|m| m.lines().any(|l| l == "WATCHDOG=1")))
        .count();
    assert_eq!(pings, 3, "three watchdog pings expected");

    let st = Command::new("kill")
        .args(["-TERM", &remusd.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let seen = read_until(&notify, "STOPPING=1", Duration::from_secs(30));
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{seen:?}"
    );
    let out = remusd.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts remusd as systemd would, with `env`: systemd sets WATCHDOG_PID to the main
/// process's pid, and sd_notify ignores WATCHDOG_USEC meant for another process, so remusd
/// is exec'd from a shell that knows its own pid.
fn spawn_notified(cfg: &Path, notify: &Path, env: &[(&str, &str)]) -> std::process::Child {
    let mut c = Command::new("sh");
    c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_remusd"))
        .arg(cfg)
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Counts WATCHDOG=1 datagrams sent during `window` (what was queued before it does not
/// count), and collects STATUS= lines sent up to its end.
fn pings_within(sock: &UnixDatagram, window: Duration) -> (usize, Vec<String>) {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut queued = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        queued.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    sock.set_nonblocking(false).unwrap();
    let seen = read_until(sock, "never sent", window);
    let pings = seen
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    let status = queued
        .iter()
        .chain(&seen)
        .flat_map(|m| m.lines())
        .filter_map(|l| l.strip_prefix("STATUS="))
        .map(str::to_string)
        .collect();
    (pings, status)
}

#[test]
fn a_stalled_supervisor_stops_the_watchdog_pings() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_with(dir.path(), ONE_DOMAIN);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // The supervisor of `web` stalls 6 s after its first step; the daemon counts a
    // supervisor as wedged after 2 s without a step (90 s outside tests).
    let mut remusd = spawn_notified(
        &cfg,
        &notify_path,
        &[
            ("REMUSD_TEST_HOLD", "stall:6000"),
            ("REMUSD_TEST_STALL_LIMIT_MS", "2000"),
        ],
    );
    let seen = read_until(&notify, "READY=1", Duration::from_secs(30));
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "no READY=1: {seen:?}"
    );
    // Within the stall limit: still pinging (every 100 ms).
    let (early, _) = pings_within(&notify, Duration::from_millis(1000));
    // Past it, and while the supervisor is still stalled: no pings, and a STATUS saying why.
    std::thread::sleep(Duration::from_millis(1500));
    let (stalled, status) = pings_within(&notify, Duration::from_millis(2000));
    // The hold ends at 6 s: the supervisor steps again and the pings resume.
    std::thread::sleep(Duration::from_millis(2000));
    let (after, _) = pings_within(&notify, Duration::from_millis(1000));
    let _ = remusd.kill();
    let out = remusd.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        early >= 3,
        "pings before the stall limit: {early}; stderr: {stderr}"
    );
    assert_eq!(
        stalled, 0,
        "pings while the supervisor was stalled; stderr: {stderr}"
    );
    assert!(
        status
            .iter()
            .any(|s| s.contains("watchdog withheld") && s.contains("web")),
        "{status:?}"
    );
    assert!(
        after >= 3,
        "pings after the stall ended: {after}; stderr: {stderr}"
    );
}

/// Reads journald's native protocol: `KEY=value\n`, or `KEY\n<u64 LE length><bytes>\n` for
/// values with newlines.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            if rest.len() < 8 {
                break;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let end = (8 + len).min(rest.len());
            out.push((key, String::from_utf8_lossy(&rest[8..end]).into_owned()));
            d = rest.get(end + 1..).unwrap_or_default();
        }
    }
    out
}

#[test]
fn under_systemd_it_logs_to_journald_with_structured_fields() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_with(dir.path(), ONE_DOMAIN);
    let journal_dir = dir.path().join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let journal = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // In a mount namespace of its own, /run is a fresh tmpfs whose systemd/journal is our
    // directory: remusd talks to "the journal" at its fixed path, and reaches us.
    let script = r#"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal &&
        mount --bind "$1" /run/systemd/journal && exec "$2" --config "$3""#;
    let mut remusd = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&journal_dir)
        .arg(env!("CARGO_BIN_EXE_remusd"))
        .arg(&cfg)
        .env("JOURNAL_STREAM", "8:12345")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let field = |e: &Vec<(String, String)>, k: &str| {
        e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let has = |entries: &Vec<Vec<(String, String)>>| {
        let running = entries
            .iter()
            .any(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("remusd running")));
        let role = entries
            .iter()
            .any(|e| field(e, "DOMAIN").as_deref() == Some("web") && field(e, "ROLE").is_some());
        running && role
    };
    while Instant::now() < deadline && !has(&entries) {
        if let Ok(n) = journal.recv(&mut buf) {
            if n > 0 {
                entries.push(journal_fields(&buf[..n]));
            }
        }
    }
    let _ = remusd.kill();
    let out = remusd.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        has(&entries),
        "no 'remusd running' entry or no entry with DOMAIN=web and ROLE; got {entries:#?}; stderr: {stderr}"
    );
    let e = entries
        .iter()
        .find(|e| field(e, "DOMAIN").as_deref() == Some("web") && field(e, "ROLE").is_some())
        .unwrap();
    assert_eq!(
        field(e, "SYSLOG_IDENTIFIER").as_deref(),
        Some("remusd"),
        "{e:?}"
    );
    // INFO maps to journald's "notice" (5); the span the line came from is named.
    assert_eq!(field(e, "PRIORITY").as_deref(), Some("5"), "{e:?}");
    assert_eq!(field(e, "SPAN_NAME").as_deref(), Some("domain"), "{e:?}");
    // Nothing went to stderr as text lines while the journal was there.
    assert!(!stderr.contains("remusd running"), "{stderr}");
}
