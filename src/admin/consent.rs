//! Consent from the status page: a `refresh_token` account's
//! authorization code with PKCE, started by one request (Connect /
//! Reconnect) and finished by another (the provider's redirect to
//! `{public_url}/consent/callback`, or the address the operator pastes).
//!
//! Promises: `state` and the PKCE verifier stay in this process, each
//! consent usable once and for [`CONSENT_LIFETIME`]; an answer whose
//! `state` is not one of ours changes nothing. Before the new refresh
//! token replaces anything, its access token must open the account's
//! mailbox with an XOAUTH2 login upstream, so that consenting as someone
//! else changes nothing. The refresh token is stored as `oxbridge login`
//! stores it (file store or Redis) and the account's cached access token
//! is dropped, so logins use the new consent at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::app::App;
use crate::config::{Grant, Protocol};
use crate::oauth::consent::{Answer, Authorization, Request};

/// How long a started consent can be finished.
pub const CONSENT_LIFETIME: Duration = Duration::from_secs(600);
/// Consents under way at once; more are refused until some end.
pub const MAX_WAITING: usize = 32;

struct Waiting {
    account: String,
    auth: Authorization,
    started: Instant,
}

/// The consents under way.
#[derive(Default)]
pub struct Consents {
    waiting: Mutex<Vec<Waiting>>,
}

/// A consent that can be finished: its account and its authorization.
pub struct Started {
    pub account: String,
    pub auth: Authorization,
}

impl Consents {
    /// Start one for `account`, the browser to come back to `redirect`
    /// (the callback, or for a pasted address the provider's default):
    /// the URL to open and the mailbox to sign in as.
    pub fn start(
        &self,
        app: &App,
        account: &str,
        redirect: Option<&str>,
    ) -> Result<(String, String, String), String> {
        let id = app
            .accounts()
            .identity(account)
            .ok()
            .filter(|id| {
                id.grant == Grant::RefreshToken && id.account.eq_ignore_ascii_case(account)
            })
            .ok_or_else(|| format!("no refresh_token account has login {account:?}"))?;
        let redirect = redirect
            .map(String::from)
            .unwrap_or_else(|| crate::oauth::consent::paste_redirect(&id.provider));
        let request = Request {
            provider: &id.provider,
            protocols: app.config.protocols(),
            account: &id.account,
            mailbox: id.mailbox.as_str(),
            ca_file: app.config.upstream.ca_file.as_deref(),
        };
        let auth = Authorization::start(&request, &redirect)?;
        let url = auth.url.clone();
        let mut waiting = self.lock();
        waiting.retain(|w| w.started.elapsed() < CONSENT_LIFETIME);
        if waiting.len() >= MAX_WAITING {
            return Err(format!(
                "{MAX_WAITING} consents are under way; finish or wait for them (each lasts {} minutes)",
                CONSENT_LIFETIME.as_secs() / 60
            ));
        }
        waiting.push(Waiting {
            account: id.account.clone(),
            auth,
            started: Instant::now(),
        });
        Ok((url, id.mailbox.to_string(), redirect))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the consent whose `state` this is, if it is ours and not too
    /// old: once only.
    pub fn take(&self, state: &str) -> Option<Started> {
        let mut waiting = self.lock();
        waiting.retain(|w| w.started.elapsed() < CONSENT_LIFETIME);
        let wanted = Sha256::digest(state.as_bytes());
        let i = waiting
            .iter()
            .position(|w| Sha256::digest(w.auth.state().as_bytes()) == wanted)?;
        let w = waiting.swap_remove(i);
        Some(Started {
            account: w.account,
            auth: w.auth,
        })
    }

    /// The consent a pasted address answers, and its code: the address
    /// must carry a `state` of ours (which is then used up) and a code.
    pub fn take_pasted(&self, address: &str) -> Result<(Started, String), String> {
        let url = oauth2::url::Url::parse(address.trim()).map_err(|_| {
            "that is not an address: paste the whole address from the browser's address bar"
                .to_string()
        })?;
        let state = url
            .query_pairs()
            .find(|(k, _)| k == "state")
            .map(|(_, v)| v.into_owned())
            .ok_or("the address carries no state: it is not where the sign-in sent the browser")?;
        let started = self
            .take(&state)
            .ok_or("its state is not one of a sign-in started here, or it was used or is older than 10 minutes: start again with Connect")?;
        match started.auth.answer(&url) {
            Answer::Code(code) => Ok((started, code)),
            Answer::Refused(why) => Err(why),
            Answer::NotOurs(why) => Err(why.to_string()),
        }
    }
}

/// The protocol a new consent is proven with: the first of IMAP, POP3 and
/// SMTP that has a listener and that the account may use.
fn proof_protocol(app: &App, account: &str) -> Option<Protocol> {
    let listening = app.config.protocols();
    let accounts = app.accounts();
    [Protocol::Imap, Protocol::Pop3, Protocol::Smtp]
        .into_iter()
        .find(|p| listening.contains(p) && accounts.protocol_refusal(account, *p).is_none())
}

/// Redeem the code, prove that the new token opens the account's mailbox,
/// then store the refresh token: what happened, in a sentence.
pub async fn finish(app: &App, started: Started, code: String) -> Result<String, String> {
    let account = started.account.clone();
    // A reload may have changed the account since the consent started.
    let id = app
        .accounts()
        .identity(&account)
        .ok()
        .filter(|id| id.grant == Grant::RefreshToken)
        .ok_or_else(|| {
            format!("{account} is no longer a refresh_token account; nothing was changed")
        })?;
    if !app.tokens.has_store() {
        return Err("no token store is open (the first refresh_token account needs a restart); nothing was changed".into());
    }
    let mailbox = id.mailbox.to_string();
    let protocol = proof_protocol(app, &account)
        .ok_or("no listener of a protocol this account may use: the consent cannot be proven")?;
    let granted = started.auth.redeem(code).await?;
    crate::login::prove_token(app, protocol, &id, &granted.access)
        .await
        .map_err(|e| {
            format!(
                "the new consent does not open {mailbox} ({protocol} login refused: {e}). Was it given as another user? Sign in as {mailbox}. The stored consent is unchanged"
            )
        })?;
    app.tokens.store_consent(&id, &granted.refresh).await?;
    Ok(format!(
        "{account} is connected: the new consent opens {mailbox} (proven by a {protocol} login) and is stored; devices use it from their next login"
    ))
}
