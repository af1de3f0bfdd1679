//! Authentication shared by the heartbeat and witness protocols: the key, the MAC, and the
//! sequence numbers that make replays detectable.
//!
//! Every datagram of this crate ends in an HMAC-SHA256 tag over all the bytes before it,
//! computed with a 32-byte key both agents (and the witness) derive from the same pre-shared
//! key file. Each protocol's datagrams start with their own magic, which the tag covers, so a
//! heartbeat can never be taken for a witness request or the other way round.
//!
//! Replay protection uses sequence numbers drawn from [`SequenceSource`]: each one is at least
//! the wall clock in microseconds and strictly greater than the previous one. Receivers keep
//! the highest number accepted (per link, per node) and drop anything not above it. Because
//! the counter starts from the clock rather than from zero, a sender that restarts continues
//! above everything it sent before (it would need to send more than one datagram per
//! microsecond to run ahead of the clock), so receivers need no reset rule that a replaying
//! attacker could exploit. The residual assumption — the sender's clock does not jump back
//! across its own restart by more than its uptime — is logged when violated: the receiver
//! counts the drops as replays until the sender's clock catches up.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::sync::{Arc, RwLock};
use thiserror::Error;

/// Length of the MAC tag at the end of every datagram.
pub const TAG_LEN: usize = 32;

/// Smallest key file accepted, in bytes (the same floor as the agent's `[auth] psk_file`).
pub const MIN_KEY_MATERIAL: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Errors reading or deriving the key.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("ha key file {path}: read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The key file can be read by its group or by others: a secret that is not one.
    #[error(
        "ha key file {path}: mode {mode:04o} lets {who} read it; \
         run `chmod 600 {path}` (keys must be readable by their owner only)"
    )]
    Exposed {
        path: String,
        mode: u32,
        who: &'static str,
    },
    /// The key material is too short to be a secret.
    #[error("ha key file {path}: {len} bytes, at least {MIN_KEY_MATERIAL} required")]
    TooShort { path: String, len: usize },
}

/// The 32-byte MAC key of the heartbeat and witness protocols.
///
/// Kept opaque (no `Debug` of the bytes) so it never lands in a log line.
#[derive(Clone)]
pub struct HaKey([u8; 32]);

impl std::fmt::Debug for HaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HaKey(..)")
    }
}

impl HaKey {
    /// Uses 32 bytes the caller already derived as the key, unchanged.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// Derives the key from pre-shared key material (the contents of the PSK file).
    ///
    /// The derivation is SHA-256 over a label and the material, so the heartbeat/witness key
    /// differs from the key the replication channel derives from the same file: a tag of one
    /// protocol is never valid in another. Returns `None` below [`MIN_KEY_MATERIAL`] bytes.
    pub fn derive(material: &[u8]) -> Option<Self> {
        if material.len() < MIN_KEY_MATERIAL {
            return None;
        }
        let mut h = Sha256::new();
        h.update(b"remus-agent ha key v1\0");
        h.update(material);
        Some(Self(h.finalize().into()))
    }

    /// Reads a PSK file and derives the key from it (see [`HaKey::derive`]).
    ///
    /// # Errors
    /// As [`read_key_file`]; [`KeyError::TooShort`] under 32 bytes.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let raw = read_key_file(path)?;
        Self::derive(&raw).ok_or(KeyError::TooShort {
            path: path.display().to_string(),
            len: raw.len(),
        })
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; 32 bytes never fails.
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// The witness protocol's key between one node and the witness, in per-node keys mode:
    /// derived from their X25519 shared secret and the node's name, so each node's requests
    /// are authenticated as that node's (one node cannot speak for another), and the witness
    /// holds nothing that opens the replication channel or the heartbeats (those derive from
    /// the two nodes' secret with each other, under another label).
    pub fn for_witness(shared_secret: &[u8; 32], node: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"remus-agent witness key v1\0");
        h.update(shared_secret);
        h.update(node.as_bytes());
        HaKey(h.finalize().into())
    }

    /// The tag of `body`.
    pub fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let mut m = self.mac();
        m.update(body);
        m.finalize().into_bytes().into()
    }

    /// Appends the tag of `buf` to it.
    pub fn seal(&self, buf: &mut Vec<u8>) {
        let tag = self.tag(buf);
        buf.extend_from_slice(&tag);
    }

    /// Splits `datagram` into body and tag and checks the tag in constant time.
    /// Returns the body when authentic.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        if datagram.len() < TAG_LEN {
            return None;
        }
        let (body, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        let mut m = self.mac();
        m.update(body);
        m.verify_slice(tag).ok().map(|()| body)
    }
}

/// One link key per direction and per pinned peer key.
#[derive(Clone, Debug)]
struct PinnedKeys {
    send: HaKey,
    accept: HaKey,
}

