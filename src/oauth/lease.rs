//! The refresh lease: how replicas sharing Redis agree on one token
//! request per account.
//!
//! The local mutex of [`super::Tokens`] stays in front; behind it, a token
//! cached in Redis by any replica is used. Otherwise one replica takes the
//! account's lease (`SET NX PX` with a fencing value, renewed every
//! [`LEASE_RENEW`] while its request runs, so that a dead holder's lease
//! expires after [`LEASE`]), requests the token, writes the rotated refresh
//! token and then the access token, and releases the lease (compare and
//! delete); the others poll for the cached token within [`TOKEN_DEADLINE`].
//!
//! When the state answers [`Alone`] (the file backend always, Redis when it
//! fails, with a warning and `oxbridge_redis_errors_total{what="token"}`),
//! this process requests the token by itself.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use super::{Audience, Cached, Tokens, TOKEN_DEADLINE};
use crate::accounts::Identity;
use crate::config::Protocol;
use crate::error::AuthError;
use crate::state::{unix_ms, Alone};

/// How long a refresh lease lasts unless its holder renews it (every
/// [`LEASE_RENEW`] while its request runs): a replica that dies holding it
/// blocks the others this long at most.
pub const LEASE: Duration = Duration::from_secs(10);
pub const LEASE_RENEW: Duration = Duration::from_secs(3);
/// The first and the longest pause between looks at the replicas' cache
/// while another replica holds the lease.
pub const POLL_FIRST: Duration = Duration::from_millis(20);
pub const POLL_MAX: Duration = Duration::from_millis(250);

