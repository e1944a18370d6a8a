//! fakeup: a fast mail upstream that serves from memory, for measuring
//! oxbridge's own ceiling (the real Dovecot/Postfix are the bottleneck
//! there) and for holding 10,000 sessions (Dovecot runs a process each).
//!
//! It speaks just enough of each protocol, and only XOAUTH2:
//! - IMAPS (implicit TLS): CAPABILITY, NOOP, AUTHENTICATE XOAUTH2 (SASL-IR or
//!   not), SELECT/EXAMINE (one message), FETCH/UID FETCH (that message, in
//!   full), LOGOUT;
//! - POP3S (implicit TLS): CAPA, AUTH XOAUTH2, STAT, LIST, UIDL, RETR 1, DELE,
//!   RSET, NOOP, QUIT;
//! - SMTP with mandatory STARTTLS: EHLO/HELO, STARTTLS, AUTH XOAUTH2, MAIL,
//!   RCPT, DATA (read and dropped), RSET, NOOP, QUIT;
//! - HTTP token endpoint (`POST .../token`, grants `client_credentials` for
//!   test-app/test-app-secret and `password` for userN@example.test with
//!   password `userN-password`), `GET /stats`, `POST /stats/reset`.
//!
//! A token opens a session only if this process issued it, for its user (an
//! app-only token opens any mailbox). Refusals use the error-challenge form
//! of Dovecot and Postfix.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use oxbridge_bench::{make_message, parse_xoauth2, server_config, show, Conn};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const ERROR_CHALLENGE: &str = "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=";
const APP_ID: &str = "test-app";
const APP_SECRET: &str = "test-app-secret";

#[derive(Clone, Debug)]
enum Subject {
    App,
    User(String),
}

#[derive(Default)]
struct Stats {
    token_requests: AtomicU64,
    grant_password: AtomicU64,
    grant_client_credentials: AtomicU64,
    token_refused: AtomicU64,
    xoauth2_ok: AtomicU64,
    xoauth2_refused: AtomicU64,
    imap_active: AtomicI64,
    pop3_active: AtomicI64,
    smtp_active: AtomicI64,
    sessions_total: AtomicU64,
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    bytes_served: AtomicU64,
}

struct State {
    tokens: Mutex<HashMap<String, Subject>>,
    users: usize,
    stats: Stats,
    msg: Vec<u8>,
    seq: AtomicU64,
}

