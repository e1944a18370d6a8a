//! What outlives a login: the refresh tokens of `refresh_token` accounts,
//! and, with several replicas, what they keep together (the access-token
//! cache, the refresh lease, session slots per mailbox, failure counters).
//!
//! The backend is chosen once, by [`State::open`] from `[store] backend`,
//! and callers (`oauth::Tokens`, `limits::MailboxLimits`,
//! `throttle::Throttle`) hold the [`State`] without asking which it is:
//!
//! * [`State::File`] (the default): one process. Refresh tokens are files
//!   under `state_dir` ([`file::FileStore`]), opened only if an account
//!   needs them.
//! * [`State::Redis`]: the replicas' state in Redis ([`redis::RedisStore`]).
//!
//! Both seal what they store with the one [`seal`]. An operation over all
//! replicas (cache, lease, slots, counters) either succeeds or answers
//! [`Alone`]: the caller then does it in this process. That is the normal
//! answer of the file backend ([`Alone::Single`]: this process is the whole
//! count) and the fallback of Redis when it fails ([`Alone::Failed`]: the
//! caller warns and counts it in `oxbridge_redis_errors_total`).

pub mod file;
pub mod health;
pub mod redis;
pub mod seal;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::SecretString;

use crate::config::{Config, Grant, StoreBackend};
pub use file::FileStore;
pub use health::{Event, TokenHealth};
pub use redis::RedisStore;
use seal::{KeySource, KEY_LEN};

/// A backend's failure; the text names the backend and never a secret.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("token store: {0}")]
    File(String),
    #[error("redis store: {0}")]
    Redis(String),
    /// The file backend without a token store: no `refresh_token` account
    /// existed at start.
    #[error("no token store")]
    NoTokenStore,
}

/// Why an operation over all replicas was not done: the caller does it in
/// this process instead.
#[derive(Debug, thiserror::Error)]
pub enum Alone {
    /// The file backend: this process is the only one.
    #[error("no other replicas (file backend)")]
    Single,
    /// Redis failed: this process's own count holds until it is back.
    #[error(transparent)]
    Failed(StateError),
}

impl Alone {
    /// The Redis failure, if that is why (the caller warns and counts it);
    /// None for the file backend, where being alone is normal.
    pub fn failure(&self) -> Option<&StateError> {
        match self {
            Alone::Single => None,
            Alone::Failed(e) => Some(e),
        }
    }
}

/// The state backend of this process, chosen once.
pub enum State {
    /// `backend = "file"`: this process alone; the token store if a
    /// `refresh_token` account needs one.
    File(Option<FileStore>),
    /// `backend = "redis"`: what the replicas keep together.
    Redis(Arc<RedisStore>),
}

