//! The relayed SMTP stream with restricted senders, byte for byte.

use super::*;

fn tracker(relay: bool) -> Tracker {
    Tracker::new(Senders {
        allowed: vec!["scan@x.test".into(), "*@dev.x.test".into()],
        relay,
        chunking: true,
        rewrite: None,
    })
}

/// Run the tracker over `input` as far as it goes; what went upstream,
/// the local replies (with how many replies were owed before each), and
/// how many input bytes were left.
fn run(t: &mut Tracker, input: &[u8]) -> (String, Vec<(u32, String)>, usize) {
    let mut up = Vec::new();
    let mut local = Vec::new();
    let mut owed = 0;
    let mut rest = input;
    loop {
        match t.next(rest, &mut up) {
            Next::Forward { consumed, command } => {
                owed += command as u32;
                rest = &rest[consumed..];
            }
            Next::Refuse {
                consumed, reply, ..
            } => {
                local.push((owed, String::from_utf8(reply.to_bytes()).unwrap()));
                rest = &rest[consumed..];
            }
            Next::NeedMore | Next::AwaitReply | Next::Abort { .. } => break,
        }
    }
    (String::from_utf8_lossy(&up).into_owned(), local, rest.len())
}

const REFUSED: &str = "550 5.7.1 Sender address not allowed for this login\r\n";

#[test]
fn every_mail_of_a_pipelined_group_is_checked() {
    let mut t = tracker(false);
    let (up, local, rest) = run(
        &mut t,
        b"MAIL FROM:<scan@x.test>\r\nRSET\r\nmail from:<boss@x.test> SIZE=1\r\nRCPT TO:<a@b>\nMAIL FROM:<>\r\nMAIL FROM:<p@DEV.x.test>\r\nNOOP",
    );
    assert_eq!(
        up,
        "MAIL FROM:<scan@x.test>\r\nRSET\r\nRCPT TO:<a@b>\r\nMAIL FROM:<p@DEV.x.test>\r\n"
    );
    // Each refusal waits for the replies owed before it.
    assert_eq!(local, [(2, REFUSED.into()), (3, REFUSED.into())]);
    assert_eq!(rest, 4, "NOOP waits for its line end");
    let (_, local, _) = run(&mut tracker(true), b"MAIL FROM:<x@y>\r\n");
    assert_eq!(
        local[0].1,
        "550 5.7.1 Sender not allowed to relay from this network\r\n"
    );
}

#[test]
fn data_waits_for_354_and_its_body_is_never_commands() {
    let mut t = tracker(false);
    let (up, _, rest) = run(&mut t, b"DATA\r\nMAIL FROM:<boss@x.test>\r\n.\r\n");
    assert_eq!(up, "DATA\r\n");
    assert_eq!(rest, 28, "nothing is read until DATA is answered");
    assert!(t.awaits_data_reply());
    t.data_answered(354);
    let (up, local, rest) = run(
        &mut t,
        b"MAIL FROM:<boss@x.test>\r\n..dot\nbare\n.\nstill\r\n.\r\nMAIL FROM:<boss@x.test>\r\n",
    );
    assert_eq!(
        up, "MAIL FROM:<boss@x.test>\r\n..dot\r\nbare\r\n..\r\nstill\r\n.\r\n",
        "one end only: CRLF . CRLF; bare LFs become CRLF"
    );
    assert_eq!(local, [(1, REFUSED.into())]);
    assert_eq!(rest, 0);
    // DATA refused: what follows is commands again.
    let mut t = tracker(false);
    run(&mut t, b"DATA\r\n");
    t.data_answered(554);
    let (_, local, _) = run(&mut t, b"MAIL FROM:<boss@x.test>\r\n");
    assert_eq!(local.len(), 1);
}

#[test]
fn a_body_split_anywhere_ends_in_the_same_place() {
    let input: &[u8] = b"Subject: x\r\n\r\nMAIL FROM:<a@b>\r\n.\r\nMAIL FROM:<boss@x.test>\r\n";
    for cut in 0..input.len() {
        let mut t = tracker(false);
        run(&mut t, b"DATA\r\n");
        t.data_answered(354);
        let mut up = Vec::new();
        let mut refused = 0;
        let mut pending = Vec::new();
        for piece in [&input[..cut], &input[cut..]] {
            pending.extend_from_slice(piece);
            loop {
                match t.next(&pending, &mut up) {
                    Next::Forward { consumed, .. } => {
                        pending.drain(..consumed);
                    }
                    Next::Refuse { consumed, .. } => {
                        refused += 1;
                        pending.drain(..consumed);
                    }
                    _ => break,
                }
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&up),
            "Subject: x\r\n\r\nMAIL FROM:<a@b>\r\n.\r\n",
            "cut at {cut}"
        );
        assert_eq!(refused, 1, "cut at {cut}");
    }
}

