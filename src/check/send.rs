//! `oxbridge check ACCOUNT --send-to ADDRESS`: one short test message,
//! sent through the real path as the account's mailbox: SMTP with XOAUTH2
//! (the delivery worker's login: the mailbox's session slot, a token,
//! STARTTLS), or Microsoft Graph for an account with `send = "graph"`.
//! One line says where it went: the server and its answer (or Graph's),
//! and the Message-ID by which it can be found in the recipient's
//! mailbox; a refusal gets the same diagnosis as `check`.
//!
//! Refused before anything is sent ([`SendError::Usage`], exit status
//! 2): an account no `[[account]]` has; one that needs a device's
//! password (`grant = "password"`, `*@domain` patterns); one whose
//! `protocols` leave out SMTP; an ADDRESS that is not a mail address.

use std::io::Write;

use crate::accounts::Identity;
use crate::app::App;
use crate::config::{protocols_text, Config, Grant, Protocol};
use crate::error::AuthError;
use crate::mailbox::Mailbox;
use crate::upstream::graph::{Doubt, GraphError};
use crate::upstream::Dialer;
use crate::wire::smtp::ServerReply;

/// The test message's subject.
pub const SUBJECT: &str = "oxbridge test message";

/// Why `--send-to` did not get as far as an answer.
#[derive(Debug)]
pub enum SendError {
    /// Not possible with this account or address (exit status 2).
    Usage(String),
    /// oxbridge could not start what sending needs (exit status 1).
    Runtime(String),
}

/// The configured account's login and the recipient, or why not.
fn plan(config: &Config, account: &str, to: &str) -> Result<(String, Mailbox), String> {
    let Some(a) = config
        .accounts
        .iter()
        .find(|a| a.login.eq_ignore_ascii_case(account))
    else {
        return Err(format!("no [[account]] has login {account:?}"));
    };
    let needs_device = if a.grant == Grant::Password {
        Some("grant = \"password\" gets its tokens with a device's own password")
    } else if a.login.starts_with("*@") {
        Some("a *@domain pattern sends as each device's own login")
    } else {
        None
    };
    if let Some(why) = needs_device {
        return Err(format!(
            "account {:?} cannot send a test message from here: {why}, which oxbridge does not have; send one from a device instead",
            a.login
        ));
    }
    if let Some(list) = a.protocols.as_deref().filter(|_| !a.allows(Protocol::Smtp)) {
        return Err(format!(
            "account {:?} may not send mail: its protocols = {} leave out \"smtp\"",
            a.login,
            protocols_text(list)
        ));
    }
    let to =
        Mailbox::parse(to).map_err(|e| format!("--send-to: {to:?} is not a mail address ({e})"))?;
    Ok((a.login.clone(), to))
}

