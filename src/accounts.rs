//! Local users: which `[[account]]` a login belongs to, and whether the
//! password is right.
//!
//! Exact logins win over `*@domain` patterns; matching is
//! case-insensitive. Argon2id verification runs on the blocking pool,
//! at most [`MAX_CONCURRENT_VERIFIES`] at once, and an unknown login is
//! checked against a dummy hash so that it costs the same as a wrong
//! password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::config::{AccountConfig, Grant, SendVia};
use crate::error::AuthError;

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
}

impl Account {
    fn may_open(&self, shared: &str) -> bool {
        self.allow_shared
            .iter()
            .any(|a| match a.strip_prefix("*@") {
                Some(domain) => shared.rsplit_once('@').is_some_and(|(_, d)| d == domain),
                None => a == shared,
            })
    }
}

/// Who a device turned out to be, once its credentials were accepted
/// locally (or, for the `password` grant, are to be tried upstream).
#[derive(Clone)]
pub struct Identity {
    /// The account's `login` from the config (a pattern for `*@domain`).
    pub account: String,
    /// The login the device sent, lower-cased.
    pub login: String,
    /// XOAUTH2 `user=`.
    pub mailbox: String,
    pub grant: Grant,
    /// The device's password, kept only for the `password` grant.
    pub password: Option<SecretString>,
    /// SMTP mail of this account leaves through Microsoft Graph.
    pub graph: bool,
}

/// What the status page shows of an account: nothing secret.
#[derive(Debug, Clone)]
pub struct Summary {
    pub login: String,
    pub grant: Grant,
    /// Unset: the login itself (each user's own for a `*@domain` pattern).
    pub mailbox: Option<String>,
    pub graph: bool,
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

impl Accounts {
    /// The accounts of the config; `default_send` is `[upstream] send`.
    pub fn new(default_send: SendVia, configs: &[AccountConfig]) -> Accounts {
        let mut accounts = Vec::new();
        let mut exact = HashMap::new();
        let mut domains = HashMap::new();
        for (i, c) in configs.iter().enumerate() {
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
                    (None, Grant::ClientCredentials) => default_send == SendVia::Graph,
                    (None, _) => false,
                },
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

    /// Whether some `[[account]]` (exact or `*@domain`) covers this login.
    pub fn matches(&self, login: &str) -> bool {
        self.find(&login.trim().to_lowercase()).is_some()
    }

    fn find(&self, login: &str) -> Option<&Account> {
        if let Some(i) = self.exact.get(login) {
            return Some(&self.accounts[*i]);
        }
        let domain = login.rsplit_once('@')?.1;
        self.domains.get(domain).map(|i| &self.accounts[*i])
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
        let login = login.trim().to_lowercase();
        let (login, shared) = match login.split_once('\\') {
            Some((base, shared)) => (base.to_string(), Some(shared.to_string())),
            None => (login, None),
        };
        let account = self.find(&login);
        let shared_ok = match (&shared, account) {
            (Some(m), Some(a)) => a.may_open(m),
            _ => true,
        };
        let hash = match account {
            Some(a) if a.grant == Grant::Password && shared_ok => {
                return Ok(Identity {
                    account: a.login.clone(),
                    mailbox: shared.unwrap_or_else(|| login.clone()),
                    login,
                    grant: a.grant,
                    password: Some(password),
                    graph: a.graph,
                });
            }
            Some(a) if shared_ok => a
                .password_hash
                .as_ref()
                .map(|h| h.expose_secret().to_string())
                .unwrap_or_else(|| self.dummy_hash.clone()),
            _ => self.dummy_hash.clone(),
        };
        let remembered = account
            .filter(|_| shared_ok)
            .map(|a| self.mac(&a.login, &password));
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
        match account {
            Some(_) if !shared_ok => Err(AuthError::BadCredentials(
                "shared mailbox not allowed for this account",
            )),
            Some(a) if ok => Ok(Identity {
                account: a.login.clone(),
                mailbox: shared
                    .or_else(|| a.mailbox.clone())
                    .unwrap_or_else(|| login.clone()),
                login,
                grant: a.grant,
                password: None,
                graph: a.graph,
            }),
            Some(_) => Err(AuthError::BadCredentials("wrong password")),
            None => Err(AuthError::BadCredentials("unknown user")),
        }
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
            })
            .collect()
    }

