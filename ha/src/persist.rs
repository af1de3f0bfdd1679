//! Durable replacement of small state files.
//!
//! A state file is replaced as a whole: the new contents go to `<name>.tmp`, which is
//! fsynced, renamed over the old file, and then the directory is fsynced so the rename itself
//! survives a power loss. A crash at any instant leaves either the old or the new file under
//! the real name, never a torn one; a leftover `.tmp` is ignored (and overwritten by the next
//! write).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a state file of format version `found` is refused by a release that reads only
/// `reads` (which v0.1.0 wrote too): named as newer when it is, never misread.
pub fn unknown_version(found: u32, reads: u32) -> String {
    format!(
        "format version {found} is not one this release reads (version {reads}, the same as \
         v0.1.0's){}",
        if found > reads {
            ": written by a newer release"
        } else {
            ""
        }
    )
}

/// Name of the temporary file a write of `path` goes through.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically and durably (temporary file, fsync, rename, fsync of
/// the directory). The file is readable and writable by its owner only (0600). Returns the failed step's name with the error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), (&'static str, io::Error)> {
    let tmp = tmp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| ("create temporary file", e))?;
    // A temporary file left by a crash keeps the mode it was created with: set it, so the
    // state file is owner-only whatever the umask or history.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| ("chmod temporary file", e))?;
    f.write_all(bytes)
        .map_err(|e| ("write temporary file", e))?;
    f.sync_all().map_err(|e| ("fsync temporary file", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| ("rename into place", e))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ("fsync directory", e))?;
    Ok(())
}

/// [`write_atomic`], creating the file's directory first (owner-only, 0700) if it does not
/// exist yet: for state files written before anything else made their directory.
pub fn write_atomic_creating_dir(
    path: &Path,
    bytes: &[u8],
) -> Result<(), (&'static str, io::Error)> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ("create directory", e))?;
    }
    write_atomic(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_file_and_ignores_stale_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        // A torn temporary file from a crashed writer is simply overwritten.
        fs::write(tmp_path(&p), b"garbage from a crash").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn failure_names_the_step() {
        let e = write_atomic(Path::new("/nonexistent-dir-remus-ha/x"), b"x").unwrap_err();
        assert_eq!(e.0, "create temporary file");
    }
}
