//! Turning text into a [`Config`]: syntax, shape and meaning, collecting every problem.
//!
//! Each check reports at the span of the value it rejects (or of the table that lacks a
//! required key), so the operator is sent to the right line. Defaults are applied here and
//! nowhere else, so `docs/configuration.md` has one place to stay in sync with.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::diag::{Diagnostic, Severity, SourceMap};
use super::raw::*;
use super::*;

/// Top-level tables this version knows.
const TOP_LEVEL: &[&str] = &[
    "node",
    "peer",
    "heartbeat",
    "auth",
    "witness",
    "metrics",
    "domain",
];

struct Ctx<'a> {
    map: SourceMap<'a>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let d = self.map.diagnostic(Severity::Error, span, message);
        self.errors.push(d);
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        let d = self.map.diagnostic(Severity::Warning, span, message);
        self.warnings.push(d);
    }

    /// Deserialises one section; a shape error is reported and yields `None`.
    fn section<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>) -> Option<T> {
        let fallback = value.span();
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(v) => Some(v),
            Err(e) => {
                let span = e.span().unwrap_or(fallback);
                self.error(span, e.message().trim().to_owned());
                None
            }
        }
    }

    /// A required value; reports `key` missing in `table` at `at`. Called through
    /// [`required!`], which takes the key's name from the field.
    fn required<T>(
        &mut self,
        v: Option<Spanned<T>>,
        at: Range<usize>,
        table: &str,
        key: &str,
        hint: &str,
    ) -> Option<Spanned<T>> {
        if v.is_none() {
            self.error(
                at,
                format!("{table}: missing required key `{key}` ({hint})"),
            );
        }
        v
    }

    fn socket_addr(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        role: AddrRole,
    ) -> Option<SocketAddr> {
        let text = v.get_ref();
        let addr: SocketAddr = match text.parse() {
            Ok(a) => a,
            Err(_) => {
                self.error(
                    v.span(),
                    format!(
                        "{key}: bad address `{text}`: expected IP:PORT such as 192.0.2.10:7780 \
                         or [2001:db8::10]:7780 (host names are not resolved: failover must \
                         not depend on DNS)"
                    ),
                );
                return None;
            }
        };
        if addr.port() == 0 {
            self.error(
                v.span(),
                format!("{key}: port 0 in `{text}`: a fixed port is needed"),
            );
            return None;
        }
        if role == AddrRole::Remote && addr.ip().is_unspecified() {
            self.error(
                v.span(),
                format!("{key}: `{text}` is a wildcard address; name the peer's address"),
            );
            return None;
        }
        Some(addr)
    }

    fn millis(
        &mut self,
        v: &Option<Spanned<u64>>,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Duration {
        let Some(v) = v else {
            return Duration::from_millis(default);
        };
        let ms = *v.get_ref();
        if !range.contains(&ms) {
            self.error(
                v.span(),
                format!(
                    "{key} = {ms}: out of range, expected {}..={} milliseconds",
                    range.start(),
                    range.end()
                ),
            );
            return Duration::from_millis(default);
        }
        Duration::from_millis(ms)
    }

    fn number(
        &mut self,
        v: &Option<Spanned<u64>>,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> u64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if !range.contains(&n) {
            self.error(
                v.span(),
                format!(
                    "{key} = {n}: out of range, expected {}..={}",
                    range.start(),
                    range.end()
                ),
            );
            return default;
        }
        n
    }

    fn abs_path(&mut self, v: &Spanned<String>, key: &str) -> PathBuf {
        let p = PathBuf::from(v.get_ref());
        if !p.is_absolute() {
            self.error(
                v.span(),
                format!("{key}: `{}` is not an absolute path", v.get_ref()),
            );
        }
        p
    }

    fn opt_abs_path(&mut self, v: &Option<Spanned<String>>, key: &str, default: &str) -> PathBuf {
        match v {
            Some(v) => self.abs_path(v, key),
            None => PathBuf::from(default),
        }
    }

    fn name(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        max: usize,
        chars: fn(char) -> bool,
        what: &str,
    ) -> bool {
        let s = v.get_ref();
        if s.is_empty() || s.chars().count() > max || !s.chars().all(chars) {
            self.error(
                v.span(),
                format!(
                    "{key}: `{s}` is not a valid name: expected 1..={max} characters of {what}"
                ),
            );
            return false;
        }
        true
    }

    /// Reports a key that has no meaning with the chosen mode.
    fn unused<T>(&mut self, v: &Option<Spanned<T>>, key: &str, why: &str) {
        if let Some(v) = v {
            self.error(v.span(), format!("{key} is not used {why}; remove it"));
        }
    }
}

/// `required!(cx, t, "[table]", key, "hint")`: the value of the required `key` of the table
/// `t` (a `Spanned` raw section), or `None` after reporting
/// `[table]: missing required key `key` (hint)` at the table's span. The key named in the
/// message is the field's own name, so the two cannot drift apart.
macro_rules! required {
    ($cx:expr, $t:expr, $table:literal, $key:ident, $hint:literal) => {
        $cx.required(
            $t.get_ref().$key.clone(),
            $t.span(),
            $table,
            stringify!($key),
            $hint,
        )
    };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AddrRole {
    Bind,
    Remote,
}

fn node_chars(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

pub(super) fn domain_chars(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_')
}

pub(super) fn id_chars(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_')
}

pub(super) fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
}

pub(super) fn parse_mac(s: &str) -> Option<MacAddr> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(MacAddr(out))
}

