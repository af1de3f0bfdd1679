//! Which of this node's two files of each disk holds its newest copy of the domain's data:
//! the configured `image`, or the `replica` it keeps of the peer's disk.
//!
//! A node starts with its images. From the first time it accepts a replication session, its
//! replicas are where the domain's data arrives, and after an activation they are the disks
//! the VM runs on; the images are never written again. So a `remusctl start` after both
//! nodes stopped must boot from the replicas on such a node: booting its images would take
//! the guest back to whenever this node last ran it from them, silently.
//!
//! The choice is persisted (`<state_dir>/<domain>/disk-copy.json`, replaced atomically)
//! before the first replicated write can reach a replica, because nothing else on disk
//! tells which file is newer.
//!
//! The same record keeps the node's [`CopyStamp`]: which node of the pair holds the newer
//! copy ([`remus_ha::lineage`]). It is written before the VM runs from a copy (a start or an
//! activation) and before a replica receives a primary's data, and is advertised in the
//! heartbeats, so that `start` can refuse to boot a copy the peer's stamp shows to be older.

use std::path::{Path, PathBuf};

use remus_ha::lineage::CopyStamp;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File name of the record in the domain's state directory.
pub const FILE_NAME: &str = "disk-copy.json";

/// The record's format version, written in every record. Version 1 is v0.1.0's, which had
/// no `version` field (a record without one is read as version 1 and rewritten as the
/// current version on the next change); a record from a newer release is refused, naming
/// both versions, never misread.
pub const FORMAT_VERSION: u32 = 2;

fn legacy_version() -> u32 {
    1
}

/// Which file of each disk holds the newest data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskCopy {
    /// The configured `image` (nothing was ever replicated to this node).
    Image,
    /// The `replica` of each disk.
    Replica,
}

impl DiskCopy {
    /// `"image"` or `"replica"`.
    pub fn name(self) -> &'static str {
        match self {
            DiskCopy::Image => "image",
            DiskCopy::Replica => "replica",
        }
    }
}

