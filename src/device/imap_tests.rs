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
