//! IMAP, both sides of the login.
//!
//! Device side ([`preauth`]): greeting with a CAPABILITY code, CAPABILITY,
//! NOOP, LOGOUT, STARTTLS, ID, LOGIN (atoms, quoted strings with `\"` and
//! `\\`, synchronising `{n}` and non-synchronising `{n+}` literals) and
//! AUTHENTICATE PLAIN (with or without SASL-IR). Anything else gets a tagged
//! `BAD` before login. Upstream side ([`dial`], [`auth_xoauth2`]): implicit
//! TLS, greeting, `AUTHENTICATE XOAUTH2` (SASL-IR when offered), the error
//! challenge answered with an empty line, then the capabilities after login,
//! which the device gets in its tagged `OK` (without `AUTH=`).
//!
//! Parsing is plain functions over bytes: [`literal_suffix`] says whether a
//! line announces a literal, [`parse_command`] splits a whole command
//! (literals inline) into tag, name and arguments.

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::accounts::Identity;
use crate::config::Protocol;
use crate::error::AuthError;
use crate::line::{Conn, LineError};
use crate::proto::{self, Device, Preauth, Upstream};
use crate::sasl;
use crate::server::Listener;
use crate::upstream::{self, printable, MAX_REPLY_LINE, MAX_REPLY_LINES, REPLY_TIMEOUT};
use crate::App;
use std::net::SocketAddr;

/// Largest literal accepted before login (a user name or password).
pub const MAX_LITERAL: u64 = 8 * 1024;
/// Largest whole command (lines and literals) before login.
pub const MAX_COMMAND: usize = 16 * 1024;
/// Commands a device may send before it logs in.
pub const MAX_PREAUTH_COMMANDS: usize = 100;
/// Bad commands before the connection is closed.
pub const MAX_ERRORS: usize = 10;
/// Failed logins on one connection before it is closed.
pub const MAX_AUTH_FAILURES: usize = 3;
/// A literal in an upstream response before login is skipped up to this size.
const MAX_UPSTREAM_LITERAL: u64 = 64 * 1024;
/// The tag oxbridge uses for its own commands upstream.
const TAG: &str = "oxb1";

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

/// What a tagged reply to our command says.
fn tagged(line: &[u8]) -> Option<(&str, String)> {
    let rest = line.strip_prefix(TAG.as_bytes())?.strip_prefix(b" ")?;
    let text = printable(rest);
    let status = match text.split(' ').next()? {
        s if s.eq_ignore_ascii_case("OK") => "OK",
        s if s.eq_ignore_ascii_case("NO") => "NO",
        s if s.eq_ignore_ascii_case("BAD") => "BAD",
        _ => return None,
    };
    Some((status, text))
}

/// Read one upstream response line before login; a literal at its end is
/// skipped (bounded), so the next line starts where it should.
async fn read_response(conn: &mut Conn) -> Result<Vec<u8>, AuthError> {
    let line = conn
        .read_line(MAX_REPLY_LINE, REPLY_TIMEOUT)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("reading response: {e}")))?;
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

async fn send(conn: &mut Conn, data: &[u8]) -> Result<(), AuthError> {
    conn.send(data, REPLY_TIMEOUT)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("sending: {e}")))
}

/// Connect to `[upstream].imap` with TLS and read the greeting; returns the
/// capabilities it announced (asking for them if it did not).
pub async fn dial(app: &App) -> Result<(Conn, Vec<String>), AuthError> {
    let addr = app.config.upstream.imap.as_str();
    let mut conn = upstream::connect_tls(&app.upstream_tls, addr).await?;
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
    send(&mut conn, format!("{TAG} CAPABILITY\r\n").as_bytes()).await?;
    let mut caps = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let line = read_response(&mut conn).await?;
        if let Some(c) = capabilities_in(&line) {
            caps = c;
        }
        if let Some((status, text)) = tagged(&line) {
            if status != "OK" {
                return Err(AuthError::UpstreamUnavailable(format!(
                    "CAPABILITY: {text}"
                )));
            }
            return Ok((conn, caps));
        }
    }
    Err(AuthError::UpstreamUnavailable(
        "CAPABILITY: too many lines".into(),
    ))
}

