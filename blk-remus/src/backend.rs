//! The block device interface the NBD server serves, and its raw image file implementation.
//!
//! The trait is synchronous on purpose: every implementation here does positional file I/O,
//! which is blocking, so the NBD server runs each request on tokio's blocking pool and many
//! requests of one connection proceed in parallel. Implementations must be safe to call
//! concurrently (`&self`); ordering between overlapping requests in flight is the client's
//! business, exactly as for a real disk.
//!
//! Bounds are checked by the NBD server before a backend is called, and again here (a backend
//! may be used directly, e.g. by the sync code): out-of-range requests are typed errors, never
//! a panic and never a file extension.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nix::fcntl::{fallocate, FallocateFlags};

/// Errors of a block backend operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request reaches past the end of the device.
    #[error("{op} of {len} bytes at {offset} beyond device size {size}")]
    OutOfRange {
        /// Operation name (read, write, …).
        op: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// The device is read-only.
    #[error("{op} on read-only device")]
    ReadOnly {
        /// Operation name.
        op: &'static str,
    },
    /// The underlying I/O failed.
    #[error("{op} of {len} bytes at {offset} on {path}: {source}")]
    Io {
        /// Operation name.
        op: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// The file the backend serves.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A wrapper refused the request for its own reason (e.g. the primary's dirty bitmap
    /// could not be persisted, so the write must not happen untracked).
    #[error("{op} of {len} bytes at {offset}: {reason}")]
    Refused {
        /// Operation name.
        op: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Why.
        reason: String,
    },
}

impl BackendError {
    /// The errno an NBD reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BackendError::OutOfRange { op: "read", .. } => libc::EINVAL,
            BackendError::OutOfRange { .. } => libc::ENOSPC,
            BackendError::ReadOnly { .. } => libc::EPERM,
            BackendError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => libc::EPERM,
                _ => libc::EIO,
            },
            BackendError::Refused { .. } => libc::EIO,
        }
    }
}

/// A block device that NBD can serve.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size of the device in bytes (fixed for the life of the backend).
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Whether a flush on one connection makes writes completed on every connection durable
    /// (lets NBD advertise `CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        false
    }
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Writes `data` at `offset`; with `fua` the data is durable when this returns.
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError>;
    /// Makes `len` bytes at `offset` read as zeroes; `may_unmap` allows deallocating them.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        may_unmap: bool,
    ) -> Result<(), BackendError>;
    /// Discards `len` bytes at `offset` (they read as zeroes afterwards on a raw image).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;
}

/// Checks that `[offset, offset+len)` lies inside a device of `size` bytes.
pub(crate) fn check_range(
    op: &'static str,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange {
            op,
            offset,
            len,
            size,
        }),
    }
}

/// A raw image file served with positional I/O (`pread`/`pwrite`), so concurrent requests do
/// not share a file cursor.
#[derive(Debug)]
pub struct FileBackend {
    /// The open image; positional I/O only.
    file: File,
    /// Kept for error messages.
    path: PathBuf,
    /// Size at open time; the image is never grown or shrunk through this backend.
    size: u64,
    /// Refuse writes.
    read_only: bool,
}

impl FileBackend {
    /// Opens an existing raw image.
    ///
    /// # Errors
    /// [`BackendError::Io`] when the file cannot be opened or its size read.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BackendError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| BackendError::Io {
            op: "open",
            offset: 0,
            len: 0,
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        Ok(FileBackend {
            file,
            path,
            size,
            read_only,
        })
    }

    /// Creates (or truncates) a sparse raw image of `size` bytes and opens it read-write.
    ///
    /// # Errors
    /// [`BackendError::Io`] when the file cannot be created or sized.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self, BackendError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| BackendError::Io {
            op: "create",
            offset: 0,
            len: size,
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .truncate(true)
            .open(&path)
            .map_err(io)?;
        file.set_len(size).map_err(io)?;
        Ok(FileBackend {
            file,
            path,
            size,
            read_only: false,
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        source: std::io::Error,
    ) -> BackendError {
        BackendError::Io {
            op,
            offset,
            len,
            path: self.path.clone(),
            source,
        }
    }

    fn check_writable(&self, op: &'static str) -> Result<(), BackendError> {
        if self.read_only {
            Err(BackendError::ReadOnly { op })
        } else {
            Ok(())
        }
    }

    /// Writes explicit zero bytes (fallback when fallocate modes are unsupported).
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)
                .map_err(|e| self.io_err("write_zeroes", offset, len, e))?;
            done += n;
        }
        Ok(())
    }

    fn fallocate_or_zero(
        &self,
        op: &'static str,
        flags: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        match fallocate(&self.file, flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::EINVAL) => {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(self.io_err(op, offset, len, std::io::Error::from(e))),
        }
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // One file, one page cache: fdatasync from any connection covers every completed write.
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        check_range("read", offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("read", offset, buf.len() as u64, e))
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        self.check_writable("write")?;
        check_range("write", offset, data.len() as u64, self.size)?;
        self.file
            .write_all_at(&data, offset)
            .map_err(|e| self.io_err("write", offset, data.len() as u64, e))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        may_unmap: bool,
    ) -> Result<(), BackendError> {
        self.check_writable("write_zeroes")?;
        check_range("write_zeroes", offset, len, self.size)?;
        let flags = if may_unmap {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        self.fallocate_or_zero("write_zeroes", flags, offset, len)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.check_writable("trim")?;
        check_range("trim", offset, len, self.size)?;
        self.fallocate_or_zero(
            "trim",
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush", 0, self.size, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_backend_round_trip_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let b = FileBackend::create(&p, 1 << 20).unwrap();
        b.write_at(4093, Bytes::from_static(b"hello"), true)
            .unwrap();
        let mut buf = [0u8; 5];
        b.read_at(4093, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        b.write_zeroes(4094, 2, false, false).unwrap();
        b.read_at(4093, &mut buf).unwrap();
        assert_eq!(&buf, b"h\0\0lo");
        b.trim(0, 8192, false).unwrap();
        b.read_at(4093, &mut buf).unwrap();
        assert_eq!(&buf, &[0u8; 5]);
        // Table of out-of-range requests: (offset, len).
        for (off, len) in [(1 << 20, 1), ((1 << 20) - 1, 2), (u64::MAX, 2)] {
            let e = b
                .write_at(off, Bytes::from(vec![0; len]), false)
                .unwrap_err();
            assert_eq!(e.errno(), libc::ENOSPC, "{e}");
            let mut buf = vec![0; len];
            assert_eq!(b.read_at(off, &mut buf).unwrap_err().errno(), libc::EINVAL);
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let ro = FileBackend::open(&p, true).unwrap();
        assert_eq!(
            ro.write_at(0, Bytes::from_static(b"x"), false)
                .unwrap_err()
                .errno(),
            libc::EPERM
        );
    }
}
