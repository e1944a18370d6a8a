//! Faults: the mail server dies mid-DATA (the device hears 4xx, never 250,
//! and nothing is delivered) or mid-FETCH, or never answers; the device
//! dies mid-DATA or mid-AUTH (no upstream session is left behind); and
//! other sessions carry on.

use std::time::{Duration, Instant};

use crate::harness::*;

/// A proxy with one plaintext SMTP listener whose upstream is `forwarder`.
fn proxy_via(forwarder: &Forwarder) -> Proxy {
    let cfg = config(&listener("smtp", "none", true), "");
    Proxy::start(&reroute(
        &cfg,
        "smtp",
        &format!("localhost:{}", forwarder.addr.port()),
    ))
}

/// Whether the message `id` reached alice's INBOX within `wait_s`.
fn delivered(id: &str, wait_s: &str) -> bool {
    read_from_dovecot(ALICE, id, wait_s).is_ok()
}

/// The upstream dies in the middle of DATA: the device gets 421, never 250,
/// nothing is delivered, and the next message goes through.
#[test]
fn upstream_dies_mid_data() {
    let target = upstream().loopback("smtp");
    let cutter = Forwarder::start(&target, Some(1_000_000));
    let proxy = proxy_via(&cutter);
    let dir = tempfile::tempdir().unwrap();
    let cut = Message::write(dir.path(), "cut", ALICE, 4 * 1024 * 1024);
    let out = Smtp::scanner(proxy.port(0)).smtplib(&cut.path);
    let t = text(&out);
    assert!(!out.status.success(), "a cut-off message was accepted: {t}");
    assert!(
        t.contains("\"code\": 421"),
        "the device must hear 421: {t}\n{}",
        proxy.logs()
    );
    assert!(!delivered(&cut.id, "3"), "a cut-off message was delivered");
    proxy.wait_log(&["session ended", "relayed"]);

    // Other sessions are unaffected: a small message through a healthy path.
    let healthy = Forwarder::start(&target, None);
    let proxy = proxy_via(&healthy);
    let ok = Message::write(dir.path(), "after-cut", ALICE, 0);
    let out = Smtp::scanner(proxy.port(0)).smtplib(&ok.path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(delivered(&ok.id, "30"));
}

/// The device dies in the middle of DATA: its upstream session ends too,
/// nothing half-sent is delivered.
#[test]
fn device_dies_mid_data() {
    let forwarder = Forwarder::start(&upstream().loopback("smtp"), None);
    let proxy = proxy_via(&forwarder);
    let id = message_id(&unique("device-dies"));
    {
        let mut c = Raw::connect(proxy.port(0));
        c.reply();
        assert!(c
            .smtp_login("scanner@example.test", SCANNER_PASSWORD)
            .starts_with("235 "));
        c.envelope(ALICE, ALICE);
        c.write(format!("Message-ID: {id}\r\nSubject: half\r\n\r\nhalf a message").as_bytes());
        assert!(forwarder.open() >= 1);
        // The device vanishes.
    }
    assert!(
        forwarder.wait_idle(Duration::from_secs(10)),
        "an upstream session outlived its device"
    );
    proxy.wait_log(&["session ended", "relayed"]);
    assert!(!delivered(&id, "3"), "half a message was delivered");
}

/// An upstream that accepts and never answers: each protocol times out
/// into its temporary failure, and other sessions are served meanwhile.
#[test]
fn upstream_that_never_answers_times_out() {
    let silent = format!("localhost:{}", blackhole());
    let cfg = config(&plain_listeners(&["smtp", "imap", "pop3"]), "");
    let stuck = Proxy::start(&reroute_all(&cfg, &silent));
    let healthy = Proxy::start(&config(&listener("smtp", "none", true), ""));
    let ir = plain_ir("scanner@example.test", SCANNER_PASSWORD);
    let started = Instant::now();
    let replies: Vec<String> = std::thread::scope(|scope| {
        let smtp = scope.spawn(|| {
            let mut c = Raw::connect(stuck.port(0));
            c.reply();
            c.smtp_login("scanner@example.test", SCANNER_PASSWORD)
        });
        let imap = scope.spawn(|| {
            let mut c = Raw::connect(stuck.port(1));
            c.line();
            c.imap_login("scanner@example.test", SCANNER_PASSWORD)
        });
        let pop3 = scope.spawn(|| {
            let mut c = Raw::connect(stuck.port(2));
            c.line();
            c.send(&format!("AUTH PLAIN {ir}"));
            c.line()
        });
        // Meanwhile, another proxy's devices are served at once.
        let t = Instant::now();
        let mut c = Raw::connect(healthy.port(0));
        c.reply();
        assert!(c
            .smtp_login("scanner@example.test", SCANNER_PASSWORD)
            .starts_with("235 "));
        assert!(t.elapsed() < Duration::from_secs(10));
        [smtp, imap, pop3].map(|h| h.join().unwrap()).to_vec()
    });
    assert!(replies[0].starts_with("454 4.7.0"), "SMTP: {}", replies[0]);
    assert!(
        replies[1].starts_with("a NO [UNAVAILABLE]"),
        "IMAP: {}",
        replies[1]
    );
    assert!(
        replies[2].starts_with("-ERR [SYS/TEMP]"),
        "POP3: {}",
        replies[2]
    );
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "{:?}",
        started.elapsed()
    );
    stuck.wait_log(&["login failed", "timed out"]);
}

