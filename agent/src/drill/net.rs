//! The drill's network: two "hosts" and a client joined by a switch, each a network
//! namespace of its own, built with iproute2 and torn down when the [`Topology`] is dropped.
//!
//! ```text
//!   ns <p>-pri: bridge vmbr<- relay tap of the primary VM      \
//!               veth uplink------------------------------------> ns <p>-sw: bridge swbr
//!   ns <p>-bak: bridge vmbr<- relay tap of the activated VM    /            |
//!               veth uplink-------------------------------------'           |
//!   ns <p>-cli: veth eth0 10.77.<n>.2/24 ---------------------------------'
//! ```
//!
//! Invariants, and why:
//! - every namespace name carries the drill's process id and a counter, so drills run in
//!   parallel never share an interface (the domain runtime names its taps after the domain
//!   only, so the primary's and the backup's taps must live in different namespaces anyway,
//!   as they would on two hosts);
//! - IPv6 is disabled everywhere: router solicitations and DAD probes would otherwise sit in
//!   the egress buffers and blur what the client's traffic alone shows;
//! - the guest's MAC is learnt by the switch on the primary's uplink first; the activated
//!   VM's `announce-self` moves it to the backup's uplink (the failover of the network path).
//! - dropping the [`Topology`] deletes every namespace it made, on every exit path.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use sch_plug::Netns;
use thiserror::Error;

/// A step of building the topology that failed.
#[derive(Debug, Error)]
pub enum TopologyError {
    /// `ip` could not be run at all.
    #[error("drill network: running `ip {args}`: {source}")]
    Spawn {
        /// The arguments.
        args: String,
        /// Why.
        source: std::io::Error,
    },
    /// `ip` ran and refused.
    #[error("drill network: `ip {args}` failed: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

/// The bridge the VM's tap joins in the primary's and the backup's namespaces.
pub const HOST_BRIDGE: &str = "vmbr";

/// The guest's TCP service port (`tests/guest/src/service.rs`).
pub const SERVICE_PORT: u16 = 7000;

/// The namespaces and addresses of one drill's network.
#[derive(Debug)]
pub struct Topology {
    /// The switch.
    pub switch: String,
    /// The primary "host" (its VM's tap and bridge live here).
    pub primary: String,
    /// The backup "host".
    pub backup: String,
    /// The client.
    pub client: String,
    /// The guest's address with its prefix, for `remus.ip=`.
    pub guest_cidr: String,
    /// The guest's address.
    pub guest_ip: std::net::Ipv4Addr,
    /// Every namespace created so far (deleted on drop, in reverse).
    created: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), TopologyError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| TopologyError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TopologyError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), TopologyError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), TopologyError> {
    // `ip netns exec` remounts /sys for the namespace; writing /proc/sys from inside it
    // applies to the namespace.
    ip(&[
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        &format!("echo {value} > /proc/sys/{}", key.replace('.', "/")),
    ])
}

impl Topology {
    /// Builds the network. Partially built topologies are torn down on error.
    ///
    /// # Errors
    /// An `ip` command that fails (not root, iproute2 missing, no bridge support …).
    pub fn create() -> Result<Self, TopologyError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("rdrill{}x{seq}", std::process::id());
        let subnet = (std::process::id() % 250) as u8;
        let guest_ip = std::net::Ipv4Addr::new(10, 77, subnet, 10);
        let mut t = Self {
            switch: format!("{prefix}-sw"),
            primary: format!("{prefix}-pri"),
            backup: format!("{prefix}-bak"),
            client: format!("{prefix}-cli"),
            guest_cidr: format!("{guest_ip}/24"),
            guest_ip,
            created: Vec::new(),
        };
        t.build(subnet)?;
        Ok(t)
    }

    fn build(&mut self, subnet: u8) -> Result<(), TopologyError> {
        for ns in [&self.switch, &self.primary, &self.backup, &self.client] {
            ip(&["netns", "add", ns])?;
            self.created.push(ns.clone());
            sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
            sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
            in_ns(ns, &["link", "set", "lo", "up"])?;
        }
        let sw = self.switch.as_str();
        in_ns(sw, &["link", "add", "swbr", "type", "bridge"])?;
        in_ns(sw, &["link", "set", "swbr", "up"])?;
        for (ns, port) in [(&self.primary, "to-pri"), (&self.backup, "to-bak")] {
            in_ns(
                sw,
                &[
                    "link", "add", port, "type", "veth", "peer", "name", "uplink",
                ],
            )?;
            in_ns(sw, &["link", "set", "uplink", "netns", ns])?;
            in_ns(sw, &["link", "set", port, "master", "swbr", "up"])?;
            in_ns(ns, &["link", "add", HOST_BRIDGE, "type", "bridge"])?;
            in_ns(ns, &["link", "set", "uplink", "master", HOST_BRIDGE, "up"])?;
            in_ns(ns, &["link", "set", HOST_BRIDGE, "up"])?;
        }
        in_ns(
            sw,
            &[
                "link", "add", "to-cli", "type", "veth", "peer", "name", "eth0",
            ],
        )?;
        in_ns(sw, &["link", "set", "eth0", "netns", &self.client])?;
        in_ns(sw, &["link", "set", "to-cli", "master", "swbr", "up"])?;
        let cli = self.client.as_str();
        in_ns(
            cli,
            &[
                "addr",
                "add",
                &format!("10.77.{subnet}.2/24"),
                "dev",
                "eth0",
            ],
        )?;
        in_ns(cli, &["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// The primary host's namespace, for the domain runtime.
    pub fn primary_netns(&self) -> Netns {
        Netns::named(&self.primary)
    }

    /// The backup host's namespace, for the domain runtime.
    pub fn backup_netns(&self) -> Netns {
        Netns::named(&self.backup)
    }

    /// The client's namespace.
    pub fn client_netns(&self) -> Netns {
        Netns::named(&self.client)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                tracing::warn!(netns = %ns, error = %e, "drill network: cleanup");
            }
        }
    }
}
