//! `remus-drill`: run a failover drill and report what it measured and checked.
//!
//! By default the pair drill: two real `remusd` daemons in two network namespaces, a
//! `remus-witness`, a client, and a failure scenario (`--scenario`, `--trials`); see
//! [`crate::pair`]. It needs the `remusd` and `remus-witness` binaries next to
//! `remus-drill` or in `PATH`. With `--local`, the one-process drill: the same daemon code
//! for both nodes and a witness, in this process (see [`crate::local`]); no binaries to
//! find, and it reports the pause beside the memory-scan floor.
//!
//! The flags are those `remusctl drill` had before the drill left the product; exit codes
//! follow remusctl's: 0 passed, 1 failed or could not run, 2 bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use remus_agent::cli::{EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE};

use crate::image::default_image_dir;
use crate::local::{run_local, DrillOptions};
use crate::pair::{run_pair, PairOptions, Scenario};

/// Run a failover drill: protect a test guest, fail its primary, let the backup take over,
/// and report what was measured and checked.
#[derive(Debug, Parser)]
#[command(name = "remus-drill", version, about)]
pub struct DrillCmd {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Run the one-process local drill instead of the pair drill (both daemons and the
    /// witness in this process).
    #[arg(long)]
    local: bool,
    /// The pair drill's failure scenario.
    #[arg(
        long,
        value_enum,
        default_value = "kill-primary",
        conflicts_with = "local"
    )]
    scenario: Scenario,
    /// Trials of the scenario (the pair is reused between trials where it can be).
    #[arg(long, default_value_t = 1, conflicts_with = "local", value_parser = clap::value_parser!(u32).range(1..=1000))]
    trials: u32,
    /// The pair drill's witness lease in milliseconds (with `--arbiter etcd`: rounded up to
    /// whole seconds, at least 2).
    #[arg(long, default_value_t = 1500, conflicts_with = "local", value_parser = clap::value_parser!(u64).range(100..=600_000))]
    lease_ms: u64,
    /// Who arbitrates the pair's leases on the witness host: `witness` (remus-witness) or
    /// `etcd` (a real etcd from Debian's etcd-server, `[witness] mode = "etcd"`).
    #[arg(long, value_enum, default_value = "witness", conflicts_with = "local")]
    arbiter: ArbiterArg,
    /// With `--arbiter etcd`: members of the etcd cluster on the witness host.
    #[arg(long, default_value_t = 1, conflicts_with = "local", value_parser = clap::value_parser!(u64).range(1..=7))]
    etcd_members: u64,
    /// How long the partition scenario keeps the hosts apart, in milliseconds.
    #[arg(long, default_value_t = 4000, conflicts_with = "local", value_parser = clap::value_parser!(u64).range(0..=600_000))]
    partition_hold_ms: u64,
    /// Checkpoints to acknowledge before the failure is injected (the pair drill counts
    /// them from when protection is first seen).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    checkpoints: u64,
    /// Checkpoint interval in milliseconds.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    interval_ms: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(16..=65_536))]
    memory_mib: u64,
    /// QEMU accelerator: tcg or kvm.
    #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
    accel: String,
    /// Guest kernel (default: $REMUS_IMAGES/guest/vmlinux, built by tests/images/build-guest.sh).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs (default: next to the kernel).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Scratch directory; guest RAM lives there (default: a new directory in /dev/shm).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Seed for the moment of the failure within the epoch cycle.
    #[arg(long)]
    seed: Option<u64>,
    /// UNSAFE: release the guest's network output at once instead of holding it until the
    /// backup acknowledges. The drill then shows what that costs (replies of lost state, a
    /// dead connection) and exits non-zero.
    #[arg(long)]
    unsafe_no_output_buffering: bool,
    /// Impair both hosts' uplinks in user space, e.g. `loss=1%,delay=10ms,jitter=5ms`
    /// (each way; this kernel has no netem). Pair drill only.
    #[arg(long, conflicts_with = "local", value_parser = crate::impair::Impairment::parse)]
    impair: Option<crate::impair::Impairment>,
}

/// Parses the process arguments and runs the drill.
pub fn main() -> ExitCode {
    run(std::env::args_os())
}

