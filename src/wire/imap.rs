//! IMAP on the wire before login: the device's commands (tag, name,
//! arguments, literals inline) and the [`Receiver`] that assembles them,
//! asking for a literal's bytes instead of reading them itself; the
//! upstream's capability and tagged lines. Every line oxbridge itself
//! writes in IMAP is in one table, in `imap_reply` ([`Reply`], [`Request`]).

pub(super) use super::imap_reply::farewell;
pub use super::imap_reply::{Reply, Request, TAG};
use super::CRLF;

/// Largest literal accepted before login (a user name or password).
pub const MAX_LITERAL: u64 = 8 * 1024;
/// Largest whole command (lines and literals) before login.
pub const MAX_COMMAND: usize = 16 * 1024;
/// The capabilities oxbridge offers before login, in this order; then
/// STARTTLS where it is offered, and AUTH=PLAIN or LOGINDISABLED.
const PREAUTH_CAPABILITIES: [&str; 4] = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"];

/// A literal announced at the end of a line: `{n}` (synchronising) or
/// `{n+}` (LITERAL+). Returns the size and whether the client waits for `+`.
pub fn literal_suffix(line: &[u8]) -> Option<(u64, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let spec = &inner[open + 1..];
    let (digits, sync) = match spec.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (spec, true),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, sync))
}

/// One argument of a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Arg {
    Atom(Vec<u8>),
    /// A quoted string (unescaped) or a literal.
    Str(Vec<u8>),
    /// A parenthesised list, not looked into (ID's parameters).
    List,
}

