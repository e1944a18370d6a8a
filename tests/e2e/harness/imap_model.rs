//! An IMAP client's model of its selected mailbox, byte by byte and pure
//! (no sockets): where a server's response ends (lines and `{n}`
//! literals), what it says (`EXISTS`, `EXPUNGE`, `RECENT`, `VANISHED`,
//! `FETCH` with its `UID` and `FLAGS`, `SEARCH`, `BYE`, the tagged
//! status), and a [`View`] of message number -> UID and flags that
//! applies every untagged response in stream order and reports a desync:
//! a response that cannot be true of the mailbox the client was told of.

use std::collections::BTreeSet;

/// The largest response a model reads (lines and literals together).
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// The most UIDs a `VANISHED` set may name.
const MAX_VANISHED: usize = 1_000_000;

/// Where the first whole response in `buf` ends: `Ok(None)` while more
/// bytes are needed; an error for a line not ended by CRLF or a response
/// over [`MAX_RESPONSE`].
pub fn response_end(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut at = 0;
    loop {
        let Some(lf) = buf[at..].iter().position(|&b| b == b'\n') else {
            return match buf.len() > MAX_RESPONSE {
                true => Err(format!("a response over {MAX_RESPONSE} bytes")),
                false => Ok(None),
            };
        };
        let end = at + lf;
        if end == at || buf[end - 1] != b'\r' {
            return Err(format!(
                "a line ended by a bare LF: {:?}",
                String::from_utf8_lossy(&buf[at..=end])
            ));
        }
        let line = &buf[at..end - 1];
        match literal_size(line) {
            Some(n) if n > MAX_RESPONSE => return Err(format!("a literal of {n} bytes")),
            Some(n) => {
                at = end + 1 + n;
                if at > MAX_RESPONSE {
                    return Err(format!("a response over {MAX_RESPONSE} bytes"));
                }
                if buf.len() < at {
                    return Ok(None);
                }
            }
            None => return Ok(Some(end + 1)),
        }
    }
}

/// The size of the literal a line (without its CRLF) announces at its end.
fn literal_size(line: &[u8]) -> Option<usize> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One server response, as far as the model cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `tag OK|NO|BAD text`.
    Tagged {
        tag: String,
        status: String,
        text: String,
    },
    /// `+ ...`.
    Continue,
    Exists(u32),
    Expunge(u32),
    Recent(u32),
    /// `* VANISHED [(EARLIER)] set`, expanded.
    Vanished {
        earlier: bool,
        uids: Vec<u32>,
    },
    /// `* n FETCH (...)`: its UID and FLAGS items, if it had them.
    Fetch {
        msn: u32,
        uid: Option<u32>,
        flags: Option<BTreeSet<String>>,
    },
    /// `* SEARCH n...`.
    Search(Vec<u32>),
    /// `* BYE text`.
    Bye(String),
    /// Any other untagged response (`OK`, `FLAGS`, `CAPABILITY`, ...).
    Other,
}

