//! Every reply an IMAP device can get before login, byte for byte.

use super::*;
use crate::device::script::{context, feed, plain, run, Feed::*};
use crate::device::{MAX_ERRORS, MAX_PREAUTH_COMMANDS};
use crate::error::AuthError;

const GREETING_PLAIN: &str =
    "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED] oxbridge ready\r\n";
const GREETING_TLS: &str =
    "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN] oxbridge ready\r\n";
const UPSTREAM: &[&str] = &["IMAP4rev1", "SASL-IR", "AUTH=XOAUTH2", "IDLE", "LITERAL+"];

fn tls_port() -> Session {
    Session::new(context(true, false, false))
}

#[test]
fn starttls_then_login_with_literals() {
    run(
        &mut Session::new(context(false, true, false)),
        GREETING_PLAIN,
        &[
            (
                L("a CAPABILITY"),
                "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED\r\na OK Capability completed\r\n",
                "read",
            ),
            (
                L("b LOGIN user pw"),
                "b NO [PRIVACYREQUIRED] Login is disabled without TLS\r\n",
                "read",
            ),
            (L("c STARTTLS"), "c OK Begin TLS negotiation now\r\n", "starttls"),
            (Tls, "", "read"),
            (
                L("d CAPABILITY"),
                "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN\r\nd OK Capability completed\r\n",
                "read",
            ),
            (L("e STARTTLS"), "e BAD STARTTLS not available\r\n", "read"),
            (L("f LOGIN {11}"), "+ Ready for literal data\r\n", "read 11"),
            (Literal("user@x.test"), "", "read"),
            (L(" {4+}"), "", "read 4"),
            (Literal("p w\""), "", "read"),
            (L(""), "", "login user@x.test as \"\""),
            (
                Ok(UPSTREAM),
                "f OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] Logged in\r\n",
                "relay \"\"",
            ),
        ],
    );
}

#[test]
fn authenticate_plain_both_ways_and_failures() {
    let ir = plain("", "user@x.test", "pw");
    run(
        &mut tls_port(),
        GREETING_TLS,
        &[
            (L("a NOOP"), "a OK NOOP completed\r\n", "read"),
            (
                L("b ID (\"name\" \"mutt\")"),
                "* ID (\"name\" \"oxbridge\")\r\nb OK ID completed\r\n",
                "read",
            ),
            (L("c AUTHENTICATE PLAIN"), "+ \r\n", "read"),
            (L(ir.clone().leak()), "", "login user@x.test as \"\""),
            (
                Fail(AuthError::BadCredentials("wrong password")),
                "c NO [AUTHENTICATIONFAILED] Authentication failed\r\n",
                "read",
            ),
            (L(format!("d AUTHENTICATE PLAIN {ir}").leak()), "", "login user@x.test as \"\""),
            (
                Fail(AuthError::Busy("20".into())),
                "d NO [UNAVAILABLE] This mailbox has too many open sessions, try again later\r\n",
                "read",
            ),
            (L("e LOGIN \"user@x.test\" \"p\\\"w\""), "", "login user@x.test as \"\""),
            (
                Fail(AuthError::UpstreamUnavailable("down".into())),
                "e NO [UNAVAILABLE] Mail server unavailable, try again later\r\n* BYE Too many failed logins\r\n",
                "close: too many failed logins",
            ),
        ],
    );
}

/// Cyrus SASL clients send an authorization identity with `-u`: a refused
/// authorization, never `BAD`.
#[test]
fn foreign_authorization_identity_is_a_refused_login() {
    let ir = plain("boss@x.test", "user@x.test", "pw");
    run(
        &mut tls_port(),
        GREETING_TLS,
        &[
            (L("a AUTHENTICATE PLAIN"), "+ \r\n", "read"),
            (L(ir.leak()), "", "refuse user@x.test: authorization"),
            (
                Fail(AuthError::Authorization("x".into())),
                "a NO [AUTHORIZATIONFAILED] Authorization failed: the authorization identity is not the user name\r\n",
                "read",
            ),
        ],
    );
}

