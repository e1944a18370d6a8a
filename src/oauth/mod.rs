//! Where a token comes from: OAuth 2.0 grants against the configured token
//! endpoint ([`grant`]), and here the cache with one request in flight per
//! account. Refresh tokens of `refresh_token` accounts live in the
//! [`State`]; with Redis the replicas also share the cache under a refresh
//! lease ([`lease`]).
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
//! one account wait for the single request under way. Tokens are renewed
//! ahead of expiry (10-12 minutes early for hour-long tokens); a temporary
//! failure while the cached token still works keeps using it. IMAP and POP3
//! sessions last hours, so their logins want more: a token with at least
//! `[oauth] session_token_left_s` (45 min) left, or three quarters of its
//! lifetime for shorter tokens ([`Tokens::session_need`]); an older cached
//! token is replaced for everyone.

pub mod assertion;
pub mod consent;
pub mod grant;
pub mod http;
pub mod lease;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tracing::warn;

use crate::accounts::Identity;
use crate::config::{Config, Grant, OAuthConfig, Protocol, Provider, ProviderKind};
use crate::error::AuthError;
use crate::state::State;
use assertion::{ClientAssertion, ServiceAccount};
use grant::OAuthClient;
pub use grant::{
    classify, client, first_line, DEFAULT_TOKEN_LIFETIME, MAX_ATTEMPTS, MAX_RETRY_AFTER,
    RETRY_BACKOFF,
};
use http::Http;
pub use lease::{LEASE, LEASE_RENEW, POLL_FIRST, POLL_MAX};

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

/// An access token, whether it was just fetched (a cached one that the
/// server refuses is worth one retry with a fresh one), and when it ends.
pub struct Token {
    pub secret: SecretString,
    pub fresh: bool,
    pub expires_at: Instant,
    pub lifetime: Duration,
}

struct Cached {
    token: SecretString,
    refresh_at: Instant,
    expires_at: Instant,
    /// As the endpoint said it (`expires_in`) when the token was issued.
    lifetime: Duration,
    password_mac: Option<[u8; 32]>,
}

impl Cached {
    fn token(&self, fresh: bool) -> Token {
        Token {
            secret: self.token.clone(),
            fresh,
            expires_at: self.expires_at,
            lifetime: self.lifetime,
        }
    }
}

/// What a token is for: the mail protocols (Exchange Online's resource),
/// or Microsoft Graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Mail,
    Graph,
}

/// One account's cache entry; its mutex is held while its token is fetched.
type Entry = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// One provider's OAuth app: its client and how it proves itself.
struct OAuthApp {
    provider: Arc<Provider>,
    client: OAuthClient,
    /// Microsoft: a certificate instead of a secret.
    assertion: Option<ClientAssertion>,
    /// Google: the service account of `client_credentials`.
    service_account: Option<ServiceAccount>,
    /// The delegated scopes of the listeners' protocols.
    delegated_scopes: Vec<String>,
}

impl OAuthApp {
    fn new(p: &Arc<Provider>, protocols: &[Protocol]) -> Result<OAuthApp, String> {
        let assertion = match &p.client_certificate_file {
            Some(path) => Some(
                ClientAssertion::load(path)
                    .map_err(|e| format!("{}.client_certificate_file: {e}", p.key))?,
            ),
            None => None,
        };
        let service_account = match &p.service_account {
            Some(key) => Some(ServiceAccount::new(
                key,
                &format!("{}.service_account_file", p.key),
            )?),
            None => None,
        };
        Ok(OAuthApp {
            client: client(p)?,
            assertion,
            service_account,
            delegated_scopes: p.delegated_scopes(protocols, false),
            provider: p.clone(),
        })
    }
}

/// Whose token the status page shows for an account: the app's shared
/// one for Microsoft's `client_credentials` (`app`, `graph`, a provider's
/// `app:NAME`), else the account's own.
pub fn board_key(account: &str, grant: Grant, graph: bool, provider: &Provider) -> String {
    match (grant, graph, provider.kind) {
        (Grant::ClientCredentials, true, _) => "graph".to_string(),
        (Grant::ClientCredentials, false, ProviderKind::Google) => account.to_string(),
        (Grant::ClientCredentials, false, _) => shared_app_key(provider),
        _ => account.to_string(),
    }
}

