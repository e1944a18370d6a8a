//! IMAP sessions that outlive their token, against the test upstream's
//! Exchange-like front (it ends a session with
//! `* BYE Session invalidated - AccessTokenExpired` when the token it logged in with expires) and
//! 60-second tokens: devices in IDLE and NOOP loops never notice, a large
//! FETCH under way finishes first, an expunge in between is told at the
//! device's next NOOP, where the session moves, and each login's token had three quarters of its life
//! left, measured at the front. Also: IMAP logins beyond the mailbox's
//! session limit are refused within seconds, not queued.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::*;

/// The tokens' lifetime here, chosen by the identity provider's `ttl-60`
/// tenant.
const LIFETIME_S: f64 = 60.0;

/// A proxy with plain IMAP and POP3 listeners whose upstream is the
/// Exchange-like front and whose tokens live 60 s.
fn expiring_proxy() -> Proxy {
    expiring_proxy_with("")
}

/// [`expiring_proxy`] with `imap_listener` added to its IMAP listener.
fn expiring_proxy_with(imap_listener: &str) -> Proxy {
    let up = upstream();
    let cfg = config(&plain_listeners(&["imap", "pop3"]), ADMIN).replacen(
        "allow_plaintext_auth = true\n",
        &format!("allow_plaintext_auth = true\n{imap_listener}"),
        1,
    );
    let cfg = reroute(
        &cfg,
        "imap",
        &format!("localhost:{}", up.get("EXPIRY_IMAPS_PORT")),
    );
    let cfg = reroute(
        &cfg,
        "pop3",
        &format!("localhost:{}", up.get("EXPIRY_POP3S_PORT")),
    );
    let url = up.token_url().replace("/common/", "/ttl-60/");
    Proxy::start(&with_token_url(&cfg, &url))
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A new folder in Bob's mailbox, through the proxy.
fn folder(port: u16, prefix: &str) -> String {
    let name = unique(prefix);
    let mut c = Raw::connect(port);
    c.line();
    assert!(c
        .imap_login(BOB, &upstream().password(BOB))
        .contains("a OK"));
    c.send(&format!("c CREATE \"{name}\""));
    assert!(last(&c.until("c ")).starts_with("c OK"), "CREATE {name}");
    c.send("z LOGOUT");
    c.until("z ");
    name
}

/// Append `message` to `folder` in its own session; the tagged reply.
fn append(port: u16, folder: &str, message: &[u8]) -> String {
    let mut c = Raw::connect(port);
    c.line();
    assert!(c
        .imap_login(BOB, &upstream().password(BOB))
        .contains("a OK"));
    c.send(&format!("p APPEND \"{folder}\" {{{}+}}", message.len()));
    c.write(message);
    c.write(b"\r\n");
    let reply = c.until("p ");
    c.send("z LOGOUT");
    c.until("z ");
    reply
}

/// The last line of a reply: the tagged one.
fn last(reply: &str) -> &str {
    reply.lines().last().unwrap_or("")
}

fn small(id: &str) -> Vec<u8> {
    format!(
        "From: {ALICE}\r\nTo: {BOB}\r\nSubject: continuity\r\nMessage-ID: {id}\r\n\r\nhello\r\n"
    )
    .into_bytes()
}

/// The front's `event=login` lines of Bob's since `since` (epoch seconds),
/// as (lifetime_s, left_s, proto). (Tests with other token lifetimes use
/// other mailboxes.)
fn front_logins(since: f64) -> Vec<(f64, f64, String)> {
    let log = std::fs::read_to_string(upstream().get("FRONT_LOG")).unwrap();
    let bob = format!(" user={BOB} ");
    log.lines()
        .filter(|l| l.contains("event=login") && l.contains(&bob))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split(' ')
                    .find_map(|w| w.strip_prefix(&format!("{k}=")))
                    .map(str::to_string)
            };
            let at: f64 = field("at")?.parse().ok()?;
            (at >= since).then(|| {
                (
                    field("lifetime_s")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0),
                    field("left_s").and_then(|v| v.parse().ok()).unwrap_or(0.0),
                    field("proto").unwrap_or_default(),
                )
            })
        })
        .collect()
}

