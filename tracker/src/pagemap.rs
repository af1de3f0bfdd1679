//! The kernel's soft-dirty log: `/proc/<pid>/pagemap` entries (bit 55 = soft-dirty) and
//! `/proc/<pid>/clear_refs` (writing `4` clears the bits of the whole process).
//!
//! Why it is only a hint without preconditions: see `shared/notes/soft-dirty.md` and
//! [`crate::preconditions`]. What this module guarantees is narrower: entries are read with
//! positioned reads of whole ranges (no shared file position), the files are kept open across
//! epochs (one open at attach, none in the stop window), and a process that exited shows up as
//! an error instead of as an empty dirty set.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::page::PAGE_SIZE;
use crate::procfs::proc_path;

/// Pagemap entry bit: the page is present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry bit: the page is swapped out.
pub const PM_SWAP: u64 = 1 << 62;
/// Pagemap entry bit: the PTE is soft-dirty (written since the last clear, or the VMA is new).
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Bytes per pagemap entry.
const ENTRY_BYTES: usize = 8;

/// Errors reading or clearing the soft-dirty log.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// Opening a procfs file failed (no such process, or no permission to inspect it).
    #[error("pagemap: opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading pagemap entries failed.
    #[error(
        "pagemap: reading {count} entries at virtual address {vaddr:#x} from {path}: {source}"
    )]
    Read {
        path: PathBuf,
        vaddr: u64,
        count: usize,
        #[source]
        source: std::io::Error,
    },
    /// `clear_refs` refused the write.
    #[error("pagemap: writing 4 (clear soft-dirty) to {path}: {source}")]
    Clear {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Setting up the probe's scratch memory failed.
    #[error("pagemap: probe: mapping a scratch page: {0}")]
    ProbeMap(#[source] std::io::Error),
}

/// An open `/proc/<pid>/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    path: PathBuf,
    file: File,
}

impl Pagemap {
    /// Opens the pagemap of `pid` (0: this process).
    pub fn open(pid: i32) -> Result<Self, PagemapError> {
        let path = proc_path(pid, "pagemap");
        let file = File::open(&path).map_err(|source| PagemapError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Pagemap { path, file })
    }

    /// Reads the entries of the `out.len()` pages starting at virtual address `vaddr`
    /// (page aligned), using `scratch` as the byte buffer.
    pub fn read(
        &self,
        vaddr: u64,
        out: &mut [u64],
        scratch: &mut Vec<u8>,
    ) -> Result<(), PagemapError> {
        let bytes = out.len() * ENTRY_BYTES;
        scratch.clear();
        scratch.resize(bytes, 0);
        let err = |source| PagemapError::Read {
            path: self.path.clone(),
            vaddr,
            count: out.len(),
            source,
        };
        let base = vaddr / PAGE_SIZE as u64 * ENTRY_BYTES as u64;
        let mut done = 0;
        while done < bytes {
            match self.file.read_at(&mut scratch[done..], base + done as u64) {
                // The process's address space is gone (it exited) or the range ended.
                Ok(0) => return Err(err(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(e)),
            }
        }
        for (o, b) in out.iter_mut().zip(scratch.chunks_exact(ENTRY_BYTES)) {
            *o = u64::from_ne_bytes(b.try_into().expect("chunk of 8 bytes"));
        }
        Ok(())
    }
}

/// An open `/proc/<pid>/clear_refs`.
#[derive(Debug)]
pub struct ClearRefs {
    path: PathBuf,
    file: File,
}

impl ClearRefs {
    /// Opens the clear_refs file of `pid` (0: this process) for writing.
    pub fn open(pid: i32) -> Result<Self, PagemapError> {
        let path = proc_path(pid, "clear_refs");
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| PagemapError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(ClearRefs { path, file })
    }

