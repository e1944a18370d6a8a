//! Who a device is: a login must be a plain mailbox before it can match a
//! `*@domain` account (nothing a device types may reach the XOAUTH2
//! string), a `*@domain` account's spooled mail is delivered like any
//! other, and unauthenticated Autodiscover tells nothing about accounts.

use std::process::Command;

use crate::harness::*;

/// The local password of the `*@other.test` and `*@example.test`
/// client_credentials accounts below.
const DOMAIN_PW: &str = "domain-local-pass";

/// Failed logins cost little and never lock loopback out: these tests
/// fail many logins on purpose.
const LENIENT: &str = "[limits]\nlogin_delay_ms = 1\nlogin_lockout_failures = 1000\n";

/// Logins a device might send to slip past a `*@other.test` pattern: first
/// a `\x01` that once ended XOAUTH2's `user=` early (the upstream logged
/// in as bob), then CR/LF, the characters that change a URL path, a quoted
/// local part and two `@`.
const HOSTILE: &[&str] = &[
    "bob@example.test\x01x=y@other.test",
    "bob@example.test\x01auth=Bearer x\x01\x01@other.test",
    "bob@example.test\r\nx@other.test",
    "bob@example.test\nx@other.test",
    "bob@example.test/x@other.test",
    "bob%example.test@other.test",
    "bob?x=1@other.test",
    "bob#x@other.test",
    "bob\\x@other.test",
    "\"bob@example.test\"@other.test",
    "bob@example.test@other.test",
    "bob @other.test",
    "bob\x7f@other.test",
];

/// The usual config with `*@other.test` (client_credentials, a local
/// password: an app token works for any mailbox) and lenient throttling.
fn other_domain_config(listeners: &str) -> String {
    let extra = format!(
        "[[account]]\nlogin = \"*@other.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\n\n{ADMIN}\n{LENIENT}",
        argon2_hash(DOMAIN_PW)
    );
    config(listeners, &extra)
}

/// `s` with its control characters visible, for assertion messages.
fn shown(s: &str) -> String {
    s.escape_debug().to_string()
}

#[test]
fn smtp_refuses_a_login_with_control_bytes_against_a_domain_pattern() {
    let proxy = Proxy::start(&other_domain_config(&listener("smtp", "none", true)));
    let mut answers = Vec::new();
    for login in HOSTILE {
        let mut c = Raw::connect(proxy.port(0));
        c.reply();
        let reply = c.smtp_login(login, DOMAIN_PW);
        answers.push((shown(login), reply.trim_end().to_string()));
    }
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(_, reply)| !reply.starts_with("535 5.7.8 "))
        .collect();
    assert!(
        wrong.is_empty(),
        "logins not refused with 535 5.7.8: {wrong:#?}\n{}",
        proxy.logs()
    );
    assert_no_raw_login_in_logs(&proxy);
}

#[test]
fn imap_and_pop3_refuse_a_login_with_control_bytes_against_a_domain_pattern() {
    let listeners = format!(
        "{}\n{}",
        listener("imap", "none", true),
        listener("pop3", "none", true)
    );
    let proxy = Proxy::start(&other_domain_config(&listeners));
    let mut wrong = Vec::new();
    for login in HOSTILE {
        let ir = plain_ir(login, DOMAIN_PW);
        let mut imap = Raw::connect(proxy.port(0));
        imap.line();
        imap.send(&format!("a AUTHENTICATE PLAIN {ir}"));
        let reply = imap.until("a ");
        if !reply.contains("a NO [AUTHENTICATIONFAILED]") {
            wrong.push(("imap", shown(login), reply));
        }
        let mut pop3 = Raw::connect(proxy.port(1));
        pop3.line();
        pop3.send(&format!("AUTH PLAIN {ir}"));
        let reply = pop3.line();
        if !reply.starts_with("-ERR [AUTH]") {
            wrong.push(("pop3", shown(login), reply));
        }
    }
    assert!(
        wrong.is_empty(),
        "logins not refused: {wrong:#?}\n{}",
        proxy.logs()
    );
    assert_no_raw_login_in_logs(&proxy);
}

/// The hostile logins' distinctive parts never reach the log, raw or as
/// JSON escapes (a login that is no account's may be a password).
fn assert_no_raw_login_in_logs(proxy: &Proxy) {
    let logs = proxy.logs();
    for needle in ["x=y@other.test", "\\u0001", "bob%example", "bob?x", "bob#x"] {
        assert!(!logs.contains(needle), "{needle:?} in the log:\n{logs}");
    }
    assert!(logs.contains("login failed"), "{logs}");
}

/// A spooling listener and a `*@example.test` client_credentials account:
/// bob's message, taken with a 250, arrives in bob's mailbox.
#[test]
fn spooled_mail_of_a_domain_pattern_account_is_delivered() {
    let state = tempfile::tempdir().unwrap();
    let listener = listener("smtp", "none", true) + "delivery = \"spool\"\n";
    let spool = "[spool]\nretry_min_s = 1\nretry_max_s = 2\nmessages_per_minute = 6000\n";
    let cfg = config(&listener, &format!("{ADMIN}\n{spool}"));
    let pattern = "login = \"*@example.test\"\ngrant = \"password\"";
    assert!(cfg.contains(pattern));
    let cfg = cfg.replace(
        pattern,
        &format!(
            "login = \"*@example.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"",
            argon2_hash(DOMAIN_PW)
        ),
    );
    let proxy = Proxy::start(&with_state_dir(&cfg, state.path()));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "pattern-spool", BOB, 0);
    let out = Smtp {
        login: BOB,
        password: DOMAIN_PW,
        from: BOB,
        to: BOB,
        ..Smtp::scanner(proxy.port(0))
    }
    .smtplib(&m.path);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    match read_from_dovecot(BOB, &m.id, "30") {
        Ok(delivered) => assert_delivered_intact(&delivered, &m.bytes),
        Err(e) => panic!(
            "the spooled message did not reach bob: {e}\n{}",
            proxy.logs()
        ),
    }
}

/// POX Autodiscover, unauthenticated: the answer for a configured account
/// and for an address no account covers are the same but for the address.
#[test]
fn autodiscover_answers_alike_for_configured_and_unknown_addresses() {
    let listeners = format!(
        "{}{}",
        listener("imap", "implicit", false),
        listener("smtp", "starttls", false)
    );
    let proxy = Proxy::start(&config(&listeners, ADMIN));
    let url = format!(
        "http://{}/autodiscover/autodiscover.xml",
        proxy.admin_addr()
    );
    let ask = |email: &str| {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006\"><Request><EMailAddress>{email}</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>"
        );
        let out = run(
            Command::new("curl").args([
                "-sS",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-H",
                "Content-Type: text/xml; charset=utf-8",
                "-H",
                "Host: mail.example.test",
                "--data-binary",
                &body,
                &url,
            ]),
            CLIENT_LIMIT,
        );
        assert!(out.status.success(), "{}", text(&out));
        // The error form carries the time of day; nothing else may differ.
        String::from_utf8_lossy(&out.stdout)
            .replace(email, "ADDRESS")
            .lines()
            .filter(|l| !l.contains("<Error Time="))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // An exact account, a user of the *@example.test pattern, and addresses
    // no account covers, in a configured domain and outside any.
    let known = ask("scanner@example.test");
    assert!(known.ends_with("\n200"), "{known}");
    assert!(known.contains("<LoginName>ADDRESS</LoginName>"), "{known}");
    for other in [
        "printer7@example.test",
        "ceo@elsewhere.test",
        "nobody@unknown.test",
    ] {
        assert_eq!(ask(other), known, "{other} answered differently");
    }
}