pub(super) fn validate(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx {
        map: SourceMap::new(text, origin),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let (root, syntax) = DeTable::parse_recoverable(text);
    for e in &syntax {
        let span = e.span().unwrap_or(0..0);
        cx.error(span, format!("syntax: {}", e.message().trim()));
    }
    let config = if syntax.is_empty() {
        build(&mut cx, root)
    } else {
        None
    };
    let sort = |v: &mut Vec<Diagnostic>| v.sort_by_key(|d| (d.line, d.column));
    sort(&mut cx.errors);
    sort(&mut cx.warnings);
    match config {
        Some(mut c) if cx.errors.is_empty() => {
            c.warnings = cx.warnings;
            Ok(c)
        }
        _ => Err(ConfigErrors {
            errors: cx.errors,
            warnings: cx.warnings,
        }),
    }
}

/// Sections as deserialised (each `None` if absent or malformed).
#[derive(Default)]
struct Sections {
    node: Option<Spanned<RawNode>>,
    peer: Option<Spanned<RawPeer>>,
    heartbeat: Option<Spanned<RawHeartbeat>>,
    auth: Option<Spanned<RawAuth>>,
    witness: Option<Spanned<RawWitness>>,
    metrics: Option<Spanned<RawMetrics>>,
    domains: Vec<Spanned<RawDomain>>,
    /// Sections present but malformed: suppress "missing" errors for them.
    present: HashSet<String>,
}

fn build(cx: &mut Ctx<'_>, root: Spanned<DeTable<'_>>) -> Option<Config> {
    let mut s = Sections::default();
    let mut domains_ok = true;
    for (key, value) in root.into_inner() {
        let name = key.get_ref().to_string();
        s.present.insert(name.clone());
        match name.as_str() {
            "node" => s.node = cx.section(value),
            "peer" => s.peer = cx.section(value),
            "heartbeat" => s.heartbeat = cx.section(value),
            "auth" => s.auth = cx.section(value),
            "witness" => s.witness = cx.section(value),
            "metrics" => s.metrics = cx.section(value),
            "domain" => {
                let span = value.span();
                match value.into_inner() {
                    DeValue::Array(items) => {
                        for item in items {
                            match cx.section(item) {
                                Some(d) => s.domains.push(d),
                                None => domains_ok = false,
                            }
                        }
                    }
                    _ => {
                        cx.error(
                            span,
                            "`domain` must be an array of tables: write [[domain]], not [domain]",
                        );
                        domains_ok = false;
                    }
                }
            }
            other => cx.error(
                key.span(),
                format!(
                    "unknown top-level key `{other}`, expected one of: {}",
                    TOP_LEVEL.join(", ")
                ),
            ),
        }
    }
    let top = 0..0;
    let missing = |cx: &mut Ctx<'_>, s: &Sections, table: &str, hint: &str| {
        if !s.present.contains(table) {
            cx.error(
                top.clone(),
                format!("missing required table [{table}] ({hint})"),
            );
        }
    };
    if s.node.is_none() {
        missing(cx, &s, "node", "this host's name and listen address");
    }
    if s.peer.is_none() {
        missing(
            cx,
            &s,
            "peer",
            "the other node of the pair: name, address, heartbeat links",
        );
    }
    if s.auth.is_none() {
        missing(
            cx,
            &s,
            "auth",
            "mode = \"psk\" and psk_file; authentication cannot be turned off",
        );
    }

    let node = s.node.as_ref().and_then(|n| node(cx, n));
    let peer = s.peer.as_ref().and_then(|p| peer(cx, p, node.as_ref()));
    let heartbeat = heartbeat(cx, s.heartbeat.as_ref());
    let auth = s.auth.as_ref().and_then(|a| auth(cx, a));
    let witness = s.witness.as_ref().and_then(|w| witness(cx, w));
    let metrics = s.metrics.as_ref().and_then(|m| {
        let l = required!(
            cx,
            m,
            "[metrics]",
            listen,
            "IP:PORT of the Prometheus exporter"
        )?;
        cx.socket_addr(&l, "metrics.listen", AddrRole::Bind)
            .map(|listen| MetricsConfig { listen })
    });
    let witness_present = s.present.contains("witness");
    let mut domains = Vec::new();
    for d in &s.domains {
        if let Some(d) = domain(cx, d, witness_present) {
            domains.push(d);
        }
    }
    cross_domain_checks(cx, &s.domains);
    if s.domains.is_empty() && domains_ok {
        cx.warn(top, "no [[domain]] configured: nothing is protected");
    }
    let node = node?;
    let peer = peer?;
    let auth = auth?;
    key_checks(cx, &s, &auth, &peer)?;
    if !domains_ok || domains.len() != s.domains.len() {
        return None;
    }
    Some(Config {
        node,
        peer,
        heartbeat,
        auth,
        witness,
        metrics,
        domains,
        warnings: Vec::new(),
    })
}