fn assert_three_quarters_left(since: f64) {
    let logins = front_logins(since);
    assert!(!logins.is_empty(), "no logins at the front");
    for (lifetime, left, proto) in &logins {
        assert_eq!(*lifetime, LIFETIME_S, "{proto} login with another lifetime");
        // Measured at the front after the token request and the TLS
        // handshakes: a second of slack.
        assert!(
            *left >= 0.75 * lifetime - 1.0,
            "{proto} login with {left} s of {lifetime} s left"
        );
    }
}

fn node_client(args: &[String]) -> std::process::Child {
    Command::new("node")
        .arg(repo().join("tests/clients/imap_idle.js"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (tests/clients: npm ci)")
}

fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// imapflow in IDLE and imaplib polling with NOOP, for more than three
/// token lifetimes: every message appended meanwhile is seen by both, no
/// BYE, and each session moved at least three times.
#[test]
fn idle_and_noop_devices_outlive_three_token_lifetimes() {
    npm_clients();
    let since = now_s();
    let proxy = expiring_proxy();
    let port = proxy.port(0);
    let name = folder(port, "continuity");
    let password = upstream().password(BOB);
    let seconds = (3.0 * LIFETIME_S + 25.0) as u64;
    let args: Vec<String> = vec![
        port.to_string(),
        BOB.into(),
        password.clone(),
        name.clone(),
        seconds.to_string(),
    ];
    let idle = node_client(&args);
    let poll = python("imap_poll.py")
        .args(&args)
        .arg("2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // POP3 logins get long-lived tokens too.
    let mut pop3 = Raw::connect(proxy.port(1));
    pop3.line();
    pop3.send(&format!("USER {BOB}"));
    pop3.line();
    pop3.send(&format!("PASS {password}"));
    assert_eq!(pop3.line(), "+OK Logged in\r\n");
    pop3.send("QUIT");
    pop3.line();
    std::thread::sleep(Duration::from_secs(5));
    let mut sent = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(seconds - 25) {
        let id = message_id(&unique("cont"));
        assert!(append(port, &name, &small(&id)).starts_with("p OK"));
        sent.push(id);
        std::thread::sleep(Duration::from_secs(20));
    }
    let idle = idle.wait_with_output().unwrap();
    let poll = poll.wait_with_output().unwrap();
    let (idle, poll) = (json_of(&idle), json_of(&poll));
    let logs = proxy.logs();
    assert_eq!(idle["closedEarly"], false, "{idle}\n{logs}");
    assert_eq!(idle["byes"], serde_json::json!([]), "{idle}");
    assert_eq!(poll["error"], serde_json::Value::Null, "{poll}\n{logs}");
    let seen = |v: &serde_json::Value| -> Vec<String> {
        v["seen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(seen(&idle), sent, "IDLE device\n{idle}");
    assert_eq!(seen(&poll), sent, "NOOP device\n{poll}");
    assert!(sent.len() >= 8, "{} messages", sent.len());
    let swaps = metric(&proxy, "oxbridge_imap_swaps_total");
    assert!(swaps >= 6.0, "{swaps} swaps\n{logs}");
    assert_eq!(
        metric(&proxy, "oxbridge_imap_swap_refusals_total"),
        0.0,
        "{logs}"
    );
    assert_eq!(
        metric(&proxy, "oxbridge_upstream_expiries_total"),
        0.0,
        "{logs}"
    );
    assert_three_quarters_left(since);
}

/// A session logged in for the swap tests: the folder holds a 20 MB
/// message (1) and a small one (2); returns the connection, the 20 MB
/// message, when the token of its login expires, and the folder.
fn big_message_session(proxy: &Proxy) -> (Raw, Vec<u8>, Instant, String) {
    let port = proxy.port(0);
    let name = folder(port, "swapfetch");
    let big = message(ALICE, BOB, &unique("big"), 20 * 1024 * 1024);
    assert!(append(port, &name, &big).starts_with("p OK"));
    assert!(append(port, &name, &small(&message_id(&unique("small")))).starts_with("p OK"));
    let before = proxy.logs().matches("authenticated; relaying").count();
    let mut c = Raw::connect(port);
    c.line();
    assert!(c
        .imap_login(BOB, &upstream().password(BOB))
        .contains("a OK"));
    let logged_in = Instant::now();
    let line = loop {
        let logs = proxy.logs();
        if let Some(l) = logs
            .lines()
            .filter(|l| l.contains("authenticated; relaying"))
            .nth(before)
        {
            break l.to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let left = v["token_left_s"].as_u64().expect("token_left_s");
    c.send(&format!("s SELECT \"{name}\""));
    assert!(last(&c.until("s ")).starts_with("s OK"));
    (c, big, logged_in + Duration::from_secs(left), name)
}

/// FETCH message 1 when the move is 3 s away, with the commands of
/// `pipelined` right behind it, and read it at 2 MB/s until `during` has
/// run; its literal must be
/// the message, byte for byte. Returns the tagged line.
fn slow_fetch(
    c: &mut Raw,
    big: &[u8],
    expires: Instant,
    pipelined: &[&str],
    during: impl FnOnce(),
) -> String {
    let prepare = expires - Duration::from_secs_f64(LIFETIME_S / 4.0);
    std::thread::sleep(prepare.saturating_duration_since(Instant::now() + Duration::from_secs(3)));
    let mut commands = String::from("f FETCH 1 BODY.PEEK[]\r\n");
    for p in pipelined {
        commands.push_str(p);
        commands.push_str("\r\n");
    }
    c.write(commands.as_bytes());
    let head = c.line();
    let size: usize = head
        .trim_end()
        .rsplit('{')
        .next()
        .and_then(|s| s.strip_suffix('}'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{head}"));
    assert_eq!(size, big.len());
    let mut got = vec![0u8; size];
    let mut during = Some(during);
    for (i, chunk) in got.chunks_mut(1024 * 1024).enumerate() {
        c.reader.read_exact(chunk).unwrap();
        // Slowly until `during` has run (the FETCH is in flight at the
        // proxy meanwhile: what the socket buffers hold is less than the
        // rest), then at once.
        if during.is_some() {
            std::thread::sleep(Duration::from_millis(500));
        }
        if i == 8 {
            (during.take().unwrap())();
        }
    }
    assert!(got == big, "the FETCH literal differs from the message");
    assert_eq!(c.line(), ")\r\n");
    c.line()
}

/// A 20 MB FETCH under way when the move is due completes intact; the
/// session then moves and goes on.
#[test]
fn a_large_fetch_at_the_swap_completes_then_the_session_moves() {
    let since = now_s();
    let proxy = expiring_proxy();
    let (mut c, big, expires, _) = big_message_session(&proxy);
    let done = slow_fetch(&mut c, &big, expires, &[], || {});
    assert!(done.starts_with("f OK "), "{done}");
    proxy.wait_log(&["IMAP session moved to a new upstream login"]);
    assert!(Instant::now() < expires);
    c.send("n NOOP");
    assert!(last(&c.until("n ")).starts_with("n OK"));
    // After the old token's expiry, the session still works.
    std::thread::sleep(expires.saturating_duration_since(Instant::now()) + Duration::from_secs(2));
    c.send("m NOOP");
    assert!(last(&c.until("m ")).starts_with("m OK"), "{}", proxy.logs());
    c.send("z LOGOUT");
    c.until("z ");
    assert_eq!(metric(&proxy, "oxbridge_imap_swaps_total"), 1.0);
    assert_eq!(metric(&proxy, "oxbridge_upstream_expiries_total"), 0.0);
    assert_three_quarters_left(since);
}

/// The device closes its mailbox (UNSELECT, pipelined behind a 20 MB
/// FETCH) after the new connection selected it and before the move: after
/// the move the device's session has no mailbox selected, as the device
/// was told, and its ENABLE from then on holds.
#[test]
fn a_mailbox_closed_before_the_swap_stays_closed_after_it() {
    let proxy = expiring_proxy();
    let (mut c, big, expires, _) = big_message_session(&proxy);
    let done = slow_fetch(
        &mut c,
        &big,
        expires,
        &["u UNSELECT", "e ENABLE CONDSTORE"],
        || {},
    );
    assert!(done.starts_with("f OK "), "{done}");
    assert!(last(&c.until("u ")).starts_with("u OK"));
    let enabled = c.until("e ");
    assert!(last(&enabled).starts_with("e OK"), "{enabled}");
    proxy.wait_log(&["IMAP session moved to a new upstream login"]);
    c.send("x FETCH 1 FLAGS");
    let reply = c.until("x ");
    assert!(
        last(&reply).starts_with("x BAD") && !reply.contains("* 1 FETCH"),
        "a mailbox is selected after the move:\n{reply}\n{}",
        proxy.logs()
    );
    c.send("z LOGOUT");
    c.until("z ");
    assert_eq!(metric(&proxy, "oxbridge_imap_swaps_total"), 1.0);
}

/// Another session expunges a message after the new connection selected
/// the folder and before the device was moved: the device's FETCH
/// completes; at rest, the device cannot be told of the expunge, so the
/// session stays on the old connection; its next NOOP is where it moves,
/// and that NOOP's answer carries `* 2 EXPUNGE`. The session then
/// outlives the old token with the right message numbers.
#[test]
fn an_expunge_during_the_swap_is_told_at_the_next_noop_and_the_session_moves() {
    let proxy = expiring_proxy();
    let port = proxy.port(0);
    let (mut c, big, expires, name) = big_message_session(&proxy);
    let expunge = || {
        proxy.wait_log(&["upstream login renewed"]);
        std::thread::sleep(Duration::from_millis(500));
        let mut e = Raw::connect(port);
        e.line();
        assert!(e
            .imap_login(BOB, &upstream().password(BOB))
            .contains("a OK"));
        e.send(&format!("s SELECT \"{name}\""));
        e.until("s ");
        e.send("d STORE 2 +FLAGS.SILENT (\\Deleted)");
        assert!(last(&e.until("d ")).starts_with("d OK"));
        e.send("x EXPUNGE");
        assert!(e.until("x ").contains("x OK"));
        e.send("z LOGOUT");
        e.until("z ");
    };
    let done = slow_fetch(&mut c, &big, expires, &[], expunge);
    assert!(done.starts_with("f OK "), "{done}");
    proxy.wait_log(&["IMAP session move waits for the device's next command"]);
    c.send("n NOOP");
    let answer = c.until("n ");
    // The old connection may report the other session's flag change first,
    // under the device's own message number.
    let answer = answer
        .strip_prefix("* 2 FETCH (FLAGS (\\Deleted))\r\n")
        .or_else(|| answer.strip_prefix("* 2 FETCH (FLAGS (\\Deleted \\Recent))\r\n"))
        .unwrap_or(&answer);
    assert!(
        answer.starts_with("* 2 EXPUNGE\r\nn OK "),
        "{answer}\n{}",
        proxy.logs()
    );
    proxy.wait_log(&["IMAP session moved to a new upstream login"]);
    // After the old token's expiry the session goes on, and message 1 is
    // still the big one.
    std::thread::sleep(expires.saturating_duration_since(Instant::now()) + Duration::from_secs(2));
    c.send("u FETCH 1:* (RFC822.SIZE)");
    let sizes = c.until("u ");
    assert!(
        sizes.starts_with(&format!("* 1 FETCH (RFC822.SIZE {})\r\nu OK", big.len())),
        "{sizes}"
    );
    c.send("z LOGOUT");
    c.until("z ");
    let m = scrape(proxy.admin_addr());
    assert_eq!(value(&m, "oxbridge_imap_swaps_total", &[]), 1.0);
    assert_eq!(
        value(
            &m,
            "oxbridge_imap_swap_deferrals_total",
            &[("reason", "expunged while at rest")]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "oxbridge_imap_reconciled_total", &[("kind", "expunge")]),
        1.0
    );
    assert_eq!(value(&m, "oxbridge_imap_reconciliations_total", &[]), 1.0);
    assert_eq!(value(&m, "oxbridge_upstream_expiries_total", &[]), 0.0);
}

/// 200 imaplib-style devices in IDLE on two mailboxes, default limits: 40
/// sessions, and 160 clear refusals within about 10 s; none hangs.
#[test]
fn logins_beyond_the_session_limit_are_refused_within_seconds() {
    let proxy = Proxy::start(&config(&plain_listeners(&["imap"]), ""));
    let port = proxy.port(0);
    let up = upstream();
    let users = [(ALICE, up.password(ALICE)), (BOB, up.password(BOB))];
    let refusal = "a NO [UNAVAILABLE] This mailbox has too many open sessions, try again later\r\n";
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    let mut held = Vec::new();
    std::thread::scope(|scope| {
        for i in 0..200 {
            let (user, password) = users[i % 2].clone();
            let tx = tx.clone();
            scope.spawn(move || {
                let mut c = Raw::connect(port);
                c.line();
                c.send(&format!("a LOGIN \"{user}\" \"{password}\""));
                let reply = c.until("a ");
                let last = reply.lines().last().unwrap_or("").to_string() + "\r\n";
                if last.starts_with("a OK") {
                    c.send("i IDLE");
                    let go = c.line();
                    tx.send((true, go, start.elapsed(), Some(c))).unwrap();
                } else {
                    tx.send((false, last, start.elapsed(), None)).unwrap();
                }
            });
        }
    });
    drop(tx);
    let (mut ok, mut refused, mut slowest) = (0, 0, Duration::ZERO);
    for (logged_in, line, took, conn) in rx.iter() {
        if logged_in {
            assert!(line.starts_with("+ "), "{line}");
            ok += 1;
            held.push(conn);
        } else {
            assert_eq!(line, refusal);
            refused += 1;
            slowest = slowest.max(took);
        }
    }
    assert_eq!((ok, refused), (40, 160));
    assert!(
        slowest < Duration::from_secs(13),
        "slowest refusal after {slowest:?}"
    );
    assert!(
        slowest >= Duration::from_secs(9),
        "refused after {slowest:?}, before the wait"
    );
    for c in held.iter_mut().flatten() {
        c.write(b"DONE\r\n");
    }
}

/// With `session_continuity = false` the upstream ends IMAP sessions at
/// token expiry, as it ends POP3 ones; the device reads the upstream's own
/// words, and `/metrics` counts each expiry by protocol.
#[test]
fn upstream_expiries_are_passed_on_and_counted() {
    let up = upstream();
    let proxy = expiring_proxy_with("session_continuity = false\n");
    let password = up.password(BOB);
    let mut imap = Raw::connect(proxy.port(0));
    imap.line();
    assert!(last(&imap.imap_login(BOB, &password)).starts_with("a OK"));
    imap.send("i IDLE");
    assert!(imap.line().starts_with("+ "));
    let mut pop3 = Raw::connect(proxy.port(1));
    pop3.line();
    pop3.send(&format!("USER {BOB}"));
    pop3.line();
    pop3.send(&format!("PASS {password}"));
    assert_eq!(pop3.line(), "+OK Logged in\r\n");
    // The tokens had 45 to 60 s left; a read waits up to 60 s.
    std::thread::sleep(Duration::from_secs(30));
    let bye = loop {
        let l = imap.line();
        if !l.starts_with("* ") || l.starts_with("* BYE") {
            break l;
        }
    };
    assert_eq!(bye, "* BYE Session invalidated - AccessTokenExpired\r\n");
    assert_eq!(imap.line(), "<closed>");
    assert_eq!(
        pop3.line(),
        "-ERR Session invalidated - AccessTokenExpired\r\n"
    );
    assert_eq!(pop3.line(), "<closed>");
    let m = scrape(proxy.admin_addr());
    assert_eq!(
        value(
            &m,
            "oxbridge_upstream_expiries_total",
            &[("protocol", "imap")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "oxbridge_upstream_expiries_total",
            &[("protocol", "pop3")]
        ),
        1.0
    );
    assert_eq!(value(&m, "oxbridge_imap_swaps_total", &[]), 0.0);
}
