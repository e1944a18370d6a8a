//! POP3 upstream: implicit TLS, greeting, `AUTH XOAUTH2` in the two-line
//! form (`AUTH XOAUTH2`, `+`, the base64 line), and the error challenge
//! answered with an empty line.

use secrecy::{ExposeSecret, SecretString};
use tokio_rustls::TlsConnector;

use super::{initial_response, read_line, send, unavailable};
use crate::error::AuthError;
use crate::mailbox::Mailbox;
use crate::net::{dial, Conn};
use crate::wire::pop3::{is_continuation, Request};
use crate::wire::{printable, sasl};

/// Connect with TLS and read the greeting.
pub(super) async fn dial(tls: &TlsConnector, addr: &str) -> Result<Conn, AuthError> {
    let mut conn = dial::connect_tls(tls, addr).await.map_err(unavailable)?;
    let greeting = read_line(&mut conn).await?;
    if !greeting.starts_with(b"+OK") {
        return Err(AuthError::UpstreamUnavailable(format!(
            "greeting: {}",
            printable(&greeting)
        )));
    }
    Ok(conn)
}

/// `AUTH XOAUTH2`, `+`, the base64 line.
pub(super) async fn auth_xoauth2(
    conn: &mut Conn,
    mailbox: &Mailbox,
    token: &SecretString,
) -> Result<(), AuthError> {
    let ir = initial_response(mailbox, token)?;
    send(conn, &Request::AuthXoauth2.to_bytes()).await?;
    let go = read_line(conn).await?;
    if !is_continuation(&go) {
        return Err(refusal(&go, None));
    }
    send(conn, &Request::Response(ir.expose_secret()).to_bytes()).await?;
    let mut reply = read_line(conn).await?;
    let mut challenge = None;
    if is_continuation(&reply) {
        // The error challenge: answer with an empty line for the final -ERR.
        challenge = sasl::xoauth2_error_status(reply.get(2..).unwrap_or_default());
        send(conn, &Request::Response("").to_bytes()).await?;
        reply = read_line(conn).await?;
    }
    if reply.starts_with(b"+OK") {
        Ok(())
    } else {
        Err(refusal(&reply, challenge))
    }
}

/// What an upstream `-ERR` (or anything else) to the login means.
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

#[cfg(test)]
mod tests {
    use super::*;

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
