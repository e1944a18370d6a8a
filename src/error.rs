//! The ways a login can fail, and the reply each earns in each protocol.
//!
//! The detail strings are for the log: they carry OAuth error codes,
//! addresses and server replies, never a password, token or secret.
//! Devices get only the short reason in the protocol reply.

use crate::wire::Refusal;

/// Why a device's login did not end in a relayed session.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong local password or unknown user.
    #[error("bad credentials: {0}")]
    BadCredentials(&'static str),
    /// The SASL authorization identity names someone other than the login.
    #[error("authorization refused: {0}")]
    Authorization(String),
    /// The token endpoint said no for good (`invalid_grant`, `invalid_client`, ...).
    #[error("token refused: {0}")]
    TokenRefused(String),
    /// The token endpoint could not be reached or failed for now.
    #[error("token unavailable: {0}")]
    TokenUnavailable(String),
    /// The upstream server could not be reached, or its TLS or greeting failed.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The upstream server refused the XOAUTH2 login.
    #[error("upstream refused the token: {0}")]
    UpstreamRefused(String),
    /// The upstream server failed the login for now (4xx, `[UNAVAILABLE]`).
    #[error("upstream temporary failure: {0}")]
    UpstreamTemporary(String),
    /// The mailbox has as many upstream sessions as it may; waiting did not help.
    #[error("mailbox busy: {0}")]
    Busy(String),
    /// Too many failed logins from this address or for this account.
    #[error("throttled: {0}")]
    Throttled(&'static str),
    /// The account's grant cannot send later: a spooling listener keeps
    /// no password, and the `password` grant needs one for each token.
    #[error("cannot spool: {0}")]
    CannotSpool(&'static str),
    /// The account's `protocols` leave out the protocol the device used.
    #[error("protocol not allowed: {0}")]
    ProtocolNotAllowed(String),
}

impl AuthError {
    /// Whether the device should try again later rather than fix its
    /// credentials.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            AuthError::TokenUnavailable(_)
                | AuthError::UpstreamUnavailable(_)
                | AuthError::UpstreamTemporary(_)
                | AuthError::Busy(_)
                | AuthError::Throttled(_)
        )
    }

    /// A short word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::BadCredentials(_) => "bad_credentials",
            AuthError::Authorization(_) => "authorization",
            AuthError::TokenRefused(_) => "token_refused",
            AuthError::TokenUnavailable(_) => "token_unavailable",
            AuthError::UpstreamUnavailable(_) => "upstream_unavailable",
            AuthError::UpstreamRefused(_) => "upstream_refused",
            AuthError::UpstreamTemporary(_) => "upstream_temporary",
            AuthError::Busy(_) => "mailbox_busy",
            AuthError::Throttled(_) => "throttled",
            AuthError::CannotSpool(_) => "cannot_spool",
            AuthError::ProtocolNotAllowed(_) => "protocol_not_allowed",
        }
    }

    /// What the device is told, in any protocol (the wording is the
    /// protocol's, in `wire`).
    pub fn refusal(&self) -> Refusal {
        match self {
            // The same as a wrong password: the device learns nothing.
            AuthError::BadCredentials(_) | AuthError::ProtocolNotAllowed(_) => {
                Refusal::BadCredentials
            }
            AuthError::Authorization(_) => Refusal::Authorization,
            AuthError::TokenRefused(_) => Refusal::NoToken,
            AuthError::UpstreamRefused(_) => Refusal::TokenRejected,
            AuthError::TokenUnavailable(_) => Refusal::TokenUnavailable,
            AuthError::UpstreamUnavailable(_) => Refusal::UpstreamUnavailable,
            AuthError::UpstreamTemporary(_) => Refusal::UpstreamTemporary,
            AuthError::Busy(_) => Refusal::Busy,
            AuthError::Throttled(_) => Refusal::Throttled,
            AuthError::CannotSpool(_) => Refusal::CannotSpool,
        }
    }
}
