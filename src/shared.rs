//! The store that several replicas share (`[store] backend = "redis"`):
//! refresh tokens, the access-token cache, the refresh lease, upstream
//! session slots per mailbox and login-failure counters, in Redis.
//!
//! * Values that hold a token are sealed like the file store's: the same
//!   32-byte key, XChaCha20-Poly1305, a random nonce per write, and the
//!   Redis key as associated data (a value cannot be passed off as another
//!   key's). Redis never sees a token or a password in clear.
//! * Every operation is bounded by [`OP_TIMEOUT`]; an error or a timeout is
//!   [`SharedError`], and the callers fall back to what they can do alone
//!   (see `oauth`, `limits`, `throttle`). While Redis stays unreachable, a
//!   new connection is tried at most once per [`RECONNECT_EVERY`], so that
//!   logins do not each wait for a connect timeout.
//! * Refresh tokens are never lost: the last one read or written is kept in
//!   memory per account, and a rotated one that cannot be written is kept as
//!   *pending* and written again every [`RETRY_EVERY`] until Redis takes it
//!   (and before the account's token is next read from Redis). If Redis
//!   has lost an account's refresh token (restarted without persistence),
//!   the last one this replica saw is written back.
//! * Key layout, under `key_prefix` (default `oxbridge:`): `rt:<account>`
//!   refresh token, `at:<cache key>` access token (expires with the token),
//!   `lease:<cache key>` refresh lease, `slots:<protocol>:<mailbox>` sorted
//!   set of held upstream sessions, `fail:` / `lock:` throttle counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

/// The longest any one Redis operation may take before it counts as a failure.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// While Redis is unreachable, how often a new connection is tried.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// How often a rotated refresh token that Redis did not take is written again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// The default start of every key.
pub const DEFAULT_KEY_PREFIX: &str = "oxbridge:";

const MAGIC: &[u8; 4] = b"OXR1";
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
#[error("shared store (redis): {0}")]
pub struct SharedError(pub String);

/// Release a lease only if it still holds our fencing value.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Extend a lease only if it still holds our fencing value.
const RENEW_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Take a session slot: drop expired members, then add ours if fewer than
/// the limit are held. KEYS[1] set; ARGV: now ms, expiry ms, limit, member.
const ACQUIRE_SLOT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
  return 1
end
return 0";

/// Keep a held slot alive (only if it is still there).
const RENEW_SLOT: &str = r"
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
  return 1
end
return n";

/// Count a failure: KEYS fail, lock; ARGV window ms, lockout failures,
/// lockout ms. Returns the failures in the window.
const FAILURE: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
end
return n";

pub struct Shared {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    /// Held while a connection is being made; others fail fast meanwhile.
    connecting: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    prefix: String,
    cipher: XChaCha20Poly1305,
    /// Derives the other keys (password-cache MAC) from the store key.
    derive: SecretBox<Vec<u8>>,
    /// Distinguishes this process's members in shared sets.
    pub replica: String,
    /// The last refresh token seen per account (for when Redis is down).
    known: Mutex<HashMap<String, SecretString>>,
    /// Rotated refresh tokens Redis has not taken yet.
    pending: Mutex<HashMap<String, SecretString>>,
    retrying: AtomicBool,
    release: redis::Script,
    renew_lease: redis::Script,
    acquire_slot: redis::Script,
    renew_slot: redis::Script,
    failure: redis::Script,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn redis_err(e: redis::RedisError) -> SharedError {
    // The error text of a connection failure names host and port, never
    // the password of the URL.
    SharedError(e.to_string())
}

impl Shared {
    /// Prepare the client (no connection yet: that happens on first use,
    /// so that oxbridge starts, degraded, while Redis is down).
    pub fn new(
        url: &SecretString,
        prefix: Option<&str>,
        key: SecretBox<Vec<u8>>,
    ) -> Result<Shared, SharedError> {
        let client = redis::Client::open(url.expose_secret())
            .map_err(|_| SharedError("store.url: not a valid Redis URL".into()))?;
        let cipher = XChaCha20Poly1305::new_from_slice(key.expose_secret())
            .map_err(|e| SharedError(format!("key: {e}")))?;
        let replica: [u8; 8] = rand::random();
        Ok(Shared {
            client,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            prefix: prefix.unwrap_or(DEFAULT_KEY_PREFIX).to_string(),
            cipher,
            derive: key,
            replica: replica.iter().map(|b| format!("{b:02x}")).collect(),
            known: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            retrying: AtomicBool::new(false),
            release: redis::Script::new(RELEASE),
            renew_lease: redis::Script::new(RENEW_LEASE),
            acquire_slot: redis::Script::new(ACQUIRE_SLOT),
            renew_slot: redis::Script::new(RENEW_SLOT),
            failure: redis::Script::new(FAILURE),
        })
    }

