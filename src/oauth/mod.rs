//! Where a token comes from: OAuth 2.0 grants against the configured token
//! endpoint, a cache with one request in flight per account, and the
//! refresh tokens of `refresh_token` accounts in the [`State`].
//!
//! * `client_credentials`: one app-only token (`.default` scope) serves every
//!   account of that grant; the app authenticates with its secret or with a
//!   certificate (a signed JWT client assertion, see [`assertion`]).
//! * `password` (ROPC): the device's own login and password are exchanged;
//!   the cache entry remembers a keyed hash (HMAC) of the password that
//!   earned it, so a different password never gets a cached token. The key
//!   is [`State::agreed_key`]: random per process with the file backend,
//!   derived from the store key (the same in every replica) with Redis.
//! * `refresh_token`: the stored refresh token (from `oxbridge login`) is
//!   exchanged; a rotated refresh token is saved before the access token is
//!   used. A failure never deletes the stored token.
//!
//! Each cache entry sits behind its own async mutex: concurrent logins for
//! one account wait for the single request under way.
//!
//! With the Redis backend the local mutex stays in front, and behind it the
//! replicas agree: a token cached in Redis by any replica is used;
//! otherwise one replica takes the account's lease (`SET NX PX` with a
//! fencing value, renewed while its request runs, so that a dead holder's
//! lease expires after [`LEASE`]), requests the token, writes the rotated
//! refresh token and then the access token, and releases the lease
//! (compare and delete); the others poll for the cached token within
//! [`TOKEN_DEADLINE`]. If the state answers [`Alone`] (the file backend
//! always; Redis when it fails, with a warning), the process requests
//! alone. Tokens are renewed ahead of expiry (10-12 minutes early for
//! hour-long tokens). Temporary failures (network, 5xx, 429, garbage) are
//! retried with backoff within [`TOKEN_DEADLINE`]; they end as
//! [`AuthError::TokenUnavailable`]. OAuth errors such as `invalid_grant`
//! are permanent: [`AuthError::TokenRefused`].

pub mod assertion;
pub mod consent;
pub mod http;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, RefreshToken, RequestTokenError,
    ResourceOwnerPassword, ResourceOwnerUsername, Scope, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tracing::{error, info, warn};

use crate::accounts::Identity;
use crate::config::{Grant, OAuthConfig, Protocol};
use crate::error::AuthError;
use crate::state::{unix_ms, Alone, State, StateError};
use assertion::ClientAssertion;
use http::{Http, HttpError};

/// How long getting one token may take, retries and waiting for another
/// replica's request included.
pub const TOKEN_DEADLINE: Duration = Duration::from_secs(30);
/// Tokens are renewed this long before they expire, plus up to
/// [`REFRESH_JITTER`] (tokens shorter than [`SHORT_TOKEN`] at a quarter of
/// their lifetime instead).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(600);
pub const REFRESH_JITTER: Duration = Duration::from_secs(120);
pub const SHORT_TOKEN: Duration = Duration::from_secs(1800);
/// The purpose of the password grant's cache MAC key ([`State::agreed_key`]).
const PASSWORD_MAC_PURPOSE: &str = "password-cache-mac";

/// How long before expiry a token of this lifetime is renewed.
pub fn refresh_margin(lifetime: Duration) -> Duration {
    if lifetime < SHORT_TOKEN {
        return lifetime / 4;
    }
    let jitter =
        Duration::from_millis(rand::random::<u64>() % (REFRESH_JITTER.as_millis() as u64 + 1));
    REFRESH_MARGIN + jitter
}

/// An access token and whether it was just fetched (a cached one that the
/// server refuses is worth one retry with a fresh one).
pub struct Token {
    pub secret: SecretString,
    pub fresh: bool,
}

struct Cached {
    token: SecretString,
    refresh_at: Instant,
    expires_at: Instant,
    password_mac: Option<[u8; 32]>,
}

/// One account's cache entry; its mutex is held while its token is fetched.
type Entry = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// The token cache and the grants behind it; one per process.
pub struct Tokens {
    client: OAuthClient,
    client_id: String,
    token_url: String,
    assertion: Option<ClientAssertion>,
    http: Http,
    delegated_scopes: Vec<String>,
    state: Arc<State>,
    entries: Mutex<HashMap<String, Entry>>,
    mac_key: [u8; 32],
    backoff: Duration,
}

