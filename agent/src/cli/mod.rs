//! `remusctl`: argument parsing and dispatch; each subcommand group lives in its own module.
//!
//! Groups are variants of [`Group`]; adding one (netbuf, disk, drill, status…) means a new
//! module with a clap `Subcommand` enum and a `run` method returning an [`ExitCode`], plus
//! one variant here. Exit codes are the same for every command: [`EXIT_OK`] when all went
//! well, [`EXIT_PROBLEMS`] when problems were found or the operation failed, [`EXIT_USAGE`]
//! for bad arguments (clap's own convention).

pub mod config_cmd;
pub mod daemon_cmd;
pub mod drill_cmd;
pub mod netbuf_cmd;
pub mod status_cmd;
pub mod stream_cmd;

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
    /// Inspect saved replication streams.
    #[command(subcommand)]
    Stream(stream_cmd::StreamCmd),
    /// Inspect and drive a device's network egress buffer by hand.
    #[command(subcommand)]
    Netbuf(netbuf_cmd::NetbufCmd),
    /// Run a failover drill: protect a test guest, kill its primary, activate the backup,
    /// and report what was measured and checked.
    Drill(drill_cmd::DrillCmd),
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
        Group::Stream(cmd) => cmd.run(),
        Group::Drill(cmd) => cmd.run(),
        Group::Netbuf(cmd) => cmd.run(),
        Group::Status(cmd) => cmd.run(),
        Group::Start(s) => s.cmd.run(daemon_cmd::Action::Start {
            older_copy: s.older_copy,
        }),
        Group::Switchover(cmd) => cmd.run(daemon_cmd::Action::Switchover),
        Group::Failover(cmd) => cmd.run(),
        Group::TestActivate(cmd) => cmd.run(daemon_cmd::Action::TestActivate),
    }
}
