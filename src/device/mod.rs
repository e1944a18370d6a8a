//! The device side before login. Each protocol's session is a plain state
//! machine: it takes an [`Input`] (a line, a literal, the outcome of a
//! login) and returns a [`Step`] (the bytes to reply and what to do next),
//! so that every pre-login reply is tested byte for byte without a socket.
//! One async driver, [`drive`], runs all three: it reads with bounds and
//! time limits, watches the shutdown, swaps in TLS, and calls the login.
//! It ends in a [`Handoff`]: a logged-in session for the relay, or the
//! reason the session closed.

pub mod imap;
pub mod names;
pub mod pop3;
pub mod refusal;
pub mod smtp;

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::accounts::Identity;
use crate::app::App;
use crate::config::Protocol;
use crate::error::AuthError;
use crate::listener::Listener;
use crate::login::{self, LoggedIn};
use crate::net::{Conn, LineError};
use crate::wire::sasl::Credentials;
use crate::wire::smtp::stream::Senders;
use refusal::{Refused, Who};

/// Commands a device may send before it logs in.
pub const MAX_PREAUTH_COMMANDS: usize = 100;
/// Unrecognised or malformed commands before the connection is closed.
pub const MAX_ERRORS: usize = 10;
/// Failed logins on one connection before it is closed.
pub const MAX_AUTH_FAILURES: usize = 3;