/// `AUTHENTICATE XOAUTH2` on an upstream connection; returns the
/// capabilities after login.
pub async fn auth_xoauth2(
    conn: &mut Conn,
    mailbox: &str,
    token: &SecretString,
    greeting_caps: &[String],
) -> Result<Vec<String>, AuthError> {
    let ir = sasl::xoauth2(mailbox, token);
    let sasl_ir = greeting_caps
        .iter()
        .any(|c| c.eq_ignore_ascii_case("SASL-IR"));
    let mut pending_ir = !sasl_ir;
    if sasl_ir {
        send(
            conn,
            format!("{TAG} AUTHENTICATE XOAUTH2 {}\r\n", ir.expose_secret()).as_bytes(),
        )
        .await?;
    } else {
        send(conn, format!("{TAG} AUTHENTICATE XOAUTH2\r\n").as_bytes()).await?;
    }
    let mut challenge = None;
    let mut caps = None;
    for _ in 0..MAX_REPLY_LINES {
        let line = read_response(conn).await?;
        if line.starts_with(b"+") {
            if pending_ir {
                pending_ir = false;
                send(conn, format!("{}\r\n", ir.expose_secret()).as_bytes()).await?;
            } else if challenge.is_none() {
                // The error challenge: answer with an empty line for the final NO.
                challenge = Some(
                    sasl::xoauth2_error_status(line.get(2..).unwrap_or_default())
                        .unwrap_or_default(),
                );
                send(conn, b"\r\n").await?;
            } else {
                send(conn, b"*\r\n").await?;
            }
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
                None => post_login_capabilities(conn).await,
            },
            "NO" if text.contains("[UNAVAILABLE]") => Err(AuthError::UpstreamTemporary(detail)),
            _ => Err(AuthError::UpstreamRefused(detail)),
        };
    }
    Err(AuthError::UpstreamUnavailable(
        "AUTHENTICATE: too many lines".into(),
    ))
}

async fn post_login_capabilities(conn: &mut Conn) -> Result<Vec<String>, AuthError> {
    send(conn, format!("{TAG} CAPABILITY\r\n").as_bytes()).await?;
    let mut caps = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let line = read_response(conn).await?;
        if let Some(c) = capabilities_in(&line) {
            caps = c;
        }
        if tagged(&line).is_some() {
            return Ok(caps);
        }
    }
    Err(AuthError::UpstreamUnavailable(
        "CAPABILITY: too many lines".into(),
    ))
}

impl AuthError {
    /// The tagged IMAP reply to the device's LOGIN or AUTHENTICATE.
    pub fn imap_reply(&self, tag: &str) -> String {
        let text = match self {
            AuthError::BadCredentials(_) => "NO [AUTHENTICATIONFAILED] Authentication failed",
            AuthError::TokenRefused(_) => "NO [AUTHENTICATIONFAILED] Authentication failed: no access token for this account",
            AuthError::UpstreamRefused(_) => {
                "NO [AUTHENTICATIONFAILED] Authentication failed: the mail server refused the access token"
            }
            AuthError::TokenUnavailable(_) => "NO [UNAVAILABLE] Temporary authentication failure: token service unavailable",
            AuthError::UpstreamUnavailable(_) => "NO [UNAVAILABLE] Mail server unavailable, try again later",
            AuthError::UpstreamTemporary(_) => "NO [UNAVAILABLE] Temporary authentication failure at the mail server",
            AuthError::Busy(_) => "NO [UNAVAILABLE] Too many sessions for this mailbox at once, try again later",
            AuthError::Throttled(_) => "NO [UNAVAILABLE] Too many failed logins; try again later",
        };
        format!("{tag} {text}\r\n")
    }
}

/// How reading one command ended.
enum Read {
    Command(Vec<u8>),
    /// A reply has been sent already (BAD); read the next command.
    Rejected,
}

struct Session<'a> {
    app: &'a App,
    dev: Device<'a>,
}

impl<'a> std::ops::Deref for Session<'a> {
    type Target = Device<'a>;
    fn deref(&self) -> &Device<'a> {
        &self.dev
    }
}

impl std::ops::DerefMut for Session<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.dev
    }
}

