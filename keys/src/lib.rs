//! A node's static X25519 identity, shared by everything that authenticates per node.
//!
//! Why a crate of its own: the replication channel (`remus-engine`, Noise XX), the
//! heartbeats and the witness protocol (`remus-ha`, HMAC keys derived from X25519 shared
//! secrets) and `remus-witness` all need the same key pair type and the same text form, and
//! neither crate should import the other. Keys are written as standard base64 (44
//! characters), as WireGuard writes them, so operators can copy them between policies.
//!
//! The arithmetic is `curve25519-dalek`'s (the same implementation `snow` uses for Noise):
//! scalars are clamped as RFC 7748 says, and a shared secret that comes out all zeroes (a
//! low-order public key) is refused, since anyone could compute it.

use curve25519_dalek::montgomery::MontgomeryPoint;
use serde::Serialize;
use thiserror::Error;

/// Length of a private key, a public key and a shared secret.
pub const KEY_LEN: usize = 32;

/// A key that does not parse or cannot be used; names the key or file.
#[derive(Debug, Error)]
#[error("{what}: {reason}")]
pub struct KeyError {
    /// The key or file, e.g. `public key "abc"` or `node key /etc/remus/node.key`.
    pub what: String,
    /// Why.
    pub reason: String,
}

/// A node's public X25519 key: what a peer pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// The key of these raw bytes (as a Noise handshake reports the peer's static key).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use base64::Engine;
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s.trim()).map(Self).map_err(|reason| KeyError {
            what: format!("public key {s:?}"),
            reason,
        })
    }
}

fn decode_key(text: &str) -> Result<[u8; KEY_LEN], String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("not base64: {e}"))?;
    <[u8; KEY_LEN]>::try_from(raw.as_slice()).map_err(|_| {
        format!(
            "{} bytes, an X25519 key is {KEY_LEN} (44 base64 characters)",
            raw.len()
        )
    })
}

/// A node's static X25519 key pair. The private half never leaves this type except as the
/// key file's text and for a Noise handshake ([`NodeKey::private_bytes`]); `Debug` shows the
/// public half only.
#[derive(Clone)]
pub struct NodeKey {
    private: [u8; KEY_LEN],
    public: PublicKey,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey(public {})", self.public)
    }
}

impl NodeKey {
    /// A new random key pair from the operating system's random source.
    ///
    /// # Errors
    /// [`KeyError`] if no random bytes could be drawn.
    pub fn generate() -> Result<Self, KeyError> {
        let mut private = [0u8; KEY_LEN];
        rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut private).map_err(|e| {
            KeyError {
                what: "new node key".into(),
                reason: format!("no random bytes from the operating system: {e}"),
            }
        })?;
        Ok(Self::from_private(private))
    }

    /// The key pair of a private key (clamped by X25519 itself).
    pub fn from_private(private: [u8; KEY_LEN]) -> Self {
        let public = PublicKey(MontgomeryPoint::mul_base_clamped(private).to_bytes());
        Self { private, public }
    }

    /// Parses the text of a key file: the private key in base64, as `remusctl keygen` writes
    /// it (surrounding whitespace ignored). File mode checks are the caller's.
    ///
    /// # Errors
    /// [`KeyError`] naming `what` (usually the file's path).
    pub fn from_text(text: &str, what: &str) -> Result<Self, KeyError> {
        decode_key(text.trim())
            .map(Self::from_private)
            .map_err(|reason| KeyError {
                what: format!("node key {what}"),
                reason,
            })
    }

    /// The private key as a key file holds it (base64 and a newline).
    pub fn to_file_text(&self) -> String {
        use base64::Engine;
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(self.private)
        )
    }

    /// The private key's bytes, for a Noise handshake's `local_private_key` only.
    pub fn private_bytes(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// X25519(this private key, `peer`): the same 32 bytes on both ends, known to no one
    /// else. Per-node MAC keys (heartbeats, witness) are derived from it.
    ///
    /// # Errors
    /// [`KeyError`] for a low-order public key (the secret would be all zeroes, known to
    /// anyone).
    pub fn shared_secret(&self, peer: &PublicKey) -> Result<[u8; KEY_LEN], KeyError> {
        let out = MontgomeryPoint(peer.0).mul_clamped(self.private).to_bytes();
        if out == [0u8; KEY_LEN] {
            return Err(KeyError {
                what: format!("public key {peer}"),
                reason: "a low-order point (the shared secret would be all zeroes)".into(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_compute_the_same_secret_and_a_third_key_another() {
        let (a, b, c) = (
            NodeKey::generate().unwrap(),
            NodeKey::generate().unwrap(),
            NodeKey::generate().unwrap(),
        );
        let ab = a.shared_secret(&b.public()).unwrap();
        assert_eq!(ab, b.shared_secret(&a.public()).unwrap());
        assert_ne!(ab, c.shared_secret(&b.public()).unwrap());
        assert_ne!(a.public(), b.public());
    }

    #[test]
    fn rfc7748_test_vector() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect();
            v.try_into().unwrap()
        };
        let alice = NodeKey::from_private(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = NodeKey::from_private(hex(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            alice.public().as_bytes(),
            &hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            alice.shared_secret(&bob.public()).unwrap(),
            hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
    }

    #[test]
    fn text_forms_round_trip_and_bad_text_is_refused_with_the_reason() {
        let a = NodeKey::generate().unwrap();
        let again = NodeKey::from_text(&a.to_file_text(), "test").unwrap();
        assert_eq!(again.public(), a.public());
        let text = a.public().to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), a.public());
        for (bad, why) in [
            ("", "0 bytes"),
            ("not base64!", "not base64"),
            ("AAAA", "3 bytes"),
        ] {
            let e = bad.parse::<PublicKey>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            let e = NodeKey::from_text(bad, "/etc/remus/node.key").unwrap_err();
            assert!(e.to_string().contains("/etc/remus/node.key"), "{e}");
        }
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let a = NodeKey::generate().unwrap();
        let e = a.shared_secret(&PublicKey([0; KEY_LEN])).unwrap_err();
        assert!(e.to_string().contains("low-order"), "{e}");
    }
}