impl State {
    fn issue(&self, s: Subject) -> String {
        let n = self.seq.fetch_add(1, Relaxed);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mut x = t ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 31;
        let tok = format!("fk1.{n:08x}.{x:016x}{:016x}", x.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        self.tokens.lock().unwrap().insert(tok.clone(), s);
        tok
    }

    /// Whether an XOAUTH2 initial response opens a session.
    fn check(&self, ir: &[u8]) -> bool {
        let ok = match parse_xoauth2(ir) {
            Some((user, token)) => match self.tokens.lock().unwrap().get(&token) {
                Some(Subject::App) => user.to_ascii_lowercase().ends_with("@example.test"),
                Some(Subject::User(u)) => u.eq_ignore_ascii_case(&user),
                None => false,
            },
            None => false,
        };
        if ok {
            self.stats.xoauth2_ok.fetch_add(1, Relaxed);
        } else {
            self.stats.xoauth2_refused.fetch_add(1, Relaxed);
        }
        ok
    }

    fn valid_user(&self, user: &str, pass: &str) -> bool {
        let user = user.to_ascii_lowercase();
        let Some(local) = user.strip_suffix("@example.test") else {
            return false;
        };
        let Some(n) = local.strip_prefix("user").and_then(|n| n.parse::<usize>().ok()) else {
            return false;
        };
        n < self.users && pass == format!("{local}-password")
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let need = |n: &str| arg(&args, n).ok_or_else(|| io::Error::other(format!("missing {n}")));
    let host = arg(&args, "--host").unwrap_or_else(|| "127.0.0.1".into());
    let threads: usize = arg(&args, "--threads").map_or(2, |t| t.parse().unwrap_or(2));
    let msg_size: usize = arg(&args, "--msg-size").map_or(10 << 20, |t| t.parse().unwrap_or(10 << 20));
    let users: usize = arg(&args, "--users").map_or(100, |t| t.parse().unwrap_or(100));
    let tls = server_config(need("--cert")?.as_ref(), need("--key")?.as_ref())?;
    let state = Arc::new(State {
        tokens: Mutex::new(HashMap::new()),
        users,
        stats: Stats::default(),
        msg: make_message(msg_size, "fakeup bulk message"),
        seq: AtomicU64::new(1),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let acceptor = TlsAcceptor::from(tls);
        let addr = |p: String| -> io::Result<SocketAddr> {
            format!("{host}:{p}").parse().map_err(io::Error::other)
        };
        let imap = TcpListener::bind(addr(need("--imaps")?)?).await?;
        let pop3 = TcpListener::bind(addr(need("--pop3s")?)?).await?;
        let smtp = TcpListener::bind(addr(need("--smtp")?)?).await?;
        let http = TcpListener::bind(addr(need("--http")?)?).await?;
        for (l, kind) in [(imap, 0u8), (pop3, 1), (smtp, 2), (http, 3)] {
            let st = state.clone();
            let acc = acceptor.clone();
            tokio::spawn(async move {
                loop {
                    let (sock, _) = match l.accept().await {
                        Ok(x) => x,
                        Err(e) => {
                            eprintln!("fakeup: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let _ = sock.set_nodelay(true);
                    let st = st.clone();
                    let acc = acc.clone();
                    tokio::spawn(async move {
                        let _ = match kind {
                            0 => tls_then(acc, sock, st, imap_session).await,
                            1 => tls_then(acc, sock, st, pop3_session).await,
                            2 => smtp_session(acc, sock, st).await,
                            _ => http_session(sock, st).await,
                        };
                    });
                }
            });
        }
        println!("fakeup ready");
        std::future::pending::<()>().await;
        Ok(())
    })
}

async fn tls_then<F, Fut>(acc: TlsAcceptor, sock: TcpStream, st: Arc<State>, f: F) -> io::Result<()>
where
    F: FnOnce(Conn<tokio_rustls::server::TlsStream<TcpStream>>, Arc<State>) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    let tls = tokio::time::timeout(Duration::from_secs(30), acc.accept(sock))
        .await
        .map_err(io::Error::other)??;
    st.stats.sessions_total.fetch_add(1, Relaxed);
    f(Conn::new(tls, 4096), st).await
}

/// Decrements a gauge when the session ends, however it ends.
struct Gauge<'a>(&'a AtomicI64);
impl<'a> Gauge<'a> {
    fn new(g: &'a AtomicI64) -> Self {
        g.fetch_add(1, Relaxed);
        Gauge(g)
    }
}
impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn words(line: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(line)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

async fn imap_session<S: AsyncRead + AsyncWrite + Unpin>(mut c: Conn<S>, st: Arc<State>) -> io::Result<()> {
    let _g = Gauge::new(&st.stats.imap_active);
    c.send(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=XOAUTH2] fakeup ready\r\n")
        .await?;
    let mut authed = false;
    loop {
        let line = c.line().await?;
        let w = words(&line);
        let (Some(tag), Some(cmd)) = (w.first(), w.get(1)) else {
            c.send(b"* BAD empty command\r\n").await?;
            continue;
        };
        let cmd = cmd.to_ascii_uppercase();
        let sub = w.get(2).map(|s| s.to_ascii_uppercase()).unwrap_or_default();
        match cmd.as_str() {
            "CAPABILITY" => {
                c.send(format!("* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=XOAUTH2\r\n{tag} OK Capability completed\r\n").as_bytes()).await?
            }
            "NOOP" => c.send(format!("{tag} OK NOOP completed\r\n").as_bytes()).await?,
            "LOGOUT" => {
                c.send(format!("* BYE fakeup logging out\r\n{tag} OK Logout completed\r\n").as_bytes())
                    .await?;
                return Ok(());
            }
            "ID" => c.send(format!("* ID NIL\r\n{tag} OK ID completed\r\n").as_bytes()).await?,
            "AUTHENTICATE" if sub == "XOAUTH2" && !authed => {
                let ir = match w.get(3) {
                    Some(ir) => ir.clone().into_bytes(),
                    None => {
                        c.send(b"+ \r\n").await?;
                        c.line().await?
                    }
                };
                if st.check(&ir) {
                    authed = true;
                    c.send(format!("{tag} OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] Logged in\r\n").as_bytes())
                        .await?;
                } else {
                    c.send(format!("+ {ERROR_CHALLENGE}\r\n").as_bytes()).await?;
                    c.line().await?;
                    c.send(format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n").as_bytes())
                        .await?;
                }
            }
            "SELECT" | "EXAMINE" if authed => {
                c.send(format!("* FLAGS (\\Seen \\Deleted)\r\n* 1 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 2] Predicted next UID\r\n{tag} OK [READ-WRITE] Select completed\r\n").as_bytes()).await?
            }
            "FETCH" | "UID" if authed && (cmd == "FETCH" || sub == "FETCH") => {
                let head = format!("* 1 FETCH (UID 1 BODY[] {{{}}}\r\n", st.msg.len());
                c.io.write_all(head.as_bytes()).await?;
                c.io.write_all(&st.msg).await?;
                c.io.write_all(format!(")\r\n{tag} OK Fetch completed\r\n").as_bytes()).await?;
                c.io.flush().await?;
                st.stats.bytes_served.fetch_add(st.msg.len() as u64, Relaxed);
            }
            _ => c.send(format!("{tag} BAD Unknown or unexpected command\r\n").as_bytes()).await?,
        }
    }
}

async fn pop3_session<S: AsyncRead + AsyncWrite + Unpin>(mut c: Conn<S>, st: Arc<State>) -> io::Result<()> {
    let _g = Gauge::new(&st.stats.pop3_active);
    c.send(b"+OK fakeup ready\r\n").await?;
    let mut authed = false;
    let n = st.msg.len();
    loop {
        let line = c.line().await?;
        let w = words(&line);
        let cmd = w.first().map(|s| s.to_ascii_uppercase()).unwrap_or_default();
        match cmd.as_str() {
            "CAPA" => c.send(b"+OK\r\nSASL XOAUTH2\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nTOP\r\nUIDL\r\n.\r\n").await?,
            "AUTH" if !authed && w.get(1).is_some_and(|m| m.eq_ignore_ascii_case("XOAUTH2")) => {
                let ir = match w.get(2) {
                    Some(ir) => ir.clone().into_bytes(),
                    None => {
                        c.send(b"+ \r\n").await?;
                        c.line().await?
                    }
                };
                if st.check(&ir) {
                    authed = true;
                    c.send(b"+OK Logged in.\r\n").await?;
                } else {
                    c.send(format!("+ {ERROR_CHALLENGE}\r\n").as_bytes()).await?;
                    c.line().await?;
                    c.send(b"-ERR [AUTH] Authentication failed.\r\n").await?;
                }
            }
            "STAT" if authed => c.send(format!("+OK 1 {n}\r\n").as_bytes()).await?,
            "LIST" if authed => c.send(format!("+OK 1 messages\r\n1 {n}\r\n.\r\n").as_bytes()).await?,
            "UIDL" if authed => c.send(b"+OK\r\n1 fakeup-1\r\n.\r\n").await?,
            "RETR" if authed => {
                c.io.write_all(format!("+OK {n} octets\r\n").as_bytes()).await?;
                c.io.write_all(&st.msg).await?;
                c.io.write_all(b".\r\n").await?;
                c.io.flush().await?;
                st.stats.bytes_served.fetch_add(n as u64, Relaxed);
            }
            "NOOP" | "RSET" | "DELE" if authed => c.send(b"+OK\r\n").await?,
            "QUIT" => {
                c.send(b"+OK Logging out.\r\n").await?;
                return Ok(());
            }
            _ => c.send(b"-ERR Unknown command.\r\n").await?,
        }
    }
}

const EHLO_PLAIN: &[u8] =
    b"250-fakeup\r\n250-PIPELINING\r\n250-SIZE 157286400\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n";
const EHLO_TLS: &[u8] =
    b"250-fakeup\r\n250-PIPELINING\r\n250-SIZE 157286400\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH XOAUTH2\r\n";

async fn smtp_session(acc: TlsAcceptor, sock: TcpStream, st: Arc<State>) -> io::Result<()> {
    let _g = Gauge::new(&st.stats.smtp_active);
    st.stats.sessions_total.fetch_add(1, Relaxed);
    let mut c = Conn::new(sock, 4096);
    c.send(b"220 fakeup ESMTP ready\r\n").await?;
    loop {
        let line = c.line().await?;
        let w = words(&line);
        let cmd = w.first().map(|s| s.to_ascii_uppercase()).unwrap_or_default();
        match cmd.as_str() {
            "EHLO" => c.send(EHLO_PLAIN).await?,
            "HELO" => c.send(b"250 fakeup\r\n").await?,
            "NOOP" | "RSET" => c.send(b"250 2.0.0 Ok\r\n").await?,
            "QUIT" => {
                c.send(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            "STARTTLS" => {
                c.send(b"220 2.0.0 Ready to start TLS\r\n").await?;
                break;
            }
            _ => c.send(b"530 5.7.0 Must issue a STARTTLS command first\r\n").await?,
        }
    }
    let tls = tokio::time::timeout(Duration::from_secs(30), acc.accept(c.into_io()))
        .await
        .map_err(io::Error::other)??;
    let mut c = Conn::new(tls, 64 * 1024);
    let mut authed = false;
    loop {
        let line = c.line().await?;
        let w = words(&line);
        let cmd = w.first().map(|s| s.to_ascii_uppercase()).unwrap_or_default();
        match cmd.as_str() {
            "EHLO" => c.send(EHLO_TLS).await?,
            "HELO" => c.send(b"250 fakeup\r\n").await?,
            "NOOP" | "RSET" => c.send(b"250 2.0.0 Ok\r\n").await?,
            "QUIT" => {
                c.send(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            "AUTH" if !authed && w.get(1).is_some_and(|m| m.eq_ignore_ascii_case("XOAUTH2")) => {
                let ir = match w.get(2) {
                    Some(ir) => ir.clone().into_bytes(),
                    None => {
                        c.send(b"334 \r\n").await?;
                        c.line().await?
                    }
                };
                if st.check(&ir) {
                    authed = true;
                    c.send(b"235 2.7.0 Authentication successful\r\n").await?;
                } else {
                    c.send(format!("334 {ERROR_CHALLENGE}\r\n").as_bytes()).await?;
                    c.line().await?;
                    c.send(b"535 5.7.8 Error: authentication failed\r\n").await?;
                }
            }
            "MAIL" if authed => c.send(b"250 2.1.0 Ok\r\n").await?,
            "RCPT" if authed => c.send(b"250 2.1.5 Ok\r\n").await?,
            "DATA" if authed => {
                c.send(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                let n = c.skip_through(b"\r\n.\r\n").await?;
                st.stats.bytes_received.fetch_add(n, Relaxed);
                st.stats.messages_received.fetch_add(1, Relaxed);
                c.send(b"250 2.0.0 Ok: queued as FAKEUP\r\n").await?;
            }
            "MAIL" | "RCPT" | "DATA" => c.send(b"530 5.7.0 Authentication required\r\n").await?,
            _ => c.send(b"502 5.5.2 Error: command not recognized\r\n").await?,
        }
    }
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((url_decode(k), url_decode(v)))
        })
        .collect()
}

fn stats_json(st: &State) -> String {
    let s = &st.stats;
    serde_json::json!({
        "token_requests": s.token_requests.load(Relaxed),
        "grant_requests": {
            "password": s.grant_password.load(Relaxed),
            "client_credentials": s.grant_client_credentials.load(Relaxed),
        },
        "token_refused": s.token_refused.load(Relaxed),
        "xoauth2_ok": s.xoauth2_ok.load(Relaxed),
        "xoauth2_refused": s.xoauth2_refused.load(Relaxed),
        "imap_active": s.imap_active.load(Relaxed),
        "pop3_active": s.pop3_active.load(Relaxed),
        "smtp_active": s.smtp_active.load(Relaxed),
        "sessions_total": s.sessions_total.load(Relaxed),
        "messages_received": s.messages_received.load(Relaxed),
        "bytes_received": s.bytes_received.load(Relaxed),
        "bytes_served": s.bytes_served.load(Relaxed),
    })
    .to_string()
}

async fn http_session(sock: TcpStream, st: Arc<State>) -> io::Result<()> {
    let mut c = Conn::new(sock, 16 * 1024);
    loop {
        let request = c.line().await?;
        let w = words(&request);
        let (method, path) = (w.first().cloned().unwrap_or_default(), w.get(1).cloned().unwrap_or_default());
        let mut len = 0usize;
        let mut close = false;
        let mut basic = None;
        loop {
            let h = c.line().await?;
            if h == b"\r\n" || h == b"\n" {
                break;
            }
            let h = String::from_utf8_lossy(&h).into_owned();
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                match k.as_str() {
                    "content-length" => len = v.parse().unwrap_or(0),
                    "connection" => close = v.eq_ignore_ascii_case("close"),
                    "authorization" => basic = v.strip_prefix("Basic ").map(str::to_string),
                    _ => {}
                }
            }
        }
        let body = String::from_utf8_lossy(&c.take(len).await?).into_owned();
        let path = path.split('?').next().unwrap_or_default().to_string();
        let (code, reply) = match (method.as_str(), path.as_str()) {
            ("GET", "/health") => (200, "{\"ok\":true}".to_string()),
            ("GET", "/stats") => (200, stats_json(&st)),
            ("POST", "/stats/reset") => {
                let s = &st.stats;
                for a in [
                    &s.token_requests,
                    &s.grant_password,
                    &s.grant_client_credentials,
                    &s.token_refused,
                    &s.xoauth2_ok,
                    &s.xoauth2_refused,
                    &s.sessions_total,
                    &s.messages_received,
                    &s.bytes_received,
                    &s.bytes_served,
                ] {
                    a.store(0, Relaxed);
                }
                (200, stats_json(&st))
            }
            ("POST", p) if p.ends_with("/token") => token(&st, &form(&body), basic.as_deref()),
            _ => (404, "{\"error\":\"not_found\"}".to_string()),
        };
        let reason = match code {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            _ => "Not Found",
        };
        let resp = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{}\r\n{reply}",
            reply.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        c.send(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

fn oauth_error(code: u16, error: &str, desc: &str) -> (u16, String) {
    (code, serde_json::json!({"error": error, "error_description": desc}).to_string())
}

fn token(st: &State, f: &HashMap<String, String>, basic: Option<&str>) -> (u16, String) {
    st.stats.token_requests.fetch_add(1, Relaxed);
    // client credentials from HTTP Basic (form-urlencoded parts) or the body
    let (mut id, mut secret) = (f.get("client_id").cloned(), f.get("client_secret").cloned());
    if let Some(b) = basic.and_then(|b| B64.decode(b.trim()).ok()) {
        let s = String::from_utf8_lossy(&b).into_owned();
        if let Some((i, p)) = s.split_once(':') {
            id = Some(url_decode(i));
            secret = Some(url_decode(p));
        }
    }
    let grant = f.get("grant_type").map(String::as_str).unwrap_or_default();
    let subject = match grant {
        "client_credentials" => {
            st.stats.grant_client_credentials.fetch_add(1, Relaxed);
            if id.as_deref() != Some(APP_ID) || secret.as_deref() != Some(APP_SECRET) {
                st.stats.token_refused.fetch_add(1, Relaxed);
                return oauth_error(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.");
            }
            Subject::App
        }
        "password" => {
            st.stats.grant_password.fetch_add(1, Relaxed);
            let user = f.get("username").cloned().unwrap_or_default();
            let pass = f.get("password").cloned().unwrap_or_default();
            if !st.valid_user(&user, &pass) {
                st.stats.token_refused.fetch_add(1, Relaxed);
                return oauth_error(400, "invalid_grant", "AADSTS50126: Error validating credentials due to invalid username or password.");
            }
            Subject::User(user.to_ascii_lowercase())
        }
        other => {
            st.stats.token_refused.fetch_add(1, Relaxed);
            return oauth_error(400, "unsupported_grant_type", &format!("grant {} is not supported here", show(other.as_bytes())));
        }
    };
    let tok = st.issue(subject);
    (
        200,
        serde_json::json!({
            "token_type": "Bearer",
            "scope": f.get("scope").cloned().unwrap_or_default(),
            "expires_in": 3600,
            "ext_expires_in": 3600,
            "access_token": tok,
        })
        .to_string(),
    )
}
