//! Shared pieces of the integration tests: the guest image, unique scratch files that are
//! removed even when a test fails, console polling, timing statistics.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use remus_qemu::{Accel, Boot, DiskBackend, DiskSpec, QemuSpec, Serial};

/// The workspace root (this crate lives in `<root>/qemu`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate has a parent directory")
        .to_path_buf()
}

/// Kernel and initramfs of the test guest.
pub struct Images {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (idempotently) and returns the guest image. Panics with instructions if that fails:
/// these tests prove the product against a real guest and must not pass without one.
pub fn guest_images() -> Images {
    let root = workspace_root();
    let script = root.join("tests/images/build-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    if !out.status.success() {
        panic!(
            "building the guest image failed ({}). Build it by hand with `{}` \
             (needs apt access for the Debian kernel, busybox-static, cpio, xz); output:\n{}",
            out.status,
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = std::env::var_os("REMUS_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/remus-images"))
        .join("guest");
    let images = Images {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd.img"),
    };
    for p in [&images.kernel, &images.initrd] {
        assert!(
            p.is_file(),
            "{} missing after build-guest.sh succeeded",
            p.display()
        );
    }
    images
}

/// A scratch directory plus RAM files in /dev/shm, all named uniquely and removed on drop.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    /// Prefix of this test's files in /dev/shm.
    shm_prefix: String,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("remus-qemu-{test}-"))
            .tempdir()
            .expect("creating a scratch directory");
        let unique = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        Scratch {
            dir,
            shm_prefix: format!("/dev/shm/{unique}"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A RAM file path in /dev/shm (removed with the scratch).
    pub fn shm(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}-{name}", self.shm_prefix))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some((dir, prefix)) = self.shm_prefix.rsplit_once('/') else {
            return;
        };
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// A zeroed raw disk image of `size` bytes.
pub fn raw_disk(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("creating disk image");
    f.set_len(size).expect("sizing disk image");
}

/// The guest with the given kernel parameters, a raw disk and its console in a file.
pub fn guest_spec(
    images: &Images,
    scratch: &Scratch,
    tag: &str,
    params: &str,
    disk: &Path,
) -> QemuSpec {
    let mut spec = QemuSpec::new(
        &format!("test-{tag}"),
        &scratch.shm(&format!("{tag}.ram")),
        &scratch.path(&format!("{tag}.qmp")),
    );
    spec.accel = Accel::Tcg;
    spec.memory_mib = 128;
    spec.boot = Boot::Kernel {
        kernel: images.kernel.clone(),
        initrd: Some(images.initrd.clone()),
        append: format!("console=ttyS0 quiet panic=-1 {params}"),
    };
    spec.serial = Serial::File(scratch.path(&format!("{tag}.console")));
    spec.disks.push(DiskSpec {
        id: "disk0".into(),
        backend: DiskBackend::RawFile {
            path: disk.to_owned(),
        },
    });
    spec
}

/// The console file's contents (empty if not yet created).
pub fn console(spec: &QemuSpec) -> String {
    match &spec.serial {
        Serial::File(p) => std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
        _ => panic!("test spec without a console file"),
    }
}

/// Waits until `pred` holds for the console, or panics with the console and `context`.
pub async fn wait_console(
    spec: &QemuSpec,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = console(spec);
        if pred(&text) {
            return text;
        }
        if start.elapsed() > timeout {
            panic!(
                "{}: no {what} on the console after {timeout:?}; console:\n{}",
                spec.name,
                tail(&text, 2000)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Values of complete `counter=<n>` lines, in order.
pub fn counters(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("counter="))
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// min / median / max of a series, in milliseconds.
pub fn stats(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{:7.2} / {:7.2} / {:7.2}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}
