//! Shared by the end-to-end tests: the real upstream (started by the
//! project's own harness, `tests/upstream/start`), an oxbridge process with
//! a generated config, real clients (swaks, Python's smtplib/imaplib), and
//! small fault injectors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const SCANNER_PASSWORD: &str = "scanner-local-pass";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real upstream's settings (`upstream.json` written by the harness).
pub struct Upstream {
    pub env: HashMap<String, String>,
}

impl Upstream {
    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("upstream.json has no {key}"))
    }
    pub fn submission(&self) -> String {
        format!("localhost:{}", self.get("SUBMISSION_PORT"))
    }
    pub fn imaps_port(&self) -> &str {
        self.get("IMAPS_PORT")
    }
    pub fn token_url(&self) -> &str {
        self.get("TOKEN_URL")
    }
    pub fn ca(&self) -> &str {
        self.get("UPSTREAM_CA")
    }
    /// A password for a test mailbox, e.g. alice@example.test.
    pub fn password(&self, user: &str) -> String {
        self.get("UPSTREAM_USERS")
            .split_whitespace()
            .find_map(|s| s.strip_prefix(&format!("{user}:")).map(String::from))
            .unwrap_or_else(|| panic!("no upstream user {user}"))
    }
    pub fn idp_get(&self, path: &str) -> serde_json::Value {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                &format!("{}{}", self.get("IDP_URL"), path),
            ])
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).expect("IDP answers JSON")
    }
}

/// Start (or find running) the real upstream, once per test binary.
pub fn upstream() -> &'static Upstream {
    static UPSTREAM: OnceLock<Upstream> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("tests/upstream/start"))
            .stdin(Stdio::null())
            .output()
            .expect("run tests/upstream/start");
        assert!(
            out.status.success(),
            "tests/upstream/start failed (needs root on Debian; see tests/upstream/README.md):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("upstream ready: "))
            .expect("start prints 'upstream ready: DIR' last")
            .trim()
            .to_string();
        let json = std::fs::read(Path::new(&dir).join("upstream.json")).expect("upstream.json");
        let map: HashMap<String, serde_json::Value> = serde_json::from_slice(&json).unwrap();
        let env = map
            .into_iter()
            .map(|(k, v)| (k, v.as_str().map(String::from).unwrap_or_else(|| v.to_string())))
            .collect();
        Upstream { env }
    })
}

pub fn argon2_hash(password: &str) -> String {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string()
}

/// A config for the test upstream with the usual accounts:
/// `scanner@example.test` (client_credentials, mailbox alice) and
/// `*@example.test` (password grant). `listeners` and `extra` are TOML.
pub fn config(up: &Upstream, upstream_section: &str, listeners: &str, extra: &str) -> String {
    format!(
        r#"
state_dir = "/tmp/oxbridge-test-state"

[log]
level = "debug"
format = "json"

[upstream]
smtp = "{smtp}"
imap = "localhost:{imaps}"
pop3 = "localhost:{pop3s}"
ca_file = "{ca}"
{upstream_section}

[oauth]
client_id = "{client_id}"
client_secret = "{client_secret}"
token_url = "{token_url}"

{listeners}

[[account]]
login = "scanner@example.test"
password_hash = "{hash}"
grant = "client_credentials"
mailbox = "alice@example.test"

[[account]]
login = "*@example.test"
grant = "password"

{extra}
"#,
        smtp = up.submission(),
        imaps = up.get("IMAPS_PORT"),
        pop3s = up.get("POP3S_PORT"),
        ca = up.ca(),
        client_id = up.get("APP_CLIENT_ID"),
        client_secret = up.get("APP_CLIENT_SECRET"),
        token_url = up.token_url(),
        hash = argon2_hash(SCANNER_PASSWORD),
    )
}

/// A `[[listener]]` on a free loopback port.
pub fn listener(protocol: &str, tls: &str, allow_plaintext: bool) -> String {
    let up = upstream();
    let dir = up.get("OXB_UPSTREAM_DIR");
    let certs = if tls == "none" {
        String::new()
    } else {
        format!("cert_file = \"{dir}/tls/server.crt\"\nkey_file = \"{dir}/tls/server.key\"\n")
    };
    format!(
        "[[listener]]\nprotocol = \"{protocol}\"\nlisten = \"127.0.0.1:0\"\ntls = \"{tls}\"\n{certs}allow_plaintext_auth = {allow_plaintext}\n"
    )
}