/// The IMAP server's connection is cut between responses (the server
/// killed, the network gone) with no `BYE` of its own: the device hears
/// oxbridge's `BYE`, byte for byte, then the end of the connection; never
/// a connection dropped in silence.
#[test]
fn an_imap_upstream_gone_without_bye_gets_a_bye() {
    let up = upstream();
    let outage = Outage::start(&up.loopback("imap"));
    outage.up();
    let cfg = reroute(
        &config(&plain_listeners(&["imap"]), ""),
        "imap",
        &format!("localhost:{}", outage.addr.port()),
    );
    let proxy = Proxy::start(&cfg);
    let mut c = Raw::connect(proxy.port(0));
    c.line();
    let r = c.imap_login(BOB, &up.password(BOB));
    assert!(r.lines().last().unwrap_or("").starts_with("a OK"), "{r}");
    c.send("s SELECT INBOX");
    c.until("s OK");
    outage.down();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut c.reader, &mut rest);
    assert_eq!(
        rest,
        "* BYE [UNAVAILABLE] Mail server closed the connection, please log in again\r\n",
        "{}",
        proxy.logs()
    );
}

/// The upstream dies in the middle of a large IMAP FETCH or POP3 RETR: the
/// device's connection is closed promptly, never left hanging.
#[test]
fn upstream_dies_mid_fetch_and_retr() {
    let up = upstream();
    let bob_pw = up.password(BOB);
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "mid-fetch", BOB, 5 * 1024 * 1024);
    let out = |name: &str| dir.path().join(name);
    let cfg = config(&plain_listeners(&["imap", "pop3"]), "");
    let healthy = Proxy::start(&cfg);
    let put = Client::new(healthy.port(0), BOB, &bob_pw).roundtrip(&m, &out("echo.eml"), true);
    assert!(put.status.success(), "{}", text(&put));

    let imap_cut = Forwarder::start_cutting(&up.loopback("imap"), None, Some(1_000_000));
    let pop3_cut = Forwarder::start_cutting(&up.loopback("pop3"), None, Some(1_000_000));
    let cfg = reroute(
        &reroute(&cfg, "imap", &format!("localhost:{}", imap_cut.addr.port())),
        "pop3",
        &format!("localhost:{}", pop3_cut.addr.port()),
    );
    let cut = Proxy::start(&cfg);
    let started = Instant::now();
    let fetch = Client::new(cut.port(0), BOB, &bob_pw).fetch(&m.id, &out("cut.eml"), false);
    assert!(
        !fetch.status.success(),
        "a cut FETCH succeeded: {}",
        text(&fetch)
    );
    let retr = Client::new(cut.port(1), BOB, &bob_pw).retr(&m.id, &out("cut.pop"), false);
    assert!(
        !retr.status.success(),
        "a cut RETR succeeded: {}",
        text(&retr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the device was left hanging: {:?}",
        started.elapsed()
    );
    assert!(
        imap_cut.wait_idle(Duration::from_secs(10)) && pop3_cut.wait_idle(Duration::from_secs(10))
    );

    // Clean up through the healthy path.
    let _ = Client::new(healthy.port(0), BOB, &bob_pw).fetch(&m.id, &out("gone.eml"), true);
}

/// The device vanishes right after sending AUTH: the login it started ends
/// without leaving an upstream connection behind.
#[test]
fn device_dies_mid_authentication() {
    let forwarder = Forwarder::start(&upstream().loopback("smtp"), None);
    let proxy = proxy_via(&forwarder);
    for _ in 0..5 {
        let mut c = Raw::connect(proxy.port(0));
        c.reply();
        c.send("EHLO x");
        c.reply();
        c.send(&format!(
            "AUTH PLAIN {}",
            plain_ir("scanner@example.test", SCANNER_PASSWORD)
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        forwarder.wait_idle(Duration::from_secs(15)),
        "{} upstream connections left",
        forwarder.open()
    );
}
