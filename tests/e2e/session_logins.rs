//! Logins on session listeners, end to end through the real upstream:
//! which logins go upstream, and the throttle in front of them.

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
