//! Policy reload: what a newly read `remus.toml` changes, and whether the running daemon can
//! take it without restarting any VM.
//!
//! One decision, one place: [`plan`] compares the running configuration with the new one,
//! given each domain's role on this node, and either returns a [`ReloadPlan`] (every change
//! can be applied now) or refuses the whole reload with one [`NotLive`] per change that
//! cannot be, so a reload is never half applied. The daemon then carries the plan out
//! (`daemon::reload`); [`refusals`] turns the refusals into diagnostics that name the file
//! and the line of each changed key.
//!
//! Applied live:
//! - a domain's `checkpoint_interval_ms`, `ack_timeout_ms`, `ack_wait_max_ms`: a running
//!   protection takes them at its next epoch boundary, later sessions start with them;
//! - a domain's `failover` (automatic / manual): the supervisor's next decision uses it;
//! - a new `[[domain]]`: its supervisor starts (stopped, or recovering its persisted role);
//! - a removed `[[domain]]`: its supervisor ends, *only if* the domain is stopped here (its
//!   state directory is kept). A domain that runs or holds a replica here is refused: stop
//!   it here (switch it over, or let its peer take it) first;
//! - a domain's machine, disks, NICs, egress buffer, tracker, compression and fencing: only
//!   while the domain is stopped on this node (they shape a running VM, its replica or its
//!   protection's safety; device changes on a running VM are hot-plug's job).
//!
//! - in per-node keys mode (`auth.mode = "keys"`): this node's key files, the peer's pinned
//!   `public_keys` and the witness's `public_key` — the steps of a key rotation. The new keys
//!   are loaded first (a bad one refuses the reload) and then used by new replication
//!   connections, the heartbeats and the witness client; a running session stays up.
//!
//! Never live, refused with the reason: `[node]`, `[peer]`, `[heartbeat]`, `[auth]`,
//! `[witness]`, `[metrics]` except the keys above (host-wide services bound at start: restart
//! `remusd`, which is a failover for the VMs it runs as primary — switch them over first).

use std::collections::BTreeMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diag::SourceMap;
use super::{Config, Diagnostic, DomainConfig, Severity};

/// What a reload changes, every part of it applicable live.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReloadPlan {
    /// Domains whose live-changeable keys changed: their new configuration.
    pub retuned: Vec<DomainConfig>,
    /// Domains stopped here whose other keys changed: their new configuration.
    pub reconfigured: Vec<DomainConfig>,
    /// Domains new in the file.
    pub added: Vec<DomainConfig>,
    /// Domains gone from the file (to be stopped here before they may go).
    pub removed: Vec<String>,
    /// Key material changed (keys mode: this node's key files, the peer's or the witness's
    /// pinned public keys): the daemon loads the new keys and swaps them into the channel
    /// listener, the heartbeats and the witness client — a key rotation without a restart.
    pub rekey: bool,
}

impl ReloadPlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.retuned.is_empty()
            && self.reconfigured.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && !self.rekey
    }

    /// One line for logs and `remusctl reload`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no change".to_string();
        }
        let names = |v: &mut dyn Iterator<Item = &str>| v.collect::<Vec<_>>().join(", ");
        let mut parts = Vec::new();
        if !self.retuned.is_empty() {
            parts.push(format!(
                "retuned {}",
                names(&mut self.retuned.iter().map(|d| d.name.as_str()))
            ));
        }
        if !self.reconfigured.is_empty() {
            parts.push(format!(
                "reconfigured {} (stopped here)",
                names(&mut self.reconfigured.iter().map(|d| d.name.as_str()))
            ));
        }
        if !self.added.is_empty() {
            parts.push(format!(
                "added {}",
                names(&mut self.added.iter().map(|d| d.name.as_str()))
            ));
        }
        if !self.removed.is_empty() {
            parts.push(format!(
                "removed {}",
                names(&mut self.removed.iter().map(String::as_str))
            ));
        }
        if self.rekey {
            parts.push("keys reloaded".to_string());
        }
        parts.join("; ")
    }
}

