//! Local users: which `[[account]]` a login belongs to, and whether the
//! password is right.
//!
//! Exact logins win over `*@domain` patterns; matching is
//! case-insensitive. A login matches a pattern only when it is a
//! [`Mailbox`] of that domain, and the mailbox an [`Identity`] carries
//! upstream is always a checked [`Mailbox`]: nothing else a device types
//! reaches an XOAUTH2 string, a URL or a header. Argon2id verification runs
//! on the blocking pool, at most [`MAX_CONCURRENT_VERIFIES`] at once, and
//! an unknown login is checked against a dummy hash so that it costs the
//! same as a wrong password. [`Accounts::describe`] is how a login appears
//! in the log: a device may type its password into the user field.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::config::provider::{self, Provider};
use crate::config::{protocols_text, AccountConfig, Grant, Protocol, SendVia};
use crate::error::AuthError;
use crate::mailbox::Mailbox;

mod identity;
pub use identity::Identity;

/// Argon2 checks running at once; more wait, so logins cannot exhaust the CPU.
pub const MAX_CONCURRENT_VERIFIES: usize = 4;

struct Account {
    login: String,
    grant: Grant,
    password_hash: Option<SecretString>,
    mailbox: Option<String>,
    /// Lower-cased addresses or `*@domain` patterns.
    allow_shared: Vec<String>,
    /// Envelope senders of spooled messages (empty: any).
    allowed_senders: Vec<String>,
    /// SMTP mail leaves through Microsoft Graph.
    graph: bool,
    /// MAIL FROM and `From:` become the mailbox (`rewrite_sender`).
    rewrite_sender: bool,
    /// The protocols its logins may use (`protocols`); `None`: every one.
    protocols: Option<Vec<Protocol>>,
    provider: Arc<Provider>,
}

impl Account {
    /// A login of this account as `login`, on `mailbox`.
    fn identity(
        &self,
        login: String,
        mailbox: Mailbox,
        password: Option<SecretString>,
    ) -> Identity {
        Identity {
            account: self.login.clone(),
            login,
            mailbox,
            grant: self.grant,
            password,
            graph: self.graph,
            rewrite_sender: self.rewrite_sender,
            provider: self.provider.clone(),
        }
    }

    fn allows(&self, protocol: Protocol) -> bool {
        self.protocols
            .as_ref()
            .map_or(true, |list| list.contains(&protocol))
    }

    fn may_open(&self, shared: &Mailbox) -> bool {
        self.allow_shared
            .iter()
            .any(|a| match a.strip_prefix("*@") {
                Some(domain) => shared.in_domain(domain),
                None => a.eq_ignore_ascii_case(shared),
            })
    }

    /// The mailbox a login of this account works on: `shared` if asked
    /// for, else the account's `mailbox`, else the device's own login.
    fn mailbox_for(
        &self,
        own: Option<&Mailbox>,
        shared: Option<&Mailbox>,
    ) -> Result<Mailbox, AuthError> {
        if let Some(m) = shared {
            return Ok(m.clone());
        }
        match (&self.mailbox, own) {
            (Some(m), _) => Mailbox::parse(m).map_err(|e| {
                AuthError::Authorization(format!(
                    "account {}: its mailbox {:?} is not an address ({e})",
                    self.login.escape_debug(),
                    m.escape_debug().to_string()
                ))
            }),
            (None, Some(m)) => Ok(m.clone()),
            (None, None) => Err(AuthError::Authorization(format!(
                "account {}: its login is not an address; set its mailbox",
                self.login.escape_debug()
            ))),
        }
    }
}

/// What the status page shows of an account: nothing secret.
#[derive(Debug, Clone)]
pub struct Summary {
    pub login: String,
    pub grant: Grant,
    /// Unset: the login itself (each user's own for a `*@domain` pattern).
    pub mailbox: Option<String>,
    pub graph: bool,
    pub provider: Arc<Provider>,
}

