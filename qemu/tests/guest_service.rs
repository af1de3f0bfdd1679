//! The guest's TCP counter service over a real NIC (QEMU's user-mode network with a host
//! port forward), and the same service continuing in restored RAM after a checkpoint, a
//! kill and a restore: the value is the checkpoint's, memory and disk agree, no reboot.

mod common;

use std::time::{Duration, Instant};

use common::*;
use remus_qemu::{GuestRam, GuestRamMut, QemuProcess, QemuSpec, VmControl};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A localhost port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn with_user_nic(mut spec: QemuSpec, port: u16) -> QemuSpec {
    spec.extra_args.extend([
        "-netdev".to_string(),
        format!("user,id=u0,hostfwd=tcp:127.0.0.1:{port}-:7000"),
        "-device".into(),
        "virtio-net-pci,netdev=u0,mac=52:54:00:5e:00:01,romfile=".into(),
    ]);
    spec
}

struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    /// Connects and proves the guest answers (user networking accepts on the host side even
    /// before the guest listens, then drops the connection).
    async fn connect(port: u16) -> Client {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "service never answered"
            );
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)).await {
                let (r, w) = s.into_split();
                let mut c = Client {
                    reader: BufReader::new(r),
                    writer: w,
                };
                if c.try_request("GET").await.is_some() {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn try_request(&mut self, line: &str) -> Option<String> {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .ok()?;
        let mut reply = String::new();
        let n = tokio::time::timeout(Duration::from_secs(20), self.reader.read_line(&mut reply))
            .await
            .ok()?
            .ok()?;
        (n > 0).then(|| reply.trim_end().to_string())
    }

    async fn request(&mut self, line: &str) -> String {
        self.try_request(line)
            .await
            .unwrap_or_else(|| panic!("no reply to {line:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_answers_and_continues_in_restored_ram() {
    let images = guest_images();
    let scratch = Scratch::new("svc");
    let disk = scratch.path("disk.raw");
    raw_disk(&disk, 1 << 20);
    let params = "remus.mode=service remus.ip=10.0.2.15/24 remus.gw=10.0.2.2 ipv6.disable=1";
    let spec = with_user_nic(
        guest_spec(&images, &scratch, "svc", params, &disk),
        free_port(),
    );
    let port = |s: &QemuSpec| -> u16 {
        let fwd = s.extra_args.iter().find(|a| a.contains("hostfwd")).unwrap();
        fwd.split(':')
            .nth(2)
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };

    let mut primary = QemuProcess::spawn(&spec).await.expect("spawn");
    let vm = VmControl::new(primary.connect_qmp().await.expect("QMP"));
    vm.enable_checkpointing().await.unwrap();
    wait_console(&spec, Duration::from_secs(120), "listening service", |c| {
        c.contains("listening on port 7000")
    })
    .await;

    // Two connections, requests interleaved, several per connection.
    let mut a = Client::connect(port(&spec)).await;
    let mut b = Client::connect(port(&spec)).await;
    let mut expected = 0u64;
    for i in 0..8 {
        let c = if i % 3 == 0 { &mut b } else { &mut a };
        expected += 1;
        assert_eq!(c.request("INC").await, expected.to_string());
    }
    assert_eq!(b.request("GET").await, "8");
    assert_eq!(a.request("CHECK").await, "ok mem=8 disk=8");
    assert!(a.request("HELLO").await.starts_with("err unknown request"));
    let long = "X".repeat(1000);
    assert_eq!(b.request(&long).await, "err request line too long");

    // Checkpoint: RAM, device state, disk.
    vm.stop().await.unwrap();
    let ram = GuestRam::open(&spec.ram_path, spec.memory_bytes()).unwrap();
    let mut replica =
        GuestRamMut::create(&scratch.shm("replica.ram"), spec.memory_bytes()).unwrap();
    replica.as_mut_slice().copy_from_slice(ram.as_slice());
    let state = vm.save_device_state().await.unwrap();
    let replica_disk = scratch.path("replica-disk.raw");
    std::fs::copy(&disk, &replica_disk).unwrap();
    vm.cont().await.unwrap();
    // The primary moves past the checkpoint before it dies.
    assert_eq!(a.request("INC").await, "9");
    primary.kill_and_wait().await.unwrap();

    let mut bspec = with_user_nic(
        guest_spec(&images, &scratch, "svc-backup", params, &replica_disk),
        free_port(),
    );
    bspec.incoming = true;
    GuestRamMut::create(&bspec.ram_path, bspec.memory_bytes())
        .unwrap()
        .as_mut_slice()
        .copy_from_slice(replica.as_slice());
    let mut backup = QemuProcess::spawn(&bspec).await.expect("spawn backup");
    let bvm = VmControl::new(backup.connect_qmp().await.expect("backup QMP"));
    bvm.enable_checkpointing().await.unwrap();
    bvm.load_device_state(&state.bytes).await.expect("load");
    bvm.cont().await.unwrap();

    let mut c = Client::connect(port(&bspec)).await;
    assert_eq!(c.request("GET").await, "8", "the checkpoint's value");
    assert_eq!(c.request("CHECK").await, "ok mem=8 disk=8");
    assert_eq!(c.request("INC").await, "9");
    assert_eq!(c.request("CHECK").await, "ok mem=9 disk=9");
    let restored_console = console(&bspec);
    assert!(
        !restored_console.contains("remus-guest: start"),
        "the restored guest rebooted instead of continuing: {restored_console}"
    );
    backup.kill_and_wait().await.unwrap();
}
