//! SMTP upstream: greeting, EHLO, STARTTLS (mandatory: oxbridge never
//! logs in without TLS), EHLO, `AUTH XOAUTH2` including the error-challenge
//! form (`334 <base64 JSON>`, answered with an empty line); and the EHLO
//! keywords last seen, which devices are told.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

use super::{read_line_within, send, unavailable, Dialer, MAX_REPLY_LINES, REPLY_TIMEOUT};
use crate::error::AuthError;
use crate::mailbox::Mailbox;
use crate::net::{dial, Conn};
use crate::wire::sasl;
use crate::wire::smtp::{
    ehlo_keywords, keyword, parse_reply_line, passthrough, Request, ServerReply,
};

/// After a failed probe, devices are offered no extensions for this long
/// before the next probe.
pub const PROBE_RETRY: Duration = Duration::from_secs(60);
/// The longest a device's EHLO waits for the probe.
pub const PROBE_WAIT: Duration = Duration::from_secs(5);
/// The EHLO name of the probe.
const PROBE_NAME: &str = "oxbridge";

/// Read one reply, bounded in line length, line count and time.
async fn read_reply(conn: &mut Conn) -> Result<ServerReply, AuthError> {
    read_reply_within(conn, REPLY_TIMEOUT).await
}

/// [`read_reply`], each line waited for at most `wait`.
async fn read_reply_within(conn: &mut Conn, wait: Duration) -> Result<ServerReply, AuthError> {
    let mut lines = Vec::new();
    loop {
        let line = read_line_within(conn, wait).await?;
        let (code, last, text) = parse_reply_line(&line).ok_or_else(|| {
            AuthError::UpstreamUnavailable(format!(
                "malformed reply {:?}",
                crate::wire::printable(&line)
            ))
        })?;
        lines.push(text.to_vec());
        if last {
            return Ok(ServerReply { code, lines });
        }
        if lines.len() >= MAX_REPLY_LINES {
            return Err(AuthError::UpstreamUnavailable(
                "reply has too many lines".into(),
            ));
        }
    }
}

async fn command(conn: &mut Conn, request: Request<'_>) -> Result<ServerReply, AuthError> {
    send(conn, &request.to_bytes()).await?;
    read_reply(conn).await
}

/// Fail unless the reply has `code`.
fn expect(reply: &ServerReply, code: u16, step: &str) -> Result<(), AuthError> {
    if reply.code == code {
        Ok(())
    } else {
        Err(AuthError::UpstreamUnavailable(format!(
            "{step}: {}",
            reply.summary()
        )))
    }
}

/// Connect to the SMTP server: greeting, EHLO, STARTTLS, EHLO. Returns the
/// TLS connection and the keywords of the second EHLO.
pub(super) async fn dial(
    dialer: &Dialer,
    addr: &str,
    ehlo_name: &str,
) -> Result<(Conn, Vec<String>), AuthError> {
    let mut conn = dial::connect(addr).await.map_err(unavailable)?;
    expect(&read_reply(&mut conn).await?, 220, "greeting")?;
    let ehlo = command(&mut conn, Request::Ehlo(ehlo_name)).await?;
    expect(&ehlo, 250, "EHLO")?;
    if !ehlo_keywords(&ehlo)
        .iter()
        .any(|k| keyword(k) == "STARTTLS")
    {
        return Err(AuthError::UpstreamUnavailable(format!(
            "{addr} does not offer STARTTLS; oxbridge never logs in without TLS"
        )));
    }
    expect(
        &command(&mut conn, Request::StartTls).await?,
        220,
        "STARTTLS",
    )?;
    dial::start_tls(&dialer.tls, addr, &mut conn)
        .await
        .map_err(unavailable)?;
    let ehlo = command(&mut conn, Request::Ehlo(ehlo_name)).await?;
    expect(&ehlo, 250, "EHLO after STARTTLS")?;
    let keywords = ehlo_keywords(&ehlo);
    // What devices are offered before they log in is one server's.
    if addr == dialer.smtp {
        dialer.smtp_keywords.update(&keywords);
    }
    Ok((conn, keywords))
}

