//! Every refusal a device gets, end to end: what the device reads (byte
//! for byte), the one log line with the reason and the fix, the count in
//! `oxbridge_refusals_total`, and the status page's entry. Refusals
//! oxbridge says itself (encryption required, plaintext refused, too many
//! sessions, relay and sender refused) and the real Postfix's refusal
//! after login on a session listener. Then the devices on the page,
//! told apart by their EHLO names, in headless Chromium.

use serde_json::Value;

use crate::harness::*;
use crate::status::{chromium, visible_text};

/// The refusal log lines with `reason`, parsed.
fn refusal_lines(proxy: &Proxy, reason: &str) -> Vec<Value> {
    proxy
        .logs()
        .lines()
        .filter(|l| l.contains("device refused") && l.contains(&format!("\"reason\":\"{reason}\"")))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The one log line of a refusal: waited for, then checked to be alone.
fn refusal_line(proxy: &Proxy, reason: &str) -> Value {
    proxy.wait_log(&["device refused", &format!("\"reason\":\"{reason}\"")]);
    let lines = refusal_lines(proxy, reason);
    assert_eq!(lines.len(), 1, "{}", proxy.logs());
    assert_eq!(lines[0]["level"], "WARN", "{}", lines[0]);
    lines[0].clone()
}

fn counted(proxy: &Proxy, protocol: &str, reason: &str) -> f64 {
    value(
        &scrape(proxy.admin_addr()),
        "oxbridge_refusals_total",
        &[("protocol", protocol), ("reason", reason)],
    )
}

/// The status page's text.
fn page(proxy: &Proxy) -> String {
    let (status, html) = curl(proxy.admin_addr(), "/");
    assert_eq!(status, 200, "{html}");
    html
}

fn fix_of(line: &Value) -> String {
    line["fix"]
        .as_str()
        .unwrap_or_else(|| panic!("no fix in {line}"))
        .to_string()
}

/// AUTH before STARTTLS on a `starttls` listener, in all three protocols:
/// each device reads its protocol's refusal; each refusal is logged once
/// (the second AUTH is counted, not logged again), with the fix that says
/// to use STARTTLS; counted; on the page.
#[test]
fn encryption_required_is_logged_once_with_its_fix_counted_and_shown() {
    let listeners = [
        listener("smtp", "starttls", false),
        listener("imap", "starttls", false),
        listener("pop3", "starttls", false),
    ]
    .join("\n");
    let proxy = Proxy::start(&config(&listeners, ADMIN));
    let mut smtp = Raw::connect(proxy.port(0));
    smtp.reply();
    smtp.send("EHLO mfp-3f.refusals.test");
    smtp.reply();
    let auth = format!(
        "AUTH PLAIN {}",
        plain_ir("scanner@example.test", SCANNER_PASSWORD)
    );
    for _ in 0..2 {
        smtp.send(&auth);
        assert_eq!(
            smtp.reply(),
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        );
    }
    let mut imap = Raw::connect(proxy.port(1));
    imap.line();
    imap.send("i ID (\"name\" \"Scan App\" \"version\" \"2.1\")");
    assert_eq!(
        imap.until("i "),
        "* ID (\"name\" \"oxbridge\")\r\ni OK ID completed\r\n"
    );
    imap.send("a LOGIN scanner@example.test secret");
    assert_eq!(
        imap.line(),
        "a NO [PRIVACYREQUIRED] Login is disabled without TLS\r\n"
    );
    let mut pop3 = Raw::connect(proxy.port(2));
    pop3.line();
    pop3.send("USER scanner@example.test");
    assert_eq!(
        pop3.line(),
        "-ERR [AUTH] Plaintext authentication is disabled without TLS\r\n"
    );

    proxy.wait_log(&["device refused", "\"protocol\":\"pop3\""]);
    let lines = refusal_lines(&proxy, "encryption_required");
    assert_eq!(lines.len(), 3, "one per session:\n{}", proxy.logs());
    let smtp_line = lines
        .iter()
        .find(|l| l["span"]["protocol"] == "smtp")
        .expect("the SMTP refusal");
    assert_eq!(
        smtp_line["said"],
        "538 5.7.11 Encryption required for requested authentication mechanism"
    );
    assert_eq!(smtp_line["by"], "oxbridge");
    assert_eq!(smtp_line["span"]["device_name"], "mfp-3f.refusals.test");
    let imap_line = lines
        .iter()
        .find(|l| l["span"]["protocol"] == "imap")
        .expect("the IMAP refusal");
    assert_eq!(imap_line["span"]["device_name"], "Scan App", "{imap_line}");
    for line in &lines {
        assert!(fix_of(line).contains("STARTTLS"), "{line}");
    }
    assert_eq!(counted(&proxy, "smtp", "encryption_required"), 2.0);
    assert_eq!(counted(&proxy, "imap", "encryption_required"), 1.0);
    assert_eq!(counted(&proxy, "pop3", "encryption_required"), 1.0);
    let html = page(&proxy);
    assert!(html.contains("Last refusals"), "{html}");
    assert!(
        html.contains("<code>127.0.0.1</code> mfp-3f.refusals.test</td>"),
        "{html}"
    );
    assert!(html.contains("<span class=\"bad\">encryption_required</span>: <code>538 5.7.11 Encryption required for requested authentication mechanism</code><br><span class=\"fix\">Fix: the device sent its password before starting TLS"), "{html}");
    assert!(html.contains("<code>a NO [PRIVACYREQUIRED] Login is disabled without TLS</code>"));
}

/// A password on a `tls = "none"` listener without allow_plaintext_auth:
/// the fix names allow_plaintext_auth and a certificate.
#[test]
fn plaintext_refused_without_allow_plaintext_auth_names_the_key() {
    let listeners = [
        listener("smtp", "none", false),
        listener("imap", "none", false),
        listener("pop3", "none", false),
    ]
    .join("\n");
    let proxy = Proxy::start(&config(&listeners, ADMIN));
    let mut smtp = Raw::connect(proxy.port(0));
    smtp.reply();
    smtp.send("HELO old-printer");
    smtp.reply();
    smtp.send("AUTH LOGIN");
    assert_eq!(
        smtp.reply(),
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    );
    let mut imap = Raw::connect(proxy.port(1));
    imap.line();
    imap.send("b AUTHENTICATE PLAIN");
    assert_eq!(
        imap.line(),
        "b NO [PRIVACYREQUIRED] Login is disabled without TLS\r\n"
    );
    let mut pop3 = Raw::connect(proxy.port(2));
    pop3.line();
    pop3.send("PASS pw-plain-7731");
    assert_eq!(
        pop3.line(),
        "-ERR [AUTH] Plaintext authentication is disabled without TLS\r\n"
    );
    proxy.wait_log(&["device refused", "\"protocol\":\"pop3\""]);
    let lines = refusal_lines(&proxy, "plaintext_refused");
    assert_eq!(lines.len(), 3, "{}", proxy.logs());
    for line in &lines {
        let fix = fix_of(line);
        assert!(
            fix.contains("allow_plaintext_auth = true") && fix.contains("tls = \"starttls\""),
            "{fix}"
        );
    }
    assert!(!proxy.logs().contains("pw-plain-7731"), "{}", proxy.logs());
    for protocol in ["smtp", "imap", "pop3"] {
        assert_eq!(
            counted(&proxy, protocol, "plaintext_refused"),
            1.0,
            "{protocol}"
        );
    }
    let html = page(&proxy);
    assert!(
        html.contains("<code>127.0.0.1</code> old-printer</td>"),
        "{html}"
    );
    assert!(
        html.contains("<span class=\"bad\">plaintext_refused</span>"),
        "{html}"
    );
}

/// A listener at its connection limit turns the next device away with
/// its protocol's goodbye: logged with the limit and the fix, counted,
/// on the page.
#[test]
fn too_many_sessions_turns_the_device_away_with_a_fix() {
    let listeners = ["smtp", "imap", "pop3"]
        .map(|p| listener(p, "none", true) + "max_connections = 1\n")
        .join("\n");
    let proxy = Proxy::start(&config(&listeners, ADMIN));
    let expected = [
        "421 4.7.0 Too many connections, try again later\r\n",
        "* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        "-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    ];
    let mut held = Vec::new();
    for (i, want) in expected.iter().enumerate() {
        let mut first = Raw::connect(proxy.port(i));
        first.line();
        held.push(first);
        let mut second = Raw::connect(proxy.port(i));
        assert_eq!(second.line(), *want);
        assert_eq!(second.line(), "<closed>");
    }
    proxy.wait_log(&[
        "device refused",
        "too_many_sessions",
        "\"protocol\":\"pop3\"",
    ]);
    let lines = refusal_lines(&proxy, "too_many_sessions");
    assert_eq!(lines.len(), 3, "{}", proxy.logs());
    assert!(lines[0]["limit"]
        .as_str()
        .unwrap()
        .contains("listener connection limit (1)"));
    assert!(fix_of(&lines[0]).contains("max_connections"));
    for protocol in ["smtp", "imap", "pop3"] {
        assert_eq!(
            counted(&proxy, protocol, "too_many_sessions"),
            1.0,
            "{protocol}"
        );
    }
    assert!(page(&proxy)
        .contains("<code>* BYE [UNAVAILABLE] Too many connections, try again later</code>"));
}

/// Mail without a login from a network without a `[[relay]]` rule; then a
/// rule's sender outside its allowed_senders; then, after login, an
/// account's sender outside its allowed_senders (the checked relay).
#[test]
fn relay_and_sender_refusals_are_logged_with_their_fix() {
    let extra = format!(
        "{ADMIN}\n[[relay]]\nfrom_networks = [\"127.0.0.2/32\"]\naccount = \"scanner@example.test\"\nallowed_senders = [\"{ALICE}\"]\n\n[[account]]\nlogin = \"restricted@example.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"{ALICE}\"\nallowed_senders = [\"{ALICE}\"]\n",
        argon2_hash(SCANNER_PASSWORD)
    );
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), &extra));
    let mut outside = Raw::connect_from(proxy.port(0), "127.0.0.3");
    outside.reply();
    outside.send("EHLO outside.refusals.test");
    outside.reply();
    outside.send(&format!("MAIL FROM:<{ALICE}>"));
    assert_eq!(outside.reply(), "530 5.7.0 Authentication required\r\n");
    let line = refusal_line(&proxy, "relay_refused");
    assert!(fix_of(&line).contains("[[relay]]"), "{line}");
    assert_eq!(line["span"]["device_name"], "outside.refusals.test");

    let mut inside = Raw::connect_from(proxy.port(0), "127.0.0.2");
    inside.reply();
    inside.send("EHLO inside.refusals.test");
    inside.reply();
    inside.send(&format!("MAIL FROM:<{BOB}>"));
    assert_eq!(
        inside.reply(),
        "550 5.7.1 Sender not allowed to relay from this network\r\n"
    );
    let mut device = Raw::connect(proxy.port(0));
    device.reply();
    let auth = device.smtp_login("restricted@example.test", SCANNER_PASSWORD);
    assert!(auth.starts_with("235 "), "{auth}");
    device.send(&format!("MAIL FROM:<{BOB}>"));
    assert_eq!(
        device.reply(),
        "550 5.7.1 Sender address not allowed for this login\r\n"
    );
    proxy.wait_log(&[
        "device refused",
        "Sender address not allowed for this login",
    ]);
    let lines = refusal_lines(&proxy, "sender_not_allowed");
    assert_eq!(lines.len(), 2, "{}", proxy.logs());
    for line in &lines {
        assert!(fix_of(line).contains("allowed_senders"), "{line}");
    }
    let after_login = &lines[1];
    assert_eq!(after_login["span"]["login"], "restricted@example.test");
    assert_eq!(counted(&proxy, "smtp", "relay_refused"), 1.0);
    assert_eq!(counted(&proxy, "smtp", "sender_not_allowed"), 2.0);
    let html = page(&proxy);
    assert!(
        html.contains("<code>550 5.7.1 Sender address not allowed for this login</code>"),
        "{html}"
    );
    assert!(
        html.contains("<code>530 5.7.0 Authentication required</code>"),
        "{html}"
    );
}

