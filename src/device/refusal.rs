//! Refusals a device gets besides a failed login, and who the device is.
//! Each refusal is logged once per session at `warn` with its reason and,
//! where one exists, the administrator's fix; counted in
//! `oxbridge_refusals_total{protocol,reason}`; and put on the status
//! page's board ("Last refusals", and the device's row). The reasons are a
//! fixed set, so the counter's labels never carry what a device sent.

use std::net::IpAddr;

use tracing::warn;

use crate::config::Protocol;

/// Characters of a reply kept for the log and the page.
pub const MAX_SAID: usize = 200;

/// Why a device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// A password before STARTTLS on a listener that offers it.
    EncryptionRequired,
    /// A password on a `tls = "none"` listener without `allow_plaintext_auth`.
    PlaintextPassword,
    /// The listener's or the process's connection limit was reached.
    TooManySessions,
    /// Mail without a login from a network no `[[relay]]` rule covers.
    NoRelay,
    /// An envelope sender outside `allowed_senders`.
    SenderNotAllowed,
    /// The upstream answered a command after login with a 5xx.
    UpstreamPermanent,
    /// The upstream answered a command after login with a 4xx.
    UpstreamTemporary,
}

impl Refused {
    /// The counter's and the log's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::EncryptionRequired => "encryption_required",
            Refused::PlaintextPassword => "plaintext_refused",
            Refused::TooManySessions => "too_many_sessions",
            Refused::NoRelay => "relay_refused",
            Refused::SenderNotAllowed => "sender_not_allowed",
            Refused::UpstreamPermanent => "upstream_refused",
            Refused::UpstreamTemporary => "upstream_deferred",
        }
    }

    /// An upstream reply's class: 5xx refused, 4xx deferred.
    pub fn upstream(code: u16) -> Option<Refused> {
        match code {
            400..=499 => Some(Refused::UpstreamTemporary),
            500..=599 => Some(Refused::UpstreamPermanent),
            _ => None,
        }
    }

    /// The administrator's fix for oxbridge's own refusals; an upstream's
    /// refusal goes through [`crate::diagnose::reply_advice`] instead.
    pub fn fix(self, said: &str) -> Option<&'static str> {
        Some(match self {
            Refused::EncryptionRequired => {
                "the device sent its password before starting TLS: set it to use STARTTLS \
                 (often called TLS or STARTTLS in its mail settings), or point it at a \
                 listener with tls = \"implicit\""
            }
            Refused::PlaintextPassword => {
                "the listener has tls = \"none\" and refuses passwords in the clear: give it a \
                 certificate and tls = \"starttls\" (and set the device to STARTTLS), or, for \
                 a device that cannot encrypt on a trusted network, set \
                 allow_plaintext_auth = true on the listener"
            }
            Refused::TooManySessions => {
                "every connection slot is taken: raise the listener's max_connections or \
                 [limits] max_connections, or find the device that keeps sessions open \
                 (the status page's sessions and devices)"
            }
            Refused::NoRelay => {
                "the device sent mail without logging in, from a network no [[relay]] rule \
                 covers: set the device to log in (SMTP AUTH) as an [[account]], or add its \
                 network to a [[relay]] rule's from_networks"
            }
            Refused::SenderNotAllowed => {
                "the device's envelope sender is not in allowed_senders: set the device's \
                 sender address to an allowed one, or add it to allowed_senders of its \
                 [[account]] or [[relay]] rule"
            }
            Refused::UpstreamPermanent | Refused::UpstreamTemporary => {
                return crate::diagnose::reply_advice(said)
            }
        })
    }
}

/// What is known of the device behind a session: its address, what it
/// said about itself, the login it used, its TLS version. Every text in
/// it is bounded and cleaned ([`clean`]).
#[derive(Debug, Clone)]
pub struct Who {
    pub protocol: Protocol,
    pub peer: IpAddr,
    /// SMTP's EHLO/HELO name, or IMAP's ID "name".
    pub name: Option<String>,
    /// The login as the log shows it: the configured account, or the
    /// `unknown user ... #hash` form (never what a device typed that is no
    /// account: it may be a password).
    pub login: Option<String>,
    /// `TLSv1.0` .. `TLSv1.3`, once the device's TLS is up.
    pub tls: Option<&'static str>,
}

impl Who {
    pub fn new(protocol: Protocol, peer: IpAddr, tls: Option<&'static str>) -> Who {
        Who {
            protocol,
            peer: peer.to_canonical(),
            name: None,
            login: None,
            tls,
        }
    }
}

/// Log, count and show one refusal; `said` is the reply line the device got.
pub fn record(who: &Who, refused: Refused, said: &str) {
    let said = clean(said, MAX_SAID);
    let fix = refused.fix(&said);
    let by = match refused {
        Refused::UpstreamPermanent | Refused::UpstreamTemporary => "upstream",
        _ => "oxbridge",
    };
    // The device's name and login are on the session's span.
    match fix {
        Some(fix) => warn!(reason = refused.reason(), by, said = %said, fix, "device refused"),
        None => warn!(reason = refused.reason(), by, said = %said, "device refused"),
    }
    count(who, refused, &said, fix);
}

/// Count one refusal and put it on the board (logged by the caller).
fn count(who: &Who, refused: Refused, said: &str, fix: Option<&'static str>) {
    crate::metrics::refusal(who.protocol, refused.reason());
    crate::status::board::refusal(who, refused.reason(), said, fix);
}

/// Refusals of one session: each reason with the same reply code (and
/// enhanced status code, like `550 5.7.60`) is logged once, whatever the
/// rest of the text (a server's time stamp, the recipient it quotes);
/// repeats are counted only. Past [`MAX_ONCE`] kinds, only counted: a
/// device looping on refused commands cannot flood the log.
#[derive(Debug, Default)]
pub struct Once {
    logged: Vec<(Refused, String)>,
}

