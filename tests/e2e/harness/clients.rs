//! The devices' side: real clients (swaks, curl, fetchmail, and the Python
//! clients in `tests/clients/`), a hand-driven connection for the replies
//! real clients hide, the test messages they send, and reading those back
//! straight from Dovecot.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine;

use super::{repo, run, text, upstream};

/// How long one client run may take (a 20 MB message over TLS included).
pub const CLIENT_LIMIT: Duration = Duration::from_secs(180);
/// How long a hand-driven connection waits for a line.
const READ_LIMIT: Duration = Duration::from_secs(60);

/// The Node.js clients of `tests/clients/` (`npm ci` there, once).
pub fn npm_clients() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let dir = repo().join("tests/clients");
        if dir.join("node_modules/imapflow").is_dir()
            && dir.join("node_modules/puppeteer-core").is_dir()
        {
            return;
        }
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("npm (Debian: apt-get install nodejs npm)");
        assert!(
            out.status.success(),
            "npm ci in tests/clients: {}",
            text(&out)
        );
    });
}

pub fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(repo().join("tests/clients").join(script));
    c
}

/// The JSON object a client in `tests/clients/` prints last.
pub fn client_json(o: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("no JSON from client: {}", text(o)))
}

/// A SASL PLAIN response (no authzid), base64.
pub fn plain_ir(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// One message submission by a real SMTP client through the proxy.
#[derive(Clone, Copy)]
pub struct Smtp<'a> {
    pub port: u16,
    /// "none", "starttls" or "implicit".
    pub tls: &'a str,
    /// "PLAIN" or "LOGIN"; "NONE" (smtplib only) sends no AUTH.
    pub mech: &'a str,
    /// SASL initial response on the AUTH line (smtplib only; swaks sends
    /// one for PLAIN and none for LOGIN).
    pub initial_response: bool,
    pub login: &'a str,
    pub password: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    /// The local address to connect from (smtplib only).
    pub source: Option<&'a str>,
    /// Seconds to keep the session open after sending (smtplib only).
    pub hold: Option<&'a str>,
}

impl Smtp<'static> {
    /// The scanner account, AUTH PLAIN with an initial response, no TLS,
    /// from alice to alice.
    pub fn scanner(port: u16) -> Smtp<'static> {
        Smtp {
            port,
            tls: "none",
            mech: "PLAIN",
            initial_response: true,
            login: "scanner@example.test",
            password: super::SCANNER_PASSWORD,
            from: super::ALICE,
            to: super::ALICE,
            source: None,
            hold: None,
        }
    }
}

impl Smtp<'_> {
    /// swaks ends DATA with CRLF "." itself, so it is given the message
    /// without its last CRLF (the bytes on the wire are then exactly the file's).
    pub fn swaks(&self, file: &Path) -> Output {
        let mut cmd = Command::new("swaks");
        cmd.args([
            "--server",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--ehlo",
            "printer.test",
        ])
        .args(["--auth", self.mech, "--auth-user", self.login])
        .args(["--auth-password", self.password])
        .args(["--from", self.from, "--to", self.to, "--timeout", "120"])
        .arg("--data")
        .arg(swaks_data(file));
        match self.tls {
            "starttls" => cmd.arg("--tls"),
            "implicit" => cmd.arg("--tls-on-connect"),
            _ => &mut cmd,
        };
        run(&mut cmd, CLIENT_LIMIT)
    }

    /// Python's smtplib (`tests/clients/smtp_send.py`).
    pub fn smtplib(&self, file: &Path) -> Output {
        let mut cmd = python("smtp_send.py");
        cmd.args(["--port", &self.port.to_string(), "--mech", self.mech])
            .args(["--user", self.login, "--password", self.password])
            .args(["--sender", self.from, "--rcpt", self.to])
            .args(["--cafile", upstream().ca()])
            .arg("--message")
            .arg(file);
        match self.tls {
            "starttls" => cmd.arg("--starttls"),
            "implicit" => cmd.arg("--implicit-tls"),
            _ => &mut cmd,
        };
        if !self.initial_response {
            cmd.arg("--no-initial-response");
        }
        if let Some(source) = self.source {
            cmd.args(["--source", source]);
        }
        if let Some(hold) = self.hold {
            cmd.args(["--hold", hold]);
        }
        run(&mut cmd, CLIENT_LIMIT)
    }

    /// Each of `messages` by its own smtplib, all at once.
    pub fn smtplib_at_once(&self, messages: &[Message]) -> Vec<Output> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = messages
                .iter()
                .map(|m| scope.spawn(move || self.smtplib(&m.path)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }
}

