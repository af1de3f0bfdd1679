//! Shared by the pair tests: the daemon binaries built from this workspace, the guest image,
//! a scratch directory, and the check that turns a pair report into a test result.
//!
//! The binaries: `cargo test -p remus-drill` does not build other packages' binaries, so
//! the tests build `remusd` and `remus-witness` themselves with the same cargo and target
//! directory (cargo releases its build lock before running tests), then take them from
//! next to the test executable. A stale binary is never used silently: the build runs every
//! time (a no-op when nothing changed).
//!
//! The build is `cargo test --workspace --no-run`, the very selection the suite runs with
//! (`scripts/test.sh`), not `cargo build` of the two binaries: a `build` resolves features
//! without the dev-dependencies, so it compiled a second copy of most dependencies into the
//! same target directory, and CI ran out of disk doing so. With the same selection the
//! build is a no-op in the suite; `remus-agent` and `remus-ha` have integration tests, so
//! their binaries are part of it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use remus_drill::image::{ensure_guest_image, workspace_root};
use remus_drill::pair::hosts::Binaries;
use remus_drill::pair::{PairOptions, PairReport, Scenario};

/// Builds (if needed) and locates `remusd` and `remus-witness`.
pub fn binaries() -> Result<Binaries> {
    static BUILT: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> Result<Binaries> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t = Instant::now();
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["test", "--workspace", "--no-run"])
        .output()
        .with_context(|| format!("running {cargo:?} build"))?;
    if !out.status.success() {
        bail!(
            "building the workspace (for remusd and remus-witness) failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "pair tests: remusd and remus-witness built in {:?}",
        t.elapsed()
    );
    // Next to the test executable's directory (`deps/..`), where the build just put them.
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable without a parent directory")?;
    let b = Binaries {
        remusd: dir.join("remusd"),
        witness: dir.join("remus-witness"),
    };
    for p in [&b.remusd, &b.witness] {
        if !p.exists() {
            bail!("{} missing after the build", p.display());
        }
    }
    Ok(b)
}

/// Options for `scenario` with the guest image and binaries of this workspace, in `work`.
pub fn options(scenario: Scenario, work: &std::path::Path) -> Result<PairOptions> {
    let image = ensure_guest_image()?;
    let mut o = PairOptions::new(image.kernel, image.initrd, work.to_path_buf(), scenario);
    o.binaries = Some(binaries()?);
    o.checkpoints = 10;
    o.partition_hold = std::time::Duration::from_secs(3);
    Ok(o)
}

/// A scratch directory in /dev/shm (guest RAM lives there), kept when the test fails so
/// the daemons' logs can be read: its path is printed with the report.
pub fn scratch(name: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("remus-{name}-"))
        .tempdir_in("/dev/shm")?)
}

/// Prints the report and fails with every failed verdict of every trial.
pub fn check(report: &PairReport, work: tempfile::TempDir) -> Result<()> {
    println!("{}", report.render());
    let failed: Vec<String> = report
        .trials
        .iter()
        .flat_map(|t| {
            t.verdicts
                .iter()
                .filter(|v| !v.ok)
                .map(move |v| format!("trial {}: {}: {}", t.trial, v.name, v.detail))
        })
        .collect();
    if report.passed {
        return Ok(());
    }
    let kept: PathBuf = work.keep();
    bail!(
        "pair drill failed (logs kept in {}):\n{}",
        kept.display(),
        failed.join("\n")
    )
}