    /// Clears the soft-dirty bits of every page of the process (and write-protects them, so
    /// the next store to each page faults once and sets the bit again).
    pub fn clear_soft_dirty(&self) -> Result<(), PagemapError> {
        loop {
            match self.file.write_at(b"4", 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(PagemapError::Clear {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }
}

/// Why this kernel's soft-dirty bits cannot be relied on, as [`probe_kernel_support`] saw it.
/// Not an error of the probe: the probe worked and found the feature missing or inexact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SoftDirtyUnsupported {
    /// `clear_refs` accepted the write but left the bits set.
    #[error("writing 4 to /proc/self/clear_refs did not clear pagemap bit 55 (soft-dirty)")]
    ClearIgnored,
    /// A store after clearing did not set the bit: the kernel does not track it.
    #[error(
        "a page written after clear_refs does not show pagemap bit 55 (entry {entry:#018x}): \
         the kernel is built without CONFIG_MEM_SOFT_DIRTY"
    )]
    WriteNotMarked {
        /// The written page's pagemap entry, for the operator's report.
        entry: u64,
    },
    /// A page nobody wrote shows the bit: the log would over-report at a coarser grain.
    #[error(
        "a page not written after clear_refs shows pagemap bit 55: soft-dirty is not page-exact here"
    )]
    NotPageExact,
}

/// Whether this kernel keeps soft-dirty bits, found by trying it on a scratch page of this
/// process.
///
/// The probe clears this process's soft-dirty bits (harmless: the agent's own pages are not
/// tracked; it costs one write-protect fault per page next written).
///
/// # Errors
/// The outer [`PagemapError`] when the probe itself cannot run; the inner
/// [`SoftDirtyUnsupported`] when it ran and found soft-dirty unusable.
pub fn probe_kernel_support() -> Result<Result<(), SoftDirtyUnsupported>, PagemapError> {
    let mut page = memmap2::MmapMut::map_anon(2 * PAGE_SIZE).map_err(PagemapError::ProbeMap)?;
    // Fault both pages in so they have page-table entries.
    page[0] = 1;
    page[PAGE_SIZE] = 1;
    let vaddr = page.as_ptr() as u64;
    let pagemap = Pagemap::open(0)?;
    let clear = ClearRefs::open(0)?;
    let mut entries = [0u64; 2];
    let mut scratch = Vec::new();

    clear.clear_soft_dirty()?;
    pagemap.read(vaddr, &mut entries, &mut scratch)?;
    if entries.iter().any(|e| e & PM_SOFT_DIRTY != 0) {
        return Ok(Err(SoftDirtyUnsupported::ClearIgnored));
    }
    // SAFETY: `page` is a live, writable anonymous mapping of two pages; the volatile store
    // keeps the compiler from eliding a write whose only observer is the kernel.
    unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 2) };
    pagemap.read(vaddr, &mut entries, &mut scratch)?;
    match (
        entries[0] & PM_SOFT_DIRTY != 0,
        entries[1] & PM_SOFT_DIRTY != 0,
    ) {
        (true, false) => Ok(Ok(())),
        (false, _) => Ok(Err(SoftDirtyUnsupported::WriteNotMarked {
            entry: entries[0],
        })),
        (true, true) => Ok(Err(SoftDirtyUnsupported::NotPageExact)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_pagemap_presence_bits() {
        let mut m = memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap();
        m[0] = 1;
        m[2 * PAGE_SIZE] = 1;
        let pm = Pagemap::open(0).unwrap();
        let mut e = [0u64; 4];
        pm.read(m.as_ptr() as u64, &mut e, &mut Vec::new()).unwrap();
        assert_ne!(e[0] & PM_PRESENT, 0, "touched page present");
        assert_ne!(e[2] & PM_PRESENT, 0, "touched page present");
        assert_eq!(e[1] & PM_PRESENT, 0, "untouched anonymous page absent");
    }

    #[test]
    fn missing_process_is_an_open_error() {
        // Pid numbers are below pid_max (at most 2^22), so this one cannot exist.
        let err = Pagemap::open(i32::MAX).unwrap_err();
        assert!(
            err.to_string().contains("/proc/2147483647/pagemap"),
            "{err}"
        );
    }
}
