//! The test upstream (Dovecot, Postfix and a small OAuth identity provider
//! on loopback, started by `tests/upstream/start`): started once per run,
//! located through its `upstream.json`, and the oxbridge configs that point
//! at it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::common::argon2_hash;

/// The test upstream's mailboxes.
pub const ALICE: &str = "alice@example.test";
pub const BOB: &str = "bob@example.test";
/// The local password of `scanner@example.test` in [`config`].
pub const SCANNER_PASSWORD: &str = "scanner-local-pass";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test upstream's settings (`upstream.json` written by its start script).
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
    /// The state directory (`tls/` holds its certificates).
    pub fn dir(&self) -> &str {
        self.get("OXB_UPSTREAM_DIR")
    }
    /// The server's own address for `protocol`, as [`config`] writes it.
    pub fn addr(&self, protocol: &str) -> String {
        match protocol {
            "smtp" => self.submission(),
            "imap" => format!("localhost:{}", self.imaps_port()),
            "pop3" => format!("localhost:{}", self.get("POP3S_PORT")),
            _ => panic!("no upstream for {protocol}"),
        }
    }
    /// The server's port for `protocol` on 127.0.0.1 (for a forwarder).
    pub fn loopback(&self, protocol: &str) -> String {
        self.addr(protocol).replace("localhost:", "127.0.0.1:")
    }
    /// A password for a test mailbox, e.g. alice@example.test.
    pub fn password(&self, user: &str) -> String {
        self.get("UPSTREAM_USERS")
            .split_whitespace()
            .find_map(|s| s.strip_prefix(&format!("{user}:")).map(String::from))
            .unwrap_or_else(|| panic!("no upstream user {user}"))
    }
    /// POST `body` (JSON) to the IDP's admin `path`: its answer.
    pub fn idp_post(&self, path: &str, body: &serde_json::Value) -> String {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-H",
                "content-type: application/json",
                "-d",
            ])
            .arg(body.to_string())
            .arg(format!("{}{}", self.get("IDP_URL"), path))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
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

/// Start (or find running) the test upstream, once per run.
pub fn upstream() -> &'static Upstream {
    static UPSTREAM: OnceLock<Upstream> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("tests/upstream/start"))
            // The Exchange-like front, on ports of its own (see continuity).
            .env("OXB_EXPIRE_SESSIONS", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run tests/upstream/start");
        assert!(
            out.status.success(),
            "tests/upstream/start failed (needs root on Debian; see tests/README.md):\n{}\n{}",
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
            .map(|(k, v)| {
                (
                    k,
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect();
        Upstream { env }
    })
}

/// A config for the test upstream with the usual accounts:
/// `scanner@example.test` (client_credentials, mailbox alice) and
/// `*@example.test` (password grant). `listeners` and `extra` are TOML.
pub fn config(listeners: &str, extra: &str) -> String {
    let up = upstream();
    format!(
        r#"
state_dir = "/tmp/oxbridge-test-state"

[log]
level = "debug"
format = "json"

[upstream]
smtp = "{smtp}"
imap = "{imap}"
pop3 = "{pop3}"
ca_file = "{ca}"

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
        smtp = up.addr("smtp"),
        imap = up.addr("imap"),
        pop3 = up.addr("pop3"),
        ca = up.ca(),
        client_id = up.get("APP_CLIENT_ID"),
        client_secret = up.get("APP_CLIENT_SECRET"),
        token_url = up.token_url(),
        hash = argon2_hash(SCANNER_PASSWORD),
    )
}

/// A `[[listener]]` on a free loopback port.
pub fn listener(protocol: &str, tls: &str, allow_plaintext: bool) -> String {
    let dir = upstream().dir();
    let certs = if tls == "none" {
        String::new()
    } else {
        format!("cert_file = \"{dir}/tls/server.crt\"\nkey_file = \"{dir}/tls/server.key\"\n")
    };
    format!(
        "[[listener]]\nprotocol = \"{protocol}\"\nlisten = \"127.0.0.1:0\"\ntls = \"{tls}\"\n{certs}allow_plaintext_auth = {allow_plaintext}\n"
    )
}

/// Plaintext listeners (passwords allowed), one per protocol, in order.
pub fn plain_listeners(protocols: &[&str]) -> String {
    protocols
        .iter()
        .map(|p| listener(p, "none", true))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `cfg` with the upstream for `protocol` at `to` (a forwarder, a fake, a
/// closed port) instead of the test upstream's own server.
pub fn reroute(cfg: &str, protocol: &str, to: &str) -> String {
    let from = format!("{protocol} = \"{}\"", upstream().addr(protocol));
    assert!(cfg.contains(&from), "no {from} in the config");
    cfg.replace(&from, &format!("{protocol} = \"{to}\""))
}

/// `cfg` with the upstream of every protocol at `to`.
pub fn reroute_all(cfg: &str, to: &str) -> String {
    ["smtp", "imap", "pop3"]
        .iter()
        .fold(cfg.to_string(), |cfg, protocol| reroute(&cfg, protocol, to))
}

/// `cfg` with its token endpoint at `url`.
pub fn with_token_url(cfg: &str, url: &str) -> String {
    cfg.replace(upstream().token_url(), url)
}

/// `cfg` with its own `state_dir`.
pub fn with_state_dir(cfg: &str, dir: &Path) -> String {
    cfg.replace(
        "state_dir = \"/tmp/oxbridge-test-state\"",
        &format!("state_dir = \"{}\"", dir.display()),
    )
}
