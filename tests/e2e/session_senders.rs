//! `allowed_senders` on a session (live relay) SMTP listener, end to end
//! through the real Postfix: every MAIL after login is checked, not only
//! the first; refused ones never reach the upstream.

use crate::harness::*;

/// The scanner account (mailbox alice) that may only send as alice.
fn restricted() -> String {
    let account = format!(
        "[[account]]\nlogin = \"restricted@example.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"{ALICE}\"\nallowed_senders = [\"{ALICE}\"]\n",
        argon2_hash(SCANNER_PASSWORD)
    );
    config(&listener("smtp", "none", true), &account)
}

fn logged_in(proxy: &Proxy) -> Raw {
    let mut c = Raw::connect(proxy.port(0));
    c.reply();
    let auth = c.smtp_login("restricted@example.test", SCANNER_PASSWORD);
    assert!(auth.starts_with("235 "), "{auth}\n{}", proxy.logs());
    c
}

/// An allowed MAIL, RSET, then another sender: refused by oxbridge; the
/// null sender too; the session goes on and the allowed sender still
/// delivers, with a body whose lines look like commands.
#[test]
fn every_mail_after_login_is_checked_against_allowed_senders() {
    let proxy = Proxy::start(&restricted());
    let mut c = logged_in(&proxy);
    c.send(&format!("MAIL FROM:<{ALICE}>"));
    let first = c.reply();
    assert!(first.starts_with("250 "), "{first}");
    c.send("RSET");
    assert!(c.reply().starts_with("250 "));
    c.send(&format!("MAIL FROM:<{BOB}>"));
    let second = c.reply();
    assert!(
        second.starts_with("550 5.7.1 "),
        "{second}\n{}",
        proxy.logs()
    );
    c.send("MAIL FROM:<>");
    let null = c.reply();
    assert!(null.starts_with("550 5.7.1 "), "{null}");
    // A pipelined group: the refused MAIL's reply comes in its place.
    c.write(
        format!("NOOP\r\nmail from:<{BOB}> SIZE=10\r\nRCPT TO:<{ALICE}>\r\nNOOP\r\n").as_bytes(),
    );
    let noop = c.reply();
    assert!(noop.starts_with("250 "), "{noop}");
    let refused = c.reply();
    assert!(refused.starts_with("550 5.7.1 "), "{refused}");
    let rcpt = c.reply();
    assert!(
        rcpt.starts_with("503 "),
        "RCPT without a MAIL upstream: {rcpt}"
    );
    assert!(c.reply().starts_with("250 "));
    // The allowed sender still sends; the body's look-alike commands are
    // message text, delivered as they were.
    let tag = unique("senders");
    let body = format!("MAIL FROM:<{BOB}>\r\n..RSET\r\nbare\nLF\r\n");
    c.envelope(ALICE, ALICE);
    let message = short_message(ALICE, &tag, &body);
    c.write(message.as_bytes());
    c.write(b".\r\n");
    let queued = c.reply();
    assert!(queued.starts_with("250 "), "{queued}\n{}", proxy.logs());
    c.send("QUIT");
    assert!(c.reply().starts_with("221 "));
    let delivered = fetch_from_dovecot(ALICE, &message_id(&tag));
    let text = String::from_utf8_lossy(&delivered);
    assert!(
        text.contains(&format!("\r\nMAIL FROM:<{BOB}>\r\n.RSET\r\nbare\r\nLF\r\n")),
        "{text}"
    );
}

/// BDAT chunks are passed on whole, binary text inside included; a MAIL
/// after them is still checked.
#[test]
fn bdat_chunks_pass_and_the_next_mail_is_checked() {
    let proxy = Proxy::start(&restricted());
    let mut c = logged_in(&proxy);
    let tag = unique("senders-bdat");
    let message = short_message(ALICE, &tag, "MAIL FROM:<bob@example.test>\r\n");
    c.send(&format!("MAIL FROM:<{ALICE}>"));
    assert!(c.reply().starts_with("250 "));
    c.send(&format!("RCPT TO:<{ALICE}>"));
    assert!(c.reply().starts_with("250 "));
    c.write(format!("BDAT {} LAST\r\n", message.len()).as_bytes());
    c.write(message.as_bytes());
    let queued = c.reply();
    assert!(queued.starts_with("250 "), "{queued}\n{}", proxy.logs());
    c.send(&format!("MAIL FROM:<{BOB}>"));
    let refused = c.reply();
    assert!(refused.starts_with("550 5.7.1 "), "{refused}");
    fetch_from_dovecot(ALICE, &message_id(&tag));
}

/// A device that cannot log in, relayed by its network's `[[relay]]`
/// rule: its first MAIL was always checked; the ones after RSET are too.
#[test]
fn a_relay_rules_senders_hold_after_rset() {
    let rule = "[[relay]]\nfrom_networks = [\"127.0.0.2/32\"]\naccount = \"scanner@example.test\"\nallowed_senders = [\"*@example.test\"]\n";
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), rule));
    let mut c = Raw::connect_from(proxy.port(0), "127.0.0.2");
    c.reply();
    c.send("EHLO printer.test");
    c.reply();
    c.send(&format!("MAIL FROM:<{ALICE}>"));
    let first = c.reply();
    assert!(first.starts_with("250 "), "{first}\n{}", proxy.logs());
    c.send("RSET");
    assert!(c.reply().starts_with("250 "));
    c.send("MAIL FROM:<someone@elsewhere.test>");
    let second = c.reply();
    assert_eq!(
        second,
        "550 5.7.1 Sender not allowed to relay from this network\r\n",
        "{}",
        proxy.logs()
    );
    c.send("QUIT");
    assert!(c.reply().starts_with("221 "));
}