/// The MAC keys of the heartbeats between this node and its peer.
///
/// With a pre-shared key ([`PeerKeys::shared`]) one key tags both directions, and anyone
/// holding the file — the witness included — could forge either node's heartbeats. With
/// per-node keys ([`PeerKeys::per_node`]) the keys derive from the X25519 secret the two
/// nodes share (computed by the agent from its private key and the peer's pinned public
/// key), one key per direction so a reflected datagram never verifies, and one pair per
/// pinned peer key so a rotation keeps heartbeats flowing. The detector sends under the
/// pinned key the peer last proved ([`PeerKeys::send_keys`]), under each while it does not
/// know which one yet.
///
/// Clones share one key set: [`PeerKeys::replace`] (a policy reload during a key rotation)
/// changes it for the detector's sender and receivers at once, without a restart.
#[derive(Clone, Debug)]
pub struct PeerKeys {
    pins: Arc<RwLock<Vec<PinnedKeys>>>,
}

impl PeerKeys {
    /// One key for both directions (psk mode).
    pub fn shared(key: HaKey) -> Self {
        Self::of(vec![PinnedKeys {
            send: key.clone(),
            accept: key,
        }])
    }

    /// Keys derived from the X25519 secrets this node shares with each pinned public key of
    /// the peer (same order as the pins), mixed with `psk` when one is configured.
    /// `None` when `secrets` is empty.
    pub fn per_node(
        secrets: &[[u8; 32]],
        psk: Option<&HaKey>,
        node: &str,
        peer: &str,
    ) -> Option<Self> {
        if secrets.is_empty() {
            return None;
        }
        let direction = |secret: &[u8; 32], from: &str, to: &str| {
            let mut h = Sha256::new();
            h.update(b"remus-agent heartbeat key v1\0");
            h.update(secret);
            if let Some(psk) = psk {
                h.update(psk.0);
            }
            h.update(from.as_bytes());
            h.update([0u8]);
            h.update(to.as_bytes());
            HaKey(h.finalize().into())
        };
        Some(Self::of(
            secrets
                .iter()
                .map(|s| PinnedKeys {
                    send: direction(s, node, peer),
                    accept: direction(s, peer, node),
                })
                .collect(),
        ))
    }