pub struct Accounts {
    accounts: Vec<Account>,
    exact: HashMap<String, usize>,
    domains: HashMap<String, usize>,
    dummy_hash: String,
    verifies: Arc<Semaphore>,
    /// Recently verified (account, password) pairs, as HMACs with a random
    /// per-process key, so a device that logs in often skips Argon2.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    mac_key: [u8; 32],
}

/// How long a verified password is remembered.
pub const VERIFIED_TTL: Duration = Duration::from_secs(600);
/// Remembered pairs at most (the cache is emptied when full).
const MAX_VERIFIED: usize = 10_000;

/// Make an Argon2id PHC string (`oxbridge hash-password`).
pub fn hash_password(password: &SecretString) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.expose_secret().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A device's login, trimmed and lower-cased, split at the first `\` into
/// the login proper and the shared mailbox it asks for.
fn split(login: &str) -> (String, Option<String>) {
    let login = login.trim().to_lowercase();
    match login.split_once('\\') {
        Some((base, shared)) => (base.to_string(), Some(shared.to_string())),
        None => (login, None),
    }
}

impl Accounts {
    /// The accounts of the config; `default_send` is `[upstream] send`
    /// (for `[oauth]`'s accounts), `providers` those resolved at start. An
    /// account whose provider is not among them is left out (a reload
    /// refuses such a config first, see [`Accounts::unknown_provider`]).
    pub fn new(
        default_send: SendVia,
        configs: &[AccountConfig],
        providers: &[Arc<Provider>],
    ) -> Accounts {
        let mut accounts = Vec::new();
        let mut exact = HashMap::new();
        let mut domains = HashMap::new();
        for c in configs {
            let Some(provider) = provider::find(providers, c.provider.as_deref()) else {
                continue;
            };
            let i = accounts.len();
            let login = c.login.to_lowercase();
            match login.strip_prefix("*@") {
                Some(domain) => domains.insert(domain.to_string(), i),
                None => exact.insert(login.clone(), i),
            };
            accounts.push(Account {
                login,
                grant: c.grant,
                password_hash: c.password_hash.clone(),
                mailbox: c.mailbox.clone(),
                allow_shared: c.allow_shared.iter().map(|a| a.to_lowercase()).collect(),
                allowed_senders: c.allowed_senders.clone(),
                graph: match (c.send, c.grant) {
                    (Some(via), _) => via == SendVia::Graph,
                    (None, Grant::ClientCredentials) => {
                        default_send == SendVia::Graph && provider.is_default()
                    }
                    (None, _) => false,
                },
                rewrite_sender: c.rewrite_sender,
                protocols: c.protocols.clone(),
                provider: provider.clone(),
            });
        }
        let dummy = SecretString::from("oxbridge-dummy-password".to_string());
        Accounts {
            accounts,
            exact,
            domains,
            dummy_hash: hash_password(&dummy).expect("argon2 with default parameters"),
            verifies: Arc::new(Semaphore::new(MAX_CONCURRENT_VERIFIES)),
            verified: Mutex::new(HashMap::new()),
            mac_key: rand::random(),
        }
    }

    /// The first account of `configs` whose provider is not among
    /// `providers` (a `[[provider]]` added since the start), as an error.
    pub fn unknown_provider(
        configs: &[AccountConfig],
        providers: &[Arc<Provider>],
    ) -> Result<(), String> {
        match configs.iter().find(|c| provider::find(providers, c.provider.as_deref()).is_none()) {
            Some(c) => Err(format!(
                "account {:?} names provider {:?}, which is new: providers are read at start, restart to add one",
                c.login,
                c.provider.as_deref().unwrap_or_default()
            )),
            None => Ok(()),
        }
    }

    /// The account a lower-cased login belongs to, and the login as a
    /// mailbox when it is one. An exact login is compared as it is; a
    /// pattern `*@domain` takes only a [`Mailbox`] whose domain is `domain`.
    fn find(&self, login: &str) -> Option<(&Account, Option<Mailbox>)> {
        if let Some(i) = self.exact.get(login) {
            return Some((&self.accounts[*i], Mailbox::parse(login).ok()));
        }
        let mailbox = Mailbox::parse(login).ok()?;
        let i = self.domains.get(mailbox.domain())?;
        Some((&self.accounts[*i], Some(mailbox)))
    }

