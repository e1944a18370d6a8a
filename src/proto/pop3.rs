//! POP3, both sides of the login.
//!
//! Device side ([`preauth`]): greeting, CAPA, USER/PASS, AUTH PLAIN (initial
//! response or continuation; `AUTH` alone lists PLAIN), STLS, QUIT; anything
//! else gets `-ERR`. Upstream side ([`dial`], [`auth_xoauth2`]): implicit
//! TLS, greeting, `AUTH XOAUTH2`, `+`, the base64 line, and the error
//! challenge answered with an empty line.

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::accounts::Identity;
use crate::config::Protocol;
use crate::error::AuthError;
use crate::line::{Conn, LineError};
use crate::proto::{self, Device, Preauth, Upstream};
use crate::sasl;
use crate::server::Listener;
use crate::upstream::{self, printable, MAX_REPLY_LINE, REPLY_TIMEOUT};
use crate::App;
use std::net::SocketAddr;

/// Commands a device may send before it logs in.
pub const MAX_PREAUTH_COMMANDS: usize = 100;
/// Bad commands before the connection is closed.
pub const MAX_ERRORS: usize = 10;
/// Failed logins on one connection before it is closed.
pub const MAX_AUTH_FAILURES: usize = 3;

/// A device command, parsed without I/O.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Capa,
    User(&'a [u8]),
    Pass(&'a [u8]),
    Auth {
        mechanism: Option<String>,
        initial: Option<&'a [u8]>,
    },
    Stls,
    Quit,
    Noop,
    /// A command that needs a logged-in session (STAT, LIST, RETR, ...).
    Transaction,
    Unknown,
}

pub fn parse_command(line: &[u8]) -> Command<'_> {
    let (verb, arg) = match line.iter().position(|b| *b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    match (verb.to_ascii_uppercase().as_slice(), arg) {
        (b"CAPA", None) => Command::Capa,
        (b"USER", Some(name)) if !name.is_empty() => Command::User(name),
        // The password is the rest of the line: it may contain spaces.
        (b"PASS", Some(pw)) => Command::Pass(pw),
        (b"AUTH", None) => Command::Auth {
            mechanism: None,
            initial: None,
        },
        (b"AUTH", Some(rest)) => {
            let (mech, initial) = match rest.iter().position(|b| *b == b' ') {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            Command::Auth {
                mechanism: Some(String::from_utf8_lossy(mech).to_ascii_uppercase()),
                initial,
            }
        }
        (b"STLS", None) => Command::Stls,
        (b"QUIT", None) => Command::Quit,
        (b"NOOP", None) => Command::Noop,
        (b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"RSET" | b"TOP" | b"UIDL" | b"LAST", _) => {
            Command::Transaction
        }
        _ => Command::Unknown,
    }
}

async fn read_line(conn: &mut Conn) -> Result<Vec<u8>, AuthError> {
    conn.read_line(MAX_REPLY_LINE, REPLY_TIMEOUT)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("reading reply: {e}")))
}

async fn send(conn: &mut Conn, data: &[u8]) -> Result<(), AuthError> {
    conn.send(data, REPLY_TIMEOUT)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("sending: {e}")))
}

/// Connect to `[upstream].pop3` with TLS and read the greeting.
pub async fn dial(app: &App) -> Result<Conn, AuthError> {
    let addr = app.config.upstream.pop3.as_str();
    let mut conn = upstream::connect_tls(&app.upstream_tls, addr).await?;
    let greeting = read_line(&mut conn).await?;
    if !greeting.starts_with(b"+OK") {
        return Err(AuthError::UpstreamUnavailable(format!(
            "greeting: {}",
            printable(&greeting)
        )));
    }
    Ok(conn)
}

/// `AUTH XOAUTH2` in the two-line form: `AUTH XOAUTH2`, `+`, base64 line.
pub async fn auth_xoauth2(
    conn: &mut Conn,
    mailbox: &str,
    token: &SecretString,
) -> Result<(), AuthError> {
    send(conn, b"AUTH XOAUTH2\r\n").await?;
    let go = read_line(conn).await?;
    if !is_continuation(&go) {
        return Err(refusal(&go, None));
    }
    let ir = sasl::xoauth2(mailbox, token);
    send(conn, format!("{}\r\n", ir.expose_secret()).as_bytes()).await?;
    let mut reply = read_line(conn).await?;
    let mut challenge = None;
    if is_continuation(&reply) {
        // The error challenge: answer with an empty line for the final -ERR.
        challenge = sasl::xoauth2_error_status(reply.get(2..).unwrap_or_default());
        send(conn, b"\r\n").await?;
        reply = read_line(conn).await?;
    }
    if reply.starts_with(b"+OK") {
        Ok(())
    } else {
        Err(refusal(&reply, challenge))
    }
}

