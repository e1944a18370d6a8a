//! A relayed SMTP session where the senders are restricted
//! (`allowed_senders`): the device's bytes after login, cut into command
//! lines, DATA bodies and BDAT chunks, so that every MAIL is checked
//! however it is pipelined, and nothing inside a message is taken for a
//! command. Pure: the relay feeds bytes in and gets bytes out.
//!
//! - A command line ends at LF; it is passed on with CRLF. A MAIL whose
//!   sender is not allowed (the null sender included) is not passed on:
//!   the device gets [`Reply::SenderNotAllowedForLogin`] (or the relay
//!   rule's [`Reply::SenderNotAllowed`]). A line over [`MAX_COMMAND_LINE`]
//!   gets [`Reply::LineTooLong`] and is dropped.
//! - After `DATA` nothing is read until the upstream has answered it
//!   ([`Tracker::data_answered`]): only `354` starts a message. The body
//!   is read as the spool reads it ([`DataReader`]: only `CRLF . CRLF`
//!   ends it, a bare LF becomes CRLF) and written out again
//!   ([`DataWriter`]), so the upstream sees the end exactly where oxbridge
//!   saw it.
//! - `BDAT n` is followed by exactly n bytes, passed on untouched. Only
//!   `BDAT <digits> [LAST]` is a chunk; any other BDAT line is refused
//!   here, since a server would refuse it and read the bytes after it as
//!   commands.
//! - A command line is passed on only as a server reads it the same way:
//!   one that starts with white space or holds a control byte is refused,
//!   and a MAIL's sender must be a plain mailbox (no quoted local part)
//!   followed by nothing but parameters.
//!
//! [`Replies`] counts the upstream's complete replies, so that a local
//! reply is written in its turn among them.

use crate::wire::message::{DataReader, DataWriter};
use crate::wire::smtp::{mail_sender, parse_command, sender_allowed, Command, Reply};

/// The longest command line after login (RFC 5321's 512, and room for
/// extensions' parameters).
pub const MAX_COMMAND_LINE: usize = 4096;

/// Which envelope senders a session may use, and how a refusal is worded.
#[derive(Debug, Clone)]
pub struct Senders {
    /// Exact addresses or `*@domain`; never empty (no check otherwise).
    pub allowed: Vec<String>,
    /// A `[[relay]]` rule's list (else the account's).
    pub relay: bool,
    /// Whether the upstream takes BDAT (it announced CHUNKING). Where it
    /// does not, it would read a chunk's bytes as commands: BDAT is then
    /// refused here and what follows is read line by line.
    pub chunking: bool,
}

/// What the device's next bytes are.
#[derive(Debug)]
enum State {
    Command,
    /// A command line longer than the bound: dropped up to its LF.
    Skipping,
    /// `DATA` was passed on; its reply decides what follows.
    AwaitData,
    /// Inside a message after `354`.
    Data(DataReader, DataWriter),
    /// This many bytes of a BDAT chunk are still to come.
    Chunk(u64),
}

/// The tracker's answer for the bytes at the front of its input.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// `consumed` bytes of input became what was appended to `out`, for the
    /// upstream; `command`: one more reply is to come for it.
    Forward { consumed: usize, command: bool },
    /// `consumed` bytes of input are dropped; the device gets `reply` (in
    /// its turn, once the upstream has answered what came before).
    Refuse {
        consumed: usize,
        reply: Reply<'static>,
        /// The refused sender, for the log (empty: the null sender).
        sender: Option<String>,
    },
    /// The input holds no whole line yet.
    NeedMore,
    /// Nothing is read until the upstream answers DATA.
    AwaitReply,
}

/// The device's side of a relayed session with restricted senders.
#[derive(Debug)]
pub struct Tracker {
    senders: Senders,
    state: State,
}

impl Tracker {
    pub fn new(senders: Senders) -> Tracker {
        Tracker {
            senders,
            state: State::Command,
        }
    }

    /// Whether the upstream's next reply is the one to `DATA`.
    pub fn awaits_data_reply(&self) -> bool {
        matches!(self.state, State::AwaitData)
    }

    /// The upstream answered `DATA` with `code`: `354` starts the message.
    pub fn data_answered(&mut self, code: u16) {
        if self.awaits_data_reply() {
            self.state = match code {
                354 => State::Data(DataReader::default(), DataWriter::default()),
                _ => State::Command,
            };
        }
    }

