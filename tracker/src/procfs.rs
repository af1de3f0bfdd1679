//! Reading what the kernel publishes about processes and mounts: `/proc/<pid>/maps`,
//! `/proc/<pid>/smaps`, `/proc/<pid>/status`, `/proc/<pid>/mountinfo`, `/proc/swaps`.
//!
//! The parsers are pure functions over text (table-tested); the thin readers around them name
//! the file and the process in their errors. Files are identified by device and inode, not by
//! path: `maps` prints the path as it was at mmap time (with " (deleted)" after an unlink),
//! while device + inode identify the file the mapping really refers to.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::page::PAGE_SIZE;

/// Errors reading or interpreting procfs.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A procfs or sysfs file could not be read.
    #[error("procfs: reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line did not have the expected format.
    #[error("procfs: {path}: cannot parse line {line:?}")]
    Parse { path: PathBuf, line: String },
    /// The RAM file could not be identified.
    #[error("procfs: stat of RAM file {path}: {source}")]
    StatRamFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The process does not map the RAM file in a way the tracker can follow.
    #[error("procfs: pid {pid}: mapping of {path}: {problem}")]
    RamMapping {
        pid: i32,
        path: PathBuf,
        problem: String,
    },
}

/// Device number and inode of a file, plus the path it was opened by (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    /// Major device number of the filesystem holding the file.
    pub major: u32,
    /// Minor device number.
    pub minor: u32,
    /// Inode number.
    pub inode: u64,
    /// The path given by the caller.
    pub path: PathBuf,
}

impl FileId {
    /// Identifies the file at `path`.
    pub fn of(path: &Path) -> Result<Self, ProcError> {
        let md = fs::metadata(path).map_err(|source| ProcError::StatRamFile {
            path: path.to_owned(),
            source,
        })?;
        let dev = md.dev();
        Ok(FileId {
            major: libc::major(dev),
            minor: libc::minor(dev),
            inode: md.ino(),
            path: path.to_owned(),
        })
    }
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First virtual address.
    pub start: u64,
    /// One past the last virtual address.
    pub end: u64,
    /// Mapped readable.
    pub read: bool,
    /// Mapped writable: the process can store into the file through this mapping.
    pub write: bool,
    /// `MAP_SHARED` (stores reach the file) rather than private copy-on-write.
    pub shared: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the mapped file (0:0 for anonymous).
    pub major: u32,
    /// Minor device of the mapped file.
    pub minor: u32,
    /// Inode of the mapped file (0 for anonymous).
    pub inode: u64,
    /// Path or pseudo-name, if any.
    pub path: String,
}

impl MapEntry {
    /// Whether this entry maps the file `id`.
    pub fn maps(&self, id: &FileId) -> bool {
        self.inode == id.inode && self.major == id.major && self.minor == id.minor
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the entry maps nothing.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Parses one `maps` line (also the header lines of `smaps`).
pub fn parse_map_line(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let path = it.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    if perms.len() != 4 {
        return None;
    }
    let entry = MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        major: u32::from_str_radix(major, 16).ok()?,
        minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
    };
    (entry.start <= entry.end).then_some(entry)
}

fn read_to_string(path: &Path) -> Result<String, ProcError> {
    fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads and parses `/proc/<pid>/maps` (`pid` 0 means this process).
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>, ProcError> {
    let path = proc_path(pid, "maps");
    let text = read_to_string(&path)?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            parse_map_line(l).ok_or_else(|| ProcError::Parse {
                path: path.clone(),
                line: l.to_owned(),
            })
        })
        .collect()
}

/// `/proc/<pid>/<name>`, or `/proc/self/<name>` for pid 0.
pub fn proc_path(pid: i32, name: &str) -> PathBuf {
    if pid == 0 {
        PathBuf::from(format!("/proc/self/{name}"))
    } else {
        PathBuf::from(format!("/proc/{pid}/{name}"))
    }
}

/// A virtual range of a process that maps a range of the RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSegment {
    /// Virtual address of the first mapped page.
    pub vaddr: u64,
    /// File offset of that page.
    pub file_offset: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
}

