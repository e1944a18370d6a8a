//! SMTP on the wire: the device's commands, the upstream's replies, and
//! every line oxbridge itself writes in SMTP, worded in one table
//! ([`Reply`] towards devices, [`Request`] towards the upstream).
//!
//! What the device is told in EHLO is taken from the upstream's own EHLO
//! ([`passthrough`]), so that it stays true once the bytes are relayed;
//! [`promises_hold`] says whether an upstream session still honours it.

use super::{Farewell, Refusal, CRLF};

/// The EHLO keywords relayed to the device when the upstream offers them.
pub const PASSTHROUGH_KEYWORDS: [&str; 8] = [
    "SIZE",
    "8BITMIME",
    "SMTPUTF8",
    "PIPELINING",
    "CHUNKING",
    "BINARYMIME",
    "ENHANCEDSTATUSCODES",
    "DSN",
];
/// The longest EHLO/HELO name echoed back to the device.
pub const MAX_ECHOED_NAME: usize = 255;

/// A device command, parsed without I/O.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    StartTls,
    Auth {
        mechanism: String,
        initial: Option<&'a [u8]>,
    },
    Mail,
    Rcpt,
    Data,
    Bdat(Option<u64>),
    Rset,
    Noop,
    Help,
    Vrfy,
    Quit,
    Unknown,
}

pub fn parse_command(line: &[u8]) -> Command<'_> {
    let (verb, arg) = match line.iter().position(|b| *b == b' ') {
        Some(i) => (&line[..i], trim(&line[i + 1..])),
        None => (line, &b""[..]),
    };
    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap_or("")
    }
    fn trim(b: &[u8]) -> &[u8] {
        let start = b.iter().position(|c| *c != b' ').unwrap_or(b.len());
        let end = b
            .iter()
            .rposition(|c| *c != b' ')
            .map(|i| i + 1)
            .unwrap_or(start);
        &b[start..end.max(start)]
    }
    match verb.to_ascii_uppercase().as_slice() {
        b"EHLO" => Command::Ehlo(text(arg)),
        b"HELO" => Command::Helo(text(arg)),
        b"STARTTLS" => Command::StartTls,
        b"AUTH" => {
            let (mech, initial) = match arg.iter().position(|b| *b == b' ') {
                Some(i) => (&arg[..i], Some(trim(&arg[i + 1..]))),
                None => (arg, None),
            };
            Command::Auth {
                mechanism: String::from_utf8_lossy(mech).to_ascii_uppercase(),
                initial,
            }
        }
        b"MAIL" => Command::Mail,
        b"RCPT" => Command::Rcpt,
        b"DATA" => Command::Data,
        b"BDAT" => Command::Bdat(
            arg.split(|b| *b == b' ')
                .next()
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse().ok()),
        ),
        b"RSET" => Command::Rset,
        b"NOOP" => Command::Noop,
        b"HELP" => Command::Help,
        b"VRFY" => Command::Vrfy,
        b"QUIT" => Command::Quit,
        _ => Command::Unknown,
    }
}

/// One line of a server reply: code, whether it is the last line, text.
pub fn parse_reply_line(line: &[u8]) -> Option<(u16, bool, &[u8])> {
    // RFC 5321 4.2: the first digit is 2 to 5 (1yz is unused but harmless).
    if line.len() < 3
        || !(b'1'..=b'5').contains(&line[0])
        || !line[..3].iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    let code = std::str::from_utf8(&line[..3]).ok()?.parse().ok()?;
    match line.get(3) {
        None => Some((code, true, &b""[..])),
        Some(b' ') => Some((code, true, &line[4..])),
        Some(b'-') => Some((code, false, &line[4..])),
        _ => None,
    }
}

/// A complete (possibly multi-line) upstream reply.
#[derive(Debug)]
pub struct ServerReply {
    pub code: u16,
    pub lines: Vec<Vec<u8>>,
}

impl ServerReply {
    /// The reply as one printable line for the log.
    pub fn summary(&self) -> String {
        let first = self
            .lines
            .first()
            .map(|l| super::printable(l))
            .unwrap_or_default();
        format!("{} {}", self.code, first)
    }
}

/// The EHLO keyword lines of a reply (all lines but the first), keyword upper-cased.
pub fn ehlo_keywords(reply: &ServerReply) -> Vec<String> {
    reply
        .lines
        .iter()
        .skip(1)
        .map(|l| {
            let l = super::printable(l);
            match l.split_once(' ') {
                Some((k, rest)) => format!("{} {}", k.to_ascii_uppercase(), rest),
                None => l.to_ascii_uppercase(),
            }
        })
        .collect()
}

