//! Every reply an SMTP device can get before login, byte for byte.

use super::*;
use crate::device::script::{context, feed, plain, run, Feed::*};

const GREETING: &str = "220 proxy.test ESMTP oxbridge ready\r\n";
const UPSTREAM: &[&str] = &["SIZE 1000", "PIPELINING", "CHUNKING"];
const REQUIRED: &str = "530 5.7.0 Authentication required\r\n";

/// A session on a plain-text port that offers STARTTLS.
fn starttls_port() -> Session {
    Session::new(context(false, true, false), None, None)
}

/// A session on an implicit-TLS port.
fn tls_port() -> Session {
    Session::new(context(true, false, false), None, None)
}

fn relay_port(allowed: &[&str]) -> Session {
    let rule = RelayConfig {
        from_networks: vec!["192.168.10.0/24".into()],
        account: "scanner@x.test".into(),
        allowed_senders: allowed.iter().map(|s| s.to_string()).collect(),
        allow_public_networks: false,
    };
    Session::new(context(false, false, false), Some(rule), None)
}

#[test]
fn starttls_then_auth_plain() {
    let ir = plain("", "user@x.test", "pw");
    let auth = format!("AUTH PLAIN {ir}").leak();
    run(
        &mut starttls_port(),
        GREETING,
        &[
            (L("EHLO printer.local"), "", "capabilities"),
            (
                Caps(UPSTREAM),
                "250-proxy.test Hello printer.local\r\n250-SIZE 1000\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 STARTTLS\r\n",
                "read",
            ),
            (
                L("AUTH PLAIN"),
                "538 5.7.11 Encryption required for requested authentication mechanism\r\n",
                "read",
            ),
            (L("MAIL FROM:<a@x.test>"), REQUIRED, "read"),
            (L("RCPT TO:<b@x.test>"), REQUIRED, "read"),
            (L("DATA"), REQUIRED, "read"),
            (L("STARTTLS"), "220 2.0.0 Ready to start TLS\r\n", "starttls"),
            (Tls, "", "read"),
            (L("AUTH PLAIN"), "503 5.5.1 Send EHLO or HELO first\r\n", "read"),
            (L("STARTTLS"), "503 5.5.1 TLS already active\r\n", "read"),
            (L("EHLO printer.local"), "", "capabilities"),
            (
                Caps(UPSTREAM),
                "250-proxy.test Hello printer.local\r\n250-SIZE 1000\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-AUTH PLAIN LOGIN\r\n250 AUTH=PLAIN LOGIN\r\n",
                "read",
            ),
            (L(auth), "", "login user@x.test as \"printer.local\""),
            (Ok(UPSTREAM), "235 2.7.0 Authentication successful\r\n", "relay \"\""),
        ],
    );
}

#[test]
fn auth_plain_by_continuation_and_login_both_ways() {
    let ir = plain("", "user@x.test", "pw");
    run(
        &mut tls_port(),
        GREETING,
        &[
            (L("HELO printer"), "250 proxy.test Hello printer\r\n", "read"),
            (L("AUTH PLAIN"), "334 \r\n", "read"),
            (L(ir.leak()), "", "login user@x.test as \"printer\""),
            (
                Fail(AuthError::BadCredentials("wrong password")),
                "535 5.7.8 Authentication credentials invalid\r\n",
                "read",
            ),
            (L("AUTH LOGIN"), "334 VXNlcm5hbWU6\r\n", "read"),
            (L("dXNlckB4LnRlc3Q="), "334 UGFzc3dvcmQ6\r\n", "read"),
            (L("cHc="), "", "login user@x.test as \"printer\""),
            (
                Fail(AuthError::TokenUnavailable("503".into())),
                "454 4.7.0 Temporary authentication failure: token service unavailable\r\n",
                "read",
            ),
            (L("AUTH LOGIN dXNlckB4LnRlc3Q="), "334 UGFzc3dvcmQ6\r\n", "read"),
            (L("cHc="), "", "login user@x.test as \"printer\""),
            (
                Fail(AuthError::UpstreamRefused("535".into())),
                "535 5.7.8 Authentication failed: the mail server refused the access token\r\n421 4.7.0 Too many failed logins, closing connection\r\n",
                "close: too many failed logins",
            ),
        ],
    );
}

