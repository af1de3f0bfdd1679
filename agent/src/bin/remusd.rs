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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REMUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    for d in &config.warnings {
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
    match runtime.block_on(remus_agent::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remusd: {e:#}");
            ExitCode::from(1)
        }
    }
}
