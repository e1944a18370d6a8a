//! SMTP on the wire: the device's commands, the upstream's replies, and
//! every line oxbridge itself writes in SMTP, worded in one table
//! ([`Reply`] towards devices, [`Request`] towards the upstream).
//!
//! What the device is told in EHLO is taken from the upstream's own EHLO
//! ([`passthrough`]), so that it stays true once the bytes are relayed;
//! [`promises_hold`] says whether an upstream session still honours it.

#[path = "smtp_reply.rs"]
mod reply;
#[path = "smtp_stream.rs"]
pub mod stream;

pub use reply::*;

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

/// The sender of `MAIL FROM:<path> params` as a server reads it,
/// lower-cased: empty for the null sender, else a plain mailbox (after a
/// source route, if any), followed by nothing or by parameters. Old
/// devices' `MAIL FROM:addr` without brackets is read too. `None` where a
/// server could read another sender (a quoted local part, text glued to
/// the `>`), or for no MAIL at all.
pub fn mail_sender(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text
        .get(..10)
        .filter(|p| p.eq_ignore_ascii_case("MAIL FROM:"))
        .map(|_| text[10..].trim_start_matches(' '))?;
    let (path, after) = match rest.strip_prefix('<') {
        Some(r) => r.split_once('>')?,
        None => rest.split_at(rest.find(' ').unwrap_or(rest.len())),
    };
    if !(after.is_empty() || after.starts_with(' ')) {
        return None;
    }
    let address = match path.split_once(':') {
        Some((route, address)) if route.starts_with('@') => address,
        _ => path,
    };
    if !address.is_empty() {
        crate::mailbox::Mailbox::parse(address).ok()?;
    }
    Some(address.to_lowercase())
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
/// Where the list applies, only a plain mailbox can match: a quoted local
/// part could hide another domain behind the `@` found here.
pub fn sender_allowed(allowed: &[String], sender: &str) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Ok(sender) = crate::mailbox::Mailbox::parse(sender) else {
        return false;
    };
    allowed.iter().any(|a| match a.strip_prefix("*@") {
        Some(domain) => sender.in_domain(domain),
        None => a.eq_ignore_ascii_case(&sender),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_is_read_as_a_server_reads_it() {
        let read = |l: &str| mail_sender(l.as_bytes());
        assert_eq!(
            read("MAIL FROM:<Scan@X.test> SIZE=9").as_deref(),
            Some("scan@x.test")
        );
        assert_eq!(
            read("mail from: <scan@x.test>").as_deref(),
            Some("scan@x.test")
        );
        assert_eq!(
            read("MAIL FROM:scan@x.test SIZE=9").as_deref(),
            Some("scan@x.test")
        );
        assert_eq!(
            read("MAIL FROM:<@relay.test:scan@x.test>").as_deref(),
            Some("scan@x.test")
        );
        assert_eq!(read("MAIL FROM:<>").as_deref(), Some(""));
        for hostile in [
            "MAIL FROM:<\"scan@x.test>\"@evil.test>",
            "MAIL FROM:<scan@x.test>\"@evil.test>",
            "MAIL FROM:<scan@x.test",
            "MAIL FROM:\"scan@x.test\"@evil.test",
            "RCPT TO:<scan@x.test>",
        ] {
            assert_eq!(read(hostile), None, "{hostile}");
        }
    }

    #[test]
    fn only_a_plain_mailbox_matches_a_sender_list() {
        let allowed = ["*@x.test".to_string(), "scan@y.test".to_string()];
        assert!(sender_allowed(&allowed, "a@X.test"));
        assert!(sender_allowed(&allowed, "SCAN@y.test"));
        for hostile in [
            "\"scan@x.test",
            "a\"@x.test",
            "a\\@x.test",
            "a@x.test\u{1}",
            "a@b@x.test",
            "",
        ] {
            assert!(!sender_allowed(&allowed, hostile), "{hostile:?}");
        }
        assert!(sender_allowed(&[], "\"anything"));
    }

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
