//! A NIC on `-netdev stream` to a unix socket the test listens on (the relay's position):
//! QEMU connects, and frames flow both ways — the guest answers ARP and ping, before and
//! after a checkpoint (stop, device state, cont).

mod common;

use std::time::{Duration, Instant};

use common::*;
use remus_qemu::{MacAddr, NetBackend, NicSpec, QemuProcess, VmControl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x7e, 0x57, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x7e, 0x57, 0x02];
const GUEST_IP: [u8; 4] = [10, 77, 0, 10];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
/// Largest frame accepted from the socket (QEMU sends at most 64 KiB + headers).
const MAX_FRAME: usize = 70_000;

/// Reads one length-prefixed frame (4-byte big-endian length, then the Ethernet frame).
async fn read_frame(r: &mut OwnedReadHalf) -> std::io::Result<Vec<u8>> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame).await?;
    Ok(frame)
}

async fn write_frame(w: &mut OwnedWriteHalf, frame: &[u8]) {
    w.write_u32(frame.len() as u32).await.unwrap();
    w.write_all(frame).await.unwrap();
}

fn ethernet(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

fn arp(op: u16, target_mac: [u8; 6], target_ip: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&HOST_MAC);
    a.extend_from_slice(&HOST_IP);
    a.extend_from_slice(&target_mac);
    a.extend_from_slice(&target_ip);
    a
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ping(seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&HOST_IP);
    ip.extend_from_slice(&GUEST_IP);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ethernet(GUEST_MAC, 0x0800, &ip)
}

/// What a frame from the guest is, as far as this test cares.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The guest's ARP reply for its own address, to us.
    ArpReply,
    /// The guest asking for our address.
    ArpRequestForHost,
    EchoReply {
        seq: u16,
        payload: Vec<u8>,
    },
    Other,
}

fn classify(f: &[u8]) -> Seen {
    if f.len() < 14 || f[6..12] != GUEST_MAC {
        return Seen::Other;
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let p = &f[14..];
    if ethertype == 0x0806 && p.len() >= 28 && p[8..14] == GUEST_MAC && p[14..18] == GUEST_IP {
        return match u16::from_be_bytes([p[6], p[7]]) {
            2 if p[24..28] == HOST_IP => Seen::ArpReply,
            1 if p[24..28] == HOST_IP => Seen::ArpRequestForHost,
            _ => Seen::Other,
        };
    }
    if ethertype == 0x0800 && p.len() >= 28 && p[9] == 1 && p[12..16] == GUEST_IP {
        let ihl = ((p[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([p[2], p[3]]) as usize;
        if ihl < 20 || total > p.len() || total < ihl + 8 {
            return Seen::Other;
        }
        let icmp = &p[ihl..total];
        if icmp[0] == 0 && icmp[4..6] == [0x12, 0x34] {
            return Seen::EchoReply {
                seq: u16::from_be_bytes([icmp[6], icmp[7]]),
                payload: icmp[8..].to_vec(),
            };
        }
    }
    Seen::Other
}

/// Sends `request` every 500 ms until a frame satisfying `want` arrives; answers the guest's
/// ARP requests for our address meanwhile.
async fn exchange(
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
    request: &[u8],
    want: impl Fn(&Seen) -> bool,
    what: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {what} from the guest"
        );
        write_frame(w, request).await;
        let round = Instant::now();
        while round.elapsed() < Duration::from_millis(500) {
            let Ok(frame) = tokio::time::timeout(Duration::from_millis(100), read_frame(r)).await
            else {
                continue;
            };
            let seen = classify(&frame.expect("reading a frame from QEMU"));
            if want(&seen) {
                return start.elapsed();
            }
            if seen == Seen::ArpRequestForHost {
                write_frame(
                    w,
                    &ethernet(GUEST_MAC, 0x0806, &arp(2, GUEST_MAC, GUEST_IP)),
                )
                .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_flow_over_a_stream_netdev_across_a_checkpoint() {
    let images = guest_images();
    let scratch = Scratch::new("nic");
    let disk = scratch.path("disk.raw");
    raw_disk(&disk, 1 << 20);
    let sock = scratch.path("net0.sock");
    // The relay's side: it must listen before QEMU starts (QEMU 7.2 never reconnects).
    let listener = UnixListener::bind(&sock).expect("binding the NIC socket");
    let params = "remus.mode=service remus.ip=10.77.0.10/24 remus.gw=10.77.0.1 ipv6.disable=1";
    let mut spec = guest_spec(&images, &scratch, "nic", params, &disk);
    spec.nics.push(NicSpec {
        id: "net0".into(),
        mac: MacAddr(GUEST_MAC),
        backend: NetBackend::Stream { path: sock.clone() },
    });
    let mut qemu = QemuProcess::spawn(&spec).await.expect("spawning QEMU");
    let (conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("QEMU did not connect to the NIC socket")
        .expect("accept");
    let (mut r, mut w) = conn.into_split();
    let vm = VmControl::new(qemu.connect_qmp().await.expect("QMP"));
    vm.enable_checkpointing()
        .await
        .expect("enable checkpointing");
    wait_console(&spec, Duration::from_secs(120), "listening service", |c| {
        c.contains("listening on port 7000")
    })
    .await;

    let request = ethernet([0xff; 6], 0x0806, &arp(1, [0; 6], GUEST_IP));
    let t_arp = exchange(
        &mut r,
        &mut w,
        &request,
        |s| *s == Seen::ArpReply,
        "ARP reply",
    )
    .await;
    let payload = b"remus-stream-nic".to_vec();
    let t_ping = exchange(
        &mut r,
        &mut w,
        &ping(1, &payload),
        |s| matches!(s, Seen::EchoReply { seq: 1, payload: p } if *p == payload),
        "echo reply",
    )
    .await;

    // One checkpoint with the NIC in the machine: the frames keep flowing after it.
    vm.stop().await.expect("stop");
    let state = vm
        .save_device_state()
        .await
        .expect("device state with a NIC");
    vm.cont().await.expect("cont");
    let t_after = exchange(
        &mut r,
        &mut w,
        &ping(2, &payload),
        |s| matches!(s, Seen::EchoReply { seq: 2, payload: p } if *p == payload),
        "echo reply after a checkpoint",
    )
    .await;
    println!(
        "ARP reply after {t_arp:?}, echo reply after {t_ping:?}, after checkpoint {t_after:?}; \
         device state with a romfile-less NIC: {} bytes (saved in {:?})",
        state.bytes.len(),
        state.elapsed
    );
    qemu.kill_and_wait().await.expect("kill");
}
