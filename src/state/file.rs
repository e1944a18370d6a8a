//! The file backend's token store: the refresh tokens of `refresh_token`
//! accounts, one file per account under `state_dir/tokens/`, sealed with
//! [`super::seal`] ([`FILE_MAGIC`], the account as associated data, so a
//! file cannot be passed off as another account's).
//!
//! * Writes are atomic: temp file in the same directory, fsync, rename,
//!   fsync of the directory. A crash at any point leaves either the old or
//!   the new token readable, never a torn file.
//! * `state_dir` and `tokens/` are created 0700, token files are 0600; a
//!   missing key file is created (0600) on first use.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::seal::{create_private_dir, KeySource, OpenError, Seal, FILE_MAGIC, PRIVATE_FILE_MODE};
use super::StateError;
use crate::config::Config;

/// Largest token file read back (a refresh token is a few KiB).
pub const MAX_FILE: u64 = 64 * 1024;
/// Bytes of the account's SHA-256 that name its file.
const NAME_BYTES: usize = 16;

fn err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> StateError {
    StateError::File(format!("{context}: {e}"))
}

/// Refresh tokens in files under `state_dir`.
pub struct FileStore {
    state_dir: PathBuf,
    dir: PathBuf,
    seal: Seal,
}

impl FileStore {
    /// The store of this config (`state_dir`, `[store] key_env`/`key_file`),
    /// whatever its backend: what `oxbridge::open_store` gives the tests.
    pub fn of(config: &Config) -> Result<FileStore, StateError> {
        FileStore::open(&config.state_dir, &KeySource::of(config))
    }

    /// Open (creating as needed) the store under `state_dir`.
    pub fn open(state_dir: &Path, key: &KeySource) -> Result<FileStore, StateError> {
        create_private_dir(state_dir).map_err(StateError::File)?;
        let dir = state_dir.join("tokens");
        create_private_dir(&dir).map_err(StateError::File)?;
        let key = key.read(true).map_err(StateError::File)?;
        let seal = Seal::new(key, FILE_MAGIC).map_err(StateError::File)?;
        Ok(FileStore {
            state_dir: state_dir.to_path_buf(),
            dir,
            seal,
        })
    }

    /// Where the tokens are (for the `oxbridge login` message).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn path(&self, account: &str) -> PathBuf {
        let digest = Sha256::digest(account.to_lowercase().as_bytes());
        let name: String = digest
            .iter()
            .take(NAME_BYTES)
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join(format!("{name}.tok"))
    }

    fn aad(account: &str) -> Vec<u8> {
        format!("oxbridge-refresh-token:{}", account.to_lowercase()).into_bytes()
    }

    /// The stored refresh token of `account`, if any (off the async threads).
    pub fn load(&self, account: &str) -> Result<Option<SecretString>, StateError> {
        unblocked(|| self.load_now(account))
    }

    fn load_now(&self, account: &str) -> Result<Option<SecretString>, StateError> {
        let path = self.path(account);
        let data = match File::open(&path) {
            Ok(f) => {
                let mut data = Vec::new();
                f.take(MAX_FILE)
                    .read_to_end(&mut data)
                    .map_err(|e| err(path.display(), e))?;
                data
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(path.display(), e)),
        };
        let plain = self
            .seal
            .open(&Self::aad(account), &data)
            .map_err(|e| match e {
                OpenError::NotSealed => {
                    StateError::File(format!("{}: not a token file", path.display()))
                }
                OpenError::Rejected => StateError::File(format!(
                    "{}: cannot decrypt (wrong key, or not this account's file)",
                    path.display()
                )),
            })?;
        let text = String::from_utf8(plain)
            .map_err(|_| StateError::File(format!("{}: corrupt", path.display())))?;
        Ok(Some(SecretString::from(text)))
    }

    /// Store `token` as the refresh token of `account`, atomically (its
    /// fsyncs off the async threads).
    pub fn save(&self, account: &str, token: &SecretString) -> Result<(), StateError> {
        unblocked(|| self.save_now(account, token))
    }

    fn save_now(&self, account: &str, token: &SecretString) -> Result<(), StateError> {
        let temp = self.write_temp(account, token)?;
        let path = self.path(account);
        fs::rename(&temp, &path).map_err(|e| err(path.display(), e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(self.dir.display(), e))?;
        Ok(())
    }

    /// The token-health record of `account` (times only, not sealed).
    pub fn load_health(&self, account: &str) -> Result<Option<Vec<u8>>, StateError> {
        unblocked(|| self.load_health_now(account))
    }

    fn load_health_now(&self, account: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.path(account).with_extension("health");
        match File::open(&path) {
            Ok(f) => {
                let mut data = Vec::new();
                f.take(super::health::MAX_RECORD)
                    .read_to_end(&mut data)
                    .map_err(|e| err(path.display(), e))?;
                Ok(Some(data))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(path.display(), e)),
        }
    }

    /// Replace the token-health record of `account` (temp file and rename,
    /// without the refresh token's fsyncs: losing one costs a line of
    /// `oxbridge check`, never a login).
    pub fn save_health(&self, account: &str, record: &[u8]) -> Result<(), StateError> {
        unblocked(|| self.save_health_now(account, record))
    }

    fn save_health_now(&self, account: &str, record: &[u8]) -> Result<(), StateError> {
        let path = self.path(account).with_extension("health");
        let temp = path.with_extension(format!("health-{}", std::process::id()));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&temp)
            .and_then(|mut f| f.write_all(record))
            .map_err(|e| err(temp.display(), e))?;
        fs::rename(&temp, &path).map_err(|e| err(path.display(), e))
    }

    /// First half of [`FileStore::save`]: the new content, durable, beside
    /// the old file.
    fn write_temp(&self, account: &str, token: &SecretString) -> Result<PathBuf, StateError> {
        let sealed = self
            .seal
            .seal(&Self::aad(account), token.expose_secret().as_bytes());
        let temp = self
            .path(account)
            .with_extension(format!("tmp-{}", std::process::id()));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&temp)
            .map_err(|e| err(temp.display(), e))?;
        f.write_all(&sealed)
            .and_then(|_| f.sync_all())
            .map_err(|e| err(temp.display(), e))?;
        Ok(temp)
    }
}

