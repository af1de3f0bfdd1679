//! The pair drill's files on disk: each node's `remus.toml`, the shared key, the disks.
//!
//! Both nodes describe the same domain (same name, MAC, guest) with their own directories
//! and disk paths, as two real hosts would; every path is absolute and under the drill's
//! work directory, so nothing of one drill can touch another's or the host's `/run/remus`.
//! The control socket is path-based, so the drill reaches each daemon from the root
//! namespace although the daemon runs in its host's namespace.

use remus_engine::peer::NodeKey;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::net::{Host, HostAddrs, HOST_BRIDGE};

/// The domain's name in both configurations.
pub const DOMAIN: &str = "drill";
/// The guest NIC's MAC (the same on both nodes: the activated VM takes over the address).
pub const GUEST_MAC: &str = "52:54:00:77:00:20";
/// Replication listen port on each host's address.
pub const REPLICATION_PORT: u16 = 7780;
/// Heartbeat port on each host's address.
pub const HEARTBEAT_PORT: u16 = 7781;
/// The witness's UDP port.
pub const WITNESS_PORT: u16 = 7790;
/// etcd's client port on the witness host (with [`Arbiter::Etcd`]).
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port on the witness host.
pub const ETCD_PEER_PORT: u16 = 2380;
/// The key prefix the drill's nodes use in etcd.
pub const ETCD_PREFIX: &str = "/remus-drill";

/// Who arbitrates the pair's leases, on the witness host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arbiter {
    /// `remus-witness` (UDP).
    #[default]
    Witness,
    /// One etcd member (Debian's `etcd-server`), `[witness] mode = "etcd"`.
    Etcd,
}
/// Size of each disk image (sparse).
pub const DISK_BYTES: u64 = 64 << 20;

/// Which release's policy a node's `remus.toml` is written for. Every release's parser
/// refuses keys it does not know (`deny_unknown_fields`), so a node of an older release
/// gets only the keys that release reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// This workspace's `remusd`: every key the drill sets.
    #[default]
    Current,
    /// A v0.1.0 `remusd` (RELEASES): no `[node] vm_netns` (nor `ack_timeout_ms`,
    /// `ack_wait_max_ms`, which the drill does not write).
    V0_1_0,
}

/// A configuration the dialect of its node cannot express.
#[derive(Debug, thiserror::Error)]
pub enum DialectError {
    /// The key does not exist in that release.
    #[error("host {host}'s remusd ({dialect:?}) has no policy key `{key}`")]
    Unsupported {
        /// The host.
        host: Host,
        /// Its dialect.
        dialect: Dialect,
        /// The key.
        key: &'static str,
    },
}

/// What the configurations are made from.
#[derive(Clone, Debug)]
pub struct PairConfig {
    /// Guest kernel (absolute).
    pub kernel: PathBuf,
    /// Guest initramfs (absolute).
    pub initrd: PathBuf,
    /// The drill's work directory (absolute).
    pub work_dir: PathBuf,
    /// Checkpoint interval.
    pub interval: Duration,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// QEMU accelerator.
    pub accel: String,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// Witness lease length.
    pub lease: Duration,
    /// The hosts' addresses.
    pub addrs: HostAddrs,
    /// The guest's address with prefix.
    pub guest_cidr: String,
    /// UNSAFE: output released at once.
    pub unsafe_no_output_buffering: bool,
    /// Each node's `[node] vm_netns`, pri's then bak's (the one-process drill: both daemons
    /// share the drill's namespace, their VMs' NICs live in their hosts' namespaces).
    pub vm_netns: Option<(String, String)>,
    /// Each node's policy dialect, pri's then bak's (indexed by [`Host`]).
    pub dialects: [Dialect; 2],
    /// Per-node keys (`auth.mode = "keys"`) instead of one pre-shared key.
    pub keys: Option<PairKeys>,
    /// Who arbitrates the leases.
    pub arbiter: Arbiter,
    /// With [`Arbiter::Etcd`]: members of the etcd cluster on the witness host (member `i`
    /// serves clients on [`ETCD_CLIENT_PORT`] + 10 i).
    pub etcd_members: usize,
}