    /// The account whose configured `login` (exact or `*@domain`) is `account`.
    fn by_account(&self, account: &str) -> Option<&Account> {
        let account = account.to_lowercase();
        let i = match account.strip_prefix("*@") {
            Some(domain) => self.domains.get(domain),
            None => self.exact.get(&account),
        };
        i.map(|i| &self.accounts[*i])
    }

    /// Check a device's login and password. For the `password` grant the
    /// password is not checked here but carried to the token endpoint.
    ///
    /// `login\\shared@domain` asks for a shared mailbox: granted when the
    /// account of `login` lists it in `allow_shared`.
    pub async fn authenticate(
        &self,
        login: &str,
        password: SecretString,
    ) -> Result<Identity, AuthError> {
        let (login, shared) = split(login);
        let shared = shared.map(|s| Mailbox::parse(&s));
        let found = self.find(&login);
        let shared_ok = match (&shared, &found) {
            (Some(Ok(m)), Some((a, _))) => a.may_open(m),
            (Some(Err(_)), _) => false,
            _ => true,
        };
        let shared = shared.and_then(Result::ok);
        let hash = match &found {
            Some((a, own)) if a.grant == Grant::Password && shared_ok => {
                let mailbox = a.mailbox_for(own.as_ref(), shared.as_ref())?;
                return Ok(a.identity(login, mailbox, Some(password)));
            }
            Some((a, _)) if shared_ok => a
                .password_hash
                .as_ref()
                .map(|h| h.expose_secret().to_string())
                .unwrap_or_else(|| self.dummy_hash.clone()),
            _ => self.dummy_hash.clone(),
        };
        let remembered = found
            .as_ref()
            .filter(|_| shared_ok)
            .map(|(a, _)| self.mac(&a.login, &password));
        let ok = match remembered {
            Some(key) if self.recently_verified(&key) => true,
            _ => {
                let ok = self.verify(hash, password).await;
                if let (true, Some(key)) = (ok, remembered) {
                    self.remember(key);
                }
                ok
            }
        };
        match found {
            Some(_) if !shared_ok => Err(AuthError::BadCredentials(
                "shared mailbox not allowed for this account",
            )),
            Some((a, own)) if ok => Ok(a.identity(
                login.clone(),
                a.mailbox_for(own.as_ref(), shared.as_ref())?,
                None,
            )),
            Some(_) => Err(AuthError::BadCredentials("wrong password")),
            None if Mailbox::parse(&login).is_err() => {
                Err(AuthError::BadCredentials("the login is not a mailbox"))
            }
            None => Err(AuthError::BadCredentials("unknown user")),
        }
    }

    /// Why a login of `login` may not use `protocol`: its account's
    /// `protocols` leave it out. `None` when they allow it, or when no
    /// account takes the login (the password check refuses it as usual).
    /// Nothing but the configured account is looked at: the answer is the
    /// same whatever the password, so that a protocol an account may not
    /// use tells nothing about its password.
    pub fn protocol_refusal(&self, login: &str, protocol: Protocol) -> Option<AuthError> {
        let (a, _) = self.find(&split(login).0)?;
        let list = a.protocols.as_deref().filter(|_| !a.allows(protocol))?;
        Some(AuthError::ProtocolNotAllowed(format!(
            "account {} has protocols = {}; the device logged in over {protocol}",
            a.login.escape_debug(),
            protocols_text(list)
        )))
    }

