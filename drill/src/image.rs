//! The test guest image (a Debian kernel + a busybox initramfs with the `remus-guest`
//! workload), built by `tests/images/build-guest.sh`: where the drill looks for it, and the
//! build-if-needed step the end-to-end tests run first.

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
        .expect("drill/ has a parent")
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

/// Default location of the guest image built by `tests/images/build-guest.sh`.
pub fn default_image_dir() -> PathBuf {
    std::env::var_os("REMUS_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/remus-images"))
        .join("guest")
}
