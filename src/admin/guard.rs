//! Who may use the admin endpoint: the admin token (`[admin]
//! token_file`) as `Authorization: Bearer` or as the password of HTTP
//! Basic (which a browser asks for), and the anti-forgery tokens that
//! every form of the status page carries.
//!
//! Promises: the token is compared by its SHA-256, so the comparison takes
//! the same time for any guess; an anti-forgery token is an HMAC (with a
//! key random to this process) of the moment its page was made, good for
//! [`FORM_LIFETIME`]: a page of another site cannot make one, and an old
//! one does not work.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::debug;

use super::Admin;

/// How long a page's forms can be sent.
pub const FORM_LIFETIME: Duration = Duration::from_secs(3600);

pub fn digest(token: &SecretString) -> [u8; 32] {
    Sha256::digest(token.expose_secret().as_bytes()).into()
}

/// The token a request carries: `Authorization: Bearer T`, or HTTP Basic
/// with T as the password (any user name).
fn presented(headers: &HeaderMap) -> Option<SecretString> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(SecretString::from(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let pair = String::from_utf8(decoded).ok()?;
        let (_, password) = pair.split_once(':')?;
        return Some(SecretString::from(password.to_string()));
    }
    None
}

/// The status page and the metrics answer only the configured token.
pub async fn authorized(
    State(admin): State<Admin>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(expected) = admin.token else {
        return next.run(request).await;
    };
    if presented(request.headers()).is_some_and(|t| digest(&t) == expected) {
        return next.run(request).await;
    }
    debug!(path = %request.uri().path(), "admin request without the right token");
    let mut refusal = (
        StatusCode::UNAUTHORIZED,
        "401 the admin token is required (Authorization: Bearer, or the password of HTTP Basic)\n",
    )
        .into_response();
    // Basic first and on a line of its own: that is the one browsers parse.
    for challenge in [
        "Basic realm=\"oxbridge\", charset=\"UTF-8\"",
        "Bearer realm=\"oxbridge\"",
    ] {
        refusal.headers_mut().append(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(challenge),
        );
    }
    refusal
}

/// The anti-forgery tokens of this process's pages.
pub struct Forgery {
    key: [u8; 32],
}

impl Forgery {
    pub fn new() -> Forgery {
        Forgery {
            key: rand::random(),
        }
    }

    fn mac(&self, issued: u64) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        mac.update(b"oxbridge-form\0");
        mac.update(&issued.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// A token for the forms of a page made at `now` (Unix seconds).
    pub fn issue(&self, now: u64) -> String {
        format!("{now}.{}", self.mac(now))
    }

    /// Whether `token` is one of ours, made at most [`FORM_LIFETIME`]
    /// before `now`.
    pub fn check(&self, token: &str, now: u64) -> bool {
        let Some((issued, mac)) = token.split_once('.') else {
            return false;
        };
        let Ok(issued) = issued.parse::<u64>() else {
            return false;
        };
        let fresh = issued <= now && now - issued <= FORM_LIFETIME.as_secs();
        let expected = self.mac(issued);
        // Compared as digests: the same time whatever the guess.
        fresh && Sha256::digest(expected.as_bytes()) == Sha256::digest(mac.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn the_token_comes_as_bearer_or_as_the_basic_password() {
        let token = |h: &HeaderMap| presented(h).map(|t| t.expose_secret().to_string());
        assert_eq!(
            token(&with_auth("Bearer 0123456789abcdef")).as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(
            token(&with_auth("bearer  0123456789abcdef ")).as_deref(),
            Some("0123456789abcdef")
        );
        // "admin:0123456789abcdef"
        assert_eq!(
            token(&with_auth("Basic YWRtaW46MDEyMzQ1Njc4OWFiY2RlZg==")).as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(token(&with_auth("Basic !!!")), None);
        assert_eq!(token(&with_auth("Digest x")), None);
        assert_eq!(token(&HeaderMap::new()), None);
        let right = SecretString::from("0123456789abcdef".to_string());
        let wrong = SecretString::from("0123456789abcdeF".to_string());
        assert_ne!(digest(&right), digest(&wrong));
    }

    #[test]
    fn a_form_token_is_ours_and_fresh() {
        let f = Forgery::new();
        let t = f.issue(1000);
        assert!(f.check(&t, 1000) && f.check(&t, 1000 + 3600));
        assert!(!f.check(&t, 1000 + 3601), "too old");
        assert!(!f.check(&t, 999), "from the future");
        assert!(!Forgery::new().check(&t, 1000), "another process's");
        let (issued, mac) = t.split_once('.').unwrap();
        assert!(!f.check(
            &format!("{}.{mac}", issued.parse::<u64>().unwrap() + 1),
            1001
        ));
        for bad in ["", "1000", "1000.", ".x", "x.y", &format!("{t}x")] {
            assert!(!f.check(bad, 1000), "{bad:?}");
        }
    }
}
