//! The token requests, one per grant, against the configured token
//! endpoint, and what their failures mean.
//!
//! * `client_credentials` asks for the provider's app-only scope, with the
//!   app's secret or a certificate assertion (Google: a service account's
//!   JWT-bearer grant, RFC 7523, acting as the mailbox); `password` and `refresh_token` ask for the
//!   delegated scopes of the listeners' protocols (`refresh_token` also
//!   [`OFFLINE_SCOPE`], so that a rotated refresh token comes back).
//! * A rotated refresh token is stored ([`crate::state::State::keep_rotated`]) before the
//!   access token is handed out; a failure never deletes the stored one.
//! * Temporary failures (network, 5xx, 429, garbage) are retried with
//!   backoff, at most [`MAX_ATTEMPTS`] times within [`TOKEN_DEADLINE`]; they
//!   end as [`AuthError::TokenUnavailable`]. OAuth errors such as
//!   `invalid_grant` are permanent: [`AuthError::TokenRefused`]. Each
//!   attempt is logged at `info`; the caller warns once, with the fix.

use std::time::{Duration, Instant};

use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, RefreshToken, RequestTokenError,
    ResourceOwnerPassword, ResourceOwnerUsername, Scope, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tracing::{error, info};

use super::assertion;
use super::http::{self, HttpError};
use super::{refresh_margin, Audience, Cached, Tokens, TOKEN_DEADLINE};
use crate::accounts::Identity;
use crate::config::provider::OFFLINE_SCOPE;
use crate::config::{Grant, Provider, ProviderKind};
use crate::error::AuthError;
use crate::state::{Event, StateError};

