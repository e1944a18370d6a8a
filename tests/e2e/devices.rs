//! Devices as they are: HELO-only clients, devices that cannot log in
//! (relay rules by network), ten devices on one mailbox with Exchange's
//! limit of three sessions, PROXY headers from a load balancer, and every
//! limit pushed past its bound.

use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::harness::*;

/// `[[relay]]` for 127.0.0.2 as the scanner account (mailbox alice), only
/// for senders in example.test.
const RELAY: &str = "[[relay]]\nfrom_networks = [\"127.0.0.2/32\"]\naccount = \"scanner@example.test\"\nallowed_senders = [\"*@example.test\"]\n";

/// smtplib without AUTH, from the local address `source`.
fn smtplib_no_auth(port: u16, source: &str, from: &str, file: &std::path::Path) -> Output {
    Smtp {
        mech: "NONE",
        source: Some(source),
        from,
        ..Smtp::scanner(port)
    }
    .smtplib(file)
}

/// HELO-only devices: swaks speaking plain SMTP (HELO, no extensions, no
/// AUTH: it cannot log in without an EHLO list) from a relay network, and a
/// device that sends AUTH after HELO.
#[test]
fn helo_only_clients_are_relayed() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), RELAY));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "helo", ALICE, 0);
    let out = run(
        Command::new("swaks")
            .args([
                "--server",
                "127.0.0.1",
                "--port",
                &proxy.port(0).to_string(),
            ])
            .args(["--protocol", "SMTP", "--local-interface", "127.0.0.2"])
            .args(["--from", ALICE, "--to", ALICE, "--data"])
            .arg(swaks_data(&m.path)),
        CLIENT_LIMIT,
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}\n{}", proxy.logs());
    assert!(t.contains("-> HELO") && !t.contains("-> EHLO"), "{t}");
    assert_arrived(ALICE, &m.id, &m.bytes);

    // HELO, then AUTH anyway (as many printers do), then a plain transaction.
    let tag = unique("helo-auth");
    let mut c = Raw::connect(proxy.port(0));
    c.reply();
    c.send("HELO printer");
    let r = c.reply();
    assert!(
        r.starts_with("250 ") && !r.contains("250-"),
        "HELO gets one line: {r}"
    );
    let ir = plain_ir("scanner@example.test", SCANNER_PASSWORD);
    c.send(&format!("AUTH PLAIN {ir}"));
    assert!(c.reply().starts_with("235 "));
    c.envelope(ALICE, ALICE);
    let body = short_message(ALICE, &tag, "helo");
    c.write(format!("{body}.\r\nQUIT\r\n").as_bytes());
    assert!(c.reply().starts_with("250 "));
    assert_arrived(ALICE, &message_id(&tag), body.as_bytes());
}

/// A device that cannot log in is relayed from its network, as its rule's
/// account, for allowed senders only; from anywhere else it must log in.
#[test]
fn relay_by_network_and_never_an_open_relay() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), RELAY));
    let port = proxy.port(0);
    let dir = tempfile::tempdir().unwrap();

    let m = Message::write(dir.path(), "relay", ALICE, 0);
    let out = smtplib_no_auth(port, "127.0.0.2", ALICE, &m.path);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    assert_arrived(ALICE, &m.id, &m.bytes);
    proxy.wait_log(&["authenticated", "relay as scanner@example.test"]);

    // Outside the relay network: authentication required.
    let code = |out: &Output| client_json(out)["code"].as_u64();
    for source in ["127.0.0.1", "127.0.0.3"] {
        let out = smtplib_no_auth(port, source, ALICE, &m.path);
        assert_eq!(code(&out), Some(530), "{source}: {}", text(&out));
    }
    // Inside, with a sender the rule does not allow.
    let out = smtplib_no_auth(port, "127.0.0.2", "someone@elsewhere.test", &m.path);
    assert_eq!(code(&out), Some(550), "{}", text(&out));
    // And RCPT/DATA without MAIL are refused outright.
    let mut c = Raw::connect_from(port, "127.0.0.3");
    c.reply();
    c.send("EHLO x");
    c.reply();
    c.send("RCPT TO:<alice@example.test>");
    assert!(c.reply().starts_with("530 "));
}

