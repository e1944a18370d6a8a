//! The token store: refresh tokens of `refresh_token` accounts, one file
//! per account under `state_dir/tokens/`, encrypted at rest.
//!
//! * Encryption: XChaCha20-Poly1305 with a random nonce per write; the
//!   account's login is the associated data, so a file cannot be passed off
//!   as another account's. The 32-byte key comes from the environment
//!   variable named by `[store] key_env` (base64), or from `[store]
//!   key_file` (default `state_dir/store.key`), created on first use with
//!   mode 0600.
//! * Writes are atomic: temp file in the same directory, fsync, rename,
//!   fsync of the directory. A crash at any point leaves either the old or
//!   the new token readable, never a torn file.
//! * `state_dir` is created 0700, token files are 0600.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

/// What a token file starts with (format version 1).
const MAGIC: &[u8; 4] = b"OXT1";
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;
/// Largest token file read back (a refresh token is a few KiB).
const MAX_FILE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("token store: {0}")]
pub struct StoreError(pub String);

fn err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{context}: {e}"))
}

/// Where the store's key comes from.
pub enum KeySource<'a> {
    /// Base64 of 32 bytes in this environment variable.
    Env(&'a str),
    /// A file of 32 raw bytes, created (0600) if missing.
    File(&'a Path),
}

pub struct Store {
    dir: PathBuf,
    cipher: XChaCha20Poly1305,
}

impl Store {
    /// Open (creating as needed) the store under `state_dir`.
    pub fn open(state_dir: &Path, key: KeySource<'_>) -> Result<Store, StoreError> {
        create_private_dir(state_dir)?;
        let dir = state_dir.join("tokens");
        create_private_dir(&dir)?;
        let key = read_key(key, true)?;
        let cipher =
            XChaCha20Poly1305::new_from_slice(key.expose_secret()).map_err(|e| err("key", e))?;
        Ok(Store { dir, cipher })
    }

    fn path(&self, account: &str) -> PathBuf {
        let digest = Sha256::digest(account.to_lowercase().as_bytes());
        let name: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.tok"))
    }

    fn aad(account: &str) -> Vec<u8> {
        format!("oxbridge-refresh-token:{}", account.to_lowercase()).into_bytes()
    }

    /// The stored refresh token of `account`, if any.
    pub fn load(&self, account: &str) -> Result<Option<SecretString>, StoreError> {
        let path = self.path(account);
        let data = match File::open(&path) {
            Ok(f) => {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_FILE), &mut data)
                    .map_err(|e| err(path.display(), e))?;
                data
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(path.display(), e)),
        };
        if data.len() < MAGIC.len() + NONCE_LEN || &data[..MAGIC.len()] != MAGIC {
            return Err(StoreError(format!("{}: not a token file", path.display())));
        }
        let (nonce, ciphertext) = data[MAGIC.len()..].split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &Self::aad(account),
                },
            )
            .map_err(|_| {
                StoreError(format!(
                    "{}: cannot decrypt (wrong key, or not this account's file)",
                    path.display()
                ))
            })?;
        let text = String::from_utf8(plain)
            .map_err(|_| StoreError(format!("{}: corrupt", path.display())))?;
        Ok(Some(SecretString::from(text)))
    }

    /// Store `token` as the refresh token of `account`, atomically.
    pub fn save(&self, account: &str, token: &SecretString) -> Result<(), StoreError> {
        let temp = self.write_temp(account, token)?;
        let path = self.path(account);
        fs::rename(&temp, &path).map_err(|e| err(path.display(), e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(self.dir.display(), e))?;
        Ok(())
    }

    /// First half of [`save`]: the new content, durable, beside the old file.
    fn write_temp(&self, account: &str, token: &SecretString) -> Result<PathBuf, StoreError> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: token.expose_secret().as_bytes(),
                    aad: &Self::aad(account),
                },
            )
            .map_err(|e| err("encrypt", e))?;
        let temp = self
            .path(account)
            .with_extension(format!("tmp-{}", std::process::id()));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| err(temp.display(), e))?;
        f.write_all(MAGIC)
            .and_then(|_| f.write_all(&nonce))
            .and_then(|_| f.write_all(&ciphertext))
            .and_then(|_| f.sync_all())
            .map_err(|e| err(temp.display(), e))?;
        Ok(temp)
    }
}

/// The store's 32-byte key from `source`; a missing key file is created
/// (0600) only if `create` (the Redis backend never creates one: every
/// replica must be given the same key).
pub fn read_key(source: KeySource<'_>, create: bool) -> Result<SecretBox<Vec<u8>>, StoreError> {
    match source {
        KeySource::Env(var) => {
            let value = std::env::var(var)
                .map_err(|_| StoreError(format!("store.key_env: ${var} is not set")))?;
            let bytes = B64
                .decode(value.trim())
                .ok()
                .filter(|b| b.len() == KEY_LEN)
                .ok_or_else(|| {
                    StoreError(format!(
                        "store.key_env: ${var} must be the base64 of {KEY_LEN} bytes"
                    ))
                })?;
            Ok(SecretBox::new(Box::new(bytes)))
        }
        KeySource::File(path) if create => load_or_create_key(path),
        KeySource::File(path) => match fs::metadata(path) {
            Ok(_) => load_or_create_key(path),
            Err(e) => Err(err(format!("store.key_file {}", path.display()), e)),
        },
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(format!("state_dir {}", dir.display()), e))?;
    }
    Ok(())
}

