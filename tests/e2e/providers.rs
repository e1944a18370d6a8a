//! Providers side by side: one oxbridge process with a Microsoft
//! `client_credentials` account and a Google service account (JWT-bearer
//! with domain-wide delegation, through the test IdP's Google endpoint),
//! both against the same real Dovecot and Postfix; Google's and
//! Outlook.com's refusals in their own words, each ending in the
//! protocol's failure reply and a named fix; consent for a Google
//! `refresh_token` account (`--paste`) and an Outlook.com one (rotated
//! refresh tokens persisted).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Barrier};

use crate::harness::*;

const GOOGLE_PASSWORD: &str = "google-local-pass";
/// The OAuth client registered with the test IdP's Google endpoint.
const GOOGLE_CLIENT: (&str, &str) = ("1234-oxbridge.apps.googleusercontent.com", "g-secret");

/// A service account key file in Google's format, registered with the test
/// IdP (with domain-wide delegation for mail unless `delegated` is false);
/// its address, unique to the caller, is the JWT's `iss`.
fn service_account(dir: &Path, delegated: bool) -> (PathBuf, String) {
    let email = format!("{}@oxbridge-test.iam.gserviceaccount.com", unique("sa"));
    let file = dir.join(format!("{email}.json"));
    let idp = upstream().get("IDP_URL");
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("tests/upstream/google_sa.py"))
        .args(["make", "--email", &email, "--out"])
        .arg(&file)
        .args(["--token-uri", &format!("{idp}/google/token")])
        .args(["--register", idp]);
    if !delegated {
        cmd.arg("--no-delegation");
    }
    let out = run(&mut cmd, CLIENT_LIMIT);
    assert!(out.status.success(), "google_sa.py: {}", text(&out));
    (file, email)
}

/// A `[[provider]]` of kind google named `name`, whose mail hosts are the
/// test upstream's; `keys` adds its credentials.
fn google_provider(name: &str, keys: &str) -> String {
    google_provider_at(name, keys, None)
}

/// [`google_provider`], with one protocol's server at another address.
fn google_provider_at(name: &str, keys: &str, moved: Option<(&str, String)>) -> String {
    let host = |protocol: &str| match &moved {
        Some((p, addr)) if *p == protocol => addr.clone(),
        _ => upstream().addr(protocol),
    };
    format!(
        "[[provider]]\nname = \"{name}\"\nkind = \"google\"\n{keys}smtp = \"{}\"\nimap = \"{}\"\npop3 = \"{}\"\n\n",
        host("smtp"),
        host("imap"),
        host("pop3")
    )
}

/// An `[[account]]` of `provider` with the local password [`GOOGLE_PASSWORD`].
fn account(login: &str, grant: &str, provider: &str, mailbox: &str) -> String {
    format!(
        "[[account]]\nlogin = \"{login}\"\npassword_hash = \"{}\"\ngrant = \"{grant}\"\nprovider = \"{provider}\"\nmailbox = \"{mailbox}\"\n\n",
        argon2_hash(GOOGLE_PASSWORD)
    )
}

/// How many JWT-bearer requests the IdP saw from service account `iss`,
/// per `sub`.
fn jwt_requests(iss: &str) -> Vec<(String, u64)> {
    let stats = upstream().idp_get("/admin/stats");
    let mut seen: Vec<(String, u64)> = stats["google_jwt_pairs"]
        .as_object()
        .expect("google_jwt_pairs")
        .iter()
        .filter_map(|(pair, n)| {
            let (i, sub) = pair.split_once(' ')?;
            (i == iss).then(|| (sub.to_string(), n.as_u64().unwrap()))
        })
        .collect();
    seen.sort();
    seen
}

