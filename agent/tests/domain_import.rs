//! `remusctl domain import` on definitions made at test time by the real libvirt tools
//! (`virsh` of libvirt-clients, `virt-install` of virtinst; scripts/install-deps.sh installs
//! both), through libvirt's test driver (`test:///default`: no daemon, nothing defined).
//! Each imported block is appended to a real policy and checked by the real
//! `remusctl config check`. A tool that cannot run fails the test and says why: these
//! tests never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn remusctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_remusctl"))
        .args(args)
        .output()
        .expect("run remusctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a libvirt tool and returns its stdout; fails the test if it cannot run or fails.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{program}` ({e}): install it with scripts/install-deps.sh \
             (Debian packages libvirt-clients and virtinst)"
            )
        });
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `virt-install --connect test:///default --print-xml --osinfo linux2022 --import ARGS`.
fn virt_install(args: &[&str]) -> String {
    let mut all = vec![
        "--connect",
        "test:///default",
        "--print-xml",
        "--osinfo",
        "linux2022",
        "--import",
    ];
    all.extend_from_slice(args);
    tool("virt-install", &all)
}

fn minimal_policy() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/minimal.toml");
    std::fs::read_to_string(&p).expect("read configs/minimal.toml")
}

/// `remusctl config check` on `policy`; returns its report after asserting it passed.
fn config_check_passes(dir: &Path, policy: &str) -> String {
    let path = dir.join("remus.toml");
    std::fs::write(&path, policy).unwrap();
    let out = remusctl(&["config", "check", path.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "config check refused the policy:\n{report}\n---\n{policy}"
    );
    report
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn virsh_test_domain_imports_into_a_policy_that_passes_config_check() {
    let tmp = tempfile::tempdir().unwrap();
    let xml = tool("virsh", &["-c", "test:///default", "dumpxml", "test"]);
    let file = write(tmp.path(), "test.xml", &xml);
    let file = file.to_str().unwrap();

    // Its NIC is on libvirt network `default`: refused until the bridge is named.
    let out = remusctl(&["domain", "import", "--libvirt-xml", file]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let refused: Vec<&str> = err.lines().filter(|l| l.contains(": refused: ")).collect();
    assert_eq!(refused.len(), 1, "{err}");
    assert!(
        refused[0].starts_with(&format!("{file}:"))
            && refused[0].contains("interface aa:bb:cc:dd:ee:ff (type network)")
            && refused[0].contains("--network-bridge default="),
        "{err}"
    );

    let out = remusctl(&[
        "domain",
        "import",
        "--libvirt-xml",
        file,
        "--network-bridge",
        "default=br0",
    ]);
    let block = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for want in [
        "[[domain]]\nname = \"test\"",
        "memory_mib = 8192",
        "vcpus = 2",
        "boot_disk = \"vda\"",
        "image = \"/guest/diskimage1\"",
        "replica = \"/guest/diskimage1.replica\"",
        "mac = \"aa:bb:cc:dd:ee:ff\"",
        "bridge = \"br0\"",
        "mode = \"witness\"",
    ] {
        assert!(block.contains(want), "no `{want}` in:\n{block}");
    }
    // The documented way to use it: append to a policy (here the shipped minimal one, plus
    // the witness the default fencing needs).
    let policy = format!(
        "{}\n[witness]\naddress = \"192.0.2.13:7790\"\n\n{block}",
        minimal_policy()
    );
    let report = config_check_passes(tmp.path(), &policy);
    assert!(report.contains("2 domain(s), 0 warning(s)"), "{report}");
}

#[test]
fn virt_install_definition_with_raw_disks_cdrom_and_bridge_nic_is_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root.img");
    let data = tmp.path().join("data.img");
    for f in [&root, &data] {
        std::fs::File::create(f).unwrap().set_len(1 << 20).unwrap();
    }
    let disk_root = format!("path={},driver.type=raw,bus=virtio", root.display());
    let disk_data = format!("path={},driver.type=raw,bus=sata", data.display());
    let xml = virt_install(&[
        "--name",
        "Shop",
        "--memory",
        "768",
        "--vcpus",
        "2",
        "--disk",
        &disk_root,
        "--disk",
        &disk_data,
        "--disk",
        "device=cdrom,bus=sata",
        "--network",
        "bridge=br0,mac=52:54:00:12:34:10,model=virtio",
        "--graphics",
        "none",
        "--boot",
        "kernel=/boot/vmlinuz,initrd=/boot/initrd.img,kernel_args=console=ttyS0",
    ]);
    let file = write(tmp.path(), "shop.xml", &xml);
    let file = file.to_str().unwrap();
    let block_path = tmp.path().join("shop.toml");
    let replicas = tmp.path().join("replicas");
    let out = remusctl(&[
        "domain",
        "import",
        "--libvirt-xml",
        file,
        "--output",
        block_path.to_str().unwrap(),
        "--replica-dir",
        replicas.to_str().unwrap(),
        "--fence-command",
        "/usr/local/sbin/fence-peer beta",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(out.stdout.is_empty(), "--output writes the file only");
    // The changes are told, one note each, with the file and line.
    for want in [
        ": note: disk sda: bus sata becomes virtio-blk",
        ": note: cdrom sdb: empty drive dropped",
    ] {
        assert!(err.contains(want), "no `{want}` in:\n{err}");
    }
    let block = std::fs::read_to_string(&block_path).unwrap();
    for want in [
        "name = \"shop\"".to_owned(),
        "memory_mib = 768".to_owned(),
        "kernel = \"/boot/vmlinuz\"".to_owned(),
        "initrd = \"/boot/initrd.img\"".to_owned(),
        "cmdline = \"console=ttyS0\"".to_owned(),
        format!("image = \"{}\"", root.display()),
        format!("replica = \"{}/shop-vda.replica\"", replicas.display()),
        format!("replica = \"{}/shop-sda.replica\"", replicas.display()),
        "mac = \"52:54:00:12:34:10\"".to_owned(),
        "command = [\"/usr/local/sbin/fence-peer\", \"beta\"]".to_owned(),
    ] {
        assert!(block.contains(&want), "no `{want}` in:\n{block}");
    }
    // Command fencing needs no witness: the minimal policy as shipped takes it.
    let report = config_check_passes(tmp.path(), &format!("{}\n{block}", minimal_policy()));
    assert!(report.contains("2 domain(s)"), "{report}");

    // --output never replaces a file.
    let out = remusctl(&[
        "domain",
        "import",
        "--libvirt-xml",
        file,
        "--output",
        block_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("an existing file is never replaced"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&block_path).unwrap(), block);
}

#[test]
fn virt_install_definition_with_pass_through_is_refused_one_line_per_device() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root.img");
    let data = tmp.path().join("data.qcow2");
    for f in [&root, &data] {
        std::fs::File::create(f).unwrap().set_len(1 << 20).unwrap();
    }
    let disk_root = format!("path={},driver.type=raw,bus=virtio", root.display());
    let disk_data = format!("path={},driver.type=qcow2,bus=virtio", data.display());
    let xml = virt_install(&[
        "--name",
        "db",
        "--memory",
        "1024",
        "--disk",
        &disk_root,
        "--disk",
        &disk_data,
        "--network",
        "bridge=br0,mac=52:54:00:12:34:20",
        "--network",
        "type=direct,source=eth0,source.mode=bridge,mac=52:54:00:12:34:21",
        "--hostdev",
        "type=pci,address.type=pci,address.domain=0,address.bus=0,address.slot=0x19,address.function=0,alias.name=ua-gpu",
    ]);
    let file = write(tmp.path(), "db.xml", &xml);
    let file = file.to_str().unwrap();
    let out = remusctl(&["domain", "import", "--libvirt-xml", file]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        out.stdout.is_empty(),
        "nothing printed for a refused domain"
    );
    let refused: Vec<&str> = err.lines().filter(|l| l.contains(": refused: ")).collect();
    let line_of = |needle: &str| {
        xml.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("`{needle}` not in the definition:\n{xml}"))
            + 1
    };
    let want = [
        (
            line_of("<driver type=\"qcow2\"/>") - 1,
            format!("disk vdb ({}): format qcow2", data.display()),
        ),
        (
            line_of("<interface type=\"direct\">"),
            "interface 52:54:00:12:34:21 (type direct): macvtap".to_owned(),
        ),
        (
            line_of("<hostdev"),
            "hostdev ua-gpu (pci): pass-through of a host device".to_owned(),
        ),
    ];
    assert_eq!(refused.len(), want.len(), "{err}");
    for (line, (at, what)) in refused.iter().zip(&want) {
        let prefix = format!("{file}:{at}: refused: {what}");
        assert!(line.starts_with(&prefix), "`{line}` is not `{prefix}…`");
    }
    assert!(
        err.contains("libvirt domain `db` not imported: 3 problem(s)"),
        "{err}"
    );
}
