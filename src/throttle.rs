//! Brute-force protection for local logins. A login is counted against
//! its client address (for IPv6, its /64) and against what its password opens (see [`Claim`]):
//! every failure makes the next reply slower (doubling from
//! `login_delay_ms`, at most [`MAX_DELAY`]), and `login_lockout_failures`
//! failures within [`WINDOW`] lock the address or the claim out for
//! `login_lockout_s`, during which even a correct password is refused.
//!
//! An attempt is counted before its password is checked ([`Throttle::begin`]
//! returns an [`Attempt`]): the failures already counted plus the attempts
//! still being checked never exceed the lockout's number, so guesses sent
//! in parallel wait their turn instead of all being tried. The attempt is
//! then settled: a failure counts, a success clears the failures of its
//! own claim only (never its address's), anything else is forgotten.
//! Password checks wait at most [`CHECK_WAIT`] for one of
//! [`MAX_WAITING_CHECKS`] places; past that a login gets the protocol's
//! temporary failure.
//!
//! Only counters live here, never a password. Entries expire with their
//! window; the map is swept when it grows.
//!
//! With the Redis backend the counters are the replicas' together:
//! `fail:<addr|acct|mbox>:...` (INCR, expiring after [`WINDOW`]) and
//! `lock:<...>` (set with the lockout's expiry); attempts being checked
//! are counted per replica. When the state counts alone (the file backend
//! always; Redis when it fails, with a warning), this process's own
//! counters apply.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::state::{Alone, State};

/// Failures older than this are forgotten.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The longest delay put on one failed login.
pub const MAX_DELAY: Duration = Duration::from_secs(4);
/// Password checks (Argon2, or the token endpoint for the `password`
/// grant) waiting or running at once, over all accounts.
pub const MAX_WAITING_CHECKS: usize = 64;
/// How long a login waits for its turn to be checked.
pub const CHECK_WAIT: Duration = Duration::from_secs(10);
/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 10_000;

/// Why a login is not tried now.
pub const ADDRESS_LOCKED: &str = "client address locked out after failed logins";
pub const ACCOUNT_LOCKED: &str = "account locked out after failed logins";
pub const MAILBOX_LOCKED: &str = "shared mailbox locked out after failed logins";
pub const TOO_MANY_WAITING: &str = "too many logins waiting for their password check";

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Key {
    Address(IpAddr),
    /// Whose password is tried ([`Claim::credential`]).
    Account(String),
    /// A shared mailbox named with `login\shared@domain`.
    Mailbox(String),
}

impl Key {
    /// The counter's name in the state.
    fn name(&self) -> String {
        match self {
            Key::Address(ip) => format!("addr:{ip}"),
            Key::Account(a) => format!("acct:{a}"),
            Key::Mailbox(m) => format!("mbox:{m}"),
        }
    }

    fn locked(&self) -> &'static str {
        match self {
            Key::Address(_) => ADDRESS_LOCKED,
            Key::Account(_) => ACCOUNT_LOCKED,
            Key::Mailbox(_) => MAILBOX_LOCKED,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Key::Address(_) => "client address",
            Key::Account(_) => "account",
            Key::Mailbox(_) => "shared mailbox",
        }
    }
}

/// What a login's password opens, resolved from the configured accounts
/// before the password is checked: its failures count here, whatever
/// the device typed as its user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The account for an account with a `password_hash` (one password
    /// for every user of a `*@domain` pattern); the user's own login for
    /// the `password` grant and for unknown logins.
    pub credential: String,
    /// The shared mailbox of `login\shared@domain`.
    pub shared: Option<String>,
}

#[derive(Clone, Copy)]
struct Record {
    failures: u32,
    /// Attempts counted by [`Throttle::begin`] and not yet settled.
    pending: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            failures: 0,
            pending: 0,
            last: now,
            locked_until: None,
        }
    }

    /// Forget failures past their window, or whose lockout is over.
    fn expire(&mut self, now: Instant) {
        if now.duration_since(self.last) >= WINDOW || self.locked_until.is_some_and(|u| now >= u) {
            self.failures = 0;
            self.locked_until = None;
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|u| now < u)
    }
}

/// See [`Throttle::census`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub entries: usize,
    pub checking: usize,
}

