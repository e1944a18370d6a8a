//! Devices with old TLS stacks (`tests/clients/oldtls.py`: Python's ssl
//! with the versions pinned, an old printer's cipher list, no certificate
//! check), the dialogues they hold, and the listeners that serve them.

use std::path::Path;
use std::process::Output;

use super::{client_json, python, run, text, upstream, CLIENT_LIMIT};

/// What an old device offers: versions, suites, where TLS starts.
#[derive(Clone, Copy, Debug)]
pub struct OldTls<'a> {
    pub port: u16,
    /// Lowest and highest TLS version offered: "1.0" ... "1.3".
    pub min: &'a str,
    pub max: &'a str,
    /// OpenSSL cipher list (TLS 1.2 and below).
    pub ciphers: &'a str,
    /// TLS from the first byte; else STARTTLS/STLS (or the script's "tls").
    pub implicit: bool,
    /// "smtp", "imap" or "pop3": whose STARTTLS and goodbye.
    pub proto: &'a str,
}

/// One step of a dialogue by hand (see `oldtls.py`).
#[derive(Clone, Debug)]
pub enum Step {
    /// Write these bytes exactly (no CRLF added).
    Send(String),
    /// Read one SMTP reply, all its lines.
    Reply,
    /// Read one line.
    Line,
    /// Read lines until one starts with this.
    Until(String),
    /// Start TLS now.
    Tls,
}

impl Step {
    /// Send `line` and CRLF.
    pub fn line(line: &str) -> Step {
        Step::Send(format!("{line}\r\n"))
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Step::Send(s) => serde_json::json!(["send", s]),
            Step::Reply => serde_json::json!(["reply"]),
            Step::Line => serde_json::json!(["line"]),
            Step::Until(p) => serde_json::json!(["until", p]),
            Step::Tls => serde_json::json!(["tls"]),
        }
    }
}

/// What an `oldtls.py` run saw.
pub struct TlsRun {
    pub out: Output,
    pub json: serde_json::Value,
}

impl TlsRun {
    pub fn ok(&self) -> bool {
        self.out.status.success() && self.json["ok"] == true
    }
    /// The TLS handshake itself failed (exit status 2).
    pub fn handshake_failed(&self) -> bool {
        self.out.status.code() == Some(2) && self.json["stage"] == "handshake"
    }
    fn field(&self, name: &str) -> &str {
        self.json[name].as_str().unwrap_or("")
    }
    /// "TLSv1.0" ... "TLSv1.3".
    pub fn version(&self) -> &str {
        self.field("version")
    }
    /// OpenSSL's name of the suite, e.g. "AES128-SHA".
    pub fn cipher(&self) -> &str {
        self.field("cipher")
    }
    /// The server sent a TLS session ticket (handshake mode).
    pub fn ticket(&self) -> bool {
        self.json["ticket"] == true
    }
    /// SHA-256 of the server's certificate, as `openssl x509 -fingerprint`.
    pub fn cert_sha256(&self) -> &str {
        self.field("cert_sha256")
    }
    /// The server's certificate, DER.
    pub fn cert_der(&self) -> Vec<u8> {
        let hex = self.field("cert_der");
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }
    /// Every read of the dialogue, in order, as received.
    pub fn transcript(&self) -> Vec<String> {
        self.json["transcript"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
    /// Everything, for an assertion's message.
    pub fn text(&self) -> String {
        text(&self.out)
    }
}

impl OldTls<'static> {
    /// A device that speaks only TLS `version` with the one suite `cipher`
    /// (RSA key exchange, CBC: what old printers offer).
    pub fn pinned(port: u16, version: &'static str, cipher: &'static str) -> OldTls<'static> {
        OldTls {
            port,
            min: version,
            max: version,
            ciphers: cipher,
            implicit: false,
            proto: "smtp",
        }
    }
}

