use super::*;
use crate::wire::imap_frame::Framer;

fn unit(head: &str) -> Unit {
    Unit {
        head: head.as_bytes().to_vec(),
        ..Unit::default()
    }
}

#[test]
fn select_idle_and_enable_are_followed() {
    let mut v = View::default();
    v.command(&unit("e ENABLE CONDSTORE"));
    v.response(&unit("* ENABLED CONDSTORE"));
    v.response(&unit("e OK Enabled"));
    v.command(&unit("s SELECT \"Sent Items\" (CONDSTORE)"));
    assert_eq!(v.quiet(), None);
    v.response(&unit("* OK [UIDVALIDITY 1700000001] UIDs valid"));
    v.response(&unit("s OK [READ-WRITE] Select completed"));
    assert_eq!(v.enabled, vec!["CONDSTORE"]);
    let s = v.selected.clone().unwrap();
    assert_eq!(s.mailbox, b"Sent Items");
    assert!(s.condstore && !s.examine);
    assert_eq!(s.uidvalidity, Some(1700000001));
    assert_eq!(v.quiet(), Some(None));
    v.command(&unit("i IDLE"));
    assert_eq!(v.quiet(), None, "no + yet");
    v.response(&unit("+ idling"));
    assert_eq!(v.quiet(), Some(Some("i")));
    assert_eq!(v.response(&unit("* 5 EXISTS")), Seen::Other);
    assert_eq!(v.response(&unit("* 3 EXPUNGE")), Seen::Other);
    v.command(&unit("DONE"));
    assert_eq!(v.quiet(), None, "DONE sent");
    v.response(&unit("i OK Idle completed"));
    assert_eq!(v.quiet(), Some(None));
    v.command(&unit("x EXAMINE INBOX"));
    v.response(&unit("x NO [NONEXISTENT] no"));
    assert_eq!(v.selected, None);
}

/// ENABLE is followed by what the server says it enabled, not by what
/// was asked: Dovecot 2.3 answers `e OK` to `ENABLE IMAP4rev2 QRESYNC`
/// with `* ENABLED QRESYNC` only, and to an unknown name with nothing.
#[test]
fn enable_keeps_what_the_server_granted() {
    let mut v = View::default();
    v.command(&unit("e ENABLE IMAP4rev2 QRESYNC"));
    v.response(&unit("* ENABLED QRESYNC"));
    v.response(&unit("e OK Enabled"));
    assert_eq!(v.enabled, vec!["QRESYNC"]);
    v.command(&unit("f ENABLE FOOBAR"));
    v.response(&unit("f OK Enabled"));
    assert_eq!(v.enabled, vec!["QRESYNC"]);
    // A name the device did not ask for is not taken either.
    v.command(&unit("g ENABLE UTF8=ACCEPT"));
    v.response(&unit("* ENABLED UTF8=ACCEPT CONDSTORE"));
    v.response(&unit("g OK Enabled"));
    assert_eq!(v.enabled, vec!["QRESYNC", "UTF8=ACCEPT"]);
}

#[test]
fn lines_without_a_tag_are_not_in_flight() {
    let mut v = View::default();
    for line in ["", " ", "a{b NOOP", "+ NOOP", "\u{1}x NOOP"] {
        v.command(&unit(line));
        assert_eq!(v.quiet(), Some(None), "{line:?}");
    }
    assert_eq!(v.response(&unit("* BAD Error in IMAP tag")), Seen::Bad);
    v.command(&unit("DONE"));
    assert_eq!(v.quiet(), None, "a tag, answered with a tag");
    v.response(&unit("DONE BAD Unknown command"));
    assert_eq!(v.quiet(), Some(None));
}

/// A device's stream through the framer and the view, as the relay
/// feeds them.
fn device_sends(f: &mut Framer, v: &mut View, data: &[u8]) {
    let mut at = 0;
    while at < data.len() {
        let (n, unit) = f.feed(&data[at..]);
        at += n;
        match unit {
            Some(u) => v.command(&u),
            None => {
                if let Some(head) = f.awaits_literal() {
                    v.literal_announced(head);
                }
            }
        }
    }
}

#[test]
fn a_refused_literal_ends_its_command() {
    let (mut f, mut v) = (Framer::default(), View::default());
    device_sends(&mut f, &mut v, b"n0 NOOP\r\nl APPEND Nowhere {5}\r\n");
    assert_eq!(f.awaits_literal(), Some(&b"l APPEND Nowhere {5}"[..]));
    assert!(!f.at_boundary());
    assert_eq!(v.quiet(), None);
    assert_eq!(v.response(&unit("n0 OK NOOP completed")), Seen::Other);
    assert_eq!(
        v.response(&unit("l NO [TRYCREATE] Mailbox doesn't exist")),
        Seen::LiteralRefused
    );
    f.cancel_literal();
    assert!(f.at_boundary());
    assert_eq!(v.quiet(), Some(None));
    device_sends(&mut f, &mut v, b"n NOOP\r\n");
    assert_eq!(v.quiet(), None);
    v.response(&unit("n OK NOOP completed"));
    assert_eq!(v.quiet(), Some(None));
}

