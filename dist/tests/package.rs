//! The Debian package, built by `scripts/build-deb.sh` from this workspace's binaries,
//! inspected with `dpkg-deb` and `lintian` (no error allowed), and installed with `dpkg`
//! into a scratch root: the binaries run from there, the unit, the conffile, the man pages
//! and the completions are where Debian expects them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory the suite's build put the binaries in (`target/debug`), built if needed
/// with the same selection the suite uses (`cargo test --workspace --no-run`), so nothing
/// is compiled a second time with other features.
fn bin_dir() -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    if ["remusd", "remusctl", "remus-witness"]
        .iter()
        .any(|b| !dir.join(b).exists())
    {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run(Command::new(cargo)
            .current_dir(workspace())
            .args(["test", "--workspace", "--no-run"]));
    }
    dir
}

#[test]
fn the_package_builds_passes_lintian_and_installs_into_a_scratch_root() {
    let bins = bin_dir();
    // remus-dist is this package's own binary: cargo built it for this test.
    let dist = PathBuf::from(env!("CARGO_BIN_EXE_remus-dist"));
    assert_eq!(dist.parent(), Some(bins.as_path()));
    let tmp = tempfile::tempdir().unwrap();
    let out = run(Command::new("bash")
        .current_dir(workspace())
        .arg("scripts/build-deb.sh")
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(tmp.path()));
    let deb = PathBuf::from(text(&out.stdout).trim());
    assert!(deb.is_file(), "{}", deb.display());

    let info = text(&run(Command::new("dpkg-deb").arg("--info").arg(&deb)).stdout);
    for want in [
        "Package: remus-agent",
        "Depends: libc6",
        "qemu-system-x86",
        "conffiles",
        "md5sums",
    ] {
        assert!(info.contains(want), "dpkg-deb --info lacks {want}:\n{info}");
    }

    // lintian exits non-zero on any error-level tag; warnings are printed for the log.
    let lint = Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&deb)
        .output()
        .expect("lintian is installed by scripts/install-deps.sh");
    println!("lintian: {}{}", text(&lint.stdout), text(&lint.stderr));
    assert!(
        lint.status.success(),
        "lintian found errors:\n{}",
        text(&lint.stdout)
    );

    // Install into a scratch root with its own dpkg database.
    let root = tmp.path().join("root");
    let db = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(db.join(d)).unwrap();
    }
    std::fs::write(db.join("status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends", "--force-script-chrootless", "--install"])
        .arg(&deb));
    for f in [
        "usr/sbin/remusd",
        "usr/sbin/remus-witness",
        "usr/bin/remusctl",
        "lib/systemd/system/remusd.service",
        "etc/remus/remus.toml",
        "usr/share/man/man8/remusd.8.gz",
        "usr/share/man/man8/remus-witness.8.gz",
        "usr/share/man/man1/remusctl.1.gz",
        "usr/share/man/man1/remusctl-config-check.1.gz",
        "usr/share/man/man1/remusctl-domain-import.1.gz",
        "usr/share/bash-completion/completions/remusctl",
        "usr/share/zsh/vendor-completions/_remusctl",
        "usr/share/fish/vendor_completions.d/remusctl.fish",
        "usr/share/doc/remus-agent/copyright",
        "usr/share/doc/remus-agent/operations.md",
        "usr/share/doc/remus-agent/examples/full.toml",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let status = std::fs::read_to_string(db.join("status")).unwrap();
    assert!(
        status.contains("Status: install ok installed")
            && status.contains("Conffiles:\n /etc/remus/remus.toml"),
        "dpkg status:\n{status}"
    );

    // The installed programs run and say who they are.
    for (bin, name) in [
        ("usr/sbin/remusd", "remusd"),
        ("usr/sbin/remus-witness", "remus-witness"),
        ("usr/bin/remusctl", "remusctl"),
    ] {
        let v = text(&run(Command::new(root.join(bin)).arg("--version")).stdout);
        assert!(v.starts_with(name), "{bin} --version: {v}");
    }
    // The unit runs the installed paths; the example policy passes the checker.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/remusd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/remusd --config /etc/remus/remus.toml"));
    assert!(unit.contains("ExecStartPre=/usr/bin/remusctl config check"));
    let check = Command::new(root.join("usr/bin/remusctl"))
        .args(["config", "check"])
        .arg(root.join("etc/remus/remus.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check.stdout));
    // A man page generated from the clap definitions documents a real flag.
    let man = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {}",
        root.join("usr/share/man/man1/remusctl-config-check.1.gz")
            .display()
    )));
    assert!(
        text(&man.stdout).contains("files\\-exist"),
        "{}",
        text(&man.stdout)
    );
    let man = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {}",
        root.join("usr/share/man/man1/remusctl-domain-import.1.gz")
            .display()
    )));
    assert!(
        text(&man.stdout).contains("libvirt\\-xml"),
        "{}",
        text(&man.stdout)
    );
}