/// How a process maps the RAM file: every segment, possibly overlapping in file offsets (a
/// file mapped twice is tracked through both mappings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamMapping {
    /// Segments in the order `maps` lists them (ascending virtual address).
    pub segments: Vec<MapSegment>,
}

impl RamMapping {
    /// Selects the mappings of `file` from `entries` (one process's maps) and checks that
    /// they are shared mappings covering all `ram_len` bytes of the file.
    pub fn from_maps(
        pid: i32,
        entries: &[MapEntry],
        file: &FileId,
        ram_len: u64,
    ) -> Result<Self, ProcError> {
        let problem = |p: String| ProcError::RamMapping {
            pid,
            path: file.path.clone(),
            problem: p,
        };
        let mut segments = Vec::new();
        for e in entries.iter().filter(|e| e.maps(file)) {
            if !e.shared {
                return Err(problem(format!(
                    "range {:#x}-{:#x} is a private mapping: guest stores would not reach the file",
                    e.start, e.end
                )));
            }
            if e.offset % PAGE_SIZE as u64 != 0 || e.start % PAGE_SIZE as u64 != 0 {
                return Err(problem(format!(
                    "range {:#x}-{:#x} is not page aligned",
                    e.start, e.end
                )));
            }
            segments.push(MapSegment {
                vaddr: e.start,
                file_offset: e.offset,
                len: e.len(),
            });
        }
        if segments.is_empty() {
            return Err(problem("the process does not map the file".into()));
        }
        // Coverage of [0, ram_len): merge the file ranges.
        let mut ranges: Vec<(u64, u64)> = segments
            .iter()
            .map(|s| (s.file_offset, s.file_offset + s.len))
            .collect();
        ranges.sort_unstable();
        let mut covered = 0u64;
        for (a, b) in ranges {
            if a > covered {
                break;
            }
            covered = covered.max(b);
        }
        if covered < ram_len {
            return Err(problem(format!(
                "only bytes 0..{covered} of {ram_len} are mapped contiguously from offset 0"
            )));
        }
        Ok(RamMapping { segments })
    }

    /// Reads `/proc/<pid>/maps` and selects the RAM file's mappings.
    pub fn of_process(pid: i32, file: &FileId, ram_len: u64) -> Result<Self, ProcError> {
        Self::from_maps(pid, &read_maps(pid)?, file, ram_len)
    }
}

/// One VMA of `/proc/<pid>/smaps` with the fields the preconditions look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmapsEntry {
    /// The VMA.
    pub map: MapEntry,
    /// `ShmemPmdMapped` + `FilePmdMapped`, in kB: memory mapped with transparent huge pages.
    pub pmd_mapped_kb: u64,
    /// The two-letter `VmFlags` (e.g. `lo` locked, `hg` MADV_HUGEPAGE, `sd` soft-dirty).
    pub vm_flags: Vec<String>,
}

/// Parses `smaps` text.
pub fn parse_smaps(text: &str) -> Option<Vec<SmapsEntry>> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some((key, value)) = line.split_once(':') {
            // Field lines have an alphabetic key with no spaces, unlike a header line's range.
            if !key.contains(' ') && !key.contains('-') {
                let cur = out.last_mut()?;
                match key {
                    "ShmemPmdMapped" | "FilePmdMapped" => {
                        let kb = value.trim().trim_end_matches("kB").trim();
                        cur.pmd_mapped_kb += kb.parse::<u64>().ok()?;
                    }
                    "VmFlags" => {
                        cur.vm_flags = value.split_whitespace().map(str::to_owned).collect();
                    }
                    _ => {}
                }
                continue;
            }
        }
        out.push(SmapsEntry {
            map: parse_map_line(line)?,
            pmd_mapped_kb: 0,
            vm_flags: Vec::new(),
        });
    }
    Some(out)
}

/// Reads and parses `/proc/<pid>/smaps` (`pid` 0: this process).
pub fn read_smaps(pid: i32) -> Result<Vec<SmapsEntry>, ProcError> {
    let path = proc_path(pid, "smaps");
    let text = read_to_string(&path)?;
    parse_smaps(&text).ok_or(ProcError::Parse {
        path,
        line: "(smaps text)".into(),
    })
}

