//! A message on the SMTP wire: reading DATA (dot-unstuffing, its end),
//! BDAT chunks' line ends, and writing it again (dot-stuffing), without
//! I/O.
//!
//! Only `CRLF . CRLF` ends DATA: a bare LF before or after the dot does
//! not (SMTP smuggling). A bare LF in the message is stored as CRLF, as
//! MTAs store lines, so that what is sent on is the same message to every
//! server, however strictly it reads line ends.

use super::CRLF;

/// Reads the body of DATA from the bytes the device sends.
#[derive(Debug)]
pub struct DataReader {
    /// The next byte starts a line.
    at_line_start: bool,
    /// ... and the line before ended in CRLF (or this is the first line):
    /// only such a line of one dot ends DATA.
    after_crlf: bool,
    /// The line so far is a single dot.
    dot: bool,
    /// ... followed by CR.
    dot_cr: bool,
    /// The last byte written out was CR.
    last_cr: bool,
}

impl Default for DataReader {
    fn default() -> Self {
        DataReader {
            at_line_start: true,
            after_crlf: true,
            dot: false,
            dot_cr: false,
            last_cr: false,
        }
    }
}

impl DataReader {
    /// Take `input`, append the message bytes it holds to `out`. Returns
    /// `Some(n)` when the end of DATA was found after `n` bytes of input
    /// (what follows is the device's next command), `None` when all of
    /// `input` was message and more is to come.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        for (i, &b) in input.iter().enumerate() {
            if self.dot {
                if self.dot_cr {
                    if b == b'\n' && self.after_crlf {
                        *self = DataReader::default();
                        return Some(i + 1);
                    }
                    if b == b'\n' {
                        // A line of one dot after a bare LF: data.
                        self.dot = false;
                        self.dot_cr = false;
                        out.push(b'.');
                        self.push(b'\r', out);
                        self.push(b'\n', out);
                        continue;
                    }
                    // ".\r" and more: the leading dot goes, the CR is data.
                    self.dot = false;
                    self.dot_cr = false;
                    self.at_line_start = false;
                    self.push(b'\r', out);
                } else if b == b'\r' {
                    self.dot_cr = true;
                    continue;
                } else if b == b'\n' {
                    // A line of one dot ended by a bare LF: data, not the end.
                    self.dot = false;
                    out.push(b'.');
                    self.last_cr = false;
                    self.push(b'\n', out);
                    continue;
                } else {
                    // A leading dot before other characters is removed
                    // (RFC 5321 4.5.2).
                    self.dot = false;
                    self.at_line_start = false;
                }
            }
            if b == b'.' && self.at_line_start {
                self.dot = true;
                continue;
            }
            self.push(b, out);
        }
        None
    }

    fn push(&mut self, b: u8, out: &mut Vec<u8>) {
        if b == b'\n' {
            if !self.last_cr {
                out.push(b'\r');
            }
            self.at_line_start = true;
            self.after_crlf = self.last_cr;
        } else {
            self.at_line_start = false;
        }
        out.push(b);
        self.last_cr = b == b'\r';
    }
}

/// Normalises BDAT chunks the way [`DataReader`] stores DATA: a bare LF
/// becomes CRLF, whatever the chunk boundaries (nothing is unstuffed:
/// BDAT content is sent as it is).
#[derive(Debug, Default)]
pub struct LineEnds {
    /// The last byte fed was CR.
    last_cr: bool,
}

impl LineEnds {
    /// Append `input` to `out` with every bare LF written as CRLF.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len());
        let mut start = 0;
        for (i, &b) in input.iter().enumerate() {
            if b == b'\n' {
                let cr_before = if i == 0 {
                    self.last_cr
                } else {
                    input[i - 1] == b'\r'
                };
                if !cr_before {
                    out.extend_from_slice(&input[start..i]);
                    out.push(b'\r');
                    start = i;
                }
            }
        }
        out.extend_from_slice(&input[start..]);
        if let Some(&b) = input.last() {
            self.last_cr = b == b'\r';
        }
    }
}

/// Writes a stored message as DATA: a dot at the start of a line is
/// doubled (a line starts after any LF), and the end is `CRLF . CRLF`.
#[derive(Debug)]
pub struct DataWriter {
    at_line_start: bool,
    last: Option<u8>,
}

impl Default for DataWriter {
    fn default() -> Self {
        DataWriter {
            at_line_start: true,
            last: None,
        }
    }
}

impl DataWriter {
    /// The stuffed form of the next piece of the message.
    pub fn stuff(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 64);
        let mut start = 0;
        for (i, &b) in chunk.iter().enumerate() {
            if b == b'.' && self.at_line_start {
                out.extend_from_slice(&chunk[start..i]);
                out.push(b'.');
                start = i;
            }
            self.at_line_start = b == b'\n';
        }
        out.extend_from_slice(&chunk[start..]);
        if let Some(&b) = chunk.last() {
            self.last = Some(b);
        }
    }

    /// The end of DATA, after the last piece: a CRLF first if the message
    /// did not end with one.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.last.is_some() && self.last != Some(b'\n') {
            out.extend_from_slice(CRLF);
        }
        out.extend_from_slice(b".\r\n");
        out
    }
}

