//! The refresh-token keep-alive: each `refresh_token` account's refresh
//! token is exchanged at least every `[oauth] refresh_keepalive_s`, so an
//! idle device's consent never runs into the provider's inactivity limit.
//! With several replicas the token store's lease lets one of them do it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::App;

/// The longest pause between looks at which refresh tokens are due.
const KEEPALIVE_TICK: Duration = Duration::from_secs(3600);
/// The first keep-alive comes within this long after start (jittered), so
/// that a process restarted more often than the period still keeps them
/// alive.
const KEEPALIVE_FIRST: Duration = Duration::from_secs(300);

/// A keep-alive period, plus or minus a tenth at random, so that many
/// accounts (and replicas) do not refresh at the same moment.
fn jittered(period: Duration) -> Duration {
    let tenth = period.as_millis() as u64 / 10;
    let offset = rand::random::<u64>() % (2 * tenth + 1);
    Duration::from_millis(period.as_millis() as u64 - tenth + offset)
}

/// Exchange each `refresh_token` account's refresh token at least every
/// `[oauth] refresh_keepalive_s`, so that an idle device's consent never
/// runs into the provider's inactivity limit. A failure is logged and
/// tried again after a tenth of the period.
pub async fn keep_refresh_tokens_alive(app: Arc<App>, stop: CancellationToken) {
    let period = app.tokens.keepalive();
    let tick = (period / 10).clamp(Duration::from_millis(100), KEEPALIVE_TICK);
    let first = KEEPALIVE_FIRST.min(period);
    let mut due: std::collections::HashMap<String, Instant> = Default::default();
    let accounts = app.accounts();
    for login in accounts.refresh_token_logins() {
        let Some(provider) = accounts.provider_of(&login) else {
            continue;
        };
        if let Ok(times) = app.tokens.times(&provider, &login).await {
            crate::metrics::token_times(&login, &times);
        }
    }
    drop(accounts);
    loop {
        let now = Instant::now();
        for login in app.accounts().refresh_token_logins() {
            let at = *due.entry(login.clone()).or_insert_with(|| {
                now + Duration::from_millis(rand::random::<u64>() % (first.as_millis() as u64 + 1))
            });
            if at > now {
                continue;
            }
            let Ok(id) = app.accounts().identity(&login) else {
                continue;
            };
            let next = match app.tokens.keep_alive(&id).await {
                Ok(true) => {
                    info!(account = %login, "refresh token kept alive");
                    crate::metrics::keepalive("ok");
                    jittered(period)
                }
                // Another replica holds the period: look again soon after
                // its lease ends, so that one replica dying does not leave
                // the token unrefreshed for a second period.
                Ok(false) => {
                    crate::metrics::keepalive("another replica");
                    jittered(period / 10)
                }
                Err(e) => {
                    warn!(account = %login, error = %e, advice = crate::diagnose::advice(&e).unwrap_or(""), "cannot keep the refresh token alive");
                    crate::metrics::keepalive("failed");
                    period / 10
                }
            };
            due.insert(login, Instant::now() + next);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
