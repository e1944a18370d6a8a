//! The Redis backend (`[store] backend = "redis"`): what several replicas
//! keep together. Refresh tokens, the access-token cache, the refresh
//! lease, upstream session slots per mailbox and login-failure counters.
//!
//! * Values that hold a token are sealed with [`super::seal`]: the store
//!   key, [`REDIS_MAGIC`], and the Redis key as associated data (a value
//!   cannot be passed off as another key's). Redis never sees a token or a
//!   password in clear.
//! * Every operation is bounded by [`OP_TIMEOUT`]; an error or a timeout is
//!   a [`StateError::Redis`], and the callers fall back to what they can do
//!   alone (see `oauth`, `limits`, `throttle`). Until the first connection
//!   is made, a new one is tried at most once per [`RECONNECT_EVERY`], so
//!   that logins do not each wait for a connect timeout; once made, the
//!   connection reconnects by itself after a failed command, and a command
//!   that found its connection closed (Redis restarted) is sent once more.
//! * Refresh tokens are never lost: the last one read or written is kept in
//!   memory per account, and a rotated one that cannot be written is kept as
//!   *pending* and written again every [`RETRY_EVERY`] until Redis takes it
//!   (and before the account's token is next read from Redis). If Redis
//!   has lost an account's refresh token (restarted without persistence),
//!   the last one this replica saw is written back.
//! * Key layout, under `key_prefix` (default [`DEFAULT_KEY_PREFIX`]):
//!   `rt:<account>` refresh token, `at:<cache key>` access token (expires
//!   with the token), `lease:<cache key>` refresh lease,
//!   `slots:<protocol>:<mailbox>` sorted set of held upstream sessions,
//!   `fail:` / `lock:` throttle counters.
//! * What must happen in one step (compare and delete, take a slot, count a
//!   failure) is a Lua script, in `redis/scripts.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use secrecy::{ExposeSecret, SecretBox, SecretString};

use super::seal::{OpenError, Seal, KEY_LEN, REDIS_MAGIC};
use super::StateError;
use scripts::{ACQUIRE_SLOT, FAILURE, RELEASE, RENEW_LEASE, RENEW_SLOT, TAKE_LEASE};

/// The longest any one Redis operation may take before it counts as a failure.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// While Redis is unreachable, how often a new connection is tried.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// How often a rotated refresh token that Redis did not take is written again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// The default start of every key.
pub const DEFAULT_KEY_PREFIX: &str = "oxbridge:";

/// Random bytes that name this replica (in slot members and lease fences).
const REPLICA_ID_BYTES: usize = 8;
/// Random bytes of a lease's fencing value.
const FENCE_BYTES: usize = 16;
/// The longest a connection attempt may back off between its retries (ms).
const MAX_CONNECT_DELAY_MS: u64 = 200;

mod scripts;

/// The replicas' state in one Redis.
pub struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    /// Held while a connection is being made; others fail fast meanwhile.
    connecting: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    prefix: String,
    seal: Seal,
    /// Distinguishes this process's members in the slot sets.
    replica: String,
    /// The last refresh token seen per account (for when Redis is down).
    known: Mutex<HashMap<String, SecretString>>,
    /// Rotated refresh tokens Redis has not taken yet.
    pending: Mutex<HashMap<String, SecretString>>,
    retrying: AtomicBool,
    release: redis::Script,
    take_lease: redis::Script,
    renew_lease: redis::Script,
    acquire_slot: redis::Script,
    renew_slot: redis::Script,
    failure: redis::Script,
}

/// A poisoned lock still guards whole values: take it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn redis_err(e: redis::RedisError) -> StateError {
    // The error text of a connection failure names host and port, never
    // the password of the URL.
    StateError::Redis(e.to_string())
}

