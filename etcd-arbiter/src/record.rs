//! What this crate keeps in etcd, and the one rule that decides a grant: pure functions,
//! table-tested without an etcd.
//!
//! Keys, under the configured prefix `P` (e.g. `/remus`):
//! - `P/domains/<domain>/holder`: who may run the domain. Attached to the holder node's etcd
//!   lease, so it disappears when that lease runs out. Value: [`HolderRecord`] as JSON.
//! - `P/domains/<domain>/copy`: the newest copy stamp any node recorded. No lease: it
//!   outlives every node. Value: [`CopyRecord`] as JSON.
//!
//! Every value names its kind and format version (`"remus": "holder"`, `"v": 1`), so a key
//! that another program wrote under the prefix is refused by name ([`Parsed::Foreign`])
//! instead of being overwritten or misread.

use remus_ha::lineage::CopyStamp;
use serde::{Deserialize, Serialize};

/// Longest node or domain name (as the witness's wire).
pub const MAX_NAME: usize = remus_ha::witness::MAX_NAME;

/// Format version of the values written.
pub const FORMAT: u32 = 1;

/// Why a name or prefix cannot be used in a key, or `None` when it can.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME {
        Some("it is longer than 64 bytes")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("it contains whitespace or control characters")
    } else {
        None
    }
}

/// Why a key prefix cannot be used, or `None` when it can: it must start with `/`, not end
/// with one, and hold no empty segment, whitespace or control character.
pub fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if !prefix.starts_with('/') {
        Some("it must start with '/' (e.g. \"/remus\")")
    } else if prefix.len() == 1 {
        Some("it must name a directory below the root (e.g. \"/remus\"), not \"/\" itself")
    } else if prefix.ends_with('/') {
        Some("it must not end with '/'")
    } else if prefix.contains("//") {
        Some("it holds an empty segment (\"//\")")
    } else if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("it contains whitespace or control characters")
    } else if prefix.len() > 256 {
        Some("it is longer than 256 bytes")
    } else {
        None
    }
}

/// The keys of one domain under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainKeys {
    /// `P/domains/<domain>/`: everything of the domain (for the foreign-data check).
    pub dir: String,
    /// `P/domains/<domain>/holder`.
    pub holder: String,
    /// `P/domains/<domain>/copy`.
    pub copy: String,
}

impl DomainKeys {
    /// The keys of `domain` under `prefix` (both already checked).
    pub fn new(prefix: &str, domain: &str) -> Self {
        let dir = format!("{prefix}/domains/{domain}/");
        Self {
            holder: format!("{dir}holder"),
            copy: format!("{dir}copy"),
            dir,
        }
    }
}

/// Whether `key` (found under `P/`) is one this crate writes: `P/domains/<name>/holder` or
/// `P/domains/<name>/copy`.
pub fn is_own_key(prefix: &str, key: &str) -> bool {
    let Some(rest) = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix("/domains/"))
    else {
        return false;
    };
    match rest.split_once('/') {
        Some((domain, leaf)) => name_problem(domain).is_none() && matches!(leaf, "holder" | "copy"),
        None => false,
    }
}

/// The value of a domain's `holder` key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderRecord {
    /// Always `"holder"`.
    pub remus: String,
    /// [`FORMAT`].
    pub v: u32,
    /// The node that holds the lease.
    pub node: String,
    /// The node that may take it at once (a protecting primary's backup), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemptible_by: Option<String>,
}

impl HolderRecord {
    /// `node`'s record, preemptible by `peer` if given.
    pub fn new(node: &str, preemptible_by: Option<&str>) -> Self {
        Self {
            remus: "holder".into(),
            v: FORMAT,
            node: node.into(),
            preemptible_by: preemptible_by.map(str::to_string),
        }
    }
}

/// The value of a domain's `copy` key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRecord {
    /// Always `"copy"`.
    pub remus: String,
    /// [`FORMAT`].
    pub v: u32,
    /// The newest stamp recorded.
    pub stamp: CopyStamp,
    /// The node that recorded it.
    pub node: String,
}

impl CopyRecord {
    /// `node`'s record of `stamp`.
    pub fn new(node: &str, stamp: CopyStamp) -> Self {
        Self {
            remus: "copy".into(),
            v: FORMAT,
            stamp,
            node: node.into(),
        }
    }
}

/// A value read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// One of ours.
    Ours(T),
    /// Not ours, or of a format this release does not know: why.
    Foreign(String),
}

/// Reads a holder value.
pub fn parse_holder(bytes: &[u8]) -> Parsed<HolderRecord> {
    parse(bytes, "holder", |r: &HolderRecord| (r.remus.clone(), r.v))
}

/// Reads a copy value.
pub fn parse_copy(bytes: &[u8]) -> Parsed<CopyRecord> {
    parse(bytes, "copy", |r: &CopyRecord| (r.remus.clone(), r.v))
}

