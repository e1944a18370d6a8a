//! The spooling dialogue, byte for byte.

use super::*;

fn intake() -> Intake {
    Intake::new(
        "proxy.test".into(),
        vec!["SIZE 1000".into(), "8BITMIME".into()],
        Rules {
            max_bytes: 1000,
            max_recipients: 2,
            allowed_senders: vec!["scan@contoso.test".into(), "*@scans.test".into()],
        },
    )
}

fn show(step: &Step) -> (String, String) {
    let then = match &step.then {
        Then::Read => "read".to_string(),
        Then::ReadData { max } => format!("data {max}"),
        Then::ReadChunk { size, keep } => format!("chunk {size} {keep}"),
        Then::Store(s) => format!("store {} -> {:?} {:?}", s.sender, s.recipients, s.params),
        Then::Close(why) => format!("close: {why}"),
    };
    (String::from_utf8_lossy(&step.reply).into_owned(), then)
}

fn line(i: &mut Intake, l: &str) -> (String, String) {
    show(&i.on(Input::Line(l.as_bytes())))
}

fn pair(reply: &str, then: &str) -> (String, String) {
    (reply.to_string(), then.to_string())
}

#[test]
fn a_message_by_data_is_stored_then_acknowledged_with_its_id() {
    let mut i = intake();
    assert_eq!(
        line(&mut i, "EHLO printer"),
        pair(
            "250-proxy.test Hello printer\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250 AUTH=PLAIN LOGIN\r\n",
            "read"
        )
    );
    assert_eq!(
        line(
            &mut i,
            "MAIL FROM:<Scan@Contoso.test> BODY=8BITMIME SIZE=500"
        ),
        pair("250 2.1.0 Sender OK\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "RCPT TO:<a@b.test>"),
        pair("250 2.1.5 Recipient OK\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "DATA"),
        pair("354 End data with <CR><LF>.<CR><LF>\r\n", "data 1000")
    );
    assert_eq!(
        show(&i.on(Input::DataEnd { too_big: false })),
        pair(
            "",
            "store Scan@Contoso.test -> [\"a@b.test\"] [\"BODY=8BITMIME\"]"
        )
    );
    assert_eq!(
        show(&i.on(Input::Stored(Ok("19ade7c3f10ab12")))),
        pair("250 2.0.0 Ok: queued as 19ade7c3f10ab12\r\n", "read")
    );
    // The transaction is over: a new one starts with MAIL.
    assert_eq!(
        line(&mut i, "RCPT TO:<a@b.test>"),
        pair("503 5.5.1 Send MAIL first\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "QUIT"),
        pair("221 2.0.0 Bye\r\n", "close: quit")
    );
}

#[test]
fn what_can_be_decided_here_is_refused_at_once() {
    let mut i = intake();
    assert_eq!(
        line(&mut i, "MAIL FROM:<boss@contoso.test>"),
        pair(
            "550 5.7.1 Sender address not allowed for this login\r\n",
            "read"
        )
    );
    assert_eq!(
        line(&mut i, "MAIL FROM:<a@scans.test> SIZE=1001"),
        pair(
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
            "read"
        )
    );
    assert_eq!(
        line(&mut i, "MAIL FROM:<a@scans.test> XFOO=1"),
        pair("555 5.5.4 Unsupported MAIL or RCPT parameter\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "DATA"),
        pair("503 5.5.1 Send MAIL first\r\n", "read")
    );
    // The null sender is outside allowed_senders like any other.
    assert_eq!(
        line(&mut i, "MAIL FROM:<>"),
        pair(
            "550 5.7.1 Sender address not allowed for this login\r\n",
            "read"
        )
    );
    assert_eq!(
        line(&mut i, "MAIL FROM:<a@scans.test>"),
        pair("250 2.1.0 Sender OK\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "MAIL FROM:<a@scans.test>"),
        pair("503 5.5.1 Sender already given\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "DATA"),
        pair("554 5.5.1 No valid recipients\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "RCPT TO:<postmaster>"),
        pair("501 5.1.3 Bad recipient address syntax\r\n", "read")
    );
    for r in ["a@b.test", "c@d.test"] {
        line(&mut i, &format!("RCPT TO:<{r}>"));
    }
    assert_eq!(
        line(&mut i, "RCPT TO:<e@f.test>"),
        pair("452 4.5.3 Too many recipients\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "DATA"),
        pair("354 End data with <CR><LF>.<CR><LF>\r\n", "data 1000")
    );
    assert_eq!(
        show(&i.on(Input::DataEnd { too_big: true })),
        pair(
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
            "read"
        )
    );
    assert_eq!(
        show(&i.on(Input::Stored(Err(())))),
        pair(
            "451 4.3.0 Could not store the message, try again later\r\n",
            "read"
        )
    );
    assert_eq!(
        line(&mut i, "AUTH PLAIN AGEAYg=="),
        pair("503 5.5.1 Already authenticated\r\n", "read")
    );
}

#[test]
fn bdat_chunks_are_kept_until_the_last_and_dropped_without_a_transaction() {
    let mut i = intake();
    assert_eq!(line(&mut i, "BDAT 5 LAST"), pair("", "chunk 5 false"));
    assert!(!i.chunking());
    assert_eq!(
        show(&i.on(Input::Chunk)),
        pair("503 5.5.1 Send MAIL first\r\n", "read")
    );
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RCPT TO:<a@b.test>");
    assert_eq!(line(&mut i, "BDAT 10"), pair("", "chunk 10 true"));
    assert!(i.chunking());
    assert_eq!(
        show(&i.on(Input::Chunk)),
        pair("250 2.0.0 10 octets received\r\n", "read")
    );
    assert_eq!(
        line(&mut i, "DATA"),
        pair("503 5.5.1 Sender already given\r\n", "read")
    );
    assert_eq!(line(&mut i, "BDAT 3 last"), pair("", "chunk 3 true"));
    assert_eq!(
        show(&i.on(Input::Chunk)),
        pair("", "store scan@contoso.test -> [\"a@b.test\"] []")
    );
    // Too big: the chunk is dropped, the message refused at its end.
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RCPT TO:<a@b.test>");
    assert_eq!(line(&mut i, "BDAT 2000 LAST"), pair("", "chunk 2000 false"));
    assert_eq!(
        show(&i.on(Input::Chunk)),
        pair(
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
            "read"
        )
    );
}

#[test]
fn the_null_sender_passes_only_without_allowed_senders() {
    let mut open = Intake::new(
        "proxy.test".into(),
        vec![],
        Rules {
            max_bytes: 1000,
            max_recipients: 2,
            allowed_senders: vec![],
        },
    );
    assert_eq!(
        line(&mut open, "MAIL FROM:<>"),
        pair("250 2.1.0 Sender OK\r\n", "read")
    );
    let mut i = intake();
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RSET");
    assert_eq!(
        line(&mut i, "MAIL FROM:<>"),
        pair(
            "550 5.7.1 Sender address not allowed for this login\r\n",
            "read"
        )
    );
}

#[test]
fn a_chunk_not_stored_fails_its_transaction_until_rset_or_mail() {
    const NOT_STORED: &str = "451 4.3.0 Could not store the message, try again later\r\n";
    let mut i = intake();
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RCPT TO:<a@b.test>");
    assert_eq!(line(&mut i, "BDAT 10"), pair("", "chunk 10 true"));
    assert_eq!(show(&i.on(Input::ChunkNotStored)), pair(NOT_STORED, "read"));
    // Later chunks are read and dropped, every one refused.
    assert_eq!(line(&mut i, "BDAT 4"), pair("", "chunk 4 false"));
    assert_eq!(show(&i.on(Input::Chunk)), pair(NOT_STORED, "read"));
    assert_eq!(line(&mut i, "RCPT TO:<c@d.test>"), pair(NOT_STORED, "read"));
    assert_eq!(line(&mut i, "DATA"), pair(NOT_STORED, "read"));
    assert_eq!(line(&mut i, "BDAT 3 LAST"), pair("", "chunk 3 false"));
    assert_eq!(show(&i.on(Input::Chunk)), pair(NOT_STORED, "read"));
    // The last chunk ended it: a new transaction starts with MAIL.
    assert_eq!(
        line(&mut i, "RCPT TO:<a@b.test>"),
        pair("503 5.5.1 Send MAIL first\r\n", "read")
    );
    // A new MAIL also ends a failed transaction.
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RCPT TO:<a@b.test>");
    line(&mut i, "BDAT 10");
    i.on(Input::ChunkNotStored);
    assert_eq!(
        line(&mut i, "MAIL FROM:<scan@contoso.test>"),
        pair("250 2.1.0 Sender OK\r\n", "read")
    );
    line(&mut i, "RCPT TO:<a@b.test>");
    assert_eq!(line(&mut i, "BDAT 5 LAST"), pair("", "chunk 5 true"));
    assert_eq!(
        show(&i.on(Input::Chunk)),
        pair("", "store scan@contoso.test -> [\"a@b.test\"] []")
    );
    // A failed last chunk ends its transaction at once.
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RCPT TO:<a@b.test>");
    line(&mut i, "BDAT 5 LAST");
    assert_eq!(show(&i.on(Input::ChunkNotStored)), pair(NOT_STORED, "read"));
    assert!(!i.chunking());
    assert_eq!(
        line(&mut i, "RCPT TO:<a@b.test>"),
        pair("503 5.5.1 Send MAIL first\r\n", "read")
    );
}

#[test]
fn errors_timeouts_and_shutdown_end_the_session_in_smtp() {
    let mut i = intake();
    for _ in 0..MAX_ERRORS - 1 {
        assert_eq!(
            line(&mut i, "XYZZY"),
            pair("500 5.5.2 Command unrecognized\r\n", "read")
        );
    }
    assert_eq!(
        line(&mut i, "XYZZY"),
        pair(
            "421 4.7.0 Too many errors, closing connection\r\n",
            "close: too many errors"
        )
    );
    assert_eq!(
        show(&intake().on(Input::Timeout)),
        pair(
            "421 4.4.2 Timeout waiting for a command, closing connection\r\n",
            "close: idle timeout"
        )
    );
    assert_eq!(
        show(&intake().on(Input::Shutdown)),
        pair(
            "421 4.3.2 Service shutting down, try again later\r\n",
            "close: shutdown"
        )
    );
}

#[test]
fn control_bytes_in_a_sender_or_recipient_are_refused() {
    let mut open = Intake::new(
        "proxy.test".into(),
        vec![],
        Rules {
            max_bytes: 1000,
            max_recipients: 2,
            allowed_senders: vec![],
        },
    );
    for sender in [
        "MAIL FROM:<a\u{1}b@x.test>",
        "MAIL FROM:<a@x.test\0>",
        "MAIL FROM:<a\tb@x.test>",
    ] {
        assert_eq!(
            line(&mut open, sender),
            pair("501 5.1.7 Bad sender address syntax\r\n", "read"),
            "{sender:?}"
        );
    }
    line(&mut open, "MAIL FROM:<a@x.test>");
    for rcpt in ["RCPT TO:<c\u{1}x=y@d.test>", "RCPT TO:<c@d.test\u{7f}>"] {
        assert_eq!(
            line(&mut open, rcpt),
            pair("501 5.1.3 Bad recipient address syntax\r\n", "read"),
            "{rcpt:?}"
        );
    }
}

const HEADER_TOO_BIG: &str = "552 5.3.4 Message header too big to rewrite its sender\r\n";

#[test]
fn rewrite_sender_stores_the_mailbox_after_the_allowed_check() {
    let mut i = intake();
    i.rewrite_sender(Mailbox::parse("scans@contoso.com").unwrap());
    assert_eq!(
        line(&mut i, "MAIL FROM:<boss@x.test>"),
        pair(
            "550 5.7.1 Sender address not allowed for this login\r\n",
            "read"
        ),
        "allowed_senders reads the device's own sender"
    );
    line(&mut i, "MAIL FROM:<scan@contoso.test> BODY=8BITMIME");
    line(&mut i, "RCPT TO:<a@b.test>");
    line(&mut i, "DATA");
    assert_eq!(
        show(&i.on(Input::DataEnd { too_big: false })),
        pair(
            "",
            "store scans@contoso.com -> [\"a@b.test\"] [\"BODY=8BITMIME\"]"
        )
    );
}

#[test]
fn rewrite_sender_refuses_a_header_block_too_big_and_stores_nothing() {
    let mut i = intake();
    i.rewrite_sender(Mailbox::parse("scans@contoso.com").unwrap());
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RCPT TO:<a@b.test>");
    line(&mut i, "DATA");
    assert_eq!(
        show(&i.on(Input::HeaderTooBig)),
        pair(HEADER_TOO_BIG, "read")
    );
    // In chunks: the chunk that overflowed and every later one of the
    // message are answered 552; the next message is taken again.
    line(&mut i, "MAIL FROM:<scan@contoso.test>");
    line(&mut i, "RCPT TO:<a@b.test>");
    assert_eq!(line(&mut i, "BDAT 10"), pair("", "chunk 10 true"));
    assert_eq!(
        show(&i.on(Input::HeaderTooBig)),
        pair(HEADER_TOO_BIG, "read")
    );
    assert_eq!(line(&mut i, "BDAT 5 LAST"), pair("", "chunk 5 false"));
    assert_eq!(show(&i.on(Input::Chunk)), pair(HEADER_TOO_BIG, "read"));
    assert_eq!(
        line(&mut i, "MAIL FROM:<scan@contoso.test>"),
        pair("250 2.1.0 Sender OK\r\n", "read")
    );
}
