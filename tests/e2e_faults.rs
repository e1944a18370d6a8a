//! Faults: the mail server dies mid-DATA (the device hears 4xx, never 250,
//! and nothing is delivered), the device dies mid-DATA (no upstream session
//! is left behind), and other sessions carry on.

mod common;

use std::io::Write;
use std::process::Output;
use std::time::Duration;

use base64::Engine;
use common::*;

const ALICE: &str = "alice@example.test";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn proxy_via(forwarder: &Forwarder) -> Proxy {
    let up = upstream();
    let cfg = config(up, "", &listener("smtp", "none", true), "").replace(
        &format!("smtp = \"{}\"", up.submission()),
        &format!("smtp = \"localhost:{}\"", forwarder.addr.port()),
    );
    Proxy::start(&cfg)
}

fn send(port: u16, file: &std::path::Path) -> Output {
    run(
        python("smtp_send.py")
            .args(["--port", &port.to_string(), "--mech", "PLAIN"])
            .args([
                "--user",
                "scanner@example.test",
                "--password",
                SCANNER_PASSWORD,
            ])
            .args(["--sender", ALICE, "--rcpt", ALICE, "--message"])
            .arg(file),
        Duration::from_secs(120),
    )
}

/// Whether a message with this tag reached Dovecot within `wait_s`.
fn delivered(tag: &str, wait_s: &str) -> bool {
    let up = upstream();
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        python("imap_fetch.py")
            .args([
                "--port",
                up.imaps_port(),
                "--cafile",
                up.ca(),
                "--token-url",
                up.token_url(),
            ])
            .args([
                "--client-id",
                up.get("PUBLIC_CLIENT_ID"),
                "--user",
                ALICE,
                "--password",
                &up.password(ALICE),
            ])
            .args([
                "--message-id",
                &format!("<{tag}@oxbridge.test>"),
                "--wait",
                wait_s,
            ])
            .arg("--out")
            .arg(dir.path().join("m.eml")),
        Duration::from_secs(60),
    );
    out.status.success()
}

/// The upstream dies in the middle of DATA: the device gets 421, never 250,
/// nothing is delivered, and the next message goes through.
#[test]
fn upstream_dies_mid_data() {
    let up = upstream();
    let target = format!("127.0.0.1:{}", up.get("SUBMISSION_PORT"));
    let cutter = Forwarder::start(&target, Some(1_000_000));
    let proxy = proxy_via(&cutter);
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("cut");
    let file = dir.path().join("cut.eml");
    std::fs::write(&file, message(ALICE, ALICE, &tag, 4 * 1024 * 1024)).unwrap();
    let out = send(proxy.port(0), &file);
    let t = text(&out);
    assert!(!out.status.success(), "a cut-off message was accepted: {t}");
    assert!(
        t.contains("\"code\": 421"),
        "the device must hear 421: {t}\n{}",
        proxy.logs()
    );
    assert!(!delivered(&tag, "3"), "a cut-off message was delivered");
    proxy.wait_log(&["session ended", "relayed"]);

    // Other sessions are unaffected: a small message through a healthy path.
    let healthy = Forwarder::start(&target, None);
    let proxy = proxy_via(&healthy);
    let tag = unique("after-cut");
    let file = dir.path().join("ok.eml");
    std::fs::write(&file, message(ALICE, ALICE, &tag, 0)).unwrap();
    let out = send(proxy.port(0), &file);
    assert!(out.status.success(), "{}", text(&out));
    assert!(delivered(&tag, "30"));
}

/// The device dies in the middle of DATA: its upstream session ends too,
/// nothing half-sent is delivered.
#[test]
fn device_dies_mid_data() {
    let up = upstream();
    let forwarder = Forwarder::start(&format!("127.0.0.1:{}", up.get("SUBMISSION_PORT")), None);
    let proxy = proxy_via(&forwarder);
    let tag = unique("device-dies");
    {
        let mut c = Raw::connect(proxy.port(0));
        c.reply();
        c.send("EHLO x");
        c.reply();
        let ir = base64::engine::general_purpose::STANDARD
            .encode(format!("\0scanner@example.test\0{SCANNER_PASSWORD}"));
        c.send(&format!("AUTH PLAIN {ir}"));
        assert!(c.reply().starts_with("235 "));
        c.send(&format!("MAIL FROM:<{ALICE}>"));
        c.reply();
        c.send(&format!("RCPT TO:<{ALICE}>"));
        c.reply();
        c.send("DATA");
        assert!(c.reply().starts_with("354 "));
        c.writer
            .write_all(
                format!("Message-ID: <{tag}@oxbridge.test>\r\nSubject: half\r\n\r\nhalf a message")
                    .as_bytes(),
            )
            .unwrap();
        assert!(forwarder.open() >= 1);
        // The device vanishes.
    }
    assert!(
        forwarder.wait_idle(Duration::from_secs(10)),
        "an upstream session outlived its device"
    );
    proxy.wait_log(&["session ended", "relayed"]);
    assert!(!delivered(&tag, "3"), "half a message was delivered");
}

/// A server that accepts connections and never says a word.
fn blackhole() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

