//! `remusd`: the per-host remus daemon (see `remus_agent::daemon`).
//!
//! Loads and validates the configuration (refusing to start on any error, logging every
//! warning), checks the files it names, then runs the daemon until SIGTERM. Logs go to
//! stderr (journald under systemd); `REMUS_LOG` sets the filter (default `info`).
use std::process::ExitCode;

use clap::Parser;
use remus_agent::cli::RemusdArgs as Args;
use remus_agent::config::Config;

fn main() -> ExitCode {
    // Every file remusd and its QEMU create (replica RAM, device state, roles, WAL, disk
    // replicas, sockets) is the guest's data or decides its fate: readable by root only,
    // whatever umask the daemon was started with (systemd's unit sets 0027; a shell's is
    // usually 0022, which made the replica of guest RAM world-readable).
    // SAFETY: umask(2) only replaces the process's file-creation mask; it cannot fail and
    // touches no memory. Called before any thread or file exists.
    unsafe {
        libc::umask(0o077);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let origin = args.config.display().to_string();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            for d in e.errors.iter().chain(&e.warnings) {
                eprintln!("{d}");
            }
            eprintln!(
                "remusd: refusing to start: {} configuration error(s)",
                e.errors.len()
            );
            return ExitCode::from(1);
        }
    };
    init_logging();
    for d in config.warnings.iter().chain(&config.check_host(&origin)) {
        tracing::warn!("{d}");
    }
    let file_problems = config.check_files(&origin);
    if !file_problems.is_empty() {
        for d in &file_problems {
            eprintln!("{d}");
        }
        eprintln!(
            "remusd: refusing to start: {} missing or unusable file(s)",
            file_problems.len()
        );
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remusd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(remus_agent::daemon::run(config, args.config.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remusd: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Logs to journald natively when systemd connected stderr to the journal
/// (`JOURNAL_STREAM` set): each line then carries its fields as journal fields — `DOMAIN`,
/// `EPOCH`, `ROLE`, `PEER`, … (`journalctl -u remusd DOMAIN=web`) — and its level as
/// `PRIORITY`. Elsewhere, or if the journal socket cannot be reached, text on stderr.
/// `REMUS_LOG` sets the filter either way (default `info`).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("REMUS_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let journald = std::env::var_os("JOURNAL_STREAM").map(|_| tracing_journald::layer());
    match journald {
        Some(Ok(layer)) => {
            // Field names as they are (`DOMAIN=web`), not prefixed with `F_`.
            let layer = layer.with_field_prefix(None);
            let _ = tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .try_init();
        }
        other => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .try_init();
            if let Some(Err(e)) = other {
                tracing::warn!(error = %e, "JOURNAL_STREAM is set but the journal socket is unusable: logging to stderr");
            }
        }
    }
}