impl Tokens {
    /// The tokens of this `[oauth]` config, for the listeners' `protocols`,
    /// keeping refresh tokens (and with Redis the replicas' cache) in `state`.
    pub fn new(
        config: &OAuthConfig,
        protocols: &[Protocol],
        state: Arc<State>,
    ) -> Result<Tokens, String> {
        let assertion = match &config.client_certificate_file {
            Some(path) => Some(
                ClientAssertion::load(path)
                    .map_err(|e| format!("oauth.client_certificate_file: {e}"))?,
            ),
            None => None,
        };
        Ok(Tokens {
            client: client(config)?,
            client_id: config.client_id.clone(),
            token_url: config.token_url(),
            assertion,
            http: Http::new()?,
            delegated_scopes: delegated_scopes(protocols),
            mac_key: state.agreed_key(PASSWORD_MAC_PURPOSE),
            state,
            entries: Mutex::new(HashMap::new()),
            backoff: RETRY_BACKOFF,
        })
    }

    fn key(id: &Identity) -> String {
        match id.grant {
            Grant::ClientCredentials => "app".to_string(),
            Grant::Password => format!("password:{}", id.login),
            Grant::RefreshToken => format!("refresh:{}", id.account),
        }
    }

    fn entry(&self, key: &str) -> Entry {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.entry(key.to_string()).or_default().clone()
    }

    /// Drop an empty entry so that failed logins with made-up names do not
    /// pile up.
    fn forget_if_empty(&self, key: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get(key) {
            if Arc::strong_count(entry) == 1
                && entry.try_lock().map(|g| g.is_none()).unwrap_or(false)
            {
                entries.remove(key);
            }
        }
    }

    fn mac(&self, password: &SecretString) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac_key).expect("any key length");
        mac.update(password.expose_secret().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether refresh tokens can be read (a `refresh_token` account existed
    /// at start, or the backend is Redis).
    pub fn has_store(&self) -> bool {
        self.state.has_refresh_tokens()
    }

    /// An access token for this identity: cached, or fetched now with every
    /// concurrent caller for the same account waiting on this one request.
    pub async fn get(&self, id: &Identity) -> Result<Token, AuthError> {
        let key = Self::key(id);
        let entry = self.entry(&key);
        let mac = id.password.as_ref().map(|p| self.mac(p));
        let result = {
            let mut cached = entry.lock().await;
            let now = Instant::now();
            match cached.as_ref() {
                Some(c) if now < c.refresh_at && c.password_mac == mac => Ok(Token {
                    secret: c.token.clone(),
                    fresh: false,
                }),
                _ => match self.obtain(id, &key, mac).await {
                    Ok((c, fresh)) => {
                        let secret = c.token.clone();
                        *cached = Some(Cached {
                            password_mac: mac,
                            ..c
                        });
                        Ok(Token { secret, fresh })
                    }
                    // A temporary failure while the old token still works:
                    // keep using it.
                    Err(e) if e.is_temporary() => match cached.as_ref() {
                        Some(c) if Instant::now() < c.expires_at && c.password_mac == mac => {
                            warn!(account = %id.account, error = %e, "token renewal failed; using the cached token until it expires");
                            Ok(Token {
                                secret: c.token.clone(),
                                fresh: false,
                            })
                        }
                        _ => Err(e),
                    },
                    Err(e) => Err(e),
                },
            }
        };
        drop(entry);
        if result.is_err() {
            self.forget_if_empty(&key);
        }
        result
    }

    /// Forget a cached token the server refused, so the next login fetches
    /// a new one. A token already replaced by another login is left alone.
    pub async fn invalidate(&self, id: &Identity, token: &SecretString) {
        let key = Self::key(id);
        let entry = self.entry(&key);
        let mut cached = entry.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| c.token.expose_secret() == token.expose_secret())
        {
            *cached = None;
        }
        self.forget_for_replicas(&key, token).await;
    }
}

/// Attempts for one token when the failures are temporary.
pub const MAX_ATTEMPTS: u32 = 3;
/// First pause between attempts; doubled each time (or the server's
/// Retry-After, up to [`MAX_RETRY_AFTER`]).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Lifetime assumed when the endpoint does not say (`expires_in`).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The app-only scope for `client_credentials` (Exchange Online).
pub const APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Asked for with delegated scopes so that a refresh token is returned.
pub const OFFLINE_SCOPE: &str = "offline_access";

