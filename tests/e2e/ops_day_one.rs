//! An operator's first day: a test message sent with `oxbridge check
//! ACCOUNT --send-to ADDRESS` through the real path (Postfix, or the Graph
//! stand-in) and read back from Dovecot; an account limited with
//! `protocols = ["smtp"]` refused over IMAP and POP3 with the protocols'
//! own failure, a logged reason, no token request and no upstream dial,
//! while SMTP still works; and relay networks past private address space refused at load
//! (`check --offline` and `run` exit 2) while wide private ones get a
//! warning.

use std::process::Output;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::harness::*;

/// A printer whose password may only send.
const PRINTER: &str = "printer@example.test";

/// The line of `out` that starts with `prefix`.
fn line_of<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

/// The Message-ID at the end of a `--send-to` line.
fn message_id_of(line: &str) -> String {
    line.rsplit_once("; Message-ID ")
        .map(|(_, id)| id.trim().to_string())
        .unwrap_or_else(|| panic!("no Message-ID in {line:?}"))
}

/// `oxbridge ARGS --config` of `cfg`, written to a directory of its own.
fn oxbridge_with(args: &[&str], cfg: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    oxbridge(args, &write_config(dir.path(), cfg))
}

#[test]
fn send_to_delivers_a_test_message_read_back_from_dovecot() {
    let up = upstream();
    let cfg = config(&listener("smtp", "none", true), "");
    let out = oxbridge_with(&["check", "scanner@example.test", "--send-to", BOB], &cfg);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let line = line_of(
        &t,
        "scanner@example.test: test message sent as alice@example.test to bob@example.test: ",
    );
    assert!(
        line.contains(&format!("{} (SMTP) answered 250 ", up.addr("smtp"))),
        "{line}"
    );
    let id = message_id_of(line);
    assert!(
        id.starts_with('<') && id.ends_with(".oxbridge-check@example.test>"),
        "{id}"
    );
    let got = fetch_from_dovecot(BOB, &id);
    let got = String::from_utf8_lossy(&got);
    for header in [
        "From: <alice@example.test>\r\n",
        "To: <bob@example.test>\r\n",
        "Subject: oxbridge test message\r\n",
        &format!("Message-ID: {id}\r\n"),
    ] {
        assert!(got.contains(header), "{header:?} not in:\n{got}");
    }
}

