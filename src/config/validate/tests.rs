//! The validator's tests: each check's error names its key.

use super::super::tests::{base, HASH};
use super::super::{Config, StoreBackend};

#[test]
fn redis_store_needs_a_url_and_an_explicit_key() {
    let store = |body: &str| Config::parse(&base(&format!("\n[store]\n{body}")));
    let ok = store(
        "backend = \"redis\"\nurl = \"rediss://:pw-marker@redis.internal:6380/2\"\nkey_env = \"K\"\nkey_prefix = \"ox1:\"",
    )
    .unwrap();
    assert_eq!(ok.store.backend, StoreBackend::Redis);
    assert!(!format!("{:?}", ok.store).contains("pw-marker"));
    for (body, key) in [
        ("backend = \"redis\"\nkey_env = \"K\"", "store.url: needed"),
        (
            "backend = \"redis\"\nurl = \"http://x\"\nkey_env = \"K\"",
            "store.url: must start with",
        ),
        (
            "backend = \"redis\"\nurl = \"redis://x:6379\"",
            "store.key_file: with backend = \"redis\"",
        ),
        ("url = \"redis://x:6379\"", "store.url: only used"),
        ("key_prefix = \"a:\"", "store.key_prefix: only used"),
    ] {
        let err = store(body).unwrap_err().to_string();
        assert!(err.contains(key), "{body}: {err}");
        assert!(!err.contains("pw-marker"));
    }
    let err =
        store("backend = \"redis\"\nurl = \"redis://:pw-marker@x:notaport\"\nkey_env = \"K\"")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("store.url") && !err.contains("pw-marker"),
        "{err}"
    );
}

#[test]
fn proxy_protocol_needs_proxy_from_and_only_it() {
    let with = |keys: &str| {
        Config::parse(&base("").replace(
            "allow_plaintext_auth = true\n",
            &format!("allow_plaintext_auth = true\n{keys}\n"),
        ))
    };
    let ok = with(
        "proxy_protocol = true\nproxy_from = [\"10.0.0.0/24\", \"192.168.1.7\", \"2001:db8::/32\"]",
    )
    .unwrap();
    assert_eq!(ok.listeners[0].proxy_from_networks().len(), 3);
    for (keys, want) in [
        (
            "proxy_protocol = true",
            "listener[0].proxy_from: required with proxy_protocol = true",
        ),
        (
            "proxy_protocol = true\nproxy_from = []",
            "listener[0].proxy_from: list at least one",
        ),
        (
            "proxy_protocol = true\nproxy_from = [\"10.0.0.0/33\"]",
            "listener[0].proxy_from: \"10.0.0.0/33\" is not a network",
        ),
        (
            "proxy_from = [\"10.0.0.0/24\"]",
            "listener[0].proxy_from: only used with proxy_protocol = true",
        ),
        (
            "proxy_protocol = false\nproxy_from = [\"10.0.0.0/24\"]",
            "listener[0].proxy_from: only used with proxy_protocol = true",
        ),
    ] {
        let err = with(keys).unwrap_err();
        assert!(err.starts_with(want), "{keys}: {err}");
    }
}

#[test]
fn a_tls_listener_takes_both_certificate_files_or_neither() {
    let tls = base("").replace("tls = \"none\"", "tls = \"starttls\"");
    let config = Config::parse(&tls).expect("no files: a self-signed certificate");
    assert!(config.listeners[0].cert_file.is_none());
    let half = tls.replace(
        "tls = \"starttls\"",
        "tls = \"starttls\"\ncert_file = \"/etc/hostname\"",
    );
    let err = Config::parse(&half).unwrap_err();
    assert!(
        err.starts_with("listener[0].key_file: required with cert_file"),
        "{err}"
    );
}

#[test]
fn tls_min_version_and_session_tickets_need_a_tls_listener_and_a_known_version() {
    for (keys, want) in [
        (
            "tls_min_version = \"1.0\"",
            "listener[0].tls_min_version: only for TLS listeners",
        ),
        (
            "tls_min_version = \"1.2\"",
            "listener[0].tls_min_version: only for TLS listeners",
        ),
        (
            "session_tickets = true",
            "listener[0].session_tickets: only for TLS listeners",
        ),
    ] {
        let text = base("").replace("tls = \"none\"", &format!("tls = \"none\"\n{keys}"));
        let err = Config::parse(&text).unwrap_err();
        assert!(err.starts_with(want), "{keys}: {err}");
    }
    for bad in ["1.3", "ssl3", "1"] {
        let text = base("").replace(
            "tls = \"none\"",
            &format!("tls = \"implicit\"\ntls_min_version = \"{bad}\""),
        );
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("tls_min_version"), "{bad}: {err}");
    }
    let text = base("").replace(
        "tls = \"none\"",
        "tls = \"implicit\"\ntls_min_version = \"1.0\"\nsession_tickets = true",
    );
    let config = Config::parse(&text).unwrap();
    assert!(config.listeners[0].legacy_tls());
}