/// Errors of the record; each names the file.
#[derive(Debug, Error)]
pub enum DiskCopyError {
    /// The file could not be read.
    #[error("domain {domain}: reading {path}: {source}")]
    Read {
        /// The domain.
        domain: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a record of ours.
    #[error("domain {domain}: {path} is corrupt: {reason}")]
    Corrupt {
        /// The domain.
        domain: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be replaced.
    #[error("domain {domain}: writing {path}: {step}: {source}")]
    Write {
        /// The domain.
        domain: String,
        /// The file.
        path: PathBuf,
        /// The failed step.
        step: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    /// [`FORMAT_VERSION`] when written by this release; 1 when absent (v0.1.0).
    #[serde(default = "legacy_version")]
    version: u32,
    copy: DiskCopy,
    /// When it was set (Unix ms).
    since_ms: u64,
    /// Why.
    cause: String,
    /// The stamp on this node's copy (absent in records written before stamps existed:
    /// no copy, the oldest).
    #[serde(default)]
    stamp: CopyStamp,
}

/// The persisted choice for one domain.
#[derive(Debug)]
pub struct DiskCopyStore {
    domain: String,
    path: PathBuf,
    record: Record,
}

impl DiskCopyStore {
    /// Opens the record in `state` (the domain's state directory); a missing file means the
    /// images (the directory is created on the first [`set`](Self::set)).
    ///
    /// # Errors
    /// Unreadable or corrupt file.
    pub fn open(domain: &str, state: &Path) -> Result<Self, DiskCopyError> {
        let path = state.join(FILE_NAME);
        let corrupt = |reason: String| DiskCopyError::Corrupt {
            domain: domain.to_string(),
            path: path.clone(),
            reason,
        };
        let record = match std::fs::read(&path) {
            Ok(bytes) => {
                // The version first: a newer release's record may have fields this one
                // does not know, and must be named as newer rather than as corrupt.
                #[derive(Deserialize)]
                struct Versioned {
                    #[serde(default = "legacy_version")]
                    version: u32,
                }
                let v: Versioned =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if v.version > FORMAT_VERSION {
                    return Err(corrupt(format!(
                        "format version {} was written by a newer release; this one reads \
                         versions 1 to {FORMAT_VERSION}",
                        v.version
                    )));
                }
                serde_json::from_slice::<Record>(&bytes).map_err(|e| corrupt(e.to_string()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Record {
                version: FORMAT_VERSION,
                copy: DiskCopy::Image,
                since_ms: 0,
                cause: "no record: nothing was ever replicated to this node".into(),
                stamp: CopyStamp::NONE,
            },
            Err(source) => {
                return Err(DiskCopyError::Read {
                    domain: domain.to_string(),
                    path,
                    source,
                })
            }
        };
        Ok(Self {
            domain: domain.to_string(),
            path,
            record,
        })
    }

    /// The file of each disk that holds the newest data.
    pub fn current(&self) -> DiskCopy {
        self.record.copy
    }

    /// Why it is what it is.
    pub fn cause(&self) -> &str {
        &self.record.cause
    }

    /// The stamp on this node's copy.
    pub fn stamp(&self) -> CopyStamp {
        self.record.stamp
    }

    /// Records `copy` and `stamp` durably (nothing is written when both are already so).
    ///
    /// # Errors
    /// The file could not be replaced; the record is then unchanged.
    pub fn set(
        &mut self,
        copy: DiskCopy,
        stamp: CopyStamp,
        cause: &str,
    ) -> Result<(), DiskCopyError> {
        if self.record.copy == copy && self.record.stamp == stamp && self.record.since_ms != 0 {
            return Ok(());
        }
        let record = Record {
            version: FORMAT_VERSION,
            copy,
            since_ms: remus_ha::auth::unix_millis(),
            cause: cause.to_string(),
            stamp,
        };
        let write_err = |step, source| DiskCopyError::Write {
            domain: self.domain.clone(),
            path: self.path.clone(),
            step,
            source,
        };
        let bytes = serde_json::to_vec_pretty(&record).expect("record serialises");
        remus_ha::persist::write_atomic_creating_dir(&self.path, &bytes)
            .map_err(|(s, e)| write_err(s, e))?;
        self.record = record;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What v0.1.0 (commit 1f80a39, `RELEASES`) writes: its `Record` and `CopyStamp`
    /// serialised by serde_json, no `version` field.
    const V0_1_0_RECORD: &str = r#"{
  "copy": "replica",
  "since_ms": 1733300000000,
  "cause": "activated from checkpoint 60",
  "stamp": {
    "generation": 3,
    "holder": "ran"
  }
}"#;

    #[test]
    fn a_v0_1_0_record_is_read_and_rewritten_in_the_current_format() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("web");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join(FILE_NAME), V0_1_0_RECORD).unwrap();
        let mut s = DiskCopyStore::open("web", &state).unwrap();
        assert_eq!(s.current(), DiskCopy::Replica);
        assert_eq!(s.stamp().generation, 3);
        assert_eq!(s.record.version, 1);
        // Rewritten, with the version, on the next change.
        let stamp = CopyStamp {
            generation: 4,
            ..s.stamp()
        };
        s.set(DiskCopy::Replica, stamp, "started").unwrap();
        let text = std::fs::read_to_string(state.join(FILE_NAME)).unwrap();
        assert!(
            text.contains(&format!("\"version\": {FORMAT_VERSION}")),
            "{text}"
        );
        assert_eq!(DiskCopyStore::open("web", &state).unwrap().stamp(), stamp);

        // A newer release's record (with a field this one does not know) is refused as
        // newer, naming the file and both versions.
        std::fs::write(
            state.join(FILE_NAME),
            V0_1_0_RECORD.replacen("{", "{\n  \"version\": 9, \"future\": true,", 1),
        )
        .unwrap();
        let e = DiskCopyStore::open("web", &state).unwrap_err().to_string();
        assert!(
            e.contains("format version 9 was written by a newer release")
                && e.contains("versions 1 to 2")
                && e.contains(FILE_NAME),
            "{e}"
        );
    }

    #[test]
    fn images_until_a_replica_is_recorded_and_the_record_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("web");
        let mut s = DiskCopyStore::open("web", &state).unwrap();
        assert_eq!(s.current(), DiskCopy::Image);
        assert!(!state.join(FILE_NAME).exists(), "opening writes nothing");
        assert_eq!(s.stamp(), CopyStamp::NONE);
        let received = CopyStamp::received_from(Some(CopyStamp {
            generation: 3,
            holder: remus_ha::lineage::CopyHolder::Ran,
        }));
        s.set(DiskCopy::Replica, received, "backup of node a")
            .unwrap();
        let s = DiskCopyStore::open("web", &state).unwrap();
        assert_eq!(
            (s.current(), s.cause(), s.stamp()),
            (DiskCopy::Replica, "backup of node a", received)
        );
    }

    #[test]
    fn a_record_from_before_stamps_reads_as_the_oldest_copy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            br#"{"copy":"replica","since_ms":5,"cause":"backup of b"}"#,
        )
        .unwrap();
        let s = DiskCopyStore::open("web", dir.path()).unwrap();
        assert_eq!(
            (s.current(), s.stamp()),
            (DiskCopy::Replica, CopyStamp::NONE)
        );
    }

    #[test]
    fn a_corrupt_or_foreign_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (text, what) in [
            (&b"not json"[..], "garbage"),
            (
                br#"{"copy":"tape","since_ms":1,"cause":"x"}"#,
                "unknown copy",
            ),
            (
                br#"{"copy":"image","since_ms":1,"cause":"x","extra":1}"#,
                "unknown field",
            ),
            (
                br#"{"copy":"replica","since_ms":1,"cause":"x","stamp":{"generation":2,"holder":"tape"}}"#,
                "unknown copy holder",
            ),
            (
                br#"{"copy":"replica","since_ms":1,"cause":"x","stamp":{"generation":-1,"holder":"ran"}}"#,
                "negative generation",
            ),
        ] {
            std::fs::write(dir.path().join(FILE_NAME), text).unwrap();
            let e = DiskCopyStore::open("web", dir.path()).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with("domain web: ")
                    && msg.contains(FILE_NAME)
                    && msg.contains("corrupt"),
                "{what}: {msg}"
            );
        }
    }
}