/// Send `m` through the proxy's SMTP (swaks) as `login`, check it arrived
/// intact in `mailbox`, then read it back through the proxy's IMAP and
/// POP3 (which deletes it), byte for byte.
fn send_and_read_back(proxy: &Proxy, login: &str, password: &str, mailbox: &str, dir: &Path) {
    let m = Message::write(dir, "provider", mailbox, 0);
    let sent = SmtpDevice {
        login,
        password,
        from: mailbox,
        to: mailbox,
        ..SmtpDevice::scanner(proxy.port(0))
    }
    .swaks(&m.path);
    assert!(
        sent.status.success(),
        "SMTP as {login}: {}\n{}",
        text(&sent),
        proxy.logs()
    );
    assert_arrived(mailbox, &m.id, &m.bytes);
    let out = dir.join(format!("{}.imap", m.tag));
    let read = Client::new(proxy.port(1), login, password).fetch(&m.id, &out, false);
    assert!(
        read.status.success(),
        "IMAP as {login}: {}\n{}",
        text(&read),
        proxy.logs()
    );
    assert_delivered_intact(&std::fs::read(&out).unwrap(), &m.bytes);
    let out = dir.join(format!("{}.pop3", m.tag));
    let read = Client::new(proxy.port(2), login, password).retr(&m.id, &out, true);
    assert!(
        read.status.success(),
        "POP3 as {login}: {}\n{}",
        text(&read),
        proxy.logs()
    );
    assert_delivered_intact(&std::fs::read(&out).unwrap(), &m.bytes);
}

use crate::harness::Smtp as SmtpDevice;

#[test]
fn the_google_stand_in_checks_itself() {
    let out = run(
        Command::new("python3").arg(repo().join("tests/upstream/idp_google_selftest.py")),
        CLIENT_LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// One process: the Microsoft scanner (client_credentials, mailbox alice)
/// and a Google service account acting as bob. Each sends through SMTP,
/// reads back through IMAP and POP3, byte for byte; the IdP saw
/// JWT-bearer requests from the service account with `sub` = bob only.
#[test]
fn a_microsoft_and_a_google_account_serve_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let (key, iss) = service_account(dir.path(), true);
    // No token_url: the key file's token_uri is used (and is the JWT's aud).
    let extra = format!(
        "{}{}",
        google_provider(
            "school",
            &format!("service_account_file = \"{}\"\n", key.display())
        ),
        account("copier@school.test", "client_credentials", "school", BOB)
    );
    let proxy = Proxy::start(&config(&plain_listeners(&["smtp", "imap", "pop3"]), &extra));
    send_and_read_back(
        &proxy,
        "scanner@example.test",
        SCANNER_PASSWORD,
        ALICE,
        dir.path(),
    );
    send_and_read_back(
        &proxy,
        "copier@school.test",
        GOOGLE_PASSWORD,
        BOB,
        dir.path(),
    );
    let seen = jwt_requests(&iss);
    assert!(
        seen.len() == 1 && seen[0].0 == BOB && seen[0].1 >= 1,
        "{seen:?}"
    );
}

/// 20 devices log in at once, 10 as each of two mailboxes of one service
/// account: one JWT-bearer request per mailbox.
#[test]
fn twenty_concurrent_google_logins_make_one_token_request_per_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let (key, iss) = service_account(dir.path(), true);
    let extra = format!(
        "{}{}{}",
        google_provider(
            "school",
            &format!("service_account_file = \"{}\"\n", key.display())
        ),
        account(
            "front-desk@school.test",
            "client_credentials",
            "school",
            ALICE
        ),
        account("library@school.test", "client_credentials", "school", BOB),
    );
    let proxy = Proxy::start(&config(&plain_listeners(&["imap"]), &extra));
    let port = proxy.port(0);
    let start = Arc::new(Barrier::new(20));
    let devices: Vec<_> = (0..20)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                let login = ["front-desk@school.test", "library@school.test"][i % 2];
                let mut c = Raw::connect(port);
                c.line();
                start.wait();
                let answer = c.imap_login(login, GOOGLE_PASSWORD);
                c.send("z LOGOUT");
                answer
            })
        })
        .collect();
    for d in devices {
        let answer = d.join().unwrap();
        assert!(answer.starts_with("a OK"), "{answer}\n{}", proxy.logs());
    }
    assert_eq!(
        jwt_requests(&iss),
        [(ALICE.to_string(), 1), (BOB.to_string(), 1)]
    );
}

/// What a device, `oxbridge check` and the status page say about one
/// refusal.
struct Refusal<'a> {
    /// The account's login, and the protocols its devices try.
    login: &'a str,
    protocols: &'a [&'a str],
    /// A piece of the fix (plain text: it is looked for in HTML too).
    fix: &'a str,
}