/// On a session listener, the real Postfix refuses a sender the mailbox
/// does not own (at RCPT). The device reads Postfix's reply untouched;
/// the log line carries it with the fix, the counter and the page too,
/// and the device's row shows its name, its login and that failure.
#[test]
fn the_upstreams_refusal_after_login_is_logged_with_its_fix() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), ADMIN));
    let mut c = Raw::connect(proxy.port(0));
    c.reply();
    let auth = c.smtp_login("scanner@example.test", SCANNER_PASSWORD);
    assert!(auth.starts_with("235 "), "{auth}\n{}", proxy.logs());
    c.send(&format!("MAIL FROM:<{BOB}>"));
    assert!(c.reply().starts_with("250 "));
    c.send(&format!("RCPT TO:<{ALICE}>"));
    let refused = c.reply();
    assert_eq!(
        refused,
        format!("553 5.7.1 <{BOB}>: Sender address rejected: not owned by user {ALICE}\r\n")
    );
    // The same refusal again in this session: counted, not logged again.
    c.send(&format!("RCPT TO:<{ALICE}>"));
    assert_eq!(c.reply(), refused);
    c.send("QUIT");
    assert!(c.reply().starts_with("221 "));
    proxy.wait_log(&["session ended", "\"outcome\":\"relayed\""]);
    let line = refusal_line(&proxy, "upstream_refused");
    assert_eq!(line["by"], "upstream");
    assert_eq!(line["said"], refused.trim_end());
    assert!(fix_of(&line).contains("rewrite_sender = true"), "{line}");
    assert_eq!(line["span"]["device_name"], "device.test");
    assert_eq!(line["span"]["login"], "scanner@example.test");
    assert_eq!(counted(&proxy, "smtp", "upstream_refused"), 2.0);
    let html = page(&proxy);
    assert!(html.contains(&format!("<code>553 5.7.1 &lt;{BOB}&gt;: Sender address rejected: not owned by user {ALICE}</code>")), "{html}");
    assert!(html.contains("<td data-label=\"device\"><code>127.0.0.1</code></td><td data-label=\"name\">device.test</td><td data-label=\"login\"><code>scanner@example.test</code></td><td data-label=\"protocol\">smtp</td><td data-label=\"TLS\">none</td>"), "{html}");
    assert!(
        html.contains("<span class=\"bad\">upstream_refused: 553 5.7.1"),
        "{html}"
    );
}