#[test]
fn send_to_through_graph_is_read_back_from_dovecot() {
    let _serial = crate::graph::serial();
    let state = tempfile::tempdir().unwrap();
    let cfg = crate::graph::graph_config("", state.path(), "");
    let out = oxbridge_with(
        &["check", "graph-scanner@example.test", "--send-to", ALICE],
        &cfg,
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let line = line_of(
        &t,
        "graph-scanner@example.test: test message sent as alice@example.test to alice@example.test: Microsoft Graph (",
    );
    assert!(
        line.contains(") answered 202 Accepted to sendMail; Message-ID <"),
        "{line}"
    );
    let got = fetch_from_dovecot(ALICE, &message_id_of(line));
    assert!(
        String::from_utf8_lossy(&got).contains("Subject: oxbridge test message\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn send_to_refuses_what_it_cannot_send_before_any_token_request() {
    let (url, tokens) = counted_token_url(Duration::ZERO);
    let account = format!(
        "[[account]]\nlogin = \"reader@example.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"{ALICE}\"\nprotocols = [\"imap\"]\n",
        argon2_hash(SCANNER_PASSWORD)
    );
    let cfg = with_token_url(&config(&listener("smtp", "none", true), &account), &url);
    let cases: [(&[&str], &str); 5] = [
        (
            &["check", "*@example.test", "--send-to", BOB],
            "account \"*@example.test\" cannot send a test message from here: grant = \"password\" gets its tokens with a device's own password",
        ),
        (
            &["check", "reader@example.test", "--send-to", BOB],
            "account \"reader@example.test\" may not send mail: its protocols = [\"imap\"] leave out \"smtp\"",
        ),
        (
            &["check", "nobody@example.test", "--send-to", BOB],
            "no [[account]] has login \"nobody@example.test\"",
        ),
        (
            &["check", "scanner@example.test", "--send-to", "bob@example.test\r\nRCPT TO:<eve@example.test>"],
            "--send-to: \"bob@example.test\\r\\nRCPT TO:<eve@example.test>\" is not a mail address (a control character)",
        ),
        (&["check", "--send-to", BOB], "--send-to <ADDRESS>"),
    ];
    for (args, expected) in cases {
        let out = oxbridge_with(args, &cfg);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {t}");
        assert!(
            t.contains(expected),
            "{args:?}: expected {expected:?} in:\n{t}"
        );
        assert!(!t.contains("test message sent"), "{t}");
    }
    assert_eq!(tokens.load(Ordering::SeqCst), 0, "a token was requested");
}

/// The printer's account (SMTP only) beside the usual ones, with its
/// token endpoint at `token_url`; listeners SMTP, IMAP, POP3; an admin
/// endpoint.
fn printer_config(token_url: &str) -> String {
    let account = format!(
        "[[account]]\nlogin = \"{PRINTER}\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"{ALICE}\"\nprotocols = [\"smtp\"]\n\n{ADMIN}",
        argon2_hash(SCANNER_PASSWORD)
    );
    with_token_url(
        &config(&plain_listeners(&["smtp", "imap", "pop3"]), &account),
        token_url,
    )
}

/// IMAP `LOGIN` by hand on a new connection; the tagged reply, as sent.
fn imap_login_reply(port: u16, password: &str) -> String {
    let mut c = Raw::connect(port);
    assert!(c.line().starts_with("* OK"));
    c.send(&format!("a LOGIN {PRINTER} {password}"));
    c.until("a ")
}

#[test]
fn protocols_smtp_refuses_imap_and_pop3_logins_without_a_token_request() {
    let (url, tokens) = counted_token_url(Duration::ZERO);
    // Forwarders in front of Dovecot: a dial upstream would show there.
    let imap = Forwarder::start(&upstream().addr("imap"), None);
    let pop3 = Forwarder::start(&upstream().addr("pop3"), None);
    let cfg = reroute(&printer_config(&url), "imap", &imap.addr.to_string());
    let proxy = Proxy::start(&reroute(&cfg, "pop3", &pop3.addr.to_string()));

    // The right password and a wrong one get the same refusal, byte for byte.
    for password in [SCANNER_PASSWORD, "not-the-password"] {
        assert_eq!(
            imap_login_reply(proxy.port(1), password),
            "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        );
    }
    let mut pop = Raw::connect(proxy.port(2));
    assert!(pop.line().starts_with("+OK"));
    pop.send(&format!("USER {PRINTER}"));
    assert!(pop.line().starts_with("+OK"));
    pop.send(&format!("PASS {SCANNER_PASSWORD}"));
    assert_eq!(pop.line(), "-ERR [AUTH] Authentication failed\r\n");

    for protocol in ["imap", "pop3"] {
        let logged = proxy.wait_log(&[
            "\"login failed\"",
            "\"reason\":\"protocol_not_allowed\"",
            &format!(
                "account printer@example.test has protocols = [\\\"smtp\\\"]; the device logged in over {protocol}"
            ),
        ]);
        assert!(logged.contains("\"level\":\"WARN\""), "{logged}");
        assert!(
            logged.contains("add it to protocols in the account's [[account]]"),
            "no fix in {logged}"
        );
        assert!(!logged.contains(SCANNER_PASSWORD), "{logged}");
    }
    assert_eq!(
        tokens.load(Ordering::SeqCst),
        0,
        "a refused login fetched a token"
    );
    let dialled = imap.max.load(Ordering::SeqCst) + pop3.max.load(Ordering::SeqCst);
    assert_eq!(dialled, 0, "a refused login dialled the upstream");
    let m = scrape(proxy.admin_addr());
    for (protocol, refusals) in [("imap", 2.0), ("pop3", 1.0)] {
        let labels = [("protocol", protocol), ("reason", "protocol_not_allowed")];
        assert_eq!(value(&m, "oxbridge_auth_failures_total", &labels), refusals);
    }

    // SMTP is what the printer may do: it logs in and relays.
    let mut smtp = Raw::connect(proxy.port(0));
    assert!(smtp.reply().starts_with("220 "));
    let auth = smtp.smtp_login(PRINTER, SCANNER_PASSWORD);
    assert!(auth.starts_with("235 "), "{auth}\n{}", proxy.logs());
    assert_eq!(tokens.load(Ordering::SeqCst), 1);
}

#[test]
fn imap_retries_on_an_smtp_only_account_lock_neither_the_account_nor_the_address_out_of_smtp() {
    let (url, _) = counted_token_url(Duration::ZERO);
    let cfg = printer_config(&url).replace(
        "[[account]]\nlogin = \"scanner@example.test\"",
        "[limits]\nlogin_lockout_failures = 3\n\n[[account]]\nlogin = \"scanner@example.test\"",
    );
    let proxy = Proxy::start(&cfg);
    for _ in 0..6 {
        assert_eq!(
            imap_login_reply(proxy.port(1), SCANNER_PASSWORD),
            "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        );
    }
    let mut smtp = Raw::connect(proxy.port(0));
    assert!(smtp.reply().starts_with("220 "));
    let auth = smtp.smtp_login(PRINTER, SCANNER_PASSWORD);
    assert!(auth.starts_with("235 "), "{auth}\n{}", proxy.logs());
}

#[test]
fn check_tests_only_the_accounts_protocols() {
    let out = oxbridge_with(&["check"], &printer_config(upstream().token_url()));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("printer@example.test smtp: OK (mailbox alice@example.test"),
        "{t}"
    );
    for p in ["imap", "pop3"] {
        assert!(
            t.contains(&format!(
                "printer@example.test {p}: SKIPPED (not in the account's protocols)"
            )),
            "{t}"
        );
        assert!(t.contains(&format!("scanner@example.test {p}: OK")), "{t}");
    }
}

#[test]
fn an_open_relay_is_refused_at_load_and_a_wide_private_network_warned_about() {
    let open = config(
        &listener("smtp", "none", true),
        "[[relay]]\nfrom_networks = [\"127.0.0.2/32\", \"0.0.0.0/0\"]\naccount = \"scanner@example.test\"\n",
    );
    for args in [&["check", "--offline"][..], &["run"][..]] {
        let out = oxbridge_with(args, &open);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {t}");
        assert!(
            t.contains("relay[0].from_networks: \"0.0.0.0/0\" is every IPv4 address: every host there could send mail as scanner@example.test without a password (an open relay)."),
            "{args:?}: {t}"
        );
        assert!(
            t.contains("set relay[0].allow_public_networks = true"),
            "{t}"
        );
    }
    let wide = config(
        &listener("smtp", "none", true),
        "[[relay]]\nfrom_networks = [\"10.0.0.0/8\"]\naccount = \"scanner@example.test\"\n",
    );
    let out = check_offline(&wide);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("relay[0].from_networks: WARNING: \"10.0.0.0/8\" is wider than /16"),
        "{t}"
    );
}
