//! Every reply a POP3 device can get before login, byte for byte.

use super::*;
use crate::device::script::{context, feed, plain, run, Feed::*};
use crate::device::{MAX_ERRORS, MAX_PREAUTH_COMMANDS};
use crate::error::AuthError;

const GREETING: &str = "+OK oxbridge ready\r\n";
const CAPA_TAIL: &str =
    "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nTOP\r\nUIDL\r\nIMPLEMENTATION oxbridge\r\n.\r\n";

fn tls_port() -> Session {
    Session::new(context(true, false, false))
}

#[test]
fn stls_then_user_pass() {
    let before = format!("+OK Capability list follows\r\nSTLS\r\n{CAPA_TAIL}");
    let after = format!("+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\n{CAPA_TAIL}");
    run(
        &mut Session::new(context(false, true, false)),
        GREETING,
        &[
            (L("CAPA"), before.leak(), "read"),
            (
                L("USER u@x.test"),
                "-ERR [AUTH] Plaintext authentication is disabled without TLS\r\n",
                "read",
            ),
            (L("STLS"), "+OK Begin TLS negotiation\r\n", "starttls"),
            (Tls, "", "read"),
            (L("CAPA"), after.leak(), "read"),
            (L("STLS"), "-ERR STLS not available\r\n", "read"),
            (L("PASS pw"), "-ERR USER first\r\n", "read"),
            (L("USER u@x.test"), "+OK\r\n", "read"),
            (L("PASS pass with spaces"), "", "login u@x.test as \"\""),
            (Ok(&[]), "+OK Logged in\r\n", "relay \"\""),
        ],
    );
}

#[test]
fn auth_plain_both_ways_and_failures() {
    let ir = plain("", "u@x.test", "pw");
    run(
        &mut tls_port(),
        GREETING,
        &[
            (L("AUTH"), "+OK\r\nPLAIN\r\n.\r\n", "read"),
            (
                L("AUTH CRAM-MD5"),
                "-ERR Unsupported authentication mechanism; use PLAIN\r\n",
                "read",
            ),
            (L("AUTH PLAIN"), "+ \r\n", "read"),
            (L("*"), "-ERR Authentication canceled\r\n", "read"),
            (L("AUTH PLAIN"), "+ \r\n", "read"),
            (L(ir.clone().leak()), "", "login u@x.test as \"\""),
            (
                Fail(AuthError::BadCredentials("x")),
                "-ERR [AUTH] Authentication failed\r\n",
                "read",
            ),
            (L(format!("AUTH PLAIN {ir}").leak()), "", "login u@x.test as \"\""),
            (
                Fail(AuthError::Busy("x".into())),
                "-ERR [SYS/TEMP] This mailbox has too many open sessions, try again later\r\n",
                "read",
            ),
            (
                L("AUTH PLAIN !!!"),
                "-ERR [AUTH] Cannot decode the authentication exchange\r\n-ERR [AUTH] Too many failed logins, closing connection\r\n",
                "close: too many failed logins",
            ),
        ],
    );
}

/// Cyrus SASL clients send an authorization identity with `-u`: a refused
/// authorization, answered `-ERR [AUTH]`.
#[test]
fn foreign_authorization_identity_is_a_refused_login() {
    let ir = plain("boss@x.test", "u@x.test", "pw");
    run(
        &mut tls_port(),
        GREETING,
        &[
            (L(format!("AUTH PLAIN {ir}").leak()), "", "refuse u@x.test: authorization"),
            (
                Fail(AuthError::Authorization("x".into())),
                "-ERR [AUTH] Authorization failed: the authorization identity is not the user name\r\n",
                "read",
            ),
        ],
    );
}

#[test]
fn bad_commands_and_endings() {
    run(
        &mut tls_port(),
        GREETING,
        &[
            (L("STAT"), "-ERR Not logged in\r\n", "read"),
            (L("NOOP"), "-ERR Not logged in\r\n", "read"),
            (L("APOP a b"), "-ERR Unknown command\r\n", "read"),
            (L("USER"), "-ERR Unknown command\r\n", "read"),
            (Raw(b"USER \xff"), "-ERR Invalid user name\r\n", "read"),
            (TooLong, "-ERR Line too long\r\n", "read"),
            (L("USER u"), "+OK\r\n", "read"),
            (
                Raw(b"PASS \xff"),
                "-ERR [AUTH] Authentication failed\r\n",
                "read",
            ),
            (L("QUIT"), "+OK Bye\r\n", "close: quit"),
        ],
    );
    let close = |input, reply: &str, why: &str| {
        run(&mut tls_port(), GREETING, &[(input, reply, why)]);
    };
    close(
        Timeout,
        "-ERR Idle for too long, closing connection\r\n",
        "close: idle timeout",
    );
    close(
        Shutdown,
        "-ERR [SYS/TEMP] Server shutting down\r\n",
        "close: shutdown",
    );
    let mut s = tls_port();
    for _ in 0..MAX_ERRORS - 1 {
        assert_eq!(feed(&mut s, &L("LIST")).0, "-ERR Not logged in\r\n");
    }
    assert_eq!(
        feed(&mut s, &L("LIST")),
        (
            "-ERR Not logged in\r\n-ERR Too many errors, closing connection\r\n".into(),
            "close: too many errors".into()
        )
    );
    let mut s = tls_port();
    for _ in 0..MAX_PREAUTH_COMMANDS - 1 {
        feed(&mut s, &L("CAPA"));
    }
    let (reply, then) = feed(&mut s, &L("QUIT"));
    assert_eq!(
        (reply.as_str(), then.as_str()),
        ("+OK Bye\r\n", "close: quit")
    );
}

#[test]
fn every_refusal_has_its_reply() {
    let cases = [
        (
            AuthError::TokenRefused("invalid_grant".into()),
            "-ERR [AUTH] Authentication failed: no access token for this account",
        ),
        (
            AuthError::UpstreamRefused("x".into()),
            "-ERR [AUTH] Authentication failed: the mail server refused the access token",
        ),
        (
            AuthError::TokenUnavailable("x".into()),
            "-ERR [SYS/TEMP] Temporary authentication failure: token service unavailable",
        ),
        (
            AuthError::UpstreamUnavailable("x".into()),
            "-ERR [SYS/TEMP] Mail server unavailable, try again later",
        ),
        (
            AuthError::UpstreamTemporary("x".into()),
            "-ERR [SYS/TEMP] Temporary authentication failure at the mail server",
        ),
        (
            AuthError::Throttled("x"),
            "-ERR [SYS/TEMP] Too many failed logins; try again later",
        ),
    ];
    for (error, text) in cases {
        let mut s = tls_port();
        feed(&mut s, &L("USER u"));
        feed(&mut s, &L("PASS p"));
        let (reply, then) = feed(&mut s, &Fail(error));
        assert_eq!((reply, then), (format!("{text}\r\n"), "read".to_string()));
    }
}

/// USER before STLS, or on a listener without TLS, is marked with its reason.
#[test]
fn plaintext_refusals_are_marked() {
    use crate::device::refusal::Refused;
    let mut s = Session::new(context(false, true, false));
    s.greeting();
    assert_eq!(
        s.on(Input::Line(b"USER a@x.test")).refused,
        Some(Refused::EncryptionRequired)
    );
    let mut none = Session::new(context(false, false, false));
    none.greeting();
    assert_eq!(
        none.on(Input::Line(b"PASS pw")).refused,
        Some(Refused::PlaintextPassword)
    );
    let mut tls = tls_port();
    tls.greeting();
    assert_eq!(tls.on(Input::Line(b"USER a@x.test")).refused, None);
}