/// A SASL continuation (`+` or `+ data`), not `+OK`.
fn is_continuation(line: &[u8]) -> bool {
    line == b"+" || line.starts_with(b"+ ")
}

fn refusal(reply: &[u8], challenge: Option<String>) -> AuthError {
    let text = printable(reply);
    let detail = match challenge {
        Some(s) => format!("{text} (XOAUTH2 status {s})"),
        None => text.clone(),
    };
    if text.starts_with("-ERR [SYS/TEMP]") || text.starts_with("-ERR [IN-USE]") {
        AuthError::UpstreamTemporary(detail)
    } else if text.starts_with("-ERR") {
        AuthError::UpstreamRefused(detail)
    } else {
        AuthError::UpstreamUnavailable(format!("unexpected reply {detail}"))
    }
}

impl AuthError {
    /// The POP3 reply to the device's PASS or AUTH.
    pub fn pop3_reply(&self) -> &'static str {
        match self {
            AuthError::BadCredentials(_) => "-ERR [AUTH] Authentication failed\r\n",
            AuthError::TokenRefused(_) => {
                "-ERR [AUTH] Authentication failed: no access token for this account\r\n"
            }
            AuthError::UpstreamRefused(_) => {
                "-ERR [AUTH] Authentication failed: the mail server refused the access token\r\n"
            }
            AuthError::TokenUnavailable(_) => {
                "-ERR [SYS/TEMP] Temporary authentication failure: token service unavailable\r\n"
            }
            AuthError::UpstreamUnavailable(_) => {
                "-ERR [SYS/TEMP] Mail server unavailable, try again later\r\n"
            }
            AuthError::UpstreamTemporary(_) => {
                "-ERR [SYS/TEMP] Temporary authentication failure at the mail server\r\n"
            }
            AuthError::Busy(_) => {
                "-ERR [IN-USE] Too many sessions for this mailbox at once, try again later\r\n"
            }
            AuthError::Throttled(_) => {
                "-ERR [SYS/TEMP] Too many failed logins; try again later\r\n"
            }
        }
    }
}

struct Session<'a> {
    app: &'a App,
    dev: Device<'a>,
    user: Option<String>,
}

impl<'a> std::ops::Deref for Session<'a> {
    type Target = Device<'a>;
    fn deref(&self) -> &Device<'a> {
        &self.dev
    }
}

impl std::ops::DerefMut for Session<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.dev
    }
}

impl Session<'_> {
    async fn login(
        &mut self,
        creds: sasl::Credentials,
    ) -> Result<Option<(Upstream, Identity)>, &'static str> {
        match proto::login(self.app, Protocol::Pop3, creds, "", self.peer).await {
            Ok((up, id)) => {
                self.reply("+OK Logged in\r\n").await?;
                Ok(Some((up, id)))
            }
            Err(e) => {
                self.auth_failures += 1;
                self.user = None;
                self.reply(e.pop3_reply()).await?;
                Ok(None)
            }
        }
    }
}