    /// Take what `input` starts with; what goes upstream is appended to `out`.
    pub fn next(&mut self, input: &[u8], out: &mut Vec<u8>) -> Next {
        if input.is_empty() {
            return Next::NeedMore;
        }
        match &mut self.state {
            State::AwaitData => Next::AwaitReply,
            State::Chunk(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                out.extend_from_slice(&input[..n]);
                *left -= n as u64;
                if *left == 0 {
                    self.state = State::Command;
                }
                Next::Forward {
                    consumed: n,
                    command: false,
                }
            }
            State::Data(reader, writer) => {
                let mut body = Vec::with_capacity(input.len());
                let end = reader.feed(input, &mut body);
                writer.stuff(&body, out);
                match end {
                    Some(consumed) => {
                        out.extend_from_slice(&writer.finish());
                        self.state = State::Command;
                        Next::Forward {
                            consumed,
                            command: true,
                        }
                    }
                    None => Next::Forward {
                        consumed: input.len(),
                        command: false,
                    },
                }
            }
            State::Skipping => match memchr::memchr(b'\n', input) {
                Some(i) => {
                    self.state = State::Command;
                    Next::Forward {
                        consumed: i + 1,
                        command: false,
                    }
                }
                None => Next::Forward {
                    consumed: input.len(),
                    command: false,
                },
            },
            State::Command => self.command(input, out),
        }
    }

    fn command(&mut self, input: &[u8], out: &mut Vec<u8>) -> Next {
        let Some(lf) = memchr::memchr(b'\n', input) else {
            if input.len() > MAX_COMMAND_LINE {
                self.state = State::Skipping;
                return Next::Refuse {
                    consumed: input.len(),
                    reply: Reply::LineTooLong,
                    sender: None,
                };
            }
            return Next::NeedMore;
        };
        let consumed = lf + 1;
        let line = &input[..lf];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_COMMAND_LINE {
            return Next::Refuse {
                consumed,
                reply: Reply::LineTooLong,
                sender: None,
            };
        }
        let refuse = |reply| Next::Refuse {
            consumed,
            reply,
            sender: None,
        };
        if line.first().is_some_and(u8::is_ascii_whitespace)
            || line.iter().any(|b| b.is_ascii_control())
        {
            return refuse(Reply::Unrecognized);
        }
        match parse_command(line) {
            Command::Mail => {
                let Some(sender) = mail_sender(line) else {
                    return refuse(Reply::BadSender);
                };
                if sender.is_empty() || !sender_allowed(&self.senders.allowed, &sender) {
                    return Next::Refuse {
                        consumed,
                        reply: match self.senders.relay {
                            true => Reply::SenderNotAllowed,
                            false => Reply::SenderNotAllowedForLogin,
                        },
                        sender: Some(sender),
                    };
                }
            }
            Command::Data => self.state = State::AwaitData,
            Command::Bdat(_) if !self.senders.chunking => return refuse(Reply::Unrecognized),
            Command::Bdat(_) => match chunk_size(line) {
                Some(0) => {}
                Some(n) => self.state = State::Chunk(n),
                None => return refuse(Reply::BdatSyntax),
            },
            _ => {}
        }
        out.extend_from_slice(&crate::wire::line(line));
        Next::Forward {
            consumed,
            command: true,
        }
    }
}

/// The size of `BDAT <digits> [LAST]` (LAST in any case), the only form
/// a server takes as a chunk; `None` for any other.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ');
    let (_verb, size) = (words.next()?, words.next()?);
    match (words.next(), words.next()) {
        (None, _) => {}
        (Some(last), None) if last.eq_ignore_ascii_case("LAST") => {}
        _ => return None,
    }
    if size.is_empty() || size.len() > 19 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    size.parse().ok()
}

/// Counts the upstream's complete replies (multi-line ones once), keeping
/// only the first bytes of the line under way.
#[derive(Debug, Default)]
pub struct Replies {
    head: [u8; 4],
    len: usize,
}

impl Replies {
    /// Take the upstream's next bytes; `on_reply` gets each completed
    /// reply's code (0 when unreadable).
    pub fn feed(&mut self, data: &[u8], mut on_reply: impl FnMut(u16)) {
        for &b in data {
            if b == b'\n' {
                let last = self.len < 4 || self.head[3] == b' ' || self.head[3] == b'\r';
                if last {
                    let code = std::str::from_utf8(&self.head[..self.len.min(3)])
                        .ok()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    on_reply(code);
                }
                self.len = 0;
            } else if self.len < 4 {
                self.head[self.len] = b;
                self.len += 1;
            }
        }
    }
}

#[cfg(test)]
#[path = "smtp_stream_tests.rs"]
mod tests;
