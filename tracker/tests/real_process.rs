//! The soft-dirty machinery against real processes on the running kernel: a child process
//! (the `tracker-softdirty-check` executable in writer mode) maps a RAM file in /dev/shm as
//! QEMU would, and the tests inspect it through the real procfs.
//!
//! The kernel's soft-dirty support is decided by an independent oracle — whether a fresh
//! mapping shows the `sd` flag in `/proc/self/smaps` (the kernel prints it only when built
//! with CONFIG_MEM_SOFT_DIRTY) — and every test asserts the behaviour that kernel must show:
//! on this project's build machine (no soft-dirty) the check must report the kernel as
//! unsupported, the soft-dirty tracker must miss writes and the audit must catch them.

use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use remus_tracker::{
    check_preconditions, select, AuditConfig, Capture, DirtySet, DirtyTracker, Precondition,
    QemuFacts, ReplicaAudit, ScanPool, SelectError, SoftDirtyTarget, SoftDirtyTracker,
    TrackerChoice, TrackerKind, Unmet, VmStopped, PAGE_SIZE,
};

const CHECK_EXE: &str = env!("CARGO_BIN_EXE_tracker-softdirty-check");

/// Independent oracle: a new mapping carries VM_SOFTDIRTY, shown as `sd` in smaps only on
/// kernels built with CONFIG_MEM_SOFT_DIRTY.
fn kernel_has_soft_dirty() -> bool {
    let m = memmap2::MmapMut::map_anon(3 * PAGE_SIZE).unwrap();
    let addr = m.as_ptr() as u64;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_vma = false;
    for line in smaps.lines() {
        let first = line.split(' ').next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.contains(':')) {
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            // The kernel may have merged the new mapping with a neighbour: containment.
            in_vma = a <= addr && addr < b;
        } else if in_vma {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().any(|f| f == "sd");
            }
        }
    }
    panic!("own mapping at {addr:#x} not found in smaps");
}

/// A RAM file in /dev/shm and a writer process mapping it shared, removed on drop.
struct Qemu {
    path: PathBuf,
    len: usize,
    child: Child,
    /// Whether dropping this removes the RAM file (not for a second writer of the same file).
    owns_file: bool,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Qemu {
    fn start(tag: &str, pages: usize) -> Qemu {
        let path = PathBuf::from(format!(
            "/dev/shm/remus-tracker-test-{tag}-{}.ram",
            std::process::id()
        ));
        let len = pages * PAGE_SIZE;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len as u64).unwrap();
        let mut q = Self::spawn_on(path, len);
        q.owns_file = true;
        q
    }

