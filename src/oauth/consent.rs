//! `oxbridge login ACCOUNT`: one-time interactive consent for a
//! `refresh_token` account, ending with its refresh token in the store.
//!
//! * Device authorization grant (RFC 8628, the default): print the
//!   verification URL and user code, then poll at the server's interval
//!   (`authorization_pending` waits, `slow_down` waits longer; a decline or
//!   an expired code ends the command).
//! * `--browser`: authorization code with PKCE (S256) on a loopback
//!   redirect `http://localhost:PORT/`; the URL is printed, no browser is
//!   started, so it works over SSH with `ssh -L PORT:127.0.0.1:PORT`.
//!
//! Both ask for the delegated scopes of the protocols that have listeners,
//! plus `offline_access`.

use std::io::Write;
use std::time::Duration;

use oauth2::{
    AuthUrl, AuthorizationCode, CsrfToken, DeviceAuthorizationUrl, DeviceCodeErrorResponseType,
    PkceCodeChallenge, RedirectUrl, RequestTokenError, Scope, StandardDeviceAuthorizationResponse,
    TokenResponse,
};
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::http::Http;
use super::{classify, delegated_scopes, OFFLINE_SCOPE};
use crate::config::Config;

/// How long the browser flow waits for the redirect.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest redirect request read from the browser.
const MAX_REDIRECT_REQUEST: usize = 16 * 1024;

/// What the consent is for.
pub struct Request<'a> {
    pub config: &'a Config,
    /// The account's login (the store's key).
    pub account: &'a str,
    /// Passed as `login_hint`, so the right user is preselected.
    pub mailbox: &'a str,
}

impl Request<'_> {
    fn scopes(&self) -> Vec<Scope> {
        let mut scopes: Vec<Scope> =
            delegated_scopes(self.config.oauth.cloud, &self.config.protocols())
                .into_iter()
                .map(Scope::new)
                .collect();
        scopes.push(Scope::new(OFFLINE_SCOPE.to_string()));
        scopes
    }
}

fn refresh_token_of(response: &oauth2::basic::BasicTokenResponse) -> Result<SecretString, String> {
    response
        .refresh_token()
        .map(|t| SecretString::from(t.secret().to_string()))
        .ok_or_else(|| {
            "the provider returned no refresh token (is offline_access allowed for this app?)"
                .to_string()
        })
}

/// The device authorization grant. Instructions go to `out`.
pub async fn device_flow(
    req: &Request<'_>,
    out: &mut (dyn Write + Send),
) -> Result<SecretString, String> {
    let oauth = &req.config.oauth;
    let url = DeviceAuthorizationUrl::new(oauth.device_code_url())
        .map_err(|e| format!("oauth.device_code_url: {e}"))?;
    let client = super::client(oauth)?.set_device_authorization_url(url);
    let http = Http::new()?;
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(req.scopes())
        .add_extra_param("login_hint", req.mailbox)
        .request_async(&http)
        .await
        .map_err(|e| format!("device code request failed: {}", describe(e)))?;
    let _ = writeln!(
        out,
        "To let oxbridge use {} for {}, open\n\n    {}\n\nand enter the code\n\n    {}\n\nSign in as {}. Waiting (the code expires in {} s)...",
        req.mailbox,
        req.account,
        details.verification_uri().as_str(),
        details.user_code().secret(),
        req.mailbox,
        details.expires_in().as_secs()
    );
    let _ = out.flush();
    let response = client
        .exchange_device_access_token(&details)
        .request_async(&http, tokio::time::sleep, None)
        .await
        .map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => match r.error() {
                DeviceCodeErrorResponseType::AccessDenied => "consent was declined".to_string(),
                DeviceCodeErrorResponseType::ExpiredToken => {
                    "the code expired before consent was given; run `oxbridge login` again"
                        .to_string()
                }
                DeviceCodeErrorResponseType::Basic(b) if b.as_ref() == "authorization_declined" => {
                    "consent was declined".to_string()
                }
                other => format!(
                    "{other}{}",
                    r.error_description()
                        .map(|d| format!(": {}", super::first_line(d)))
                        .unwrap_or_default()
                ),
            },
            other => describe(other),
        })?;
    refresh_token_of(&response)
}