/// The client URL of etcd member `i` on the witness host.
pub fn etcd_endpoint(witness: std::net::Ipv4Addr, i: usize) -> String {
    format!("http://{witness}:{}", etcd_port(ETCD_CLIENT_PORT, i))
}

/// Member `i`'s port, from member 0's.
pub fn etcd_port(base: u16, i: usize) -> u16 {
    base + 10 * u16::try_from(i).unwrap_or(0)
}

/// The key pairs of a per-node keys drill: each node's, the witness's, and a second key
/// for pri that a rotation test switches to (the witness pins both pri keys from the start,
/// as an operator adds the new pin before switching).
#[derive(Clone, Debug)]
pub struct PairKeys {
    /// pri's key, then bak's (indexed by [`Host`]).
    pub nodes: [NodeKey; 2],
    /// pri's next key.
    pub pri_next: NodeKey,
    /// The witness's key.
    pub witness: NodeKey,
}

impl PairKeys {
    /// Fresh random keys.
    ///
    /// # Errors
    /// No random bytes.
    pub fn generate() -> Result<Self, remus_keys::KeyError> {
        Ok(Self {
            nodes: [NodeKey::generate()?, NodeKey::generate()?],
            pri_next: NodeKey::generate()?,
            witness: NodeKey::generate()?,
        })
    }
}

/// Where a per-node keys drill keeps the private key named `name` (`pri`, `bak`,
/// `pri.next`, `witness`).
pub fn key_path(work_dir: &Path, name: &str) -> PathBuf {
    work_dir.join(format!("{name}.key"))
}

/// Where one node's files are.
#[derive(Clone, Debug)]
pub struct NodeFiles {
    /// Its configuration.
    pub config: PathBuf,
    /// `[node] run_dir`.
    pub run_dir: PathBuf,
    /// `[node] state_dir`.
    pub state_dir: PathBuf,
    /// `[node] control_socket`.
    pub control_socket: PathBuf,
    /// The daemon's log (stdout and stderr, every start appended).
    pub log: PathBuf,
    /// The domain's disk image on this node.
    pub image: PathBuf,
    /// The domain's replica disk on this node.
    pub replica: PathBuf,
}

impl NodeFiles {
    /// The files of `host` under `work_dir`.
    pub fn of(work_dir: &Path, host: Host) -> Self {
        let d = work_dir.join(host.name());
        Self {
            config: d.join("remus.toml"),
            run_dir: d.join("run"),
            state_dir: d.join("state"),
            control_socket: d.join("remusd.sock"),
            log: work_dir.join(format!("remusd-{}.log", host.name())),
            image: d.join("disk.img"),
            replica: d.join("replica.img"),
        }
    }

    /// The domain's run directory (QMP socket, console log).
    pub fn domain_run(&self) -> PathBuf {
        self.run_dir.join(DOMAIN)
    }

    /// The guest's serial console log while this node runs the VM.
    pub fn console(&self) -> PathBuf {
        remus_agent::domain::DomainPaths::new(&self.run_dir, &self.state_dir, DOMAIN).console()
    }

    /// The persisted role file of the domain.
    pub fn role_file(&self) -> PathBuf {
        self.state_dir.join(DOMAIN).join("role.json")
    }
}

/// The shared key file (agents' `psk_file`, the witness's `--key-file`).
pub fn psk_path(work_dir: &Path) -> PathBuf {
    work_dir.join("psk")
}

