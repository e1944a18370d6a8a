//! Unit tests of parsing, defaults and loading, and the base config that
//! `validate.rs`'s tests vary.

use super::*;
use secrecy::ExposeSecret;

pub(super) const HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$SGsYHx3A0b4qK9nWwGGXkRkz0bTjv1z7EJn0P4sPjgA";

pub(super) fn base(extra: &str) -> String {
    format!(
        r#"
[oauth]
client_id = "id"
client_secret = "s3cret-value"
token_url = "http://127.0.0.1:1/token"

[[listener]]
protocol = "smtp"
listen = "127.0.0.1:2525"
tls = "none"
allow_plaintext_auth = true

[[account]]
login = "scanner@example.test"
password_hash = "{HASH}"
grant = "client_credentials"
{extra}
"#
    )
}

#[test]
fn minimal_config_parses_with_defaults() {
    let c = Config::parse(&base("")).unwrap();
    assert_eq!(c.upstream.smtp, DEFAULT_UPSTREAM_SMTP);
    assert_eq!(c.upstream.imap, DEFAULT_UPSTREAM_IMAP);
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.oauth.token_url(), "http://127.0.0.1:1/token");
}

#[test]
fn tenant_fills_the_default_endpoints() {
    let text = base("").replace(
        "token_url = \"http://127.0.0.1:1/token\"",
        "tenant = \"contoso.onmicrosoft.com\"",
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(
        c.oauth.token_url(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
}

#[test]
fn unknown_key_is_named() {
    let err = Config::parse(&base("colour = \"red\"")).unwrap_err();
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn bad_enum_value_is_named() {
    let err =
        Config::parse(&base("").replace("tls = \"none\"", "tls = \"sometimes\"")).unwrap_err();
    assert!(err.contains("tls") && err.contains("sometimes"), "{err}");
}

#[test]
fn client_secret_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "from-file-secret\n").unwrap();
    let text = base("").replace(
        "client_secret = \"s3cret-value\"",
        &format!("client_secret_file = \"{}\"", secret.display()),
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(
        c.oauth.client_secret.unwrap().expose_secret(),
        "from-file-secret"
    );
    std::fs::write(&secret, "  \n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("oauth.client_secret_file") && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn debug_output_hides_secrets() {
    let c = Config::parse(&base("")).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("s3cret-value"), "{dbg}");
    assert!(!dbg.contains("SGsYHx3A0b4q"), "{dbg}");
}

#[test]
fn host_port_forms() {
    assert_eq!(
        split_host_port("smtp.office365.com:587").unwrap(),
        ("smtp.office365.com", 587)
    );
    assert_eq!(split_host_port("[::1]:993").unwrap(), ("::1", 993));
    assert!(split_host_port("host").is_err());
    assert!(split_host_port("host:0").is_err());
    assert!(split_host_port(":25").is_err());
}