fn load_or_create_key(path: &Path) -> Result<SecretBox<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) if bytes.len() == KEY_LEN => {
            let mode = fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o077)
                .unwrap_or(0);
            if mode != 0 {
                tracing::warn!(path = %path.display(), "store key file is readable by group or others; chmod 600 it");
            }
            Ok(SecretBox::new(Box::new(bytes)))
        }
        Ok(_) => Err(StoreError(format!(
            "store.key_file {}: must hold exactly {KEY_LEN} bytes",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                create_private_dir(parent)?;
            }
            let key: [u8; KEY_LEN] = rand::random();
            // create_new: two processes starting at once cannot both write a key.
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(mut f) => {
                    f.write_all(&key)
                        .and_then(|_| f.sync_all())
                        .map_err(|e| err(path.display(), e))?;
                    Ok(SecretBox::new(Box::new(key.to_vec())))
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
                Err(e) => Err(err(format!("store.key_file {}", path.display()), e)),
            }
        }
        Err(e) => Err(err(format!("store.key_file {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    fn store(dir: &Path) -> Store {
        Store::open(
            &dir.join("state"),
            KeySource::File(&dir.join("state/store.key")),
        )
        .unwrap()
    }

    #[test]
    fn round_trip_permissions_and_no_clear_text() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(s.load("a@x.test").unwrap().is_none());
        s.save("a@x.test", &secret("rt-MARKER-123")).unwrap();
        assert_eq!(
            s.load("A@x.test").unwrap().unwrap().expose_secret(),
            "rt-MARKER-123"
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("state")), 0o700);
        assert_eq!(mode(&dir.path().join("state/tokens")), 0o700);
        assert_eq!(mode(&dir.path().join("state/store.key")), 0o600);
        for entry in fs::read_dir(dir.path().join("state/tokens")).unwrap() {
            let p = entry.unwrap().path();
            assert_eq!(mode(&p), 0o600);
            let bytes = fs::read(&p).unwrap();
            assert!(
                !bytes.windows(6).any(|w| w == b"MARKER"),
                "clear text in {}",
                p.display()
            );
        }
        // A second open reuses the key.
        assert_eq!(
            store(dir.path())
                .load("a@x.test")
                .unwrap()
                .unwrap()
                .expose_secret(),
            "rt-MARKER-123"
        );
    }

    #[test]
    fn files_are_bound_to_their_account_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.save("a@x.test", &secret("rt-a")).unwrap();
        fs::copy(s.path("a@x.test"), s.path("b@x.test")).unwrap();
        assert!(
            s.load("b@x.test").is_err(),
            "a copied file must not decrypt as another account"
        );
        let other = tempfile::tempdir().unwrap();
        let s2 = store(other.path());
        fs::create_dir_all(s2.path("a@x.test").parent().unwrap()).unwrap();
        fs::copy(s.path("a@x.test"), s2.path("a@x.test")).unwrap();
        assert!(s2.load("a@x.test").is_err(), "another key must not decrypt");
    }

    #[test]
    fn a_crash_before_rename_leaves_the_old_token() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.save("a@x.test", &secret("rt-old")).unwrap();
        // The process dies after writing the new temp file, before rename.
        let temp = s.write_temp("a@x.test", &secret("rt-new")).unwrap();
        assert!(temp.exists());
        assert_eq!(
            store(dir.path())
                .load("a@x.test")
                .unwrap()
                .unwrap()
                .expose_secret(),
            "rt-old"
        );
        // The next save replaces both.
        s.save("a@x.test", &secret("rt-newer")).unwrap();
        assert_eq!(
            s.load("a@x.test").unwrap().unwrap().expose_secret(),
            "rt-newer"
        );
    }

    #[test]
    fn key_from_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("OXB_TEST_STORE_KEY", B64.encode([7u8; 32]));
        let s = Store::open(dir.path(), KeySource::Env("OXB_TEST_STORE_KEY")).unwrap();
        s.save("a@x.test", &secret("rt")).unwrap();
        assert!(!dir.path().join("store.key").exists());
        std::env::set_var("OXB_TEST_STORE_KEY_BAD", "c2hvcnQ=");
        assert!(Store::open(dir.path(), KeySource::Env("OXB_TEST_STORE_KEY_BAD")).is_err());
        assert!(Store::open(dir.path(), KeySource::Env("OXB_TEST_STORE_KEY_UNSET")).is_err());
    }
}