/// Ten devices at once on one mailbox with the limit at three: all ten
/// messages arrive, and the upstream never sees more than three sessions.
#[test]
fn ten_devices_share_three_upstream_sessions() {
    let up = upstream();
    let forwarder = Forwarder::start(&up.loopback("smtp"), None);
    let max_open = forwarder.max.clone();
    let cfg = config(
        &listener("smtp", "none", true),
        &format!("{ADMIN}[limits]\nsmtp_sessions_per_mailbox = 3\n"),
    );
    let proxy = Proxy::start(&reroute(
        &cfg,
        "smtp",
        &format!("localhost:{}", forwarder.addr.port()),
    ));
    // Let the start-up capability probe come and go before counting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while max_open.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(forwarder.wait_idle(Duration::from_secs(10)));
    max_open.store(0, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let messages: Vec<Message> = (0..10)
        .map(|i| Message::write(dir.path(), &format!("ten{i}"), ALICE, 0))
        .collect();
    let submit = Smtp {
        hold: Some("1"),
        ..Smtp::scanner(proxy.port(0))
    };
    let outputs = submit.smtplib_at_once(&messages);
    for out in &outputs {
        assert!(out.status.success(), "{}\n{}", text(out), proxy.logs());
    }
    for m in &messages {
        fetch_from_dovecot(ALICE, &m.id);
    }
    let max = max_open.load(Ordering::SeqCst);
    assert!(max == 3, "the upstream saw {max} sessions at once");
    // The waits are counted for the alert on saturated mailboxes.
    let full = |outcome| {
        let labels = [
            ("protocol", "smtp"),
            ("mailbox", ALICE),
            ("outcome", outcome),
        ];
        value(
            &scrape(proxy.admin_addr()),
            "oxbridge_mailbox_full_total",
            &labels,
        )
    };
    let waited = full("waited");
    assert!((5.0..=7.0).contains(&waited), "{waited} devices waited");
    assert_eq!(full("refused"), 0.0);
}

fn proxy_v2(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&587u16.to_be_bytes());
    h
}

/// Behind a load balancer: the PROXY header's client address decides
/// relaying; a missing header, or one on a listener that does not expect
/// it, ends the connection.
#[test]
fn proxy_protocol_headers_shape_relay_decisions() {
    let listeners = format!(
        "{}proxy_protocol = true\nproxy_from = [\"127.0.0.1\"]\n\n{}",
        listener("smtp", "none", true),
        listener("smtp", "none", true)
    );
    let proxy = Proxy::start(&config(&listeners, RELAY));
    let (with, without) = (proxy.port(0), proxy.port(1));
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 587\r\n").into_bytes();
    for (name, header, relayed) in [
        ("v1 inside", v1("127.0.0.2"), true),
        ("v1 outside", v1("10.9.9.9"), false),
        ("v2 inside", proxy_v2([127, 0, 0, 2], 40001), true),
        ("v2 outside", proxy_v2([10, 9, 9, 9], 40002), false),
    ] {
        let tag = unique("proxy");
        let mut c = Raw::connect(with);
        c.write(&header);
        assert!(c.reply().starts_with("220 "), "{name}");
        c.send("EHLO lb.test");
        c.reply();
        c.send(&format!("MAIL FROM:<{ALICE}>"));
        let r = c.reply();
        if !relayed {
            assert!(r.starts_with("530 "), "{name}: {r}");
            continue;
        }
        assert!(r.starts_with("250 "), "{name}: {r}\n{}", proxy.logs());
        c.rcpt_data(ALICE);
        let body = short_message(ALICE, &tag, &format!("via {name}"));
        c.write(format!("{body}.\r\nQUIT\r\n").as_bytes());
        assert!(c.reply().starts_with("250 "), "{name}");
        assert_arrived(ALICE, &message_id(&tag), body.as_bytes());
    }
    proxy.wait_log(&["session ended", "\"client\":\"127.0.0.2:40000\""]);

    // No header where one is required: no greeting, connection closed.
    let mut c = Raw::connect(with);
    c.send("EHLO no-header.test");
    assert_eq!(c.line(), "<closed>");
    proxy.wait_log(&["rejected", "invalid PROXY header"]);
    // A header where none is expected: rejected, nothing relayed.
    for header in [v1("127.0.0.2"), proxy_v2([127, 0, 0, 2], 40003)] {
        let mut c = Raw::connect(without);
        assert!(c.reply().starts_with("220 "));
        c.write(&header);
        c.send("EHLO x");
        assert_eq!(c.line(), "<closed>");
    }
    proxy.wait_log(&["PROXY header on a listener without proxy_protocol"]);
}

