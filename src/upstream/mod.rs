//! The upstream side of a login: dial the real server, read its greeting,
//! STARTTLS where the protocol needs it, and log in with SASL `XOAUTH2`.
//! One file per protocol; this module picks the protocol once. The
//! [`Dialer`] holds what every upstream connection needs (the verified TLS
//! client config, the addresses, what the SMTP server offers) and nothing of
//! the rest of the app.

pub mod graph;
mod imap;
mod pop3;
mod smtp;

pub use smtp::Sent;

use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio_rustls::TlsConnector;

use crate::config::{Protocol, Provider, UpstreamConfig};
use crate::error::AuthError;
use crate::mailbox::Mailbox;
use crate::net::Conn;

/// How long the upstream may take for one reply (an XOAUTH2 check included).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest reply line accepted from upstream before authentication.
pub const MAX_REPLY_LINE: usize = 8 * 1024;
/// The most lines one multi-line reply (EHLO, CAPA) may have.
pub const MAX_REPLY_LINES: usize = 256;

/// What it takes to reach the upstream servers.
pub struct Dialer {
    tls: TlsConnector,
    /// The SMTP server whose EHLO devices see before they log in.
    smtp: String,
    /// What that SMTP server offers in EHLO, as last seen.
    smtp_keywords: smtp::Keywords,
}

impl Dialer {
    /// The dialer for `[upstream]` (its `ca_file` is read here, and holds
    /// for every provider); `default` is the provider whose SMTP server's
    /// EHLO devices are offered before they log in.
    pub fn new(upstream: &UpstreamConfig, default: &Provider) -> Result<Dialer, String> {
        let tls = crate::net::tls::upstream_connector(upstream.ca_file.as_deref())
            .map_err(|e| format!("upstream.ca_file: {e}"))?;
        Ok(Dialer {
            tls,
            smtp: default.address(Protocol::Smtp).to_string(),
            smtp_keywords: Default::default(),
        })
    }

    /// Connect to `provider`'s server of `protocol` and read the greeting
    /// (SMTP: EHLO, STARTTLS, EHLO). Returns the connection and what the
    /// server offers (SMTP: EHLO keywords; IMAP: capabilities; POP3:
    /// nothing).
    pub async fn dial(
        &self,
        provider: &Provider,
        protocol: Protocol,
        client_name: &str,
    ) -> Result<(Conn, Vec<String>), AuthError> {
        let started = Instant::now();
        let addr = provider.address(protocol);
        let dialled = match protocol {
            Protocol::Smtp => smtp::dial(self, addr, client_name).await,
            Protocol::Imap => imap::dial(&self.tls, addr).await,
            Protocol::Pop3 => pop3::dial(&self.tls, addr).await.map(|c| (c, Vec::new())),
        };
        if dialled.is_ok() {
            crate::metrics::upstream_connected(protocol, started.elapsed());
        }
        let failure = dialled.as_ref().err().map(|e| e.to_string());
        crate::metrics::upstream_contact(protocol, failure.as_deref());
        dialled
    }

    /// Log in with `XOAUTH2` on a dialled connection; returns the
    /// capabilities after login (SMTP: the EHLO keywords of the dial).
    pub async fn xoauth2(
        protocol: Protocol,
        conn: &mut Conn,
        mailbox: &Mailbox,
        token: &SecretString,
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

    /// `oxbridge check`, after login: SMTP asks whether the server takes
    /// mail from `mailbox` (nothing is sent); every protocol then logs out.
    pub async fn check_and_leave(
        protocol: Protocol,
        conn: &mut Conn,
        mailbox: &Mailbox,
    ) -> Result<(), AuthError> {
        match protocol {
            Protocol::Smtp => smtp::check_sender(conn, mailbox).await,
            Protocol::Imap => {
                let _ = send(conn, &crate::wire::imap::Request::Logout.to_bytes()).await;
                Ok(())
            }
            Protocol::Pop3 => {
                let _ = send(conn, &crate::wire::pop3::Request::Quit.to_bytes()).await;
                Ok(())
            }
        }
    }

    /// Send a spooled message on a logged-in SMTP connection (see
    /// `smtp::send_message`).
    pub async fn send_message(
        conn: &mut Conn,
        sender: &str,
        params: &[String],
        recipients: &[String],
        message: &std::path::Path,
        before_end: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<smtp::Sent, AuthError> {
        smtp::send_message(conn, sender, params, recipients, message, before_end).await
    }

    /// Send `message`, held in memory, on a logged-in SMTP connection
    /// (`oxbridge check --send-to`); as [`Dialer::send_message`].
    pub async fn send_bytes(
        conn: &mut Conn,
        sender: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Result<smtp::Sent, AuthError> {
        let open = || async move { Ok::<_, std::io::Error>(message) };
        smtp::send_from(conn, sender, &[], recipients, open, || Ok(())).await
    }

    /// End an SMTP session politely.
    pub async fn quit_smtp(conn: &mut Conn) {
        smtp::quit(conn).await
    }

    /// The EHLO keywords a device may be told: the last known upstream
    /// EHLO, probing once if nothing is known.
    pub async fn smtp_capabilities(&self) -> Vec<String> {
        self.smtp_keywords.get(self).await
    }
}

/// The XOAUTH2 initial response for `mailbox` (see `wire::sasl::xoauth2`,
/// which refuses control characters in either field). A token that cannot
/// be carried is the token endpoint's fault: nothing is sent.
fn initial_response(mailbox: &Mailbox, token: &SecretString) -> Result<SecretString, AuthError> {
    crate::wire::sasl::xoauth2(mailbox.as_str(), token)
        .map_err(|e| AuthError::TokenRefused(format!("the token cannot be sent: {e}")))
}

/// Write to the upstream, bounded in time.
async fn send(conn: &mut Conn, data: &[u8]) -> Result<(), AuthError> {
    conn.send(data, REPLY_TIMEOUT)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("sending: {e}")))
}

/// Read one upstream line before login, bounded in length and time.
async fn read_line(conn: &mut Conn) -> Result<Vec<u8>, AuthError> {
    read_line_within(conn, REPLY_TIMEOUT).await
}

/// [`read_line`], waiting at most `wait`.
async fn read_line_within(conn: &mut Conn, wait: Duration) -> Result<Vec<u8>, AuthError> {
    conn.read_line(MAX_REPLY_LINE, wait)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("reading reply: {e}")))
}

/// A failed dial, as a login failure.
fn unavailable(e: String) -> AuthError {
    AuthError::UpstreamUnavailable(e)
}
