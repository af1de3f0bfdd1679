//! remus-guest: the workload inside the test guest, i.e. the state remus-agent protects.
//!
//! A counter lives in RAM; every increment is first appended to a log on the guest's raw disk
//! (see [`disklog`]), then set in memory. After a failover the process simply continues in the
//! restored RAM: the counter must continue from the checkpointed value, and memory and disk
//! must agree. Modes:
//! - `ticker`: increment every `--interval-ms` and print `counter=<n>` on the console; every
//!   `--check-every` ticks also print `check ok mem=<m> disk=<d>` (or `check mismatch ...`);
//! - `service`: the TCP service of [`service`] on `--port`;
//! - `both`: the two at once, sharing the counter.
//!
//! On a fresh boot the counter starts from the last record of the disk log, so a reboot does
//! not reset it.

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use remus_guest::counter::Counter;
use remus_guest::disklog::DiskLog;
use remus_guest::service;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ticker,
    Service,
    Both,
}

#[derive(Debug)]
struct Args {
    mode: Mode,
    interval_ms: u64,
    check_every: u64,
    disk: String,
    port: u16,
    log_slots: u64,
}

const USAGE: &str = "usage: remus-guest [--mode ticker|service|both] [--interval-ms N] \
[--check-every N] [--disk PATH] [--port N] [--log-slots N]";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        mode: Mode::Both,
        interval_ms: 100,
        check_every: 10,
        disk: "/dev/vda".into(),
        port: 7000,
        log_slots: 8192,
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--mode" => {
                a.mode = match value()?.as_str() {
                    "ticker" => Mode::Ticker,
                    "service" => Mode::Service,
                    "both" => Mode::Both,
                    m => return Err(format!("--mode {m:?}: expected ticker, service or both")),
                }
            }
            "--interval-ms" => a.interval_ms = number(value()?)?.max(1),
            "--check-every" => a.check_every = number(value()?)?,
            "--disk" => a.disk = value()?,
            "--port" => {
                let v = value()?;
                a.port = v.parse().map_err(|e| format!("--port {v:?}: {e}"))?;
            }
            "--log-slots" => a.log_slots = number(value()?)?.max(1),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn ticker(counter: &Counter, interval: Duration, check_every: u64) {
    // Ticks left until the next check line.
    let mut until_check = check_every;
    loop {
        thread::sleep(interval);
        let line = match counter.increment() {
            Ok(v) => format!("counter={v}"),
            Err(e) => format!("error {e}"),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        until_check = until_check.saturating_sub(1);
        if check_every > 0 && until_check == 0 {
            until_check = check_every;
            let check = match counter.check() {
                Ok(c) => c.line(),
                Err(e) => format!("error {e}"),
            };
            let _ = writeln!(out, "check {check}");
        }
        let _ = out.flush();
    }
}

fn run(args: Args) -> Result<(), String> {
    let log = DiskLog::open(&args.disk, args.log_slots).map_err(|e| e.to_string())?;
    let slots = log.slots();
    let counter = Arc::new(Counter::recover(log).map_err(|e| e.to_string())?);
    println!(
        "remus-guest: start mode={:?} recovered={} slots={slots}",
        args.mode,
        counter.get()
    );
    let service = if args.mode != Mode::Ticker {
        let listener = TcpListener::bind(("0.0.0.0", args.port))
            .map_err(|e| format!("listen on port {}: {e}", args.port))?;
        println!("remus-guest: listening on port {}", args.port);
        let counter = counter.clone();
        Some(thread::spawn(move || service::serve(listener, counter)))
    } else {
        None
    };
    if args.mode != Mode::Service {
        ticker(
            &counter,
            Duration::from_millis(args.interval_ms),
            args.check_every,
        );
    }
    if let Some(service) = service {
        match service.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("service: {e}")),
            Err(_) => return Err("service thread panicked".into()),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("remus-guest: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remus-guest: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn arguments_parse_or_fail_clearly() {
        let a = args("--mode ticker --interval-ms 50 --disk /dev/vdb --port 7001").unwrap();
        assert_eq!(a.mode, Mode::Ticker);
        assert_eq!(a.interval_ms, 50);
        assert_eq!(a.disk, "/dev/vdb");
        assert_eq!(a.port, 7001);
        // (arguments, fragment of the expected error)
        let bad = [
            ("--mode fast", "expected ticker"),
            ("--interval-ms", "needs a value"),
            ("--port 70000", "--port"),
            ("--bogus", "unknown argument"),
        ];
        for (line, want) in bad {
            let err = args(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn service_answers_and_survives_restart_from_the_log() {
        let dir = std::env::temp_dir().join(format!("remus-guest-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let disk = dir.join("disk");
        std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
        let path = disk.to_str().unwrap();
        let c = Counter::recover(DiskLog::open(path, 16).unwrap()).unwrap();
        assert_eq!(service::answer(&c, "GET\n"), "0");
        for want in 1..=40u64 {
            // 40 increments wrap the 16-slot ring more than twice.
            assert_eq!(service::answer(&c, "INC\n"), want.to_string());
        }
        assert_eq!(service::answer(&c, "CHECK\n"), "ok mem=40 disk=40");
        assert!(service::answer(&c, "NOPE\n").starts_with("err unknown request"));
        drop(c);
        let c = Counter::recover(DiskLog::open(path, 16).unwrap()).unwrap();
        assert_eq!(service::answer(&c, "GET"), "40", "a reboot must not reset");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