/// Cyrus SASL clients send an authorization identity with `-u`: a refused
/// authorization, answered as a failed login, never as a syntax error.
#[test]
fn foreign_authorization_identity_is_a_refused_login() {
    let ir = plain("someone-else@x.test", "user@x.test", "pw");
    let auth = format!("AUTH PLAIN {ir}").leak();
    run(
        &mut tls_port(),
        GREETING,
        &[
            (L("EHLO c"), "", "capabilities"),
            (Caps(&[]), "250-proxy.test Hello c\r\n250-AUTH PLAIN LOGIN\r\n250 AUTH=PLAIN LOGIN\r\n", "read"),
            (L(auth), "", "refuse user@x.test: authorization"),
            (
                Fail(AuthError::Authorization("x".into())),
                "535 5.7.8 Authentication failed: the authorization identity is not the user name\r\n",
                "read",
            ),
        ],
    );
}

#[test]
fn sasl_cancel_garbage_and_unknown_mechanisms() {
    run(
        &mut tls_port(),
        GREETING,
        &[
            (L("EHLO c"), "", "capabilities"),
            (Caps(&[]), "250-proxy.test Hello c\r\n250-AUTH PLAIN LOGIN\r\n250 AUTH=PLAIN LOGIN\r\n", "read"),
            (L("AUTH PLAIN"), "334 \r\n", "read"),
            (L("*"), "501 5.7.0 Authentication canceled\r\n", "read"),
            (L("AUTH PLAIN !!!"), "501 5.5.2 Cannot decode the authentication exchange\r\n", "read"),
            (L("AUTH LOGIN"), "334 VXNlcm5hbWU6\r\n", "read"),
            (TooLong, "501 5.5.2 Cannot decode the authentication exchange\r\n", "read"),
            (
                L("AUTH CRAM-MD5"),
                "504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n",
                "read",
            ),
            (
                L("AUTH PLAIN AGEAYg"),
                "501 5.5.2 Cannot decode the authentication exchange\r\n421 4.7.0 Too many failed logins, closing connection\r\n",
                "close: too many failed logins",
            ),
        ],
    );
}

#[test]
fn housekeeping_commands() {
    run(
        &mut Session::new(context(false, false, true), None, None),
        GREETING,
        &[
            (L("NOOP"), "250 2.0.0 OK\r\n", "read"),
            (L("RSET"), "250 2.0.0 OK\r\n", "read"),
            (
                L("HELP"),
                "214 2.0.0 oxbridge: log in with AUTH PLAIN or AUTH LOGIN, then send mail as usual\r\n",
                "read",
            ),
            (L("VRFY root"), "252 2.5.0 Cannot VRFY user\r\n", "read"),
            (L("STARTTLS"), "502 5.5.1 STARTTLS not available on this port\r\n", "read"),
            (L("XYZZY"), "500 5.5.2 Command unrecognized\r\n", "read"),
            (TooLong, "500 5.5.6 Line too long\r\n", "read"),
            (L("BDAT 10 LAST"), "", "discard 10"),
            (Discarded, REQUIRED, "read"),
            (L("EHLO a\r\n250 fake"), "", "capabilities"),
            (
                Caps(&["SIZE 5"]),
                "250-proxy.test Hello a250fake\r\n250-SIZE 5\r\n250-AUTH PLAIN LOGIN\r\n250 AUTH=PLAIN LOGIN\r\n",
                "read",
            ),
            (L("QUIT"), "221 2.0.0 Bye\r\n", "close: quit"),
        ],
    );
}

