//! A [`Mailbox`]: an address oxbridge may hand on, checked once where a
//! device's login becomes one.
//!
//! What RFC 5321 calls a Mailbox, narrowed so that nothing in it can change
//! the meaning of what it is put into (an XOAUTH2 string, a URL path, a mail
//! header, `MAIL FROM`, a log line): a dot-string local part of at most 64
//! octets, exactly one `@`, and a domain of at most 255 octets made of
//! dot-separated labels. No control character, no space, no quoted local
//! part, no address literal, and none of `/ ? # \ %`. Letters and digits
//! beyond ASCII are allowed (RFC 6531), other non-ASCII characters are not.
//! The text is kept as given; callers lower-case it where they compare.

use std::fmt;

/// The longest local part, in octets (RFC 5321, 4.5.3.1.1).
pub const MAX_LOCAL: usize = 64;
/// The longest domain, in octets (RFC 5321, 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// The longest label of a domain, in octets (RFC 1035).
pub const MAX_LABEL: usize = 63;

/// A checked address: see the module's documentation for what it holds.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    text: String,
    /// Where the `@` is.
    at: usize,
}

/// Why a string is not a [`Mailbox`]. The text names what is wrong, never
/// the string itself (a device may have typed its password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    #[error("not exactly one @")]
    At,
    #[error("an empty local part or domain")]
    Empty,
    #[error("a local part over 64 octets")]
    LocalTooLong,
    #[error("a domain over 255 octets")]
    DomainTooLong,
    #[error("a control character")]
    Control,
    #[error("a space")]
    Space,
    #[error("one of / ? # \\ %")]
    Reserved,
    #[error("a quoted local part")]
    Quoted,
    #[error("a character an address cannot hold")]
    Character,
    #[error("a misplaced dot")]
    Dot,
    #[error("a domain label that is empty, too long or starts or ends with a hyphen")]
    Label,
}

