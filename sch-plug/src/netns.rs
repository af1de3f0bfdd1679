//! Running a piece of code inside a network namespace.
//!
//! Netlink sockets, tap devices and packet sockets belong to the namespace of the thread that
//! created them, and keep it wherever they are used afterwards. So the only thing that must
//! happen inside the namespace is the *creation*: [`in_netns`] runs a closure on a fresh
//! thread that first `setns`es into the namespace, and hands the result (typically an fd)
//! back. The caller's threads never change namespace, so a tokio runtime is never confused.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// A network namespace, by the path of its nsfs file (`/run/netns/NAME`,
/// `/proc/PID/ns/net`), or the caller's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Netns(pub Option<PathBuf>);

impl Netns {
    /// The caller's own namespace.
    pub fn current() -> Self {
        Self(None)
    }

    /// The namespace named `name` by iproute2 (`/run/netns/NAME`).
    pub fn named(name: &str) -> Self {
        Self(Some(Path::new("/run/netns").join(name)))
    }

    /// The namespace at an nsfs path.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        Self(Some(path.into()))
    }

    /// Runs `f` with this namespace as the thread's network namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        in_netns(self.0.as_deref(), f)
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("the current netns"),
            Some(p) => write!(f, "netns {}", p.display()),
        }
    }
}

/// Runs `f` on a thread whose network namespace is `ns` (or directly, if `ns` is `None`).
pub fn in_netns<T: Send>(
    ns: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let Some(ns) = ns else { return f() };
    let file = File::open(ns)
        .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", ns.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("setns into {}: {e}", ns.display())))?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}
