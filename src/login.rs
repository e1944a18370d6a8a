//! The one login path, for every protocol: throttle -> account (local
//! password) -> mailbox slot -> token and dial at once -> XOAUTH2 -> one
//! retry with a fresh token when the server refuses a cached one. Each
//! outcome is logged once and counted; never a password.
//!
//! A login over a protocol its account's `protocols` leave out is refused
//! before all of that, with the protocol's authentication failure: its
//! password is not checked (so that protocol tells nothing about it), the
//! throttle does not count it (a device retrying there locks neither its
//! account nor its address out of the protocols it may use), and no
//! token is fetched and nothing upstream is dialled. An IMAP session
//! that moves to a new upstream connection before its token expires logs
//! in again through the same steps ([`renew`]), keeping its slot.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tracing::{info, warn};

use crate::accounts::Identity;
use crate::app::App;
use crate::config::{Grant, Protocol};
use crate::error::AuthError;
use crate::limits::Slot;
use crate::net::Conn;
use crate::upstream::Dialer;
use crate::wire::sasl::Credentials;

/// A logged-in upstream connection and what the server said it can do
/// (SMTP: EHLO keywords; IMAP: capabilities after login; POP3: nothing).
pub struct Upstream {
    pub conn: Conn,
    pub capabilities: Vec<String>,
    /// The mailbox's session slot (see `limits`), held while the session lives.
    pub slot: Slot,
    /// When the token this connection logged in with expires, and how long
    /// it lived.
    pub expires_at: Instant,
    pub lifetime: Duration,
}

/// A login that went through: the upstream session and whose it is.
pub struct LoggedIn {
    pub upstream: Upstream,
    pub id: Identity,
}

/// Check the device's credentials, then log in upstream. `client_name` is
/// what SMTP says in EHLO.
pub async fn login(
    app: &App,
    protocol: Protocol,
    creds: Credentials,
    client_name: &str,
    peer: SocketAddr,
) -> Result<LoggedIn, AuthError> {
    let login = creds.login.clone();
    let refused = app.accounts().protocol_refusal(&login, protocol);
    let result = match refused {
        Some(refused) => Err(refused),
        None => {
            guarded(app, creds, peer, Some(protocol), |id| async move {
                upstream_login(app, protocol, &id, client_name)
                    .await
                    .map(|upstream| LoggedIn { upstream, id })
            })
            .await
        }
    };
    let label = app.accounts().describe(&login);
    logged(app, protocol, peer, &label, &login, &result);
    result
}

/// A login on a spooling listener (or of an account that sends through
/// Microsoft Graph): throttle -> account (local password), and nothing
/// upstream; mail is sent later. The `password` grant cannot be spooled:
/// its tokens need the device's password, which is never kept.
pub async fn local_login(
    app: &App,
    creds: Credentials,
    peer: SocketAddr,
) -> Result<Identity, AuthError> {
    let login = creds.login.clone();
    let refused = app.accounts().protocol_refusal(&login, Protocol::Smtp);
    let result = match refused {
        Some(refused) => Err(refused),
        None => {
            guarded(app, creds, peer, None, |id| async move {
                match id.grant {
                    Grant::Password => Err(AuthError::CannotSpool(
                        "grant = \"password\" needs the device's password for every token",
                    )),
                    _ => Ok(id),
                }
            })
            .await
        }
    };
    let label = app.accounts().describe(&login);
    spooling(app, peer, &label, &login, &result);
    result
}

/// The throttle around a login: refused while locked out; counted
/// before the device's credentials are checked (so that guesses sent at
/// once wait for each other), then `then`. A wrong local password, or one
/// the token endpoint refused for the `password` grant, counts against
/// the address and what the password opens (see `throttle::Claim`); a
/// success clears the latter; any other outcome is not counted. The
/// `password` grant's password is checked by fetching the `protocol`
/// token with it, before `then` waits for a mailbox slot, so that devices
/// waiting for a full mailbox are never counted as guesses.
async fn guarded<T, F, Fut>(
    app: &App,
    creds: Credentials,
    peer: SocketAddr,
    protocol: Option<Protocol>,
    then: F,
) -> Result<T, AuthError>
where
    F: FnOnce(Identity) -> Fut,
    Fut: std::future::Future<Output = Result<T, AuthError>>,
{
    let accounts = app.accounts();
    let attempt = app
        .throttle
        .begin(peer.ip(), &accounts.claim(&creds.login))
        .await
        .map_err(AuthError::Throttled)?;
    // The turn bounds the password checks running at once: Argon2, or
    // the token endpoint for the `password` grant (held through it below).
    let turn = app
        .throttle
        .check_turn()
        .await
        .map_err(AuthError::Throttled)?;
    let id = accounts.authenticate(&creds.login, creds.password).await;
    let id = match id {
        Err(e) => {
            drop(turn);
            if matches!(e, AuthError::BadCredentials(_)) {
                tokio::time::sleep(attempt.failed().await).await;
            }
            return Err(e);
        }
        Ok(id) => id,
    };
    let checked = match protocol {
        // The token endpoint checks the `password` grant's password; the
        // token is cached for `then`'s own request.
        Some(protocol) if id.grant == Grant::Password => {
            app.tokens.get(&id, protocol).await.map(drop)
        }
        _ => Ok(()),
    };
    drop(turn);
    match (checked, protocol) {
        (Err(e @ AuthError::TokenRefused(_)), _) => {
            tokio::time::sleep(attempt.failed().await).await;
            return Err(e);
        }
        (Err(e), _) => return Err(e),
        // Nothing upstream: `then` refuses the `password` grant itself.
        (Ok(()), None) if id.grant == Grant::Password => drop(attempt),
        (Ok(()), _) => attempt.succeeded().await,
    }
    then(id).await
}