/// Distinct refusals logged per session; past these, counted only.
const MAX_ONCE: usize = 16;

impl Once {
    /// Log, count and show `refused` the first time, count it after.
    pub fn record(&mut self, who: &Who, refused: Refused, said: &str) {
        let said = clean(said, MAX_SAID);
        let code = reply_code(&said);
        if self.logged.len() >= MAX_ONCE
            || self.logged.iter().any(|(r, c)| *r == refused && *c == code)
        {
            crate::metrics::refusal(who.protocol, refused.reason());
            return;
        }
        record(who, refused, &said);
        self.logged.push((refused, code));
    }
}

/// A reply's code and, if it has one, its enhanced status code: `550
/// 5.7.60` of `550 5.7.60 SMTP; Client does not have permissions ...`.
fn reply_code(said: &str) -> String {
    let mut words = said.split_whitespace();
    let code: String = words.next().unwrap_or("").chars().take(3).collect();
    match words.next() {
        Some(esc)
            if esc.split('.').count() == 3
                && esc.chars().all(|c| c.is_ascii_digit() || c == '.') =>
        {
            format!("{code} {esc}")
        }
        _ => code,
    }
}

/// The device turned away for want of a connection slot (`limit`: which
/// one), before anything else is known of it; `said` is its farewell.
pub fn turned_away(protocol: Protocol, peer: IpAddr, limit: &str, said: &[u8]) {
    let who = Who::new(protocol, peer, None);
    let refused = Refused::TooManySessions;
    let said = first_line(said);
    let fix = refused.fix(&said);
    warn!(reason = refused.reason(), by = "oxbridge", said = %said, limit = %limit, fix = fix.unwrap_or(""), "device refused");
    count(&who, refused, &said, fix);
}

/// `text` for a log line or the page: control bytes and non-ASCII become
/// `?`, surrounding white space and a trailing CRLF go, at most `max`
/// characters.
pub fn clean(text: &str, max: usize) -> String {
    text.trim()
        .chars()
        .take(max)
        .map(|c| match c {
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// The first line of a reply, without its line end.
pub fn first_line(reply: &[u8]) -> String {
    let end = memchr::memchr(b'\n', reply).unwrap_or(reply.len());
    clean(&String::from_utf8_lossy(&reply[..end]), MAX_SAID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaned_text_is_bounded_and_has_no_control_bytes() {
        let dirty = format!("550 no\r\n\x01\0évil{}", "x".repeat(500));
        let c = clean(&dirty, MAX_SAID);
        assert_eq!(c.chars().count(), MAX_SAID);
        assert!(c.starts_with("550 no???"), "{c}");
        assert!(c.chars().all(|c| (' '..='~').contains(&c)), "{c}");
        assert_eq!(
            first_line(b"538 5.7.11 Encryption required\r\n"),
            "538 5.7.11 Encryption required"
        );
    }

    #[test]
    fn a_session_logs_each_refusal_once() {
        let who = Who::new(Protocol::Smtp, "192.0.2.78".parse().unwrap(), None);
        let mut once = Once::default();
        once.record(&who, Refused::UpstreamPermanent, "550 5.7.60 no\r\n");
        once.record(&who, Refused::UpstreamPermanent, "550 5.7.60 no");
        once.record(&who, Refused::UpstreamPermanent, "550 5.1.1 unknown");
        let mine: Vec<_> = crate::status::board::refusals()
            .into_iter()
            .filter(|r| r.peer == who.peer)
            .map(|r| r.said)
            .collect();
        assert_eq!(mine, ["550 5.1.1 unknown", "550 5.7.60 no"]);
    }

    /// Replies that differ only in what follows their codes (a server's
    /// time stamp, a quoted recipient) are one kind of refusal; a device
    /// looping on new kinds is logged no more than `MAX_ONCE` times.
    #[test]
    fn a_looping_device_cannot_flood_the_log() {
        let who = Who::new(Protocol::Smtp, "192.0.2.79".parse().unwrap(), None);
        let mut once = Once::default();
        for i in 0..100 {
            let said = format!("550 5.1.1 <user{i}@contoso.test>: unknown [AM0P{i}.eurprd]");
            once.record(&who, Refused::UpstreamPermanent, &said);
        }
        assert_eq!(once.logged.len(), 1, "{:?}", once.logged);
        for i in 0..100 {
            once.record(&who, Refused::UpstreamPermanent, &format!("5{i:02} x"));
        }
        assert_eq!(once.logged.len(), MAX_ONCE);
        assert_eq!(reply_code("550 5.7.60 SMTP; no"), "550 5.7.60");
        assert_eq!(reply_code("421 Service not available"), "421");
    }

    #[test]
    fn every_local_refusal_has_a_fix_and_upstream_ones_are_diagnosed() {
        for r in [
            Refused::EncryptionRequired,
            Refused::PlaintextPassword,
            Refused::TooManySessions,
            Refused::NoRelay,
            Refused::SenderNotAllowed,
        ] {
            assert!(r.fix("").is_some(), "{r:?}");
        }
        let sendas = Refused::UpstreamPermanent
            .fix("550 5.7.60 SMTP; Client does not have permissions to send as this sender");
        assert!(sendas.unwrap().contains("Add-RecipientPermission"));
        assert_eq!(Refused::upstream(452), Some(Refused::UpstreamTemporary));
        assert_eq!(Refused::upstream(554), Some(Refused::UpstreamPermanent));
        assert_eq!(Refused::upstream(250), None);
    }
}