/// `[auth]` against `[peer] public_keys` and `[witness]`: keys mode needs the peer's keys
/// pinned, psk mode must not pretend to pin any, and the witness speaks the pre-shared key.
fn key_checks(cx: &mut Ctx<'_>, s: &Sections, auth: &AuthConfig, peer: &PeerConfig) -> Option<()> {
    let pins_span = s
        .peer
        .as_ref()
        .and_then(|p| p.get_ref().public_keys.as_ref().map(|k| k.span()));
    match auth {
        AuthConfig::Keys { .. } => {
            if peer.public_keys.is_empty() {
                let at = pins_span
                    .or_else(|| s.peer.as_ref().map(|p| p.span()))
                    .unwrap_or(0..0);
                cx.error(
                    at,
                    "[peer]: public_keys is required with auth.mode = \"keys\": the peer's \
                     public key (`remusctl keygen` printed it on the peer), or two during a rotation",
                );
                return None;
            }
            if let Some(w) = &s.witness {
                let etcd = w
                    .get_ref()
                    .mode
                    .as_ref()
                    .is_some_and(|m| *m.get_ref() == WitnessMode::Etcd);
                if w.get_ref().public_key.is_none() && !etcd {
                    cx.error(
                        w.span(),
                        "[witness]: public_key is required with auth.mode = \"keys\": the \
                         witness's public key (`remusctl keygen --public` of its \
                         --private-key-file), which it pins this node's key against",
                    );
                    return None;
                }
            }
        }
        AuthConfig::Psk { .. } => {
            if let Some(k) = s
                .witness
                .as_ref()
                .and_then(|w| w.get_ref().public_key.as_ref())
            {
                cx.error(
                    k.span(),
                    "[witness] public_key is used only with auth.mode = \"keys\"; remove it or switch modes",
                );
                return None;
            }
            if let Some(at) = pins_span {
                cx.error(
                    at,
                    "[peer] public_keys is used only with auth.mode = \"keys\"; remove it or switch modes",
                );
                return None;
            }
        }
    }
    Some(())
}

fn node(cx: &mut Ctx<'_>, n: &Spanned<RawNode>) -> Option<NodeConfig> {
    let r = n.get_ref();
    let name = required!(cx, n, "[node]", name, "this host's node name");
    let name_ok = name.as_ref().is_some_and(|v| {
        cx.name(
            v,
            "node.name",
            63,
            node_chars,
            "letters, digits, '-', '_', '.'",
        )
    });
    let listen = match &r.listen {
        Some(l) => cx.socket_addr(l, "node.listen", AddrRole::Bind),
        None => Some(SocketAddr::from(([0, 0, 0, 0], 7780))),
    };
    let control_socket = cx.opt_abs_path(
        &r.control_socket,
        "node.control_socket",
        "/run/remus/remusd.sock",
    );
    let state_dir = cx.opt_abs_path(&r.state_dir, "node.state_dir", "/var/lib/remus");
    let run_dir = cx.opt_abs_path(&r.run_dir, "node.run_dir", "/run/remus");
    let vm_netns_ok = r.vm_netns.as_ref().is_none_or(|v| {
        cx.name(
            v,
            "node.vm_netns",
            63,
            node_chars,
            "letters, digits, '-', '_', '.' (a name under /run/netns)",
        )
    });
    if !name_ok || !vm_netns_ok {
        return None;
    }
    Some(NodeConfig {
        name: name?.into_inner(),
        listen: listen?,
        control_socket,
        state_dir,
        run_dir,
        vm_netns: r.vm_netns.as_ref().map(|v| v.get_ref().clone()),
    })
}

fn peer(cx: &mut Ctx<'_>, p: &Spanned<RawPeer>, node: Option<&NodeConfig>) -> Option<PeerConfig> {
    let at = p.span();
    let r = p.get_ref();
    let name = required!(cx, p, "[peer]", name, "the peer's [node] name");
    let mut ok = name.as_ref().is_some_and(|v| {
        cx.name(
            v,
            "peer.name",
            63,
            node_chars,
            "letters, digits, '-', '_', '.'",
        )
    });
    if let (Some(n), Some(node)) = (&name, node) {
        if n.get_ref() == &node.name {
            cx.error(
                n.span(),
                format!("peer.name `{}` is this node's own name", node.name),
            );
            ok = false;
        }
    }
    let address = required!(cx, p, "[peer]", address, "the peer's replication IP:PORT")
        .and_then(|a| cx.socket_addr(&a, "peer.address", AddrRole::Remote));
    let mut links = Vec::new();
    let mut seen = HashSet::new();
    match &r.link {
        None => {
            cx.error(
                at.clone(),
                "[peer]: at least one [[peer.link]] heartbeat link is required (local and remote addresses)",
            );
            ok = false;
        }
        Some(list) => {
            for l in list {
                let lat = l.span();
                let local = required!(
                    cx,
                    l,
                    "[[peer.link]]",
                    local,
                    "IP:PORT to bind on this host"
                )
                .and_then(|v| cx.socket_addr(&v, "peer.link.local", AddrRole::Bind));
                let remote = required!(
                    cx,
                    l,
                    "[[peer.link]]",
                    remote,
                    "the peer's IP:PORT on this link"
                )
                .and_then(|v| cx.socket_addr(&v, "peer.link.remote", AddrRole::Remote));
                match (local, remote) {
                    (Some(local), Some(remote)) => {
                        if local.is_ipv4() != remote.is_ipv4() {
                            cx.error(lat.clone(), format!("peer.link: local {local} and remote {remote} are of different address families"));
                            ok = false;
                        } else if !seen.insert((local, remote)) {
                            cx.error(
                                lat.clone(),
                                format!("peer.link: duplicate link {local} -> {remote}"),
                            );
                            ok = false;
                        } else {
                            links.push(HeartbeatLink { local, remote });
                        }
                    }
                    _ => ok = false,
                }
            }
            if list.is_empty() {
                cx.error(
                    at.clone(),
                    "[peer]: at least one [[peer.link]] heartbeat link is required",
                );
                ok = false;
            }
        }
    }
    let mut public_keys = Vec::new();
    if let Some(list) = &r.public_keys {
        let items = list.get_ref();
        if items.len() > 2 {
            cx.error(
                list.span(),
                format!(
                    "peer.public_keys: {} keys; pin one, or two while the peer's key is rotated",
                    items.len()
                ),
            );
            ok = false;
        }
        for k in items {
            match k.get_ref().parse::<remus_engine::peer::PublicKey>() {
                Ok(key) if public_keys.contains(&key) => {
                    cx.error(k.span(), format!("peer.public_keys: {key} is listed twice"));
                    ok = false;
                }
                Ok(key) => public_keys.push(key),
                Err(e) => {
                    cx.error(k.span(), format!("peer.public_keys: {e}"));
                    ok = false;
                }
            }
        }
    }
    if !ok {
        return None;
    }
    Some(PeerConfig {
        public_keys,
        name: name?.into_inner(),
        address: address?,
        links,
    })
}