/// The delegated scope for one protocol (Exchange Online).
pub fn delegated_scope(p: Protocol) -> &'static str {
    match p {
        Protocol::Smtp => "https://outlook.office.com/SMTP.Send",
        Protocol::Imap => "https://outlook.office.com/IMAP.AccessAsUser.All",
        Protocol::Pop3 => "https://outlook.office.com/POP.AccessAsUser.All",
    }
}

/// The delegated scopes for these protocols, sorted, without duplicates.
pub fn delegated_scopes(protocols: &[Protocol]) -> Vec<String> {
    let mut scopes: Vec<String> = protocols
        .iter()
        .map(|p| delegated_scope(*p).to_string())
        .collect();
    scopes.sort();
    scopes.dedup();
    scopes
}

/// The OAuth client type: only the token endpoint is set.
pub type OAuthClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// The OAuth client of the config: id, token URL, and the secret unless a
/// certificate is configured.
pub fn client(config: &OAuthConfig) -> Result<OAuthClient, String> {
    let token_url =
        TokenUrl::new(config.token_url()).map_err(|e| format!("oauth.token_url: {e}"))?;
    let mut client = BasicClient::new(ClientId::new(config.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(AuthType::RequestBody);
    if let (Some(secret), None) = (&config.client_secret, &config.client_certificate_file) {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
    }
    Ok(client)
}

impl Tokens {
    /// One token, retrying temporary failures with backoff.
    async fn request(&self, id: &Identity) -> Result<Cached, AuthError> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let (error, retry_after) = match self.request_once(id).await {
                Ok(c) => {
                    info!(account = %id.account, grant = %id.grant, attempt, elapsed_ms = started.elapsed().as_millis() as u64, "access token obtained");
                    crate::metrics::token_request(id.grant.as_str(), "ok", started.elapsed());
                    return Ok(c);
                }
                Err(e) => e,
            };
            let pause = retry_after
                .map(|s| s.min(MAX_RETRY_AFTER))
                .unwrap_or(self.backoff * 2u32.pow(attempt - 1));
            let retry = error.is_temporary()
                && attempt < MAX_ATTEMPTS
                && started.elapsed() + pause + http::REQUEST_TIMEOUT < TOKEN_DEADLINE;
            warn!(account = %id.account, grant = %id.grant, attempt, retry, error = %error, "token request failed");
            if !retry {
                let result = if error.is_temporary() {
                    "unavailable"
                } else {
                    "refused"
                };
                crate::metrics::token_request(id.grant.as_str(), result, started.elapsed());
                return Err(error);
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// One request to the token endpoint. A temporary failure carries the
    /// server's Retry-After, if any.
    async fn request_once(&self, id: &Identity) -> Result<Cached, (AuthError, Option<Duration>)> {
        let http = &self.http;
        let scopes = || self.delegated_scopes.iter().cloned().map(Scope::new);
        let mut stored_refresh = None;
        let response = match id.grant {
            Grant::ClientCredentials => {
                let mut request = self
                    .client
                    .exchange_client_credentials()
                    .add_scope(Scope::new(APP_SCOPE.to_string()));
                if let Some(a) = &self.assertion {
                    let jwt = a
                        .jwt(&self.client_id, &self.token_url)
                        .map_err(|e| (AuthError::TokenRefused(e), None))?;
                    request = request
                        .add_extra_param("client_assertion_type", assertion::ASSERTION_TYPE)
                        .add_extra_param("client_assertion", jwt);
                }
                request.request_async(http).await
            }
            Grant::Password => {
                let username = ResourceOwnerUsername::new(id.login.clone());
                let password = ResourceOwnerPassword::new(
                    id.password
                        .as_ref()
                        .map(|p| p.expose_secret().to_string())
                        .unwrap_or_default(),
                );
                self.client
                    .exchange_password(&username, &password)
                    .add_scopes(scopes())
                    .request_async(http)
                    .await
            }
            Grant::RefreshToken => {
                let refresh = self.stored_refresh_token(&id.account).await?;
                let token = RefreshToken::new(refresh.expose_secret().to_string());
                stored_refresh = Some(refresh);
                self.client
                    .exchange_refresh_token(&token)
                    .add_scopes(scopes())
                    .add_scope(Scope::new(OFFLINE_SCOPE.to_string()))
                    .request_async(http)
                    .await
            }
        };
        let response = response.map_err(|e| {
            let retry_after = match &e {
                RequestTokenError::Request(HttpError::Status { retry_after, .. }) => {
                    retry_after.map(Duration::from_secs)
                }
                _ => None,
            };
            let mut error = classify(e);
            if let (Grant::RefreshToken, AuthError::TokenRefused(detail)) = (id.grant, &mut error) {
                detail.push_str(&format!("; run `oxbridge login {}`", id.account));
            }
            (error, retry_after)
        })?;
        if let Some(old) = &stored_refresh {
            self.save_rotated(id, old, &response).await?;
        }
        let lifetime = response.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let now = Instant::now();
        Ok(Cached {
            token: SecretString::from(response.access_token().secret().to_string()),
            refresh_at: now + lifetime.saturating_sub(refresh_margin(lifetime)),
            expires_at: now + lifetime,
            password_mac: None,
        })
    }

    /// The refresh token of `account` from the state.
    async fn stored_refresh_token(
        &self,
        account: &str,
    ) -> Result<SecretString, (AuthError, Option<Duration>)> {
        match self.state.load_refresh(account).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err((
                AuthError::TokenRefused(format!(
                    "no refresh token stored; run `oxbridge login {account}`"
                )),
                None,
            )),
            Err(e @ StateError::NoTokenStore) => {
                Err((AuthError::TokenRefused(e.to_string()), None))
            }
            // A store that cannot be read now may be readable later: never
            // a reason to ask for a new consent.
            Err(e) => Err((AuthError::TokenUnavailable(e.to_string()), None)),
        }
    }

    /// Save a rotated refresh token before its access token is used.
    async fn save_rotated(
        &self,
        id: &Identity,
        old: &SecretString,
        response: &BasicTokenResponse,
    ) -> Result<(), (AuthError, Option<Duration>)> {
        let Some(new) = response.refresh_token() else {
            return Ok(());
        };
        if new.secret() == old.expose_secret() {
            return Ok(());
        }
        self.state
            .keep_rotated(&id.account, &SecretString::from(new.secret().to_string()))
            .await
            .map_err(|e| {
                error!(account = %id.account, error = %e, "cannot save the rotated refresh token");
                (
                    AuthError::TokenUnavailable(format!(
                        "cannot save the rotated refresh token: {e}"
                    )),
                    None,
                )
            })
    }
}

type TokenError = RequestTokenError<HttpError, oauth2::basic::BasicErrorResponse>;

/// Permanent or temporary, with a detail fit for the log (OAuth error code
/// and description: Entra's `AADSTS...` text names no secret).
pub fn classify(e: TokenError) -> AuthError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let detail = match r.error_description() {
                Some(d) => format!("{}: {}", r.error(), first_line(d)),
                None => r.error().to_string(),
            };
            match r.error() {
                BasicErrorResponseType::Extension(code)
                    if code == "temporarily_unavailable" || code == "server_error" =>
                {
                    AuthError::TokenUnavailable(detail)
                }
                _ => AuthError::TokenRefused(detail),
            }
        }
        RequestTokenError::Request(h) => AuthError::TokenUnavailable(h.to_string()),
        RequestTokenError::Parse(err, _) => AuthError::TokenUnavailable(format!(
            "token endpoint sent an unreadable answer: {}",
            err.path()
        )),
        RequestTokenError::Other(s) => AuthError::TokenUnavailable(first_line(&s).to_string()),
    }
}