/// Each protocol's failure reply at login, the fix in `oxbridge check`,
/// and the fix on the status page.
fn assert_refused(cfg: &str, r: &Refusal) {
    let proxy = Proxy::start(cfg);
    for (i, protocol) in ["smtp", "imap", "pop3"].iter().enumerate() {
        if !r.protocols.contains(protocol) {
            continue;
        }
        let mut c = Raw::connect(proxy.port(i));
        let answer = match *protocol {
            "smtp" => {
                c.reply();
                c.smtp_login(r.login, GOOGLE_PASSWORD)
            }
            "imap" => {
                c.line();
                c.imap_login(r.login, GOOGLE_PASSWORD)
            }
            _ => {
                c.line();
                c.send(&format!("USER {}", r.login));
                c.line();
                c.send(&format!("PASS {GOOGLE_PASSWORD}"));
                c.line()
            }
        };
        let want = match *protocol {
            "smtp" => "535 5.7.8 ",
            "imap" => "a NO [AUTHENTICATIONFAILED] ",
            _ => "-ERR [AUTH] ",
        };
        assert!(answer.starts_with(want), "{} {protocol}: {answer}", r.login);
    }
    let (status, page) = curl(proxy.admin_addr(), "/");
    assert_eq!(status, 200);
    assert!(
        page.contains(r.fix),
        "status page without {:?}:\n{page}",
        r.fix
    );
    drop(proxy);
    let dir = tempfile::tempdir().unwrap();
    let out = oxbridge(&["check"], &write_config(dir.path(), cfg));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    for protocol in r.protocols {
        let line = t
            .lines()
            .find(|l| l.starts_with(&format!("{} {protocol}: FAILED", r.login)))
            .unwrap_or_else(|| panic!("no FAILED line for {} {protocol}:\n{t}", r.login));
        assert!(line.contains(r.fix), "{line}");
    }
}

#[test]
fn google_refusals_end_in_a_failure_reply_and_a_named_fix() {
    let dir = tempfile::tempdir().unwrap();
    let listeners = plain_listeners(&["smtp", "imap", "pop3"]);
    // A service account without domain-wide delegation.
    let (key, _) = service_account(dir.path(), false);
    let sa = format!("service_account_file = \"{}\"\n", key.display());
    let cfg = config(
        &listeners,
        &format!(
            "{ADMIN}{}{}",
            google_provider("school", &sa),
            account("nodwd@school.test", "client_credentials", "school", ALICE)
        ),
    );
    let all = &["smtp", "imap", "pop3"][..];
    assert_refused(
        &cfg,
        &Refusal {
            login: "nodwd@school.test",
            protocols: all,
            fix: "Manage Domain Wide Delegation",
        },
    );
    // A mailbox the domain does not have.
    let (key, _) = service_account(dir.path(), true);
    let sa = format!("service_account_file = \"{}\"\n", key.display());
    let cfg = config(
        &listeners,
        &format!(
            "{ADMIN}{}{}",
            google_provider("school", &sa),
            account(
                "ghost@school.test",
                "client_credentials",
                "school",
                "nobody@example.test"
            )
        ),
    );
    assert_refused(
        &cfg,
        &Refusal {
            login: "ghost@school.test",
            protocols: all,
            fix: "not an alias, a group or a user of",
        },
    );
    // IMAP and POP turned off for the user: Gmail's words, from a stand-in
    // Gmail (the token still comes from the IdP's Google endpoint).
    for (protocol, reply, fix) in [
        ("imap", "NO [ALERT] Your account is not enabled for IMAP use. Please visit your Gmail settings page and enable your account for IMAP access. (Failure)", "turn on POP and IMAP access for the"),
        ("pop3", "-ERR [SYS/PERM] Your account is not enabled for POP access. Please visit your Gmail settings page and enable your account for POP access.", "Enable POP"),
    ] {
        let gmail = Spawned::fake_upstream(protocol, "auth", reply);
        let at = Some((protocol, format!("localhost:{}", gmail.1)));
        let cfg = config(
            &listener(protocol, "none", true),
            &format!(
                "{ADMIN}{}{}",
                google_provider_at("school", &sa, at),
                account("mailer@school.test", "client_credentials", "school", ALICE)
            ),
        );
        let proxy = Proxy::start(&cfg);
        let mut c = Raw::connect(proxy.port(0));
        c.line();
        let answer = match protocol {
            "imap" => c.imap_login("mailer@school.test", GOOGLE_PASSWORD),
            _ => {
                c.send("USER mailer@school.test");
                c.line();
                c.send(&format!("PASS {GOOGLE_PASSWORD}"));
                c.line()
            }
        };
        let want = ["a NO [AUTHENTICATIONFAILED] ", "-ERR [AUTH] "][usize::from(protocol == "pop3")];
        assert!(answer.starts_with(want), "{answer}");
        let (_, page) = curl(proxy.admin_addr(), "/");
        assert!(page.contains(fix), "{fix}:\n{page}");
        drop(proxy);
        let check_dir = tempfile::tempdir().unwrap();
        let out = oxbridge(&["check"], &write_config(check_dir.path(), &cfg));
        let t = text(&out);
        let line = t
            .lines()
            .find(|l| l.starts_with(&format!("mailer@school.test {protocol}: FAILED")))
            .unwrap_or_else(|| panic!("{t}"));
        assert!(line.contains(fix), "{line}");
    }
}

