//! `remusctl`: argument parsing and dispatch; each subcommand group lives in its own module.
//!
//! Groups are variants of [`Group`]; adding one (netbuf, disk, status…) means a new
//! module with a clap `Subcommand` enum and a `run` method returning an [`ExitCode`], plus
//! one variant here. Exit codes are the same for every command: [`EXIT_OK`] when all went
//! well, [`EXIT_PROBLEMS`] when problems were found or the operation failed, [`EXIT_USAGE`]
//! for bad arguments (clap's own convention).

pub mod config_cmd;
pub mod daemon_cmd;
pub mod domain_cmd;
pub mod keygen_cmd;
pub mod netbuf_cmd;
pub mod status_cmd;
pub mod stream_cmd;

/// `remusd`'s command line (here, not in its `main`, so the man page is generated from it).
#[derive(Debug, Parser)]
#[command(
    name = "remusd",
    version,
    about = "The remus high-availability daemon: protects the QEMU VMs of its policy by continuous checkpointing to its peer, and takes them over when the peer is lost."
)]
pub struct RemusdArgs {
    /// Configuration file.
    #[arg(long, short, default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: std::path::PathBuf,
}

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Success.
pub const EXIT_OK: u8 = 0;
/// Problems found (bad configuration, corrupt stream) or the operation failed.
pub const EXIT_PROBLEMS: u8 = 1;
/// The command line itself was wrong.
pub const EXIT_USAGE: u8 = 2;

/// The operator's command-line interface to remus.
#[derive(Debug, Parser)]
#[command(name = "remusctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Command group.
    #[command(subcommand)]
    pub group: Group,
}

/// Command groups.
#[derive(Debug, Subcommand)]
pub enum Group {
    /// Check protection policies.
    #[command(subcommand)]
    Config(config_cmd::ConfigCmd),
    /// Write domain policies from other tools' definitions (libvirt).
    #[command(subcommand)]
    Domain(domain_cmd::DomainCmd),
    /// Inspect saved replication streams.
    #[command(subcommand)]
    Stream(stream_cmd::StreamCmd),
    /// Inspect and drive a device's network egress buffer by hand.
    #[command(subcommand)]
    Netbuf(netbuf_cmd::NetbufCmd),
    /// Moved: the failover drill is test tooling, run by the `remus-drill` binary (crate
    /// `drill/`) with the same flags. Kept hidden so that `remusctl drill …` says where it
    /// went instead of "unrecognized subcommand".
    #[command(hide = true, disable_help_flag = true)]
    Drill {
        /// Whatever was given; not parsed.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Show the running daemon's state: peer, roles, VMs, epochs, latencies, alarms.
    Status(status_cmd::StatusCmd),
    /// Start a domain's VM on this node and protect it to the peer.
    Start(daemon_cmd::StartCmd),
    /// Hand the primary role of a domain to the peer without losing state (asked of the
    /// primary).
    Switchover(daemon_cmd::DomainCmd),
    /// Force a failover: activate this node's replica of a domain (asked of the backup; the
    /// primary must be gone or abandoned).
    Failover(daemon_cmd::FailoverCmd),
    /// Boot a throwaway, network-isolated copy of a domain's replica to prove it can run
    /// (asked of the backup; nothing else is touched).
    TestActivate(daemon_cmd::DomainCmd),
    /// Compare a protected domain's disks with the backup's replica at committed checkpoints
    /// while the VM runs (asked of the primary); report the regions that differ and, with
    /// --resync, copy them again.
    Verify(daemon_cmd::VerifyCmd),
    /// Re-read the daemon's policy file and apply what changes without restarting a VM
    /// (intervals, ACK deadlines, failover mode, new and removed domains); anything else
    /// refuses the whole reload with file and line, and the running policy stays.
    Reload(daemon_cmd::ReloadCmd),
    /// Make this node's static key pair for `[auth] mode = "keys"` (the private key to a new
    /// owner-only file; the public key printed, for the peer's `[peer] public_keys`).
    Keygen(keygen_cmd::KeygenCmd),
}

/// Parses the process arguments and runs the command.
pub fn main() -> ExitCode {
    run(std::env::args_os())
}

/// Parses `args` (including the program name) and runs the command.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" printed to stdout with success.
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.group {
        Group::Config(cmd) => cmd.run(),
        Group::Domain(cmd) => cmd.run(),
        Group::Stream(cmd) => cmd.run(),
        Group::Drill { args } => {
            eprintln!("{}", drill_moved(&args));
            ExitCode::from(EXIT_USAGE)
        }
        Group::Netbuf(cmd) => cmd.run(),
        Group::Status(cmd) => cmd.run(),
        Group::Start(s) => s.cmd.run(daemon_cmd::Action::Start {
            older_copy: s.older_copy,
        }),
        Group::Switchover(cmd) => cmd.run(daemon_cmd::Action::Switchover),
        Group::Failover(cmd) => cmd.run(),
        Group::TestActivate(cmd) => cmd.run(daemon_cmd::Action::TestActivate),
        Group::Reload(cmd) => cmd.run(),
        Group::Verify(cmd) => cmd.run(),
        Group::Keygen(cmd) => cmd.run(),
    }
}

/// What `remusctl drill ARGS` prints: the drill left the product's CLI for `remus-drill`.
fn drill_moved(args: &[std::ffi::OsString]) -> String {
    let mut cmd = String::from("remus-drill");
    for a in args {
        cmd.push(' ');
        cmd.push_str(&a.to_string_lossy());
    }
    format!(
        "remusctl drill: the failover drill is test tooling and no longer part of remusctl; \
         run `{cmd}` (build it with `cargo build -p remus-drill`, or run scripts/drill.sh)"
    )
}

#[cfg(test)]
mod tests {
    use super::{drill_moved, Cli, Group};
    use clap::Parser;

    #[test]
    fn drill_points_at_remus_drill_with_the_same_arguments() {
        let cli = Cli::try_parse_from(["remusctl", "drill", "--local", "--json", "--seed", "7"])
            .expect("remusctl drill still parses");
        let Group::Drill { args } = cli.group else {
            panic!("parsed as {:?}", cli.group);
        };
        let msg = drill_moved(&args);
        assert!(
            msg.contains("run `remus-drill --local --json --seed 7`"),
            "{msg}"
        );
    }
}
