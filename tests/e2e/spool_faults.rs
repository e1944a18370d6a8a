//! The spool when something goes wrong around a delivery: a disk that
//! refuses a write after the upstream took the message, a chunk that
//! cannot be stored, a sender the login may not use, a device's bare-LF
//! message through Microsoft Graph.

use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};

use crate::graph::{graph_config, serial};
use crate::harness::*;
use crate::spool::{inbox_ids, spool_config, FAST};

/// The spool's `tmp/` replaced by a file: nothing can be created or
/// renamed in it (a full or broken disk, even for root).
fn break_tmp(state: &std::path::Path) -> std::path::PathBuf {
    let tmp = state.join("spool").join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"").unwrap();
    tmp
}

fn mend_tmp(tmp: &std::path::Path) {
    std::fs::remove_file(tmp).unwrap();
    std::fs::create_dir(tmp).unwrap();
}

/// Postfix takes the message, then removing it from the spool fails
/// (retries every 1-2 s): it arrives once, not once per retry.
#[test]
fn a_delivered_message_whose_removal_fails_arrives_once() {
    let up = upstream();
    let outage = Outage::start(&up.loopback("smtp"));
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&spool_config(
        "127.0.0.1:0",
        &outage.addr.to_string(),
        state.path(),
        FAST,
    ));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "spool-once", ALICE, 0);
    let out = Smtp::scanner(proxy.port(0)).swaks(&m.path);
    assert!(out.status.success(), "{}", text(&out));
    let tmp = break_tmp(state.path());
    outage.up();
    proxy.wait_log(&["cannot remove a finished message from the spool"]);
    std::thread::sleep(Duration::from_secs(8));
    let copies = inbox_ids(ALICE, &format!("HEADER Message-ID {}", m.tag));
    mend_tmp(&tmp);
    assert_eq!(
        copies.values().sum::<usize>(),
        1,
        "{copies:?}\n{}",
        proxy.logs()
    );
}