/// Authorization code with PKCE on a loopback redirect. Instructions go to
/// `out`; `port` 0 picks a free port.
pub async fn browser_flow(
    req: &Request<'_>,
    port: u16,
    out: &mut (dyn Write + Send),
) -> Result<SecretString, String> {
    let oauth = &req.config.oauth;
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port} for the redirect: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let redirect =
        RedirectUrl::new(format!("http://localhost:{port}/")).map_err(|e| e.to_string())?;
    let auth_url =
        AuthUrl::new(oauth.authorize_url()).map_err(|e| format!("oauth.authorize_url: {e}"))?;
    let client = super::client(oauth)?
        .set_auth_uri(auth_url)
        .set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(req.scopes())
        .add_extra_param("login_hint", req.mailbox)
        .set_pkce_challenge(challenge)
        .url();
    let _ = writeln!(
        out,
        "To let oxbridge use {} for {}, open this URL in a browser and sign in as {}:\n\n    {url}\n\nThe browser is sent back to http://localhost:{port}/ (over SSH: ssh -L {port}:127.0.0.1:{port} this-host). Waiting...",
        req.mailbox, req.account, req.mailbox
    );
    let _ = out.flush();
    let code = tokio::time::timeout(BROWSER_TIMEOUT, wait_for_code(&listener, state.secret()))
        .await
        .map_err(|_| format!("no redirect within {} s", BROWSER_TIMEOUT.as_secs()))??;
    let http = Http::new()?;
    let response = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .map_err(|e| format!("code exchange failed: {}", classify(e)))?;
    refresh_token_of(&response)
}

/// Serve the redirect: the first request that carries our `state` ends the
/// wait with its `code` (or its `error`).
async fn wait_for_code(listener: &TcpListener, state: &str) -> Result<String, String> {
    loop {
        let (mut stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; MAX_REDIRECT_REQUEST];
        let mut len = 0;
        while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf[len..])).await
            {
                Ok(Ok(n)) if n > 0 => len += n,
                _ => break,
            }
        }
        let request = String::from_utf8_lossy(&buf[..len]);
        let target = request
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("");
        let query: Vec<(String, String)> =
            oauth2::url::Url::parse(&format!("http://localhost{target}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default();
        let get = |k: &str| {
            query
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
        };
        if get("state").as_deref() != Some(state) {
            let _ = respond(
                &mut stream,
                400,
                "This is not the redirect oxbridge is waiting for.",
            )
            .await;
            continue;
        }
        if let Some(error) = get("error") {
            let _ = respond(
                &mut stream,
                200,
                "Consent was not given. You can close this window.",
            )
            .await;
            let description = get("error_description")
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            return Err(format!("the provider answered {error}{description}"));
        }
        let Some(code) = get("code") else {
            let _ = respond(&mut stream, 400, "The redirect carries no code.").await;
            continue;
        };
        let _ = respond(
            &mut stream,
            200,
            "oxbridge has the consent. You can close this window.",
        )
        .await;
        return Ok(code);
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: u16,
    text: &str,
) -> std::io::Result<()> {
    let reason = if status == 200 { "OK" } else { "Bad Request" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes()).await
}

fn describe<T: oauth2::ErrorResponse + 'static>(
    e: RequestTokenError<super::http::HttpError, T>,
) -> String {
    match e {
        RequestTokenError::ServerResponse(r) => r.to_string(),
        RequestTokenError::Request(h) => h.to_string(),
        RequestTokenError::Parse(err, _) => format!("unreadable answer: {}", err.path()),
        RequestTokenError::Other(s) => s,
    }
}
