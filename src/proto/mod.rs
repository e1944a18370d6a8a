//! One module per mail protocol: the device side before login (`preauth`),
//! and the XOAUTH2 login upstream. What they share lives here: the login
//! itself (local check, token, dial, XOAUTH2, one retry with a fresh token)
//! and the hand-off to the relay.

pub mod imap;
pub mod pop3;
pub mod smtp;

use std::net::SocketAddr;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::accounts::Identity;
use crate::config::{Grant, LimitsConfig, Protocol};
use crate::error::AuthError;
use crate::line::{Conn, LineError};
use crate::sasl::{self, Credentials};
use crate::server::Listener;
use crate::App;

/// How a session ended before the relay, or the hand-off to it.
// One per session, moved once into the relay: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Preauth {
    /// Logged in upstream: relay from here.
    Relay {
        device: Conn,
        upstream: Conn,
        account: String,
        mailbox: String,
        /// The mailbox's upstream session slot, held while the session lives.
        _mailbox_slot: crate::limits::Slot,
    },
    /// The session is over (QUIT/LOGOUT, timeout, limits, shutdown, closed).
    Closed(&'static str),
}

/// The device's side of a session before login, shared by the protocols:
/// its connection, its listener's rules, and the counters that close it.
pub struct Device<'a> {
    pub conn: Conn,
    pub listener: &'a Listener,
    /// The client: the TCP peer, or the address a PROXY header gave.
    pub peer: SocketAddr,
    /// How long the device may be silent (`[limits] preauth_timeout_s`).
    pub timeout: Duration,
    /// The longest command line (`[limits] max_line`).
    pub max_line: usize,
    /// No line has been read yet (a PROXY header would be the first).
    first_line: bool,
    /// Bad commands so far.
    pub errors: usize,
    /// Failed logins so far.
    pub auth_failures: usize,
}

impl<'a> Device<'a> {
    pub fn new(
        conn: Conn,
        listener: &'a Listener,
        peer: SocketAddr,
        limits: &LimitsConfig,
    ) -> Device<'a> {
        Device {
            conn,
            listener,
            peer,
            timeout: Duration::from_secs(limits.preauth_timeout_s),
            max_line: limits.max_line,
            first_line: true,
            errors: 0,
            auth_failures: 0,
        }
    }

    /// Read one command line, bounded by `max_line` and `timeout`. A PROXY
    /// header where none is expected ends the session.
    pub async fn read_line(&mut self) -> Result<Vec<u8>, LineError> {
        let line = self.conn.read_line(self.max_line, self.timeout).await?;
        if std::mem::take(&mut self.first_line) {
            let mut first = line.clone();
            if line.is_empty() {
                first.extend_from_slice(b"\r\n");
                first.extend_from_slice(self.conn.buffered());
            }
            if crate::proxy_protocol::looks_like_header(&first) {
                return Err(LineError::Unexpected(
                    "PROXY header on a listener without proxy_protocol",
                ));
            }
        }
        Ok(line)
    }

    /// Send a reply; a device that cannot take it ends the session.
    pub async fn reply(&mut self, text: &str) -> Result<(), &'static str> {
        self.conn
            .send(text.as_bytes(), self.timeout)
            .await
            .map_err(|_| -> &'static str { "device write failed" })
    }

    /// Passwords are taken over TLS, or in the clear where the listener allows it.
    pub fn auth_allowed(&self) -> bool {
        self.conn.is_tls() || self.listener.allow_plaintext_auth
    }

    pub fn starttls_offered(&self) -> bool {
        self.listener.tls != crate::config::TlsMode::None && !self.conn.is_tls()
    }

    /// The TLS handshake after the protocol's go-ahead (STARTTLS, STLS);
    /// whatever the device sent before it is dropped.
    pub async fn start_tls(&mut self) -> Result<(), &'static str> {
        let acceptor = self
            .listener
            .tls_acceptor()
            .ok_or("STARTTLS without a certificate")?;
        let dropped = self
            .conn
            .accept_tls(&acceptor, crate::server::TLS_HANDSHAKE_TIMEOUT)
            .await
            .map_err(|_| -> &'static str { "TLS handshake failed" })?;
        if dropped > 0 {
            warn!(
                bytes = dropped,
                "dropped data sent before the TLS handshake"
            );
        }
        Ok(())
    }

    /// SASL PLAIN: the initial response, or the line answering `prompt`.
    /// A cancel gets `canceled`; an undecodable exchange gets `undecodable`
    /// and counts as a failed login. `None` when there are no credentials.
    pub async fn plain_credentials(
        &mut self,
        initial: Option<&[u8]>,
        prompt: &str,
        canceled: &str,
        undecodable: &str,
    ) -> Result<Option<Credentials>, &'static str> {
        let message = match initial {
            Some(ir) => sasl::decode_line(ir),
            None => self.sasl_response(prompt).await?,
        };
        match message.and_then(|m| sasl::decode_plain(&m)) {
            Ok(c) => Ok(Some(c)),
            Err(sasl::SaslError::Canceled) => {
                self.reply(canceled).await?;
                Ok(None)
            }
            Err(e) => {
                debug!(error = %e, "undecodable SASL PLAIN exchange");
                self.auth_failures += 1;
                self.reply(undecodable).await?;
                Ok(None)
            }
        }
    }

    /// Send a SASL prompt and decode the base64 line that answers it.
    pub async fn sasl_response(
        &mut self,
        prompt: &str,
    ) -> Result<Result<Vec<u8>, sasl::SaslError>, &'static str> {
        self.reply(prompt).await?;
        match self.conn.read_line(self.max_line, self.timeout).await {
            Ok(line) => Ok(sasl::decode_line(&line)),
            Err(LineError::TooLong(_)) => Ok(Err(sasl::SaslError::TooLong)),
            Err(_) => Err("device gone during authentication"),
        }
    }
}