/// The host name as a message may carry it: printable ASCII only.
fn plain(host: &str) -> String {
    host.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// The test message from `from` to `to`: a plain-text note of what sent it.
fn message(from: &Mailbox, to: &Mailbox, message_id: &str, date: &str, host: &str) -> Vec<u8> {
    let lines = [
        format!("From: <{from}>"),
        format!("To: <{to}>"),
        format!("Subject: {SUBJECT}"),
        format!("Date: {date}"),
        format!("Message-ID: {message_id}"),
        "MIME-Version: 1.0".into(),
        "Content-Type: text/plain; charset=utf-8".into(),
        String::new(),
        format!("oxbridge on {} sent this message as {from}", plain(host)),
        "(oxbridge check --send-to), through the path devices' mail takes.".into(),
    ];
    lines
        .iter()
        .flat_map(|l| crate::wire::line(l.as_bytes()))
        .collect()
}

/// Send the test message as `account` to `to`. Writes one line to `out`:
/// where it went, or FAILED with the diagnosis; `Ok(true)` when sent.
pub async fn send_to(
    config: Config,
    account: &str,
    to: &str,
    out: &mut impl Write,
) -> Result<bool, SendError> {
    let (login, to) = plan(&config, account, to).map_err(SendError::Usage)?;
    let app = App::new(config).map_err(|e| SendError::Runtime(e.to_string()))?;
    let id = app
        .accounts()
        .identity(&login)
        .map_err(|e| SendError::Usage(e.to_string()))?;
    let message_id = format!(
        "<{:016x}.oxbridge-check@{}>",
        rand::random::<u64>(),
        id.mailbox.domain()
    );
    let date = crate::spool::dsn::rfc5322_date(crate::state::unix_ms() / 1000);
    let bytes = message(&id.mailbox, &to, &message_id, &date, &app.hostname);
    let recipients = [to.to_string()];
    let (route, sent) = if id.graph {
        ("graph", through_graph(&app, &id, &bytes, &recipients).await)
    } else {
        ("smtp", through_smtp(&app, &id, &bytes, &recipients).await)
    };
    let line = match &sent {
        Ok(answer) => format!(
            "{login}: test message sent as {} to {to}: {answer}; Message-ID {message_id}",
            id.mailbox
        ),
        Err(e) => super::failure_line(&login, route, e),
    };
    writeln!(out, "{line}").map_err(|e| SendError::Runtime(e.to_string()))?;
    Ok(sent.is_ok())
}

/// A refusal of one step of the SMTP dialogue.
fn refused(step: &str, reply: &ServerReply) -> AuthError {
    let detail = format!("{step}: {}", reply.summary());
    match reply.code {
        400..=499 => AuthError::UpstreamTemporary(detail),
        _ => AuthError::UpstreamRefused(detail),
    }
}

/// Log in as the delivery worker does, send, QUIT; the server's answer
/// to the message's end.
async fn through_smtp(
    app: &App,
    id: &Identity,
    message: &[u8],
    recipients: &[String],
) -> Result<String, AuthError> {
    let mut upstream = crate::login::delivery_login(app, id).await?;
    let sent =
        Dialer::send_bytes(&mut upstream.conn, id.mailbox.as_str(), recipients, message).await?;
    Dialer::quit_smtp(&mut upstream.conn).await;
    if sent.mail.code / 100 != 2 {
        return Err(refused("MAIL FROM", &sent.mail));
    }
    if let Some((_, reply)) = sent.recipients.iter().find(|(_, r)| r.code / 100 != 2) {
        return Err(refused("RCPT TO", reply));
    }
    match &sent.data {
        Some(reply) if reply.code / 100 == 2 => Ok(format!(
            "{} (SMTP) answered {}",
            id.provider.address(Protocol::Smtp),
            reply.summary()
        )),
        Some(reply) => Err(refused("DATA", reply)),
        None => Err(AuthError::UpstreamUnavailable(
            "no answer to the message".into(),
        )),
    }
}

/// Microsoft Graph's sendMail with an app-only token.
async fn through_graph(
    app: &App,
    id: &Identity,
    message: &[u8],
    recipients: &[String],
) -> Result<String, AuthError> {
    let token = app.tokens.graph(id).await?;
    let mut doubt = Doubt::default();
    let sent = app
        .graph
        .send(
            &token.secret,
            id.mailbox.as_str(),
            message,
            recipients,
            &mut doubt,
        )
        .await;
    match sent {
        Ok(()) => Ok(format!(
            "Microsoft Graph ({}) answered 202 Accepted to sendMail",
            app.config.upstream.graph_url()
        )),
        Err(GraphError::Temporary(why)) => Err(AuthError::UpstreamTemporary(why)),
        Err(GraphError::Auth(why) | GraphError::Refused(why)) => {
            Err(AuthError::UpstreamRefused(why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$P4NFpwJiZMZfcER4vR97Aw$GUbATMYy+8jUE/yMpkmNHEcWYQ5nKwBQB/cBygLpvsU";

    fn config() -> Config {
        Config::parse(&format!(
            "[oauth]\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             [[listener]]\nprotocol = \"smtp\"\nlisten = \"127.0.0.1:2525\"\ntls = \"none\"\n\
             [[account]]\nlogin = \"scanner@x.test\"\npassword_hash = \"{HASH}\"\ngrant = \"client_credentials\"\nmailbox = \"scans@x.test\"\n\
             [[account]]\nlogin = \"reader@x.test\"\npassword_hash = \"{HASH}\"\ngrant = \"client_credentials\"\nprotocols = [\"imap\"]\n\
             [[account]]\nlogin = \"*@x.test\"\ngrant = \"password\"\n\
             [[account]]\nlogin = \"*@y.test\"\npassword_hash = \"{HASH}\"\ngrant = \"client_credentials\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn send_to_takes_an_exact_account_that_may_send_and_a_mail_address() {
        let c = config();
        let (login, to) = plan(&c, "SCANNER@x.test", "bob@x.test").unwrap();
        assert_eq!(
            (login.as_str(), to.as_str()),
            ("scanner@x.test", "bob@x.test")
        );
        let refused = |account: &str, to: &str| plan(&c, account, to).unwrap_err();
        assert_eq!(
            refused("nobody@x.test", "bob@x.test"),
            "no [[account]] has login \"nobody@x.test\""
        );
        assert!(refused("*@x.test", "bob@x.test").starts_with(
            "account \"*@x.test\" cannot send a test message from here: grant = \"password\" gets its tokens with a device's own password"
        ));
        assert!(refused("*@y.test", "bob@x.test")
            .contains("a *@domain pattern sends as each device's own login"));
        assert_eq!(
            refused("reader@x.test", "bob@x.test"),
            "account \"reader@x.test\" may not send mail: its protocols = [\"imap\"] leave out \"smtp\""
        );
        for bad in [
            "bob",
            "bob@x.test\r\nRCPT TO:<eve@evil.test>",
            "bob@x.test>",
            "a@b@c",
            "",
            "bob@x.test\u{1}",
        ] {
            let err = refused("scanner@x.test", bad);
            assert!(
                err.starts_with("--send-to: ") && err.contains("is not a mail address"),
                "{bad:?}: {err}"
            );
            assert!(
                !err.contains('\r') && !err.contains('\n') && !err.contains('\u{1}'),
                "{err}"
            );
        }
    }

    #[test]
    fn the_test_message_is_crlf_lines_from_the_mailbox_with_its_message_id() {
        let from = Mailbox::parse("scans@x.test").unwrap();
        let to = Mailbox::parse("bob@x.test").unwrap();
        let m = message(
            &from,
            &to,
            "<1.oxbridge-check@x.test>",
            "Sun, 06 Dec 2026 05:00:00 +0000",
            "host\r\nBcc: eve",
        );
        let text = String::from_utf8(m).unwrap();
        assert!(text.starts_with("From: <scans@x.test>\r\nTo: <bob@x.test>\r\nSubject: oxbridge test message\r\nDate: Sun, 06 Dec 2026 05:00:00 +0000\r\nMessage-ID: <1.oxbridge-check@x.test>\r\n"), "{text}");
        assert!(
            text.contains(
                "\r\n\r\noxbridge on host??Bcc:?eve sent this message as scans@x.test\r\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("\r\n"));
        assert_eq!(text.matches('\n').count(), text.matches("\r\n").count());
    }
}
