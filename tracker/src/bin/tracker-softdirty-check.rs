//! Real-kernel check of the soft-dirty tracker, for the kernel harness (a static executable
//! run as root inside a Debian kernel booted under QEMU).
//!
//! A child process (this executable in `--writer` mode) plays QEMU: it maps a RAM file in a
//! tmpfs shared and writable, and keeps storing into random pages, logging each page number in
//! a separate shared log *after* its store. Every round the checker freezes it (SIGSTOP, and
//! waits until the kernel reports it stopped), collects with [`SoftDirtyTracker`], checks
//! - the collected pages include every page the writer logged since the last round (a logged
//!   store always changes the page: it increments a word), allowing only the one store the
//!   writer may have made but not yet logged when it was frozen in the previous round;
//! - the shadow equals the whole RAM file afterwards (a full compare: any missed store shows);
//! - the soft-dirty log narrowed the work (candidates ≪ all pages);
//!
//! then resumes the writer (SIGCONT). Output ends with one line:
//! `HARNESS-RESULT tracker-soft-dirty pass|fail|skip <detail>`; the exit status is 0 for pass
//! and skip, 1 for fail. On a kernel without soft-dirty the rounds run with the compare
//! tracker as a control and the result is `skip` (`--force-soft-dirty` uses soft-dirty anyway:
//! the negative control, which must fail there).
//!
//! `--invisible-writes-every K` is the negative control for a kernel with soft-dirty: every
//! K-th store of the writer goes through `pwrite()` (invisible to soft-dirty, see the notes);
//! the run reports as `tracker-soft-dirty-negative-control` and passes only if the check
//! caught the missed stores.
//!
//! Kernel-harness protocol: `--list` prints the two test names; running the executable with a
//! test name as its first argument runs that test with its defaults (the control: 30 rounds,
//! 16 MiB, every 50th store through `pwrite()`).
//!
//! Writer command mode (no `--log`): reads lines from stdin — `w PFN...` increments the first
//! word of each page, `remap` maps the file at a new address and drops the old mapping — and
//! answers `ok` to each; used by the crate's integration tests as a controllable
//! QEMU stand-in.

use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use remus_tracker::{
    check_preconditions, Capture, CompareTracker, DirtySet, DirtyTracker, Precondition, QemuFacts,
    ScanPool, SoftDirtyTarget, SoftDirtyTracker, VmStopped, PAGE_SIZE,
};

const RESULT_NAME: &str = "tracker-soft-dirty";
const CONTROL_NAME: &str = "tracker-soft-dirty-negative-control";
/// Every error that reports a missed store contains this.
const MISS_MARK: &str = "missed store";
/// Log layout (u64 words): [0] ready flag, [1] entries written, [2..] ring of page numbers.
const LOG_HEADER: usize = 2;
const LOG_CAPACITY: usize = 1 << 20;

struct Options {
    rounds: u32,
    ram_mib: usize,
    interval: Duration,
    burst: usize,
    dir: Option<PathBuf>,
    /// Use the soft-dirty tracker even where the kernel lacks support: the negative control
    /// (the check must then fail with a missed store).
    force_soft_dirty: bool,
    /// Every K-th store of the writer goes through `pwrite()` on the file instead of its
    /// mapping: invisible to soft-dirty. The check must then catch a miss; the run reports as
    /// `tracker-soft-dirty-negative-control`, passing when the miss was caught.
    invisible_every: Option<u64>,
    /// Scan threads (default: one per CPU).
    threads: Option<usize>,
    /// Leave the shadow un-faulted (to measure what pre-faulting saves).
    no_prefault: bool,
}

