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
    assert_eq!(c.upstream.address(Protocol::Smtp), DEFAULT_UPSTREAM_SMTP);
    assert_eq!(c.upstream.address(Protocol::Imap), DEFAULT_UPSTREAM_IMAP);
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

/// Each cloud's documented sign-in authority, Exchange Online resource
/// and mail hosts; explicit URLs and `[upstream]` addresses still win.
#[test]
fn cloud_presets_set_authority_scopes_and_hosts() {
    let cases = [
        (
            "global",
            "https://login.microsoftonline.com",
            "https://outlook.office.com",
            "https://outlook.office365.com/.default",
            [
                "smtp.office365.com:587",
                "outlook.office365.com:993",
                "outlook.office365.com:995",
            ],
        ),
        (
            "usgov",
            "https://login.microsoftonline.us",
            "https://outlook.office365.us",
            "https://outlook.office365.us/.default",
            [
                "smtp.office365.us:587",
                "outlook.office365.us:993",
                "outlook.office365.us:995",
            ],
        ),
        (
            "usgov-dod",
            "https://login.microsoftonline.us",
            "https://outlook-dod.office365.us",
            "https://outlook-dod.office365.us/.default",
            [
                "outlook-dod.office365.us:587",
                "outlook-dod.office365.us:993",
                "outlook-dod.office365.us:995",
            ],
        ),
        (
            "china",
            "https://login.partner.microsoftonline.cn",
            "https://partner.outlook.cn",
            "https://partner.outlook.cn/.default",
            [
                "smtp.partner.outlook.cn:587",
                "partner.outlook.cn:993",
                "partner.outlook.cn:995",
            ],
        ),
    ];
    for (cloud, authority, resource, app, hosts) in cases {
        let text = base("").replace(
            "token_url = \"http://127.0.0.1:1/token\"",
            &format!("tenant = \"contoso\"\ncloud = \"{cloud}\""),
        );
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{cloud}: {e}"));
        for (url, name) in [
            (c.oauth.token_url(), "token"),
            (c.oauth.device_code_url(), "devicecode"),
            (c.oauth.authorize_url(), "authorize"),
        ] {
            assert_eq!(
                url,
                format!("{authority}/contoso/oauth2/v2.0/{name}"),
                "{cloud}"
            );
        }
        let p = &c.providers()[0];
        assert_eq!(p.app_scopes(), [app], "{cloud}");
        assert_eq!(
            p.delegated_scopes(&[Protocol::Smtp, Protocol::Imap, Protocol::Pop3], false),
            [
                format!("{resource}/IMAP.AccessAsUser.All"),
                format!("{resource}/POP.AccessAsUser.All"),
                format!("{resource}/SMTP.Send"),
            ],
            "{cloud}"
        );
        let protocols = [Protocol::Smtp, Protocol::Imap, Protocol::Pop3];
        for (p, host) in protocols.into_iter().zip(hosts) {
            assert_eq!(c.upstream.address(p), host, "{cloud} {p}");
        }
    }
    let text = base("[upstream]\nimap = \"imap.example.test:993\"")
        .replace("[oauth]", "[oauth]\ncloud = \"china\"");
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.oauth.token_url(), "http://127.0.0.1:1/token");
    assert_eq!(c.upstream.address(Protocol::Imap), "imap.example.test:993");
    assert_eq!(c.upstream.address(Protocol::Pop3), "partner.outlook.cn:995");
    let err = Config::parse(&base("").replace("[oauth]", "[oauth]\ncloud = \"mars\"")).unwrap_err();
    assert!(err.contains("cloud") && err.contains("mars"), "{err}");
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
fn an_admin_listener_off_loopback_needs_a_token_file() {
    let admin = |listen: &str, extra: &str| format!("[admin]\nlisten = \"{listen}\"\n{extra}\n");
    for loopback in ["127.0.0.1:9090", "[::1]:9090"] {
        Config::parse(&base(&admin(loopback, ""))).unwrap();
    }
    let err = Config::parse(&base(&admin("0.0.0.0:9090", ""))).unwrap_err();
    assert!(
        err.starts_with(
            "admin.token_file: required when admin.listen (0.0.0.0:9090) is not a loopback address"
        ),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let path = dir.path().join("c.toml");
    let line = format!("token_file = \"{}\"", token.display());
    std::fs::write(&path, base(&admin("0.0.0.0:9090", &line))).unwrap();
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let c = Config::load(&path).unwrap();
    let loaded = c.admin.as_ref().unwrap().token.as_ref().unwrap();
    assert_eq!(loaded.expose_secret(), "0123456789abcdef0123");
    assert!(!format!("{:?}", c.admin).contains("0123456789abcdef0123"));
    std::fs::write(&token, "short\n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("admin.token_file") && err.contains("holds 5 characters; use at least 16"),
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
