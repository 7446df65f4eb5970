//! Secrets: [`Secret`] settings that never print themselves, and
//! encryption at rest for what Plinth must read back (stored answers that
//! carry a credential, and in time the other secrets it keeps): AES-256-GCM
//! from ring, under the keys of `PLINTH_ENCRYPTION_KEY`.
//!
//! Several keys may be given, comma-separated: the first seals, every one
//! opens, so a new key goes first and the old ones stay until nothing sealed
//! under them is left. A sealed value names its key by an id derived from
//! the key, so the order of the list can change. Each value is bound to a
//! context (what it is and whose), so a sealed value moved to another row
//! does not open.
//!
//! Sealed form: `0x01`, the key id (8 bytes), a random nonce (12 bytes),
//! then the ciphertext and its tag.

use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

const VERSION: u8 = 1;
const ID_LEN: usize = 8;
const KEY_LEN: usize = 32;
/// Where a key is generated when none is configured.
pub const GENERATED_FILE: &str = "encryption.key";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("an encryption key must be {KEY_LEN} bytes in base64 (`openssl rand -base64 32`)")]
    BadKey,
    #[error("no encryption key given")]
    NoKey,
    #[error("sealed with a key that is not configured")]
    UnknownKey,
    #[error("the sealed value is damaged, or belongs elsewhere")]
    Damaged,
    #[error("the system's random number generator failed")]
    Random,
}

struct Key {
    id: [u8; ID_LEN],
    aead: LessSafeKey,
}

/// The configured keys; the first seals.
pub struct Keyring {
    keys: Vec<Key>,
    random: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

impl Keyring {
    /// Keys in base64, comma-separated.
    pub fn parse(value: &str) -> Result<Self, CryptoError> {
        let keys = value
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                let bytes = STANDARD.decode(k).map_err(|_| CryptoError::BadKey)?;
                if bytes.len() != KEY_LEN {
                    return Err(CryptoError::BadKey);
                }
                let digest = ring::digest::digest(&ring::digest::SHA256, &[b"plinth key id\0", &bytes[..]].concat());
                let mut id = [0; ID_LEN];
                id.copy_from_slice(&digest.as_ref()[..ID_LEN]);
                let aead = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| CryptoError::BadKey)?;
                Ok(Key { id, aead: LessSafeKey::new(aead) })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(CryptoError::NoKey);
        }
        Ok(Self { keys, random: SystemRandom::new() })
    }

    /// The configured keys or, without any, the key kept in
    /// `data_dir/encryption.key`, generated there on first use (with a
    /// warning: instances that share a database must share the key).
    pub fn load(configured: Option<&str>, data_dir: &Path) -> anyhow::Result<Self> {
        if let Some(value) = configured {
            return Self::parse(value).context("PLINTH_ENCRYPTION_KEY");
        }
        let path = data_dir.join(GENERATED_FILE);
        let value = match std::fs::read_to_string(&path) {
            Ok(value) => value,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0; KEY_LEN];
                SystemRandom::new().fill(&mut key).map_err(|_| CryptoError::Random)?;
                let value = STANDARD.encode(key);
                write_private(&path, &value).with_context(|| format!("writing {}", path.display()))?;
                value
            }
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        tracing::warn!(
            path = %path.display(),
            "PLINTH_ENCRYPTION_KEY is not set: secrets are sealed with the key kept in this file; \
             set PLINTH_ENCRYPTION_KEY in production (every instance needs the same key)"
        );
        Self::parse(&value).with_context(|| format!("the key in {}", path.display()))
    }

    /// `plain` sealed under the first key, bound to `context`.
    pub fn seal(&self, plain: &[u8], context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = self.keys.first().ok_or(CryptoError::NoKey)?;
        let mut nonce = [0; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut sealed = Vec::with_capacity(1 + ID_LEN + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&key.id);
        sealed.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context), &mut body)
            .map_err(|_| CryptoError::Damaged)?;
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    /// What [`Keyring::seal`] sealed with `context`, under any configured key.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (Some(&VERSION), Some(id), Some(nonce), Some(body)) = (
            sealed.first(),
            sealed.get(1..1 + ID_LEN),
            sealed.get(1 + ID_LEN..1 + ID_LEN + NONCE_LEN),
            sealed.get(1 + ID_LEN + NONCE_LEN..),
        ) else {
            return Err(CryptoError::Damaged);
        };
        let key = self.keys.iter().find(|k| k.id == id).ok_or(CryptoError::UnknownKey)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Damaged)?;
        let mut body = body.to_vec();
        let plain = key.aead.open_in_place(nonce, Aad::from(context), &mut body).map_err(|_| CryptoError::Damaged)?;
        Ok(plain.to_vec())
    }

    /// Whether `value` looks sealed (rather than a plain value stored
    /// before sealing began).
    pub fn is_sealed(value: &[u8]) -> bool {
        value.first() == Some(&VERSION)
    }
}

/// A secret setting (a database URL with its password, an API key, a
/// token): its `Debug` is `Secret([redacted])` and it has no `Display`, so
/// it reaches a log or an error message only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Writes `value` to a new file only its owner can read.
fn write_private(path: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(value.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const B: &str = "HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

    #[test]
    fn sealed_values_open_under_any_listed_key_and_only_in_their_context() {
        let old = Keyring::parse(A).unwrap();
        let sealed = old.seal(b"secret", b"row 1").unwrap();
        assert!(Keyring::is_sealed(&sealed));
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(old.open(&sealed, b"row 1").unwrap(), b"secret");
        assert!(matches!(old.open(&sealed, b"row 2"), Err(CryptoError::Damaged)));
        // Rotation: the new key seals, the old one still opens.
        let both = Keyring::parse(&format!("{B}, {A}")).unwrap();
        assert_eq!(both.open(&sealed, b"row 1").unwrap(), b"secret");
        let resealed = both.seal(b"secret", b"row 1").unwrap();
        assert!(matches!(old.open(&resealed, b"row 1"), Err(CryptoError::UnknownKey)));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(old.open(&flipped, b"row 1"), Err(CryptoError::Damaged)));
        assert!(matches!(old.open(&sealed[..10], b"row 1"), Err(CryptoError::Damaged)));
    }

    #[test]
    fn a_secret_never_prints_itself() {
        let secret = Secret::new("hunter2-token");
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
        assert_eq!(format!("{:?}", Some(vec![secret.clone()])), "Some([Secret([redacted])])");
        assert_eq!(secret.expose(), "hunter2-token");
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(matches!(Keyring::parse(""), Err(CryptoError::NoKey)));
        assert!(matches!(Keyring::parse("c2hvcnQ="), Err(CryptoError::BadKey)));
        assert!(matches!(Keyring::parse("not base64!"), Err(CryptoError::BadKey)));
        assert!(format!("{:?}", Keyring::parse(A).unwrap()).contains("keys: 1"));
    }

    #[test]
    fn without_a_configured_key_one_is_generated_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("plinth-keyring-{}", uuid::Uuid::new_v4().simple()));
        let first = Keyring::load(None, &dir).unwrap();
        let sealed = first.seal(b"kept", b"ctx").unwrap();
        let again = Keyring::load(None, &dir).unwrap();
        assert_eq!(again.open(&sealed, b"ctx").unwrap(), b"kept");
        let mode = std::fs::metadata(dir.join(GENERATED_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