    fn spawn_on(path: PathBuf, len: usize) -> Qemu {
        let mut child = Command::new(CHECK_EXE)
            .arg("--writer")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        Qemu {
            path,
            len,
            child,
            owns_file: false,
            stdin,
            stdout,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Increments the first word of each page, through the writer's own mapping.
    fn write(&mut self, pfns: &[u64]) {
        let cmd: Vec<String> = pfns.iter().map(|p| p.to_string()).collect();
        self.command(&format!("w {}", cmd.join(" ")));
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok");
    }

    fn target(&self, facts: QemuFacts) -> SoftDirtyTarget<'_> {
        SoftDirtyTarget {
            pid: self.pid(),
            ram_path: &self.path,
            ram_len: self.len as u64,
            facts,
        }
    }

    fn map_read_only(&self) -> memmap2::Mmap {
        let f = std::fs::File::open(&self.path).unwrap();
        // SAFETY: the writer stores only in response to our commands, never while we read.
        unsafe { memmap2::Mmap::map(&f) }.unwrap()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn drained() -> QemuFacts {
    QemuFacts {
        block_io_drained_on_stop: true,
        ..QemuFacts::default()
    }
}

fn has(unmet: &[Unmet], p: Precondition) -> bool {
    unmet.iter().any(|u| u.precondition == p)
}

fn swap_on() -> bool {
    std::fs::read_to_string("/proc/swaps")
        .unwrap()
        .lines()
        .count()
        > 1
}

#[test]
fn kernel_support_check_agrees_with_the_smaps_oracle() {
    let qemu = Qemu::start("kernel", 16);
    let unmet = check_preconditions(&qemu.target(drained()));
    let supported = kernel_has_soft_dirty();
    println!("kernel soft-dirty per smaps oracle: {supported}; unmet: {unmet:#?}");
    assert_eq!(
        !supported,
        has(&unmet, Precondition::KernelSupport),
        "{unmet:#?}"
    );
    if !supported {
        let reason = &unmet
            .iter()
            .find(|u| u.precondition == Precondition::KernelSupport)
            .unwrap()
            .reason;
        assert!(reason.contains("CONFIG_MEM_SOFT_DIRTY"), "{reason}");
    }
    // What this environment satisfies must not be reported.
    assert!(!has(&unmet, Precondition::QemuMapping), "{unmet:#?}");
    assert!(!has(&unmet, Precondition::NoOtherWriters), "{unmet:#?}");
    assert!(!has(&unmet, Precondition::NoBalloonOrDiscard), "{unmet:#?}");
    assert!(!has(&unmet, Precondition::NoAsyncDma), "{unmet:#?}");
    if !swap_on() {
        assert!(!has(&unmet, Precondition::RamNotSwappable), "{unmet:#?}");
    }
}

#[test]
fn caller_facts_and_other_writers_are_reported() {
    let qemu = Qemu::start("writers", 16);
    let facts = QemuFacts {
        balloon: true,
        vfio: true,
        block_io_drained_on_stop: false,
        ..QemuFacts::default()
    };
    let unmet = check_preconditions(&qemu.target(facts));
    assert!(has(&unmet, Precondition::NoBalloonOrDiscard));
    assert_eq!(
        unmet
            .iter()
            .filter(|u| u.precondition == Precondition::NoAsyncDma)
            .count(),
        2
    );

    // A second process mapping the file writable (a vhost-user backend, say).
    let other = Qemu::spawn_on(qemu.path.clone(), qemu.len);
    // This process mapping it writable too.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&qemu.path)
        .unwrap();
    // SAFETY: never written through; it exists to be seen in /proc/self/maps.
    let own = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    let unmet = check_preconditions(&qemu.target(drained()));
    let writers: Vec<&str> = unmet
        .iter()
        .filter(|u| u.precondition == Precondition::NoOtherWriters)
        .map(|u| u.reason.as_str())
        .collect();
    assert!(
        writers
            .iter()
            .any(|r| r.contains(&format!("pid {}", other.pid()))),
        "{writers:#?}"
    );
    assert!(
        writers.iter().any(|r| r.contains("this agent")),
        "{writers:#?}"
    );
    drop(own);
    drop(f);
    drop(other);
    let unmet = check_preconditions(&qemu.target(drained()));
    assert!(!has(&unmet, Precondition::NoOtherWriters), "{unmet:#?}");

    // A process that does not map the file at all.
    let mut target = qemu.target(drained());
    target.pid = std::process::id() as i32;
    let unmet = check_preconditions(&target);
    let m = unmet
        .iter()
        .find(|u| u.precondition == Precondition::QemuMapping)
        .expect("mapping unmet");
    assert!(m.reason.contains("does not map the file"), "{}", m.reason);
}

#[test]
fn soft_dirty_tracker_on_this_kernel_and_the_audit_behind_it() {
    let pages = 512;
    let mut qemu = Qemu::start("audit", pages);
    let live = qemu.map_read_only();
    let pool = Arc::new(ScanPool::new(2).unwrap());
    let mut tracker =
        SoftDirtyTracker::attach(qemu.pid(), &qemu.path, qemu.len, pool.clone()).unwrap();
    let n = 8;
    let mut audit = ReplicaAudit::new(
        qemu.len,
        AuditConfig {
            epochs_per_cycle: NonZeroU32::new(n).unwrap(),
        },
        pool,
    );
    let mut shadow = vec![0xffu8; qemu.len];
    let stopped = VmStopped::caller_asserts_vm_stopped();
    let mut out = DirtySet::new(Capture::XorDelta);

    // First collect: a full comparison whatever the kernel.
    let s = tracker
        .collect(&stopped, &live, &mut shadow, &mut out)
        .unwrap();
    assert!(s.full_scan);
    assert_eq!(s.pages_dirty, pages as u64);
    assert!(shadow[..] == live[..]);

    let written = [3u64, 100, 511];
    qemu.write(&written);
    out.clear();
    let s = tracker
        .collect(&stopped, &live, &mut shadow, &mut out)
        .unwrap();
    assert!(!s.full_scan);
    assert_eq!(s.pages_scanned, pages as u64, "every pagemap entry read");
    let collected: Vec<u64> = out.pfns().collect();
    let mut found_by_audit = Vec::new();
    for _ in 0..n {
        found_by_audit.extend(
            audit
                .run(&stopped, &live, &mut shadow, &mut out)
                .unwrap()
                .mismatched,
        );
    }
    if kernel_has_soft_dirty() {
        assert_eq!(
            collected, written,
            "soft-dirty reports exactly the written pages"
        );
        assert!(found_by_audit.is_empty(), "nothing for the audit to find");
    } else {
        // No soft-dirty bits: the tracker misses every write, and the audit finds each one
        // within one cycle of N runs and repairs the shadow.
        assert!(collected.is_empty(), "{collected:?}");
        assert_eq!(found_by_audit, written);
        assert_eq!(audit.stats().mismatches, 3);
    }
    assert!(shadow[..] == live[..], "shadow repaired");

    // The tracker's state machine: Tracking -> (rearm) -> full scan -> Tracking -> (QEMU
    // remaps the file) -> full scan -> Tracking. Table: (action, expect a full scan).
    let steps: &[(&str, bool)] = &[
        ("none", false),
        ("rearm", true),
        ("none", false),
        ("remap", true),
        ("none", false),
    ];
    for (i, &(action, full)) in steps.iter().enumerate() {
        match action {
            "rearm" => tracker.rearm(),
            "remap" => qemu.command("remap"),
            _ => {}
        }
        qemu.write(&[7 + i as u64]);
        out.clear();
        let s = tracker
            .collect(&stopped, &live, &mut shadow, &mut out)
            .unwrap();
        assert_eq!(s.full_scan, full, "step {i} ({action}): {s:?}");
        if full || kernel_has_soft_dirty() {
            assert_eq!(
                out.pfns().collect::<Vec<_>>(),
                [7 + i as u64],
                "step {i} ({action})"
            );
        }
        // Keep the shadow exact for the next step whatever the kernel.
        audit_all(&mut audit, n, &stopped, &live, &mut shadow);
    }
}

fn audit_all(
    audit: &mut ReplicaAudit,
    n: u32,
    stopped: &VmStopped,
    live: &[u8],
    shadow: &mut [u8],
) {
    for _ in 0..n {
        audit
            .run(stopped, live, shadow, &mut DirtySet::new(Capture::PfnsOnly))
            .unwrap();
    }
}

#[test]
fn auto_selection_follows_the_preconditions() {
    let qemu = Qemu::start("auto", 16);
    let pool = Arc::new(ScanPool::new(1).unwrap());
    let supported = kernel_has_soft_dirty();
    let auto = select(TrackerChoice::Auto, &qemu.target(drained()), pool.clone()).unwrap();
    let required = select(
        TrackerChoice::SoftDirty,
        &qemu.target(drained()),
        pool.clone(),
    );
    let compare = select(
        TrackerChoice::Compare,
        &qemu.target(drained()),
        pool.clone(),
    )
    .unwrap();
    assert_eq!(compare.tracker.kind(), TrackerKind::Compare);
    assert!(compare.unmet.is_empty());
    let shmem_ok = !has(
        &check_preconditions(&qemu.target(drained())),
        Precondition::ShmemThpOff,
    );
    if supported && shmem_ok && !swap_on() {
        assert_eq!(
            auto.tracker.kind(),
            TrackerKind::SoftDirty,
            "{:?}",
            auto.unmet
        );
        assert!(required.is_ok());
    } else {
        assert_eq!(auto.tracker.kind(), TrackerKind::Compare);
        assert!(!auto.unmet.is_empty());
        match required {
            Err(SelectError::SoftDirtyUnmet(u)) => {
                // "No other writers" is whatever maps the guest's RAM at the instant of each
                // check: a process forked by another test thread maps it too until it
                // execs, so the two checks may differ in it; the others must agree.
                let kinds = |v: &[Unmet]| {
                    v.iter()
                        .map(|u| u.precondition)
                        .filter(|p| *p != Precondition::NoOtherWriters)
                        .collect::<Vec<_>>()
                };
                assert_eq!(kinds(&u), kinds(&auto.unmet));
            }
            other => panic!("required soft-dirty must be refused: {other:?}"),
        }
    }
    // Balloon always forces compare.
    let facts = QemuFacts {
        balloon: true,
        ..drained()
    };
    let s = select(TrackerChoice::Auto, &qemu.target(facts), pool).unwrap();
    assert_eq!(s.tracker.kind(), TrackerKind::Compare);
    assert!(has(&s.unmet, Precondition::NoBalloonOrDiscard));
}

fn run_check(args: &[&str]) -> (bool, String) {
    let out = Command::new(CHECK_EXE).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), stdout)
}

fn result_line(stdout: &str) -> &str {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("HARNESS-RESULT tracker-soft-dirty "))
        .unwrap_or_else(|| panic!("no result line in {stdout}"))
}

