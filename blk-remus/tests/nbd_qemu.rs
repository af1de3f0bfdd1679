//! The NBD server against the real `qemu-io` client: every command, FUA, flush, trim,
//! write-zeroes, unaligned and out-of-range requests, read-only exports, concurrent requests,
//! and malformed requests from a raw client.

mod common;

use std::sync::Arc;

use blk_remus::nbd::proto::*;
use blk_remus::{BlockBackend, FileBackend};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_commands_reach_the_image() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let backend: Arc<dyn BlockBackend> = Arc::new(FileBackend::create(&img, SIZE).unwrap());
    let srv = Server::start(dir.path(), vec![("disk", backend)]).await;

    // Plain, FUA, unaligned writes; flush; read back with pattern verification.
    let out = srv
        .qemu_io(
            "disk",
            &[
                "write -P 0xab 0 65536",
                "write -f -P 0xcd 65536 4096",
                "write -P 0x11 1000 333",
                "flush",
                "read -P 0xab 0 1000",
                "read -P 0x11 1000 333",
                "read -P 0xab 1333 64203",
                "read -P 0xcd 65536 4096",
            ],
        )
        .await;
    ok(&out);
    assert_eq!(read_range(&img, 1000, 333), vec![0x11; 333]);
    assert_eq!(read_range(&img, 65536, 4096), vec![0xcd; 4096]);
    assert_eq!(read_range(&img, 999, 1), vec![0xab]);

    // Write-zeroes (with and without unmap) and discard.
    let out = srv
        .qemu_io(
            "disk",
            &[
                "write -P 0x77 131072 65536",
                "write -z 131072 4096",
                "write -z -u 135168 4096",
                "discard 0 4096",
                "read -P 0 131072 8192",
                "read -P 0x77 139264 57344",
                "read -P 0 0 4096",
            ],
        )
        .await;
    ok(&out);
    assert_eq!(read_range(&img, 131072, 8192), vec![0; 8192]);
    assert_eq!(read_range(&img, 0, 4096), vec![0; 4096]);
    assert_eq!(read_range(&img, 4096, 4), vec![0xab; 4]);

    // Many requests in flight on one connection, then a flush.
    let mut cmds: Vec<String> = (0..32)
        .map(|i| format!("aio_write -P {} {} 4096", 0x20 + i, 1048576 + i * 4096))
        .collect();
    cmds.push("aio_flush".into());
    for i in 0..32 {
        cmds.push(format!("read -P {} {} 4096", 0x20 + i, 1048576 + i * 4096));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    ok(&srv.qemu_io("disk", &cmds).await);
    assert_eq!(
        read_range(&img, 1048576 + 31 * 4096, 4096),
        vec![0x3f; 4096]
    );

    // Out of range: qemu-io reports an error and exits non-zero; the image is untouched.
    let before = std::fs::read(&img).unwrap();
    for cmd in [
        format!("write -P 0x99 {} 512", SIZE),
        format!("write -P 0x99 {} 1024", SIZE - 512),
        format!("read {} 512", SIZE),
    ] {
        let out = srv.qemu_io("disk", &[&cmd]).await;
        let so = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{cmd}: expected failure, got {so}");
        assert!(so.contains("failed"), "{cmd}: {so}");
    }
    assert_eq!(std::fs::read(&img).unwrap(), before);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), SIZE);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.img");
    FileBackend::create(&img, SIZE).unwrap();
    let backend: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img, true).unwrap());
    let srv = Server::start(dir.path(), vec![("ro", backend)]).await;
    ok(&srv
        .qemu_io_flags("ro", &["-r"], &["read -P 0 0 4096"])
        .await);
    // Opened read-write, qemu's NBD client refuses because we advertise READ_ONLY.
    let out = srv.qemu_io("ro", &["write 0 4096"]).await;
    assert!(!out.status.success());
    // A raw client that ignores the flag gets EPERM from the server.
    let (mut s, _size, flags) = raw_connect(&srv.socket, "ro").await;
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & TFLAG_SEND_TRIM, 0);
    let e = raw_request(&mut s, CMD_WRITE, 0, 0, 1, Some(&[1])).await;
    assert_eq!(e, libc::EPERM as u32);
    assert_eq!(
        std::fs::read(&img)
            .unwrap()
            .iter()
            .filter(|&&b| b != 0)
            .count(),
        0
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_client_errors_and_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let backend: Arc<dyn BlockBackend> = Arc::new(FileBackend::create(&img, SIZE).unwrap());
    let srv = Server::start(dir.path(), vec![("d", backend)]).await;
    let (mut s, size, flags) = raw_connect(&srv.socket, "d").await;
    assert_eq!(size, SIZE);
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
    }
    // Table: (cmd, flags, offset, len, payload, expected errno).
    type Case = (u16, u16, u64, u32, Option<Vec<u8>>, i32);
    let cases: Vec<Case> = vec![
        (CMD_WRITE, 0, SIZE - 1, 2, Some(vec![1, 2]), libc::ENOSPC),
        (CMD_WRITE_ZEROES, 0, SIZE, 1, None, libc::ENOSPC),
        (CMD_TRIM, 0, u64::MAX - 1, 4096, None, libc::ENOSPC),
        (CMD_READ, 0, SIZE, 1, None, libc::EINVAL),
        (CMD_READ, 0, 0, MAX_PAYLOAD + 1, None, libc::EINVAL),
        (CMD_WRITE, 0x80, 0, 1, Some(vec![1]), libc::EINVAL),
        (42, 0, 0, 1, None, libc::EINVAL),
        (CMD_WRITE, CMD_FLAG_FUA, SIZE - 1, 1, Some(vec![7]), 0),
        (CMD_FLUSH, 0, 0, 0, None, 0),
    ];
    for (i, (cmd, fl, off, len, payload, want)) in cases.iter().enumerate() {
        let e = raw_request(&mut s, *cmd, *fl, *off, *len, payload.as_deref()).await;
        assert_eq!(e, *want as u32, "case {i}");
    }
    assert_eq!(read_range(&img, SIZE - 1, 1), vec![7]);
    // An oversize write closes the connection.
    let req = Request {
        flags: 0,
        cmd: CMD_WRITE,
        cookie: 9,
        offset: 0,
        len: MAX_PAYLOAD + 1,
    };
    s.write_all(&req.encode()).await.unwrap();
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0, "connection should close without a reply");
    // Bad magic closes too; the server keeps serving new connections.
    let (mut s, _, _) = raw_connect(&srv.socket, "d").await;
    s.write_all(&[0u8; Request::SIZE]).await.unwrap();
    assert_eq!(s.read_to_end(&mut rest).await.unwrap_or(0), 0);
    let (mut s, _, _) = raw_connect(&srv.socket, "d").await;
    assert_eq!(raw_request(&mut s, CMD_READ, 0, 0, 512, None).await, 0);
    // Unknown export in GO: error reply, negotiation continues.
    let mut c = tokio::net::UnixStream::connect(&srv.socket).await.unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).await.unwrap();
    c.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await
        .unwrap();
    send_go(&mut c, "nope").await;
    let (kind, _) = read_opt_reply(&mut c).await;
    assert_eq!(kind, REP_ERR_UNKNOWN);
    // LIST shows the export.
    c.write_u64(IHAVEOPT).await.unwrap();
    c.write_u32(OPT_LIST).await.unwrap();
    c.write_u32(0).await.unwrap();
    let (kind, data) = read_opt_reply(&mut c).await;
    assert_eq!(kind, REP_SERVER);
    assert_eq!(&data[4..5], b"d");
    assert_eq!(read_opt_reply(&mut c).await.0, REP_ACK);
    srv.stop().await;
}

