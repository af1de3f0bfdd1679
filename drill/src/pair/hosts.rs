//! The pair drill's processes: finding the `remusd` and `remus-witness` binaries, starting
//! them inside a host's network namespace in a process group of their own, killing a whole
//! host (the group) at once, and checking from `/proc` what really still runs.
//!
//! Invariants, and why:
//! - every process is the leader of its own process group (`ip netns exec` execs the program,
//!   so the leader is the daemon itself); a host "dies" by SIGKILL to the group, which takes
//!   the daemon and every child that did not leave the group (QEMU also dies with its
//!   daemon by its parent-death signal) at the same instant, as a power cut would;
//! - dropping a [`Proc`] kills its group: a drill that fails half-way never leaves daemons
//!   or QEMUs running;
//! - whether a VM still runs is never taken from a daemon that cannot answer: the drill looks
//!   at `/proc` itself ([`qemu_pids_under`], [`pid_alive`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// A process-control step that failed.
#[derive(Debug, Error)]
pub enum HostError {
    /// A binary the pair drill runs was found nowhere.
    #[error(
        "pair drill: `{name}` not found next to {exe} nor in PATH (build it: cargo build -p {package} --bin {name})"
    )]
    MissingBinary {
        /// The binary.
        name: &'static str,
        /// Its crate.
        package: &'static str,
        /// The current executable's path.
        exe: String,
    },
    /// A log file could not be opened.
    #[error("pair drill: log file {path}: {source}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("pair drill: starting {what} in namespace {netns}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// The namespace.
        netns: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process group could not be signalled, or did not die.
    #[error("pair drill: killing {what} (process group {pgid}): {reason}")]
    Kill {
        /// Which process.
        what: String,
        /// Its group.
        pgid: u32,
        /// Why.
        reason: String,
    },
}

/// The binaries the pair drill runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The daemon (crate `remus-agent`).
    pub remusd: PathBuf,
    /// The witness (crate `remus-ha`).
    pub witness: PathBuf,
}

impl Binaries {
    /// Looks for both next to the current executable (and in its parent directory, where
    /// cargo puts binaries when the current executable is a test in `deps/`), then in `PATH`.
    ///
    /// # Errors
    /// [`HostError::MissingBinary`] naming the first one missing and how to build it.
    pub fn locate() -> Result<Self, HostError> {
        let exe = std::env::current_exe().unwrap_or_default();
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(d) = exe.parent() {
            dirs.push(d.to_path_buf());
            if let Some(up) = d.parent() {
                dirs.push(up.to_path_buf());
            }
        }
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        Ok(Self {
            remusd: find_in(&dirs, &path_dirs, "remusd", "remus-agent", &exe)?,
            witness: find_in(&dirs, &path_dirs, "remus-witness", "remus-ha", &exe)?,
        })
    }
}