pub fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or("");
    &line[..line
        .char_indices()
        .nth(300)
        .map(|(i, _)| i)
        .unwrap_or(line.len())]
}

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
    password_mac: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Tokens {
    /// A token for `id` when the local cache has none: from the replicas'
    /// cache, or requested under the lease, or (file backend, or Redis
    /// unreachable) requested by this process alone. The flag says whether
    /// it was requested now.
    async fn obtain(
        &self,
        id: &Identity,
        key: &str,
        mac: Option<[u8; 32]>,
    ) -> Result<(Cached, bool), AuthError> {
        let usable = |c: &Cached| Instant::now() < c.refresh_at && c.password_mac == mac;
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
                Err(e) => return self.alone(id, e).await,
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
                    let request = self.request(id);
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
                Err(e) => return self.alone(id, e).await,
            }
        }
    }

    /// The replicas could not be asked: request without them.
    async fn alone(&self, id: &Identity, alone: Alone) -> Result<(Cached, bool), AuthError> {
        if let Some(e) = alone.failure() {
            warn!(account = %id.account, error = %e, "Redis unavailable; requesting the token without the other replicas");
            crate::metrics::redis_error("token");
        }
        Ok((self.request(id).await?, true))
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
        Ok(Some(Cached {
            token: SecretString::from(e.token),
            refresh_at: at(e.refresh_at_ms),
            expires_at: at(e.expires_at_ms),
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
            password_mac: mac.map(|m| hex(&m)),
        };
        let bytes = serde_json::to_vec(&entry).expect("plain struct serializes");
        // Kept only while it is worth giving out: until renewal is due.
        self.state.put_access(key, &bytes, left(c.refresh_at)).await
    }

    /// Forget the replicas' cached token of `key` if it is this very
    /// `token` (another replica may have put a newer one there).
    async fn forget_for_replicas(&self, key: &str, token: &SecretString) {
        if let Ok(Some(entry)) = self.replicas_cached(key).await {
            if entry.token.expose_secret() == token.expose_secret() {
                let _ = self.state.delete_access(key).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::seal::KeySource;
    use crate::state::{FileStore, RedisStore};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A fake token endpoint: answers each request after `delay` with the
    /// next of `replies` (the last one repeats), counting requests.
    async fn endpoint(replies: Vec<(u16, String)>, delay: Duration) -> (String, Arc<AtomicUsize>) {
        let (url, count, _) = recording_endpoint(replies, delay).await;
        (url, count)
    }

    type Bodies = Arc<std::sync::Mutex<Vec<String>>>;

    /// [`endpoint`], also keeping every request it received.
    async fn recording_endpoint(
        replies: Vec<(u16, String)>,
        delay: Duration,
    ) -> (String, Arc<AtomicUsize>, Bodies) {
        let bodies: Bodies = Default::default();
        let log = bodies.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/tenant/oauth2/v2.0/token",
            listener.local_addr().unwrap()
        );
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let (status, body) = replies[n.min(replies.len() - 1)].clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    let mut got = Vec::new();
                    // Read the headers and the body (Content-Length).
                    loop {
                        let k = s.read(&mut buf).await.unwrap_or(0);
                        if k == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..k]);
                        let text = String::from_utf8_lossy(&got).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| {
                                    l.strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if got.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    log.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&got).into_owned());
                    tokio::time::sleep(delay).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        (url, count, bodies)
    }

    fn ok(token: &str, expires_in: u64) -> (u16, String) {
        (
            200,
            format!(
                r#"{{"token_type":"Bearer","expires_in":{expires_in},"access_token":"{token}"}}"#
            ),
        )
    }

    /// The tokens of the file backend without a token store.
    fn tokens(url: &str) -> Tokens {
        tokens_in(url, State::File(None))
    }

    fn tokens_in(url: &str, state: State) -> Tokens {
        let config: OAuthConfig = toml::from_str(&format!(
            "client_id = \"app\"\nclient_secret = \"app-secret\"\ntoken_url = \"{url}\""
        ))
        .unwrap();
        let mut t = Tokens::new(&config, &[Protocol::Smtp], Arc::new(state)).unwrap();
        t.backoff = Duration::from_millis(10);
        t
    }

    fn file_store(dir: &std::path::Path) -> FileStore {
        FileStore::open(dir, &KeySource::File(dir.join("k"))).unwrap()
    }

    /// Tokens of the file backend with a token store in `dir` (holding
    /// `refresh_token`, if any), and a second handle on that store.
    fn with_store(
        url: &str,
        dir: &std::path::Path,
        refresh_token: Option<&str>,
    ) -> (Tokens, FileStore) {
        let store = file_store(dir);
        if let Some(rt) = refresh_token {
            store
                .save("acct@x.test", &SecretString::from(rt.to_string()))
                .unwrap();
        }
        (tokens_in(url, State::File(Some(store))), file_store(dir))
    }

    fn rotated(token: &str, expires_in: u64, refresh: &str) -> (u16, String) {
        (
            200,
            format!(
                r#"{{"token_type":"Bearer","expires_in":{expires_in},"access_token":"{token}","refresh_token":"{refresh}"}}"#
            ),
        )
    }

    fn stored(store: &FileStore) -> String {
        store
            .load("acct@x.test")
            .unwrap()
            .unwrap()
            .expose_secret()
            .to_string()
    }

    #[tokio::test]
    async fn refresh_rotation_is_persisted_and_the_old_token_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (url, count, bodies) = recording_endpoint(
            vec![rotated("at-1", 1, "rt-2"), rotated("at-2", 3600, "rt-3")],
            Duration::ZERO,
        )
        .await;
        let (tokens, store) = with_store(&url, dir.path(), Some("rt-1"));
        let id = identity(Grant::RefreshToken, "acct@x.test", None);
        assert_eq!(
            tokens.get(&id).await.unwrap().secret.expose_secret(),
            "at-1"
        );
        assert_eq!(stored(&store), "rt-2");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            tokens.get(&id).await.unwrap().secret.expose_secret(),
            "at-2"
        );
        assert_eq!(stored(&store), "rt-3");
        let bodies = bodies.lock().unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert!(
            bodies[0].contains("grant_type=refresh_token")
                && bodies[0].contains("refresh_token=rt-1"),
            "{}",
            bodies[0]
        );
        assert!(bodies[0].contains("offline_access"), "{}", bodies[0]);
        assert!(
            bodies[1].contains("refresh_token=rt-2") && !bodies[1].contains("rt-1"),
            "{}",
            bodies[1]
        );
        for f in std::fs::read_dir(dir.path().join("tokens")).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            assert!(
                !bytes.windows(4).any(|w| w == b"rt-3"),
                "refresh token in clear text on disk"
            );
        }
    }

    #[tokio::test]
    async fn redis_down_keeps_and_uses_the_rotated_refresh_token() {
        let (url, _, bodies) = recording_endpoint(
            vec![rotated("at-1", 1, "rt-2"), rotated("at-2", 3600, "rt-3")],
            Duration::ZERO,
        )
        .await;
        // Nothing listens on port 1: every Redis operation fails.
        let redis = Arc::new(
            RedisStore::new(
                &SecretString::from("redis://127.0.0.1:1/".to_string()),
                None,
                secrecy::SecretBox::new(Box::new(vec![3u8; 32])),
            )
            .unwrap(),
        );
        redis
            .save_refresh_or_keep("acct@x.test", &SecretString::from("rt-1".to_string()))
            .await;
        let tokens = tokens_in(&url, State::Redis(redis.clone()));
        let id = identity(Grant::RefreshToken, "acct@x.test", None);
        assert_eq!(
            tokens.get(&id).await.unwrap().secret.expose_secret(),
            "at-1"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            tokens.get(&id).await.unwrap().secret.expose_secret(),
            "at-2"
        );
        let bodies = bodies.lock().unwrap().clone();
        assert!(bodies[0].contains("refresh_token=rt-1"), "{}", bodies[0]);
        assert!(bodies[1].contains("refresh_token=rt-2"), "{}", bodies[1]);
        assert_eq!(redis.pending_writes(), 1);
        assert_eq!(
            redis
                .load_refresh("acct@x.test")
                .await
                .unwrap()
                .unwrap()
                .expose_secret(),
            "rt-3"
        );
    }

    #[tokio::test]
    async fn expiry_during_a_burst_refreshes_once() {
        let dir = tempfile::tempdir().unwrap();
        let (url, count) = endpoint(
            vec![rotated("at-1", 1, "rt-2"), rotated("at-2", 3600, "rt-3")],
            Duration::from_millis(200),
        )
        .await;
        let (tokens, _store) = with_store(&url, dir.path(), Some("rt-1"));
        let tokens = Arc::new(tokens);
        let id = identity(Grant::RefreshToken, "acct@x.test", None);
        tokens.get(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let tokens = tokens.clone();
            tasks.push(tokio::spawn(async move {
                let id = identity(Grant::RefreshToken, "acct@x.test", None);
                tokens
                    .get(&id)
                    .await
                    .map(|t| t.secret.expose_secret().to_string())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "at-2");
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn endpoint_down_longer_than_the_token_life_then_back() {
        let dir = tempfile::tempdir().unwrap();
        let down = (503, String::new());
        let mut replies = vec![rotated("at-1", 1, "rt-2")];
        replies.extend(std::iter::repeat_n(down, 6));
        replies.push(rotated("at-2", 3600, "rt-3"));
        let (url, count) = endpoint(replies, Duration::ZERO).await;
        let (tokens, store) = with_store(&url, dir.path(), Some("rt-1"));
        let id = identity(Grant::RefreshToken, "acct@x.test", None);
        tokens.get(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for _ in 0..2 {
            let err = tokens.get(&id).await.err().unwrap();
            assert!(err.is_temporary(), "{err}");
            assert_eq!(
                stored(&store),
                "rt-2",
                "a temporary failure must not touch the stored token"
            );
        }
        assert_eq!(count.load(Ordering::SeqCst), 1 + 2 * MAX_ATTEMPTS as usize);
        assert_eq!(
            tokens.get(&id).await.unwrap().secret.expose_secret(),
            "at-2"
        );
        assert_eq!(stored(&store), "rt-3");
    }

    #[tokio::test]
    async fn invalid_grant_says_what_to_do_and_keeps_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let refused = (
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity."}"#.to_string(),
        );
        let (url, _) = endpoint(vec![refused], Duration::ZERO).await;
        let (tokens, store) = with_store(&url, dir.path(), Some("rt-1"));
        let err = tokens
            .get(&identity(Grant::RefreshToken, "acct@x.test", None))
            .await
            .err()
            .unwrap();
        assert!(!err.is_temporary());
        let text = err.to_string();
        assert!(
            text.contains("AADSTS700082") && text.contains("run `oxbridge login acct@x.test`"),
            "{text}"
        );
        assert_eq!(stored(&store), "rt-1");

        let (tokens, _) = with_store(&url, tempfile::tempdir().unwrap().path(), None);
        let err = tokens
            .get(&identity(Grant::RefreshToken, "acct@x.test", None))
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("no refresh token stored; run `oxbridge login acct@x.test`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn certificate_credentials_send_an_assertion_not_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("app.pem");
        let ok = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=app",
            ])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .output()
            .unwrap();
        assert!(ok.status.success());
        let mut both = std::fs::read(dir.path().join("cert.pem")).unwrap();
        both.extend(std::fs::read(dir.path().join("key.pem")).unwrap());
        std::fs::write(&pem, both).unwrap();
        let (url, _, bodies) = recording_endpoint(vec![ok_token()], Duration::ZERO).await;
        let config: OAuthConfig = toml::from_str(&format!(
            "client_id = \"app\"\nclient_secret = \"unused-secret\"\nclient_certificate_file = \"{}\"\ntoken_url = \"{url}\"",
            pem.display()
        ))
        .unwrap();
        let tokens = Tokens::new(&config, &[Protocol::Smtp], Arc::new(State::File(None))).unwrap();
        tokens
            .get(&identity(Grant::ClientCredentials, "a@x.test", None))
            .await
            .unwrap();
        let body = bodies.lock().unwrap()[0].clone();
        assert!(body.contains("client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"), "{body}");
        assert!(body.contains("client_assertion=ey"), "{body}");
        assert!(!body.contains("unused-secret"), "{body}");
    }

    fn ok_token() -> (u16, String) {
        ok("tok", 3600)
    }

    #[tokio::test]
    async fn retry_after_is_honoured_within_bounds() {
        let (url, count) =
            endpoint(vec![(429, String::new()), ok("tok", 3600)], Duration::ZERO).await;
        let tokens = tokens(&url);
        let t = std::time::Instant::now();
        tokens
            .get(&identity(Grant::ClientCredentials, "a@x.test", None))
            .await
            .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    fn identity(grant: Grant, login: &str, password: Option<&str>) -> Identity {
        Identity {
            account: login.into(),
            login: login.into(),
            mailbox: login.into(),
            grant,
            password: password.map(|p| SecretString::from(p.to_string())),
        }
    }

    #[tokio::test]
    async fn concurrent_logins_make_one_request_then_hit_the_cache() {
        assert!(refresh_margin(Duration::from_secs(3600)) >= Duration::from_secs(600));
        assert!(refresh_margin(Duration::from_secs(3600)) <= Duration::from_secs(720));
        let (url, count) = endpoint(vec![ok("tok-1", 3600)], Duration::from_millis(200)).await;
        let tokens = Arc::new(tokens(&url));
        let mut tasks = Vec::new();
        for i in 0..100 {
            let tokens = tokens.clone();
            tasks.push(tokio::spawn(async move {
                let id = identity(Grant::ClientCredentials, &format!("dev{i}@x.test"), None);
                tokens
                    .get(&id)
                    .await
                    .map(|t| t.secret.expose_secret().to_string())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "tok-1");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let again = tokens
            .get(&identity(Grant::ClientCredentials, "a@x.test", None))
            .await
            .unwrap();
        assert!(!again.fresh);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn password_grant_cache_is_bound_to_the_password() {
        let (url, count) =
            endpoint(vec![ok("tok-a", 3600), ok("tok-b", 3600)], Duration::ZERO).await;
        let tokens = tokens(&url);
        let right = identity(Grant::Password, "u@x.test", Some("right"));
        assert!(tokens.get(&right).await.unwrap().fresh);
        assert!(!tokens.get(&right).await.unwrap().fresh);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Another password never gets the cached token: it goes to the endpoint.
        let other = identity(Grant::Password, "u@x.test", Some("other"));
        let t = tokens.get(&other).await.unwrap();
        assert!(t.fresh);
        assert_eq!(t.secret.expose_secret(), "tok-b");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refused_cached_token_is_replaced() {
        let (url, count) =
            endpoint(vec![ok("tok-1", 3600), ok("tok-2", 3600)], Duration::ZERO).await;
        let tokens = tokens(&url);
        let id = identity(Grant::ClientCredentials, "a@x.test", None);
        let first = tokens.get(&id).await.unwrap();
        tokens.invalidate(&id, &first.secret).await;
        let second = tokens.get(&id).await.unwrap();
        assert_eq!(second.secret.expose_secret(), "tok-2");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn tokens_are_renewed_before_expiry() {
        let (url, count) = endpoint(vec![ok("short", 1), ok("next", 3600)], Duration::ZERO).await;
        let tokens = tokens(&url);
        let id = identity(Grant::ClientCredentials, "a@x.test", None);
        assert_eq!(
            tokens.get(&id).await.unwrap().secret.expose_secret(),
            "short"
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            tokens.get(&id).await.unwrap().secret.expose_secret(),
            "next"
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failures_are_classified() {
        let refused = (
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS50126: Error validating credentials.\r\nTrace ID: x","error_codes":[50126]}"#.to_string(),
        );
        let (url, _) = endpoint(vec![refused], Duration::ZERO).await;
        let err = tokens(&url)
            .get(&identity(Grant::Password, "u@x.test", Some("pw-marker")))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, AuthError::TokenRefused(d) if d == "invalid_grant: AADSTS50126: Error validating credentials."),
            "{err}"
        );
        assert!(!err.to_string().contains("pw-marker"));

        for reply in [
            (503, "".to_string()),
            (429, "{}".to_string()),
            (200, "garbage".to_string()),
            (400, r#"{"error":"temporarily_unavailable"}"#.to_string()),
        ] {
            let (url, _) = endpoint(vec![reply.clone()], Duration::ZERO).await;
            let err = tokens(&url)
                .get(&identity(Grant::ClientCredentials, "a@x.test", None))
                .await
                .err()
                .unwrap();
            assert!(err.is_temporary(), "{reply:?} -> {err}");
        }
    }

    #[tokio::test]
    async fn a_temporary_failure_keeps_a_still_valid_token() {
        // 4 s lifetime: renewed after 3 s, expires after 4 s; retries fit in between.
        let (url, count) =
            endpoint(vec![ok("tok-1", 4), (503, String::new())], Duration::ZERO).await;
        let tokens = tokens(&url);
        let id = identity(Grant::ClientCredentials, "a@x.test", None);
        tokens.get(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3100)).await;
        let t = tokens.get(&id).await.unwrap();
        assert_eq!(t.secret.expose_secret(), "tok-1");
        assert_eq!(count.load(Ordering::SeqCst), 1 + MAX_ATTEMPTS as usize);
    }
}
