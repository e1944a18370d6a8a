//! A device's SMTP dialogue after login on a spooling listener. oxbridge
//! answers MAIL, RCPT, DATA and BDAT itself and says `250` only once the
//! message is in the queue. What it can decide alone is refused at once:
//! a sender the login may not use, too many recipients, a message too big.
//! With `rewrite_sender`, a message is stored with the account's mailbox
//! as its sender (its header block is rewritten as it is read, in
//! `serve.rs`); one whose header block is too big for that is refused.
//!
//! [`Intake`] is the state machine, tested byte for byte without a
//! socket; `serve.rs` drives it.

use tracing::warn;

use crate::mailbox::Mailbox;
use crate::wire::smtp::{self as wire, parse_command, parse_path, Command, Reply};
use crate::wire::Farewell;

/// Unrecognised or malformed commands before the connection is closed.
pub const MAX_ERRORS: usize = 10;

/// What the device may do, from `[spool]` and its account.
#[derive(Debug, Clone)]
pub struct Rules {
    pub max_bytes: u64,
    pub max_recipients: usize,
    /// Empty: any sender.
    pub allowed_senders: Vec<String>,
}

/// The message being described.
#[derive(Debug, Default)]
struct Transaction {
    sender: String,
    params: Vec<String>,
    recipients: Vec<String>,
    /// BDAT chunks have been taken (DATA may not follow).
    chunked: bool,
    /// Bytes of the chunks so far.
    chunk_bytes: u64,
    /// A chunk made the message too big: the rest is read and dropped.
    too_big: bool,
    /// ... because of its header block (`rewrite_sender`).
    header_too_big: bool,
    /// A chunk could not be stored: every later command of the
    /// transaction gets 451 until RSET or a new MAIL.
    failed: bool,
}

