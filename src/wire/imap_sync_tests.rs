use super::*;

fn apply_all(v: &mut Numbers, lines: &[&str]) -> Result<(), &'static str> {
    lines.iter().try_for_each(|l| v.apply(l.as_bytes()))
}

fn text(r: &Replay) -> String {
    String::from_utf8(r.bytes.clone()).unwrap()
}

const AT_IDLE: Telling = Telling {
    vanished: false,
    recent: true,
    may_expunge: true,
};

#[test]
fn responses_are_read() {
    assert_eq!(update(b"* 12 EXISTS"), Update::Exists(12));
    assert_eq!(update(b"* 3 expunge"), Update::Expunge(3));
    assert_eq!(update(b"* 0 RECENT"), Update::Recent(0));
    assert_eq!(
        update(b"* VANISHED 3:5,9"),
        Update::Vanished(vec![(3, 5), (9, 9)])
    );
    assert_eq!(update(b"* VANISHED (EARLIER) 3:5"), Update::Other);
    assert_eq!(update(b"* BYE Session invalidated"), Update::Bye);
    assert_eq!(
        update(b"* 4 FETCH (UID 17)"),
        Update::Fetch {
            n: 4,
            uid: Some(17),
            only_uid: true,
            items: b"(UID 17)"
        }
    );
    assert_eq!(
        update(b"* 4 FETCH (FLAGS (\\Seen \\Recent) UID 17 MODSEQ (5))"),
        Update::Fetch {
            n: 4,
            uid: Some(17),
            only_uid: false,
            items: b"(FLAGS (\\Seen \\Recent) UID 17 MODSEQ (5))"
        }
    );
    // A section with spaces and parentheses, a quoted string with a
    // bracket, and a literal whose bytes are not on the line.
    assert!(matches!(
        update(b"* 2 FETCH (BODY[HEADER.FIELDS (UID X)] \"a)\\\"\" UID 9)"),
        Update::Fetch {
            uid: Some(9),
            only_uid: false,
            ..
        }
    ));
    assert!(matches!(
        update(b"* 2 FETCH (BODY[] {120}"),
        Update::Fetch {
            uid: None,
            only_uid: false,
            ..
        }
    ));
    for other in [
        "* OK [UIDVALIDITY 3] x",
        "* SEARCH 1 2",
        "* 99999999999 EXISTS",
        "* x EXISTS",
        "a1 OK done",
        "* VANISHED 3:x",
        "",
    ] {
        assert_eq!(update(other.as_bytes()), Update::Other, "{other}");
    }
}

#[test]
fn counts_follow_exists_expunge_and_vanished() {
    let mut c = Some(5);
    for l in [
        "* 6 EXISTS",
        "* 2 EXPUNGE",
        "* VANISHED 7:8",
        "* 3 FETCH (FLAGS ())",
    ] {
        c = count_after(c, l.as_bytes());
    }
    assert_eq!(c, Some(3));
    assert_eq!(count_after(None, b"* 2 EXPUNGE"), None);
    assert_eq!(count_after(Some(1), b"* VANISHED 1:4294967295"), Some(0));
}

/// What Dovecot sent for `UID FETCH 1:* (UID)` after another session set
/// a flag, expunged two messages and appended one: the results first, in
/// the old numbering, then the flag change, the expunges and the count.
#[test]
fn a_dovecot_response_is_followed_in_stream_order() {
    let mut v = Numbers::new(6).unwrap();
    apply_all(
        &mut v,
        &[
            "* 1 FETCH (UID 1)",
            "* 2 FETCH (UID 2)",
            "* 3 FETCH (UID 3)",
            "* 4 FETCH (UID 4)",
            "* 5 FETCH (UID 5)",
            "* 6 FETCH (UID 6)",
            "* 5 FETCH (FLAGS (\\Flagged \\Recent))",
            "* 3 EXPUNGE",
            "* 2 EXPUNGE",
            "* 5 EXISTS",
            "* 3 RECENT",
        ],
    )
    .unwrap();
    assert_eq!(v.first_unknown(), Some(5));
    assert_eq!(v.highest_known(), 6);
    assert_eq!(v.uids(), Err(DISAGREE), "one UID not known yet");
    apply_all(&mut v, &["* 5 FETCH (UID 7)"]).unwrap();
    assert_eq!(v.uids(), Ok(vec![1, 4, 5, 6, 7]));
    assert_eq!(v.recent, Some(3));
    // The flag change stayed with its message (UID 5, now number 3).
    let r = reconcile(&[1, 4, 5, 6], &v, AT_IDLE).unwrap();
    assert_eq!(
        text(&r),
        "* 5 EXISTS\r\n* 3 RECENT\r\n* 3 FETCH (FLAGS (\\Flagged \\Recent))\r\n"
    );
    assert_eq!((r.expunged, r.arrived, r.flags), (0, 1, 1));
}