/// swaks's `--data` argument for a message file: `@` and a copy of the
/// file without its last CRLF.
pub fn swaks_data(file: &Path) -> String {
    let data = std::fs::read(file).unwrap();
    let trimmed = file.with_extension("swaks");
    std::fs::write(&trimmed, data.strip_suffix(b"\r\n").unwrap_or(&data)).unwrap();
    format!("@{}", trimmed.display())
}

/// An IMAP or POP3 session by Python's imaplib or poplib
/// (`tests/clients/imap_session.py`, `pop3_session.py`).
#[derive(Clone, Copy)]
pub struct Client<'a> {
    pub port: u16,
    /// "none", "starttls" or "implicit".
    pub tls: &'a str,
    /// LOGIN or PLAIN (IMAP), USER or PLAIN (POP3); None: the client's default.
    pub auth: Option<&'a str>,
    pub user: &'a str,
    pub password: &'a str,
}

impl<'a> Client<'a> {
    /// No TLS, the client's default login.
    pub fn new(port: u16, user: &'a str, password: &'a str) -> Client<'a> {
        Client {
            port,
            tls: "none",
            auth: None,
            user,
            password,
        }
    }

    pub fn imap(&self, mode: &str, extra: &[&str]) -> Output {
        self.session("imap_session.py", mode, extra)
    }

    pub fn pop3(&self, mode: &str, extra: &[&str]) -> Output {
        self.session("pop3_session.py", mode, extra)
    }

    /// IMAP: APPEND `m`, find it by its Message-ID and FETCH it to `out`;
    /// then delete it, unless `keep`.
    pub fn roundtrip(&self, m: &Message, out: &Path, keep: bool) -> Output {
        let mut args = message_args(&m.id, out, false);
        args.extend(["--message", m.path.to_str().unwrap()]);
        if keep {
            args.push("--keep");
        }
        self.imap("roundtrip", &args)
    }

    /// IMAP: wait for the message `id` and FETCH it to `out`; with
    /// `delete`, delete it.
    pub fn fetch(&self, id: &str, out: &Path, delete: bool) -> Output {
        self.imap("fetch", &message_args(id, out, delete))
    }

    /// POP3: find the message `id` and RETR it to `out`; with `delete`,
    /// DELE it.
    pub fn retr(&self, id: &str, out: &Path, delete: bool) -> Output {
        self.pop3("retr", &message_args(id, out, delete))
    }

    fn session(&self, script: &str, mode: &str, extra: &[&str]) -> Output {
        let mut cmd = python(script);
        cmd.args(["--port", &self.port.to_string(), "--tls", self.tls])
            .args(["--cafile", upstream().ca()])
            .args(["--user", self.user, "--password", self.password])
            .args(["--mode", mode])
            .args(extra);
        if let Some(auth) = self.auth {
            cmd.args(["--auth", auth]);
        }
        run(&mut cmd, CLIENT_LIMIT)
    }
}

fn message_args<'a>(id: &'a str, out: &'a Path, delete: bool) -> Vec<&'a str> {
    let mut args = vec!["--message-id", id, "--out", out.to_str().unwrap()];
    if delete {
        args.push("--delete");
    }
    args
}

