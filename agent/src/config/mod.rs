//! Protection policies: the `remus.toml` schema, its defaults and its validation.
//!
//! A configuration is loaded in three passes, each reporting *all* the problems it finds
//! with file, line and column:
//! 1. TOML syntax (the parser recovers and reports every syntax error);
//! 2. shape: each top-level table and each `[[domain]]` is deserialised on its own with
//!    unknown keys denied, so one typo per section is reported, not only the first in the
//!    file;
//! 3. meaning: addresses, ranges, cross-references, uniqueness, combinations.
//!
//! Only a configuration with no error becomes a [`Config`]; its [`Config::warnings`] list
//! what was accepted but weakens protection (fencing disabled, output buffering off), and
//! the daemon must log them at startup. Every key and default is documented in
//! `docs/configuration.md`; the two must change together.
//!
//! Safety rule behind the defaults: anything omitted gets the protective choice; anything
//! that removes protection (no fencing, no output buffering) must be written explicitly.

mod diag;
pub mod libvirt;
pub mod pause_estimate;
pub mod qemu_args;
mod raw;
pub mod reload;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use diag::{Diagnostic, Severity};

/// Where the daemon and `remusctl` look for the configuration by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/remus/remus.toml";

/// Default time between heartbeats per link (ms).
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Default silence after which the peer is lost (ms): three heartbeats. The heartbeat
/// thread runs SCHED_RR and replication traffic counts as life too; `pair_busy_hosts` shows
/// no false loss with every core busy, and with the lease takeover this timeout is most of
/// failure -> VM running.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 300;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// This host.
    pub node: NodeConfig,
    /// The other host of the pair.
    pub peer: PeerConfig,
    /// Failure detection timing.
    pub heartbeat: HeartbeatConfig,
    /// How the two agents authenticate each other.
    pub auth: AuthConfig,
    /// Optional third-host arbiter.
    pub witness: Option<WitnessConfig>,
    /// Optional Prometheus endpoint.
    pub metrics: Option<MetricsConfig>,
    /// Protected domains.
    pub domains: Vec<DomainConfig>,
    /// Accepted but protection-weakening settings; log them at startup.
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// `[node]`: this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    /// Name of this node, as the peer's `[peer] name` spells it.
    pub name: String,
    /// Address the replication/control channel listens on.
    pub listen: SocketAddr,
    /// Unix socket `remusctl` talks to.
    pub control_socket: PathBuf,
    /// Persistent state: replica images, WAL, role state.
    pub state_dir: PathBuf,
    /// Runtime files: QMP/NBD sockets, guest RAM files.
    pub run_dir: PathBuf,
    /// The network namespace (a name under `/run/netns`) where the domains' NICs get their
    /// taps and find their bridges; `None`: remusd's own. Keeps VM networking apart from
    /// the host's, and lets two nodes share one kernel in the drill.
    pub vm_netns: Option<String>,
}

/// `[peer]`: the other host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerConfig {
    /// The peer's `[node] name`.
    pub name: String,
    /// The peer's replication/control address.
    pub address: SocketAddr,
    /// Heartbeat links; the peer is considered lost only when every link is silent.
    pub links: Vec<HeartbeatLink>,
    /// The peer's pinned public keys (`auth.mode = "keys"`): one, or two during a
    /// rotation. Empty with a pre-shared key.
    pub public_keys: Vec<remus_engine::peer::PublicKey>,
}

/// One heartbeat path (a NIC pair), from `[[peer.link]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HeartbeatLink {
    /// Local address the heartbeat socket binds to.
    pub local: SocketAddr,
    /// The peer's heartbeat address on the same link.
    pub remote: SocketAddr,
}

/// `[heartbeat]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HeartbeatConfig {
    /// Time between heartbeats on each link.
    pub interval: Duration,
    /// Silence on all links after which the peer is declared lost (> 2 × interval).
    pub timeout: Duration,
}

/// `[auth] mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Pre-shared key.
    Psk,
    /// Per-node static keys, the peer's pinned.
    Keys,
    /// Mutual TLS: recognised so that a policy asking for it gets a precise refusal (see
    /// [`AuthConfig`]), not an "unknown variant".
    Tls,
}

