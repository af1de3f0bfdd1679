//! The test guest image (a Debian kernel + a busybox initramfs with the `remus-guest`
//! workload), built by `tests/images/build-guest.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Paths of a built guest image.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Uncompressed kernel with a PVH note (boots faster under TCG).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Builds the guest image if an input changed (idempotent, locked) and returns its paths.
///
/// # Errors
/// The build script failed: its output is in the error, so a test fails with the reason
/// (e.g. apt cannot download the kernel) instead of passing silently.
pub fn ensure_guest_image() -> Result<GuestImage> {
    let root = workspace_root();
    let script = root.join("tests/images/build-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(&root)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = std::env::var_os("REMUS_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/remus-images"))
        .join("guest");
    let image = GuestImage {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd.img"),
    };
    for p in [&image.kernel, &image.initrd] {
        if !p.exists() {
            bail!("{} missing after build-guest.sh", p.display());
        }
    }
    Ok(image)
}

/// The last record of the guest's disk log in a raw image (see
/// `tests/guest/src/disklog.rs`: 512-byte slots `"RMSC" | seq | value | crc32`).
///
/// # Errors
/// The image cannot be read.
pub fn disk_log_last(image: &Path, slots: u64) -> Result<Option<(u64, u64)>> {
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let mut best: Option<(u64, u64)> = None;
    for slot in bytes.chunks(512).take(slots as usize) {
        if let Some(r) = remus_guest_record(slot) {
            if best.is_none_or(|b| r.0 > b.0) {
                best = Some(r);
            }
        }
    }
    Ok(best)
}

fn remus_guest_record(slot: &[u8]) -> Option<(u64, u64)> {
    if slot.len() < 24 || &slot[0..4] != b"RMSC" {
        return None;
    }
    let crc = u32::from_le_bytes(slot[20..24].try_into().ok()?);
    if crc != crc32_ieee(&slot[0..20]) {
        return None;
    }
    Some((
        u64::from_le_bytes(slot[4..12].try_into().ok()?),
        u64::from_le_bytes(slot[12..20].try_into().ok()?),
    ))
}

/// CRC-32 (IEEE), as the guest computes it.
fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
