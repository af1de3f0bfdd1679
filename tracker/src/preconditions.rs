//! When the soft-dirty log is exact for guest RAM, checked before relying on it.
//!
//! Measured in `shared/notes/soft-dirty.md`: soft-dirty reports every store made through
//! QEMU's own page tables while the VM is stopped across read+clear, and silently loses
//! writes when page-table entries are zapped (balloon, discard, swap-out, THP splits), when
//! something else writes the file (another process's mapping, `write()`), and when DMA lands
//! after the page was pinned. [`check`] inspects what the host shows and takes the rest from
//! the caller ([`QemuFacts`]): it returns every unmet precondition with its reason, so the
//! agent can log them and report why it fell back to compare.
//!
//! The check is a snapshot: a process that maps the file later, or swap enabled later, is not
//! seen. The [`crate::ReplicaAudit`] is what turns such a later miss into a repaired one.

use std::fmt;
use std::path::Path;

use crate::pagemap::{probe_kernel_support, ClearRefs, Pagemap, PagemapError};
use crate::procfs::{
    self, mount_of, parse_status_kb, parse_swaps, proc_path, read_smaps, read_text,
    selected_choice, FileId, MountInfo, RamMapping,
};

/// One requirement for an exact soft-dirty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precondition {
    /// The kernel keeps soft-dirty bits (CONFIG_MEM_SOFT_DIRTY).
    KernelSupport,
    /// The agent may read QEMU's pagemap and write its clear_refs, and QEMU maps all of the
    /// RAM file shared.
    QemuMapping,
    /// No balloon and no RAM discard (both zap page-table entries and lose the bit).
    NoBalloonOrDiscard,
    /// Guest RAM cannot be swapped out (no swap, or QEMU's RAM mapping locked).
    RamNotSwappable,
    /// No transparent huge pages for the RAM file (2 MiB granularity; splits lose the bit).
    ShmemThpOff,
    /// Nothing but QEMU's tracked mapping writes the RAM file.
    NoOtherWriters,
    /// No asynchronous DMA into guest RAM outlives QEMU's `stop` (block I/O drained, no VFIO).
    NoAsyncDma,
}

impl Precondition {
    /// Stable name for logs, metrics and the agent's status report.
    pub fn as_str(self) -> &'static str {
        match self {
            Precondition::KernelSupport => "kernel-support",
            Precondition::QemuMapping => "qemu-mapping",
            Precondition::NoBalloonOrDiscard => "no-balloon-or-discard",
            Precondition::RamNotSwappable => "ram-not-swappable",
            Precondition::ShmemThpOff => "shmem-thp-off",
            Precondition::NoOtherWriters => "no-other-writers",
            Precondition::NoAsyncDma => "no-async-dma",
        }
    }
}

/// A precondition that does not hold, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    /// Which one.
    pub precondition: Precondition,
    /// What was seen, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.precondition.as_str(), self.reason)
    }
}

/// What only the caller knows about the VM's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QemuFacts {
    /// A virtio-balloon device is configured.
    pub balloon: bool,
    /// Anything discards guest RAM: virtio-mem, `discard-data`, free page reporting, postcopy.
    pub ram_discard: bool,
    /// QEMU runs with `-overcommit mem-lock=on` (guest RAM locked).
    pub mem_lock: bool,
    /// Every disk path is drained by `stop` (true for QEMU's block layer; false if a device
    /// or backend may complete I/O into guest RAM while the VM is stopped).
    pub block_io_drained_on_stop: bool,
    /// A VFIO device (or other device doing DMA that bypasses QEMU's page tables) is attached.
    pub vfio: bool,
    /// vhost-user backends or virtiofsd share guest RAM (they write through their own
    /// mappings, invisible to QEMU's soft-dirty bits).
    pub external_ram_users: bool,
}

