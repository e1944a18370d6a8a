//! The one seal and open of oxbridge's state, and the store key they use.
//!
//! * A sealed value is `magic (4 bytes) | nonce (24) | ciphertext + tag`:
//!   XChaCha20-Poly1305 with a random nonce per seal. The magic says which
//!   backend wrote it ([`FILE_MAGIC`] for a token file, [`REDIS_MAGIC`] for
//!   a Redis value), so a value of one is never read as the other's.
//! * The caller names the associated data (the account for a token file,
//!   the Redis key for a value): a value moved to another place does not
//!   open there, and one sealed under another store key does not open.
//! * The store key is 32 bytes, from the environment variable named by
//!   `[store] key_env` (base64) or from `[store] key_file` (default
//!   `state_dir/store.key`). Only the file backend creates a missing key
//!   file (0600): every Redis replica must be given the same key.
//! * Other keys (the password-cache MAC) are derived from the store key with
//!   HMAC-SHA256 and a purpose, the same in every process given that key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::Sha256;

use crate::config::Config;

/// What a token file starts with (format version 1).
pub const FILE_MAGIC: &[u8; 4] = b"OXT1";
/// What a sealed Redis value starts with (format version 1).
pub const REDIS_MAGIC: &[u8; 4] = b"OXR1";
/// XChaCha20's nonce.
pub const NONCE_LEN: usize = 24;
/// The store key, and every key derived from it.
pub const KEY_LEN: usize = 32;
/// The mode of every file oxbridge keeps a secret in (key, tokens).
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The mode of the directories it creates for them.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Permission bits that must be clear on a key file (group and others).
const NOT_PRIVATE: u32 = 0o077;

/// Where the store key comes from.
pub enum KeySource {
    /// Base64 of [`KEY_LEN`] bytes in this environment variable.
    Env(String),
    /// A file of [`KEY_LEN`] raw bytes.
    File(PathBuf),
}

impl KeySource {
    /// The key of this config: `[store] key_env`, else `[store] key_file`
    /// (default `state_dir/store.key`).
    pub fn of(config: &Config) -> KeySource {
        match &config.store.key_env {
            Some(var) => KeySource::Env(var.clone()),
            None => KeySource::File(config.store_key_file()),
        }
    }

    /// The key; a missing key file is created (0600) only if `create`.
    pub fn read(&self, create: bool) -> Result<SecretBox<Vec<u8>>, String> {
        match self {
            KeySource::Env(var) => {
                let value =
                    std::env::var(var).map_err(|_| format!("store.key_env: ${var} is not set"))?;
                let bytes = B64
                    .decode(value.trim())
                    .ok()
                    .filter(|b| b.len() == KEY_LEN)
                    .ok_or_else(|| {
                        format!("store.key_env: ${var} must be the base64 of {KEY_LEN} bytes")
                    })?;
                Ok(SecretBox::new(Box::new(bytes)))
            }
            KeySource::File(path) if create => load_or_create_key(path),
            KeySource::File(path) => match fs::metadata(path) {
                Ok(_) => load_or_create_key(path),
                Err(e) => Err(format!("store.key_file {}: {e}", path.display())),
            },
        }
    }
}

/// Why a value did not open.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Too short, or not this backend's magic.
    NotSealed,
    /// Another key, or another place's associated data, or altered.
    Rejected,
}

/// Seals and opens the values of one backend with the store key.
pub struct Seal {
    cipher: XChaCha20Poly1305,
    key: SecretBox<Vec<u8>>,
    magic: &'static [u8; 4],
}

impl Seal {
    /// A seal with `key` for values that start with `magic`.
    pub fn new(key: SecretBox<Vec<u8>>, magic: &'static [u8; 4]) -> Result<Seal, String> {
        let cipher = XChaCha20Poly1305::new_from_slice(key.expose_secret())
            .map_err(|e| format!("key: {e}"))?;
        Ok(Seal { cipher, key, magic })
    }