impl Arg {
    /// The value of an astring (atom, quoted string or literal).
    pub fn astring(&self) -> Option<&[u8]> {
        match self {
            Arg::Atom(a) | Arg::Str(a) => Some(a),
            Arg::List => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Command {
    pub tag: String,
    /// Upper-cased.
    pub name: String,
    pub args: Vec<Arg>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("missing or invalid tag")]
    Tag,
    #[error("{0}")]
    Syntax(&'static str),
}

/// Whether a word is a tag a server answers with (RFC 3501 `tag`: one or
/// more ASTRING-CHARs other than `+`).
pub fn is_tag(word: &[u8]) -> bool {
    !word.is_empty()
        && word
            .iter()
            .all(|b| *b > b' ' && *b < 0x7f && !b"(){%*\"\\+".contains(b))
}

fn is_atom_char(b: u8) -> bool {
    b > b' ' && b < 0x7f && !b"(){%*\"\\]".contains(&b)
}

/// Parse a whole command: `tag SP name [SP args]`, with any literals inline
/// (`{n}` CRLF and then n bytes), as the reader assembled it.
pub fn parse_command(input: &[u8]) -> Result<Command, ParseError> {
    let mut p = 0;
    let word = |p: &mut usize| {
        let start = *p;
        while *p < input.len() && is_atom_char(input[*p]) {
            *p += 1;
        }
        &input[start..*p]
    };
    let tag = word(&mut p);
    if tag.is_empty() || tag.contains(&b'+') || input.get(p) != Some(&b' ') {
        return Err(ParseError::Tag);
    }
    let tag = String::from_utf8_lossy(tag).into_owned();
    p += 1;
    let name = word(&mut p);
    if name.is_empty() {
        return Err(ParseError::Syntax("missing command"));
    }
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let mut args = Vec::new();
    while p < input.len() {
        if input[p] != b' ' {
            return Err(ParseError::Syntax("expected a space between arguments"));
        }
        p += 1;
        let arg = match input.get(p) {
            None => return Err(ParseError::Syntax("trailing space")),
            Some(b'"') => {
                p += 1;
                let mut s = Vec::new();
                loop {
                    match input.get(p) {
                        None | Some(b'\r') | Some(b'\n') => {
                            return Err(ParseError::Syntax("unterminated quoted string"))
                        }
                        Some(b'"') => break,
                        Some(b'\\') => match input.get(p + 1) {
                            Some(c @ (b'"' | b'\\')) => {
                                s.push(*c);
                                p += 1;
                            }
                            _ => return Err(ParseError::Syntax("bad escape in quoted string")),
                        },
                        Some(c) => s.push(*c),
                    }
                    p += 1;
                }
                p += 1;
                Arg::Str(s)
            }
            Some(b'{') => {
                let close = input[p..]
                    .iter()
                    .position(|b| *b == b'}')
                    .ok_or(ParseError::Syntax("bad literal"))?;
                let (n, _) = literal_suffix(&input[p..=p + close])
                    .ok_or(ParseError::Syntax("bad literal"))?;
                p += close + 1;
                if input.get(p..p + 2) != Some(b"\r\n") {
                    return Err(ParseError::Syntax("literal must end its line"));
                }
                p += 2;
                let n = usize::try_from(n).map_err(|_| ParseError::Syntax("literal too large"))?;
                let data = input
                    .get(p..p + n)
                    .ok_or(ParseError::Syntax("literal shorter than announced"))?;
                p += n;
                Arg::Str(data.to_vec())
            }
            Some(b'(') => {
                let mut depth = 0usize;
                loop {
                    match input.get(p) {
                        None => return Err(ParseError::Syntax("unbalanced parentheses")),
                        Some(b'(') => depth += 1,
                        Some(b')') => {
                            depth -= 1;
                            if depth == 0 {
                                p += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    p += 1;
                }
                Arg::List
            }
            Some(_) => {
                let start = p;
                while p < input.len() && input[p] != b' ' {
                    // Lenient: ']' (astring) and a backslash (the login\shared form, sent
                    // unquoted by imaplib and others) are taken as atom characters.
                    if !is_atom_char(input[p]) && input[p] != b']' && input[p] != b'\\' {
                        return Err(ParseError::Syntax("invalid character in atom"));
                    }
                    p += 1;
                }
                if p == start {
                    return Err(ParseError::Syntax("empty argument"));
                }
                Arg::Atom(input[start..p].to_vec())
            }
        };
        args.push(arg);
    }
    Ok(Command { tag, name, args })
}

/// The `[CAPABILITY ...]` response code in a line, or a `* CAPABILITY` line.
pub fn capabilities_in(line: &[u8]) -> Option<Vec<String>> {
    let text = String::from_utf8_lossy(line);
    let list = if let Some(rest) = text.strip_prefix("* CAPABILITY ") {
        rest.to_string()
    } else {
        let start = text.find("[CAPABILITY ")? + "[CAPABILITY ".len();
        let end = text[start..].find(']')? + start;
        text[start..end].to_string()
    };
    Some(list.split_whitespace().map(String::from).collect())
}

/// Capabilities the device may be told after login: the upstream's, less
/// what belongs to the login itself.
pub fn device_capabilities(upstream: &[String]) -> Vec<String> {
    upstream
        .iter()
        .filter(|c| {
            let u = c.to_ascii_uppercase();
            !(u.starts_with("AUTH=") || u == "LOGINDISABLED" || u == "STARTTLS" || u == "SASL-IR")
        })
        .cloned()
        .collect()
}

/// The tag of a command line for a reply to it: its first word when that
/// is a valid tag, else `*`.
pub fn tag_of(command: &[u8]) -> String {
    let word = command.split(|b| *b == b' ').next().unwrap_or_default();
    if !word.is_empty() && !word.contains(&b'+') && word.iter().all(|b| is_atom_char(*b)) {
        String::from_utf8_lossy(word).into_owned()
    } else {
        "*".into()
    }
}

/// What the [`Receiver`] has after a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A whole command, literals inline, for [`parse_command`].
    Command(Vec<u8>),
    /// The line announced a literal of `size` bytes: read them and give
    /// them to [`Receiver::literal`]. With `sync`, the device waits for
    /// [`Reply::LiteralGo`] first.
    Literal { size: usize, sync: bool },
    /// The literal announced is too large; the command is dropped. A `sync`
    /// device sends nothing more of it; a LITERAL+ one already does.
    TooLarge { tag: String, sync: bool },
}

/// Assembles one command from its lines and literals, bounded by
/// [`MAX_LITERAL`] and [`MAX_COMMAND`].
#[derive(Debug, Default)]
pub struct Receiver {
    command: Vec<u8>,
}

impl Receiver {
    /// The next line of the command (without its CRLF).
    pub fn line(&mut self, line: &[u8]) -> Received {
        self.command.extend_from_slice(line);
        match literal_suffix(line) {
            None => Received::Command(std::mem::take(&mut self.command)),
            Some((n, sync))
                if n > MAX_LITERAL || self.command.len() as u64 + n > MAX_COMMAND as u64 =>
            {
                let tag = tag_of(&self.command);
                self.command.clear();
                Received::TooLarge { tag, sync }
            }
            Some((n, sync)) => {
                self.command.extend_from_slice(CRLF);
                Received::Literal {
                    size: n as usize,
                    sync,
                }
            }
        }
    }

    /// The bytes of the literal the last line announced.
    pub fn literal(&mut self, data: &[u8]) {
        self.command.extend_from_slice(data);
    }

    /// Drop a partly received command (its line was too long).
    pub fn reset(&mut self) {
        self.command.clear();
    }
}

/// The capabilities offered before login.
pub fn preauth_capabilities(starttls: bool, auth: bool) -> String {
    let mut caps = PREAUTH_CAPABILITIES.to_vec();
    if starttls {
        caps.push("STARTTLS");
    }
    caps.push(if auth { "AUTH=PLAIN" } else { "LOGINDISABLED" });
    caps.join(" ")
}

/// What a tagged reply to our command says.
pub fn tagged(line: &[u8]) -> Option<(&str, String)> {
    let rest = line.strip_prefix(TAG.as_bytes())?.strip_prefix(b" ")?;
    let text = super::printable(rest);
    let status = match text.split(' ').next()? {
        s if s.eq_ignore_ascii_case("OK") => "OK",
        s if s.eq_ignore_ascii_case("NO") => "NO",
        s if s.eq_ignore_ascii_case("BAD") => "BAD",
        _ => return None,
    };
    Some((status, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atom(s: &str) -> Arg {
        Arg::Atom(s.as_bytes().to_vec())
    }
    fn string(s: &[u8]) -> Arg {
        Arg::Str(s.to_vec())
    }

    #[test]
    fn literal_suffixes() {
        assert_eq!(literal_suffix(b"a LOGIN {5}"), Some((5, true)));
        assert_eq!(literal_suffix(b"a LOGIN joe {12+}"), Some((12, false)));
        assert_eq!(literal_suffix(b"a LOGIN {}"), None);
        assert_eq!(literal_suffix(b"a LOGIN {x}"), None);
        assert_eq!(literal_suffix(b"a LOGIN {5} x"), None);
        assert_eq!(literal_suffix(b"a LOGIN {99999999999999999999}"), None);
    }

    #[test]
    fn login_forms() {
        let c = parse_command(b"a1 LOGIN joe secret").unwrap();
        assert_eq!((c.tag.as_str(), c.name.as_str()), ("a1", "LOGIN"));
        assert_eq!(c.args, [atom("joe"), atom("secret")]);

        let c = parse_command(br#"A2 login "joe@x.test" "pa\"ss\\word with space""#).unwrap();
        assert_eq!(c.name, "LOGIN");
        assert_eq!(
            c.args,
            [string(b"joe@x.test"), string(br#"pa"ss\word with space"#)]
        );

        let c = parse_command(b"a3 LOGIN {8}\r\njoe@x.ts {6+}\r\nse cr\"").unwrap();
        assert_eq!(c.args, [string(b"joe@x.ts"), string(b"se cr\"")]);

        let c = parse_command(b"a5 LOGIN scanner@x.test\\shared@x.test pw").unwrap();
        assert_eq!(c.args, [atom("scanner@x.test\\shared@x.test"), atom("pw")]);

        let c = parse_command(b"a4 LOGIN joe {0}\r\n").unwrap();
        assert_eq!(c.args, [atom("joe"), string(b"")]);
    }

    #[test]
    fn other_commands() {
        let c = parse_command(b"x ID (\"name\" \"mutt\" \"version\" \"2.2\")").unwrap();
        assert_eq!((c.name.as_str(), c.args.len()), ("ID", 1));
        assert_eq!(c.args[0], Arg::List);
        let c = parse_command(b"x AUTHENTICATE PLAIN AGpvZQBzZWNyZXQ=").unwrap();
        assert_eq!(c.args, [atom("PLAIN"), atom("AGpvZQBzZWNyZXQ=")]);
        assert_eq!(parse_command(b"t1 CAPABILITY").unwrap().args, []);
    }

    #[test]
    fn malformed_commands() {
        assert_eq!(parse_command(b"").unwrap_err(), ParseError::Tag);
        assert_eq!(parse_command(b"LOGIN").unwrap_err(), ParseError::Tag);
        assert_eq!(parse_command(b"+ LOGIN a b").unwrap_err(), ParseError::Tag);
        assert!(parse_command(b"a LOGIN \"unterminated").is_err());
        assert!(parse_command(b"a LOGIN \"bad \\n escape\" x").is_err());
        assert!(parse_command(b"a LOGIN {10}\r\nshort").is_err());
        assert!(parse_command(b"a LOGIN {3}x").is_err());
        assert!(parse_command(b"a LOGIN joe  two-spaces").is_err());
        assert!(parse_command(b"a ID (unbalanced").is_err());
        assert!(parse_command(b"a LOGIN jo\x00e x").is_err());
    }

    #[test]
    fn capability_codes() {
        let g = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ LOGINDISABLED AUTH=XOAUTH2 AUTH=OAUTHBEARER] Dovecot (Debian) ready.";
        let caps = capabilities_in(g).unwrap();
        assert!(
            caps.contains(&"SASL-IR".to_string()) && caps.contains(&"AUTH=XOAUTH2".to_string())
        );
        assert_eq!(
            device_capabilities(&caps),
            [
                "IMAP4rev1",
                "LOGIN-REFERRALS",
                "ID",
                "ENABLE",
                "IDLE",
                "LITERAL+"
            ]
        );
        assert_eq!(
            capabilities_in(b"* CAPABILITY IMAP4rev1 IDLE").unwrap(),
            ["IMAP4rev1", "IDLE"]
        );
        assert_eq!(capabilities_in(b"* OK Dovecot ready."), None);
    }

    #[test]
    fn tagged_replies() {
        assert_eq!(tagged(b"oxb1 OK Logged in").map(|t| t.0), Some("OK"));
        assert_eq!(
            tagged(b"oxb1 NO [UNAVAILABLE] Temporary").map(|t| t.0),
            Some("NO")
        );
        assert_eq!(tagged(b"oxb12 OK x"), None);
        assert_eq!(tagged(b"* OK x"), None);
    }
}