/// A `[[relay]]` rule's device on a spooling listener: the rule's account,
/// nothing upstream.
pub fn local_relay(app: &App, account: &str, peer: SocketAddr) -> Result<Identity, AuthError> {
    let result = app.accounts().identity(account);
    spooling(app, peer, &format!("relay as {account}"), account, &result);
    result
}

/// `label` is what the log calls the login; `name`, the account it claims.
fn spooling(
    app: &App,
    peer: SocketAddr,
    label: &str,
    name: &str,
    result: &Result<Identity, AuthError>,
) {
    count(app, Protocol::Smtp, peer, name, result.as_ref());
    match result {
        Ok(id) => {
            info!(login = %label, account = %id.account, mailbox = %id.mailbox, grant = %id.grant, "authenticated; spooling")
        }
        Err(e) => log_failure(label, e),
    }
}

/// The delivery worker's login for a spooled message: the mailbox's SMTP
/// slot, a token, dial and XOAUTH2, as for a device.
pub async fn delivery_login(app: &App, id: &Identity) -> Result<Upstream, AuthError> {
    let result = upstream_login(app, Protocol::Smtp, id, &app.hostname).await;
    if let Err(e) = &result {
        warn!(account = %id.account, mailbox = %id.mailbox, reason = e.reason(), error = %e, "delivery login failed");
    }
    result
}

/// Log in upstream as a `[[relay]]` rule's account, for a device that
/// cannot authenticate (its network is the credential).
pub async fn relay_login(
    app: &App,
    account: &str,
    client_name: &str,
    peer: SocketAddr,
) -> Result<LoggedIn, AuthError> {
    let result = async {
        let id = app.accounts().identity(account)?;
        let upstream = upstream_login(app, Protocol::Smtp, &id, client_name).await?;
        Ok(LoggedIn { upstream, id })
    }
    .await;
    logged(
        app,
        Protocol::Smtp,
        peer,
        &format!("relay as {account}"),
        account,
        &result,
    );
    result
}

/// A login refused before it was tried (a SASL authorization identity that
/// is not the login), or after (the upstream no longer offers what the
/// device was told): logged and counted like any failed login.
pub fn refused(app: &App, protocol: Protocol, peer: SocketAddr, login: &str, error: &AuthError) {
    count(app, protocol, peer, login, Err(error));
    log_failure(&app.accounts().describe(login), error);
}

/// Count a device login: in the metrics (per configured account too) and
/// on the status page's board. The account is the one that logged in, or
/// the one `name` claims.
fn count(
    app: &App,
    protocol: Protocol,
    peer: SocketAddr,
    name: &str,
    outcome: Result<&Identity, &AuthError>,
) {
    let (account, error) = match outcome {
        Ok(id) => (Some(id.account.clone()), None),
        Err(e) => (app.accounts().account_of(name), Some(e)),
    };
    crate::metrics::login(protocol, error.map(AuthError::reason));
    if let Some(AuthError::Busy(_)) = error {
        // The mailbox's session limit: a refusal for too many sessions too.
        crate::metrics::refusal(protocol, "too_many_sessions");
    }
    if let Some(account) = &account {
        crate::metrics::account_login(account, protocol, error.is_none());
    }
    crate::status::board::login(
        protocol,
        peer.ip().to_canonical(),
        account.as_deref(),
        error.map_or(Ok(()), Err),
    );
}