impl Session<'_> {
    fn capabilities(&self) -> String {
        let mut caps = vec!["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"];
        if self.starttls_offered() {
            caps.push("STARTTLS");
        }
        if self.auth_allowed() {
            caps.push("AUTH=PLAIN");
        } else {
            caps.push("LOGINDISABLED");
        }
        caps.join(" ")
    }

    /// Read one command, literals included, bounded in size and time.
    async fn read_command(&mut self) -> Result<Read, LineError> {
        let mut command = Vec::new();
        loop {
            let line = match self.read_line().await {
                Ok(l) => l,
                Err(LineError::TooLong(_)) => {
                    let _ = self.reply("* BAD Command line too long\r\n").await;
                    return Ok(Read::Rejected);
                }
                Err(e) => return Err(e),
            };
            command.extend_from_slice(&line);
            let Some((n, sync)) = literal_suffix(&line) else {
                return Ok(Read::Command(command));
            };
            if n > MAX_LITERAL || command.len() as u64 + n > MAX_COMMAND as u64 {
                let tag =
                    String::from_utf8_lossy(command.split(|b| *b == b' ').next().unwrap_or(b"*"))
                        .into_owned();
                if sync {
                    // The client waits for "+": it will not send the data.
                    let _ = self
                        .reply(&format!("{tag} BAD Literal too large\r\n"))
                        .await;
                    return Ok(Read::Rejected);
                }
                // LITERAL+: the data is on its way and would be read as commands.
                let _ = self.reply("* BYE Literal too large\r\n").await;
                return Err(LineError::TooLong(MAX_LITERAL as usize));
            }
            if sync {
                let _ = self.reply("+ Ready for literal data\r\n").await;
            }
            command.extend_from_slice(b"\r\n");
            let wait = self.timeout;
            let data = self.conn.read_exact(n as usize, wait).await?;
            command.extend_from_slice(&data);
        }
    }

    async fn login(
        &mut self,
        tag: &str,
        creds: sasl::Credentials,
    ) -> Result<Option<(Upstream, Identity)>, &'static str> {
        match proto::login(self.app, Protocol::Imap, creds, "", self.peer).await {
            Ok((up, id)) => {
                let caps = device_capabilities(&up.capabilities).join(" ");
                self.reply(&format!("{tag} OK [CAPABILITY {caps}] Logged in\r\n"))
                    .await?;
                Ok(Some((up, id)))
            }
            Err(e) => {
                self.auth_failures += 1;
                self.reply(&e.imap_reply(tag)).await?;
                Ok(None)
            }
        }
    }
}