/// What one whole response (as [`response_end`] cut it) says.
pub fn parse(whole: &[u8]) -> Result<Response, String> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let line_end = whole
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(whole.len());
    let first = &whole[..line_end];
    if first.starts_with(b"+") {
        return Ok(Response::Continue);
    }
    let Some(rest) = first.strip_prefix(b"* ") else {
        let mut words = first.splitn(3, |&b| b == b' ');
        let tag = text(words.next().unwrap_or_default());
        let status = text(words.next().unwrap_or_default()).to_ascii_uppercase();
        if tag.is_empty() || !["OK", "NO", "BAD"].contains(&status.as_str()) {
            return Err(format!("not an IMAP response: {:?}", text(first)));
        }
        let text = text(words.next().unwrap_or_default());
        return Ok(Response::Tagged { tag, status, text });
    };
    let mut words = rest.splitn(3, |&b| b == b' ');
    let w1 = text(words.next().unwrap_or_default()).to_ascii_uppercase();
    let w2 = text(words.next().unwrap_or_default()).to_ascii_uppercase();
    if let Ok(n) = w1.parse::<u32>() {
        return match w2.as_str() {
            "EXISTS" => Ok(Response::Exists(n)),
            "EXPUNGE" => Ok(Response::Expunge(n)),
            "RECENT" => Ok(Response::Recent(n)),
            "FETCH" => {
                let at = 2 + w1.len() + 1 + w2.len() + 1;
                fetch_items(n, whole.get(at..).unwrap_or_default())
            }
            _ => Ok(Response::Other),
        };
    }
    match w1.as_str() {
        "BYE" => Ok(Response::Bye(text(rest.get(4..).unwrap_or_default()))),
        "SEARCH" => {
            let nums = rest[6..]
                .split(|&b| b == b' ')
                .filter(|w| !w.is_empty())
                .map(|w| number(w).ok_or_else(|| format!("a SEARCH of {:?}", text(first))))
                .collect::<Result<_, _>>()?;
            Ok(Response::Search(nums))
        }
        "VANISHED" => {
            let earlier = w2 == "(EARLIER)";
            let set = match earlier {
                true => text(words.next().unwrap_or_default()),
                false => w2,
            };
            Ok(Response::Vanished {
                earlier,
                uids: uid_set(&set)?,
            })
        }
        _ => Ok(Response::Other),
    }
}

fn number(w: &[u8]) -> Option<u32> {
    std::str::from_utf8(w).ok()?.parse().ok()
}

/// `1:3,7` -> [1, 2, 3, 7].
fn uid_set(set: &str) -> Result<Vec<u32>, String> {
    let mut uids = Vec::new();
    for part in set.split(',') {
        let bad = || format!("a UID set of {set:?}");
        let (a, b) = part.split_once(':').unwrap_or((part, part));
        let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        let (lo, hi) = (a.min(b), a.max(b));
        if uids.len() + (hi - lo) as usize >= MAX_VANISHED {
            return Err(bad());
        }
        uids.extend(lo..=hi);
    }
    Ok(uids)
}

/// A cursor over a FETCH's item list.
struct Items<'a> {
    b: &'a [u8],
    at: usize,
}

impl Items<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    fn err(&self, what: &str) -> String {
        format!(
            "FETCH items: {what} at byte {} of {:?}",
            self.at,
            String::from_utf8_lossy(&self.b[..self.b.len().min(300)])
        )
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.at += 1;
        }
    }

    /// An item's name: an atom that may hold `[...]` (with spaces and
    /// parentheses inside) and a `<...>` partial suffix.
    fn name(&mut self) -> Result<String, String> {
        let start = self.at;
        let mut depth = 0;
        while let Some(c) = self.peek() {
            match c {
                b'[' => depth += 1,
                b']' => depth -= 1,
                b' ' | b')' | b'(' if depth == 0 => break,
                b'\r' | b'\n' => return Err(self.err("a line end in a name")),
                _ => {}
            }
            self.at += 1;
        }
        if self.at == start {
            return Err(self.err("no item name"));
        }
        Ok(String::from_utf8_lossy(&self.b[start..self.at]).to_ascii_uppercase())
    }

    /// An atom or number value.
    fn atom(&mut self) -> Result<&[u8], String> {
        let start = self.at;
        while let Some(c) = self.peek() {
            if matches!(c, b' ' | b'(' | b')' | b'\r' | b'\n' | b'"' | b'{') {
                break;
            }
            self.at += 1;
        }
        match self.at > start {
            true => Ok(&self.b[start..self.at]),
            false => Err(self.err("no value")),
        }
    }

    /// Skip one value: an atom, a quoted string, a literal or a list.
    fn skip_value(&mut self) -> Result<(), String> {
        match self.peek() {
            Some(b'"') => {
                self.at += 1;
                loop {
                    match self.peek() {
                        Some(b'\\') => self.at += 2,
                        Some(b'"') => break,
                        Some(b'\r') | Some(b'\n') | None => {
                            return Err(self.err("an unended string"))
                        }
                        Some(_) => self.at += 1,
                    }
                }
                self.at += 1;
            }
            Some(b'{') => {
                let close = self.b[self.at..]
                    .iter()
                    .position(|&b| b == b'}')
                    .ok_or_else(|| self.err("an unended literal"))?;
                let n: usize = std::str::from_utf8(&self.b[self.at + 1..self.at + close])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| self.err("a bad literal size"))?;
                self.at += close + 1;
                if self.b.get(self.at..self.at + 2) != Some(b"\r\n") {
                    return Err(self.err("no CRLF after a literal's size"));
                }
                self.at += 2 + n;
                if self.at > self.b.len() {
                    return Err(self.err("a short literal"));
                }
            }
            Some(b'(') => {
                self.at += 1;
                loop {
                    self.skip_spaces();
                    match self.peek() {
                        Some(b')') => break,
                        None => return Err(self.err("an unended list")),
                        _ => self.skip_value()?,
                    }
                }
                self.at += 1;
            }
            _ => {
                self.atom()?;
            }
        }
        Ok(())
    }

    /// A parenthesised list of flags.
    fn flags(&mut self) -> Result<BTreeSet<String>, String> {
        if self.peek() != Some(b'(') {
            return Err(self.err("FLAGS without a list"));
        }
        self.at += 1;
        let mut flags = BTreeSet::new();
        loop {
            self.skip_spaces();
            match self.peek() {
                Some(b')') => break,
                Some(_) => {
                    let f = String::from_utf8_lossy(self.atom()?).into_owned();
                    flags.insert(f);
                }
                None => return Err(self.err("an unended FLAGS list")),
            }
        }
        self.at += 1;
        Ok(flags)
    }
}

