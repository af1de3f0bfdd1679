//! `remusctl start|switchover|failover|test-activate DOMAIN` and `remusctl reload`:
//! commands carried out by the running `remusd`, sent over its control socket.
//!
//! Also holds what every daemon-talking command shares ([`DaemonArgs`]: which socket,
//! from `--socket`, the configuration's `[node] control_socket`, or the default).
//! Exit codes: 0 when the daemon answers `done`, 1 when it refuses or fails (its message on
//! stderr) or cannot be reached (the message names the socket), 2 for usage errors,
//! including a forced failover that was not confirmed and cannot be asked for.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE};
use crate::api::{Request, Response};
use crate::config::{Config, ConfigErrors, DEFAULT_CONFIG_PATH};
use crate::control::{ControlClient, DEFAULT_CONTROL_SOCKET};

/// Where the daemon listens.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// The daemon's control socket [default: `[node] control_socket` of the configuration,
    /// or /run/remus/remusd.sock when there is no configuration file].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Configuration file to read the control socket from [default: /etc/remus/remus.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl DaemonArgs {
    /// The socket to connect to. An explicit `--config` must exist and be valid; the default
    /// configuration file may be absent (then the default socket is used), but if present it
    /// must be valid, since its socket may differ from the default.
    ///
    /// # Errors
    /// [`SocketPathError::ConfigUnusable`] when the configuration file to read the socket
    /// from cannot be read or is invalid.
    pub fn socket_path(&self) -> Result<PathBuf, SocketPathError> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        if !explicit && !path.exists() {
            return Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET));
        }
        Config::load(&path)
            .map(|config| config.node.control_socket)
            .map_err(|source| SocketPathError::ConfigUnusable { path, source })
    }
}

impl DaemonArgs {
    /// The socket for `reload`, whose configuration file may well be the broken one the
    /// daemon is about to refuse (and explain, with lines): `--socket`; else the file's
    /// `[node] control_socket` if it can be read as TOML at all; else the default socket.
    pub fn socket_path_lenient(&self) -> PathBuf {
        if let Ok(p) = self.socket_path() {
            return p;
        }
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .and_then(|t| {
                t.get("node")?
                    .get("control_socket")?
                    .as_str()
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET))
    }
}

/// Why [`DaemonArgs::socket_path`] cannot tell which socket to connect to.
#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    /// The configuration file that names the socket cannot be read or is invalid. The
    /// message lists its first problems, since it is all the operator sees.
    #[error(
        "cannot find the control socket: {} is unusable ({} error(s)); fix it or pass --socket{}",
        .path.display(),
        .source.errors.len(),
        first_problems(.source)
    )]
    ConfigUnusable {
        /// The configuration file.
        path: PathBuf,
        /// Its problems.
        #[source]
        source: ConfigErrors,
    },
}

/// How many of a configuration's problems [`SocketPathError`] lists.
const LISTED_PROBLEMS: usize = 5;

/// The first [`LISTED_PROBLEMS`] problems, one per indented line, each after a newline.
fn first_problems(errors: &ConfigErrors) -> String {
    errors
        .errors
        .iter()
        .take(LISTED_PROBLEMS)
        .map(|d| format!("\n  {d}"))
        .collect()
}

/// A command on one domain.
#[derive(Debug, Args)]
pub struct DomainCmd {
    /// The domain.
    pub domain: String,
    /// Seconds to wait for the daemon to finish the command.
    #[arg(long, value_name = "SECONDS", default_value_t = ControlClient::COMMAND_TIMEOUT.as_secs())]
    pub timeout: u64,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// `remusctl verify DOMAIN`.
#[derive(Debug, Args)]
pub struct VerifyCmd {
    /// The domain.
    pub domain: String,
    /// Copy the differing regions to the backup again (they commit with the next checkpoint).
    #[arg(long)]
    pub resync: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the verify to finish.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub timeout: u64,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl VerifyCmd {
    /// Sends the request; prints progress on stderr (from the status, once a second) while
    /// it runs, then the report. Exit 0 when clean, 1 when regions differ (even if
    /// re-copied: run it again to see them pass) or the verify failed.
    pub fn run(self) -> ExitCode {
        let socket = match self.daemon.socket_path() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("remusctl verify: {e}");
                return ExitCode::from(EXIT_PROBLEMS);
            }
        };
        let domain = self.domain.clone();
        let timeout = Duration::from_secs(self.timeout);
        let request = Request::Verify {
            domain: domain.clone(),
            resync: self.resync,
        };
        let answer = block_on("verify", async {
            let mut client = ControlClient::connect(&socket).await?;
            let mut watcher = ControlClient::connect(&socket).await?;
            let ask = client.request_with_timeout(request, timeout);
            tokio::pin!(ask);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last = String::new();
            loop {
                tokio::select! {
                    r = &mut ask => return r,
                    _ = tick.tick() => {
                        let Ok(st) = watcher.status().await else { continue };
                        let line = st
                            .domains
                            .iter()
                            .find(|d| d.name == domain)
                            .and_then(|d| d.verify.as_ref())
                            .and_then(|v| v.running.as_ref())
                            .map(|r| format!(
                                "verify {domain}: {} {}/{} regions, {} differing",
                                r.phase, r.regions_done, r.regions_total, r.differing
                            ));
                        if let Some(line) = line {
                            if line != last {
                                eprintln!("{line}");
                                last = line;
                            }
                        }
                    }
                }
            }
        });
        match answer {
            Err(code) => code,
            Ok(Response::Verified(report)) => {
                if self.json {
                    match serde_json::to_string_pretty(&report) {
                        Ok(j) => println!("{j}"),
                        Err(e) => eprintln!("remusctl verify: {e}"),
                    }
                } else {
                    print!("{}", render_verify(&report));
                }
                if report.differing_count == 0 && report.not_compared.is_empty() {
                    ExitCode::from(EXIT_OK)
                } else {
                    ExitCode::from(EXIT_PROBLEMS)
                }
            }
            Ok(Response::Error { message }) => {
                eprintln!("remusctl verify: {message}");
                ExitCode::from(EXIT_PROBLEMS)
            }
            Ok(other) => {
                eprintln!("remusctl verify: unexpected answer {other:?}");
                ExitCode::from(EXIT_PROBLEMS)
            }
        }
    }
}