fn heartbeat(cx: &mut Ctx<'_>, h: Option<&Spanned<RawHeartbeat>>) -> HeartbeatConfig {
    let (interval_v, timeout_v) = match h {
        Some(h) => (
            h.get_ref().interval_ms.clone(),
            h.get_ref().timeout_ms.clone(),
        ),
        None => (None, None),
    };
    let interval = cx.millis(
        &interval_v,
        "heartbeat.interval_ms",
        super::DEFAULT_HEARTBEAT_INTERVAL_MS,
        10..=10_000,
    );
    let timeout = cx.millis(
        &timeout_v,
        "heartbeat.timeout_ms",
        super::DEFAULT_HEARTBEAT_TIMEOUT_MS,
        20..=120_000,
    );
    if timeout <= interval * 2 {
        let span = timeout_v
            .as_ref()
            .or(interval_v.as_ref())
            .map(|v| v.span())
            .or_else(|| h.map(|h| h.span()))
            .unwrap_or(0..0);
        cx.error(
            span,
            format!(
                "heartbeat.timeout_ms ({} ms) must exceed 2 x heartbeat.interval_ms ({} ms), \
                 or one lost heartbeat declares the peer dead",
                timeout.as_millis(),
                interval.as_millis()
            ),
        );
    }
    HeartbeatConfig { interval, timeout }
}

fn auth(cx: &mut Ctx<'_>, a: &Spanned<RawAuth>) -> Option<AuthConfig> {
    let r = a.get_ref();
    let mode = required!(cx, a, "[auth]", mode, "\"keys\" or \"psk\"")?;
    if *mode.get_ref() == AuthMode::Tls {
        cx.error(
            mode.span(),
            "auth.mode = \"tls\" is not supported: keys authenticate the replication \
             stream, the UDP heartbeats and the witness, and certificates could stand in for \
             them on the stream only; use mode = \"keys\" (per-node keys) or \"psk\"",
        );
        return None;
    }
    if *mode.get_ref() == AuthMode::Keys {
        let key = required!(
            cx,
            a,
            "[auth]",
            private_key_file,
            "this node's private key, written by `remusctl keygen`"
        )?;
        for (v, key) in [
            (&r.cert, "auth.cert"),
            (&r.key, "auth.key"),
            (&r.ca, "auth.ca"),
        ] {
            if let Some(v) = v {
                cx.error(v.span(), format!("{key} is not used; remove it"));
            }
        }
        return Some(AuthConfig::Keys {
            private_key_file: cx.abs_path(&key, "auth.private_key_file"),
            psk_file: r.psk_file.as_ref().map(|f| cx.abs_path(f, "auth.psk_file")),
        });
    }
    if let Some(k) = &r.private_key_file {
        cx.error(
            k.span(),
            "auth.private_key_file is used only with mode = \"keys\"; remove it or switch modes",
        );
    }
    for (v, key) in [
        (&r.cert, "auth.cert"),
        (&r.key, "auth.key"),
        (&r.ca, "auth.ca"),
    ] {
        if let Some(v) = v {
            cx.error(
                v.span(),
                format!("{key} is not used (authentication is by pre-shared key); remove it"),
            );
        }
    }
    let f = required!(
        cx,
        a,
        "[auth]",
        psk_file,
        "a file holding at least 32 bytes of key"
    )?;
    Some(AuthConfig::Psk {
        key_file: cx.abs_path(&f, "auth.psk_file"),
    })
}

/// The shortest lease that outlives an etcd leader election at etcd's default election
/// timeout (renewals every third of it: two thirds must exceed about 2 s of election).
const ETCD_CLUSTER_LEASE: Duration = Duration::from_secs(4);

/// A key of a table, and where it is written if it is.
type KeyAt<'a> = (&'a str, Option<Range<usize>>);