/// The items of `* msn FETCH (...)`: `b` starts at its `(`.
fn fetch_items(msn: u32, b: &[u8]) -> Result<Response, String> {
    let mut it = Items { b, at: 0 };
    if it.peek() != Some(b'(') {
        return Err(it.err("no item list"));
    }
    it.at += 1;
    let (mut uid, mut flags) = (None, None);
    loop {
        it.skip_spaces();
        match it.peek() {
            Some(b')') => break,
            None => return Err(it.err("an unended item list")),
            _ => {}
        }
        let name = it.name()?;
        it.skip_spaces();
        match name.as_str() {
            "UID" => {
                uid = Some(number(it.atom()?).ok_or_else(|| it.err("a bad UID"))?);
            }
            "FLAGS" => flags = Some(it.flags()?),
            _ => it.skip_value()?,
        }
    }
    if it.b.get(it.at + 1..) != Some(b"\r\n") {
        return Err(it.err("bytes after the item list"));
    }
    Ok(Response::Fetch { msn, uid, flags })
}

/// The command a response answers: what it may say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// No command in progress: nothing may be expunged (RFC 3501 7.4.1).
    Rest,
    /// FETCH or STORE by message number: no EXPUNGE either.
    BySequence,
    /// `SEARCH` by message number: no EXPUNGE; every number in the count.
    Search,
    /// `FETCH 1:* (UID)`: no EXPUNGE; the answers must cover the model's
    /// whole message number -> UID map, in order.
    AllUids,
    /// `UID SEARCH ALL`: exactly the model's UIDs, as the SEARCH line arrives.
    UidSearchAll,
    /// Anything else (IDLE, NOOP, EXPUNGE, UID commands, APPEND, SELECT).
    Other,
}

impl Cmd {
    fn expunge_allowed(self) -> bool {
        matches!(self, Cmd::UidSearchAll | Cmd::Other)
    }
}

/// What the model holds of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Msg {
    pub uid: Option<u32>,
    /// Only what the server told, without `\Recent` (which is per session).
    pub flags: Option<BTreeSet<String>>,
}

/// A client's view of its selected mailbox (index: message number - 1).
#[derive(Debug, Clone, Default)]
pub struct View {
    pub msgs: Vec<Msg>,
    cmd: Option<Cmd>,
    /// For [`Cmd::AllUids`]: the count when it began, and how many
    /// message numbers were answered in order so far.
    all_uids: (usize, usize),
}

impl View {
    pub fn count(&self) -> usize {
        self.msgs.len()
    }