/// The QEMU process and RAM file the soft-dirty tracker would follow.
#[derive(Debug, Clone)]
pub struct SoftDirtyTarget<'a> {
    /// QEMU's pid.
    pub pid: i32,
    /// The RAM file (`mem-path` of QEMU's memory backend).
    pub ram_path: &'a Path,
    /// Bytes of guest RAM in the file.
    pub ram_len: u64,
    /// What the caller knows of QEMU's configuration.
    pub facts: QemuFacts,
}

/// Checks every precondition; an empty result means soft-dirty is exact for `target` as far
/// as can be seen now.
pub fn check(target: &SoftDirtyTarget<'_>) -> Vec<Unmet> {
    let mut unmet = Vec::new();
    let mut add = |precondition, reason: String| {
        unmet.push(Unmet {
            precondition,
            reason,
        })
    };

    match probe_kernel_support() {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => add(Precondition::KernelSupport, reason.to_string()),
        Err(e) => add(Precondition::KernelSupport, format!("probe failed: {e}")),
    }

    let facts = target.facts;
    if facts.balloon {
        add(
            Precondition::NoBalloonOrDiscard,
            "a balloon device is configured: inflating it zaps guest pages and loses their soft-dirty bits".into(),
        );
    }
    if facts.ram_discard {
        add(
            Precondition::NoBalloonOrDiscard,
            "guest RAM discard is configured: discarded ranges lose their soft-dirty bits".into(),
        );
    }
    if facts.vfio {
        add(
            Precondition::NoAsyncDma,
            "a VFIO device can DMA into guest RAM without marking pages soft-dirty".into(),
        );
    }
    if !facts.block_io_drained_on_stop {
        add(
            Precondition::NoAsyncDma,
            "block I/O may complete into guest RAM after stop: such DMA is not tracked".into(),
        );
    }
    if facts.external_ram_users {
        add(
            Precondition::NoOtherWriters,
            "vhost-user/virtiofsd write guest RAM through their own mappings".into(),
        );
    }

    let file = match FileId::of(target.ram_path) {
        Ok(f) => f,
        Err(e) => {
            add(Precondition::QemuMapping, e.to_string());
            return unmet;
        }
    };

    // QEMU's mapping and our access to its dirty log.
    let smaps = read_smaps(target.pid);
    match RamMapping::of_process(target.pid, &file, target.ram_len) {
        Ok(mapping) => {
            if let Err(e) = check_pagemap_access(target.pid, &mapping) {
                add(Precondition::QemuMapping, e.to_string());
            }
        }
        Err(e) => add(Precondition::QemuMapping, e.to_string()),
    }

    // Swap.
    let swaps = read_text(Path::new("/proc/swaps")).map(|t| parse_swaps(&t));
    match (&swaps, &smaps) {
        (Err(e), _) => add(
            Precondition::RamNotSwappable,
            format!("cannot tell whether swap is on: {e}"),
        ),
        (Ok(areas), _) if areas.is_empty() => {}
        (Ok(areas), Ok(smaps)) => {
            let ram_vmas: Vec<_> = smaps.iter().filter(|s| s.map.maps(&file)).collect();
            let locked = !ram_vmas.is_empty()
                && ram_vmas
                    .iter()
                    .all(|s| s.vm_flags.iter().any(|f| f == "lo"));
            if !locked {
                let vmlck = read_text(&proc_path(target.pid, "status"))
                    .ok()
                    .and_then(|t| parse_status_kb(&t, "VmLck"))
                    .unwrap_or(0);
                add(
                    Precondition::RamNotSwappable,
                    format!(
                        "swap is on ({}) and QEMU's RAM mapping is not locked (VmLck {vmlck} kB{}): \
                         shmem swap-out loses soft-dirty bits; use -overcommit mem-lock=on or swapoff",
                        areas.join(", "),
                        if facts.mem_lock { ", although mem-lock was configured" } else { "" }
                    ),
                );
            }
        }
        (Ok(areas), Err(e)) => add(
            Precondition::RamNotSwappable,
            format!(
                "swap is on ({}) and QEMU's smaps is unreadable: {e}",
                areas.join(", ")
            ),
        ),
    }

    // Transparent huge pages.
    let global = read_text(Path::new(
        "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    ))
    .ok();
    let global = global
        .as_deref()
        .and_then(selected_choice)
        .map(str::to_owned);
    let per_size = per_size_shmem_thp();
    match mount_of(&file) {
        Ok(mount) => {
            if let Err(reason) =
                shmem_thp_verdict(global.as_deref(), &per_size, mount.as_ref(), &file)
            {
                add(Precondition::ShmemThpOff, reason.to_string());
            }
        }
        Err(e) => add(
            Precondition::ShmemThpOff,
            format!("cannot find the RAM file's mount: {e}"),
        ),
    }
    if let Ok(smaps) = &smaps {
        let pmd: u64 = smaps
            .iter()
            .filter(|s| s.map.maps(&file))
            .map(|s| s.pmd_mapped_kb)
            .sum();
        if pmd > 0 {
            add(
                Precondition::ShmemThpOff,
                format!("QEMU maps {pmd} kB of guest RAM with huge pages right now"),
            );
        }
    }

    // Other writers.
    for reason in other_writers(target.pid, &file) {
        add(Precondition::NoOtherWriters, reason);
    }
    unmet
}

/// Proves the agent may read QEMU's pagemap (one entry of the RAM mapping) and write its
/// clear_refs.
///
/// # Errors
/// The [`PagemapError`] of the first file that cannot be opened or read.
fn check_pagemap_access(pid: i32, mapping: &RamMapping) -> Result<(), PagemapError> {
    let pagemap = Pagemap::open(pid)?;
    let mut entry = [0u64; 1];
    pagemap.read(mapping.segments[0].vaddr, &mut entry, &mut Vec::new())?;
    // Opening clear_refs for writing proves the permission without clearing anything.
    ClearRefs::open(pid)?;
    Ok(())
}

/// The selected values of the per-size (mTHP) `shmem_enabled` controls, if the kernel has them.
fn per_size_shmem_thp() -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/sys/kernel/mm/transparent_hugepage") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("hugepages-") {
            continue;
        }
        if let Ok(text) = read_text(&entry.path().join("shmem_enabled")) {
            if let Some(v) = selected_choice(&text) {
                out.push((name, v.to_owned()));
            }
        }
    }
    out
}