/// Milliseconds since the Unix epoch by this machine's clock. Nothing
/// that replicas must agree on is measured with it: Redis slots expire by
/// Redis's own clock.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl State {
    /// The backend of this config. Redis connects on first use (so that
    /// oxbridge starts, degraded, while it is down) and never creates a key
    /// file; the file backend opens `state_dir` only if a `refresh_token`
    /// account needs it.
    pub fn open(config: &Config) -> Result<State, StateError> {
        match config.store.backend {
            StoreBackend::Redis => {
                let url = config.store.url.as_ref().ok_or_else(|| {
                    StateError::Redis("store.url: needed with backend = \"redis\"".into())
                })?;
                let key = KeySource::of(config)
                    .read(false)
                    .map_err(StateError::Redis)?;
                let store = RedisStore::new(url, config.store.key_prefix.as_deref(), key)?;
                Ok(State::Redis(Arc::new(store)))
            }
            StoreBackend::File => {
                let needed = config
                    .accounts
                    .iter()
                    .any(|a| a.grant == Grant::RefreshToken);
                Ok(State::File(match needed {
                    true => Some(FileStore::of(config)?),
                    false => None,
                }))
            }
        }
    }

    /// Whether refresh tokens can be read and written (a reload cannot add
    /// the file backend's token store).
    pub fn has_refresh_tokens(&self) -> bool {
        !matches!(self, State::File(None))
    }

    /// Whether the store answers now: Redis a PING (bounded like every
    /// operation); the file backend has nothing to reach.
    pub async fn reachable(&self) -> Result<(), StateError> {
        match self {
            State::File(_) => Ok(()),
            State::Redis(r) => r.ping().await,
        }
    }

    /// Where refresh tokens go, for people: `state_dir`, or Redis.
    pub fn location(&self) -> String {
        match self {
            State::File(Some(store)) => store.state_dir().display().to_string(),
            State::File(None) => "no token store".into(),
            State::Redis(_) => "Redis".into(),
        }
    }

    /// A 32-byte key for `purpose` that every process of this state agrees
    /// on: with Redis, derived from the store key (the same in every
    /// replica); with the file backend (one process), a random one made
    /// now, so call it once and keep it.
    pub fn agreed_key(&self, purpose: &str) -> [u8; KEY_LEN] {
        match self {
            State::File(_) => rand::random(),
            State::Redis(r) => r.derived_key(purpose),
        }
    }

    // ---------------------------------------------------------- refresh tokens

    /// The refresh token of `account`, if one is stored. Redis answers,
    /// while it is down, with the one this replica saw last.
    pub async fn load_refresh(&self, account: &str) -> Result<Option<SecretString>, StateError> {
        match self {
            State::File(Some(store)) => store.load(account),
            State::File(None) => Err(StateError::NoTokenStore),
            State::Redis(r) => r.load_refresh(account).await,
        }
    }

    /// Store the refresh token of `account` (`oxbridge login`): Err unless
    /// it is written.
    pub async fn save_refresh(
        &self,
        account: &str,
        token: &SecretString,
    ) -> Result<(), StateError> {
        match self {
            State::File(Some(store)) => store.save(account, token),
            State::File(None) => Err(StateError::NoTokenStore),
            State::Redis(r) => r.save_refresh(account, token).await,
        }
    }

    /// Store a rotated refresh token before its access token is used. The
    /// file backend writes it or fails; Redis writes it or keeps it in
    /// memory and writes it again until Redis takes it (never Err).
    pub async fn keep_rotated(
        &self,
        account: &str,
        token: &SecretString,
    ) -> Result<(), StateError> {
        match self {
            State::File(_) => self.save_refresh(account, token).await,
            State::Redis(r) => {
                r.save_refresh_or_keep(account, token).await;
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------ token health

    /// The token times of `account` (default when none are recorded).
    pub async fn health(&self, account: &str) -> Result<TokenHealth, StateError> {
        let bytes = match self {
            State::File(Some(store)) => store.load_health(account)?,
            State::File(None) => return Err(StateError::NoTokenStore),
            State::Redis(r) => r.get_health(account).await?,
        };
        Ok(bytes.map_or_else(TokenHealth::default, |b| TokenHealth::from_bytes(&b)))
    }

    /// Record `event` for `account` now. A record that cannot be read or
    /// written is a warning: it only feeds `oxbridge check` and `/metrics`.
    /// Returns the record as it now stands.
    pub async fn note(&self, account: &str, event: Event) -> TokenHealth {
        let now = unix_ms() / 1000;
        let record = self
            .health(account)
            .await
            .unwrap_or_default()
            .after(event, now);
        let bytes = record.to_bytes();
        let written = match self {
            State::File(Some(store)) => store.save_health(account, &bytes),
            State::File(None) => Ok(()),
            State::Redis(r) => r.set_health(account, &bytes).await,
        };
        if let Err(e) = written {
            tracing::warn!(%account, error = %e, "cannot record the token times");
        }
        record
    }

    // ------------------------------------------------------- access-token cache

    /// The replicas' cached access-token entry of `cache_key` (opaque bytes).
    pub async fn get_access(&self, cache_key: &str) -> Result<Option<Vec<u8>>, Alone> {
        self.redis()?
            .get_access(cache_key)
            .await
            .map_err(Alone::Failed)
    }

    /// Cache an access-token entry for the replicas for `ttl`.
    pub async fn put_access(
        &self,
        cache_key: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<(), Alone> {
        self.redis()?
            .put_access(cache_key, entry, ttl)
            .await
            .map_err(Alone::Failed)
    }

    /// Forget the replicas' cached entry of `cache_key`.
    pub async fn delete_access(&self, cache_key: &str) -> Result<(), Alone> {
        self.redis()?
            .delete_access(cache_key)
            .await
            .map_err(Alone::Failed)
    }

    // ----------------------------------------------------------- refresh lease

    /// Take the refresh lease of `cache_key` for `ttl`: Some(fencing value)
    /// if this process holds it now, None if another replica does.
    pub async fn lease(&self, cache_key: &str, ttl: Duration) -> Result<Option<String>, Alone> {
        self.redis()?
            .lease(cache_key, ttl)
            .await
            .map_err(Alone::Failed)
    }

    /// Extend our lease to `ttl` from now; false if it is no longer ours.
    pub async fn renew_lease(
        &self,
        cache_key: &str,
        fence: &str,
        ttl: Duration,
    ) -> Result<bool, Alone> {
        self.redis()?
            .renew_lease(cache_key, fence, ttl)
            .await
            .map_err(Alone::Failed)
    }

    /// Give the lease back if it still holds `fence`.
    pub async fn release_lease(&self, cache_key: &str, fence: &str) -> Result<(), Alone> {
        self.redis()?
            .release_lease(cache_key, fence)
            .await
            .map_err(Alone::Failed)
    }

    // ---------------------------------------------------------- session slots

    /// Take one of `limit` slots of `set` over all replicas until `expiry`:
    /// Some(member) that holds it, None if all are taken.
    pub async fn acquire_slot(
        &self,
        set: &str,
        limit: usize,
        expiry: Duration,
    ) -> Result<Option<String>, Alone> {
        self.redis()?
            .acquire_slot(set, limit, expiry)
            .await
            .map_err(Alone::Failed)
    }

    /// Push a held slot's expiry out; false if it is gone (expired).
    pub async fn renew_slot(
        &self,
        set: &str,
        member: &str,
        expiry: Duration,
    ) -> Result<bool, Alone> {
        self.redis()?
            .renew_slot(set, member, expiry)
            .await
            .map_err(Alone::Failed)
    }

    /// Give a held slot back.
    pub async fn release_slot(&self, set: &str, member: &str) -> Result<(), Alone> {
        self.redis()?
            .release_slot(set, member)
            .await
            .map_err(Alone::Failed)
    }

    // ---------------------------------------------------------- login failures

    /// Which of these names are locked out over all replicas now.
    pub async fn locked(&self, names: &[String]) -> Result<Vec<bool>, Alone> {
        self.redis()?.locked(names).await.map_err(Alone::Failed)
    }

    /// Count a failure of `name` over all replicas: the failures within
    /// `window`; at `lockout_failures`, `name` is locked out for `lockout`.
    pub async fn failure(
        &self,
        name: &str,
        window: Duration,
        lockout_failures: u32,
        lockout: Duration,
    ) -> Result<u32, Alone> {
        self.redis()?
            .failure(name, window, lockout_failures, lockout)
            .await
            .map_err(Alone::Failed)
    }

    /// Forget the failures of these names (not their lockouts).
    pub async fn clear_failures(&self, names: &[String]) -> Result<(), Alone> {
        self.redis()?
            .clear_failures(names)
            .await
            .map_err(Alone::Failed)
    }

    /// The Redis store, or [`Alone::Single`] for the file backend.
    fn redis(&self) -> Result<&RedisStore, Alone> {
        match self {
            State::File(_) => Err(Alone::Single),
            State::Redis(r) => Ok(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_backend_does_everything_alone() {
        let state = State::File(None);
        assert!(!state.has_refresh_tokens());
        assert!(matches!(state.get_access("app").await, Err(Alone::Single)));
        assert!(matches!(
            state
                .acquire_slot("smtp:a@x.test", 3, Duration::from_secs(1))
                .await,
            Err(Alone::Single)
        ));
        assert!(state
            .locked(&["acct:a".into()])
            .await
            .unwrap_err()
            .failure()
            .is_none());
        assert!(matches!(
            state.load_refresh("a@x.test").await,
            Err(StateError::NoTokenStore)
        ));
        assert_ne!(state.agreed_key("x"), state.agreed_key("x"));
    }

    #[tokio::test]
    async fn the_file_backend_keeps_rotated_tokens_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), &KeySource::File(dir.path().join("k"))).unwrap();
        let state = State::File(Some(store));
        assert!(state.has_refresh_tokens());
        assert_eq!(state.location(), dir.path().display().to_string());
        let token = SecretString::from("rt-1".to_string());
        state.keep_rotated("A@x.test", &token).await.unwrap();
        let back = state.load_refresh("a@x.test").await.unwrap().unwrap();
        assert_eq!(secrecy::ExposeSecret::expose_secret(&back), "rt-1");
    }

    #[tokio::test]
    async fn a_failing_redis_says_why() {
        let store = RedisStore::new(
            &SecretString::from("redis://127.0.0.1:1/".to_string()),
            None,
            secrecy::SecretBox::new(Box::new(vec![1u8; KEY_LEN])),
        )
        .unwrap();
        let state = State::Redis(Arc::new(store));
        assert_eq!(state.location(), "Redis");
        let alone = state.get_access("app").await.unwrap_err();
        assert!(
            matches!(alone.failure(), Some(StateError::Redis(_))),
            "{alone:?}"
        );
        assert_eq!(state.agreed_key("x"), state.agreed_key("x"));
    }
}