/// `AUTH XOAUTH2` on a dialled connection.
pub(super) async fn auth_xoauth2(
    conn: &mut Conn,
    mailbox: &Mailbox,
    token: &SecretString,
) -> Result<(), AuthError> {
    let ir = super::initial_response(mailbox, token)?;
    let mut reply = command(conn, Request::AuthXoauth2(ir.expose_secret())).await?;
    let mut challenge = None;
    if reply.code == 334 {
        // The error challenge: base64 JSON; answer with an empty line to get
        // the final reply.
        challenge = reply
            .lines
            .first()
            .and_then(|l| sasl::xoauth2_error_status(l));
        reply = command(conn, Request::Empty).await?;
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

/// `oxbridge check`, after login: would the server take mail from the
/// mailbox? `MAIL FROM`, then `RSET` and `QUIT`; nothing is sent.
pub(super) async fn check_sender(conn: &mut Conn, mailbox: &Mailbox) -> Result<(), AuthError> {
    let reply = command(conn, Request::MailFrom(mailbox)).await?;
    let result = match reply.code {
        200..=299 => Ok(()),
        400..=499 => Err(AuthError::UpstreamTemporary(reply.summary())),
        _ => Err(AuthError::UpstreamRefused(reply.summary())),
    };
    let _ = command(conn, Request::Rset).await;
    let _ = command(conn, Request::Quit).await;
    result
}

/// The upstream's EHLO keywords as last seen, shared by all SMTP sessions.
#[derive(Default)]
pub(super) struct Keywords {
    known: std::sync::Mutex<Option<Vec<String>>>,
    /// Held while probing; the time of the last failed probe.
    probe: tokio::sync::Mutex<Option<Instant>>,
}

impl Keywords {
    fn known(&self) -> Option<Vec<String>> {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .map(passthrough)
    }

    /// Keywords to offer the device: the last known upstream EHLO, probing
    /// once if nothing is known (not more than once a minute on failure).
    pub(super) async fn get(&self, dialer: &Dialer) -> Vec<String> {
        if let Some(k) = self.known() {
            return k;
        }
        let mut last_failed = self.probe.lock().await;
        if let Some(k) = self.known() {
            return k;
        }
        if last_failed.is_some_and(|t| t.elapsed() < PROBE_RETRY) {
            return Vec::new();
        }
        let probed = tokio::time::timeout(PROBE_WAIT, probe(dialer))
            .await
            .unwrap_or_else(|_| {
                Err(AuthError::UpstreamUnavailable(format!(
                    "no EHLO within {PROBE_WAIT:?}"
                )))
            });
        match probed {
            Ok(k) => passthrough(&k),
            Err(e) => {
                warn!(error = %e, "upstream SMTP probe failed; offering devices no SMTP extensions until it answers");
                *last_failed = Some(Instant::now());
                Vec::new()
            }
        }
    }

    /// Remember what an EHLO of the upstream said.
    fn update(&self, keywords: &[String]) {
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = Some(keywords.to_vec());
    }
}

/// Learn the upstream's EHLO without logging in.
async fn probe(dialer: &Dialer) -> Result<Vec<String>, AuthError> {
    let (mut conn, keywords) = dial(dialer, &dialer.smtp, PROBE_NAME).await?;
    let _ = send(&mut conn, &Request::Quit.to_bytes()).await;
    Ok(keywords)
}

/// How long the server may take to answer the end of a message (RFC 5321
/// 4.5.3.2.6: ten minutes).
pub const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes of a spooled message read and sent at once.
const SEND_CHUNK: usize = 64 * 1024;

/// What the server said to one message: to MAIL, to each RCPT, and to
/// its end (none when no recipient was taken).
#[derive(Debug)]
pub struct Sent {
    pub mail: ServerReply,
    pub recipients: Vec<(String, ServerReply)>,
    pub data: Option<ServerReply>,
}

/// Send one message on a logged-in connection: RSET, MAIL, each RCPT,
/// DATA and the message read from `message`, dot-stuffed. `before_end`
/// runs just before the final dot is sent. An error means the connection
/// failed; the server's refusals are in [`Sent`].
pub(super) async fn send_message(
    conn: &mut Conn,
    sender: &str,
    params: &[String],
    recipients: &[String],
    message: &std::path::Path,
    before_end: impl FnOnce() -> std::io::Result<()>,
) -> Result<Sent, AuthError> {
    let open = || tokio::fs::File::open(message);
    send_from(conn, sender, params, recipients, open, before_end).await
}

/// [`send_message`], the message read from what `open` gives once the
/// server has said 354 (a spooled file, or bytes in memory).
pub(super) async fn send_from<R, F>(
    conn: &mut Conn,
    sender: &str,
    params: &[String],
    recipients: &[String],
    open: impl FnOnce() -> F,
    before_end: impl FnOnce() -> std::io::Result<()>,
) -> Result<Sent, AuthError>
where
    R: tokio::io::AsyncRead + Unpin,
    F: std::future::Future<Output = std::io::Result<R>>,
{
    use tokio::io::AsyncReadExt;
    let rset = command(conn, Request::Rset).await?;
    if rset.code / 100 != 2 {
        return Err(AuthError::UpstreamTemporary(format!(
            "RSET: {}",
            rset.summary()
        )));
    }
    let mail = command(conn, Request::MailFromWith(sender, params)).await?;
    let mut sent = Sent {
        mail,
        recipients: Vec::new(),
        data: None,
    };
    if sent.mail.code / 100 != 2 {
        return Ok(sent);
    }
    for r in recipients {
        let reply = command(conn, Request::RcptTo(r)).await?;
        sent.recipients.push((r.clone(), reply));
    }
    if !sent.recipients.iter().any(|(_, r)| r.code / 100 == 2) {
        return Ok(sent);
    }
    let go = command(conn, Request::Data).await?;
    if go.code != 354 {
        sent.data = Some(go);
        return Ok(sent);
    }
    let io = |e: std::io::Error| AuthError::UpstreamTemporary(format!("reading the message: {e}"));
    let mut file = open().await.map_err(io)?;
    let mut writer = crate::wire::message::DataWriter::default();
    let mut buf = vec![0u8; SEND_CHUNK];
    let mut out = Vec::with_capacity(SEND_CHUNK + SEND_CHUNK / 8);
    loop {
        let n = file.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        out.clear();
        writer.stuff(&buf[..n], &mut out);
        send(conn, &out).await?;
    }
    before_end().map_err(io)?;
    send(conn, &writer.finish()).await?;
    sent.data = Some(read_reply_within(conn, DATA_END_TIMEOUT).await?);
    Ok(sent)
}

/// End a session: QUIT, without waiting long for the answer.
pub(super) async fn quit(conn: &mut Conn) {
    let _ = tokio::time::timeout(Duration::from_secs(5), command(conn, Request::Quit)).await;
}