/// `host`'s `remus.toml`, in its dialect.
///
/// # Errors
/// [`DialectError`] when the configuration needs a key the host's release lacks.
pub fn node_toml(c: &PairConfig, host: Host) -> Result<String, DialectError> {
    let dialect = c.dialects[host as usize];
    if dialect == Dialect::V0_1_0 && c.vm_netns.is_some() {
        return Err(DialectError::Unsupported {
            host,
            dialect,
            key: "node.vm_netns",
        });
    }
    if dialect == Dialect::V0_1_0 && c.keys.is_some() {
        return Err(DialectError::Unsupported {
            host,
            dialect,
            key: "auth.private_key_file",
        });
    }
    if dialect == Dialect::V0_1_0 && c.arbiter == Arbiter::Etcd {
        return Err(DialectError::Unsupported {
            host,
            dialect,
            key: "witness.mode",
        });
    }
    let me = NodeFiles::of(&c.work_dir, host);
    let my_ip = c.addrs.of(host);
    let peer_ip = c.addrs.of(host.other());
    Ok(format!(
        r#"# Written by the remus pair drill for host "{name}".
[node]
name = "{name}"
listen = "{my_ip}:{rport}"
control_socket = "{control}"
run_dir = "{run}"
state_dir = "{state}"
{vm_netns}
[peer]
name = "{peer}"
address = "{peer_ip}:{rport}"
{pins}
[[peer.link]]
local = "{my_ip}:{hport}"
remote = "{peer_ip}:{hport}"

[heartbeat]
interval_ms = {hb_int}
timeout_ms = {hb_to}

{auth}
{witness}
[[domain]]
name = "{domain}"
checkpoint_interval_ms = {interval}
failover = "automatic"

{machine}
[domain.fencing]
mode = "witness"
"#,
        name = host.name(),
        peer = host.other().name(),
        rport = REPLICATION_PORT,
        hport = HEARTBEAT_PORT,
        control = me.control_socket.display(),
        run = me.run_dir.display(),
        state = me.state_dir.display(),
        vm_netns = c
            .vm_netns
            .as_ref()
            .map_or_else(String::new, |(p, b)| format!(
                "vm_netns = \"{}\"\n",
                if host == Host::Pri { p } else { b }
            )),
        hb_int = c.heartbeat_interval.as_millis(),
        hb_to = c.heartbeat_timeout.as_millis(),
        auth = match &c.keys {
            None => format!(
                "[auth]\nmode = \"psk\"\npsk_file = \"{}\"\n",
                psk_path(&c.work_dir).display()
            ),
            Some(_) => format!(
                "[auth]\nmode = \"keys\"\nprivate_key_file = \"{}\"\n",
                key_path(&c.work_dir, host.name()).display()
            ),
        },
        pins = c.keys.as_ref().map_or_else(String::new, |k| format!(
            "public_keys = [\"{}\"]\n",
            k.nodes[host.other() as usize].public()
        )),
        witness = match c.arbiter {
            Arbiter::Witness => format!(
                "[witness]\naddress = \"{}:{WITNESS_PORT}\"\nlease_ms = {}\n{}",
                c.addrs.witness,
                c.lease.as_millis(),
                c.keys.as_ref().map_or_else(String::new, |k| format!(
                    "public_key = \"{}\"\n",
                    k.witness.public()
                )),
            ),
            Arbiter::Etcd => format!(
                "[witness]\nmode = \"etcd\"\nendpoints = [{}]\n\
                 prefix = \"{ETCD_PREFIX}\"\nlease_ms = {}\n",
                (0..c.etcd_members.max(1))
                    .map(|i| format!("\"{}\"", etcd_endpoint(c.addrs.witness, i)))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.lease.as_millis(),
            ),
        },
        domain = DOMAIN,
        interval = c.interval.as_millis(),
        machine = crate::guest::GuestMachine {
            accel: &c.accel,
            memory_mib: c.memory_mib,
            kernel: &c.kernel,
            initrd: &c.initrd,
            guest_cidr: &c.guest_cidr,
            mac: GUEST_MAC,
            bridge: HOST_BRIDGE,
            image: &me.image,
            replica: &me.replica,
            unsafe_no_output_buffering: c.unsafe_no_output_buffering,
        }
        .domain_tables(),
    ))
}

