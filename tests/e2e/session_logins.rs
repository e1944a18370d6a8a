//! Logins on session listeners, end to end through the real upstream:
//! which logins go upstream, and the throttle in front of them.

use std::time::{Duration, Instant};

use crate::harness::*;

/// A config with IMAP and POP3 listeners where `[upstream] send =
/// "graph"`: the scanner's SMTP mail would leave through Graph.
fn graph_sending_config() -> String {
    let up = upstream();
    let cfg = config(&plain_listeners(&["imap", "pop3"]), "");
    cfg.replace(
        &format!("ca_file = \"{}\"", up.ca()),
        &format!(
            "ca_file = \"{}\"\nsend = \"graph\"\ngraph = \"{}\"",
            up.ca(),
            up.get("GRAPH_URL")
        ),
    )
}

/// An account that sends its SMTP mail through Microsoft Graph still
/// reads its mail over IMAP: the login goes to the real Dovecot and the
/// session is relayed, so SELECT gets Dovecot's own answer.
#[test]
fn imap_login_of_a_graph_sending_account_is_relayed_upstream() {
    let proxy = Proxy::start(&graph_sending_config());
    let mut c = Raw::connect(proxy.port(0));
    c.line();
    let login = c.imap_login("scanner@example.test", SCANNER_PASSWORD);
    assert!(login.contains("a OK"), "{login}\n{}", proxy.logs());
    c.send("b SELECT INBOX");
    let selected = c.until("b ");
    assert!(
        selected.lines().last().unwrap_or("").starts_with("b OK"),
        "{selected}\n{}",
        proxy.logs()
    );
    assert!(selected.contains("UIDVALIDITY"), "{selected}");
    c.send("c LOGOUT");
    c.until("c ");
}

/// The same for POP3: STAT is answered by the real Dovecot.
#[test]
fn pop3_login_of_a_graph_sending_account_is_relayed_upstream() {
    let proxy = Proxy::start(&graph_sending_config());
    let mut c = Raw::connect(proxy.port(1));
    c.line();
    c.send("USER scanner@example.test");
    c.line();
    c.send(&format!("PASS {SCANNER_PASSWORD}"));
    let login = c.line();
    assert_eq!(login, "+OK Logged in\r\n", "{}", proxy.logs());
    c.send("STAT");
    let stat = c.line();
    assert!(stat.starts_with("+OK "), "{stat}\n{}", proxy.logs());
    c.send("QUIT");
    c.line();
}

/// Connect from `source` and log in over SMTP; the reply to AUTH.
fn auth_from(port: u16, source: &str, login: &str, password: &str) -> String {
    let mut c = Raw::connect_from(port, source);
    c.reply();
    c.smtp_login(login, password)
}

const STRICT: &str =
    "[limits]\nlogin_delay_ms = 200\nlogin_lockout_failures = 3\nlogin_lockout_s = 60\n";

/// Many wrong passwords at once from one address: each is counted before
/// its password is checked, so no more than the lockout's number of
/// guesses are ever tried; the others are refused as throttled.
#[test]
fn parallel_wrong_passwords_are_counted_before_they_are_checked() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), STRICT));
    let port = proxy.port(0);
    let replies: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                scope.spawn(move || {
                    auth_from(
                        port,
                        "127.0.0.1",
                        "scanner@example.test",
                        &format!("guess{i}"),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let tried = replies.iter().filter(|r| r.starts_with("535 ")).count();
    let throttled = replies
        .iter()
        .filter(|r| r.starts_with("454 4.7.0 Too many failed logins"))
        .count();
    assert!(tried <= 3, "{tried} guesses were checked: {replies:?}");
    assert_eq!(tried + throttled, 12, "{replies:?}\n{}", proxy.logs());
}

/// Every user of a `*@domain` account with one password is that one
/// account: guesses that rotate the user name (and the address) count
/// together, and lock the account out.
#[test]
fn rotating_users_of_one_pattern_account_count_against_the_account() {
    let pattern = format!(
        "[[account]]\nlogin = \"*@pattern.test\"\npassword_hash = \"{}\"\ngrant = \"client_credentials\"\n\n{STRICT}",
        argon2_hash(SCANNER_PASSWORD)
    );
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), &pattern));
    let port = proxy.port(0);
    let started = Instant::now();
    for i in 0..3 {
        let r = auth_from(
            port,
            &format!("127.0.0.{}", 2 + i),
            &format!("u{i}@pattern.test"),
            "guess",
        );
        assert!(r.starts_with("535 "), "{r}");
    }
    // The third failure waited 800 ms: the counter is shared.
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    let r = auth_from(port, "127.0.0.9", "u9@pattern.test", SCANNER_PASSWORD);
    assert!(
        r.starts_with("454 4.7.0 Too many failed logins"),
        "{r}\n{}",
        proxy.logs()
    );
}

/// A correct login clears its own account's failures, not its address's:
/// an attacker with one working password cannot use it to reset the
/// count of guesses at another account from the same address.
#[test]
fn a_success_does_not_clear_the_address_of_other_failures() {
    let up = upstream();
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), STRICT));
    let port = proxy.port(0);
    for _ in 0..2 {
        let r = auth_from(port, "127.0.0.1", "scanner@example.test", "guess");
        assert!(r.starts_with("535 "), "{r}");
        let r = auth_from(port, "127.0.0.1", ALICE, &up.password(ALICE));
        assert!(r.starts_with("235 "), "{r}\n{}", proxy.logs());
    }
    let r = auth_from(port, "127.0.0.1", "scanner@example.test", "guess");
    assert!(r.starts_with("535 "), "{r}");
    // Three failures from the address: locked, whatever the account.
    let r = auth_from(port, "127.0.0.1", ALICE, &up.password(ALICE));
    assert!(
        r.starts_with("454 4.7.0 Too many failed logins"),
        "{r}\n{}",
        proxy.logs()
    );
}
