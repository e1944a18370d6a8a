//! What `oxbridge check` and `/metrics` tell about a `refresh_token`
//! account's tokens, kept beside its refresh token: when it was consented,
//! when the stored refresh token was issued, when a refresh last worked and
//! when the access token it earned expires. Times only (Unix seconds):
//! nothing secret, so a lost or unreadable record costs a line of output,
//! never a login.

use serde::{Deserialize, Serialize};

/// Largest health record read back (a few dozen bytes in practice).
pub const MAX_RECORD: u64 = 4096;

/// One account's token times, in Unix seconds; None: not seen yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenHealth {
    /// `oxbridge login` stored a refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consented: Option<u64>,
    /// The refresh token now stored was issued (consent or rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<u64>,
    /// A refresh last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed: Option<u64>,
    /// The access token that refresh earned expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_expires: Option<u64>,
}

/// What happened to an account's tokens.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// `oxbridge login` stored a new refresh token.
    Consented,
    /// A refresh succeeded, earning an access token valid until this Unix
    /// second; `rotated` when a new refresh token came with it.
    Refreshed { access_expires: u64, rotated: bool },
}

impl TokenHealth {
    /// This record after `event` at Unix second `now`.
    pub fn after(mut self, event: Event, now: u64) -> TokenHealth {
        match event {
            Event::Consented => {
                self = TokenHealth {
                    consented: Some(now),
                    issued: Some(now),
                    ..TokenHealth::default()
                };
            }
            Event::Refreshed {
                access_expires,
                rotated,
            } => {
                self.refreshed = Some(now);
                self.access_expires = Some(access_expires);
                if rotated || self.issued.is_none() {
                    self.issued = Some(now);
                }
            }
        }
        self
    }

    pub fn to_bytes(self) -> Vec<u8> {
        serde_json::to_vec(&self).unwrap_or_default()
    }

    /// A stored record; one that does not parse counts as none.
    pub fn from_bytes(bytes: &[u8]) -> TokenHealth {
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_resets_and_refreshes_move_the_times_they_should() {
        let h = TokenHealth::default().after(Event::Consented, 100);
        assert_eq!(
            h,
            TokenHealth {
                consented: Some(100),
                issued: Some(100),
                refreshed: None,
                access_expires: None
            }
        );
        let kept = h.after(
            Event::Refreshed {
                access_expires: 3800,
                rotated: false,
            },
            200,
        );
        assert_eq!((kept.issued, kept.refreshed), (Some(100), Some(200)));
        assert_eq!(kept.access_expires, Some(3800));
        let rotated = kept.after(
            Event::Refreshed {
                access_expires: 4000,
                rotated: true,
            },
            400,
        );
        assert_eq!((rotated.consented, rotated.issued), (Some(100), Some(400)));
        let again = rotated.after(Event::Consented, 500);
        assert_eq!((again.refreshed, again.access_expires), (None, None));
        assert_eq!(TokenHealth::from_bytes(&again.to_bytes()), again);
        assert_eq!(TokenHealth::from_bytes(b"not json"), TokenHealth::default());
    }
}
