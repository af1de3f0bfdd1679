//! Reading what the test guest shows: its serial console log (QEMU appends ttyS0 to a
//! file) and the counter log on its disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Every `counter=<n>` value printed so far, in order.
pub fn counters(log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("counter="))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// Every `check …` line printed so far.
pub fn checks(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("check ").map(str::to_string))
        .collect()
}

/// Waits until `pred` holds for the log's text, polling.
///
/// # Errors
/// Timeout, with the log's tail.
pub async fn wait_for(
    log: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if pred(&text) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let tail: String = text
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{what}: not seen within {timeout:?} in {}; tail:\n{tail}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last record of the guest's disk log in a raw image: `(seq, value)`.
///
/// The log (`remus_guest::disklog`) is a ring of 512-byte slots; the valid record with the
/// highest sequence number is the last. Records are decoded by the guest's own code.
///
/// # Errors
/// The image cannot be read.
pub fn disk_log_last(image: &Path, slots: u64) -> Result<Option<(u64, u64)>> {
    use std::io::Read;
    let mut f = std::fs::File::open(image)?;
    let mut buf = vec![0u8; (slots as usize) * 512];
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let mut best: Option<(u64, u64)> = None;
    for slot in buf[..got].chunks(512) {
        if let Some(r) = record(slot) {
            if best.is_none_or(|b| r.0 > b.0) {
                best = Some(r);
            }
        }
    }
    Ok(best)
}

fn record(slot: &[u8]) -> Option<(u64, u64)> {
    remus_guest::disklog::Record::decode(slot).map(|r| (r.seq, r.value))
}

/// The test guest's kernel command line for a drill: the workload in both roles (memory
/// counter and disk log, TCP service on `guest_cidr`), a tick every 50 ms, a disk/memory
/// check every 5 ticks. One definition for the local and the pair drill.
pub fn kernel_cmdline(guest_cidr: &str) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 ipv6.disable=1 remus.mode=both remus.ip={guest_cidr} \
         remus.interval=50 remus.check_every=5"
    )
}

/// The test guest as a protected domain's machine: what the local and the pair drill
/// configure alike.
pub struct GuestMachine<'a> {
    /// QEMU accelerator (`tcg` here, `kvm` in production).
    pub accel: &'a str,
    /// Guest RAM.
    pub memory_mib: u64,
    /// Guest kernel.
    pub kernel: &'a Path,
    /// Guest initramfs.
    pub initrd: &'a Path,
    /// The guest's address for its TCP service.
    pub guest_cidr: &'a str,
    /// The guest NIC's MAC.
    pub mac: &'a str,
    /// The bridge the NIC's tap joins.
    pub bridge: &'a str,
    /// This node's disk image and the replica it keeps of the peer's.
    pub image: &'a Path,
    /// See `image`.
    pub replica: &'a Path,
    /// Output buffering off (the local drill's unsafe run only).
    pub unsafe_no_output_buffering: bool,
}

impl GuestMachine<'_> {
    /// The domain's `qemu`, `nic`, `netbuf` and `disk` tables, in TOML, to follow its
    /// `[[domain]]` keys.
    pub fn domain_tables(&self) -> String {
        format!(
            r#"[domain.qemu]
accel = "{accel}"
machine = "pc"
memory_mib = {mem}
vcpus = 1
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"

[[domain.nic]]
id = "net0"
mac = "{mac}"
bridge = "{bridge}"

[domain.netbuf]
backend = "relay"
unsafe_no_output_buffering = {unsafe_nobuf}

[[domain.disk]]
id = "d0"
image = "{image}"
replica = "{replica}"
"#,
            accel = self.accel,
            mem = self.memory_mib,
            kernel = self.kernel.display(),
            initrd = self.initrd.display(),
            cmdline = kernel_cmdline(self.guest_cidr),
            mac = self.mac,
            bridge = self.bridge,
            unsafe_nobuf = self.unsafe_no_output_buffering,
            image = self.image.display(),
            replica = self.replica.display(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_highest_sequence_and_skips_corrupt_slots() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let mut bytes = vec![0u8; 512 * 8];
        let mut put = |slot: usize, seq: u64, value: u64, corrupt: bool| {
            let s = &mut bytes[slot * 512..slot * 512 + 24];
            s[0..4].copy_from_slice(b"RMSC");
            s[4..12].copy_from_slice(&seq.to_le_bytes());
            s[12..20].copy_from_slice(&value.to_le_bytes());
            let crc = remus_guest::disklog::crc32(&s[0..20]) ^ u32::from(corrupt);
            s[20..24].copy_from_slice(&crc.to_le_bytes());
        };
        put(0, 8, 80, false);
        put(1, 9, 90, false);
        put(2, 10, 100, true);
        std::fs::write(&img, &bytes).unwrap();
        assert_eq!(disk_log_last(&img, 8).unwrap(), Some((9, 90)));
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert_eq!(disk_log_last(&img, 8).unwrap(), None);
    }
}
