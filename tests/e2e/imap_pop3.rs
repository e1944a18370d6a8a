//! IMAP and POP3 end to end: real clients (Python's imaplib and poplib,
//! curl, fetchmail) -> oxbridge -> real Dovecot (IMAPS/POP3S, XOAUTH2 only).

use std::path::Path;
use std::process::{Command, Output};

use crate::harness::*;

const READER_PASSWORD: &str = "reader-local-pass";

/// Listener indexes in [`start_proxy`]'s config.
const IMAP: [usize; 3] = [0, 1, 2];
const POP3: [usize; 3] = [3, 4, 5];
const SMTP: usize = 6;
const TLS: [&str; 3] = ["none", "starttls", "implicit"];

/// IMAP and POP3 listeners of every TLS kind (plaintext passwords allowed
/// on the `none` ones).
fn imap_pop3_listeners() -> Vec<String> {
    let mut listeners = Vec::new();
    for protocol in ["imap", "pop3"] {
        for tls in TLS {
            listeners.push(listener(protocol, tls, tls == "none"));
        }
    }
    listeners
}

/// A proxy with [`imap_pop3_listeners`] and one SMTP listener; accounts:
/// `*@example.test` (password grant), `reader@example.test`
/// (client_credentials, mailbox bob) and `elsewhere@other.test` (a mailbox
/// the upstream refuses).
fn start_proxy(token_url: Option<&str>) -> Proxy {
    let mut listeners = imap_pop3_listeners();
    listeners.push(listener("smtp", "none", true));
    let extra = format!(
        "[[account]]\nlogin = \"reader@example.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"{BOB}\"\n\n\
         [[account]]\nlogin = \"elsewhere@other.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"scans@elsewhere.test\"\n",
        argon2_hash(READER_PASSWORD),
        argon2_hash("elsewhere-pass")
    );
    let cfg = config(&listeners.join("\n"), &extra);
    Proxy::start(&token_url.map_or(cfg.clone(), |url| with_token_url(&cfg, url)))
}

/// The client on listener `i` of `kind` ([`IMAP`] or [`POP3`]).
fn client<'a>(
    proxy: &Proxy,
    kind: [usize; 3],
    i: usize,
    auth: &'a str,
    user: &'a str,
    password: &'a str,
) -> Client<'a> {
    Client {
        tls: TLS[i],
        auth: Some(auth),
        ..Client::new(proxy.port(kind[i]), user, password)
    }
}

/// `out` (a client's run) succeeded, and `path` holds exactly `m`.
fn assert_received(proxy: &Proxy, out: &Output, path: &Path, m: &Message, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        text(out),
        proxy.logs()
    );
    assert!(
        std::fs::read(path).unwrap() == m.bytes,
        "{what}: the message that came back differs"
    );
}

/// imaplib through every IMAP listener, with LOGIN and AUTHENTICATE PLAIN,
/// for a password-grant user and an app-only account: list, select,
/// append, fetch (byte-identical), delete.
#[test]
fn imaplib_roundtrip_on_every_listener() {
    let up = upstream();
    let proxy = start_proxy(None);
    let dir = tempfile::tempdir().unwrap();
    let bob_pw = up.password(BOB);
    let cases = [
        (0, "LOGIN", BOB, bob_pw.as_str()),
        (0, "PLAIN", "reader@example.test", READER_PASSWORD),
        (1, "LOGIN", "reader@example.test", READER_PASSWORD),
        (1, "PLAIN", BOB, &bob_pw),
        (2, "LOGIN", BOB, &bob_pw),
        (2, "PLAIN", "reader@example.test", READER_PASSWORD),
    ];
    for (i, auth, user, password) in cases {
        let m = Message::write(dir.path(), "imap-pop3", BOB, 0);
        let out_path = dir.path().join("fetched.eml");
        let out = client(&proxy, IMAP, i, auth, user, password).roundtrip(&m, &out_path, false);
        let what = format!("{} {auth} {user}", TLS[i]);
        assert_received(&proxy, &out, &out_path, &m, &what);
    }
    proxy.wait_log(&["session ended", "relayed", "\"protocol\":\"imap\""]);
}

