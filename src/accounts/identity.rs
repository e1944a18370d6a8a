//! [`Identity`]: who a device turned out to be, as every step after the
//! local login sees it (the token cache, the upstream login, the relay).

use std::sync::Arc;

use secrecy::SecretString;

use crate::config::{Grant, Provider};
use crate::mailbox::Mailbox;
use crate::wire::smtp::stream::Senders;

/// Who a device turned out to be, once its credentials were accepted
/// locally (or, for the `password` grant, are to be tried upstream).
#[derive(Clone)]
pub struct Identity {
    /// The account's `login` from the config (a pattern for `*@domain`).
    pub account: String,
    /// The login the device sent, lower-cased, without `\shared`: the
    /// account's own login, or a [`Mailbox`] of a `*@domain` pattern.
    pub login: String,
    /// XOAUTH2 `user=`.
    pub mailbox: Mailbox,
    pub grant: Grant,
    /// The device's password, kept only for the `password` grant.
    pub password: Option<SecretString>,
    /// SMTP mail of this account leaves through Microsoft Graph.
    pub graph: bool,
    /// Its messages are sent as its mailbox (`rewrite_sender`).
    pub rewrite_sender: bool,
    /// Where its tokens come from and its upstream servers are.
    pub provider: Arc<Provider>,
}

impl Identity {
    /// What a relayed SMTP session of this login checks and rewrites:
    /// the senders `allowed` (empty: any) and, with `rewrite_sender`, the
    /// mailbox every message is sent as; `None` when neither applies.
    pub fn senders(&self, allowed: Vec<String>, relay: bool) -> Option<Senders> {
        let rewrite = self.rewrite_sender.then(|| self.mailbox.clone());
        (!allowed.is_empty() || rewrite.is_some()).then_some(Senders {
            allowed,
            relay,
            // Set from the upstream's EHLO once logged in.
            chunking: true,
            rewrite,
        })
    }
}