    /// A command is sent (`Cmd::Rest`: none is in progress).
    pub fn begin(&mut self, cmd: Cmd) {
        self.cmd = Some(cmd);
        self.all_uids = (self.msgs.len(), 0);
    }

    /// The command's tagged answer came with `status`.
    pub fn end(&mut self, status: &str) -> Result<(), String> {
        let cmd = self.cmd.replace(Cmd::Rest);
        let (at_start, answered) = self.all_uids;
        if cmd == Some(Cmd::AllUids) && status == "OK" && answered < at_start {
            return Err(format!(
                "FETCH 1:* (UID) answered {answered} of the {at_start} messages in order"
            ));
        }
        Ok(())
    }

    /// Forget the flags of message `msn` (the client changed them silently).
    pub fn forget_flags(&mut self, msn: usize) {
        if let Some(m) = self.msgs.get_mut(msn.wrapping_sub(1)) {
            m.flags = None;
        }
    }

    /// Apply one response in stream order; an error is a desync.
    pub fn apply(&mut self, r: &Response) -> Result<(), String> {
        let cmd = self.cmd.unwrap_or(Cmd::Rest);
        let count = self.msgs.len();
        match r {
            Response::Exists(n) => {
                let n = *n as usize;
                if n < count {
                    return Err(format!(
                        "* {n} EXISTS below the count {count} without EXPUNGE"
                    ));
                }
                self.msgs.resize(n, Msg::default());
            }
            Response::Expunge(n) => {
                if !cmd.expunge_allowed() {
                    return Err(format!("* {n} EXPUNGE during {cmd:?}"));
                }
                let n = *n as usize;
                if n == 0 || n > count {
                    return Err(format!("* {n} EXPUNGE beyond the count {count}"));
                }
                self.msgs.remove(n - 1);
            }
            Response::Vanished { uids, .. } => {
                if !cmd.expunge_allowed() {
                    return Err(format!("VANISHED during {cmd:?}"));
                }
                for uid in uids {
                    match self.msgs.iter().position(|m| m.uid == Some(*uid)) {
                        Some(i) => {
                            self.msgs.remove(i);
                        }
                        None if self.msgs.iter().any(|m| m.uid.is_none()) => {
                            return Err(format!("VANISHED UID {uid}, which the model cannot place"))
                        }
                        None => {}
                    }
                }
            }
            Response::Recent(n) if *n as usize > count => {
                return Err(format!("* {n} RECENT beyond the count {count}"));
            }
            Response::Fetch { msn, uid, flags } => self.fetched(cmd, *msn as usize, *uid, flags)?,
            Response::Search(nums) => self.searched(cmd, nums)?,
            _ => {}
        }
        Ok(())
    }

    fn fetched(
        &mut self,
        cmd: Cmd,
        msn: usize,
        uid: Option<u32>,
        flags: &Option<BTreeSet<String>>,
    ) -> Result<(), String> {
        let count = self.msgs.len();
        if msn == 0 || msn > count {
            return Err(format!("* {msn} FETCH beyond the count {count}"));
        }
        if let Some(u) = uid {
            if let Some(known) = self.msgs[msn - 1].uid {
                if known != u {
                    return Err(format!(
                        "* {msn} FETCH (UID {u}): the model has UID {known} there"
                    ));
                }
            }
            let below = self.msgs[..msn - 1].iter().filter_map(|m| m.uid).max();
            let above = self.msgs[msn..].iter().filter_map(|m| m.uid).min();
            if below.is_some_and(|b| b >= u) || above.is_some_and(|a| a <= u) {
                return Err(format!(
                    "* {msn} FETCH (UID {u}) out of order: UIDs {below:?} below, {above:?} above"
                ));
            }
            self.msgs[msn - 1].uid = Some(u);
            if cmd == Cmd::AllUids {
                if msn != self.all_uids.1 + 1 {
                    return Err(format!(
                        "FETCH 1:* (UID) answered message {msn} after {}",
                        self.all_uids.1
                    ));
                }
                self.all_uids.1 = msn;
            }
        }
        if let Some(f) = flags {
            let mut f = f.clone();
            f.retain(|x| !x.eq_ignore_ascii_case("\\Recent"));
            self.msgs[msn - 1].flags = Some(f);
        }
        Ok(())
    }

