//! Microsoft Graph as the way out, end to end: real clients -> oxbridge ->
//! the Graph stand-in (`tests/upstream/graph.py`, which follows Graph's
//! documented endpoints and limits) -> the real Dovecot, read back over
//! IMAPS. For tenants where SMTP AUTH is off.

use std::process::Command;
use std::time::{Duration, Instant};

use mail_parser::{MessageParser, MimeHeaders};

use crate::harness::*;

/// The stand-in's request log and throttle hook are shared: one Graph
/// test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// An account that sends through Graph, and where Graph is.
pub(crate) fn graph_config(listener_extra: &str, state: &std::path::Path, spool: &str) -> String {
    let up = upstream();
    let listener = listener("smtp", "none", true) + listener_extra;
    let account = format!(
        "[[account]]\nlogin = \"graph-scanner@example.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"alice@example.test\"\nsend = \"graph\"\n",
        argon2_hash(SCANNER_PASSWORD)
    );
    let cfg = config(&listener, &format!("{account}\n{ADMIN}\n[spool]\n{spool}"));
    let cfg = cfg.replace(
        &format!("ca_file = \"{}\"", up.ca()),
        &format!(
            "ca_file = \"{}\"\ngraph = \"{}\"",
            up.ca(),
            up.get("GRAPH_URL")
        ),
    );
    with_state_dir(&cfg, state)
}

pub(crate) fn graph_device(port: u16) -> Smtp<'static> {
    Smtp {
        login: "graph-scanner@example.test",
        ..Smtp::scanner(port)
    }
}

/// The stand-in's admin hook: the next `count` Graph requests get `status`.
pub(crate) fn throttle(count: u32, status: u16, retry_after: f64) {
    let up = upstream();
    let body = format!(r#"{{"count": {count}, "status": {status}, "retry_after": {retry_after}}}"#);
    let out = run(
        Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "--cacert",
                up.ca(),
                "-X",
                "POST",
                "-d",
                &body,
            ])
            .arg(format!(
                "https://127.0.0.1:{}/admin/throttle",
                up.get("GRAPH_PORT")
            )),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// The Graph requests the stand-in logged since line `from`: (time, method, path, status).
fn graph_log(from: usize) -> Vec<(f64, String, String, u64)> {
    let log = std::fs::read_to_string(upstream().get("GRAPH_LOG")).unwrap_or_default();
    log.lines()
        .skip(from)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["time"].as_f64().unwrap_or(0.0),
                v["method"].as_str().unwrap_or("").to_string(),
                v["path"].as_str().unwrap_or("").to_string(),
                v["status"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn graph_log_len() -> usize {
    std::fs::read_to_string(upstream().get("GRAPH_LOG"))
        .map(|l| l.lines().count())
        .unwrap_or(0)
}

/// A 1 MB scan goes whole by sendMail and arrives byte-identical (session
/// listener: the device's 250 is Graph's 202); a 30 MB scan goes through a
/// spooling listener as a draft plus an upload session, and its headers,
/// text and attachment arrive intact.
#[test]
fn scans_of_1_and_30_mb_arrive_through_graph() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let spool = "retry_min_s = 1\nretry_max_s = 2\nmessages_per_minute = 6000\nmax_message_bytes = 52428800\n";
    // Listener 0 relays at once (session), listener 1 spools.
    let spooling = format!("\n{}delivery = \"spool\"\n", listener("smtp", "none", true));
    let cfg = graph_config(&spooling, state.path(), spool);
    let proxy = Proxy::start(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let from_log = graph_log_len();

    let small = Message::write(dir.path(), "graph-1mb", ALICE, 750_000);
    let out = graph_device(proxy.port(0)).swaks(&small.path);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    assert!(
        text(&out).contains("<-  250 2.0.0 Ok: sent through Microsoft Graph"),
        "{}",
        text(&out)
    );
    assert_arrived(ALICE, &small.id, &small.bytes);

    let large = Message::write(dir.path(), "graph-30mb", ALICE, 30_000_000);
    let out = graph_device(proxy.port(1)).smtplib(&large.path);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    let delivered = read_from_dovecot(ALICE, &large.id, "120").unwrap();
    let sent = MessageParser::default().parse(&large.bytes).unwrap();
    let got = MessageParser::default().parse(&delivered).unwrap();
    assert_eq!(got.subject(), sent.subject());
    assert_eq!(got.message_id(), sent.message_id());
    assert_eq!(got.body_text(0), sent.body_text(0));
    let sent_att = sent.attachments().next().unwrap();
    let got_att = got.attachments().next().expect("the attachment arrived");
    assert_eq!(got_att.attachment_name(), Some("scan.bin"));
    assert!(
        got_att.contents() == sent_att.contents(),
        "attachment differs: {} vs {} bytes",
        got_att.contents().len(),
        sent_att.contents().len()
    );
    let calls = graph_log(from_log);
    let count = |method: &str, tail: &str, status: u64| {
        calls
            .iter()
            .filter(|(_, m, p, s)| m == method && p.ends_with(tail) && *s == status)
            .count()
    };
    assert_eq!(count("POST", "/sendMail", 202), 1, "{calls:?}");
    assert_eq!(count("POST", "/messages", 201), 1, "{calls:?}");
    assert_eq!(count("POST", "/createUploadSession", 201), 1, "{calls:?}");
    assert!(
        count("PUT", "", 200) >= 7,
        "30 MB in ranges under 4 MB: {calls:?}"
    );
    assert_eq!(count("PUT", "", 201), 1, "{calls:?}");
    assert_eq!(count("POST", "/send", 202), 1, "{calls:?}");
    assert!(calls.iter().all(|(_, _, _, s)| *s < 400), "{calls:?}");
}

/// A 429 with Retry-After is waited out: the device's 250 comes after it,
/// and the next request comes no sooner than Graph asked.
#[test]
fn a_429_with_retry_after_is_waited_out() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&graph_config("", state.path(), ""));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "graph-429", ALICE, 0);
    let from_log = graph_log_len();
    throttle(1, 429, 2.5);
    let t = Instant::now();
    let out = graph_device(proxy.port(0)).swaks(&m.path);
    let took = t.elapsed();
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    assert!(took >= Duration::from_millis(2500), "250 after {took:?}");
    assert_arrived(ALICE, &m.id, &m.bytes);
    let calls = graph_log(from_log);
    let throttled = calls.iter().find(|c| c.3 == 429).expect("a 429");
    let sent = calls.iter().find(|c| c.3 == 202).expect("a 202");
    assert!(
        sent.0 - throttled.0 >= 2.5,
        "retried {} s after the 429",
        sent.0 - throttled.0
    );
    assert_eq!(metric(&proxy, "oxbridge_graph_requests_total"), 2.0);
    // `oxbridge check` gets the Graph account a Graph token, not an SMTP login.
    let check = oxbridge(&["check"], &proxy.config_path());
    let line = text(&check)
        .lines()
        .find(|l| l.starts_with("graph-scanner@example.test smtp: "))
        .map(str::to_string)
        .unwrap_or_else(|| text(&check));
    assert!(
        line.starts_with("graph-scanner@example.test smtp: OK (mailbox alice@example.test, Microsoft Graph token; Mail.Send shows with the first message, "),
        "{line}"
    );
}

