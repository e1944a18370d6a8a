//! The delivery worker: sends each spooled message upstream with its
//! account's token, through the same login path as a device (the
//! mailbox's session slot, a token, XOAUTH2), one session per account and
//! mailbox at a time, paced to `[spool] messages_per_minute`.
//!
//! Temporary failures (no connection, no token, a 4xx) are retried with a
//! doubling backoff; a permanent refusal (5xx), or a message older than
//! `[spool] max_age_h`, goes back to its sender as a report, itself
//! spooled and delivered like any message. A report that cannot be
//! delivered, or a message whose sender cannot be told, goes to the
//! dead-letter folder. A message is removed only once that is settled,
//! so each is delivered at least once; one sent again after a crash in
//! the moment between the server's `250` and its removal is counted.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::dsn::{Failure, Why};
use super::queue::{self, Envelope, Place, Queue, Status};
use super::settle::{apply, blocking, defer, settle, Next, Outcome};
use super::Spool;
use crate::app::App;
use crate::upstream::graph::GraphError;
use crate::upstream::Dialer;

/// The longest pause between looks at the queue (retry requests from
/// `oxbridge queue retry` are seen within it).
const TICK: Duration = Duration::from_secs(1);

/// A message the worker knows of.
struct Due {
    /// Account and mailbox: the messages of one are sent in one session.
    key: String,
    at: u64,
    received_at: u64,
}