/// poplib through every POP3 listener, with USER/PASS and AUTH PLAIN: STAT,
/// LIST, UIDL, TOP, RETR (byte-identical), DELE.
#[test]
fn poplib_retr_and_dele_on_every_listener() {
    let up = upstream();
    let proxy = start_proxy(None);
    let dir = tempfile::tempdir().unwrap();
    let bob_pw = up.password(BOB);
    let cases = [
        (0, "USER", BOB, bob_pw.as_str()),
        (0, "PLAIN", "reader@example.test", READER_PASSWORD),
        (1, "USER", "reader@example.test", READER_PASSWORD),
        (1, "PLAIN", BOB, &bob_pw),
        (2, "USER", BOB, &bob_pw),
        (2, "PLAIN", "reader@example.test", READER_PASSWORD),
    ];
    for (i, auth, user, password) in cases {
        let m = Message::write(dir.path(), "imap-pop3", BOB, 0);
        let out_path = dir.path().join("retr.eml");
        // Put the message in the mailbox through the proxy's IMAP.
        let put = client(&proxy, IMAP, 2, "LOGIN", BOB, &bob_pw).roundtrip(&m, &out_path, true);
        assert!(put.status.success(), "{}", text(&put));
        let out = client(&proxy, POP3, i, auth, user, password).retr(&m.id, &out_path, true);
        let what = format!("{} {auth} {user}", TLS[i]);
        assert_received(&proxy, &out, &out_path, &m, &what);
    }
    proxy.wait_log(&["session ended", "relayed", "\"protocol\":\"pop3\""]);
}

/// A 20 MB message: APPEND and FETCH over IMAP, RETR over POP3, all through
/// the proxy, byte for byte.
#[test]
fn large_message_through_imap_and_pop3() {
    let up = upstream();
    let proxy = start_proxy(None);
    let dir = tempfile::tempdir().unwrap();
    let bob_pw = up.password(BOB);
    let m = Message::write(dir.path(), "imap-pop3", BOB, 20 * 1024 * 1024);
    assert!(m.bytes.len() > 20_000_000);
    let fetched = dir.path().join("fetched.eml");
    let out = client(&proxy, IMAP, 2, "LOGIN", BOB, &bob_pw).roundtrip(&m, &fetched, true);
    assert_received(
        &proxy,
        &out,
        &fetched,
        &m,
        "IMAP FETCH of the 20 MB message",
    );

    let retrieved = dir.path().join("retr.eml");
    let out = client(&proxy, POP3, 1, "USER", BOB, &bob_pw).retr(&m.id, &retrieved, true);
    assert_received(
        &proxy,
        &out,
        &retrieved,
        &m,
        "POP3 RETR of the 20 MB message",
    );
    let line = proxy.wait_log(&["session ended", "relayed", "\"protocol\":\"pop3\""]);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["bytes_to_device"].as_u64().unwrap() > 20_000_000,
        "{line}"
    );
}

