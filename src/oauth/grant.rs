//! The token requests, one per grant, against the configured token
//! endpoint, and what their failures mean.
//!
//! * `client_credentials` asks for [`app_scope`], with the app's secret or
//!   a certificate assertion; `password` and `refresh_token` ask for the
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
use crate::config::{Cloud, Grant, OAuthConfig, Protocol};
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
/// Asked for with delegated scopes so that a refresh token is returned.
pub const OFFLINE_SCOPE: &str = "offline_access";

/// The app-only scope for `client_credentials` in `cloud`
/// (`https://outlook.office365.com/.default` worldwide).
pub fn app_scope(cloud: Cloud) -> String {
    format!("{}/.default", cloud.app_resource())
}

/// The app-only scope of Microsoft Graph in `cloud`, for `sendMail`
/// (application permission Mail.Send).
pub fn graph_scope(cloud: Cloud) -> String {
    format!("{}/.default", cloud.graph_resource())
}

/// The delegated scope for one protocol in `cloud`
/// (`https://outlook.office.com/IMAP.AccessAsUser.All` worldwide).
pub fn delegated_scope(cloud: Cloud, p: Protocol) -> String {
    let permission = match p {
        Protocol::Smtp => "SMTP.Send",
        Protocol::Imap => "IMAP.AccessAsUser.All",
        Protocol::Pop3 => "POP.AccessAsUser.All",
    };
    format!("{}/{permission}", cloud.delegated_resource())
}

/// The delegated scopes for these protocols, sorted, without duplicates.
pub fn delegated_scopes(cloud: Cloud, protocols: &[Protocol]) -> Vec<String> {
    let mut scopes: Vec<String> = protocols
        .iter()
        .map(|p| delegated_scope(cloud, *p))
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

/// Whose token the status page shows a request under: the app's shared
/// token (Exchange or Graph) for `client_credentials`, else the account's.
fn board_key(id: &Identity, audience: Audience) -> String {
    match (audience, id.grant) {
        (Audience::Graph, _) => "graph".to_string(),
        (_, Grant::ClientCredentials) => "app".to_string(),
        _ => id.account.clone(),
    }
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
        let scopes = || self.delegated_scopes.iter().cloned().map(Scope::new);
        let mut stored_refresh = None;
        let response = match id.grant {
            Grant::ClientCredentials => {
                let mut request = self
                    .client
                    .exchange_client_credentials()
                    .add_scope(Scope::new(match audience {
                        Audience::Mail => self.app_scope.clone(),
                        Audience::Graph => self.graph_scope.clone(),
                    }));
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
        let lifetime = response.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let access_expires = crate::state::unix_ms() / 1000 + lifetime.as_secs();
        if let Some(old) = &stored_refresh {
            let rotated = self.save_rotated(id, old, &response).await?;
            let event = Event::Refreshed {
                access_expires,
                rotated,
            };
            let times = self.state.note(&id.account, event).await;
            crate::metrics::token_times(&id.account, &times);
        } else if id.grant == Grant::ClientCredentials {
            crate::metrics::app_token_expiry(access_expires);
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
            .keep_rotated(&id.account, &SecretString::from(new.secret().to_string()))
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
