//! The new logins of a session that moves ([`Renew`]). oxbridge's own,
//! [`Renewer`], first checks that the account the device logged in as is
//! still configured as it was at the login (a reload may have removed it
//! or changed its password hash), then logs in through the one login path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::accounts::{Accounts, Identity};
use crate::app::App;
use crate::config::Protocol;
use crate::error::AuthError;
use crate::login::Renewed;

/// Why a new login is not made: the session's account was removed, or
/// its login, grant, password hash or mailbox changed, since the device
/// logged in.
pub const REVOKED: &str = "account removed or changed";

/// Logs in again upstream for this session (see [`crate::login::renew`]).
pub trait Renew: Send {
    fn renew(&mut self) -> Renewing;
}

/// A new login under way.
pub type Renewing = Pin<Box<dyn Future<Output = Result<Renewed, AuthError>> + Send>>;

impl<F, Fut> Renew for F
where
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<Renewed, AuthError>> + Send + 'static,
{
    fn renew(&mut self) -> Renewing {
        Box::pin(self())
    }
}

/// New logins for the session of `id`, while its account stays as it was.
pub struct Renewer {
    app: Arc<App>,
    id: Identity,
    /// The account as the device logged in to it ([`Accounts::stamp`]);
    /// none when that cannot be told.
    stamp: Option<[u8; 32]>,
}

impl Renewer {
    /// `before` are the accounts that were in force when the device's
    /// dialogue began: if a reload changed the account while the device
    /// logged in, which version its password was checked against cannot
    /// be told, and the session is not moved.
    pub fn new(app: Arc<App>, id: Identity, before: &Accounts) -> Renewer {
        let stamp = app
            .accounts()
            .stamp(&id)
            .filter(|now| before.stamp(&id) == Some(*now));
        Renewer { app, id, stamp }
    }
}

impl Renew for Renewer {
    fn renew(&mut self) -> Renewing {
        let (app, id, stamp) = (self.app.clone(), self.id.clone(), self.stamp);
        Box::pin(async move {
            if stamp.is_none() || app.accounts().stamp(&id) != stamp {
                return Err(AuthError::BadCredentials(REVOKED));
            }
            crate::login::renew(&app, Protocol::Imap, &id).await
        })
    }
}