    fn of(pins: Vec<PinnedKeys>) -> Self {
        Self {
            pins: Arc::new(RwLock::new(pins)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<PinnedKeys>> {
        // A writer cannot panic while holding the lock (it only assigns a Vec).
        self.pins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `with`'s keys, for this set and every clone of it. A "proven" pin index the
    /// detector holds may name another key afterwards; the peer's next heartbeat corrects it
    /// (within one interval).
    pub fn replace(&self, with: &PeerKeys) {
        let new = with.read().clone();
        *self
            .pins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
    }

    /// How many pinned peer keys there are (1, or 2 during a rotation).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Never true: a key set has at least one key.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Opens an incoming datagram under any accepted key; returns the body and which pin it
    /// verified under.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Option<(&'a [u8], usize)> {
        self.read()
            .iter()
            .enumerate()
            .find_map(|(i, p)| p.accept.open(datagram).map(|b| (b, i)))
    }

    /// The keys to send under: the pin the peer last proved, or every pin while unknown.
    pub fn send_keys(&self, proven: Option<usize>) -> Vec<HaKey> {
        let pins = self.read();
        let one = proven.filter(|&i| i < pins.len());
        pins.iter()
            .enumerate()
            .filter(|(i, _)| one.is_none_or(|o| o == *i))
            .map(|(_, p)| p.send.clone())
            .collect()
    }
}

/// Checks that only the key file's owner may read it: no read, write or execute bit for
/// group or others (what `ssh` and WireGuard's `wg` insist on too). The one place every
/// program that reads a key file (remusd, remus-witness, `remusctl config check`) asks.
///
/// # Errors
/// [`KeyError::Read`] if its metadata cannot be read, [`KeyError::Exposed`] if group or
/// others have any access.
pub fn check_key_file_mode(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    let who = match (mode & 0o070 != 0, mode & 0o007 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "its group",
        (false, true) => "others",
        (true, true) => "its group and others",
    };
    Err(KeyError::Exposed {
        path: path.display().to_string(),
        mode,
        who,
    })
}

/// Reads a key file after [`check_key_file_mode`].
///
/// # Errors
/// [`KeyError::Exposed`] or [`KeyError::Read`], naming the file.
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    check_key_file_mode(path)?;
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Wall clock in microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Wall clock in milliseconds since the Unix epoch, for records meant for humans.
pub fn unix_millis() -> u64 {
    unix_micros() / 1000
}

/// Strictly increasing sequence numbers that are never below the wall clock in microseconds.
///
/// Shared by all links of a sender, so a number is unique across links too.
#[derive(Debug, Default)]
pub struct SequenceSource {
    /// The last number handed out.
    last: AtomicU64,
}

impl SequenceSource {
    /// A new source; its first number is the current clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next number: `max(previous + 1, now in µs)`.
    pub fn next(&self) -> u64 {
        let now = unix_micros();
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_roundtrip_and_tamper() {
        let k = HaKey::derive(&[7u8; 40]).unwrap();
        let mut d = b"hello witness".to_vec();
        k.seal(&mut d);
        assert_eq!(k.open(&d), Some(&b"hello witness"[..]));
        // Any flipped bit in body or tag is refused.
        for i in 0..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x01;
            assert_eq!(k.open(&t), None, "flip at byte {i} accepted");
        }
        // Another key refuses it; a runt datagram is refused.
        let other = HaKey::derive(&[8u8; 40]).unwrap();
        assert_eq!(other.open(&d), None);
        assert_eq!(k.open(&d[..10]), None);
    }

    #[test]
    fn short_material_is_refused() {
        assert!(HaKey::derive(&[1u8; 31]).is_none());
        assert!(HaKey::derive(&[1u8; 32]).is_some());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("psk.key");
        std::fs::write(&p, [7u8; 32]).unwrap();
        let rows = [
            (0o600, None),
            (0o400, None),
            (0o640, Some("its group")),
            (0o604, Some("others")),
            (0o644, Some("its group and others")),
            (0o610, Some("its group")),
        ];
        for (mode, refused) in rows {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            match (HaKey::from_file(&p), refused) {
                (Ok(_), None) => {}
                (Err(e @ KeyError::Exposed { .. }), Some(who)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("psk.key") && e.contains(&format!("{mode:04o}")),
                        "{e}"
                    );
                    assert!(e.contains(&format!("lets {who} read")), "{e}");
                }
                (r, want) => panic!("mode {mode:o}: got {r:?}, want refusal {want:?}"),
            }
        }
    }

    #[test]
    fn key_file_errors_name_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short.key");
        std::fs::write(&p, b"short").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = HaKey::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("short.key") && e.contains("5 bytes"), "{e}");
        let e = HaKey::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, KeyError::Read { .. }));
    }

    #[test]
    fn sequence_is_strictly_increasing_and_clock_based() {
        let s = SequenceSource::new();
        let before = unix_micros();
        let mut prev = 0;
        for _ in 0..10_000 {
            let n = s.next();
            assert!(n > prev);
            prev = n;
        }
        assert!(prev >= before);
        // A restarted sender (new source) continues above the old one's numbers as long as
        // it did not outrun the clock by more than the time since.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let s2 = SequenceSource::new();
        assert!(s2.next() > prev);
    }

    #[test]
    fn per_node_heartbeat_keys_differ_per_direction_and_from_the_shared_key() {
        let secret = [5u8; 32];
        let psk = HaKey::derive(&[7u8; 40]).unwrap();
        let a = PeerKeys::per_node(&[secret], Some(&psk), "a", "b").unwrap();
        let b = PeerKeys::per_node(&[secret], Some(&psk), "b", "a").unwrap();
        let mut dg = b"beat".to_vec();
        a.send_keys(None).first().unwrap().seal(&mut dg);
        assert_eq!(
            b.open(&dg).map(|(body, i)| (body.to_vec(), i)),
            Some((b"beat".to_vec(), 0))
        );
        // Reflected back to its sender: not accepted (one key per direction).
        assert!(a.open(&dg).is_none());
        // The shared key alone (what the witness holds) does not verify it.
        assert!(PeerKeys::shared(psk.clone()).open(&dg).is_none());
        // Without the PSK layer on one side: different keys.
        let c = PeerKeys::per_node(&[secret], None, "b", "a").unwrap();
        assert!(c.open(&dg).is_none());
        assert!(PeerKeys::per_node(&[], None, "a", "b").is_none());
    }

    #[test]
    fn during_a_rotation_heartbeats_go_under_every_pin_until_one_is_proven() {
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let keys = PeerKeys::per_node(&[old, new], None, "a", "b").unwrap();
        assert_eq!(keys.send_keys(None).len(), 2);
        assert_eq!(keys.send_keys(Some(1)).len(), 1);
        // The peer that switched to its new key accepts the copy under pin 1 only.
        let peer_new = PeerKeys::per_node(&[new], None, "b", "a").unwrap();
        let opened: Vec<bool> = keys
            .send_keys(None)
            .iter()
            .map(|k| {
                let mut dg = b"beat".to_vec();
                k.seal(&mut dg);
                peer_new.open(&dg).is_some()
            })
            .collect();
        assert_eq!(opened, vec![false, true]);
        // And what the peer sends under its new key is proven as pin 1 here.
        let mut dg = b"beat".to_vec();
        peer_new.send_keys(None).first().unwrap().seal(&mut dg);
        assert_eq!(keys.open(&dg).map(|(_, i)| i), Some(1));
    }
}
