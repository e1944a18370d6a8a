//! `rewrite_sender = true` end to end: a device with a fixed sender
//! (`scanner@printer.local`) logs in as an account whose mailbox is
//! alice, and its mail arrives in alice's INBOX sent as alice: Return-Path
//! (the envelope sender Postfix took), `From:` and `Reply-To:` checked byte
//! for byte, the rest of the message identical. On a session listener, a
//! spooling one, through a `[[relay]]` rule and through Microsoft Graph.
//! The test Postfix, like Exchange, refuses a sender that is not the
//! logged-in mailbox: without the rewrite none of this mail would go.

use crate::harness::*;

const DEVICE: &str = "scanner@printer.local";
const PRINTER: &str = "printer@example.test";

/// The header lines the rewrite writes for [`DEVICE`].
fn rewritten_from() -> String {
    format!("From: \"{DEVICE}\" <{ALICE}>\r\nReply-To: <{DEVICE}>\r\n")
}

/// A fixed-sender account (mailbox alice), one that is not, and a relay
/// rule for 127.0.0.2 sending as the fixed-sender account; listener 0
/// relays live, listener 1 spools.
fn fixed_sender_config(state: &std::path::Path) -> String {
    let hash = argon2_hash(SCANNER_PASSWORD);
    let accounts = format!(
        "[[account]]\nlogin = \"{PRINTER}\"\npassword_hash = \"{hash}\"\ngrant = \"client_credentials\"\nmailbox = \"{ALICE}\"\nrewrite_sender = true\n\n[[account]]\nlogin = \"plain-printer@example.test\"\npassword_hash = \"{hash}\"\ngrant = \"client_credentials\"\nmailbox = \"{ALICE}\"\n\n[[relay]]\nfrom_networks = [\"127.0.0.2/32\"]\naccount = \"{PRINTER}\"\nallowed_senders = [\"{DEVICE}\"]\n\n[spool]\nretry_min_s = 1\nretry_max_s = 2\n"
    );
    let listeners = format!(
        "{}\n{}delivery = \"spool\"\n",
        listener("smtp", "none", true),
        listener("smtp", "none", true)
    );
    with_state_dir(&config(&listeners, &accounts), state)
}

/// The message the device sends: its own From, 8-bit text, lines that
/// start with dots (stuffed on the wire in DATA), a raw UTF-8 header line.
fn device_message(tag: &str) -> (String, String) {
    let head = format!(
        "From: {DEVICE}\r\nTo: {ALICE}\r\nSubject: {tag}\r\nMessage-ID: {}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nX-Device: Drucker 3. Stock – Küche\r\n\r\n",
        message_id(tag)
    );
    let body = "Grüße vom Drucker, 日本語.\r\n.a dot line\r\n..two dots\r\nend\r\n".to_string();
    (head, body)
}

/// What must arrive for [`device_message`]: the rewritten header, the
/// same body.
fn expected(tag: &str) -> String {
    let (head, body) = device_message(tag);
    let head = head.replacen(&format!("From: {DEVICE}\r\n"), &rewritten_from(), 1);
    format!("{head}{body}")
}

/// A line with a bare LF the DATA message ends with: it arrives as CRLF,
/// as for every message oxbridge reads in DATA.
const BARE_LF: &str = "bare\nLF\r\n";

fn dot_stuffed(text: &str) -> String {
    text.replace("\r\n.", "\r\n..")
}

/// Log in and send one message by DATA (and one by BDAT chunks that cut
/// its header in two), each with the device's own MAIL FROM.
fn send_both(port: u16, from_relay: bool, data_tag: &str, bdat_tag: &str) {
    let mut c = match from_relay {
        true => Raw::connect_from(port, "127.0.0.2"),
        false => Raw::connect(port),
    };
    c.reply();
    match from_relay {
        true => {
            c.send("EHLO printer.local");
            c.reply();
        }
        false => {
            let auth = c.smtp_login(PRINTER, SCANNER_PASSWORD);
            assert!(auth.starts_with("235 "), "{auth}");
        }
    }
    let (head, body) = device_message(data_tag);
    c.send(&format!("MAIL FROM:<{DEVICE}> BODY=8BITMIME"));
    let mail = c.reply();
    assert!(mail.starts_with("250 "), "{mail}");
    c.rcpt_data(ALICE);
    c.write(dot_stuffed(&format!("{head}{body}{BARE_LF}")).as_bytes());
    c.write(b".\r\n");
    let sent = c.reply();
    assert!(sent.starts_with("250 "), "{sent}");

    let (head, body) = device_message(bdat_tag);
    let (first, rest) = head.split_at(20);
    let rest = format!("{rest}{body}");
    c.send(&format!("MAIL FROM:<{DEVICE}> BODY=8BITMIME"));
    assert!(c.reply().starts_with("250 "));
    c.send(&format!("RCPT TO:<{ALICE}>"));
    assert!(c.reply().starts_with("250 "));
    c.write(format!("BDAT {}\r\n{first}", first.len()).as_bytes());
    let chunk = c.reply();
    assert_eq!(
        chunk,
        format!("250 2.0.0 {} octets received\r\n", first.len())
    );
    c.write(format!("BDAT {} LAST\r\n{rest}", rest.len()).as_bytes());
    let sent = c.reply();
    assert!(sent.starts_with("250 "), "{sent}");
    c.send("QUIT");
    assert!(c.reply().starts_with("221 "));
}

