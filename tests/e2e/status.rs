//! The status page, end to end: headless Chromium (Debian's `chromium`)
//! loads `/` from a running oxbridge with a live IMAP session, a failing
//! account and a waiting spooled message; the test reads what the page
//! says from the DOM Chromium built and keeps a phone-sized screenshot in
//! `target/test-artefacts/`. Off loopback, `/` and `/metrics` answer only
//! the admin token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const BROWSER_LIMIT: Duration = Duration::from_secs(90);

/// Where tests leave what a person may want to look at afterwards.
fn artefacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-artefacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium on `url`, with `what` (`--dump-dom`, or
/// `--screenshot=FILE`), as a first-time user's browser: no profile, no
/// background traffic, a phone's window.
pub(crate) fn chromium(url: &str, what: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    );
    let profile = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(CHROMIUM).args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=412,2600",
            &format!("--user-data-dir={}", profile.path().display()),
            what,
            url,
        ]),
        BROWSER_LIMIT,
    );
    assert!(out.status.success(), "chromium {what}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of an HTML document, tags dropped and spaces collapsed, so
/// that assertions read like the page does.
pub(crate) fn visible_text(html: &str) -> String {
    let body = html.split_once("<body>").map_or(html, |(_, b)| b);
    let mut out = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// curl an admin path with extra arguments: (status, headers and body).
fn curl_with(addr: SocketAddr, path: &str, args: &[&str]) -> (u16, String) {
    let out = run(
        Command::new("curl")
            .args(["-sS", "-m", "20", "-i", "-w", "\n%{http_code}"])
            .args(args)
            .arg(format!("http://{addr}{path}")),
        CLIENT_LIMIT,
    );
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = all.rsplit_once('\n').expect("curl output");
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn chromium_shows_sessions_tokens_a_failing_account_and_the_queue() {
    let state = tempfile::tempdir().unwrap();
    // IMAP relays to the test upstream; the spooling SMTP listener's
    // upstream is a closed port, so what it takes waits in the queue.
    let listeners = plain_listeners(&["imap"])
        + "\n"
        + &listener("smtp", "none", true)
        + "delivery = \"spool\"\n";
    let cfg = config(
        &listeners,
        &format!("{ADMIN}\n[spool]\nretry_min_s = 300\nretry_max_s = 600\n"),
    );
    let cfg = reroute(&cfg, "smtp", &format!("127.0.0.1:{}", closed_port()));
    let proxy = Proxy::start(&with_state_dir(&cfg, state.path()));
    let admin = proxy.admin_addr();
    let (imap, smtp) = (proxy.port(0), proxy.port(1));

    // A live session: scanner logged in over IMAP, held open.
    let mut live = Raw::connect(imap);
    live.line();
    assert!(live
        .imap_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("a OK"));
    // A failing account: bob's password is wrong at the token endpoint.
    let bob = Client::new(imap, "bob@example.test", "not-bobs-password").imap("login", &[]);
    assert!(!bob.status.success(), "{}", text(&bob));
    // A message that waits in the spool.
    let mut device = Raw::connect(smtp);
    device.reply();
    device.send("EHLO printer.status.test");
    device.reply();
    assert!(device
        .smtp_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235"));
    device.envelope("alice@example.test", "boss@example.test");
    device.write(b"Subject: scan for the status page\r\n\r\nscan\r\n.\r\n");
    let queued = device.reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let id = queued.trim_end().rsplit(' ').next().unwrap().to_string();
    device.send("QUIT");
    device.reply();
    wait_until("the first delivery attempt", || {
        proxy.logs().contains("Connection refused")
    });

    let url = format!("http://{admin}/");
    let dom = chromium(&url, "--dump-dom");
    let page = visible_text(&dom);
    for expected in [
        "oxbridge on",
        "ready",
        // Listeners: the IMAP one holds the live session.
        &format!("imap 127.0.0.1:{imap} none - 1 / 1000"),
        &format!("smtp 127.0.0.1:{smtp} none spool 0 / 1000"),
        // scanner: the app's token, a login just now, alice's session.
        "scanner@example.test client_credentials alice@example.test valid for 59m",
        "- last login ",
        "imap 1/20",
        // The pattern account whose only login failed.
        "*@example.test password each user's own last request failed: token refused: invalid_grant: AADSTS50126",
        "- 1 failed since the last success, latest ",
        // Upstream sessions per mailbox.
        "alice@example.test imap 1 / 20 0",
        // The failure, with the diagnosis and the fix.
        "imap 127.0.0.1 *@example.test token_refused : token refused: invalid_grant: AADSTS50126",
        "Fix: the user's password is wrong (password grant)",
        // The queue.
        "SMTP queue 1 waiting, the oldest for ",
        &format!("{id} "),
        " alice@example.test boss@example.test 1 upstream unavailable: connect to 127.0.0.1:",
        ": Connection refused",
    ] {
        assert!(page.contains(expected), "the page lacks {expected:?}:\n{page}");
    }
    assert!(
        !dom.to_lowercase().contains("<script"),
        "the page runs a script"
    );
    assert!(!page.contains("not-bobs-password"), "{page}");

    let shot = artefacts().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&url, &format!("--screenshot={}", shot.display()));
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000);
    eprintln!("status page screenshot: {}", shot.display());

    live.send("a LOGOUT");
    live.until("a ");
}

#[test]
fn off_loopback_the_page_and_the_metrics_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "status-test-token-7f3a9c1e5b";
    let token_file = dir.path().join("admin_token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let admin_cfg = format!(
        "[admin]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    let proxy = Proxy::start(&config(&plain_listeners(&["smtp"]), &admin_cfg));
    let port = proxy.admin_addr().port();
    let admin: SocketAddr = ([127, 0, 0, 1], port).into();

    for path in ["/", "/metrics"] {
        for args in [
            &[][..],
            &["-H", "Authorization: Bearer status-test-token-wrong"][..],
            &["-u", "admin:status-test-token-7f3a9c1e5"][..],
        ] {
            let (status, answer) = curl_with(admin, path, args);
            assert_eq!(status, 401, "{path} {args:?}: {answer}");
            assert!(
                answer.contains(
                    "www-authenticate: Basic realm=\"oxbridge\", charset=\"UTF-8\"\r\nwww-authenticate: Bearer realm=\"oxbridge\"\r\n"
                ),
                "{answer}"
            );
            assert!(!answer.contains(token), "{answer}");
        }
        let bearer = format!("Authorization: Bearer {token}");
        let (status, answer) = curl_with(admin, path, &["-H", &bearer]);
        assert_eq!(status, 200, "{path}: {answer}");
        let basic = format!("anyone:{token}");
        assert_eq!(curl_with(admin, path, &["-u", &basic]).0, 200, "{path}");
    }
    // The probes need no token.
    assert_eq!(curl_with(admin, "/healthz", &[]).0, 200);
    assert_eq!(curl_with(admin, "/readyz", &[]).0, 200);
    // A browser given the token as the password of the address sees the page.
    let page = visible_text(&chromium(
        &format!("http://admin:{token}@127.0.0.1:{port}/"),
        "--dump-dom",
    ));
    assert!(page.contains("Listeners"), "{page}");
    assert!(!proxy.logs().contains(token), "the token reached the log");
}
