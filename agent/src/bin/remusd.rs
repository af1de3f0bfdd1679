//! `remusd`: the per-host remus daemon.
//!
//! For now a stub: it loads and validates the configuration exactly as the daemon will,
//! reports problems and warnings, and says that the daemon itself is not implemented yet.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use remus_agent::config::{Config, DEFAULT_CONFIG_PATH};

/// The remus high-availability daemon.
#[derive(Debug, Parser)]
#[command(name = "remusd", version, about)]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

fn main() -> ExitCode {
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
    for d in &config.warnings {
        eprintln!("{d}");
    }
    let file_problems = config.check_files(&origin);
    for d in &file_problems {
        eprintln!("{d}");
    }
    eprintln!(
        "remusd: configuration {origin} is valid ({} domain(s), {} warning(s), {} file problem(s)); \
         the daemon itself is not implemented yet",
        config.domains.len(),
        config.warnings.len(),
        file_problems.len()
    );
    ExitCode::from(1)
}