/// The delivered copies of [`send_both`]'s two messages: sent as alice
/// (Return-Path), with exactly the rewritten header and the device's body.
fn assert_sent_as_alice(data_tag: &str, bdat_tag: &str) {
    for (tag, tail) in [(data_tag, "bare\r\nLF\r\n"), (bdat_tag, "")] {
        let delivered = fetch_from_dovecot(ALICE, &message_id(tag));
        let text = String::from_utf8_lossy(&delivered);
        assert!(
            text.starts_with(&format!("Return-Path: <{ALICE}>\r\n")),
            "{text}"
        );
        let want = format!("{}{tail}", expected(tag));
        assert_delivered_intact(&delivered, want.as_bytes());
    }
}

#[test]
fn rewrite_sender_sends_a_fixed_sender_as_the_mailbox_live_and_spooled() {
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&fixed_sender_config(state.path()));

    // Without rewrite_sender, the upstream refuses the device's sender,
    // as Exchange does (550 5.7.60 there).
    let mut c = Raw::connect(proxy.port(0));
    c.reply();
    assert!(c
        .smtp_login("plain-printer@example.test", SCANNER_PASSWORD)
        .starts_with("235 "));
    c.send(&format!("MAIL FROM:<{DEVICE}>"));
    let mail = c.reply();
    c.send(&format!("RCPT TO:<{ALICE}>"));
    let rcpt = c.reply();
    assert!(
        mail.starts_with('5') || rcpt.starts_with('5'),
        "{mail}{rcpt}"
    );

    let tags: Vec<String> = ["live-data", "live-bdat", "spool-data", "spool-bdat"]
        .iter()
        .map(|t| unique(&format!("rewrite-{t}")))
        .collect();
    send_both(proxy.port(0), false, &tags[0], &tags[1]);
    send_both(proxy.port(1), false, &tags[2], &tags[3]);
    assert_sent_as_alice(&tags[0], &tags[1]);
    assert_sent_as_alice(&tags[2], &tags[3]);
}

#[test]
fn rewrite_sender_applies_to_a_relay_rules_account() {
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&fixed_sender_config(state.path()));
    let tags: Vec<String> = [
        "relay-data",
        "relay-bdat",
        "relay-spool-data",
        "relay-spool-bdat",
    ]
    .iter()
    .map(|t| unique(&format!("rewrite-{t}")))
    .collect();
    send_both(proxy.port(0), true, &tags[0], &tags[1]);
    send_both(proxy.port(1), true, &tags[2], &tags[3]);
    assert_sent_as_alice(&tags[0], &tags[1]);
    assert_sent_as_alice(&tags[2], &tags[3]);
    // The rule's allowed_senders still reads the device's own sender.
    let mut c = Raw::connect_from(proxy.port(0), "127.0.0.2");
    c.reply();
    c.send("EHLO printer.local");
    c.reply();
    c.send(&format!("MAIL FROM:<{ALICE}>"));
    assert_eq!(
        c.reply(),
        "550 5.7.1 Sender not allowed to relay from this network\r\n"
    );
}

/// A header block over 64 KiB is refused with 552 5.3.4 and nothing of
/// it arrives: on the spooling listener the session goes on; on the live
/// one the upstream's unfinished message is dropped with the session.
#[test]
fn rewrite_sender_refuses_a_header_block_too_big() {
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&fixed_sender_config(state.path()));
    let too_big = "552 5.3.4 Message header too big to rewrite its sender\r\n";
    for port in [proxy.port(1), proxy.port(0)] {
        let tag = unique("rewrite-too-big");
        let (head, body) = device_message(&tag);
        let filler: String = (0..1100)
            .map(|i| format!("X-Filler-{i}: {}\r\n", "f".repeat(50)))
            .collect();
        let mut c = Raw::connect(port);
        c.reply();
        assert!(c.smtp_login(PRINTER, SCANNER_PASSWORD).starts_with("235 "));
        c.envelope(DEVICE, ALICE);
        c.write(format!("{filler}{head}{body}.\r\n").as_bytes());
        assert_eq!(c.reply(), too_big, "{}", proxy.logs());
        if port == proxy.port(1) {
            c.send("NOOP");
            let after = c.reply();
            assert!(after.starts_with("250 "), "{after}");
        } else {
            assert_eq!(c.reply(), "<closed>");
        }
        assert!(read_from_dovecot(ALICE, &message_id(&tag), "3").is_err());
    }
}

/// Through Microsoft Graph (the account's `send = "graph"`): sendMail
/// takes the rewritten MIME and sends it as the mailbox.
#[test]
fn rewrite_sender_applies_through_microsoft_graph() {
    let _serial = crate::graph::serial();
    let state = tempfile::tempdir().unwrap();
    let spooling = format!("\n{}delivery = \"spool\"\n", listener("smtp", "none", true));
    let cfg = crate::graph::graph_config(&spooling, state.path(), "retry_min_s = 1\n").replace(
        "send = \"graph\"\n",
        "send = \"graph\"\nrewrite_sender = true\n",
    );
    let proxy = Proxy::start(&cfg);
    for port in [proxy.port(0), proxy.port(1)] {
        let tag = unique("rewrite-graph");
        let (head, body) = device_message(&tag);
        let mut c = Raw::connect(port);
        c.reply();
        let auth = c.smtp_login("graph-scanner@example.test", SCANNER_PASSWORD);
        assert!(auth.starts_with("235 "), "{auth}");
        c.envelope(DEVICE, ALICE);
        c.write(dot_stuffed(&format!("{head}{body}")).as_bytes());
        c.write(b".\r\n");
        let sent = c.reply();
        assert!(sent.starts_with("250 "), "{sent}\n{}", proxy.logs());
        let delivered = fetch_from_dovecot(ALICE, &message_id(&tag));
        let text = String::from_utf8_lossy(&delivered);
        assert!(
            text.starts_with(&format!("Return-Path: <{ALICE}>\r\n")),
            "{text}"
        );
        assert_delivered_intact(&delivered, expected(&tag).as_bytes());
    }
}
