//! Brute-force protection for local logins, per client address and per
//! account: every failure makes the next reply slower (doubling from
//! `login_delay_ms`, at most [`MAX_DELAY`]), and `login_lockout_failures`
//! failures within [`WINDOW`] lock the address or account out for
//! `login_lockout_s`, during which even a correct password is refused.
//!
//! Only counters live here, never a password. Entries expire with their
//! window; the map is swept when it grows.
//!
//! With the Redis backend the counters are the replicas' together:
//! `fail:<address|account>` (INCR, expiring after [`WINDOW`]) and
//! `lock:<...>` (set with the lockout's expiry). When the state counts
//! alone (the file backend always; Redis when it fails, with a warning),
//! this process's own counters apply.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::state::{Alone, State};

/// Failures older than this are forgotten.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The longest delay put on one failed login.
pub const MAX_DELAY: Duration = Duration::from_secs(4);
/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Key {
    Address(IpAddr),
    Account(String),
}

#[derive(Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

pub struct Throttle {
    base_delay: Duration,
    lockout_failures: u32,
    lockout: Duration,
    records: Mutex<HashMap<Key, Record>>,
    /// Logins refused because of a lockout (for metrics).
    pub refused: AtomicU64,
    state: Arc<State>,
}

impl Throttle {
    /// The throttle of `[limits]`, counting over the replicas of `state`.
    pub fn new(limits: &LimitsConfig, state: Arc<State>) -> Throttle {
        Throttle {
            base_delay: Duration::from_millis(limits.login_delay_ms),
            lockout_failures: limits.login_lockout_failures,
            lockout: Duration::from_secs(limits.login_lockout_s),
            records: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            state,
        }
    }

    /// The names of the address's and the account's counters in the state.
    fn counter_names(ip: IpAddr, login: &str) -> [String; 2] {
        [
            format!("addr:{}", ip.to_canonical()),
            format!("acct:{}", login.trim().to_lowercase()),
        ]
    }