/// The human report of a verify.
pub fn render_verify(r: &crate::api::VerifyReport) -> String {
    use crate::api::VerifyReport as R;
    use std::fmt::Write as _;
    let mut out = String::new();
    let verdict = if r.clean() {
        "the replica equals the primary"
    } else {
        "the replica DIFFERS from the primary"
    };
    let _ = writeln!(out, "verify {} (run {}): {verdict}", r.domain, r.run);
    let _ = writeln!(
        out,
        "  regions: {} checked of {}, {} differing, {} not compared (checkpoints {}..={})",
        r.regions_checked,
        r.regions_total,
        r.differing_count,
        r.not_compared.len(),
        r.epochs.0,
        r.epochs.1
    );
    for d in &r.differing {
        let _ = writeln!(
            out,
            "  differs: disk {} bytes {}..{} ({} bytes)",
            d.disk,
            d.offset,
            d.offset + d.length,
            d.length
        );
    }
    for n in &r.not_compared {
        let _ = writeln!(
            out,
            "  not compared ({}): disk {} bytes {}..{}",
            n.why,
            n.region.disk,
            n.region.offset,
            n.region.offset + n.region.length
        );
    }
    let _ = writeln!(
        out,
        "  cost: {} MiB hashed on each side in {} ms ({:.1} MiB/s, paced by the per-checkpoint budget); hashing {} ms inside pauses ({:.1} MiB/s), at most {} us added to a pause",
        r.bytes_hashed >> 20,
        r.elapsed_ms,
        R::rate_mib_s(r.bytes_hashed, r.elapsed_ms),
        r.hash_ms,
        R::rate_mib_s(r.bytes_hashed, r.hash_ms),
        r.max_pause_added_us
    );
    if let Some(f) = r.read_floor {
        let _ = writeln!(
            out,
            "  read floor: {} MiB read in {} ms ({:.1} MiB/s, plain sequential read of the first disk, same run)",
            f.bytes >> 20,
            f.ms,
            R::rate_mib_s(f.bytes, f.ms)
        );
    }
    if let Some(s) = r.resynced {
        let _ = writeln!(
            out,
            "  resynced: {} regions ({} bytes, {} sent as data), committed with checkpoint {}; verify again to see them pass",
            s.regions, s.bytes, s.data_bytes, s.epoch
        );
    }
    out
}

/// `remusctl reload`.
#[derive(Debug, Args)]
pub struct ReloadCmd {
    /// Seconds to wait for the daemon to apply the policy.
    #[arg(long, value_name = "SECONDS", default_value_t = ControlClient::COMMAND_TIMEOUT.as_secs())]
    pub timeout: u64,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl ReloadCmd {
    /// Asks the daemon to re-read its own configuration file (the one it was started with,
    /// not `--config`, which only says where the socket is).
    pub fn run(self) -> ExitCode {
        let socket = self.daemon.socket_path_lenient();
        exchange(
            "reload",
            &socket,
            Request::Reload,
            Duration::from_secs(self.timeout),
        )
    }
}

/// `remusctl start DOMAIN`.
#[derive(Debug, Args)]
pub struct StartCmd {
    #[command(flatten)]
    pub cmd: DomainCmd,
    /// Start from this node's copy even when the peer advertises a newer one (the guest
    /// goes back to this node's copy; what only the peer's copy holds is lost).
    #[arg(long)]
    pub older_copy: bool,
}

/// `remusctl failover DOMAIN`: a forced failover needs the operator's confirmation.
#[derive(Debug, Args)]
pub struct FailoverCmd {
    #[command(flatten)]
    pub cmd: DomainCmd,
    /// Do not ask for confirmation (required when standard input is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

/// Which command a [`DomainCmd`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the VM here and protect it (`older_copy`: even from an older copy).
    Start { older_copy: bool },
    /// Planned handover to the peer.
    Switchover,
    /// Forced failover to this node's replica.
    Failover,
    /// Boot a throwaway copy of the replica.
    TestActivate,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Start { .. } => "start",
            Action::Switchover => "switchover",
            Action::Failover => "failover",
            Action::TestActivate => "test-activate",
        }
    }

    fn request(self, domain: String) -> Request {
        match self {
            Action::Start { older_copy } => Request::Start { domain, older_copy },
            Action::Switchover => Request::Switchover { domain },
            Action::Failover => Request::Failover { domain },
            Action::TestActivate => Request::TestActivate { domain },
        }
    }
}

