//! Which QEMU arguments a policy may add through `[domain.qemu] extra_args`.
//!
//! remusd builds every device itself so that each one's state is replicated (RAM, device
//! state, disks through the NBD server, NICs behind the output buffer). An argument that
//! added a device, a backend, a drive, a monitor or a configuration file would add state
//! that is never replicated, or take QEMU out of remusd's control: a deny-list always misses
//! one (`-device`, `-object`, `-fsdev`, `-readconfig`, `-global isa-fdc.driveA=…`, …). So the
//! list is of what is allowed, each entry with why it is safe; everything else is refused.

/// Allowed options (each takes exactly one value), and why each is safe.
pub const ALLOWED: &[(&str, &str)] = &[
    (
        "-rtc",
        "the guest clock's base and drift policy: no device, its state is in the saved device state",
    ),
    (
        "-uuid",
        "a constant the firmware reports; both QEMUs of the pair are given the same",
    ),
    (
        "-smbios",
        "firmware table strings (`type=` forms only: a `file=` table would have to exist on both hosts)",
    ),
    ("-msg", "the format of QEMU's own messages"),
    (
        "-overcommit",
        "host memory locking and CPU power management: nothing the guest can store state in",
    ),
    (
        "-sandbox",
        "QEMU's seccomp filter: it only takes abilities away from QEMU",
    ),
];

/// Why an `extra_args` list is refused: the index of the offending word and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// An option not on the allow-list.
    #[error("`{word}` is not allowed: only {allowed} may be added (disks and NICs must be declared in [[domain.disk]] / [[domain.nic]] so they are replicated and buffered; other devices, backends, monitors and configuration files would hold state remusd does not replicate)")]
    NotAllowed { word: String, allowed: String },
    /// An allowed option at the end of the list.
    #[error("`{word}` needs a value after it")]
    MissingValue { word: String },
    /// A word that is neither an option nor an option's value.
    #[error("`{word}` is not an option and follows none that takes a value")]
    Stray { word: String },
    /// An allowed option with a value that is not.
    #[error("`{option} {value}`: {why}")]
    BadValue {
        option: String,
        value: String,
        why: &'static str,
    },
}

/// Checks `words`; on refusal returns the index of the offending word with the reason.
pub fn check(words: &[String]) -> Result<(), (usize, ArgError)> {
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        if !word.starts_with('-') {
            return Err((i, ArgError::Stray { word: word.clone() }));
        }
        // QEMU accepts `--opt` for `-opt`, and `-opt=value` is not an option form it has.
        let opt = word
            .strip_prefix('-')
            .filter(|o| o.starts_with('-'))
            .unwrap_or(word);
        if !ALLOWED.iter().any(|(name, _)| *name == opt) {
            let allowed = ALLOWED
                .iter()
                .map(|(n, _)| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err((
                i,
                ArgError::NotAllowed {
                    word: word.clone(),
                    allowed,
                },
            ));
        }
        let Some(value) = words.get(i + 1) else {
            return Err((i, ArgError::MissingValue { word: word.clone() }));
        };
        if opt == "-smbios" && !value.starts_with("type=") {
            return Err((
                i + 1,
                ArgError::BadValue {
                    option: word.clone(),
                    value: value.clone(),
                    why: "only `type=…` tables are allowed (a `file=` table would have to exist on both hosts)",
                },
            ));
        }
        i += 2;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn allowed_options_with_values_pass() {
        for ok in [
            "",
            "-rtc base=utc",
            "-rtc base=utc,driftfix=slew -uuid 0f2b… --msg timestamp=on",
            "-overcommit mem-lock=on -sandbox on,spawn=deny",
            "-smbios type=1,serial=web-01",
        ] {
            assert_eq!(check(&words(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn everything_else_is_refused_at_its_word() {
        // (arguments, index of the offending word, start of the reason)
        let rows = [
            ("-device virtio-rng-pci", 0, "`-device` is not allowed"),
            (
                "-rtc base=utc -object memory-backend-ram,id=x",
                2,
                "`-object` is not allowed",
            ),
            ("-fsdev local,id=f", 0, "`-fsdev` is not allowed"),
            ("-readconfig /etc/q.cfg", 0, "`-readconfig` is not allowed"),
            ("-global isa-fdc.driveA=d0", 0, "`-global` is not allowed"),
            ("--drive file=x", 0, "`--drive` is not allowed"),
            ("-drive=file=x", 0, "`-drive=file=x` is not allowed"),
            ("-netdev user,id=n", 0, "`-netdev` is not allowed"),
            ("-incoming defer", 0, "`-incoming` is not allowed"),
            ("-rtc", 0, "`-rtc` needs a value"),
            ("base=utc", 0, "`base=utc` is not an option"),
            ("-rtc base=utc extra", 2, "`extra` is not an option"),
            (
                "-smbios file=/tmp/t.bin",
                1,
                "`-smbios file=/tmp/t.bin`: only `type=",
            ),
        ];
        for (args, at, reason) in rows {
            let (i, e) = check(&words(args)).expect_err(args);
            assert_eq!(i, at, "{args}");
            assert!(e.to_string().starts_with(reason), "{args}: {e}");
        }
    }

    #[test]
    fn every_allowed_option_says_why() {
        for (name, why) in ALLOWED {
            assert!(name.starts_with('-') && why.len() > 20, "{name}: {why}");
        }
    }
}