pub struct Throttle {
    base_delay: Duration,
    lockout_failures: u32,
    lockout: Duration,
    records: Mutex<HashMap<Key, Record>>,
    /// Woken whenever an attempt is settled.
    settled: Notify,
    /// Places for password checks ([`MAX_WAITING_CHECKS`]).
    checks: Semaphore,
    /// Logins refused because of a lockout (for metrics).
    pub refused: AtomicU64,
    state: Arc<State>,
}

/// A login counted before its password is checked; settle it with
/// [`Attempt::failed`] or [`Attempt::succeeded`]. Dropped unsettled (any
/// other outcome), it is forgotten.
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    keys: Vec<Key>,
    settled: bool,
}

/// The address a failure counts against: an IPv4 address, or the /64 of
/// an IPv6 one (one host's share: it can rotate the rest at will).
fn network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

impl Throttle {
    /// The throttle of `[limits]`, counting over the replicas of `state`.
    pub fn new(limits: &LimitsConfig, state: Arc<State>) -> Throttle {
        Throttle {
            base_delay: Duration::from_millis(limits.login_delay_ms),
            lockout_failures: limits.login_lockout_failures.max(1),
            lockout: Duration::from_secs(limits.login_lockout_s),
            records: Mutex::new(HashMap::new()),
            settled: Notify::new(),
            checks: Semaphore::new(MAX_WAITING_CHECKS),
            refused: AtomicU64::new(0),
            state,
        }
    }

    fn keys(ip: IpAddr, claim: &Claim) -> Vec<Key> {
        let mut keys = vec![
            Key::Address(network(ip)),
            Key::Account(claim.credential.trim().to_lowercase()),
        ];
        if let Some(shared) = &claim.shared {
            keys.push(Key::Mailbox(shared.trim().to_lowercase()));
        }
        keys
    }

    fn locked_out(&self, key: &Key) -> &'static str {
        self.refused.fetch_add(1, Ordering::Relaxed);
        crate::metrics::throttled("locked_out");
        key.locked()
    }

    /// The state counted alone: warn if that is because Redis failed.
    fn alone(&self, alone: Alone) {
        if let Some(e) = alone.failure() {
            tracing::warn!(error = %e, "Redis unavailable; counting failed logins on this replica only");
            crate::metrics::redis_error("throttle");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What this process remembers now: entries (addresses, accounts,
    /// shared mailboxes) with failures inside [`WINDOW`] or a lockout, and
    /// logins whose password is being checked.
    pub fn census(&self) -> Census {
        let now = Instant::now();
        let records = self.lock();
        let mut census = Census::default();
        for (key, r) in records.iter() {
            let mut r = *r;
            r.expire(now);
            if r.failures > 0 || r.locked(now) {
                census.entries += 1;
            }
            // Every attempt counts against exactly one address.
            if matches!(key, Key::Address(_)) {
                census.checking += r.pending as usize;
            }
        }
        census
    }

    /// Count a login of `claim` from `ip` before its password is checked.
    /// `Err` says why it is not tried: a lockout (over all replicas, or by
    /// this process's own counters), or as many attempts already being
    /// checked as failures may still be counted, for longer than
    /// [`CHECK_WAIT`].
    pub async fn begin(&self, ip: IpAddr, claim: &Claim) -> Result<Attempt<'_>, &'static str> {
        let keys = Self::keys(ip, claim);
        let names: Vec<String> = keys.iter().map(Key::name).collect();
        match self.state.locked(&names).await {
            Ok(locked) => {
                if let Some((key, _)) = keys.iter().zip(locked).find(|(_, l)| *l) {
                    return Err(self.locked_out(key));
                }
            }
            Err(alone) => self.alone(alone),
        }
        let deadline = Instant::now() + CHECK_WAIT;
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.try_begin(&keys)? {
                return Ok(Attempt {
                    throttle: self,
                    keys,
                    settled: false,
                });
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                crate::metrics::throttled("busy");
                return Err(TOO_MANY_WAITING);
            }
        }
    }

    /// Count the attempt if every key has room for one more failure;
    /// `Ok(false)`: wait for one being checked to settle.
    fn try_begin(&self, keys: &[Key]) -> Result<bool, &'static str> {
        let now = Instant::now();
        let mut records = self.lock();
        if records.len() >= SWEEP_AT {
            records.retain(|_, r| {
                r.pending > 0 || now.duration_since(r.last) < WINDOW || r.locked(now)
            });
        }
        for key in keys {
            if let Some(r) = records.get_mut(key) {
                r.expire(now);
                if r.locked(now) {
                    drop(records);
                    return Err(self.locked_out(key));
                }
                if r.failures + r.pending >= self.lockout_failures {
                    return Ok(false);
                }
            }
        }
        for key in keys {
            records
                .entry(key.clone())
                .or_insert_with(|| Record::new(now))
                .pending += 1;
        }
        Ok(true)
    }

    /// A place to check a password, waiting at most [`CHECK_WAIT`].
    pub async fn check_turn(&self) -> Result<SemaphorePermit<'_>, &'static str> {
        match tokio::time::timeout(CHECK_WAIT, self.checks.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                crate::metrics::throttled("busy");
                Err(TOO_MANY_WAITING)
            }
        }
    }

    fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (self.base_delay * 2u32.pow(doublings)).min(MAX_DELAY)
    }

    /// The attempt is over: no longer pending.
    fn release(&self, keys: &[Key]) {
        let mut records = self.lock();
        for key in keys {
            if let Some(r) = records.get_mut(key) {
                r.pending = r.pending.saturating_sub(1);
            }
        }
        drop(records);
        self.settled.notify_waiters();
    }

    /// `failures` failures of `key` were counted (by the replicas, or here).
    fn note_failures(&self, key: &Key, failures: u32) {
        let now = Instant::now();
        let mut records = self.lock();
        let r = records
            .entry(key.clone())
            .or_insert_with(|| Record::new(now));
        r.failures = failures;
        r.last = now;
        if failures >= self.lockout_failures && !r.locked(now) {
            r.locked_until = Some(now + self.lockout);
        }
    }

    /// Count a failure of each key in this process; the most failures.
    fn failure_local(&self, keys: &[Key]) -> u32 {
        let now = Instant::now();
        let mut records = self.lock();
        let mut worst = 0;
        for key in keys {
            let r = records
                .entry(key.clone())
                .or_insert_with(|| Record::new(now));
            r.expire(now);
            r.failures += 1;
            r.last = now;
            if r.failures >= self.lockout_failures {
                if r.locked_until.is_none() {
                    tracing::warn!(
                        locked_out = key.what(),
                        failures = r.failures,
                        lockout_s = self.lockout.as_secs(),
                        "too many failed logins; locked out"
                    );
                }
                r.locked_until = Some(now + self.lockout);
            }
            worst = worst.max(r.failures);
        }
        worst
    }
}

