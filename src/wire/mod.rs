//! The wire: each protocol's commands, replies and receivers as plain
//! functions and types over bytes. Nothing here does I/O or knows tokio;
//! every byte oxbridge writes to a device or an upstream server is worded
//! here, in one table per protocol, and every line ends in CRLF.

pub mod graph;
pub mod imap;
pub mod imap_frame;
mod imap_reply;
pub mod imap_sync;
pub mod imap_view;
pub mod message;
pub mod pop3;
pub mod sasl;
pub mod sender_rewrite;
pub mod smtp;

use crate::config::Protocol;

/// The end of a line on the wire, in every protocol.
pub const CRLF: &[u8] = b"\r\n";

/// Why a login was refused, as far as the device is told. The detail (the
/// server's reply, the OAuth error) is for the log, never for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong local password or unknown user.
    BadCredentials,
    /// The SASL authorization identity names someone other than the login.
    Authorization,
    /// The token endpoint refused this account for good.
    NoToken,
    /// The mail server refused the access token.
    TokenRejected,
    /// The token endpoint could not be reached or failed for now.
    TokenUnavailable,
    /// The mail server could not be reached.
    UpstreamUnavailable,
    /// The mail server failed the login for now.
    UpstreamTemporary,
    /// The mailbox has as many upstream sessions as it may.
    Busy,
    /// Too many failed logins from this address or for this account.
    Throttled,
    /// The account cannot send through a spooling listener.
    CannotSpool,
}

/// What the server side says when it ends a session on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// Turned away at connect: too many connections.
    Busy,
    /// The server is shutting down.
    Shutdown,
    /// The session was silent for too long.
    Idle,
}

/// The farewell line in `protocol`.
pub fn farewell(protocol: Protocol, farewell: Farewell) -> &'static [u8] {
    match protocol {
        Protocol::Smtp => smtp::farewell(farewell),
        Protocol::Imap => imap::farewell(farewell),
        Protocol::Pop3 => pop3::farewell(farewell),
    }
}

/// `line` with CRLF after it.
pub fn line(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + CRLF.len());
    out.extend_from_slice(text);
    out.extend_from_slice(CRLF);
    out
}

/// Printable, bounded text of a peer's line for the log.
pub fn printable(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_PRINTABLE)
        .collect()
}

/// The most characters of a peer's line that reach the log.
const MAX_PRINTABLE: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_farewell_ends_in_crlf() {
        for p in [Protocol::Smtp, Protocol::Imap, Protocol::Pop3] {
            for f in [Farewell::Busy, Farewell::Shutdown, Farewell::Idle] {
                let text = farewell(p, f);
                assert!(text.ends_with(b"\r\n"), "{p:?} {f:?}");
                assert_eq!(text.iter().filter(|b| **b == b'\n').count(), 1);
                assert_eq!(text.iter().filter(|b| **b == b'\r').count(), 1);
            }
        }
    }

    #[test]
    fn printable_is_bounded() {
        assert_eq!(printable(b"a\r\nb\x00"), "a??b?");
        assert_eq!(printable(&[b'x'; 1000]).len(), MAX_PRINTABLE);
    }
}