/// A BDAT chunk that cannot be written to the spool gets 451 4.3.0, and
/// so does the rest of its transaction: never a 250 for a message with a
/// chunk missing. After RSET the next message is taken.
#[test]
fn a_bdat_chunk_that_cannot_be_stored_is_refused_with_451() {
    let up = upstream();
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&spool_config(
        "127.0.0.1:0",
        &up.submission(),
        state.path(),
        FAST,
    ));
    let mut raw = Raw::connect(proxy.port(0));
    raw.reply();
    assert!(raw
        .smtp_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235 "));
    raw.send(&format!("MAIL FROM:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    raw.send(&format!("RCPT TO:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    let tmp = break_tmp(state.path());
    let chunk = b"Subject: chunked\r\n\r\nfirst part\r\n";
    raw.write(format!("BDAT {}\r\n", chunk.len()).as_bytes());
    raw.write(chunk);
    let first = raw.reply();
    mend_tmp(&tmp);
    let last = b"second part\r\n";
    raw.write(format!("BDAT {} LAST\r\n", last.len()).as_bytes());
    raw.write(last);
    let second = raw.reply();
    assert_eq!(
        (first.as_str(), second.as_str()),
        (
            "451 4.3.0 Could not store the message, try again later\r\n",
            "451 4.3.0 Could not store the message, try again later\r\n"
        ),
        "{}",
        proxy.logs()
    );
    raw.send("RSET");
    assert_eq!(raw.reply(), "250 2.0.0 OK\r\n");
    raw.send(&format!("MAIL FROM:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    raw.send(&format!("RCPT TO:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    raw.write(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
    raw.write(chunk);
    assert!(raw.reply().starts_with("250 2.0.0 Ok: queued as "));
}

/// Where the login has `allowed_senders`, the null sender is outside the
/// list like any other: 550 5.7.1, also for a second MAIL after RSET.
#[test]
fn the_null_sender_is_refused_where_allowed_senders_applies() {
    let up = upstream();
    let state = tempfile::tempdir().unwrap();
    let cfg = spool_config("127.0.0.1:0", &up.submission(), state.path(), FAST);
    let cfg = cfg.replacen(
        "mailbox = \"alice@example.test\"\n",
        "mailbox = \"alice@example.test\"\nallowed_senders = [\"alice@example.test\"]\n",
        1,
    );
    let proxy = Proxy::start(&cfg);
    let mut raw = Raw::connect(proxy.port(0));
    raw.reply();
    assert!(raw
        .smtp_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235 "));
    raw.send("MAIL FROM:<>");
    let null = raw.reply();
    raw.send(&format!("MAIL FROM:<{ALICE}>"));
    let allowed = raw.reply();
    raw.send("RSET");
    raw.reply();
    raw.send("MAIL FROM:<mallory@example.test>");
    let other = raw.reply();
    raw.send("MAIL FROM:<>");
    let null_again = raw.reply();
    assert!(null.starts_with("550 5.7.1 "), "{null}");
    assert!(allowed.starts_with("250 "), "{allowed}");
    assert_eq!(other, null);
    assert_eq!(null_again, null);
}

/// A multipart message with two 1.6 MB attachments and bare LF line ends.
fn bare_lf_scan(tag: &str) -> Vec<u8> {
    use base64::Engine as _;
    let part = |name: &str, seed: u32| {
        let bytes: Vec<u8> = (0..1_600_000u32).map(|i| (i * seed % 251) as u8).collect();
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        let lines: Vec<&str> = encoded
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "--XX\nContent-Type: application/pdf; name=\"{name}\"\n\
Content-Disposition: attachment; filename=\"{name}\"\n\
Content-Transfer-Encoding: base64\n\n{}\n",
            lines.join("\n")
        )
    };
    format!(
        "From: {ALICE}\nTo: {ALICE}\nSubject: {tag}\nMessage-ID: {}\nMIME-Version: 1.0\n\
Content-Type: multipart/mixed; boundary=\"XX\"\n\n--XX\nContent-Type: text/plain\n\n\
the scans\n{}{}--XX--\n",
        message_id(tag),
        part("one.pdf", 7),
        part("two.pdf", 13)
    )
    .into_bytes()
}

/// A device sends a 4.3 MB scan with bare LF line ends by BDAT through a
/// spooling listener of a Graph account: it goes as a draft with its two
/// attachments uploaded apart, and arrives intact.
#[test]
fn a_bare_lf_bdat_scan_arrives_intact_through_graph() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let spooling = format!("\n{}delivery = \"spool\"\n", listener("smtp", "none", true));
    let cfg = graph_config(
        &spooling,
        state.path(),
        &format!("{FAST}max_message_bytes = 52428800\n"),
    );
    let proxy = Proxy::start(&cfg);
    let tag = unique("graph-bare-lf");
    let scan = bare_lf_scan(&tag);
    let mut raw = Raw::connect(proxy.port(1));
    raw.reply();
    assert!(raw
        .smtp_login("graph-scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235 "));
    raw.send(&format!("MAIL FROM:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    raw.send(&format!("RCPT TO:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    let half = scan.len() / 2;
    raw.write(format!("BDAT {half}\r\n").as_bytes());
    raw.write(&scan[..half]);
    assert!(raw.reply().starts_with("250 "));
    raw.write(format!("BDAT {} LAST\r\n", scan.len() - half).as_bytes());
    raw.write(&scan[half..]);
    let queued = raw.reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let delivered = read_from_dovecot(ALICE, &message_id(&tag), "60")
        .unwrap_or_else(|e| panic!("not delivered: {e}\n{}", proxy.logs()));
    let sent = MessageParser::default().parse(&scan).unwrap();
    let got = MessageParser::default().parse(&delivered).unwrap();
    assert_eq!(got.subject(), Some(tag.as_str()));
    let names: Vec<_> = got.attachments().map(|a| a.attachment_name()).collect();
    assert_eq!(names, [Some("one.pdf"), Some("two.pdf")]);
    for (s, g) in sent.attachments().zip(got.attachments()) {
        assert!(s.contents() == g.contents(), "an attachment differs");
    }
}

/// The same bare-LF message sent by DATA and by BDAT is spooled as the
/// same bytes, with CRLF line ends: what goes on is one message to every
/// server, however strictly it reads line ends.
#[test]
fn a_bare_lf_message_is_spooled_alike_by_bdat_and_data() {
    let up = upstream();
    let outage = Outage::start(&up.loopback("smtp"));
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&spool_config(
        "127.0.0.1:0",
        &outage.addr.to_string(),
        state.path(),
        FAST,
    ));
    let message = b"Subject: bare\nX-Test: lf\n\nline one\nline two\r\nline three\r\n";
    let mut raw = Raw::connect(proxy.port(0));
    raw.reply();
    assert!(raw
        .smtp_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235 "));
    raw.envelope(ALICE, ALICE);
    raw.write(message);
    raw.write(b".\r\n");
    let by_data = raw.reply();
    raw.send(&format!("MAIL FROM:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    raw.send(&format!("RCPT TO:<{ALICE}>"));
    assert!(raw.reply().starts_with("250 "));
    // Two chunks, the split inside the header.
    let (a, b) = message.split_at(9);
    raw.write(format!("BDAT {}\r\n", a.len()).as_bytes());
    raw.write(a);
    assert!(raw.reply().starts_with("250 "));
    raw.write(format!("BDAT {} LAST\r\n", b.len()).as_bytes());
    raw.write(b);
    let by_bdat = raw.reply();
    let spooled = |reply: &str| {
        let id = reply
            .trim_end()
            .split("queued as ")
            .nth(1)
            .unwrap_or_else(|| panic!("not queued: {reply}"))
            .to_string();
        std::fs::read(state.path().join("spool/queue").join(id).join("message")).unwrap()
    };
    let want: &[u8] = b"Subject: bare\r\nX-Test: lf\r\n\r\nline one\r\nline two\r\nline three\r\n";
    assert_eq!(
        String::from_utf8_lossy(&spooled(&by_data)),
        String::from_utf8_lossy(want)
    );
    assert_eq!(
        String::from_utf8_lossy(&spooled(&by_bdat)),
        String::from_utf8_lossy(want)
    );
}

/// A refused message whose report cannot be written is deferred like any
/// temporary failure: its attempts grow and it waits longer each time.
#[test]
fn a_report_that_cannot_be_written_is_deferred_with_backoff() {
    let up = upstream();
    let outage = Outage::start(&up.loopback("smtp"));
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&spool_config(
        "127.0.0.1:0",
        &outage.addr.to_string(),
        state.path(),
        FAST,
    ));
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "report-fails", ALICE, 0);
    let out = Smtp {
        to: "sendas-denied@example.test",
        ..Smtp::scanner(proxy.port(0))
    }
    .swaks(&m.path);
    assert!(out.status.success(), "{}", text(&out));
    let id = crate::spool::queue_id(&out);
    let tmp = break_tmp(state.path());
    outage.up();
    std::thread::sleep(Duration::from_secs(6));
    let status = std::fs::read(
        state
            .path()
            .join("spool/queue")
            .join(&id)
            .join("status.json"),
    );
    mend_tmp(&tmp);
    let status: serde_json::Value =
        serde_json::from_slice(&status.unwrap_or_default()).unwrap_or_default();
    let attempts = status["attempts"].as_u64().unwrap_or(0);
    assert!((2..=4).contains(&attempts), "{status}\n{}", proxy.logs());
    let error = status["last_error"].as_str().unwrap_or("");
    assert!(error.contains("cannot write a delivery report"), "{status}");
}

/// A spooling listener of the Graph account, and the proxy on it.
fn graph_spool(state: &std::path::Path) -> Proxy {
    let spooling = format!("\n{}delivery = \"spool\"\n", listener("smtp", "none", true));
    Proxy::start(&graph_config(&spooling, state, FAST))
}

/// Graph answers the message's send with 503 (it may have taken it):
/// once, and it is asked again at once; four times, so that the attempt
/// fails and the next one sends it again. Every send after a 503 is
/// counted as a possible duplicate.
#[test]
fn a_graph_send_after_an_unclear_answer_is_counted_as_a_possible_duplicate() {
    let _serial = serial();
    for (unclear, resends) in [(1, 1.0), (4, 4.0)] {
        let state = tempfile::tempdir().unwrap();
        let proxy = graph_spool(state.path());
        let dir = tempfile::tempdir().unwrap();
        let m = Message::write(dir.path(), &format!("graph-503x{unclear}"), ALICE, 0);
        crate::graph::throttle(unclear, 503, 0.2);
        let out = crate::graph::graph_device(proxy.port(1)).swaks(&m.path);
        assert!(out.status.success(), "{}", text(&out));
        assert_arrived(ALICE, &m.id, &m.bytes);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            metric(&proxy, "oxbridge_spool_possible_duplicates_total"),
            resends,
            "after {unclear} 503:\n{}",
            proxy.logs()
        );
    }
}

/// SIGTERM while a Graph send is under way (waiting out a 429 for 3 s):
/// the send finishes before oxbridge exits, and after the restart nothing
/// is sent again.
#[test]
fn sigterm_during_a_send_lets_it_finish_and_nothing_is_resent() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let mut proxy = graph_spool(state.path());
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "graph-sigterm", ALICE, 0);
    crate::graph::throttle(1, 429, 3.0);
    let out = crate::graph::graph_device(proxy.port(1)).swaks(&m.path);
    assert!(out.status.success(), "{}", text(&out));
    proxy.wait_log(&["Graph asks to wait"]);
    let exit = proxy.terminate();
    let logs = proxy.logs();
    assert!(exit.success(), "{exit:?}\n{logs}");
    let arrived = read_from_dovecot(ALICE, &m.id, "1");
    assert!(arrived.is_ok(), "not delivered before the exit:\n{logs}");
    let cfg = std::fs::read_to_string(proxy.config_path()).unwrap();
    let again = Proxy::start(&cfg);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        metric(&again, "oxbridge_spool_possible_duplicates_total"),
        0.0,
        "{}",
        again.logs()
    );
    let copies = inbox_ids(ALICE, &format!("HEADER Message-ID {}", m.tag));
    assert_eq!(copies.values().sum::<usize>(), 1, "{copies:?}");
}

/// A dead letter older than `max_age_h` (an expired message with the
/// null sender, which cannot be told) put back by `oxbridge queue retry`
/// gets one real attempt: it is delivered, not buried again at once.
#[test]
fn queue_retry_of_an_old_dead_letter_gets_a_real_attempt() {
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
    let tag = unique("old-dead-letter");
    let mut raw = Raw::connect(proxy.port(0));
    raw.reply();
    assert!(raw
        .smtp_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("235 "));
    raw.envelope("", ALICE);
    raw.write(short_message(ALICE, &tag, "a scan").as_bytes());
    raw.write(b".\r\n");
    let queued = raw.reply();
    let id = queued
        .trim_end()
        .split("queued as ")
        .nth(1)
        .unwrap_or_else(|| panic!("{queued}"))
        .to_string();
    proxy.wait_log(&["message moved to the dead-letter folder"]);
    outage.up();
    let retry = oxbridge(&["queue", "retry", &id], &proxy.config_path());
    assert!(retry.status.success(), "{}", text(&retry));
    let arrived = read_from_dovecot(ALICE, &message_id(&tag), "15");
    assert!(
        arrived.is_ok(),
        "not delivered after the retry:\n{}",
        proxy.logs()
    );
}