#[test]
fn bad_commands() {
    run(
        &mut tls_port(),
        GREETING_TLS,
        &[
            (L("a AUTHENTICATE PLAIN"), "+ \r\n", "read"),
            (L("*"), "a BAD Authentication canceled\r\n", "read"),
            (L("b AUTHENTICATE PLAIN"), "+ \r\n", "read"),
            (
                L("!!!"),
                "b BAD Cannot decode the authentication exchange\r\n",
                "read",
            ),
            (
                L("c AUTHENTICATE CRAM-MD5"),
                "c NO Unsupported authentication mechanism; use PLAIN\r\n",
                "read",
            ),
            (
                L("d SELECT INBOX"),
                "d BAD Command not available before login\r\n",
                "read",
            ),
            (L("+ LOGIN a b"), "* BAD Invalid tag\r\n", "read"),
            (
                L("e LOGIN \"unterminated"),
                "e BAD unterminated quoted string\r\n",
                "read",
            ),
            (Raw(b"f\rx LOGIN \"a"), "* BAD Invalid tag\r\n", "read"),
            (
                L("g LOGIN onlyone"),
                "g BAD LOGIN expects a user name and a password\r\n",
                "read",
            ),
            (L("h LOGIN {99999}"), "h BAD Literal too large\r\n", "read"),
            (TooLong, "* BAD Command line too long\r\n", "read"),
            (L("i LOGIN x y"), "", "login x as \"\""),
        ],
    );
}

#[test]
fn endings() {
    let close = |input, reply: &str, why: &str| {
        run(&mut tls_port(), GREETING_TLS, &[(input, reply, why)]);
    };
    close(
        L("a LOGOUT"),
        "* BYE Logging out\r\na OK Logout completed\r\n",
        "close: logout",
    );
    close(
        Timeout,
        "* BYE Autologout; idle for too long\r\n",
        "close: idle timeout",
    );
    close(
        Shutdown,
        "* BYE [UNAVAILABLE] Server shutting down\r\n",
        "close: shutdown",
    );
    // LITERAL+: the data is already on its way.
    close(
        L("a LOGIN {99999+}"),
        "* BYE Literal too large\r\n",
        "close: literal too large",
    );
    let mut s = tls_port();
    for _ in 0..MAX_ERRORS - 1 {
        assert_eq!(
            feed(&mut s, &L("x FOO")).0,
            "x BAD Command not available before login\r\n"
        );
    }
    assert_eq!(
        feed(&mut s, &L("x FOO")),
        (
            "x BAD Command not available before login\r\n* BYE Too many errors\r\n".into(),
            "close: too many errors".into()
        )
    );
    let mut s = tls_port();
    for _ in 0..MAX_PREAUTH_COMMANDS - 1 {
        feed(&mut s, &L("x NOOP"));
    }
    assert_eq!(
        feed(&mut s, &L("x NOOP")),
        (
            "x OK NOOP completed\r\n* BYE Too many commands without logging in\r\n".into(),
            "close: too many commands".into()
        )
    );
}

#[test]
fn every_refusal_has_its_reply() {
    let cases = [
        (
            AuthError::TokenRefused("invalid_grant".into()),
            "NO [AUTHENTICATIONFAILED] Authentication failed: no access token for this account",
        ),
        (
            AuthError::UpstreamRefused("x".into()),
            "NO [AUTHENTICATIONFAILED] Authentication failed: the mail server refused the access token",
        ),
        (
            AuthError::TokenUnavailable("x".into()),
            "NO [UNAVAILABLE] Temporary authentication failure: token service unavailable",
        ),
        (
            AuthError::UpstreamTemporary("x".into()),
            "NO [UNAVAILABLE] Temporary authentication failure at the mail server",
        ),
        (
            AuthError::Throttled("x"),
            "NO [UNAVAILABLE] Too many failed logins; try again later",
        ),
    ];
    for (error, text) in cases {
        let mut s = tls_port();
        feed(&mut s, &L("t1 LOGIN u pw"));
        let (reply, then) = feed(&mut s, &Fail(error));
        assert_eq!(
            (reply, then),
            (format!("t1 {text}\r\n"), "read".to_string())
        );
    }
}

