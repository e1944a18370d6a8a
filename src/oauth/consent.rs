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
//! * `--paste`: authorization code with PKCE where neither of those works
//!   (Conditional Access blocks device code, no browser reaches the
//!   host): the operator opens the URL in any browser, signs in, and
//!   pastes back the address the browser was sent to (by default the
//!   cloud's `.../common/oauth2/nativeclient` page). An address whose
//!   `state` is not this request's is refused and another is read.
//!
//! Both ask for the delegated scopes of the protocols that have listeners,
//! plus `offline_access`.

use std::io::{BufRead, Read, Write};
use std::time::Duration;

use oauth2::{
    AuthUrl, AuthorizationCode, CsrfToken, DeviceAuthorizationUrl, DeviceCodeErrorResponseType,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    StandardDeviceAuthorizationResponse, TokenResponse,
};
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::classify;
use super::http::Http;
use crate::config::{Protocol, Provider, ProviderKind};

/// Why `oxbridge login` without `--browser` or `--paste` cannot serve a
/// Google account.
pub const GOOGLE_NO_DEVICE_FLOW: &str = "Google's device flow does not grant mail scopes (https://mail.google.com/); use `oxbridge login ACCOUNT --browser` (loopback redirect, works over an SSH tunnel) or `--paste`";

/// How long the browser flow waits for the redirect.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest redirect request read from the browser, and the longest
/// pasted address.
const MAX_REDIRECT_REQUEST: usize = 16 * 1024;
/// Pasted addresses read before `--paste` gives up.
const MAX_PASTES: usize = 5;

/// The redirect URI of `--paste` unless one is given: for Microsoft the
/// cloud's page for native clients, which Entra offers for public client
/// apps; for Google a loopback address, which its desktop clients accept
/// on any port (nothing needs to listen there).
pub fn paste_redirect(provider: &Provider) -> String {
    match provider.kind {
        ProviderKind::Google => GOOGLE_PASTE_REDIRECT.to_string(),
        _ => format!("{}/common/oauth2/nativeclient", provider.cloud.authority()),
    }
}

/// Where `--paste` sends the browser back for Google.
pub const GOOGLE_PASTE_REDIRECT: &str = "http://127.0.0.1/";

/// What the consent is for.
pub struct Request<'a> {
    pub provider: &'a Provider,
    /// The protocols that have listeners (what is asked for).
    pub protocols: Vec<Protocol>,
    /// The account's login (the store's key).
    pub account: &'a str,
    /// Passed as `login_hint`, so the right user is preselected.
    pub mailbox: &'a str,
    /// `[upstream] ca_file`: extra roots for the token endpoint.
    pub ca_file: Option<&'a std::path::Path>,
}

impl Request<'_> {
    fn scopes(&self) -> Vec<Scope> {
        self.provider
            .delegated_scopes(&self.protocols, true)
            .into_iter()
            .map(Scope::new)
            .collect()
    }
}

fn refresh_token_of(response: &oauth2::basic::BasicTokenResponse) -> Result<SecretString, String> {
    response
        .refresh_token()
        .map(|t| SecretString::from(t.secret().to_string()))
        .ok_or_else(|| {
            "the provider returned no refresh token (Microsoft: is offline_access allowed for this app? Google: was access_type=offline granted?)"
                .to_string()
        })
}

/// The device authorization grant. Instructions go to `out`.
pub async fn device_flow(
    req: &Request<'_>,
    out: &mut (dyn Write + Send),
) -> Result<SecretString, String> {
    let p = req.provider;
    if p.kind == ProviderKind::Google {
        return Err(GOOGLE_NO_DEVICE_FLOW.to_string());
    }
    let url = DeviceAuthorizationUrl::new(p.device_code_url.clone())
        .map_err(|e| format!("{}.device_code_url: {e}", p.key))?;
    let client = super::client(p)?.set_device_authorization_url(url);
    let http = Http::new(req.ca_file)?;
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

/// An authorization-code request under way: the URL the browser opens,
/// and what redeems the code that comes back (the PKCE verifier never
/// leaves this process).
pub struct Authorization {
    client: CodeClient,
    /// The URL to open (it carries `state` and the PKCE challenge only).
    pub url: String,
    state: CsrfToken,
    verifier: PkceCodeVerifier,
    ca_file: Option<std::path::PathBuf>,
}

/// What a redeemed code gives: the refresh token to store, and the access
/// token that came with it (to prove whose it is before storing).
pub struct Granted {
    pub refresh: SecretString,
    pub access: SecretString,
}

impl Authorization {
    /// Start one for `req`, the browser to come back to `redirect`.
    pub fn start(req: &Request<'_>, redirect: &str) -> Result<Authorization, String> {
        let p = req.provider;
        let redirect =
            RedirectUrl::new(redirect.to_string()).map_err(|e| format!("redirect URI: {e}"))?;
        let auth_url = AuthUrl::new(p.authorize_url.clone())
            .map_err(|e| format!("{}.authorize_url: {e}", p.key))?;
        let client = super::client(p)?
            .set_auth_uri(auth_url)
            .set_redirect_uri(redirect);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(CsrfToken::new_random)
            .add_scopes(req.scopes())
            .add_extra_param("login_hint", req.mailbox)
            .set_pkce_challenge(challenge);
        if p.kind == ProviderKind::Google {
            // Google returns a refresh token only for offline access, and
            // again on a later consent only when asked to show it again.
            request = request
                .add_extra_param("access_type", "offline")
                .add_extra_param("prompt", "consent");
        }
        let (url, state) = request.url();
        Ok(Authorization {
            client,
            url: url.to_string(),
            state,
            verifier,
            ca_file: req.ca_file.map(std::path::Path::to_path_buf),
        })
    }

    /// The `state` the answer must carry.
    pub fn state(&self) -> &str {
        self.state.secret()
    }

    /// What an address the browser was sent to says to this request.
    pub fn answer(&self, url: &oauth2::url::Url) -> Answer {
        redirect_answer(url, self.state())
    }

    /// Redeem `code` (once: the verifier goes with it).
    pub async fn redeem(self, code: String) -> Result<Granted, String> {
        let http = Http::new(self.ca_file.as_deref())?;
        let response = self
            .client
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(self.verifier)
            .request_async(&http)
            .await
            .map_err(|e| format!("code exchange failed: {}", classify(e)))?;
        Ok(Granted {
            refresh: refresh_token_of(&response)?,
            access: SecretString::from(response.access_token().secret().to_string()),
        })
    }
}

type CodeClient = oauth2::basic::BasicClient<
    oauth2::EndpointSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

/// Authorization code with PKCE on a loopback redirect. Instructions go to
/// `out`; `port` 0 picks a free port.
pub async fn browser_flow(
    req: &Request<'_>,
    port: u16,
    out: &mut (dyn Write + Send),
) -> Result<SecretString, String> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port} for the redirect: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    // Google asks for the loopback address itself, Entra registers localhost.
    let host = match req.provider.kind {
        ProviderKind::Google => "127.0.0.1",
        _ => "localhost",
    };
    let back = format!("http://{host}:{port}/");
    let auth = Authorization::start(req, &back)?;
    let url = &auth.url;
    let _ = writeln!(
        out,
        "To let oxbridge use {} for {}, open this URL in a browser and sign in as {}:\n\n    {url}\n\nThe browser is sent back to {back} (over SSH: ssh -L {port}:127.0.0.1:{port} this-host). Waiting...",
        req.mailbox, req.account, req.mailbox
    );
    let _ = out.flush();
    let code = tokio::time::timeout(BROWSER_TIMEOUT, wait_for_code(&listener, auth.state()))
        .await
        .map_err(|_| format!("no redirect within {} s", BROWSER_TIMEOUT.as_secs()))??;
    Ok(auth.redeem(code).await?.refresh)
}

