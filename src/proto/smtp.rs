//! SMTP, both sides of the login.
//!
//! Device side ([`preauth`]): greeting, EHLO/HELO, STARTTLS, AUTH PLAIN and
//! AUTH LOGIN (with or without an initial response), RSET/NOOP/HELP/VRFY/
//! QUIT; MAIL, RCPT, DATA and BDAT are refused until the device has logged
//! in. Upstream side ([`dial`], [`auth_xoauth2`]): greeting, EHLO, STARTTLS
//! (mandatory), EHLO, `AUTH XOAUTH2`, including the error-challenge form
//! (`334 <base64 JSON>`, answered with an empty line).
//!
//! What the device is told in EHLO is taken from the upstream's own EHLO
//! (learned by a probe, then from every session), so it stays true once the
//! bytes are relayed; a session whose upstream no longer offers what the
//! device was promised is refused with a temporary error.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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

/// Commands a device may send before it authenticates.
pub const MAX_PREAUTH_COMMANDS: usize = 100;
/// Unrecognised or malformed commands before the connection is closed.
pub const MAX_ERRORS: usize = 10;
/// Failed logins on one connection before it is closed.
pub const MAX_AUTH_FAILURES: usize = 3;
/// A BDAT chunk sent before authentication is read and dropped up to this size.
pub const MAX_PREAUTH_BDAT: u64 = 1024 * 1024;
/// After a failed probe, devices are offered no extensions for this long
/// before the next probe.
pub const CAPS_PROBE_RETRY: Duration = Duration::from_secs(60);
/// The longest a device's EHLO waits for the probe.
pub const PROBE_WAIT: Duration = Duration::from_secs(5);
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

/// A complete (possibly multi-line) server reply.
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<Vec<u8>>,
}

impl Reply {
    /// The reply as one printable line for the log.
    pub fn summary(&self) -> String {
        let first = self.lines.first().map(|l| printable(l)).unwrap_or_default();
        format!("{} {}", self.code, first)
    }
}

/// Read one reply from the upstream, bounded in line length, line count and time.
pub async fn read_reply(conn: &mut Conn) -> Result<Reply, AuthError> {
    let mut lines = Vec::new();
    loop {
        let line = conn
            .read_line(MAX_REPLY_LINE, REPLY_TIMEOUT)
            .await
            .map_err(|e| AuthError::UpstreamUnavailable(format!("reading reply: {e}")))?;
        let (code, last, text) = parse_reply_line(&line).ok_or_else(|| {
            AuthError::UpstreamUnavailable(format!("malformed reply {:?}", printable(&line)))
        })?;
        lines.push(text.to_vec());
        if last {
            return Ok(Reply { code, lines });
        }
        if lines.len() >= MAX_REPLY_LINES {
            return Err(AuthError::UpstreamUnavailable(
                "reply has too many lines".into(),
            ));
        }
    }
}

async fn command(conn: &mut Conn, line: &str) -> Result<Reply, AuthError> {
    conn.send(line.as_bytes(), REPLY_TIMEOUT)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("sending: {e}")))?;
    read_reply(conn).await
}

/// `oxbridge check`, after login: would the server take mail from the
/// mailbox? `MAIL FROM`, then `RSET` and `QUIT`; nothing is sent.
pub async fn check_sender(conn: &mut Conn, mailbox: &str) -> Result<(), AuthError> {
    let reply = command(conn, &format!("MAIL FROM:<{mailbox}>\r\n")).await?;
    let result = match reply.code {
        200..=299 => Ok(()),
        400..=499 => Err(AuthError::UpstreamTemporary(reply.summary())),
        _ => Err(AuthError::UpstreamRefused(reply.summary())),
    };
    let _ = command(conn, "RSET\r\n").await;
    let _ = command(conn, "QUIT\r\n").await;
    result
}

/// The EHLO keyword lines of a reply (all lines but the first), keyword upper-cased.
pub fn ehlo_keywords(reply: &Reply) -> Vec<String> {
    reply
        .lines
        .iter()
        .skip(1)
        .map(|l| {
            let l = printable(l);
            match l.split_once(' ') {
                Some((k, rest)) => format!("{} {}", k.to_ascii_uppercase(), rest),
                None => l.to_ascii_uppercase(),
            }
        })
        .collect()
}