fn logged(
    app: &App,
    protocol: Protocol,
    peer: SocketAddr,
    label: &str,
    name: &str,
    result: &Result<LoggedIn, AuthError>,
) {
    count(
        app,
        protocol,
        peer,
        name,
        result.as_ref().map(|done| &done.id),
    );
    match result {
        Ok(LoggedIn { id, upstream }) => {
            let token_left_s = upstream
                .expires_at
                .saturating_duration_since(Instant::now())
                .as_secs();
            info!(login = %label, account = %id.account, mailbox = %id.mailbox, grant = %id.grant, token_left_s, "authenticated; relaying")
        }
        Err(e) => log_failure(label, e),
    }
}

fn log_failure(login: &str, e: &AuthError) {
    // The fix `oxbridge check` prints, where there is one.
    match crate::diagnose::advice(e) {
        Some(fix) => warn!(login = %login, reason = e.reason(), error = %e, fix, "login failed"),
        None => warn!(login = %login, reason = e.reason(), error = %e, "login failed"),
    }
}

/// `oxbridge check`: a token and an upstream login for `id`, then the
/// connection is closed. Returns the mailbox logged in to.
pub async fn check_login(
    app: &App,
    protocol: Protocol,
    id: &Identity,
) -> Result<String, AuthError> {
    let mut upstream = upstream_login(app, protocol, id, "oxbridge-check").await?;
    Dialer::check_and_leave(protocol, &mut upstream.conn, &id.mailbox).await?;
    Ok(id.mailbox.to_string())
}

/// Whether `token` opens `id`'s mailbox: an XOAUTH2 login with it over
/// `protocol`, then the connection is closed (a new consent is proven so
/// before it is stored). One short login, without a mailbox slot.
pub async fn prove_token(
    app: &App,
    protocol: Protocol,
    id: &Identity,
    token: &SecretString,
) -> Result<(), AuthError> {
    let (mut conn, offered) = app
        .dialer
        .dial(&id.provider, protocol, "oxbridge-consent")
        .await?;
    Dialer::xoauth2(protocol, &mut conn, &id.mailbox, token, &offered).await?;
    Dialer::check_and_leave(protocol, &mut conn, &id.mailbox).await
}

/// A new upstream connection for the session of `id`, which keeps the
/// mailbox slot it holds: a token fresh enough for a long session, dial,
/// XOAUTH2, as at login. Logged, not counted as a device login.
pub async fn renew(app: &App, protocol: Protocol, id: &Identity) -> Result<Renewed, AuthError> {
    let result = connect(app, protocol, id, "").await;
    match &result {
        Ok(r) => {
            let left = r.expires_at.saturating_duration_since(Instant::now());
            info!(account = %id.account, mailbox = %id.mailbox, token_left_s = left.as_secs(), "upstream login renewed")
        }
        Err(e) => {
            warn!(account = %id.account, reason = e.reason(), error = %e, "upstream login renewal failed")
        }
    }
    result
}

/// A logged-in upstream connection without a slot (see [`renew`]).
pub struct Renewed {
    pub conn: Conn,
    pub capabilities: Vec<String>,
    pub expires_at: Instant,
    pub lifetime: Duration,
}

/// Take the mailbox's slot, then [`connect`].
async fn upstream_login(
    app: &App,
    protocol: Protocol,
    id: &Identity,
    client_name: &str,
) -> Result<Upstream, AuthError> {
    let slot = app.mailbox_limits.acquire(protocol, &id.mailbox).await?;
    let r = connect(app, protocol, id, client_name).await?;
    Ok(Upstream {
        conn: r.conn,
        capabilities: r.capabilities,
        slot,
        expires_at: r.expires_at,
        lifetime: r.lifetime,
    })
}

/// Fetch a token and dial at once, then log in with XOAUTH2; a cached
/// token the server refuses is replaced by a fresh one and tried once more
/// on the same connection.
async fn connect(
    app: &App,
    protocol: Protocol,
    id: &Identity,
    client_name: &str,
) -> Result<Renewed, AuthError> {
    let (token, dialled) = tokio::join!(
        app.tokens.get(id, protocol),
        app.dialer.dial(&id.provider, protocol, client_name)
    );
    let mut token = token?;
    let (mut conn, offered) = dialled?;
    let capabilities =
        match Dialer::xoauth2(protocol, &mut conn, &id.mailbox, &token.secret, &offered).await {
            Err(AuthError::UpstreamRefused(detail)) if !token.fresh => {
                info!(upstream = %detail, "upstream refused a cached token; fetching a new one");
                app.tokens.invalidate(id, &token.secret).await;
                token = app.tokens.get(id, protocol).await?;
                Dialer::xoauth2(protocol, &mut conn, &id.mailbox, &token.secret, &offered).await?
            }
            other => other?,
        };
    Ok(Renewed {
        conn,
        capabilities,
        expires_at: token.expires_at,
        lifetime: token.lifetime,
    })
}
