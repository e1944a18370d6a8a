//! IMAP after login, as the relay follows it to move a session onto a new
//! upstream connection: [`View`] keeps what the device's session holds,
//! from the commands and responses the framer (`imap_frame`) finds: the
//! commands in flight, the selected mailbox and its UIDVALIDITY, the
//! ENABLEd extensions, IDLE. Pure: no sockets, no time.

use std::collections::VecDeque;

use super::imap::{is_tag, literal_suffix, parse_command, Arg};
use super::imap_frame::Unit;
use super::imap_sync::count_after;

/// Commands in flight that are followed; a device that pipelines more is
/// not moved (its session ends at token expiry like any unmovable one).
pub const MAX_IN_FLIGHT: usize = 1000;
/// The mailbox a device has selected, to select again on a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub mailbox: Vec<u8>,
    pub examine: bool,
    /// SELECT had parameters (CONDSTORE, QRESYNC): select with CONDSTORE
    /// again, so that FETCH responses keep their MODSEQ.
    pub condstore: bool,
    pub uidvalidity: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Select(Selected),
    Deselect,
    Enable(Vec<String>),
    Idle,
    Other,
}

/// What a response from upstream was, for the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// `* BYE`; `expired` when the server said the token ran out.
    Bye { expired: bool },
    /// `* BAD`.
    Bad,
    /// The tagged end of a command whose synchronising literal the server
    /// refused: the literal will not come.
    LiteralRefused,
    /// Anything else.
    Other,
}

/// What the untagged response with this first line is.
pub fn seen(head: &[u8]) -> Seen {
    let Some(rest) = head.strip_prefix(b"* ") else {
        return Seen::Other;
    };
    let upper = rest[..rest.len().min(64)].to_ascii_uppercase();
    if upper.starts_with(b"BYE") {
        let expired = memchr::memmem::find(head, b"AccessTokenExpired").is_some();
        return Seen::Bye { expired };
    }
    if upper == b"BAD" || upper.starts_with(b"BAD ") {
        return Seen::Bad;
    }
    Seen::Other
}

/// What the device's session holds, from its commands and their results.
#[derive(Debug, Default)]
pub struct View {
    in_flight: VecDeque<(String, Kind)>,
    pub selected: Option<Selected>,
    /// UIDVALIDITY announced while a SELECT or EXAMINE is in flight.
    pending_uidvalidity: Option<u32>,
    pub enabled: Vec<String>,
    /// The IDLE in flight has its `+`; `done`: the device sent DONE.
    idling: bool,
    done: bool,
    /// Why this session cannot be moved, if it cannot.
    pub unmovable: Option<&'static str>,
    /// The tag of a command waiting for the server's `+` before sending
    /// its literal (`*` when the tag is not valid: the server then answers
    /// with an untagged `* BAD`).
    literal_wait: Option<String>,
    /// How many messages the device has been told its mailbox holds.
    pub count: Option<u32>,
    /// Extensions named by `* ENABLED` since the last ENABLE ended.
    granted: Vec<String>,
}