/// `oxbridge login ACCOUNT --paste`, with curl as the browser: the printed
/// URL is opened, the address it redirects to is pasted back. Returns the
/// command's output.
pub(crate) fn paste_consent(cfg_path: &Path, login: &str, url_has: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxbridge"))
        .args(["login", login, "--paste", "--config"])
        .arg(cfg_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the authorize URL is printed").unwrap();
        if line.trim().starts_with("http") && line.contains(url_has) {
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
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{location}").unwrap();
    drop(stdin);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let mut out = child.wait_with_output().unwrap();
    out.stdout = format!("{url}\n{location}\n{}", rest.join("\n")).into_bytes();
    out
}

/// A Google `refresh_token` account: `oxbridge login` without `--paste`
/// or `--browser` is refused (Google's device flow has no mail scope);
/// `--paste` consents against the IdP's Google endpoint with
/// `access_type=offline`; the account then works through SMTP, IMAP and
/// POP3, and its refresh token is not rotated. Revoked (as Google does to
/// an app left in Testing), it ends in the failure reply and the fix.
#[test]
fn a_google_account_consents_with_paste_and_its_revocation_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (client_id, secret) = GOOGLE_CLIENT;
    upstream().idp_post(
        "/admin/google/client",
        &serde_json::json!({"client_id": client_id, "client_secret": secret}),
    );
    let idp = upstream().get("IDP_URL");
    let keys = format!(
        "client_id = \"{client_id}\"\nclient_secret = \"{secret}\"\ntoken_url = \"{idp}/google/token\"\nauthorize_url = \"{idp}/google/auth\"\n"
    );
    let login = format!("{}@home.test", unique("gmail"));
    let cfg = with_state_dir(
        &config(
            &plain_listeners(&["smtp", "imap", "pop3"]),
            &format!(
                "{ADMIN}{}{}",
                google_provider("gmail", &keys),
                account(&login, "refresh_token", "gmail", BOB)
            ),
        ),
        &dir.path().join("state"),
    );
    let cfg_path = write_config(dir.path(), &cfg);

    let device = oxbridge(&["login", &login], &cfg_path);
    assert_eq!(device.status.code(), Some(2), "{}", text(&device));
    assert!(
        text(&device).contains("Google's device flow does not grant mail scopes"),
        "{}",
        text(&device)
    );

    let out = paste_consent(&cfg_path, &login, "/google/auth?");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("access_type=offline") && t.contains("prompt=consent"),
        "{t}"
    );
    assert!(t.contains("redirect_uri=http%3A%2F%2F127.0.0.1%2F"), "{t}");
    let consented =
        stored_refresh(&cfg_path, &format!("gmail:{login}")).expect("a stored refresh token");

    let proxy = Proxy::start(&cfg);
    send_and_read_back(&proxy, &login, GOOGLE_PASSWORD, BOB, dir.path());
    assert_eq!(
        stored_refresh(&cfg_path, &format!("gmail:{login}")).as_deref(),
        Some(consented.as_str()),
        "Google's refresh tokens are not rotated"
    );
    drop(proxy);

    upstream().idp_post("/admin/google/revoke", &serde_json::json!({"user": BOB}));
    assert_refused(
        &cfg,
        &Refusal {
            login: &login,
            protocols: &["imap"],
            fix: "gets refresh tokens that die after 7 days",
        },
    );
    // A failure never deletes the stored token.
    assert_eq!(
        stored_refresh(&cfg_path, &format!("gmail:{login}")).as_deref(),
        Some(consented.as_str())
    );
}