/// Two printers on one address, told apart by their EHLO names: one logs
/// in, one gives a wrong password; a third (swaks) logs in over STARTTLS.
/// Chromium shows each on its own row with its login, its TLS version,
/// its last success or its last failure.
#[test]
fn chromium_shows_devices_told_apart_by_their_ehlo_names() {
    let listeners = listener("smtp", "none", true) + "\n" + &listener("smtp", "starttls", false);
    let proxy = Proxy::start(&config(&listeners, ADMIN));
    let swaks = run(
        std::process::Command::new("swaks").args([
            "--server",
            "127.0.0.1",
            "--port",
            &proxy.port(1).to_string(),
            "--ehlo",
            "printer-c.refusals.test",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "scanner@example.test",
            "--auth-password",
            SCANNER_PASSWORD,
            "--quit-after",
            "AUTH",
            "--timeout",
            "60",
        ]),
        CLIENT_LIMIT,
    );
    assert!(swaks.status.success(), "{}\n{}", text(&swaks), proxy.logs());
    for (name, password, want) in [
        ("printer-a.refusals.test", SCANNER_PASSWORD, "235 "),
        ("printer-b.refusals.test", "wrong-password", "535 "),
    ] {
        let mut c = Raw::connect(proxy.port(0));
        c.reply();
        c.send(&format!("EHLO {name}"));
        c.reply();
        c.send(&format!(
            "AUTH PLAIN {}",
            plain_ir("scanner@example.test", password)
        ));
        let reply = c.reply();
        assert!(reply.starts_with(want), "{reply}\n{}", proxy.logs());
        c.send("QUIT");
        c.reply();
    }
    proxy.wait_log(&["login failed"]);
    let page = visible_text(&chromium(
        &format!("http://{}/", proxy.admin_addr()),
        "--dump-dom",
    ));
    for expected in [
        "Devices",
        "127.0.0.1 printer-b.refusals.test scanner@example.test smtp none never ",
        "bad_credentials",
        "127.0.0.1 printer-a.refusals.test scanner@example.test smtp none ",
        "127.0.0.1 printer-c.refusals.test scanner@example.test smtp TLSv1.3 ",
    ] {
        assert!(
            page.contains(expected),
            "the page lacks {expected:?}:\n{page}"
        );
    }
    let a = page.find("printer-a.refusals.test").unwrap();
    let b = page.find("printer-b.refusals.test").unwrap();
    assert!(b < a, "the most recent device first:\n{page}");
    let row_a = &page[a..];
    let row_a = &row_a[..row_a.find("printer-b").unwrap_or(row_a.len()).min(200)];
    assert!(row_a.contains(" ago none"), "a's row: {row_a}");
    assert!(!page.contains("wrong-password"));
}