/// Authorization code with PKCE, the redirect pasted back: the URL is
/// printed to `out`, the address the browser ended on is read from
/// `input`, one line at a time.
pub async fn paste_flow(
    req: &Request<'_>,
    redirect: &str,
    input: &mut (dyn BufRead + Send),
    out: &mut (dyn Write + Send),
) -> Result<SecretString, String> {
    let auth = Authorization::start(req, redirect)?;
    let url = &auth.url;
    let _ = writeln!(
        out,
        "To let oxbridge use {} for {}, open this URL in any browser and sign in as {}:\n\n    {url}\n\nThe browser then ends on a page under {redirect} (it may show an error or stay blank: that is expected). Copy the whole address from the address bar and paste it here:",
        req.mailbox, req.account, req.mailbox
    );
    let _ = out.flush();
    for _ in 0..MAX_PASTES {
        let Some(line) = read_bounded_line(input)? else {
            return Err("no address was pasted".into());
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let answer = oauth2::url::Url::parse(line)
            .map(|u| auth.answer(&u))
            .unwrap_or(Answer::NotOurs("that is not an address"));
        match answer {
            Answer::Code(code) => return Ok(auth.redeem(code).await?.refresh),
            Answer::Refused(why) => return Err(why),
            Answer::NotOurs(why) => {
                let _ = writeln!(
                    out,
                    "Refused: {why}. Paste the address the browser was sent to after this sign-in:"
                );
                let _ = out.flush();
            }
        }
    }
    Err(format!("no valid address in {MAX_PASTES} attempts"))
}

/// One line of at most [`MAX_REDIRECT_REQUEST`] bytes; None at the end of
/// the input.
fn read_bounded_line(input: &mut (dyn BufRead + Send)) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    let n = input
        .take(MAX_REDIRECT_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read the pasted address: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_REDIRECT_REQUEST {
        return Err(format!(
            "the pasted address is longer than {MAX_REDIRECT_REQUEST} bytes"
        ));
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// What a redirect says to the request with `state`.
pub enum Answer {
    Code(String),
    /// The provider's `error` (consent declined, policy): the flow ends.
    Refused(String),
    /// Not the answer to this request: another may come.
    NotOurs(&'static str),
}

fn redirect_answer(url: &oauth2::url::Url, state: &str) -> Answer {
    let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let get = |k: &str| {
        query
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    };
    if get("state").as_deref() != Some(state) {
        return Answer::NotOurs("its state is not this sign-in's (a stray or forged address)");
    }
    if let Some(error) = get("error") {
        let description = get("error_description")
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        return Answer::Refused(format!("the provider answered {error}{description}"));
    }
    match get("code") {
        Some(code) => Answer::Code(code),
        None => Answer::NotOurs("it carries no code"),
    }
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
        let answer = oauth2::url::Url::parse(&format!("http://localhost{target}"))
            .map(|u| redirect_answer(&u, state))
            .unwrap_or(Answer::NotOurs("not an address"));
        match answer {
            Answer::NotOurs(_) => {
                let _ = respond(
                    &mut stream,
                    400,
                    "This is not the redirect oxbridge is waiting for.",
                )
                .await;
            }
            Answer::Refused(why) => {
                let _ = respond(
                    &mut stream,
                    200,
                    "Consent was not given. You can close this window.",
                )
                .await;
                return Err(why);
            }
            Answer::Code(code) => {
                let _ = respond(
                    &mut stream,
                    200,
                    "oxbridge has the consent. You can close this window.",
                )
                .await;
                return Ok(code);
            }
        }
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
