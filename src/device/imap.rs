//! An IMAP device before login: greeting with a CAPABILITY code,
//! CAPABILITY, NOOP, ID, LOGOUT, STARTTLS, LOGIN (atoms, quoted strings,
//! `{n}` and `{n+}` literals) and AUTHENTICATE PLAIN (with or without
//! SASL-IR). Anything else gets a tagged `BAD` before login. The device's
//! tagged `OK` carries the upstream's capabilities after login.
//!
//! A line over `max_line` is answered as soon as it passes the bound, with
//! the tag of its command where that can be read (the client stays in
//! step), else with `* BAD`; the driver drops the rest of the line.

use tracing::debug;

use super::{Context, Counters, Dialogue, Input, Limit, Login, Step, Then};
use crate::wire::imap::{
    device_capabilities, is_tag, parse_command, preauth_capabilities, tag_of, Arg, ParseError,
    Received, Receiver, Reply,
};
use crate::wire::sasl::{self, Credentials, SaslError};
use crate::wire::Farewell;

/// The longest tag read from a command line too long to be read whole
/// (its reply echoes the tag).
const MAX_TAG: usize = 64;

#[derive(Debug)]
enum State {
    /// Reading a command (its lines and literals).
    Command,
    StartingTls,
    /// AUTHENTICATE PLAIN, waiting for the response line.
    Plain {
        tag: String,
    },
    /// The login of the command `tag` is under way.
    LoggingIn {
        tag: String,
    },
}

/// An IMAP device's session before login.
pub struct Session {
    ctx: Context,
    receiver: Receiver,
    state: State,
    count: Counters,
    /// The start of the first line of a command whose literals are being
    /// read (at most `MAX_TAG + 1` bytes): its tag answers a continuation
    /// line that is too long.
    command_start: Option<Vec<u8>>,
}

impl Session {
    pub fn new(ctx: Context) -> Session {
        Session {
            ctx,
            receiver: Receiver::default(),
            state: State::Command,
            count: Counters::default(),
            command_start: None,
        }
    }

    fn capabilities(&self) -> String {
        preauth_capabilities(self.ctx.starttls_offered(), self.ctx.auth_allowed())
    }

    /// Reply, then read the next command, unless the session must end.
    fn next(&mut self, reply: Reply<'_>) -> Step {
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

    fn error(&mut self, reply: Reply<'_>) -> Step {
        self.count.errors += 1;
        self.next(reply)
    }

    fn line(&mut self, line: &[u8]) -> Step {
        let start = self.command_start.take();
        match self.receiver.line(line) {
            Received::Command(raw) => {
                self.count.commands += 1;
                self.command(&raw)
            }
            Received::Literal { size, sync } => {
                self.command_start =
                    Some(start.unwrap_or_else(|| line[..line.len().min(MAX_TAG + 1)].to_vec()));
                let go = if sync {
                    Reply::LiteralGo.to_bytes()
                } else {
                    Vec::new()
                };
                Step::new(go, Then::ReadExact(size))
            }
            Received::TooLarge { tag, sync: true } => {
                // The device waits for "+": it will not send the data.
                self.count.commands += 1;
                self.error(Reply::LiteralTooLarge { tag: &tag })
            }
            // LITERAL+: the data is on its way and would be read as commands.
            Received::TooLarge { sync: false, .. } => {
                Step::close(Reply::LiteralTooLargeBye.to_bytes(), "literal too large")
            }
        }
    }

    fn command(&mut self, raw: &[u8]) -> Step {
        let cmd = match parse_command(raw) {
            Ok(c) => c,
            Err(ParseError::Tag) => return self.error(Reply::InvalidTag),
            Err(e) => {
                let (tag, why) = (tag_of(raw), e.to_string());
                return self.error(Reply::Bad {
                    tag: &tag,
                    why: &why,
                });
            }
        };
        let tag = cmd.tag.as_str();
        match cmd.name.as_str() {
            "CAPABILITY" => {
                let capabilities = self.capabilities();
                self.next(Reply::Capability {
                    tag,
                    capabilities: &capabilities,
                })
            }
            "NOOP" => self.next(Reply::Noop { tag }),
            "ID" => {
                let step = self.next(Reply::Id { tag });
                match super::names::imap_id_name(raw) {
                    Some(name) => step.naming(&name),
                    None => step,
                }
            }
            "LOGOUT" => Step::close(Reply::Logout { tag }.to_bytes(), "logout"),
            "STARTTLS" if self.ctx.starttls_offered() => {
                self.state = State::StartingTls;
                Step::new(Reply::BeginTls { tag }.to_bytes(), Then::StartTls)
            }
            "STARTTLS" => self.error(Reply::NoStartTls { tag }),
            "LOGIN" | "AUTHENTICATE" if !self.ctx.auth_allowed() => {
                let why = self.ctx.clear_refusal();
                self.next(Reply::PrivacyRequired { tag }).refusing(why)
            }
            "LOGIN" => {
                let creds = match cmd.args.as_slice() {
                    [user, password] => login_args(user, password),
                    _ => None,
                };
                match creds {
                    Some(creds) => self.login(tag, Ok(creds)),
                    None => self.error(Reply::LoginSyntax { tag }),
                }
            }
            "AUTHENTICATE" => {
                let mechanism = cmd.args.first().and_then(Arg::astring);
                if !mechanism.is_some_and(|m| m.eq_ignore_ascii_case(b"PLAIN")) {
                    return self.next(Reply::UnknownMechanism { tag });
                }
                match cmd.args.get(1).and_then(Arg::astring) {
                    Some(initial) => self.login(tag, plain(initial)),
                    None => {
                        self.state = State::Plain {
                            tag: tag.to_string(),
                        };
                        Step::read(Reply::Continue.to_bytes())
                    }
                }
            }
            _ => self.error(Reply::NotBeforeLogin { tag }),
        }
    }

    /// The credentials of LOGIN or AUTHENTICATE: log in, or say why not.
    fn login(&mut self, tag: &str, creds: Result<Credentials, SaslError>) -> Step {
        match creds {
            Ok(creds) => {
                self.state = State::LoggingIn {
                    tag: tag.to_string(),
                };
                Step::then(Then::Login(Login::Password {
                    creds,
                    client_name: String::new(),
                }))
            }
            Err(SaslError::Canceled) => self.next(Reply::AuthCanceled { tag }),
            Err(SaslError::Authzid { login, authzid }) => {
                self.state = State::LoggingIn {
                    tag: tag.to_string(),
                };
                super::refuse_authorization(login, &authzid)
            }
            Err(e) => {
                debug!(error = %e, "undecodable SASL PLAIN exchange");
                self.count.auth_failures += 1;
                self.next(Reply::Undecodable { tag })
            }
        }
    }
}

/// LOGIN's two astrings, when both are UTF-8 and the user name is not empty.
fn login_args(user: &Arg, password: &Arg) -> Option<Credentials> {
    let login = sasl::utf8(user.astring()?).ok()?;
    let password = sasl::utf8(password.astring()?).ok()?;
    (!login.is_empty()).then(|| Credentials {
        login,
        password: password.into(),
    })
}

/// The tag of a command line too long to be read whole, from its first
/// bytes: its first word, when that is a tag (RFC 3501: one or more
/// ASTRING-CHARs other than `+`, here at most [`MAX_TAG`] of them) and a
/// space follows it. No control byte, CR, LF, NUL, space or byte over 0x7e
/// is ever part of one.
fn long_line_tag(head: &[u8]) -> Option<&str> {
    let end = head.iter().take(MAX_TAG + 1).position(|b| *b == b' ')?;
    let tag = &head[..end];
    match is_tag(tag) {
        true => std::str::from_utf8(tag).ok(),
        false => None,
    }
}

/// A SASL PLAIN response line, decoded.
fn plain(line: &[u8]) -> Result<Credentials, SaslError> {
    sasl::decode_line(line).and_then(|m| sasl::decode_plain(&m))
}

impl Dialogue for Session {
    fn greeting(&mut self) -> Step {
        let capabilities = self.capabilities();
        Step::read(
            Reply::Greeting {
                capabilities: &capabilities,
            }
            .to_bytes(),
        )
    }