fn parse<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    kind: &str,
    tag: impl Fn(&T) -> (String, u32),
) -> Parsed<T> {
    // The kind and version first, so a newer format is named as such, not as garbage.
    #[derive(Deserialize)]
    struct Tag {
        remus: Option<String>,
        v: Option<u32>,
    }
    let head: Tag = match serde_json::from_slice(bytes) {
        Ok(t) => t,
        Err(_) => return Parsed::Foreign(describe_foreign(bytes)),
    };
    match (head.remus.as_deref(), head.v) {
        (Some(k), _) if k != kind => {
            return Parsed::Foreign(format!(
                "a remus-agent {k:?} record where a {kind:?} belongs"
            ))
        }
        (Some(_), Some(v)) if v != FORMAT => {
            return Parsed::Foreign(format!(
                "a {kind} record of format {v}; this release reads format {FORMAT}"
            ))
        }
        (Some(_), Some(_)) => {}
        _ => return Parsed::Foreign(describe_foreign(bytes)),
    }
    match serde_json::from_slice::<T>(bytes) {
        Ok(r) if tag(&r) == (kind.to_string(), FORMAT) => Parsed::Ours(r),
        Ok(_) => Parsed::Foreign(format!("a malformed {kind} record")),
        Err(e) => Parsed::Foreign(format!("a malformed {kind} record: {e}")),
    }
}

/// A short description of a value that is not ours (for the error message).
fn describe_foreign(bytes: &[u8]) -> String {
    let shown: String = String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    let more = if bytes.len() > 40 { "…" } else { "" };
    format!(
        "a value not written by remus-agent ({} bytes: {shown:?}{more})",
        bytes.len()
    )
}

/// A domain's holder key as read: the record and the key's etcd metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    /// The record.
    pub record: HolderRecord,
    /// The etcd lease the key is attached to.
    pub lease: i64,
    /// The key's mod revision (a grant's generation).
    pub mod_revision: i64,
}

/// What one grant request asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask<'a> {
    /// This node.
    pub node: &'a str,
    /// This node's etcd lease.
    pub lease: i64,
    /// The generation held (a renewal), 0 for an acquisition.
    pub generation: u64,
    /// The peer that may take it at once, when asked preemptible.
    pub preemptible_by: Option<&'a str>,
    /// Take it from a holder that declared it preemptible by this node.
    pub preempt: bool,
}

/// The verdict on a grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Held as asked already: nothing to write; the generation stays.
    Keep {
        /// The generation held.
        generation: u64,
    },
    /// Write our record, provided the key's mod revision is still `expect` (0: absent).
    Write {
        /// The mod revision the transaction compares.
        expect: i64,
    },
    /// Another node holds it.
    Denied {
        /// That node.
        holder: String,
    },
}

