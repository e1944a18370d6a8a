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
pub const ACCOUNT_LOGINS: &str = "oxbridge_account_logins_total";
pub const MAILBOX_FULL: &str = "oxbridge_mailbox_full_total";
pub const TOKEN_ENDPOINT_REACHABLE: &str = "oxbridge_token_endpoint_reachable";
pub const THROTTLED: &str = "oxbridge_throttled_logins_total";
pub const TOKEN_REQUESTS: &str = "oxbridge_token_requests_total";
pub const TOKEN_SECONDS: &str = "oxbridge_token_request_duration_seconds";
pub const UPSTREAM_CONNECT_SECONDS: &str = "oxbridge_upstream_connect_duration_seconds";
pub const BYTES: &str = "oxbridge_relayed_bytes_total";
pub const RELOADS: &str = "oxbridge_config_reloads_total";
pub const PASSWORD_VERIFICATIONS: &str = "oxbridge_password_verifications_total";
pub const REDIS_ERRORS: &str = "oxbridge_redis_errors_total";
pub const ADMIN_ACTIONS: &str = "oxbridge_admin_actions_total";
pub const IMAP_SWAPS: &str = "oxbridge_imap_swaps_total";
pub const IMAP_SWAP_SECONDS: &str = "oxbridge_imap_swap_duration_seconds";
pub const IMAP_SWAP_REFUSALS: &str = "oxbridge_imap_swap_refusals_total";
pub const IMAP_SWAP_DEFERRALS: &str = "oxbridge_imap_swap_deferrals_total";
pub const IMAP_RECONCILIATIONS: &str = "oxbridge_imap_reconciliations_total";
pub const IMAP_RECONCILED: &str = "oxbridge_imap_reconciled_total";
pub const UPSTREAM_EXPIRIES: &str = "oxbridge_upstream_expiries_total";
pub const KEEPALIVES: &str = "oxbridge_refresh_keepalives_total";
pub const REFRESH_ISSUED: &str = "oxbridge_refresh_token_issued_timestamp_seconds";
pub const REFRESH_LAST_SUCCESS: &str = "oxbridge_refresh_token_last_success_timestamp_seconds";
pub const ACCESS_EXPIRY: &str = "oxbridge_access_token_expiry_timestamp_seconds";
pub const GRAPH_REQUESTS: &str = "oxbridge_graph_requests_total";
pub const SPOOL_ACCEPTED: &str = "oxbridge_spool_accepted_total";
pub const SPOOL_ACCEPTED_BYTES: &str = "oxbridge_spool_accepted_bytes_total";
pub const SPOOL_MESSAGES: &str = "oxbridge_spool_messages";
pub const SPOOL_OLDEST: &str = "oxbridge_spool_oldest_message_age_seconds";
pub const SPOOL_DEAD: &str = "oxbridge_spool_dead_messages";
pub const SPOOL_DELIVERIES: &str = "oxbridge_spool_deliveries_total";
pub const SPOOL_RETRIES: &str = "oxbridge_spool_retries_total";
pub const SPOOL_BOUNCES: &str = "oxbridge_spool_bounces_total";
pub const SPOOL_DEAD_LETTERS: &str = "oxbridge_spool_dead_letters_total";
pub const SPOOL_DUPLICATES: &str = "oxbridge_spool_possible_duplicates_total";
pub const PROXY_UNTRUSTED: &str = "oxbridge_proxy_untrusted_total";
pub const DEVICE_TLS_SESSIONS: &str = "oxbridge_device_tls_sessions_total";
pub const TOKEN_ENDPOINT_CONTACT: &str = "oxbridge_token_endpoint_contact_timestamp_seconds";
pub const UPSTREAM_REACHABLE: &str = "oxbridge_upstream_reachable";
pub const REFUSALS: &str = "oxbridge_refusals_total";
pub const SLOTS_HELD: &str = "oxbridge_upstream_slots_held";
pub const SLOTS_WAITING: &str = "oxbridge_upstream_slot_waiting";
pub const THROTTLE_ENTRIES: &str = "oxbridge_throttle_entries";
pub const THROTTLE_CHECKING: &str = "oxbridge_throttle_checking";

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
    describe_counter!(
        ADMIN_ACTIONS,
        "Actions taken from the status page (connect, consent, check, retry, drop), by action and result"
    );
    describe_gauge!(SESSIONS_ACTIVE, "Device sessions open now, by protocol");
    describe_counter!(
        ACCOUNT_LOGINS,
        "Device logins per configured account (its login as in the config), protocol and result"
    );
    describe_counter!(
        MAILBOX_FULL,
        "Logins that found their mailbox at its upstream session limit: waited (then got a session) or refused"
    );
    describe_gauge!(
        TOKEN_ENDPOINT_REACHABLE,
        "1 if the last contact with the token endpoint got an HTTP answer, 0 if it could not be reached"
    );
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
        IMAP_SWAP_DEFERRALS,
        "IMAP moves put off to the device's next command that may carry expunges, by reason"
    );
    describe_counter!(
        IMAP_RECONCILIATIONS,
        "IMAP moves that told the device of expunges, arrivals or flag changes"
    );
    describe_counter!(
        IMAP_RECONCILED,
        "Messages a move told the device about, by kind (expunge, arrival, flags)"
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
        GRAPH_REQUESTS,
        "Requests to Microsoft Graph, by result (ok, error, throttled: waited out)"
    );
    describe_counter!(SPOOL_ACCEPTED, "Messages taken into the spool (250 given)");
    describe_counter!(
        SPOOL_ACCEPTED_BYTES,
        Unit::Bytes,
        "Bytes of messages taken into the spool"
    );
    describe_gauge!(SPOOL_MESSAGES, "Messages waiting in the spool");
    describe_gauge!(
        SPOOL_OLDEST,
        Unit::Seconds,
        "Age of the oldest message waiting in the spool"
    );
    describe_gauge!(
        SPOOL_DEAD,
        "Messages in the spool's dead-letter folder (see oxbridge queue list)"
    );
    describe_counter!(
        SPOOL_DELIVERIES,
        "Spooled messages handed upstream, by result (delivered, deferred, bounced)"
    );
    describe_counter!(
        SPOOL_RETRIES,
        "Delivery attempts of spooled messages after the first"
    );
    describe_counter!(
        SPOOL_BOUNCES,
        "Delivery status notifications sent to senders, by why (refused, expired)"
    );
    describe_counter!(
        SPOOL_DEAD_LETTERS,
        "Messages moved to the dead-letter folder (neither delivered nor reported)"
    );
    describe_counter!(
        SPOOL_DUPLICATES,
        "Messages sent again after a restart that may have been delivered already"
    );
    describe_counter!(
        PROXY_UNTRUSTED,
        "Connections closed unread on a proxy_protocol listener: their peer is not in proxy_from"
    );
    describe_counter!(
        DEVICE_TLS_SESSIONS,
        "Devices' TLS handshakes, by listener and negotiated version (TLSv1.0 to TLSv1.3)"
    );
    describe_gauge!(
        TOKEN_ENDPOINT_CONTACT,
        "When oxbridge last contacted the token endpoint (Unix time), whether it answered or not"
    );
    describe_gauge!(
        UPSTREAM_REACHABLE,
        "1 if the last dial of the protocol's upstream (connect, TLS, greeting) worked, 0 if it failed"
    );
    describe_counter!(
        REFUSALS,
        "Refusals a device got other than a failed login (encryption required, too many sessions, relay or sender refused, the upstream's 4xx/5xx after login), by protocol and reason"
    );
    describe_gauge!(
        SLOTS_HELD,
        "Upstream sessions this process holds against the per-mailbox limits, by protocol"
    );
    describe_gauge!(
        SLOTS_WAITING,
        "Devices waiting for a mailbox's upstream session slot, by protocol"
    );
    describe_gauge!(
        THROTTLE_ENTRIES,
        "Client addresses, accounts and shared mailboxes this process remembers failed logins or a lockout of (forgotten 15 minutes after the last failure)"
    );
    describe_gauge!(
        THROTTLE_CHECKING,
        "Logins counted by the throttle whose password is being checked now"
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

/// A connection to a `proxy_protocol` listener from outside its
/// `proxy_from`, closed unread.
pub fn proxy_untrusted(listener: std::net::SocketAddr) {
    counter!(PROXY_UNTRUSTED, "listener" => listener.to_string()).increment(1);
}

/// A device was refused (see `device::refusal`); `reason` is one of a
/// fixed set.
pub fn refusal(protocol: Protocol, reason: &'static str) {
    counter!(REFUSALS, "protocol" => protocol.as_str(), "reason" => reason).increment(1);
}

/// A device's TLS handshake on `listener`, by negotiated version.
pub fn device_tls_session(listener: std::net::SocketAddr, version: &'static str) {
    counter!(DEVICE_TLS_SESSIONS, "listener" => listener.to_string(), "version" => version)
        .increment(1);
}

pub fn graph_request(result: &'static str) {
    counter!(GRAPH_REQUESTS, "result" => result).increment(1);
}

/// What the per-mailbox limits and the login throttle hold now (set when
/// `/metrics` is read).
pub fn held(slots: &[crate::limits::MailboxUse], throttle: crate::throttle::Census) {
    for protocol in [Protocol::Smtp, Protocol::Imap, Protocol::Pop3] {
        let of = slots.iter().filter(|u| u.protocol == protocol);
        let (held, waiting) = of.fold((0, 0), |(h, w), u| (h + u.sessions, w + u.waiting));
        gauge!(SLOTS_HELD, "protocol" => protocol.as_str()).set(held as f64);
        gauge!(SLOTS_WAITING, "protocol" => protocol.as_str()).set(waiting as f64);
    }
    gauge!(THROTTLE_ENTRIES).set(throttle.entries as f64);
    gauge!(THROTTLE_CHECKING).set(throttle.checking as f64);
}

/// A message was taken into the spool.
pub fn spooled(bytes: u64) {
    counter!(SPOOL_ACCEPTED).increment(1);
    counter!(SPOOL_ACCEPTED_BYTES).increment(bytes);
}

/// The spool now: messages waiting, the oldest one's age, dead letters.
pub fn spool_depth(waiting: usize, oldest_age_s: u64, dead: usize) {
    gauge!(SPOOL_MESSAGES).set(waiting as f64);
    gauge!(SPOOL_OLDEST).set(oldest_age_s as f64);
    gauge!(SPOOL_DEAD).set(dead as f64);
}

/// One delivery attempt of a spooled message ended.
pub fn spool_delivery(result: &'static str, retry: bool) {
    counter!(SPOOL_DELIVERIES, "result" => result).increment(1);
    if retry {
        counter!(SPOOL_RETRIES).increment(1);
    }
}

pub fn spool_bounce(why: &'static str) {
    counter!(SPOOL_BOUNCES, "why" => why).increment(1);
}

pub fn spool_dead_letter() {
    counter!(SPOOL_DEAD_LETTERS).increment(1);
}

pub fn spool_possible_duplicate() {
    counter!(SPOOL_DUPLICATES).increment(1);
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

/// A move found messages gone while the device was at rest: it waits for
/// a command during which they can be told.
pub fn imap_swap_deferred(reason: &'static str) {
    counter!(IMAP_SWAP_DEFERRALS, "reason" => reason).increment(1);
}

/// A move told the device of messages that left or arrived, or of flags
/// that changed, since its old connection last said.
pub fn imap_reconciled(expunged: usize, arrived: usize, flags: usize) {
    if expunged + arrived + flags == 0 {
        return;
    }
    counter!(IMAP_RECONCILIATIONS).increment(1);
    for (kind, n) in [
        ("expunge", expunged),
        ("arrival", arrived),
        ("flags", flags),
    ] {
        counter!(IMAP_RECONCILED, "kind" => kind).increment(n as u64);
    }
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
/// A device login attributed to a configured account (`account` is its
/// `login` in the config; logins of unknown users are not counted here).
pub fn account_login(account: &str, protocol: Protocol, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!(ACCOUNT_LOGINS, "account" => account.to_string(), "protocol" => protocol.as_str(), "result" => result)
        .increment(1);
}

/// A login found `mailbox` at its session limit; `outcome` is `waited`
/// or `refused`.
pub fn mailbox_full(protocol: Protocol, mailbox: &str, outcome: &'static str) {
    counter!(MAILBOX_FULL, "protocol" => protocol.as_str(), "mailbox" => mailbox.to_lowercase(), "outcome" => outcome)
        .increment(1);
}

pub fn throttled(kind: &'static str) {
    counter!(THROTTLED, "kind" => kind).increment(1);
}

/// An action from the status page and how it ended (`ok`, `failed`,
/// `refused`: no anti-forgery token, an unknown state).
pub fn admin_action(action: &'static str, result: &'static str) {
    counter!(ADMIN_ACTIONS, "action" => action, "result" => result).increment(1);
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
/// When the app-only token of `key` (`app`, or `app:PROVIDER`) expires.
pub fn app_token_expiry(key: &str, at: u64) {
    gauge!(ACCESS_EXPIRY, "account" => key.to_string()).set(at as f64);
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
    gauge!(TOKEN_ENDPOINT_REACHABLE).set(if reached { 1.0 } else { 0.0 });
    *TOKEN_ENDPOINT.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), reached));
    gauge!(TOKEN_ENDPOINT_CONTACT).set(crate::health::unix_now() as f64);
    crate::health::token_endpoint(reached, None);
}

/// The last contact with the token endpoint, if it is younger than `max_age`.
pub fn token_endpoint_recent(max_age: Duration) -> Option<bool> {
    let last = *TOKEN_ENDPOINT.lock().unwrap_or_else(|e| e.into_inner());
    last.filter(|(at, _)| at.elapsed() < max_age)
        .map(|(_, reached)| reached)
}

/// A request could not reach the token endpoint, for this reason (no
/// secret: a transport error and the token URL).
pub fn token_endpoint_failed(why: &str) {
    token_endpoint_contact(false);
    crate::health::token_endpoint(false, Some(why));
}

/// A dial of `protocol`'s upstream (connect, TLS, greeting): `error` is
/// None when it worked.
pub fn upstream_contact(protocol: Protocol, error: Option<&str>) {
    let reached = if error.is_none() { 1.0 } else { 0.0 };
    gauge!(UPSTREAM_REACHABLE, "protocol" => protocol.as_str()).set(reached);
    crate::health::upstream(protocol, error);
}
