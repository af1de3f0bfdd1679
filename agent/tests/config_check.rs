//! `remusctl config check` run as a real process on real files: exit codes and the line
//! (and column) each problem is reported at.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn remusctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_remusctl"))
        .args(args)
        .output()
        .expect("run remusctl")
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn minimal() -> String {
    std::fs::read_to_string(configs_dir().join("minimal.toml")).expect("read minimal.toml")
}

/// Line (1-based) of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in config"))
        + 1
}

#[test]
fn shipped_configs_pass() {
    let dir = configs_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "expected minimal.toml and full.toml, got {files:?}"
    );
    let args: Vec<&str> = ["config", "check"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let out = remusctl(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in &files {
        assert!(
            stdout.contains(&format!("{f}: ok")),
            "{f} not reported ok:\n{stdout}"
        );
    }
}

/// Each row: a name, how to break the minimal config, the text whose line must be named,
/// and a fragment of the expected message.
#[test]
fn broken_configs_name_the_line() {
    type Break = fn(&str) -> String;
    let cases: Vec<(&str, Break, &str, &str)> = vec![
        (
            "unknown key",
            |t| {
                t.replacen(
                    "name = \"alpha\"",
                    "name = \"alpha\"\nlisen = \"0.0.0.0:7780\"",
                    1,
                )
            },
            "lisen =",
            "unknown field `lisen`",
        ),
        (
            "bad vm_netns",
            |t| {
                t.replacen(
                    "name = \"alpha\"",
                    "name = \"alpha\"\nvm_netns = \"../x\"",
                    1,
                )
            },
            "vm_netns =",
            "node.vm_netns",
        ),
        (
            "syntax error",
            |t| {
                t.replacen(
                    "address = \"192.0.2.12:7780\"",
                    "address = \"192.0.2.12:7780",
                    1,
                )
            },
            "address = \"192.0.2.12:7780",
            "syntax:",
        ),
        (
            "bad address",
            |t| {
                t.replacen(
                    "address = \"192.0.2.12:7780\"",
                    "address = \"192.0.2.300:7780\"",
                    1,
                )
            },
            "192.0.2.300",
            "bad address `192.0.2.300:7780`",
        ),
        (
            "zero interval",
            |t| {
                t.replacen(
                    "name = \"web\"",
                    "name = \"web\"\ncheckpoint_interval_ms = 0",
                    1,
                )
            },
            "checkpoint_interval_ms = 0",
            "out of range",
        ),
        (
            "ACK wait cap below the ACK timeout",
            |t| {
                t.replacen(
                    "name = \"web\"",
                    "name = \"web\"\nack_timeout_ms = 5000\nack_wait_max_ms = 1000",
                    1,
                )
            },
            "ack_wait_max_ms = 1000",
            "must not be below ack_timeout_ms",
        ),
        (
            "negative interval",
            |t| format!("{t}\n[heartbeat]\ninterval_ms = -100\n"),
            "interval_ms = -100",
            "-100",
        ),
        (
            "timeout not above twice the interval",
            |t| format!("{t}\n[heartbeat]\ninterval_ms = 100\ntimeout_ms = 200\n"),
            "timeout_ms = 200",
            "must exceed 2 x heartbeat.interval_ms",
        ),
        (
            "bad MAC",
            |t| t.replacen("52:54:00:12:34:56", "52:54:00:12:34", 1),
            "mac =",
            "not a MAC address",
        ),
        (
            "empty fencing command",
            |t| {
                t.replacen(
                    "command = [\"/usr/local/sbin/fence-peer\", \"beta\"]",
                    "command = []",
                    1,
                )
            },
            "command = []",
            "fencing.command is empty",
        ),
        (
            "duplicate NIC id",
            |t| {
                format!("{t}\n[[domain.nic]]\nid = \"net0\"\nmac = \"52:54:00:00:00:09\"\nbridge = \"br1\"\n")
            },
            "id = \"net0\"\nmac = \"52:54:00:00:00:09\"",
            "duplicate NIC id `net0`",
        ),
        (
            "tls asked for",
            |t| t.replacen("mode = \"psk\"", "mode = \"tls\"", 1),
            "mode = \"tls\"",
            "auth.mode = \"tls\" is not supported",
        ),
        (
            "certificate beside the key",
            |t| {
                t.replacen(
                    "psk_file = \"/etc/remus/psk\"",
                    "psk_file = \"/etc/remus/psk\"\ncert = \"/etc/remus/a.crt\"",
                    1,
                )
            },
            "cert =",
            "auth.cert is not used",
        ),
        (
            "qemu argument not on the allow-list",
            |t| {
                t.replacen(
                    "memory_mib = 1024",
                    "memory_mib = 1024\nextra_args = [\"-rtc\", \"base=utc\",\n  \"-device\", \"usb-storage\"]",
                    1,
                )
            },
            "  \"-device\"",
            "extra_args: `-device` is not allowed",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let base = minimal();
    for (name, breaker, needle, message) in cases {
        let text = breaker(&base);
        assert_ne!(text, base, "{name}: the mutation did not apply");
        let path = dir.path().join(format!("{}.toml", name.replace(' ', "-")));
        std::fs::write(&path, &text).unwrap();
        let out = remusctl(&["config", "check", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: exit code; output:\n{stdout}"
        );
        // A multi-line needle names the line of its first line.
        let first = needle.lines().next().unwrap();
        let line = if needle.contains('\n') {
            text.find(needle)
                .map(|at| text[..at].lines().count() + 1)
                .unwrap()
        } else {
            line_of(&text, first)
        };
        let prefix = format!("{}:{line}:", path.display());
        let hit = stdout
            .lines()
            .find(|l| l.starts_with(&prefix) && l.contains(": error: "));
        let hit = hit.unwrap_or_else(|| panic!("{name}: no error at line {line}:\n{stdout}"));
        assert!(
            hit.contains(message),
            "{name}: `{message}` missing in `{hit}`"
        );
    }
}

#[test]
fn missing_peer_is_reported_with_a_position() {
    let text = minimal();
    let start = text.find("[peer]").unwrap();
    let end = text.find("[auth]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nopeer.toml");
    std::fs::write(&path, &text).unwrap();
    let out = remusctl(&["config", "check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{}:1:1: error: missing required table [peer]",
            path.display()
        )),
        "{stdout}"
    );
}

#[test]
fn several_problems_are_all_reported() {
    let text = minimal()
        .replacen(
            "name = \"web\"",
            "name = \"Web!\"\ncheckpoint_interval_ms = 0\nverify_interval_s = 30",
            1,
        )
        .replacen("bridge = \"br0\"", "bridge = \"a/b\"", 1)
        + "\n[heartbeat]\ninterval_ms = 5\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.toml");
    std::fs::write(&path, &text).unwrap();
    let out = remusctl(&["config", "check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    for (needle, msg) in [
        ("name = \"Web!\"", "not a valid name"),
        ("checkpoint_interval_ms = 0", "out of range"),
        ("verify_interval_s = 30", "expected 0 (off) or 60..=604800"),
        ("bridge = \"a/b\"", "not a valid interface name"),
        ("interval_ms = 5", "out of range"),
    ] {
        let line = line_of(&text, needle);
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{}:{line}:", path.display())) && l.contains(msg)),
            "no `{msg}` at line {line}:\n{stdout}"
        );
    }
}

#[test]
fn unsafe_choices_are_warnings_not_silence() {
    let text = minimal().replacen(
        "mode = \"command\"\ncommand = [\"/usr/local/sbin/fence-peer\", \"beta\"]",
        "mode = \"none\"",
        1,
    );
    assert!(text.contains("mode = \"none\""));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nofence.toml");
    std::fs::write(&path, &text).unwrap();
    let out = remusctl(&["config", "check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let line = line_of(&text, "mode = \"none\"");
    assert!(
        stdout.contains(&format!("{}:{line}:", path.display()))
            && stdout.contains("warning: domain `web`: UNSAFE: fencing disabled"),
        "{stdout}"
    );
}

#[test]
fn unreadable_file_and_usage_errors() {
    let out = remusctl(&["config", "check", "/nonexistent/remus.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot read configuration"));
    let out = remusctl(&["config", "frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = remusctl(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A key file in `dir` at `mode`, and the minimal policy naming it.
fn policy_with_key(dir: &Path, mode: u32) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("psk");
    std::fs::write(&key, [9u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    let text = minimal().replacen(
        "psk_file = \"/etc/remus/psk\"",
        &format!("psk_file = \"{}\"", key.display()),
        1,
    );
    (key, text)
}

#[test]
fn a_key_file_others_can_read_is_refused_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (key, text) = policy_with_key(dir.path(), 0o644);
    let cfg = dir.path().join("remus.toml");
    std::fs::write(&cfg, text).unwrap();
    let want = format!(
        "{}: mode 0644 lets its group and others read it",
        key.display()
    );

    let out = remusctl(&["config", "check", "--files-exist", cfg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(&want), "config check:\n{stdout}");

    let out = Command::new(env!("CARGO_BIN_EXE_remusd"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&want), "remusd:\n{stderr}");

    // Owner-only: the key problem is gone (the example's kernel files are still missing).
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = remusctl(&["config", "check", "--files-exist", cfg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("fencing.command"),
        "the other files are still checked:\n{stdout}"
    );
    assert!(!stdout.contains("auth.psk_file"), "{stdout}");
}

#[test]
fn a_pause_too_long_for_the_interval_is_a_warning_on_this_host() {
    let dir = tempfile::tempdir().unwrap();
    let (_, text) = policy_with_key(dir.path(), 0o600);
    let base = text.replacen(
        "command = [\"/usr/local/sbin/fence-peer\", \"beta\"]",
        "command = [\"/bin/true\"]",
        1,
    );
    // 1 TiB of RAM with the compare tracker at 20 ms: no host scans that in 10 ms.
    let huge = base
        .replacen("memory_mib = 1024", "memory_mib = 1048576", 1)
        .replacen(
            "name = \"web\"",
            "name = \"web\"\ncheckpoint_interval_ms = 20\ntracker = \"compare\"",
            1,
        );
    // 64 MiB at 5 s: every host does.
    let small = base
        .replacen("memory_mib = 1024", "memory_mib = 64", 1)
        .replacen(
            "name = \"web\"",
            "name = \"web\"\ncheckpoint_interval_ms = 5000\ntracker = \"compare\"",
            1,
        );
    for (text, warned) in [(huge, true), (small, false)] {
        assert_ne!(text, base);
        let cfg = dir.path().join("remus.toml");
        std::fs::write(&cfg, &text).unwrap();
        let out = remusctl(&["config", "check", "--files-exist", cfg.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A warning, not an error: the policy is valid, the host is too slow for it.
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        let line = stdout
            .lines()
            .find(|l| l.contains("its pause would be about"));
        assert_eq!(line.is_some(), warned, "{stdout}");
        if let Some(l) = line {
            assert!(
                l.contains("warning: domain web") && l.contains("1048576 MiB"),
                "{l}"
            );
            assert!(stdout.contains("1 warning(s)"), "{stdout}");
        }
    }
}

#[test]
fn remusd_refuses_to_start_on_a_bad_config_or_missing_files() {
    let cfg = configs_dir().join("minimal.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_remusd"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    // The example policy names key and kernel files this machine does not have.
    assert!(
        stderr.contains("refusing to start") && stderr.contains("missing or unusable file"),
        "{stderr}"
    );
    assert!(stderr.contains("auth.psk_file"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[node]\nname = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_remusd"))
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&format!("{}:2:8: error:", bad.display())),
        "{stderr}"
    );
}

/// A `vm_netns` that does not exist is a missing file: `config check --files-exist` and
/// `remusd` name it; one that exists passes that check.
#[test]
fn a_missing_vm_netns_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("remus-test-nons-{}", std::process::id());
    let text = minimal().replacen(
        "name = \"alpha\"",
        &format!("name = \"alpha\"\nvm_netns = \"{ns}\""),
        1,
    );
    let cfg = dir.path().join("remus.toml");
    std::fs::write(&cfg, &text).unwrap();
    let want = format!("node.vm_netns: network namespace {ns} does not exist");
    let out = remusctl(&["config", "check", "--files-exist", cfg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(&want), "config check:\n{stdout}");
    let out = Command::new(env!("CARGO_BIN_EXE_remusd"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&want), "remusd:\n{stderr}");

    // Once the namespace exists the complaint is gone (other example files still missing).
    let made = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(made.success(), "ip netns add {ns}");
    let out = remusctl(&["config", "check", "--files-exist", cfg.to_str().unwrap()]);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("node.vm_netns"), "config check:\n{stdout}");
}

/// `text` checked as a file: the error line that names `needle`'s line, or a panic.
fn error_at(dir: &Path, name: &str, text: &str, needle: &str, message: &str) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let out = remusctl(&["config", "check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{name}:\n{stdout}");
    let prefix = format!("{}:{}:", path.display(), line_of(text, needle));
    let hit = stdout
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(": error: "))
        .unwrap_or_else(|| panic!("{name}: no error at `{needle}`:\n{stdout}"));
    assert!(
        hit.contains(message),
        "{name}: `{message}` missing in `{hit}`"
    );
}

#[test]
fn keygen_writes_an_owner_only_key_and_keys_mode_policies_are_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    // Under umask 000 the key file is still owner-only.
    let out = Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" keygen --out \"$1\""])
        .arg(env!("CARGO_BIN_EXE_remusctl"))
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(public.len(), 44, "{public:?}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode {mode:o}");
    // The same public key again from the file; an existing key is never overwritten.
    let again = remusctl(&["keygen", "--public", key.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), public);
    let before = std::fs::read(&key).unwrap();
    let out = remusctl(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&key).unwrap(), before);
    // Usage errors and a key readable by others: refused, naming the file.
    assert_eq!(remusctl(&["keygen"]).status.code(), Some(1));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = remusctl(&["keygen", "--public", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("0644"),
        "{stderr}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A keys-mode policy built on the minimal one.
    let peer_key = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    let keys_mode = minimal()
        .replacen(
            "mode = \"psk\"\npsk_file = \"/etc/remus/psk\"",
            &format!("mode = \"keys\"\nprivate_key_file = \"{}\"", key.display()),
            1,
        )
        .replacen(
            "address = \"192.0.2.12:7780\"",
            &format!("address = \"192.0.2.12:7780\"\npublic_keys = [\"{peer_key}\"]"),
            1,
        );
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &keys_mode).unwrap();
    let out = remusctl(&["config", "check", good.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let with_files = remusctl(&["config", "check", "--files-exist", good.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&with_files.stdout);
    assert!(!stdout.contains("private_key_file"), "{stdout}");

    let pins = format!("public_keys = [\"{peer_key}\"]");
    error_at(
        dir.path(),
        "no-pins",
        &keys_mode.replacen(&pins, "", 1),
        "[peer]",
        "public_keys is required",
    );
    error_at(
        dir.path(),
        "bad-pin",
        &keys_mode.replacen(peer_key, "AAAA", 1),
        "public_keys",
        "peer.public_keys",
    );
    error_at(
        dir.path(),
        "same-pin-twice",
        &keys_mode.replacen(
            &pins,
            &format!("public_keys = [\"{peer_key}\", \"{peer_key}\"]"),
            1,
        ),
        "public_keys",
        "listed twice",
    );
    error_at(
        dir.path(),
        "three-pins",
        &keys_mode.replacen(
            &pins,
            &format!("public_keys = [\"{peer_key}\", \"{public}\", \"3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]"),
            1,
        ),
        "public_keys",
        "3 keys",
    );
    let witness = "\n[witness]\naddress = \"192.0.2.13:7790\"\n";
    error_at(
        dir.path(),
        "witness-unpinned",
        &keys_mode.replacen("\n[[domain]]", &format!("{witness}\n[[domain]]"), 1),
        "[witness]",
        "public_key is required",
    );
    let pinned_witness = format!("{witness}public_key = \"{public}\"\n");
    let with_witness =
        keys_mode.replacen("\n[[domain]]", &format!("{pinned_witness}\n[[domain]]"), 1);
    let path = dir.path().join("witness.toml");
    std::fs::write(&path, &with_witness).unwrap();
    assert_eq!(
        remusctl(&["config", "check", path.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    // Pins in pre-shared key mode are a mistake, not ignored.
    error_at(
        dir.path(),
        "psk-with-pins",
        &minimal().replacen(
            "address = \"192.0.2.12:7780\"",
            &format!("address = \"192.0.2.12:7780\"\n{pins}"),
            1,
        ),
        "public_keys",
        "only with auth.mode = \"keys\"",
    );
    error_at(
        dir.path(),
        "psk-with-witness-key",
        &minimal().replacen("\n[[domain]]", &format!("{pinned_witness}\n[[domain]]"), 1),
        "public_key =",
        "only with auth.mode = \"keys\"",
    );
}

/// `[witness] mode = "etcd"`: a valid policy passes `config check` (nothing connects: the
/// endpoints are documentation addresses), and each mistake is named at its line.
#[test]
fn etcd_witness_policies_are_checked_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let fenced = minimal().replacen(
        "[domain.fencing]\nmode = \"command\"\ncommand = [\"/usr/local/sbin/fence-peer\", \"beta\"]",
        "[domain.fencing]\nmode = \"witness\"",
        1,
    );
    assert_ne!(fenced, minimal(), "minimal.toml changed: fix this test");
    let with =
        |witness: &str| fenced.replacen("\n[[domain]]", &format!("\n{witness}\n[[domain]]"), 1);
    let good = with(
        "[witness]\nmode = \"etcd\"\nendpoints = [\"https://192.0.2.5:2379\", \"192.0.2.6:2379\"]\n\
         prefix = \"/site/remus\"\nlease_ms = 3000\nuser = \"alpha\"\npassword_file = \"/etc/remus/etcd-password\"\n\
         ca_file = \"/etc/remus/etcd-ca.pem\"\ncert_file = \"/etc/remus/alpha.pem\"\nkey_file = \"/etc/remus/alpha-key.pem\"\n",
    );
    let path = dir.path().join("etcd.toml");
    std::fs::write(&path, &good).unwrap();
    let started = std::time::Instant::now();
    let out = remusctl(&["config", "check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(": ok: node alpha"), "{stdout}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Two endpoints (a cluster) and a 3 s lease: a warning, at the lease's line.
    let warning = format!("{}:{}:", path.display(), line_of(&good, "lease_ms = 3000"));
    assert!(
        stdout.lines().any(|l| l.starts_with(&warning)
            && l.contains("warning")
            && l.contains("leader election")),
        "{stdout}"
    );
    let long = good.replacen("lease_ms = 3000", "lease_ms = 4000", 1);
    std::fs::write(&path, &long).unwrap();
    let out = remusctl(&["config", "check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 warning(s)"), "{stdout}");
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "no endpoints",
            with("[witness]\nmode = \"etcd\"\n"),
            "[witness]",
            "endpoints is required with mode = \"etcd\"",
        ),
        (
            "an endpoint without a port",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"http://192.0.2.5\"]\n"),
            "endpoints =",
            "no port",
        ),
        (
            "a scheme etcd does not speak",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"unix:///run/etcd.sock\"]\n"),
            "endpoints =",
            "use http:// or https://",
        ),
        (
            "plain http with TLS files",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"http://192.0.2.5:2379\"]\nca_file = \"/etc/ca.pem\"\n"),
            "endpoints =",
            "plain http",
        ),
        (
            "https without a CA",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"https://192.0.2.5:2379\"]\n"),
            "endpoints =",
            "need ca_file",
        ),
        (
            "a user without a password file",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"192.0.2.5:2379\"]\nuser = \"alpha\"\n"),
            "user =",
            "needs password_file",
        ),
        (
            "a certificate without its key",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"https://192.0.2.5:2379\"]\nca_file = \"/etc/ca.pem\"\ncert_file = \"/etc/c.pem\"\n"),
            "cert_file =",
            "needs key_file",
        ),
        (
            "a relative prefix",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"192.0.2.5:2379\"]\nprefix = \"remus\"\n"),
            "prefix =",
            "must start with '/'",
        ),
        (
            "a lease etcd cannot grant",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"192.0.2.5:2379\"]\nlease_ms = 1500\n"),
            "lease_ms =",
            "whole seconds",
        ),
        (
            "remus-witness's address in etcd mode",
            with("[witness]\nmode = \"etcd\"\nendpoints = [\"192.0.2.5:2379\"]\naddress = \"192.0.2.13:7790\"\n"),
            "address = \"192.0.2.13",
            "witness.address is used only with mode = \"witness\"",
        ),
        (
            "etcd's endpoints in witness mode",
            with("[witness]\naddress = \"192.0.2.13:7790\"\nendpoints = [\"192.0.2.5:2379\"]\n"),
            "endpoints =",
            "witness.endpoints is used only with mode = \"etcd\"",
        ),
        (
            "an unknown mode",
            with("[witness]\nmode = \"zookeeper\"\nendpoints = [\"192.0.2.5:2379\"]\n"),
            "mode = \"zookeeper\"",
            "unknown variant `zookeeper`",
        ),
    ];
    for (name, text, needle, message) in &cases {
        error_at(dir.path(), &name.replace(' ', "-"), text, needle, message);
    }
}

/// `config check --files-exist` reads the etcd credentials as the daemon would (the
/// password readable by its owner only), still without connecting.
#[test]
fn etcd_credentials_files_are_checked_without_connecting() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("psk");
    std::fs::write(&psk, [7u8; 32]).unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = minimal()
        .replacen("/etc/remus/psk", psk.to_str().unwrap(), 1)
        .replacen(
            "[domain.fencing]\nmode = \"command\"\ncommand = [\"/usr/local/sbin/fence-peer\", \"beta\"]",
            "[domain.fencing]\nmode = \"witness\"",
            1,
        )
        .replacen(
            "\n[[domain]]",
            &format!(
                "\n[witness]\nmode = \"etcd\"\nendpoints = [\"192.0.2.5:2379\"]\nuser = \"alpha\"\npassword_file = \"{}\"\n\n[[domain]]",
                password.display()
            ),
            1,
        );
    let path = dir.path().join("etcd.toml");
    std::fs::write(&path, &text).unwrap();
    let check = || {
        let out = remusctl(&["config", "check", "--files-exist", path.to_str().unwrap()]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = check();
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("witness.password_file") && stdout.contains("chmod 600"),
        "{stdout}"
    );
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stdout) = check();
    assert_eq!(code, Some(0), "{stdout}");
    std::fs::remove_file(&password).unwrap();
    let (code, stdout) = check();
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains(&password.display().to_string()), "{stdout}");
}