/// What the driver hands a session. No `Debug`: a line may hold a password.
pub enum Input<'a> {
    /// A line, without its CRLF.
    Line(&'a [u8]),
    /// A line longer than `[limits] max_line`; it was skipped. Its first
    /// bytes (at most [`crate::net::conn::LONG_LINE_HEAD`]), for a reply that
    /// names its command (an IMAP tag).
    TooLong(&'a [u8]),
    /// The bytes asked for with [`Then::ReadExact`].
    Literal(&'a [u8]),
    /// The bytes of [`Then::Discard`] are gone.
    Discarded,
    /// The TLS handshake of [`Then::StartTls`] is done.
    TlsStarted,
    /// What the upstream SMTP server offers in EHLO ([`Then::Capabilities`]).
    Capabilities(&'a [String]),
    /// The login of [`Then::Login`] went through; the capabilities are the
    /// upstream's after login (SMTP: its EHLO).
    LoggedIn { capabilities: &'a [String] },
    /// The login failed, or [`Then::Refuse`] refused it.
    LoginFailed(&'a AuthError),
    /// The device was silent for `[limits] preauth_timeout_s`.
    Timeout,
    /// The server is shutting down.
    Shutdown,
}

/// A session's answer: bytes for the device, then what comes next.
pub struct Step {
    pub reply: Vec<u8>,
    pub then: Then,
    /// The reply refuses the device, for this reason (logged and counted).
    pub refused: Option<Refused>,
    /// What the device said its name is (EHLO/HELO, IMAP ID).
    pub name: Option<String>,
}

/// What the driver does after writing a step's reply.
pub enum Then {
    /// Read the next line.
    Read,
    /// Read exactly this many bytes (an IMAP literal).
    ReadExact(usize),
    /// Read and drop this many bytes (a BDAT chunk before login).
    Discard(u64),
    /// Start TLS; whatever the device sent before the handshake is dropped.
    StartTls,
    /// Learn what the upstream SMTP server offers.
    Capabilities,
    /// Log in upstream.
    Login(Login),
    /// Count and log a refused login without trying it (a SASL
    /// authorization identity that is not the login).
    Refuse { login: String, error: AuthError },
    /// Hand the logged-in session to the relay; `replay` goes upstream first.
    Relay { replay: Vec<u8> },
    /// End the session, for this reason (the session log line says it).
    Close(&'static str),
}

/// A login a session asks for. No `Debug`: it holds a password.
pub enum Login {
    /// With the device's credentials; SMTP's `client_name` is its EHLO name.
    Password {
        creds: Credentials,
        client_name: String,
    },
    /// As a `[[relay]]` rule's account, for a device that cannot log in.
    Relay {
        account: String,
        client_name: String,
    },
}

impl Step {
    pub fn new(reply: Vec<u8>, then: Then) -> Step {
        Step {
            reply,
            then,
            refused: None,
            name: None,
        }
    }

    /// The reply refuses the device for `why`.
    pub fn refusing(mut self, why: Refused) -> Step {
        self.refused = Some(why);
        self
    }

    /// The device gave its name (cleaned by [`names::device_name`]).
    pub fn naming(mut self, name: &str) -> Step {
        self.name = names::device_name(name);
        self
    }

    pub fn read(reply: Vec<u8>) -> Step {
        Step::new(reply, Then::Read)
    }

    pub fn close(reply: Vec<u8>, why: &'static str) -> Step {
        Step::new(reply, Then::Close(why))
    }

    pub fn then(then: Then) -> Step {
        Step::new(Vec::new(), then)
    }
}

/// One protocol's session before login.
pub trait Dialogue: Send {
    /// The greeting, the first thing the device reads.
    fn greeting(&mut self) -> Step;
    /// The next step after `input`.
    fn on(&mut self, input: Input<'_>) -> Step;
}

/// What a session knows of the connection it serves.
#[derive(Debug, Clone)]
pub struct Context {
    /// The name oxbridge gives itself (SMTP greeting and EHLO).
    pub host: String,
    /// The connection is encrypted now.
    pub tls: bool,
    /// The listener has a certificate for STARTTLS/STLS (`tls = "starttls"`).
    pub can_starttls: bool,
    /// `allow_plaintext_auth`: passwords are taken without TLS.
    pub allow_plaintext_auth: bool,
}

impl Context {
    /// Passwords are taken over TLS, or in the clear where the listener allows it.
    pub fn auth_allowed(&self) -> bool {
        self.tls || self.allow_plaintext_auth
    }

    pub fn starttls_offered(&self) -> bool {
        self.can_starttls && !self.tls
    }

    /// Why a password is refused when [`Context::auth_allowed`] is false:
    /// the device skipped STARTTLS, or the listener has no TLS at all.
    pub fn clear_refusal(&self) -> Refused {
        match self.can_starttls {
            true => Refused::EncryptionRequired,
            false => Refused::PlaintextPassword,
        }
    }
}

/// The counters that close a session before login.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub commands: usize,
    pub errors: usize,
    pub auth_failures: usize,
}

/// A limit the counters have reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Commands,
    Errors,
    AuthFailures,
}

impl Limit {
    /// Why the session ends, for the session log line.
    pub fn why(self) -> &'static str {
        match self {
            Limit::Commands => "too many commands",
            Limit::Errors => "too many errors",
            Limit::AuthFailures => "too many failed logins",
        }
    }
}

impl Counters {
    /// `out`, then the next command; or, once a limit is reached, `out` and
    /// the protocol's goodbye for that limit, then the end of the session.
    pub fn step(&self, mut out: Vec<u8>, goodbye: impl Fn(Limit) -> Vec<u8>) -> Step {
        match self.reached() {
            None => Step::read(out),
            Some(limit) => {
                out.extend(goodbye(limit));
                Step::close(out, limit.why())
            }
        }
    }

    /// The first limit reached, in the order the session checks them.
    pub fn reached(&self) -> Option<Limit> {
        if self.commands >= MAX_PREAUTH_COMMANDS {
            Some(Limit::Commands)
        } else if self.errors >= MAX_ERRORS {
            Some(Limit::Errors)
        } else if self.auth_failures >= MAX_AUTH_FAILURES {
            Some(Limit::AuthFailures)
        } else {
            None
        }
    }
}

/// A SASL PLAIN login whose authorization identity is not the login
/// (Cyrus SASL clients send one with `-u`): refused as an authorization,
/// logged and counted like a failed login.
pub fn refuse_authorization(login: String, _authzid: &str) -> Step {
    Step::then(Then::Refuse {
        // Not the authzid itself: a device may type its password there.
        error: AuthError::Authorization("the authorization identity is not the login".into()),
        login,
    })
}

/// How a session ended before the relay, or the hand-off to it.
pub enum Handoff {
    /// Logged in upstream: relay from here.
    Relay(Box<Ready>),
    /// Logged in on a spooling listener: oxbridge takes the messages.
    Spool(Box<crate::spool::serve::Device>),
    /// The session is over (QUIT/LOGOUT, timeout, limits, shutdown, closed).
    Closed(&'static str),
}

/// A session ready for the relay.
pub struct Ready {
    pub device: Conn,
    pub login: LoggedIn,
    /// SMTP: the envelope senders its account or `[[relay]]` rule allows
    /// (`None`: any); every MAIL of the session is checked.
    pub senders: Option<Senders>,
    /// The device, for the refusals the relay sees.
    pub who: Who,
}

/// Run `session` on the device's connection until it has logged in
/// upstream or the session ends; `tls_version` is the implicit TLS
/// handshake's, if there was one.
pub async fn drive(
    app: &App,
    listener: &Listener,
    (conn, tls_version): (Conn, Option<&'static str>),
    peer: SocketAddr,
    shutdown: &CancellationToken,
    session: &mut dyn Dialogue,
) -> Handoff {
    let limits = &app.config.limits;
    let mut device = Device {
        conn,
        timeout: Duration::from_secs(limits.preauth_timeout_s),
        max_line: limits.max_line,
        first_line: true,
    };
    let protocol = listener.protocol;
    let spooling = listener.delivery == crate::config::Delivery::Spool;
    let mut logged_in: Option<LoggedIn> = None;
    let mut senders: Option<Senders> = None;
    // On a spooling listener: who logged in (nothing upstream yet).
    let mut local: Option<(Identity, bool, String)> = None;
    let mut who = Who::new(protocol, peer.ip(), tls_version);
    // Each refusal is logged once per session; repeats are counted.
    let mut refusals = refusal::Once::default();
    let mut step = session.greeting();
    loop {
        if !step.reply.is_empty() && device.conn.send(&step.reply, device.timeout).await.is_err() {
            return Handoff::Closed("device write failed");
        }
        if let Some(name) = step.name.take() {
            tracing::Span::current().record("device_name", name.as_str());
            who.name = Some(name);
        }
        if let Some(why) = step.refused.take() {
            refusals.record(&who, why, &refusal::first_line(&step.reply));
        }
        step = match step.then {
            Then::Read => {
                let line = tokio::select! {
                    line = device.read_line() => Some(line),
                    _ = shutdown.cancelled() => None,
                };
                match line {
                    None => session.on(Input::Shutdown),
                    Some(Ok(line)) => session.on(Input::Line(&line)),
                    Some(Err(LineError::TooLong(_))) => {
                        let head = device.conn.take_long_line_head();
                        session.on(Input::TooLong(&head))
                    }
                    Some(Err(LineError::Timeout(_))) => session.on(Input::Timeout),
                    Some(Err(e)) => return Handoff::Closed(e.reason()),
                }
            }
            Then::ReadExact(n) => match device.conn.read_exact(n, device.timeout).await {
                Ok(data) => session.on(Input::Literal(&data)),
                Err(LineError::Timeout(_)) => session.on(Input::Timeout),
                Err(e) => return Handoff::Closed(e.reason()),
            },
            Then::Discard(n) => match device.conn.discard(n, device.timeout).await {
                Ok(()) => session.on(Input::Discarded),
                Err(LineError::Timeout(_)) => session.on(Input::Timeout),
                Err(e) => return Handoff::Closed(e.reason()),
            },
            Then::StartTls => match device.start_tls(listener).await {
                Ok(version) => {
                    who.tls = Some(version);
                    session.on(Input::TlsStarted)
                }
                Err(why) => return Handoff::Closed(why),
            },
            Then::Capabilities => {
                let keywords = app.dialer.smtp_capabilities().await;
                session.on(Input::Capabilities(&keywords))
            }
            Then::Login(request) if takes_itself(app, protocol, spooling, &request) => {
                who.login = Some(login_label(app, &request));
                tracing::Span::current().record("login", who.login.as_deref());
                let (result, relay, helo) = match request {
                    Login::Password { creds, client_name } => (
                        login::local_login(app, creds, peer).await,
                        false,
                        client_name,
                    ),
                    Login::Relay {
                        account,
                        client_name,
                    } => (login::local_relay(app, &account, peer), true, client_name),
                };
                crate::status::board::device_login(&who, result.as_ref().err());
                match result {
                    Ok(id) => {
                        local = Some((id, relay, helo));
                        // What the device was told in EHLO: the spool's
                        // own offer, or on a session listener the
                        // upstream's (which the session keeps to).
                        let keywords = match spooling {
                            true => crate::spool::keywords(&app.config.spool),
                            false => app.dialer.smtp_capabilities().await,
                        };
                        session.on(Input::LoggedIn {
                            capabilities: &keywords,
                        })
                    }
                    Err(e) => session.on(Input::LoginFailed(&e)),
                }
            }
            Then::Login(request) => {
                who.login = Some(login_label(app, &request));
                tracing::Span::current().record("login", who.login.as_deref());
                let relay = matches!(request, Login::Relay { .. });
                let result = match request {
                    Login::Password { creds, client_name } => {
                        login::login(app, protocol, creds, &client_name, peer).await
                    }
                    Login::Relay {
                        account,
                        client_name,
                    } => login::relay_login(app, &account, &client_name, peer).await,
                };
                crate::status::board::device_login(&who, result.as_ref().err());
                match result {
                    Ok(done) => {
                        // Read after the login, for the account it found.
                        senders = match protocol {
                            Protocol::Smtp => allowed_senders(app, peer, relay, &done.id),
                            _ => None,
                        };
                        let step = session.on(Input::LoggedIn {
                            capabilities: &done.upstream.capabilities,
                        });
                        logged_in = Some(done);
                        step
                    }
                    Err(e) => session.on(Input::LoginFailed(&e)),
                }
            }
            Then::Refuse { login, error } => {
                crate::status::board::device_login(&who, Some(&error));
                login::refused(app, protocol, peer, &login, &error);
                session.on(Input::LoginFailed(&error))
            }
            Then::Relay { replay } if local.is_some() => {
                let Some((id, relay, helo)) = local.take() else {
                    return Handoff::Closed("spool without a login");
                };
                device.conn.unread(&replay);
                return Handoff::Spool(Box::new(crate::spool::serve::Device {
                    conn: device.conn,
                    id,
                    relay,
                    helo,
                    peer,
                }));
            }
            Then::Relay { replay } => {
                let Some(login) = logged_in.take() else {
                    return Handoff::Closed("relay without a login");
                };
                device.conn.unread(&replay);
                return Handoff::Relay(Box::new(Ready {
                    device: device.conn,
                    login,
                    senders: senders.take(),
                    who,
                }));
            }
            Then::Close(why) => return Handoff::Closed(why),
        };
        // A login the session did not take up (SMTP: the upstream no longer
        // offers what the device was told) is closed here.
        if !matches!(step.then, Then::Relay { .. }) {
            logged_in = None;
            local = None;
        }
    }
}

/// The login as the log and the page show it: the configured account, or
/// the `unknown user ... #hash` form (what a device typed that is no
/// account may be its password).
fn login_label(app: &App, request: &Login) -> String {
    match request {
        Login::Password { creds, .. } => app.accounts().describe(&creds.login),
        Login::Relay { account, .. } => format!("relay as {account}"),
    }
}

/// Whether oxbridge takes this login's messages itself instead of logging
/// in upstream: only SMTP, on a spooling listener, or on a session
/// listener for an account that sends through Microsoft Graph. IMAP and
/// POP3 logins always go upstream: Graph only replaces sending.
fn takes_itself(app: &App, protocol: Protocol, spooling: bool, request: &Login) -> bool {
    if protocol != Protocol::Smtp {
        return false;
    }
    spooling
        || match request {
            Login::Password { creds, .. } => app.accounts().sends_via_graph(&creds.login),
            Login::Relay { account, .. } => app.accounts().sends_via_graph(account),
        }
}

/// The senders a session listener's SMTP login may use (its account's or
/// `[[relay]]` rule's) and its `rewrite_sender`; `None`: any, as it is.
fn allowed_senders(app: &App, peer: SocketAddr, relay: bool, id: &Identity) -> Option<Senders> {
    let allowed = match relay {
        false => app.accounts().allowed_senders(&id.account),
        true => app.relay_rule(peer.ip())?.allowed_senders,
    };
    id.senders(allowed, relay)
}

/// The device's connection and the bounds on what it sends.
struct Device {
    conn: Conn,
    /// How long the device may be silent (`[limits] preauth_timeout_s`).
    timeout: Duration,
    /// The longest line (`[limits] max_line`).
    max_line: usize,
    /// No line has been read yet (a PROXY header would be the first).
    first_line: bool,
}

impl Device {
    /// Read one line, bounded by `max_line` and `timeout`. A PROXY header
    /// where none is expected ends the session.
    async fn read_line(&mut self) -> Result<Vec<u8>, LineError> {
        let line = self.conn.read_line(self.max_line, self.timeout).await?;
        if std::mem::take(&mut self.first_line) {
            let mut first = line.clone();
            if line.is_empty() {
                first.extend_from_slice(crate::wire::CRLF);
                first.extend_from_slice(self.conn.buffered());
            }
            if crate::net::proxy_protocol::looks_like_header(&first) {
                return Err(LineError::Unexpected(
                    "PROXY header on a listener without proxy_protocol",
                ));
            }
        }
        Ok(line)
    }

    /// The TLS handshake after the protocol's go-ahead (STARTTLS, STLS);
    /// whatever the device sent before it is dropped.
    async fn start_tls(&mut self, listener: &Listener) -> Result<&'static str, &'static str> {
        let acceptor = listener
            .tls_acceptor()
            .ok_or("STARTTLS without a certificate")?;
        let (dropped, info) = self
            .conn
            .accept_tls(&acceptor, crate::net::tls::HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| -> &'static str {
                info!(error = %e, "TLS handshake failed");
                "TLS handshake failed"
            })?;
        listener.tls_established(&info);
        if dropped > 0 {
            warn!(
                bytes = dropped,
                "dropped data sent before the TLS handshake"
            );
        }
        Ok(info.version)
    }
}

/// Helpers for the protocol sessions' tests: feed inputs, read replies.
#[cfg(test)]
pub mod script;