/// Value in kB of a `Key:   N kB` line of `/proc/<pid>/status`.
pub fn parse_status_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().trim_end_matches("kB").trim().parse().ok())?
    })
}

/// Active swap areas listed in `/proc/swaps` text (the first line is a header).
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Device of the mounted filesystem.
    pub major: u32,
    /// Minor device.
    pub minor: u32,
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type (`tmpfs`, `hugetlbfs`, …).
    pub fstype: String,
    /// Superblock options (where tmpfs shows `huge=`).
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// Value of option `key=` in the superblock options.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.super_options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// Parses one `mountinfo` line.
pub fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let mut right = right.split(' ');
    let fstype = right.next()?.to_owned();
    let _source = right.next()?;
    let super_options = right
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect();
    Some(MountInfo {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point: fields.get(4)?.to_string(),
        fstype,
        super_options,
    })
}

/// The mount holding `file` (matched by device number), from this process's mountinfo.
pub fn mount_of(file: &FileId) -> Result<Option<MountInfo>, ProcError> {
    let path = proc_path(0, "mountinfo");
    let text = read_to_string(&path)?;
    Ok(text
        .lines()
        .filter_map(parse_mountinfo_line)
        .find(|m| m.major == file.major && m.minor == file.minor))
}

/// Reads a small text file (sysfs, procfs).
pub fn read_text(path: &Path) -> Result<String, ProcError> {
    read_to_string(path)
}