#[test]
fn endings() {
    let close = |input, reply: &str, why: &str| {
        run(&mut starttls_port(), GREETING, &[(input, reply, why)]);
    };
    close(
        Timeout,
        "421 4.4.2 Timeout waiting for a command, closing connection\r\n",
        "close: idle timeout",
    );
    close(
        Shutdown,
        "421 4.3.2 Service shutting down, try again later\r\n",
        "close: shutdown",
    );
    close(
        L("BDAT 2000000"),
        "421 4.7.0 BDAT before authentication, closing connection\r\n",
        "close: BDAT before authentication",
    );
    let mut s = starttls_port();
    for _ in 0..MAX_ERRORS - 1 {
        assert_eq!(
            feed(&mut s, &L("XYZZY")).0,
            "500 5.5.2 Command unrecognized\r\n"
        );
    }
    assert_eq!(
        feed(&mut s, &TooLong),
        (
            "421 4.7.0 Too many errors, closing connection\r\n".into(),
            "close: too many errors".into()
        )
    );
    let mut s = starttls_port();
    for _ in 0..MAX_PREAUTH_COMMANDS - 1 {
        assert_eq!(feed(&mut s, &L("NOOP")).0, "250 2.0.0 OK\r\n");
    }
    assert_eq!(
        feed(&mut s, &L("NOOP")),
        (
            "250 2.0.0 OK\r\n421 4.7.0 Too many commands without authentication, closing connection\r\n".into(),
            "close: too many commands".into()
        )
    );
}

#[test]
fn busy_mailbox_and_broken_promises() {
    let ir = plain("", "u@x.test", "pw");
    let auth = format!("AUTH PLAIN {ir}").leak();
    run(
        &mut tls_port(),
        GREETING,
        &[
            (L("EHLO c"), "", "capabilities"),
            (
                Caps(UPSTREAM),
                "250-proxy.test Hello c\r\n250-SIZE 1000\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-AUTH PLAIN LOGIN\r\n250 AUTH=PLAIN LOGIN\r\n",
                "read",
            ),
            (L(auth), "", "login u@x.test as \"c\""),
            // The upstream session no longer offers CHUNKING.
            (Ok(&["SIZE 1000", "PIPELINING"]), "", "refuse u@x.test: upstream_temporary"),
            (
                Fail(AuthError::UpstreamTemporary("changed".into())),
                "454 4.7.0 Temporary authentication failure at the mail server\r\n",
                "read",
            ),
            (L(auth), "", "login u@x.test as \"c\""),
            (
                Fail(AuthError::Busy("20 sessions".into())),
                "421 4.3.2 Too many sessions for this mailbox at once, try again later\r\n",
                "close: mailbox busy",
            ),
        ],
    );
}

/// A device on a `[[relay]]` network sends MAIL without AUTH: oxbridge logs
/// in as the rule's account and replays the MAIL line upstream, ending in
/// CRLF whatever the device ended it with.
#[test]
fn relay_rule_replays_mail_with_crlf() {
    run(
        &mut relay_port(&["*@x.test"]),
        GREETING,
        &[
            (
                L("MAIL FROM:<scan@x.test>"),
                "503 5.5.1 Send EHLO or HELO first\r\n",
                "read",
            ),
            (
                L("HELO printer"),
                "250 proxy.test Hello printer\r\n",
                "read",
            ),
            (
                L("MAIL FROM:<scan@elsewhere.test>"),
                "550 5.7.1 Sender not allowed to relay from this network\r\n",
                "read",
            ),
            (
                L("MAIL FROM:<scan@x.test>"),
                "",
                "relay login scanner@x.test as \"printer\"",
            ),
            (
                Fail(AuthError::UpstreamUnavailable("down".into())),
                "451 4.7.0 Temporary failure relaying for this network, try again later\r\n",
                "read",
            ),
            (
                L("MAIL FROM:<scan@x.test>"),
                "",
                "relay login scanner@x.test as \"printer\"",
            ),
            (
                Fail(AuthError::TokenRefused("invalid_client".into())),
                "554 5.7.1 Relaying for this network is not possible now\r\n",
                "read",
            ),
            (
                L("MAIL FROM:<scan@x.test> SIZE=10"),
                "",
                "relay login scanner@x.test as \"printer\"",
            ),
            (
                Ok(UPSTREAM),
                "",
                "relay \"MAIL FROM:<scan@x.test> SIZE=10\\r\\n\"",
            ),
        ],
    );
}

