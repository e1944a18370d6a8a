//! SMTP end to end: real clients (swaks, Python's smtplib) -> oxbridge ->
//! real Postfix (STARTTLS, XOAUTH2 only) -> Dovecot, read back over IMAPS.

use std::time::Duration;

use crate::harness::*;

const TLS: [&str; 3] = ["none", "starttls", "implicit"];

/// Both clients, both mechanisms, with and without an initial response, on
/// a plaintext, a STARTTLS and an implicit-TLS listener: every message
/// arrives intact.
#[test]
fn clients_deliver_byte_identical_messages() {
    let up = upstream();
    let listeners: Vec<String> = TLS
        .iter()
        .map(|tls| listener("smtp", tls, *tls == "none"))
        .collect();
    let proxy = Proxy::start(&config(&listeners.join("\n"), ""));
    let alice_pw = up.password(ALICE);
    let scanner = ("scanner@example.test", SCANNER_PASSWORD);
    let user = (ALICE, alice_pw.as_str());
    let dir = tempfile::tempdir().unwrap();

    // (client, listener, mechanism, initial response, (login, password))
    let cases = [
        ("swaks", "none", "PLAIN", true, scanner),
        ("swaks", "none", "LOGIN", false, user),
        ("swaks", "starttls", "PLAIN", true, user),
        ("swaks", "starttls", "LOGIN", false, scanner),
        ("swaks", "implicit", "PLAIN", true, scanner),
        ("smtplib", "none", "PLAIN", true, user),
        ("smtplib", "none", "PLAIN", false, scanner),
        ("smtplib", "none", "LOGIN", true, scanner),
        ("smtplib", "starttls", "LOGIN", false, user),
        ("smtplib", "starttls", "PLAIN", false, user),
        ("smtplib", "starttls", "LOGIN", true, scanner),
        ("smtplib", "implicit", "LOGIN", false, user),
    ];
    for (client, tls, mech, ir, (login, password)) in cases {
        let m = Message::write(dir.path(), &format!("{client}-{mech}-{tls}"), ALICE, 0);
        let port = proxy.port(TLS.iter().position(|t| *t == tls).unwrap());
        let submit = Smtp {
            tls,
            mech,
            initial_response: ir,
            login,
            password,
            ..Smtp::scanner(port)
        };
        let out = if client == "swaks" {
            submit.swaks(&m.path)
        } else {
            submit.smtplib(&m.path)
        };
        assert!(
            out.status.success(),
            "{} failed:\n{}\n--- proxy log ---\n{}",
            m.tag,
            text(&out),
            proxy.logs()
        );
        if client == "swaks" {
            let t = text(&out);
            // swaks shows the exchange: the initial-response form for PLAIN, challenges for LOGIN.
            if mech == "LOGIN" {
                assert!(t.contains("334 VXNlcm5hbWU6"), "{t}");
            } else {
                assert!(t.contains("AUTH PLAIN "), "{t}");
            }
            assert!(t.contains("235 2.7.0"), "{t}");
            assert_eq!(t.contains("=== TLS started"), tls != "none", "{t}");
        }
        assert_arrived(ALICE, &m.id, &m.bytes);
    }
    let ended = proxy.wait_log(&["session ended", "relayed"]);
    assert!(ended.contains("bytes_to_upstream"), "{ended}");
    assert!(
        !proxy.logs().contains(&alice_pw),
        "a password reached the log"
    );
    assert!(
        !proxy.logs().contains(SCANNER_PASSWORD),
        "a password reached the log"
    );
}

/// A 20 MB attachment through STARTTLS arrives byte for byte.
#[test]
fn large_attachment_is_delivered_intact() {
    let proxy = Proxy::start(&config(&listener("smtp", "starttls", false), ""));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "large", ALICE, 20 * 1024 * 1024);
    assert!(m.bytes.len() > 20_000_000);
    let out = Smtp {
        tls: "starttls",
        ..Smtp::scanner(proxy.port(0))
    }
    .smtplib(&m.path);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    assert_arrived(ALICE, &m.id, &m.bytes);
    let line = proxy.wait_log(&["session ended", "relayed"]);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["bytes_to_upstream"].as_u64().unwrap() > 20_000_000,
        "{line}"
    );
}