fn witness(cx: &mut Ctx<'_>, w: &Spanned<RawWitness>) -> Option<WitnessConfig> {
    let r = w.get_ref();
    let mode = r
        .mode
        .as_ref()
        .map_or(WitnessMode::Witness, |m| *m.get_ref());
    let lease = cx.millis(&r.lease_ms, "witness.lease_ms", 2000, 100..=600_000);
    // Keys of the other mode: refused by name, never silently ignored.
    let (mode_word, foreign): (&str, Vec<KeyAt<'_>>) = match mode {
        WitnessMode::Witness => (
            "etcd",
            vec![
                ("endpoints", r.endpoints.as_ref().map(|v| v.span())),
                ("prefix", r.prefix.as_ref().map(|v| v.span())),
                ("user", r.user.as_ref().map(|v| v.span())),
                ("password_file", r.password_file.as_ref().map(|v| v.span())),
                ("ca_file", r.ca_file.as_ref().map(|v| v.span())),
                ("cert_file", r.cert_file.as_ref().map(|v| v.span())),
                ("key_file", r.key_file.as_ref().map(|v| v.span())),
            ],
        ),
        WitnessMode::Etcd => (
            "witness",
            vec![
                ("address", r.address.as_ref().map(|v| v.span())),
                ("public_key", r.public_key.as_ref().map(|v| v.span())),
            ],
        ),
    };
    let before = cx.errors.len();
    for (key, span) in foreign {
        if let Some(span) = span {
            cx.error(
                span,
                format!("witness.{key} is used only with mode = \"{mode_word}\""),
            );
        }
    }
    if cx.errors.len() > before {
        return None;
    }
    let backend = match mode {
        WitnessMode::Witness => {
            let a = required!(cx, w, "[witness]", address, "IP:PORT of remus-witness")?;
            let address = cx.socket_addr(&a, "witness.address", AddrRole::Remote)?;
            let public_key = match &r.public_key {
                Some(k) => match k.get_ref().parse::<remus_engine::peer::PublicKey>() {
                    Ok(key) => Some(key),
                    Err(e) => {
                        cx.error(k.span(), format!("witness.public_key: {e}"));
                        return None;
                    }
                },
                None => None,
            };
            WitnessBackend::Witness {
                address,
                public_key,
            }
        }
        WitnessMode::Etcd => WitnessBackend::Etcd(etcd_witness(cx, w)?),
    };
    if mode == WitnessMode::Etcd && (lease.subsec_millis() != 0 || lease < Duration::from_secs(2)) {
        let at = r.lease_ms.as_ref().map_or_else(|| w.span(), |v| v.span());
        cx.error(
            at,
            format!(
                "witness.lease_ms = {} with mode = \"etcd\": etcd leases last whole seconds, \
                 at least 2 (its minimum TTL with the default election timeout); use 2000, 3000, …",
                lease.as_millis()
            ),
        );
        return None;
    }
    if let WitnessBackend::Etcd(e) = &backend {
        if e.endpoints.len() > 1 && lease < ETCD_CLUSTER_LEASE {
            let at = r.lease_ms.as_ref().map_or_else(|| w.span(), |v| v.span());
            cx.warn(
                at,
                format!(
                    "witness.lease_ms = {} with an etcd cluster: a leader election (up to about \
                     2 s at etcd's default 1000 ms election timeout) can outlast the lease, which \
                     the primary then holds lost until it is re-acquired (it keeps running on its \
                     backup's ACKs, but could not run alone meanwhile); {} or more rides it out",
                    lease.as_millis(),
                    ETCD_CLUSTER_LEASE.as_millis()
                ),
            );
        }
    }
    Some(WitnessConfig { lease, backend })
}

/// `[witness] mode = "etcd"`: endpoints, prefix, credentials. Nothing connects here.
fn etcd_witness(cx: &mut Ctx<'_>, w: &Spanned<RawWitness>) -> Option<EtcdWitness> {
    let r = w.get_ref();
    let before = cx.errors.len();
    let Some(eps) = &r.endpoints else {
        cx.error(
            w.span(),
            "[witness]: endpoints is required with mode = \"etcd\": the etcd cluster's client \
             URLs, e.g. [\"https://10.0.0.5:2379\", \"https://10.0.0.6:2379\"]",
        );
        return None;
    };
    if eps.get_ref().is_empty() {
        cx.error(
            eps.span(),
            "witness.endpoints: empty; name at least one etcd client URL",
        );
    }
    let tls = r.ca_file.is_some() || r.cert_file.is_some() || r.key_file.is_some();
    let mut endpoints = Vec::new();
    for e in eps.get_ref() {
        let text = e.get_ref();
        match endpoint_problem(text, tls) {
            Some(why) => cx.error(e.span(), format!("witness.endpoints: {text:?}: {why}")),
            None => endpoints.push(text.clone()),
        }
    }
    let prefix = match &r.prefix {
        Some(p) => match remus_etcd_arbiter::record::prefix_problem(p.get_ref()) {
            Some(why) => {
                cx.error(p.span(), format!("witness.prefix {:?}: {why}", p.get_ref()));
                String::new()
            }
            None => p.get_ref().clone(),
        },
        None => "/remus".to_string(),
    };
    let path = |cx: &mut Ctx<'_>, v: &Option<Spanned<String>>, key: &str| {
        v.as_ref().map(|p| cx.abs_path(p, key))
    };
    let password_file = path(cx, &r.password_file, "witness.password_file");
    let ca_file = path(cx, &r.ca_file, "witness.ca_file");
    let cert_file = path(cx, &r.cert_file, "witness.cert_file");
    let key_file = path(cx, &r.key_file, "witness.key_file");
    let user = r.user.as_ref().map(|u| u.get_ref().clone());
    match (&r.user, &r.password_file) {
        (Some(u), None) => cx.error(
            u.span(),
            "witness.user needs password_file: the file holding the etcd user's password",
        ),
        (None, Some(p)) => cx.error(
            p.span(),
            "witness.password_file needs user: the etcd user the password is for",
        ),
        (Some(u), Some(_)) if u.get_ref().is_empty() => {
            cx.error(u.span(), "witness.user: empty");
        }
        _ => {}
    }
    match (&r.cert_file, &r.key_file) {
        (Some(c), None) => cx.error(
            c.span(),
            "witness.cert_file needs key_file: the client certificate's private key",
        ),
        (None, Some(k)) => cx.error(
            k.span(),
            "witness.key_file needs cert_file: the client certificate it belongs to",
        ),
        _ => {}
    }
    let https = endpoints.iter().any(|e| e.starts_with("https://"));
    if https && r.ca_file.is_none() {
        cx.error(
            eps.span(),
            "witness.endpoints: https endpoints need ca_file: the CA certificate that signed the \
             etcd servers' certificates (the system's roots are not trusted for etcd)",
        );
    }
    if cx.errors.len() > before {
        return None;
    }
    Some(EtcdWitness {
        endpoints,
        prefix,
        user,
        password_file,
        ca_file,
        cert_file,
        key_file,
    })
}

