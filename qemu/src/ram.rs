//! Guest RAM as a shared mapping of QEMU's RAM file.
//!
//! QEMU runs with `-object memory-backend-file,...,share=on`, so the file (in /dev/shm) *is*
//! guest RAM: the primary's checkpoint engine reads pages straight from a [`GuestRam`]
//! mapping, the backup writes its replica through a [`GuestRamMut`] mapping of its own file
//! and starts the activated QEMU on (a copy of) that file.
//!
//! Invariants:
//! - the file's size equals the guest's RAM size (checked on open): page `i` is guest
//!   physical RAM offset `i * PAGE_SIZE` of the backend (QEMU maps the backend linearly);
//! - contents are stable only while the VM is stopped. Reading while it runs is allowed (the
//!   memory is plain bytes, any value is valid) but may observe a page mid-update; the engine
//!   copies pages it will send only between `stop` and `cont`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut, MmapOptions};

/// Granularity of dirty tracking and page transfer: the workspace's one definition, in
/// remus-stream.
pub use remus_stream::PAGE_SIZE;

/// Errors of a RAM mapping, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("guest ram {path}: open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest ram {path}: size is {actual} bytes, expected {expected}")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("guest ram {path}: size {size} is zero or not a multiple of {PAGE_SIZE}")]
    BadSize { path: PathBuf, size: u64 },
    #[error("guest ram {path}: set size to {size}: {source}")]
    Resize {
        path: PathBuf,
        size: u64,
        source: std::io::Error,
    },
    #[error("guest ram {path}: map {size} bytes: {source}")]
    Map {
        path: PathBuf,
        size: u64,
        source: std::io::Error,
    },
    #[error("guest ram {path}: flush: {source}")]
    Flush {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn check_size(path: &Path, size: u64) -> Result<usize, RamError> {
    if size == 0 || size & (PAGE_SIZE as u64 - 1) != 0 {
        return Err(RamError::BadSize {
            path: path.to_owned(),
            size,
        });
    }
    usize::try_from(size).map_err(|_| RamError::BadSize {
        path: path.to_owned(),
        size,
    })
}

fn check_file(path: &Path, file: &File, expected: u64) -> Result<(), RamError> {
    let actual = file
        .metadata()
        .map_err(|source| RamError::Open {
            path: path.to_owned(),
            source,
        })?
        .len();
    if actual != expected {
        return Err(RamError::SizeMismatch {
            path: path.to_owned(),
            actual,
            expected,
        });
    }
    Ok(())
}

/// A read-only view of a running (or stopped) guest's RAM file.
pub struct GuestRam {
    path: PathBuf,
    map: Mmap,
}

impl GuestRam {
    /// Maps `path`, which must be exactly `size` bytes (QEMU creates and sizes it).
    pub fn open(path: &Path, size: u64) -> Result<GuestRam, RamError> {
        let len = check_size(path, size)?;
        let file = File::open(path).map_err(|source| RamError::Open {
            path: path.to_owned(),
            source,
        })?;
        check_file(path, &file, size)?;
        // SAFETY: memmap2 requires that the file not be truncated while mapped (that would
        // turn accesses into SIGBUS) and warns that concurrent writes change the bytes under
        // a `&[u8]`. The RAM file belongs to a QEMU the agent started; nothing truncates it
        // while it runs. QEMU does write to it while the vCPUs run: every byte pattern is a
        // valid `u8`, and the engine relies only on bytes read while the VM is stopped (see
        // the module invariants), so a concurrent write can at worst give a stale copy that
        // the next stopped read corrects.
        let map =
            unsafe { MmapOptions::new().len(len).map(&file) }.map_err(|source| RamError::Map {
                path: path.to_owned(),
                size,
                source,
            })?;
        Ok(GuestRam {
            path: path.to_owned(),
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// RAM size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn page_count(&self) -> usize {
        self.map.len() / PAGE_SIZE
    }

    /// All of guest RAM.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// Page `index`, or `None` beyond the end.
    pub fn page(&self, index: usize) -> Option<&[u8]> {
        let start = index.checked_mul(PAGE_SIZE)?;
        self.map.get(start..start.checked_add(PAGE_SIZE)?)
    }
}

/// A writable mapping of a RAM file: the backup's replica.
pub struct GuestRamMut {
    path: PathBuf,
    map: MmapMut,
}

impl GuestRamMut {
    /// Creates (or reuses) `path` sized to exactly `size` bytes and maps it writable. A new
    /// file reads as zeroes, like fresh guest RAM.
    pub fn create(path: &Path, size: u64) -> Result<GuestRamMut, RamError> {
        let len = check_size(path, size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .truncate(false)
            .open(path)
            .map_err(|source| RamError::Open {
                path: path.to_owned(),
                source,
            })?;
        file.set_len(size).map_err(|source| RamError::Resize {
            path: path.to_owned(),
            size,
            source,
        })?;
        Self::map(path, &file, len, size)
    }

    /// Maps an existing file of exactly `size` bytes writable.
    pub fn open(path: &Path, size: u64) -> Result<GuestRamMut, RamError> {
        let len = check_size(path, size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| RamError::Open {
                path: path.to_owned(),
                source,
            })?;
        check_file(path, &file, size)?;
        Self::map(path, &file, len, size)
    }

    fn map(path: &Path, file: &File, len: usize, size: u64) -> Result<GuestRamMut, RamError> {
        // SAFETY: the replica file is the agent's own (no QEMU runs on it while it is mapped
        // writable: activation starts QEMU on it only after the engine stops applying), so
        // nothing else writes or truncates it during the mapping's life; the file was sized to
        // `len` just before.
        let map = unsafe { MmapOptions::new().len(len).map_mut(file) }.map_err(|source| {
            RamError::Map {
                path: path.to_owned(),
                size,
                source,
            }
        })?;
        Ok(GuestRamMut {
            path: path.to_owned(),
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn page_count(&self) -> usize {
        self.map.len() / PAGE_SIZE
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    pub fn page(&self, index: usize) -> Option<&[u8]> {
        let start = index.checked_mul(PAGE_SIZE)?;
        self.map.get(start..start.checked_add(PAGE_SIZE)?)
    }

    pub fn page_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        let start = index.checked_mul(PAGE_SIZE)?;
        self.map.get_mut(start..start.checked_add(PAGE_SIZE)?)
    }

    /// Writes the mapping back to the file (needed for durability only where the file is not
    /// on tmpfs).
    pub fn flush(&self) -> Result<(), RamError> {
        self.map.flush().map_err(|source| RamError::Flush {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_and_pages_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let size = 4 * PAGE_SIZE as u64;
        // (size asked, expected outcome)
        let bad_sizes = [0u64, 100, PAGE_SIZE as u64 + 1];
        for s in bad_sizes {
            assert!(
                matches!(GuestRamMut::create(&path, s), Err(RamError::BadSize { .. })),
                "size {s}"
            );
        }
        let mut w = GuestRamMut::create(&path, size).unwrap();
        w.page_mut(2).unwrap().fill(0xab);
        assert!(w.page_mut(4).is_none());
        assert!(w.page(usize::MAX).is_none(), "overflowing index");

        let r = GuestRam::open(&path, size).unwrap();
        assert_eq!(r.page_count(), 4);
        assert!(r.page(2).unwrap().iter().all(|&b| b == 0xab));
        assert!(r.page(1).unwrap().iter().all(|&b| b == 0));
        assert!(r.page(4).is_none());
        // A writer's later store is visible through the shared read mapping.
        w.page_mut(0).unwrap()[7] = 1;
        assert_eq!(r.page(0).unwrap()[7], 1);

        assert!(matches!(
            GuestRam::open(&path, 2 * size),
            Err(RamError::SizeMismatch { actual, .. }) if actual == size
        ));
        assert!(matches!(
            GuestRam::open(&dir.path().join("absent"), size),
            Err(RamError::Open { .. })
        ));
    }
}
