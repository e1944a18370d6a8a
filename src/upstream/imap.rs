//! IMAP upstream: implicit TLS, greeting, `AUTHENTICATE XOAUTH2` (SASL-IR
//! when offered), the error challenge answered with an empty line, then
//! the capabilities after login, which the device is told.

use secrecy::{ExposeSecret, SecretString};
use tokio_rustls::TlsConnector;

use super::{initial_response, read_line, send, unavailable, MAX_REPLY_LINES, REPLY_TIMEOUT};
use crate::error::AuthError;
use crate::mailbox::Mailbox;
use crate::net::{dial, Conn};
use crate::wire::imap::{capabilities_in, literal_suffix, tagged, Request};
use crate::wire::{printable, sasl};

/// A literal in an upstream response before login is skipped up to this size.
const MAX_UPSTREAM_LITERAL: u64 = 64 * 1024;

/// Read one response line; a literal at its end is skipped (bounded), so
/// the next line starts where it should.
async fn read_response(conn: &mut Conn) -> Result<Vec<u8>, AuthError> {
    let line = read_line(conn).await?;
    if let Some((n, _)) = literal_suffix(&line) {
        if n > MAX_UPSTREAM_LITERAL {
            return Err(AuthError::UpstreamUnavailable(
                "literal too large before login".into(),
            ));
        }
        conn.discard(n, REPLY_TIMEOUT)
            .await
            .map_err(|e| AuthError::UpstreamUnavailable(format!("reading response: {e}")))?;
    }
    Ok(line)
}

/// Ask for the capabilities; `step` names the moment for errors.
async fn capabilities(conn: &mut Conn, step: &str) -> Result<Vec<String>, AuthError> {
    send(conn, &Request::Capability.to_bytes()).await?;
    let mut caps = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let line = read_response(conn).await?;
        if let Some(c) = capabilities_in(&line) {
            caps = c;
        }
        if let Some((status, text)) = tagged(&line) {
            if status != "OK" {
                return Err(AuthError::UpstreamUnavailable(format!("{step}: {text}")));
            }
            return Ok(caps);
        }
    }
    Err(AuthError::UpstreamUnavailable(format!(
        "{step}: too many lines"
    )))
}

/// Connect with TLS and read the greeting; returns the capabilities it
/// announced (asking for them if it did not).
pub(super) async fn dial(tls: &TlsConnector, addr: &str) -> Result<(Conn, Vec<String>), AuthError> {
    let mut conn = dial::connect_tls(tls, addr).await.map_err(unavailable)?;
    let greeting = read_response(&mut conn).await?;
    if !greeting.starts_with(b"* OK") {
        return Err(AuthError::UpstreamUnavailable(format!(
            "greeting: {}",
            printable(&greeting)
        )));
    }
    if let Some(caps) = capabilities_in(&greeting) {
        return Ok((conn, caps));
    }
    let caps = capabilities(&mut conn, "CAPABILITY").await?;
    Ok((conn, caps))
}

/// `AUTHENTICATE XOAUTH2`; returns the capabilities after login.
pub(super) async fn auth_xoauth2(
    conn: &mut Conn,
    mailbox: &Mailbox,
    token: &SecretString,
    greeting_caps: &[String],
) -> Result<Vec<String>, AuthError> {
    let ir = initial_response(mailbox, token)?;
    let sasl_ir = greeting_caps
        .iter()
        .any(|c| c.eq_ignore_ascii_case("SASL-IR"));
    let mut pending_ir = !sasl_ir;
    let initial = sasl_ir.then(|| ir.expose_secret());
    send(conn, &Request::Authenticate(initial).to_bytes()).await?;
    let mut challenge = None;
    let mut caps = None;
    for _ in 0..MAX_REPLY_LINES {
        let line = read_response(conn).await?;
        if line.starts_with(b"+") {
            let answer = if pending_ir {
                pending_ir = false;
                Request::Response(ir.expose_secret())
            } else if challenge.is_none() {
                // The error challenge: answer with an empty line for the final NO.
                challenge = Some(
                    sasl::xoauth2_error_status(line.get(2..).unwrap_or_default())
                        .unwrap_or_default(),
                );
                Request::Response("")
            } else {
                Request::Cancel
            };
            send(conn, &answer.to_bytes()).await?;
            continue;
        }
        if let Some(c) = capabilities_in(&line) {
            caps = Some(c);
        }
        let Some((status, text)) = tagged(&line) else {
            continue;
        };
        let detail = match &challenge {
            Some(s) if !s.is_empty() => format!("{text} (XOAUTH2 status {s})"),
            _ => text.clone(),
        };
        return match status {
            "OK" => match caps {
                Some(c) => Ok(c),
                None => capabilities(conn, "CAPABILITY after login").await,
            },
            "NO" if text.contains("[UNAVAILABLE]") => Err(AuthError::UpstreamTemporary(detail)),
            _ => Err(AuthError::UpstreamRefused(detail)),
        };
    }
    Err(AuthError::UpstreamUnavailable(
        "AUTHENTICATE: too many lines".into(),
    ))
}