/// An Outlook.com account (the `consumers` authority): consented with
/// the device flow, refreshed with rotation (the new refresh token is
/// persisted: the old one no longer works, and a restarted oxbridge logs in
/// with the stored one). An app registered for work accounts only is
/// refused by `consumers`, with the fix.
#[test]
fn an_outlook_com_account_consents_refreshes_and_keeps_the_rotated_token() {
    let dir = tempfile::tempdir().unwrap();
    let idp = upstream().get("IDP_URL");
    let provider = |client: &str| {
        format!(
            "[[provider]]\nname = \"home\"\nkind = \"outlook.com\"\nclient_id = \"{client}\"\n\
             token_url = \"{idp}/consumers/oauth2/v2.0/token\"\ndevice_code_url = \"{idp}/consumers/oauth2/v2.0/devicecode\"\n\
             authorize_url = \"{idp}/consumers/oauth2/v2.0/authorize\"\nsmtp = \"{}\"\nimap = \"{}\"\npop3 = \"{}\"\n\n",
            upstream().addr("smtp"),
            upstream().addr("imap"),
            upstream().addr("pop3")
        )
    };
    let login = format!("{}@home.test", unique("outlook"));
    let make = |client: &str| {
        with_state_dir(
            &config(
                &plain_listeners(&["smtp", "imap", "pop3"]),
                &format!(
                    "{ADMIN}{}{}",
                    provider(client),
                    account(&login, "refresh_token", "home", ALICE)
                ),
            ),
            &dir.path().join("state"),
        )
    };
    let cfg = make("test-client");
    let cfg_path = write_config(dir.path(), &cfg);
    let out = oxbridge(&["login", &login], &cfg_path);
    assert!(out.status.success(), "{}", text(&out));
    let consented = stored_refresh(&cfg_path, &format!("home:{login}")).expect("stored");

    let proxy = Proxy::start(&cfg);
    let mut c = Raw::connect(proxy.port(1));
    c.line();
    assert!(
        c.imap_login(&login, GOOGLE_PASSWORD).starts_with("a OK"),
        "{}",
        proxy.logs()
    );
    c.send("z LOGOUT");
    drop(proxy);
    let rotated = stored_refresh(&cfg_path, &format!("home:{login}")).expect("stored");
    assert_ne!(
        rotated, consented,
        "the rotated refresh token was not persisted"
    );

    // A restart logs in with the stored (rotated) one.
    let proxy = Proxy::start(&cfg);
    send_and_read_back(&proxy, &login, GOOGLE_PASSWORD, ALICE, dir.path());
    drop(proxy);

    // The same consent, with an app registered for work accounts only.
    assert_refused(
        &make("test-client-orgonly"),
        &Refusal {
            login: &login,
            protocols: &["smtp"],
            fix: "register an app whose supported account types include",
        },
    );
}

