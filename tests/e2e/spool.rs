//! Store and forward, end to end: real clients -> a spooling listener ->
//! the spool on disk -> the delivery worker -> real Postfix -> Dovecot,
//! read back over IMAPS. Postfix "stopped" is a port that refuses
//! connections ([`Outage`]); the crash test kills oxbridge with SIGKILL.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Retries come fast in tests, and the message rate does not hold them up.
pub(crate) const FAST: &str = "retry_min_s = 1\nretry_max_s = 2\nmessages_per_minute = 6000\n";

/// A config with one spooling SMTP listener (plain, passwords allowed) on
/// `listen`, its SMTP upstream at `smtp`, its state (and spool) in
/// `state`, and `spool` as the `[spool]` keys.
pub(crate) fn spool_config(listen: &str, smtp: &str, state: &Path, spool: &str) -> String {
    let listener =
        listener("smtp", "none", true).replace("127.0.0.1:0", listen) + "delivery = \"spool\"\n";
    let cfg = config(&listener, &format!("{ADMIN}\n[spool]\n{spool}"));
    with_state_dir(&reroute(&cfg, "smtp", smtp), state)
}

/// The Message-IDs in `user`'s INBOX matching an IMAP search, with how
/// often each is there.
pub(crate) fn inbox_ids(user: &str, search: &str) -> HashMap<String, usize> {
    let up = upstream();
    let out = run(
        python("imap_ids.py")
            .args(["--port", up.imaps_port(), "--cafile", up.ca()])
            .args(["--token-url", up.token_url()])
            .args(["--client-id", up.get("PUBLIC_CLIENT_ID"), "--user", user])
            .args(["--password", &up.password(user), "--search", search]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "imap_ids: {}", text(&out));
    let mut ids = HashMap::new();
    for id in String::from_utf8_lossy(&out.stdout).lines() {
        *ids.entry(id.trim().to_string()).or_insert(0) += 1;
    }
    ids
}

/// The spool id in a client's output (`250 2.0.0 Ok: queued as ID`).
pub(crate) fn queue_id(out: &std::process::Output) -> String {
    text(out)
        .lines()
        .find_map(|l| l.split("queued as ").nth(1).map(str::to_string))
        .expect("a queue id in the 250")
}

/// Wait until the proxy's spool is empty (its gauge reads 0 after deliveries).
fn wait_spool_empty(proxy: &Proxy, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let m = scrape(proxy.admin_addr());
        if value(&m, "oxbridge_spool_messages", &[]) == 0.0
            && value(&m, "oxbridge_spool_deliveries_total", &[]) > 0.0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "spool not empty after {limit:?}:\n{}",
            proxy.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// With the mail server down, 5 devices send 10 messages each: every one
/// gets its 250 at once. When the server is back, all 50 arrive
/// byte-identical, with at most 3 upstream sessions at any moment.
#[test]
fn with_postfix_down_fifty_messages_are_taken_at_once_and_delivered_later() {
    let up = upstream();
    let outage = Outage::start(&up.loopback("smtp"));
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&spool_config(
        "127.0.0.1:0",
        &outage.addr.to_string(),
        state.path(),
        FAST,
    ));
    let port = proxy.port(0);
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<Vec<Message>> = (0..5)
        .map(|d| {
            (0..10)
                .map(|i| {
                    // One scan per device is large (300 KB attachment).
                    let attachment = if i == 0 { 300_000 } else { 0 };
                    Message::write(dir.path(), &format!("spool-{d}-{i}"), ALICE, attachment)
                })
                .collect()
        })
        .collect();
    let slowest = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .map(|messages| {
                s.spawn(move || {
                    let mut slowest = Duration::ZERO;
                    for m in messages {
                        let t = Instant::now();
                        let out = Smtp::scanner(port).smtplib(&m.path);
                        slowest = slowest.max(t.elapsed());
                        assert!(out.status.success(), "{}: {}", m.tag, text(&out));
                    }
                    slowest
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    });
    assert!(
        slowest < Duration::from_secs(5),
        "a device waited {slowest:?} for its 250"
    );
    assert_eq!(outage.peak(), 0, "nothing can have reached the server");
    let m = scrape(proxy.admin_addr());
    assert_eq!(value(&m, "oxbridge_spool_accepted_total", &[]), 50.0);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        value(&scrape(proxy.admin_addr()), "oxbridge_spool_messages", &[]),
        50.0
    );
    let list = oxbridge(&["queue", "list"], &proxy.config_path());
    assert!(
        text(&list).contains("waiting: 50\n") && text(&list).contains("Connection refused"),
        "{}",
        text(&list)
    );

    outage.up();
    let back = Instant::now();
    wait_spool_empty(&proxy, Duration::from_secs(60));
    let drained = back.elapsed();
    for m in devices.iter().flatten() {
        assert_arrived(ALICE, &m.id, &m.bytes);
    }
    let m = scrape(proxy.admin_addr());
    assert_eq!(
        value(
            &m,
            "oxbridge_spool_deliveries_total",
            &[("result", "delivered")]
        ),
        50.0
    );
    assert!(
        outage.peak() <= 3,
        "{} upstream sessions at once for one mailbox",
        outage.peak()
    );
    eprintln!(
        "spool outage: slowest 250 {slowest:?}; all 50 delivered {drained:?} after the server came back; peak {} upstream sessions",
        outage.peak()
    );
}

/// A free port on loopback, for a listener that must keep its port across
/// restarts.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// oxbridge is killed with SIGKILL at random moments while a device sends
/// 200 messages (during DATA, just after a 250, during delivery) and
/// started again, 10 times: every message that got a 250 arrives.
/// Duplicates are counted and reported.
#[test]
fn killed_ten_times_while_spooling_every_acknowledged_message_arrives() {
    let up = upstream();
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = spool_config(
        &format!("127.0.0.1:{port}"),
        &up.submission(),
        state.path(),
        FAST,
    );
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    std::fs::write(&port_file, port.to_string()).unwrap();
    let prefix = unique("crash");
    let device = python("smtp_stream.py")
        .arg("--port-file")
        .arg(&port_file)
        .args([
            "--user",
            "scanner@example.test",
            "--password",
            SCANNER_PASSWORD,
        ])
        .args(["--sender", ALICE, "--rcpt", ALICE, "--prefix", &prefix])
        // About 70 KB each, paced so that the stream outlasts the kills.
        .args(["--count", "200", "--body-lines", "1000", "--pause", "0.03"])
        .args(["--deadline", "240"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut proxy = Proxy::start(&cfg);
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut random = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    let mut logs = Vec::new();
    let started = Instant::now();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300 + random(900)));
        let _ = Command::new("kill")
            .args(["-KILL", &proxy.pid().to_string()])
            .status();
        while proxy.is_running() {
            std::thread::sleep(Duration::from_millis(5));
        }
        logs.push(proxy.logs());
        proxy = Proxy::start(&cfg);
    }
    let killing = started.elapsed();
    let out = device.wait_with_output().unwrap();
    let streaming = started.elapsed();
    let report = client_json(&out);
    assert!(out.status.success(), "the device gave up: {report}");
    let acked: Vec<String> = report["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(acked.len(), 200, "{report}");
    // Delivered, and removed from the spool on disk.
    let queue = state.path().join("spool/queue");
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::fs::read_dir(&queue).unwrap().count() > 0 {
        assert!(
            Instant::now() < deadline,
            "spool not empty:\n{}",
            proxy.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    logs.push(proxy.logs());
    let inbox = inbox_ids(ALICE, &format!("HEADER Message-ID {prefix}"));
    let missing: Vec<&String> = acked.iter().filter(|id| !inbox.contains_key(*id)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let duplicates: usize = inbox.values().map(|n| n - 1).sum();
    let flagged = logs
        .iter()
        .map(|l| {
            l.matches("may have been delivered before the restart")
                .count()
        })
        .sum::<usize>();
    let device_retries = report["attempts"].as_u64().unwrap() - 200;
    eprintln!(
        "crash test: 200 acknowledged, 200 arrived; {duplicates} duplicates in the mailbox; \
         {flagged} resends flagged by the sending mark; {device_retries} device retries after a kill; \
         10 kills in {killing:?}, the stream took {streaming:?}"
    );
    assert!(
        device_retries >= 5,
        "only {device_retries} sends were cut by the 10 kills: the stream ended too early"
    );
    // Each kill can at most leave one message taken but not yet
    // acknowledged (the device sends it again) and one sent upstream but
    // not yet recorded (oxbridge sends it again).
    assert!(duplicates <= 2 * 10, "{duplicates} duplicates for 10 kills");
}

/// A permanent refusal at the end of DATA (Exchange's 554 5.2.252
/// SendAsDenied) comes back to the sender as a delivery report naming the
/// refusal and the fix.
#[test]
fn a_permanent_refusal_comes_back_to_the_sender_with_the_fix() {
    let up = upstream();
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&spool_config(
        "127.0.0.1:0",
        &up.submission(),
        state.path(),
        FAST,
    ));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "sendas", ALICE, 0);
    let out = Smtp {
        to: "sendas-denied@example.test",
        ..Smtp::scanner(proxy.port(0))
    }
    .swaks(&m.path);
    assert!(out.status.success(), "{}", text(&out));
    let queued = queue_id(&out);
    let report = fetch_from_dovecot(ALICE, &format!("<{queued}.report@"));
    let report = String::from_utf8_lossy(&report).into_owned();
    for want in [
        "Subject: Undelivered Mail Returned to Sender\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "<sendas-denied@example.test>: 554 5.2.252 SendAsDenied",
        "Add-RecipientPermission",
        "Final-Recipient: rfc822; sendas-denied@example.test\r\nAction: failed\r\nStatus: 5.2.252\r\n",
        &format!("Message-ID: {}", m.id),
    ] {
        assert!(report.contains(want), "no {want:?} in the report:\n{report}");
    }
    let m = scrape(proxy.admin_addr());
    assert_eq!(
        value(&m, "oxbridge_spool_bounces_total", &[("why", "refused")]),
        1.0
    );
}

/// A message that cannot be delivered within `[spool] max_age_h` comes
/// back to its sender; `oxbridge queue` shows it waiting first.
#[test]
fn a_message_past_its_maximum_age_comes_back_to_the_sender() {
    let up = upstream();
    let outage = Outage::start(&up.loopback("smtp"));
    let state = tempfile::tempdir().unwrap();
    // 0.001 h: 3.6 s.
    let proxy = Proxy::start(&spool_config(
        "127.0.0.1:0",
        &outage.addr.to_string(),
        state.path(),
        &format!("{FAST}max_age_h = 0.001\n"),
    ));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "expired", ALICE, 0);
    let out = Smtp::scanner(proxy.port(0)).swaks(&m.path);
    assert!(out.status.success(), "{}", text(&out));
    let queued = queue_id(&out);
    let show = oxbridge(&["queue", "show", &queued], &proxy.config_path());
    let shown = text(&show);
    assert!(show.status.success(), "{shown}");
    for want in [
        format!("id             {queued}\n"),
        "where          waiting\n".to_string(),
        "account        scanner@example.test (mailbox alice@example.test)\n".into(),
        format!("sender         <{ALICE}>\n"),
        format!("message-id     {}\n", m.id),
    ] {
        assert!(shown.contains(&want), "no {want:?} in:\n{shown}");
    }
    proxy.wait_log(&["delivery report spooled for the sender"]);
    outage.up();
    let report = fetch_from_dovecot(ALICE, &format!("<{queued}.report@"));
    let report = String::from_utf8_lossy(&report).into_owned();
    for want in [
        "it waited\r\n",
        "Status: 4.4.7\r\n",
        "Connection refused",
        &format!("Message-ID: {}", m.id),
    ] {
        assert!(
            report.contains(want),
            "no {want:?} in the report:\n{report}"
        );
    }
    let m = scrape(proxy.admin_addr());
    assert_eq!(
        value(&m, "oxbridge_spool_bounces_total", &[("why", "expired")]),
        1.0
    );
}

/// No password or client secret reaches the spool's files, `oxbridge
/// queue` or the log (at trace level), while a message waits and after it
/// is delivered.
#[test]
fn no_secret_reaches_the_spool_its_commands_or_the_log() {
    let up = upstream();
    let outage = Outage::start(&up.loopback("smtp"));
    let state = tempfile::tempdir().unwrap();
    let cfg = spool_config("127.0.0.1:0", &outage.addr.to_string(), state.path(), FAST);
    let secret = up.get("APP_CLIENT_SECRET").to_string();
    let proxy = Proxy::start_with_env(&cfg, &[("RUST_LOG", "trace")]);
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "spool-secrets", ALICE, 0);
    let out = Smtp::scanner(proxy.port(0)).swaks(&m.path);
    assert!(out.status.success(), "{}", text(&out));
    let queued = queue_id(&out);
    let mut seen = String::new();
    let spool_files = || {
        let mut all = String::new();
        for place in ["queue", "dead", "tmp", "retry"] {
            for entry in walk(&state.path().join("spool").join(place)) {
                all.push_str(&String::from_utf8_lossy(
                    &std::fs::read(entry).unwrap_or_default(),
                ));
            }
        }
        all
    };
    seen.push_str(&spool_files());
    assert!(
        seen.contains("\"sender\": \"alice@example.test\""),
        "spool files not read: {seen}"
    );
    for args in [vec!["queue", "list"], vec!["queue", "show", &queued]] {
        seen.push_str(&text(&oxbridge(&args, &proxy.config_path())));
    }
    outage.up();
    assert_arrived(ALICE, &m.id, &m.bytes);
    seen.push_str(&proxy.logs());
    seen.push_str(&spool_files());
    for (what, value) in [
        ("local password", SCANNER_PASSWORD),
        ("client secret", secret.as_str()),
    ] {
        assert!(!seen.contains(value), "the {what} leaked");
    }
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
