//! `oxbridge login` against a token endpoint written for these tests (a real
//! HTTP server on loopback): the device flow's success, pending, slow_down,
//! decline and expiry; the PKCE code exchange; what lands in the store.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::*;
use secrecy::ExposeSecret;
use sha2::Digest;

const ACCOUNT: &str = "delegated@example.test";

/// A config with one `refresh_token` account whose endpoints are `base`.
fn write_config(dir: &std::path::Path, base: &str) -> std::path::PathBuf {
    let cfg = format!(
        r#"
state_dir = "{state}"

[oauth]
client_id = "public-client"
token_url = "{base}/tenant/oauth2/v2.0/token"
device_code_url = "{base}/tenant/oauth2/v2.0/devicecode"
authorize_url = "{base}/tenant/oauth2/v2.0/authorize"

[[listener]]
protocol = "smtp"
listen = "127.0.0.1:0"
tls = "none"

[[listener]]
protocol = "imap"
listen = "127.0.0.1:0"
tls = "none"

[[account]]
login = "{ACCOUNT}"
password_hash = "{hash}"
grant = "refresh_token"
mailbox = "shared-box@example.test"
"#,
        state = dir.join("state").display(),
        hash = argon2_hash("local"),
    );
    let path = dir.join("oxbridge.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn stored_token(config: &std::path::Path) -> Option<String> {
    let config = oxbridge::config::Config::load(config).unwrap();
    let store = oxbridge::open_store(&config).unwrap();
    store
        .load(ACCOUNT)
        .unwrap()
        .map(|t| t.expose_secret().to_string())
}

fn tokens(refresh: &str) -> (u16, String) {
    (
        200,
        format!(
            r#"{{"token_type":"Bearer","expires_in":3600,"access_token":"at-x","refresh_token":"{refresh}","scope":"x"}}"#
        ),
    )
}

fn oauth_error(code: &str) -> (u16, String) {
    (
        400,
        format!(r#"{{"error":"{code}","error_description":"AADSTS70016: {code}"}}"#),
    )
}

/// A device-flow endpoint whose token polls answer `polls` in turn (then
/// `expired_token`).
fn device_endpoint(polls: Vec<(u16, String)>) -> FakeHttp {
    let polls = std::sync::Mutex::new(polls.into_iter());
    FakeHttp::start(move |req, _| {
        if req.target.ends_with("/devicecode") {
            return (
                200,
                r#"{"device_code":"dc-1","user_code":"ABCD-EFGH","verification_uri":"https://microsoft.com/devicelogin","expires_in":900,"interval":1,"message":"x"}"#.into(),
            );
        }
        polls
            .lock()
            .unwrap()
            .next()
            .unwrap_or_else(|| oauth_error("expired_token"))
    })
}

fn login(config: &std::path::Path, extra: &[&str]) -> std::process::Output {
    run(
        Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .args(["login", ACCOUNT, "--config"])
            .arg(config)
            .args(extra),
        Duration::from_secs(60),
    )
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn device_flow_pending_then_success_is_stored_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let idp = device_endpoint(vec![
        oauth_error("authorization_pending"),
        tokens("rt-device-MARKER"),
    ]);
    let config = write_config(dir.path(), &idp.base);
    let out = login(&config, &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("https://microsoft.com/devicelogin") && t.contains("ABCD-EFGH"),
        "{t}"
    );
    assert!(
        !t.contains("rt-device-MARKER"),
        "the refresh token was printed"
    );
    assert_eq!(stored_token(&config).as_deref(), Some("rt-device-MARKER"));

    let requests = idp.requests();
    let devicecode = &requests[0];
    let scope = form_field(&devicecode.body, "scope").unwrap();
    // The scopes of the protocols that have listeners, plus offline_access; not POP.
    assert!(
        scope.contains("https://outlook.office.com/SMTP.Send"),
        "{scope}"
    );
    assert!(
        scope.contains("https://outlook.office.com/IMAP.AccessAsUser.All"),
        "{scope}"
    );
    assert!(
        scope.contains("offline_access") && !scope.contains("POP"),
        "{scope}"
    );
    assert_eq!(
        form_field(&devicecode.body, "login_hint").as_deref(),
        Some("shared-box@example.test")
    );
    let polls: Vec<_> = requests
        .iter()
        .filter(|r| r.target.ends_with("/token"))
        .collect();
    assert_eq!(polls.len(), 2);
    assert_eq!(
        form_field(&polls[0].body, "device_code").as_deref(),
        Some("dc-1")
    );

    // Nothing in the state directory holds the token in clear text.
    for entry in walk(&dir.path().join("state")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(6).any(|w| w == b"MARKER"),
            "clear text in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

#[test]
fn device_flow_slow_down_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let idp = device_endpoint(vec![oauth_error("slow_down"), tokens("rt-slow")]);
    let config = write_config(dir.path(), &idp.base);
    let started = std::time::Instant::now();
    let out = login(&config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    // RFC 8628: after slow_down the interval grows by 5 s.
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stored_token(&config).as_deref(), Some("rt-slow"));
}

#[test]
fn device_flow_decline_and_expiry_fail_clearly() {
    for (error, words) in [
        ("authorization_declined", "declined"),
        ("access_denied", "declined"),
        ("expired_token", "expired"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let idp = device_endpoint(vec![
            oauth_error("authorization_pending"),
            oauth_error(error),
        ]);
        let config = write_config(dir.path(), &idp.base);
        let out = login(&config, &[]);
        assert_eq!(out.status.code(), Some(1), "{error}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(words),
            "{error}: {}",
            text(&out)
        );
        assert_eq!(stored_token(&config), None);
    }
}

#[test]
fn login_refuses_other_grants_and_unknown_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:9");
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .args(["login", "nobody@x.test", "--config"])
            .arg(&config),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("nobody@x.test"));
}

#[test]
fn browser_flow_exchanges_the_code_with_pkce() {
    let dir = tempfile::tempdir().unwrap();
    let challenge = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = challenge.clone();
    let idp = FakeHttp::start(move |req, _| {
        let verifier = form_field(&req.body, "code_verifier").unwrap_or_default();
        let s256 = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()));
        if form_field(&req.body, "grant_type").as_deref() == Some("authorization_code")
            && form_field(&req.body, "code").as_deref() == Some("code-123")
            && s256 == *seen.lock().unwrap()
        {
            tokens("rt-pkce")
        } else {
            oauth_error("invalid_grant")
        }
    });
    let config = write_config(dir.path(), &idp.base);
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxbridge"))
        .args(["login", ACCOUNT, "--browser", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("a URL is printed").unwrap();
        if let Some(u) = line
            .trim()
            .strip_prefix(&format!("{}/tenant/oauth2/v2.0/authorize?", idp.base))
        {
            break u.to_string();
        }
    };
    let param = |name: &str| {
        form_field(&url, name).unwrap_or_else(|| panic!("authorize URL lacks {name}: {url}"))
    };
    assert_eq!(param("code_challenge_method"), "S256");
    assert_eq!(param("response_type"), "code");
    assert_eq!(param("login_hint"), "shared-box@example.test");
    assert!(param("scope").contains("offline_access"));
    *challenge.lock().unwrap() = param("code_challenge");
    let redirect = param("redirect_uri");
    assert!(redirect.starts_with("http://localhost:"), "{redirect}");
    let port = redirect
        .trim_start_matches("http://localhost:")
        .trim_end_matches('/');
    // The browser comes back: first a stray request with a wrong state, then ours.
    let wrong = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/?code=evil&state=nope"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&wrong.stdout), "400");
    let back = Command::new("curl")
        .args([
            "-sS",
            &format!(
                "http://127.0.0.1:{port}/?code=code-123&state={}",
                param("state")
            ),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&back.stdout).contains("close this window"));
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert_eq!(stored_token(&config).as_deref(), Some("rt-pkce"));
    let exchange = idp.requests().into_iter().last().unwrap();
    assert_eq!(
        form_field(&exchange.body, "redirect_uri").as_deref(),
        Some(redirect.as_str())
    );
}