async fn send_go(c: &mut tokio::net::UnixStream, name: &str) {
    c.write_u64(IHAVEOPT).await.unwrap();
    c.write_u32(OPT_GO).await.unwrap();
    c.write_u32(4 + name.len() as u32 + 2 + 2).await.unwrap();
    c.write_u32(name.len() as u32).await.unwrap();
    c.write_all(name.as_bytes()).await.unwrap();
    c.write_u16(1).await.unwrap();
    c.write_u16(INFO_BLOCK_SIZE).await.unwrap();
}

async fn read_opt_reply(c: &mut tokio::net::UnixStream) -> (u32, Vec<u8>) {
    assert_eq!(c.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
    let _opt = c.read_u32().await.unwrap();
    let kind = c.read_u32().await.unwrap();
    let len = c.read_u32().await.unwrap();
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).await.unwrap();
    (kind, d)
}

/// Negotiates with NBD_OPT_GO; returns the stream, size and transmission flags.
async fn raw_connect(sock: &std::path::Path, name: &str) -> (tokio::net::UnixStream, u64, u16) {
    let mut c = tokio::net::UnixStream::connect(sock).await.unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    c.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await
        .unwrap();
    send_go(&mut c, name).await;
    let (mut size, mut flags) = (0, 0);
    loop {
        let (kind, d) = read_opt_reply(&mut c).await;
        match kind {
            REP_INFO if u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            REP_INFO => {
                assert_eq!(u16::from_be_bytes([d[0], d[1]]), INFO_BLOCK_SIZE);
                assert_eq!(u32::from_be_bytes(d[2..6].try_into().unwrap()), 1);
            }
            REP_ACK => break,
            k => panic!("unexpected option reply {k:#x}"),
        }
    }
    (c, size, flags)
}

/// Sends one request and returns the reply's errno (consuming read data).
async fn raw_request(
    c: &mut tokio::net::UnixStream,
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
    payload: Option<&[u8]>,
) -> u32 {
    let req = Request {
        flags,
        cmd,
        cookie: 0xc0ffee,
        offset,
        len,
    };
    c.write_all(&req.encode()).await.unwrap();
    if let Some(p) = payload {
        c.write_all(p).await.unwrap();
    }
    let mut r = [0u8; 16];
    c.read_exact(&mut r).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 0xc0ffee);
    let errno = u32::from_be_bytes(r[4..8].try_into().unwrap());
    if errno == 0 && cmd == CMD_READ {
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).await.unwrap();
    }
    errno
}