/// Wrong password, unknown user, a token endpoint that refuses, an upstream
/// that refuses the token: each gets its reply and a log line, and the
/// proxy goes on serving.
#[test]
fn refusals_end_to_end() {
    let extra = format!(
        "[[account]]\nlogin = \"elsewhere@other.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"scans@elsewhere.test\"\n",
        argon2_hash("elsewhere-pass")
    );
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), &extra));
    let port = proxy.port(0);
    let dir = tempfile::tempdir().unwrap();
    let refused = Message::write(dir.path(), "refused", ALICE, 0);

    let cases = [
        (
            "scanner@example.test",
            "not-the-password",
            "535 5.7.8",
            "bad_credentials",
        ),
        (
            "nobody@nowhere.test",
            "whatever",
            "535 5.7.8",
            "bad_credentials",
        ),
        (ALICE, "wrong-alice-password", "535 5.7.8", "invalid_grant"),
        (
            "elsewhere@other.test",
            "elsewhere-pass",
            "535 5.7.8",
            "upstream_refused",
        ),
    ];
    for (login, password, reply, log) in cases {
        let out = Smtp {
            login,
            password,
            ..Smtp::scanner(port)
        }
        .swaks(&refused.path);
        let t = text(&out);
        assert!(!out.status.success(), "{login} was accepted:\n{t}");
        assert!(t.contains(reply), "{login}: expected {reply}:\n{t}");
        // A login no account covers is logged only as "unknown user #...".
        let shown = login.replace("nobody@nowhere.test", "unknown user #");
        proxy.wait_log(&["login failed", &format!("\"login\":\"{shown}"), log]);
        assert!(
            !proxy.logs().contains(password),
            "a password reached the log"
        );
    }
    // The same proxy still serves a correct login.
    let m = Message::write(dir.path(), "after-refusals", ALICE, 0);
    let out = Smtp::scanner(port).swaks(&m.path);
    assert!(out.status.success(), "{}", text(&out));
    assert_arrived(ALICE, &m.id, &m.bytes);
}

/// Connect, expect the greeting, and log in as the scanner: the AUTH reply.
fn scanner_auth_reply(port: u16) -> String {
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220 "));
    c.smtp_login("scanner@example.test", SCANNER_PASSWORD)
}

/// A token endpoint that fails for now (503, 429, garbage) gives 454, not 535.
#[test]
fn token_endpoint_failures_are_temporary() {
    for response in [
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!",
    ] {
        let url = http_responder(response);
        let proxy = Proxy::start(&with_token_url(&config(&listener("smtp", "none", true), ""), &url));
        let r = scanner_auth_reply(proxy.port(0));
        assert!(r.starts_with("454 4.7.0"), "{response:?} -> {r}\n{}", proxy.logs());
        proxy.wait_log(&["login failed", "token_unavailable"]);
    }
    // A token endpoint that cannot be reached at all.
    let url = format!("http://127.0.0.1:{}/token", closed_port());
    let proxy = Proxy::start(&with_token_url(
        &config(&listener("smtp", "none", true), ""),
        &url,
    ));
    let r = scanner_auth_reply(proxy.port(0));
    assert!(r.starts_with("454 4.7.0"), "{r}");
}

/// An upstream that is down: 454 to the device, and the proxy stays up.
#[test]
fn upstream_down_is_temporary() {
    let cfg = config(&listener("smtp", "none", true), "");
    let mut proxy = Proxy::start(&reroute(
        &cfg,
        "smtp",
        &format!("127.0.0.1:{}", closed_port()),
    ));
    for _ in 0..2 {
        let r = scanner_auth_reply(proxy.port(0));
        assert!(r.starts_with("454 4.7.0"), "{r}");
    }
    proxy.wait_log(&["login failed", "upstream_unavailable", "Connection refused"]);
    assert!(proxy.is_running());
}

