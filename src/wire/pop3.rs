//! POP3 on the wire before login: the device's commands, the upstream's
//! SASL continuation, and every line oxbridge itself writes in POP3, in one
//! table ([`Reply`], [`Request`]).

use super::{Farewell, Refusal};

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

/// A SASL continuation (`+` or `+ data`), not `+OK`.
pub fn is_continuation(line: &[u8]) -> bool {
    line == b"+" || line.starts_with(b"+ ")
}

/// A line oxbridge sends the upstream server before login.
pub enum Request<'a> {
    /// `AUTH XOAUTH2`, answered by a continuation.
    AuthXoauth2,
    /// A SASL response line (base64, a secret), or the empty line that
    /// answers an error challenge.
    Response(&'a str),
    Quit,
}

impl Request<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        super::line(match self {
            Request::AuthXoauth2 => b"AUTH XOAUTH2",
            Request::Response(data) => data.as_bytes(),
            Request::Quit => b"QUIT",
        })
    }
}

/// Every reply oxbridge itself gives a POP3 device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Greeting,
    /// The CAPA list: USER and SASL where passwords are taken, STLS where offered.
    Capa {
        auth: bool,
        stls: bool,
    },
    BeginTls,
    NoStls,
    PlaintextDisabled,
    UserOk,
    InvalidUser,
    UserFirst,
    /// `AUTH` alone: the mechanisms.
    Mechanisms,
    UnknownMechanism,
    /// The empty SASL challenge.
    Continue,
    AuthCanceled,
    Undecodable,
    LoggedIn,
    Refused(Refusal),
    Bye,
    NotLoggedIn,
    Unknown,
    LineTooLong,
    TooManyErrors,
    TooManyAuthFailures,
    TooManyCommands,
    Farewell(Farewell),
}

/// The CAPA lines every POP3 device is offered.
const CAPA_ALWAYS: [&str; 6] = [
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "PIPELINING",
    "TOP",
    "UIDL",
    "IMPLEMENTATION oxbridge",
];

impl Reply {
    pub fn to_bytes(&self) -> Vec<u8> {
        let text = match self {
            Reply::Greeting => "+OK oxbridge ready",
            Reply::Capa { auth, stls } => {
                let mut lines = vec!["+OK Capability list follows"];
                if *auth {
                    lines.extend(["USER", "SASL PLAIN"]);
                }
                if *stls {
                    lines.push("STLS");
                }
                lines.extend(CAPA_ALWAYS);
                lines.push(".");
                return lines
                    .iter()
                    .flat_map(|l| super::line(l.as_bytes()))
                    .collect();
            }
            Reply::BeginTls => "+OK Begin TLS negotiation",
            Reply::NoStls => "-ERR STLS not available",
            Reply::PlaintextDisabled => {
                "-ERR [AUTH] Plaintext authentication is disabled without TLS"
            }
            Reply::UserOk => "+OK",
            Reply::InvalidUser => "-ERR Invalid user name",
            Reply::UserFirst => "-ERR USER first",
            Reply::Mechanisms => {
                return ["+OK", "PLAIN", "."]
                    .iter()
                    .flat_map(|l| super::line(l.as_bytes()))
                    .collect()
            }
            Reply::UnknownMechanism => "-ERR Unsupported authentication mechanism; use PLAIN",
            Reply::Continue => "+ ",
            Reply::AuthCanceled => "-ERR Authentication canceled",
            Reply::Undecodable => "-ERR [AUTH] Cannot decode the authentication exchange",
            Reply::LoggedIn => "+OK Logged in",
            Reply::Refused(r) => refused(*r),
            Reply::Bye => "+OK Bye",
            Reply::NotLoggedIn => "-ERR Not logged in",
            Reply::Unknown => "-ERR Unknown command",
            Reply::LineTooLong => "-ERR Line too long",
            Reply::TooManyErrors => "-ERR Too many errors, closing connection",
            Reply::TooManyAuthFailures => "-ERR [AUTH] Too many failed logins, closing connection",
            Reply::TooManyCommands => "-ERR Too many commands without logging in",
            Reply::Farewell(f) => return farewell(*f).to_vec(),
        };
        super::line(text.as_bytes())
    }
}

/// The reply to a refused PASS or AUTH.
fn refused(r: Refusal) -> &'static str {
    match r {
        Refusal::BadCredentials => "-ERR [AUTH] Authentication failed",
        Refusal::Authorization => {
            "-ERR [AUTH] Authorization failed: the authorization identity is not the user name"
        }
        Refusal::NoToken => "-ERR [AUTH] Authentication failed: no access token for this account",
        Refusal::TokenRejected => {
            "-ERR [AUTH] Authentication failed: the mail server refused the access token"
        }
        Refusal::TokenUnavailable => {
            "-ERR [SYS/TEMP] Temporary authentication failure: token service unavailable"
        }
        Refusal::UpstreamUnavailable => "-ERR [SYS/TEMP] Mail server unavailable, try again later",
        Refusal::UpstreamTemporary => {
            "-ERR [SYS/TEMP] Temporary authentication failure at the mail server"
        }
        Refusal::Busy => "-ERR [SYS/TEMP] This mailbox has too many open sessions, try again later",
        Refusal::Throttled => "-ERR [SYS/TEMP] Too many failed logins; try again later",
        Refusal::CannotSpool => "-ERR [AUTH] Authentication failed",
    }
}

pub(super) fn farewell(f: Farewell) -> &'static [u8] {
    match f {
        Farewell::Busy => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
        Farewell::Shutdown => b"-ERR [SYS/TEMP] Server shutting down\r\n",
        Farewell::Idle => b"-ERR Idle for too long, closing connection\r\n",
    }
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
}
