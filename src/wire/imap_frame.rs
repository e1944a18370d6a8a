//! Where each IMAP command or response ends in a byte stream after login,
//! for the relay that follows a session ([`Framer`]): lines, and literals
//! counted and skipped, never looked into or buffered; only a bounded
//! first line of each unit is kept. Pure: no sockets, no time.

use super::imap::literal_suffix;

/// How much of a unit's first line is kept: enough for a tag, a command
/// name and a mailbox name, or a status response's code.
pub const HEAD: usize = 1024;
/// Bytes kept of a line's end, to see a literal's `{n}` there.
const TAIL: usize = 24;

/// One command or response: its first line (without CRLF, cut at
/// [`HEAD`]), whether that was cut, whether literals followed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unit {
    pub head: Vec<u8>,
    pub truncated: bool,
    pub literal: bool,
}

/// Finds the ends of commands or responses in a stream.
#[derive(Debug, Default)]
pub struct Framer {
    /// Literal bytes still to pass before the line goes on.
    literal: u64,
    /// The last line announced a synchronising literal (`{n}`), and
    /// nothing after it has been taken yet: the sender waits for `+`.
    sync: bool,
    unit: Unit,
    first_line_done: bool,
    tail: Vec<u8>,
    /// Some bytes of the current unit have been seen.
    mid: bool,
}

impl Framer {
    /// Take bytes of `data` up to the end of the next unit: how many were
    /// taken, and the unit if it ended there.
    ///
    /// After a line that announces a synchronising literal it stops, so
    /// that the caller can see [`Framer::awaits_literal`].
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<Unit>) {
        if !data.is_empty() {
            self.sync = false;
        }
        let mut i = 0;
        loop {
            if self.literal > 0 {
                let take = (self.literal.min((data.len() - i) as u64)) as usize;
                self.literal -= take as u64;
                i += take;
                if self.literal > 0 {
                    return (i, None);
                }
            }
            if i == data.len() {
                return (i, None);
            }
            self.mid = true;
            let Some(k) = memchr::memchr(b'\n', &data[i..]) else {
                self.absorb(&data[i..]);
                return (data.len(), None);
            };
            self.absorb(&data[i..i + k]);
            i += k + 1;
            self.end_line();
            let tail = self.tail.strip_suffix(b"\r").unwrap_or(&self.tail);
            if let Some((n, sync)) = literal_suffix(tail) {
                self.literal = n;
                self.unit.literal = true;
                self.tail.clear();
                if sync {
                    self.sync = true;
                    return (i, None);
                }
                continue;
            }
            let unit = std::mem::take(&mut self.unit);
            self.reset();
            return (i, Some(unit));
        }
    }

    /// Between two units: nothing of the next one seen yet.
    pub fn at_boundary(&self) -> bool {
        !self.mid
    }

    /// The first line of the command whose synchronising literal the
    /// sender waits to be asked for, if that is where the stream stands.
    pub fn awaits_literal(&self) -> Option<&[u8]> {
        self.sync.then_some(self.unit.head.as_slice())
    }

    /// The command whose literal was awaited ended without it (the server
    /// refused it with a tagged answer instead of `+`): what comes next is
    /// a new command.
    pub fn cancel_literal(&mut self) {
        self.literal = 0;
        self.sync = false;
        self.unit = Unit::default();
        self.reset();
    }

    fn absorb(&mut self, seg: &[u8]) {
        if !self.first_line_done {
            let room = HEAD.saturating_sub(self.unit.head.len());
            if seg.len() > room {
                self.unit.truncated = true;
            }
            self.unit
                .head
                .extend_from_slice(&seg[..seg.len().min(room)]);
        }
        self.tail
            .extend_from_slice(&seg[seg.len().saturating_sub(TAIL)..]);
        let excess = self.tail.len().saturating_sub(TAIL);
        self.tail.drain(..excess);
    }

    fn end_line(&mut self) {
        if !self.first_line_done {
            self.first_line_done = true;
            if !self.unit.truncated && self.unit.head.last() == Some(&b'\r') {
                self.unit.head.pop();
            }
        }
    }

    fn reset(&mut self) {
        self.first_line_done = false;
        self.tail.clear();
        self.mid = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(framer: &mut Framer, data: &[u8]) -> Vec<(usize, Unit)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let (n, unit) = framer.feed(&data[at..]);
            at += n;
            if let Some(u) = unit {
                out.push((at, u));
            }
        }
        out
    }

    #[test]
    fn literals_are_skipped_whole_in_any_split() {
        let stream = b"* 1 FETCH (BODY[] {12}\r\nab\r\n{3}\r\nxyz) UID 7)\r\na1 OK done\r\n";
        for split in 1..stream.len() {
            let mut f = Framer::default();
            let mut got = units(&mut f, &stream[..split]);
            let base = split;
            for (at, u) in units(&mut f, &stream[split..]) {
                got.push((base + at, u));
            }
            let ends: Vec<usize> = got.iter().map(|(at, _)| *at).collect();
            assert_eq!(ends, vec![46, 58], "split at {split}");
            assert_eq!(got[0].1.head, b"* 1 FETCH (BODY[] {12}");
            assert!(got[0].1.literal);
            assert_eq!(got[1].1.head, b"a1 OK done");
            assert!(f.at_boundary());
        }
    }

    #[test]
    fn long_lines_keep_a_bounded_head() {
        let mut f = Framer::default();
        let mut line = b"* SEARCH".to_vec();
        for i in 0..10_000 {
            line.extend_from_slice(format!(" {i}").as_bytes());
        }
        line.extend_from_slice(b"\r\n");
        let got = units(&mut f, &line);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.head.len(), HEAD);
        assert!(got[0].1.truncated);
        assert!(f.tail.len() <= TAIL);
    }
}