impl View {
    /// A command the device sent upstream.
    pub fn command(&mut self, unit: &Unit) {
        self.literal_wait = None;
        if self.unmovable.is_some() {
            return;
        }
        if self.idle_tag().is_some() && !self.done {
            if unit.head.eq_ignore_ascii_case(b"DONE") {
                self.done = true;
            }
            return;
        }
        let mut words = unit.head.splitn(3, |b| *b == b' ');
        let tag = words.next().unwrap_or_default();
        if !is_tag(tag) {
            // A blank line or a bad tag: the server answers `* BAD` and
            // nothing it could be waited for by.
            return;
        }
        let tag = String::from_utf8_lossy(tag).into_owned();
        let name = words.next().unwrap_or_default().to_ascii_uppercase();
        let kind = match name.as_slice() {
            b"SELECT" | b"EXAMINE" => self.select(unit, name == b"EXAMINE"),
            b"CLOSE" | b"UNSELECT" => Kind::Deselect,
            b"ENABLE" => match parse_command(&unit.head) {
                Ok(c) if !unit.truncated && !unit.literal => Kind::Enable(
                    c.args
                        .iter()
                        .filter_map(Arg::astring)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect(),
                ),
                _ => return self.refuse("ENABLE not understood"),
            },
            b"IDLE" => {
                self.idling = false;
                self.done = false;
                Kind::Idle
            }
            b"COMPRESS" => return self.refuse("COMPRESS"),
            b"NOTIFY" => return self.refuse("NOTIFY"),
            b"STARTTLS" => return self.refuse("STARTTLS"),
            _ => Kind::Other,
        };
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return self.refuse("too many commands in flight");
        }
        self.in_flight.push_back((tag, kind));
    }

    fn select(&mut self, unit: &Unit, examine: bool) -> Kind {
        let parsed = match parse_command(&unit.head) {
            Ok(c) if !unit.truncated && !unit.literal => c,
            // The mailbox name in a literal, or too long to keep.
            _ => {
                self.unmovable = Some("mailbox name not kept");
                return Kind::Other;
            }
        };
        match parsed.args.as_slice() {
            [Arg::Atom(m) | Arg::Str(m), rest @ ..] => Kind::Select(Selected {
                mailbox: m.clone(),
                examine,
                condstore: !rest.is_empty(),
                uidvalidity: None,
            }),
            // The server will answer BAD; nothing changes.
            _ => Kind::Other,
        }
    }

    /// The device sent a line that ends in a synchronising literal and
    /// waits for the server's `+` (`head` is the command so far).
    pub fn literal_announced(&mut self, head: &[u8]) {
        let tag = head.split(|b| *b == b' ').next().unwrap_or_default();
        self.literal_wait = Some(match is_tag(tag) {
            true => String::from_utf8_lossy(tag).into_owned(),
            false => "*".into(),
        });
    }

    fn refuse(&mut self, why: &'static str) {
        self.unmovable = Some(why);
        self.in_flight.clear();
    }

    /// A response the upstream sent the device.
    pub fn response(&mut self, unit: &Unit) -> Seen {
        let head = unit.head.as_slice();
        if self.literal_wait.as_deref() == Some("*") && seen(head) == Seen::Bad {
            self.literal_wait = None;
            return Seen::LiteralRefused;
        }
        if head.starts_with(b"* ") {
            if let Some(v) = uidvalidity(head) {
                self.pending_uidvalidity = Some(v);
            }
            self.count = count_after(self.count, head);
            let enabling = self
                .in_flight
                .iter()
                .any(|(_, k)| matches!(k, Kind::Enable(_)));
            if let Some(names) = enabled_names(head).filter(|_| enabling) {
                self.granted.extend(names);
            }
            return seen(head);
        }
        if head.first() == Some(&b'+') {
            if self.literal_wait.take().is_some() {
                return Seen::Other;
            }
            if self.idle_tag().is_some() {
                self.idling = true;
            }
            return Seen::Other;
        }
        let mut words = head.splitn(3, |b| *b == b' ');
        let tag = words.next().unwrap_or_default();
        let status = words.next().unwrap_or_default().to_ascii_uppercase();
        let Some(at) = self.in_flight.iter().position(|(t, _)| t.as_bytes() == tag) else {
            if self
                .literal_wait
                .as_deref()
                .is_some_and(|t| t.as_bytes() == tag)
            {
                self.literal_wait = None;
                return Seen::LiteralRefused;
            }
            return Seen::Other;
        };
        let (_, kind) = self.in_flight.remove(at).expect("found");
        let ok = status == b"OK";
        match kind {
            Kind::Select(mut s) if ok => {
                s.uidvalidity = self.pending_uidvalidity.take();
                self.selected = Some(s);
            }
            // A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
            Kind::Select(_) if status == b"NO" => {
                self.selected = None;
                self.count = None;
            }
            Kind::Deselect if ok => {
                self.selected = None;
                self.count = None;
            }
            // What the server said it enabled (`* ENABLED`), of what was
            // asked: a server may leave out what it does not know.
            Kind::Enable(asked) if ok => {
                for e in std::mem::take(&mut self.granted) {
                    let known = self.enabled.iter().any(|x| x.eq_ignore_ascii_case(&e));
                    if !known && asked.iter().any(|a| a.eq_ignore_ascii_case(&e)) {
                        self.enabled.push(e);
                    }
                }
            }
            Kind::Enable(_) => self.granted.clear(),
            Kind::Idle => {
                self.idling = false;
                self.done = false;
            }
            _ => {}
        }
        Seen::Other
    }

    fn idle_tag(&self) -> Option<&str> {
        match self.in_flight.back() {
            Some((tag, Kind::Idle)) => Some(tag),
            _ => None,
        }
    }

    /// The session can move now: nothing in flight, or only an IDLE that
    /// has its `+` and no DONE yet. Returns the IDLE's tag in that case.
    pub fn quiet(&self) -> Option<Option<&str>> {
        if self.unmovable.is_some() || self.literal_wait.is_some() {
            return None;
        }
        match self.in_flight.len() {
            0 => Some(None),
            1 if self.idling && !self.done => self.idle_tag().map(Some),
            _ => None,
        }
    }
}