/// The header section of a message: everything before the first empty
/// line (all of it, when there is none), at most `max` bytes.
pub fn header_section(message: &[u8], max: usize) -> &[u8] {
    let end = memchr::memmem::find(message, b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(message.len());
    &message[..end.min(max)]
}

/// The value of the first header `name` (case-insensitive), unfolded.
pub fn header_value(headers: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(headers);
    let mut found: Option<String> = None;
    for line in text.split("\r\n") {
        match &mut found {
            Some(v) if line.starts_with([' ', '\t']) => v.push_str(line),
            Some(_) => break,
            None => {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case(name) {
                        found = Some(v.trim().to_string());
                    }
                }
            }
        }
    }
    found.map(|v| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` in pieces of `step` bytes; the message and the bytes left.
    fn read(input: &[u8], step: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut r = DataReader::default();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + step).min(input.len());
            if let Some(n) = r.feed(&input[pos..end], &mut out) {
                return (out, Some(input[pos + n..].to_vec()));
            }
            pos = end;
        }
        (out, None)
    }

    #[test]
    fn data_ends_only_at_crlf_dot_crlf_in_any_split() {
        let wire = b"Subject: x\r\n\r\n..dot\r\n.x\r\nend\r\n.\r\nQUIT\r\n";
        for step in 1..wire.len() {
            let (msg, rest) = read(wire, step);
            assert_eq!(
                msg, b"Subject: x\r\n\r\n.dot\r\nx\r\nend\r\n",
                "step {step}"
            );
            assert_eq!(rest.as_deref(), Some(&b"QUIT\r\n"[..]), "step {step}");
        }
        assert_eq!(read(b".\r\n", 1), (Vec::new(), Some(Vec::new())));
    }

    #[test]
    fn smuggling_forms_are_data_and_bare_lf_becomes_crlf() {
        // "\n.\n", "\n.\r\n" and "\r\n.\n" do not end DATA.
        let (msg, rest) = read(b"a\n.\nb\n.\r\nc\r\n.\nd\r\n.\r\n", 1);
        assert_eq!(msg, b"a\r\n.\r\nb\r\n.\r\nc\r\n.\r\nd\r\n");
        assert_eq!(rest, Some(Vec::new()));
        let (msg, rest) = read(b"a\r\n.\rb\r\n.\r\n", 3);
        assert_eq!(msg, b"a\r\n\rb\r\n");
        assert_eq!(rest, Some(Vec::new()));
        assert_eq!(read(b"no end\r\n", 4), (b"no end\r\n".to_vec(), None));
    }

    #[test]
    fn bdat_chunks_get_crlf_line_ends_like_data_in_any_split() {
        let message = b"Subject: x\n\r\n..dot\nline\r\rcr\r\n\n\nend\n";
        let want = b"Subject: x\r\n\r\n..dot\r\nline\r\rcr\r\n\r\n\r\nend\r\n";
        for step in 1..message.len() {
            let mut ends = LineEnds::default();
            let mut out = Vec::new();
            for chunk in message.chunks(step) {
                ends.feed(chunk, &mut out);
            }
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(want),
                "step {step}"
            );
        }
    }

    #[test]
    fn writing_doubles_leading_dots_and_reading_undoes_it() {
        let message = b".a\r\nb.\r\n..c\r\nbare\n.d\r\n.";
        for step in 1..message.len() {
            let mut w = DataWriter::default();
            let mut wire = Vec::new();
            for piece in message.chunks(step) {
                w.stuff(piece, &mut wire);
            }
            wire.extend(w.finish());
            assert_eq!(
                wire, b"..a\r\nb.\r\n...c\r\nbare\n..d\r\n..\r\n.\r\n",
                "step {step}"
            );
            let (back, rest) = read(&wire, step);
            assert_eq!(back, b".a\r\nb.\r\n..c\r\nbare\r\n.d\r\n.\r\n");
            assert_eq!(rest, Some(Vec::new()));
        }
        assert_eq!(DataWriter::default().finish(), b".\r\n");
    }

    #[test]
    fn headers_are_found_and_unfolded() {
        let m = b"From: a@b\r\nSubject: one\r\n two\r\nTo: c@d\r\n\r\nSubject: body\r\n";
        let h = header_section(m, 1 << 20);
        assert_eq!(h, b"From: a@b\r\nSubject: one\r\n two\r\nTo: c@d\r\n");
        assert_eq!(header_value(h, "subject").as_deref(), Some("one two"));
        assert_eq!(header_value(h, "to").as_deref(), Some("c@d"));
        assert_eq!(header_value(h, "cc"), None);
        assert_eq!(header_section(b"no body", 3), b"no ");
    }
}
