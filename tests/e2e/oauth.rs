//! OAuth lifecycle end to end against the real test upstream: a
//! `refresh_token` account consented through `oxbridge login` (device flow,
//! and PKCE in a browser played by curl) sends through SMTP and reads
//! through IMAP and POP3; rotated refresh tokens survive a restart; a shared
//! mailbox is opened with `login\shared@domain`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::harness::*;

const LOCAL_PASSWORD: &str = "delegated-local-pass";

/// SMTP, IMAP and POP3 listeners without TLS; the harness IDP's device and
/// authorize endpoints; a private state_dir; two refresh_token accounts
/// (device flow and browser) for bob, and the scanner allowed to open bob's
/// mailbox as a shared one.
fn oauth_config(state: &Path) -> String {
    let hash = argon2_hash(LOCAL_PASSWORD);
    let extra = format!(
        "[[account]]\nlogin = \"device@example.test\"\npassword_hash = \"{hash}\"\ngrant = \"refresh_token\"\nmailbox = \"{BOB}\"\n\n\
         [[account]]\nlogin = \"browser@example.test\"\npassword_hash = \"{hash}\"\ngrant = \"refresh_token\"\nmailbox = \"{BOB}\"\n"
    );
    let idp = upstream().get("IDP_URL");
    let cfg = config(&plain_listeners(&["smtp", "imap", "pop3"]), &extra);
    with_state_dir(&cfg, state)
        .replace(
            "[oauth]\n",
            &format!(
                "[oauth]\ndevice_code_url = \"{idp}/common/oauth2/v2.0/devicecode\"\nauthorize_url = \"{idp}/common/oauth2/v2.0/authorize\"\n"
            ),
        )
        .replace(
            "mailbox = \"alice@example.test\"\n",
            &format!("mailbox = \"alice@example.test\"\nallow_shared = [\"{BOB}\"]\n"),
        )
}

/// Send through the proxy's SMTP as `login`, then read the message through
/// its IMAP and POP3 (deleting it at the end).
fn send_and_read(proxy: &Proxy, login: &str, dir: &Path) {
    let m = Message::write(dir, "oauth", BOB, 0);
    let sent = Smtp {
        login,
        password: LOCAL_PASSWORD,
        from: BOB,
        to: BOB,
        ..Smtp::scanner(proxy.port(0))
    }
    .smtplib(&m.path);
    assert!(
        sent.status.success(),
        "SMTP as {login}: {}\n{}",
        text(&sent),
        proxy.logs()
    );
    let read_back = |what: &str, read: &Output, out: &Path| {
        assert!(
            read.status.success(),
            "{what} as {login}: {}\n{}",
            text(read),
            proxy.logs()
        );
        assert_delivered_intact(&std::fs::read(out).unwrap(), &m.bytes);
    };
    let out = dir.join(format!("{}.imap", m.tag));
    let read = Client::new(proxy.port(1), login, LOCAL_PASSWORD).fetch(&m.id, &out, false);
    read_back("IMAP", &read, &out);
    let out = dir.join(format!("{}.pop3", m.tag));
    let read = Client::new(proxy.port(2), login, LOCAL_PASSWORD).retr(&m.id, &out, true);
    read_back("POP3", &read, &out);
}

/// `oxbridge login --paste`: curl plays a browser on another machine (it
/// does not follow the redirect; its Location is the address the operator
/// copies). A forged address (another state) is refused and the real one
/// then consents; with only a forged one, nothing is stored.
#[test]
fn paste_consent_refuses_a_forged_address_then_works() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg_path = write_config(dir.path(), &oauth_config(&state));
    let redirect = "https://login.example.test/common/oauth2/nativeclient";
    let start = |account: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .args([
                "login",
                account,
                "--paste",
                "--redirect-uri",
                redirect,
                "--config",
            ])
            .arg(&cfg_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("the authorize URL is printed").unwrap();
            if line.trim().starts_with("http") && line.contains("/authorize?") {
                break line.trim().to_string();
            }
        };
        let head = run(
            Command::new("curl").args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{redirect_url}",
                "--max-time",
                "30",
                &url,
            ]),
            CLIENT_LIMIT,
        );
        let location = String::from_utf8_lossy(&head.stdout).to_string();
        assert!(
            location.starts_with(&format!("{redirect}?code=")),
            "{location}"
        );
        (child, lines, location)
    };
    let forge = |location: &str| {
        let state = location
            .split("state=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        location.replace(&format!("state={state}"), "state=forged-by-someone-else")
    };

    let (mut child, mut lines, location) = start("browser@example.test");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", forge(&location)).unwrap();
    let refused = loop {
        let line = lines.next().expect("a refusal is printed").unwrap();
        if line.starts_with("Refused:") {
            break line;
        }
    };
    assert_eq!(
        refused,
        "Refused: its state is not this sign-in's (a stray or forged address). Paste the address the browser was sent to after this sign-in:"
    );
    writeln!(stdin, "{location}").unwrap();
    drop(stdin);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("Stored the refresh token for browser@example.test")),
        "{rest:?}"
    );

    // Only a forged address: the command fails and stores nothing.
    let (mut child, lines, location) = start("device@example.test");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", forge(&location)).unwrap();
    drop(stdin);
    drop(lines);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "oxbridge: login for device@example.test failed: no address was pasted\n"
    );

    // The pasted consent works; the other account still has none.
    let proxy = Proxy::start(&std::fs::read_to_string(&cfg_path).unwrap());
    send_and_read(&proxy, "browser@example.test", dir.path());
    let mut c = Raw::connect(proxy.port(1));
    c.line();
    c.send(&format!("a LOGIN device@example.test {LOCAL_PASSWORD}"));
    assert!(c.line().starts_with("a NO [AUTHENTICATIONFAILED]"));
}

