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