    /// `plain`, sealed with `aad` as associated data.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
            .expect("XChaCha20-Poly1305 encrypts any length we use");
        let mut out = Vec::with_capacity(self.magic.len() + NONCE_LEN + ciphertext.len());
        out.extend_from_slice(self.magic);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// The plain text of `sealed`, if it was sealed here with this `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let magic = self.magic.len();
        if sealed.len() < magic + NONCE_LEN || &sealed[..magic] != self.magic {
            return Err(OpenError::NotSealed);
        }
        let (nonce, ciphertext) = sealed[magic..].split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| OpenError::Rejected)
    }

    /// A key for `purpose`, derived from the store key (HMAC-SHA256): the
    /// same in every process that has the store key.
    pub fn derived_key(&self, purpose: &str) -> [u8; KEY_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.expose_secret())
            .expect("any key length");
        mac.update(b"oxbridge derived key: ");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Create `dir` (and its parents) with mode 0700 if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(dir)
            .map_err(|e| format!("state_dir {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn load_or_create_key(path: &Path) -> Result<SecretBox<Vec<u8>>, String> {
    let context = |e: std::io::Error| format!("store.key_file {}: {e}", path.display());
    match fs::read(path) {
        Ok(bytes) if bytes.len() == KEY_LEN => {
            let mode = fs::metadata(path)
                .map(|m| m.permissions().mode() & NOT_PRIVATE)
                .unwrap_or(0);
            if mode != 0 {
                tracing::warn!(path = %path.display(), "store key file is readable by group or others; chmod 600 it");
            }
            Ok(SecretBox::new(Box::new(bytes)))
        }
        Ok(_) => Err(format!(
            "store.key_file {}: must hold exactly {KEY_LEN} bytes",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                create_private_dir(parent)?;
            }
            let key: [u8; KEY_LEN] = rand::random();
            // create_new: two processes starting at once cannot both write a key.
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(PRIVATE_FILE_MODE)
                .open(path)
            {
                Ok(mut f) => {
                    f.write_all(&key)
                        .and_then(|_| f.sync_all())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    Ok(SecretBox::new(Box::new(key.to_vec())))
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
                Err(e) => Err(context(e)),
            }
        }
        Err(e) => Err(context(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: u8, magic: &'static [u8; 4]) -> Seal {
        Seal::new(SecretBox::new(Box::new(vec![key; KEY_LEN])), magic).unwrap()
    }

    #[test]
    fn sealed_values_are_bound_to_aad_key_and_magic() {
        let s = seal(1, REDIS_MAGIC);
        let sealed = s.seal(b"oxbridge:rt:a", b"rt-MARKER");
        assert!(!sealed.windows(6).any(|w| w == b"MARKER"));
        assert_eq!(s.open(b"oxbridge:rt:a", &sealed).unwrap(), b"rt-MARKER");
        assert_eq!(s.open(b"oxbridge:rt:b", &sealed), Err(OpenError::Rejected));
        assert_eq!(
            seal(2, REDIS_MAGIC).open(b"oxbridge:rt:a", &sealed),
            Err(OpenError::Rejected)
        );
        assert_eq!(
            seal(1, FILE_MAGIC).open(b"oxbridge:rt:a", &sealed),
            Err(OpenError::NotSealed)
        );
        assert_eq!(
            s.open(b"oxbridge:rt:a", b"garbage"),
            Err(OpenError::NotSealed)
        );
    }

    #[test]
    fn derived_keys_agree_across_processes_and_differ_by_purpose() {
        let (a, b) = (seal(1, REDIS_MAGIC), seal(1, FILE_MAGIC));
        assert_eq!(a.derived_key("x"), b.derived_key("x"));
        assert_ne!(a.derived_key("x"), a.derived_key("y"));
        assert_ne!(a.derived_key("x"), seal(2, REDIS_MAGIC).derived_key("x"));
    }

    #[test]
    fn key_from_environment() {
        std::env::set_var("OXB_TEST_SEAL_KEY", B64.encode([7u8; KEY_LEN]));
        let key = KeySource::Env("OXB_TEST_SEAL_KEY".into())
            .read(true)
            .unwrap();
        assert_eq!(key.expose_secret(), &vec![7u8; KEY_LEN]);
        std::env::set_var("OXB_TEST_SEAL_KEY_BAD", "c2hvcnQ=");
        assert!(KeySource::Env("OXB_TEST_SEAL_KEY_BAD".into())
            .read(true)
            .is_err());
        assert!(KeySource::Env("OXB_TEST_SEAL_KEY_UNSET".into())
            .read(true)
            .is_err());
    }

    #[test]
    fn a_key_file_is_created_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/store.key");
        assert!(KeySource::File(path.clone()).read(false).is_err());
        let made = KeySource::File(path.clone()).read(true).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            PRIVATE_FILE_MODE
        );
        let again = KeySource::File(path).read(false).unwrap();
        assert_eq!(made.expose_secret(), again.expose_secret());
    }
}