/// A cache entry as the replicas keep it (sealed by the state).
#[derive(serde::Serialize, serde::Deserialize)]
struct ReplicaEntry {
    token: String,
    refresh_at_ms: u64,
    expires_at_ms: u64,
    /// Missing in entries of older versions: then the time left counts
    /// as the lifetime.
    #[serde(default)]
    lifetime_ms: u64,
    password_mac: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Tokens {
    /// A token for `id` when the local cache has none: from the replicas'
    /// cache, or requested under the lease, or (file backend, or Redis
    /// unreachable) requested by this process alone; a cached one only if
    /// it serves a login of `protocol`. The flag says whether it was
    /// requested now.
    pub(super) async fn obtain(
        &self,
        id: &Identity,
        key: &str,
        mac: Option<[u8; 32]>,
        protocol: Protocol,
        fresh: bool,
        audience: Audience,
    ) -> Result<(Cached, bool), AuthError> {
        let usable = |c: &Cached| !fresh && self.serves(c, protocol, mac);
        let deadline = Instant::now() + TOKEN_DEADLINE;
        let mut pause = POLL_FIRST;
        let mut waited = false;
        loop {
            match self.replicas_cached(key).await {
                Ok(Some(c)) if usable(&c) => {
                    info!(account = %id.account, waited, "access token from Redis");
                    return Ok((c, false));
                }
                Ok(_) => {}
                Err(e) => return self.alone(id, e, audience).await,
            }
            match self.state.lease(key, LEASE).await {
                Ok(Some(fence)) => {
                    // Another replica may have finished between our look and our lease.
                    if let Ok(Some(c)) = self.replicas_cached(key).await {
                        if usable(&c) {
                            let _ = self.state.release_lease(key, &fence).await;
                            return Ok((c, false));
                        }
                    }
                    let request = self.request(id, audience);
                    tokio::pin!(request);
                    let result = loop {
                        tokio::select! {
                            r = &mut request => break r,
                            _ = tokio::time::sleep(LEASE_RENEW) => {
                                match self.state.renew_lease(key, &fence, LEASE).await {
                                    Ok(true) => {}
                                    Ok(false) => warn!(account = %id.account, "refresh lease lost while the request runs"),
                                    Err(e) => warn!(account = %id.account, error = %e, "cannot renew the refresh lease"),
                                }
                            }
                        }
                    };
                    if let Ok(c) = &result {
                        if let Err(e) = self.put_for_replicas(key, c, mac).await {
                            warn!(account = %id.account, error = %e, "cannot put the new access token in Redis");
                        }
                    }
                    if let Err(e) = self.state.release_lease(key, &fence).await {
                        warn!(account = %id.account, error = %e, "cannot release the refresh lease; it expires by itself");
                    }
                    return result.map(|c| (c, true));
                }
                Ok(None) => {
                    waited = true;
                    if Instant::now() + pause >= deadline {
                        return Err(AuthError::TokenUnavailable(format!(
                            "another replica's token request did not finish within {} s",
                            TOKEN_DEADLINE.as_secs()
                        )));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(POLL_MAX);
                }
                Err(e) => return self.alone(id, e, audience).await,
            }
        }
    }

    /// The replicas could not be asked: request without them.
    async fn alone(
        &self,
        id: &Identity,
        alone: Alone,
        audience: Audience,
    ) -> Result<(Cached, bool), AuthError> {
        if let Some(e) = alone.failure() {
            warn!(account = %id.account, error = %e, "Redis unavailable; requesting the token without the other replicas");
            crate::metrics::redis_error("token");
        }
        Ok((self.request(id, audience).await?, true))
    }

    /// The replicas' cached token of `key`; None if there is none or it does
    /// not parse.
    async fn replicas_cached(&self, key: &str) -> Result<Option<Cached>, Alone> {
        let Some(bytes) = self.state.get_access(key).await? else {
            return Ok(None);
        };
        let Ok(e) = serde_json::from_slice::<ReplicaEntry>(&bytes) else {
            return Ok(None);
        };
        let (now, now_ms) = (Instant::now(), unix_ms());
        let at = |ms: u64| now + Duration::from_millis(ms.saturating_sub(now_ms));
        let password_mac = match e.password_mac {
            None => None,
            Some(h) => {
                let bytes: Vec<u8> = (0..h.len() / 2)
                    .filter_map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect();
                match <[u8; 32]>::try_from(bytes) {
                    Ok(m) => Some(m),
                    Err(_) => return Ok(None),
                }
            }
        };
        let lifetime = match e.lifetime_ms {
            0 => Duration::from_millis(e.expires_at_ms.saturating_sub(now_ms)),
            ms => Duration::from_millis(ms),
        };
        Ok(Some(Cached {
            token: SecretString::from(e.token),
            refresh_at: at(e.refresh_at_ms),
            expires_at: at(e.expires_at_ms),
            lifetime,
            password_mac,
        }))
    }

    /// Give the replicas `c`, the new token of `key`.
    async fn put_for_replicas(
        &self,
        key: &str,
        c: &Cached,
        mac: Option<[u8; 32]>,
    ) -> Result<(), Alone> {
        let (now, now_ms) = (Instant::now(), unix_ms());
        let left = |t: Instant| t.saturating_duration_since(now);
        let entry = ReplicaEntry {
            token: c.token.expose_secret().to_string(),
            refresh_at_ms: now_ms + left(c.refresh_at).as_millis() as u64,
            expires_at_ms: now_ms + left(c.expires_at).as_millis() as u64,
            lifetime_ms: c.lifetime.as_millis() as u64,
            password_mac: mac.map(|m| hex(&m)),
        };
        let bytes = serde_json::to_vec(&entry).expect("plain struct serializes");
        // Kept only while it is worth giving out: until renewal is due.
        self.state.put_access(key, &bytes, left(c.refresh_at)).await
    }

    /// Store a new consent's refresh token for `id` while no refresh of
    /// the old one runs, here (the cache entry's lock) or at another
    /// replica (the refresh lease, waited for up to [`TOKEN_DEADLINE`]), so
    /// that a rotation of the old token cannot overwrite the new one; then
    /// drop every cached access token of the old consent, here and in
    /// Redis, so that the next login uses the new one.
    pub async fn store_consent(&self, id: &Identity, refresh: &SecretString) -> Result<(), String> {
        let key = Self::key(id);
        let entry = self.entry(&key);
        let mut cached = entry.lock().await;
        let deadline = Instant::now() + TOKEN_DEADLINE;
        let mut pause = POLL_FIRST;
        let fence = loop {
            match self.state.lease(&key, LEASE).await {
                Ok(Some(fence)) => break Some(fence),
                Ok(None) if Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(POLL_MAX);
                }
                Ok(None) => {
                    return Err(format!(
                        "another replica's refresh of {} did not finish within {} s; nothing was changed, try again",
                        id.account,
                        TOKEN_DEADLINE.as_secs()
                    ))
                }
                // The file store, or Redis down: this process alone.
                Err(_) => break None,
            }
        };
        let store_key = id.provider.store_key(&id.account);
        let saved = self
            .state
            .save_refresh(&store_key, refresh)
            .await
            .map_err(|e| format!("cannot store the refresh token: {e}"));
        if saved.is_ok() {
            self.state
                .note(&store_key, crate::state::Event::Consented)
                .await;
            *cached = None;
            let _ = self.state.delete_access(&key).await;
        }
        if let Some(fence) = fence {
            let _ = self.state.release_lease(&key, &fence).await;
        }
        drop(cached);
        drop(entry);
        self.forget_if_empty(&key);
        saved
    }

    /// Forget the replicas' cached token of `key` if it is this very
    /// `token` (another replica may have put a newer one there).
    pub(super) async fn forget_for_replicas(&self, key: &str, token: &SecretString) {
        if let Ok(Some(entry)) = self.replicas_cached(key).await {
            if entry.token.expose_secret() == token.expose_secret() {
                let _ = self.state.delete_access(key).await;
            }
        }
    }
}
