//! `remusctl`: the operator's command-line interface.
fn main() -> std::process::ExitCode {
    // A reader that goes away (`remusctl status | head`) must end remusctl quietly, as it
    // ends any Unix tool, not make `println!` panic: Rust starts programs with SIGPIPE
    // ignored, so put back the default action (terminate) before anything is printed.
    // SAFETY: first thing in main, before any thread exists; SIG_DFL is a valid disposition
    // for SIGPIPE and installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    remus_agent::cli::main()
}
