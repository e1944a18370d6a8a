//! Where a token comes from: OAuth 2.0 grants against the configured token
//! endpoint, and a cache with one request in flight per account.
//!
//! * `client_credentials`: one app-only token (`.default` scope) serves every
//!   account of that grant.
//! * `password` (ROPC): the device's own login and password are exchanged;
//!   the cache entry remembers a keyed hash (HMAC, random key per process)
//!   of the password that earned it, so a different password never gets a
//!   cached token.
//!
//! Each cache entry sits behind its own async mutex: concurrent logins for
//! one account wait for the single request under way. Tokens are reused
//! until shortly before they expire. Failures are split into permanent
//! ([`AuthError::TokenRefused`]: an OAuth error such as `invalid_grant`) and
//! temporary ([`AuthError::TokenUnavailable`]: network, 5xx, 429, garbage).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, HttpRequest, HttpResponse,
    RequestTokenError, ResourceOwnerPassword, ResourceOwnerUsername, Scope, TokenResponse,
    TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tracing::{debug, info, warn};

use crate::accounts::Identity;
use crate::config::{Grant, OAuthConfig, Protocol};
use crate::error::AuthError;

/// How long one token request may take, all in.
pub const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
pub const TOKEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Lifetime assumed when the endpoint does not say (`expires_in`).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// A cached token is replaced this long before it expires (at most a
/// quarter of its lifetime, for short-lived tokens).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// The app-only scope for `client_credentials` (Exchange Online).
pub const APP_SCOPE: &str = "https://outlook.office365.com/.default";

/// The delegated scope for one protocol (Exchange Online).
pub fn delegated_scope(p: Protocol) -> &'static str {
    match p {
        Protocol::Smtp => "https://outlook.office.com/SMTP.Send",
        Protocol::Imap => "https://outlook.office.com/IMAP.AccessAsUser.All",
        Protocol::Pop3 => "https://outlook.office.com/POP.AccessAsUser.All",
    }
}

type OAuthClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

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

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

pub struct Tokens {
    client: OAuthClient,
    http: Http,
    delegated_scopes: Vec<String>,
    slots: Mutex<HashMap<String, Slot>>,
    mac_key: [u8; 32],
}

/// What the HTTP layer reports: transport failures and the statuses that
/// mean "try later" (5xx, 429) are kept apart from OAuth error bodies.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("{0}")]
    Network(String),
    #[error("HTTP {status}{}", retry_after.map(|s| format!(" (Retry-After {s}s)")).unwrap_or_default())]
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
}