/// Serve a device until it has logged in upstream or the session ends.
pub async fn preauth(
    app: &App,
    listener: &Listener,
    conn: Conn,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Preauth {
    let s = Session {
        app,
        dev: Device::new(conn, listener, peer, &app.config.limits),
    };
    run(s, &shutdown).await.unwrap_or_else(Preauth::Closed)
}

async fn run(mut s: Session<'_>, shutdown: &CancellationToken) -> Result<Preauth, &'static str> {
    let greeting = format!("* OK [CAPABILITY {}] oxbridge ready\r\n", s.capabilities());
    s.reply(&greeting).await?;
    for _ in 0..MAX_PREAUTH_COMMANDS {
        if s.errors >= MAX_ERRORS {
            s.reply("* BYE Too many errors\r\n").await?;
            return Ok(Preauth::Closed("too many errors"));
        }
        if s.auth_failures >= MAX_AUTH_FAILURES {
            s.reply("* BYE Too many failed logins\r\n").await?;
            return Ok(Preauth::Closed("too many failed logins"));
        }
        let read = tokio::select! {
            r = s.read_command() => r,
            _ = shutdown.cancelled() => {
                s.reply("* BYE [UNAVAILABLE] Server shutting down\r\n").await?;
                return Ok(Preauth::Closed("shutdown"));
            }
        };
        let raw = match read {
            Ok(Read::Command(c)) => c,
            Ok(Read::Rejected) => {
                s.errors += 1;
                continue;
            }
            Err(LineError::Timeout(_)) => {
                s.reply("* BYE Autologout; idle for too long\r\n").await?;
                return Ok(Preauth::Closed("idle timeout"));
            }
            Err(LineError::TooLong(_)) => return Ok(Preauth::Closed("literal too large")),
            Err(e) => return Ok(Preauth::Closed(e.reason())),
        };
        let cmd = match parse_command(&raw) {
            Ok(c) => c,
            Err(ParseError::Tag) => {
                s.errors += 1;
                s.reply("* BAD Invalid tag\r\n").await?;
                continue;
            }
            Err(e) => {
                s.errors += 1;
                let tag = String::from_utf8_lossy(raw.split(|b| *b == b' ').next().unwrap_or(b"*"))
                    .into_owned();
                s.reply(&format!("{tag} BAD {e}\r\n")).await?;
                continue;
            }
        };
        let tag = cmd.tag.as_str();
        match cmd.name.as_str() {
            "CAPABILITY" => {
                let r = format!(
                    "* CAPABILITY {}\r\n{tag} OK Capability completed\r\n",
                    s.capabilities()
                );
                s.reply(&r).await?
            }
            "NOOP" => s.reply(&format!("{tag} OK NOOP completed\r\n")).await?,
            "ID" => {
                s.reply(&format!(
                    "* ID (\"name\" \"oxbridge\")\r\n{tag} OK ID completed\r\n"
                ))
                .await?
            }
            "LOGOUT" => {
                s.reply(&format!(
                    "* BYE Logging out\r\n{tag} OK Logout completed\r\n"
                ))
                .await?;
                return Ok(Preauth::Closed("logout"));
            }
            "STARTTLS" if s.starttls_offered() => {
                s.reply(&format!("{tag} OK Begin TLS negotiation now\r\n"))
                    .await?;
                s.start_tls().await?;
            }
            "STARTTLS" => {
                s.errors += 1;
                s.reply(&format!("{tag} BAD STARTTLS not available\r\n"))
                    .await?
            }
            "LOGIN" | "AUTHENTICATE" if !s.auth_allowed() => {
                s.reply(&format!(
                    "{tag} NO [PRIVACYREQUIRED] Login is disabled without TLS\r\n"
                ))
                .await?
            }
            "LOGIN" => {
                let (user, pass) = match cmd.args.as_slice() {
                    [u, p] => (u.astring(), p.astring()),
                    _ => (None, None),
                };
                let creds = match (user, pass) {
                    (Some(u), Some(p)) => match (sasl::utf8(u), sasl::utf8(p)) {
                        (Ok(login), Ok(password)) if !login.is_empty() => Some(sasl::Credentials {
                            login,
                            password: SecretString::from(password),
                        }),
                        _ => None,
                    },
                    _ => None,
                };
                let Some(creds) = creds else {
                    s.errors += 1;
                    s.reply(&format!(
                        "{tag} BAD LOGIN expects a user name and a password\r\n"
                    ))
                    .await?;
                    continue;
                };
                if let Some((up, id)) = s.login(tag, creds).await? {
                    return Ok(Preauth::relay(s.dev.conn, up, &id));
                }
            }
            "AUTHENTICATE" => {
                let mech = cmd
                    .args
                    .first()
                    .and_then(Arg::astring)
                    .map(|m| m.to_ascii_uppercase());
                if mech.as_deref() != Some(b"PLAIN".as_slice()) {
                    s.reply(&format!(
                        "{tag} NO Unsupported authentication mechanism; use PLAIN\r\n"
                    ))
                    .await?;
                    continue;
                }
                let initial = cmd.args.get(1).and_then(Arg::astring).map(<[u8]>::to_vec);
                let canceled = format!("{tag} BAD Authentication canceled\r\n");
                let undecodable =
                    format!("{tag} BAD Cannot decode the authentication exchange\r\n");
                let creds =
                    s.plain_credentials(initial.as_deref(), "+ \r\n", &canceled, &undecodable);
                let Some(creds) = creds.await? else {
                    continue;
                };
                if let Some((up, id)) = s.login(tag, creds).await? {
                    return Ok(Preauth::relay(s.dev.conn, up, &id));
                }
            }
            _ => {
                s.errors += 1;
                s.reply(&format!("{tag} BAD Command not available before login\r\n"))
                    .await?
            }
        }
    }
    s.reply("* BYE Too many commands without logging in\r\n")
        .await?;
    Ok(Preauth::Closed("too many commands"))
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

    #[test]
    fn replies_never_name_secrets() {
        let e = AuthError::TokenRefused("invalid_grant: AADSTS50126".into());
        assert_eq!(
            e.imap_reply("a1"),
            "a1 NO [AUTHENTICATIONFAILED] Authentication failed: no access token for this account\r\n"
        );
    }
}
