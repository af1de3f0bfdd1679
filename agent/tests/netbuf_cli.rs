//! `remusctl netbuf` against the running kernel, in a real namespace with a real tap: on a
//! kernel without sch_plug (this machine's), setup with the plug backend must fail naming
//! the module; on one with it, it must succeed (the plug's behaviour itself is tested in the
//! kernel harness).

use std::process::Command;

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip runs");
    assert!(st.success(), "ip {args:?} failed");
}

/// Whether the running kernel can create a plug qdisc: asked of the kernel itself, by
/// adding one to `dev` in `ns` with `tc` (and removing it), not read from a config file that
/// may be missing or describe another kernel.
fn kernel_has_sch_plug(ns: &str, dev: &str) -> bool {
    let added = Command::new("ip")
        .args(["-n", ns, "link", "set", dev, "up"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("ip")
            .args([
                "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "plug",
            ])
            .status()
            .expect("tc (iproute2) runs")
            .success();
    if added {
        ip(&[
            "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
        ]);
    }
    added
}

/// The plug backend's setup, on a real tap in a real namespace: on a kernel without
/// sch_plug it must fail naming the module and the device; on a kernel with it, it must
/// succeed. Either way the outcome is asserted.
#[test]
fn setup_with_the_plug_backend_names_the_missing_module() {
    let ns = Netns(format!("rmnb{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "tuntap", "add", "dev", "tapnb0", "mode", "tap"]);
    let has_plug = kernel_has_sch_plug(&ns.0, "tapnb0");
    let out = Command::new(env!("CARGO_BIN_EXE_remusctl"))
        .args([
            "netbuf",
            "setup",
            "--dev",
            "tapnb0",
            "--backend",
            "plug",
            "--netns",
            &ns.0,
        ])
        .output()
        .expect("remusctl runs");
    if has_plug {
        println!("this kernel has sch_plug: the plug backend's setup must succeed");
        assert_eq!(
            out.status.code(),
            Some(0),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("sch_plug"),
        "the error must name sch_plug: {err}"
    );
    assert!(
        err.contains("tapnb0"),
        "the error must name the device: {err}"
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_remusctl"))
        .args([
            "netbuf",
            "setup",
            "--dev",
            "x",
            "--backend",
            "carrier-pigeon",
        ])
        .output()
        .expect("remusctl runs");
    assert_eq!(out.status.code(), Some(2));
}