fn usage() -> &'static str {
    "usage: tracker-softdirty-check --list | [tracker-soft-dirty|tracker-soft-dirty-negative-control] [--rounds N] [--ram-mib M] [--interval-ms T] [--burst B] [--dir TMPFS_DIR] [--force-soft-dirty] [--invisible-writes-every K] [--threads N] [--no-prefault]\n       tracker-softdirty-check --writer RAM_FILE [--log LOG_FILE] [--burst B] [--pwrite-every K]"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--writer") {
        return match writer_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writer: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // Kernel-harness protocol (tests/kernel-harness): `--list` names the tests, `NAME` runs one.
    if args.first().map(String::as_str) == Some("--list") {
        println!("{RESULT_NAME}\n{CONTROL_NAME}");
        return ExitCode::SUCCESS;
    }
    let mut args = args;
    match args.first().map(String::as_str) {
        Some(RESULT_NAME) => {
            args.remove(0);
        }
        Some(CONTROL_NAME) => {
            args.splice(
                0..1,
                [
                    "--rounds",
                    "30",
                    "--ram-mib",
                    "16",
                    "--invisible-writes-every",
                    "50",
                ]
                .map(String::from),
            );
        }
        _ => {}
    }
    let opts = match parse_options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e:#}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    let result = check_main(&opts);
    let (name, verdict, detail) = match (opts.invisible_every.is_some(), result) {
        (false, Ok(Outcome::Pass(d))) => (RESULT_NAME, "pass", d),
        (false, Ok(Outcome::Skip(d))) => (RESULT_NAME, "skip", d),
        (true, Ok(Outcome::Skip(d))) => (CONTROL_NAME, "skip", d),
        (false, Err(e)) => (RESULT_NAME, "fail", format!("{e:#}")),
        (true, Err(e)) if format!("{e:#}").contains(MISS_MARK) => (
            CONTROL_NAME,
            "pass",
            format!("stores made with pwrite() were caught as misses: {e:#}"),
        ),
        (true, Err(e)) => (
            CONTROL_NAME,
            "fail",
            format!("failed for another reason: {e:#}"),
        ),
        (true, Ok(Outcome::Pass(d))) => (
            CONTROL_NAME,
            "fail",
            format!("stores made with pwrite() went unnoticed: {d}"),
        ),
    };
    println!(
        "HARNESS-RESULT {name} {verdict} {}",
        detail.replace('\n', " | ")
    );
    if verdict == "fail" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        rounds: 150,
        ram_mib: 32,
        interval: Duration::from_millis(15),
        burst: 64,
        dir: None,
        force_soft_dirty: false,
        invisible_every: None,
        threads: None,
        no_prefault: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--ram-mib" => o.ram_mib = value()?.parse().context("--ram-mib")?,
            "--interval-ms" => {
                o.interval = Duration::from_millis(value()?.parse().context("--interval-ms")?)
            }
            "--burst" => o.burst = value()?.parse().context("--burst")?,
            "--dir" => o.dir = Some(PathBuf::from(value()?)),
            "--force-soft-dirty" => o.force_soft_dirty = true,
            "--no-prefault" => o.no_prefault = true,
            "--threads" => o.threads = Some(value()?.parse().context("--threads")?),
            "--invisible-writes-every" => {
                o.invisible_every = Some(value()?.parse().context("--invisible-writes-every")?)
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.rounds < 1
        || o.ram_mib < 1
        || o.ram_mib > 4096
        || o.burst < 1
        || o.invisible_every == Some(0)
    {
        bail!(
            "--rounds, --ram-mib (1..=4096), --burst and --invisible-writes-every must be positive"
        );
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Writer (the QEMU stand-in)

fn writer_main(args: &[String]) -> Result<()> {
    let ram_path = args.first().context("--writer needs RAM_FILE")?;
    let mut log_path = None;
    let mut burst = 64usize;
    let mut pwrite_every = None;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--log" => log_path = Some(it.next().context("--log needs a value")?.clone()),
            "--burst" => burst = it.next().context("--burst needs a value")?.parse()?,
            "--pwrite-every" => {
                pwrite_every = Some(
                    it.next()
                        .context("--pwrite-every needs a value")?
                        .parse::<u64>()?,
                )
            }
            other => bail!("unknown writer argument {other:?}"),
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(ram_path)
        .with_context(|| format!("opening {ram_path}"))?;
    // SAFETY: the file is ours for the test's duration; others only read it (or, in the
    // integration tests' "other writer" case, store into it on purpose).
    let mut ram = unsafe { memmap2::MmapMut::map_mut(&file) }.context("mapping the RAM file")?;
    let pages = ram.len() / PAGE_SIZE;
    if pages == 0 {
        bail!("RAM file {ram_path} is smaller than a page");
    }
    match log_path {
        None => command_mode(ram, &file),
        Some(log_path) => free_running(&mut ram, &file, &log_path, burst, pwrite_every),
    }
}

fn bump(ram: &mut [u8], pfn: usize, word: usize) {
    let at = pfn * PAGE_SIZE + (word % (PAGE_SIZE / 8)) * 8;
    let v = u64::from_ne_bytes(ram[at..at + 8].try_into().expect("8 bytes"));
    ram[at..at + 8].copy_from_slice(&v.wrapping_add(1).to_ne_bytes());
}

fn command_mode(mut ram: memmap2::MmapMut, file: &std::fs::File) -> Result<()> {
    let pages = ram.len() / PAGE_SIZE;
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    for line in stdin.lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("w") => {
                for w in words {
                    let pfn: usize = w.parse().with_context(|| format!("page number {w:?}"))?;
                    if pfn >= pages {
                        bail!("page {pfn} beyond the {pages}-page RAM file");
                    }
                    bump(&mut ram, pfn, 0);
                }
            }
            Some("remap") => {
                // Map the file anew (at another address, while the old mapping still holds
                // its range), then drop the old mapping: what a tracker must notice.
                // SAFETY: as for the first mapping.
                let new =
                    unsafe { memmap2::MmapMut::map_mut(file) }.context("remapping the RAM file")?;
                ram = new;
            }
            Some(other) => bail!("unknown command {other:?}"),
            None => continue,
        }
        writeln!(stdout, "ok")?;
        stdout.flush()?;
    }
    Ok(())
}

