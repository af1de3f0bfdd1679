//! iproute2's `ip`, run as a command, for the few set-ups outside the data path: the drills'
//! namespaces, veths and bridges, and a test activation's isolated namespace. The data path
//! (plug qdiscs, taps, IFB redirects) goes over rtnetlink in `sch-plug`; these one-off
//! topologies are clearer as the `ip` lines an operator would type, and their errors quote
//! that line.

use std::process::Command;

use thiserror::Error;

/// An `ip` command that failed.
#[derive(Debug, Error)]
pub enum IpError {
    /// `ip` could not be run at all.
    #[error("running `ip {args}`: {source}")]
    Spawn {
        /// The arguments.
        args: String,
        /// Why.
        source: std::io::Error,
    },
    /// `ip` ran and refused.
    #[error("`ip {args}` failed: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

/// Runs `ip ARGS…` and waits for it.
///
/// # Errors
/// [`IpError`] quoting the command line.
pub fn ip(args: &[&str]) -> Result<(), IpError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| IpError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(IpError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Runs `ip -n NS ARGS…`.
///
/// # Errors
/// As [`ip`].
pub fn ip_in(ns: &str, args: &[&str]) -> Result<(), IpError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_command_quotes_its_line_and_what_ip_said() {
        let err = ip(&["link", "show", "dev", "remus-no-such-dev0"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("`ip link show dev remus-no-such-dev0` failed: ")
                && msg.contains("remus-no-such-dev0"),
            "{msg}"
        );
    }
}