/// IMAP IDLE through the proxy sees a message delivered (through the proxy's
/// SMTP) during the session.
#[test]
fn idle_sees_new_mail() {
    let up = upstream();
    let proxy = start_proxy(None);
    let dir = tempfile::tempdir().unwrap();
    let bob_pw = up.password(BOB);
    let m = Message::write(dir.path(), "imap-pop3", BOB, 0);
    let out_path = dir.path().join("idle.eml");
    let out = client(&proxy, IMAP, 1, "LOGIN", BOB, &bob_pw).imap(
        "idle",
        &[
            "--smtp-port",
            &proxy.port(SMTP).to_string(),
            "--message",
            m.path.to_str().unwrap(),
            "--message-id",
            &m.id,
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    assert!(client_json(&out)["exists"]
        .as_str()
        .unwrap()
        .ends_with("EXISTS"));
    assert_delivered_intact(&std::fs::read(&out_path).unwrap(), &m.bytes);
}

/// curl, a client nobody here wrote, over IMAP (plain, STARTTLS, IMAPS) and
/// POP3 (plain, STLS, POP3S): fetch by UID, LIST, RETR.
#[test]
fn curl_fetches_over_imap_and_pop3() {
    let up = upstream();
    let proxy = start_proxy(None);
    let dir = tempfile::tempdir().unwrap();
    let bob_pw = up.password(BOB);
    let userpass = format!("{BOB}:{bob_pw}");
    let m = Message::write(dir.path(), "imap-pop3", BOB, 0);
    let put = client(&proxy, IMAP, 0, "PLAIN", BOB, &bob_pw).roundtrip(
        &m,
        &dir.path().join("put.eml"),
        true,
    );
    assert!(put.status.success(), "{}", text(&put));
    let uid = client_json(&put)["uid"].as_str().unwrap().to_string();

    let curl = |url: String, extra: &[&str]| {
        let out = run(
            Command::new("curl")
                .args(["-sS", "--max-time", "60", "--cacert", up.ca()])
                .args(["--user", &userpass])
                .args(extra)
                .arg(&url),
            CLIENT_LIMIT,
        );
        assert!(
            out.status.success(),
            "curl {url}: {}\n{}",
            text(&out),
            proxy.logs()
        );
        out.stdout
    };
    for (i, tls) in TLS.iter().enumerate() {
        let (scheme, extra): (&str, &[&str]) = match *tls {
            "none" => ("imap", &[]),
            "starttls" => ("imap", &["--ssl-reqd"]),
            _ => ("imaps", &[]),
        };
        let port = proxy.port(IMAP[i]);
        let fetched = curl(
            format!("{scheme}://127.0.0.1:{port}/INBOX;UID={uid}"),
            extra,
        );
        assert_eq!(
            fetched, m.bytes,
            "curl {scheme} {tls}: fetched message differs"
        );
        let list = curl(format!("{scheme}://127.0.0.1:{port}/"), extra);
        assert!(
            String::from_utf8_lossy(&list).contains("INBOX"),
            "{}",
            String::from_utf8_lossy(&list)
        );

        let (scheme, extra): (&str, &[&str]) = match *tls {
            "none" => ("pop3", &[]),
            "starttls" => ("pop3", &["--ssl-reqd"]),
            _ => ("pop3s", &[]),
        };
        let port = proxy.port(POP3[i]);
        let listing =
            String::from_utf8(curl(format!("{scheme}://127.0.0.1:{port}/"), extra)).unwrap();
        // Find our message: the newest first.
        let numbers: Vec<u32> = listing
            .lines()
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect();
        assert!(!numbers.is_empty(), "{listing}");
        let found = numbers.iter().rev().find_map(|n| {
            let got = curl(format!("{scheme}://127.0.0.1:{port}/{n}"), extra);
            (got == m.bytes).then_some(*n)
        });
        assert!(
            found.is_some(),
            "curl {scheme} {tls}: message not retrieved intact"
        );
    }
}

/// fetchmail over IMAPS and over POP3 with STLS, delivering to an MDA.
#[test]
fn fetchmail_fetches_over_imap_and_pop3() {
    let up = upstream();
    let proxy = start_proxy(None);
    let dir = tempfile::tempdir().unwrap();
    let bob_pw = up.password(BOB);
    for (protocol, port, ssl) in [
        ("IMAP", proxy.port(IMAP[2]), "ssl"),
        ("POP3", proxy.port(POP3[1]), "sslproto 'tls1.2+'"),
    ] {
        let m = Message::write(dir.path(), "imap-pop3", BOB, 0);
        let put = client(&proxy, IMAP, 2, "LOGIN", BOB, &bob_pw).roundtrip(
            &m,
            &dir.path().join("put.eml"),
            true,
        );
        assert!(put.status.success(), "{}", text(&put));
        let mbox = dir.path().join(format!("{protocol}.mbox"));
        let rc = dir.path().join(format!("{protocol}.fetchmailrc"));
        std::fs::write(
            &rc,
            format!(
                "set no syslog\npoll 127.0.0.1 port {port} protocol {protocol} auth password\n  user '{BOB}' password '{bob_pw}' is 'tester' here\n  {ssl} sslcertck sslcertfile '{ca}' sslcommonname localhost\n  keep fetchall limit 2000000\n  mda '/bin/sh -c \"cat >> {mbox}\"'\n",
                ca = up.ca(),
                mbox = mbox.display()
            ),
        )
        .unwrap();
        let mut perms = std::fs::metadata(&rc).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
        std::fs::set_permissions(&rc, perms).unwrap();
        let out = run(
            Command::new("fetchmail")
                .arg("-f")
                .arg(&rc)
                .arg("--idfile")
                .arg(dir.path().join(format!("{protocol}.ids")))
                .args(["-v", "--nodetach"])
                .env("HOME", dir.path()),
            CLIENT_LIMIT,
        );
        let got = std::fs::read(&mbox).unwrap_or_default();
        // fetchmail hands the MDA LF line endings and adds a Received header.
        let want: Vec<u8> = String::from_utf8(m.bytes)
            .unwrap()
            .replace("\r\n", "\n")
            .into_bytes();
        assert!(
            got.windows(want.len()).any(|w| w == want.as_slice()),
            "fetchmail {protocol} did not deliver the message intact (exit {:?}):\n{}\n{}",
            out.status.code(),
            text(&out),
            proxy.logs()
        );
    }
}

/// Refusals in IMAP and POP3 terms, and the proxy goes on serving.
#[test]
fn refusals_end_to_end() {
    let up = upstream();
    let proxy = start_proxy(None);
    let bob_pw = up.password(BOB);
    let cases = [
        ("reader@example.test", "wrong-password", "bad_credentials"),
        ("nobody@nowhere.test", "whatever", "bad_credentials"),
        (BOB, "wrong-bob-password", "invalid_grant"),
        ("elsewhere@other.test", "elsewhere-pass", "upstream_refused"),
    ];
    for (user, password, log) in cases {
        let mut c = Raw::connect(proxy.port(IMAP[0]));
        assert!(c.line().starts_with("* OK [CAPABILITY"));
        c.send(&format!("a1 LOGIN \"{user}\" \"{password}\""));
        let r = c.until("a1 ");
        assert!(
            r.starts_with("a1 NO [AUTHENTICATIONFAILED]"),
            "IMAP {user}: {r}"
        );
        // A login no account covers is logged only as "unknown user #...".
        let shown = user.replace("nobody@nowhere.test", "unknown user #");
        proxy.wait_log(&["login failed", &format!("\"login\":\"{shown}"), log]);

        let mut c = Raw::connect(proxy.port(POP3[0]));
        assert!(c.line().starts_with("+OK"));
        c.send(&format!("AUTH PLAIN {}", plain_ir(user, password)));
        let r = c.line();
        assert!(r.starts_with("-ERR [AUTH]"), "POP3 {user}: {r}");
        assert!(
            !proxy.logs().contains(password),
            "a password reached the log"
        );
    }
    // Still serving.
    let out = client(&proxy, POP3, 0, "USER", BOB, &bob_pw).pop3("login", &[]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Upstream down and token endpoint down: temporary failures in IMAP and POP3 terms.
#[test]
fn temporary_failures_end_to_end() {
    let up = upstream();
    let down = format!("127.0.0.1:{}", closed_port());
    let cfg = config(&imap_pop3_listeners().join("\n"), "");
    let proxies = [
        (
            "upstream down",
            Proxy::start(&reroute(&reroute(&cfg, "imap", &down), "pop3", &down)),
            "upstream_unavailable",
        ),
        (
            "token endpoint down",
            start_proxy(Some(&format!("http://127.0.0.1:{}/token", closed_port()))),
            "token_unavailable",
        ),
    ];
    for (what, proxy, log) in proxies {
        let mut c = Raw::connect(proxy.port(IMAP[0]));
        c.line();
        c.send(&format!("a1 LOGIN {BOB} {}", up.password(BOB)));
        let r = c.until("a1 ");
        assert!(r.starts_with("a1 NO [UNAVAILABLE]"), "IMAP, {what}: {r}");
        let mut c = Raw::connect(proxy.port(POP3[0]));
        c.line();
        c.send(&format!("USER {BOB}"));
        assert!(c.line().starts_with("+OK"));
        c.send(&format!("PASS {}", up.password(BOB)));
        let r = c.line();
        assert!(r.starts_with("-ERR [SYS/TEMP]"), "POP3, {what}: {r}");
        proxy.wait_log(&["login failed", log]);
    }
}

/// IMAP before login: capabilities, literals, quoting, limits, pipelining.
#[test]
fn imap_commands_before_login() {
    let up = upstream();
    let proxy = start_proxy(None);
    let bob_pw = up.password(BOB);

    // Plaintext listener without opt-in: LOGINDISABLED, no AUTH=, refused.
    let strict = Proxy::start(&config(&listener("imap", "none", false), ""));
    let mut c = Raw::connect(strict.port(0));
    let greeting = c.line();
    assert!(
        greeting.contains("LOGINDISABLED") && !greeting.contains("AUTH="),
        "{greeting}"
    );
    c.send(&format!("a LOGIN {BOB} {bob_pw}"));
    assert!(c.line().starts_with("a NO [PRIVACYREQUIRED]"));
    c.send("b STARTTLS");
    assert!(c.line().starts_with("b BAD"));

    let mut c = Raw::connect(proxy.port(IMAP[1]));
    let greeting = c.line();
    assert!(
        greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    assert!(!greeting.contains("XOAUTH2"), "{greeting}");

    let mut c = Raw::connect(proxy.port(IMAP[0]));
    let greeting = c.line();
    assert!(
        greeting.contains("AUTH=PLAIN")
            && greeting.contains("LITERAL+")
            && !greeting.contains("XOAUTH2"),
        "{greeting}"
    );
    c.send("t1 CAPABILITY");
    let r = c.until("t1 ");
    assert!(
        r.starts_with("* CAPABILITY IMAP4rev1") && r.contains("t1 OK"),
        "{r}"
    );
    c.send("t2 NOOP");
    assert!(c.line().starts_with("t2 OK"));
    c.send("t3 ID (\"name\" \"test\")");
    assert!(c.until("t3 ").contains("t3 OK"));
    c.send("t4 SELECT INBOX");
    assert!(c.line().starts_with("t4 BAD"));
    c.send("no-command");
    assert!(c.line().starts_with("* BAD"));
    c.send("t5 LOGIN \"unterminated");
    assert!(c.line().starts_with("t5 BAD"));
    c.send("t6 LOGIN {100000}");
    assert!(c.line().starts_with("t6 BAD Literal too large"));
    c.send("t7 AUTHENTICATE CRAM-MD5");
    assert!(c.line().starts_with("t7 NO"));
    c.send("t8 AUTHENTICATE PLAIN");
    assert!(c.line().starts_with("+"));
    c.send("*");
    assert!(c.line().starts_with("t8 BAD"));
    // LOGIN with a synchronising literal for the user and a LITERAL+ password,
    // then a pipelined SELECT in the same write: both answered in order.
    c.send(&format!("t9 LOGIN {{{}}}", BOB.len()));
    assert!(c.line().starts_with("+ "));
    c.write(
        format!(
            "{BOB} {{{}+}}\r\n{bob_pw}\r\nt10 SELECT INBOX\r\n",
            bob_pw.len()
        )
        .as_bytes(),
    );
    let login = c.until("t9 ");
    assert!(login.starts_with("t9 OK [CAPABILITY IMAP4rev1"), "{login}");
    assert!(
        !login.contains("AUTH=") && login.contains("IDLE"),
        "{login}"
    );
    let select = c.until("t10 ");
    assert!(
        select.contains("EXISTS") && select.contains("t10 OK"),
        "{select}"
    );
    c.send("t11 LOGOUT");
    assert!(c.until("t11 ").contains("t11 OK"));

    // Quoted strings with escapes reach the account check intact.
    let mut c = Raw::connect(proxy.port(IMAP[0]));
    c.line();
    c.send("q1 LOGIN \"reader@example.test\" \"wrong \\\"quoted\\\" \\\\ pw\"");
    assert!(c.line().starts_with("q1 NO [AUTHENTICATIONFAILED]"));

    // A LITERAL+ larger than the limit cannot be refused politely: BYE.
    let mut c = Raw::connect(proxy.port(IMAP[0]));
    c.line();
    c.send("x LOGIN {100000+}");
    assert!(c.line().starts_with("* BYE"));
    assert_eq!(c.line(), "<closed>");
}

/// POP3 before login: CAPA, USER/PASS, AUTH PLAIN continuation, refusals.
#[test]
fn pop3_commands_before_login() {
    let up = upstream();
    let proxy = start_proxy(None);
    let bob_pw = up.password(BOB);

    let mut c = Raw::connect(proxy.port(POP3[1]));
    assert!(c.line().starts_with("+OK"));
    c.send("CAPA");
    let capa = c.until(".");
    assert!(
        capa.contains("STLS") && !capa.contains("USER") && !capa.contains("SASL"),
        "{capa}"
    );
    c.send(&format!("USER {BOB}"));
    assert!(c.line().starts_with("-ERR [AUTH]"));

    let mut c = Raw::connect(proxy.port(POP3[0]));
    assert!(c.line().starts_with("+OK"));
    c.send("CAPA");
    let capa = c.until(".");
    assert!(
        capa.contains("USER")
            && capa.contains("SASL PLAIN")
            && !capa.contains("XOAUTH2")
            && !capa.contains("STLS"),
        "{capa}"
    );
    c.send("STAT");
    assert!(c.line().starts_with("-ERR"));
    c.send("PASS x");
    assert!(c.line().starts_with("-ERR"));
    c.send("STLS");
    assert!(c.line().starts_with("-ERR"));
    c.send("AUTH");
    assert!(c.until(".").contains("PLAIN"));
    c.send("AUTH PLAIN");
    assert!(c.line().starts_with("+ "));
    c.send(&plain_ir(BOB, &bob_pw));
    assert!(c.line().starts_with("+OK"));
    c.send("STAT");
    assert!(
        c.line().starts_with("+OK "),
        "STAT after login is answered by the upstream"
    );
    c.send("QUIT");
    assert!(c.line().starts_with("+OK"));
}

/// curl with `--sasl-authzid` (as Cyrus SASL clients with `-u`) sends an
/// authorization identity that is not the login: a refused authorization
/// in each protocol's own words, logged as a failed login; never `BAD`.
#[test]
fn foreign_authorization_identity_is_refused_by_protocol() {
    let _up = upstream();
    let proxy = start_proxy(None);
    let urls = [
        (
            format!("imap://127.0.0.1:{}/INBOX", proxy.port(IMAP[0])),
            "NO [AUTHORIZATIONFAILED]",
        ),
        (
            format!("pop3://127.0.0.1:{}/", proxy.port(POP3[0])),
            "-ERR [AUTH] Authorization failed",
        ),
        (
            format!("smtp://127.0.0.1:{}/", proxy.port(SMTP)),
            "535 5.7.8 Authentication failed: the authorization identity",
        ),
    ];
    for (url, refusal) in urls {
        let out = run(
            Command::new("curl")
                .args(["-sv", "--max-time", "30", "--login-options", "AUTH=PLAIN"])
                .args(["--sasl-authzid", "boss@example.test", "-u"])
                .arg(format!("reader@example.test:{READER_PASSWORD}"))
                .args(["--mail-from", "reader@example.test", "--mail-rcpt", BOB])
                .arg(&url),
            CLIENT_LIMIT,
        );
        let said = text(&out);
        assert!(!out.status.success(), "{url}: {said}");
        assert!(said.contains(refusal), "{url}: {said}");
        assert!(!said.contains(" BAD "), "{url}: {said}");
    }
    proxy.wait_log(&["login failed", "\"reason\":\"authorization\""]);
}
