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

/// Prints the report and fails with every failed verdict of every trial (keeping the logs;
/// with `REMUS_PAIR_KEEP=1` a passing run's logs are kept too).
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
        // REMUS_PAIR_KEEP=1 keeps a passing run's logs too (to read what the daemons said).
        if std::env::var_os("REMUS_PAIR_KEEP").is_some_and(|v| v == "1") {
            println!("logs kept in {}", work.keep().display());
        }
        return Ok(());
    }
    let kept: PathBuf = work.keep();
    bail!(
        "pair drill failed (logs kept in {}):\n{}",
        kept.display(),
        failed.join("\n")
    )
}

/// A past release's binaries, built from this repository's history by
/// `scripts/build-release.sh` (by the commit RELEASES records; cached under
/// `target/releases/<version>` between runs), and how long getting them took.
///
/// # Errors
/// The release is not in RELEASES, its commit is not in this clone (a shallow clone: the
/// test must fail, not skip), or its build failed: the script's own words are in the error.
pub fn release_binaries(version: &str) -> Result<(ReleaseBinaries, std::time::Duration)> {
    let t = Instant::now();
    let script = workspace_root().join("scripts/build-release.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(version)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "building release {version} from git history failed ({}):\n{}",
            out.status,
            tail(&stderr, 40)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(
        stdout
            .lines()
            .last()
            .context("build-release.sh printed no directory")?
            .trim(),
    );
    let b = ReleaseBinaries {
        remusd: dir.join("remusd"),
        remusctl: dir.join("remusctl"),
        witness: dir.join("remus-witness"),
    };
    for p in [&b.remusd, &b.remusctl, &b.witness] {
        if !p.exists() {
            bail!(
                "{} missing after build-release.sh {version}:\n{}",
                p.display(),
                tail(&stderr, 20)
            );
        }
    }
    for l in stderr.lines().filter(|l| l.starts_with("build-release:")) {
        eprintln!("{l}");
    }
    Ok((b, t.elapsed()))
}

/// A past release's binaries.
#[derive(Clone, Debug)]
pub struct ReleaseBinaries {
    /// Its daemon.
    pub remusd: PathBuf,
    /// Its CLI.
    pub remusctl: PathBuf,
    /// Its witness.
    pub witness: PathBuf,
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
