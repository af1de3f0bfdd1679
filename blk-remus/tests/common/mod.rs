//! Helpers shared by the integration tests: a real NBD server on a unique unix socket, and the
//! real `qemu-io` / `qemu-img` clients.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use blk_remus::nbd::{Export, NbdServer};
use blk_remus::{BackupStore, BlockBackend, DiskEvent};
use tokio::sync::oneshot;

/// Fails the test loudly (never a silent pass) when a required tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} not found in PATH: install qemu-utils (scripts/install-deps.sh)"
    );
}

/// A running NBD server; stops (and removes its socket) on drop.
pub struct Server {
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn start(dir: &Path, exports: Vec<(&str, Arc<dyn BlockBackend>)>) -> Server {
        let socket = dir.join(format!("nbd-{}.sock", std::process::id()));
        let server = NbdServer::new(
            exports
                .into_iter()
                .map(|(name, backend)| Export {
                    name: name.into(),
                    description: format!("test export {name}"),
                    backend,
                })
                .collect(),
        );
        let (tx, rx) = oneshot::channel();
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind nbd socket");
        let task = tokio::spawn(async move {
            server
                .serve_unix_listener(listener, async {
                    let _ = rx.await;
                })
                .await
                .expect("nbd server");
        });
        Server {
            socket,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Runs `qemu-io -f raw URL -c CMD...` against an export.
    pub async fn qemu_io(&self, export: &str, cmds: &[&str]) -> Output {
        self.qemu_io_flags(export, &[], cmds).await
    }

    pub async fn qemu_io_flags(&self, export: &str, flags: &[&str], cmds: &[&str]) -> Output {
        let mut c = tokio::process::Command::new("qemu-io");
        c.args(["-f", "raw"]).args(flags).arg(self.url(export));
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        tokio::time::timeout(Duration::from_secs(120), c.output())
            .await
            .expect("qemu-io timed out")
            .expect("run qemu-io")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Asserts qemu-io succeeded and returns its stdout.
pub fn ok(out: &Output) -> String {
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-io failed: {:?}\nstdout: {so}\nstderr: {se}",
        out.status
    );
    assert!(
        !so.contains("failed"),
        "qemu-io reported a failure:\n{so}\n{se}"
    );
    so
}

/// Runs `qemu-img compare -f raw -F raw A B`; true when identical.
pub fn images_equal(a: &Path, b: &Path) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!(
            "qemu-img compare error {other:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Feeds events from the forwarder channel into the backup store on a blocking thread.
pub fn pump(
    backup: Arc<BackupStore>,
    mut rx: tokio::sync::mpsc::Receiver<DiskEvent>,
) -> tokio::task::JoinHandle<Result<u64, blk_remus::BackupError>> {
    tokio::task::spawn_blocking(move || {
        let mut n = 0;
        while let Some(ev) = rx.blocking_recv() {
            backup.receive(ev)?;
            n += 1;
        }
        Ok(n)
    })
}

/// Waits until the backup has received epoch `k`'s barrier.
pub async fn wait_complete(backup: &BackupStore, k: u64) {
    for _ in 0..2000 {
        if backup.status().complete >= k {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "epoch {k} never completed at the backup: {:?}",
        backup.status()
    );
}

/// Waits until the backup holds writes of `n` epochs (complete or still open): writes are
/// forwarded asynchronously, so the last epoch's may still be on the wire when the writer's
/// I/O has completed (seen on a loaded machine).
pub async fn wait_backlog(backup: &BackupStore, n: u64) {
    for _ in 0..2000 {
        if backup.status().backlog_epochs >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "writes of {n} epochs never reached the backup: {:?}",
        backup.status()
    );
}

/// Reads a byte range of a file.
pub fn read_range(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}
