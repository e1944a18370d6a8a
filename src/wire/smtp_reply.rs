//! Every line oxbridge itself writes to an SMTP device, worded in one
//! table ([`Reply`]), and what a relayed device is told when its upstream
//! vanishes.

use crate::wire::{Farewell, Refusal, CRLF};

/// Every reply oxbridge itself gives an SMTP device. The relayed session's
/// replies are the upstream's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    Greeting {
        host: &'a str,
    },
    /// The EHLO reply: `keywords` are what the upstream offers and the
    /// device may be told; then STARTTLS and AUTH where they apply.
    Ehlo {
        host: &'a str,
        name: &'a str,
        keywords: &'a [String],
        starttls: bool,
        auth: bool,
    },
    Helo {
        host: &'a str,
        name: &'a str,
    },
    Ok,
    ReadyForTls,
    TlsActive,
    NoStartTls,
    HeloFirst,
    EncryptionRequired,
    UnknownMechanism,
    /// A SASL challenge (`334` and base64 text, possibly empty).
    Challenge(&'a str),
    AuthCanceled,
    Undecodable,
    AuthSucceeded,
    Refused(Refusal),
    AuthRequired,
    SenderNotAllowed,
    RelayTemporary,
    RelayImpossible,
    BdatBeforeAuth,
    Help,
    CannotVrfy,
    Bye,
    Unrecognized,
    LineTooLong,
    // After login on a spooling listener, where oxbridge takes the message.
    SenderOk,
    RecipientOk,
    StartData,
    /// A BDAT chunk other than the last, taken.
    ChunkTaken(u64),
    /// The message is on disk, under this id.
    Queued(&'a str),
    NeedMail,
    NestedMail,
    NoRecipients,
    BadSender,
    BdatSyntax,
    BadRecipient,
    UnknownParameter,
    TooBig,
    /// `rewrite_sender`: the header block is over what is held for it.
    HeaderTooBig,
    TooManyRecipients,
    SenderNotAllowedForLogin,
    NotStored,
    AlreadyAuthenticated,
    DataTimeout,
    /// Microsoft Graph took the message (a session listener's Graph account).
    SentByGraph,
    GraphTemporary,
    GraphAuth,
    GraphRefused,
    TooManyErrors,
    TooManyAuthFailures,
    TooManyCommands,
    Timeout,
    Farewell(Farewell),
}

/// The SASL LOGIN prompts, base64 of `Username:` and `Password:`.
pub const LOGIN_USER_PROMPT: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

impl Reply<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        let text: &str = match self {
            Reply::Greeting { host } => return text(format!("220 {host} ESMTP oxbridge ready")),
            Reply::Ehlo {
                host,
                name,
                keywords,
                starttls,
                auth,
            } => {
                let mut lines = vec![format!("{host} Hello {name}")];
                lines.extend(keywords.iter().cloned());
                if *starttls {
                    lines.push("STARTTLS".into());
                }
                if *auth {
                    lines.push("AUTH PLAIN LOGIN".into());
                    lines.push("AUTH=PLAIN LOGIN".into());
                }
                let mut out = Vec::new();
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                    out.extend_from_slice(format!("250{sep}{l}").as_bytes());
                    out.extend_from_slice(CRLF);
                }
                return out;
            }
            Reply::Helo { host, name } => return text(format!("250 {host} Hello {name}")),
            Reply::Challenge(data) => return text(format!("334 {data}")),
            Reply::ChunkTaken(n) => return text(format!("250 2.0.0 {n} octets received")),
            Reply::Queued(id) => return text(format!("250 2.0.0 Ok: queued as {id}")),
            Reply::Ok => "250 2.0.0 OK",
            Reply::ReadyForTls => "220 2.0.0 Ready to start TLS",
            Reply::TlsActive => "503 5.5.1 TLS already active",
            Reply::NoStartTls => "502 5.5.1 STARTTLS not available on this port",
            Reply::HeloFirst => "503 5.5.1 Send EHLO or HELO first",
            Reply::EncryptionRequired => {
                "538 5.7.11 Encryption required for requested authentication mechanism"
            }
            Reply::UnknownMechanism => {
                "504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN"
            }
            Reply::AuthCanceled => "501 5.7.0 Authentication canceled",
            Reply::Undecodable => "501 5.5.2 Cannot decode the authentication exchange",
            Reply::AuthSucceeded => "235 2.7.0 Authentication successful",
            Reply::Refused(r) => refused(*r),
            Reply::AuthRequired => "530 5.7.0 Authentication required",
            Reply::SenderNotAllowed => "550 5.7.1 Sender not allowed to relay from this network",
            Reply::RelayTemporary => {
                "451 4.7.0 Temporary failure relaying for this network, try again later"
            }
            Reply::RelayImpossible => "554 5.7.1 Relaying for this network is not possible now",
            Reply::BdatBeforeAuth => "421 4.7.0 BDAT before authentication, closing connection",
            Reply::Help => {
                "214 2.0.0 oxbridge: log in with AUTH PLAIN or AUTH LOGIN, then send mail as usual"
            }
            Reply::CannotVrfy => "252 2.5.0 Cannot VRFY user",
            Reply::Bye => "221 2.0.0 Bye",
            Reply::Unrecognized => "500 5.5.2 Command unrecognized",
            Reply::LineTooLong => "500 5.5.6 Line too long",
            Reply::SenderOk => "250 2.1.0 Sender OK",
            Reply::RecipientOk => "250 2.1.5 Recipient OK",
            Reply::StartData => "354 End data with <CR><LF>.<CR><LF>",
            Reply::NeedMail => "503 5.5.1 Send MAIL first",
            Reply::NestedMail => "503 5.5.1 Sender already given",
            Reply::NoRecipients => "554 5.5.1 No valid recipients",
            Reply::BadSender => "501 5.1.7 Bad sender address syntax",
            Reply::BdatSyntax => "501 5.5.4 Syntax: BDAT count [LAST]",
            Reply::BadRecipient => "501 5.1.3 Bad recipient address syntax",
            Reply::UnknownParameter => "555 5.5.4 Unsupported MAIL or RCPT parameter",
            Reply::TooBig => "552 5.3.4 Message size exceeds fixed maximum message size",
            Reply::HeaderTooBig => {
                "552 5.3.4 Message header too big to rewrite its sender"
            }
            Reply::TooManyRecipients => "452 4.5.3 Too many recipients",
            Reply::SenderNotAllowedForLogin => {
                "550 5.7.1 Sender address not allowed for this login"
            }
            Reply::NotStored => "451 4.3.0 Could not store the message, try again later",
            Reply::AlreadyAuthenticated => "503 5.5.1 Already authenticated",
            Reply::SentByGraph => "250 2.0.0 Ok: sent through Microsoft Graph",
            Reply::GraphTemporary => {
                "451 4.4.0 Microsoft Graph did not take the message, try again later"
            }
            Reply::GraphAuth => {
                "451 4.7.0 Microsoft Graph refused oxbridge's token; the message was not sent, try again later"
            }
            Reply::GraphRefused => "554 5.6.0 Microsoft Graph refused the message",
            Reply::DataTimeout => "421 4.4.2 Timeout waiting for the message, closing connection",
            Reply::TooManyErrors => "421 4.7.0 Too many errors, closing connection",
            Reply::TooManyAuthFailures => "421 4.7.0 Too many failed logins, closing connection",
            Reply::TooManyCommands => {
                "421 4.7.0 Too many commands without authentication, closing connection"
            }
            Reply::Timeout => "421 4.4.2 Timeout waiting for a command, closing connection",
            Reply::Farewell(f) => return farewell(*f).to_vec(),
        };
        crate::wire::line(text.as_bytes())
    }
}