    /// The configured account (its `login` in the config) that a device's
    /// login name belongs to, whether or not its password is right.
    pub fn account_of(&self, login: &str) -> Option<String> {
        let login = login.trim().to_lowercase();
        let base = login
            .split_once('\\')
            .map_or(login.as_str(), |(base, _)| base);
        self.find(base).map(|a| a.login.clone())
    }

    /// What a login's password opens, for the throttle: the account when
    /// it has a `password_hash` (every user of a pattern shares it), else
    /// the login itself; and the shared mailbox it names.
    pub fn claim(&self, login: &str) -> crate::throttle::Claim {
        let login = login.trim().to_lowercase();
        let (base, shared) = match login.split_once('\\') {
            Some((base, shared)) => (base.to_string(), Some(shared.to_string())),
            None => (login, None),
        };
        let credential = match self.find(&base) {
            Some(a) if a.grant != Grant::Password => a.login.clone(),
            _ => base,
        };
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
            Some(a) if a.grant != Grant::Password => Ok(Identity {
                account: a.login.clone(),
                mailbox: a.mailbox.clone().unwrap_or_else(|| login.clone()),
                login,
                grant: a.grant,
                password: None,
                graph: a.graph,
            }),
            _ => Err(AuthError::BadCredentials(
                "relay account missing or with grant = password",
            )),
        }
    }

    /// Whether the account a device logs in as (`login`, or
    /// `login\\shared@domain`) sends its SMTP mail through Microsoft Graph.
    pub fn sends_via_graph(&self, login: &str) -> bool {
        let login = login.trim().to_lowercase();
        let base = login.split_once('\\').map_or(login.as_str(), |(b, _)| b);
        self.find(base).is_some_and(|a| a.graph)
    }

    /// The envelope senders `account` may use on a spooling listener
    /// (empty: any).
    pub fn allowed_senders(&self, account: &str) -> Vec<String> {
        self.find(&account.to_lowercase())
            .map(|a| a.allowed_senders.clone())
            .unwrap_or_default()
    }

    /// The identity a spooled message is sent with: its account (by the
    /// config's login) and the mailbox it was taken for, if the account
    /// still exists and may still send as that mailbox.
    pub fn spooled_identity(&self, account: &str, mailbox: &str) -> Result<Identity, AuthError> {
        let mut id = self.identity(account).map_err(|_| {
            AuthError::BadCredentials("the spooled message's account is no longer configured")
        })?;
        let own = id.mailbox.eq_ignore_ascii_case(mailbox);
        let shared = self
            .find(&id.login)
            .is_some_and(|a| a.may_open(&mailbox.to_lowercase()));
        if !own && !shared {
            return Err(AuthError::Authorization(format!(
                "account {account} may no longer send as {mailbox}"
            )));
        }
        id.mailbox = mailbox.to_string();
        Ok(id)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn account(
        login: &str,
        grant: Grant,
        password: Option<&str>,
        mailbox: Option<&str>,
    ) -> AccountConfig {
        AccountConfig {
            login: login.into(),
            grant,
            password_hash: password.map(|p| {
                SecretString::from(hash_password(&SecretString::from(p.to_string())).unwrap())
            }),
            mailbox: mailbox.map(String::from),
            allow_shared: Vec::new(),
            allowed_senders: Vec::new(),
            send: None,
        }
    }

    fn pw(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    #[tokio::test]
    async fn exact_pattern_and_failures() {
        let accounts = Accounts::new(
            SendVia::Smtp,
            &[
                account(
                    "Scanner@Example.test",
                    Grant::ClientCredentials,
                    Some("right"),
                    Some("scans@example.test"),
                ),
                account("*@example.test", Grant::Password, None, None),
                account(
                    "*@other.test",
                    Grant::ClientCredentials,
                    Some("domainpw"),
                    None,
                ),
            ],
        );
        let id = accounts
            .authenticate("scanner@example.TEST", pw("right"))
            .await
            .unwrap();
        assert_eq!(id.mailbox, "scans@example.test");
        assert_eq!(id.grant, Grant::ClientCredentials);
        assert!(id.password.is_none());

        let err = accounts
            .authenticate("scanner@example.test", pw("wrong"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, AuthError::BadCredentials("wrong password")));

        let id = accounts
            .authenticate("Anyone@example.test", pw("whatever"))
            .await
            .unwrap();
        assert_eq!(
            (id.mailbox.as_str(), id.grant),
            ("anyone@example.test", Grant::Password)
        );
        assert_eq!(id.password.unwrap().expose_secret(), "whatever");

        let id = accounts
            .authenticate("x@other.test", pw("domainpw"))
            .await
            .unwrap();
        assert_eq!(id.mailbox, "x@other.test");

        let err = accounts
            .authenticate("nobody@nowhere.test", pw("right"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, AuthError::BadCredentials("unknown user")));
    }

    #[tokio::test]
    async fn shared_mailboxes_need_allow_shared() {
        let mut scanner = account(
            "scanner@x.test",
            Grant::ClientCredentials,
            Some("pw"),
            Some("scans@x.test"),
        );
        scanner.allow_shared = vec!["Reception@x.test".into(), "*@shared.x.test".into()];
        let accounts = Accounts::new(
            SendVia::Smtp,
            &[scanner, account("*@x.test", Grant::Password, None, None)],
        );
        let id = accounts
            .authenticate("scanner@x.test\\reception@x.test", pw("pw"))
            .await
            .unwrap();
        assert_eq!(
            (id.login.as_str(), id.mailbox.as_str()),
            ("scanner@x.test", "reception@x.test")
        );
        let id = accounts
            .authenticate("scanner@x.test\\hr@shared.x.test", pw("pw"))
            .await
            .unwrap();
        assert_eq!(id.mailbox, "hr@shared.x.test");
        let err = accounts
            .authenticate("scanner@x.test\\ceo@x.test", pw("pw"))
            .await
            .err()
            .unwrap();
        assert!(matches!(
            err,
            AuthError::BadCredentials("shared mailbox not allowed for this account")
        ));
        assert!(accounts
            .authenticate("scanner@x.test\\reception@x.test", pw("bad"))
            .await
            .is_err());
        // A password-grant account without allow_shared cannot open others' mailboxes.
        assert!(accounts
            .authenticate("u@x.test\\ceo@x.test", pw("any"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_repeated_correct_login_skips_argon2() {
        let accounts = Accounts::new(
            SendVia::Smtp,
            &[account(
                "a@x.test",
                Grant::ClientCredentials,
                Some("right"),
                None,
            )],
        );
        let t = std::time::Instant::now();
        accounts
            .authenticate("a@x.test", pw("right"))
            .await
            .unwrap();
        let first = t.elapsed();
        let t = std::time::Instant::now();
        accounts
            .authenticate("a@x.test", pw("right"))
            .await
            .unwrap();
        let again = t.elapsed();
        assert!(again * 10 < first, "first {first:?}, again {again:?}");
        // A wrong password is still checked in full, and refused.
        assert!(accounts
            .authenticate("a@x.test", pw("wrong"))
            .await
            .is_err());
        assert_eq!(accounts.verified.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unknown_user_costs_a_hash_too() {
        let accounts = Accounts::new(
            SendVia::Smtp,
            &[account(
                "a@x.test",
                Grant::ClientCredentials,
                Some("p"),
                None,
            )],
        );
        let t = std::time::Instant::now();
        let _ = accounts.authenticate("a@x.test", pw("bad")).await;
        let known = t.elapsed();
        let t = std::time::Instant::now();
        let _ = accounts.authenticate("zz@x.test", pw("bad")).await;
        let unknown = t.elapsed();
        // Both run one Argon2 verification; neither is near-instant.
        assert!(
            unknown * 4 > known,
            "unknown {unknown:?} vs known {known:?}"
        );
    }
}