impl Mailbox {
    /// Check `text` and keep it as given.
    pub fn parse(text: &str) -> Result<Mailbox, MailboxError> {
        // The bytes that change meaning downstream come first, so that the
        // reason names the worst thing found.
        if text.chars().any(char::is_control) {
            return Err(MailboxError::Control);
        }
        if text.chars().any(char::is_whitespace) {
            return Err(MailboxError::Space);
        }
        if text.contains(['/', '?', '#', '\\', '%']) {
            return Err(MailboxError::Reserved);
        }
        if text.contains('"') {
            return Err(MailboxError::Quoted);
        }
        let at = match text.match_indices('@').map(|(i, _)| i).collect::<Vec<_>>()[..] {
            [at] => at,
            _ => return Err(MailboxError::At),
        };
        let (local, domain) = (&text[..at], &text[at + 1..]);
        if local.is_empty() || domain.is_empty() {
            return Err(MailboxError::Empty);
        }
        if local.len() > MAX_LOCAL {
            return Err(MailboxError::LocalTooLong);
        }
        if domain.len() > MAX_DOMAIN {
            return Err(MailboxError::DomainTooLong);
        }
        check_local(local)?;
        check_domain(domain)?;
        Ok(Mailbox {
            text: text.to_string(),
            at,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// What comes before the `@`.
    pub fn local(&self) -> &str {
        &self.text[..self.at]
    }

    /// What comes after the `@`.
    pub fn domain(&self) -> &str {
        &self.text[self.at + 1..]
    }

    /// Whether the domain is `domain`, ignoring ASCII case.
    pub fn in_domain(&self, domain: &str) -> bool {
        self.domain().eq_ignore_ascii_case(domain)
    }
}

/// RFC 5322 `atext` without `/ ? # %` (RFC 5321's Atom), or a non-ASCII
/// letter or digit.
fn atext(c: char) -> bool {
    match c {
        'a'..='z' | 'A'..='Z' | '0'..='9' => true,
        '!' | '$' | '&' | '\'' | '*' | '+' | '-' | '=' | '^' | '_' | '`' | '{' | '|' | '}'
        | '~' => true,
        c => !c.is_ascii() && c.is_alphanumeric(),
    }
}

/// A dot-string: atoms joined by single dots.
fn check_local(local: &str) -> Result<(), MailboxError> {
    for atom in local.split('.') {
        if atom.is_empty() {
            return Err(MailboxError::Dot);
        }
        if !atom.chars().all(atext) {
            return Err(MailboxError::Character);
        }
    }
    Ok(())
}

/// Labels of letters, digits and inner hyphens (non-ASCII letters and
/// digits too: internationalised names), joined by single dots.
fn check_domain(domain: &str) -> Result<(), MailboxError> {
    for label in domain.split('.') {
        if label.is_empty() {
            return Err(MailboxError::Dot);
        }
        if !label.chars().all(|c| {
            c == '-' || c.is_ascii_alphanumeric() || (!c.is_ascii() && c.is_alphanumeric())
        }) {
            return Err(MailboxError::Character);
        }
        if label.len() > MAX_LABEL || label.starts_with('-') || label.ends_with('-') {
            return Err(MailboxError::Label);
        }
    }
    Ok(())
}

impl std::ops::Deref for Mailbox {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl AsRef<str> for Mailbox {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl PartialEq<str> for Mailbox {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for Mailbox {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl From<Mailbox> for String {
    fn from(m: Mailbox) -> String {
        m.text
    }
}

#[cfg(test)]
mod tests {
    use super::MailboxError as E;
    use super::*;

    #[test]
    fn plain_addresses_parse_and_keep_their_parts() {
        for ok in [
            "scanner@example.test",
            "Scanner.Room-2@Mail.Example.TEST",
            "a@b",
            "o'brien+scan=1@x-y.example",
            "!$&'*+-=^_`{|}~@example.test",
            "jösé@bücher.example",
            "用户@例子.广告",
        ] {
            let m = Mailbox::parse(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
            assert_eq!(m.as_str(), ok);
            assert_eq!(format!("{}@{}", m.local(), m.domain()), ok);
        }
        let m = Mailbox::parse("Bob@Other.Test").unwrap();
        assert!(m.in_domain("other.test"));
        assert!(!m.in_domain("other.test.evil"));
        assert_eq!(&*m, "Bob@Other.Test");
    }

    #[test]
    fn hostile_bytes_are_refused() {
        for (bad, why) in [
            ("bob@example.test\x01x=y@other.test", E::Control),
            ("bob\x01@x.test", E::Control),
            ("bob@x.test\r", E::Control),
            ("bob@x.test\n", E::Control),
            ("bob\r\nRCPT TO:<x>@x.test", E::Control),
            ("bob\0@x.test", E::Control),
            ("bob\x7f@x.test", E::Control),
            ("bob\u{85}@x.test", E::Control),
            ("bob\x1b[31m@x.test", E::Control),
            ("bob @x.test", E::Space),
            ("bob\u{2028}@x.test", E::Space),
            ("\u{a0}bob@x.test", E::Space),
            ("bob@x.test ", E::Space),
            ("bob/x@x.test", E::Reserved),
            ("bob@x.test/../me", E::Reserved),
            ("bob?x@x.test", E::Reserved),
            ("bob#x@x.test", E::Reserved),
            ("bob\\x@x.test", E::Reserved),
            ("login\\shared@x.test", E::Reserved),
            ("bob%x.test@other.test", E::Reserved),
            ("\"bob\"@x.test", E::Quoted),
            ("\"bob@evil\"@x.test", E::Quoted),
            ("bob@example.test@other.test", E::At),
            ("bob", E::At),
            ("", E::At),
            ("@x.test", E::Empty),
            ("bob@", E::Empty),
            ("@", E::Empty),
            (".bob@x.test", E::Dot),
            ("bob.@x.test", E::Dot),
            ("b..ob@x.test", E::Dot),
            ("bob@.x.test", E::Dot),
            ("bob@x..test", E::Dot),
            ("bob@x.test.", E::Dot),
            ("bob@[192.0.2.1]", E::Character),
            ("bob<x>@x.test", E::Character),
            ("bob,x@x.test", E::Character),
            ("bob;x@x.test", E::Character),
            ("bob:x@x.test", E::Character),
            ("bob(x)@x.test", E::Character),
            ("bob@x_y.test", E::Character),
            ("bob@x.test:25", E::Character),
            ("bob\u{202e}@x.test", E::Character),
            ("bob\u{200b}@x.test", E::Character),
            ("bob@-x.test", E::Label),
            ("bob@x-.test", E::Label),
        ] {
            assert_eq!(Mailbox::parse(bad), Err(why), "{:?}", bad.escape_debug());
        }
    }

    #[test]
    fn lengths_are_bounded_in_octets() {
        let local = "a".repeat(MAX_LOCAL);
        assert!(Mailbox::parse(&format!("{local}@x.test")).is_ok());
        assert_eq!(
            Mailbox::parse(&format!("{local}a@x.test")),
            Err(E::LocalTooLong)
        );
        // 32 two-octet letters are 64 octets; one more is too many.
        let wide = "é".repeat(32);
        assert!(Mailbox::parse(&format!("{wide}@x.test")).is_ok());
        assert_eq!(
            Mailbox::parse(&format!("{wide}é@x.test")),
            Err(E::LocalTooLong)
        );
        let label = "d".repeat(MAX_LABEL);
        let domain = [label.as_str(); 4].join(".");
        assert_eq!(domain.len(), MAX_DOMAIN);
        assert!(Mailbox::parse(&format!("a@{domain}")).is_ok());
        assert_eq!(
            Mailbox::parse(&format!("a@{domain}x")),
            Err(E::DomainTooLong)
        );
        assert_eq!(Mailbox::parse(&format!("a@{label}d.test")), Err(E::Label));
        let huge = "x".repeat(1 << 20);
        assert!(Mailbox::parse(&huge).is_err());
    }

    #[test]
    fn errors_never_echo_the_input() {
        let secret = "hunter2-secret";
        for bad in [
            secret.to_string(),
            format!("{secret}\x01@x"),
            format!("{secret}/@x.test"),
        ] {
            let e = Mailbox::parse(&bad).unwrap_err();
            assert!(!e.to_string().contains(secret));
            assert!(!format!("{e:?}").contains(secret));
        }
    }
}