#[test]
fn an_accepted_literal_is_followed_to_its_end() {
    let (mut f, mut v) = (Framer::default(), View::default());
    device_sends(&mut f, &mut v, b"s SELECT {5}\r\n");
    assert!(f.awaits_literal().is_some());
    assert_eq!(v.response(&unit("+ OK")), Seen::Other);
    assert_eq!(v.unmovable, None);
    device_sends(&mut f, &mut v, b"INBOX\r\n");
    assert!(f.at_boundary());
    assert_eq!(f.awaits_literal(), None);
    assert_eq!(v.unmovable, Some("mailbox name not kept"));
    // LITERAL+ never waits.
    let (mut f, mut v) = (Framer::default(), View::default());
    device_sends(&mut f, &mut v, b"a APPEND INBOX {3+}\r\n");
    assert_eq!(f.awaits_literal(), None);
    device_sends(&mut f, &mut v, b"abc\r\n");
    assert_eq!(v.quiet(), None);
    v.response(&unit("a OK appended"));
    assert_eq!(v.quiet(), Some(None));
}

#[test]
fn a_literal_after_a_bad_tag_is_refused_untagged() {
    let (mut f, mut v) = (Framer::default(), View::default());
    device_sends(&mut f, &mut v, b"a{b APPEND INBOX {5}\r\n");
    assert_eq!(v.quiet(), None);
    assert_eq!(
        v.response(&unit("* BAD Error in IMAP tag")),
        Seen::LiteralRefused
    );
    f.cancel_literal();
    assert_eq!(v.quiet(), Some(None));
}

#[test]
fn what_cannot_be_moved_is_said() {
    let mut v = View::default();
    v.command(&Unit {
        head: b"s SELECT {5}".to_vec(),
        literal: true,
        ..Unit::default()
    });
    assert_eq!(v.unmovable, Some("mailbox name not kept"));
    assert_eq!(v.quiet(), None);
    let mut v = View::default();
    v.command(&unit("c COMPRESS DEFLATE"));
    assert_eq!(v.unmovable, Some("COMPRESS"));
    let mut v = View::default();
    for i in 0..=MAX_IN_FLIGHT {
        v.command(&unit(&format!("n{i} NOOP")));
    }
    assert_eq!(v.unmovable, Some("too many commands in flight"));
}

#[test]
fn responses_are_classified() {
    let mut v = View::default();
    assert_eq!(
        v.response(&unit("* BYE Session invalidated - AccessTokenExpired")),
        Seen::Bye { expired: true }
    );
    assert_eq!(
        v.response(&unit("* BYE Logging out")),
        Seen::Bye { expired: false }
    );
    assert_eq!(uidvalidity(b"* OK [UIDVALIDITY 42] ok"), Some(42));
    assert_eq!(uidvalidity(b"* OK [UIDNEXT 42] ok"), None);
}

#[test]
fn moves_wait_for_commands_that_may_carry_expunges() {
    for line in [
        "a NOOP\r\n",
        "a1 idle\r\n",
        "b CHECK\r\n",
        "c SELECT INBOX\r\n",
        "c EXAMINE \"Sent Items\"\r\n",
        "s STATUS INBOX (MESSAGES)\r\n",
        "l LIST \"\" *\r\n",
        "u UID FETCH 1:* (FLAGS)\r\n",
        "u uid store 7 +FLAGS (\\Seen)\r\n",
        "u UID EXPUNGE 4:5\r\n",
        "u UID SEARCH UNSEEN\r\n",
        "u UID SEARCH UID 5:* LARGER 100\r\n",
        "x EXPUNGE\n",
    ] {
        assert_eq!(next_command(line.as_bytes()), Next::MovePoint, "{line:?}");
    }
    for line in [
        "f FETCH 3 (FLAGS)\r\n",
        "s STORE 1 +FLAGS (\\Deleted)\r\n",
        "s SEARCH ALL\r\n",
        "c COPY 2 Trash\r\n",
        "u UID SEARCH 1:5\r\n",
        "u UID SEARCH (OR 3 UID 9)\r\n",
        "a APPEND INBOX {12}\r\n",
        "s SELECT {5+}\r\n",
        "DONE\r\n",
        "+x NOOP\r\n",
        "NOOP\r\n",
        "\r\n",
    ] {
        assert_eq!(next_command(line.as_bytes()), Next::Other, "{line:?}");
    }
    assert_eq!(next_command(b""), Next::Incomplete);
    assert_eq!(next_command(b"a NOO"), Next::Incomplete);
    assert_eq!(next_command(&vec![b'a'; 9000]), Next::Other);
}

#[test]
fn the_message_count_is_followed() {
    let mut v = View::default();
    v.command(&unit("s SELECT INBOX"));
    v.response(&unit("* 4 EXISTS"));
    v.response(&unit("s OK selected"));
    assert_eq!(v.count, Some(4));
    v.response(&unit("* 2 EXPUNGE"));
    v.response(&unit("* 6 EXISTS"));
    v.response(&unit("* VANISHED 8:9"));
    assert_eq!(v.count, Some(4));
    v.command(&unit("c CLOSE"));
    v.response(&unit("c OK closed"));
    assert_eq!(v.count, None);
}
