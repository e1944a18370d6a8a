//! Moves on a mailbox that other sessions change, with 16-second tokens:
//! a device at rest when its move finds a message gone stays on the old
//! connection, and is told at its next command that may carry expunges,
//! in the form it enabled (`VANISHED` with QRESYNC); its message numbers
//! are the server's afterwards.

use std::time::{Duration, Instant};

use crate::continuity_moves::{last, logged_in, short_token_proxy, LIFETIME};
use crate::harness::*;

/// A folder of Alice's with three small messages, through a session of
/// its own; returns its name.
fn three_messages(port: u16) -> String {
    let name = unique("reconcile");
    let mut c = Raw::connect(port);
    c.line();
    assert!(c
        .imap_login(ALICE, &upstream().password(ALICE))
        .contains("a OK"));
    c.send(&format!("c CREATE \"{name}\""));
    assert!(last(&c.until("c ")).starts_with("c OK"));
    for i in 0..3 {
        let m = format!("Subject: {i}\r\n\r\nbody {i}\r\n");
        c.write(format!("p APPEND \"{name}\" {{{}+}}\r\n{m}\r\n", m.len()).as_bytes());
        assert!(last(&c.until("p ")).starts_with("p OK"));
    }
    c.send("z LOGOUT");
    c.until("z ");
    name
}

/// Another session of Alice's: message `n` of `folder` expunged.
fn expunge(port: u16, folder: &str, n: u32) {
    let mut e = Raw::connect(port);
    e.line();
    assert!(e
        .imap_login(ALICE, &upstream().password(ALICE))
        .contains("a OK"));
    e.send(&format!("s SELECT \"{folder}\""));
    e.until("s ");
    e.send(&format!("d STORE {n} +FLAGS.SILENT (\\Deleted)"));
    assert!(last(&e.until("d ")).starts_with("d OK"));
    e.send("x EXPUNGE");
    assert!(last(&e.until("x ")).starts_with("x OK"));
    e.send("z LOGOUT");
    e.until("z ");
}

/// A device with QRESYNC enabled sits at rest while another session
/// expunges its message 2 before the move: the move waits; the device's
/// IDLE is where it happens, and before the `+` comes `* VANISHED 2`,
/// never an EXPUNGE. Afterwards UIDs 1 and 3 are messages 1 and 2.
#[test]
fn a_qresync_device_is_told_vanished_at_the_idle_where_it_moves() {
    let proxy = short_token_proxy();
    let port = proxy.port(0);
    let folder = three_messages(port);
    let (mut c, login) = logged_in(&proxy, ALICE, &upstream().password(ALICE));
    c.send("e ENABLE QRESYNC");
    assert!(last(&c.until("e ")).starts_with("e OK"));
    c.send(&format!("s SELECT \"{folder}\""));
    assert!(last(&c.until("s ")).starts_with("s OK"));
    // Before the new login (due at three quarters of the lifetime).
    let before = login + LIFETIME * 3 / 4 - Duration::from_secs(2);
    std::thread::sleep(before.saturating_duration_since(Instant::now()));
    expunge(port, &folder, 2);
    proxy.wait_log(&["IMAP session move waits for the device's next command"]);
    assert!(Instant::now() < login + LIFETIME);
    c.send("i IDLE");
    let mut told = Vec::new();
    loop {
        let line = c.line();
        if line.starts_with('+') {
            break;
        }
        assert!(
            !line.contains("EXPUNGE") && !line.starts_with("i "),
            "{line}"
        );
        told.push(line);
    }
    assert!(told.contains(&"* VANISHED 2\r\n".to_string()), "{told:?}");
    proxy.wait_log(&["IMAP session moved to a new upstream login"]);
    c.send("DONE");
    assert!(last(&c.until("i ")).starts_with("i OK"));
    // Past the old token's expiry: the new connection answers.
    std::thread::sleep(
        (login + LIFETIME + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    c.send("u FETCH 1:* (UID)");
    let uids = c.until("u ");
    assert!(
        uids.starts_with("* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 3)\r\nu OK"),
        "{uids}\n{}",
        proxy.logs()
    );
    c.send("z LOGOUT");
    c.until("z ");
    let m = scrape(proxy.admin_addr());
    assert_eq!(value(&m, "oxbridge_imap_swaps_total", &[]), 1.0);
    assert_eq!(value(&m, "oxbridge_imap_swap_refusals_total", &[]), 0.0);
    assert_eq!(
        value(&m, "oxbridge_imap_reconciled_total", &[("kind", "expunge")]),
        1.0
    );
}

/// Without QRESYNC, at a UID FETCH: a device at rest, its message 1
/// expunged and one message appended by another session before the move;
/// the device's `UID FETCH` is where it moves, and its answer begins with
/// `* 1 EXPUNGE` (and the arrival, as the old connection or the move
/// tells it); the UIDs the FETCH returns are then under the right
/// numbers.
#[test]
fn a_device_at_rest_is_told_at_its_uid_fetch_where_it_moves() {
    let proxy = short_token_proxy();
    let port = proxy.port(0);
    let folder = three_messages(port);
    let (mut c, login) = logged_in(&proxy, ALICE, &upstream().password(ALICE));
    c.send(&format!("s SELECT \"{folder}\""));
    assert!(last(&c.until("s ")).starts_with("s OK"));
    let before = login + LIFETIME * 3 / 4 - Duration::from_secs(2);
    std::thread::sleep(before.saturating_duration_since(Instant::now()));
    expunge(port, &folder, 1);
    let mut p = Raw::connect(port);
    p.line();
    assert!(p
        .imap_login(ALICE, &upstream().password(ALICE))
        .contains("a OK"));
    let m = "Subject: new\r\n\r\nnew\r\n";
    p.write(format!("p APPEND \"{folder}\" {{{}+}}\r\n{m}\r\n", m.len()).as_bytes());
    assert!(last(&p.until("p ")).starts_with("p OK"));
    proxy.wait_log(&["IMAP session move waits for the device's next command"]);
    // At rest, the old connection's news came: the arrival, never the
    // expunge.
    c.send("f UID FETCH 1:* (UID)");
    let answer = c.until("f ");
    assert!(
        !answer.contains("* 2 EXPUNGE") && !answer.contains("* 3 EXPUNGE"),
        "{answer}"
    );
    let after = answer.split_once("* 1 EXPUNGE\r\n").map(|(_, a)| a);
    let after = after.unwrap_or_else(|| panic!("{answer}\n{}", proxy.logs()));
    assert!(
        after.contains("* 1 FETCH (UID 2)\r\n* 2 FETCH (UID 3)\r\n* 3 FETCH (UID 4)\r\n"),
        "{answer}"
    );
    proxy.wait_log(&["IMAP session moved to a new upstream login"]);
    std::thread::sleep(
        (login + LIFETIME + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    c.send("n NOOP");
    assert!(last(&c.until("n ")).starts_with("n OK"), "{}", proxy.logs());
    c.send("z LOGOUT");
    c.until("z ");
    assert_eq!(metric(&proxy, "oxbridge_imap_swaps_total"), 1.0);
}