/// Why an etcd endpoint is unusable, or `None`: `http://HOST:PORT`, `https://HOST:PORT`, or
/// `HOST:PORT` (https when TLS files are set); plain http with TLS files is refused.
fn endpoint_problem(text: &str, tls: bool) -> Option<String> {
    let (scheme, rest) = match text.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, text),
    };
    match scheme {
        None | Some("https") => {}
        Some("http") if tls => {
            return Some("plain http, but ca_file/cert_file/key_file are set: use https://".into())
        }
        Some("http") => {}
        Some(other) => return Some(format!("scheme {other:?}: use http:// or https://")),
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Some("no port: write HOST:PORT, e.g. 10.0.0.5:2379".into());
    };
    if host.is_empty() || host.contains('/') || host.chars().any(char::is_whitespace) {
        return Some("no usable host: write HOST:PORT, e.g. 10.0.0.5:2379".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => None,
        _ => Some(format!("port {port:?} is not a port number")),
    }
}

fn domain(cx: &mut Ctx<'_>, d: &Spanned<RawDomain>, witness: bool) -> Option<DomainConfig> {
    let at = d.span();
    let r = d.get_ref();
    let before = cx.errors.len();
    let name = required!(
        cx,
        d,
        "[[domain]]",
        name,
        "unique, [a-z0-9_-], at most 32 characters"
    );
    if let Some(n) = &name {
        cx.name(n, "domain.name", 32, domain_chars, "a-z, 0-9, '-', '_'");
    }
    let label = name
        .as_ref()
        .map_or("<unnamed>".to_owned(), |n| n.get_ref().clone());
    let table = format!("domain `{label}`");
    let checkpoint_interval = cx.millis(
        &r.checkpoint_interval_ms,
        "domain.checkpoint_interval_ms",
        200,
        10..=60_000,
    );
    let ack_timeout = cx.millis(
        &r.ack_timeout_ms,
        "domain.ack_timeout_ms",
        2000,
        100..=600_000,
    );
    let ack_wait_max = cx.millis(
        &r.ack_wait_max_ms,
        "domain.ack_wait_max_ms",
        120_000,
        100..=3_600_000,
    );
    let verify_interval = match r.verify_interval_s.as_ref() {
        None => None,
        Some(v) if *v.get_ref() == 0 => None,
        Some(v) if (60..=604_800).contains(v.get_ref()) => Some(Duration::from_secs(*v.get_ref())),
        Some(v) => {
            cx.error(
                v.span(),
                format!(
                    "domain.verify_interval_s = {}: out of range, expected 0 (off) or 60..=604800 seconds",
                    v.get_ref()
                ),
            );
            None
        }
    };
    if ack_wait_max < ack_timeout {
        let span = r
            .ack_wait_max_ms
            .as_ref()
            .or(r.ack_timeout_ms.as_ref())
            .map_or_else(|| at.clone(), |v| v.span());
        cx.error(
            span,
            format!(
                "{table}: ack_wait_max_ms ({} ms) must not be below ack_timeout_ms ({} ms)",
                ack_wait_max.as_millis(),
                ack_timeout.as_millis()
            ),
        );
    }
    let failover = r
        .failover
        .as_ref()
        .map_or(Failover::Automatic, |f| *f.get_ref());
    let compression = r
        .compression
        .as_ref()
        .map_or(Compression::XorLz4, |c| *c.get_ref());
    let tracker = r.tracker.as_ref().map_or(Tracker::Auto, |t| *t.get_ref());

    // Disks first: boot_disk refers to them.
    let mut disks = Vec::new();
    let mut disk_ids = HashSet::new();
    for disk in r.disk.iter().flatten() {
        let dr = disk.get_ref();
        let id = required!(
            cx,
            disk,
            "[[domain.disk]]",
            id,
            "device id, unique in the domain"
        );
        let image = required!(
            cx,
            disk,
            "[[domain.disk]]",
            image,
            "image path on the primary"
        );
        let replica = required!(
            cx,
            disk,
            "[[domain.disk]]",
            replica,
            "replica path on the backup"
        );
        if let Some(id) = &id {
            if cx.name(
                id,
                "domain.disk.id",
                32,
                id_chars,
                "letters, digits, '-', '_'",
            ) && !disk_ids.insert(id.get_ref().clone())
            {
                cx.error(
                    id.span(),
                    format!("{table}: duplicate disk id `{}`", id.get_ref()),
                );
            }
        }
        if let (Some(id), Some(image), Some(replica)) = (id, image, replica) {
            disks.push(DiskConfig {
                id: id.into_inner(),
                image: cx.abs_path(&image, "domain.disk.image"),
                replica: cx.abs_path(&replica, "domain.disk.replica"),
                format: dr.format.as_ref().map_or(DiskFormat::Raw, |f| *f.get_ref()),
            });
        }
    }

    let mut nics = Vec::new();
    let mut nic_ids = HashSet::new();
    for nic in r.nic.iter().flatten() {
        let id = required!(
            cx,
            nic,
            "[[domain.nic]]",
            id,
            "device id, unique in the domain"
        );
        let mac = required!(
            cx,
            nic,
            "[[domain.nic]]",
            mac,
            "unicast MAC such as 52:54:00:12:34:56"
        );
        let bridge = required!(
            cx,
            nic,
            "[[domain.nic]]",
            bridge,
            "host bridge the tap joins"
        );
        if let Some(id) = &id {
            if cx.name(
                id,
                "domain.nic.id",
                15,
                id_chars,
                "letters, digits, '-', '_'",
            ) && !nic_ids.insert(id.get_ref().clone())
            {
                cx.error(
                    id.span(),
                    format!("{table}: duplicate NIC id `{}`", id.get_ref()),
                );
            }
        }
        let mac = mac.and_then(|m| match parse_mac(m.get_ref()) {
            Some(a) if a.0[0] & 1 == 1 => {
                cx.error(m.span(), format!("domain.nic.mac `{}` is a multicast address; a NIC needs a unicast MAC", m.get_ref()));
                None
            }
            Some(a) if a.0 == [0; 6] => {
                cx.error(m.span(), "domain.nic.mac 00:00:00:00:00:00 is not a usable address");
                None
            }
            Some(a) => Some(a),
            None => {
                cx.error(m.span(), format!("domain.nic.mac `{}` is not a MAC address: expected six hex pairs such as 52:54:00:12:34:56", m.get_ref()));
                None
            }
        });
        if let Some(b) = &bridge {
            if !ifname_ok(b.get_ref()) {
                cx.error(b.span(), format!("domain.nic.bridge `{}` is not a valid interface name (1..=15 printable characters, no '/', ':' or spaces)", b.get_ref()));
            }
        }
        if let (Some(id), Some(mac), Some(bridge)) = (id, mac, bridge) {
            nics.push(NicConfig {
                id: id.into_inner(),
                mac,
                bridge: bridge.into_inner(),
            });
        }
    }

    let qemu = match &r.qemu {
        None => {
            cx.error(at.clone(), format!("{table}: missing required table [domain.qemu] (memory_mib and a boot source at least)"));
            None
        }
        Some(q) => qemu(cx, q, &table, &disk_ids),
    };

    let netbuf = match &r.netbuf {
        None => NetbufConfig {
            backend: NetbufBackend::Auto,
            limit_bytes: 16 << 20,
            output_buffering: true,
        },
        Some(n) => {
            let nr = n.get_ref();
            let off = nr
                .unsafe_no_output_buffering
                .as_ref()
                .is_some_and(|v| *v.get_ref());
            if let (true, Some(v)) = (off, &nr.unsafe_no_output_buffering) {
                cx.warn(v.span(), format!("{table}: UNSAFE: output buffering disabled; after a failover, clients may have seen output the backup never received"));
            }
            NetbufConfig {
                backend: nr
                    .backend
                    .as_ref()
                    .map_or(NetbufBackend::Auto, |b| *b.get_ref()),
                limit_bytes: cx.number(
                    &nr.limit_bytes,
                    "domain.netbuf.limit_bytes",
                    16 << 20,
                    (64 << 10)..=(1 << 30),
                ),
                output_buffering: !off,
            }
        }
    };

    let fencing = match &r.fencing {
        None if witness => FencingPolicy::Witness,
        None if failover == Failover::Manual => FencingPolicy::None,
        None => {
            cx.error(at.clone(), format!("{table}: automatic failover needs fencing: add [domain.fencing] (mode = \"command\" or \"witness\") or a [witness] table, or set failover = \"manual\""));
            FencingPolicy::None
        }
        Some(f) => fencing(cx, f, &table, witness, failover),
    };

    if cx.errors.len() != before {
        return None;
    }
    Some(DomainConfig {
        name: name?.into_inner(),
        checkpoint_interval,
        ack_timeout,
        ack_wait_max,
        verify_interval,
        failover,
        compression,
        tracker,
        qemu: qemu?,
        nics,
        disks,
        netbuf,
        fencing,
    })
}