/// The log's words as atomics.
fn log_words(log: &memmap2::MmapMut) -> &[AtomicU64] {
    // SAFETY: the mapping is page aligned (so 8-byte aligned), `len / 8` words long, lives as
    // long as the returned borrow, and is only ever accessed as atomics by both processes.
    unsafe { std::slice::from_raw_parts(log.as_ptr() as *const AtomicU64, log.len() / 8) }
}

fn free_running(
    ram: &mut [u8],
    ram_file: &std::fs::File,
    log_path: &str,
    burst: usize,
    pwrite_every: Option<u64>,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let pages = ram.len() / PAGE_SIZE;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(log_path)
        .with_context(|| format!("opening {log_path}"))?;
    // SAFETY: shared with the checker, accessed only through atomics.
    let log = unsafe { memmap2::MmapMut::map_mut(&file) }.context("mapping the log")?;
    let words = log_words(&log);
    if words.len() < LOG_HEADER + LOG_CAPACITY {
        bail!("log file too small");
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut n = 0u64;
    words[0].store(1, Ordering::Release);
    loop {
        for _ in 0..burst {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pfn = (x % pages as u64) as usize;
            if pwrite_every.is_some_and(|k| n % k == k - 1) {
                // Through the file, not the mapping: no page-table entry of ours is touched.
                let at = pfn * PAGE_SIZE + ((x >> 40) as usize % (PAGE_SIZE / 8)) * 8;
                let v = u64::from_ne_bytes(ram[at..at + 8].try_into().expect("8 bytes"));
                ram_file
                    .write_all_at(&v.wrapping_add(1).to_ne_bytes(), at as u64)
                    .context("pwrite to the RAM file")?;
            } else {
                bump(ram, pfn, (x >> 40) as usize);
            }
            // Log after the store: a logged page has certainly changed.
            words[LOG_HEADER + (n as usize % LOG_CAPACITY)].store(pfn as u64, Ordering::Relaxed);
            n += 1;
            words[1].store(n, Ordering::Release);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------------
// Checker

enum Outcome {
    Pass(String),
    Skip(String),
}

/// Removes the test files and kills the writer, also on early return.
struct Cleanup {
    files: Vec<PathBuf>,
    child: Option<Child>,
    mounted: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let pid = Pid::from_raw(c.id() as i32);
            let _ = kill(pid, Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGCONT);
            let _ = c.wait();
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(m) = &self.mounted {
            let _ = nix::mount::umount(m);
            let _ = std::fs::remove_dir(m);
        }
    }
}

/// A tmpfs directory for the RAM file: the given one, /dev/shm, or a fresh tmpfs mount (in a
/// minimal initramfs /dev/shm may not exist).
fn tmpfs_dir(opts: &Options, cleanup: &mut Cleanup) -> Result<PathBuf> {
    if let Some(d) = &opts.dir {
        return Ok(d.clone());
    }
    let shm = Path::new("/dev/shm");
    if is_tmpfs(shm) {
        return Ok(shm.to_owned());
    }
    let dir = std::env::temp_dir().join(format!("remus-sd-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=90%"),
    )
    .with_context(|| {
        format!(
            "/dev/shm is not a tmpfs and mounting one at {} failed",
            dir.display()
        )
    })?;
    cleanup.mounted = Some(dir.clone());
    Ok(dir)
}

fn is_tmpfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

fn stop_and_wait(pid: Pid) -> Result<()> {
    kill(pid, Signal::SIGSTOP).context("SIGSTOP writer")?;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WUNTRACED))
            .context("waiting for the writer to stop")?
        {
            WaitStatus::Stopped(_, _) => return Ok(()),
            WaitStatus::Exited(_, code) => bail!("writer exited with status {code}"),
            WaitStatus::Signaled(_, sig, _) => bail!("writer killed by {sig}"),
            _ => {}
        }
    }
}

