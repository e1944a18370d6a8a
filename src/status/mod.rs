//! The status page at `/` on the admin listener: what an operator would
//! rather look at than read from logs. [`gather`] takes one [`page::View`]
//! from the running process (listeners and their sessions, accounts with
//! their tokens and logins, upstream sessions per mailbox, the last login
//! failures and other refusals, the devices seen lately, the SMTP queue);
//! [`page::render`] turns it into HTML.
//! [`board`] records the events the page shows as they happen.

pub mod board;
mod forms;
pub mod notice;
pub mod page;

use std::sync::Arc;

use crate::app::App;
use crate::config::{Delivery, Grant, Protocol, TlsMode, TlsVersion};
use crate::listener::Listener;
use crate::spool::queue::{Place, Queue};
use page::{AccountRow, ListenerRow, SpoolRow, SpoolView, TokenView, View};

/// Waiting messages listed on the page (the oldest first).
pub const QUEUE_ROWS: usize = 10;
/// Messages read from the spool for the page at most.
const QUEUE_SCAN: usize = 5000;

/// A bound listener as the page shows it.
pub struct Bound {
    pub address: std::net::SocketAddr,
    pub listener: Arc<Listener>,
}

/// The page's view of this process, now.
pub async fn gather(
    app: &App,
    listeners: &[Bound],
    started: u64,
    not_ready: Option<String>,
) -> View {
    let now = board::now();
    let protocols = app.config.protocols();
    let limits = &app.config.limits;
    let mailboxes = app.mailbox_limits.in_use();
    let mut accounts = Vec::new();
    for a in app.accounts().summaries() {
        let key = crate::oauth::board_key(&a.login, a.grant, a.graph, &a.provider);
        let record = board::token_record(&key);
        let mut token = TokenView {
            access_expires: record.expires,
            obtained: record.obtained,
            error: record.error,
            refresh_token: a.grant == Grant::RefreshToken,
            ..TokenView::default()
        };
        if a.grant == Grant::RefreshToken {
            if let Ok(times) = app.tokens.times(&a.provider, &a.login).await {
                token.refresh_issued = times.issued;
                token.refreshed = times.refreshed;
                token.access_expires = token.access_expires.or(times.access_expires);
            }
        }
        let pattern = a.login.starts_with("*@");
        let mailbox = a.mailbox.clone().unwrap_or_else(|| match pattern {
            true => "each user's own".to_string(),
            false => a.login.clone(),
        });
        let sessions = match pattern && a.mailbox.is_none() {
            true => Vec::new(),
            false => protocols
                .iter()
                .map(|p| {
                    let used = mailboxes
                        .iter()
                        .filter(|m| m.protocol == *p && m.mailbox.eq_ignore_ascii_case(&mailbox))
                        .map(|m| m.sessions)
                        .sum();
                    (p.as_str(), used, limits.sessions_per_mailbox(*p))
                })
                .collect(),
        };
        accounts.push(AccountRow {
            logins: board::logins(&a.login),
            login: a.login,
            grant: a.grant.as_str(),
            mailbox,
            sends: if a.graph { "Microsoft Graph" } else { "SMTP" },
            provider: match a.provider.is_default() {
                true => String::new(),
                false => format!("{} ({})", a.provider.name, a.provider.kind.as_str()),
            },
            token,
            sessions,
        });
    }
    let spool = match &app.spool {
        Some(spool) => {
            let queue = spool.queue.clone();
            tokio::task::spawn_blocking(move || spool_view(&queue, now))
                .await
                .ok()
        }
        None => None,
    };
    View {
        version: env!("CARGO_PKG_VERSION"),
        host: app.hostname.clone(),
        now,
        started,
        not_ready,
        health: Vec::new(),
        listeners: listeners.iter().map(listener_row).collect(),
        accounts,
        mailboxes,
        replicas: app.config.store.backend == crate::config::StoreBackend::Redis,
        failures: board::failures(),
        spool,
        refusals: board::refusals(),
        devices: board::devices(),
        form_token: None,
    }
}

fn listener_row(b: &Bound) -> ListenerRow {
    let l = &b.listener;
    let (sessions, max) = l.sessions();
    ListenerRow {
        protocol: l.protocol.as_str(),
        address: b.address.to_string(),
        tls: match l.tls {
            TlsMode::None => "none",
            TlsMode::Starttls => "STARTTLS",
            TlsMode::Implicit => "implicit",
        },
        delivery: (l.protocol == Protocol::Smtp).then_some(match l.delivery {
            Delivery::Session => "session",
            Delivery::Spool => "spool",
        }),
        sessions,
        max,
        legacy_from: (l.tls != TlsMode::None && l.tls_min_version < TlsVersion::V1_2)
            .then(|| l.tls_min_version.as_str()),
        tls_mix: l.tls_mix(),
        certificate: l.fingerprint().map(|f| (f, l.self_signed())),
    }
}

/// The queue's counts and its oldest waiting messages.
fn spool_view(queue: &Queue, now: u64) -> SpoolView {
    let waiting = queue.ids(Place::Queue).unwrap_or_default();
    let dead = queue.ids(Place::Dead).map(|d| d.len()).unwrap_or(0);
    let mut loaded: Vec<_> = waiting
        .iter()
        .take(QUEUE_SCAN)
        .filter_map(|id| queue.load(Place::Queue, id).ok())
        .collect();
    loaded.sort_by_key(|(env, _)| env.received_at);
    let oldest_age = loaded
        .first()
        .map(|(env, _)| now.saturating_sub(env.received_at));
    let rows = loaded
        .iter()
        .take(QUEUE_ROWS)
        .map(|(env, status)| SpoolRow {
            id: env.id.clone(),
            age: now.saturating_sub(env.received_at),
            from: env.sender.clone(),
            to: env.pending_summary(status),
            attempts: status.attempts,
            last_error: status.last_error.clone().unwrap_or_default(),
        })
        .collect();
    SpoolView {
        waiting: waiting.len(),
        dead,
        oldest_age,
        rows,
    }
}