fn text(s: String) -> Vec<u8> {
    crate::wire::line(s.as_bytes())
}

/// The reply to a refused AUTH.
fn refused(r: Refusal) -> &'static str {
    match r {
        Refusal::BadCredentials => "535 5.7.8 Authentication credentials invalid",
        Refusal::Authorization => {
            "535 5.7.8 Authentication failed: the authorization identity is not the user name"
        }
        Refusal::NoToken => "535 5.7.8 Authentication failed: no access token for this account",
        Refusal::TokenRejected => {
            "535 5.7.8 Authentication failed: the mail server refused the access token"
        }
        Refusal::TokenUnavailable => {
            "454 4.7.0 Temporary authentication failure: token service unavailable"
        }
        Refusal::UpstreamUnavailable => {
            "454 4.7.0 Temporary failure: mail server unavailable, try again later"
        }
        Refusal::UpstreamTemporary => {
            "454 4.7.0 Temporary authentication failure at the mail server"
        }
        Refusal::Busy => "421 4.3.2 Too many sessions for this mailbox at once, try again later",
        Refusal::Throttled => "454 4.7.0 Too many failed logins; try again later",
        Refusal::CannotSpool => {
            "535 5.7.8 Authentication failed: this account cannot send through this port"
        }
    }
}

pub(in crate::wire) fn farewell(f: Farewell) -> &'static [u8] {
    match f {
        Farewell::Busy => b"421 4.7.0 Too many connections, try again later\r\n",
        Farewell::Shutdown => b"421 4.3.2 Service shutting down, try again later\r\n",
        Farewell::Idle => b"421 4.4.2 Idle for too long, closing connection\r\n",
    }
}

/// What a relayed device is told when the upstream vanished without a
/// goodbye: in the middle of a message (after `354`), that the message was
/// not accepted; otherwise only that the connection is gone.
pub fn upstream_lost(in_message: bool) -> &'static [u8] {
    if in_message {
        b"421 4.4.2 Connection to the mail server lost during the message; it was not accepted, try again\r\n"
    } else {
        b"421 4.4.2 Connection to the mail server lost, try again later\r\n"
    }
}

/// The last complete line the SMTP server sent, in `tail` (its latest output).
pub fn last_line(tail: &[u8]) -> &[u8] {
    let trimmed = tail
        .strip_suffix(b"\r\n")
        .or_else(|| tail.strip_suffix(b"\n"))
        .unwrap_or(tail);
    trimmed.rsplit(|b| *b == b'\n').next().unwrap_or(trimmed)
}

/// Whether the server's last line is its goodbye (`221`).
pub fn said_goodbye(tail: &[u8]) -> bool {
    last_line(tail).starts_with(b"221")
}

/// Whether the server's last line invited the message data (`354`).
pub fn awaiting_data(tail: &[u8]) -> bool {
    last_line(tail).starts_with(b"354")
}
