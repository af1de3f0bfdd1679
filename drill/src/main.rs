//! `remus-drill`: run a failover drill and report what it measured and checked.
fn main() -> std::process::ExitCode {
    remus_drill::cli::main()
}
