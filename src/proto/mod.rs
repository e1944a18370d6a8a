//! One module per mail protocol: the device side before login (`preauth`),
//! and the XOAUTH2 login upstream. What they share lives here: the login
//! itself (local check, token, dial, XOAUTH2, one retry with a fresh token)
//! and the hand-off to the relay.

pub mod imap;
pub mod pop3;
pub mod smtp;

use std::time::Duration;

use tracing::{info, warn};

use crate::accounts::Identity;
use crate::config::Protocol;
use crate::error::AuthError;
use crate::line::Conn;
use crate::sasl::Credentials;
use crate::App;

/// How long a device may be silent before it has logged in.
pub const PREAUTH_TIMEOUT: Duration = Duration::from_secs(300);

/// How a session ended before the relay, or the hand-off to it.
pub enum Preauth {
    /// Logged in upstream: relay from here.
    Relay {
        device: Conn,
        upstream: Conn,
        account: String,
    },
    /// The session is over (QUIT/LOGOUT, timeout, limits, shutdown, closed).
    Closed(&'static str),
}

/// A logged-in upstream connection and what the server said it can do
/// (SMTP: EHLO keywords; IMAP: capabilities after login; POP3: nothing).
pub struct Upstream {
    pub conn: Conn,
    pub capabilities: Vec<String>,
}

/// Check the device's credentials, then log in upstream. Logs the outcome
/// once (never the password). `client_name` is what SMTP says in EHLO.
pub async fn login(
    app: &App,
    protocol: Protocol,
    creds: Credentials,
    client_name: &str,
) -> Result<(Upstream, Identity), AuthError> {
    let login = creds.login.clone();
    let result: Result<(Upstream, Identity), AuthError> = async {
        let id = app
            .accounts
            .authenticate(&creds.login, creds.password)
            .await?;
        let upstream = upstream_login(app, protocol, &id, client_name).await?;
        Ok((upstream, id))
    }
    .await;
    match &result {
        Ok((_, id)) => {
            info!(login = %login, account = %id.account, mailbox = %id.mailbox, grant = %id.grant, "authenticated; relaying")
        }
        Err(e) => warn!(login = %login, reason = e.reason(), error = %e, "login failed"),
    }
    result
}

/// Fetch a token and dial upstream at once, then log in with XOAUTH2; a
/// cached token the server refuses is replaced by a fresh one and tried
/// once more on the same connection.
async fn upstream_login(
    app: &App,
    protocol: Protocol,
    id: &Identity,
    client_name: &str,
) -> Result<Upstream, AuthError> {
    let (token, dialled) = tokio::join!(app.tokens.get(id), dial(app, protocol, client_name));
    let token = token?;
    let (mut conn, capabilities) = dialled?;
    let capabilities = match xoauth2(
        protocol,
        &mut conn,
        &id.mailbox,
        &token.secret,
        &capabilities,
    )
    .await
    {
        Err(AuthError::UpstreamRefused(detail)) if !token.fresh => {
            info!(upstream = %detail, "upstream refused a cached token; fetching a new one");
            app.tokens.invalidate(id, &token.secret).await;
            let token = app.tokens.get(id).await?;
            xoauth2(
                protocol,
                &mut conn,
                &id.mailbox,
                &token.secret,
                &capabilities,
            )
            .await?
        }
        other => other?,
    };
    Ok(Upstream { conn, capabilities })
}

async fn dial(
    app: &App,
    protocol: Protocol,
    client_name: &str,
) -> Result<(Conn, Vec<String>), AuthError> {
    match protocol {
        Protocol::Smtp => smtp::dial(app, client_name).await,
        Protocol::Imap => imap::dial(app).await,
        Protocol::Pop3 => pop3::dial(app).await.map(|c| (c, Vec::new())),
    }
}

async fn xoauth2(
    protocol: Protocol,
    conn: &mut Conn,
    mailbox: &str,
    token: &secrecy::SecretString,
    capabilities: &[String],
) -> Result<Vec<String>, AuthError> {
    match protocol {
        Protocol::Smtp => smtp::auth_xoauth2(conn, mailbox, token)
            .await
            .map(|()| capabilities.to_vec()),
        Protocol::Imap => imap::auth_xoauth2(conn, mailbox, token, capabilities).await,
        Protocol::Pop3 => pop3::auth_xoauth2(conn, mailbox, token)
            .await
            .map(|()| Vec::new()),
    }
}
