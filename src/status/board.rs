//! What the status page knows that neither the config nor a live count
//! tells: the last login failures and other refusals with their
//! diagnosis, the devices seen lately, and each account's latest login
//! and token. Recorded as things happen (like the
//! metrics, one board per process). Nothing secret goes in: the errors are
//! the texts the log carries, and a user name is kept only when it is a
//! configured account (a device may type its password into the user field).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::Protocol;
use crate::device::refusal::Who;
use crate::error::AuthError;

/// Login failures kept for the page, newest first.
pub const MAX_FAILURES: usize = 20;
/// Other refusals kept for the page, newest first.
pub const MAX_REFUSALS: usize = 20;
/// Devices kept for the page, the most recently heard from first.
pub const MAX_DEVICES: usize = 50;
/// Accounts and token keys remembered at most (configured accounts only,
/// so this is a safety bound).
const MAX_RECORDS: usize = 10_000;

/// One refused login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Unix seconds.
    pub at: u64,
    pub protocol: Protocol,
    pub peer: IpAddr,
    /// The configured account the login belongs to; None: no such account.
    pub account: Option<String>,
    pub reason: &'static str,
    pub error: String,
    pub fix: Option<&'static str>,
}

/// A refusal other than a failed login (see [`crate::device::refusal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalEntry {
    /// Unix seconds.
    pub at: u64,
    pub protocol: Protocol,
    pub peer: IpAddr,
    /// What the device called itself.
    pub name: Option<String>,
    /// The login as the log shows it.
    pub login: Option<String>,
    pub reason: &'static str,
    /// The reply the device got (cleaned, bounded).
    pub said: String,
    pub fix: Option<&'static str>,
}

/// A device as last seen: one per address and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub peer: IpAddr,
    pub name: Option<String>,
    pub protocol: Protocol,
    pub login: Option<String>,
    pub tls: Option<&'static str>,
    /// Unix seconds of its last login.
    pub last_ok: Option<u64>,
    /// Unix seconds, what went wrong, and the fix.
    pub last_failure: Option<(u64, String, Option<&'static str>)>,
}

/// An account's latest logins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Logins {
    pub last_ok: Option<u64>,
    pub last_failure: Option<u64>,
    /// Failures since the last success.
    pub failing: u64,
}

/// The latest token request of one token key (an account, or the app's
/// shared `client_credentials` token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRecord {
    /// Unix seconds of the last token obtained, and when it expires.
    pub obtained: Option<u64>,
    pub expires: Option<u64>,
    /// The last failure, if it came after the last success.
    pub error: Option<(u64, String)>,
}

#[derive(Default)]
struct Board {
    failures: VecDeque<Failure>,
    refusals: VecDeque<RefusalEntry>,
    devices: VecDeque<DeviceEntry>,
    logins: HashMap<String, Logins>,
    tokens: HashMap<String, TokenRecord>,
}

static BOARD: Mutex<Option<Board>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut Board) -> T) -> T {
    let mut board = BOARD.lock().unwrap_or_else(|e| e.into_inner());
    f(board.get_or_insert_with(Board::default))
}

/// Unix seconds now (the spool's clock).
pub use crate::spool::queue::now;

/// The Unix second of a monotonic instant (in the future or past).
pub fn unix_of(at: Instant) -> u64 {
    let t = Instant::now();
    match at.checked_duration_since(t) {
        Some(ahead) => now() + ahead.as_secs(),
        None => now().saturating_sub(t.duration_since(at).as_secs()),
    }
}

/// A device login: `account` is the configured account it belongs to.
pub fn login(
    protocol: Protocol,
    peer: IpAddr,
    account: Option<&str>,
    result: Result<(), &AuthError>,
) {
    let at = now();
    with(|b| {
        if let Some(account) = account {
            if b.logins.len() < MAX_RECORDS || b.logins.contains_key(account) {
                let entry = b.logins.entry(account.to_string()).or_default();
                match result {
                    Ok(()) => {
                        entry.last_ok = Some(at);
                        entry.failing = 0;
                    }
                    Err(_) => {
                        entry.last_failure = Some(at);
                        entry.failing += 1;
                    }
                }
            }
        }
        if let Err(e) = result {
            b.failures.push_front(Failure {
                at,
                protocol,
                peer,
                account: account.map(str::to_string),
                reason: e.reason(),
                error: e.to_string(),
                fix: crate::diagnose::fix(e),
            });
            b.failures.truncate(MAX_FAILURES);
        }
    })
}

/// A refusal of the device `who`: the reply it got, and the fix.
pub fn refusal(who: &Who, reason: &'static str, said: &str, fix: Option<&'static str>) {
    let at = now();
    with(|b| {
        b.refusals.push_front(RefusalEntry {
            at,
            protocol: who.protocol,
            peer: who.peer,
            name: who.name.clone(),
            login: who.login.clone(),
            reason,
            said: said.to_string(),
            fix,
        });
        b.refusals.truncate(MAX_REFUSALS);
        b.device(who).last_failure = Some((at, format!("{reason}: {said}"), fix));
    })
}

/// A login of the device `who`: `None` when it went through.
pub fn device_login(who: &Who, error: Option<&AuthError>) {
    let at = now();
    with(|b| {
        let entry = b.device(who);
        match error {
            None => entry.last_ok = Some(at),
            Some(e) => {
                entry.last_failure =
                    Some((at, format!("{}: {e}", e.reason()), crate::diagnose::fix(e)))
            }
        }
    })
}