/// Every limit past its bound gets the protocol's reply, not a reset.
#[test]
fn limits_past_their_bounds() {
    let listeners = format!(
        "{}max_connections = 2\n\n{}",
        listener("smtp", "none", true),
        plain_listeners(&["imap", "pop3"])
    );
    let limits = "[limits]\npreauth_timeout_s = 1\nidle_timeout_s = 2\nmax_line = 512\nsmtp_sessions_per_mailbox = 1\nmailbox_wait_s = 1\n";
    let proxy = Proxy::start(&config(&listeners, limits));
    let (smtp, imap, pop3) = (proxy.port(0), proxy.port(1), proxy.port(2));
    let scanner = |c: &mut Raw| c.smtp_login("scanner@example.test", SCANNER_PASSWORD);

    // Line length before login.
    let long = "X".repeat(600);
    let mut first_smtp = Raw::connect(smtp);
    first_smtp.reply();
    first_smtp.send(&long);
    assert!(first_smtp.reply().starts_with("500 5.5.6"));
    let mut c = Raw::connect(imap);
    c.line();
    c.send(&format!("a1 LOGIN {long} x"));
    assert_eq!(c.line(), "a1 BAD Command line too long\r\n");
    let mut c = Raw::connect(pop3);
    c.line();
    c.send(&format!("USER {long}"));
    assert!(c.line().starts_with("-ERR"));

    // Silence before login.
    let started = Instant::now();
    let mut s = Raw::connect(smtp);
    let mut i = Raw::connect(imap);
    let mut p = Raw::connect(pop3);
    s.reply();
    i.line();
    p.line();
    assert!(s.reply().starts_with("421 4.4.2"));
    assert!(i.line().starts_with("* BYE"));
    assert!(p.line().starts_with("-ERR"));
    assert!(started.elapsed() < Duration::from_secs(10));

    // Connections per listener: the third SMTP connection is turned away.
    // First let the earlier SMTP sessions end (their slots go with them).
    assert!(first_smtp.reply().starts_with("421 4.4.2"));
    assert_eq!(first_smtp.line(), "<closed>");
    assert_eq!(s.line(), "<closed>");
    std::thread::sleep(Duration::from_millis(300));
    let mut a = Raw::connect(smtp);
    let mut b = Raw::connect(smtp);
    assert!(a.reply().starts_with("220") && b.reply().starts_with("220"));
    let mut third = Raw::connect(smtp);
    assert!(third.reply().starts_with("421 4.7.0 Too many connections"));
    drop((a, b));
    std::thread::sleep(Duration::from_millis(200));

    // Sessions per mailbox: the second login waits 1 s, then 421 4.3.2.
    let mut first = Raw::connect(smtp);
    first.reply();
    assert!(scanner(&mut first).starts_with("235 "));
    let mut second = Raw::connect(smtp);
    second.reply();
    let started = Instant::now();
    let r = scanner(&mut second);
    assert!(r.starts_with("421 4.3.2"), "{r}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Silence after login: 421 4.4.2 from the proxy after 2 s.
    let r = first.reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    let line = proxy.wait_log(&["session ended", "relayed", "idle timeout"]);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    for field in [
        "account",
        "mailbox",
        "upstream",
        "bytes_to_upstream",
        "bytes_to_device",
        "duration_ms",
        "outcome",
    ] {
        assert!(!v[field].is_null(), "session line lacks {field}: {line}");
    }
    assert_eq!(v["span"]["protocol"], "smtp", "{line}");
    assert!(
        v["span"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{line}"
    );

    // Too many failed logins.
    let mut c = Raw::connect(smtp);
    c.reply();
    c.send("EHLO x");
    c.reply();
    let bad = plain_ir("scanner@example.test", "wrong");
    for _ in 0..3 {
        c.send(&format!("AUTH PLAIN {bad}"));
        assert!(c.reply().starts_with("535 "));
    }
    assert!(c.reply().starts_with("421 4.7.0 Too many failed logins"));
}

/// The global connection limit covers all listeners.
#[test]
fn global_connection_limit() {
    let proxy = Proxy::start(&config(
        &plain_listeners(&["smtp", "pop3"]),
        "[limits]\nmax_connections = 1\n",
    ));
    let mut a = Raw::connect(proxy.port(0));
    assert!(a.reply().starts_with("220"));
    let mut b = Raw::connect(proxy.port(1));
    assert!(b.line().starts_with("-ERR [SYS/TEMP] Too many connections"));
}

/// Connect from `source` and log in; the reply to AUTH.
fn auth_from(port: u16, source: &str, login: &str, password: &str) -> String {
    let mut c = Raw::connect_from(port, source);
    c.reply();
    c.smtp_login(login, password)
}

/// Failed logins slow down, then lock the address and the account out;
/// a correct password is refused during the lockout; others are unaffected.
#[test]
fn brute_force_is_throttled_then_locked_out() {
    let up = upstream();
    let limits =
        "[limits]\nlogin_delay_ms = 200\nlogin_lockout_failures = 3\nlogin_lockout_s = 60\n";
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), limits));
    let port = proxy.port(0);
    let started = Instant::now();
    for _ in 0..3 {
        assert!(auth_from(port, "127.0.0.1", "scanner@example.test", "guess").starts_with("535 "));
    }
    // 200 + 400 + 800 ms of delays.
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    // Locked: the right password from the same address, and from another.
    for source in ["127.0.0.1", "127.0.0.2"] {
        let r = auth_from(port, source, "scanner@example.test", SCANNER_PASSWORD);
        assert!(
            r.starts_with("454 4.7.0 Too many failed logins"),
            "{source}: {r}"
        );
    }
    proxy.wait_log(&["login failed", "throttled", "locked out"]);
    // Another account from another address is not affected.
    let r = auth_from(port, "127.0.0.3", ALICE, &up.password(ALICE));
    assert!(r.starts_with("235 "), "{r}");
}