impl OldTls<'_> {
    fn command(&self, mode: &str) -> std::process::Command {
        let mut cmd = python("oldtls.py");
        cmd.args(["--port", &self.port.to_string(), "--mode", mode])
            .args(["--min", self.min, "--max", self.max])
            .args(["--ciphers", self.ciphers, "--proto", self.proto]);
        if self.implicit {
            cmd.arg("--implicit");
        }
        cmd
    }

    fn finish(mut cmd: std::process::Command) -> TlsRun {
        let out = run(&mut cmd, CLIENT_LIMIT);
        let json = client_json(&out);
        TlsRun { out, json }
    }

    /// The handshake (after STARTTLS unless implicit), then the goodbye.
    pub fn handshake(&self) -> TlsRun {
        OldTls::finish(self.command("handshake"))
    }

    /// A dialogue by hand; TLS starts at connect (implicit) or at [`Step::Tls`].
    pub fn script(&self, steps: &[Step]) -> TlsRun {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("script.json");
        let json: Vec<serde_json::Value> = steps.iter().map(Step::json).collect();
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let mut cmd = self.command("script");
        cmd.arg("--script").arg(&path);
        OldTls::finish(cmd)
    }

    /// imaplib (IMAP) or poplib (POP3) as this device: log in, find
    /// `message_id`, FETCH BODY.PEEK[] or RETR it to `out`.
    pub fn fetch(&self, user: &str, password: &str, message_id: &str, out: &Path) -> TlsRun {
        let mode = match self.proto {
            "imap" => "imap-fetch",
            "pop3" => "pop3-retr",
            other => panic!("no fetch over {other}"),
        };
        let mut cmd = self.command(mode);
        cmd.args(["--user", user, "--password", password])
            .args(["--message-id", message_id])
            .arg("--out")
            .arg(out);
        OldTls::finish(cmd)
    }
}

/// A TLS `[[listener]]` on 127.0.0.1:`port` (0: any) with the test
/// upstream's certificate; `min_version` ("1.0", "1.1", "1.2") sets
/// `tls_min_version`, None leaves the default.
pub fn tls_listener(protocol: &str, tls: &str, min_version: Option<&str>, port: u16) -> String {
    let dir = upstream().dir();
    let certs =
        format!("cert_file = \"{dir}/tls/server.crt\"\nkey_file = \"{dir}/tls/server.key\"\n");
    tls_listener_with(protocol, tls, min_version, port, &certs)
}

/// A TLS `[[listener]]` without `cert_file`/`key_file`: oxbridge makes its
/// own certificate in `state_dir`.
pub fn self_signed_listener(
    protocol: &str,
    tls: &str,
    min_version: Option<&str>,
    port: u16,
) -> String {
    tls_listener_with(protocol, tls, min_version, port, "")
}

fn tls_listener_with(
    protocol: &str,
    tls: &str,
    min_version: Option<&str>,
    port: u16,
    certs: &str,
) -> String {
    let min = min_version
        .map(|v| format!("tls_min_version = \"{v}\"\n"))
        .unwrap_or_default();
    format!(
        "[[listener]]\nprotocol = \"{protocol}\"\nlisten = \"127.0.0.1:{port}\"\ntls = \"{tls}\"\n{certs}{min}"
    )
}

/// Debian's `openssl s_client` as an old device: TLS `version` only
/// ("1.0" ... "1.3"), the suites `ciphers`, after the STARTTLS (STLS) of
/// `starttls` ("smtp", "imap", "pop3") or implicit TLS (None); it ends
/// when the handshake is done (its input is empty). `-brief` prints the
/// outcome: "Protocol version: TLSv1", "Ciphersuite: AES128-SHA".
pub fn s_client(port: u16, version: &str, ciphers: &str, starttls: Option<&str>) -> Output {
    let flag = match version {
        "1.0" => "-tls1",
        "1.1" => "-tls1_1",
        "1.2" => "-tls1_2",
        _ => "-tls1_3",
    };
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_client", "-brief", flag, "-cipher", ciphers])
        .args(["-connect", &format!("127.0.0.1:{port}")]);
    if let Some(proto) = starttls {
        cmd.args(["-starttls", proto]);
    }
    run(&mut cmd, CLIENT_LIMIT)
}