/// Where a key is in the file: a top-level table and key, or a key of a named domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPath {
    /// `[table] key` (`key` empty: the table as a whole).
    Top {
        /// The table.
        table: &'static str,
        /// The key in it, or "" for the whole table.
        key: &'static str,
    },
    /// A key of the `[[domain]]` called `domain` (`key` may name a sub-table: `qemu`, `nic`;
    /// empty: the domain as a whole).
    Domain {
        /// The domain's name.
        domain: String,
        /// The key (as written in the file), or "".
        key: &'static str,
    },
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Top { table, key: "" } => write!(f, "[{table}]"),
            Self::Top { table, key } => write!(f, "{table}.{key}"),
            Self::Domain { domain, key: "" } => write!(f, "domain `{domain}`"),
            Self::Domain { domain, key } => write!(f, "domain `{domain}`: {key}"),
        }
    }
}

/// One change the running daemon cannot take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotLive {
    /// What changed.
    pub path: KeyPath,
    /// What happened to it and why it cannot be applied now, with what to do instead.
    pub why: String,
}

const HOST_WIDE: &str = "changed, but it is a host-wide service bound at start: restart remusd \
                         to change it (a failover for the VMs it runs as primary: switch them \
                         over first)";
/// The role name of a domain stopped on this node (`api::Role::name`).
pub const STOPPED: &str = "stopped";

/// Compares the running configuration with the new one, given each running domain's role
/// on this node (`roles`: domain → role name, see [`STOPPED`]; a domain missing from it
/// counts as not stopped): the changes to apply, or every change that cannot be applied
/// now (then nothing is applied).
///
/// # Errors
/// One [`NotLive`] per change that needs a restart of remusd, or the domain stopped here.
pub fn plan(
    running: &Config,
    new: &Config,
    roles: &BTreeMap<String, String>,
) -> Result<ReloadPlan, Vec<NotLive>> {
    let role_of = |name: &str| roles.get(name).map_or("in an unknown role", String::as_str);
    let mut refused = Vec::new();
    let mut top = |changed: bool, table: &'static str| {
        if changed {
            refused.push(NotLive {
                path: KeyPath::Top { table, key: "" },
                why: HOST_WIDE.to_string(),
            });
        }
    };
    let (keyless_old, keyless_new) = (without_keys(running), without_keys(new));
    top(running.node != new.node, "node");
    top(keyless_old.peer != keyless_new.peer, "peer");
    top(running.heartbeat != new.heartbeat, "heartbeat");
    top(keyless_old.auth != keyless_new.auth, "auth");
    top(keyless_old.witness != keyless_new.witness, "witness");
    top(running.metrics != new.metrics, "metrics");

    let mut out = ReloadPlan {
        rekey: running.peer != new.peer
            || running.auth != new.auth
            || running.witness != new.witness,
        ..ReloadPlan::default()
    };
    for d in &new.domains {
        match running.domain(&d.name) {
            None => out.added.push(d.clone()),
            Some(old) if old == d => {}
            Some(old) => {
                let frozen = frozen_changes(old, d);
                let role = role_of(&d.name);
                if frozen.is_empty() {
                    out.retuned.push(d.clone());
                } else if role == STOPPED {
                    out.reconfigured.push(d.clone());
                } else {
                    refused.extend(frozen.into_iter().map(|key| NotLive {
                        path: KeyPath::Domain {
                            domain: d.name.clone(),
                            key,
                        },
                        why: format!(
                            "changed while the domain is {role} on this node, and it shapes the VM, its replica or its protection: change it while the domain is stopped here (device changes on a running VM will go through hot-plug)"
                        ),
                    }));
                }
            }
        }
    }
    for d in &running.domains {
        if new.domain(&d.name).is_some() {
            continue;
        }
        let role = role_of(&d.name);
        if role == STOPPED {
            out.removed.push(d.name.clone());
        } else {
            refused.push(NotLive {
                path: KeyPath::Domain {
                    domain: d.name.clone(),
                    key: "",
                },
                why: format!(
                    "removed from the policy while it is {role} on this node: stop it here first (switch it over, or let the peer take it)"
                ),
            });
        }
    }
    if refused.is_empty() {
        Ok(out)
    } else {
        Err(refused)
    }
}

/// The host-wide tables with the key material a reload may change blanked out: in keys mode
/// the key files and every pinned public key (a rotation); the mode itself, and the
/// pre-shared key file in psk mode (both nodes would have to change at the same instant),
/// stay host-wide.
fn without_keys(c: &Config) -> Config {
    use super::AuthConfig;
    let mut c = c.clone();
    if let AuthConfig::Keys {
        private_key_file,
        psk_file,
    } = &mut c.auth
    {
        *private_key_file = std::path::PathBuf::new();
        *psk_file = None;
        c.peer.public_keys.clear();
        if let Some(super::WitnessConfig {
            backend: super::WitnessBackend::Witness { public_key, .. },
            ..
        }) = &mut c.witness
        {
            *public_key = None;
        }
    }
    c
}

