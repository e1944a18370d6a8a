//! The relayed SMTP stream of an account with `rewrite_sender`, byte for
//! byte: MAIL FROM and the header block change, nothing else does.

use super::*;
use crate::wire::sender_rewrite::MAX_HEADER_BYTES;

const MAILBOX: &str = "scans@contoso.com";

fn tracker(allowed: &[&str]) -> Tracker {
    Tracker::new(Senders {
        allowed: allowed.iter().map(|a| a.to_string()).collect(),
        relay: false,
        chunking: true,
        rewrite: Some(Mailbox::parse(MAILBOX).unwrap()),
    })
}

/// What went upstream, the local replies, and whether the session was
/// ended, the device's bytes arriving `step` at a time (as a relay
/// reading a slow device sees them); a DATA is answered 354 at once.
fn run(t: &mut Tracker, input: &[u8], step: usize) -> (String, Vec<String>, bool) {
    let mut up = Vec::new();
    let mut local = Vec::new();
    let mut ahead: Vec<u8> = Vec::new();
    for piece in input.chunks(step) {
        ahead.extend_from_slice(piece);
        loop {
            match t.next(&ahead, &mut up) {
                Next::Forward { consumed, .. } => {
                    ahead.drain(..consumed);
                }
                Next::Refuse {
                    consumed, reply, ..
                } => {
                    local.push(String::from_utf8(reply.to_bytes()).unwrap());
                    ahead.drain(..consumed);
                }
                Next::Abort { consumed, reply } => {
                    local.push(String::from_utf8(reply.to_bytes()).unwrap());
                    ahead.drain(..consumed);
                    return (String::from_utf8_lossy(&up).into_owned(), local, true);
                }
                Next::AwaitReply => t.data_answered(354),
                Next::NeedMore => break,
            }
        }
    }
    assert!(
        ahead.is_empty(),
        "left: {:?}",
        String::from_utf8_lossy(&ahead)
    );
    (String::from_utf8_lossy(&up).into_owned(), local, false)
}

const MAIL: &str = "MAIL FROM:<scans@contoso.com>\r\n";

const REWRITTEN: &str = "From: \"scanner@printer.local\" <scans@contoso.com>\r\nReply-To: <scanner@printer.local>\r\nSubject: s\r\n\r\n";

#[test]
fn rewrite_sender_mail_from_becomes_the_mailbox_with_its_parameters() {
    for step in [1, 7, 4096] {
        let (up, local, _) = run(
            &mut tracker(&[]),
            b"MAIL FROM:<scanner@printer.local> BODY=8BITMIME SMTPUTF8\r\nRSET\r\nmail from:<>\r\n",
            step,
        );
        assert_eq!(
            up,
            "MAIL FROM:<scans@contoso.com> BODY=8BITMIME SMTPUTF8\r\nRSET\r\nMAIL FROM:<scans@contoso.com>\r\n"
        );
        assert!(local.is_empty(), "{local:?}");
    }
}

#[test]
fn rewrite_sender_checks_allowed_senders_before_the_rewrite() {
    let (up, local, _) = run(
        &mut tracker(&["scanner@printer.local"]),
        b"MAIL FROM:<boss@x.test>\r\nMAIL FROM:<>\r\nMAIL FROM:<scanner@printer.local>\r\n",
        4096,
    );
    assert_eq!(up, "MAIL FROM:<scans@contoso.com>\r\n");
    assert_eq!(
        local,
        ["550 5.7.1 Sender address not allowed for this login\r\n"; 2]
    );
}

#[test]
fn rewrite_sender_rewrites_the_data_header_and_leaves_the_body() {
    let message =
        b"DATA\r\nFrom: scanner@printer.local\r\nSubject: s\r\n\r\n..dot\nbare\r\n.\r\nNOOP\r\n";
    let expected = format!("DATA\r\n{REWRITTEN}..dot\r\nbare\r\n.\r\nNOOP\r\n");
    for step in [1, 3, 4096] {
        let (up, local, ended) = run(&mut tracker(&[]), message, step);
        assert_eq!(up, expected, "step {step}");
        assert!(local.is_empty() && !ended);
    }
    // The next message is rewritten too.
    let twice = [&message[..], &message[..]].concat();
    let (up, _, _) = run(&mut tracker(&[]), &twice, 5);
    assert_eq!(up, format!("{expected}{expected}"));
}

