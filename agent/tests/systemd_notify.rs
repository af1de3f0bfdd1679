//! remusd speaks systemd's readiness protocol (`sd_notify(3)`): a real remusd, started the
//! way systemd starts a `Type=notify` unit (with `NOTIFY_SOCKET` and `WATCHDOG_USEC`), must
//! say READY=1 once it serves, ping the watchdog, and say STOPPING=1 on SIGTERM. The test
//! plays systemd's part with a datagram socket of its own.

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
    // SAFETY: umask(2) only replaces the file-creation mask of this test process (the only
    // test of this binary); it cannot fail and touches no memory.
    unsafe {
        libc::umask(0o022);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // systemd sets WATCHDOG_PID to the main process's pid, and sd_notify ignores
    // WATCHDOG_USEC meant for another process: exec from a shell that knows its own pid.
    let mut remusd = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_remusd"))
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

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

/// Starts remusd as systemd would (WATCHDOG_PID is the daemon's own pid), with `env`.
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
