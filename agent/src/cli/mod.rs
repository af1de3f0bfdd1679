//! `remusctl`: argument parsing and dispatch; each subcommand lives in its own module.
use std::process::ExitCode;

pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