    /// How a device's login appears in the log: the configured account it
    /// belongs to (for a `*@domain` pattern, the user's mailbox), with the
    /// shared mailbox it asks for. A login no account covers may be a
    /// password typed into the wrong field: it is shown only as a short
    /// keyed fingerprint (the same login gives the same one while the
    /// process lives, and it cannot be turned back), with its domain when
    /// that is a configured one and, when it is no mailbox, why not.
    pub fn describe(&self, login: &str) -> String {
        let (base, shared) = split(login);
        if let Some((account, own)) = self.find(&base) {
            let who = match (account.login.starts_with("*@"), own) {
                (true, Some(m)) => m.to_string(),
                _ => account.login.clone(),
            };
            return match shared.map(|s| Mailbox::parse(&s)) {
                None => who,
                Some(Ok(m)) => format!("{who}\\{m}"),
                Some(Err(e)) => format!("{who}\\(not a mailbox: {e})"),
            };
        }
        let print = fingerprint(login.trim());
        match Mailbox::parse(&base) {
            Ok(m) if self.serves_domain(m.domain()) => {
                format!("unknown user at {} #{print}", m.domain())
            }
            Ok(_) => format!("unknown user #{print}"),
            Err(e) => format!("not a mailbox ({e}) #{print}"),
        }
    }

