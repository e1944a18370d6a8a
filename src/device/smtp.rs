//! An SMTP device before login: greeting, EHLO/HELO, STARTTLS, AUTH PLAIN
//! and AUTH LOGIN (with or without an initial response), RSET, NOOP, HELP,
//! VRFY and QUIT. MAIL, RCPT, DATA and BDAT are refused until the device
//! has logged in, except MAIL from a network with a `[[relay]]` rule,
//! which logs in as the rule's account and replays the MAIL upstream.
//!
//! The device is told in EHLO what the upstream offers ([`Then::Capabilities`]);
//! a login whose upstream no longer offers it is refused with a temporary
//! error rather than relayed into a broken promise.

use tracing::debug;

use super::refusal::Refused;
use super::{
    Context, Counters, Dialogue, Input, Login, Step, Then, MAX_AUTH_FAILURES, MAX_ERRORS,
    MAX_PREAUTH_COMMANDS,
};
use crate::config::RelayConfig;
use crate::error::AuthError;
use crate::wire::sasl::{self, Credentials, SaslError};
use crate::wire::smtp::{self as wire, parse_command, Command, Reply};
use crate::wire::{Farewell, Refusal};

/// A BDAT chunk sent before authentication is read and dropped up to this size.
pub const MAX_PREAUTH_BDAT: u64 = 1024 * 1024;
/// The EHLO name oxbridge uses upstream when the device gave none.
const DEFAULT_CLIENT_NAME: &str = "oxbridge";

/// Where the session is.
#[derive(Debug)]
enum State {
    /// Waiting for a command.
    Command,
    /// EHLO, waiting for the upstream's keywords.
    Ehlo(String),
    StartingTls,
    /// AUTH PLAIN, waiting for the response line.
    Plain,
    /// AUTH LOGIN, waiting for the user name.
    LoginUser,
    /// AUTH LOGIN, waiting for the password.
    LoginPassword(String),
    /// The device's own login is under way.
    LoggingIn(String),
    /// Logging in as a `[[relay]]` account; the MAIL line waits.
    RelayLogin {
        account: String,
        replay: Vec<u8>,
    },
    /// A BDAT chunk before login is being dropped.
    Bdat,
}

/// An SMTP device's session before login.
pub struct Session {
    ctx: Context,
    /// The `[[relay]]` rule for the device's network, if any.
    relay: Option<RelayConfig>,
    /// The EHLO/HELO name, once given (sanitised).
    helo: Option<String>,
    /// EHLO keywords the device was told (what the upstream must honour).
    told: Vec<String>,
    /// On a spooling listener: oxbridge's own EHLO keywords (it takes the
    /// message itself, so the upstream's do not matter).
    spool_keywords: Option<Vec<String>>,
    state: State,
    count: Counters,
}

impl Session {
    pub fn new(
        ctx: Context,
        relay: Option<RelayConfig>,
        spool_keywords: Option<Vec<String>>,
    ) -> Session {
        Session {
            ctx,
            relay,
            helo: None,
            told: Vec::new(),
            spool_keywords,
            state: State::Command,
            count: Counters::default(),
        }
    }

    fn client_name(&self) -> String {
        self.helo
            .clone()
            .unwrap_or_else(|| DEFAULT_CLIENT_NAME.into())
    }

    /// Reply, then read the next command, unless this was the last one allowed.
    fn next(&mut self, reply: Reply<'_>) -> Step {
        self.next_bytes(reply.to_bytes())
    }

    /// [`Session::next`] for a reply already written out.
    fn next_bytes(&mut self, mut out: Vec<u8>) -> Step {
        self.state = State::Command;
        if self.count.commands >= MAX_PREAUTH_COMMANDS {
            out.extend(Reply::TooManyCommands.to_bytes());
            return Step::close(out, "too many commands");
        }
        Step::read(out)
    }

    /// A bad command: counted, and the last one allowed closes the session.
    fn error(&mut self, reply: Reply<'_>) -> Step {
        self.count.errors += 1;
        if self.count.errors >= MAX_ERRORS {
            return Step::close(Reply::TooManyErrors.to_bytes(), "too many errors");
        }
        self.next(reply)
    }

    /// After a failed login: the reply, then the session ends if that was
    /// one failure too many.
    fn after_failed_login(&mut self, reply: Reply<'_>) -> Step {
        if self.count.auth_failures >= MAX_AUTH_FAILURES {
            let mut out = reply.to_bytes();
            out.extend(Reply::TooManyAuthFailures.to_bytes());
            return Step::close(out, "too many failed logins");
        }
        self.next(reply)
    }

