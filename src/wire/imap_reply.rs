//! Every line oxbridge itself writes in IMAP, in one table: [`Reply`] to
//! devices (before login, and the few lines of its own after it) and
//! [`Request`] to the upstream server (the login, and moving a session).

use super::{Farewell, Refusal};

/// The tag oxbridge uses for its own commands upstream.
pub const TAG: &str = "oxb1";

/// A mailbox name as an IMAP quoted string.
fn quoted(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    out.push(b'"');
    for b in name {
        if matches!(b, b'"' | b'\\') {
            out.push(b'\\');
        }
        out.push(*b);
    }
    out.push(b'"');
    out
}

/// A line oxbridge sends the upstream server before login.
pub enum Request<'a> {
    Capability,
    /// `AUTHENTICATE XOAUTH2`, with the base64 initial response (a secret)
    /// when the server offers SASL-IR.
    Authenticate(Option<&'a str>),
    /// A SASL response line (base64, a secret), or the empty line that
    /// answers an error challenge.
    Response(&'a str),
    /// Cancel a SASL exchange.
    Cancel,
    Logout,
    /// Moving a session: ENABLE what the device had enabled.
    Enable(&'a [String]),
    /// Moving a session: close the mailbox the device no longer has open
    /// (without expunging, unlike CLOSE).
    Unselect,
    /// Moving a session: select the device's mailbox again.
    Select {
        mailbox: &'a [u8],
        examine: bool,
        condstore: bool,
    },
    /// Moving a session: what the new connection has to announce, while
    /// it says its mailbox is empty.
    Noop,
    /// Moving a session: the UIDs of the messages from this number on
    /// (`FETCH n:* (UID)`: no expunges are announced during it).
    FetchUids(u32),
    /// Moving a session: the UIDs of the messages from this UID on, and
    /// every change the connection has to announce.
    UidFetchUids(u32),
    /// Moving a session: end the old connection's IDLE.
    Done,
    /// Moving a session: IDLE again, under the device's own tag.
    Idle(&'a str),
}

impl Request<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        let text = match self {
            Request::Capability => format!("{TAG} CAPABILITY"),
            Request::Authenticate(Some(ir)) => format!("{TAG} AUTHENTICATE XOAUTH2 {ir}"),
            Request::Authenticate(None) => format!("{TAG} AUTHENTICATE XOAUTH2"),
            Request::Response(data) => data.to_string(),
            Request::Cancel => "*".into(),
            Request::Logout => format!("{TAG} LOGOUT"),
            Request::Enable(exts) => format!("{TAG} ENABLE {}", exts.join(" ")),
            Request::Unselect => format!("{TAG} UNSELECT"),
            Request::Select {
                mailbox,
                examine,
                condstore,
            } => {
                let mut out =
                    format!("{TAG} {} ", if *examine { "EXAMINE" } else { "SELECT" }).into_bytes();
                out.extend_from_slice(&quoted(mailbox));
                if *condstore {
                    out.extend_from_slice(b" (CONDSTORE)");
                }
                return super::line(&out);
            }
            Request::Noop => format!("{TAG} NOOP"),
            Request::FetchUids(n) => format!("{TAG} FETCH {n}:* (UID)"),
            Request::UidFetchUids(uid) => format!("{TAG} UID FETCH {uid}:* (UID)"),
            Request::Done => "DONE".into(),
            Request::Idle(tag) => format!("{tag} IDLE"),
        };
        super::line(text.as_bytes())
    }
}

/// Every reply oxbridge itself gives an IMAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    Greeting {
        capabilities: &'a str,
    },
    Capability {
        tag: &'a str,
        capabilities: &'a str,
    },
    Noop {
        tag: &'a str,
    },
    Id {
        tag: &'a str,
    },
    Logout {
        tag: &'a str,
    },
    BeginTls {
        tag: &'a str,
    },
    NoStartTls {
        tag: &'a str,
    },
    PrivacyRequired {
        tag: &'a str,
    },
    LoginSyntax {
        tag: &'a str,
    },
    UnknownMechanism {
        tag: &'a str,
    },
    /// The empty SASL challenge.
    Continue,
    /// The go-ahead for a synchronising literal.
    LiteralGo,
    AuthCanceled {
        tag: &'a str,
    },
    Undecodable {
        tag: &'a str,
    },
    LoggedIn {
        tag: &'a str,
        capabilities: &'a str,
    },
    Refused {
        tag: &'a str,
        refusal: Refusal,
    },
    NotBeforeLogin {
        tag: &'a str,
    },
    /// A command that does not parse; `why` says what is wrong.
    Bad {
        tag: &'a str,
        why: &'a str,
    },
    InvalidTag,
    LineTooLong,
    /// A command line over the limit whose tag could be read.
    TaggedLineTooLong {
        tag: &'a str,
    },
    LiteralTooLarge {
        tag: &'a str,
    },
    /// A LITERAL+ literal too large: its bytes are on the way, so the
    /// session ends.
    LiteralTooLargeBye,
    TooManyErrors,
    TooManyAuthFailures,
    TooManyCommands,
    Farewell(Farewell),
    /// After login: the session could not move to a fresh upstream login
    /// before its token ran out, so it ends between responses.
    LoginExpired,
    /// After login: the server closed the connection without a `BYE` of
    /// its own (it was killed, or the network cut it).
    UpstreamLost,
    /// After login, while a session moves: messages that arrived meanwhile.
    Exists(usize),
    /// ... the message with this number left.
    Expunge(usize),
    /// ... these UIDs left (QRESYNC enabled).
    Vanished(&'a str),
    /// ... how many messages are recent to the new connection.
    Recent(usize),
    /// ... what the new connection said unasked about a message (its
    /// flags), as it said it.
    Fetch {
        n: usize,
        items: &'a [u8],
    },
}