/// A logged-in upstream connection and what the server said it can do
/// (SMTP: EHLO keywords; IMAP: capabilities after login; POP3: nothing).
pub struct Upstream {
    pub conn: Conn,
    pub capabilities: Vec<String>,
    /// The mailbox's session slot (see `limits`).
    pub slot: crate::limits::Slot,
}

impl Preauth {
    /// Hand a logged-in session to the relay.
    pub fn relay(device: Conn, upstream: Upstream, id: &Identity) -> Preauth {
        Preauth::Relay {
            device,
            upstream: upstream.conn,
            account: id.account.clone(),
            mailbox: id.mailbox.clone(),
            _mailbox_slot: upstream.slot,
        }
    }
}

/// Check the device's credentials, then log in upstream. Logs the outcome
/// once (never the password). `client_name` is what SMTP says in EHLO.
pub async fn login(
    app: &App,
    protocol: Protocol,
    creds: Credentials,
    client_name: &str,
    peer: SocketAddr,
) -> Result<(Upstream, Identity), AuthError> {
    let login = creds.login.clone();
    let result: Result<(Upstream, Identity), AuthError> = async {
        app.throttle
            .check(peer.ip(), &login)
            .await
            .map_err(AuthError::Throttled)?;
        let id = app
            .accounts()
            .authenticate(&creds.login, creds.password)
            .await;
        // A wrong local password, or one the token endpoint refused for the
        // password grant, counts against the address and the account.
        let password_grant = id.as_ref().is_ok_and(|id| id.grant == Grant::Password);
        let result = match id {
            Ok(id) => upstream_login(app, protocol, &id, client_name)
                .await
                .map(|up| (up, id)),
            Err(e) => Err(e),
        };
        match &result {
            Err(AuthError::BadCredentials(_)) => {
                tokio::time::sleep(app.throttle.failure(peer.ip(), &login).await).await
            }
            Err(AuthError::TokenRefused(_)) if password_grant => {
                tokio::time::sleep(app.throttle.failure(peer.ip(), &login).await).await
            }
            Ok(_) => app.throttle.success(peer.ip(), &login).await,
            Err(_) => {}
        }
        result
    }
    .await;
    log_login(protocol, &login, &result);
    result
}

/// Log in upstream as a `[[relay]]` rule's account, for a device that
/// cannot authenticate (its network is the credential).
pub async fn relay_login(
    app: &App,
    account: &str,
    client_name: &str,
) -> Result<(Upstream, Identity), AuthError> {
    let result: Result<(Upstream, Identity), AuthError> = async {
        let id = app.accounts().identity(account)?;
        let upstream = upstream_login(app, Protocol::Smtp, &id, client_name).await?;
        Ok((upstream, id))
    }
    .await;
    log_login(Protocol::Smtp, &format!("relay as {account}"), &result);
    result
}

fn log_login(protocol: Protocol, login: &str, result: &Result<(Upstream, Identity), AuthError>) {
    crate::metrics::login(protocol, result.as_ref().err().map(AuthError::reason));
    match result {
        Ok((_, id)) => {
            info!(login = %login, account = %id.account, mailbox = %id.mailbox, grant = %id.grant, "authenticated; relaying")
        }
        Err(e) => match crate::diagnose::fix(e) {
            Some(fix) => {
                warn!(login = %login, reason = e.reason(), error = %e, fix, "login failed")
            }
            None => warn!(login = %login, reason = e.reason(), error = %e, "login failed"),
        },
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
    let timeout = std::time::Duration::from_secs(10);
    match protocol {
        Protocol::Smtp => smtp::check_sender(&mut upstream.conn, &id.mailbox).await?,
        Protocol::Imap => drop(upstream.conn.send(b"x LOGOUT\r\n", timeout).await),
        Protocol::Pop3 => drop(upstream.conn.send(b"QUIT\r\n", timeout).await),
    }
    Ok(id.mailbox.clone())
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
    let slot = app.mailbox_limits.acquire(protocol, &id.mailbox).await?;
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
    Ok(Upstream {
        conn,
        capabilities,
        slot,
    })
}

async fn dial(
    app: &App,
    protocol: Protocol,
    client_name: &str,
) -> Result<(Conn, Vec<String>), AuthError> {
    let started = std::time::Instant::now();
    let dialled = match protocol {
        Protocol::Smtp => smtp::dial(app, client_name).await,
        Protocol::Imap => imap::dial(app).await,
        Protocol::Pop3 => pop3::dial(app).await.map(|c| (c, Vec::new())),
    };
    if dialled.is_ok() {
        crate::metrics::upstream_connected(protocol, started.elapsed());
    }
    dialled
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