/// The cache key of a Microsoft provider's app-only token.
fn shared_app_key(provider: &Provider) -> String {
    match provider.is_default() {
        true => "app".to_string(),
        false => format!("app:{}", provider.name),
    }
}

/// The token cache and the grants behind it; one per process.
pub struct Tokens {
    /// Each provider's app, by provider name (`""`: `[oauth]`).
    apps: HashMap<String, OAuthApp>,
    http: Http,
    state: Arc<State>,
    entries: Mutex<HashMap<String, Entry>>,
    mac_key: [u8; 32],
    backoff: Duration,
    session_left: Duration,
    smtp_left: Duration,
    keepalive: Duration,
}

impl Tokens {
    /// The tokens of these providers, for the protocols that have
    /// listeners, keeping refresh tokens (and with Redis the replicas'
    /// cache) in `state`.
    pub fn new(
        providers: &[Arc<Provider>],
        config: &Config,
        state: Arc<State>,
    ) -> Result<Tokens, String> {
        let ca_file = config.upstream.ca_file.as_deref();
        Tokens::with(
            providers,
            &config.oauth,
            &config.protocols(),
            ca_file,
            state,
        )
    }

    /// [`Tokens::new`] with the timings of `oauth`, these `protocols`, and
    /// the extra roots of `ca_file`.
    pub fn with(
        providers: &[Arc<Provider>],
        oauth: &OAuthConfig,
        protocols: &[Protocol],
        ca_file: Option<&std::path::Path>,
        state: Arc<State>,
    ) -> Result<Tokens, String> {
        let mut apps = HashMap::new();
        for p in providers {
            apps.insert(p.name.clone(), OAuthApp::new(p, protocols)?);
        }
        Ok(Tokens {
            apps,
            http: Http::new(ca_file).map_err(|e| format!("upstream.ca_file: {e}"))?,
            mac_key: state.agreed_key(PASSWORD_MAC_PURPOSE),
            state,
            entries: Mutex::new(HashMap::new()),
            backoff: RETRY_BACKOFF,
            session_left: Duration::from_secs(oauth.session_token_left_s),
            smtp_left: Duration::from_secs(oauth.smtp_token_left_s),
            keepalive: Duration::from_secs(oauth.refresh_keepalive_s),
        })
    }

    /// The app of `id`'s provider (every identity's provider is one the
    /// tokens were made with: accounts and tokens share the start's list).
    fn app(&self, id: &Identity) -> Result<&OAuthApp, AuthError> {
        self.apps.get(&id.provider.name).ok_or_else(|| {
            AuthError::TokenRefused(format!(
                "provider {:?} was added after the start; restart oxbridge",
                id.provider.name
            ))
        })
    }