pub fn keyword(line: &str) -> &str {
    line.split(' ').next().unwrap_or("")
}

/// What of the upstream's EHLO the device may be told.
pub fn passthrough(upstream: &[String]) -> Vec<String> {
    upstream
        .iter()
        .filter(|l| PASSTHROUGH_KEYWORDS.contains(&keyword(l)))
        .cloned()
        .collect()
}

/// Whether everything the device was told holds for this upstream session.
/// `SIZE n` holds when the upstream's limit is at least n (or unlimited).
pub fn promises_hold(told: &[String], upstream: &[String]) -> bool {
    told.iter().all(|t| {
        if keyword(t) == "SIZE" {
            let size = |l: &str| {
                l.split(' ')
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            upstream
                .iter()
                .find(|u| keyword(u) == "SIZE")
                .is_some_and(|u| size(u) == 0 || size(u) >= size(t))
        } else {
            upstream.iter().any(|u| u == t)
        }
    })
}

/// The address of `MAIL FROM:<addr> params`, lower-cased.
pub fn mail_from_address(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text
        .get(..10)
        .filter(|p| p.eq_ignore_ascii_case("MAIL FROM:"))
        .map(|_| &text[10..])?;
    let rest = rest.trim_start();
    let addr = match rest.strip_prefix('<') {
        Some(r) => r.split('>').next()?,
        None => rest.split(' ').next()?,
    };
    Some(addr.to_lowercase())
}

/// The path and parameters of `MAIL FROM:<path> params` (`prefix` is
/// `"MAIL FROM:"`) or `RCPT TO:<path> params`: the address as given,
/// without its brackets (empty for the null sender), and each parameter
/// upper-cased up to its `=`. `None` when the syntax is wrong.
pub fn parse_path(line: &[u8], prefix: &str) -> Option<(String, Vec<String>)> {
    let text = std::str::from_utf8(line).ok()?;
    let head = text.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = text[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let address = &rest[..end];
    if address.contains(['<', ' ', '\r', '\n']) {
        return None;
    }
    // A source route (`<@a,@b:user@c>`) is dropped, as RFC 5321 allows.
    let address = match address.split_once(':') {
        Some((route, addr)) if route.starts_with('@') => addr,
        _ => address,
    };
    let params = rest[end + 1..]
        .split(' ')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => format!("{}={v}", k.to_ascii_uppercase()),
            None => p.to_ascii_uppercase(),
        })
        .collect();
    Some((address.to_string(), params))
}

/// Whether `address` looks like `local@domain` (what a recipient must be).
pub fn is_mailbox(address: &str) -> bool {
    address
        .rsplit_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
}

/// Whether a relay rule lets `sender` through: any, when the list is empty.
pub fn sender_allowed(allowed: &[String], sender: &str) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|a| match a.strip_prefix("*@") {
            Some(domain) => sender
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
            None => a.eq_ignore_ascii_case(sender),
        })
}

/// Keep a device-supplied EHLO name printable and short for our replies.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(*c))
        .take(MAX_ECHOED_NAME)
        .collect();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

/// A line oxbridge sends the upstream server.
pub enum Request<'a> {
    Ehlo(&'a str),
    StartTls,
    /// `AUTH XOAUTH2` with the base64 initial response (a secret).
    AuthXoauth2(&'a str),
    /// The empty line that answers an XOAUTH2 error challenge.
    Empty,
    MailFrom(&'a str),
    /// `MAIL FROM:<address>` with parameters (a spooled message's).
    MailFromWith(&'a str, &'a [String]),
    RcptTo(&'a str),
    Data,
    Rset,
    Quit,
}

impl Request<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        let text = match self {
            Request::Ehlo(name) => format!("EHLO {name}"),
            Request::StartTls => "STARTTLS".into(),
            Request::AuthXoauth2(ir) => format!("AUTH XOAUTH2 {ir}"),
            Request::Empty => String::new(),
            Request::MailFrom(address) => format!("MAIL FROM:<{address}>"),
            Request::MailFromWith(address, params) => {
                let mut t = format!("MAIL FROM:<{address}>");
                for p in params.iter() {
                    t.push(' ');
                    t.push_str(p);
                }
                t
            }
            Request::RcptTo(address) => format!("RCPT TO:<{address}>"),
            Request::Data => "DATA".into(),
            Request::Rset => "RSET".into(),
            Request::Quit => "QUIT".into(),
        };
        super::line(text.as_bytes())
    }
}

/// A device's command line as it is replayed upstream (a relayed
/// device's MAIL command): the line and CRLF, whatever ended it on the way in.
pub fn replay(line: &[u8]) -> Vec<u8> {
    super::line(line)
}

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
    BadRecipient,
    UnknownParameter,
    TooBig,
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
            Reply::BadRecipient => "501 5.1.3 Bad recipient address syntax",
            Reply::UnknownParameter => "555 5.5.4 Unsupported MAIL or RCPT parameter",
            Reply::TooBig => "552 5.3.4 Message size exceeds fixed maximum message size",
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
        super::line(text.as_bytes())
    }
}