/// Attempts for one token when the failures are temporary.
pub const MAX_ATTEMPTS: u32 = 3;
/// First pause between attempts; doubled each time (or the server's
/// Retry-After, up to [`MAX_RETRY_AFTER`]).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Lifetime assumed when the endpoint does not say (`expires_in`).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The OAuth client type: only the token endpoint is set.
pub type OAuthClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// The OAuth client of a provider: id, token URL, and the secret unless a
/// certificate is configured.
pub fn client(p: &Provider) -> Result<OAuthClient, String> {
    let token_url =
        TokenUrl::new(p.token_url.clone()).map_err(|e| format!("{}.token_url: {e}", p.key))?;
    let mut client = BasicClient::new(ClientId::new(p.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(AuthType::RequestBody);
    if let (Some(secret), None) = (&p.client_secret, &p.client_certificate_file) {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
    }
    Ok(client)
}

/// Whose token the status page shows a request under.
fn board_key(id: &Identity, audience: Audience) -> String {
    super::board_key(
        &id.account,
        id.grant,
        audience == Audience::Graph,
        &id.provider,
    )
}

impl Tokens {
    /// One token, retrying temporary failures with backoff.
    pub(super) async fn request(
        &self,
        id: &Identity,
        audience: Audience,
    ) -> Result<Cached, AuthError> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let (error, retry_after) = match self.request_once(id, audience).await {
                Ok(c) => {
                    info!(account = %id.account, grant = %id.grant, attempt, elapsed_ms = started.elapsed().as_millis() as u64, "access token obtained");
                    crate::metrics::token_request(id.grant.as_str(), "ok", started.elapsed());
                    let expires = crate::status::board::unix_of(c.expires_at);
                    crate::status::board::token(&board_key(id, audience), Ok(expires));
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
            // The caller warns once, with the fix (a login's "login failed"):
            // an attempt is only information.
            info!(account = %id.account, grant = %id.grant, attempt, retry, error = %error, "token request failed");
            if !retry {
                let result = if error.is_temporary() {
                    "unavailable"
                } else {
                    "refused"
                };
                crate::metrics::token_request(id.grant.as_str(), result, started.elapsed());
                crate::status::board::token(&board_key(id, audience), Err(&error));
                return Err(error);
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// One request to the token endpoint. A temporary failure carries the
    /// server's Retry-After, if any.
    async fn request_once(
        &self,
        id: &Identity,
        audience: Audience,
    ) -> Result<Cached, (AuthError, Option<Duration>)> {
        let http = &self.http;
        let app = self.app(id).map_err(|e| (e, None))?;
        let p = &app.provider;
        let scopes = || app.delegated_scopes.iter().cloned().map(Scope::new);
        let mut stored_refresh = None;
        let response = match id.grant {
            Grant::ClientCredentials if p.kind == ProviderKind::Google => {
                let Some(sa) = &app.service_account else {
                    return Err((
                        AuthError::TokenRefused(format!("{} has no service_account_file", p.key)),
                        None,
                    ));
                };
                let jwt = sa
                    .jwt(id.mailbox.as_str(), &p.app_scopes().join(" "), &p.token_url)
                    .map_err(|e| (AuthError::TokenRefused(e), None))?;
                jwt_bearer(http, &p.token_url, &jwt).await
            }
            Grant::ClientCredentials => {
                let scope = match audience {
                    Audience::Mail => p.app_scopes(),
                    Audience::Graph => vec![p.graph_scope()],
                };
                let mut request = app
                    .client
                    .exchange_client_credentials()
                    .add_scopes(scope.into_iter().map(Scope::new));
                if let Some(a) = &app.assertion {
                    let jwt = a
                        .jwt(&p.client_id, &p.token_url)
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
                app.client
                    .exchange_password(&username, &password)
                    .add_scopes(scopes())
                    .request_async(http)
                    .await
            }
            Grant::RefreshToken => {
                let refresh = self.stored_refresh_token(p, &id.account).await?;
                let token = RefreshToken::new(refresh.expose_secret().to_string());
                stored_refresh = Some(refresh);
                // Google's refresh tokens need no scope to come back.
                let offline =
                    (p.kind != ProviderKind::Google).then(|| Scope::new(OFFLINE_SCOPE.to_string()));
                app.client
                    .exchange_refresh_token(&token)
                    .add_scopes(scopes())
                    .add_scopes(offline)
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
        let lifetime = response.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let access_expires = crate::state::unix_ms() / 1000 + lifetime.as_secs();
        if let Some(old) = &stored_refresh {
            let rotated = self.save_rotated(id, old, &response).await?;
            let event = Event::Refreshed {
                access_expires,
                rotated,
            };
            let times = self.state.note(&p.store_key(&id.account), event).await;
            crate::metrics::token_times(&id.account, &times);
        } else if id.grant == Grant::ClientCredentials && p.kind != ProviderKind::Google {
            crate::metrics::app_token_expiry(&board_key(id, audience), access_expires);
        }
        let now = Instant::now();
        Ok(Cached {
            token: SecretString::from(response.access_token().secret().to_string()),
            refresh_at: now + lifetime.saturating_sub(refresh_margin(lifetime)),
            expires_at: now + lifetime,
            lifetime,
            password_mac: None,
        })
    }

    /// The refresh token of `account` from the state.
    async fn stored_refresh_token(
        &self,
        provider: &Provider,
        account: &str,
    ) -> Result<SecretString, (AuthError, Option<Duration>)> {
        match self.state.load_refresh(&provider.store_key(account)).await {
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

    /// Save a rotated refresh token before its access token is used: true
    /// if a new one came.
    async fn save_rotated(
        &self,
        id: &Identity,
        old: &SecretString,
        response: &BasicTokenResponse,
    ) -> Result<bool, (AuthError, Option<Duration>)> {
        let Some(new) = response.refresh_token() else {
            return Ok(false);
        };
        if new.secret() == old.expose_secret() {
            return Ok(false);
        }
        self.state
            .keep_rotated(
                &id.provider.store_key(&id.account),
                &SecretString::from(new.secret().to_string()),
            )
            .await
            .map(|()| true)
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

/// RFC 7523's JWT-bearer grant (Google's service accounts), which the
/// oauth2 crate does not make: the form posted as it posts its own, the
/// answer read as a standard token or error response.
async fn jwt_bearer(
    http: &super::http::Http,
    token_url: &str,
    jwt: &str,
) -> Result<BasicTokenResponse, TokenError> {
    use oauth2::AsyncHttpClient;
    let body = format!(
        "grant_type={}&assertion={}",
        form_encode(assertion::JWT_BEARER_GRANT),
        form_encode(jwt)
    );
    let request = oauth2::http::Request::builder()
        .method(oauth2::http::Method::POST)
        .uri(token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(body.into_bytes())
        .map_err(|e| RequestTokenError::Other(e.to_string()))?;
    let response = http
        .call(request)
        .await
        .map_err(RequestTokenError::Request)?;
    let body = response.body();
    if response.status().is_success() {
        return serde_json::from_slice(body).map_err(|e| {
            RequestTokenError::Other(format!("token endpoint sent an unreadable answer: {e}"))
        });
    }
    match serde_json::from_slice(body) {
        Ok(error) => Err(RequestTokenError::ServerResponse(error)),
        Err(_) => Err(RequestTokenError::Other(format!(
            "token endpoint answered HTTP {} without an OAuth error",
            response.status().as_u16()
        ))),
    }
}

/// `application/x-www-form-urlencoded` of one value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

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