    fn key(id: &Identity) -> String {
        let p = &id.provider;
        match (id.grant, p.kind) {
            // A service account acts as each mailbox in turn.
            (Grant::ClientCredentials, ProviderKind::Google) => {
                format!("sa:{}:{}", p.name, id.mailbox.to_lowercase())
            }
            (Grant::ClientCredentials, _) => shared_app_key(p),
            (Grant::Password, _) if p.is_default() => format!("password:{}", id.login),
            (Grant::Password, _) => format!("password:{}:{}", p.name, id.login),
            (Grant::RefreshToken, _) => format!("refresh:{}", p.store_key(&id.account)),
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

    /// How much life a token of `lifetime` must have left for a login of
    /// `protocol`: IMAP and POP3 `session_token_left_s`, SMTP
    /// `smtp_token_left_s`, or three quarters of the lifetime, whichever
    /// is less.
    pub fn session_need(&self, protocol: Protocol, lifetime: Duration) -> Duration {
        let want = match protocol {
            Protocol::Smtp => self.smtp_left,
            Protocol::Imap | Protocol::Pop3 => self.session_left,
        };
        want.min(lifetime * 3 / 4)
    }

    /// Whether the cached `c` may serve a login of `protocol` with this
    /// password MAC.
    fn serves(&self, c: &Cached, protocol: Protocol, mac: Option<[u8; 32]>) -> bool {
        let now = Instant::now();
        now < c.refresh_at
            && c.password_mac == mac
            && c.expires_at.saturating_duration_since(now)
                >= self.session_need(protocol, c.lifetime)
    }

    /// An access token for this identity and a login of `protocol`: cached,
    /// or fetched now with every concurrent caller for the same account
    /// waiting on this one request.
    pub async fn get(&self, id: &Identity, protocol: Protocol) -> Result<Token, AuthError> {
        self.get_for(id, protocol, Audience::Mail).await
    }

    /// An app-only token for Microsoft Graph (`client_credentials` with
    /// the Graph scope), cached and single-flight like the others.
    pub async fn graph(&self, id: &Identity) -> Result<Token, AuthError> {
        if id.grant != Grant::ClientCredentials || !id.provider.is_default() {
            return Err(AuthError::TokenRefused(format!(
                "account {} sends through Microsoft Graph, which needs grant = \"client_credentials\" of [oauth]",
                id.account
            )));
        }
        self.get_for(id, Protocol::Smtp, Audience::Graph).await
    }

    async fn get_for(
        &self,
        id: &Identity,
        protocol: Protocol,
        audience: Audience,
    ) -> Result<Token, AuthError> {
        let key = match audience {
            Audience::Mail => Self::key(id),
            Audience::Graph => "graph".to_string(),
        };
        let entry = self.entry(&key);
        let mac = id.password.as_ref().map(|p| self.mac(p));
        let result = {
            let mut cached = entry.lock().await;
            match cached.as_ref() {
                Some(c) if self.serves(c, protocol, mac) => Ok(c.token(false)),
                _ => match self.obtain(id, &key, mac, protocol, false, audience).await {
                    Ok((c, fresh)) => {
                        let token = c.token(fresh);
                        *cached = Some(Cached {
                            password_mac: mac,
                            ..c
                        });
                        Ok(token)
                    }
                    // A temporary failure while the old token still works:
                    // keep using it.
                    Err(e) if e.is_temporary() => match cached.as_ref() {
                        Some(c) if Instant::now() < c.expires_at && c.password_mac == mac => {
                            warn!(account = %id.account, error = %e, "token renewal failed; using the cached token until it expires");
                            Ok(c.token(false))
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

    /// The recorded token times of `account`, a `refresh_token` account of
    /// `provider`.
    pub async fn times(
        &self,
        provider: &Provider,
        account: &str,
    ) -> Result<crate::state::TokenHealth, String> {
        let key = provider.store_key(account);
        self.state.health(&key).await.map_err(|e| e.to_string())
    }

    /// How often refresh tokens are exchanged at the least (zero: never).
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// Exchange the refresh token of `id` now, unless another replica did
    /// within the keep-alive period: true if this process did. With Redis
    /// the period is a lease (`keepalive:` key) that the winner keeps until
    /// it expires; a failed exchange gives it back so that another try
    /// can come soon. The new access token goes into the cache.
    pub async fn keep_alive(&self, id: &Identity) -> Result<bool, AuthError> {
        let key = Self::key(id);
        let gate = format!("keepalive:{key}");
        let fence = match self.state.lease(&gate, self.keepalive).await {
            Ok(Some(fence)) => Some(fence),
            Ok(None) => return Ok(false),
            Err(alone) => {
                if let Some(e) = alone.failure() {
                    warn!(account = %id.account, error = %e, "Redis unavailable; keeping the refresh token alive without the other replicas");
                    crate::metrics::redis_error("keepalive");
                }
                None
            }
        };
        let entry = self.entry(&key);
        let mut cached = entry.lock().await;
        match self
            .obtain(id, &key, None, Protocol::Smtp, true, Audience::Mail)
            .await
        {
            Ok((c, _)) => {
                *cached = Some(c);
                Ok(true)
            }
            Err(e) => {
                if let Some(fence) = fence {
                    let _ = self.state.release_lease(&gate, &fence).await;
                }
                Err(e)
            }
        }
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

#[cfg(test)]
mod tests;