/// At trace level, with a service account and a Google client secret
/// configured: neither the key, nor the secret, nor any Google access
/// token (`ya29.`) reaches the log, the status page, `/metrics` or
/// `oxbridge check`.
#[test]
fn no_google_secret_reaches_logs_pages_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = service_account(dir.path(), true);
    let pem: serde_json::Value = serde_json::from_slice(&std::fs::read(&key).unwrap()).unwrap();
    let key_line = pem["private_key"]
        .as_str()
        .unwrap()
        .lines()
        .nth(3)
        .unwrap()
        .to_string();
    assert!(key_line.len() > 40, "{key_line}");
    let secret = format!("MARKERGCS{}", unique("x").replace('-', ""));
    let extra = format!(
        "{ADMIN}{}{}{}{}",
        google_provider(
            "school",
            &format!("service_account_file = \"{}\"\n", key.display())
        ),
        google_provider(
            "gmail",
            &format!("client_id = \"c\"\nclient_secret = \"{secret}\"\n")
        ),
        account("copier@school.test", "client_credentials", "school", BOB),
        account(
            "nobody-consented@home.test",
            "refresh_token",
            "gmail",
            ALICE
        ),
    );
    let cfg = with_state_dir(
        &config(&plain_listeners(&["smtp", "imap", "pop3"]), &extra),
        &dir.path().join("state"),
    );
    let proxy = Proxy::start_with_env(&cfg, &[("RUST_LOG", "trace")]);
    send_and_read_back(
        &proxy,
        "copier@school.test",
        GOOGLE_PASSWORD,
        BOB,
        dir.path(),
    );
    let (_, page) = curl(proxy.admin_addr(), "/");
    let (_, metrics) = curl(proxy.admin_addr(), "/metrics");
    let logs = proxy.logs();
    drop(proxy);
    let check = text(&oxbridge(&["check"], &write_config(dir.path(), &cfg)));
    assert!(check.contains("copier@school.test imap: OK"), "{check}");
    for (what, haystack) in [
        ("log", &logs),
        ("page", &page),
        ("metrics", &metrics),
        ("check", &check),
    ] {
        for needle in [key_line.as_str(), secret.as_str(), "ya29.", "PRIVATE KEY"] {
            assert!(!haystack.contains(needle), "{needle:?} in the {what}");
        }
    }
    assert!(
        logs.contains("access token obtained"),
        "the log is at trace level and saw the login"
    );
}

/// `[upstream] ca_file` holds for token endpoints as for mail servers:
/// the IdP behind HTTPS with the test upstream's private CA is trusted
/// through it (the system roots alone would refuse it).
#[test]
fn a_token_endpoint_behind_tls_is_trusted_through_ca_file() {
    let idp = upstream()
        .get("IDP_URL")
        .trim_start_matches("http://")
        .to_string();
    let forward = Spawned::python("tls_forward.py", &["--to", &idp]);
    let https = upstream().token_url().replace(
        &format!("http://{idp}"),
        &format!("https://localhost:{}", forward.1),
    );
    assert!(https.starts_with("https://"), "{https}");
    let cfg = with_token_url(&config(&plain_listeners(&["imap"]), ""), &https);
    let proxy = Proxy::start(&cfg);
    let mut c = Raw::connect(proxy.port(0));
    c.line();
    let answer = c.imap_login("scanner@example.test", SCANNER_PASSWORD);
    assert!(answer.starts_with("a OK"), "{answer}\n{}", proxy.logs());
}

/// Where the features meet: a `*@domain` pattern account of a Google
/// service account, on a spooling listener. The device's message gets its
/// `250` from the spool, then leaves with a token the service account got
/// acting as the device's own mailbox, and arrives intact.
#[test]
fn a_google_pattern_account_spools_and_delivers_as_each_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let (key, iss) = service_account(dir.path(), true);
    let provider = google_provider(
        "school",
        &format!("service_account_file = \"{}\"\n", key.display()),
    );
    let extra = format!(
        "{provider}[[account]]\nlogin = \"*@example.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nprovider = \"school\"\n",
        argon2_hash(GOOGLE_PASSWORD)
    );
    let spool = listener("smtp", "none", true) + "delivery = \"spool\"\n";
    let cfg = config(&spool, &extra).replace(
        "[[account]]\nlogin = \"*@example.test\"\ngrant = \"password\"\n",
        "",
    );
    let cfg = with_state_dir(&cfg, &dir.path().join("state"));
    let proxy = Proxy::start(&cfg);
    let m = Message::write(dir.path(), "pattern", BOB, 0);
    let sent = SmtpDevice {
        login: BOB,
        password: GOOGLE_PASSWORD,
        from: BOB,
        to: BOB,
        ..SmtpDevice::scanner(proxy.port(0))
    }
    .swaks(&m.path);
    assert!(sent.status.success(), "{}\n{}", text(&sent), proxy.logs());
    assert_arrived(BOB, &m.id, &m.bytes);
    assert_eq!(
        jwt_requests(&iss),
        [(BOB.to_string(), 1)],
        "{}",
        proxy.logs()
    );
}