#[test]
fn check_executable_speaks_the_kernel_harness_protocol() {
    let (ok, stdout) = run_check(&["--list"]);
    assert!(ok);
    let names: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        names,
        ["tracker-soft-dirty", "tracker-soft-dirty-negative-control"]
    );
    // Each name runs its test and reports under that name.
    for name in names {
        let (ok, stdout) = run_check(&[
            name,
            "--rounds",
            "3",
            "--ram-mib",
            "4",
            "--interval-ms",
            "2",
        ]);
        let line = stdout.lines().last().unwrap_or_default();
        assert!(
            line.starts_with(&format!("HARNESS-RESULT {name} ")),
            "{stdout}"
        );
        let verdict = line.split(' ').nth(2).unwrap();
        assert!(["pass", "skip"].contains(&verdict), "{stdout}");
        assert!(ok, "{stdout}");
    }
}

#[test]
fn check_executable_passes_or_skips_and_its_negative_control_fails() {
    let supported = kernel_has_soft_dirty();
    let (ok, stdout) = run_check(&["--rounds", "20", "--ram-mib", "8", "--interval-ms", "5"]);
    let line = result_line(&stdout);
    println!("{stdout}");
    assert!(ok, "{stdout}");
    if supported {
        assert!(line.contains(" pass "), "{line}");
    } else {
        assert!(
            line.contains(" skip ") && line.contains("compare control passed"),
            "{line}"
        );
    }
    // Negative control: soft-dirty forced on. Without kernel support it must catch the
    // missed stores and fail; with support it passes.
    let (ok, stdout) = run_check(&[
        "--rounds",
        "5",
        "--ram-mib",
        "8",
        "--interval-ms",
        "5",
        "--force-soft-dirty",
    ]);
    let line = result_line(&stdout);
    if supported {
        assert!(ok && line.contains(" pass "), "{stdout}");
    } else {
        assert!(
            !ok && line.contains(" fail ") && line.contains("missed store"),
            "{stdout}"
        );
    }
}