/// `[auth]`: there is deliberately no "off".
///
/// - `psk`: one key authenticates every channel between the nodes: the replication stream
///   (Noise NNpsk0, AES-GCM), the UDP heartbeats and the witness protocol (both MACed with
///   keys derived from it). Whoever holds the file — either node, the witness — can claim
///   either node's name. What v0.1.0 speaks.
/// - `keys`: each node has its own X25519 key pair (`remusctl keygen`) and pins its peer's
///   public keys (`[peer] public_keys`, two during a rotation): the stream runs Noise XX
///   (XXpsk0 with a `psk_file` as an extra layer), the heartbeats are MACed per direction
///   with keys from the two nodes' X25519 secret, which the witness does not know, and the
///   witness protocol with a key from this node's and the witness's X25519 secret
///   (`[witness] public_key`), so neither node can speak for the other there either.
///
/// Certificates could replace the keys on the TCP stream only; the datagram channels would
/// still need keys, so `mode = "tls"` is refused with that explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AuthConfig {
    /// Pre-shared key read from a file (at least 32 bytes).
    Psk {
        /// Key file.
        key_file: PathBuf,
    },
    /// This node's private key; the peer's public keys are in [`PeerConfig::public_keys`].
    Keys {
        /// This node's private key file (`remusctl keygen`).
        private_key_file: PathBuf,
        /// An optional pre-shared key: an extra layer on the stream and the heartbeats.
        psk_file: Option<PathBuf>,
    },
}

impl AuthConfig {
    /// This node's private key file, in keys mode.
    pub fn private_key_file(&self) -> Option<&Path> {
        match self {
            AuthConfig::Psk { .. } => None,
            AuthConfig::Keys {
                private_key_file, ..
            } => Some(private_key_file),
        }
    }

    /// The pre-shared key file, in either mode.
    pub fn psk_file(&self) -> Option<&Path> {
        match self {
            AuthConfig::Psk { key_file } => Some(key_file),
            AuthConfig::Keys { psk_file, .. } => psk_file.as_deref(),
        }
    }
}

/// Smallest pre-shared key accepted, in bytes.
pub const MIN_PSK_BYTES: u64 = 32;

/// `[witness]`: who arbitrates the leases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WitnessConfig {
    /// Lease length granted per domain.
    pub lease: Duration,
    /// `remus-witness` or etcd.
    pub backend: WitnessBackend,
}

/// `[witness] mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessMode {
    /// `remus-witness` on a third host (UDP).
    Witness,
    /// An etcd cluster (v3 gRPC).
    Etcd,
}

/// The lease arbiter of `[witness]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum WitnessBackend {
    /// `mode = "witness"`: `remus-witness`.
    Witness {
        /// Its address.
        address: SocketAddr,
        /// Its public key, pinned in per-node keys mode (`auth.mode = "keys"`).
        public_key: Option<remus_engine::peer::PublicKey>,
    },
    /// `mode = "etcd"`.
    Etcd(EtcdWitness),
}

/// `[witness] mode = "etcd"`: the cluster and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EtcdWitness {
    /// Client URLs (`https://10.0.0.5:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix of this site's pairs (`/remus`).
    pub prefix: String,
    /// etcd user, with `password_file`.
    pub user: Option<String>,
    /// File holding the user's password (owner-only).
    pub password_file: Option<PathBuf>,
    /// CA certificate the servers' certificates chain to (PEM).
    pub ca_file: Option<PathBuf>,
    /// This node's client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM, owner-only).
    pub key_file: Option<PathBuf>,
}

impl WitnessConfig {
    /// The witness's pinned public key (`mode = "witness"` in keys mode).
    pub fn public_key(&self) -> Option<remus_engine::peer::PublicKey> {
        match &self.backend {
            WitnessBackend::Witness { public_key, .. } => *public_key,
            WitnessBackend::Etcd(_) => None,
        }
    }

    /// `"witness"` or `"etcd"`.
    pub fn mode_name(&self) -> &'static str {
        match &self.backend {
            WitnessBackend::Witness { .. } => "witness",
            WitnessBackend::Etcd(_) => "etcd",
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsConfig {
    /// Prometheus exporter listen address.
    pub listen: SocketAddr,
}

/// `failover`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failover {
    /// The backup activates on its own once the primary is lost and fenced.
    Automatic,
    /// The backup waits for an operator.
    Manual,
}

/// `compression`: page encoding used for checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Raw pages (zero pages still elided).
    None,
    /// LZ4 per batch.
    Lz4,
    /// XOR against the previous checkpoint's copy, then LZ4.
    XorLz4,
}

/// `tracker`: how dirty guest pages are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tracker {
    /// Soft-dirty when the kernel supports it, else compare.
    Auto,
    /// Compare every page with the last checkpoint's copy.
    Compare,
    /// Kernel soft-dirty bits.
    SoftDirty,
}

/// `[domain.qemu] accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Emulation (slow; tests).
    Tcg,
}

/// `[[domain.disk]] format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    /// Raw image.
    Raw,
}

