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
//!
//! The pair drill ([`Topology::create_pair`]) adds a witness namespace on the same switch
//! and gives each host an address on its bridge (the daemons' replication, heartbeats and
//! lease traffic use them):
//!
//! ```text
//!   10.77.<n>.2 client   10.77.<n>.3 pri   10.77.<n>.4 bak   10.77.<n>.5 wit   10.77.<n>.10 guest
//! ```
//!
//! and the failures the pair drill injects: [`Topology::cut_uplink`] (the host is gone from
//! the network: its VM's traffic and its daemon's), [`Topology::partition_hosts`] (only the
//! two hosts lose each other; both still reach the witness and the client).

use std::sync::atomic::{AtomicU32, Ordering};

use sch_plug::Netns;
use thiserror::Error;

use remus_agent::iproute::IpError;

/// A step of building the topology that failed.
#[derive(Debug, Error)]
pub enum TopologyError {
    /// An `ip` command failed.
    #[error("drill network: {0}")]
    Ip(#[from] IpError),
    /// An operation that needs the pair topology on a single-pair one.
    #[error(
        "drill network: {op}: not a pair topology (built by Topology::create, not create_pair)"
    )]
    NotPair {
        /// The operation.
        op: String,
    },
    /// A link impairer could not be set up.
    #[error("drill network: impairing {host}'s uplink: {reason}")]
    Impair {
        /// Whose uplink.
        host: Host,
        /// Why.
        reason: String,
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
    /// The witness "host" (pair drill only).
    pub witness: Option<String>,
    /// The addresses of the hosts, the witness and the client (pair drill only: the local
    /// drill gives its hosts no address).
    pub addrs: Option<HostAddrs>,
    /// Whether pri and bak are cut from each other ([`Topology::partition_hosts`]).
    partitioned: bool,
    /// The impaired uplinks ([`Topology::impair`]), by host.
    impaired: Vec<(Host, crate::impair::Impairer)>,
    /// Every namespace created so far (deleted on drop, in reverse).
    created: Vec<String>,
}

/// One of the pair drill's two hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Host {
    /// The host named "pri" (the first primary; roles move between hosts in a drill).
    Pri,
    /// The host named "bak".
    Bak,
}

impl Host {
    /// Both hosts.
    pub const BOTH: [Host; 2] = [Host::Pri, Host::Bak];