/// Serve a device until it has logged in upstream or the session ends.
pub async fn preauth(
    app: &App,
    listener: &Listener,
    conn: Conn,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Preauth {
    let s = Session {
        app,
        dev: Device::new(conn, listener, peer, &app.config.limits),
        user: None,
    };
    run(s, &shutdown).await.unwrap_or_else(Preauth::Closed)
}

async fn run(mut s: Session<'_>, shutdown: &CancellationToken) -> Result<Preauth, &'static str> {
    s.reply("+OK oxbridge ready\r\n").await?;
    for _ in 0..MAX_PREAUTH_COMMANDS {
        if s.errors >= MAX_ERRORS {
            s.reply("-ERR Too many errors, closing connection\r\n")
                .await?;
            return Ok(Preauth::Closed("too many errors"));
        }
        if s.auth_failures >= MAX_AUTH_FAILURES {
            s.reply("-ERR [AUTH] Too many failed logins, closing connection\r\n")
                .await?;
            return Ok(Preauth::Closed("too many failed logins"));
        }
        let line = tokio::select! {
            line = s.read_line() => line,
            _ = shutdown.cancelled() => {
                s.reply("-ERR [SYS/TEMP] Server shutting down\r\n").await?;
                return Ok(Preauth::Closed("shutdown"));
            }
        };
        let line = match line {
            Ok(l) => l,
            Err(LineError::TooLong(_)) => {
                s.errors += 1;
                s.reply("-ERR Line too long\r\n").await?;
                continue;
            }
            Err(LineError::Timeout(_)) => {
                s.reply("-ERR Idle for too long, closing connection\r\n")
                    .await?;
                return Ok(Preauth::Closed("idle timeout"));
            }
            Err(e) => return Ok(Preauth::Closed(e.reason())),
        };
        match parse_command(&line) {
            Command::Capa => {
                let mut capa = String::from("+OK Capability list follows\r\n");
                if s.auth_allowed() {
                    capa.push_str("USER\r\nSASL PLAIN\r\n");
                }
                if s.starttls_offered() {
                    capa.push_str("STLS\r\n");
                }
                capa.push_str("RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nTOP\r\nUIDL\r\nIMPLEMENTATION oxbridge\r\n.\r\n");
                s.reply(&capa).await?
            }
            Command::Stls if s.starttls_offered() => {
                s.reply("+OK Begin TLS negotiation\r\n").await?;
                s.start_tls().await?;
                s.user = None;
            }
            Command::Stls => {
                s.errors += 1;
                s.reply("-ERR STLS not available\r\n").await?
            }
            Command::User(_) | Command::Pass(_) | Command::Auth { .. } if !s.auth_allowed() => {
                s.reply("-ERR [AUTH] Plaintext authentication is disabled without TLS\r\n")
                    .await?
            }
            Command::User(name) => match sasl::utf8(name) {
                Ok(name) => {
                    s.user = Some(name);
                    s.reply("+OK\r\n").await?
                }
                Err(_) => {
                    s.errors += 1;
                    s.reply("-ERR Invalid user name\r\n").await?
                }
            },
            Command::Pass(password) => {
                let Some(login) = s.user.take() else {
                    s.errors += 1;
                    s.reply("-ERR USER first\r\n").await?;
                    continue;
                };
                let Ok(password) = sasl::utf8(password) else {
                    s.auth_failures += 1;
                    s.reply("-ERR [AUTH] Authentication failed\r\n").await?;
                    continue;
                };
                let creds = sasl::Credentials {
                    login,
                    password: SecretString::from(password),
                };
                if let Some((up, id)) = s.login(creds).await? {
                    return Ok(Preauth::relay(s.dev.conn, up, &id));
                }
            }
            Command::Auth {
                mechanism: None, ..
            } => s.reply("+OK\r\nPLAIN\r\n.\r\n").await?,
            Command::Auth {
                mechanism: Some(mech),
                initial,
            } => {
                if mech != "PLAIN" {
                    s.reply("-ERR Unsupported authentication mechanism; use PLAIN\r\n")
                        .await?;
                    continue;
                }
                let initial = initial.map(<[u8]>::to_vec);
                let creds = s.plain_credentials(
                    initial.as_deref(),
                    "+ \r\n",
                    "-ERR Authentication canceled\r\n",
                    "-ERR [AUTH] Cannot decode the authentication exchange\r\n",
                );
                let Some(creds) = creds.await? else {
                    continue;
                };
                if let Some((up, id)) = s.login(creds).await? {
                    return Ok(Preauth::relay(s.dev.conn, up, &id));
                }
            }
            Command::Quit => {
                s.reply("+OK Bye\r\n").await?;
                return Ok(Preauth::Closed("quit"));
            }
            Command::Noop | Command::Transaction => {
                s.errors += 1;
                s.reply("-ERR Not logged in\r\n").await?
            }
            Command::Unknown => {
                s.errors += 1;
                s.reply("-ERR Unknown command\r\n").await?
            }
        }
    }
    s.reply("-ERR Too many commands without logging in\r\n")
        .await?;
    Ok(Preauth::Closed("too many commands"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse_command(b"capa"), Command::Capa);
        assert_eq!(
            parse_command(b"USER scanner@x.test"),
            Command::User(b"scanner@x.test")
        );
        assert_eq!(parse_command(b"USER"), Command::Unknown);
        assert_eq!(
            parse_command(b"PASS pass with spaces"),
            Command::Pass(b"pass with spaces")
        );
        assert_eq!(parse_command(b"PASS "), Command::Pass(b""));
        assert_eq!(
            parse_command(b"AUTH"),
            Command::Auth {
                mechanism: None,
                initial: None
            }
        );
        assert_eq!(
            parse_command(b"auth plain AGEAYg=="),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some(b"AGEAYg==")
            }
        );
        assert_eq!(
            parse_command(b"AUTH PLAIN"),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: None
            }
        );
        assert_eq!(parse_command(b"STLS"), Command::Stls);
        assert_eq!(parse_command(b"RETR 1"), Command::Transaction);
        assert_eq!(parse_command(b"QUIT"), Command::Quit);
        assert_eq!(parse_command(b"APOP x y"), Command::Unknown);
        assert_eq!(parse_command(b"\xff"), Command::Unknown);
    }

    #[test]
    fn upstream_refusals() {
        assert!(matches!(
            refusal(b"-ERR [AUTH] Authentication failed.", None),
            AuthError::UpstreamRefused(_)
        ));
        assert!(matches!(
            refusal(b"-ERR [SYS/TEMP] Temporary authentication failure.", None),
            AuthError::UpstreamTemporary(_)
        ));
        assert!(matches!(
            refusal(b"garbage", None),
            AuthError::UpstreamUnavailable(_)
        ));
    }
}