#[test]
fn bdat_chunks_pass_untouched_whatever_they_hold() {
    let mut t = tracker(false);
    let chunk = b"MAIL FROM:<boss@x.test>\r\n\x00\xff\n.\n";
    let mut input = format!("BDAT {}\r\n", chunk.len()).into_bytes();
    input.extend_from_slice(chunk);
    input.extend_from_slice(b"BDAT 0 LAST\r\nMAIL FROM:<boss@x.test>\r\n");
    let mut up = Vec::new();
    let mut rest: &[u8] = &input;
    let mut owed = 0;
    let mut refusals = Vec::new();
    loop {
        match t.next(rest, &mut up) {
            Next::Forward { consumed, command } => {
                owed += command as u32;
                rest = &rest[consumed..];
            }
            Next::Refuse {
                consumed, sender, ..
            } => {
                refusals.push((owed, sender));
                rest = &rest[consumed..];
            }
            _ => break,
        }
    }
    let mut want = format!("BDAT {}\r\n", chunk.len()).into_bytes();
    want.extend_from_slice(chunk);
    want.extend_from_slice(b"BDAT 0 LAST\r\n");
    assert_eq!(up, want);
    assert_eq!(refusals, [(2, Some("boss@x.test".to_string()))]);
}

#[test]
fn command_lines_are_bounded() {
    let mut t = tracker(false);
    let long = vec![b'A'; MAX_COMMAND_LINE + 10];
    let (up, local, rest) = run(&mut t, &long);
    assert_eq!((up.as_str(), rest), ("", 0));
    assert_eq!(local, [(0, "500 5.5.6 Line too long\r\n".into())]);
    // The rest of the long line is dropped, then commands go on.
    let (up, local, _) = run(&mut t, b"AAAA MAIL FROM:<scan@x.test>\r\nNOOP\r\n");
    assert_eq!(up, "NOOP\r\n");
    assert!(local.is_empty());
    // A whole line over the bound, read at once.
    let mut line = b"MAIL FROM:<scan@x.test> ".to_vec();
    line.extend(vec![b'X'; MAX_COMMAND_LINE]);
    line.extend_from_slice(b"\r\n");
    let (up, local, _) = run(&mut tracker(false), &line);
    assert_eq!((up.as_str(), local.len()), ("", 1));
    // A short line without its end waits.
    assert_eq!(
        tracker(false).next(b"MAIL FROM:<s", &mut Vec::new()),
        Next::NeedMore
    );
}

#[test]
fn replies_are_counted_whole() {
    let mut r = Replies::default();
    let mut codes = Vec::new();
    r.feed(b"250-SIZE 10\r\n250-PIPE", |c| codes.push(c));
    r.feed(b"LINING\r\n250 OK\r\n354 go", |c| codes.push(c));
    assert_eq!(codes, [250]);
    r.feed(b" ahead\r\n550 5.7.1 no\r\n25", |c| codes.push(c));
    r.feed(b"0\r\n", |c| codes.push(c));
    assert_eq!(codes, [250, 354, 550, 250]);
}

/// Random bytes in random pieces, DATA answered at random: no panic, every
/// byte of input is taken or waits, and nothing is produced from nothing.
#[test]
fn random_input_never_panics() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let words: [&[u8]; 8] = [
        b"MAIL FROM:<boss@x.test>\r\n",
        b"DATA\r\n",
        b"BDAT 5\r\n",
        b"\r\n.\r\n",
        b"\n",
        b".",
        b"\x00\xff",
        b"RSET\r\n",
    ];
    for _ in 0..500 {
        let mut t = tracker(rand(2) == 0);
        let mut pending = Vec::new();
        for _ in 0..40 {
            pending.extend_from_slice(words[rand(8) as usize]);
            let mut up = Vec::new();
            loop {
                match t.next(&pending, &mut up) {
                    Next::Forward { consumed, .. }
                    | Next::Refuse { consumed, .. }
                    | Next::Abort { consumed, .. } => {
                        assert!(consumed > 0 && consumed <= pending.len());
                        pending.drain(..consumed);
                    }
                    Next::AwaitReply => {
                        t.data_answered([354, 554][rand(2) as usize]);
                    }
                    Next::NeedMore => break,
                }
            }
            assert!(pending.len() <= MAX_COMMAND_LINE + 32);
        }
    }
}