/// Writes the key, both configurations and both nodes' disks and directories.
///
/// # Errors
/// File system errors, naming the file.
pub fn write_all(c: &PairConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let key: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let psk = psk_path(&c.work_dir);
    std::fs::write(&psk, &key).with_context(|| format!("writing {}", psk.display()))?;
    // Owner-only, or remusd and the witness refuse the key.
    std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", psk.display()))?;
    if let Some(k) = &c.keys {
        let named = [
            (Host::Pri.name(), &k.nodes[0]),
            (Host::Bak.name(), &k.nodes[1]),
            ("pri.next", &k.pri_next),
            ("witness", &k.witness),
        ];
        for (name, key) in named {
            let path = key_path(&c.work_dir, name);
            std::fs::write(&path, key.to_file_text())
                .with_context(|| format!("writing {}", path.display()))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("chmod 600 {}", path.display()))?;
        }
    }
    for host in Host::BOTH {
        let f = NodeFiles::of(&c.work_dir, host);
        for d in [&f.run_dir, &f.state_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(&f.config, node_toml(c, host)?)
            .with_context(|| format!("writing {}", f.config.display()))?;
        for disk in [&f.image, &f.replica] {
            std::fs::File::create(disk)
                .and_then(|h| h.set_len(DISK_BYTES))
                .with_context(|| format!("creating {}", disk.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_agent::config::{Config, FencingPolicy};

    fn cfg(dir: &Path) -> PairConfig {
        PairConfig {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd.img"),
            work_dir: dir.to_path_buf(),
            interval: Duration::from_millis(200),
            memory_mib: 128,
            accel: "tcg".into(),
            heartbeat_interval: Duration::from_millis(
                remus_agent::config::DEFAULT_HEARTBEAT_INTERVAL_MS,
            ),
            heartbeat_timeout: Duration::from_millis(
                remus_agent::config::DEFAULT_HEARTBEAT_TIMEOUT_MS,
            ),
            lease: Duration::from_millis(1500),
            addrs: HostAddrs {
                pri: "10.77.1.3".parse().unwrap(),
                bak: "10.77.1.4".parse().unwrap(),
                witness: "10.77.1.5".parse().unwrap(),
                client: "10.77.1.2".parse().unwrap(),
            },
            guest_cidr: "10.77.1.10/24".into(),
            unsafe_no_output_buffering: false,
            vm_netns: None,
            dialects: [Dialect::Current; 2],
            keys: None,
            arbiter: Arbiter::Witness,
            etcd_members: 1,
        }
    }

    /// With the etcd arbiter both nodes name the etcd member on the witness host, with
    /// per-node keys too (no witness key then), and a v0.1.0 node cannot be written one.
    #[test]
    fn etcd_arbiter_configs_validate() {
        use remus_agent::config::WitnessBackend;
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.arbiter = Arbiter::Etcd;
        c.lease = Duration::from_secs(2);
        for keys in [None, Some(PairKeys::generate().unwrap())] {
            c.keys = keys;
            for h in Host::BOTH {
                let conf = Config::from_str(&node_toml(&c, h).unwrap(), h.name()).unwrap();
                let w = conf.witness.as_ref().unwrap();
                let WitnessBackend::Etcd(e) = &w.backend else {
                    panic!("{:?}", w.backend)
                };
                assert_eq!(e.endpoints, vec!["http://10.77.1.5:2379".to_string()]);
                assert_eq!(e.prefix, ETCD_PREFIX);
                assert_eq!(w.lease, Duration::from_secs(2));
            }
        }
        c.etcd_members = 3;
        let conf = Config::from_str(&node_toml(&c, Host::Pri).unwrap(), "pri").unwrap();
        let WitnessBackend::Etcd(e) = &conf.witness.as_ref().unwrap().backend else {
            panic!("not etcd")
        };
        assert_eq!(
            e.endpoints,
            ["2379", "2389", "2399"].map(|p| format!("http://10.77.1.5:{p}"))
        );
        c.dialects[Host::Bak as usize] = Dialect::V0_1_0;
        c.keys = None;
        assert!(node_toml(&c, Host::Bak).is_err());
    }

    /// Both configurations pass the daemon's own validation, mirror each other, and keep
    /// every node's files apart.
    #[test]
    fn both_configs_validate_and_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let pri = Config::from_str(&node_toml(&c, Host::Pri).unwrap(), "pri").unwrap();
        let bak = Config::from_str(&node_toml(&c, Host::Bak).unwrap(), "bak").unwrap();
        assert_eq!(pri.node.name, bak.peer.name);
        assert_eq!(bak.node.name, pri.peer.name);
        assert_eq!(pri.node.listen, bak.peer.address);
        assert_eq!(bak.node.listen, pri.peer.address);
        assert_eq!(pri.peer.links[0].local, bak.peer.links[0].remote);
        assert_eq!(pri.domains[0].name, bak.domains[0].name);
        assert_eq!(pri.domains[0].nics[0].mac, bak.domains[0].nics[0].mac);
        assert_ne!(
            pri.domains[0].disks[0].replica,
            bak.domains[0].disks[0].replica
        );
        assert_ne!(pri.domains[0].disks[0].image, bak.domains[0].disks[0].image);
        assert_ne!(pri.node.control_socket, bak.node.control_socket);
        assert_ne!(pri.node.run_dir, bak.node.run_dir);
        assert!(
            matches!(pri.domains[0].fencing, FencingPolicy::Witness),
            "{:?}",
            pri.domains[0].fencing
        );
        let w = pri.witness.as_ref().unwrap();
        assert_eq!(w.lease, Duration::from_millis(1500));
        assert_eq!(
            pri.heartbeat.timeout,
            Duration::from_millis(remus_agent::config::DEFAULT_HEARTBEAT_TIMEOUT_MS)
        );
        assert!(pri.warnings.is_empty(), "{:?}", pri.warnings);
        assert_eq!(pri.node.vm_netns, None);
    }

    /// In per-node keys mode each node pins the other's key and the witness's, and names its
    /// own private key file.
    #[test]
    fn per_node_keys_pin_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        let keys = PairKeys::generate().unwrap();
        c.keys = Some(keys.clone());
        for h in Host::BOTH {
            let conf = Config::from_str(&node_toml(&c, h).unwrap(), h.name()).unwrap();
            assert_eq!(
                conf.peer.public_keys,
                vec![keys.nodes[h.other() as usize].public()]
            );
            assert_eq!(
                conf.witness.as_ref().unwrap().public_key(),
                Some(keys.witness.public())
            );
            assert_eq!(
                conf.auth.private_key_file(),
                Some(key_path(dir.path(), h.name()).as_path())
            );
        }
        c.dialects[Host::Bak as usize] = Dialect::V0_1_0;
        assert!(node_toml(&c, Host::Bak).is_err());
    }

    /// The one-process drill's configurations put each node's VM NICs in its own host's
    /// namespace.
    #[test]
    fn vm_netns_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.vm_netns = Some(("p-pri".into(), "p-bak".into()));
        let pri = Config::from_str(&node_toml(&c, Host::Pri).unwrap(), "pri").unwrap();
        let bak = Config::from_str(&node_toml(&c, Host::Bak).unwrap(), "bak").unwrap();
        assert_eq!(pri.node.vm_netns.as_deref(), Some("p-pri"));
        assert_eq!(bak.node.vm_netns.as_deref(), Some("p-bak"));
    }

    /// A v0.1.0 node's policy is the same text (that release accepts every key the pair
    /// drill writes), and a key it lacks is refused, not written.
    #[test]
    fn v0_1_0_dialect() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        let current = node_toml(&c, Host::Bak).unwrap();
        c.dialects[Host::Bak as usize] = Dialect::V0_1_0;
        assert_eq!(node_toml(&c, Host::Bak).unwrap(), current);
        c.vm_netns = Some(("p-pri".into(), "p-bak".into()));
        assert!(node_toml(&c, Host::Pri).is_ok());
        let e = node_toml(&c, Host::Bak).unwrap_err().to_string();
        assert!(e.contains("node.vm_netns") && e.contains("bak"), "{e}");
    }
}