/// What the next command a device sent is, for a move that waits for a
/// command during which expunges may be announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Its line has not ended yet.
    Incomplete,
    /// A command without message numbers whose answer may carry
    /// `EXPUNGE` (RFC 3501 7.4.1: any but FETCH, STORE and SEARCH), and
    /// without a literal: the move can be made before it is sent on.
    MovePoint,
    Other,
}

/// Longest command line looked at for [`next_command`].
const MAX_NEXT_LINE: usize = 8 * 1024;

/// What the command at the start of `pending` is (see [`Next`]).
pub fn next_command(pending: &[u8]) -> Next {
    let Some(end) = memchr::memchr(b'\n', pending) else {
        return match pending.len() < MAX_NEXT_LINE {
            true => Next::Incomplete,
            false => Next::Other,
        };
    };
    let line = &pending[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_NEXT_LINE || literal_suffix(line).is_some() {
        return Next::Other;
    }
    let words: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    if words.len() < 2 || !is_tag(words[0]) {
        return Next::Other;
    }
    let upper = |w: &[u8]| w.to_ascii_uppercase();
    let moves = match upper(words[1]).as_slice() {
        b"NOOP" | b"CHECK" | b"IDLE" | b"SELECT" | b"EXAMINE" | b"STATUS" | b"LIST" | b"LSUB"
        | b"NAMESPACE" | b"EXPUNGE" => true,
        b"UID" => match words.get(2).map(|w| upper(w)).as_deref() {
            Some(b"FETCH" | b"STORE" | b"COPY" | b"MOVE" | b"EXPUNGE") => true,
            Some(b"SEARCH") => !numbers_in_search(&words[3..]),
            _ => false,
        },
        _ => false,
    };
    match moves {
        true => Next::MovePoint,
        false => Next::Other,
    }
}

/// Whether search keys may hold a message number set: a word of digits,
/// `:`, `,` and `*` that is not the argument of a key taking a number or
/// a UID set.
fn numbers_in_search(keys: &[&[u8]]) -> bool {
    const TAKES_NUMBER: [&[u8]; 6] = [
        b"UID", b"LARGER", b"SMALLER", b"MODSEQ", b"OLDER", b"YOUNGER",
    ];
    let bare = |w: &[u8]| -> Vec<u8> {
        w.iter()
            .copied()
            .filter(|b| *b != b'(' && *b != b')')
            .collect()
    };
    keys.iter().enumerate().any(|(i, w)| {
        let w = bare(w);
        !w.is_empty()
            && w.iter().all(|b| b.is_ascii_digit() || b":,*".contains(b))
            && !(i > 0
                && TAKES_NUMBER
                    .iter()
                    .any(|k| bare(keys[i - 1]).eq_ignore_ascii_case(k)))
    })
}

/// The names of a `* ENABLED` response.
fn enabled_names(head: &[u8]) -> Option<Vec<String>> {
    const ENABLED: &[u8] = b"* ENABLED";
    let rest = head
        .get(..ENABLED.len())
        .filter(|p| p.eq_ignore_ascii_case(ENABLED))
        .map(|_| &head[ENABLED.len()..])?;
    if !rest.is_empty() && !rest.starts_with(b" ") {
        return None;
    }
    Some(
        rest.split(|b| *b == b' ')
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect(),
    )
}

/// The UIDVALIDITY of a `* OK [UIDVALIDITY n]` line.
pub fn uidvalidity(head: &[u8]) -> Option<u32> {
    const CODE: &[u8] = b"* OK [UIDVALIDITY ";
    let rest = head
        .get(..CODE.len())
        .filter(|p| p.eq_ignore_ascii_case(CODE))
        .map(|_| &head[CODE.len()..])?;
    let digits: Vec<u8> = rest
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
#[path = "imap_view_tests.rs"]
mod tests;
