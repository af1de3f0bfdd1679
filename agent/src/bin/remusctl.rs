//! `remusctl`: the operator's command-line interface.
fn main() -> std::process::ExitCode {
    remus_agent::cli::main()
}
