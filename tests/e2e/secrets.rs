//! No password, access token, refresh token or client secret reaches a log
//! line (at trace level, libraries included), a reply to a device, the
//! metrics, the status page, or the `Debug` output of the configuration: full sessions with marker values,
//! then a search for every marker.

use std::process::{Command, Output};

use base64::Engine;
use secrecy::SecretString;

use crate::harness::*;

fn marker(kind: &str) -> String {
    format!("MARKER{kind}{}", unique("x").replace('-', ""))
}

/// A real access token for alice from the test IDP, used as a marker: it
/// is random, and the upstream accepts it.
fn real_access_token() -> String {
    let up = upstream();
    let out = run(
        Command::new("curl").args([
            "-sS",
            up.token_url(),
            "-d",
            "grant_type=password",
            "-d",
            &format!("client_id={}", up.get("PUBLIC_CLIENT_ID")),
            "-d",
            &format!("username={ALICE}"),
            "-d",
            &format!("password={}", up.password(ALICE)),
        ]),
        CLIENT_LIMIT,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

fn all_output(outputs: &[Output]) -> String {
    outputs.iter().map(text).collect()
}

#[test]
fn no_secret_reaches_logs_replies_or_debug() {
    let up = upstream();
    let (local_pw, ropc_pw, wrong_pw) = (marker("PW"), marker("ROPC"), marker("WRONG"));
    let (client_secret, refresh_1, refresh_2) = (marker("CS"), marker("RTA"), marker("RTB"));
    let access = real_access_token();
    let (rt2, at) = (refresh_2.clone(), access.clone());
    let ropc = ropc_pw.clone();
    // The token endpoint: refresh rotates to refresh_2; ROPC takes ropc_pw.
    let idp = FakeHttp::start(move |req, _| {
        let grant = form_field(&req.body, "grant_type").unwrap_or_default();
        let ok = format!(
            r#"{{"token_type":"Bearer","expires_in":3600,"access_token":"{at}","refresh_token":"{rt2}"}}"#
        );
        match grant.as_str() {
            "refresh_token" => (200, ok),
            "password" if form_field(&req.body, "password").as_deref() == Some(ropc.as_str()) => (200, ok),
            _ => (400, r#"{"error":"invalid_grant","error_description":"AADSTS50126: Error validating credentials."}"#.into()),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let extra = format!(
        "[[account]]\nlogin = \"delegated@example.test\"\npassword_hash = \"{}\"\ngrant = \"refresh_token\"\nmailbox = \"{ALICE}\"\n\n{ADMIN}",
        argon2_hash(&local_pw)
    );
    let cfg = config(&plain_listeners(&["smtp", "imap", "pop3"]), &extra);
    let cfg = with_state_dir(
        &with_token_url(&cfg, &format!("{}/t/oauth2/v2.0/token", idp.base)),
        &state,
    )
    .replace(up.get("APP_CLIENT_SECRET"), &client_secret);
    let cfg_path = write_config(dir.path(), &cfg);
    let config = oxbridge::config::Config::load(&cfg_path).unwrap();
    oxbridge::open_store(&config)
        .unwrap()
        .save(
            "delegated@example.test",
            &SecretString::from(refresh_1.clone()),
        )
        .unwrap();

    let proxy = Proxy::start_with_env(&cfg, &[("RUST_LOG", "trace")]);
    let m = Message::write(dir.path(), "secrets", ALICE, 0);
    let smtp = |login: &str, password: &str| {
        Smtp {
            login,
            password,
            ..Smtp::scanner(proxy.port(0))
        }
        .smtplib(&m.path)
    };
    let (imap, pop3) = (proxy.port(1), proxy.port(2));
    let outputs = vec![
        smtp("delegated@example.test", &local_pw),
        smtp("delegated@example.test", &wrong_pw),
        Client::new(imap, ALICE, &ropc_pw).imap("login", &[]),
        Client::new(imap, ALICE, &wrong_pw).imap("login", &[]),
        Client::new(pop3, "delegated@example.test", &local_pw).pop3("login", &[]),
        Client::new(pop3, "nobody@nowhere.test", &wrong_pw).pop3("login", &[]),
    ];
    let expect_ok = [true, false, true, false, true, false];
    for (o, ok) in outputs.iter().zip(expect_ok) {
        assert_eq!(o.status.success(), ok, "{}\n{}", text(o), proxy.logs());
    }
    fetch_from_dovecot(ALICE, &m.id);
    // What the admin endpoint and `oxbridge check` print count as replies.
    let (_, metrics) = curl(proxy.admin_addr(), "/metrics");
    assert!(metrics.contains("oxbridge_sessions_total"));
    let (_, page) = curl(proxy.admin_addr(), "/");
    assert!(page.contains("Last login failures"), "{page}");
    let metrics = metrics + &page;
    let check = oxbridge(&["check"], &cfg_path);
    assert!(
        text(&check).contains("delegated@example.test smtp: OK"),
        "{}",
        text(&check)
    );
    let mut outputs = outputs;
    outputs.push(check);
    let logs = proxy.logs();
    assert!(logs.contains("TRACE"), "trace logging was not on");
    let replies = all_output(&outputs) + &metrics;
    let debug = format!("{config:?}");
    let secrets = [
        ("local password", &local_pw),
        ("ROPC password", &ropc_pw),
        ("wrong password", &wrong_pw),
        ("client secret", &client_secret),
        ("refresh token", &refresh_1),
        ("rotated refresh token", &refresh_2),
        ("access token", &access),
    ];
    for (what, value) in secrets {
        assert!(!logs.contains(value.as_str()), "the {what} reached the log");
        assert!(
            !replies.contains(value.as_str()),
            "the {what} reached a device"
        );
        assert!(
            !debug.contains(value.as_str()),
            "the {what} is in Debug of the config"
        );
    }
    // Not even base64-encoded (a SASL or XOAUTH2 string in a log).
    for (what, value) in [("local password", &local_pw), ("access token", &access)] {
        let b64 = plain_ir("delegated@example.test", value);
        assert!(
            !logs.contains(&b64[8..40]),
            "the {what} reached the log in base64"
        );
    }
    let xoauth = base64::engine::general_purpose::STANDARD
        .encode(format!("user={ALICE}\x01auth=Bearer {access}\x01\x01"));
    assert!(
        !logs.contains(&xoauth[20..80]),
        "the XOAUTH2 string reached the log"
    );
}

/// A device may type its password into the user field, or into SASL
/// PLAIN's authorization identity: over SMTP, IMAP and POP3, neither the
/// log (at trace level) nor the status page shows it, raw or in base64.
#[test]
fn a_password_typed_as_the_login_or_the_authzid_is_not_logged_or_shown() {
    let (as_login, as_authzid) = (marker("LOGIN"), marker("AUTHZID"));
    let extra = format!("{ADMIN}\n[limits]\nlogin_delay_ms = 1\n");
    let cfg = config(&plain_listeners(&["smtp", "imap", "pop3"]), &extra);
    let proxy = Proxy::start_with_env(&cfg, &[("RUST_LOG", "trace")]);
    let (smtp, imap, pop3) = (proxy.port(0), proxy.port(1), proxy.port(2));
    let with_authzid = base64::engine::general_purpose::STANDARD.encode(format!(
        "{as_authzid}\0scanner@example.test\0{SCANNER_PASSWORD}"
    ));
    let mut replies = Vec::new();
    let mut c = Raw::connect(smtp);
    c.reply();
    replies.push(c.smtp_login(&as_login, SCANNER_PASSWORD));
    c.send(&format!("AUTH PLAIN {with_authzid}"));
    replies.push(c.reply());
    let mut c = Raw::connect(imap);
    c.line();
    replies.push(c.imap_login(&as_login, SCANNER_PASSWORD));
    c.send(&format!("b AUTHENTICATE PLAIN {with_authzid}"));
    replies.push(c.until("b "));
    let mut c = Raw::connect(pop3);
    c.line();
    c.send(&format!("USER {as_login}"));
    c.line();
    c.send(&format!("PASS {SCANNER_PASSWORD}"));
    replies.push(c.line());
    c.send(&format!("AUTH PLAIN {with_authzid}"));
    replies.push(c.line());
    for r in &replies {
        assert!(
            r.contains("535 ") || r.contains(" NO ") || r.starts_with("-ERR"),
            "a login went through: {replies:#?}"
        );
    }
    let (_, page) = curl(proxy.admin_addr(), "/");
    assert!(page.contains("Last login failures"), "{page}");
    let logs = proxy.logs();
    assert!(logs.contains("login failed"), "{logs}");
    let typed_login_b64 = plain_ir(&as_login, SCANNER_PASSWORD);
    for (what, value) in [
        ("login", as_login.as_str()),
        ("authzid", as_authzid.as_str()),
        ("login in base64", &typed_login_b64[4..28]),
        ("authzid in base64", &with_authzid[..24]),
    ] {
        assert!(
            !logs.contains(value),
            "the password typed as the {what} reached the log:\n{logs}"
        );
        assert!(
            !page.contains(value),
            "the password typed as the {what} reached the status page"
        );
    }
}
