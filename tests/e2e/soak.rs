//! Soak: 200 concurrent sessions mixing SMTP, IMAP and POP3 through one
//! oxbridge, with the SMTP upstream path cut at random points in about one
//! connection in seven. Bounded in time. At the end: every message the
//! devices were told was accepted (250) is delivered exactly once, none of
//! the others is, and the proxy's file descriptors and memory are back to
//! where they were.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;

const SESSIONS: usize = 200;
/// Rounds of SESSIONS concurrent sessions.
const ROUNDS: usize = 5;

/// One SMTP device: true when its message got 250.
fn smtp_device(port: u16, subject: &str) -> bool {
    let ir = plain_ir("scanner@example.test", SCANNER_PASSWORD);
    let mut c = Raw::connect(port);
    let steps = [
        ("EHLO soak".to_string(), "250"),
        (format!("AUTH PLAIN {ir}"), "235"),
        (format!("MAIL FROM:<{ALICE}>"), "250"),
        (format!("RCPT TO:<{ALICE}>"), "250"),
        ("DATA".to_string(), "354"),
    ];
    if !c.reply().starts_with("220") {
        return false;
    }
    for (cmd, want) in steps {
        c.send(&cmd);
        if !c.reply().starts_with(want) {
            return false;
        }
    }
    let body = format!(
        "From: {ALICE}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\n{}\r\n.\r\n",
        "soak line\r\n".repeat(50)
    );
    if std::io::Write::write_all(&mut c.writer, body.as_bytes()).is_err() {
        return false;
    }
    let accepted = c.reply().starts_with("250");
    c.send("QUIT");
    accepted
}

fn imap_device(port: u16) -> bool {
    let mut c = Raw::connect(port);
    c.line();
    let ok = c
        .imap_login(ALICE, &upstream().password(ALICE))
        .contains("a OK");
    c.send("b SELECT INBOX");
    let selected = c.until("b ").contains("b OK");
    c.send("c LOGOUT");
    c.until("c ");
    ok && selected
}

fn pop3_device(port: u16) -> bool {
    let mut c = Raw::connect(port);
    c.line();
    c.send("USER scanner@example.test");
    c.line();
    c.send(&format!("PASS {SCANNER_PASSWORD}"));
    let ok = c.line().starts_with("+OK");
    c.send("STAT");
    let stat = c.line().starts_with("+OK");
    c.send("QUIT");
    c.line();
    ok && stat
}

/// Messages in alice's INBOX whose subject contains `subject`, read
/// straight from Dovecot.
fn count_subject(subject: &str) -> usize {
    let up = upstream();
    let script = format!(
        r#"
import imaplib, json, ssl, sys, urllib.parse, urllib.request
body = urllib.parse.urlencode({{"grant_type": "password", "client_id": "{client}", "username": "{user}", "password": "{pw}", "scope": "x"}}).encode()
token = json.load(urllib.request.urlopen("{url}", body, timeout=10))["access_token"]
imap = imaplib.IMAP4_SSL("localhost", {port}, ssl_context=ssl.create_default_context(cafile="{ca}"))
imap.authenticate("XOAUTH2", lambda _: ("user={user}\x01auth=Bearer %s\x01\x01" % token).encode())
imap.select("INBOX", readonly=True)
typ, data = imap.search(None, "SUBJECT", "{subject}")
print(len(data[0].split()))
"#,
        client = up.get("PUBLIC_CLIENT_ID"),
        user = ALICE,
        pw = up.password(ALICE),
        url = up.token_url(),
        port = up.imaps_port(),
        ca = up.ca(),
    );
    let out = run(
        std::process::Command::new("python3").args(["-c", &script]),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn soak_with_random_faults() {
    let (chaos, cuts) = chaos_forwarder(upstream().loopback("smtp"), 0x5eed_1234_abcd);
    let limits = "[limits]\nsmtp_sessions_per_mailbox = 300\nimap_sessions_per_mailbox = 300\npop3_sessions_per_mailbox = 300\n";
    let cfg = config(&plain_listeners(&["smtp", "imap", "pop3"]), limits);
    let proxy = Proxy::start(&reroute(&cfg, "smtp", &format!("localhost:{chaos}")));
    let (smtp, imap, pop3) = (proxy.port(0), proxy.port(1), proxy.port(2));
    // Warm up (tokens, capability probe), then take the baseline.
    assert!(imap_device(imap) && pop3_device(pop3));
    std::thread::sleep(Duration::from_millis(500));
    let (fds_before, rss_before) = (proxy.open_fds(), proxy.rss_kib());

    let subject = unique("soak");
    let started = Instant::now();
    let accepted = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    for round in 0..ROUNDS {
        std::thread::scope(|scope| {
            for i in (round * SESSIONS)..((round + 1) * SESSIONS) {
                let (accepted, failed, subject) = (&accepted, &failed, &subject);
                scope.spawn(move || {
                    let ok = match i % 4 {
                        0 | 1 => {
                            let ok = smtp_device(smtp, &format!("{subject}-{i}"));
                            if ok {
                                accepted.fetch_add(1, Ordering::SeqCst);
                            }
                            ok
                        }
                        2 => imap_device(imap),
                        _ => pop3_device(pop3),
                    };
                    if !ok {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
    }
    let elapsed = started.elapsed();
    let accepted = accepted.load(Ordering::SeqCst);
    assert!(elapsed < Duration::from_secs(120), "soak took {elapsed:?}");
    assert!(cuts.load(Ordering::SeqCst) > 0, "no fault was injected");
    assert!(
        accepted > ROUNDS * SESSIONS / 4,
        "only {accepted} messages accepted"
    );

    // Every accepted message delivered exactly once; no refused one delivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = count_subject(&subject);
    while got < accepted && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        got = count_subject(&subject);
    }
    std::thread::sleep(Duration::from_secs(1));
    let got = count_subject(&subject);
    assert_eq!(got, accepted, "accepted {accepted}, delivered {got}");

    // Nothing left behind: descriptors and memory back to the baseline.
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.open_fds() > fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (fds_after, rss_after) = (proxy.open_fds(), proxy.rss_kib());
    assert!(fds_after <= fds_before, "fds {fds_before} -> {fds_after}");
    assert!(
        rss_after <= rss_before + 64 * 1024,
        "RSS {rss_before} KiB -> {rss_after} KiB"
    );
    eprintln!(
        "soak: {ROUNDS} rounds of {SESSIONS} concurrent sessions in {elapsed:?}; {accepted} messages accepted and delivered; {} sessions failed under {} cut connections; fds {fds_before} -> {fds_after}; RSS {rss_before} -> {rss_after} KiB",
        failed.load(Ordering::SeqCst),
        cuts.load(Ordering::SeqCst)
    );
}