/// An upstream that accepts and never answers: each protocol times out
/// into its temporary failure, and other sessions are served meanwhile.
#[test]
fn upstream_that_never_answers_times_out() {
    let up = upstream();
    let silent = blackhole();
    let listeners = ["smtp", "imap", "pop3"]
        .map(|p| listener(p, "none", true))
        .join("\n");
    let cfg = config(up, "", &listeners, "")
        .replace(
            &format!("smtp = \"{}\"", up.submission()),
            &format!("smtp = \"localhost:{silent}\""),
        )
        .replace(
            &format!("imap = \"localhost:{}\"", up.get("IMAPS_PORT")),
            &format!("imap = \"localhost:{silent}\""),
        )
        .replace(
            &format!("pop3 = \"localhost:{}\"", up.get("POP3S_PORT")),
            &format!("pop3 = \"localhost:{silent}\""),
        );
    let stuck = Proxy::start(&cfg);
    let healthy = Proxy::start(&config(up, "", &listener("smtp", "none", true), ""));
    let ir = base64::engine::general_purpose::STANDARD
        .encode(format!("\0scanner@example.test\0{SCANNER_PASSWORD}"));
    let started = std::time::Instant::now();
    let replies: Vec<String> = std::thread::scope(|scope| {
        let smtp = scope.spawn(|| {
            let mut c = Raw::connect(stuck.port(0));
            c.reply();
            c.send("EHLO x");
            c.reply();
            c.send(&format!("AUTH PLAIN {ir}"));
            c.reply()
        });
        let imap = scope.spawn(|| {
            let mut c = Raw::connect(stuck.port(1));
            c.line();
            c.send(&format!("a LOGIN scanner@example.test {SCANNER_PASSWORD}"));
            c.until("a ")
        });
        let pop3 = scope.spawn(|| {
            let mut c = Raw::connect(stuck.port(2));
            c.line();
            c.send(&format!("AUTH PLAIN {ir}"));
            c.line()
        });
        // Meanwhile, another proxy's devices are served at once.
        let t = std::time::Instant::now();
        let mut c = Raw::connect(healthy.port(0));
        c.reply();
        c.send("EHLO x");
        c.reply();
        c.send(&format!("AUTH PLAIN {ir}"));
        assert!(c.reply().starts_with("235 "));
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

/// The upstream dies in the middle of a large IMAP FETCH or POP3 RETR: the
/// device's connection is closed promptly, never left hanging.
#[test]
fn upstream_dies_mid_fetch_and_retr() {
    let up = upstream();
    let bob = "bob@example.test";
    let bob_pw = up.password(bob);
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("mid-fetch");
    let id = format!("<{tag}@oxbridge.test>");
    let file = dir.path().join("big.eml");
    std::fs::write(&file, message(bob, bob, &tag, 5 * 1024 * 1024)).unwrap();
    let listeners = ["imap", "pop3"]
        .map(|p| listener(p, "none", true))
        .join("\n");
    let healthy = Proxy::start(&config(up, "", &listeners, ""));
    let put = run(
        python("imap_session.py")
            .args([
                "--port",
                &healthy.port(0).to_string(),
                "--user",
                bob,
                "--password",
                &bob_pw,
            ])
            .args([
                "--mode",
                "roundtrip",
                "--keep",
                "--message-id",
                &id,
                "--message",
            ])
            .arg(&file)
            .arg("--out")
            .arg(dir.path().join("echo.eml")),
        Duration::from_secs(120),
    );
    assert!(put.status.success(), "{}", text(&put));

    let imap_cut = Forwarder::start_cutting(
        &format!("127.0.0.1:{}", up.get("IMAPS_PORT")),
        None,
        Some(1_000_000),
    );
    let pop3_cut = Forwarder::start_cutting(
        &format!("127.0.0.1:{}", up.get("POP3S_PORT")),
        None,
        Some(1_000_000),
    );
    let cfg = config(up, "", &listeners, "")
        .replace(
            &format!("imap = \"localhost:{}\"", up.get("IMAPS_PORT")),
            &format!("imap = \"localhost:{}\"", imap_cut.addr.port()),
        )
        .replace(
            &format!("pop3 = \"localhost:{}\"", up.get("POP3S_PORT")),
            &format!("pop3 = \"localhost:{}\"", pop3_cut.addr.port()),
        );
    let cut = Proxy::start(&cfg);
    let started = std::time::Instant::now();
    let fetch = run(
        python("imap_session.py")
            .args([
                "--port",
                &cut.port(0).to_string(),
                "--user",
                bob,
                "--password",
                &bob_pw,
            ])
            .args(["--mode", "fetch", "--message-id", &id, "--out"])
            .arg(dir.path().join("cut.eml")),
        Duration::from_secs(60),
    );
    assert!(
        !fetch.status.success(),
        "a cut FETCH succeeded: {}",
        text(&fetch)
    );
    let retr = run(
        python("pop3_session.py")
            .args([
                "--port",
                &cut.port(1).to_string(),
                "--user",
                bob,
                "--password",
                &bob_pw,
            ])
            .args(["--mode", "retr", "--message-id", &id, "--out"])
            .arg(dir.path().join("cut.pop")),
        Duration::from_secs(60),
    );
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
    let _ = run(
        python("imap_session.py")
            .args([
                "--port",
                &healthy.port(0).to_string(),
                "--user",
                bob,
                "--password",
                &bob_pw,
            ])
            .args(["--mode", "fetch", "--delete", "--message-id", &id, "--out"])
            .arg(dir.path().join("gone.eml")),
        Duration::from_secs(60),
    );
}

/// The device vanishes right after sending AUTH: the login it started ends
/// without leaving an upstream connection behind.
#[test]
fn device_dies_mid_authentication() {
    let up = upstream();
    let forwarder = Forwarder::start(&format!("127.0.0.1:{}", up.get("SUBMISSION_PORT")), None);
    let proxy = proxy_via(&forwarder);
    for _ in 0..5 {
        let mut c = Raw::connect(proxy.port(0));
        c.reply();
        c.send("EHLO x");
        c.reply();
        let ir = base64::engine::general_purpose::STANDARD
            .encode(format!("\0scanner@example.test\0{SCANNER_PASSWORD}"));
        c.send(&format!("AUTH PLAIN {ir}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        forwarder.wait_idle(Duration::from_secs(15)),
        "{} upstream connections left",
        forwarder.open()
    );
}
