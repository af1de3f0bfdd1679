//! Where a domain's files live on a host.
//!
//! Runtime files (sockets, guest RAM, the replica RAM and its checkpoint metadata) sit under
//! the run directory, which is a tmpfs (`/run`): a reboot loses them together, and never
//! leaves metadata describing RAM that is gone. Persistent state (disk WAL and spill logs,
//! dirty bitmaps, the role file) sits under the state directory.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The files of one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainPaths {
    /// `<run_dir>/<domain>`.
    pub run: PathBuf,
    /// `<state_dir>/<domain>`.
    pub state: PathBuf,
}

impl DomainPaths {
    /// The paths of `domain` under the node's directories.
    pub fn new(run_dir: &Path, state_dir: &Path, domain: &str) -> Self {
        Self {
            run: run_dir.join(domain),
            state: state_dir.join(domain),
        }
    }

    /// Creates both directories.
    ///
    /// # Errors
    /// Directory creation failures.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.run)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state)
    }

    /// QEMU's QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.run.join("qmp.sock")
    }

    /// Guest RAM of the running VM (shared with the agent).
    pub fn guest_ram(&self) -> PathBuf {
        self.run.join("guest.ram")
    }

    /// The guest's serial console log.
    pub fn console(&self) -> PathBuf {
        self.run.join("console.log")
    }

    /// The replica (RAM, device state, checkpoint metadata) on the backup.
    pub fn replica(&self) -> PathBuf {
        self.run.join("replica")
    }

    /// NBD socket of disk `id`.
    pub fn nbd(&self, id: &str) -> PathBuf {
        self.run.join(format!("nbd-{id}.sock"))
    }

    /// Relay socket of NIC `id`.
    pub fn relay(&self, id: &str) -> PathBuf {
        self.run.join(format!("net-{id}.sock"))
    }

    /// Persistent state of disk `id` (WAL, spill logs, dirty bitmap).
    pub fn disk_state(&self, id: &str) -> PathBuf {
        self.state.join(format!("disk-{id}"))
    }

    /// The host tap of NIC number `index` (≤ 15 bytes, unique per domain and NIC).
    pub fn tap_name(domain: &str, index: usize) -> String {
        // "rm" + 8 hex digits of a hash of the domain + "n" + index: short, stable, unique.
        let mut h: u32 = 0x811c_9dc5;
        for b in domain.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        format!("rm{h:08x}n{index}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz_and_differ() {
        let a = DomainPaths::tap_name("web1", 0);
        let b = DomainPaths::tap_name("web2", 0);
        let c = DomainPaths::tap_name("web1", 1);
        for n in [&a, &b, &c] {
            assert!(n.len() <= 15, "{n}");
        }
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, DomainPaths::tap_name("web1", 0));
    }

    #[test]
    fn layout() {
        let p = DomainPaths::new(Path::new("/run/remus"), Path::new("/var/lib/remus"), "vm");
        assert_eq!(p.qmp(), Path::new("/run/remus/vm/qmp.sock"));
        assert_eq!(p.disk_state("d0"), Path::new("/var/lib/remus/vm/disk-d0"));
    }
}
