//! The client's secret: `sk-fal-` and 32 base62 characters. Only its SHA-256
//! and a short display prefix are ever stored.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "sk-fal-";
const BODY_LEN: usize = 32;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Characters after `sk-fal-` kept for display: enough to tell keys apart, far too few to guess one.
const DISPLAY_CHARS: usize = 4;

/// The SHA-256 of a full key: the only form in which a key is stored or looked up.
pub type KeyHash = [u8; 32];

/// A freshly generated key, shown to its owner once.
pub struct NewSecret {
    pub secret: String,
    pub hash: KeyHash,
    pub display_prefix: String,
}

/// Draws a key from the OS's randomness. Rejection sampling keeps every
/// character uniform over the 62 (a plain `% 62` would favour the first 8).
pub fn generate() -> Result<NewSecret, getrandom::Error> {
    let mut secret = String::with_capacity(PREFIX.len() + BODY_LEN);
    secret.push_str(PREFIX);
    let mut buf = [0u8; 64];
    while secret.len() < PREFIX.len() + BODY_LEN {
        getrandom::getrandom(&mut buf)?;
        for &b in &buf {
            if b < 248 && secret.len() < PREFIX.len() + BODY_LEN {
                secret.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    Ok(NewSecret {
        hash: hash(&secret),
        display_prefix: secret[..PREFIX.len() + DISPLAY_CHARS].to_owned(),
        secret,
    })
}

pub fn hash(secret: &str) -> KeyHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `s` has the shape of one of our keys (says nothing of whether it exists).
pub fn well_formed(s: &str) -> bool {
    s.len() == PREFIX.len() + BODY_LEN
        && s.starts_with(PREFIX)
        && s.as_bytes()[PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert!(well_formed(&a.secret), "{}", a.secret);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash(&a.secret));
        assert!(a.secret.starts_with(&a.display_prefix));
        assert_eq!(a.display_prefix.len(), 11);
    }

    #[test]
    fn rejects_wrong_shapes() {
        let good = generate().unwrap().secret;
        assert!(!well_formed(&good[..good.len() - 1]));
        assert!(!well_formed(&format!("{good}x")));
        assert!(!well_formed(&good.replace("sk-fal-", "sk-faL-")));
        assert!(!well_formed(&format!("{}-", &good[..good.len() - 1])));
    }
}