    /// A 32-byte key for `purpose`, derived from the store key (HMAC-SHA256),
    /// the same in every replica.
    pub fn derived_key(&self, purpose: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.derive.expose_secret())
            .expect("any key length");
        mac.update(b"oxbridge derived key: ");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{}", self.prefix, name.to_lowercase())
    }

    /// The connection, made now if there is none (at most once per
    /// [`RECONNECT_EVERY`] while Redis is unreachable).
    async fn conn(&self) -> Result<ConnectionManager, SharedError> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(c.clone());
        }
        let Ok(_connecting) = self.connecting.try_lock() else {
            return Err(SharedError("unreachable (connecting)".into()));
        };
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                return Err(SharedError("unreachable (retrying)".into()));
            }
            *last = Some(Instant::now());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(OP_TIMEOUT / 2)
            .set_response_timeout(OP_TIMEOUT / 2)
            .set_number_of_retries(0)
            .set_max_delay(200);
        let made = tokio::time::timeout(
            OP_TIMEOUT,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| SharedError("connect timed out".into()))?
        .map_err(redis_err)?;
        tracing::info!("connected to the shared store (redis)");
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(made.clone());
        Ok(made)
    }

    /// Run one operation with the connection, bounded by [`OP_TIMEOUT`].
    async fn op<T, F, Fut>(&self, f: F) -> Result<T, SharedError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        match tokio::time::timeout(OP_TIMEOUT, f(conn)).await {
            Ok(r) => r.map_err(redis_err),
            Err(_) => Err(SharedError("timed out".into())),
        }
    }

    /// Whether Redis answers now (for readiness and tests).
    pub async fn ping(&self) -> Result<(), SharedError> {
        self.op(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    fn seal(&self, key: &str, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: key.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length we use");
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ciphertext.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    fn open(&self, key: &str, sealed: &[u8]) -> Result<Vec<u8>, SharedError> {
        if sealed.len() < MAGIC.len() + NONCE_LEN || &sealed[..MAGIC.len()] != MAGIC {
            return Err(SharedError(format!("{key}: not an oxbridge value")));
        }
        let (nonce, ciphertext) = sealed[MAGIC.len()..].split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| {
                SharedError(format!(
                    "{key}: cannot decrypt (another store key than the other replicas?)"
                ))
            })
    }

    async fn get_sealed(&self, key: &str) -> Result<Option<Vec<u8>>, SharedError> {
        let k = key.to_string();
        let value: Option<Vec<u8>> = self.op(|mut c| async move { c.get(k).await }).await?;
        value.map(|v| self.open(key, &v)).transpose()
    }

    async fn set_sealed(
        &self,
        key: &str,
        plain: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), SharedError> {
        let value = self.seal(key, plain);
        let k = key.to_string();
        self.op(|mut c| async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(k).arg(value);
            if let Some(ttl) = ttl {
                cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            cmd.query_async::<()>(&mut c).await
        })
        .await
    }

    // ---------------------------------------------------------- refresh tokens

    fn remember(&self, account: &str, token: &SecretString) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(account.to_lowercase(), token.clone());
    }

    /// The refresh token of `account`: a pending one is written first; if
    /// Redis cannot be read, the last one this process saw.
    pub async fn load_refresh(&self, account: &str) -> Result<Option<SecretString>, SharedError> {
        let account = account.to_lowercase();
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&account)
            .cloned();
        if let Some(token) = pending {
            return match self.write_refresh(&account, &token).await {
                Ok(()) => {
                    self.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&account);
                    Ok(Some(token))
                }
                Err(_) => Ok(Some(token)),
            };
        }
        match self.get_sealed(&self.key("rt", &account)).await {
            Ok(Some(plain)) => {
                let token = SecretString::from(
                    String::from_utf8(plain)
                        .map_err(|_| SharedError(format!("rt:{account}: corrupt")))?,
                );
                self.remember(&account, &token);
                Ok(Some(token))
            }
            Ok(None) => {
                // Redis lost it (restarted without persistence, say): what
                // this replica saw last is the newest there is. Put it back.
                let known = self
                    .known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&account)
                    .cloned();
                if let Some(token) = &known {
                    tracing::warn!(%account, "refresh token missing from the shared store; restoring the one this replica read last");
                    if let Err(e) = self.write_refresh(&account, token).await {
                        tracing::warn!(%account, error = %e, "cannot restore the refresh token");
                    }
                }
                Ok(known)
            }
            Err(e) => {
                let known = self
                    .known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&account)
                    .cloned();
                match known {
                    Some(token) => {
                        tracing::warn!(%account, error = %e, "shared store unreachable; using the refresh token this replica read last");
                        Ok(Some(token))
                    }
                    None => Err(e),
                }
            }
        }
    }

    async fn write_refresh(&self, account: &str, token: &SecretString) -> Result<(), SharedError> {
        self.set_sealed(
            &self.key("rt", account),
            token.expose_secret().as_bytes(),
            None,
        )
        .await
    }

    /// Store a refresh token (one SET of one sealed value: never partial).
    /// Err if Redis did not take it; see [`Shared::save_refresh_or_keep`].
    pub async fn save_refresh(
        &self,
        account: &str,
        token: &SecretString,
    ) -> Result<(), SharedError> {
        self.remember(account, token);
        self.write_refresh(&account.to_lowercase(), token).await?;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&account.to_lowercase());
        Ok(())
    }

    /// A rotated refresh token: saved, or kept in memory and written again
    /// until Redis takes it. Never dropped.
    pub async fn save_refresh_or_keep(self: &Arc<Self>, account: &str, token: &SecretString) {
        if let Err(e) = self.save_refresh(account, token).await {
            tracing::error!(%account, error = %e, "cannot write the rotated refresh token to the shared store; keeping it in memory and retrying");
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(account.to_lowercase(), token.clone());
            if !self.retrying.swap(true, Ordering::SeqCst) {
                let me = self.clone();
                tokio::spawn(async move { me.retry_pending().await });
            }
        }
    }

    async fn retry_pending(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RETRY_EVERY).await;
            let todo: Vec<(String, SecretString)> = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(a, t)| (a.clone(), t.clone()))
                .collect();
            for (account, token) in todo {
                if self.write_refresh(&account, &token).await.is_ok() {
                    let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    // Only if no newer one came meanwhile.
                    if pending
                        .get(&account)
                        .is_some_and(|t| t.expose_secret() == token.expose_secret())
                    {
                        pending.remove(&account);
                    }
                    tracing::info!(%account, "rotated refresh token written to the shared store");
                }
            }
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.is_empty() {
                self.retrying.store(false, Ordering::SeqCst);
                drop(pending);
                return;
            }
            pending.shrink_to_fit();
        }
    }

    /// Whether a rotated refresh token still waits to be written (tests, readiness).
    pub fn pending_writes(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    // ------------------------------------------------------- access-token cache

    /// A cached access-token entry (opaque bytes, sealed).
    pub async fn get_access(&self, cache_key: &str) -> Result<Option<Vec<u8>>, SharedError> {
        self.get_sealed(&self.key("at", cache_key)).await
    }

    pub async fn put_access(
        &self,
        cache_key: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<(), SharedError> {
        if ttl.is_zero() {
            return Ok(());
        }
        self.set_sealed(&self.key("at", cache_key), entry, Some(ttl))
            .await
    }

    pub async fn delete_access(&self, cache_key: &str) -> Result<(), SharedError> {
        let k = self.key("at", cache_key);
        self.op(|mut c| async move { c.del::<_, ()>(k).await })
            .await
    }

    /// Take the refresh lease of `cache_key` for `ttl`: Some(fencing value)
    /// if we hold it now, None if another replica does.
    pub async fn lease(
        &self,
        cache_key: &str,
        ttl: Duration,
    ) -> Result<Option<String>, SharedError> {
        let fence: [u8; 16] = rand::random();
        let fence: String = format!(
            "{}:{}",
            self.replica,
            fence.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let k = self.key("lease", cache_key);
        let value = fence.clone();
        let got: Option<String> = self
            .op(|mut c| async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(got.map(|_| fence))
    }

    /// Give the lease back if it still holds `fence` (compare and delete).
    pub async fn release(&self, cache_key: &str, fence: &str) -> Result<(), SharedError> {
        let k = self.key("lease", cache_key);
        let fence = fence.to_string();
        self.op(|mut c| {
            let script = self.release.clone();
            async move { script.key(k).arg(fence).invoke_async::<i64>(&mut c).await }
        })
        .await
        .map(|_| ())
    }

    /// Extend our lease of `cache_key` to `ttl` from now; false if it is no
    /// longer ours (it expired and another replica took it).
    pub async fn renew_lease(
        &self,
        cache_key: &str,
        fence: &str,
        ttl: Duration,
    ) -> Result<bool, SharedError> {
        let k = self.key("lease", cache_key);
        let fence = fence.to_string();
        let kept: i64 = self
            .op(|mut c| {
                let script = self.renew_lease.clone();
                async move {
                    script
                        .key(k)
                        .arg(fence)
                        .arg(ttl.as_millis() as u64)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(kept == 1)
    }

    /// Whether some replica holds the lease of `cache_key` now.
    pub async fn leased(&self, cache_key: &str) -> Result<bool, SharedError> {
        let k = self.key("lease", cache_key);
        self.op(|mut c| async move { c.exists(k).await }).await
    }

    // ---------------------------------------------------------- session slots

    /// Try to take one of `limit` slots of `set` for `member` until `expiry`.
    pub async fn acquire_slot(
        &self,
        set: &str,
        member: &str,
        limit: usize,
        expiry: Duration,
    ) -> Result<bool, SharedError> {
        let k = self.key("slots", set);
        let now = unix_ms();
        let member = member.to_string();
        let taken: i64 = self
            .op(|mut c| {
                let script = self.acquire_slot.clone();
                async move {
                    script
                        .key(k)
                        .arg(now)
                        .arg(now + expiry.as_millis() as u64)
                        .arg(limit)
                        .arg(member)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(taken == 1)
    }

    /// Push a held slot's expiry out; false if it is gone (expired).
    pub async fn renew_slot(
        &self,
        set: &str,
        member: &str,
        expiry: Duration,
    ) -> Result<bool, SharedError> {
        let k = self.key("slots", set);
        let now = unix_ms();
        let member = member.to_string();
        let kept: i64 = self
            .op(|mut c| {
                let script = self.renew_slot.clone();
                async move {
                    script
                        .key(k)
                        .arg(now)
                        .arg(now + expiry.as_millis() as u64)
                        .arg(member)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(kept == 1)
    }

    pub async fn release_slot(&self, set: &str, member: &str) -> Result<(), SharedError> {
        let k = self.key("slots", set);
        let member = member.to_string();
        self.op(|mut c| async move { c.zrem::<_, _, ()>(k, member).await })
            .await
    }

    // --------------------------------------------------------------- throttle

    /// Which of these lockout keys are set now.
    pub async fn locked(&self, names: &[String]) -> Result<Vec<bool>, SharedError> {
        let keys: Vec<String> = names.iter().map(|n| self.key("lock", n)).collect();
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.exists(k);
        }
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
    ) -> Result<u32, SharedError> {
        let (fail, lock) = (self.key("fail", name), self.key("lock", name));
        let n: i64 = self
            .op(|mut c| {
                let script = self.failure.clone();
                async move {
                    script
                        .key(fail)
                        .key(lock)
                        .arg(window.as_millis() as u64)
                        .arg(lockout_failures)
                        .arg(lockout.as_millis() as u64)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(n.clamp(0, u32::MAX as i64) as u32)
    }

    /// Forget the failures of these names (not their lockouts).
    pub async fn clear_failures(&self, names: &[String]) -> Result<(), SharedError> {
        let keys: Vec<String> = names.iter().map(|n| self.key("fail", n)).collect();
        self.op(|mut c| async move { c.del::<_, ()>(keys).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(key: u8) -> Shared {
        Shared::new(
            &SecretString::from("redis://127.0.0.1:1/".to_string()),
            None,
            SecretBox::new(Box::new(vec![key; 32])),
        )
        .unwrap()
    }

    #[test]
    fn sealed_values_are_bound_to_key_and_store_key() {
        let s = shared(1);
        let sealed = s.seal("oxbridge:rt:a", b"rt-MARKER");
        assert!(!sealed.windows(6).any(|w| w == b"MARKER"));
        assert_eq!(s.open("oxbridge:rt:a", &sealed).unwrap(), b"rt-MARKER");
        assert!(s.open("oxbridge:rt:b", &sealed).is_err());
        assert!(shared(2).open("oxbridge:rt:a", &sealed).is_err());
        assert!(s.open("oxbridge:rt:a", b"garbage").is_err());
    }

    #[test]
    fn derived_keys_agree_across_replicas_and_differ_by_purpose() {
        assert_eq!(shared(1).derived_key("x"), shared(1).derived_key("x"));
        assert_ne!(shared(1).derived_key("x"), shared(1).derived_key("y"));
        assert_ne!(shared(1).derived_key("x"), shared(2).derived_key("x"));
        assert_ne!(shared(1).replica, shared(1).replica);
    }

    #[tokio::test]
    async fn unreachable_redis_fails_fast_and_keeps_rotated_tokens() {
        let s = Arc::new(shared(1));
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