/// Run the worker until `stop`.
pub async fn run(app: Arc<App>, spool: Arc<Spool>, stop: CancellationToken) {
    let mut index: HashMap<String, Due> = HashMap::new();
    let mut busy: HashSet<String> = HashSet::new();
    let pace: Pace = Arc::default();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Vec<(String, Next)>)>();
    match spool.queue.ids(Place::Queue) {
        Ok(ids) => {
            for id in ids {
                if spool.queue.clear_sending(&id) {
                    warn!(id = %id, "message may have been delivered before the restart; sending it again");
                    crate::metrics::spool_possible_duplicate();
                }
                learn(&spool.queue, &mut index, &id, None);
            }
            if !index.is_empty() {
                info!(messages = index.len(), "spool resumed");
            }
        }
        Err(e) => warn!(error = %e, "cannot read the spool"),
    }
    loop {
        for id in spool.take_arrivals() {
            learn(&spool.queue, &mut index, &id, Some(0));
        }
        for id in spool.queue.take_retry_requests() {
            info!(id = %id, "retry requested");
            learn(&spool.queue, &mut index, &id, Some(0));
        }
        let now = queue::now();
        let mut batches: HashMap<String, Vec<String>> = HashMap::new();
        for (id, due) in &index {
            if due.at <= now && !busy.contains(&due.key) {
                batches.entry(due.key.clone()).or_default().push(id.clone());
            }
        }
        for (key, mut ids) in batches {
            ids.sort();
            busy.insert(key.clone());
            let (app, spool, pace, done) =
                (app.clone(), spool.clone(), pace.clone(), done_tx.clone());
            let span = tracing::info_span!("delivery", key = %key.replace('\n', " as "));
            tokio::spawn(
                async move {
                    let results = deliver(&app, &spool, &pace, ids).await;
                    let _ = done.send((key, results));
                }
                .instrument(span),
            );
        }
        let oldest = index.values().map(|d| d.received_at).min();
        let dead = spool.queue.ids(Place::Dead).map(|d| d.len()).unwrap_or(0);
        crate::metrics::spool_depth(
            index.len(),
            oldest.map_or(0, |t| now.saturating_sub(t)),
            dead,
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = spool.wake.notified() => {}
            Some((key, results)) = done_rx.recv() => {
                busy.remove(&key);
                for (id, next) in results {
                    match next {
                        Next::Gone => { index.remove(&id); }
                        Next::At(at) => if let Some(d) = index.get_mut(&id) { d.at = at },
                    }
                }
            }
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// Add `id` to the index from its files, due at `at` (or as its status says).
fn learn(queue: &Queue, index: &mut HashMap<String, Due>, id: &str, at: Option<u64>) {
    match queue.load(Place::Queue, id) {
        Ok((env, status)) => {
            index.insert(
                id.to_string(),
                Due {
                    key: format!("{}\n{}", env.account, env.mailbox.to_lowercase()),
                    at: at.unwrap_or(status.next_attempt_at),
                    received_at: env.received_at,
                },
            );
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            index.remove(id);
        }
        Err(e) => warn!(id = %id, error = %e, "cannot read a spooled message; leaving it"),
    }
}

/// When each mailbox last had a message sent.
type Pace = Arc<Mutex<HashMap<String, Instant>>>;

/// Wait until the mailbox of `env` may have its next message.
async fn paced(pace: &Pace, spool: &Spool, env: &Envelope) {
    let mailbox = env.mailbox.to_lowercase();
    let gap = Duration::from_secs(60) / spool.config.messages_per_minute.max(1);
    let wait = {
        let mut last = pace.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let next = last.get(&mailbox).map_or(now, |t| (*t + gap).max(now));
        last.insert(mailbox, next);
        next - now
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// Try every message of one account and mailbox in one upstream session.
async fn deliver(app: &App, spool: &Spool, pace: &Pace, ids: Vec<String>) -> Vec<(String, Next)> {
    let mut results = Vec::new();
    let mut todo = Vec::new();
    let max_age = spool.config.max_age();
    for id in ids {
        let q = spool.queue.clone();
        let lid = id.clone();
        match blocking(move || q.load(Place::Queue, &lid)).await {
            Ok((env, status)) => {
                let age = queue::now().saturating_sub(env.received_at);
                if Duration::from_secs(age) > max_age {
                    let failures: Vec<Failure> = env
                        .pending(&status)
                        .map(|r| Failure {
                            recipient: r.clone(),
                            reply: status
                                .last_error
                                .clone()
                                .unwrap_or_else(|| "never attempted".into()),
                        })
                        .collect();
                    results.push((
                        id,
                        settle(app, spool, env, status, &[], failures, Why::Expired).await,
                    ));
                } else {
                    todo.push((id, env, status));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => results.push((id, Next::Gone)),
            Err(e) => {
                warn!(id = %id, error = %e, "cannot read a spooled message");
                results.push((id, Next::At(queue::now() + spool.config.retry_min_s)));
            }
        }
    }
    let Some((_, first, _)) = todo.first() else {
        return results;
    };
    let identity = app
        .accounts()
        .spooled_identity(&first.account, &first.mailbox);
    if let Some(id) = identity.as_ref().ok().filter(|id| id.graph) {
        for (mid, env, status) in todo {
            let next = through_graph(app, spool, pace, id, env, status).await;
            results.push((mid, next));
        }
        return results;
    }
    let login = match identity {
        Ok(id) => crate::login::delivery_login(app, &id).await,
        Err(e) => Err(e),
    };
    let mut upstream = match login {
        Ok(u) => u,
        Err(e) => {
            let why = e.to_string();
            for (id, _, status) in todo {
                let retry = status.attempts > 0;
                results.push((
                    id.clone(),
                    defer(spool, &id, status, why.clone(), retry).await,
                ));
            }
            return results;
        }
    };
    let mut broken = false;
    for (id, env, status) in todo {
        if broken {
            results.push((id, Next::At(queue::now())));
            continue;
        }
        paced(pace, spool, &env).await;
        let retry = status.attempts > 0;
        let pending: Vec<String> = env.pending(&status).cloned().collect();
        let path = spool.queue.message_path(Place::Queue, &id);
        let (q, mark_id) = (spool.queue.clone(), id.clone());
        let sent = Dialer::send_message(
            &mut upstream.conn,
            &env.sender,
            &env.params,
            &pending,
            &path,
            move || q.mark_sending(&mark_id),
        )
        .await;
        match sent {
            Err(e) => {
                if spool.queue.clear_sending(&id) {
                    // The end went out and no answer came: it may be delivered.
                    crate::metrics::spool_possible_duplicate();
                }
                broken = true;
                results.push((
                    id.clone(),
                    defer(spool, &id, status, e.to_string(), retry).await,
                ));
            }
            Ok(sent) => {
                let outcome = Outcome::of(&sent, &pending);
                crate::metrics::spool_delivery(
                    if !outcome.delivered.is_empty() {
                        "delivered"
                    } else if !outcome.refused.is_empty() {
                        "refused"
                    } else {
                        "deferred"
                    },
                    retry,
                );
                let next = apply(app, spool, env, status, outcome).await;
                // Only once the outcome is on disk: a crash before this
                // leaves the mark, and the restart counts the resend.
                spool.queue.clear_sending(&id);
                results.push((id.clone(), next));
            }
        }
    }
    if !broken {
        Dialer::quit_smtp(&mut upstream.conn).await;
    }
    results
}

/// Send one message through Microsoft Graph (its account's way out).
async fn through_graph(
    app: &App,
    spool: &Spool,
    pace: &Pace,
    id: &crate::accounts::Identity,
    env: Envelope,
    status: Status,
) -> Next {
    paced(pace, spool, &env).await;
    let retry = status.attempts > 0;
    let pending: Vec<String> = env.pending(&status).cloned().collect();
    let path = spool.queue.message_path(Place::Queue, &env.id);
    let message = match blocking(move || std::fs::read(path)).await {
        Ok(m) => m,
        Err(e) => {
            return defer(
                spool,
                &env.id,
                status,
                format!("reading the message: {e}"),
                retry,
            )
            .await
        }
    };
    let token = match app.tokens.graph(id).await {
        Ok(t) => t,
        Err(e) => return defer(spool, &env.id, status, e.to_string(), retry).await,
    };
    if let Err(e) = spool.queue.mark_sending(&env.id) {
        return defer(spool, &env.id, status, format!("spool: {e}"), retry).await;
    }
    let sent = app
        .graph
        .send(&token.secret, &env.mailbox, &message, &pending)
        .await;
    let mid = env.id.clone();
    let next = match sent {
        Ok(()) => {
            crate::metrics::spool_delivery("delivered", retry);
            let outcome = Outcome {
                delivered: pending,
                ..Default::default()
            };
            apply(app, spool, env, status, outcome).await
        }
        Err(GraphError::Refused(why)) => {
            crate::metrics::spool_delivery("refused", retry);
            let outcome = Outcome {
                refused: pending
                    .into_iter()
                    .map(|r| Failure {
                        recipient: r,
                        reply: why.clone(),
                    })
                    .collect(),
                ..Default::default()
            };
            apply(app, spool, env, status, outcome).await
        }
        Err(e) => defer(spool, &env.id, status, e.to_string(), retry).await,
    };
    spool.queue.clear_sending(&mid);
    next
}