#[test]
fn what_cannot_be_so_is_a_disagreement() {
    let mut v = Numbers::new(3).unwrap();
    for bad in [
        "* 2 EXISTS",
        "* 4 EXPUNGE",
        "* 0 EXPUNGE",
        "* 4 FETCH (UID 9)",
        "* BYE going away",
    ] {
        assert!(v.clone().apply(bad.as_bytes()).is_err(), "{bad}");
    }
    v.apply(b"* 1 FETCH (UID 9)").unwrap();
    assert_eq!(v.apply(b"* 1 FETCH (UID 8)"), Err(DISAGREE));
    // A literal in unasked news cannot be told again.
    assert!(v.clone().apply(b"* 1 FETCH (UID 9 X-LABELS {5}").is_err());
    assert_eq!(Numbers::new(MAX_MESSAGES + 1), Err(TOO_LARGE));
    assert_eq!(
        Numbers::new(0).unwrap().apply(b"* 4000000000 EXISTS"),
        Err(TOO_LARGE)
    );
}

fn view(uids: &[u32]) -> Numbers {
    let mut v = Numbers::new(uids.len() as u32).unwrap();
    for (i, u) in uids.iter().enumerate() {
        v.apply(format!("* {} FETCH (UID {u})", i + 1).as_bytes())
            .unwrap();
    }
    v
}

#[test]
fn expunges_are_told_highest_number_first_then_arrivals() {
    let now = view(&[2, 4, 5, 8, 9]);
    let r = reconcile(&[1, 2, 3, 4, 5, 6], &now, AT_IDLE).unwrap();
    assert_eq!(
        text(&r),
        "* 6 EXPUNGE\r\n* 3 EXPUNGE\r\n* 1 EXPUNGE\r\n* 5 EXISTS\r\n"
    );
    assert_eq!((r.expunged, r.arrived, r.flags), (3, 2, 0));
    // With QRESYNC: one VANISHED, ranges compacted.
    let r = reconcile(
        &[1, 2, 3, 4, 5, 6, 7],
        &view(&[4]),
        Telling {
            vanished: true,
            ..AT_IDLE
        },
    )
    .unwrap();
    assert_eq!(text(&r), "* VANISHED 1:3,5:7\r\n");
}

#[test]
fn nothing_changed_tells_nothing() {
    let r = reconcile(&[3, 7], &view(&[3, 7]), AT_IDLE).unwrap();
    assert_eq!(r, Replay::default());
    let r = reconcile(&[], &view(&[]), AT_IDLE).unwrap();
    assert_eq!(r, Replay::default());
}

#[test]
fn expunges_wait_for_a_command_arrivals_do_not() {
    let at_rest = Telling {
        may_expunge: false,
        ..AT_IDLE
    };
    assert_eq!(
        reconcile(&[1, 2], &view(&[2]), at_rest),
        Err(Unreconciled::Later)
    );
    let r = reconcile(&[1, 2], &view(&[1, 2, 3]), at_rest).unwrap();
    assert_eq!(text(&r), "* 3 EXISTS\r\n");
    // No RECENT once IMAP4rev2 is enabled, nor when none was said.
    let mut now = view(&[1, 2, 3]);
    now.apply(b"* 1 RECENT").unwrap();
    let rev2 = Telling {
        recent: false,
        ..AT_IDLE
    };
    assert_eq!(
        text(&reconcile(&[1, 2], &now, rev2).unwrap()),
        "* 3 EXISTS\r\n"
    );
    assert_eq!(
        text(&reconcile(&[1, 2], &now, AT_IDLE).unwrap()),
        "* 3 EXISTS\r\n* 1 RECENT\r\n"
    );
}

