//! Moving an IMAP session onto a new upstream login, at its edges, with
//! 16-second tokens so that a move is due 12 s after the login: commands
//! the upstream answers without a tag (a blank line) or whose literal it
//! refuses never hold the device.

use std::time::{Duration, Instant};

use crate::harness::*;

/// The tokens' lifetime here (the identity provider's `ttl-16` tenant):
/// the new login starts 4 s before expiry, the BYE comes about 1 s before.
const LIFETIME: Duration = Duration::from_secs(16);
/// How long a held device may wait for an answer during a move.
const ANSWER_LIMIT: Duration = Duration::from_secs(3);

/// A proxy with one plain IMAP listener whose upstream is the
/// Exchange-like front and whose tokens live [`LIFETIME`].
fn short_token_proxy() -> Proxy {
    Proxy::start(&short_token_config())
}

fn short_token_config() -> String {
    let up = upstream();
    let cfg = config(&plain_listeners(&["imap"]), ADMIN);
    let cfg = reroute(
        &cfg,
        "imap",
        &format!("localhost:{}", up.get("EXPIRY_IMAPS_PORT")),
    );
    let url = up
        .token_url()
        .replace("/common/", &format!("/ttl-{}/", LIFETIME.as_secs()));
    with_token_url(&cfg, &url)
}

/// A logged-in IMAP connection as `user`; when its login was answered.
fn logged_in(proxy: &Proxy, user: &str, password: &str) -> (Raw, Instant) {
    let mut c = Raw::connect(proxy.port(0));
    c.line();
    let reply = c.imap_login(user, password);
    assert!(
        last(&reply).starts_with("a OK"),
        "{reply}\n{}",
        proxy.logs()
    );
    (c, Instant::now())
}

fn last(reply: &str) -> &str {
    reply.lines().last().unwrap_or("")
}

/// Wait until the new upstream login of a move is ready (the device is
/// held from then until the move is done).
fn wait_renewed(proxy: &Proxy, login: Instant) {
    let due = login + LIFETIME - LIFETIME / 4;
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    proxy.wait_log(&["upstream login renewed"]);
}

/// `tag NOOP`: its tagged answer must come within [`ANSWER_LIMIT`].
fn noop_answered(c: &mut Raw, tag: &str, proxy: &Proxy) {
    let start = Instant::now();
    c.send(&format!("{tag} NOOP"));
    let reply = c.until(&format!("{tag} "));
    let took = start.elapsed();
    assert!(
        last(&reply).starts_with(&format!("{tag} OK")),
        "{reply}\n{}",
        proxy.logs()
    );
    assert!(took < ANSWER_LIMIT, "answered after {took:?}");
}

/// After the first token's expiry, the moved session still answers.
fn still_works_after_expiry(c: &mut Raw, proxy: &Proxy, login: Instant) {
    proxy.wait_log(&["IMAP session moved to a new upstream login"]);
    let after = login + LIFETIME + Duration::from_secs(1);
    std::thread::sleep(after.saturating_duration_since(Instant::now()));
    noop_answered(c, "late", proxy);
    assert_eq!(metric(proxy, "oxbridge_imap_swaps_total"), 1.0);
    c.send("z LOGOUT");
    c.until("z ");
}

/// A blank line gets an untagged `* BAD` from the upstream and no tagged
/// answer; it must not count as a command in flight, or the device is
/// held without answers from the moment the new login is ready.
#[test]
fn a_blank_line_does_not_hold_the_device_at_a_move() {
    let proxy = short_token_proxy();
    let (mut c, login) = logged_in(&proxy, BOB, &upstream().password(BOB));
    c.send("s SELECT INBOX");
    assert!(last(&c.until("s ")).starts_with("s OK"));
    c.write(b"\r\n");
    let bad = c.line();
    assert!(bad.starts_with("* BAD "), "{bad}");
    noop_answered(&mut c, "n1", &proxy);
    wait_renewed(&proxy, login);
    noop_answered(&mut c, "n2", &proxy);
    still_works_after_expiry(&mut c, &proxy, login);
}

/// An APPEND to a folder that does not exist, with a synchronising
/// literal: the upstream answers `NO [TRYCREATE]` instead of `+`, so the
/// literal never comes and the next bytes are the device's next command.
#[test]
fn a_refused_literal_does_not_hold_the_device_at_a_move() {
    let proxy = short_token_proxy();
    let (mut c, login) = logged_in(&proxy, BOB, &upstream().password(BOB));
    let folder = unique("no-such-folder");
    c.send(&format!("l APPEND \"{folder}\" {{5}}"));
    let refused = c.line();
    assert!(refused.starts_with("l NO [TRYCREATE]"), "{refused}");
    noop_answered(&mut c, "n1", &proxy);
    wait_renewed(&proxy, login);
    noop_answered(&mut c, "n2", &proxy);
    noop_answered(&mut c, "n3", &proxy);
    still_works_after_expiry(&mut c, &proxy, login);
}