#[test]
fn refresh_token_accounts_consent_once_then_work_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Refresh requests are counted in front of the IDP, for this test alone
    // (the IDP's own stats count every test's).
    let (token_url, refreshes) = counted_refresh_url(Duration::ZERO, 0);
    let refresh_requests = || refreshes.load(Ordering::SeqCst);
    let cfg_path = write_config(
        dir.path(),
        &with_token_url(&oauth_config(&state), &token_url),
    );

    // Before consent: a clear refusal that says what to do.
    let proxy = Proxy::start(&std::fs::read_to_string(&cfg_path).unwrap());
    let mut c = Raw::connect(proxy.port(1));
    c.line();
    c.send(&format!("a LOGIN device@example.test {LOCAL_PASSWORD}"));
    assert!(c.line().starts_with("a NO [AUTHENTICATIONFAILED]"));
    proxy.wait_log(&[
        "login failed",
        "token_refused",
        "run `oxbridge login device@example.test`",
    ]);
    drop(proxy);

    // Device flow: the test IDP approves after one pending poll.
    let out = oxbridge(&["login", "device@example.test"], &cfg_path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Stored the refresh token"),
        "{}",
        text(&out)
    );

    // Browser flow (PKCE): curl plays the browser and follows the IDP's redirect.
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxbridge"))
        .args(["login", "browser@example.test", "--browser", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the authorize URL is printed").unwrap();
        if line.trim().starts_with("http") && line.contains("/authorize?") {
            break line.trim().to_string();
        }
    };
    let browser = run(
        Command::new("curl").args(["-sS", "-L", "--max-time", "30", &url]),
        CLIENT_LIMIT,
    );
    assert!(
        String::from_utf8_lossy(&browser.stdout).contains("close this window"),
        "{}",
        text(&browser)
    );
    assert!(child.wait().unwrap().success());

    // Both accounts send and read; the first login of each refreshes once.
    let before = refresh_requests();
    let mut proxy = Proxy::start(&std::fs::read_to_string(&cfg_path).unwrap());
    send_and_read(&proxy, "device@example.test", dir.path());
    send_and_read(&proxy, "browser@example.test", dir.path());
    assert_eq!(
        refresh_requests() - before,
        2,
        "one refresh per account, then the cache"
    );
    assert!(proxy.terminate().success());

    // A new process has only what was persisted: the IDP rotates refresh
    // tokens strictly, so this works only if every rotation was saved.
    let reuse = || {
        upstream().idp_get("/admin/stats")["refresh_reuse_rejected"]
            .as_u64()
            .unwrap_or(0)
    };
    let (before, reused_before) = (refresh_requests(), reuse());
    let proxy = Proxy::start(&std::fs::read_to_string(&cfg_path).unwrap());
    send_and_read(&proxy, "device@example.test", dir.path());
    assert_eq!(refresh_requests() - before, 1);
    assert_eq!(
        reuse(),
        reused_before,
        "a consumed refresh token was presented again"
    );

    // No token in clear text anywhere under state_dir.
    let logs = proxy.logs();
    assert!(!logs.contains("eyJ"), "an access token reached the log");
    for entry in std::fs::read_dir(state.join("tokens")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(3).any(|w| w == b"rt."),
            "refresh token in clear text"
        );
    }
}

#[test]
fn shared_mailbox_with_backslash_login() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&oauth_config(&dir.path().join("state")));
    // scanner@example.test may open bob's mailbox (allow_shared); its own is alice's.
    let login = format!("scanner@example.test\\{BOB}");
    let out = Client::new(proxy.port(1), &login, SCANNER_PASSWORD).imap("login", &[]);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    proxy.wait_log(&["authenticated", &format!("\"mailbox\":\"{BOB}\"")]);
    // Another mailbox is not allowed.
    let out = Client::new(
        proxy.port(1),
        "scanner@example.test\\carol@example.test",
        SCANNER_PASSWORD,
    )
    .imap("login", &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("AUTHENTICATIONFAILED"),
        "{}",
        text(&out)
    );
}