/// Copies the keys that may change while the domain runs (interval, ACK deadlines,
/// failover mode) from `from` into `into`. With [`frozen_changes`] it covers every field of
/// [`DomainConfig`] but the name (the table test checks that a live-only change, taken, makes
/// the two equal).
pub fn take_live(into: &mut DomainConfig, from: &DomainConfig) {
    into.checkpoint_interval = from.checkpoint_interval;
    into.ack_timeout = from.ack_timeout;
    into.ack_wait_max = from.ack_wait_max;
    into.failover = from.failover;
}

/// The keys of a domain that changed and cannot change while it runs or holds a replica
/// (as written in the file).
pub fn frozen_changes(old: &DomainConfig, new: &DomainConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            keys.push(key);
        }
    };
    check(old.compression != new.compression, "compression");
    check(old.tracker != new.tracker, "tracker");
    check(old.qemu != new.qemu, "qemu");
    check(old.nics != new.nics, "nic");
    check(old.disks != new.disks, "disk");
    check(old.netbuf != new.netbuf, "netbuf");
    check(old.fencing != new.fencing, "fencing");
    keys
}

/// The refusals as diagnostics naming `origin` and the line of each changed key in `text`
/// (the new file); a key no longer written there is reported at its table, or at line 0.
pub fn refusals(text: &str, origin: &str, refused: &[NotLive]) -> Vec<Diagnostic> {
    let map = SourceMap::new(text, origin);
    let root = DeTable::parse(text).ok();
    refused
        .iter()
        .map(|r| {
            let (line, column) = root
                .as_ref()
                .and_then(|t| locate(t, &r.path))
                .map_or((0, 0), |span| map.position(span.start));
            Diagnostic {
                severity: Severity::Error,
                origin: origin.to_owned(),
                line,
                column,
                message: format!("{}: not applied: {}", r.path, r.why),
            }
        })
        .collect()
}