fn qemu(
    cx: &mut Ctx<'_>,
    q: &Spanned<RawQemu>,
    table: &str,
    disk_ids: &HashSet<String>,
) -> Option<QemuConfig> {
    let at = q.span();
    let r = q.get_ref();
    let binary = match &r.binary {
        Some(b) if b.get_ref().contains('/') => {
            cx.abs_path(b, "domain.qemu.binary").display().to_string()
        }
        Some(b) if b.get_ref().is_empty() => {
            cx.error(b.span(), "domain.qemu.binary is empty");
            String::new()
        }
        Some(b) => b.get_ref().clone(),
        None => "qemu-system-x86_64".to_owned(),
    };
    let machine = match &r.machine {
        Some(m) if m.get_ref().trim().is_empty() => {
            cx.error(m.span(), "domain.qemu.machine is empty");
            String::new()
        }
        Some(m) => m.get_ref().clone(),
        None => "q35".to_owned(),
    };
    let accel = r.accel.as_ref().map_or(Accel::Kvm, |a| *a.get_ref());
    let memory = required!(cx, q, "[domain.qemu]", memory_mib, "guest RAM in MiB");
    let memory_mib = cx.number(&memory, "domain.qemu.memory_mib", 0, 16..=(4 << 20));
    let vcpus = cx.number(&r.vcpus, "domain.qemu.vcpus", 1, 1..=288) as u32;
    let boot = match (&r.kernel, &r.boot_disk) {
        (Some(k), None) => Some(Boot::Kernel {
            kernel: cx.abs_path(k, "domain.qemu.kernel"),
            initrd: r
                .initrd
                .as_ref()
                .map(|i| cx.abs_path(i, "domain.qemu.initrd")),
            cmdline: r
                .cmdline
                .as_ref()
                .map_or(String::new(), |c| c.get_ref().clone()),
        }),
        (None, Some(d)) => {
            cx.unused(&r.initrd, "domain.qemu.initrd", "without `kernel`");
            cx.unused(&r.cmdline, "domain.qemu.cmdline", "without `kernel`");
            if !disk_ids.contains(d.get_ref()) {
                cx.error(
                    d.span(),
                    format!(
                        "domain.qemu.boot_disk `{}` names no [[domain.disk]] of {table}",
                        d.get_ref()
                    ),
                );
            }
            Some(Boot::Disk {
                disk_id: d.get_ref().clone(),
            })
        }
        (Some(_), Some(d)) => {
            cx.error(
                d.span(),
                "domain.qemu: set either `kernel` (direct boot) or `boot_disk`, not both",
            );
            None
        }
        (None, None) => {
            cx.error(at.clone(), format!("{table}: [domain.qemu] needs a boot source: `kernel` (with optional initrd, cmdline) or `boot_disk`"));
            None
        }
    };
    let mut extra_args = Vec::new();
    if let Some(args) = &r.extra_args {
        let args = args.get_ref();
        extra_args = args.iter().map(|a| a.get_ref().clone()).collect();
        if let Err((i, e)) = super::qemu_args::check(&extra_args) {
            cx.error(args[i].span(), format!("domain.qemu.extra_args: {e}"));
        }
    }
    Some(QemuConfig {
        binary,
        machine,
        accel,
        memory_mib,
        vcpus,
        boot: boot?,
        extra_args,
    })
}