    fn locked_out(&self, key: &Key) -> &'static str {
        self.refused.fetch_add(1, Ordering::Relaxed);
        crate::metrics::throttled("locked_out");
        match key {
            Key::Address(_) => "client address locked out after failed logins",
            Key::Account(_) => "account locked out after failed logins",
        }
    }

    /// The state counted alone: warn if that is because Redis failed.
    fn alone(&self, alone: Alone) {
        if let Some(e) = alone.failure() {
            tracing::warn!(error = %e, "Redis unavailable; counting failed logins on this replica only");
            crate::metrics::redis_error("throttle");
        }
    }

    /// Whether a login may be tried now; `Err` names what is locked out:
    /// over all replicas, and by this process's own counters (which hold
    /// what was counted while Redis was down).
    pub async fn check(&self, ip: IpAddr, login: &str) -> Result<(), &'static str> {
        match self.state.locked(&Self::counter_names(ip, login)).await {
            Ok(locked) => {
                for (key, locked) in Self::keys(ip, login).iter().zip(locked) {
                    if locked {
                        return Err(self.locked_out(key));
                    }
                }
            }
            Err(alone) => self.alone(alone),
        }
        self.check_local(ip, login)
    }

    /// Count a failed login over all replicas (or in this process when the
    /// state counts alone); returns how long to hold the reply back.
    pub async fn failure(&self, ip: IpAddr, login: &str) -> Duration {
        let mut worst = 0;
        for name in Self::counter_names(ip, login) {
            match self
                .state
                .failure(&name, WINDOW, self.lockout_failures, self.lockout)
                .await
            {
                Ok(n) => {
                    if n == self.lockout_failures {
                        tracing::warn!(locked_out = %name.split(':').next().unwrap_or(""), failures = n, lockout_s = self.lockout.as_secs(), "too many failed logins; locked out (all replicas)");
                    }
                    worst = worst.max(n);
                }
                Err(alone) => {
                    self.alone(alone);
                    return self.failure_local(ip, login);
                }
            }
        }
        crate::metrics::throttled("delayed");
        self.delay(worst)
    }

    /// A correct login clears the account's and the address's failures
    /// (not their lockouts), over all replicas and in this process.
    pub async fn success(&self, ip: IpAddr, login: &str) {
        if let Err(alone) = self
            .state
            .clear_failures(&Self::counter_names(ip, login))
            .await
        {
            self.alone(alone);
        }
        self.success_local(ip, login)
    }

    fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (self.base_delay * 2u32.pow(doublings)).min(MAX_DELAY)
    }

    fn keys(ip: IpAddr, login: &str) -> [Key; 2] {
        [
            Key::Address(ip.to_canonical()),
            Key::Account(login.trim().to_lowercase()),
        ]
    }

    /// [`Throttle::check`] by this process's counters.
    fn check_local(&self, ip: IpAddr, login: &str) -> Result<(), &'static str> {
        let now = Instant::now();
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        for key in Self::keys(ip, login) {
            if let Some(until) = records.get(&key).and_then(|r| r.locked_until) {
                if now < until {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::throttled("locked_out");
                    return Err(match key {
                        Key::Address(_) => "client address locked out after failed logins",
                        Key::Account(_) => "account locked out after failed logins",
                    });
                }
            }
        }
        Ok(())
    }

    /// [`Throttle::failure`] in this process's counters.
    fn failure_local(&self, ip: IpAddr, login: &str) -> Duration {
        let now = Instant::now();
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() >= SWEEP_AT {
            records.retain(|_, r| {
                now.duration_since(r.last) < WINDOW || r.locked_until.is_some_and(|u| now < u)
            });
        }
        let mut worst = 0;
        for key in Self::keys(ip, login) {
            let what = match &key {
                Key::Address(_) => "client address",
                Key::Account(_) => "account",
            };
            let r = records.entry(key).or_insert(Record {
                failures: 0,
                last: now,
                locked_until: None,
            });
            if now.duration_since(r.last) >= WINDOW || r.locked_until.is_some_and(|u| now >= u) {
                *r = Record {
                    failures: 0,
                    last: now,
                    locked_until: None,
                };
            }
            r.failures += 1;
            r.last = now;
            if r.failures >= self.lockout_failures {
                if r.locked_until.is_none() {
                    tracing::warn!(
                        locked_out = what,
                        failures = r.failures,
                        lockout_s = self.lockout.as_secs(),
                        "too many failed logins; locked out"
                    );
                }
                r.locked_until = Some(now + self.lockout);
            }
            worst = worst.max(r.failures);
        }
        crate::metrics::throttled("delayed");
        self.delay(worst)
    }

    /// [`Throttle::success`] in this process's counters.
    fn success_local(&self, ip: IpAddr, login: &str) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        for key in Self::keys(ip, login) {
            if records.get(&key).is_some_and(|r| r.locked_until.is_none()) {
                records.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(failures: u32) -> Throttle {
        Throttle::new(
            &LimitsConfig {
                login_delay_ms: 100,
                login_lockout_failures: failures,
                login_lockout_s: 60,
                ..Default::default()
            },
            Arc::new(State::File(None)),
        )
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test(start_paused = true)]
    async fn delays_double_then_lock_out_even_correct_passwords() {
        let t = throttle(5);
        let mut delays = Vec::new();
        for _ in 0..4 {
            delays.push(t.failure(A, "u@x").await.as_millis());
        }
        assert_eq!(delays, [100, 200, 400, 800]);
        assert!(t.check(A, "u@x").await.is_ok());
        t.failure(A, "u@x").await;
        assert_eq!(
            t.check(A, "u@x").await,
            Err("client address locked out after failed logins")
        );
        // Another account from the same address: the address is locked.
        assert!(t.check(A, "other@x").await.is_err());
        // The same account from elsewhere: the account is locked.
        assert_eq!(
            t.check(B, "U@x").await,
            Err("account locked out after failed logins")
        );
        // A success does not lift a lockout.
        t.success(A, "u@x").await;
        assert!(t.check(A, "u@x").await.is_err());
        assert_eq!(t.refused.load(Ordering::Relaxed), 4);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(t.check(A, "u@x").await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn success_clears_and_old_failures_expire() {
        let t = throttle(3);
        t.failure(A, "u@x").await;
        t.failure(A, "u@x").await;
        t.success(A, "u@x").await;
        assert_eq!(t.failure(A, "u@x").await, Duration::from_millis(100));
        tokio::time::advance(WINDOW).await;
        assert_eq!(t.failure(A, "u@x").await, Duration::from_millis(100));
        assert!(t.check(A, "u@x").await.is_ok());
        // The delay is capped.
        let t = throttle(100);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = t.failure(B, "v@x").await;
        }
        assert_eq!(last, MAX_DELAY);
    }
}