    fn on(&mut self, input: Input<'_>) -> Step {
        match (&self.state, input) {
            (_, Input::Shutdown) => {
                Step::close(Reply::Farewell(Farewell::Shutdown).to_bytes(), "shutdown")
            }
            (_, Input::Timeout) => {
                Step::close(Reply::Farewell(Farewell::Idle).to_bytes(), "idle timeout")
            }
            (State::Command, Input::Line(line)) => self.line(line),
            (State::Command, Input::Literal(data)) => {
                self.receiver.literal(data);
                Step::then(Then::Read)
            }
            (State::Command, Input::TooLong(head)) => {
                self.receiver.reset();
                self.count.commands += 1;
                // A continuation line belongs to the command it continues.
                let start = self.command_start.take();
                match long_line_tag(start.as_deref().unwrap_or(head)) {
                    Some(tag) => self.error(Reply::TaggedLineTooLong { tag }),
                    None => self.error(Reply::LineTooLong),
                }
            }
            (State::StartingTls, Input::TlsStarted) => {
                self.ctx.tls = true;
                self.next_bytes(Vec::new())
            }
            (State::Plain { tag }, Input::Line(line)) => {
                let tag = tag.clone();
                self.login(&tag, plain(line))
            }
            (State::Plain { tag }, Input::TooLong(_)) => {
                let tag = tag.clone();
                self.login(&tag, Err(SaslError::TooLong))
            }
            (State::LoggingIn { tag }, Input::LoggedIn { capabilities }) => {
                let tag = tag.clone();
                let capabilities = device_capabilities(capabilities).join(" ");
                let reply = Reply::LoggedIn {
                    tag: &tag,
                    capabilities: &capabilities,
                };
                Step::new(reply.to_bytes(), Then::Relay { replay: Vec::new() })
            }
            (State::LoggingIn { tag }, Input::LoginFailed(e)) => {
                let tag = tag.clone();
                self.count.auth_failures += 1;
                self.next(Reply::Refused {
                    tag: &tag,
                    refusal: e.refusal(),
                })
            }
            (_, _) => {
                // The input itself is not logged: it may be a password.
                debug!(state = ?self.state, "IMAP input out of turn");
                Step::close(Vec::new(), "input out of turn")
            }
        }
    }
}

#[cfg(test)]
#[path = "imap_tests.rs"]
mod tests;
