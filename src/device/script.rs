//! Helpers for the protocol sessions' tests: feed inputs, read replies.

use super::*;

/// A context: TLS or not, STARTTLS possible or not, plaintext allowed or not.
pub fn context(tls: bool, can_starttls: bool, allow_plaintext_auth: bool) -> Context {
    Context {
        host: "proxy.test".into(),
        tls,
        can_starttls,
        allow_plaintext_auth,
    }
}

/// The reply as text, and a short name for what comes next.
pub fn show(step: &Step) -> (String, String) {
    let then = match &step.then {
        Then::Read => "read".to_string(),
        Then::ReadExact(n) => format!("read {n}"),
        Then::Discard(n) => format!("discard {n}"),
        Then::StartTls => "starttls".into(),
        Then::Capabilities => "capabilities".into(),
        Then::Login(Login::Password { creds, client_name }) => {
            format!("login {} as {client_name:?}", creds.login)
        }
        Then::Login(Login::Relay {
            account,
            client_name,
        }) => format!("relay login {account} as {client_name:?}"),
        Then::Refuse { login, error } => format!("refuse {login}: {}", error.reason()),
        Then::Relay { replay } => format!("relay {:?}", String::from_utf8_lossy(replay)),
        Then::Close(why) => format!("close: {why}"),
    };
    (String::from_utf8_lossy(&step.reply).into_owned(), then)
}

/// One input of a test script.
pub enum Feed {
    /// A line from the device.
    L(&'static str),
    /// A line of raw bytes from the device.
    Raw(&'static [u8]),
    TooLong,
    /// A line over `max_line` that began with these bytes.
    Long(&'static [u8]),
    Literal(&'static str),
    Discarded,
    Tls,
    Caps(&'static [&'static str]),
    /// The login went through, with these upstream capabilities.
    Ok(&'static [&'static str]),
    /// The login failed.
    Fail(AuthError),
    Timeout,
    Shutdown,
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Feed one input.
pub fn feed(session: &mut dyn Dialogue, input: &Feed) -> (String, String) {
    let step = match input {
        Feed::L(line) => session.on(Input::Line(line.as_bytes())),
        Feed::Raw(line) => session.on(Input::Line(line)),
        Feed::TooLong => session.on(Input::TooLong(b"")),
        Feed::Long(head) => session.on(Input::TooLong(head)),
        Feed::Literal(data) => session.on(Input::Literal(data.as_bytes())),
        Feed::Discarded => session.on(Input::Discarded),
        Feed::Tls => session.on(Input::TlsStarted),
        Feed::Caps(list) => session.on(Input::Capabilities(&strings(list))),
        Feed::Ok(list) => session.on(Input::LoggedIn {
            capabilities: &strings(list),
        }),
        Feed::Fail(e) => session.on(Input::LoginFailed(e)),
        Feed::Timeout => session.on(Input::Timeout),
        Feed::Shutdown => session.on(Input::Shutdown),
    };
    show(&step)
}

/// Run a script: each input, the exact reply, and what comes next. The
/// greeting is checked first.
pub fn run(session: &mut dyn Dialogue, greeting: &str, script: &[(Feed, &str, &str)]) {
    let (reply, then) = show(&session.greeting());
    assert_eq!(
        (reply.as_str(), then.as_str()),
        (greeting, "read"),
        "greeting"
    );
    for (i, (input, want_reply, want_then)) in script.iter().enumerate() {
        let (reply, then) = feed(session, input);
        assert_eq!(
            (reply.as_str(), then.as_str()),
            (*want_reply, *want_then),
            "step {} of the script",
            i + 1
        );
        assert!(
            crlf_only(&reply),
            "step {}: a bare CR or LF in {reply:?}",
            i + 1
        );
        assert!(
            reply.is_empty() || reply.ends_with("\r\n"),
            "step {}",
            i + 1
        );
    }
}

/// SASL PLAIN's base64 for `authzid NUL login NUL password`.
pub fn plain(authzid: &str, login: &str, password: &str) -> String {
    crate::wire::sasl::encode(format!("{authzid}\0{login}\0{password}").as_bytes())
}

/// Every CR in `text` is followed by LF, and every LF preceded by CR.
pub fn crlf_only(text: &str) -> bool {
    let b = text.as_bytes();
    b.iter().enumerate().all(|(i, c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}