fn text(s: String) -> Vec<u8> {
    super::line(s.as_bytes())
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

pub(super) fn farewell(f: Farewell) -> &'static [u8] {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(
            parse_command(b"ehlo printer.local"),
            Command::Ehlo("printer.local")
        );
        assert_eq!(parse_command(b"HELO  x "), Command::Helo("x"));
        assert_eq!(parse_command(b"EHLO"), Command::Ehlo(""));
        assert_eq!(
            parse_command(b"AUTH plain AGEAYg=="),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some(b"AGEAYg==")
            }
        );
        assert_eq!(
            parse_command(b"AUTH LOGIN"),
            Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            }
        );
        assert_eq!(parse_command(b"MAIL FROM:<a@b>"), Command::Mail);
        assert_eq!(parse_command(b"BDAT 100 LAST"), Command::Bdat(Some(100)));
        assert_eq!(parse_command(b"BDAT x"), Command::Bdat(None));
        assert_eq!(parse_command(b"STARTTLS"), Command::StartTls);
        assert_eq!(parse_command(b"XYZZY"), Command::Unknown);
        assert_eq!(parse_command(b""), Command::Unknown);
        assert_eq!(parse_command(b"\xff\xfe"), Command::Unknown);
    }

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_reply_line(b"250-SIZE 10"),
            Some((250, false, &b"SIZE 10"[..]))
        );
        assert_eq!(
            parse_reply_line(b"235 2.7.0 ok"),
            Some((235, true, &b"2.7.0 ok"[..]))
        );
        assert_eq!(parse_reply_line(b"334"), Some((334, true, &b""[..])));
        assert_eq!(parse_reply_line(b"25x ok"), None);
        assert_eq!(parse_reply_line(b"250+x"), None);
    }

    #[test]
    fn ehlo_passthrough_and_promises() {
        let reply = ServerReply {
            code: 250,
            lines: [
                "localhost",
                "PIPELINING",
                "SIZE 157286400",
                "ETRN",
                "AUTH XOAUTH2 OAUTHBEARER",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING",
                "STARTTLS",
            ]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect(),
        };
        let kw = ehlo_keywords(&reply);
        let told = passthrough(&kw);
        assert_eq!(
            told,
            [
                "PIPELINING",
                "SIZE 157286400",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING"
            ]
        );
        assert!(promises_hold(&told, &kw));
        assert!(promises_hold(&[], &kw));
        let smaller: Vec<String> = kw.iter().map(|k| k.replace("157286400", "1000")).collect();
        assert!(!promises_hold(&told, &smaller));
        let without_chunking: Vec<String> =
            kw.iter().filter(|k| *k != "CHUNKING").cloned().collect();
        assert!(!promises_hold(&told, &without_chunking));
        assert!(promises_hold(&["SIZE 10".into()], &["SIZE".into()]));
    }

    #[test]
    fn paths_and_parameters() {
        let p = |l: &str, pre| parse_path(l.as_bytes(), pre);
        assert_eq!(
            p(
                "MAIL FROM:<Scan@Contoso.com> body=8bitmime SIZE=10",
                "MAIL FROM:"
            ),
            Some((
                "Scan@Contoso.com".into(),
                vec!["BODY=8bitmime".into(), "SIZE=10".into()]
            ))
        );
        assert_eq!(
            p("mail from: <>", "MAIL FROM:"),
            Some((String::new(), vec![]))
        );
        assert_eq!(
            p("RCPT TO:<@relay.example:bob@b.example>", "RCPT TO:"),
            Some(("bob@b.example".into(), vec![]))
        );
        assert_eq!(p("RCPT TO:bob@b", "RCPT TO:"), None);
        assert_eq!(p("RCPT TO:<a b@c>", "RCPT TO:"), None);
        assert_eq!(p("MAIL FROM:<a@b>", "RCPT TO:"), None);
        assert!(is_mailbox("a@b") && !is_mailbox("postmaster") && !is_mailbox("@b"));
    }

    #[test]
    fn sanitized_names() {
        assert_eq!(sanitize("printer.local"), "printer.local");
        assert_eq!(sanitize("[192.168.1.5]"), "[192.168.1.5]");
        assert_eq!(sanitize("a\r\n250 fake"), "a250fake");
        assert_eq!(sanitize(""), "unknown");
    }
}