/// An upstream whose certificate is not trusted is refused, never used.
#[test]
fn untrusted_upstream_certificate_is_refused() {
    let up = upstream();
    let cfg = config(&listener("smtp", "none", true), "")
        .replace(&format!("ca_file = \"{}\"", up.ca()), "");
    let proxy = Proxy::start(&cfg);
    let r = scanner_auth_reply(proxy.port(0));
    assert!(r.starts_with("454 4.7.0"), "{r}");
    let line = proxy.wait_log(&["login failed", "upstream_unavailable", "TLS"]);
    assert!(line.to_lowercase().contains("certificate"), "{line}");
}

/// An upstream whose (trusted) certificate is for another name is refused:
/// the real submission server reached as 127.0.0.2, which its certificate
/// (localhost, 127.0.0.1, example.test) does not name.
#[test]
fn upstream_certificate_for_another_name_is_refused() {
    let forwarder = Forwarder::start_on("127.0.0.2:0", &upstream().submission(), None, None);
    let cfg = config(&listener("smtp", "none", true), "");
    let proxy = Proxy::start(&reroute(&cfg, "smtp", &forwarder.addr.to_string()));
    let r = scanner_auth_reply(proxy.port(0));
    assert!(r.starts_with("454 4.7.0"), "{r}");
    let line = proxy.wait_log(&["login failed", "upstream_unavailable", "TLS"]);
    assert!(
        line.contains("NotValidForName") || line.to_lowercase().contains("not valid for"),
        "{line}"
    );
    // The forwarder saw the connection: the refusal came from the name check.
    assert!(forwarder.max.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// Without TLS and without `allow_plaintext_auth`, passwords are refused.
#[test]
fn plaintext_auth_needs_opt_in() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", false), ""));
    let mut c = Raw::connect(proxy.port(0));
    c.reply();
    c.send("EHLO printer.test");
    let ehlo = c.reply();
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    c.send("AUTH PLAIN AHNjYW5uZXJAZXhhbXBsZS50ZXN0AHg=");
    assert!(c.reply().starts_with("538 5.7.11"));
    c.send("STARTTLS");
    assert!(c.reply().starts_with("502 "));
    c.send("MAIL FROM:<alice@example.test>");
    assert!(c.reply().starts_with("530 5.7.0"));
    c.send("QUIT");
    assert!(c.reply().starts_with("221 "));
}

/// Commands before login, and what EHLO promises.
#[test]
fn commands_before_login() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), ""));
    let mut c = Raw::connect(proxy.port(0));
    assert!(c.reply().starts_with("220 "));
    c.send("AUTH LOGIN");
    assert!(c.reply().starts_with("503 5.5.1"), "AUTH before EHLO");
    c.send("EHLO printer.test");
    let ehlo = c.reply();
    // What the test Postfix offers after STARTTLS is passed on; its own AUTH is not.
    for k in [
        "SIZE 157286400",
        "8BITMIME",
        "SMTPUTF8",
        "PIPELINING",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(ehlo.contains(k), "EHLO lacks {k}:\n{ehlo}");
    }
    assert!(
        !ehlo.contains("XOAUTH2") && !ehlo.contains("STARTTLS") && !ehlo.contains("ETRN"),
        "{ehlo}"
    );
    for (cmd, want) in [
        ("NOOP", "250 "),
        ("RSET", "250 "),
        ("HELP", "214 "),
        ("VRFY alice", "252 "),
        ("MAIL FROM:<alice@example.test>", "530 5.7.0"),
        ("RCPT TO:<alice@example.test>", "530 5.7.0"),
        ("DATA", "530 5.7.0"),
        ("AUTH CRAM-MD5", "504 5.5.4"),
        ("XYZZY", "500 5.5.2"),
    ] {
        c.send(cmd);
        let r = c.reply();
        assert!(r.starts_with(want), "{cmd} -> {r}");
    }
    c.send(&"X".repeat(10_000));
    assert!(c.reply().starts_with("500 5.5.6"));
    c.send("AUTH LOGIN");
    assert!(c.reply().starts_with("334 VXNlcm5hbWU6"));
    c.send("*");
    assert!(c.reply().starts_with("501 5.7.0"));
    c.send("AUTH PLAIN");
    assert!(c.reply().starts_with("334"));
    c.send("!!not-base64!!");
    assert!(c.reply().starts_with("501 5.5.2"));
    // A pre-auth BDAT chunk is consumed, not read as commands.
    c.write(b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n");
    assert!(c.reply().starts_with("530 5.7.0"));
    assert!(c.reply().starts_with("250 "));
    c.send("QUIT");
    assert!(c.reply().starts_with("221 "));
}