#[test]
fn rewrite_sender_refuses_a_data_header_over_the_bound_and_sends_none_of_it() {
    let mut message = b"DATA\r\nFrom: scanner@printer.local\r\n".to_vec();
    message.extend_from_slice(format!("X: {}\r\n", "a".repeat(MAX_HEADER_BYTES)).as_bytes());
    message.extend_from_slice(b"\r\nbody\r\n.\r\n");
    let (up, local, ended) = run(&mut tracker(&[]), &message, 1000);
    assert_eq!(up, "DATA\r\n", "nothing of the message went upstream");
    assert_eq!(
        local,
        ["552 5.3.4 Message header too big to rewrite its sender\r\n"]
    );
    assert!(
        ended,
        "the upstream's message is abandoned with the session"
    );
}

#[test]
fn rewrite_sender_holds_bdat_chunks_until_the_header_ends() {
    let head = "From: scanner@printer.local\r\nSubj";
    let rest = "ect: s\r\n\r\nbody\nbare\r\n";
    let input = format!(
        "MAIL FROM:<>\r\nBDAT {}\r\n{head}BDAT {} LAST\r\n{rest}",
        head.len(),
        rest.len()
    );
    let out = format!("{REWRITTEN}body\nbare\r\n");
    for step in [1, 5, 4096] {
        let (up, local, ended) = run(&mut tracker(&[]), input.as_bytes(), step);
        assert_eq!(
            up,
            format!("{MAIL}BDAT {} LAST\r\n{out}", out.len()),
            "step {step}"
        );
        assert_eq!(
            local,
            [format!("250 2.0.0 {} octets received\r\n", head.len())]
        );
        assert!(!ended);
    }
    // The header ends inside a chunk: that chunk is sent with its new
    // size, and the chunks after it pass as they are.
    let first = "From: scanner@printer.local\r\nSubject: s\r\n\r\nbody ";
    let input = format!(
        "MAIL FROM:<>\r\nBDAT {}\r\n{first}BDAT 5 LAST\r\nmore\n",
        first.len()
    );
    for step in [1, 4096] {
        let (up, local, _) = run(&mut tracker(&[]), input.as_bytes(), step);
        let sent = format!("{REWRITTEN}body ");
        assert_eq!(
            up,
            format!("{MAIL}BDAT {}\r\n{sent}BDAT 5 LAST\r\nmore\n", sent.len()),
            "step {step}"
        );
        assert!(local.is_empty());
    }
    // BDAT 0 LAST after held chunks, and a message with no body at all.
    let input = "MAIL FROM:<>\r\nBDAT 9\r\nSubject: BDAT 0 LAST\r\n";
    let (up, local, _) = run(&mut tracker(&[]), input.as_bytes(), 4096);
    // (its last line gets the line end every header line has)
    let sent = "From: <scans@contoso.com>\r\nSubject: \r\n";
    assert_eq!(up, format!("{MAIL}BDAT {} LAST\r\n{sent}", sent.len()));
    assert_eq!(local, ["250 2.0.0 9 octets received\r\n"]);
}

#[test]
fn rewrite_sender_refuses_a_bdat_header_over_the_bound() {
    let big = format!("X: {}\r\n", "a".repeat(MAX_HEADER_BYTES));
    let input = format!(
        "MAIL FROM:<>\r\nBDAT {}\r\n{big}BDAT 2 LAST\r\n\r\n",
        big.len()
    );
    let (up, local, ended) = run(&mut tracker(&[]), input.as_bytes(), 4096);
    assert_eq!(up, MAIL, "nothing of the message went upstream");
    assert_eq!(
        local,
        ["552 5.3.4 Message header too big to rewrite its sender\r\n"]
    );
    assert!(ended);
}