    fn command(&mut self, line: &[u8]) -> Step {
        match parse_command(line) {
            Command::Ehlo(name) => {
                self.state = State::Ehlo(name.to_string());
                match self.spool_keywords.clone() {
                    Some(keywords) => self.on(Input::Capabilities(&keywords)),
                    None => Step::then(Then::Capabilities),
                }
            }
            Command::Helo(name) => {
                let name = wire::sanitize(name);
                let reply = Reply::Helo {
                    host: &self.ctx.host,
                    name: &name,
                }
                .to_bytes();
                let step = self.next_bytes(reply).naming(&name);
                self.helo = Some(name);
                self.told.clear();
                step
            }
            Command::StartTls if self.ctx.starttls_offered() => {
                self.state = State::StartingTls;
                Step::new(Reply::ReadyForTls.to_bytes(), Then::StartTls)
            }
            Command::StartTls if self.ctx.tls => self.next(Reply::TlsActive),
            Command::StartTls => self.next(Reply::NoStartTls),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial),
            Command::Mail => self.mail_without_auth(line),
            Command::Rcpt | Command::Data => self.next(Reply::AuthRequired),
            Command::Bdat(Some(n)) if n <= MAX_PREAUTH_BDAT => {
                self.state = State::Bdat;
                Step::then(Then::Discard(n))
            }
            Command::Bdat(_) => Step::close(
                Reply::BdatBeforeAuth.to_bytes(),
                "BDAT before authentication",
            ),
            Command::Rset | Command::Noop => self.next(Reply::Ok),
            Command::Help => self.next(Reply::Help),
            Command::Vrfy => self.next(Reply::CannotVrfy),
            Command::Quit => Step::close(Reply::Bye.to_bytes(), "quit"),
            Command::Unknown => self.error(Reply::Unrecognized),
        }
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&[u8]>) -> Step {
        if self.helo.is_none() {
            return self.next(Reply::HeloFirst);
        }
        if !self.ctx.auth_allowed() {
            let why = self.ctx.clear_refusal();
            return self.next(Reply::EncryptionRequired).refusing(why);
        }
        let initial = initial.map(sasl::decode_line);
        match (mechanism, initial) {
            ("PLAIN", Some(message)) => {
                self.credentials(message.and_then(|m| sasl::decode_plain(&m)))
            }
            ("PLAIN", None) => {
                self.state = State::Plain;
                Step::read(Reply::Challenge("").to_bytes())
            }
            ("LOGIN", Some(user)) => self.login_user(user),
            ("LOGIN", None) => {
                self.state = State::LoginUser;
                Step::read(Reply::Challenge(wire::LOGIN_USER_PROMPT).to_bytes())
            }
            _ => self.next(Reply::UnknownMechanism),
        }
    }

    /// AUTH LOGIN's user name; the password is asked for next.
    fn login_user(&mut self, user: Result<Vec<u8>, SaslError>) -> Step {
        match user.and_then(|u| sasl::utf8(&u)) {
            Ok(user) => {
                self.state = State::LoginPassword(user);
                Step::read(Reply::Challenge(wire::LOGIN_PASSWORD_PROMPT).to_bytes())
            }
            Err(e) => self.credentials(Err(e)),
        }
    }

    /// The decoded SASL exchange: log in, or say why not.
    fn credentials(&mut self, creds: Result<Credentials, SaslError>) -> Step {
        match creds {
            Ok(creds) => {
                self.state = State::LoggingIn(creds.login.clone());
                let client_name = self.client_name();
                Step::then(Then::Login(Login::Password { creds, client_name }))
            }
            Err(SaslError::Canceled) => self.next(Reply::AuthCanceled),
            Err(SaslError::Authzid { login, authzid }) => {
                self.state = State::LoggingIn(login.clone());
                super::refuse_authorization(login, &authzid)
            }
            Err(e) => {
                debug!(error = %e, "undecodable AUTH exchange");
                self.count.auth_failures += 1;
                self.after_failed_login(Reply::Undecodable)
            }
        }
    }

    /// MAIL before AUTH: relayed as a `[[relay]]` account when the device's
    /// network has a rule (and the sender is allowed), else refused.
    fn mail_without_auth(&mut self, line: &[u8]) -> Step {
        let Some(rule) = &self.relay else {
            return self.next(Reply::AuthRequired).refusing(Refused::NoRelay);
        };
        if self.helo.is_none() {
            return self.next(Reply::HeloFirst);
        }
        let Some(sender) = wire::mail_sender(line) else {
            return self.next(Reply::BadSender);
        };
        if !wire::sender_allowed(&rule.allowed_senders, &sender) {
            // The sender itself is not logged: only the reason and the fix.
            return self
                .next(Reply::SenderNotAllowed)
                .refusing(Refused::SenderNotAllowed);
        }
        let account = rule.account.clone();
        self.state = State::RelayLogin {
            account: account.clone(),
            replay: wire::replay(line),
        };
        Step::then(Then::Login(Login::Relay {
            account,
            client_name: self.client_name(),
        }))
    }

    /// Whether the upstream still offers what the device was told; if not,
    /// the login is refused (temporarily) instead of relayed.
    fn promises_broken(&self, login: &str, upstream: &[String]) -> Option<Step> {
        if wire::promises_hold(&self.told, upstream) {
            return None;
        }
        Some(Step::then(Then::Refuse {
            login: login.to_string(),
            error: AuthError::UpstreamTemporary(format!(
                "upstream EHLO changed since the device was told {:?}; it now offers {:?}",
                self.told, upstream
            )),
        }))
    }

    fn logged_in(&mut self, capabilities: &[String]) -> Step {
        match std::mem::replace(&mut self.state, State::Command) {
            State::LoggingIn(login) => {
                if let Some(refuse) = self.promises_broken(&login, capabilities) {
                    self.state = State::LoggingIn(login);
                    return refuse;
                }
                Step::new(
                    Reply::AuthSucceeded.to_bytes(),
                    Then::Relay { replay: Vec::new() },
                )
            }
            State::RelayLogin { account, replay } => {
                let login = format!("relay as {account}");
                if let Some(refuse) = self.promises_broken(&login, capabilities) {
                    self.state = State::RelayLogin { account, replay };
                    return refuse;
                }
                // No reply: the MAIL goes upstream, which answers it.
                Step::then(Then::Relay { replay })
            }
            _ => Step::close(Vec::new(), "login outcome out of turn"),
        }
    }

    fn login_failed(&mut self, e: &AuthError) -> Step {
        let relayed = matches!(self.state, State::RelayLogin { .. });
        if e.refusal() == Refusal::Busy {
            return Step::close(Reply::Refused(Refusal::Busy).to_bytes(), "mailbox busy");
        }
        if relayed {
            let reply = if e.is_temporary() {
                Reply::RelayTemporary
            } else {
                Reply::RelayImpossible
            };
            return self.next(reply);
        }
        self.count.auth_failures += 1;
        self.after_failed_login(Reply::Refused(e.refusal()))
    }
}

