//! Runs the real-kernel harness for this crate (`tests/kernel-harness/run.sh tracker`): the
//! soft-dirty tracker inside a booted Debian kernel, which has the soft-dirty support this
//! machine's kernel lacks. Both tests must pass there: the check (every store the writer made
//! is collected, the shadow equals RAM after 150 rounds) and its negative control (stores made
//! with pwrite(), invisible to soft-dirty, must be caught as misses).

use std::process::Command;

#[test]
fn soft_dirty_tracker_in_a_real_kernel() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new("bash")
        .arg(root.join("tests/kernel-harness/run.sh"))
        .arg("tracker")
        .current_dir(&root)
        .output()
        .expect("run the kernel harness");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kernel harness failed:\n{stdout}");
    for test in ["tracker-soft-dirty", "tracker-soft-dirty-negative-control"] {
        let verdict = stdout.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(test)).then(|| w.next().unwrap_or("").to_owned())
        });
        assert_eq!(verdict.as_deref(), Some("pass"), "{test}:\n{stdout}");
    }
}
