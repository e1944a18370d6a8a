//! IMAP command lines over `max_line` before login: the command gets its
//! tagged `BAD` where its tag can be read (so the client stays in step
//! instead of waiting for its tag until the pre-login timeout), the rest of
//! the line is dropped, and the next command works. A line that never ends
//! still ends the session at the pre-login timeout.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// How soon an over-long line must be answered (the pre-login timeout is
/// 300 s by default: a client that got no tagged answer waits that long).
const PROMPT: Duration = Duration::from_secs(10);

/// `tag ID ("name" "<31 KB of x>")`: one line, far over `max_line` (4096).
fn long_id(tag: &str) -> String {
    format!("{tag} ID (\"name\" \"{}\")", "x".repeat(31 * 1024))
}

/// A hand-driven connection to `port` past the greeting, whose reads give
/// up after [`PROMPT`].
fn connect(port: u16) -> Raw {
    let mut c = Raw::connect(port);
    c.writer.set_read_timeout(Some(PROMPT)).unwrap();
    let greeting = c.line();
    assert!(greeting.starts_with("* OK "), "{greeting}");
    c
}

#[test]
fn a_pre_login_id_on_a_31_kb_line_gets_a_tagged_bad_and_the_next_command_works() {
    let up = upstream();
    let proxy = Proxy::start(&config(&listener("imap", "none", true), ""));
    let mut c = connect(proxy.port(0));
    c.send(&long_id("a1"));
    assert_eq!(
        c.line(),
        "a1 BAD Command line too long\r\n",
        "{}",
        proxy.logs()
    );
    c.send("a2 CAPABILITY");
    let caps = c.until("a2 ");
    assert!(
        caps.starts_with("* CAPABILITY IMAP4rev1 ")
            && caps.ends_with("\r\na2 OK Capability completed\r\n"),
        "{caps}"
    );
    let login = c.imap_login(BOB, &up.password(BOB));
    assert!(login.starts_with("a OK [CAPABILITY "), "{login}");
}

/// Only a line whose first word is no tag (none at all, `+`, NUL, control
/// bytes, a lone CR, `{`, `*`) gets the untagged `* BAD`, and the session
/// goes on.
#[test]
fn a_long_line_without_a_readable_tag_gets_the_untagged_bad() {
    let proxy = Proxy::start(&config(&listener("imap", "none", true), ""));
    let mut c = connect(proxy.port(0));
    c.write(&[b'x'; 10 * 1024]);
    c.write(b"\r\n");
    assert_eq!(c.line(), "* BAD Command line too long\r\n");
    c.send(&format!("a+b ID (\"name\" \"{}\")", "y".repeat(8 * 1024)));
    assert_eq!(c.line(), "* BAD Command line too long\r\n");
    for first in [&b"a\0b"[..], b"\x01\x02", b"\x1b[2J", b"a\rb", b"{5}", b"*"] {
        c.write(first);
        c.write(format!(" ID (\"name\" \"{}\")\r\n", "z".repeat(8 * 1024)).as_bytes());
        assert_eq!(c.line(), "* BAD Command line too long\r\n", "{first:?}");
    }
    c.send("a3 NOOP");
    assert_eq!(c.line(), "a3 OK NOOP completed\r\n");
}

/// A literal announced at the end of a line too long to be read whole is
/// never asked for: a synchronising one is never sent, and the bytes of a
/// non-synchronising one, already on their way, are read as commands.
#[test]
fn a_literal_announced_at_the_end_of_a_long_line_is_not_read_as_one() {
    let proxy = Proxy::start(&config(&listener("imap", "none", true), ""));
    let mut c = connect(proxy.port(0));
    c.send(&format!("{} {{5}}", long_id("a1")));
    assert_eq!(c.line(), "a1 BAD Command line too long\r\n");
    c.send(&format!("{} {{9+}}", long_id("b1")));
    c.write(b"c1 NOOP\r\n");
    assert_eq!(c.line(), "b1 BAD Command line too long\r\n");
    assert_eq!(c.line(), "c1 OK NOOP completed\r\n");
}

/// A line that never ends is answered at once and the session still ends
/// at `preauth_timeout_s` with the idle goodbye, however busy the device
/// keeps the connection.
#[test]
fn a_pre_login_line_that_never_ends_gets_its_tagged_bad_then_the_idle_goodbye() {
    let limits = "[limits]\npreauth_timeout_s = 2\n";
    let proxy = Proxy::start(&config(&listener("imap", "none", true), limits));
    let mut c = connect(proxy.port(0));
    let mut writer = c.writer.try_clone().unwrap();
    let start = Instant::now();
    let endless = std::thread::spawn(move || {
        let _ = writer.write_all(b"a1 ID (\"name\" \"");
        // Never a line end; stops when oxbridge closes the connection.
        while start.elapsed() < Duration::from_secs(30) {
            if writer.write_all(&[b'x'; 512]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert_eq!(c.line(), "a1 BAD Command line too long\r\n");
    assert_eq!(c.line(), "* BYE Autologout; idle for too long\r\n");
    let ended = start.elapsed();
    assert_eq!(c.line(), "<closed>");
    assert!(
        ended >= Duration::from_secs(2) && ended < PROMPT,
        "ended after {ended:?}"
    );
    endless.join().unwrap();
}

/// Python's imaplib sending `ID` with a 31 KB argument over STARTTLS: an
/// error at once (not a wait for the pre-login timeout), then CAPABILITY
/// and LOGIN on the same connection.
#[test]
fn imaplib_id_with_a_31_kb_argument_over_starttls_gets_an_error_at_once() {
    let up = upstream();
    let proxy = Proxy::start(&config(&listener("imap", "starttls", false), ""));
    let script = r#"
import imaplib, ssl, sys, time
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
m.starttls(ssl._create_unverified_context())
started = time.monotonic()
try:
    m.xatom("ID", '("name" "' + "x" * 31 * 1024 + '")')
    print("no error")
except imaplib.IMAP4.error as e:
    print("error after %.1f s: %s" % (time.monotonic() - started, e))
typ, caps = m.capability()
print("capability", typ)
typ, data = m.login(user, password)
print("login", typ)
m.logout()
"#;
    let out = Command::new("python3")
        .args(["-c", script, &proxy.port(0).to_string(), BOB])
        .arg(up.password(BOB))
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}\n{}", proxy.logs());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("error after ")
            && lines[0].ends_with("ID command error: BAD [b'Command line too long']"),
        "{said}"
    );
    assert_eq!(lines[1..], ["capability OK", "login OK"], "{said}");
}