fn keyword(line: &str) -> &str {
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

/// The upstream's EHLO keywords as last seen, shared by all SMTP sessions.
#[derive(Default)]
pub struct CapsCache {
    inner: tokio::sync::Mutex<CapsState>,
}

#[derive(Default)]
struct CapsState {
    keywords: Option<Vec<String>>,
    last_failed_probe: Option<Instant>,
}

impl CapsCache {
    /// Keywords to offer the device: the last known upstream EHLO, probing
    /// once if nothing is known (not more than once a minute on failure).
    pub async fn get(&self, app: &App) -> Vec<String> {
        let mut state = self.inner.lock().await;
        if let Some(k) = &state.keywords {
            return passthrough(k);
        }
        if state
            .last_failed_probe
            .is_some_and(|t| t.elapsed() < CAPS_PROBE_RETRY)
        {
            return Vec::new();
        }
        let probed = tokio::time::timeout(PROBE_WAIT, probe(app))
            .await
            .unwrap_or_else(|_| {
                Err(AuthError::UpstreamUnavailable(format!(
                    "no EHLO within {PROBE_WAIT:?}"
                )))
            });
        match probed {
            Ok(k) => {
                let offered = passthrough(&k);
                state.keywords = Some(k);
                offered
            }
            Err(e) => {
                warn!(error = %e, "upstream SMTP probe failed; offering devices no SMTP extensions until it answers");
                state.last_failed_probe = Some(Instant::now());
                Vec::new()
            }
        }
    }

    pub async fn update(&self, keywords: &[String]) {
        self.inner.lock().await.keywords = Some(keywords.to_vec());
    }
}

/// Learn the upstream's EHLO without logging in.
pub async fn probe(app: &App) -> Result<Vec<String>, AuthError> {
    let (mut conn, keywords) = dial(app, "oxbridge").await?;
    let _ = conn.send(b"QUIT\r\n", REPLY_TIMEOUT).await;
    Ok(keywords)
}

/// Connect to `[upstream].smtp`: greeting, EHLO, STARTTLS, EHLO. Returns
/// the TLS connection and the keywords of the second EHLO.
pub async fn dial(app: &App, ehlo_name: &str) -> Result<(Conn, Vec<String>), AuthError> {
    let addr = app.config.upstream.smtp.as_str();
    let mut conn = upstream::connect_plain(addr).await?;
    let greeting = read_reply(&mut conn).await?;
    if greeting.code != 220 {
        return Err(AuthError::UpstreamUnavailable(format!(
            "greeting: {}",
            greeting.summary()
        )));
    }
    let ehlo = command(&mut conn, &format!("EHLO {ehlo_name}\r\n")).await?;
    if ehlo.code != 250 {
        return Err(AuthError::UpstreamUnavailable(format!(
            "EHLO: {}",
            ehlo.summary()
        )));
    }
    if !ehlo_keywords(&ehlo)
        .iter()
        .any(|k| keyword(k) == "STARTTLS")
    {
        return Err(AuthError::UpstreamUnavailable(format!(
            "{addr} does not offer STARTTLS; oxbridge never logs in without TLS"
        )));
    }
    let starttls = command(&mut conn, "STARTTLS\r\n").await?;
    if starttls.code != 220 {
        return Err(AuthError::UpstreamUnavailable(format!(
            "STARTTLS: {}",
            starttls.summary()
        )));
    }
    upstream::start_tls(&app.upstream_tls, addr, &mut conn).await?;
    let ehlo = command(&mut conn, &format!("EHLO {ehlo_name}\r\n")).await?;
    if ehlo.code != 250 {
        return Err(AuthError::UpstreamUnavailable(format!(
            "EHLO after STARTTLS: {}",
            ehlo.summary()
        )));
    }
    Ok((conn, ehlo_keywords(&ehlo)))
}

/// `AUTH XOAUTH2` on an upstream connection.
pub async fn auth_xoauth2(
    conn: &mut Conn,
    mailbox: &str,
    token: &SecretString,
) -> Result<(), AuthError> {
    use secrecy::ExposeSecret;
    let ir = sasl::xoauth2(mailbox, token);
    let mut reply = command(conn, &format!("AUTH XOAUTH2 {}\r\n", ir.expose_secret())).await?;
    let mut challenge = None;
    if reply.code == 334 {
        // The error challenge: base64 JSON; answer with an empty line to get
        // the final reply.
        challenge = reply
            .lines
            .first()
            .and_then(|l| sasl::xoauth2_error_status(l));
        reply = command(conn, "\r\n").await?;
    }
    let detail = || match &challenge {
        Some(status) => format!("{} (XOAUTH2 status {status})", reply.summary()),
        None => reply.summary(),
    };
    match reply.code {
        235 => Ok(()),
        400..=499 => Err(AuthError::UpstreamTemporary(detail())),
        500..=599 => Err(AuthError::UpstreamRefused(detail())),
        _ => Err(AuthError::UpstreamUnavailable(format!(
            "unexpected AUTH reply {}",
            detail()
        ))),
    }
}

struct Session<'a> {
    app: &'a App,
    dev: Device<'a>,
    helo: Option<String>,
    /// EHLO keywords the device was told (what the upstream must honour).
    told: Vec<String>,
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

const R_OK: &str = "250 2.0.0 OK\r\n";

impl Session<'_> {
    async fn ehlo(&mut self, name: &str) -> Result<(), &'static str> {
        self.told = self.app.smtp_caps.get(self.app).await;
        let mut lines = vec![format!("{} Hello {}", self.app.hostname, sanitize(name))];
        lines.extend(self.told.iter().cloned());
        if self.starttls_offered() {
            lines.push("STARTTLS".into());
        }
        if self.auth_allowed() {
            lines.push("AUTH PLAIN LOGIN".into());
            lines.push("AUTH=PLAIN LOGIN".into());
        }
        let mut out = String::new();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("250{sep}{l}\r\n"));
        }
        self.helo = Some(sanitize(name));
        self.reply(&out).await
    }

    async fn credentials(
        &mut self,
        mechanism: &str,
        initial: Option<&[u8]>,
    ) -> Result<Result<sasl::Credentials, sasl::SaslError>, &'static str> {
        let initial = initial.map(sasl::decode_line);
        Ok(match mechanism {
            "PLAIN" => {
                let message = match initial {
                    Some(r) => r,
                    None => self.sasl_response("334 \r\n").await?,
                };
                message.and_then(|m| sasl::decode_plain(&m))
            }
            _ => {
                let user = match initial {
                    Some(r) => r,
                    None => self.sasl_response("334 VXNlcm5hbWU6\r\n").await?,
                };
                let user = match user.and_then(|u| sasl::utf8(&u)) {
                    Ok(u) => u,
                    Err(e) => return Ok(Err(e)),
                };
                let password = self.sasl_response("334 UGFzc3dvcmQ6\r\n").await?;
                password
                    .and_then(|p| sasl::utf8(&p))
                    .map(|p| sasl::Credentials {
                        login: user,
                        password: SecretString::from(p),
                    })
            }
        })
    }

    /// AUTH: returns the upstream connection when the login went through.
    async fn auth(
        &mut self,
        mechanism: &str,
        initial: Option<&[u8]>,
    ) -> Result<Option<(Upstream, Identity)>, &'static str> {
        if self.helo.is_none() {
            self.reply("503 5.5.1 Send EHLO or HELO first\r\n").await?;
            return Ok(None);
        }
        if !self.auth_allowed() {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism\r\n")
                .await?;
            return Ok(None);
        }
        if mechanism != "PLAIN" && mechanism != "LOGIN" {
            self.reply("504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n")
                .await?;
            return Ok(None);
        }
        let creds = match self.credentials(mechanism, initial).await? {
            Ok(c) => c,
            Err(sasl::SaslError::Canceled) => {
                self.reply("501 5.7.0 Authentication canceled\r\n").await?;
                return Ok(None);
            }
            Err(e) => {
                debug!(error = %e, "undecodable AUTH exchange");
                self.auth_failures += 1;
                self.reply("501 5.5.2 Cannot decode the authentication exchange\r\n")
                    .await?;
                return Ok(None);
            }
        };
        let client_name = self.helo.clone().unwrap_or_else(|| "oxbridge".into());
        let result = proto::login(self.app, Protocol::Smtp, creds, &client_name, self.peer).await;
        match self.check_promises(result).await {
            Ok(login) => {
                self.reply("235 2.7.0 Authentication successful\r\n")
                    .await?;
                Ok(Some(login))
            }
            Err(e) => {
                self.auth_failures += 1;
                self.reply(e.smtp_reply()).await?;
                if matches!(e, AuthError::Busy(_)) {
                    return Err("mailbox busy");
                }
                Ok(None)
            }
        }
    }

    /// Learn the upstream's EHLO from a fresh login, and refuse the session
    /// if it no longer offers what the device was told.
    async fn check_promises(
        &mut self,
        result: Result<(Upstream, Identity), AuthError>,
    ) -> Result<(Upstream, Identity), AuthError> {
        let (up, id) = result?;
        self.app.smtp_caps.update(&up.capabilities).await;
        if promises_hold(&self.told, &up.capabilities) {
            return Ok((up, id));
        }
        let e = AuthError::UpstreamTemporary(format!(
            "upstream EHLO changed since the device was told {:?}; it now offers {:?}",
            self.told, up.capabilities
        ));
        warn!(reason = e.reason(), error = %e, "login failed");
        Err(e)
    }

    /// MAIL before AUTH: relayed as a `[[relay]]` account when the device's
    /// network has a rule (and the sender is allowed), else refused.
    async fn mail_without_auth(
        &mut self,
        line: &[u8],
    ) -> Result<Option<(Upstream, Identity)>, &'static str> {
        let Some(rule) = self.app.relay_rule(self.peer.ip()) else {
            self.reply("530 5.7.0 Authentication required\r\n").await?;
            return Ok(None);
        };
        if self.helo.is_none() {
            self.reply("503 5.5.1 Send EHLO or HELO first\r\n").await?;
            return Ok(None);
        }
        let sender = mail_from_address(line).unwrap_or_default();
        if !sender_allowed(&rule.allowed_senders, &sender) {
            warn!(sender = %sender, account = %rule.account, "relay refused: sender not allowed");
            self.reply("550 5.7.1 Sender not allowed to relay from this network\r\n")
                .await?;
            return Ok(None);
        }
        let client_name = self.helo.clone().unwrap_or_else(|| "oxbridge".into());
        let account = rule.account.clone();
        let result = proto::relay_login(self.app, &account, &client_name).await;
        match self.check_promises(result).await {
            Ok(login) => Ok(Some(login)),
            Err(e) => {
                let reply = match &e {
                    AuthError::Busy(_) => e.smtp_reply(),
                    e if e.is_temporary() => {
                        "451 4.7.0 Temporary failure relaying for this network, try again later\r\n"
                    }
                    _ => "554 5.7.1 Relaying for this network is not possible now\r\n",
                };
                self.reply(reply).await?;
                if matches!(e, AuthError::Busy(_)) {
                    return Err("mailbox busy");
                }
                Ok(None)
            }
        }
    }
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
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(*c))
        .take(255)
        .collect();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
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
        helo: None,
        told: Vec::new(),
    };
    match run(s, &shutdown).await {
        Ok(p) => p,
        Err(why) => Preauth::Closed(why),
    }
}

