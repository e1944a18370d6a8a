//! Microsoft Graph on the wire, without I/O: how a MIME message is sent
//! (whole by `sendMail` when it fits the 4 MB request limit, else as a
//! draft whose large attachments are uploaded apart), the JSON bodies of
//! those requests, and Graph's error bodies as one line for the log.

use std::time::Duration;

use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders, PartType};

/// Graph's request size limit (sendMail, create message, each upload).
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Attachments from this size go through an upload session (3 MB to 150 MB).
pub const MIN_UPLOAD_SESSION: usize = 3 * 1024 * 1024;
/// Attachments from this size are taken out of an oversized message.
pub const MIN_DETACHED: usize = 512 * 1024;
/// One upload range: under 4 MB, a multiple of 320 KiB.
pub const UPLOAD_CHUNK: usize = 12 * 320 * 1024;
/// The longest Retry-After oxbridge waits out in place.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// An attachment taken out of a message, to be added to its draft.
#[derive(Debug, PartialEq, Eq)]
pub struct Attachment {
    pub name: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// How a message goes to Graph.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// `sendMail` with this base64 MIME.
    Whole(String),
    /// Create a draft from this base64 MIME, add the attachments, send it.
    Draft {
        mime: String,
        attachments: Vec<Attachment>,
    },
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The addresses of the message's To, Cc and Bcc headers, lower-cased.
pub fn header_recipients(message: &[u8]) -> Vec<String> {
    let Some(m) = MessageParser::default().parse_headers(message) else {
        return Vec::new();
    };
    [m.to(), m.cc(), m.bcc()]
        .into_iter()
        .flatten()
        .flat_map(|a| a.iter())
        .filter_map(|a| a.address.as_ref().map(|s| s.to_lowercase()))
        .collect()
}

/// Graph sends to the message's own To, Cc and Bcc; envelope recipients
/// missing there are added as a `Bcc:` header (which Graph removes).
pub fn with_envelope(message: &[u8], recipients: &[String]) -> Vec<u8> {
    let named = header_recipients(message);
    let missing: Vec<&String> = recipients
        .iter()
        .filter(|r| !named.contains(&r.to_lowercase()))
        .collect();
    if missing.is_empty() {
        return message.to_vec();
    }
    let list: Vec<String> = missing.iter().map(|r| format!("<{r}>")).collect();
    let mut out = format!("Bcc: {}\r\n", list.join(", ")).into_bytes();
    out.extend_from_slice(message);
    out
}

/// How to send `message`: whole when its base64 fits one request; else a
/// draft without its attachments of [`MIN_DETACHED`] bytes and more
/// (direct parts of the top-level multipart), which are added apart.
pub fn plan(message: &[u8]) -> Result<Plan, String> {
    plan_within(message, MAX_REQUEST, MIN_DETACHED)
}

/// [`plan`] with another request limit and detaching size (the fuzz
/// target makes every message take the draft path).
pub fn plan_within(
    message: &[u8],
    max_request: usize,
    min_detached: usize,
) -> Result<Plan, String> {
    let whole = b64(message);
    if whole.len() <= max_request {
        return Ok(Plan::Whole(whole));
    }
    let parsed = MessageParser::default()
        .parse(message)
        .ok_or("the message cannot be parsed as MIME")?;
    let PartType::Multipart(children) = &parsed.parts[0].body else {
        return Err(
            "the message is over Graph's 4 MB limit and has no attachments to upload apart".into(),
        );
    };
    let mut cuts = Vec::new();
    let mut attachments = Vec::new();
    for &i in children {
        let part = &parsed.parts[i as usize];
        let bytes = match &part.body {
            PartType::Binary(b) | PartType::InlineBinary(b) => b.as_ref(),
            PartType::Text(t) | PartType::Html(t) if part.attachment_name().is_some() => {
                t.as_bytes()
            }
            _ => continue,
        };
        if bytes.len() < min_detached {
            continue;
        }
        let content_type = part
            .content_type()
            .map(|c| match &c.c_subtype {
                Some(sub) => format!("{}/{sub}", c.c_type),
                None => c.c_type.to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        cuts.push(part_span(
            message,
            part.offset_header as usize,
            part.offset_end as usize,
        ));
        attachments.push(Attachment {
            name: part.attachment_name().unwrap_or("attachment").to_string(),
            content_type,
            bytes: bytes.to_vec(),
        });
    }
    let mut draft = Vec::with_capacity(message.len());
    let mut at = 0;
    for (from, to) in cuts {
        // Parts follow one another: a cut never starts before the last
        // one ended, whatever offsets the parser gave.
        let from = from.clamp(at, message.len());
        draft.extend_from_slice(&message[at..from]);
        at = to.clamp(from, message.len());
    }
    draft.extend_from_slice(&message[at..]);
    let mime = b64(&draft);
    if mime.len() > max_request {
        return Err(format!(
            "the message without its large attachments is still over Graph's 4 MB limit ({} bytes)",
            draft.len()
        ));
    }
    Ok(Plan::Draft { mime, attachments })
}

/// The bytes a part takes in `message`: from the line break before its
/// delimiter line (which belongs to the delimiter, RFC 2046 5.1.1) to the
/// part's end. `start` is where the part's header begins, just after its
/// delimiter line; line breaks are CRLF or a bare LF.
fn part_span(message: &[u8], start: usize, end: usize) -> (usize, usize) {
    let start = start.min(message.len());
    let delimiter_end = start.saturating_sub(1);
    let from = match message[..delimiter_end].iter().rposition(|&b| b == b'\n') {
        Some(lf) if lf > 0 && message[lf - 1] == b'\r' => lf - 1,
        Some(lf) => lf,
        None => delimiter_end,
    };
    (from, end.max(start).min(message.len()))
}

/// The body of `createUploadSession` for `a`.
pub fn upload_session(a: &Attachment) -> String {
    serde_json::json!({
        "AttachmentItem": {
            "attachmentType": "file",
            "name": a.name,
            "size": a.bytes.len(),
            "contentType": a.content_type,
        }
    })
    .to_string()
}

/// The body that adds a small attachment (under 3 MB) to a draft.
pub fn small_attachment(a: &Attachment) -> String {
    serde_json::json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": a.name,
        "contentType": a.content_type,
        "contentBytes": b64(&a.bytes),
    })
    .to_string()
}

/// The `Content-Range` of the upload range starting at `from` of `total`.
pub fn content_range(from: usize, len: usize, total: usize) -> String {
    format!("bytes {from}-{}/{total}", from + len - 1)
}

/// A Graph error answer as one line: status, code and message.
pub fn error_line(status: u16, body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |k: &str| {
        error
            .and_then(|e| e.get(k))
            .and_then(|v| v.as_str())
            .map(|s| super::printable(s.as_bytes()))
    };
    match (field("code"), field("message")) {
        (Some(code), Some(message)) => format!("Graph {status} {code}: {message}"),
        (Some(code), None) => format!("Graph {status} {code}"),
        _ => format!(
            "Graph {status}: {}",
            super::printable(&body[..body.len().min(200)])
        ),
    }
}

/// A Retry-After header (seconds, possibly fractional), bounded.
pub fn retry_after(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(5))
        .min(MAX_RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mime(attachment: &[u8]) -> Vec<u8> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(attachment);
        let lines: Vec<&str> = encoded
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "From: a@b.test\r\nTo: c@d.test\r\nSubject: scan\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\n\
Content-Type: text/plain\r\n\r\nthe scan\r\n--XX\r\n\
Content-Type: application/pdf; name=\"scan.pdf\"\r\n\
Content-Disposition: attachment; filename=\"scan.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--XX--\r\n",
            lines.join("\r\n")
        )
        .into_bytes()
    }

    #[test]
    fn small_messages_go_whole_and_large_ones_as_a_draft_without_the_attachment() {
        let small = mime(b"%PDF small");
        assert_eq!(plan(&small).unwrap(), Plan::Whole(b64(&small)));
        let pdf: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let Plan::Draft {
            mime: draft,
            attachments,
        } = plan(&mime(&pdf)).unwrap()
        else {
            panic!("a draft")
        };
        let draft = base64::engine::general_purpose::STANDARD
            .decode(draft)
            .unwrap();
        assert_eq!(
            String::from_utf8(draft).unwrap(),
            "From: a@b.test\r\nTo: c@d.test\r\nSubject: scan\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\n\
Content-Type: text/plain\r\n\r\nthe scan\r\n--XX--\r\n"
        );
        assert_eq!(
            attachments,
            [Attachment {
                name: "scan.pdf".into(),
                content_type: "application/pdf".into(),
                bytes: pdf
            }]
        );
        let flat = vec![b'x'; 4_000_000];
        assert!(plan(&flat).unwrap_err().contains("no attachments"));
    }

    #[test]
    fn envelope_recipients_missing_from_the_header_become_bcc() {
        let m = b"From: a@b.test\r\nTo: C@d.test\r\nCc: e@f.test\r\n\r\nhi\r\n";
        assert_eq!(header_recipients(m), ["c@d.test", "e@f.test"]);
        assert_eq!(with_envelope(m, &["c@d.test".into()]), m.to_vec());
        assert_eq!(
            with_envelope(
                m,
                &["c@d.test".into(), "x@y.test".into(), "z@y.test".into()]
            ),
            [&b"Bcc: <x@y.test>, <z@y.test>\r\n"[..], &m[..]].concat()
        );
    }

    #[test]
    fn errors_ranges_and_retry_after() {
        let body = br#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied. Check credentials and try again."}}"#;
        assert_eq!(
            error_line(403, body),
            "Graph 403 ErrorAccessDenied: Access is denied. Check credentials and try again."
        );
        assert_eq!(
            error_line(502, b"<html>bad gateway"),
            "Graph 502: <html>bad gateway"
        );
        assert_eq!(content_range(0, 10, 25), "bytes 0-9/25");
        assert_eq!(retry_after(Some("2.5")), Duration::from_millis(2500));
        assert_eq!(retry_after(Some("9999")), MAX_RETRY_AFTER);
        assert_eq!(retry_after(None), Duration::from_secs(5));
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// A multipart message with two attachments over [`MIN_DETACHED`],
    /// written with bare LF line ends as some devices do.
    fn bare_lf_message() -> Vec<u8> {
        let part = |name: &str, seed: u32| {
            let bytes: Vec<u8> = (0..1_600_000u32).map(|i| (i * seed % 251) as u8).collect();
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            let lines: Vec<&str> = encoded
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "--XX\nContent-Type: application/pdf; name=\"{name}\"\n\
Content-Disposition: attachment; filename=\"{name}\"\n\
Content-Transfer-Encoding: base64\n\n{}\n",
                lines.join("\n")
            )
        };
        format!(
            "From: a@b.test\nTo: c@d.test\nSubject: scan\nMIME-Version: 1.0\n\
Content-Type: multipart/mixed; boundary=\"XX\"\n\n--XX\nContent-Type: text/plain\n\n\
the scans\n{}{}--XX--\n",
            part("one.pdf", 7),
            part("two.pdf", 13)
        )
        .into_bytes()
    }

    #[test]
    fn a_bare_lf_message_with_two_large_attachments_is_planned_without_panic() {
        let m = bare_lf_message();
        let Plan::Draft { mime, attachments } = plan(&m).unwrap() else {
            panic!("a draft")
        };
        let draft = base64::engine::general_purpose::STANDARD
            .decode(mime)
            .unwrap();
        assert_eq!(
            String::from_utf8(draft).unwrap(),
            "From: a@b.test\nTo: c@d.test\nSubject: scan\nMIME-Version: 1.0\n\
Content-Type: multipart/mixed; boundary=\"XX\"\n\n--XX\nContent-Type: text/plain\n\n\
the scans\n--XX--\n"
        );
        assert_eq!(attachments.len(), 2);
    }
}