#[test]
fn password_grant_refuses_a_hash_and_others_need_one() {
    let err = Config::parse(&base("").replace("client_credentials", "password")).unwrap_err();
    assert!(
        err.starts_with("account[0].password_hash: not used"),
        "{err}"
    );
    let text = base("").replace(&format!("password_hash = \"{HASH}\"\n"), "");
    let err = Config::parse(&text).unwrap_err();
    assert!(
        err.starts_with("account[0].password_hash: required"),
        "{err}"
    );
}

#[test]
fn bad_hash_is_named() {
    let err = Config::parse(&base("").replace(HASH, "plain-text")).unwrap_err();
    assert!(
        err.starts_with("account[0].password_hash: not a PHC string"),
        "{err}"
    );
}

#[test]
fn bad_upstream_is_named() {
    let err =
        Config::parse(&format!("[upstream]\nsmtp = \"nohostport\"\n{}", base(""))).unwrap_err();
    assert!(err.starts_with("upstream.smtp:"), "{err}");
}

#[test]
fn duplicate_login_and_bad_pattern_are_named() {
    let dup = "[[account]]\nlogin = \"SCANNER@example.test\"\ngrant = \"password\"\n";
    let err = Config::parse(&base(dup)).unwrap_err();
    assert!(err.starts_with("account[1].login:"), "{err}");
    let pat = "[[account]]\nlogin = \"a*@example.test\"\ngrant = \"password\"\n";
    let err = Config::parse(&base(pat)).unwrap_err();
    assert!(err.starts_with("account[1].login:"), "{err}");
}

#[test]
fn logins_and_mailboxes_that_are_no_mailbox_are_refused_at_load() {
    let cases = [
        (
            "login = \"*@exa/mple.test\"\ngrant = \"password\"\n",
            "account[1].login:",
        ),
        (
            "login = \"*@example.test%2f\"\ngrant = \"password\"\n",
            "account[1].login:",
        ),
        (
            "login = \"bo\\\\b@example.test\"\ngrant = \"password\"\n",
            "account[1].login:",
        ),
        (
            "login = \"bob@exa?mple.test\"\ngrant = \"password\"\n",
            "account[1].login:",
        ),
        (
            "login = \"printer\"\ngrant = \"password\"\n",
            "account[1].login:",
        ),
        (
            "login = \"printer\"\ngrant = \"password\"\nmailbox = \"scans@exa#mple.test\"\n",
            "account[1].mailbox:",
        ),
        (
            "login = \"printer\"\ngrant = \"password\"\nmailbox = \"a@b@example.test\"\n",
            "account[1].mailbox:",
        ),
    ];
    for (body, key) in cases {
        let err = Config::parse(&base(&format!("[[account]]\n{body}"))).unwrap_err();
        assert!(err.starts_with(key), "{body:?}: {err}");
    }
    // A local name is fine where the mailbox is set.
    let ok = "[[account]]\nlogin = \"printer\"\ngrant = \"password\"\nmailbox = \"scans@example.test\"\n";
    Config::parse(&base(ok)).unwrap();
}

#[test]
fn public_url_is_an_address_and_needs_the_admin_token() {
    let admin = |body: &str| {
        Config::parse(&format!(
            "[admin]\nlisten = \"127.0.0.1:9090\"\n{body}\n{}",
            base("")
        ))
    };
    let token = "token_file = \"/etc/hostname\"\n";
    assert!(admin(&format!(
        "{token}public_url = \"https://oxb.example.org:9090/admin/\""
    ))
    .is_ok());
    for bad in [
        "oxb.example.org",
        "https://",
        "https://u:p@oxb.example.org",
        "https://x/?a=1",
        "ftp://x",
    ] {
        let err = admin(&format!("{token}public_url = \"{bad}\"")).unwrap_err();
        assert!(err.starts_with("admin.public_url:"), "{bad}: {err}");
    }
    let err = admin("public_url = \"http://localhost:9090\"").unwrap_err();
    assert!(err.contains("need admin.token_file"), "{err}");
}
