//! `rewrite_sender`: the header block of a message from a device with a
//! fixed sender, rewritten so that it is sent as the account's mailbox.
//! Pure: bytes in, bytes out.
//!
//! - Every `From:` field and every `Sender:` field is taken out; one
//!   `From:` naming the mailbox takes the place of the first `From:` (or
//!   opens the header block when there was none).
//! - Its display name is the device's own display name, else the
//!   device's address, so that a reader still sees which device sent it.
//!   It is written as a quoted string (printable ASCII, `"` and `\`
//!   escaped) or as RFC 2047 encoded words (anything else), never longer
//!   than [`MAX_DISPLAY_CHARS`] characters, control characters dropped.
//! - The device's address becomes `Reply-To:` unless the message has one
//!   already, or the address is unusable or the mailbox itself.
//! - Every other field, and the body, pass through byte for byte.
//!
//! [`Rewriter`] takes a message in pieces as they arrive: it holds the
//! header block (at most [`MAX_HEADER_BYTES`]) until its end, then lets
//! every later byte straight through.

use base64::Engine;

/// The longest header block held for the rewrite; a longer one is
/// refused ([`TooBig`]).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The longest display name written in the new `From:`, in characters.
pub const MAX_DISPLAY_CHARS: usize = 64;

/// Bytes of UTF-8 per encoded word: 45 make 60 base64 characters, a word
/// of 72 with its frame (RFC 2047 allows 75).
const ENCODED_WORD_BYTES: usize = 45;

/// The header block is over [`MAX_HEADER_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooBig;

/// Rewrite a whole header block (up to and with its empty line, if any)
/// for `mailbox`.
pub fn rewrite_header(header: &[u8], mailbox: &str) -> Vec<u8> {
    let (fields, end) = split_fields(header);
    let first_from = fields.iter().position(|f| named(f, b"from"));
    let device = first_from.and_then(|i| device_sender(fields[i]));
    let has_reply_to = fields.iter().any(|f| named(f, b"reply-to"));
    let mut lines = from_line(mailbox, device.as_ref());
    if let Some(address) = device.as_ref().and_then(|d| d.address.as_deref()) {
        if !has_reply_to && !address.eq_ignore_ascii_case(mailbox) {
            lines.extend_from_slice(b"Reply-To: <");
            lines.extend_from_slice(address.as_bytes());
            lines.extend_from_slice(b">\r\n");
        }
    }
    // In the first From's place, else at the top. A folded line before
    // any field (which some readers take for a field of its own) goes.
    let at = first_from.unwrap_or(0);
    let mut out = Vec::with_capacity(header.len() + lines.len() + 2);
    for (i, f) in fields.iter().enumerate() {
        if i == at {
            out.extend_from_slice(&lines);
        }
        let stray = i == 0 && matches!(f.first(), Some(b' ' | b'\t'));
        if !stray && !named(f, b"from") && !named(f, b"sender") {
            push_canonical(&mut out, f);
        }
    }
    if at >= fields.len() {
        out.extend_from_slice(&lines);
    }
    // The empty line leaves as CRLF too, so every reader ends the header
    // block where this one did.
    match end.strip_prefix(b"\n") {
        Some(rest) => {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(rest);
        }
        None => out.extend_from_slice(end),
    }
    out
}