    fn searched(&mut self, cmd: Cmd, nums: &[u32]) -> Result<(), String> {
        let count = self.msgs.len();
        match cmd {
            Cmd::UidSearchAll => {
                let mut uids = nums.to_vec();
                uids.sort_unstable();
                uids.dedup();
                if uids.len() != count {
                    return Err(format!(
                        "UID SEARCH ALL found {} UIDs, the model has {count} messages",
                        uids.len()
                    ));
                }
                for (i, (m, u)) in self.msgs.iter_mut().zip(&uids).enumerate() {
                    match m.uid {
                        Some(k) if k != *u => {
                            return Err(format!(
                            "UID SEARCH ALL: message {} is UID {k} in the model, {u} by the search",
                            i + 1
                        ))
                        }
                        _ => m.uid = Some(*u),
                    }
                }
            }
            Cmd::Search => {
                if let Some(n) = nums.iter().find(|&&n| n == 0 || n as usize > count) {
                    return Err(format!("SEARCH found message {n} beyond the count {count}"));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Compare with the server's own `(UID, flags)` list of the mailbox:
    /// the same messages in order (a UID the model never learned matches
    /// any), and the same flags wherever the model knows them.
    pub fn compare(&self, server: &[(u32, BTreeSet<String>)]) -> Result<(), String> {
        if self.msgs.len() != server.len() {
            return Err(format!(
                "the model has {} messages, the server {}",
                self.msgs.len(),
                server.len()
            ));
        }
        for (i, (m, (uid, flags))) in self.msgs.iter().zip(server).enumerate() {
            let n = i + 1;
            if m.uid.is_some_and(|u| u != *uid) {
                return Err(format!(
                    "message {n}: UID {:?} in the model, {uid} on the server",
                    m.uid
                ));
            }
            let mut flags = flags.clone();
            flags.retain(|x| !x.eq_ignore_ascii_case("\\Recent"));
            if m.flags.as_ref().is_some_and(|f| *f != flags) {
                return Err(format!(
                    "message {n} (UID {uid}): flags {:?} in the model, {flags:?} on the server",
                    m.flags
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(f: &[&str]) -> Option<BTreeSet<String>> {
        Some(f.iter().map(|s| s.to_string()).collect())
    }

    fn one(bytes: &[u8]) -> Response {
        let end = response_end(bytes).unwrap().expect("whole");
        assert_eq!(end, bytes.len());
        parse(bytes).unwrap()
    }

    /// A view of `uids` (all known, flags unknown) in `cmd`.
    fn view(uids: &[u32], cmd: Cmd) -> View {
        let mut v = View {
            msgs: uids
                .iter()
                .map(|&u| Msg {
                    uid: Some(u),
                    flags: None,
                })
                .collect(),
            ..View::default()
        };
        v.begin(cmd);
        v
    }

    fn uids(v: &View) -> Vec<Option<u32>> {
        v.msgs.iter().map(|m| m.uid).collect()
    }

    #[test]
    fn imap_model_a_response_ends_after_its_literals() {
        let r = b"* 3 FETCH (UID 9 BODY[] {5}\r\nab\r\nc FLAGS (\\Seen))\r\n* 4 EXISTS\r\n";
        let first = response_end(r).unwrap().unwrap();
        assert_eq!(&r[first..], b"* 4 EXISTS\r\n");
        for cut in 0..first {
            assert_eq!(response_end(&r[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(response_end(b"* 1 EXISTS\n").is_err());
        assert!(response_end(b"* 1 FETCH (BODY[] {99999999999}\r\n").is_ok());
        assert!(response_end(b"* 1 FETCH (BODY[] {9999999}\r\n").is_err());
    }

    #[test]
    fn imap_model_fetch_items_in_any_order_with_literals_skipped() {
        let r = b"* 3 FETCH (FLAGS (\\Seen \\Recent $Label) BODY[HEADER.FIELDS (SUBJECT)]<0> {12}\r\nSubject: )\r\n UID 44 ENVELOPE (NIL \"a \\\" ) b\" ((NIL NIL \"x\" \"y\")) NIL))\r\n";
        assert_eq!(
            one(r),
            Response::Fetch {
                msn: 3,
                uid: Some(44),
                flags: flags(&["\\Seen", "\\Recent", "$Label"])
            }
        );
        assert_eq!(
            one(b"* 12 FETCH (UID 7)\r\n"),
            Response::Fetch {
                msn: 12,
                uid: Some(7),
                flags: None
            }
        );
        assert_eq!(
            one(b"* 1 FETCH (FLAGS ())\r\n"),
            Response::Fetch {
                msn: 1,
                uid: None,
                flags: flags(&[])
            }
        );
        assert!(parse(b"* 1 FETCH (UID x)\r\n").is_err());
        assert!(parse(b"* 1 FETCH (UID 5\r\n").is_err());
        assert!(parse(b"* 1 FETCH (UID 5) junk\r\n").is_err());
    }

    #[test]
    fn imap_model_untagged_and_tagged_lines() {
        assert_eq!(one(b"* 5 EXISTS\r\n"), Response::Exists(5));
        assert_eq!(one(b"* 2 EXPUNGE\r\n"), Response::Expunge(2));
        assert_eq!(one(b"* 1 RECENT\r\n"), Response::Recent(1));
        assert_eq!(one(b"* SEARCH\r\n"), Response::Search(vec![]));
        assert_eq!(
            one(b"* SEARCH 2 10 3\r\n"),
            Response::Search(vec![2, 10, 3])
        );
        assert_eq!(
            one(b"* VANISHED (EARLIER) 1:3,7\r\n"),
            Response::Vanished {
                earlier: true,
                uids: vec![1, 2, 3, 7]
            }
        );
        assert_eq!(
            one(b"* VANISHED 9\r\n"),
            Response::Vanished {
                earlier: false,
                uids: vec![9]
            }
        );
        assert!(parse(b"* VANISHED 1:4294967295\r\n").is_err());
        assert_eq!(
            one(b"* BYE [UNAVAILABLE] Login expired\r\n"),
            Response::Bye("[UNAVAILABLE] Login expired".into())
        );
        assert_eq!(one(b"+ idling\r\n"), Response::Continue);
        assert_eq!(one(b"* OK [UIDVALIDITY 3] x\r\n"), Response::Other);
        assert_eq!(
            one(b"d4 NO [EXPUNGEISSUED] Some messages were expunged\r\n"),
            Response::Tagged {
                tag: "d4".into(),
                status: "NO".into(),
                text: "[EXPUNGEISSUED] Some messages were expunged".into()
            }
        );
        assert!(parse(b"garbage\r\n").is_err());
    }

    #[test]
    fn imap_model_expunge_shifts_and_exists_grows() {
        let mut v = view(&[3, 5, 8], Cmd::Other);
        v.apply(&Response::Expunge(2)).unwrap();
        assert_eq!(uids(&v), [Some(3), Some(8)]);
        v.apply(&Response::Exists(4)).unwrap();
        assert_eq!(uids(&v), [Some(3), Some(8), None, None]);
        v.apply(&Response::Fetch {
            msn: 3,
            uid: Some(9),
            flags: flags(&["\\Seen", "\\Recent"]),
        })
        .unwrap();
        assert_eq!(v.msgs[2].flags, flags(&["\\Seen"]));
        v.apply(&Response::Expunge(1)).unwrap();
        assert_eq!(uids(&v), [Some(8), Some(9), None]);
    }

    #[test]
    fn imap_model_vanished_removes_by_uid() {
        let mut v = view(&[3, 5, 8, 9], Cmd::Other);
        v.apply(&Response::Vanished {
            earlier: false,
            uids: vec![5, 9, 100],
        })
        .unwrap();
        assert_eq!(uids(&v), [Some(3), Some(8)]);
        v.apply(&Response::Exists(3)).unwrap();
        let e = v.apply(&Response::Vanished {
            earlier: false,
            uids: vec![7],
        });
        assert!(e.unwrap_err().contains("cannot place"));
    }

    #[test]
    fn imap_model_a_desync_is_detected() {
        let e = |v: &mut View, r: Response| v.apply(&r).unwrap_err();
        let mut v = view(&[3, 5, 8], Cmd::Other);
        assert!(e(&mut v, Response::Exists(2)).contains("without EXPUNGE"));
        assert!(e(&mut v, Response::Expunge(4)).contains("beyond the count"));
        assert!(e(&mut v, Response::Recent(4)).contains("RECENT beyond"));
        v.apply(&Response::Recent(3)).unwrap();
        let wrong = Response::Fetch {
            msn: 2,
            uid: Some(6),
            flags: None,
        };
        assert!(e(&mut v, wrong).contains("the model has UID 5"));
        let beyond = Response::Fetch {
            msn: 4,
            uid: None,
            flags: None,
        };
        assert!(e(&mut v, beyond).contains("beyond the count"));
        v.apply(&Response::Exists(4)).unwrap();
        let low = Response::Fetch {
            msn: 4,
            uid: Some(8),
            flags: None,
        };
        assert!(e(&mut v, low).contains("out of order"));
        let mut fetch = view(&[3, 5], Cmd::BySequence);
        assert!(e(&mut fetch, Response::Expunge(1)).contains("during BySequence"));
        let mut search = view(&[3, 5], Cmd::Search);
        assert!(e(&mut search, Response::Search(vec![1, 3])).contains("beyond the count"));
        let mut uid_search = view(&[3, 5], Cmd::UidSearchAll);
        assert!(e(&mut uid_search, Response::Search(vec![3, 6]))
            .contains("UID 5 in the model, 6 by the search"));
        let mut short = view(&[3, 5], Cmd::UidSearchAll);
        assert!(e(&mut short, Response::Search(vec![3])).contains("found 1 UIDs"));
    }

    #[test]
    fn imap_model_uid_search_all_is_checked_where_it_arrives() {
        // Dovecot: the SEARCH line first, the sync's EXPUNGE after it.
        let mut v = view(&[3, 5, 8], Cmd::UidSearchAll);
        v.msgs[1].uid = None;
        v.apply(&Response::Search(vec![8, 3, 5])).unwrap();
        assert_eq!(uids(&v), [Some(3), Some(5), Some(8)]);
        v.apply(&Response::Expunge(1)).unwrap();
        v.end("OK").unwrap();
        assert_eq!(uids(&v), [Some(5), Some(8)]);
    }

    #[test]
    fn imap_model_fetch_of_all_uids_must_cover_the_view() {
        let mut v = view(&[3, 5, 8], Cmd::AllUids);
        for (msn, uid) in [(1, 3), (2, 5)] {
            v.apply(&Response::Fetch {
                msn,
                uid: Some(uid),
                flags: None,
            })
            .unwrap();
        }
        assert!(v.end("OK").unwrap_err().contains("answered 2 of the 3"));
        let mut v = view(&[3, 5], Cmd::AllUids);
        let skipped = Response::Fetch {
            msn: 2,
            uid: Some(5),
            flags: None,
        };
        assert!(v.apply(&skipped).unwrap_err().contains("after 0"));
    }

    #[test]
    fn imap_model_compares_with_the_server() {
        let mut v = view(&[3, 5], Cmd::Other);
        v.msgs[0].flags = flags(&["\\Seen"]);
        let server = |a: &[&str]| vec![(3, flags(a).unwrap()), (5, flags(&["\\Flagged"]).unwrap())];
        v.compare(&server(&["\\Seen", "\\Recent"])).unwrap();
        assert!(v.compare(&server(&[])).unwrap_err().contains("flags"));
        assert!(v
            .compare(&[(3, BTreeSet::new())])
            .unwrap_err()
            .contains("2 messages"));
        v.msgs[1].uid = None;
        v.compare(&server(&["\\Seen"])).unwrap();
    }
}