/// The dialogue's inputs. No `Debug`: a line is the device's.
pub enum Input<'a> {
    Line(&'a [u8]),
    TooLong,
    /// DATA's end was read; `too_big`: the message was over the limit.
    DataEnd {
        too_big: bool,
    },
    /// A BDAT chunk was read (kept, or dropped when not wanted).
    Chunk,
    /// A BDAT chunk was read but could not be stored.
    ChunkNotStored,
    /// DATA's end or a BDAT chunk was read, but the message's header
    /// block is too big to rewrite its sender (`rewrite_sender`).
    HeaderTooBig,
    /// The message is in the queue under this id, or could not be stored.
    Stored(Result<&'a str, ()>),
    Timeout,
    Shutdown,
}

/// What the driver does after writing a step's reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    Read,
    /// Read DATA's body into a new draft, up to `max` bytes.
    ReadData {
        max: u64,
    },
    /// Read a BDAT chunk: into the draft when `keep`, else drop it.
    ReadChunk {
        size: u64,
        keep: bool,
    },
    /// Commit the draft with this envelope.
    Store(Box<Stored>),
    Close(&'static str),
}

/// The envelope of a message to commit.
#[derive(Debug, PartialEq, Eq)]
pub struct Stored {
    pub sender: String,
    pub params: Vec<String>,
    pub recipients: Vec<String>,
}

pub struct Step {
    pub reply: Vec<u8>,
    pub then: Then,
}

impl Step {
    pub(super) fn read(reply: Reply<'_>) -> Step {
        Step {
            reply: reply.to_bytes(),
            then: Then::Read,
        }
    }

    pub(super) fn close(reply: Reply<'_>, why: &'static str) -> Step {
        Step {
            reply: reply.to_bytes(),
            then: Then::Close(why),
        }
    }
}

/// The dialogue of one logged-in device.
pub struct Intake {
    host: String,
    keywords: Vec<String>,
    rules: Rules,
    tx: Option<Transaction>,
    errors: usize,
    /// The reply owed once a dropped BDAT chunk has been read.
    after_chunk: Option<Reply<'static>>,
    /// The chunk being read is the last one (`BDAT n LAST`), and its size.
    last_chunk: bool,
    chunk_size: u64,
    /// `rewrite_sender`: the mailbox every message is sent as.
    rewrite: Option<Mailbox>,
}

impl Intake {
    pub fn new(host: String, keywords: Vec<String>, rules: Rules) -> Intake {
        Intake {
            host,
            keywords,
            rules,
            tx: None,
            errors: 0,
            after_chunk: None,
            last_chunk: false,
            chunk_size: 0,
            rewrite: None,
        }
    }

    fn error(&mut self, reply: Reply<'_>) -> Step {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return Step::close(Reply::TooManyErrors, "too many errors");
        }
        Step::read(reply)
    }

    /// `rewrite_sender`: every message is stored with `mailbox` as its
    /// sender (once the device's own has passed `allowed_senders`).
    pub fn rewrite_sender(&mut self, mailbox: Mailbox) {
        self.rewrite = Some(mailbox);
    }

    pub fn on(&mut self, input: Input<'_>) -> Step {
        match input {
            Input::Line(line) => self.command(line),
            Input::TooLong => self.error(Reply::LineTooLong),
            Input::DataEnd { too_big } => {
                let tx = self.tx.take().unwrap_or_default();
                if too_big {
                    return Step::read(Reply::TooBig);
                }
                self.store(tx)
            }
            Input::Chunk => self.chunk_read(),
            Input::ChunkNotStored => self.chunk_not_stored(),
            Input::HeaderTooBig => self.header_too_big(),
            Input::Stored(Ok(id)) => Step::read(Reply::Queued(id)),
            Input::Stored(Err(())) => Step::read(Reply::NotStored),
            Input::Timeout => Step::close(Reply::Timeout, "idle timeout"),
            Input::Shutdown => Step::close(Reply::Farewell(Farewell::Shutdown), "shutdown"),
        }
    }

    fn store(&mut self, tx: Transaction) -> Step {
        Step {
            reply: Vec::new(),
            then: Then::Store(Box::new(Stored {
                sender: tx.sender,
                params: tx.params,
                recipients: tx.recipients,
            })),
        }
    }

    fn command(&mut self, line: &[u8]) -> Step {
        match parse_command(line) {
            Command::Ehlo(name) => {
                self.tx = None;
                let name = wire::sanitize(name);
                Step::read(Reply::Ehlo {
                    host: &self.host,
                    name: &name,
                    keywords: &self.keywords,
                    starttls: false,
                    auth: true,
                })
            }
            Command::Helo(name) => {
                self.tx = None;
                let name = wire::sanitize(name);
                Step::read(Reply::Helo {
                    host: &self.host,
                    name: &name,
                })
            }
            Command::Mail => self.mail(line),
            Command::Rcpt => self.rcpt(line),
            Command::Data => self.data(),
            Command::Bdat(size) => self.bdat(line, size),
            Command::Rset => {
                self.tx = None;
                Step::read(Reply::Ok)
            }
            Command::Noop => Step::read(Reply::Ok),
            Command::Help => Step::read(Reply::Help),
            Command::Vrfy => Step::read(Reply::CannotVrfy),
            Command::Auth { .. } => Step::read(Reply::AlreadyAuthenticated),
            Command::StartTls => Step::read(Reply::NoStartTls),
            Command::Quit => Step::close(Reply::Bye, "quit"),
            Command::Unknown => self.error(Reply::Unrecognized),
        }
    }

    fn mail(&mut self, line: &[u8]) -> Step {
        if self.tx.as_ref().is_some_and(|t| !t.failed) {
            return Step::read(Reply::NestedMail);
        }
        let Some((sender, params)) =
            parse_path(line, "MAIL FROM:").filter(|(s, _)| !has_controls(s))
        else {
            return self.error(Reply::BadSender);
        };
        let mut kept = Vec::new();
        for p in params {
            let (key, value) = p.split_once('=').unwrap_or((p.as_str(), ""));
            match key {
                "SIZE" => match value.parse::<u64>() {
                    Ok(n) if n > self.rules.max_bytes => return Step::read(Reply::TooBig),
                    Ok(_) => {}
                    Err(_) => return self.error(Reply::UnknownParameter),
                },
                "BODY" if value.eq_ignore_ascii_case("8BITMIME") => {
                    kept.push("BODY=8BITMIME".to_string())
                }
                "BODY" if value.eq_ignore_ascii_case("7BIT") => {}
                "SMTPUTF8" => kept.push("SMTPUTF8".to_string()),
                // RFC 4954: the AUTH parameter may be ignored. DSN's
                // (RET, ENVID) too: oxbridge reports failures itself.
                "AUTH" | "RET" | "ENVID" => {}
                _ => return self.error(Reply::UnknownParameter),
            }
        }
        // The null sender is outside any list: a device never needs to
        // send a bounce.
        if !self.rules.allowed_senders.is_empty()
            && (sender.is_empty()
                || !wire::sender_allowed(&self.rules.allowed_senders, &sender.to_lowercase()))
        {
            warn!(sender = %sender.escape_debug(), "spool refused: sender not allowed for this login");
            self.tx = None;
            return Step::read(Reply::SenderNotAllowedForLogin);
        }
        self.tx = Some(Transaction {
            sender: self.rewrite.as_ref().map_or(sender, |m| m.to_string()),
            params: kept,
            ..Default::default()
        });
        Step::read(Reply::SenderOk)
    }

    fn rcpt(&mut self, line: &[u8]) -> Step {
        let max = self.rules.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return Step::read(Reply::NeedMail);
        };
        if tx.failed {
            return Step::read(Reply::NotStored);
        }
        let Some((rcpt, params)) = parse_path(line, "RCPT TO:") else {
            return self.error(Reply::BadRecipient);
        };
        if !wire::is_mailbox(&rcpt) || has_controls(&rcpt) {
            return self.error(Reply::BadRecipient);
        }
        let dsn = |p: &String| p.starts_with("NOTIFY=") || p.starts_with("ORCPT=");
        if !params.iter().all(dsn) {
            return self.error(Reply::UnknownParameter);
        }
        if tx.recipients.len() >= max {
            return Step::read(Reply::TooManyRecipients);
        }
        tx.recipients.push(rcpt);
        Step::read(Reply::RecipientOk)
    }

    fn data(&mut self) -> Step {
        match &self.tx {
            None => Step::read(Reply::NeedMail),
            Some(tx) if tx.failed => Step::read(Reply::NotStored),
            Some(tx) if tx.recipients.is_empty() => Step::read(Reply::NoRecipients),
            Some(tx) if tx.chunked => Step::read(Reply::NestedMail),
            Some(_) => Step {
                reply: Reply::StartData.to_bytes(),
                then: Then::ReadData {
                    max: self.rules.max_bytes,
                },
            },
        }
    }

    fn bdat(&mut self, line: &[u8], size: Option<u64>) -> Step {
        let Some(size) = size else {
            return self.error(Reply::Unrecognized);
        };
        let last = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_whitespace().nth(2))
            .is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
        self.last_chunk = last;
        self.chunk_size = size;
        let drop_with = match &self.tx {
            None => Some(Reply::NeedMail),
            Some(tx) if tx.failed => Some(Reply::NotStored),
            Some(tx) if tx.recipients.is_empty() => Some(Reply::NoRecipients),
            _ => None,
        };
        if let Some(reply) = drop_with {
            if last && self.tx.as_ref().is_some_and(|t| t.failed) {
                self.tx = None;
            }
            self.after_chunk = Some(reply);
            return Step {
                reply: Vec::new(),
                then: Then::ReadChunk { size, keep: false },
            };
        }
        let max = self.rules.max_bytes;
        let tx = self.tx.as_mut().expect("checked above");
        tx.chunked = true;
        tx.chunk_bytes = tx.chunk_bytes.saturating_add(size);
        tx.too_big |= tx.chunk_bytes > max;
        Step {
            reply: Vec::new(),
            then: Then::ReadChunk {
                size,
                keep: !tx.too_big,
            },
        }
    }

    /// A message is being sent in BDAT chunks (its draft is kept).
    pub fn chunking(&self) -> bool {
        self.tx.as_ref().is_some_and(|t| t.chunked)
    }

    /// The chunk just read could not be stored: the transaction fails
    /// (and ends, if it was the last chunk).
    fn chunk_not_stored(&mut self) -> Step {
        self.after_chunk = None;
        match self.tx.as_mut() {
            Some(_) if self.last_chunk => self.tx = None,
            Some(tx) => tx.failed = true,
            None => {}
        }
        Step::read(Reply::NotStored)
    }

    /// The message's header block is too big to rewrite: the message is
    /// refused; in chunks, the rest of them are read and dropped.
    fn header_too_big(&mut self) -> Step {
        match self.tx.as_mut() {
            Some(tx) if tx.chunked && !self.last_chunk => {
                tx.too_big = true;
                tx.header_too_big = true;
            }
            _ => self.tx = None,
        }
        Step::read(Reply::HeaderTooBig)
    }

    fn chunk_read(&mut self) -> Step {
        if let Some(reply) = self.after_chunk.take() {
            return Step::read(reply);
        }
        let last = self.last_chunk;
        let Some(tx) = self.tx.as_mut() else {
            return Step::read(Reply::NeedMail);
        };
        let too_big = match tx.header_too_big {
            true => Reply::HeaderTooBig,
            false => Reply::TooBig,
        };
        if !last {
            return Step::read(if tx.too_big {
                too_big
            } else {
                Reply::ChunkTaken(self.chunk_size)
            });
        }
        let tx = self.tx.take().expect("checked above");
        if tx.too_big {
            return Step::read(too_big);
        }
        self.store(tx)
    }
}

/// Whether an address holds a control character or white space (never
/// part of an address oxbridge passes on, puts in a report or logs).
fn has_controls(address: &str) -> bool {
    address.chars().any(|c| c.is_control() || c.is_whitespace())
}

#[cfg(test)]
#[path = "intake_tests.rs"]
mod tests;
