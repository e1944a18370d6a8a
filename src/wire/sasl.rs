//! SASL, as plain functions over bytes: decoding what devices send
//! (`PLAIN`, `LOGIN`) and encoding what oxbridge sends upstream (`XOAUTH2`).
//!
//! Decoded passwords come back as [`SecretString`] and never appear in an
//! error.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

/// The longest decoded credential we accept (user name or password).
pub const MAX_CREDENTIAL_LEN: usize = 1024;

/// Credentials a device presented.
pub struct Credentials {
    pub login: String,
    pub password: SecretString,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64")]
    Base64,
    #[error("malformed SASL PLAIN message")]
    Malformed,
    #[error("credentials are not valid UTF-8")]
    Utf8,
    #[error("credentials too long")]
    TooLong,
    /// The authorization identity names someone other than the login
    /// (Cyrus SASL clients send one with `-u`): a refused authorization.
    /// Neither is in the text: a device may type its password into either.
    #[error("the authorization identity differs from the login")]
    Authzid { login: String, authzid: String },
    #[error("authentication canceled")]
    Canceled,
    /// A field of an XOAUTH2 string would hold a control character (its
    /// separator is `\x01`) or the token a space: nothing is sent.
    #[error("a control character or space where XOAUTH2 cannot carry one")]
    Unsafe,
}

/// Decode one base64 line a client sent in a SASL exchange. `*` cancels.
pub fn decode_line(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    let line = trim_ascii(line);
    if line == b"*" {
        return Err(SaslError::Canceled);
    }
    if line == b"=" {
        return Ok(Vec::new());
    }
    if line.len() > MAX_CREDENTIAL_LEN * 3 {
        return Err(SaslError::TooLong);
    }
    B64.decode(line).map_err(|_| SaslError::Base64)
}

/// Decode a SASL PLAIN message (RFC 4616): `authzid NUL authcid NUL passwd`.
/// An authzid is accepted only when it is empty or names the login itself.
pub fn decode_plain(message: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = message.splitn(3, |b| *b == 0);
    let (authzid, authcid, passwd) = match (parts.next(), parts.next(), parts.next()) {
        (Some(z), Some(c), Some(p)) => (z, c, p),
        _ => return Err(SaslError::Malformed),
    };
    if authcid.is_empty() || passwd.contains(&0) {
        return Err(SaslError::Malformed);
    }
    let login = utf8(authcid)?;
    if !authzid.is_empty() {
        let authzid = utf8(authzid)?;
        if !authzid.eq_ignore_ascii_case(&login) {
            return Err(SaslError::Authzid { login, authzid });
        }
    }
    Ok(Credentials {
        login,
        password: SecretString::from(utf8(passwd)?),
    })
}

/// Turn a decoded credential into a string, bounded and UTF-8.
pub fn utf8(bytes: &[u8]) -> Result<String, SaslError> {
    if bytes.len() > MAX_CREDENTIAL_LEN {
        return Err(SaslError::TooLong);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| SaslError::Utf8)
}

/// The base64 `XOAUTH2` initial response:
/// `base64("user=" user "\x01auth=Bearer " token "\x01\x01")`. Refused
/// ([`SaslError::Unsafe`]) when the user is empty or holds a control
/// character, or the token is empty or holds a control character or a
/// space: either would let one field end early and another begin.
pub fn xoauth2(user: &str, token: &SecretString) -> Result<SecretString, SaslError> {
    let token = token.expose_secret();
    let control = |c: char| c.is_control();
    if user.is_empty() || user.contains(control) {
        return Err(SaslError::Unsafe);
    }
    if token.is_empty() || token.contains(|c: char| control(c) || c.is_whitespace()) {
        return Err(SaslError::Unsafe);
    }
    let raw = format!("user={user}\x01auth=Bearer {token}\x01\x01");
    Ok(SecretString::from(B64.encode(raw)))
}