async fn run(mut s: Session<'_>, shutdown: &CancellationToken) -> Result<Preauth, &'static str> {
    let greeting = format!("220 {} ESMTP oxbridge ready\r\n", s.app.hostname);
    s.reply(&greeting).await?;
    for _ in 0..MAX_PREAUTH_COMMANDS {
        let line = tokio::select! {
            line = s.read_line() => line,
            _ = shutdown.cancelled() => {
                s.reply("421 4.3.2 Service shutting down, try again later\r\n").await?;
                return Ok(Preauth::Closed("shutdown"));
            }
        };
        let line = match line {
            Ok(l) => l,
            Err(LineError::TooLong(_)) => {
                s.errors += 1;
                if s.errors >= MAX_ERRORS {
                    s.reply("421 4.7.0 Too many errors, closing connection\r\n")
                        .await?;
                    return Ok(Preauth::Closed("too many errors"));
                }
                s.reply("500 5.5.6 Line too long\r\n").await?;
                continue;
            }
            Err(LineError::Timeout(_)) => {
                s.reply("421 4.4.2 Timeout waiting for a command, closing connection\r\n")
                    .await?;
                return Ok(Preauth::Closed("idle timeout"));
            }
            Err(e) => return Ok(Preauth::Closed(e.reason())),
        };
        match parse_command(&line) {
            Command::Ehlo(name) => {
                let name = name.to_string();
                s.ehlo(&name).await?
            }
            Command::Helo(name) => {
                s.helo = Some(sanitize(name));
                s.told.clear();
                let r = format!("250 {} Hello {}\r\n", s.app.hostname, sanitize(name));
                s.reply(&r).await?
            }
            Command::StartTls if s.starttls_offered() => {
                s.reply("220 2.0.0 Ready to start TLS\r\n").await?;
                s.start_tls().await?;
                s.helo = None;
                s.told.clear();
            }
            Command::StartTls => {
                let r = if s.conn.is_tls() {
                    "503 5.5.1 TLS already active\r\n"
                } else {
                    "502 5.5.1 STARTTLS not available on this port\r\n"
                };
                s.reply(r).await?
            }
            Command::Auth { mechanism, initial } => {
                let initial = initial.map(|i| i.to_vec());
                if let Some((up, id)) = s.auth(&mechanism, initial.as_deref()).await? {
                    return Ok(Preauth::relay(s.dev.conn, up, &id));
                }
                if s.auth_failures >= MAX_AUTH_FAILURES {
                    s.reply("421 4.7.0 Too many failed logins, closing connection\r\n").await?;
                    return Ok(Preauth::Closed("too many failed logins"));
                }
            }
            Command::Mail => {
                if let Some((up, id)) = s.mail_without_auth(&line).await? {
                    // The MAIL command goes upstream first, then the relay.
                    s.dev.conn.unread(&[line.as_slice(), b"
"].concat());
                    return Ok(Preauth::relay(s.dev.conn, up, &id));
                }
            }
            Command::Rcpt | Command::Data => s.reply("530 5.7.0 Authentication required
").await?,
            Command::Bdat(size) => match size {
                Some(n) if n <= MAX_PREAUTH_BDAT => {
                    let wait = s.timeout;
                    s.conn.discard(n, wait).await.map_err(|_| -> &'static str { "device gone during BDAT" })?;
                    s.reply("530 5.7.0 Authentication required\r\n").await?
                }
                _ => {
                    s.reply("421 4.7.0 BDAT before authentication, closing connection\r\n").await?;
                    return Ok(Preauth::Closed("BDAT before authentication"));
                }
            },
            Command::Rset | Command::Noop => s.reply(R_OK).await?,
            Command::Help => {
                s.reply("214 2.0.0 oxbridge: log in with AUTH PLAIN or AUTH LOGIN, then send mail as usual\r\n")
                    .await?
            }
            Command::Vrfy => s.reply("252 2.5.0 Cannot VRFY user\r\n").await?,
            Command::Quit => {
                s.reply("221 2.0.0 Bye\r\n").await?;
                return Ok(Preauth::Closed("quit"));
            }
            Command::Unknown => {
                s.errors += 1;
                if s.errors >= MAX_ERRORS {
                    s.reply("421 4.7.0 Too many errors, closing connection\r\n").await?;
                    return Ok(Preauth::Closed("too many errors"));
                }
                s.reply("500 5.5.2 Command unrecognized\r\n").await?
            }
        }
    }
    s.reply("421 4.7.0 Too many commands without authentication, closing connection\r\n")
        .await?;
    Ok(Preauth::Closed("too many commands"))
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
        let reply = Reply {
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
    fn sanitized_names() {
        assert_eq!(sanitize("printer.local"), "printer.local");
        assert_eq!(sanitize("[192.168.1.5]"), "[192.168.1.5]");
        assert_eq!(sanitize("a\r\n250 fake"), "a250fake");
        assert_eq!(sanitize(""), "unknown");
    }
}
