//! The ways a login can fail, and the reply each earns in each protocol.
//!
//! The detail strings are for the log: they carry OAuth error codes,
//! addresses and server replies, never a password, token or secret.
//! Devices get only the short reason in the protocol reply.

/// Why a device's login did not end in a relayed session.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong local password or unknown user.
    #[error("bad credentials: {0}")]
    BadCredentials(&'static str),
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
            AuthError::TokenRefused(_) => "token_refused",
            AuthError::TokenUnavailable(_) => "token_unavailable",
            AuthError::UpstreamUnavailable(_) => "upstream_unavailable",
            AuthError::UpstreamRefused(_) => "upstream_refused",
            AuthError::UpstreamTemporary(_) => "upstream_temporary",
            AuthError::Busy(_) => "mailbox_busy",
            AuthError::Throttled(_) => "throttled",
        }
    }

    /// The SMTP reply to the device's AUTH command.
    pub fn smtp_reply(&self) -> &'static str {
        match self {
            AuthError::BadCredentials(_) => "535 5.7.8 Authentication credentials invalid\r\n",
            AuthError::TokenRefused(_) => {
                "535 5.7.8 Authentication failed: no access token for this account\r\n"
            }
            AuthError::UpstreamRefused(_) => {
                "535 5.7.8 Authentication failed: the mail server refused the access token\r\n"
            }
            AuthError::TokenUnavailable(_) => {
                "454 4.7.0 Temporary authentication failure: token service unavailable\r\n"
            }
            AuthError::UpstreamUnavailable(_) => {
                "454 4.7.0 Temporary failure: mail server unavailable, try again later\r\n"
            }
            AuthError::UpstreamTemporary(_) => {
                "454 4.7.0 Temporary authentication failure at the mail server\r\n"
            }
            AuthError::Busy(_) => {
                "421 4.3.2 Too many sessions for this mailbox at once, try again later\r\n"
            }
            AuthError::Throttled(_) => "454 4.7.0 Too many failed logins; try again later\r\n",
        }
    }
}