/// The witness's rule, on etcd: a grant succeeds if the lease is free (the key absent: the
/// old holder's etcd lease ran out), already held by the requester, or held by a node that
/// declared it preemptible by the requester and the requester preempts. A renewal of the
/// generation held, in the same mode, on the same etcd lease writes nothing.
pub fn decide(current: Option<&Current>, ask: &Ask<'_>) -> Grant {
    let Some(c) = current else {
        return Grant::Write { expect: 0 };
    };
    let ours = c.record.node == ask.node;
    let taken_over = ask.preempt && c.record.preemptible_by.as_deref() == Some(ask.node);
    if !ours && !taken_over {
        return Grant::Denied {
            holder: c.record.node.clone(),
        };
    }
    let same = ours
        && u64::try_from(c.mod_revision).ok() == Some(ask.generation)
        && ask.generation != 0
        && c.lease == ask.lease
        && c.record.preemptible_by.as_deref() == ask.preemptible_by;
    if same {
        Grant::Keep {
            generation: ask.generation,
        }
    } else {
        Grant::Write {
            expect: c.mod_revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_ha::lineage::CopyHolder;

    fn held(node: &str, by: Option<&str>, lease: i64, rev: i64) -> Current {
        Current {
            record: HolderRecord::new(node, by),
            lease,
            mod_revision: rev,
        }
    }

    fn ask<'a>(node: &'a str, generation: u64, by: Option<&'a str>, preempt: bool) -> Ask<'a> {
        Ask {
            node,
            lease: 7,
            generation,
            preemptible_by: by,
            preempt,
        }
    }

    /// One row per rule of [`decide`].
    #[test]
    fn the_grant_rule() {
        let rows: Vec<(&str, Option<Current>, Ask<'_>, Grant)> = vec![
            (
                "free: written, compared absent",
                None,
                ask("a", 0, None, false),
                Grant::Write { expect: 0 },
            ),
            (
                "held by another, exclusive: denied",
                Some(held("b", None, 9, 20)),
                ask("a", 0, None, false),
                Grant::Denied { holder: "b".into() },
            ),
            (
                "held by another, exclusive, preempting: still denied",
                Some(held("b", None, 9, 20)),
                ask("a", 0, None, true),
                Grant::Denied { holder: "b".into() },
            ),
            (
                "preemptible by us, but not preempting (a plain acquire): denied",
                Some(held("b", Some("a"), 9, 20)),
                ask("a", 0, None, false),
                Grant::Denied { holder: "b".into() },
            ),
            (
                "preemptible by a third node: denied",
                Some(held("b", Some("c"), 9, 20)),
                ask("a", 0, None, true),
                Grant::Denied { holder: "b".into() },
            ),
            (
                "preemptible by us, preempting: taken",
                Some(held("b", Some("a"), 9, 20)),
                ask("a", 0, None, true),
                Grant::Write { expect: 20 },
            ),
            (
                "ours, same generation, lease and mode: nothing written",
                Some(held("a", None, 7, 20)),
                ask("a", 20, None, false),
                Grant::Keep { generation: 20 },
            ),
            (
                "ours, the mode changes: written",
                Some(held("a", Some("b"), 7, 20)),
                ask("a", 20, None, false),
                Grant::Write { expect: 20 },
            ),
            (
                "ours, on an older etcd lease: moved to ours",
                Some(held("a", None, 3, 20)),
                ask("a", 20, None, false),
                Grant::Write { expect: 20 },
            ),
            (
                "ours, another generation (acquired anew): written",
                Some(held("a", None, 7, 20)),
                ask("a", 0, None, false),
                Grant::Write { expect: 20 },
            ),
            (
                "ours but preemptible, exclusive renewal: written (serialised against a takeover)",
                Some(held("a", Some("b"), 7, 20)),
                ask("a", 20, None, false),
                Grant::Write { expect: 20 },
            ),
        ];
        for (what, current, a, want) in rows {
            assert_eq!(decide(current.as_ref(), &a), want, "{what}");
        }
    }

    #[test]
    fn records_round_trip_and_foreign_values_are_named() {
        let h = HolderRecord::new("pri", Some("bak"));
        let bytes = serde_json::to_vec(&h).unwrap();
        assert_eq!(parse_holder(&bytes), Parsed::Ours(h));
        let c = CopyRecord::new(
            "bak",
            CopyStamp {
                generation: 4,
                holder: CopyHolder::Ran,
            },
        );
        let bytes = serde_json::to_vec(&c).unwrap();
        assert_eq!(parse_copy(&bytes), Parsed::Ours(c));
        // A copy record where a holder belongs.
        let Parsed::Foreign(why) = parse_holder(&bytes) else {
            panic!("a copy record read as a holder")
        };
        assert!(why.contains("\"copy\" record where a \"holder\""), "{why}");
        for (value, expect) in [
            (&b"hello"[..], "not written by remus-agent"),
            (&b"{\"kind\":\"Pod\"}"[..], "not written by remus-agent"),
            (
                &b"{\"remus\":\"holder\",\"v\":2,\"node\":\"a\"}"[..],
                "format 2",
            ),
            (
                &b"{\"remus\":\"holder\",\"v\":1,\"node\":\"a\",\"x\":1}"[..],
                "malformed holder",
            ),
            (&b"\xff\x00binary"[..], "not written by remus-agent"),
        ] {
            match parse_holder(value) {
                Parsed::Foreign(why) => assert!(why.contains(expect), "{why}"),
                Parsed::Ours(r) => panic!("{value:?} read as {r:?}"),
            }
        }
    }

    #[test]
    fn names_prefixes_and_keys() {
        assert_eq!(name_problem("web-1"), None);
        assert!(name_problem("").is_some());
        assert!(name_problem("a/b").is_some());
        assert!(name_problem("a b").is_some());
        assert!(name_problem(&"x".repeat(65)).is_some());
        assert_eq!(prefix_problem("/remus"), None);
        assert_eq!(prefix_problem("/site/a/remus"), None);
        for bad in ["remus", "/", "/remus/", "/a//b", "/a b", ""] {
            assert!(prefix_problem(bad).is_some(), "{bad:?}");
        }
        let k = DomainKeys::new("/remus", "web");
        assert_eq!(k.holder, "/remus/domains/web/holder");
        assert_eq!(k.copy, "/remus/domains/web/copy");
        assert_eq!(k.dir, "/remus/domains/web/");
        assert!(is_own_key("/remus", "/remus/domains/web/holder"));
        assert!(is_own_key("/remus", "/remus/domains/web/copy"));
        assert!(!is_own_key("/remus", "/remus/domains/web/other"));
        assert!(!is_own_key("/remus", "/remus/config"));
        assert!(!is_own_key("/remus", "/remus/domains/web"));
        assert!(!is_own_key("/remus", "/remusx/domains/web/holder"));
        assert!(!is_own_key("/remus", "/remus/domains/a/b/holder"));
    }
}