impl Reply<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        let text = match self {
            Reply::Greeting { capabilities } => {
                format!("* OK [CAPABILITY {capabilities}] oxbridge ready")
            }
            Reply::Capability { tag, capabilities } => {
                format!("* CAPABILITY {capabilities}\r\n{tag} OK Capability completed")
            }
            Reply::Noop { tag } => format!("{tag} OK NOOP completed"),
            Reply::Id { tag } => format!("* ID (\"name\" \"oxbridge\")\r\n{tag} OK ID completed"),
            Reply::Logout { tag } => format!("* BYE Logging out\r\n{tag} OK Logout completed"),
            Reply::BeginTls { tag } => format!("{tag} OK Begin TLS negotiation now"),
            Reply::NoStartTls { tag } => format!("{tag} BAD STARTTLS not available"),
            Reply::PrivacyRequired { tag } => {
                format!("{tag} NO [PRIVACYREQUIRED] Login is disabled without TLS")
            }
            Reply::LoginSyntax { tag } => {
                format!("{tag} BAD LOGIN expects a user name and a password")
            }
            Reply::UnknownMechanism { tag } => {
                format!("{tag} NO Unsupported authentication mechanism; use PLAIN")
            }
            Reply::Continue => "+ ".into(),
            Reply::LiteralGo => "+ Ready for literal data".into(),
            Reply::AuthCanceled { tag } => format!("{tag} BAD Authentication canceled"),
            Reply::Undecodable { tag } => {
                format!("{tag} BAD Cannot decode the authentication exchange")
            }
            Reply::LoggedIn { tag, capabilities } => {
                format!("{tag} OK [CAPABILITY {capabilities}] Logged in")
            }
            Reply::Refused { tag, refusal } => format!("{tag} {}", refused(*refusal)),
            Reply::NotBeforeLogin { tag } => {
                format!("{tag} BAD Command not available before login")
            }
            Reply::Bad { tag, why } => format!("{tag} BAD {why}"),
            Reply::InvalidTag => "* BAD Invalid tag".into(),
            Reply::LineTooLong => "* BAD Command line too long".into(),
            Reply::TaggedLineTooLong { tag } => format!("{tag} BAD Command line too long"),
            Reply::LiteralTooLarge { tag } => format!("{tag} BAD Literal too large"),
            Reply::LiteralTooLargeBye => "* BYE Literal too large".into(),
            Reply::TooManyErrors => "* BYE Too many errors".into(),
            Reply::TooManyAuthFailures => "* BYE Too many failed logins".into(),
            Reply::TooManyCommands => "* BYE Too many commands without logging in".into(),
            Reply::Farewell(f) => return farewell(*f).to_vec(),
            Reply::LoginExpired => "* BYE [UNAVAILABLE] Login expired, please log in again".into(),
            Reply::UpstreamLost => {
                "* BYE [UNAVAILABLE] Mail server closed the connection, please log in again".into()
            }
            Reply::Exists(n) => format!("* {n} EXISTS"),
            Reply::Expunge(n) => format!("* {n} EXPUNGE"),
            Reply::Vanished(uids) => format!("* VANISHED {uids}"),
            Reply::Recent(n) => format!("* {n} RECENT"),
            Reply::Fetch { n, items } => {
                let mut out = format!("* {n} FETCH ").into_bytes();
                out.extend_from_slice(items);
                return super::line(&out);
            }
        };
        super::line(text.as_bytes())
    }
}