/// Why the kernel may back the RAM file with transparent huge pages, whose splits lose
/// soft-dirty bits (or, for hugetlbfs and disk filesystems, why the file is unsupported).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShmemThpRisk {
    /// The global control forces huge pages on every shmem/tmpfs file.
    #[error("transparent_hugepage/shmem_enabled is [force]: every tmpfs file may use huge pages")]
    Forced,
    /// The file is on the kernel's internal mount, which follows the global control.
    #[error("the RAM file is on the kernel's internal shmem mount and shmem_enabled is [{value}]")]
    InternalGlobal {
        /// The selected `shmem_enabled` value.
        value: String,
    },
    /// The file is on the kernel's internal mount and a per-size (mTHP) control allows it.
    #[error("the RAM file is on the internal shmem mount and {size}/shmem_enabled is [{value}]")]
    InternalPerSize {
        /// The control's directory (`hugepages-64kB`, …).
        size: String,
        /// Its selected value.
        value: String,
    },
    /// The file's tmpfs mount asks for huge pages.
    #[error("the RAM file's tmpfs at {mount_point} is mounted huge={value}")]
    TmpfsHuge {
        /// The tmpfs mount.
        mount_point: String,
        /// Its `huge=` option.
        value: String,
    },
    /// The file is on hugetlbfs.
    #[error(
        "the RAM file is on hugetlbfs at {mount_point}: huge-page granularity, not supported by the soft-dirty tracker"
    )]
    Hugetlbfs {
        /// The hugetlbfs mount.
        mount_point: String,
    },
    /// The file is on a disk (or other non-shmem) filesystem.
    #[error(
        "the RAM file is on {fstype} at {mount_point}: page cache writeback and reclaim can drop soft-dirty bits; use tmpfs"
    )]
    NotShmem {
        /// The filesystem type.
        fstype: String,
        /// Its mount.
        mount_point: String,
    },
}