fn check_main(opts: &Options) -> Result<Outcome> {
    let mut cleanup = Cleanup {
        files: Vec::new(),
        child: None,
        mounted: None,
    };
    let dir = tmpfs_dir(opts, &mut cleanup)?;
    let me = std::process::id();
    let ram_path = dir.join(format!("remus-sd-check-{me}.ram"));
    let log_path = dir.join(format!("remus-sd-check-{me}.log"));
    cleanup.files.extend([ram_path.clone(), log_path.clone()]);
    let ram_len = opts.ram_mib << 20;
    let create = |p: &Path, len: usize| -> Result<std::fs::File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .with_context(|| format!("creating {}", p.display()))?;
        f.set_len(len as u64)
            .with_context(|| format!("sizing {}", p.display()))?;
        Ok(f)
    };
    let ram_file = create(&ram_path, ram_len)?;
    let log_file = create(&log_path, (LOG_HEADER + LOG_CAPACITY) * 8)?;
    // The writer maps the file writable; this process only reads it, like the agent.
    // SAFETY: read-only shared mapping; concurrent stores by the writer only happen while it
    // runs, and the checker reads RAM only while the writer is stopped.
    let live = unsafe { memmap2::Mmap::map(&ram_file) }.context("mapping RAM read-only")?;
    // SAFETY: shared with the writer, accessed only through atomics.
    let log = unsafe { memmap2::MmapMut::map_mut(&log_file) }.context("mapping the log")?;
    let words = log_words(&log);

    let exe = std::env::current_exe().context("locating this executable")?;
    let child = Command::new(exe)
        .arg("--writer")
        .arg(&ram_path)
        .arg("--log")
        .arg(&log_path)
        .arg("--burst")
        .arg(opts.burst.to_string())
        .args(
            opts.invisible_every
                .map(|k| vec!["--pwrite-every".to_owned(), k.to_string()])
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .spawn()
        .context("spawning the writer")?;
    let pid = Pid::from_raw(child.id() as i32);
    cleanup.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while words[0].load(Ordering::Acquire) == 0 {
        if Instant::now() > deadline {
            bail!("writer did not start within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    let facts = QemuFacts {
        block_io_drained_on_stop: true,
        ..QemuFacts::default()
    };
    let target = SoftDirtyTarget {
        pid: pid.as_raw(),
        ram_path: &ram_path,
        ram_len: ram_len as u64,
        facts,
    };
    let unmet = check_preconditions(&target);
    for u in &unmet {
        println!("precondition unmet: {u}");
    }
    let kernel_unsupported = !opts.force_soft_dirty
        && unmet
            .iter()
            .any(|u| u.precondition == Precondition::KernelSupport);
    let unmet: Vec<_> = if opts.force_soft_dirty {
        Vec::new()
    } else {
        unmet
    };
    let pool = Arc::new(match opts.threads {
        Some(n) => ScanPool::new(n)?,
        None => ScanPool::with_available_parallelism()?,
    });
    let mut tracker: Box<dyn DirtyTracker> = if kernel_unsupported {
        Box::new(CompareTracker::new(pool))
    } else if !unmet.is_empty() {
        bail!(
            "preconditions unmet where all should hold: {}",
            unmet
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
    } else {
        Box::new(SoftDirtyTracker::attach(
            pid.as_raw(),
            &ram_path,
            ram_len,
            pool,
        )?)
    };
    println!(
        "tracker: {}; RAM {} MiB; {} rounds",
        tracker.kind(),
        opts.ram_mib,
        opts.rounds
    );

    let mut shadow = vec![0u8; ram_len];
    if !opts.no_prefault {
        remus_tracker::prefault(&mut shadow);
    }
    let mut out = DirtySet::new(Capture::XorDelta);
    let total_pages = ram_len / PAGE_SIZE;
    let mut seen_log = 0u64;
    let mut prev_collected: Vec<u64> = Vec::new();
    let mut times = Vec::new();
    let mut slowest: Option<(u32, remus_tracker::CollectStats)> = None;
    let (mut logged_total, mut dirty_total, mut max_candidates_steady) = (0u64, 0u64, 0u64);
    for round in 0..=opts.rounds {
        std::thread::sleep(opts.interval);
        stop_and_wait(pid)?;
        let n = words[1].load(Ordering::Acquire);
        if n - seen_log > LOG_CAPACITY as u64 {
            bail!(
                "round {round}: writer logged {} stores, more than the log holds",
                n - seen_log
            );
        }
        let logged: std::collections::BTreeSet<u64> = (seen_log..n)
            .map(|i| words[LOG_HEADER + (i as usize % LOG_CAPACITY)].load(Ordering::Relaxed))
            .collect();
        let first_logged = (n > seen_log).then(|| {
            words[LOG_HEADER + (seen_log as usize % LOG_CAPACITY)].load(Ordering::Relaxed)
        });
        seen_log = n;

        out.clear();
        let stopped = VmStopped::caller_asserts_vm_stopped();
        let stats = tracker.collect(&stopped, &live, &mut shadow, &mut out)?;
        let collected: std::collections::BTreeSet<u64> = out.pfns().collect();

        // Exactness: the shadow equals the whole RAM file.
        if let Some(p) = (0..total_pages).find(|&p| {
            let r = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
            live[r.clone()] != shadow[r]
        }) {
            bail!(
                "round {round}: page {p} differs from the shadow after collect (missed store); \
                 stats {stats:?}"
            );
        }
        if round > 0 {
            // Superset: every logged page was collected, except possibly the store that was
            // made but not logged when the writer froze last round (collected then).
            let missing: Vec<u64> = logged.difference(&collected).copied().collect();
            let excused =
                |p: &u64| Some(*p) == first_logged && prev_collected.binary_search(p).is_ok();
            if let Some(p) = missing.iter().find(|p| !excused(p)) {
                bail!(
                    "round {round}: page {p} was written and logged but not collected ({} logged, {} collected): missed store",
                    logged.len(),
                    collected.len()
                );
            }
            if collected.difference(&logged).count() > 1 {
                bail!(
                    "round {round}: {} collected pages were never logged as written",
                    collected.difference(&logged).count()
                );
            }
            if stats.full_scan && tracker.kind() == remus_tracker::TrackerKind::SoftDirty {
                bail!("round {round}: unexpected full scan");
            }
            max_candidates_steady = max_candidates_steady.max(stats.pages_candidate);
            times.push(stats.elapsed);
            if slowest.is_none_or(|(_, s)| s.elapsed < stats.elapsed) {
                slowest = Some((round, stats));
            }
            logged_total += logged.len() as u64;
            dirty_total += stats.pages_dirty;
        } else if !stats.full_scan {
            bail!("round 0 (first collect) was not a full scan");
        }
        prev_collected = collected.into_iter().collect();
        kill(pid, Signal::SIGCONT).context("SIGCONT writer")?;
    }
    let kind = tracker.kind();
    if kind == remus_tracker::TrackerKind::SoftDirty
        && max_candidates_steady * 2 > total_pages as u64
    {
        bail!(
            "soft-dirty reported up to {max_candidates_steady} of {total_pages} pages per round: not narrowing"
        );
    }
    if logged_total == 0 {
        bail!("the writer made no stores: the check proved nothing");
    }
    times.sort();
    let med = times[times.len() / 2];
    let (slow_round, slow) = slowest.expect("at least one steady round");
    println!("slowest round {slow_round}: {slow:?}");
    let detail = format!(
        "tracker={kind} rounds={} ram_mib={} logged_pages={logged_total} dirty_pages={dirty_total} \
         max_candidates={max_candidates_steady} collect_ms_min/med/max={:.2}/{:.2}/{:.2}",
        opts.rounds,
        opts.ram_mib,
        times[0].as_secs_f64() * 1e3,
        med.as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    if kernel_unsupported {
        let reason = unmet
            .iter()
            .find(|u| u.precondition == Precondition::KernelSupport)
            .map(|u| u.reason.clone())
            .unwrap_or_default();
        return Ok(Outcome::Skip(format!(
            "kernel lacks soft-dirty ({reason}); compare control passed: {detail}"
        )));
    }
    Ok(Outcome::Pass(detail))
}
