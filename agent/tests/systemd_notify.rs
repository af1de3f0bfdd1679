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

fn write_config(dir: &Path) -> std::path::PathBuf {
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
"#,
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