/// LOGIN before STARTTLS, or on a listener without TLS, is marked with its
/// reason; ID gives the device's name.
#[test]
fn refusals_are_marked_and_id_names_the_device() {
    use crate::device::refusal::Refused;
    let mut s = Session::new(context(false, true, false));
    s.greeting();
    let step = s.on(Input::Line(br#"a ID ("name" "Scan Pro" "version" "2")"#));
    assert_eq!(step.name.as_deref(), Some("Scan Pro"));
    let step = s.on(Input::Line(b"b LOGIN user pw"));
    assert_eq!(step.refused, Some(Refused::EncryptionRequired));
    let mut none = Session::new(context(false, false, false));
    none.greeting();
    let step = none.on(Input::Line(b"b AUTHENTICATE PLAIN"));
    assert_eq!(step.refused, Some(Refused::PlaintextPassword));
    let mut tls = tls_port();
    tls.greeting();
    assert_eq!(tls.on(Input::Line(b"a ID NIL")).name, None);
}

/// `head`, as the first bytes of a line over `max_line`, in a fresh session.
fn long_line(head: &[u8]) -> (String, String) {
    let mut s = tls_port();
    s.greeting();
    feed(&mut s, &Long(head.to_vec().leak()))
}

/// A line over `max_line` whose tag can be read gets its tagged `BAD`; the
/// rest of the line is dropped and the next command works.
#[test]
fn a_long_line_is_answered_with_its_tag() {
    run(
        &mut tls_port(),
        GREETING_TLS,
        &[
            (
                Long(b"a1 ID (\"name\" \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
                "a1 BAD Command line too long\r\n",
                "read",
            ),
            (
                L("a2 CAPABILITY"),
                "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN\r\na2 OK Capability completed\r\n",
                "read",
            ),
            (L("a3 LOGIN x y"), "", "login x as \"\""),
        ],
    );
    // Any tag RFC 3501 allows: ASTRING-CHARs but "+", "]" among them.
    for tag in ["A0001", "x.y-z:1", "a]", "~!#$&'", "t/1=?@^_`|"] {
        let head = format!("{tag} ID (\"name\" \"xxxx");
        assert_eq!(
            long_line(head.as_bytes()),
            (
                format!("{tag} BAD Command line too long\r\n"),
                "read".into()
            )
        );
    }
    let longest = format!("{} ID", "t".repeat(MAX_TAG));
    assert_eq!(
        long_line(longest.as_bytes()).0,
        format!("{} BAD Command line too long\r\n", "t".repeat(MAX_TAG))
    );
}

/// Only where no tag can be read: the untagged `* BAD`, and nothing of the
/// line is echoed.
#[test]
fn a_long_line_without_a_readable_tag_is_answered_untagged() {
    let ten_kb = [b'x'; 10 * 1024];
    let too_long_tag = format!("{} ID", "t".repeat(MAX_TAG + 1));
    let heads: [&[u8]; 25] = [
        &ten_kb,
        b"\x01\x02\x03 ID (\"name\" \"x",
        b"\x1b[2J ID",
        b"a\0b ID",
        b"\0 ID",
        b"a\x01 ID",
        b"+ ID",
        b"a+ ID",
        b"+a ID",
        b"* ID",
        b"a* ID",
        b"{5} ID",
        b"a{5} ID",
        b"(a ID",
        b"a) ID",
        b"a% ID",
        b"\"a\" ID",
        b"a\\b ID",
        b"\r",
        b"\rx ID",
        b"a1\r ID",
        b"a1\tID x",
        b" a1 ID",
        b"caf\xc3\xa9 ID",
        too_long_tag.as_bytes(),
    ];
    for head in heads {
        assert_eq!(
            long_line(head),
            ("* BAD Command line too long\r\n".into(), "read".into()),
            "head {:?}",
            String::from_utf8_lossy(&head[..head.len().min(40)])
        );
    }
    // A tag with nothing after it within the head is not known to be one.
    assert_eq!(long_line(b"a1").0, "* BAD Command line too long\r\n");
    assert_eq!(long_line(b"a\x7f ID").0, "* BAD Command line too long\r\n");
}

/// The too-long line continues a command after its literal: the command's
/// tag answers it, and the command is dropped.
#[test]
fn a_long_continuation_line_gets_the_tag_of_its_command() {
    run(
        &mut tls_port(),
        GREETING_TLS,
        &[
            (L("a LOGIN {4}"), "+ Ready for literal data\r\n", "read 4"),
            (Literal("user"), "", "read"),
            (
                Long(b" xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
                "a BAD Command line too long\r\n",
                "read",
            ),
            (L("b NOOP"), "b OK NOOP completed\r\n", "read"),
            // The next command's own first word answers its own long line.
            (
                Long(b"c ID (\"name\" \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
                "c BAD Command line too long\r\n",
                "read",
            ),
            (L("+ LOGIN {4+}"), "", "read 4"),
            (Literal("user"), "", "read"),
            (Long(b"d xxxx"), "* BAD Command line too long\r\n", "read"),
            (L("e NOOP"), "e OK NOOP completed\r\n", "read"),
        ],
    );
}

/// Commands that announce a literal. APPEND is not offered before login:
/// a literal over the pre-login limit is refused before anything is read,
/// one within it is read and the command refused. A line too long to be
/// read whole is refused by its tag before its end (and any `{n}` there)
/// is seen: a client waiting for `+` then sends no literal.
#[test]
fn literal_announcing_commands_and_long_lines() {
    run(
        &mut tls_port(),
        GREETING_TLS,
        &[
            (
                L("a APPEND x {40000}"),
                "a BAD Literal too large\r\n",
                "read",
            ),
            (
                L("b APPEND x {5}"),
                "+ Ready for literal data\r\n",
                "read 5",
            ),
            (Literal("12345"), "", "read"),
            (
                L(""),
                "b BAD Command not available before login\r\n",
                "read",
            ),
            (
                Long(b"c APPEND \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
                "c BAD Command line too long\r\n",
                "read",
            ),
            (L("d NOOP"), "d OK NOOP completed\r\n", "read"),
        ],
    );
}

/// Each too-long line is a bad line for the repeat limit, tagged or not.
#[test]
fn too_long_lines_count_as_bad_lines() {
    let mut s = tls_port();
    s.greeting();
    for i in 0..MAX_ERRORS - 1 {
        let (head, want): (&'static [u8], &str) = match i % 2 {
            0 => (b"x ID (\"name\" \"xxxx", "x BAD Command line too long\r\n"),
            _ => (b"\x01 ID", "* BAD Command line too long\r\n"),
        };
        assert_eq!(feed(&mut s, &Long(head)), (want.into(), "read".into()));
    }
    assert_eq!(
        feed(&mut s, &Long(b"y ID (\"name\" \"xxxx")),
        (
            "y BAD Command line too long\r\n* BYE Too many errors\r\n".into(),
            "close: too many errors".into()
        )
    );
}

/// Whatever a too-long line begins with, its reply is one CRLF line that
/// echoes at most a tag: the line's first word, made only of tag
/// characters, and no more than `MAX_TAG` of them.
#[test]
fn a_long_lines_reply_echoes_nothing_but_a_tag() {
    const TAIL: &str = " BAD Command line too long\r\n";
    bolero::check!()
        .with_iterations(20_000)
        .for_each(|head: &[u8]| {
            let (reply, then) = long_line(head);
            assert_eq!(then, "read");
            let tag = reply.strip_suffix(TAIL).expect("the too-long reply");
            if tag != "*" {
                assert!(head.starts_with(format!("{tag} ").as_bytes()), "{reply:?}");
                assert!((1..=MAX_TAG).contains(&tag.len()), "{reply:?}");
                assert!(
                    tag.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b)),
                    "{reply:?}"
                );
            }
        });
}
