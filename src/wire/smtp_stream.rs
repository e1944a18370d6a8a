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
//! - With `rewrite_sender` ([`Senders::rewrite`]), every MAIL FROM is
//!   passed on as the mailbox (after the check against `allowed`), and
//!   every message's header block is held and rewritten
//!   ([`Rewriter`]): in DATA before it is stuffed again; in BDAT, chunks
//!   that hold only header are answered here (`250`) and the chunk where
//!   the header block ends goes upstream with its new size. A header
//!   block over the bound ends the session ([`Next::Abort`]).
//!
//! [`Replies`] counts the upstream's complete replies, so that a local
//! reply is written in its turn among them. [`RefusalWatch`] finds the
//! upstream's 4xx and 5xx replies in any relayed SMTP session, so that
//! each is logged with its fix; it keeps one bounded line at a time.

use crate::mailbox::Mailbox;
use crate::wire::message::{DataReader, DataWriter};
use crate::wire::sender_rewrite::Rewriter;
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
    /// `rewrite_sender`: every MAIL FROM and every message's `From:`
    /// become this mailbox (after the check against `allowed`).
    pub rewrite: Option<Mailbox>,
}

/// What the device's next bytes are.
#[derive(Debug)]
enum State {
    Command,
    /// A command line longer than the bound: dropped up to its LF.
    Skipping,
    /// `DATA` was passed on; its reply decides what follows.
    AwaitData,
    /// Inside a message after `354`; with `rewrite_sender`, its header
    /// block is held and rewritten.
    Data(DataReader, DataWriter, Option<Rewriter>),
    /// `rewrite_sender`: the header block was too big; the rest of the
    /// message is read and dropped.
    DataDropped(DataReader),
    /// This many bytes of a BDAT chunk are still to come.
    Chunk(u64),
    /// `rewrite_sender`: a BDAT chunk read while the header block is held
    /// (`size` in all, `left` still to come; `dropped`: the header block
    /// was too big).
    HeldChunk {
        size: u64,
        left: u64,
        last: bool,
        dropped: bool,
    },
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
    /// `consumed` bytes of input are dropped; the device gets `reply` (in
    /// its turn) and the session ends: the upstream has begun a message
    /// that must not be completed (`rewrite_sender`: its header block is
    /// over [`crate::wire::sender_rewrite::MAX_HEADER_BYTES`]).
    Abort {
        consumed: usize,
        reply: Reply<'static>,
    },
}

/// The device's side of a relayed session with restricted senders.
#[derive(Debug)]
pub struct Tracker {
    senders: Senders,
    state: State,
    /// `rewrite_sender`: the rewrite of the message the last MAIL began,
    /// until its header block has gone upstream.
    head: Option<Rewriter>,
}