/// A mailbox at its session limit: the device reads its protocol's
/// refusal; the failed login is logged once with the fix, counted as a
/// refusal for too many sessions, and listed with the fix on the page.
#[test]
fn a_mailbox_at_its_session_limit_is_a_refusal_with_a_fix() {
    let limits =
        format!("{ADMIN}\n[limits]\nimap_sessions_per_mailbox = 1\nimap_mailbox_wait_s = 0\n");
    let proxy = Proxy::start(&config(&listener("imap", "none", true), &limits));
    let mut first = Raw::connect(proxy.port(0));
    first.line();
    let ok = first.imap_login("scanner@example.test", SCANNER_PASSWORD);
    assert!(ok.starts_with("a OK"), "{ok}\n{}", proxy.logs());
    let mut second = Raw::connect(proxy.port(0));
    second.line();
    assert_eq!(
        second.imap_login("scanner@example.test", SCANNER_PASSWORD),
        "a NO [UNAVAILABLE] This mailbox has too many open sessions, try again later\r\n"
    );
    let line = proxy.wait_log(&["login failed", "mailbox_busy"]);
    let line: Value = serde_json::from_str(&line).unwrap();
    assert!(
        fix_of(&line).contains("imap_sessions_per_mailbox"),
        "{line}"
    );
    assert_eq!(counted(&proxy, "imap", "too_many_sessions"), 1.0);
    let html = page(&proxy);
    assert!(
        html.contains("<span class=\"bad\">mailbox_busy</span>"),
        "{html}"
    );
    assert!(
        html.contains("Fix: the mailbox already has as many upstream sessions"),
        "{html}"
    );
    first.send("z LOGOUT");
    first.until("z ");
}
