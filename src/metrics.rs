//! What oxbridge counts, in one place: the metric names, the calls that
//! update them, and the Prometheus recorder the admin endpoint renders.
//! The `metrics` crate is a no-op until [`install`] is called, so library
//! code and unit tests update metrics freely.
//!
//! Also the two facts `/readyz` needs: whether the listeners are bound, and
//! whether the token endpoint answered recently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::Protocol;

pub const SESSIONS: &str = "oxbridge_sessions_total";
pub const SESSIONS_ACTIVE: &str = "oxbridge_sessions_active";
pub const LOGINS: &str = "oxbridge_logins_total";
pub const AUTH_FAILURES: &str = "oxbridge_auth_failures_total";
pub const THROTTLED: &str = "oxbridge_throttled_logins_total";
pub const TOKEN_REQUESTS: &str = "oxbridge_token_requests_total";
pub const TOKEN_SECONDS: &str = "oxbridge_token_request_duration_seconds";
pub const UPSTREAM_CONNECT_SECONDS: &str = "oxbridge_upstream_connect_duration_seconds";
pub const BYTES: &str = "oxbridge_relayed_bytes_total";
pub const RELOADS: &str = "oxbridge_config_reloads_total";
pub const PASSWORD_VERIFICATIONS: &str = "oxbridge_password_verifications_total";
pub const REDIS_ERRORS: &str = "oxbridge_redis_errors_total";
pub const IMAP_SWAPS: &str = "oxbridge_imap_swaps_total";
pub const IMAP_SWAP_SECONDS: &str = "oxbridge_imap_swap_duration_seconds";
pub const IMAP_SWAP_REFUSALS: &str = "oxbridge_imap_swap_refusals_total";
pub const UPSTREAM_EXPIRIES: &str = "oxbridge_upstream_expiries_total";
pub const KEEPALIVES: &str = "oxbridge_refresh_keepalives_total";
pub const REFRESH_ISSUED: &str = "oxbridge_refresh_token_issued_timestamp_seconds";
pub const REFRESH_LAST_SUCCESS: &str = "oxbridge_refresh_token_last_success_timestamp_seconds";
pub const ACCESS_EXPIRY: &str = "oxbridge_access_token_expiry_timestamp_seconds";

/// Histogram buckets (seconds) for token requests and upstream connects.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Install the global Prometheus recorder; the handle renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SESSIONS, "Device sessions ended, by protocol and outcome");
    describe_counter!(
        REDIS_ERRORS,
        "Operations that fell back to this replica alone because Redis failed, by what"
    );
    describe_gauge!(SESSIONS_ACTIVE, "Device sessions open now, by protocol");
    describe_counter!(LOGINS, "Device logins, by protocol and result");
    describe_counter!(
        AUTH_FAILURES,
        "Failed device logins, by protocol and reason"
    );
    describe_counter!(
        THROTTLED,
        "Logins refused or delayed by brute-force protection"
    );
    describe_counter!(
        TOKEN_REQUESTS,
        "Requests to the token endpoint, by grant and result"
    );
    describe_histogram!(
        TOKEN_SECONDS,
        Unit::Seconds,
        "Time to obtain one access token, retries included"
    );
    describe_histogram!(
        UPSTREAM_CONNECT_SECONDS,
        Unit::Seconds,
        "Time to connect to the upstream and read its greeting (TLS included)"
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes relayed after login, by protocol and direction"
    );
    describe_counter!(RELOADS, "Configuration reloads (SIGHUP), by result");
    describe_counter!(
        PASSWORD_VERIFICATIONS,
        "Argon2 password verifications run (a cached correct login runs none)"
    );
    describe_counter!(
        IMAP_SWAPS,
        "IMAP sessions moved to a new upstream connection before their token expired"
    );
    describe_histogram!(
        IMAP_SWAP_SECONDS,
        Unit::Seconds,
        "How long a device's IMAP session was held while it moved"
    );
    describe_counter!(
        IMAP_SWAP_REFUSALS,
        "IMAP sessions ended with a BYE before their token expired instead of moving, by reason"
    );
    describe_counter!(
        KEEPALIVES,
        "Background refresh-token exchanges against inactivity expiry, by result"
    );
    describe_gauge!(
        REFRESH_ISSUED,
        "When the account's stored refresh token was issued (Unix time); its age counts toward the provider's inactivity limit"
    );
    describe_gauge!(
        REFRESH_LAST_SUCCESS,
        "When the account's refresh token last earned an access token (Unix time)"
    );
    describe_gauge!(
        ACCESS_EXPIRY,
        "When the account's current access token expires (Unix time); app for client_credentials"
    );
    describe_counter!(
        UPSTREAM_EXPIRIES,
        "Sessions the upstream ended because their token expired, by protocol"
    );
}

/// Counts one open session while alive.
pub struct ActiveSession(Protocol);

