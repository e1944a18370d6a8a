//! A selected mailbox as one IMAP connection has announced it, and what a
//! device must be told when its session moves to another connection.
//!
//! [`Numbers`] follows message numbers and UIDs through a connection's
//! untagged responses, applied in the order they came (`* n EXISTS` adds
//! messages whose UIDs are not known yet, `* n EXPUNGE` and `* VANISHED`
//! remove, `* n FETCH (UID u ...)` tells a UID). [`reconcile`] compares the
//! device's view with the new connection's and words the updates that
//! make the device's message numbers the new connection's: expunges
//! (highest number first, or one `VANISHED` where QRESYNC is enabled),
//! arrivals (`EXISTS`, and `RECENT` before IMAP4rev2), and the flag
//! changes the new connection reported. Pure: no sockets, no time.

use std::collections::HashMap;

use super::imap::{literal_suffix, Reply};

/// Most messages followed in one view; a larger mailbox is not moved.
pub const MAX_MESSAGES: u32 = 1_000_000;

/// Why two views cannot be followed or reconciled.
pub const DISAGREE: &str = "views disagree";
pub const TOO_LARGE: &str = "mailbox too large to move";
pub const BYE: &str = "upstream said BYE while moving";

/// What one untagged response says about the selected mailbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Update<'a> {
    Exists(u32),
    Expunge(u32),
    Recent(u32),
    /// `* VANISHED` without EARLIER: these UIDs left the view.
    Vanished(Vec<(u32, u32)>),
    /// `* n FETCH (...)`: the UID it names, if any; `only_uid` when that is
    /// all it says; `items` is the parenthesised list as it came.
    Fetch {
        n: u32,
        uid: Option<u32>,
        only_uid: bool,
        items: &'a [u8],
    },
    Bye,
    /// Anything else (VANISHED (EARLIER) included: it changes no view).
    Other,
}

/// What the untagged response with this first line (no CRLF) says.
pub fn update(head: &[u8]) -> Update<'_> {
    let Some(rest) = head.strip_prefix(b"* ") else {
        return Update::Other;
    };
    let (first, after) = split_word(rest);
    if first.eq_ignore_ascii_case(b"BYE") {
        return Update::Bye;
    }
    if first.eq_ignore_ascii_case(b"VANISHED") {
        if after.len() >= 9 && after[..9].eq_ignore_ascii_case(b"(EARLIER)") {
            return Update::Other;
        }
        return uid_set(after).map_or(Update::Other, Update::Vanished);
    }
    let Some(n) = number(first) else {
        return Update::Other;
    };
    let (name, items) = split_word(after);
    match name.to_ascii_uppercase().as_slice() {
        b"EXISTS" => Update::Exists(n),
        b"EXPUNGE" => Update::Expunge(n),
        b"RECENT" => Update::Recent(n),
        b"FETCH" => {
            let (uid, only_uid) = fetch_uid(items);
            Update::Fetch {
                n,
                uid,
                only_uid,
                items,
            }
        }
        _ => Update::Other,
    }
}

fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    match s.iter().position(|b| *b == b' ') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &[]),
    }
}

fn number(word: &[u8]) -> Option<u32> {
    if word.is_empty() || word.len() > 10 || !word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(word).ok()?.parse().ok()
}

/// A UID set (`1:3,7,9:*` without `*`) as inclusive ranges.
pub fn uid_set(s: &[u8]) -> Option<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    for part in s.split(|b| *b == b',') {
        let (a, b) = match part.iter().position(|b| *b == b':') {
            Some(i) => (number(&part[..i])?, number(&part[i + 1..])?),
            None => (number(part)?, number(part)?),
        };
        out.push((a.min(b), a.max(b)));
    }
    Some(out)
}

/// How many UIDs a set names.
fn set_size(set: &[(u32, u32)]) -> u64 {
    set.iter().map(|(a, b)| u64::from(b - a) + 1).sum()
}

