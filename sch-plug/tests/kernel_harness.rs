//! Runs the real-kernel harness for this crate (`tests/kernel-harness/run.sh sch-plug`):
//! the plug backend's tests against sch_plug inside a booted Debian kernel. The suite fails
//! when the harness fails or the kernel never reports.

use std::process::Command;

#[test]
fn plug_backend_in_a_real_kernel() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new("bash")
        .arg(root.join("tests/kernel-harness/run.sh"))
        .arg("sch-plug")
        .current_dir(&root)
        .output()
        .expect("run the kernel harness");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kernel harness failed:\n{stdout}");
    assert!(
        stdout.contains("plug_hold_release_exact            pass"),
        "{stdout}"
    );
}