/// A message with everything that must survive byte for byte: an 8-bit
/// UTF-8 body, lines that start with dots, and optionally a large
/// base64 attachment. CRLF line endings.
pub fn message(from: &str, to: &str, tag: &str, attachment_bytes: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: oxbridge test {tag}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@oxbridge.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b-{tag}\"\r\n\r\n--b-{tag}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus dem Scanner – naïve café, 日本語.\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\n. dot space\r\nend of text\r\n"
    )
    .into_bytes();
    if attachment_bytes > 0 {
        m.extend_from_slice(
            format!("--b-{tag}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"scan.bin\"\r\n\r\n").as_bytes(),
        );
        // Deterministic pseudo-random bytes (xorshift), base64 in 76-column lines.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ tag.len() as u64;
        let raw: Vec<u8> = (0..attachment_bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        for chunk in b64.as_bytes().chunks(76) {
            m.extend_from_slice(chunk);
            m.extend_from_slice(b"\r\n");
        }
    }
    m.extend_from_slice(format!("--b-{tag}--\r\n").as_bytes());
    m
}

/// A short plain-text message from `from` to itself, as a device typing
/// DATA by hand would send it.
pub fn short_message(from: &str, tag: &str, body: &str) -> String {
    format!("From: {from}\r\nTo: {from}\r\nSubject: {tag}\r\nMessage-ID: {}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n", message_id(tag))
}

/// The Message-ID of the test message tagged `tag`.
pub fn message_id(tag: &str) -> String {
    format!("<{tag}@oxbridge.test>")
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A fresh test [`message`] written to a file.
pub struct Message {
    pub tag: String,
    pub id: String,
    pub bytes: Vec<u8>,
    pub path: PathBuf,
}

impl Message {
    /// From `from` to itself, tagged `prefix-...`, with an attachment of
    /// `attachment` bytes (0: none), in `dir`.
    pub fn write(dir: &Path, prefix: &str, from: &str, attachment: usize) -> Message {
        let tag = unique(prefix);
        let bytes = message(from, from, &tag, attachment);
        let path = dir.join(format!("{tag}.eml"));
        std::fs::write(&path, &bytes).unwrap();
        Message {
            id: message_id(&tag),
            tag,
            bytes,
            path,
        }
    }
}

/// Read a message straight from Dovecot over IMAPS (as `user`, with a
/// token from the IDP), found by its Message-ID, waiting up to `wait_s`
/// seconds for its delivery. The client's output if it did not arrive.
pub fn read_from_dovecot(user: &str, message_id: &str, wait_s: &str) -> Result<Vec<u8>, String> {
    let up = upstream();
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("fetched.eml");
    let out = run(
        python("imap_fetch.py")
            .args(["--port", up.imaps_port(), "--cafile", up.ca()])
            .args(["--token-url", up.token_url()])
            .args(["--client-id", up.get("PUBLIC_CLIENT_ID"), "--user", user])
            .args(["--password", &up.password(user), "--message-id", message_id])
            .args(["--wait", wait_s])
            .arg("--out")
            .arg(&out_path),
        Duration::from_secs(90),
    );
    match out.status.success() {
        true => Ok(std::fs::read(out_path).unwrap()),
        false => Err(text(&out)),
    }
}

/// [`read_from_dovecot`], which must find it within 30 s.
pub fn fetch_from_dovecot(user: &str, message_id: &str) -> Vec<u8> {
    read_from_dovecot(user, message_id, "30").unwrap_or_else(|e| panic!("imap_fetch failed: {e}"))
}

/// Assert that the delivered message ends with exactly the bytes sent (the
/// servers only prepend trace headers).
pub fn assert_delivered_intact(delivered: &[u8], sent: &[u8]) {
    assert!(
        delivered.len() >= sent.len() && &delivered[delivered.len() - sent.len()..] == sent,
        "delivered message differs from what was sent ({} vs {} bytes); delivered head:\n{}",
        delivered.len(),
        sent.len(),
        String::from_utf8_lossy(&delivered[..delivered.len().min(1500)])
    );
}

/// The message `message_id` reached `user`'s INBOX, ending with `sent`.
pub fn assert_arrived(user: &str, message_id: &str, sent: &[u8]) {
    assert_delivered_intact(&fetch_from_dovecot(user, message_id), sent);
}

/// A conversation by hand, for replies the real clients hide.
pub struct Raw {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        Raw::over(TcpStream::connect(("127.0.0.1", port)).unwrap())
    }

    /// Connect from a chosen local address (loopback aliases stand for networks).
    pub fn connect_from(port: u16, local: &str) -> Raw {
        Raw::over(socket2_connect(local, port))
    }

    fn over(s: TcpStream) -> Raw {
        s.set_read_timeout(Some(READ_LIMIT)).unwrap();
        Raw {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    /// Send one line (CRLF added).
    pub fn send(&mut self, line: &str) {
        self.write(format!("{line}\r\n").as_bytes());
    }

    /// Send bytes as they are.
    pub fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Read one whole SMTP reply; returns all its lines joined with \n.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                return all + "<closed>";
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    }

    /// Read one line (with its CRLF); "<closed>" at end of stream.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => "<closed>".into(),
            Ok(_) => line,
        }
    }

    /// Read lines until one starts with `prefix`; returns them all.
    pub fn until(&mut self, prefix: &str) -> String {
        let mut all = String::new();
        loop {
            let line = self.line();
            all.push_str(&line);
            if line.starts_with(prefix) || line == "<closed>" {
                return all;
            }
        }
    }

    /// SMTP, after the greeting: EHLO, then AUTH PLAIN with an initial
    /// response; returns the reply to AUTH.
    pub fn smtp_login(&mut self, login: &str, password: &str) -> String {
        self.send("EHLO device.test");
        self.reply();
        self.send(&format!("AUTH PLAIN {}", plain_ir(login, password)));
        self.reply()
    }

    /// SMTP: MAIL FROM, RCPT TO and DATA, each accepted.
    pub fn envelope(&mut self, from: &str, to: &str) {
        self.send(&format!("MAIL FROM:<{from}>"));
        assert!(self.reply().starts_with("250 "));
        self.rcpt_data(to);
    }

    /// SMTP, after MAIL FROM: RCPT TO and DATA, each accepted.
    pub fn rcpt_data(&mut self, to: &str) {
        self.send(&format!("RCPT TO:<{to}>"));
        assert!(self.reply().starts_with("250 "));
        self.send("DATA");
        assert!(self.reply().starts_with("354 "));
    }

    /// IMAP, after the greeting: `a LOGIN`; returns the lines up to the
    /// tagged reply.
    pub fn imap_login(&mut self, user: &str, password: &str) -> String {
        self.send(&format!("a LOGIN \"{user}\" \"{password}\""));
        self.until("a ")
    }
}

