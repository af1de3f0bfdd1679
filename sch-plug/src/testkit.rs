//! Real-kernel scaffolding for this crate's tests, benchmarks and kernel-harness programs:
//! throwaway network namespaces, veth pairs, addresses, static neighbours and packet
//! sockets. Not used by the agent itself.
//!
//! Namespaces are anonymous: a thread `unshare`s, and the namespace is kept alive by an open
//! fd only, so nothing named is left behind when a test fails and no two parallel tests can
//! collide; dropping [`TempNetns`] destroys it with everything inside.

use std::fs::File;
use std::io;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use nix::sched::{unshare, CloneFlags};

use crate::netns::Netns;
use crate::plug::rtnl::Rtnl;

/// An anonymous network namespace alive while this value is.
pub struct TempNetns {
    /// The namespace's nsfs file; the namespace dies with the last reference.
    file: File,
}

impl TempNetns {
    /// A new namespace with IPv6 disabled (so no router solicitations or MLD reports skew
    /// packet counts) and `lo` up.
    pub fn new() -> io::Result<Self> {
        let file = std::thread::spawn(|| -> io::Result<File> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            for knob in ["all", "default"] {
                // Absent when the kernel has no IPv6: nothing to disable then.
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
            }
            File::open("/proc/thread-self/ns/net")
        })
        .join()
        .map_err(|_| io::Error::other("unshare thread panicked"))??;
        Ok(Self { file })
    }

    /// The namespace, for this crate's APIs.
    pub fn netns(&self) -> Netns {
        Netns::path(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// The raw fd of the namespace (for moving links into it).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `f` inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        self.netns().run(f)
    }

    /// A route-netlink connection inside the namespace.
    pub fn rtnl(&self) -> io::Result<Rtnl> {
        Rtnl::open(&self.netns()).map_err(io::Error::other)
    }

    /// A UDP socket bound to `addr` inside the namespace.
    pub fn udp(&self, addr: &str) -> io::Result<UdpSocket> {
        let addr = addr.to_string();
        self.run(move || UdpSocket::bind(addr))
    }
}

fn nl<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> io::Error + '_ {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// The ifindex of `name` via `rtnl`.
pub async fn link_index(rtnl: &Rtnl, name: &str) -> io::Result<u32> {
    let mut links = rtnl
        .handle()
        .link()
        .get()
        .match_name(name.to_string())
        .execute();
    let link = links
        .try_next()
        .await
        .map_err(nl(&format!("get link {name}")))?
        .ok_or_else(|| io::Error::other(format!("no link {name}")))?;
    Ok(link.header.index)
}

/// Whether a link named `name` exists.
pub async fn link_exists(rtnl: &Rtnl, name: &str) -> bool {
    link_index(rtnl, name).await.is_ok()
}

/// Creates veth `a` in `ns_a` and its peer `b` in `ns_b`, both up, with the given IPv4
/// addresses (/24), and static neighbour entries both ways so no ARP is ever needed.
pub async fn veth_pair(
    ns_a: &TempNetns,
    a: &str,
    addr_a: [u8; 4],
    ns_b: &TempNetns,
    b: &str,
    addr_b: [u8; 4],
) -> io::Result<()> {
    let ra = ns_a.rtnl()?;
    ra.handle()
        .link()
        .add(rtnetlink::LinkVeth::new(a, b).build())
        .execute()
        .await
        .map_err(nl("add veth"))?;
    let ib = link_index(&ra, b).await?;
    ra.handle()
        .link()
        .set(
            rtnetlink::LinkUnspec::new_with_index(ib)
                .setns_by_fd(ns_b.fd())
                .build(),
        )
        .execute()
        .await
        .map_err(nl("move veth peer"))?;
    let rb = ns_b.rtnl()?;
    let mut macs = Vec::new();
    for (r, name, addr) in [(&ra, a, addr_a), (&rb, b, addr_b)] {
        let idx = link_index(r, name).await?;
        r.handle()
            .address()
            .add(idx, IpAddr::from(addr), 24)
            .execute()
            .await
            .map_err(nl("add address"))?;
        r.handle()
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl("link up"))?;
        let mut links = r.handle().link().get().match_index(idx).execute();
        let msg = links
            .try_next()
            .await
            .map_err(nl("get link"))?
            .ok_or_else(|| io::Error::other("link vanished"))?;
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                netlink_packet_route::link::LinkAttribute::Address(m) => Some(m.clone()),
                _ => None,
            })
            .unwrap_or_default();
        macs.push((idx, mac));
    }
    for (r, (idx, _), (_, peer_mac), peer_addr) in [
        (&ra, macs[0].clone(), macs[1].clone(), addr_b),
        (&rb, macs[1].clone(), macs[0].clone(), addr_a),
    ] {
        r.handle()
            .neighbours()
            .add(idx, IpAddr::from(peer_addr))
            .link_layer_address(&peer_mac)
            .execute()
            .await
            .map_err(nl("add neighbour"))?;
    }
    Ok(())
}

/// A raw `AF_PACKET` socket on one interface: sees every frame the interface receives or
/// sends, and can inject frames for transmission.
pub struct PacketSocket {
    fd: OwnedFd,
}

const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

impl PacketSocket {
    /// Opens a packet socket on interface `ifindex` of `ns`.
    pub fn open(ns: &Netns, ifindex: u32) -> io::Result<Self> {
        let fd = ns.run(move || {
            // SAFETY: plain socket(2) call; the returned fd is checked and owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL_BE),
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL_BE;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        })?;
        Ok(Self { fd })
    }

    /// Receives frames until `deadline`, keeping those `keep` accepts. Frames the interface
    /// itself sent (PACKET_OUTGOING) are skipped.
    pub fn collect(
        &self,
        wait: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> io::Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(out);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            if rc == 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data; recvfrom fills at most `len` bytes of it.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `from` are valid for writes of the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            if keep(frame) {
                out.push(frame.to_vec());
            }
        }
    }

    /// Transmits a raw Ethernet frame on the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of its length; the socket is bound to an
        // interface, so no address is needed.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A test frame: broadcast destination, a fixed source MAC, `ethertype`, and a payload that
/// starts with the 8-byte `marker` tag followed by `seq` (so tests find their own frames).
pub fn test_frame(ethertype: u16, marker: &[u8; 8], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(14 + 12)];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0x52, 0x45, 0x4d, 0x55, 0x53]);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f[14..22].copy_from_slice(marker);
    f[22..26].copy_from_slice(&seq.to_be_bytes());
    f
}

/// The sequence number of a frame built by [`test_frame`] with `marker`, if it is one.
pub fn frame_seq(frame: &[u8], marker: &[u8; 8]) -> Option<u32> {
    if frame.len() >= 26 && &frame[14..22] == marker {
        Some(u32::from_be_bytes(frame[22..26].try_into().ok()?))
    } else {
        None
    }
}
