//! Bearer secrets: generated from the OS's CSPRNG, stored only as SHA-256.
//!
//! A plain hash (no salt, no slow KDF) is right here: the secrets carry 256
//! bits of randomness, so they cannot be guessed, and authentication looks a
//! token up by its hash in one indexed query.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// A freshly generated secret: shown once, stored hashed.
pub struct Secret {
    pub plaintext: String,
    pub hash: String,
    /// Enough of the plaintext to recognise it in a list.
    pub prefix: String,
}

/// Generates a secret with a kind marker, e.g. `stratus_` for API tokens and
/// `stratus-enroll_` for enrollment tokens.
pub fn generate(marker: &str) -> Secret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let plaintext = format!("{marker}{}", URL_SAFE_NO_PAD.encode(bytes));
    let prefix = plaintext.chars().take(marker.len() + 6).collect();
    Secret {
        hash: hash(&plaintext),
        plaintext,
        prefix,
    }
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_hashed() {
        let a = generate("stratus_");
        let b = generate("stratus_");
        assert_ne!(a.plaintext, b.plaintext);
        assert!(a.plaintext.starts_with("stratus_"));
        // 32 random bytes: 43 base64url characters after the marker.
        assert_eq!(a.plaintext.len(), "stratus_".len() + 43);
        assert_eq!(a.hash, hash(&a.plaintext));
        assert_eq!(a.hash.len(), 64);
        assert!(a.plaintext.starts_with(&a.prefix));
    }
}