/// A TCP connection to 127.0.0.1:`port` from the local address `local`.
pub fn socket2_connect(local: &str, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{local}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    let remote: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    socket.connect(&remote.into()).unwrap();
    socket.into()
}

/// A helper process of `tests/clients/` that prints `port N` once it
/// listens (a fake upstream, a TLS front); killed on drop.
pub struct Spawned(std::process::Child, pub u16);

impl Spawned {
    /// `python3 tests/clients/SCRIPT ARGS`, the test upstream's server
    /// certificate and key given as `--cert` and `--key`.
    pub fn python(script: &str, args: &[&str]) -> Spawned {
        let dir = upstream().dir();
        let mut child = python(script)
            .args(args)
            .args(["--cert", &format!("{dir}/tls/server.crt")])
            .args(["--key", &format!("{dir}/tls/server.key")])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{script} did not say its port: {line:?}"));
        Spawned(child, port)
    }

    /// `tests/clients/fake_exchange.py`: a server of `protocol` that
    /// answers at `stage` (`auth`, `mail`) with `reply`.
    pub fn fake_upstream(protocol: &str, stage: &str, reply: &str) -> Spawned {
        Spawned::python(
            "fake_exchange.py",
            &["--protocol", protocol, "--stage", stage, "--reply", reply],
        )
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