/// POST the stand-in's `/admin/config` with a JSON body; its answer.
fn graph_admin_config(body: &str) -> String {
    let up = upstream();
    let out = run(
        Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--cacert", up.ca(), "-X", "POST"])
            .args(["-d", body])
            .arg(format!(
                "https://127.0.0.1:{}/admin/config",
                up.get("GRAPH_PORT")
            )),
        Duration::from_secs(20),
    );
    text(&out)
}

/// Sets `lmtp_defer` back to 0 when dropped (a failed test leaves the
/// stand-in as it found it).
struct NoDefer;

impl Drop for NoDefer {
    fn drop(&mut self) {
        graph_admin_config(r#"{"lmtp_defer": 0}"#);
    }
}

/// Graph took a message (202, so the device got 250) while the mailbox
/// server could not take it: the stand-in keeps it and delivers it when it
/// can, as Exchange's transport does. (The soak lost such a message while
/// Dovecot restarted, before the stand-in kept them.)
#[test]
fn a_message_graph_took_while_dovecot_was_down_arrives() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&graph_config("", state.path(), ""));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "graph-deferred", ALICE, 0);
    let _reset = NoDefer;
    let answer = graph_admin_config(r#"{"lmtp_defer": 1}"#);
    assert!(answer.contains(r#""lmtp_defer": 1"#), "{answer}");
    let from_log = graph_log_len();
    let out = graph_device(proxy.port(0)).swaks(&m.path);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    assert_arrived(ALICE, &m.id, &m.bytes);
    // The retry's log line is written once its LMTP session has ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(upstream().get("GRAPH_LOG")).unwrap_or_default();
        let later: Vec<&str> = log.lines().skip(from_log).collect();
        let deferred = later
            .iter()
            .any(|l| l.contains(r#""deferred":["alice@example.test: not delivered yet"]"#));
        let retried = later.iter().any(|l| {
            l.contains(r#""event":"delivery retried""#)
                && l.contains(r#""delivered":["alice@example.test"]"#)
        });
        if deferred && retried {
            break;
        }
        assert!(Instant::now() < deadline, "{later:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Graph token without the Mail.Send permission: the device gets a
/// temporary refusal, and the log says what to grant.
#[test]
fn a_token_without_mail_send_gives_the_diagnosis() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let up = upstream();
    let cfg = graph_config("", state.path(), "");
    let no_mail_send = up.token_url().replace("/common/", "/nomailsend/");
    let proxy = Proxy::start(&with_token_url(&cfg, &no_mail_send));
    let mut raw = Raw::connect(proxy.port(0));
    raw.reply();
    assert!(raw
        .smtp_login("graph-scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235 "),);
    raw.envelope(ALICE, ALICE);
    raw.write(b"Subject: no permission\r\n\r\nhi\r\n.\r\n");
    assert_eq!(
        raw.reply(),
        "451 4.7.0 Microsoft Graph refused oxbridge's token; the message was not sent, try again later\r\n"
    );
    let line = proxy.wait_log(&["Microsoft Graph did not take the message"]);
    for want in ["ErrorAccessDenied", "application permission Mail.Send"] {
        assert!(line.contains(want), "{line}");
    }
}