/// What an XOAUTH2 error challenge says, e.g.
/// `{"status":"401","schemes":"bearer","scope":"mail"}`; `None` when the
/// challenge is not base64 JSON. Only the status is kept.
pub fn xoauth2_error_status(challenge: &[u8]) -> Option<String> {
    let json = B64.decode(trim_ascii(challenge)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let status = value.get("status")?;
    let s = match status {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(
        s.chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect(),
    )
}

pub fn encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example string of Microsoft's XOAUTH2 documentation.
    const SEED: &str = "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ==";

    #[test]
    fn xoauth2_matches_the_documented_example() {
        let token = SecretString::from("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA".to_string());
        let s = xoauth2("test@contoso.onmicrosoft.com", &token).unwrap();
        assert_eq!(s.expose_secret(), SEED);
    }

    #[test]
    fn xoauth2_refuses_fields_that_would_end_early() {
        let token = SecretString::from("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA".to_string());
        for user in [
            "bob@example.test\x01x=y@other.test",
            "bob@example.test\x01auth=Bearer stolen\x01\x01",
            "bob@x.test\r\nA1 LOGOUT",
            "bob@x.test\n",
            "bob\0@x.test",
            "bob\x7f@x.test",
            "bob\u{85}@x.test",
            "",
        ] {
            assert_eq!(
                xoauth2(user, &token).err(),
                Some(SaslError::Unsafe),
                "{:?}",
                user.escape_debug()
            );
        }
        for token in ["tok\x01user=x", "tok en", "tok\r\n", "tok\t", ""] {
            let token = SecretString::from(token.to_string());
            assert_eq!(xoauth2("bob@x.test", &token).err(), Some(SaslError::Unsafe));
        }
        // Non-ASCII letters are no control characters.
        assert!(xoauth2("jösé@bücher.example", &token).is_ok());
    }

    #[test]
    fn plain_without_authzid() {
        let c = decode_plain(b"\0user@example.test\0pa ss").unwrap();
        assert_eq!(c.login, "user@example.test");
        assert_eq!(c.password.expose_secret(), "pa ss");
    }

    #[test]
    fn plain_with_matching_authzid() {
        let c = decode_plain(b"User@Example.test\0user@example.test\0pw").unwrap();
        assert_eq!(c.login, "user@example.test");
        assert_eq!(
            decode_plain(b"other@x\0user@x\0pw").err(),
            Some(SaslError::Authzid {
                login: "user@x".into(),
                authzid: "other@x".into()
            })
        );
    }

    #[test]
    fn plain_malformed() {
        assert_eq!(decode_plain(b"user\0pw").err(), Some(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0\0pw").err(), Some(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0u\0p\0w").err(), Some(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0u\xff\0pw").err(), Some(SaslError::Utf8));
    }

    #[test]
    fn lines_decode_cancel_and_reject() {
        assert_eq!(decode_line(b"dXNlcg==\r\n").unwrap(), b"user");
        assert_eq!(decode_line(b"*").err(), Some(SaslError::Canceled));
        assert_eq!(decode_line(b"=").unwrap(), b"");
        assert_eq!(decode_line(b"not base64!").err(), Some(SaslError::Base64));
        assert_eq!(
            decode_line(&vec![b'A'; 8000]).err(),
            Some(SaslError::TooLong)
        );
    }

    #[test]
    fn xoauth2_error_challenge() {
        let c = b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=";
        assert_eq!(xoauth2_error_status(c).as_deref(), Some("401"));
        assert_eq!(xoauth2_error_status(b"garbage"), None);
        assert_eq!(
            xoauth2_error_status(&encode(b"{\"status\":400}").into_bytes()).as_deref(),
            Some("400")
        );
    }

    #[test]
    fn errors_never_carry_the_password() {
        let e = decode_plain(b"\0u\0secret-pw\0x").err().unwrap();
        assert!(!e.to_string().contains("secret-pw"));
        // A password typed as the authorization identity or the login.
        let e = decode_plain(b"typed-pw\0typed-login\0pw").err().unwrap();
        assert!(matches!(e, SaslError::Authzid { .. }));
        assert!(!e.to_string().contains("typed-pw"));
        assert!(!e.to_string().contains("typed-login"));
        let e = xoauth2(
            "u@x.test",
            &SecretString::from("secret-tok\x01".to_string()),
        );
        assert!(!e.err().unwrap().to_string().contains("secret-tok"));
    }
}