/// The refresh token inactivity limit (AADSTS700082) at the test IDP,
/// seconds, for the keep-alive tests (an `idle-N` tenant).
const IDLE_S: u64 = 6;

/// A token URL whose refresh tokens die after [`IDLE_S`] unused.
fn idle_tenant(token_url: &str) -> String {
    let idle = token_url.replacen("/common/", &format!("/idle-{IDLE_S}/"), 1);
    assert_ne!(idle, token_url, "no tenant segment in {token_url}");
    idle
}

/// Two consents of one account, each in its own state_dir, against an IDP
/// whose refresh tokens die after 6 s unused. The proxy that keeps its
/// token alive (every 2 s) still logs in after four such windows, as does
/// a new process that only has what it persisted, and `oxbridge check`
/// shows fresh token times; the consent left without keep-alive is refused
/// with AADSTS700082 and its fix.
#[test]
fn keep_alive_outlasts_the_refresh_token_inactivity_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (token_url, refreshes) = counted_refresh_url(Duration::ZERO, 0);
    let token_url = idle_tenant(&token_url);
    let setup = |name: &str, keepalive_s: u64| {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let cfg = with_token_url(&oauth_config(&home.join("state")), &token_url).replacen(
            "[oauth]\n",
            &format!("[oauth]\nrefresh_keepalive_s = {keepalive_s}\n"),
            1,
        );
        write_config(&home, &format!("{cfg}\n{ADMIN}"))
    };
    let kept = setup("kept", 2);
    let left = setup("left", 0);
    for cfg in [&kept, &left] {
        let out = oxbridge(&["login", "device@example.test"], cfg);
        assert!(out.status.success(), "{}", text(&out));
    }
    let config_of = |path: &Path| std::fs::read_to_string(path).unwrap();
    let mut keeper = Proxy::start(&config_of(&kept));
    let idle = Proxy::start(&config_of(&left));
    let before = refreshes.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(4 * IDLE_S));

    // About one refresh per 2 s, each one counted and timed in /metrics.
    let made = refreshes.load(Ordering::SeqCst) - before;
    let m = scrape(keeper.admin_addr());
    let ok = value(&m, "oxbridge_refresh_keepalives_total", &[("result", "ok")]);
    assert!(
        (8..=13).contains(&made) && ok as usize == made,
        "{made} refreshes, {ok} counted\n{}",
        keeper.logs()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let account = [("account", "device@example.test")];
    for (name, low, high) in [
        ("oxbridge_refresh_token_issued_timestamp_seconds", -4.0, 1.0),
        (
            "oxbridge_refresh_token_last_success_timestamp_seconds",
            -4.0,
            1.0,
        ),
        (
            "oxbridge_access_token_expiry_timestamp_seconds",
            3000.0,
            3700.0,
        ),
    ] {
        let at = value(&m, name, &account) - now;
        assert!((low..=high).contains(&at), "{name}: {at} s from now");
    }
    assert!(keeper.terminate().success());

    // What the keeper persisted still works, read by new processes.
    let left_check = text(&oxbridge(&["check"], &left)).to_string();
    let kept_check = text(&oxbridge(&["check"], &setup("kept", 0))).to_string();
    let line = |lines: &str, prefix: &str| {
        lines
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix}\n{lines}"))
            .to_string()
    };
    let times = line(&kept_check, "device@example.test: tokens: consented ");
    assert!(
        times.contains("; refresh token issued ") && times.contains("; last refresh "),
        "{times}"
    );
    let imap = line(&kept_check, "device@example.test imap: ");
    assert!(
        imap.starts_with("device@example.test imap: OK"),
        "{kept_check}"
    );
    let fresh = Proxy::start(&config_of(&kept));
    let mut c = Raw::connect(fresh.port(1));
    c.line();
    c.send(&format!("a LOGIN device@example.test {LOCAL_PASSWORD}"));
    let reply = c.line();
    assert!(reply.starts_with("a OK"), "{reply}\n{}", fresh.logs());

    // The consent nobody kept alive died of inactivity.
    let times = line(&left_check, "device@example.test: tokens: consented ");
    assert!(times.contains("; no refresh yet"), "{times}");
    let failed = line(&left_check, "device@example.test imap: FAILED");
    assert!(
        failed.contains("AADSTS700082") && failed.contains("oxbridge login device@example.test"),
        "{failed}"
    );
    let mut c = Raw::connect(idle.port(1));
    c.line();
    c.send(&format!("a LOGIN device@example.test {LOCAL_PASSWORD}"));
    assert!(c.line().starts_with("a NO [AUTHENTICATIONFAILED]"));
    idle.wait_log(&["login failed", "AADSTS700082"]);
}