/// The UID a FETCH item list names, and whether it names nothing else.
/// A literal ends the look (its bytes are not on this line).
fn fetch_uid(items: &[u8]) -> (Option<u32>, bool) {
    let Some(inner) = items.strip_prefix(b"(") else {
        return (None, false);
    };
    let mut uid = None;
    let mut names = 0;
    let mut i = 0;
    loop {
        while inner.get(i) == Some(&b' ') {
            i += 1;
        }
        match inner.get(i) {
            None => return (uid, false),
            Some(b')') => return (uid, names == 1 && uid.is_some()),
            _ => {}
        }
        let start = i;
        let mut brackets = 0u32;
        while let Some(&b) = inner.get(i) {
            match b {
                b'[' => brackets += 1,
                b']' => brackets = brackets.saturating_sub(1),
                b' ' | b'(' | b')' if brackets == 0 => break,
                _ => {}
            }
            i += 1;
        }
        let name = &inner[start..i];
        names += 1;
        if inner.get(i) == Some(&b' ') {
            i += 1;
        }
        let value_start = i;
        match inner.get(i) {
            Some(b'(') => {
                let mut depth = 0u32;
                let mut quoted = false;
                while let Some(&b) = inner.get(i) {
                    i += 1;
                    match b {
                        b'\\' if quoted => i += 1,
                        b'"' => quoted = !quoted,
                        b'(' if !quoted => depth += 1,
                        b')' if !quoted => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            Some(b'"') => {
                i += 1;
                while let Some(&b) = inner.get(i) {
                    i += 1;
                    match b {
                        b'\\' => i += 1,
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            Some(b'{') => return (uid, false),
            _ => {
                while inner.get(i).is_some_and(|b| *b != b' ' && *b != b')') {
                    i += 1;
                }
            }
        }
        if name.eq_ignore_ascii_case(b"UID") {
            uid = number(&inner[value_start..i.min(inner.len())]);
        }
    }
}

/// The message count after an untagged response, as a device following
/// only counts sees it (`None`: not known).
pub fn count_after(count: Option<u32>, head: &[u8]) -> Option<u32> {
    match update(head) {
        Update::Exists(n) => Some(n),
        Update::Expunge(_) => count.map(|c| c.saturating_sub(1)),
        Update::Vanished(set) => count.map(|c| u64::from(c).saturating_sub(set_size(&set)) as u32),
        _ => count,
    }
}

/// A selected mailbox as one connection has announced it: the UID of
/// each message by number (0 until told), and the last item list the
/// connection sent unasked about a message (a flag change), by UID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Numbers {
    uids: Vec<u32>,
    news: HashMap<u32, Box<[u8]>>,
    /// The last `* n RECENT`.
    pub recent: Option<u32>,
}

impl Numbers {
    /// A view of `count` messages whose UIDs are not known yet.
    pub fn new(count: u32) -> Result<Numbers, &'static str> {
        if count > MAX_MESSAGES {
            return Err(TOO_LARGE);
        }
        Ok(Numbers {
            uids: vec![0; count as usize],
            ..Numbers::default()
        })
    }

    pub fn count(&self) -> u32 {
        self.uids.len() as u32
    }

    /// Apply one untagged response (its first line, no CRLF), in stream
    /// order.
    pub fn apply(&mut self, head: &[u8]) -> Result<(), &'static str> {
        match update(head) {
            Update::Exists(n) if n < self.count() => return Err(DISAGREE),
            Update::Exists(n) if n > MAX_MESSAGES => return Err(TOO_LARGE),
            Update::Exists(n) => self.uids.resize(n as usize, 0),
            Update::Expunge(n) if n == 0 || n > self.count() => return Err(DISAGREE),
            Update::Expunge(n) => {
                let uid = self.uids.remove(n as usize - 1);
                self.news.remove(&uid);
            }
            Update::Vanished(mut set) => {
                set.sort_unstable();
                let gone = |uid: &u32| {
                    let i = set.partition_point(|(a, _)| a <= uid);
                    i > 0 && set[i - 1].1 >= *uid
                };
                if self.uids.contains(&0) {
                    // Which numbers left cannot be told: the view starts
                    // again from its count, every UID to be asked for.
                    let left = u64::from(self.count()).saturating_sub(set_size(&set));
                    self.uids = vec![0; left as usize];
                    self.news.clear();
                } else {
                    self.uids.retain(|u| !gone(u));
                    self.news.retain(|u, _| !gone(u));
                }
            }
            Update::Recent(n) => self.recent = Some(n),
            Update::Fetch { n, .. } if n == 0 || n > self.count() => return Err(DISAGREE),
            Update::Fetch {
                n,
                uid,
                only_uid,
                items,
            } => {
                let slot = &mut self.uids[n as usize - 1];
                match uid {
                    Some(u) if *slot == 0 => *slot = u,
                    Some(u) if *slot != u => return Err(DISAGREE),
                    _ => {}
                }
                // A literal's bytes are not on this line: such news
                // cannot be told again as it came.
                if !only_uid && literal_suffix(head).is_some() {
                    return Err("a literal in unasked news while moving");
                }
                // News of a message whose UID is not known yet is left
                // out: the device learns of that message as an arrival.
                if !only_uid && *slot != 0 {
                    self.news.insert(*slot, items.into());
                }
            }
            Update::Bye => return Err(BYE),
            Update::Other => {}
        }
        Ok(())
    }

    /// The first message number whose UID is not known.
    pub fn first_unknown(&self) -> Option<u32> {
        self.uids.iter().position(|u| *u == 0).map(|i| i as u32 + 1)
    }

    /// The highest UID known.
    pub fn highest_known(&self) -> u32 {
        self.uids.iter().copied().max().unwrap_or(0)
    }

    /// The UIDs by message number, when all are known and ascend.
    pub fn uids(&self) -> Result<Vec<u32>, &'static str> {
        if self.uids.contains(&0) || !self.uids.windows(2).all(|w| w[0] < w[1]) {
            return Err(DISAGREE);
        }
        Ok(self.uids.clone())
    }
}

/// How the device is to be told.
#[derive(Debug, Clone, Copy, Default)]
pub struct Telling {
    /// The device enabled QRESYNC: expunges are one `VANISHED`.
    pub vanished: bool,
    /// The device did not enable IMAP4rev2: arrivals come with `RECENT`.
    pub recent: bool,
    /// The device is in a command during which expunges may be announced.
    pub may_expunge: bool,
}

/// What the device is told, and how much of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    pub bytes: Vec<u8>,
    pub expunged: usize,
    pub arrived: usize,
    pub flags: usize,
}

/// Why a device's view was not brought to the new connection's.
#[derive(Debug, PartialEq, Eq)]
pub enum Unreconciled {
    /// Messages left, but the device is at rest: expunges must wait for a
    /// command that may carry them.
    Later,
    /// The views cannot be reconciled.
    Refused(&'static str),
}

/// The updates that bring a device whose view is `device` (UIDs by
/// message number) to the new connection's view `now`.
pub fn reconcile(device: &[u32], now: &Numbers, how: Telling) -> Result<Replay, Unreconciled> {
    let now_uids = now.uids().map_err(Unreconciled::Refused)?;
    if !device.windows(2).all(|w| w[0] < w[1]) {
        return Err(Unreconciled::Refused(DISAGREE));
    }
    let highest = device.last().copied().unwrap_or(0);
    let arrived = now_uids.iter().filter(|u| **u > highest).count();
    // Below the device's highest UID the new view may only have lost
    // messages: UIDs are never given twice.
    if now_uids[..now_uids.len() - arrived]
        .iter()
        .any(|u| device.binary_search(u).is_err())
    {
        return Err(Unreconciled::Refused(DISAGREE));
    }
    let gone: Vec<usize> = device
        .iter()
        .enumerate()
        .filter(|(_, u)| now_uids.binary_search(u).is_err())
        .map(|(i, _)| i)
        .collect();
    if !gone.is_empty() && !how.may_expunge {
        return Err(Unreconciled::Later);
    }
    let mut replay = Replay {
        expunged: gone.len(),
        arrived,
        ..Replay::default()
    };
    if how.vanished && !gone.is_empty() {
        let uids: Vec<u32> = gone.iter().map(|i| device[*i]).collect();
        replay
            .bytes
            .extend(Reply::Vanished(&compact(&uids)).to_bytes());
    } else {
        for i in gone.iter().rev() {
            replay.bytes.extend(Reply::Expunge(i + 1).to_bytes());
        }
    }
    if arrived > 0 {
        replay
            .bytes
            .extend(Reply::Exists(now_uids.len()).to_bytes());
        if let (true, Some(r)) = (how.recent, now.recent) {
            replay.bytes.extend(Reply::Recent(r as usize).to_bytes());
        }
    }
    for (i, uid) in now_uids.iter().enumerate() {
        if let Some(items) = now.news.get(uid) {
            replay.flags += 1;
            replay
                .bytes
                .extend(Reply::Fetch { n: i + 1, items }.to_bytes());
        }
    }
    Ok(replay)
}

/// Ascending UIDs as a short UID set (`3:5,9`).
fn compact(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let mut j = i;
        while j + 1 < uids.len() && uids[j + 1] == uids[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        match i == j {
            true => out.push_str(&uids[i].to_string()),
            false => out.push_str(&format!("{}:{}", uids[i], uids[j])),
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
#[path = "imap_sync_tests.rs"]
mod tests;