impl Dialogue for Session {
    fn greeting(&mut self) -> Step {
        Step::read(
            Reply::Greeting {
                host: &self.ctx.host,
            }
            .to_bytes(),
        )
    }

    fn on(&mut self, input: Input<'_>) -> Step {
        match (&self.state, input) {
            (_, Input::Shutdown) => {
                Step::close(Reply::Farewell(Farewell::Shutdown).to_bytes(), "shutdown")
            }
            (_, Input::Timeout) => Step::close(Reply::Timeout.to_bytes(), "idle timeout"),
            (State::Command, Input::Line(line)) => {
                self.count.commands += 1;
                self.command(line)
            }
            (State::Command, Input::TooLong(_)) => {
                self.count.commands += 1;
                self.error(Reply::LineTooLong)
            }
            (State::Ehlo(name), Input::Capabilities(keywords)) => {
                let name = wire::sanitize(name);
                self.told = keywords.to_vec();
                let reply = Reply::Ehlo {
                    host: &self.ctx.host,
                    name: &name,
                    keywords: &self.told,
                    starttls: self.ctx.starttls_offered(),
                    auth: self.ctx.auth_allowed(),
                }
                .to_bytes();
                let step = self.next_bytes(reply).naming(&name);
                self.helo = Some(name);
                step
            }
            (State::StartingTls, Input::TlsStarted) => {
                self.ctx.tls = true;
                self.helo = None;
                self.told.clear();
                self.next_bytes(Vec::new())
            }
            (State::Plain, Input::Line(line)) => {
                self.credentials(sasl::decode_line(line).and_then(|m| sasl::decode_plain(&m)))
            }
            (State::LoginUser, Input::Line(line)) => self.login_user(sasl::decode_line(line)),
            (State::LoginPassword(user), Input::Line(line)) => {
                let login = user.clone();
                let creds = sasl::decode_line(line)
                    .and_then(|p| sasl::utf8(&p))
                    .map(|p| Credentials {
                        login,
                        password: p.into(),
                    });
                self.credentials(creds)
            }
            (State::Plain | State::LoginUser | State::LoginPassword(_), Input::TooLong(_)) => {
                self.credentials(Err(SaslError::TooLong))
            }
            (State::Bdat, Input::Discarded) => self.next(Reply::AuthRequired),
            (State::LoggingIn(_) | State::RelayLogin { .. }, Input::LoggedIn { capabilities }) => {
                self.logged_in(capabilities)
            }
            (State::LoggingIn(_) | State::RelayLogin { .. }, Input::LoginFailed(e)) => {
                self.login_failed(e)
            }
            (_, _) => {
                // The input itself is not logged: it may be a password.
                debug!(state = ?self.state, "SMTP input out of turn");
                Step::close(Vec::new(), "input out of turn")
            }
        }
    }
}

#[cfg(test)]
#[path = "smtp_tests.rs"]
mod tests;