#[test]
fn views_that_cannot_both_be_true_are_refused() {
    // A UID below the device's highest that the device never had.
    assert_eq!(
        reconcile(&[1, 5], &view(&[1, 3, 5]), AT_IDLE),
        Err(Unreconciled::Refused(DISAGREE))
    );
    // UIDs out of order on either side.
    assert_eq!(
        reconcile(&[5, 1], &view(&[1, 5]), AT_IDLE),
        Err(Unreconciled::Refused(DISAGREE))
    );
    assert_eq!(
        reconcile(&[1], &view(&[5, 1]), AT_IDLE),
        Err(Unreconciled::Refused(DISAGREE))
    );
    // A UID not known on the new side.
    assert_eq!(
        reconcile(&[1], &Numbers::new(1).unwrap(), AT_IDLE),
        Err(Unreconciled::Refused(DISAGREE))
    );
}

/// VANISHED while some UIDs are not known (an order the RFCs allow, not
/// Dovecot's): the view starts again from its new count, all to be asked.
#[test]
fn vanished_before_the_uids_are_known_starts_the_view_again() {
    let mut v = Numbers::new(5).unwrap();
    apply_all(
        &mut v,
        &[
            "* 1 FETCH (UID 3)",
            "* 1 FETCH (FLAGS (\\Seen))",
            "* VANISHED 4:5",
        ],
    )
    .unwrap();
    assert_eq!(v.count(), 3);
    assert_eq!(v.first_unknown(), Some(1));
    assert_eq!(v.highest_known(), 0);
    apply_all(
        &mut v,
        &[
            "* 1 FETCH (UID 3)",
            "* 2 FETCH (UID 6)",
            "* 3 FETCH (UID 7)",
        ],
    )
    .unwrap();
    let r = reconcile(&[3, 4, 5, 6], &v, AT_IDLE).unwrap();
    assert_eq!(text(&r), "* 3 EXPUNGE\r\n* 2 EXPUNGE\r\n* 3 EXISTS\r\n");
}

/// A large scattered VANISHED is applied in one pass, not per range.
#[test]
fn a_large_vanished_is_cheap() {
    let uids: Vec<u32> = (1..=200_000).collect();
    let mut v = Numbers::new(0).unwrap();
    v.uids = uids.clone();
    let set: Vec<String> = (1..=100_000).map(|k| (k * 2).to_string()).collect();
    let line = format!("* VANISHED {}", set.join(","));
    let start = std::time::Instant::now();
    v.apply(line.as_bytes()).unwrap();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(v.count(), 100_000);
    assert_eq!(v.uids().unwrap()[..3], [1, 3, 5]);
}

/// News of a message is kept by its UID: an expunge before it is told
/// moves it to its new number; news of a message not yet known is left
/// out (the device hears of it as an arrival).
#[test]
fn news_follows_its_message() {
    let mut v = view(&[1, 2, 3]);
    apply_all(
        &mut v,
        &[
            "* 3 FETCH (FLAGS (\\Seen))",
            "* 4 EXISTS",
            "* 4 FETCH (FLAGS (\\Flagged))",
            "* 1 EXPUNGE",
            "* 3 FETCH (UID 8)",
        ],
    )
    .unwrap();
    let r = reconcile(&[1, 2, 3], &v, AT_IDLE).unwrap();
    assert_eq!(
        text(&r),
        "* 1 EXPUNGE\r\n* 3 EXISTS\r\n* 2 FETCH (FLAGS (\\Seen))\r\n"
    );
    assert_eq!((r.expunged, r.arrived, r.flags), (1, 1, 1));
}

/// A device that applies what it is told ends with the new view: the
/// numbers of every expunge are right at the moment each one is read.
#[test]
fn a_device_that_applies_the_replay_has_the_new_view() {
    let mut seed = 7u64;
    let mut next = move |m: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % m
    };
    for _ in 0..500 {
        let device: Vec<u32> = (1..=40u32).filter(|_| next(3) > 0).collect();
        let mut now: Vec<u32> = device.iter().copied().filter(|_| next(4) > 0).collect();
        let top = device.last().copied().unwrap_or(0);
        now.extend((1..=next(5) as u32).map(|k| top + k * 2));
        let r = reconcile(&device, &view(&now), AT_IDLE).unwrap();
        let mut model: Vec<Option<u32>> = device.iter().map(|u| Some(*u)).collect();
        for line in text(&r).lines() {
            match update(line.as_bytes()) {
                Update::Expunge(k) => {
                    model.remove(k as usize - 1);
                }
                Update::Exists(k) => model.resize(k as usize, None),
                other => panic!("{other:?}"),
            }
        }
        let known: Vec<u32> = model.iter().flatten().copied().collect();
        assert_eq!(model.len(), now.len());
        assert_eq!(known, now[..known.len()].to_vec());
    }
}