/// `[domain.netbuf] backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetbufBackend {
    /// `plug` when the kernel has sch_plug, else `relay`.
    Auto,
    /// Kernel plug qdisc.
    Plug,
    /// User-space relay between QEMU and the tap.
    Relay,
}

/// `[domain.fencing] mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FencingMode {
    /// Run a command that powers off / isolates the peer.
    Command,
    /// Win the witness lease.
    Witness,
    /// No fencing (unsafe; must be explicit).
    None,
}

/// How a backup makes sure the old primary is gone before it activates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum FencingPolicy {
    /// Run `argv`; success is exit status 0 within `timeout`, tried `retries + 1` times.
    Command {
        /// Program and arguments (`argv[0]` absolute).
        argv: Vec<String>,
        /// Limit per attempt.
        timeout: Duration,
        /// Extra attempts after a failure.
        retries: u32,
    },
    /// Acquire the domain's lease from the witness.
    Witness,
    /// Nothing: only safe when the operator decides (manual failover) or accepts the risk.
    None,
}

/// `[[domain]]`: one protected VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DomainConfig {
    /// Unique name (`[a-z0-9_-]`, ≤ 32 chars): used in paths and stream headers.
    pub name: String,
    /// Time between checkpoints (the epoch length).
    pub checkpoint_interval: Duration,
    /// How long the backup may stay silent about a checkpoint once nothing more is
    /// leaving for it (`remus_engine::primary::ack_due`).
    pub ack_timeout: Duration,
    /// The longest a checkpoint's ACK is waited for while its bytes still move.
    pub ack_wait_max: Duration,
    /// Time between periodic online disk verifies while protected; `None`: only
    /// `remusctl verify`.
    pub verify_interval: Option<Duration>,
    /// Who decides to activate the backup.
    pub failover: Failover,
    /// Page encoding of checkpoints.
    pub compression: Compression,
    /// Dirty page tracker.
    pub tracker: Tracker,
    /// How to start the VM.
    pub qemu: QemuConfig,
    /// Network interfaces (all buffered).
    pub nics: Vec<NicConfig>,
    /// Disks (all replicated).
    pub disks: Vec<DiskConfig>,
    /// Output buffering.
    pub netbuf: NetbufConfig,
    /// Fencing before activation.
    pub fencing: FencingPolicy,
}

/// `[domain.qemu]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QemuConfig {
    /// QEMU binary: a name looked up in `PATH`, or an absolute path.
    pub binary: String,
    /// Machine type.
    pub machine: String,
    /// Accelerator.
    pub accel: Accel,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// What to boot.
    pub boot: Boot,
    /// Extra arguments appended verbatim (may not define disks, NICs or migration).
    pub extra_args: Vec<String>,
}

/// Boot source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Optional initramfs.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// Boot from one of the domain's disks.
    Disk {
        /// `id` of a `[[domain.disk]]`.
        disk_id: String,
    },
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `[[domain.nic]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NicConfig {
    /// Device id inside QEMU (unique in the domain).
    pub id: String,
    /// Guest MAC (unicast, unique across domains).
    pub mac: MacAddr,
    /// Host bridge the VM's tap joins.
    pub bridge: String,
}

/// `[[domain.disk]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskConfig {
    /// Device id inside QEMU (unique in the domain); its position is the disk index in
    /// `DISK_WRITE` records.
    pub id: String,
    /// Image the primary runs from.
    pub image: PathBuf,
    /// Replica the backup maintains.
    pub replica: PathBuf,
    /// Image format.
    pub format: DiskFormat,
}

/// `[domain.netbuf]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NetbufConfig {
    /// Buffering mechanism.
    pub backend: NetbufBackend,
    /// Most bytes held per epoch before the guest's packets are dropped.
    pub limit_bytes: u64,
    /// False only with `unsafe_no_output_buffering = true`: a failover may then expose
    /// output the backup never saw.
    pub output_buffering: bool,
}