/// The selected value of a sysfs multiple-choice file such as `always [never] advise`.
pub fn selected_choice(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_lines_table() {
        // (line, expected (start, end, write, shared, offset, major, minor, inode, path))
        type Row = (
            &'static str,
            Option<(u64, u64, bool, bool, u64, u32, u32, u64, &'static str)>,
        );
        let cases: &[Row] = &[
            // QEMU's shared RAM mapping on tmpfs.
            (
                "7f0000000000-7f0010000000 rw-s 00000000 00:1a 1234   /dev/shm/remus-a.ram",
                Some((
                    0x7f00_0000_0000,
                    0x7f00_1000_0000,
                    true,
                    true,
                    0,
                    0,
                    0x1a,
                    1234,
                    "/dev/shm/remus-a.ram",
                )),
            ),
            // Read-only shared mapping at an offset, path with a space, unlinked.
            (
                "1000-3000 r--s 00002000 fd:01 77 /tmp/my ram (deleted)",
                Some((
                    0x1000,
                    0x3000,
                    false,
                    true,
                    0x2000,
                    0xfd,
                    1,
                    77,
                    "/tmp/my ram (deleted)",
                )),
            ),
            // Anonymous private mapping without a path.
            (
                "55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0 ",
                Some((
                    0x55d0_c000_0000,
                    0x55d0_c002_1000,
                    true,
                    false,
                    0,
                    0,
                    0,
                    0,
                    "",
                )),
            ),
            (
                "55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0",
                Some((
                    0x55d0_c000_0000,
                    0x55d0_c002_1000,
                    true,
                    false,
                    0,
                    0,
                    0,
                    0,
                    "",
                )),
            ),
            // Garbage.
            ("not a maps line", None),
            ("3000-1000 rw-s 0 00:01 1 /x", None), // end before start
            ("1000-2000 rw 0 00:01 1 /x", None),   // short perms
        ];
        for (line, want) in cases {
            let got = parse_map_line(line).map(|e| {
                (
                    e.start,
                    e.end,
                    e.write,
                    e.shared,
                    e.offset,
                    e.major,
                    e.minor,
                    e.inode,
                    e.path.clone(),
                )
            });
            let want = want.map(|w| (w.0, w.1, w.2, w.3, w.4, w.5, w.6, w.7, w.8.to_owned()));
            assert_eq!(got, want, "{line}");
        }
    }

    fn entry(start: u64, end: u64, shared: bool, offset: u64, inode: u64) -> MapEntry {
        MapEntry {
            start,
            end,
            read: true,
            write: true,
            shared,
            offset,
            major: 0,
            minor: 5,
            inode,
            path: "/dev/shm/x".into(),
        }
    }

    #[test]
    fn ram_mapping_selection_table() {
        let file = FileId {
            major: 0,
            minor: 5,
            inode: 9,
            path: "/dev/shm/x".into(),
        };
        let p = PAGE_SIZE as u64;
        // (entries, ram_len, Ok(segment count) or Err(substring))
        let cases: Vec<(Vec<MapEntry>, u64, Result<usize, &str>)> = vec![
            // One mapping of the whole file among others.
            (
                vec![
                    entry(0x10000, 0x10000 + 16 * p, true, 0, 9),
                    entry(0, p, true, 0, 8),
                ],
                16 * p,
                Ok(1),
            ),
            // Split into two VMAs (e.g. after madvise on part of it).
            (
                vec![
                    entry(0x10000, 0x10000 + 4 * p, true, 0, 9),
                    entry(0x10000 + 4 * p, 0x10000 + 16 * p, true, 4 * p, 9),
                ],
                16 * p,
                Ok(2),
            ),
            // Partial last page: 15 pages + 1 byte needs 16 mapped pages.
            (
                vec![entry(0x10000, 0x10000 + 16 * p, true, 0, 9)],
                15 * p + 1,
                Ok(1),
            ),
            // Not mapped at all.
            (vec![entry(0, p, true, 0, 8)], p, Err("does not map")),
            // Private mapping.
            (
                vec![entry(0x10000, 0x10000 + 16 * p, false, 0, 9)],
                16 * p,
                Err("private"),
            ),
            // A hole in the middle.
            (
                vec![
                    entry(0x10000, 0x10000 + 4 * p, true, 0, 9),
                    entry(0x90000, 0x90000 + 8 * p, true, 8 * p, 9),
                ],
                16 * p,
                Err("only bytes 0..16384"),
            ),
        ];
        for (entries, len, want) in cases {
            let got = RamMapping::from_maps(42, &entries, &file, len);
            match (got, want) {
                (Ok(m), Ok(n)) => assert_eq!(m.segments.len(), n),
                (Err(e), Err(s)) => assert!(e.to_string().contains(s), "{e} lacks {s}"),
                (got, want) => panic!("got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn smaps_status_swaps_mountinfo() {
        let smaps = "\
7f0000000000-7f0010000000 rw-s 00000000 00:1a 1234   /dev/shm/r
Size:             262144 kB
ShmemPmdMapped:     2048 kB
FilePmdMapped:         0 kB
VmFlags: rd wr sh mr mw me ms lo sd
7f0020000000-7f0020001000 r--p 00000000 00:00 0
Size:                  4 kB
VmFlags: rd mr mw me
";
        let entries = parse_smaps(smaps).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].pmd_mapped_kb, 2048);
        assert!(entries[0].vm_flags.iter().any(|f| f == "lo"));
        assert_eq!(entries[1].vm_flags, vec!["rd", "mr", "mw", "me"]);
        assert!(
            parse_smaps("Size: 4 kB\n").is_none(),
            "field before any header"
        );

        let status = "Name:\tqemu\nVmLck:\t  262144 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_status_kb(status, "VmLck"), Some(262_144));
        assert_eq!(parse_status_kb(status, "VmPin"), None);

        assert!(parse_swaps("Filename\tType\tSize\tUsed\tPriority\n").is_empty());
        assert_eq!(
            parse_swaps("Filename Type Size Used Priority\n/dev/zram0 partition 100 0 100\n"),
            vec!["/dev/zram0"]
        );

        let mi = parse_mountinfo_line(
            "30 25 0:26 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=100k,huge=within_size,inode64",
        )
        .unwrap();
        assert_eq!((mi.major, mi.minor), (0, 26));
        assert_eq!(mi.mount_point, "/dev/shm");
        assert_eq!(mi.fstype, "tmpfs");
        assert_eq!(mi.option("huge"), Some("within_size"));
        assert_eq!(mi.option("size"), Some("100k"));
        assert_eq!(mi.option("nr_inodes"), None);

        assert_eq!(
            selected_choice("always within_size advise [never] deny force\n"),
            Some("never")
        );
        assert_eq!(selected_choice("no brackets"), None);
    }
}