/// A PROXY header is believed only from a load balancer in the listener's
/// `proxy_from` (here 127.0.0.3): anyone else who reaches a
/// `proxy_protocol` listener and names an address inside a `[[relay]]`
/// network must not send as the relay account. Their connection is closed
/// before anything is read, logged and counted; the balancer's relays.
#[test]
fn a_proxy_header_from_an_untrusted_peer_is_never_believed() {
    let listeners = format!(
        "{}proxy_protocol = true\nproxy_from = [\"127.0.0.3/32\"]\n",
        listener("smtp", "none", true)
    );
    let proxy = Proxy::start(&config(&listeners, &format!("{ADMIN}{RELAY}")));
    let port = proxy.port(0);
    let header = b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 587\r\n";

    // From 127.0.0.1, not a trusted balancer: closed, nothing relayed.
    let mut c = Raw::connect_from(port, "127.0.0.1");
    c.write(header);
    let greeting = c.reply();
    if greeting.starts_with("220 ") {
        c.send("EHLO attacker.test");
        c.reply();
        c.send(&format!("MAIL FROM:<{ALICE}>"));
        let r = c.reply();
        panic!(
            "an untrusted peer's PROXY header was believed: MAIL FROM answered {r:?}\n{}",
            proxy.logs()
        );
    }
    assert_eq!(greeting, "<closed>", "{}", proxy.logs());
    let line = proxy.wait_log(&["untrusted peer", "\"peer\":\"127.0.0.1:"]);
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert!(line.contains(&format!(":{port}")), "{line}");
    let untrusted = scrape(proxy.admin_addr());
    let port_label = format!("127.0.0.1:{port}");
    assert_eq!(
        value(
            &untrusted,
            "oxbridge_proxy_untrusted_total",
            &[("listener", port_label.as_str())]
        ),
        1.0
    );
    // A peer that says nothing at all is closed unread too.
    let mut quiet = Raw::connect_from(port, "127.0.0.1");
    assert_eq!(quiet.line(), "<closed>");

    // From the balancer, 127.0.0.3: the header decides, and it relays.
    let tag = unique("trusted-balancer");
    let mut c = Raw::connect_from(port, "127.0.0.3");
    c.write(header);
    assert!(c.reply().starts_with("220 "), "{}", proxy.logs());
    c.send("EHLO lb.test");
    c.reply();
    c.send(&format!("MAIL FROM:<{ALICE}>"));
    let r = c.reply();
    assert!(r.starts_with("250 "), "{r}\n{}", proxy.logs());
    c.rcpt_data(ALICE);
    let body = short_message(ALICE, &tag, "via a trusted balancer");
    c.write(format!("{body}.\r\nQUIT\r\n").as_bytes());
    assert!(c.reply().starts_with("250 "));
    assert_arrived(ALICE, &message_id(&tag), body.as_bytes());
    proxy.wait_log(&["session ended", "\"client\":\"127.0.0.2:40000\""]);
    assert_eq!(metric(&proxy, "oxbridge_proxy_untrusted_total"), 2.0);
}