/// Lines a server reads differently from a plain split at the first space
/// never carry a MAIL past the check.
#[test]
fn a_mail_hidden_by_whitespace_or_a_malformed_bdat_is_never_passed() {
    let hostile: &[&[u8]] = &[
        b"MAIL\tFROM:<boss@evil.test>\r\n",
        b" MAIL FROM:<boss@evil.test>\r\n",
        b"\tMAIL FROM:<boss@evil.test>\r\n",
        b"MAIL FROM:<boss@evil.test>\x0b\r\n",
        b"MAIL FROM:<scan@x.test\x00>\r\n",
        // The chunk size as a server reads it is not what `parse` reads.
        b"BDAT 28 X\r\nMAIL FROM:<boss@evil.test>\r\n",
        b"BDAT +28\r\nMAIL FROM:<boss@evil.test>\r\n",
        b"BDAT 28 LAST junk\r\nMAIL FROM:<boss@evil.test>\r\n",
        b"BDAT 28 LAST\tX\r\nMAIL FROM:<boss@evil.test>\r\n",
        // A quoted local part hides the real domain behind the first '>'.
        b"MAIL FROM:<\"scan@x.test>\"@evil.test>\r\n",
        b"MAIL FROM:<scan@x.test>\"@evil.test>\r\n",
        b"MAIL FROM:<scan\\@x.test>\r\n",
    ];
    for input in hostile {
        let mut t = tracker(false);
        let (up, local, _) = run(&mut t, input);
        assert!(
            !up.to_ascii_lowercase().contains("evil") && !up.contains("MAIL"),
            "{:?} passed on {up:?}",
            String::from_utf8_lossy(input)
        );
        assert!(!local.is_empty(), "{:?}", String::from_utf8_lossy(input));
    }
    // Well-formed chunks still pass, LAST in any case.
    let mut t = tracker(false);
    let (up, local, _) = run(&mut t, b"BDAT 4 last\r\nabcdBDAT 0 LAST\r\n");
    assert_eq!(up, "BDAT 4 last\r\nabcdBDAT 0 LAST\r\n");
    assert!(local.is_empty());
}

/// Where the upstream takes no BDAT, its chunk would be read as commands:
/// BDAT is refused here and what follows is checked line by line.
#[test]
fn bdat_is_refused_where_the_upstream_has_no_chunking() {
    let mut t = Tracker::new(Senders {
        allowed: vec!["scan@x.test".into()],
        relay: false,
        chunking: false,
        rewrite: None,
    });
    let (up, local, _) = run(&mut t, b"BDAT 28\r\nMAIL FROM:<boss@evil.test>\r\n");
    assert_eq!(up, "");
    assert_eq!(local.len(), 2, "{local:?}");
}

/// The upstream's refusals are found however its replies are cut into
/// reads: one per reply (multi-line ones once, by their first line),
/// none for 2xx and 3xx, each line bounded.
#[test]
fn upstream_refusals_are_found_across_reads() {
    let stream = b"250 2.1.0 Ok\r\n550 5.7.60 SMTP; Client does not have permissions to send as this sender\r\n354 go\r\n452-4.3.1 Insufficient\r\n452 4.3.1 system resources\r\n553 5.7.1 no\n";
    for cut in [1, 2, 7, 64, stream.len()] {
        let mut watch = RefusalWatch::default();
        let mut seen = Vec::new();
        for chunk in stream.chunks(cut) {
            watch.feed(chunk, |code, line| {
                seen.push((code, String::from_utf8_lossy(line).into_owned()))
            });
        }
        assert_eq!(
            seen,
            [
                (
                    550,
                    "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
                        .to_string()
                ),
                (452, "452-4.3.1 Insufficient".to_string()),
                (553, "553 5.7.1 no".to_string()),
            ],
            "reads of {cut}"
        );
    }
    let mut watch = RefusalWatch::default();
    let mut long = b"554 ".to_vec();
    long.extend(vec![b'x'; 100_000]);
    long.extend_from_slice(b"\r\n");
    let mut lens = Vec::new();
    watch.feed(&long, |_, line| lens.push(line.len()));
    assert_eq!(lens, [MAX_REFUSAL_LINE]);
}