fn find_in(
    near: &[PathBuf],
    path: &[PathBuf],
    name: &'static str,
    package: &'static str,
    exe: &Path,
) -> Result<PathBuf, HostError> {
    near.iter()
        .chain(path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| HostError::MissingBinary {
            name,
            package,
            exe: exe.display().to_string(),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A process of the drill, leader of its own process group, inside a network namespace.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for errors and logs ("remusd pri", "witness").
    what: String,
    child: Child,
    /// Its pid, which is also its process group id.
    pid: u32,
    /// Where its stdout and stderr go.
    log: PathBuf,
}

impl Proc {
    /// Starts `program args…` in namespace `netns` (through `ip netns exec`), in a new
    /// process group, with `env` added, stdout and stderr appended to `log` after a header
    /// line (so restarts of one daemon share one log, in order).
    ///
    /// # Errors
    /// [`HostError::Log`], [`HostError::Spawn`].
    pub fn spawn(
        what: &str,
        netns: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Self, HostError> {
        let log_err = |source| HostError::Log {
            path: log.to_path_buf(),
            source,
        };
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_err)?;
        let _ = writeln!(
            out,
            "=== pair drill: starting {what} in {netns}: {} {} (env {env:?}) ===",
            program.display(),
            args.join(" ")
        );
        let err = out.try_clone().map_err(log_err)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| HostError::Spawn {
            what: what.to_string(),
            netns: netns.to_string(),
            source,
        })?;
        Ok(Self {
            what: what.to_string(),
            pid: child.id(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Its pid (and process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it still runs (it has not exited; a zombie is reaped here).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the whole process group and waits until no member is left (bounded).
    ///
    /// # Errors
    /// [`HostError::Kill`] when the signal cannot be sent or members outlive the wait.
    pub fn kill_group(&mut self) -> Result<(), HostError> {
        let pgid = self.pid;
        let fail = |reason: String| HostError::Kill {
            what: self.what.clone(),
            pgid,
            reason,
        };
        // `kill` with a negative pid signals the group (no libc binding in this crate).
        let st = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status()
            .map_err(|e| fail(format!("running kill: {e}")))?;
        let _ = self.child.wait();
        if !st.success() && !group_members(pgid).is_empty() {
            return Err(fail(format!("kill exited {st}")));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = group_members(pgid);
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(fail(format!("still alive after 5 s: pids {left:?}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !group_members(self.pid).is_empty() || self.running() {
            if let Err(e) = self.kill_group() {
                tracing::warn!(error = %e, "pair drill: cleanup");
            }
        }
    }
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, pgrp.
fn stat_of(pid: u32) -> Option<(char, u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    stat_of(pid).is_some_and(|(state, _, _)| state != 'Z' && state != 'X')
}

/// Whether `pid` is a live QEMU process (alive, not a zombie, and its command name is
/// QEMU's: a pid reused by an unrelated process after the VM died does not count).
pub fn qemu_alive(pid: u32) -> bool {
    pid_alive(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu"))
}

/// What `pid` is now, for reports: its command name and state, or "gone".
pub fn describe_pid(pid: u32) -> String {
    match (
        stat_of(pid),
        std::fs::read_to_string(format!("/proc/{pid}/comm")),
    ) {
        (Some((state, ppid, pgrp)), Ok(comm)) => {
            format!("{} (state {state}, ppid {ppid}, pgrp {pgrp})", comm.trim())
        }
        _ => "gone".to_string(),
    }
}

/// Live (non-zombie) members of process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat_of(p).is_some_and(|(st, _, g)| g == pgid && st != 'Z' && st != 'X'))
        .collect()
}

/// Live QEMU processes whose command line mentions `marker` (a node's run directory: every
/// QEMU a daemon starts has its QMP socket and console there). This is how the drill knows
/// whether a node runs a VM when its daemon cannot be asked.
pub fn qemu_pids_under(marker: &Path) -> Vec<u32> {
    let marker = marker.as_os_str().as_encoded_bytes();
    all_pids()
        .into_iter()
        .filter(|&p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            if !comm.starts_with("qemu") {
                return false;
            }
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            pid_alive(p) && cmd.windows(marker.len().max(1)).any(|w| w == marker)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_dies_whole_and_proc_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let ns = format!("rpairt{}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &ns]).status();
        if !ok.is_ok_and(|s| s.success()) {
            panic!("this test needs root and iproute2 (ip netns add {ns} failed)");
        }
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let _del = Del(ns.clone());
        let log = dir.path().join("p.log");
        // A leader with a child in its group (the shape of remusd + QEMU).
        let mut p = Proc::spawn(
            "sleeper",
            &ns,
            Path::new("/bin/sh"),
            &["-c".into(), "sleep 60 & echo child $!; wait".into()],
            &[("X".into(), "1".into())],
            &log,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_members(p.pid()).len() < 2 {
            assert!(Instant::now() < deadline, "the child never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.running());
        assert!(pid_alive(p.pid()));
        p.kill_group().unwrap();
        assert!(group_members(p.pid()).is_empty());
        assert!(!pid_alive(p.pid()));
        assert!(!p.running());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("=== pair drill: starting sleeper"), "{text}");
        assert!(text.contains("child "), "{text}");
    }

    #[test]
    fn missing_binaries_are_named() {
        let e = find_in(&[], &[], "remusd", "remus-agent", Path::new("/x/y")).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("remusd") && m.contains("cargo build -p remus-agent"),
            "{m}"
        );
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("remusd");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        // Not executable: not taken.
        assert!(find_in(&[dir.path().into()], &[], "remusd", "p", Path::new("/x")).is_err());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_in(&[dir.path().into()], &[], "remusd", "p", Path::new("/x")).unwrap(),
            bin
        );
    }

    #[test]
    fn stat_parses_names_with_spaces_and_parens() {
        // Our own process: alive, its group is some group.
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(stat_of(me).is_some());
        assert!(!pid_alive(u32::MAX - 1));
        // This test process is no QEMU, and a missing pid is described as gone.
        assert!(!qemu_alive(me));
        assert_eq!(describe_pid(u32::MAX - 1), "gone");
        assert!(describe_pid(me).contains("state"), "{}", describe_pid(me));
    }
}