/// A slot's life in whole milliseconds, at least one.
fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RedisStore {
    /// Prepare the client (no connection yet: that happens on first use,
    /// so that oxbridge starts, degraded, while Redis is down).
    pub fn new(
        url: &SecretString,
        prefix: Option<&str>,
        key: SecretBox<Vec<u8>>,
    ) -> Result<RedisStore, StateError> {
        let client = redis::Client::open(url.expose_secret())
            .map_err(|_| StateError::Redis("store.url: not a valid Redis URL".into()))?;
        let seal = Seal::new(key, REDIS_MAGIC).map_err(StateError::Redis)?;
        let replica: [u8; REPLICA_ID_BYTES] = rand::random();
        Ok(RedisStore {
            client,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            prefix: prefix.unwrap_or(DEFAULT_KEY_PREFIX).to_string(),
            seal,
            replica: hex(&replica),
            known: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            retrying: AtomicBool::new(false),
            release: redis::Script::new(RELEASE),
            take_lease: redis::Script::new(TAKE_LEASE),
            renew_lease: redis::Script::new(RENEW_LEASE),
            acquire_slot: redis::Script::new(ACQUIRE_SLOT),
            renew_slot: redis::Script::new(RENEW_SLOT),
            failure: redis::Script::new(FAILURE),
        })
    }

    /// A key for `purpose`, derived from the store key, the same in every
    /// replica.
    pub fn derived_key(&self, purpose: &str) -> [u8; KEY_LEN] {
        self.seal.derived_key(purpose)
    }

    /// The Redis key of `name` of this `kind` (`rt`, `at`, `lease`, ...).
    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{}", self.prefix, name.to_lowercase())
    }

    /// The connection, made now if there is none (at most once per
    /// [`RECONNECT_EVERY`] while Redis is unreachable).
    async fn conn(&self) -> Result<ConnectionManager, StateError> {
        if let Some(c) = lock(&self.conn).as_ref() {
            return Ok(c.clone());
        }
        let Ok(_connecting) = self.connecting.try_lock() else {
            return Err(StateError::Redis("unreachable (connecting)".into()));
        };
        {
            let mut last = lock(&self.last_attempt);
            if last.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                return Err(StateError::Redis("unreachable (retrying)".into()));
            }
            *last = Some(Instant::now());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(OP_TIMEOUT / 2)
            .set_response_timeout(OP_TIMEOUT / 2)
            .set_number_of_retries(0)
            .set_max_delay(MAX_CONNECT_DELAY_MS);
        let made = tokio::time::timeout(
            OP_TIMEOUT,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| StateError::Redis("connect timed out".into()))?
        .map_err(redis_err)?;
        tracing::info!("connected to the Redis store");
        *lock(&self.conn) = Some(made.clone());
        Ok(made)
    }

    /// Run one operation with the connection, bounded by [`OP_TIMEOUT`].
    ///
    /// A connection Redis has closed (a restart) is found out only by the
    /// next command, which fails at once while the connection reconnects:
    /// that command is sent once more, on the new connection. A command
    /// whose connection closed after it was sent may have run: every
    /// script gives the same answer twice (see `scripts`), plain reads and
    /// writes are the same twice, and a counted failure at worst counts
    /// once more.
    async fn op<T, F, Fut>(&self, f: F) -> Result<T, StateError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        let attempt = async {
            match f(conn.clone()).await {
                // Not a timeout: a command that timed out may have run.
                Err(e) if e.is_connection_dropped() || e.is_connection_refusal() => f(conn).await,
                r => r,
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, attempt).await {
            Ok(r) => r.map_err(redis_err),
            Err(_) => Err(StateError::Redis("timed out".into())),
        }
    }

    /// Run one prepared script, bounded like every operation.
    async fn invoke(&self, script: &redis::ScriptInvocation<'_>) -> Result<i64, StateError> {
        self.op(|mut c| async move { script.invoke_async(&mut c).await })
            .await
    }

    /// Whether Redis answers now (for readiness and tests).
    pub async fn ping(&self) -> Result<(), StateError> {
        self.op(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    fn open(&self, key: &str, sealed: &[u8]) -> Result<Vec<u8>, StateError> {
        self.seal.open(key.as_bytes(), sealed).map_err(|e| match e {
            OpenError::NotSealed => StateError::Redis(format!("{key}: not an oxbridge value")),
            OpenError::Rejected => StateError::Redis(format!(
                "{key}: cannot decrypt (another store key than the other replicas?)"
            )),
        })
    }

    async fn get_sealed(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let value: Option<Vec<u8>> = self.op(|mut c| async move { c.get(key).await }).await?;
        value.map(|v| self.open(key, &v)).transpose()
    }

    async fn set_sealed(
        &self,
        key: &str,
        plain: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let value = &self.seal.seal(key.as_bytes(), plain);
        self.op(|mut c| async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(value);
            if let Some(ttl) = ttl {
                cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            cmd.query_async::<()>(&mut c).await
        })
        .await
    }

    // ---------------------------------------------------------- refresh tokens

    /// The refresh token of `account` this process saw last.
    fn known(&self, account: &str) -> Option<SecretString> {
        lock(&self.known).get(account).cloned()
    }

    fn remember(&self, account: &str, token: &SecretString) {
        lock(&self.known).insert(account.to_lowercase(), token.clone());
    }

    /// The refresh token of `account`: a pending one is written first; if
    /// Redis cannot be read, the last one this process saw.
    pub async fn load_refresh(&self, account: &str) -> Result<Option<SecretString>, StateError> {
        let account = account.to_lowercase();
        let pending = lock(&self.pending).get(&account).cloned();
        if let Some(token) = pending {
            if self.write_refresh(&account, &token).await.is_ok() {
                lock(&self.pending).remove(&account);
            }
            return Ok(Some(token));
        }
        match self.get_sealed(&self.key("rt", &account)).await {
            Ok(Some(plain)) => {
                let token = SecretString::from(
                    String::from_utf8(plain)
                        .map_err(|_| StateError::Redis(format!("rt:{account}: corrupt")))?,
                );
                self.remember(&account, &token);
                Ok(Some(token))
            }
            Ok(None) => {
                // Redis lost it (restarted without persistence, say): what
                // this replica saw last is the newest there is. Put it back.
                let known = self.known(&account);
                if let Some(token) = &known {
                    tracing::warn!(%account, "refresh token missing from Redis; restoring the one this replica read last");
                    if let Err(e) = self.write_refresh(&account, token).await {
                        tracing::warn!(%account, error = %e, "cannot restore the refresh token");
                    }
                }
                Ok(known)
            }
            Err(e) => match self.known(&account) {
                Some(token) => {
                    tracing::warn!(%account, error = %e, "Redis unreachable; using the refresh token this replica read last");
                    Ok(Some(token))
                }
                None => Err(e),
            },
        }
    }

    async fn write_refresh(&self, account: &str, token: &SecretString) -> Result<(), StateError> {
        self.set_sealed(
            &self.key("rt", account),
            token.expose_secret().as_bytes(),
            None,
        )
        .await
    }

    /// Store a refresh token (one SET of one sealed value: never partial).
    /// Err if Redis did not take it; see [`RedisStore::save_refresh_or_keep`].
    pub async fn save_refresh(
        &self,
        account: &str,
        token: &SecretString,
    ) -> Result<(), StateError> {
        self.remember(account, token);
        self.write_refresh(&account.to_lowercase(), token).await?;
        lock(&self.pending).remove(&account.to_lowercase());
        Ok(())
    }

    /// A rotated refresh token: saved, or kept in memory and written again
    /// until Redis takes it. Never dropped.
    pub async fn save_refresh_or_keep(self: &Arc<Self>, account: &str, token: &SecretString) {
        if let Err(e) = self.save_refresh(account, token).await {
            tracing::error!(%account, error = %e, "cannot write the rotated refresh token to Redis; keeping it in memory and retrying");
            lock(&self.pending).insert(account.to_lowercase(), token.clone());
            if !self.retrying.swap(true, Ordering::SeqCst) {
                let me = self.clone();
                tokio::spawn(async move { me.retry_pending().await });
            }
        }
    }

    async fn retry_pending(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RETRY_EVERY).await;
            let todo: Vec<(String, SecretString)> = lock(&self.pending)
                .iter()
                .map(|(a, t)| (a.clone(), t.clone()))
                .collect();
            for (account, token) in todo {
                if self.write_refresh(&account, &token).await.is_ok() {
                    let mut pending = lock(&self.pending);
                    // Only if no newer one came meanwhile.
                    if pending
                        .get(&account)
                        .is_some_and(|t| t.expose_secret() == token.expose_secret())
                    {
                        pending.remove(&account);
                    }
                    tracing::info!(%account, "rotated refresh token written to Redis");
                }
            }
            let mut pending = lock(&self.pending);
            if pending.is_empty() {
                self.retrying.store(false, Ordering::SeqCst);
                return;
            }
            pending.shrink_to_fit();
        }
    }

    /// Whether a rotated refresh token still waits to be written (tests, readiness).
    pub fn pending_writes(&self) -> usize {
        lock(&self.pending).len()
    }

    /// The token-health record of `account`.
    pub async fn get_health(&self, account: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.get_sealed(&self.key("health", account)).await
    }

    /// Replace the token-health record of `account` (no expiry).
    pub async fn set_health(&self, account: &str, record: &[u8]) -> Result<(), StateError> {
        self.set_sealed(&self.key("health", account), record, None)
            .await
    }

    // ------------------------------------------------------- access-token cache

    /// A cached access-token entry (opaque bytes, sealed).
    pub async fn get_access(&self, cache_key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.get_sealed(&self.key("at", cache_key)).await
    }

    /// Cache an access-token entry for `ttl` (not at all if zero).
    pub async fn put_access(
        &self,
        cache_key: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<(), StateError> {
        if ttl.is_zero() {
            return Ok(());
        }
        self.set_sealed(&self.key("at", cache_key), entry, Some(ttl))
            .await
    }

    /// Forget a cached access-token entry.
    pub async fn delete_access(&self, cache_key: &str) -> Result<(), StateError> {
        let k = &self.key("at", cache_key);
        self.op(|mut c| async move { c.del::<_, ()>(k).await })
            .await
    }

    /// Take the refresh lease of `cache_key` for `ttl`: Some(fencing value)
    /// if we hold it now, None if another replica does.
    pub async fn lease(
        &self,
        cache_key: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StateError> {
        let fence: [u8; FENCE_BYTES] = rand::random();
        let fence = format!("{}:{}", self.replica, hex(&fence));
        let mut script = self.take_lease.key(self.key("lease", cache_key));
        script.arg(&fence).arg(ttl.as_millis() as u64);
        Ok((self.invoke(&script).await? == 1).then_some(fence))
    }

    /// Give the lease back if it still holds `fence` (compare and delete).
    pub async fn release_lease(&self, cache_key: &str, fence: &str) -> Result<(), StateError> {
        let mut script = self.release.key(self.key("lease", cache_key));
        self.invoke(script.arg(fence)).await.map(|_| ())
    }

    /// Extend our lease of `cache_key` to `ttl` from now; false if it is no
    /// longer ours (it expired and another replica took it).
    pub async fn renew_lease(
        &self,
        cache_key: &str,
        fence: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let mut script = self.renew_lease.key(self.key("lease", cache_key));
        script.arg(fence).arg(ttl.as_millis() as u64);
        Ok(self.invoke(&script).await? == 1)
    }

    // ---------------------------------------------------------- session slots

    /// Try to take one of `limit` slots of `set` for `expiry` (measured by
    /// Redis's clock): the member that holds it (this replica's), or None
    /// if all are taken.
    pub async fn acquire_slot(
        &self,
        set: &str,
        limit: usize,
        expiry: Duration,
    ) -> Result<Option<String>, StateError> {
        let member = format!("{}:{:016x}", self.replica, rand::random::<u64>());
        let mut script = self.acquire_slot.key(self.key("slots", set));
        script.arg(millis(expiry)).arg(limit).arg(&member);
        Ok((self.invoke(&script).await? == 1).then_some(member))
    }

    /// Push a held slot's expiry out to `expiry` from now (Redis's now);
    /// false if it is gone (expired).
    pub async fn renew_slot(
        &self,
        set: &str,
        member: &str,
        expiry: Duration,
    ) -> Result<bool, StateError> {
        let mut script = self.renew_slot.key(self.key("slots", set));
        script.arg(millis(expiry)).arg(member);
        Ok(self.invoke(&script).await? == 1)
    }

    /// Give a held slot back.
    pub async fn release_slot(&self, set: &str, member: &str) -> Result<(), StateError> {
        let k = &self.key("slots", set);
        self.op(|mut c| async move { c.zrem::<_, _, ()>(k, member).await })
            .await
    }

    // --------------------------------------------------------------- throttle

    /// Which of these lockout keys are set now.
    pub async fn locked(&self, names: &[String]) -> Result<Vec<bool>, StateError> {
        let keys: Vec<String> = names.iter().map(|n| self.key("lock", n)).collect();
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.exists(k);
        }
        let pipe = &pipe;
        self.op(|mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// Count a failure of `name`; returns the failures within `window`. At
    /// `lockout_failures`, `lock:<name>` is set for `lockout`.
    pub async fn failure(
        &self,
        name: &str,
        window: Duration,
        lockout_failures: u32,
        lockout: Duration,
    ) -> Result<u32, StateError> {
        let mut script = self.failure.key(self.key("fail", name));
        script
            .key(self.key("lock", name))
            .arg(window.as_millis() as u64)
            .arg(lockout_failures)
            .arg(lockout.as_millis() as u64);
        Ok(self.invoke(&script).await?.clamp(0, u32::MAX as i64) as u32)
    }

    /// Forget the failures of these names (not their lockouts).
    pub async fn clear_failures(&self, names: &[String]) -> Result<(), StateError> {
        let keys: Vec<String> = names.iter().map(|n| self.key("fail", n)).collect();
        let keys = &keys;
        self.op(|mut c| async move { c.del::<_, ()>(keys).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose Redis is never there: nothing listens on port 1.
    fn unreachable(key: u8) -> RedisStore {
        RedisStore::new(
            &SecretString::from("redis://127.0.0.1:1/".to_string()),
            None,
            SecretBox::new(Box::new(vec![key; KEY_LEN])),
        )
        .unwrap()
    }

    #[test]
    fn sealed_values_are_bound_to_key_and_store_key() {
        let s = unreachable(1);
        let sealed = s.seal.seal(b"oxbridge:rt:a", b"rt-MARKER");
        assert!(sealed.starts_with(REDIS_MAGIC));
        assert!(!sealed.windows(6).any(|w| w == b"MARKER"));
        assert_eq!(s.open("oxbridge:rt:a", &sealed).unwrap(), b"rt-MARKER");
        assert!(s.open("oxbridge:rt:b", &sealed).is_err());
        assert!(unreachable(2).open("oxbridge:rt:a", &sealed).is_err());
        assert!(s.open("oxbridge:rt:a", b"garbage").is_err());
        // Replicas given one store key agree on derived keys, not on names.
        assert_eq!(s.derived_key("x"), unreachable(1).derived_key("x"));
        assert_ne!(s.derived_key("x"), unreachable(2).derived_key("x"));
        assert_ne!(s.replica, unreachable(1).replica);
    }

    #[tokio::test]
    async fn unreachable_redis_fails_fast_and_keeps_rotated_tokens() {
        let s = Arc::new(unreachable(1));
        let t = Instant::now();
        assert!(s.ping().await.is_err());
        // The next attempts within RECONNECT_EVERY do not even try.
        assert!(s.get_access("app").await.is_err());
        assert!(t.elapsed() < OP_TIMEOUT * 2);
        let token = SecretString::from("rt-2".to_string());
        s.save_refresh_or_keep("A@x.test", &token).await;
        assert_eq!(s.pending_writes(), 1);
        assert_eq!(
            s.load_refresh("a@x.test")
                .await
                .unwrap()
                .unwrap()
                .expose_secret(),
            "rt-2"
        );
    }
}
