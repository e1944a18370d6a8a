//! A POP3 device before login: greeting, CAPA, USER/PASS, AUTH PLAIN
//! (initial response or continuation; `AUTH` alone lists PLAIN), STLS and
//! QUIT; anything else gets `-ERR`.

use tracing::debug;

use super::{Context, Counters, Dialogue, Input, Limit, Login, Step, Then};
use crate::wire::pop3::{parse_command, Command, Reply};
use crate::wire::sasl::{self, Credentials, SaslError};
use crate::wire::{Farewell, Refusal};

#[derive(Debug)]
enum State {
    Command,
    StartingTls,
    /// AUTH PLAIN, waiting for the response line.
    Plain,
    LoggingIn,
}

/// A POP3 device's session before login.
pub struct Session {
    ctx: Context,
    /// The name of USER, waiting for PASS.
    user: Option<String>,
    state: State,
    count: Counters,
}

impl Session {
    pub fn new(ctx: Context) -> Session {
        Session {
            ctx,
            user: None,
            state: State::Command,
            count: Counters::default(),
        }
    }

    /// Reply, then read the next command, unless the session must end.
    fn next(&mut self, reply: Reply) -> Step {
        self.next_bytes(reply.to_bytes())
    }

    fn next_bytes(&mut self, out: Vec<u8>) -> Step {
        self.state = State::Command;
        self.count.step(out, |limit| {
            match limit {
                Limit::Commands => Reply::TooManyCommands,
                Limit::Errors => Reply::TooManyErrors,
                Limit::AuthFailures => Reply::TooManyAuthFailures,
            }
            .to_bytes()
        })
    }

    fn error(&mut self, reply: Reply) -> Step {
        self.count.errors += 1;
        self.next(reply)
    }

    fn command(&mut self, line: &[u8]) -> Step {
        let auth = self.ctx.auth_allowed();
        match parse_command(line) {
            Command::Capa => self.next(Reply::Capa {
                auth,
                stls: self.ctx.starttls_offered(),
            }),
            Command::Stls if self.ctx.starttls_offered() => {
                self.state = State::StartingTls;
                Step::new(Reply::BeginTls.to_bytes(), Then::StartTls)
            }
            Command::Stls => self.error(Reply::NoStls),
            Command::User(_) | Command::Pass(_) | Command::Auth { .. } if !auth => {
                let why = self.ctx.clear_refusal();
                self.next(Reply::PlaintextDisabled).refusing(why)
            }
            Command::User(name) => match sasl::utf8(name) {
                Ok(name) => {
                    self.user = Some(name);
                    self.next(Reply::UserOk)
                }
                Err(_) => self.error(Reply::InvalidUser),
            },
            Command::Pass(password) => {
                let Some(login) = self.user.take() else {
                    return self.error(Reply::UserFirst);
                };
                match sasl::utf8(password) {
                    Ok(password) => self.login(Ok(Credentials {
                        login,
                        password: password.into(),
                    })),
                    Err(_) => {
                        self.count.auth_failures += 1;
                        self.next(Reply::Refused(Refusal::BadCredentials))
                    }
                }
            }
            Command::Auth {
                mechanism: None, ..
            } => self.next(Reply::Mechanisms),
            Command::Auth {
                mechanism: Some(mechanism),
                ..
            } if mechanism != "PLAIN" => self.next(Reply::UnknownMechanism),
            Command::Auth {
                initial: Some(initial),
                ..
            } => self.login(plain(initial)),
            Command::Auth { initial: None, .. } => {
                self.state = State::Plain;
                Step::read(Reply::Continue.to_bytes())
            }
            Command::Quit => Step::close(Reply::Bye.to_bytes(), "quit"),
            Command::Noop | Command::Transaction => self.error(Reply::NotLoggedIn),
            Command::Unknown => self.error(Reply::Unknown),
        }
    }

    /// The credentials of PASS or AUTH: log in, or say why not.
    fn login(&mut self, creds: Result<Credentials, SaslError>) -> Step {
        match creds {
            Ok(creds) => {
                self.state = State::LoggingIn;
                Step::then(Then::Login(Login::Password {
                    creds,
                    client_name: String::new(),
                }))
            }
            Err(SaslError::Canceled) => self.next(Reply::AuthCanceled),
            Err(SaslError::Authzid { login, authzid }) => {
                self.state = State::LoggingIn;
                super::refuse_authorization(login, &authzid)
            }
            Err(e) => {
                debug!(error = %e, "undecodable SASL PLAIN exchange");
                self.count.auth_failures += 1;
                self.next(Reply::Undecodable)
            }
        }
    }
}

/// A SASL PLAIN response line, decoded.
fn plain(line: &[u8]) -> Result<Credentials, SaslError> {
    sasl::decode_line(line).and_then(|m| sasl::decode_plain(&m))
}

impl Dialogue for Session {
    fn greeting(&mut self) -> Step {
        Step::read(Reply::Greeting.to_bytes())
    }

    fn on(&mut self, input: Input<'_>) -> Step {
        match (&self.state, input) {
            (_, Input::Shutdown) => {
                Step::close(Reply::Farewell(Farewell::Shutdown).to_bytes(), "shutdown")
            }
            (_, Input::Timeout) => {
                Step::close(Reply::Farewell(Farewell::Idle).to_bytes(), "idle timeout")
            }
            (State::Command, Input::Line(line)) => {
                self.count.commands += 1;
                self.command(line)
            }
            (State::Command, Input::TooLong(_)) => {
                self.count.commands += 1;
                self.error(Reply::LineTooLong)
            }
            (State::StartingTls, Input::TlsStarted) => {
                self.ctx.tls = true;
                self.user = None;
                self.next_bytes(Vec::new())
            }
            (State::Plain, Input::Line(line)) => self.login(plain(line)),
            (State::Plain, Input::TooLong(_)) => self.login(Err(SaslError::TooLong)),
            (State::LoggingIn, Input::LoggedIn { .. }) => Step::new(
                Reply::LoggedIn.to_bytes(),
                Then::Relay { replay: Vec::new() },
            ),
            (State::LoggingIn, Input::LoginFailed(e)) => {
                self.count.auth_failures += 1;
                self.user = None;
                self.next(Reply::Refused(e.refusal()))
            }
            (_, _) => {
                // The input itself is not logged: it may be a password.
                debug!(state = ?self.state, "POP3 input out of turn");
                Step::close(Vec::new(), "input out of turn")
            }
        }
    }
}

#[cfg(test)]
#[path = "pop3_tests.rs"]
mod tests;