impl Attempt<'_> {
    /// The password was wrong: count a failure against every key, over
    /// all replicas (or in this process when the state counts alone);
    /// returns how long to hold the reply back.
    pub async fn failed(mut self) -> Duration {
        let t = self.throttle;
        let mut worst = 0;
        let mut alone = false;
        for key in &self.keys {
            let name = key.name();
            match t
                .state
                .failure(&name, WINDOW, t.lockout_failures, t.lockout)
                .await
            {
                Ok(n) => {
                    if n == t.lockout_failures {
                        tracing::warn!(
                            locked_out = key.what(),
                            failures = n,
                            lockout_s = t.lockout.as_secs(),
                            "too many failed logins; locked out (all replicas)"
                        );
                    }
                    t.note_failures(key, n);
                    worst = worst.max(n);
                }
                Err(e) => {
                    t.alone(e);
                    alone = true;
                    break;
                }
            }
        }
        if alone {
            worst = t.failure_local(&self.keys);
        }
        self.settled = true;
        t.release(&self.keys);
        crate::metrics::throttled("delayed");
        t.delay(worst)
    }

    /// The password was right: the failures of what it opened (the
    /// account, and the shared mailbox) are cleared, over all replicas and
    /// in this process; not their lockouts, and not the address's.
    pub async fn succeeded(mut self) {
        let t = self.throttle;
        let cleared: Vec<Key> = self
            .keys
            .iter()
            .filter(|k| !matches!(k, Key::Address(_)))
            .cloned()
            .collect();
        let names: Vec<String> = cleared.iter().map(Key::name).collect();
        if let Err(alone) = t.state.clear_failures(&names).await {
            t.alone(alone);
        }
        {
            let now = Instant::now();
            let mut records = t.lock();
            for key in &cleared {
                if let Some(r) = records.get_mut(key) {
                    if !r.locked(now) {
                        r.failures = 0;
                    }
                }
            }
        }
        self.settled = true;
        t.release(&self.keys);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.throttle.release(&self.keys);
        }
    }
}

#[cfg(test)]
#[path = "throttle_tests.rs"]
mod tests;