impl Board {
    /// The entry of the device `who`, moved to the front (made if new; the
    /// least recently heard from goes past [`MAX_DEVICES`]), updated with
    /// what is known of it now.
    fn device(&mut self, who: &Who) -> &mut DeviceEntry {
        let found = self
            .devices
            .iter()
            .position(|d| d.peer == who.peer && d.name == who.name);
        let mut entry = match found.and_then(|i| self.devices.remove(i)) {
            Some(e) => e,
            None => DeviceEntry {
                peer: who.peer,
                name: who.name.clone(),
                protocol: who.protocol,
                login: None,
                tls: None,
                last_ok: None,
                last_failure: None,
            },
        };
        entry.protocol = who.protocol;
        entry.login = who.login.clone().or(entry.login);
        entry.tls = who.tls.or(entry.tls);
        self.devices.push_front(entry);
        self.devices.truncate(MAX_DEVICES);
        &mut self.devices[0]
    }
}

/// The last refusals other than failed logins, newest first.
pub fn refusals() -> Vec<RefusalEntry> {
    with(|b| b.refusals.iter().cloned().collect())
}

/// The devices heard from lately, the most recent first.
pub fn devices() -> Vec<DeviceEntry> {
    with(|b| b.devices.iter().cloned().collect())
}

/// A token request of `key` ended: the token's expiry (Unix seconds), or
/// the error.
pub fn token(key: &str, result: Result<u64, &AuthError>) {
    let at = now();
    with(|b| {
        if b.tokens.len() >= MAX_RECORDS && !b.tokens.contains_key(key) {
            return;
        }
        let entry = b.tokens.entry(key.to_string()).or_default();
        match result {
            Ok(expires) => {
                entry.obtained = Some(at);
                entry.expires = Some(expires);
                entry.error = None;
            }
            Err(e) => entry.error = Some((at, e.to_string())),
        }
    })
}

/// The last login failures, newest first.
pub fn failures() -> Vec<Failure> {
    with(|b| b.failures.iter().cloned().collect())
}

/// An account's latest logins.
pub fn logins(account: &str) -> Logins {
    with(|b| b.logins.get(account).cloned().unwrap_or_default())
}

/// The latest token request of `key`.
pub fn token_record(key: &str) -> TokenRecord {
    with(|b| b.tokens.get(key).cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_bounded_newest_first_and_successes_reset_the_count() {
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let account = "board-test@example.test";
        for _ in 0..MAX_FAILURES + 5 {
            login(
                Protocol::Smtp,
                peer,
                Some(account),
                Err(&AuthError::BadCredentials("wrong password")),
            );
        }
        login(
            Protocol::Imap,
            peer,
            None,
            Err(&AuthError::TokenUnavailable("timed out".into())),
        );
        let failures = failures();
        assert_eq!(failures.len(), MAX_FAILURES);
        assert_eq!(failures[0].protocol, Protocol::Imap);
        assert_eq!(failures[0].account, None);
        assert_eq!(failures[1].account.as_deref(), Some(account));
        assert_eq!(logins(account).failing, MAX_FAILURES as u64 + 5);
        login(Protocol::Smtp, peer, Some(account), Ok(()));
        let after = logins(account);
        assert_eq!(after.failing, 0);
        assert!(after.last_ok.is_some() && after.last_failure.is_some());
    }

    #[test]
    fn devices_are_told_apart_by_name_and_bounded() {
        let peer: IpAddr = "192.0.2.99".parse().unwrap();
        let mut who = Who::new(Protocol::Smtp, peer, Some("TLSv1.2"));
        who.name = Some("printer-a.board-test".into());
        who.login = Some("scan@example.test".into());
        device_login(&who, None);
        let mut other = who.clone();
        other.name = Some("printer-b.board-test".into());
        refusal(
            &other,
            "encryption_required",
            "538 5.7.11 x",
            Some("use STARTTLS"),
        );
        let mine: Vec<_> = devices().into_iter().filter(|d| d.peer == peer).collect();
        assert_eq!(mine.len(), 2, "{mine:?}");
        assert_eq!(mine[0].name.as_deref(), Some("printer-b.board-test"));
        assert_eq!(mine[0].last_ok, None);
        let (_, what, fix) = mine[0].last_failure.clone().unwrap();
        assert_eq!(
            (what.as_str(), fix),
            ("encryption_required: 538 5.7.11 x", Some("use STARTTLS"))
        );
        assert!(mine[1].last_ok.is_some() && mine[1].last_failure.is_none());
        assert_eq!(mine[1].tls, Some("TLSv1.2"));
        assert_eq!(refusals()[0].reason, "encryption_required");
        for i in 0..MAX_DEVICES + 5 {
            let mut many = who.clone();
            many.name = Some(format!("many-{i}.board-test"));
            device_login(&many, None);
        }
        assert_eq!(devices().len(), MAX_DEVICES);
        assert_eq!(devices()[0].name.as_deref(), Some("many-54.board-test"));
    }

    #[test]
    fn a_token_success_clears_the_last_error() {
        let key = "board-test-token";
        token(key, Err(&AuthError::TokenRefused("AADSTS7000215".into())));
        assert!(token_record(key).error.is_some());
        token(key, Ok(now() + 3600));
        let record = token_record(key);
        assert_eq!(record.error, None);
        assert!(record.expires.unwrap() >= now() + 3599);
    }
}