/// A running oxbridge process; its log lines (JSON) are collected.
pub struct Proxy {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    pub addrs: Vec<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Proxy::start_with_env(config, &[])
    }

    /// Start with extra environment variables (RUST_LOG=trace, say).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oxbridge.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn oxbridge");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let want = config.matches("[[listener]]").count();
        let deadline = Instant::now() + Duration::from_secs(20);
        let addrs = loop {
            let found: Vec<SocketAddr> = logs
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["message"] == "listening")
                .filter_map(|v| v["address"].as_str().and_then(|a| a.parse().ok()))
                .collect();
            if found.len() == want {
                break found;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "oxbridge exited with {status}:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "oxbridge did not listen:\n{}",
                logs.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Proxy {
            child,
            logs,
            addrs,
            _dir: dir,
        }
    }

    pub fn port(&self, i: usize) -> u16 {
        self.addrs[i].port()
    }

    /// The admin endpoint's address (from its "admin endpoint listening" line).
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_log(&["admin endpoint listening"]);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["address"].as_str().unwrap().parse().unwrap()
    }

    /// The config file the proxy runs with (rewrite it, then `signal("HUP")`).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("oxbridge.toml")
    }

    pub fn signal(&self, sig: &str) {
        unsafe_kill(self.child.id(), sig);
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Wait until a log line contains every one of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(l) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the proxy process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory of the proxy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "oxbridge ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a command with a time limit; returns its output.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} took longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(repo().join("tests/clients").join(script));
    c
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
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        for chunk in b64.as_bytes().chunks(76) {
            m.extend_from_slice(chunk);
            m.extend_from_slice(b"\r\n");
        }
    }
    m.extend_from_slice(format!("--b-{tag}--\r\n").as_bytes());
    m
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

/// Read a message back straight from Dovecot over IMAPS (as `user`, with a
/// token from the IDP), found by its Message-ID; waits for delivery.
pub fn fetch_from_dovecot(user: &str, message_id: &str) -> Vec<u8> {
    let up = upstream();
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("fetched.eml");
    let out = run(
        python("imap_fetch.py")
            .args([
                "--port",
                up.imaps_port(),
                "--cafile",
                up.ca(),
                "--token-url",
                up.token_url(),
            ])
            .args(["--client-id", up.get("PUBLIC_CLIENT_ID"), "--user", user])
            .args(["--password", &up.password(user), "--message-id", message_id])
            .arg("--out")
            .arg(&out_path),
        Duration::from_secs(90),
    );
    assert!(
        out.status.success(),
        "imap_fetch failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(out_path).unwrap()
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

/// A minimal SMTP conversation by hand, for replies the real clients hide.
pub struct Raw {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Raw {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }
    pub fn send(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
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
}

/// A TCP server that answers every HTTP request with `response` (a fault
/// injector for the token endpoint). Returns its URL.
pub fn http_responder(response: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
                let _ = s.write_all(response.as_bytes());
            });
        }
    });
    format!("http://{addr}/tenant/oauth2/v2.0/token")
}

/// A port with nothing listening on it.
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A TCP forwarder to `target` that counts HTTP requests (lines starting
/// with "POST " or "GET " at the start of a read) and holds each one back
/// by `delay`, so that concurrent token requests would overlap.
pub fn counting_forwarder(
    target: &str,
    delay: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let target = target.to_string();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let server = match TcpStream::connect(&target) {
                Ok(s) => s,
                Err(_) => continue,
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if buf.starts_with(b"POST ") || buf.starts_with(b"GET ") {
                        seen.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(delay);
                    }
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, count)
}

impl Raw {
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
}

/// One request a [`FakeHttp`] received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub target: String,
    pub body: String,
}

/// A real HTTP server on loopback whose answers a test scripts: the
/// handler gets each request (and how many came before it) and returns
/// (status, JSON body).
pub struct FakeHttp {
    pub base: String,
    pub log: Arc<Mutex<Vec<Received>>>,
}