    /// Whether some account's login (exact or pattern) is in `domain`.
    fn serves_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
            || self
                .exact
                .keys()
                .any(|l| l.rsplit_once('@').is_some_and(|(_, d)| d == domain))
    }

    /// Each configured account as the status page lists it, in config order.
    pub fn summaries(&self) -> Vec<Summary> {
        self.accounts
            .iter()
            .map(|a| Summary {
                login: a.login.clone(),
                grant: a.grant,
                mailbox: a.mailbox.clone(),
                graph: a.graph,
                provider: a.provider.clone(),
            })
            .collect()
    }

    /// The configured account (its `login` in the config) that a device's
    /// login name belongs to, whether or not its password is right.
    pub fn account_of(&self, login: &str) -> Option<String> {
        self.find(&split(login).0).map(|(a, _)| a.login.clone())
    }

    /// What a login's password opens, for the throttle: the account when
    /// it has a `password_hash` (every user of a pattern shares it), else
    /// the login itself; and the shared mailbox it names.
    ///
    /// A login that is no account, or a shared part that is no mailbox,
    /// is kept only as a keyed hash: the counters may live in Redis, and
    /// a device may have typed its password there.
    pub fn claim(&self, login: &str) -> crate::throttle::Claim {
        let (base, shared) = split(login);
        let credential = match self.find(&base) {
            Some((a, _)) if a.grant != Grant::Password => a.login.clone(),
            Some(_) => base,
            None => format!("unknown #{}", fingerprint(&base)),
        };
        let shared = shared.map(|s| match Mailbox::parse(&s) {
            Ok(m) => m.to_string(),
            Err(_) => format!("#{}", fingerprint(&s)),
        });
        crate::throttle::Claim { credential, shared }
    }

    /// The logins of the `refresh_token` accounts, whose refresh tokens are
    /// kept alive.
    pub fn refresh_token_logins(&self) -> Vec<String> {
        self.accounts
            .iter()
            .filter(|a| a.grant == Grant::RefreshToken && !a.login.starts_with("*@"))
            .map(|a| a.login.clone())
            .collect()
    }

    /// The identity of an exact account without a password check: for
    /// `[[relay]]` rules, whose devices are trusted by network.
    pub fn identity(&self, login: &str) -> Result<Identity, AuthError> {
        let login = login.to_lowercase();
        match self.exact.get(&login).map(|i| &self.accounts[*i]) {
            Some(a) if a.grant != Grant::Password => {
                let mailbox = a.mailbox_for(Mailbox::parse(&login).ok().as_ref(), None)?;
                Ok(a.identity(login, mailbox, None))
            }
            _ => Err(AuthError::BadCredentials(
                "relay account missing or with grant = password",
            )),
        }
    }

    /// Whether the account a device logs in as (`login`, or
    /// `login\\shared@domain`) sends its SMTP mail through Microsoft Graph.
    pub fn sends_via_graph(&self, login: &str) -> bool {
        self.find(&split(login).0).is_some_and(|(a, _)| a.graph)
    }

    /// The provider of `account` (a configured login, exact or `*@domain`).
    pub fn provider_of(&self, account: &str) -> Option<Arc<Provider>> {
        self.by_account(account).map(|a| a.provider.clone())
    }

    /// The envelope senders `account` (a configured login, exact or
    /// `*@domain`) may use on a spooling listener (empty: any).
    pub fn allowed_senders(&self, account: &str) -> Vec<String> {
        self.by_account(account)
            .map(|a| a.allowed_senders.clone())
            .unwrap_or_default()
    }

    /// The identity a spooled message is sent with: its account (by the
    /// config's login, exact or `*@domain`) and the mailbox it was taken
    /// for, if the account still exists and may still send as that mailbox
    /// by the rules of a login: its own mailbox (for a pattern, any mailbox
    /// of its domain) or one of its `allow_shared`.
    pub fn spooled_identity(&self, account: &str, mailbox: &str) -> Result<Identity, AuthError> {
        let gone =
            || AuthError::BadCredentials("the spooled message's account is no longer configured");
        let mailbox = Mailbox::parse(mailbox).map_err(|e| {
            AuthError::Authorization(format!("the spooled message's mailbox is not one ({e})"))
        })?;
        let (mut id, own) = match account.to_lowercase().strip_prefix("*@") {
            None => {
                let id = self.identity(account).map_err(|_| gone())?;
                let own = id.mailbox.eq_ignore_ascii_case(&mailbox);
                (id, own)
            }
            Some(domain) => {
                let a = self
                    .by_account(account)
                    .filter(|a| a.grant != Grant::Password)
                    .ok_or_else(gone)?;
                let id = a.identity(mailbox.to_lowercase(), mailbox.clone(), None);
                (id, mailbox.in_domain(domain))
            }
        };
        let shared = self
            .by_account(&id.account)
            .is_some_and(|a| a.may_open(&mailbox));
        if !own && !shared {
            return Err(AuthError::Authorization(format!(
                "account {} may no longer send as {mailbox}",
                id.account.escape_debug()
            )));
        }
        id.mailbox = mailbox;
        Ok(id)
    }

    /// What a session logged in as `id` depends on in this config: a
    /// digest of its account's login, grant, password hash and whether it
    /// allows IMAP, if that
    /// account still takes `id`'s login and may still open its mailbox.
    /// An IMAP session moves to a new login only while this is unchanged.
    pub fn stamp(&self, id: &Identity) -> Option<[u8; 32]> {
        use sha2::Digest;
        let (a, _) = self
            .find(&id.login)
            .filter(|(a, _)| a.login == id.account)?;
        let own = a.mailbox.as_deref().unwrap_or(&id.login);
        if !own.eq_ignore_ascii_case(&id.mailbox) && !a.may_open(&id.mailbox) {
            return None;
        }
        let mut digest = Sha256::new();
        for part in [a.login.as_str(), a.grant.as_str(), &a.provider.name] {
            digest.update(part.as_bytes());
            digest.update([0]);
        }
        // Only IMAP sessions move to a new login: one whose account no
        // longer allows IMAP does not.
        digest.update([u8::from(a.allows(Protocol::Imap))]);
        if let Some(hash) = &a.password_hash {
            digest.update(hash.expose_secret().as_bytes());
        }
        Some(digest.finalize().into())
    }

    fn mac(&self, account: &str, password: &SecretString) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac_key).expect("any key length");
        mac.update(account.as_bytes());
        mac.update(&[0]);
        mac.update(password.expose_secret().as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn recently_verified(&self, key: &[u8; 32]) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(key)
            .is_some_and(|at| at.elapsed() < VERIFIED_TTL)
    }

    fn remember(&self, key: [u8; 32]) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(key, Instant::now());
    }

    async fn verify(&self, hash: String, password: SecretString) -> bool {
        let Ok(_permit) = self.verifies.clone().acquire_owned().await else {
            return false;
        };
        crate::metrics::password_verification();
        tokio::task::spawn_blocking(move || {
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            Argon2::default()
                .verify_password(password.expose_secret().as_bytes(), &parsed)
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

/// Eight hex digits of an HMAC of `text` under a random key of this
/// process, which never leaves it: the same text gives the same digits
/// until a restart, and nothing can be learnt from them without the key.
fn fingerprint(text: &str) -> String {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(text.as_bytes());
    let digest = mac.finalize().into_bytes();
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[path = "accounts_tests.rs"]
mod tests;