/// The tagged reply to a refused LOGIN or AUTHENTICATE (after the tag).
fn refused(r: Refusal) -> &'static str {
    match r {
        Refusal::BadCredentials => "NO [AUTHENTICATIONFAILED] Authentication failed",
        Refusal::Authorization => {
            "NO [AUTHORIZATIONFAILED] Authorization failed: the authorization identity is not the user name"
        }
        Refusal::NoToken => {
            "NO [AUTHENTICATIONFAILED] Authentication failed: no access token for this account"
        }
        Refusal::TokenRejected => {
            "NO [AUTHENTICATIONFAILED] Authentication failed: the mail server refused the access token"
        }
        Refusal::TokenUnavailable => {
            "NO [UNAVAILABLE] Temporary authentication failure: token service unavailable"
        }
        Refusal::UpstreamUnavailable => "NO [UNAVAILABLE] Mail server unavailable, try again later",
        Refusal::UpstreamTemporary => {
            "NO [UNAVAILABLE] Temporary authentication failure at the mail server"
        }
        Refusal::Busy => {
            "NO [UNAVAILABLE] This mailbox has too many open sessions, try again later"
        }
        Refusal::Throttled => "NO [UNAVAILABLE] Too many failed logins; try again later",
        Refusal::CannotSpool => "NO [AUTHENTICATIONFAILED] Authentication failed",
    }
}

pub(super) fn farewell(f: Farewell) -> &'static [u8] {
    match f {
        Farewell::Busy => b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        Farewell::Shutdown => b"* BYE [UNAVAILABLE] Server shutting down\r\n",
        Farewell::Idle => b"* BYE Autologout; idle for too long\r\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_of_a_move() {
        assert_eq!(Request::Unselect.to_bytes(), b"oxb1 UNSELECT\r\n");
        assert_eq!(
            Request::Enable(&["CONDSTORE".into()]).to_bytes(),
            b"oxb1 ENABLE CONDSTORE\r\n"
        );
        assert_eq!(
            Request::Select {
                mailbox: b"Sent \"x\"",
                examine: true,
                condstore: true
            }
            .to_bytes(),
            b"oxb1 EXAMINE \"Sent \\\"x\\\"\" (CONDSTORE)\r\n"
        );
    }

    #[test]
    fn a_lost_upstream_is_a_bye() {
        assert_eq!(
            Reply::UpstreamLost.to_bytes(),
            b"* BYE [UNAVAILABLE] Mail server closed the connection, please log in again\r\n"
        );
    }

    #[test]
    fn mailbox_names_are_quoted() {
        assert_eq!(quoted(b"a \"b\\"), b"\"a \\\"b\\\\\"");
    }
}