/// Whether the kernel may back the RAM file with transparent huge pages.
///
/// Kernel rules (mm/shmem.c): the global `shmem_enabled` value `force` turns huge pages on
/// for every shmem/tmpfs file and `deny` off for all; otherwise a tmpfs mount follows its own
/// `huge=` option (absent = never), while the kernel-internal mount (memfd, SysV shm,
/// anonymous shared) follows `shmem_enabled` and the per-size controls. hugetlbfs and disk
/// filesystems are not supported here at all.
///
/// # Errors
/// The [`ShmemThpRisk`] found.
pub fn shmem_thp_verdict(
    global: Option<&str>,
    per_size: &[(String, String)],
    mount: Option<&MountInfo>,
    file: &FileId,
) -> Result<(), ShmemThpRisk> {
    match global {
        Some("force") => return Err(ShmemThpRisk::Forced),
        Some("deny") => return Ok(()),
        _ => {}
    }
    let memfd = file.path.to_string_lossy().starts_with("/memfd:");
    let mount = match mount {
        Some(mount) if !memfd => mount,
        // The kernel's internal mount.
        _ => {
            if let Some(v) = global.filter(|v| *v != "never") {
                return Err(ShmemThpRisk::InternalGlobal {
                    value: v.to_owned(),
                });
            }
            if let Some((size, v)) = per_size.iter().find(|(_, v)| {
                v != "never" && !(v == "inherit" && global.is_none_or(|g| g == "never"))
            }) {
                return Err(ShmemThpRisk::InternalPerSize {
                    size: size.clone(),
                    value: v.clone(),
                });
            }
            return Ok(());
        }
    };
    let mount_point = mount.mount_point.clone();
    match mount.fstype.as_str() {
        "tmpfs" => match mount.option("huge") {
            None | Some("never") | Some("deny") => Ok(()),
            Some(v) => Err(ShmemThpRisk::TmpfsHuge {
                mount_point,
                value: v.to_owned(),
            }),
        },
        "hugetlbfs" => Err(ShmemThpRisk::Hugetlbfs { mount_point }),
        other => Err(ShmemThpRisk::NotShmem {
            fstype: other.to_owned(),
            mount_point,
        }),
    }
}

/// Every process other than `qemu_pid` that can write the RAM file, and this process if its
/// own mapping is writable.
fn other_writers(qemu_pid: i32, file: &FileId) -> Vec<String> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec!["cannot list /proc to look for other writers".into()];
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == qemu_pid {
            continue;
        }
        // Processes that exit while we look are simply gone.
        if let Ok(maps) = procfs::read_maps(pid) {
            if maps.iter().any(|m| m.maps(file) && m.write && m.shared) {
                let who = if pid == me {
                    "this agent".to_owned()
                } else {
                    describe(pid)
                };
                out.push(format!(
                    "{who} maps {} writable: its stores are invisible to QEMU's soft-dirty bits",
                    file.path.display()
                ));
                continue;
            }
        }
        if pid != me {
            if let Some(fd) = writable_fd(pid, file) {
                out.push(format!(
                    "{} has {} open for writing (fd {fd}): write() to it is invisible to soft-dirty",
                    describe(pid),
                    file.path.display()
                ));
            }
        }
    }
    out
}

fn describe(pid: i32) -> String {
    let comm = read_text(&proc_path(pid, "comm")).unwrap_or_default();
    format!("pid {pid} ({})", comm.trim())
}