/// A configuration that failed to load: every error, and the warnings found meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    /// Problems that make the configuration unusable (at least one).
    pub errors: Vec<Diagnostic>,
    /// Problems that would only have been warnings.
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates the file at `path`.
    ///
    /// # Errors
    /// The file cannot be read or has problems; all of them are reported.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_str(&text, &origin),
            Err(e) => Err(ConfigErrors {
                errors: vec![Diagnostic {
                    severity: Severity::Error,
                    origin,
                    line: 0,
                    column: 0,
                    message: format!("cannot read configuration: {e}"),
                }],
                warnings: Vec::new(),
            }),
        }
    }

    /// Validates configuration `text`; `origin` names it in diagnostics (usually the path).
    ///
    /// # Errors
    /// Every syntax, shape and meaning problem found.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        validate::validate(text, origin)
    }

    /// The domain called `name`.
    pub fn domain(&self, name: &str) -> Option<&DomainConfig> {
        self.domains.iter().find(|d| d.name == name)
    }

    /// Warnings that depend on this host: a domain whose checkpoint pause, with the compare
    /// tracker it would use here, would take more than half its interval
    /// ([`pause_estimate`]). Measures this host's scan floor once (~10 ms) when a domain
    /// could use the compare tracker. Run by `remusctl config check --files-exist` and at
    /// daemon start.
    pub fn check_host(&self, origin: &str) -> Vec<Diagnostic> {
        // Auto picks soft-dirty where the kernel has it (probed once, and only if a domain
        // asks); compare is forced by the policy.
        let soft_dirty = std::cell::OnceCell::new();
        let compare: Vec<&DomainConfig> = self
            .domains
            .iter()
            .filter(|d| match d.tracker {
                Tracker::Compare => true,
                Tracker::Auto => !*soft_dirty.get_or_init(|| {
                    matches!(remus_tracker::pagemap::probe_kernel_support(), Ok(Ok(())))
                }),
                Tracker::SoftDirty => false,
            })
            .collect();
        if compare.is_empty() {
            return Vec::new();
        }
        let sample = remus_tracker::compare::read_floor(pause_estimate::SAMPLE_BYTES);
        compare
            .into_iter()
            .filter_map(|d| {
                pause_estimate::verdict(&d.name, d.qemu.memory_mib, d.checkpoint_interval, sample)
            })
            .map(|message| Diagnostic {
                severity: Severity::Warning,
                origin: origin.to_owned(),
                line: 0,
                column: 0,
                message,
            })
            .collect()
    }

    /// Checks what the text alone cannot: that referenced files exist and the key file is
    /// long enough. Run by the daemon at startup and by `remusctl config check --files`.
    pub fn check_files(&self, origin: &str) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let mut problem = |message: String| {
            out.push(Diagnostic {
                severity: Severity::Error,
                origin: origin.to_owned(),
                line: 0,
                column: 0,
                message,
            })
        };
        let need = |what: &str, path: &Path| match std::fs::metadata(path) {
            Ok(_) => None,
            Err(e) => Some(format!("{what} {}: {e}", path.display())),
        };
        let mut files: Vec<(String, &Path)> = Vec::new();
        if let Some(key_file) = self.auth.psk_file() {
            match std::fs::metadata(key_file) {
                Ok(m) if m.len() < MIN_PSK_BYTES => problem(format!(
                    "auth.psk_file {}: {} bytes, need at least {MIN_PSK_BYTES}",
                    key_file.display(),
                    m.len()
                )),
                Ok(_) => {
                    if let Err(e) = remus_ha::auth::check_key_file_mode(key_file) {
                        problem(format!("auth.psk_file: {e}"));
                    }
                }
                Err(e) => problem(format!("auth.psk_file {}: {e}", key_file.display())),
            }
        }
        if let AuthConfig::Keys {
            private_key_file, ..
        } = &self.auth
        {
            if let Err(e) = crate::keys::load_node_key(private_key_file) {
                problem(format!("auth.private_key_file: {e:#}"));
            }
        }
        if let Some(WitnessConfig {
            lease,
            backend: WitnessBackend::Etcd(e),
        }) = &self.witness
        {
            // Read as the daemon reads them (owner-only secrets); nothing connects.
            if let Err(e) = crate::keys::etcd_settings(&self.node.name, *lease, e) {
                problem(e.to_string());
            }
        }
        let netns_path = self
            .node
            .vm_netns
            .as_ref()
            .map(|ns| (ns, Path::new("/run/netns").join(ns)));
        if let Some((ns, path)) = &netns_path {
            if !path.exists() {
                problem(format!(
                    "node.vm_netns: network namespace {ns} does not exist ({} is missing; create it with `ip netns add {ns}`)",
                    path.display()
                ));
            }
        }
        for d in &self.domains {
            if let Boot::Kernel { kernel, initrd, .. } = &d.qemu.boot {
                files.push((format!("domain {}: qemu.kernel", d.name), kernel));
                if let Some(i) = initrd {
                    files.push((format!("domain {}: qemu.initrd", d.name), i));
                }
            }
            if let FencingPolicy::Command { argv, .. } = &d.fencing {
                if let Some(p) = argv.first() {
                    files.push((format!("domain {}: fencing.command", d.name), Path::new(p)));
                }
            }
        }
        for (what, path) in files {
            if let Some(m) = need(&what, path) {
                problem(m);
            }
        }
        out
    }
}