impl Tracker {
    pub fn new(senders: Senders) -> Tracker {
        Tracker {
            senders,
            state: State::Command,
            head: None,
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
                354 => {
                    self.head = None;
                    let head = self.senders.rewrite.as_deref().map(Rewriter::new);
                    State::Data(DataReader::default(), DataWriter::default(), head)
                }
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
            State::Data(reader, writer, head) => {
                let mut body = Vec::with_capacity(input.len());
                let end = reader.feed(input, &mut body);
                if let Some(rw) = head {
                    let mut rewritten = Vec::with_capacity(body.len());
                    if rw.feed(&body, &mut rewritten).is_err() {
                        let reader = std::mem::take(reader);
                        self.state = State::DataDropped(reader);
                        let consumed = end.unwrap_or(input.len());
                        return self.dropped_data(consumed, end.is_some());
                    }
                    if end.is_some() {
                        rw.finish(&mut rewritten);
                    }
                    body = rewritten;
                }
                // Once the header block is out, the body passes uncopied.
                if head.as_ref().is_some_and(|rw| !rw.in_head()) {
                    *head = None;
                }
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
            State::DataDropped(reader) => {
                let end = reader.feed(input, &mut Vec::new());
                let consumed = end.unwrap_or(input.len());
                self.dropped_data(consumed, end.is_some())
            }
            State::HeldChunk { .. } => self.held_chunk(input, out),
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

    /// DATA's message is being dropped (its header block was too big):
    /// `consumed` bytes of it are; at its end the session is ended.
    fn dropped_data(&mut self, consumed: usize, end: bool) -> Next {
        if !end {
            return Next::Forward {
                consumed,
                command: false,
            };
        }
        self.state = State::Command;
        Next::Abort {
            consumed,
            reply: Reply::HeaderTooBig,
        }
    }

    /// Read a BDAT chunk while the header block is held: its bytes go to
    /// the rewrite; once the header block has ended, the chunk goes
    /// upstream with its new size.
    fn held_chunk(&mut self, input: &[u8], out: &mut Vec<u8>) -> Next {
        let State::HeldChunk { left, dropped, .. } = &mut self.state else {
            unreachable!("called in HeldChunk only");
        };
        let n = (*left).min(input.len() as u64) as usize;
        *left -= n as u64;
        let left = *left;
        if !*dropped {
            let head = self.head.as_mut().expect("held while the head is");
            let mut sent = Vec::new();
            if head.feed(&input[..n], &mut sent).is_err() {
                self.head = None;
                if let State::HeldChunk { dropped, .. } = &mut self.state {
                    *dropped = true;
                }
            } else if !head.in_head() {
                // The header block ended here: the chunk goes with the
                // size it has now; what is left of it follows as it is.
                self.head = None;
                let last = matches!(self.state, State::HeldChunk { last: true, .. });
                bdat_line(sent.len() as u64 + left, last, out);
                out.extend_from_slice(&sent);
                self.state = match left {
                    0 => State::Command,
                    n => State::Chunk(n),
                };
                return Next::Forward {
                    consumed: n,
                    command: true,
                };
            }
        }
        match left {
            0 => self.held_chunk_end(n, out),
            _ => Next::Forward {
                consumed: n,
                command: false,
            },
        }
    }

    /// A held chunk has been read whole (`consumed`: its last bytes, or
    /// its BDAT line for an empty one).
    fn held_chunk_end(&mut self, consumed: usize, out: &mut Vec<u8>) -> Next {
        let State::HeldChunk {
            size,
            left: 0,
            last,
            dropped,
        } = self.state
        else {
            return Next::Forward {
                consumed,
                command: false,
            };
        };
        self.state = State::Command;
        if dropped {
            return Next::Abort {
                consumed,
                reply: Reply::HeaderTooBig,
            };
        }
        if !last {
            return Next::Refuse {
                consumed,
                reply: Reply::ChunkTaken(size),
                sender: None,
            };
        }
        let mut sent = Vec::new();
        if let Some(mut head) = self.head.take() {
            head.finish(&mut sent);
        }
        bdat_line(sent.len() as u64, true, out);
        out.extend_from_slice(&sent);
        Next::Forward {
            consumed,
            command: true,
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
                let checked = !self.senders.allowed.is_empty();
                if checked && (sender.is_empty() || !sender_allowed(&self.senders.allowed, &sender))
                {
                    return Next::Refuse {
                        consumed,
                        reply: match self.senders.relay {
                            true => Reply::SenderNotAllowed,
                            false => Reply::SenderNotAllowedForLogin,
                        },
                        sender: Some(sender),
                    };
                }
                if let Some(mailbox) = &self.senders.rewrite {
                    self.head = Some(Rewriter::new(mailbox));
                    let line = rewrite_mail(line, mailbox);
                    out.extend_from_slice(&crate::wire::line(&line));
                    return Next::Forward {
                        consumed,
                        command: true,
                    };
                }
            }
            Command::Data => self.state = State::AwaitData,
            Command::Bdat(_) if !self.senders.chunking => return refuse(Reply::Unrecognized),
            Command::Bdat(_) => match chunk_size(line) {
                Some((size, last)) if self.head.is_some() => {
                    self.state = State::HeldChunk {
                        size,
                        left: size,
                        last,
                        dropped: false,
                    };
                    return self.held_chunk_end(consumed, out);
                }
                Some((0, _)) => {}
                Some((n, _)) => self.state = State::Chunk(n),
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
/// a server takes as a chunk, and whether it is the last; `None` for any
/// other.
fn chunk_size(line: &[u8]) -> Option<(u64, bool)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ');
    let (_verb, size) = (words.next()?, words.next()?);
    let last = match (words.next(), words.next()) {
        (None, _) => false,
        (Some(last), None) if last.eq_ignore_ascii_case("LAST") => true,
        _ => return None,
    };
    if size.is_empty() || size.len() > 19 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((size.parse().ok()?, last))
}

/// `MAIL FROM:<mailbox>` with the parameters of the device's `line`
/// (whose sender [`mail_sender`] has read).
fn rewrite_mail(line: &[u8], mailbox: &str) -> Vec<u8> {
    let rest = line[10..].trim_ascii_start();
    let params = match rest.strip_prefix(b"<") {
        Some(r) => memchr::memchr(b'>', r).map_or(&[][..], |i| &r[i + 1..]),
        None => memchr::memchr(b' ', rest).map_or(&[][..], |i| &rest[i..]),
    };
    let mut out = format!("MAIL FROM:<{mailbox}>").into_bytes();
    out.extend_from_slice(params);
    out
}

/// `BDAT size [LAST]` with its CRLF.
fn bdat_line(size: u64, last: bool, out: &mut Vec<u8>) {
    let line = match last {
        true => format!("BDAT {size} LAST"),
        false => format!("BDAT {size}"),
    };
    out.extend_from_slice(&crate::wire::line(line.as_bytes()));
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

/// Bytes of a reply line kept for the log (the rest is dropped).
pub const MAX_REFUSAL_LINE: usize = 256;

/// Finds the upstream's refusals (4xx, 5xx) among its replies. Only the
/// first line of each reply is kept, up to [`MAX_REFUSAL_LINE`] bytes.
#[derive(Debug, Default)]
pub struct RefusalWatch {
    /// The line under way (bounded).
    line: Vec<u8>,
    /// The first line of a multi-line refusal under way.
    first: Option<Vec<u8>>,
}

impl RefusalWatch {
    /// Take the upstream's next bytes; `on_refusal` gets each completed
    /// 4xx or 5xx reply's code and first line (without its line end).
    pub fn feed(&mut self, data: &[u8], mut on_refusal: impl FnMut(u16, &[u8])) {
        let mut rest = data;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.take(&rest[..i]);
            self.line_end(&mut on_refusal);
            rest = &rest[i + 1..];
        }
        self.take(rest);
    }

    fn take(&mut self, part: &[u8]) {
        let room = MAX_REFUSAL_LINE.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn line_end(&mut self, on_refusal: &mut impl FnMut(u16, &[u8])) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let code: u16 = std::str::from_utf8(line.get(..3).unwrap_or_default())
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let more = line.get(3) == Some(&b'-');
        let first = match self.first.take() {
            Some(first) => first,
            None if (400..600).contains(&code) => line,
            None => Vec::new(),
        };
        match more {
            true if !first.is_empty() => self.first = Some(first),
            true => {}
            false if !first.is_empty() => {
                let code = first
                    .get(..3)
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(code);
                on_refusal(code, &first)
            }
            false => {}
        }
        self.line.clear();
    }
}

#[cfg(test)]
#[path = "smtp_stream_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "smtp_stream_rewrite_tests.rs"]
mod rewrite_tests;
