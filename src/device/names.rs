//! What a device says about itself before login, made fit for a log
//! line and the status page: SMTP's EHLO/HELO name and the "name" field
//! of IMAP's `ID` command. Pure; every name is bounded ([`MAX_NAME`]) and
//! holds printable ASCII only.

use super::refusal::clean;

/// Characters of a device's name kept.
pub const MAX_NAME: usize = 64;
/// Fields of an `ID` list read at most (RFC 2971 allows 30 pairs).
const MAX_ID_FIELDS: usize = 60;

/// A name as a device gave it, cleaned and bounded; `None` when nothing
/// is left.
pub fn device_name(raw: &str) -> Option<String> {
    let name = clean(raw, MAX_NAME);
    (!name.is_empty()).then_some(name)
}

/// The "name" field of an IMAP `ID` command (`tag ID ("name" "x" ...)`),
/// when it is a quoted string. `NIL`, literals and anything malformed
/// give `None`.
pub fn imap_id_name(command: &[u8]) -> Option<String> {
    let open = memchr::memchr(b'(', command)?;
    let mut rest = &command[open + 1..];
    let mut fields = Vec::new();
    loop {
        rest = rest.trim_ascii_start();
        match *rest.first()? {
            b')' => break,
            b'"' => {
                let (value, after) = quoted(&rest[1..])?;
                fields.push(Some(value));
                rest = after;
            }
            _ => {
                let end = rest
                    .iter()
                    .position(|b| *b == b' ' || *b == b')')
                    .unwrap_or(rest.len());
                if !rest[..end].eq_ignore_ascii_case(b"NIL") {
                    return None;
                }
                fields.push(None);
                rest = &rest[end..];
            }
        }
        if fields.len() > MAX_ID_FIELDS {
            return None;
        }
    }
    fields.chunks(2).find_map(|pair| match pair {
        [Some(key), Some(value)] if key.eq_ignore_ascii_case("name") => device_name(value),
        _ => None,
    })
}

/// A quoted string's value (after its opening quote) and what follows it.
fn quoted(input: &[u8]) -> Option<(String, &[u8])> {
    let mut value = Vec::new();
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'"' => {
                return Some((
                    String::from_utf8_lossy(&value).into_owned(),
                    &input[i + 1..],
                ))
            }
            b'\\' => {
                value.push(*input.get(i + 1)?);
                i += 2;
            }
            b'\r' | b'\n' | 0 => return None,
            b => {
                value.push(b);
                i += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_of_an_imap_id_is_found_and_cleaned() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                br#"a1 ID ("name" "Thunderbird" "version" "115.0")"#,
                Some("Thunderbird"),
            ),
            (
                br#"a1 ID ("vendor" "x" "NAME" "Scan \"Pro\"")"#,
                Some("Scan \"Pro\""),
            ),
            (br#"a1 ID ("version" NIL "name" "mfp")"#, Some("mfp")),
            (b"a1 ID NIL", None),
            (br#"a1 ID ("name" NIL)"#, None),
            (br#"a1 ID ("name" "unterminated)"#, None),
            (b"a1 ID (\"name\" \"bad\x01byte\")", Some("bad?byte")),
            (br#"a1 ID ("name" {3}"#, None),
        ];
        for (command, want) in cases {
            assert_eq!(
                imap_id_name(command).as_deref(),
                *want,
                "{}",
                String::from_utf8_lossy(command)
            );
        }
        let long = format!(r#"a ID ("name" "{}")"#, "n".repeat(1000));
        assert_eq!(imap_id_name(long.as_bytes()).unwrap().len(), MAX_NAME);
        assert_eq!(device_name(" \r\n"), None);
    }
}