impl FakeHttp {
    pub fn start<F>(handler: F) -> FakeHttp
    where
        F: Fn(&Received, usize) -> (u16, String) + Send + Sync + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let log: Arc<Mutex<Vec<Received>>> = Default::default();
        let seen = log.clone();
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for stream in l.incoming().flatten() {
                let (seen, handler) = (seen.clone(), handler.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut first = String::new();
                    if reader.read_line(&mut first).is_err() {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    let _ = reader.read_exact(&mut body);
                    let mut parts = first.split_whitespace();
                    let req = Received {
                        method: parts.next().unwrap_or("").to_string(),
                        target: parts.next().unwrap_or("").to_string(),
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    let n = {
                        let mut log = seen.lock().unwrap();
                        log.push(req.clone());
                        log.len() - 1
                    };
                    let (status, json) = handler(&req, n);
                    let mut w = stream;
                    let _ = write!(
                        w,
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                        json.len()
                    );
                });
            }
        });
        FakeHttp { base, log }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }
}

/// A form field of an `application/x-www-form-urlencoded` body.
pub fn form_field(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Raw {
    /// Connect from a chosen local address (loopback aliases stand for networks).
    pub fn connect_from(port: u16, local: &str) -> Raw {
        let socket = socket2_connect(local, port);
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Raw {
            writer: socket.try_clone().unwrap(),
            reader: BufReader::new(socket),
        }
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

/// A TCP forwarder to `target` the test controls: it counts open and peak
/// connections, and can cut every connection once `cut_after` bytes went
/// from client to server (a mail server that dies mid-DATA), or once
/// `cut_down_after` bytes came back (one that dies mid-FETCH).
pub struct Forwarder {
    pub addr: SocketAddr,
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    pub max: Arc<std::sync::atomic::AtomicUsize>,
}

impl Forwarder {
    pub fn start(target: &str, cut_after: Option<usize>) -> Forwarder {
        Forwarder::start_cutting(target, cut_after, None)
    }

    pub fn start_cutting(
        target: &str,
        cut_after: Option<usize>,
        cut_down_after: Option<usize>,
    ) -> Forwarder {
        Forwarder::start_on("127.0.0.1:0", target, cut_after, cut_down_after)
    }

    /// A forwarder listening on `bind` (another loopback address, say).
    pub fn start_on(
        bind: &str,
        target: &str,
        cut_after: Option<usize>,
        cut_down_after: Option<usize>,
    ) -> Forwarder {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let l = TcpListener::bind(bind).unwrap();
        let addr = l.local_addr().unwrap();
        let (open, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, m, target) = (open.clone(), max.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in l.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                // The proxy closes a session before it opens the next one, but
                // the threads below notice that close a moment later: give
                // them that moment before counting the newcomer. (A session
                // that really overlaps lives far longer than this.)
                std::thread::sleep(Duration::from_millis(50));
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                // Counted closed at the first end of either side, before
                // anyone can learn of it (and open the next connection).
                let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let close = {
                    let (o, done) = (o.clone(), done.clone());
                    move || {
                        if !done.swap(true, Ordering::SeqCst) {
                            o.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                };
                let close_too = close.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    let mut sent = 0usize;
                    loop {
                        let n = match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cut_after.is_some_and(|limit| sent + n > limit) {
                            break;
                        }
                        sent += n;
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    // Cut both ways at once.
                    close();
                    let _ = server.shutdown(std::net::Shutdown::Both);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    let mut received = 0usize;
                    loop {
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cut_down_after.is_some_and(|limit| received + n > limit) {
                            let _ = s_read.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        received += n;
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    close_too();
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Forwarder { addr, open, max }
    }

    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until no connection is open through the forwarder.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.open() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

// ---- the admin endpoint, over HTTP with curl

/// `curl` an admin URL: (HTTP status, body).
pub fn curl(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = run(
        Command::new("curl").args([
            "-sS",
            "-m",
            "20",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ]),
        Duration::from_secs(120),
    );
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = all.rsplit_once('\n').expect("curl output");
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Prometheus text format: series (name with its labels) -> value.
pub fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = curl(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_string(), value.parse::<f64>().expect(l))
        })
        .collect()
}

pub fn value(m: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}