impl ActiveSession {
    pub fn new(protocol: Protocol) -> ActiveSession {
        gauge!(SESSIONS_ACTIVE, "protocol" => protocol.as_str()).increment(1.0);
        ActiveSession(protocol)
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        gauge!(SESSIONS_ACTIVE, "protocol" => self.0.as_str()).decrement(1.0);
    }
}

pub fn session_ended(protocol: Protocol, outcome: &'static str, to_upstream: u64, to_device: u64) {
    let p = protocol.as_str();
    counter!(SESSIONS, "protocol" => p, "outcome" => outcome).increment(1);
    if to_upstream > 0 {
        counter!(BYTES, "protocol" => p, "direction" => "to_upstream").increment(to_upstream);
    }
    if to_device > 0 {
        counter!(BYTES, "protocol" => p, "direction" => "to_device").increment(to_device);
    }
}

/// An IMAP session moved to a new upstream connection; the device waited
/// `held` for it.
pub fn imap_swap(held: Duration) {
    counter!(IMAP_SWAPS).increment(1);
    histogram!(IMAP_SWAP_SECONDS).record(held.as_secs_f64());
}

/// An IMAP session that could not move and was ended before its token.
pub fn imap_swap_refused(reason: &'static str) {
    counter!(IMAP_SWAP_REFUSALS, "reason" => reason).increment(1);
}

/// The upstream ended a session because its token expired.
pub fn upstream_expiry(protocol: Protocol) {
    counter!(UPSTREAM_EXPIRIES, "protocol" => protocol.as_str()).increment(1);
}

/// One login's result: `reason` is `None` on success.
pub fn login(protocol: Protocol, reason: Option<&'static str>) {
    let p = protocol.as_str();
    match reason {
        None => counter!(LOGINS, "protocol" => p, "result" => "ok").increment(1),
        Some(reason) => {
            counter!(LOGINS, "protocol" => p, "result" => "failed").increment(1);
            counter!(AUTH_FAILURES, "protocol" => p, "reason" => reason).increment(1);
        }
    }
}

/// A login refused (`locked_out`) or slowed (`delayed`) by the throttle.
pub fn throttled(kind: &'static str) {
    counter!(THROTTLED, "kind" => kind).increment(1);
}

/// Redis failed and `what` (token, limits, throttle) fell back to this
/// replica alone.
pub fn redis_error(what: &'static str) {
    counter!(REDIS_ERRORS, "what" => what).increment(1);
}

pub fn token_request(grant: &'static str, result: &'static str, elapsed: Duration) {
    counter!(TOKEN_REQUESTS, "grant" => grant, "result" => result).increment(1);
    histogram!(TOKEN_SECONDS, "grant" => grant).record(elapsed.as_secs_f64());
}

pub fn keepalive(result: &'static str) {
    counter!(KEEPALIVES, "result" => result).increment(1);
}

/// A `refresh_token` account's token times (see [`crate::state::TokenHealth`]).
pub fn token_times(account: &str, times: &crate::state::TokenHealth) {
    let series = [
        (REFRESH_ISSUED, times.issued),
        (REFRESH_LAST_SUCCESS, times.refreshed),
        (ACCESS_EXPIRY, times.access_expires),
    ];
    for (name, at) in series {
        if let Some(at) = at {
            gauge!(name, "account" => account.to_string()).set(at as f64);
        }
    }
}

/// The app's (`client_credentials`) new access token expires at this Unix second.
pub fn app_token_expiry(at: u64) {
    gauge!(ACCESS_EXPIRY, "account" => "app").set(at as f64);
}

pub fn upstream_connected(protocol: Protocol, elapsed: Duration) {
    histogram!(UPSTREAM_CONNECT_SECONDS, "protocol" => protocol.as_str())
        .record(elapsed.as_secs_f64());
}

pub fn password_verification() {
    counter!(PASSWORD_VERIFICATIONS).increment(1);
}

pub fn reloaded(ok: bool) {
    counter!(RELOADS, "result" => if ok { "ok" } else { "failed" }).increment(1);
}

static LISTENERS_BOUND: AtomicBool = AtomicBool::new(false);
/// When the token endpoint last answered (any HTTP response) or failed to.
static TOKEN_ENDPOINT: Mutex<Option<(Instant, bool)>> = Mutex::new(None);

pub fn listeners_bound() {
    LISTENERS_BOUND.store(true, Ordering::Release);
}

pub fn are_listeners_bound() -> bool {
    LISTENERS_BOUND.load(Ordering::Acquire)
}

/// Record whether a request reached the token endpoint (an HTTP answer of
/// any status counts as reached; a network error does not).
pub fn token_endpoint_contact(reached: bool) {
    *TOKEN_ENDPOINT.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), reached));
}

/// The last contact with the token endpoint, if it is younger than `max_age`.
pub fn token_endpoint_recent(max_age: Duration) -> Option<bool> {
    let last = *TOKEN_ENDPOINT.lock().unwrap_or_else(|e| e.into_inner());
    last.filter(|(at, _)| at.elapsed() < max_age)
        .map(|(_, reached)| reached)
}
