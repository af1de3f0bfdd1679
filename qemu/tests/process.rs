//! The QEMU process's lifetime rules, with real QEMU: start-up failures carry QEMU's own
//! words, dropping the handle kills QEMU, and QEMU dies with the process that started it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use remus_qemu::{Accel, ProcessError, QemuProcess, QemuSpec, RunState, VmControl};

/// A QEMU that boots nothing (firmware, no disk): enough to test the process itself.
fn idle_spec(dir: &Path, ram: PathBuf) -> QemuSpec {
    let mut spec = QemuSpec::new("idle", &ram, &dir.join("idle.qmp"));
    spec.accel = Accel::Tcg;
    spec.memory_mib = 32;
    spec
}

/// Whether `pid` is gone (absent, or a zombie nobody reaped yet).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

async fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_missing_binary_is_a_spawn_error() {
    let scratch = Scratch::new("nobin");
    let mut spec = idle_spec(scratch.dir.path(), scratch.shm("ram"));
    spec.binary = "/nonexistent/qemu-system-x86_64".into();
    match QemuProcess::spawn(&spec).await {
        Err(ProcessError::Spawn { binary, .. }) => assert_eq!(binary, spec.binary),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("spawned a missing binary"),
    }
}

#[tokio::test]
async fn a_qemu_that_fails_at_start_up_reports_its_stderr() {
    let scratch = Scratch::new("badarg");
    let mut spec = idle_spec(scratch.dir.path(), scratch.shm("ram"));
    spec.extra_args = vec!["-device".into(), "no-such-device-remus".into()];
    let result = async {
        let mut p = QemuProcess::spawn(&spec).await?;
        p.connect_qmp().await.map(|_| ())
    }
    .await;
    match result {
        Err(ProcessError::ExitedEarly { stderr, status, .. }) => {
            assert!(!status.success());
            assert!(stderr.contains("no-such-device-remus"), "stderr: {stderr}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(()) => panic!("QEMU accepted a bogus device"),
    }
}

#[tokio::test]
async fn dropping_the_handle_kills_qemu() {
    let scratch = Scratch::new("drop");
    let spec = idle_spec(scratch.dir.path(), scratch.shm("ram"));
    let mut p = QemuProcess::spawn(&spec).await.expect("spawn");
    let vm = VmControl::new(p.connect_qmp().await.expect("qmp"));
    assert_eq!(vm.query_status().await.unwrap(), RunState::running);
    let pid = p.pid();
    assert!(!is_dead(pid));
    drop(p);
    assert!(
        wait_dead(pid, Duration::from_secs(5)).await,
        "qemu {pid} survived its handle"
    );
}

const HELPER_ENV: &str = "REMUS_QEMU_TEST_HELPER_DIR";

/// Run only as a child of `qemu_dies_with_the_process_that_started_it`: starts QEMU, writes
/// its pid, then waits to be killed.
#[tokio::test]
#[ignore = "helper process for qemu_dies_with_the_process_that_started_it"]
async fn helper_start_qemu_and_wait() {
    let Some(dir) = std::env::var_os(HELPER_ENV).map(PathBuf::from) else {
        // Run with --include-ignored: this is not a test of its own.
        println!("helper only: started by qemu_dies_with_the_process_that_started_it");
        return;
    };
    // The parent chose the RAM path, so its scratch guard removes the file.
    let ram = std::fs::read_to_string(dir.join("ram-path")).unwrap();
    let spec = idle_spec(&dir, ram.into());
    let mut p = QemuProcess::spawn(&spec).await.expect("spawn");
    let _qmp = p.connect_qmp().await.expect("qmp");
    std::fs::write(dir.join("qemu.pid.tmp"), p.pid().to_string()).unwrap();
    std::fs::rename(dir.join("qemu.pid.tmp"), dir.join("qemu.pid")).unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn qemu_dies_with_the_process_that_started_it() {
    let scratch = Scratch::new("pdeath");
    let dir = scratch.dir.path();
    std::fs::write(dir.join("ram-path"), scratch.shm("ram").to_str().unwrap()).unwrap();
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "helper_start_qemu_and_wait",
            "--nocapture",
        ])
        .env(HELPER_ENV, dir)
        .spawn()
        .expect("starting the helper");
    let pid_file = dir.join("qemu.pid");
    let start = Instant::now();
    let qemu_pid: u32 = loop {
        if let Ok(s) = std::fs::read_to_string(&pid_file) {
            break s.trim().parse().expect("pid");
        }
        if let Ok(Some(status)) = helper.try_wait() {
            panic!("helper exited before starting QEMU: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "helper did not start QEMU"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!is_dead(qemu_pid), "QEMU {qemu_pid} not running");
    helper.kill().expect("SIGKILL to the helper");
    helper.wait().expect("reaping the helper");
    let died = wait_dead(qemu_pid, Duration::from_secs(5)).await;
    if !died {
        // Do not leak it; then fail.
        // SAFETY: plain kill(2) on a pid we just observed.
        unsafe { libc::kill(qemu_pid as libc::pid_t, libc::SIGKILL) };
    }
    assert!(died, "QEMU {qemu_pid} outlived the process that started it");
}