/// An fd of `pid` open on `file` with write access, if any.
fn writable_fd(pid: i32, file: &FileId) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::read_dir(proc_path(pid, "fd")).ok()?;
    for fd in dir.flatten() {
        // metadata() follows the magic link to the open file itself.
        let Ok(md) = std::fs::metadata(fd.path()) else {
            continue;
        };
        let dev = md.dev();
        if md.ino() != file.inode
            || libc::major(dev) != file.major
            || libc::minor(dev) != file.minor
        {
            continue;
        }
        let name = fd.file_name().to_string_lossy().into_owned();
        let info = read_text(&proc_path(pid, &format!("fdinfo/{name}"))).ok()?;
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
        if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
            return Some(name);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfs(huge: Option<&str>) -> MountInfo {
        let mut opts = vec!["rw".to_owned()];
        if let Some(h) = huge {
            opts.push(format!("huge={h}"));
        }
        MountInfo {
            major: 0,
            minor: 26,
            mount_point: "/dev/shm".into(),
            fstype: "tmpfs".into(),
            super_options: opts,
        }
    }

    #[test]
    fn shmem_thp_verdict_table() {
        let shm = FileId {
            major: 0,
            minor: 26,
            inode: 1,
            path: "/dev/shm/r".into(),
        };
        let memfd = FileId {
            major: 0,
            minor: 1,
            inode: 1,
            path: "/memfd:ram (deleted)".into(),
        };
        let huge_tlb = MountInfo {
            fstype: "hugetlbfs".into(),
            ..tmpfs(None)
        };
        let ext4 = MountInfo {
            fstype: "ext4".into(),
            ..tmpfs(None)
        };
        let mthp = |v: &str| vec![("hugepages-64kB".to_owned(), v.to_owned())];
        // (global, per-size, mount, file, ok?)
        type Case<'a> = (
            Option<&'a str>,
            Vec<(String, String)>,
            Option<MountInfo>,
            &'a FileId,
            bool,
        );
        let cases: Vec<Case<'_>> = vec![
            (Some("never"), vec![], Some(tmpfs(None)), &shm, true), // default tmpfs
            (Some("always"), vec![], Some(tmpfs(None)), &shm, true), // global only affects the internal mount
            (
                Some("never"),
                vec![],
                Some(tmpfs(Some("always"))),
                &shm,
                false,
            ), // huge=always mount
            (
                Some("never"),
                vec![],
                Some(tmpfs(Some("within_size"))),
                &shm,
                false,
            ),
            (
                Some("advise"),
                vec![],
                Some(tmpfs(Some("never"))),
                &shm,
                true,
            ),
            (
                Some("force"),
                vec![],
                Some(tmpfs(Some("never"))),
                &shm,
                false,
            ), // force overrides mounts
            (
                Some("deny"),
                vec![],
                Some(tmpfs(Some("always"))),
                &shm,
                true,
            ), // deny overrides mounts
            (None, vec![], Some(tmpfs(None)), &shm, true), // no THP in kernel
            (Some("never"), vec![], None, &memfd, true),   // memfd, THP off
            (Some("advise"), vec![], None, &memfd, false), // memfd + QEMU's MADV_HUGEPAGE
            (Some("within_size"), vec![], None, &memfd, false),
            (Some("never"), mthp("always"), None, &memfd, false), // mTHP for shmem
            (Some("never"), mthp("inherit"), None, &memfd, true), // inherits never
            (Some("never"), vec![], Some(huge_tlb), &shm, false),
            (Some("never"), vec![], Some(ext4), &shm, false),
        ];
        for (i, (global, per_size, mount, file, ok)) in cases.iter().enumerate() {
            let got = shmem_thp_verdict(*global, per_size, mount.as_ref(), file);
            assert_eq!(got.is_ok(), *ok, "case {i}: {got:?}");
        }
    }
}