/// Run blocking file work `f` without holding up the async threads: on a
/// multi-threaded runtime (oxbridge's) the worker thread hands its other
/// tasks to another thread first; outside a runtime, or on a
/// current-thread one (tests, the command line), `f` just runs.
pub(crate) fn unblocked<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One worker thread: a task that blocks on disk (here a sleep) in
    /// [`unblocked`] must not stop another task from running meanwhile.
    #[test]
    fn slow_file_work_does_not_stop_other_tasks() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let ticks = Arc::new(AtomicUsize::new(0));
        let during = rt.block_on(async {
            let t = ticks.clone();
            tokio::spawn(async move {
                loop {
                    t.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            });
            tokio::task::yield_now().await;
            let t = ticks.clone();
            tokio::spawn(async move {
                let before = t.load(Ordering::SeqCst);
                unblocked(|| std::thread::sleep(std::time::Duration::from_millis(300)));
                t.load(Ordering::SeqCst) - before
            })
            .await
            .unwrap()
        });
        assert!(during >= 20, "the other task ran {during} times");
    }
    use std::os::unix::fs::PermissionsExt;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    fn store(dir: &Path) -> FileStore {
        FileStore::open(
            &dir.join("state"),
            &KeySource::File(dir.join("state/store.key")),
        )
        .unwrap()
    }

    #[test]
    fn health_records_round_trip_beside_the_token_privately() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(s.load_health("a@x.test").unwrap().is_none());
        s.save_health("a@x.test", br#"{"issued":5}"#).unwrap();
        s.save_health("A@x.test", br#"{"issued":6}"#).unwrap();
        assert_eq!(
            s.load_health("a@X.test").unwrap().unwrap(),
            br#"{"issued":6}"#
        );
        assert!(s.load("a@x.test").unwrap().is_none(), "not a token file");
        let files: Vec<_> = fs::read_dir(dir.path().join("state/tokens"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let mode = fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
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
            assert!(bytes.starts_with(FILE_MAGIC));
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
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var(
            "OXB_TEST_STORE_KEY",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
        );
        let env = |var: &str| KeySource::Env(var.to_string());
        let s = FileStore::open(dir.path(), &env("OXB_TEST_STORE_KEY")).unwrap();
        s.save("a@x.test", &secret("rt")).unwrap();
        assert!(!dir.path().join("store.key").exists());
        std::env::set_var("OXB_TEST_STORE_KEY_BAD", "c2hvcnQ=");
        assert!(FileStore::open(dir.path(), &env("OXB_TEST_STORE_KEY_BAD")).is_err());
        assert!(FileStore::open(dir.path(), &env("OXB_TEST_STORE_KEY_UNSET")).is_err());
    }
}
