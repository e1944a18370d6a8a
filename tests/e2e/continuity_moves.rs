//! Moving an IMAP session onto a new upstream login, at its edges, with
//! 16-second tokens so that a move is due 12 s after the login: commands
//! the upstream answers without a tag (a blank line) or whose literal it
//! refuses never hold the device; and an account removed or given another
//! password by a reload ends its sessions at the next move with the BYE
//! instead of moving them. Alice's mailbox only: the tests of
//! `continuity` check the lifetimes of Bob's logins at the front.

use std::time::{Duration, Instant};

use crate::harness::*;

/// The tokens' lifetime here (the identity provider's `ttl-16` tenant):
/// the new login starts 4 s before expiry, the BYE comes about 1 s before.
pub const LIFETIME: Duration = Duration::from_secs(16);
const BYE: &str = "* BYE [UNAVAILABLE] Login expired, please log in again\r\n";
/// How long a held device may wait for an answer during a move.
const ANSWER_LIMIT: Duration = Duration::from_secs(3);

/// A proxy with one plain IMAP listener whose upstream is the
/// Exchange-like front and whose tokens live [`LIFETIME`].
pub fn short_token_proxy() -> Proxy {
    Proxy::start(&short_token_config())
}

fn short_token_config() -> String {
    front_config(LIFETIME)
}

/// One plain IMAP listener whose upstream is the Exchange-like front, and
/// tokens that live `lifetime` (the identity provider's `ttl-N` tenant).
pub fn front_config(lifetime: Duration) -> String {
    let up = upstream();
    let cfg = config(&plain_listeners(&["imap"]), ADMIN);
    let cfg = reroute(
        &cfg,
        "imap",
        &format!("localhost:{}", up.get("EXPIRY_IMAPS_PORT")),
    );
    let url = up
        .token_url()
        .replace("/common/", &format!("/ttl-{}/", lifetime.as_secs()));
    with_token_url(&cfg, &url)
}

/// A logged-in IMAP connection as `user`; when its login was answered.
pub fn logged_in(proxy: &Proxy, user: &str, password: &str) -> (Raw, Instant) {
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

pub fn last(reply: &str) -> &str {
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
    let (mut c, login) = logged_in(&proxy, ALICE, &upstream().password(ALICE));
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
    let (mut c, login) = logged_in(&proxy, ALICE, &upstream().password(ALICE));
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

/// The config of `proxy` rewritten by `change`, then reloaded.
fn reload(proxy: &Proxy, change: impl FnOnce(&str) -> String) {
    let cfg = std::fs::read_to_string(proxy.config_path()).unwrap();
    let new = change(&cfg);
    assert_ne!(new, cfg, "the change changes nothing");
    std::fs::write(proxy.config_path(), new).unwrap();
    let before = proxy.logs().matches("configuration reloaded").count();
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(15);
    while proxy.logs().matches("configuration reloaded").count() == before {
        assert!(Instant::now() < deadline, "no reload:\n{}", proxy.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `cfg` without the `[[account]]` of `scanner@example.test`.
fn without_scanner(cfg: &str) -> String {
    let start = cfg
        .find("[[account]]\nlogin = \"scanner@example.test\"")
        .expect("the scanner account");
    let end = start
        + cfg[start + 1..]
            .find("[[account]]")
            .expect("another account")
        + 1;
    format!("{}{}", &cfg[..start], &cfg[end..])
}

/// `cfg` with the scanner account's password hash for `password`.
fn scanner_password(cfg: &str, password: &str) -> String {
    let line = cfg
        .lines()
        .find(|l| l.starts_with("password_hash"))
        .expect("a password_hash");
    cfg.replace(
        line,
        &format!("password_hash = \"{}\"", argon2_hash(password)),
    )
}

/// The scanner's session (mailbox alice) in IDLE when its account is
/// changed by `change`: at the move the device gets the BYE, and no new
/// login is made for it.
fn revoked_at_the_move(change: impl FnOnce(&str) -> String) {
    let proxy = short_token_proxy();
    let (mut c, login) = logged_in(&proxy, "scanner@example.test", SCANNER_PASSWORD);
    c.send("s SELECT INBOX");
    assert!(last(&c.until("s ")).starts_with("s OK"));
    c.send("i IDLE");
    assert!(c.line().starts_with("+ "));
    reload(&proxy, change);
    let due = login + LIFETIME - LIFETIME / 4;
    let bye = loop {
        let l = c.line();
        if !l.starts_with("* ") || l.starts_with("* BYE") {
            break l;
        }
    };
    let at = Instant::now();
    assert_eq!(bye, BYE, "{}", proxy.logs());
    assert_eq!(c.line(), "<closed>");
    assert!(
        at + Duration::from_millis(500) >= due,
        "BYE before the move"
    );
    assert!(at < login + LIFETIME, "BYE after expiry");
    let logs = proxy.logs();
    assert!(!logs.contains("upstream login renewed"), "{logs}");
    assert!(!logs.contains("IMAP session moved"), "{logs}");
    assert_eq!(metric(&proxy, "oxbridge_imap_swaps_total"), 0.0);
}

/// The account is removed and the config reloaded while its session is
/// open: the next move refuses.
#[test]
fn a_removed_account_is_not_moved_to_a_new_login() {
    revoked_at_the_move(without_scanner);
}

/// The account's password hash is changed: the next move refuses.
#[test]
fn a_changed_password_is_not_moved_to_a_new_login() {
    revoked_at_the_move(|cfg| scanner_password(cfg, "another-scanner-password"));
}

/// A reload that leaves the account as it was (another account added):
/// the session moves on.
#[test]
fn an_unrelated_reload_lets_the_session_move() {
    let proxy = short_token_proxy();
    let (mut c, login) = logged_in(&proxy, "scanner@example.test", SCANNER_PASSWORD);
    c.send("s SELECT INBOX");
    assert!(last(&c.until("s ")).starts_with("s OK"));
    reload(&proxy, |cfg| {
        format!(
            "{cfg}\n[[account]]\nlogin = \"printer@other.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\nmailbox = \"alice@example.test\"\n",
            argon2_hash("printer-password")
        )
    });
    wait_renewed(&proxy, login);
    noop_answered(&mut c, "n", &proxy);
    still_works_after_expiry(&mut c, &proxy, login);
}
