//! `remusctl config …`: offline checks of protection policies.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::{EXIT_OK, EXIT_PROBLEMS};
use crate::config::{Config, DEFAULT_CONFIG_PATH};

/// `remusctl config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate configuration files; print each problem as FILE:LINE:COL: error|warning: …
    Check {
        /// Files to check.
        #[arg(default_value = DEFAULT_CONFIG_PATH)]
        files: Vec<PathBuf>,
        /// Also check that referenced files exist (key files, kernels, fencing programs), that
        /// the key file is readable by its owner only, and warn when a domain's checkpoint
        /// pause on this host would exceed half its interval: only meaningful on the host that will use the configuration.
        #[arg(long)]
        files_exist: bool,
    },
}

impl ConfigCmd {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            ConfigCmd::Check { files, files_exist } => check(&files, files_exist),
        }
    }
}

fn check(files: &[PathBuf], files_exist: bool) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = false;
    for path in files {
        let origin = path.display().to_string();
        match Config::load(path) {
            Ok(config) => {
                let (file_problems, host_warnings) = if files_exist {
                    (config.check_files(&origin), config.check_host(&origin))
                } else {
                    (Vec::new(), Vec::new())
                };
                for d in config
                    .warnings
                    .iter()
                    .chain(&host_warnings)
                    .chain(&file_problems)
                {
                    let _ = writeln!(out, "{d}");
                }
                if file_problems.is_empty() {
                    let _ = writeln!(
                        out,
                        "{origin}: ok: node {}, peer {}, {} domain(s), {} warning(s)",
                        config.node.name,
                        config.peer.name,
                        config.domains.len(),
                        config.warnings.len() + host_warnings.len()
                    );
                } else {
                    failed = true;
                }
            }
            Err(e) => {
                failed = true;
                let mut all: Vec<_> = e.errors.iter().chain(&e.warnings).collect();
                all.sort_by_key(|d| (d.line, d.column));
                for d in all {
                    let _ = writeln!(out, "{d}");
                }
                let _ = writeln!(out, "{origin}: {} error(s)", e.errors.len());
            }
        }
    }
    ExitCode::from(if failed { EXIT_PROBLEMS } else { EXIT_OK })
}
