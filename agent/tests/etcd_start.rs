//! `remusd` with `[witness] mode = "etcd"` against a real etcd (Debian's `etcd-server`,
//! started here on random ports): an unreachable etcd, wrong credentials or a prefix
//! holding foreign data stop the daemon at start with a message naming the cause — never a
//! daemon running without its lease fencing — and a usable etcd is shown by `remusctl
//! status`.

use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on random ports, killed when dropped.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("http://127.0.0.1:{}", free_tcp());
        let peer = format!("http://127.0.0.1:{}", free_tcp());
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .arg("--name=t")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd (Debian package etcd-server: run scripts/install-deps.sh)");
        let e = Etcd {
            child,
            endpoint,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !e.ctl(&["put", "/probe", "x"]).status.success() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        e.ctl(&["del", "/probe"]);
        e
    }

    /// `etcdctl` (Debian's etcd-client) against this member.
    fn ctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .args(args)
            .output()
            .expect("etcdctl (Debian package etcd-client: run scripts/install-deps.sh)")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node's policy whose one domain fences by the etcd lease; everything local to `dir`.
fn policy(dir: &Path, endpoint: &str, extra: &str) -> (PathBuf, PathBuf) {
    let psk = dir.join("psk");
    std::fs::write(&psk, [9u8; 32]).unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let socket = dir.join("remusd.sock");
    let text = format!(
        "[node]\nname = \"alpha\"\nlisten = \"127.0.0.1:{listen}\"\ncontrol_socket = \"{socket}\"\n\
         state_dir = \"{state}\"\nrun_dir = \"{run}\"\n\n\
         [peer]\nname = \"beta\"\naddress = \"127.0.0.1:{peer}\"\n\n\
         [[peer.link]]\nlocal = \"127.0.0.1:{hb}\"\nremote = \"127.0.0.1:{hb_peer}\"\n\n\
         [auth]\nmode = \"psk\"\npsk_file = \"{psk}\"\n\n\
         [witness]\nmode = \"etcd\"\nendpoints = [\"{endpoint}\"]\nprefix = \"/remus\"\n{extra}\n\
         [[domain]]\nname = \"web\"\n\n[domain.qemu]\nmemory_mib = 128\nboot_disk = \"root\"\n\n\
         [[domain.disk]]\nid = \"root\"\nimage = \"{state}/root.img\"\nreplica = \"{state}/root.replica\"\n\n\
         [domain.fencing]\nmode = \"witness\"\n",
        listen = free_tcp(),
        peer = free_tcp(),
        hb = free_udp(),
        hb_peer = free_udp(),
        socket = socket.display(),
        state = dir.join("state").display(),
        run = dir.join("run").display(),
        psk = psk.display(),
    );
    let path = dir.join("remus.toml");
    std::fs::write(&path, text).unwrap();
    (path, socket)
}

/// Runs remusd on `config` until it exits (at most 20 s); its exit code and stderr.
fn remusd_refuses(config: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_remusd"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "remusd kept running on an unusable etcd:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unreachable_etcd_stops_remusd_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", free_tcp());
    let (config, _) = policy(dir.path(), &endpoint, "");
    let (code, stderr) = remusd_refuses(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&endpoint) && stderr.contains("mode = \"etcd\""),
        "{stderr}"
    );
}

#[test]
fn wrong_etcd_credentials_stop_remusd_at_start() {
    let etcd = Etcd::start();
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let out = etcd.ctl(args);
        assert!(out.status.success(), "{args:?}: {:?}", out);
    }
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "wrong\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let extra = format!(
        "user = \"root\"\npassword_file = \"{}\"\n",
        password.display()
    );
    let (config, _) = policy(dir.path(), &etcd.endpoint, &extra);
    let (code, stderr) = remusd_refuses(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("authentication as user \"root\" refused")
            && stderr.contains(&etcd.endpoint),
        "{stderr}"
    );
}

#[test]
fn foreign_data_under_the_prefix_stops_remusd_and_a_clean_prefix_runs() {
    let etcd = Etcd::start();
    assert!(etcd
        .ctl(&["put", "/remus/leader", "node-7"])
        .status
        .success());
    let dir = tempfile::tempdir().unwrap();
    let (config, socket) = policy(dir.path(), &etcd.endpoint, "");
    let (code, stderr) = remusd_refuses(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("/remus/leader") && stderr.contains("not write"),
        "{stderr}"
    );
    // Cleaned: remusd runs, and its status names the arbiter.
    assert!(etcd.ctl(&["del", "/remus/leader"]).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_remusd"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_remusctl"))
            .args(["status", "--socket", socket.to_str().unwrap()])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "remusd exited on a clean prefix"
        );
        assert!(Instant::now() < deadline, "remusd did not answer");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = nix_kill(&child);
    let _ = child.wait();
    assert!(
        status.contains(&format!(
            "lease arbiter: etcd at {} /remus, lease 2000 ms",
            etcd.endpoint
        )),
        "{status}"
    );
}

/// SIGTERM, so the daemon stops in order.
fn nix_kill(child: &Child) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}