fn fencing(
    cx: &mut Ctx<'_>,
    f: &Spanned<RawFencing>,
    table: &str,
    witness: bool,
    failover: Failover,
) -> FencingPolicy {
    let at = f.span();
    let r = f.get_ref();
    let Some(mode) = required!(
        cx,
        f,
        "[domain.fencing]",
        mode,
        "\"command\", \"witness\" or \"none\""
    ) else {
        return FencingPolicy::None;
    };
    match mode.get_ref() {
        FencingMode::Command => {
            let timeout = cx.millis(
                &r.timeout_ms,
                "domain.fencing.timeout_ms",
                30_000,
                100..=600_000,
            );
            let retries = cx.number(&r.retries, "domain.fencing.retries", 3, 0..=100) as u32;
            let argv: Vec<String> = match &r.command {
                None => {
                    cx.error(at.clone(), format!("{table}: fencing mode \"command\" needs `command = [\"/path/to/fence\", \"arg\", ...]`"));
                    Vec::new()
                }
                Some(c) if c.get_ref().is_empty() => {
                    cx.error(
                        c.span(),
                        "domain.fencing.command is empty: give the program and its arguments",
                    );
                    Vec::new()
                }
                Some(c) => {
                    let first = &c.get_ref()[0];
                    if !first.get_ref().starts_with('/') {
                        cx.error(first.span(), format!("domain.fencing.command: program `{}` must be an absolute path (fencing must not depend on PATH)", first.get_ref()));
                    }
                    c.get_ref().iter().map(|a| a.get_ref().clone()).collect()
                }
            };
            FencingPolicy::Command {
                argv,
                timeout,
                retries,
            }
        }
        FencingMode::Witness => {
            cx.unused(
                &r.command,
                "domain.fencing.command",
                "with mode = \"witness\"",
            );
            cx.unused(
                &r.timeout_ms,
                "domain.fencing.timeout_ms",
                "with mode = \"witness\"",
            );
            cx.unused(
                &r.retries,
                "domain.fencing.retries",
                "with mode = \"witness\"",
            );
            if !witness {
                cx.error(
                    mode.span(),
                    "domain.fencing.mode = \"witness\" needs a [witness] table",
                );
            }
            FencingPolicy::Witness
        }
        FencingMode::None => {
            cx.unused(&r.command, "domain.fencing.command", "with mode = \"none\"");
            cx.unused(
                &r.timeout_ms,
                "domain.fencing.timeout_ms",
                "with mode = \"none\"",
            );
            cx.unused(&r.retries, "domain.fencing.retries", "with mode = \"none\"");
            let extra = if failover == Failover::Automatic {
                "; with automatic failover a network partition makes both nodes run the domain (split brain)"
            } else {
                ""
            };
            cx.warn(
                mode.span(),
                format!("{table}: UNSAFE: fencing disabled{extra}"),
            );
            FencingPolicy::None
        }
    }
}

/// Uniqueness across domains: names, MACs, disk image and replica paths.
fn cross_domain_checks(cx: &mut Ctx<'_>, domains: &[Spanned<RawDomain>]) {
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut macs: HashMap<[u8; 6], String> = HashMap::new();
    let mut paths: HashMap<String, String> = HashMap::new();
    for d in domains {
        let r = d.get_ref();
        if let Some(n) = &r.name {
            let (line, _) = cx.map.position(n.span().start);
            if let Some(first) = names.insert(n.get_ref().clone(), line) {
                cx.error(
                    n.span(),
                    format!(
                        "duplicate domain name `{}` (first defined on line {first})",
                        n.get_ref()
                    ),
                );
            }
        }
        let label = r
            .name
            .as_ref()
            .map_or("<unnamed>".to_owned(), |n| n.get_ref().clone());
        for nic in r.nic.iter().flatten() {
            if let Some(m) = &nic.get_ref().mac {
                if let Some(mac) = parse_mac(m.get_ref()) {
                    if let Some(other) = macs.insert(mac.0, label.clone()) {
                        cx.error(
                            m.span(),
                            format!("MAC {mac} is already used by domain `{other}`"),
                        );
                    }
                }
            }
        }
        for disk in r.disk.iter().flatten() {
            for p in [&disk.get_ref().image, &disk.get_ref().replica]
                .into_iter()
                .flatten()
            {
                if let Some(other) = paths.insert(p.get_ref().clone(), label.clone()) {
                    cx.error(p.span(), format!("disk path `{}` is already used by domain `{other}` (two writers would corrupt it)", p.get_ref()));
                }
            }
        }
    }
}