/// Pipelined commands after AUTH reach the upstream (residual replay), and
/// the upstream's replies come back in order.
#[test]
fn pipelined_commands_after_auth_are_relayed() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), ""));
    let mut c = Raw::connect(proxy.port(0));
    c.reply();
    c.send("EHLO printer.test");
    c.reply();
    let tag = unique("pipelined");
    let ir = plain_ir("scanner@example.test", SCANNER_PASSWORD);
    let body = short_message(ALICE, &tag, "pipelined");
    let all = format!("AUTH PLAIN {ir}\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n");
    c.write(all.as_bytes());
    assert!(c.reply().starts_with("235 "));
    assert!(c.reply().starts_with("250 "));
    assert!(c.reply().starts_with("250 "));
    assert!(c.reply().starts_with("354 "));
    c.write(format!("{body}.\r\nQUIT\r\n").as_bytes());
    assert!(c.reply().starts_with("250 "));
    assert!(c.reply().starts_with("221 "));
    assert_arrived(ALICE, &message_id(&tag), body.as_bytes());
}

/// SIGTERM: sessions that have not logged in are told 421; exit status 0.
#[test]
fn shutdown_says_goodbye() {
    let mut proxy = Proxy::start(&config(
        &plain_listeners(&["smtp", "imap"]),
        "[limits]\ndrain_s = 1\n",
    ));
    // A device that has not logged in, one relayed over SMTP, one over IMAP.
    let mut waiting = Raw::connect(proxy.port(0));
    waiting.reply();
    let mut relayed = Raw::connect(proxy.port(0));
    relayed.reply();
    assert!(relayed
        .smtp_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235 "));
    let mut imap = Raw::connect(proxy.port(1));
    imap.line();
    assert!(imap
        .imap_login("scanner@example.test", SCANNER_PASSWORD)
        .contains("a OK"));
    let started = std::time::Instant::now();
    let status = proxy.terminate();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(waiting.reply().starts_with("421 4.3.2"));
    // Relayed sessions get the drain time, then the protocol's goodbye.
    let r = relayed.reply();
    assert!(r.starts_with("421 4.3.2 Service shutting down"), "{r}");
    let r = imap.line();
    assert!(
        r.starts_with("* BYE [UNAVAILABLE] Server shutting down"),
        "{r}"
    );
}

/// Ten devices logging in at once for one account cause one token request,
/// and all ten messages arrive.
#[test]
fn concurrent_logins_share_one_token_request() {
    use std::sync::atomic::Ordering;
    let up = upstream();
    let (token_url, requests) = counted_token_url(Duration::from_millis(300));
    let proxy = Proxy::start(&with_token_url(
        &config(&listener("smtp", "none", true), ""),
        &token_url,
    ));
    let alice_pw = up.password(ALICE);
    let dir = tempfile::tempdir().unwrap();
    for (login, password) in [
        ("scanner@example.test", SCANNER_PASSWORD),
        (ALICE, alice_pw.as_str()),
    ] {
        let before = requests.load(Ordering::SeqCst);
        let messages: Vec<Message> = (0..10)
            .map(|i| Message::write(dir.path(), &format!("concurrent{i}"), ALICE, 0))
            .collect();
        let submit = Smtp {
            login,
            password,
            ..Smtp::scanner(proxy.port(0))
        };
        let outputs = submit.smtplib_at_once(&messages);
        for out in &outputs {
            assert!(out.status.success(), "{}\n{}", text(out), proxy.logs());
        }
        assert_eq!(
            requests.load(Ordering::SeqCst) - before,
            1,
            "token requests for {login}:\n{}",
            proxy.logs()
        );
        for m in &messages {
            fetch_from_dovecot(ALICE, &m.id);
        }
    }
}