/// Parses `args` (including the program name) and runs the drill.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match DrillCmd::try_parse_from(args) {
        Ok(cmd) => cmd.run(),
        Err(e) => {
            // --help and --version are "errors" printed to stdout with success.
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            ExitCode::from(code)
        }
    }
}

impl DrillCmd {
    /// Runs the drill.
    pub fn run(self) -> ExitCode {
        // Logs go to stderr (warnings by default; REMUS_LOG=info or debug for more), so the
        // report on stdout stays machine-readable with --json.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("REMUS_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .try_init();
        let images = default_image_dir();
        let kernel = self.kernel.unwrap_or_else(|| images.join("vmlinux"));
        let initrd = self.initrd.unwrap_or_else(|| images.join("initrd.img"));
        let (work_dir, _guard) = match self.work_dir {
            Some(d) => (d, None),
            None => match scratch_dir_in_shm() {
                Ok(t) => (t.path().to_path_buf(), Some(t)),
                Err(e) => {
                    eprintln!("remus-drill: cannot create a scratch directory in /dev/shm: {e}");
                    return ExitCode::from(EXIT_PROBLEMS);
                }
            },
        };
        if !self.local {
            let mut o = PairOptions::new(kernel, initrd, work_dir, self.scenario);
            o.trials = self.trials;
            o.checkpoints = self.checkpoints;
            o.interval = Duration::from_millis(self.interval_ms);
            o.memory_mib = self.memory_mib;
            o.accel = self.accel;
            o.seed = self.seed;
            o.lease = Duration::from_millis(self.lease_ms);
            o.arbiter = match self.arbiter {
                ArbiterArg::Witness => crate::pair::config::Arbiter::Witness,
                ArbiterArg::Etcd => crate::pair::config::Arbiter::Etcd,
            };
            o.etcd_members = usize::try_from(self.etcd_members).unwrap_or(1);
            o.partition_hold = Duration::from_millis(self.partition_hold_ms);
            o.unsafe_no_output_buffering = self.unsafe_no_output_buffering;
            o.impair = self.impair;
            return run_pair_cli(&o, self.json);
        }
        let opts = DrillOptions {
            kernel,
            initrd,
            work_dir,
            checkpoints: self.checkpoints,
            interval: Duration::from_millis(self.interval_ms),
            memory_mib: self.memory_mib,
            accel: self.accel,
            seed: self.seed,
            unsafe_no_output_buffering: self.unsafe_no_output_buffering,
        };
        // Ctrl-C drops the drill, whose guards kill its QEMUs and delete its namespaces.
        run_and_report(run_local(&opts), self.json, |r| (r.render(), r.passed))
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("remus-drill: cannot start the async runtime: {e}");
            None
        }
    }
}

/// Runs the pair drill and prints its report; the exit code says whether it passed.
fn run_pair_cli(o: &PairOptions, json: bool) -> ExitCode {
    // Ctrl-C drops the drill: its daemons, QEMUs, witness and namespaces go with it.
    run_and_report(run_pair(o), json, |r| (r.render(), r.passed))
}

/// Runs a drill until it ends or Ctrl-C drops it, prints its report (JSON or the text
/// `summary` gives with whether it passed) and turns the verdict into the exit code.
fn run_and_report<R: serde::Serialize>(
    drill: impl std::future::Future<Output = anyhow::Result<R>>,
    json: bool,
    summary: impl Fn(&R) -> (String, bool),
) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_PROBLEMS);
    };
    let outcome = rt.block_on(async {
        tokio::select! {
            r = drill => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    match outcome {
        None => {
            eprintln!("remus-drill: interrupted; cleaned up");
            ExitCode::from(EXIT_PROBLEMS)
        }
        Some(Err(e)) => {
            eprintln!("remus-drill: {e:#}");
            ExitCode::from(EXIT_PROBLEMS)
        }
        Some(Ok(report)) => {
            let (text, passed) = summary(&report);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serialises")
                );
            } else {
                print!("{text}");
            }
            ExitCode::from(if passed { EXIT_OK } else { EXIT_PROBLEMS })
        }
    }
}

/// A scratch directory removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir_in_shm() -> std::io::Result<ScratchDir> {
    let dir = PathBuf::from(format!("/dev/shm/remus-drill-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(ScratchDir(dir))
}

/// `--arbiter`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ArbiterArg {
    /// remus-witness.
    Witness,
    /// etcd.
    Etcd,
}