/// A header field with every line ending in CRLF: a bare LF gets its CR,
/// a lone CR (a line end to some readers, not to others) becomes a space,
/// and a last line without its end gets one.
fn push_canonical(out: &mut Vec<u8>, field: &[u8]) {
    let mut i = 0;
    while i < field.len() {
        match field[i] {
            b'\r' if field.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' => out.push(b' '),
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
}

/// The header block cut into fields (each with its folded lines and line
/// ends), and what follows them: the empty line (and anything after it).
fn split_fields(header: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut fields: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < header.len() {
        let line_end = memchr::memchr(b'\n', &header[pos..]).map_or(header.len(), |i| pos + i + 1);
        let line = &header[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation && pos > start {
            fields.push(&header[start..pos]);
            start = pos;
        }
        pos = line_end;
    }
    if pos > start {
        fields.push(&header[start..pos]);
    }
    (fields, &header[pos..])
}

/// Whether a field's name is `name` (lower case). White space anywhere in
/// the name is ignored, as lenient readers do (`Fr om:`, `From :`), so
/// that no reader finds a From this rewrite did not.
fn named(field: &[u8], name: &[u8]) -> bool {
    let Some(colon) = memchr::memchr(b':', field) else {
        return false;
    };
    let mut n = field[..colon]
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(u8::to_ascii_lowercase);
    n.by_ref().eq(name.iter().copied())
}

/// Who the device said it was in its first `From:`.
#[derive(Debug, PartialEq, Eq)]
struct Device {
    /// Its display name, cleaned (no controls, white space collapsed).
    name: Option<String>,
    /// Its address, when it is a usable one.
    address: Option<String>,
}

fn device_sender(field: &[u8]) -> Option<Device> {
    let colon = memchr::memchr(b':', field)?;
    let mut raw = b"From:".to_vec();
    raw.extend_from_slice(&field[colon + 1..]);
    if !raw.ends_with(b"\n") {
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    let message = mail_parser::MessageParser::new().parse_headers(&raw)?;
    let first = message.from()?.first()?;
    let address = first
        .address
        .as_deref()
        .map(str::trim)
        .filter(|a| usable_address(a))
        .map(str::to_string);
    let name = first.name.as_deref().map(clean).filter(|n| !n.is_empty());
    Some(Device { name, address })
}

/// An address that can stand in `<...>` as it is: one `@`, something on
/// either side, and none of the characters that would end or change it.
fn usable_address(address: &str) -> bool {
    address.len() <= 254
        && address.split('@').count() == 2
        && address
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !address
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>()[]\\,;:\"".contains(c))
}

/// A display name without control characters, white space runs made one
/// space, at most [`MAX_DISPLAY_CHARS`] characters.
fn clean(name: &str) -> String {
    let words: Vec<&str> = name
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_DISPLAY_CHARS)
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// `From: <display> <mailbox>` with its CRLF.
fn from_line(mailbox: &str, device: Option<&Device>) -> Vec<u8> {
    let display = device.and_then(|d| {
        d.name
            .clone()
            .or_else(|| d.address.as_deref().map(clean))
            .filter(|n| !n.is_empty())
    });
    let mut out = b"From: ".to_vec();
    if let Some(name) = display {
        out.extend_from_slice(phrase(&name).as_bytes());
        out.push(b' ');
    }
    out.push(b'<');
    out.extend_from_slice(mailbox.as_bytes());
    out.extend_from_slice(b">\r\n");
    out
}

/// A display name as RFC 5322 and RFC 2047 write it: a quoted string if
/// it is printable ASCII, else encoded words folded one per line.
fn phrase(name: &str) -> String {
    if name.chars().all(|c| (' '..='~').contains(&c)) {
        let mut q = String::with_capacity(name.len() + 2);
        q.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        return q;
    }
    // Whole characters per word: a word never splits one (RFC 2047, 5).
    let mut pieces = vec![String::new()];
    for c in name.chars() {
        let last = pieces.last_mut().expect("never empty");
        if last.len() + c.len_utf8() > ENCODED_WORD_BYTES {
            pieces.push(String::new());
        }
        pieces.last_mut().expect("never empty").push(c);
    }
    let words: Vec<String> = pieces
        .iter()
        .map(|text| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
            format!("=?UTF-8?B?{b64}?=")
        })
        .collect();
    words.join("\r\n ")
}

/// Where a message is for the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its header block is being held.
    Head,
    /// The header block went out: the rest passes through.
    Body,
}

/// A message's rewrite as its bytes arrive: the header block is held
/// until its empty line, rewritten, and let out with everything after it.
#[derive(Debug)]
pub struct Rewriter {
    mailbox: String,
    held: Vec<u8>,
    /// Where the line being looked at starts in `held`.
    line_start: usize,
    phase: Phase,
}

impl Rewriter {
    pub fn new(mailbox: &str) -> Rewriter {
        Rewriter {
            mailbox: mailbox.to_string(),
            held: Vec::new(),
            line_start: 0,
            phase: Phase::Head,
        }
    }

    /// Whether the header block is still held.
    pub fn in_head(&self) -> bool {
        self.phase == Phase::Head
    }

    /// Take the message's next bytes; what may go on is appended to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TooBig> {
        if self.phase == Phase::Body {
            out.extend_from_slice(input);
            return Ok(());
        }
        let mut from = 0;
        while let Some(i) = memchr::memchr(b'\n', &input[from..]) {
            let lf = from + i;
            let line_len = self.held.len() - self.line_start + (lf - from);
            let empty = line_len == 0
                || (line_len == 1
                    && match self.held.len() > self.line_start {
                        true => self.held[self.line_start] == b'\r',
                        false => input[from] == b'\r',
                    });
            self.held.extend_from_slice(&input[from..=lf]);
            if self.held.len() > MAX_HEADER_BYTES {
                return Err(TooBig);
            }
            from = lf + 1;
            self.line_start = self.held.len();
            if empty {
                out.extend_from_slice(&rewrite_header(&self.held, &self.mailbox));
                out.extend_from_slice(&input[from..]);
                self.release();
                return Ok(());
            }
        }
        self.held.extend_from_slice(&input[from..]);
        if self.held.len() > MAX_HEADER_BYTES {
            return Err(TooBig);
        }
        Ok(())
    }

    /// The message ended: a header block never closed by an empty line
    /// (a message with no body) goes out rewritten.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.phase == Phase::Head {
            out.extend_from_slice(&rewrite_header(&self.held, &self.mailbox));
            self.release();
        }
    }

    fn release(&mut self) {
        self.held = Vec::new();
        self.line_start = 0;
        self.phase = Phase::Body;
    }
}

#[cfg(test)]
#[path = "sender_rewrite_tests.rs"]
mod tests;