    /// The node name the host's daemon is configured with.
    pub fn name(self) -> &'static str {
        match self {
            Host::Pri => "pri",
            Host::Bak => "bak",
        }
    }

    /// The other host.
    pub fn other(self) -> Host {
        match self {
            Host::Pri => Host::Bak,
            Host::Bak => Host::Pri,
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The pair drill's addresses on the switch's subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostAddrs {
    /// Host "pri" (on its bridge).
    pub pri: std::net::Ipv4Addr,
    /// Host "bak" (on its bridge).
    pub bak: std::net::Ipv4Addr,
    /// The witness.
    pub witness: std::net::Ipv4Addr,
    /// The client.
    pub client: std::net::Ipv4Addr,
}

impl HostAddrs {
    /// The address of `host`.
    pub fn of(&self, host: Host) -> std::net::Ipv4Addr {
        match host {
            Host::Pri => self.pri,
            Host::Bak => self.bak,
        }
    }
}

fn ip(args: &[&str]) -> Result<(), TopologyError> {
    Ok(remus_agent::iproute::ip(args)?)
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), TopologyError> {
    Ok(remus_agent::iproute::ip_in(ns, args)?)
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
        Self::create_inner(false)
    }

    /// Builds the pair drill's network: the local drill's plus a witness namespace and an
    /// address per host, witness and client (see the module doc).
    ///
    /// # Errors
    /// As [`Topology::create`].
    pub fn create_pair() -> Result<Self, TopologyError> {
        Self::create_inner(true)
    }

    fn create_inner(pair: bool) -> Result<Self, TopologyError> {
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
            witness: pair.then(|| format!("{prefix}-wit")),
            addrs: pair.then(|| HostAddrs {
                pri: std::net::Ipv4Addr::new(10, 77, subnet, 3),
                bak: std::net::Ipv4Addr::new(10, 77, subnet, 4),
                witness: std::net::Ipv4Addr::new(10, 77, subnet, 5),
                client: std::net::Ipv4Addr::new(10, 77, subnet, 2),
            }),
            partitioned: false,
            impaired: Vec::new(),
            created: Vec::new(),
        };
        t.build(subnet)?;
        if pair {
            t.build_pair()?;
        }
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

    /// The pair drill's part: the witness on the switch, and the hosts' addresses.
    fn build_pair(&mut self) -> Result<(), TopologyError> {
        let (Some(wit), Some(a)) = (self.witness.clone(), self.addrs) else {
            return Ok(());
        };
        ip(&["netns", "add", &wit])?;
        self.created.push(wit.clone());
        sysctl(&wit, "net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl(&wit, "net.ipv6.conf.default.disable_ipv6", "1")?;
        in_ns(&wit, &["link", "set", "lo", "up"])?;
        let sw = self.switch.as_str();
        in_ns(
            sw,
            &[
                "link", "add", "to-wit", "type", "veth", "peer", "name", "eth0",
            ],
        )?;
        in_ns(sw, &["link", "set", "eth0", "netns", &wit])?;
        in_ns(sw, &["link", "set", "to-wit", "master", "swbr", "up"])?;
        in_ns(
            &wit,
            &["addr", "add", &format!("{}/24", a.witness), "dev", "eth0"],
        )?;
        in_ns(&wit, &["link", "set", "eth0", "up"])?;
        for host in Host::BOTH {
            in_ns(
                self.host_ns(host),
                &[
                    "addr",
                    "add",
                    &format!("{}/24", a.of(host)),
                    "dev",
                    HOST_BRIDGE,
                ],
            )?;
        }
        Ok(())
    }

    /// The namespace of `host`.
    pub fn host_ns(&self, host: Host) -> &str {
        match host {
            Host::Pri => &self.primary,
            Host::Bak => &self.backup,
        }
    }

    /// Takes `host` off the network: its uplink goes down, so neither its VM nor its daemon
    /// reaches anyone (the switch, the other host, the witness, the client).
    ///
    /// # Errors
    /// The `ip` command failed.
    pub fn cut_uplink(&self, host: Host) -> Result<(), TopologyError> {
        in_ns(self.host_ns(host), &["link", "set", "uplink", "down"])
    }

    /// Puts `host` back on the network.
    ///
    /// # Errors
    /// The `ip` command failed.
    pub fn restore_uplink(&self, host: Host) -> Result<(), TopologyError> {
        in_ns(self.host_ns(host), &["link", "set", "uplink", "up"])
    }

    /// Cuts pri and bak from each other, both ways, while both still reach the witness and
    /// the client: each host gets a blackhole route for the other's address, so nothing
    /// either host itself sends reaches the other (the guests' bridged traffic is not
    /// routed by the hosts and is untouched). Idempotent.
    ///
    /// # Errors
    /// Not a pair topology, or the `ip` command failed.
    pub fn partition_hosts(&mut self) -> Result<(), TopologyError> {
        if self.partitioned {
            return Ok(());
        }
        let a = self.pair_addrs("partition")?;
        for host in Host::BOTH {
            let other = format!("{}/32", a.of(host.other()));
            in_ns(self.host_ns(host), &["route", "add", "blackhole", &other])?;
        }
        self.partitioned = true;
        Ok(())
    }

    /// Ends [`Topology::partition_hosts`]. Idempotent.
    ///
    /// # Errors
    /// Not a pair topology, or the `ip` command failed.
    pub fn heal(&mut self) -> Result<(), TopologyError> {
        if !self.partitioned {
            return Ok(());
        }
        let a = self.pair_addrs("heal")?;
        for host in Host::BOTH {
            let other = format!("{}/32", a.of(host.other()));
            in_ns(self.host_ns(host), &["route", "del", "blackhole", &other])?;
        }
        self.partitioned = false;
        Ok(())
    }

    /// Impairs `host`'s uplink both ways (loss, delay, jitter) in user space, until
    /// [`Topology::unimpair`] or the topology is dropped (see [`crate::impair`]).
    ///
    /// # Errors
    /// The `ip` commands or the taps failed, or the link is impaired already.
    pub fn impair(
        &mut self,
        host: Host,
        imp: crate::impair::Impairment,
    ) -> Result<(), TopologyError> {
        if self.impaired.iter().any(|(h, _)| *h == host) {
            return Err(TopologyError::Impair {
                host,
                reason: "already impaired".into(),
            });
        }
        let h = host.name();
        let sw = self.switch.clone();
        let (port, br, tap_host, tap_sw) = (
            format!("to-{h}"),
            format!("ib-{h}"),
            format!("it-{h}"),
            format!("ia-{h}"),
        );
        let io = |e: std::io::Error| TopologyError::Impair {
            host,
            reason: e.to_string(),
        };
        let (fd_host, fd_sw) =
            crate::impair::taps(&Netns::named(&sw), &tap_host, &tap_sw).map_err(io)?;
        in_ns(&sw, &["link", "add", &br, "type", "bridge"])?;
        in_ns(&sw, &["link", "set", &br, "up"])?;
        in_ns(&sw, &["link", "set", &port, "nomaster"])?;
        in_ns(&sw, &["link", "set", &port, "master", &br, "up"])?;
        in_ns(&sw, &["link", "set", &tap_host, "master", &br, "up"])?;
        in_ns(&sw, &["link", "set", &tap_sw, "master", "swbr", "up"])?;
        let imp = crate::impair::Impairer::start(fd_host, fd_sw, imp).map_err(io)?;
        self.impaired.push((host, imp));
        Ok(())
    }

    /// Ends [`Topology::impair`] of `host`: the veth is back on the switch. Idempotent.
    ///
    /// # Errors
    /// The `ip` commands failed.
    pub fn unimpair(&mut self, host: Host) -> Result<(), TopologyError> {
        let Some(i) = self.impaired.iter().position(|(h, _)| *h == host) else {
            return Ok(());
        };
        // Stopping the thread closes the taps, which removes them.
        drop(self.impaired.remove(i));
        let h = host.name();
        let sw = self.switch.as_str();
        let port = format!("to-{h}");
        in_ns(sw, &["link", "set", &port, "nomaster"])?;
        in_ns(sw, &["link", "set", &port, "master", "swbr", "up"])?;
        in_ns(sw, &["link", "del", &format!("ib-{h}")])?;
        Ok(())
    }

    /// Frames seen and dropped by `host`'s impairer, if its link is impaired.
    pub fn impair_stats(&self, host: Host) -> Option<(u64, u64)> {
        self.impaired
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, i)| {
                use std::sync::atomic::Ordering::Relaxed;
                (
                    i.stats().frames.load(Relaxed),
                    i.stats().dropped.load(Relaxed),
                )
            })
    }

    /// Whether the hosts are partitioned from each other now.
    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    fn pair_addrs(&self, op: &str) -> Result<HostAddrs, TopologyError> {
        self.addrs
            .ok_or_else(|| TopologyError::NotPair { op: op.to_string() })
    }

    /// The witness's namespace (pair drill only).
    pub fn witness_ns(&self) -> Option<&str> {
        self.witness.as_deref()
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
        // The impairers' threads first: their taps live in the switch namespace.
        self.impaired.clear();
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                tracing::warn!(netns = %ns, error = %e, "drill network: cleanup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::process::Command;
    use std::time::Duration;

    /// Whether a TCP connection from `from` reaches a listener on `addr` in `to`.
    fn reaches(from: &str, to: &str, addr: Ipv4Addr) -> bool {
        let l = Netns::named(to)
            .run(|| TcpListener::bind((addr, 0)))
            .expect("listener in the target namespace");
        let port = l.local_addr().unwrap().port();
        Netns::named(from)
            .run(|| {
                Ok(
                    TcpStream::connect_timeout(&(addr, port).into(), Duration::from_millis(700))
                        .is_ok(),
                )
            })
            .unwrap()
    }

    /// Sends `n` numbered datagrams from `probe` to `to`, each waiting up to `wait` for its
    /// echo; returns the echoes received and the shortest round trip.
    fn probe(
        probe: &std::net::UdpSocket,
        to: std::net::SocketAddr,
        n: u32,
        wait: Duration,
    ) -> (u32, Duration) {
        probe.set_read_timeout(Some(wait)).unwrap();
        let (mut got, mut best) = (0, Duration::MAX);
        let mut buf = [0u8; 16];
        for i in 0..n {
            let sent = std::time::Instant::now();
            probe.send_to(&i.to_be_bytes(), to).unwrap();
            while let Ok((len, _)) = probe.recv_from(&mut buf) {
                if len == 4 && buf[..4] == i.to_be_bytes() {
                    got += 1;
                    best = best.min(sent.elapsed());
                    break;
                }
            }
        }
        (got, best)
    }

    /// Real namespaces and the user-space impairer: a delayed uplink adds its delay both
    /// ways, a lossy one drops about its share, and removing the impairer restores the link.
    #[test]
    fn an_impaired_uplink_delays_and_drops_what_crosses_it() {
        use crate::impair::Impairment;
        let mut t = Topology::create_pair().expect("pair topology (needs root and iproute2)");
        let a = t.addrs.unwrap();
        let echo = Netns::named(&t.backup)
            .run(|| std::net::UdpSocket::bind((a.bak, 0)))
            .unwrap();
        let to = echo.local_addr().unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let echoer = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                if n == 1 {
                    return;
                }
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let p = Netns::named(&t.primary)
            .run(|| std::net::UdpSocket::bind((a.pri, 0)))
            .unwrap();
        let wait = Duration::from_millis(500);
        assert_eq!(probe(&p, to, 10, wait).0, 10, "the plain link");
        // 20 ms each way on bak's uplink: at least 40 ms per round trip, nothing lost.
        t.impair(
            Host::Bak,
            Impairment {
                loss: 0.0,
                delay: Duration::from_millis(20),
                jitter: Duration::ZERO,
                rate_bps: None,
            },
        )
        .unwrap();
        assert!(t.impair(Host::Bak, Impairment::LOSSY_WAN).is_err(), "twice");
        let (got, best) = probe(&p, to, 10, Duration::from_secs(2));
        assert_eq!(got, 10, "a delay alone loses nothing");
        assert!(best >= Duration::from_millis(40), "round trip {best:?}");
        t.unimpair(Host::Bak).unwrap();
        // 30 % each way: about half the round trips fail (0.7² = 0.49 succeed).
        t.impair(
            Host::Bak,
            Impairment {
                loss: 0.3,
                delay: Duration::ZERO,
                jitter: Duration::ZERO,
                rate_bps: None,
            },
        )
        .unwrap();
        let (got, _) = probe(&p, to, 100, Duration::from_millis(100));
        let (frames, dropped) = t.impair_stats(Host::Bak).unwrap();
        assert!(
            (25..=75).contains(&got),
            "{got} of 100 round trips with 30 % loss each way"
        );
        assert!(
            frames >= 100 && dropped > 0,
            "frames {frames}, dropped {dropped}"
        );
        t.unimpair(Host::Bak).unwrap();
        assert_eq!(t.impair_stats(Host::Bak), None);
        assert_eq!(probe(&p, to, 10, wait).0, 10, "the link restored");
        let _ = p.send_to(&[0], to);
        echoer.join().unwrap();
    }

    /// Real namespaces: a partition cuts only pri <-> bak, both ways; a cut uplink takes a
    /// host off the network; healing and restoring bring everything back.
    #[test]
    fn partition_and_uplink_cuts_block_exactly_what_they_say() {
        let mut t = Topology::create_pair().expect("pair topology (needs root and iproute2)");
        let a = t.addrs.unwrap();
        let wit = t.witness.clone().unwrap();
        let (pri, bak, cli) = (t.primary.clone(), t.backup.clone(), t.client.clone());
        // (from ns, to ns, to address)
        let paths = [
            ("pri->bak", &pri, &bak, a.bak),
            ("bak->pri", &bak, &pri, a.pri),
            ("pri->wit", &pri, &wit, a.witness),
            ("bak->wit", &bak, &wit, a.witness),
            ("cli->pri", &cli, &pri, a.pri),
            ("cli->bak", &cli, &bak, a.bak),
        ];
        let check = |state: &str, want: &[bool; 6]| {
            for ((name, from, to, addr), want) in paths.iter().zip(want) {
                assert_eq!(reaches(from, to, *addr), *want, "{state}: {name}");
            }
        };
        check("connected", &[true; 6]);
        t.partition_hosts().unwrap();
        t.partition_hosts().unwrap();
        assert!(t.is_partitioned());
        check("partitioned", &[false, false, true, true, true, true]);
        t.heal().unwrap();
        t.heal().unwrap();
        check("healed", &[true; 6]);
        t.cut_uplink(Host::Pri).unwrap();
        check("pri cut off", &[false, false, false, true, false, true]);
        t.restore_uplink(Host::Pri).unwrap();
        check("pri back", &[true; 6]);
        let names = [t.switch.clone(), pri, bak, cli, wit];
        drop(t);
        let listed = String::from_utf8(
            Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        for n in names {
            assert!(!listed.contains(&n), "{n} left behind");
        }
    }

    #[test]
    fn the_local_topology_has_no_witness_and_refuses_a_partition() {
        let mut t = Topology::create().expect("topology (needs root and iproute2)");
        assert!(t.witness.is_none() && t.addrs.is_none());
        assert!(t.partition_hosts().is_err());
    }
}