#[test]
fn every_refusal_has_its_reply() {
    let cases = [
        (
            AuthError::BadCredentials("x"),
            "535 5.7.8 Authentication credentials invalid",
        ),
        (
            AuthError::Authorization("x".into()),
            "535 5.7.8 Authentication failed: the authorization identity is not the user name",
        ),
        (
            AuthError::TokenRefused("invalid_grant: AADSTS50126".into()),
            "535 5.7.8 Authentication failed: no access token for this account",
        ),
        (
            AuthError::UpstreamRefused("x".into()),
            "535 5.7.8 Authentication failed: the mail server refused the access token",
        ),
        (
            AuthError::TokenUnavailable("x".into()),
            "454 4.7.0 Temporary authentication failure: token service unavailable",
        ),
        (
            AuthError::UpstreamUnavailable("x".into()),
            "454 4.7.0 Temporary failure: mail server unavailable, try again later",
        ),
        (
            AuthError::UpstreamTemporary("x".into()),
            "454 4.7.0 Temporary authentication failure at the mail server",
        ),
        (
            AuthError::Throttled("x"),
            "454 4.7.0 Too many failed logins; try again later",
        ),
    ];
    for (error, text) in cases {
        let mut s = tls_port();
        let ir = plain("", "u@x.test", "pw");
        feed(&mut s, &L("HELO c"));
        feed(&mut s, &L(format!("AUTH PLAIN {ir}").leak()));
        let (reply, then) = feed(&mut s, &Fail(error));
        assert_eq!((reply, then), (format!("{text}\r\n"), "read".to_string()));
    }
}

/// The refusals an SMTP device gets from oxbridge itself are marked with
/// their reason, for the log, the counter and the page; EHLO and HELO
/// give the device's name, cleaned.
#[test]
fn refusals_are_marked_and_the_device_is_named() {
    use crate::device::refusal::Refused;
    let mut s = starttls_port();
    s.greeting();
    assert_eq!(feed(&mut s, &L("EHLO mfp-3f.local")).1, "capabilities");
    let step = s.on(Input::Capabilities(&[]));
    assert_eq!(step.name.as_deref(), Some("mfp-3f.local"));
    let step = s.on(Input::Line(b"AUTH PLAIN"));
    assert_eq!(step.refused, Some(Refused::EncryptionRequired));
    let step = s.on(Input::Line(b"MAIL FROM:<a@x.test>"));
    assert_eq!(step.refused, Some(Refused::NoRelay));
    let step = s.on(Input::Line(b"NOOP"));
    assert_eq!((step.refused, step.name), (None, None));

    let mut none = Session::new(context(false, false, false), None, None);
    none.greeting();
    let step = none.on(Input::Line(b"HELO old\x01printer"));
    assert_eq!(step.name.as_deref(), Some("oldprinter"));
    let step = none.on(Input::Line(b"AUTH LOGIN"));
    assert_eq!(step.refused, Some(Refused::PlaintextPassword));

    let mut relay = relay_port(&["scan@x.test"]);
    relay.greeting();
    relay.on(Input::Line(b"HELO scanner"));
    let step = relay.on(Input::Line(b"MAIL FROM:<boss@x.test>"));
    assert_eq!(step.refused, Some(Refused::SenderNotAllowed));

    let mut tls = tls_port();
    tls.greeting();
    tls.on(Input::Line(b"HELO x"));
    assert_eq!(tls.on(Input::Line(b"AUTH LOGIN")).refused, None);
}