/// The span of `path` in the parsed file: the key itself, else its table.
fn locate(root: &Spanned<DeTable<'_>>, path: &KeyPath) -> Option<Range<usize>> {
    let key_span = |t: &DeTable<'_>, k: &str| {
        t.iter()
            .find(|(name, _)| name.get_ref() == k)
            .map(|(name, _)| name.span())
    };
    match path {
        KeyPath::Top { table, key } => {
            let (name, value) = root
                .get_ref()
                .iter()
                .find(|(name, _)| name.get_ref() == table)?;
            match value.get_ref() {
                DeValue::Table(t) if !key.is_empty() => {
                    key_span(t, key).or_else(|| Some(name.span()))
                }
                _ => Some(name.span()),
            }
        }
        KeyPath::Domain { domain, key } => {
            let key: &str = if key.is_empty() { "name" } else { key };
            let (_, domains) = root
                .get_ref()
                .iter()
                .find(|(name, _)| name.get_ref() == "domain")?;
            let DeValue::Array(items) = domains.get_ref() else {
                return None;
            };
            items.iter().find_map(|item| {
                let DeValue::Table(t) = item.get_ref() else {
                    return None;
                };
                let named = t.iter().any(|(k, v)| {
                    k.get_ref() == "name"
                        && matches!(v.get_ref(), DeValue::String(s) if s == domain)
                });
                named.then(|| key_span(t, key).unwrap_or_else(|| item.span()))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[node]
name = "alpha"

[peer]
name = "beta"
address = "192.0.2.12:7780"

[[peer.link]]
local = "192.0.2.11:7781"
remote = "192.0.2.12:7781"

[auth]
mode = "psk"
psk_file = "/etc/remus/psk"

[[domain]]
name = "web"
checkpoint_interval_ms = 200

[domain.qemu]
memory_mib = 512
kernel = "/boot/vmlinuz"

[domain.fencing]
mode = "none"

[[domain]]
name = "db"

[domain.qemu]
memory_mib = 1024
kernel = "/boot/vmlinuz"

[domain.fencing]
mode = "none"
"#;

    fn cfg(text: &str) -> Config {
        Config::from_str(text, "t.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn edit(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "`{from}` not in the base policy");
        BASE.replacen(from, to, 1)
    }

    fn roles(web: &str, db: &str) -> BTreeMap<String, String> {
        [("web", web), ("db", db)]
            .into_iter()
            .map(|(d, r)| (d.to_string(), r.to_string()))
            .collect()
    }

    /// What a plan did: (retuned, reconfigured, added, removed).
    type Did = (
        Vec<&'static str>,
        Vec<&'static str>,
        Vec<&'static str>,
        Vec<&'static str>,
    );

    /// (case, new text, roles of web and db here, expected: what was planned, or the
    /// refused key paths)
    type Case = (
        &'static str,
        String,
        (&'static str, &'static str),
        Result<Did, Vec<String>>,
    );

    #[test]
    fn key_material_reloads_live_in_keys_mode_only() {
        const A: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        const B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
        let keys_base = BASE
            .replacen(
                "mode = \"psk\"\npsk_file = \"/etc/remus/psk\"",
                "mode = \"keys\"\nprivate_key_file = \"/etc/remus/node.key\"",
                1,
            )
            .replacen(
                "address = \"192.0.2.12:7780\"",
                &format!("address = \"192.0.2.12:7780\"\npublic_keys = [\"{A}\"]"),
                1,
            )
            .replacen(
                "\n[[domain]]",
                &format!("\n[witness]\naddress = \"192.0.2.13:7790\"\npublic_key = \"{A}\"\n\n[[domain]]"),
                1,
            );
        let running = cfg(&keys_base);
        let roles = roles("primary", "backup");
        let refused_tables = |text: &str| -> Vec<String> {
            plan(&running, &cfg(text), &roles)
                .unwrap_err()
                .iter()
                .map(|n| n.path.to_string())
                .collect()
        };
        for (what, text) in [
            (
                "a second pin (rotation begins)",
                keys_base.replacen(&format!("[\"{A}\"]"), &format!("[\"{A}\", \"{B}\"]"), 1),
            ),
            (
                "a new private key file",
                keys_base.replacen("/etc/remus/node.key", "/etc/remus/node.key.new", 1),
            ),
            (
                "a new witness key",
                keys_base.replacen(
                    &format!("public_key = \"{A}\""),
                    &format!("public_key = \"{B}\""),
                    1,
                ),
            ),
        ] {
            let p = plan(&running, &cfg(&text), &roles).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert!(p.rekey, "{what}");
            assert_eq!(p.summary(), "keys reloaded", "{what}");
        }
        assert!(!plan(&running, &running, &roles).unwrap().rekey);
        // Not live: the mode, the witness's address, and the pre-shared key file in psk mode.
        assert_eq!(refused_tables(BASE), vec!["[auth]", "[witness]"]);
        assert_eq!(
            refused_tables(&keys_base.replacen("192.0.2.13:7790", "192.0.2.14:7790", 1)),
            vec!["[witness]"]
        );
        let running = cfg(BASE);
        let p = plan(
            &running,
            &cfg(&BASE.replacen("/etc/remus/psk", "/etc/remus/psk2", 1)),
            &roles,
        );
        assert_eq!(
            p.unwrap_err()
                .iter()
                .map(|n| n.path.to_string())
                .collect::<Vec<_>>(),
            vec!["[auth]"]
        );
    }

    #[test]
    fn plan_table() {
        let none = || -> Vec<&'static str> { vec![] };
        let cases: Vec<Case> = vec![
            (
                "unchanged",
                BASE.to_string(),
                ("primary", "backup"),
                Ok((none(), none(), none(), none())),
            ),
            (
                "interval is live on a running domain",
                edit(
                    "checkpoint_interval_ms = 200",
                    "checkpoint_interval_ms = 500",
                ),
                ("primary", "backup"),
                Ok((vec!["web"], none(), none(), none())),
            ),
            (
                "ACK deadlines and failover are live",
                edit(
                    "name = \"db\"\n",
                    "name = \"db\"\nack_timeout_ms = 3000\nack_wait_max_ms = 9000\nfailover = \"manual\"\n",
                ),
                ("primary", "backup"),
                Ok((vec!["db"], none(), none(), none())),
            ),
            (
                "a domain added",
                format!(
                    "{BASE}\n[[domain]]\nname = \"new\"\n[domain.qemu]\nmemory_mib = 256\nkernel = \"/boot/vmlinuz\"\n[domain.fencing]\nmode = \"none\"\n"
                ),
                ("primary", "backup"),
                Ok((none(), none(), vec!["new"], none())),
            ),
            (
                "a domain stopped here removed",
                BASE[..BASE.find("[[domain]]\nname = \"db\"").unwrap()].to_string(),
                ("primary", "stopped"),
                Ok((none(), none(), none(), vec!["db"])),
            ),
            (
                "a domain that is backup here cannot be removed",
                BASE[..BASE.find("[[domain]]\nname = \"db\"").unwrap()].to_string(),
                ("primary", "backup"),
                Err(vec!["domain `db`".into()]),
            ),
            (
                "memory of a domain stopped here",
                edit("memory_mib = 512", "memory_mib = 768"),
                ("stopped", "backup"),
                Ok((none(), vec!["web"], none(), none())),
            ),
            (
                "memory of a running domain",
                edit("memory_mib = 512", "memory_mib = 768"),
                ("primary", "backup"),
                Err(vec!["domain `web`: qemu".into()]),
            ),
            (
                "a domain in no known role counts as running",
                edit("memory_mib = 512", "memory_mib = 768"),
                ("", "backup"),
                Err(vec!["domain `web`: qemu".into()]),
            ),
            (
                "heartbeat is host-wide, even with every domain stopped",
                format!("{BASE}\n[heartbeat]\ninterval_ms = 50\ntimeout_ms = 200\n"),
                ("stopped", "stopped"),
                Err(vec!["[heartbeat]".into()]),
            ),
            (
                "a refused change refuses the live one beside it",
                edit(
                    "checkpoint_interval_ms = 200\n\n[domain.qemu]\nmemory_mib = 512",
                    "checkpoint_interval_ms = 300\n\n[domain.qemu]\nmemory_mib = 768",
                ),
                ("primary", "backup"),
                Err(vec!["domain `web`: qemu".into()]),
            ),
            (
                "every refusal named at once",
                edit("name = \"alpha\"", "name = \"alpha2\"").replacen(
                    "[domain.fencing]\nmode = \"none\"\n\n[[domain]]\nname = \"db\"",
                    "[domain.fencing]\nmode = \"command\"\ncommand = [\"/bin/true\"]\n\n[[domain]]\nname = \"db\"",
                    1,
                ),
                ("standalone", "stopped"),
                Err(vec!["[node]".into(), "domain `web`: fencing".into()]),
            ),
        ];
        let running = cfg(BASE);
        for (name, text, (web, db), want) in cases {
            let mut r = roles(web, db);
            r.retain(|_, v| !v.is_empty());
            let got = plan(&running, &cfg(&text), &r);
            match (got, want) {
                (Ok(p), Ok((retuned, reconfigured, added, removed))) => {
                    let names =
                        |v: &[DomainConfig]| v.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
                    assert_eq!(names(&p.retuned), retuned, "{name}: retuned");
                    // Every retuned domain differs only in what take_live copies.
                    for d in &p.retuned {
                        let mut old = running.domain(&d.name).unwrap().clone();
                        take_live(&mut old, d);
                        assert_eq!(&old, d, "{name}: take_live misses a live key");
                    }
                    assert_eq!(names(&p.reconfigured), reconfigured, "{name}: reconfigured");
                    assert_eq!(names(&p.added), added, "{name}: added");
                    assert_eq!(p.removed, removed, "{name}: removed");
                }
                (Err(r), Err(want)) => {
                    let got: Vec<String> = r.iter().map(|n| n.path.to_string()).collect();
                    assert_eq!(got, want, "{name}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// Refusals name the line of the changed key in the new file, and the role that
    /// prevents the change.
    #[test]
    fn refusals_name_the_line() {
        let text = edit("memory_mib = 512", "memory_mib = 768")
            + "\n[heartbeat]\ninterval_ms = 50\ntimeout_ms = 200\n";
        let refused = plan(&cfg(BASE), &cfg(&text), &roles("primary", "backup")).unwrap_err();
        let d = refusals(&text, "t.toml", &refused);
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert_eq!(d.len(), 2, "{d:?}");
        let hb = d
            .iter()
            .find(|d| d.message.starts_with("[heartbeat]"))
            .unwrap();
        assert_eq!(hb.line, line_of("[heartbeat]"), "{hb}");
        let q = d
            .iter()
            .find(|d| d.message.contains("`web`: qemu"))
            .unwrap();
        assert_eq!(q.line, line_of("[domain.qemu]"), "{q}");
        assert!(
            q.to_string().starts_with(&format!("t.toml:{}:", q.line)),
            "{q}"
        );
        assert!(
            q.message
                .contains("while the domain is primary on this node"),
            "{q}"
        );
    }
}