impl Tokens {
    pub fn new(config: &OAuthConfig, protocols: &[Protocol]) -> Result<Tokens, String> {
        let token_url =
            TokenUrl::new(config.token_url()).map_err(|e| format!("oauth.token_url: {e}"))?;
        let mut client = BasicClient::new(ClientId::new(config.client_id.clone()))
            .set_token_uri(token_url)
            .set_auth_type(AuthType::RequestBody);
        if let Some(secret) = &config.client_secret {
            client =
                client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
        }
        let http = oauth2::reqwest::Client::builder()
            .redirect(oauth2::reqwest::redirect::Policy::none())
            .timeout(TOKEN_REQUEST_TIMEOUT)
            .connect_timeout(TOKEN_CONNECT_TIMEOUT)
            .user_agent(concat!("oxbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let mut delegated_scopes: Vec<String> = protocols
            .iter()
            .map(|p| delegated_scope(*p).to_string())
            .collect();
        delegated_scopes.sort();
        delegated_scopes.dedup();
        Ok(Tokens {
            client,
            http: Http(http),
            delegated_scopes,
            slots: Mutex::new(HashMap::new()),
            mac_key: rand::random(),
        })
    }

    fn key(id: &Identity) -> String {
        match id.grant {
            Grant::ClientCredentials => "app".to_string(),
            Grant::Password => format!("password:{}", id.login),
            Grant::RefreshToken => format!("refresh:{}", id.account),
        }
    }

    fn slot(&self, key: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key.to_string()).or_default().clone()
    }

    /// Drop an empty slot so that failed logins with made-up names do not
    /// pile up.
    fn forget_if_empty(&self, key: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(key) {
            if Arc::strong_count(slot) == 1 && slot.try_lock().map(|g| g.is_none()).unwrap_or(false)
            {
                slots.remove(key);
            }
        }
    }

    fn mac(&self, password: &SecretString) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac_key).expect("any key length");
        mac.update(password.expose_secret().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// An access token for this identity: cached, or fetched now with every
    /// concurrent caller for the same account waiting on this one request.
    pub async fn get(&self, id: &Identity) -> Result<Token, AuthError> {
        let key = Self::key(id);
        let slot = self.slot(&key);
        let mac = id.password.as_ref().map(|p| self.mac(p));
        let result = {
            let mut cached = slot.lock().await;
            let now = Instant::now();
            match cached.as_ref() {
                Some(c) if now < c.refresh_at && c.password_mac == mac => Ok(Token {
                    secret: c.token.clone(),
                    fresh: false,
                }),
                _ => match self.request(id).await {
                    Ok(c) => {
                        let secret = c.token.clone();
                        *cached = Some(Cached {
                            password_mac: mac,
                            ..c
                        });
                        Ok(Token {
                            secret,
                            fresh: true,
                        })
                    }
                    // A temporary failure while the old token still works:
                    // keep using it.
                    Err(e) if e.is_temporary() => match cached.as_ref() {
                        Some(c) if now < c.expires_at && c.password_mac == mac => {
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
        drop(slot);
        if result.is_err() {
            self.forget_if_empty(&key);
        }
        result
    }

    /// Forget a cached token the server refused, so the next login fetches
    /// a new one. A token already replaced by another login is left alone.
    pub async fn invalidate(&self, id: &Identity, token: &SecretString) {
        let slot = self.slot(&Self::key(id));
        let mut cached = slot.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| c.token.expose_secret() == token.expose_secret())
        {
            *cached = None;
        }
    }

    async fn request(&self, id: &Identity) -> Result<Cached, AuthError> {
        let started = Instant::now();
        let http = &self.http;
        let response = match id.grant {
            Grant::ClientCredentials => {
                self.client
                    .exchange_client_credentials()
                    .add_scope(Scope::new(APP_SCOPE.to_string()))
                    .request_async(http)
                    .await
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
                    .add_scopes(self.delegated_scopes.iter().cloned().map(Scope::new))
                    .request_async(http)
                    .await
            }
            Grant::RefreshToken => {
                return Err(AuthError::TokenRefused(
                    "refresh_token accounts are not supported yet".into(),
                ));
            }
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match response {
            Ok(r) => {
                let lifetime = r.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME);
                let margin = REFRESH_MARGIN.min(lifetime / 4);
                let now = Instant::now();
                info!(account = %id.account, grant = %id.grant, expires_in = lifetime.as_secs(), elapsed_ms, "access token obtained");
                Ok(Cached {
                    token: SecretString::from(r.access_token().secret().to_string()),
                    refresh_at: now + lifetime - margin,
                    expires_at: now + lifetime,
                    password_mac: None,
                })
            }
            Err(e) => {
                let e = classify(e);
                warn!(account = %id.account, grant = %id.grant, elapsed_ms, error = %e, "token request failed");
                Err(e)
            }
        }
    }
}

type TokenError = RequestTokenError<HttpError, oauth2::basic::BasicErrorResponse>;

/// Permanent or temporary, with a detail fit for the log (OAuth error code
/// and description: Entra's `AADSTS...` text names no secret).
fn classify(e: TokenError) -> AuthError {
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

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or("");
    &line[..line
        .char_indices()
        .nth(300)
        .map(|(i, _)| i)
        .unwrap_or(line.len())]
}

/// The HTTP client the oauth2 crate calls: reqwest, with 5xx and 429 turned
/// into [`HttpError::Status`] so they count as temporary.
struct Http(oauth2::reqwest::Client);

impl<'c> oauth2::AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + Sync + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(&self.0, request))
    }
}

async fn send(http: &oauth2::reqwest::Client, req: HttpRequest) -> Result<HttpResponse, HttpError> {
    {
        let (parts, body) = req.into_parts();
        let response = http
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|e| HttpError::Network(describe(&e)))?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            debug!(status = status.as_u16(), "token endpoint asks to try later");
            return Err(HttpError::Status {
                status: status.as_u16(),
                retry_after,
            });
        }
        let mut builder = oauth2::http::Response::builder().status(status);
        for (name, value) in response.headers() {
            builder = builder.header(name, value);
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| HttpError::Network(describe(&e)))?;
        builder
            .body(body.to_vec())
            .map_err(|e| HttpError::Network(e.to_string()))
    }
}

fn describe(e: &oauth2::reqwest::Error) -> String {
    use std::error::Error;
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    if let Some(url) = e.url() {
        s.push_str(&format!(" ({})", url.as_str()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A fake token endpoint: answers each request after `delay` with the
    /// next of `replies` (the last one repeats), counting requests.
    async fn endpoint(replies: Vec<(u16, String)>, delay: Duration) -> (String, Arc<AtomicUsize>) {
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
                    tokio::time::sleep(delay).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        (url, count)
    }

    fn ok(token: &str, expires_in: u64) -> (u16, String) {
        (
            200,
            format!(
                r#"{{"token_type":"Bearer","expires_in":{expires_in},"access_token":"{token}"}}"#
            ),
        )
    }

    fn tokens(url: &str) -> Tokens {
        let config: OAuthConfig = toml::from_str(&format!(
            "client_id = \"app\"\nclient_secret = \"app-secret\"\ntoken_url = \"{url}\""
        ))
        .unwrap();
        Tokens::new(&config, &[Protocol::Smtp]).unwrap()
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
        let (url, count) = endpoint(vec![ok("tok-1", 3600)], Duration::from_millis(200)).await;
        let tokens = Arc::new(tokens(&url));
        let mut tasks = Vec::new();
        for i in 0..50 {
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
        // 4 s lifetime: renewed after 3 s, expires after 4 s.
        let (url, count) =
            endpoint(vec![ok("tok-1", 4), (503, String::new())], Duration::ZERO).await;
        let tokens = tokens(&url);
        let id = identity(Grant::ClientCredentials, "a@x.test", None);
        tokens.get(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3100)).await;
        let t = tokens.get(&id).await.unwrap();
        assert_eq!(t.secret.expose_secret(), "tok-1");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