impl FailoverCmd {
    /// Confirms (unless `--yes`), then runs the failover.
    pub fn run(self) -> ExitCode {
        if !self.yes {
            let domain = &self.cmd.domain;
            if !std::io::stdin().is_terminal() {
                eprintln!(
                    "remusctl failover: refusing to force a failover of {domain} without \
                     confirmation: standard input is not a terminal; pass --yes to confirm"
                );
                return ExitCode::from(EXIT_USAGE);
            }
            eprint!(
                "Forced failover of {domain}: this node's replica will be activated from its \
                 last committed checkpoint.\nThe primary must be gone or abandoned: if its VM \
                 still runs, two copies of the guest will run at once.\n\
                 Type the domain name to confirm: "
            );
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            if let Err(e) = std::io::stdin().lock().read_line(&mut answer) {
                eprintln!("remusctl failover: cannot read the confirmation: {e}");
                return ExitCode::from(EXIT_PROBLEMS);
            }
            if answer.trim() != domain {
                eprintln!("remusctl failover: confirmation did not match `{domain}`; nothing done");
                return ExitCode::from(EXIT_PROBLEMS);
            }
        }
        self.cmd.run(Action::Failover)
    }
}

impl DomainCmd {
    /// Sends the command and reports the daemon's answer.
    pub fn run(self, action: Action) -> ExitCode {
        let name = action.name();
        let socket = match self.daemon.socket_path() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("remusctl {name}: {e}");
                return ExitCode::from(EXIT_PROBLEMS);
            }
        };
        let timeout = Duration::from_secs(self.timeout);
        exchange(name, &socket, action.request(self.domain), timeout)
    }
}

/// Sends `request` to the daemon at `socket` and reports its answer: the message on stdout
/// and exit 0 when done, on stderr and exit 1 when refused or unreachable.
fn exchange(name: &str, socket: &std::path::Path, request: Request, timeout: Duration) -> ExitCode {
    let answer = block_on(name, async {
        let mut client = ControlClient::connect(socket).await?;
        client.request_with_timeout(request, timeout).await
    });
    match answer {
        Err(code) => code,
        Ok(Response::Done { message }) => {
            println!("{message}");
            ExitCode::from(EXIT_OK)
        }
        Ok(Response::Error { message }) => {
            eprintln!("remusctl {name}: {message}");
            ExitCode::from(EXIT_PROBLEMS)
        }
        Ok(Response::Status(_) | Response::DomainConfig(_) | Response::Verified(_)) => {
            eprintln!(
                "remusctl {name}: remusd on {} answered with a report instead of a result",
                socket.display()
            );
            ExitCode::from(EXIT_PROBLEMS)
        }
    }
}

/// Runs a control exchange on a small runtime; a failure is printed and becomes exit 1.
pub(crate) fn block_on<T>(
    name: &str,
    fut: impl std::future::Future<Output = Result<T, crate::control::ControlError>>,
) -> Result<T, ExitCode> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remusctl {name}: cannot start the async runtime: {e}");
            return Err(ExitCode::from(EXIT_PROBLEMS));
        }
    };
    rt.block_on(fut).map_err(|e| {
        eprintln!("remusctl {name}: {e}");
        ExitCode::from(EXIT_PROBLEMS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Diagnostic, Severity};

    #[test]
    fn unusable_config_message_lists_the_first_five_problems() {
        let problem = |line| Diagnostic {
            severity: Severity::Error,
            origin: "/etc/remus/remus.toml".into(),
            line,
            column: 1,
            message: format!("problem {line}"),
        };
        let err = SocketPathError::ConfigUnusable {
            path: "/etc/remus/remus.toml".into(),
            source: ConfigErrors {
                errors: (1..=7).map(problem).collect(),
                warnings: Vec::new(),
            },
        };
        let mut want = "cannot find the control socket: /etc/remus/remus.toml is unusable \
                        (7 error(s)); fix it or pass --socket"
            .to_owned();
        for line in 1..=5 {
            want.push_str(&format!(
                "\n  /etc/remus/remus.toml:{line}:1: error: problem {line}"
            ));
        }
        assert_eq!(err.to_string(), want);
        assert!(std::error::Error::source(&err).is_some());
    }
}
