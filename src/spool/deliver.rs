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
//! so each is delivered at least once; one sent again after an attempt
//! whose outcome is unknown (a crash or a cut between its end and the
//! server's answer, an answer that could not be recorded) is counted.
//!
//! At shutdown no new attempt starts and those in flight may finish
//! within `[limits] drain_s`. A delivery task that panics releases its
//! mailbox; its message goes to the dead-letter folder after a few.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::dsn::{Failure, Why};
use super::queue::{self, Envelope, Place, Queue, Status};
use super::settle::{
    apply, blocking, count_resend, defer, off_async, panicked, settle, was_in_doubt, Next, Outcome,
};
use super::Spool;
use crate::app::App;
use crate::upstream::graph::{Doubt, GraphError};
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
    let tasks = TaskTracker::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Vec<(String, Next)>)>();
    let q = spool.queue.clone();
    // A message still marked `sending` is counted when it is sent again
    // (it may have been delivered before the restart).
    match blocking(move || {
        let mut index = HashMap::new();
        for id in q.ids(Place::Queue)? {
            learn(&q, &mut index, &id, None);
        }
        Ok(index)
    })
    .await
    {
        Ok(found) => {
            index = found;
            if !index.is_empty() {
                info!(messages = index.len(), "spool resumed");
            }
        }
        Err(e) => warn!(error = %e, "cannot read the spool"),
    }
    loop {
        let q = spool.queue.clone();
        let arrivals = spool.take_arrivals();
        // What the worker reads from disk each turn, off the async threads.
        let (learned, dead) = blocking(move || {
            let retries = q.take_retry_requests();
            for id in &retries {
                info!(id = %id, "retry requested");
            }
            let mut learned = HashMap::new();
            for id in arrivals.into_iter().chain(retries) {
                learn(&q, &mut learned, &id, Some(0));
            }
            Ok((learned, q.ids(Place::Dead).map(|d| d.len()).unwrap_or(0)))
        })
        .await
        .unwrap_or_default();
        index.extend(learned);
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
            let (app, spool, pace, done, stop) = (
                app.clone(),
                spool.clone(),
                pace.clone(),
                done_tx.clone(),
                stop.clone(),
            );
            let span = tracing::info_span!("delivery", key = %key.replace('\n', " as "));
            tasks.spawn(
                async move {
                    let results = supervised(spool.clone(), ids, move |ids, current| async move {
                        deliver(&app, &spool, &pace, ids, &current, &stop).await
                    })
                    .await;
                    let _ = done.send((key, results));
                }
                .instrument(span),
            );
        }
        let oldest = index.values().map(|d| d.received_at).min();
        crate::metrics::spool_depth(
            index.len(),
            oldest.map_or(0, |t| now.saturating_sub(t)),
            dead,
        );
        tokio::select! {
            _ = stop.cancelled() => return drain(&app, &tasks).await,
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

/// At shutdown: the attempts in flight may finish within `[limits]
/// drain_s` (no new one starts); what is still running then is cut, and
/// counted when it is sent again after the restart.
async fn drain(app: &App, tasks: &TaskTracker) {
    tasks.close();
    if tasks.is_empty() {
        return;
    }
    let grace = Duration::from_secs(app.config.limits.drain_s);
    info!(
        deliveries = tasks.len(),
        grace_s = grace.as_secs(),
        "shutting down: finishing the deliveries in flight"
    );
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(
            deliveries = tasks.len(),
            "drain grace over; cutting the deliveries still running"
        );
    }
}

/// The message a delivery task is working on, for when it panics.
type Current = Arc<Mutex<Option<String>>>;

/// Run `work` (a [`deliver`] of `ids`) in a task of its own: if it
/// panics (a bug), the batch still ends with results, so the mailbox is
/// released; the message it was on has the attempt counted, and the rest
/// of the batch is tried again.
async fn supervised<F, W>(spool: Arc<Spool>, ids: Vec<String>, work: W) -> Vec<(String, Next)>
where
    W: FnOnce(Vec<String>, Current) -> F,
    F: std::future::Future<Output = Vec<(String, Next)>> + Send + 'static,
{
    let current = Current::default();
    let work = tokio::spawn(work(ids.clone(), current.clone()).in_current_span());
    match work.await {
        Ok(results) => results,
        Err(e) => {
            let what = panic_text(e);
            let culprit = current.lock().unwrap_or_else(|e| e.into_inner()).take();
            let mut results = Vec::new();
            for id in ids {
                let next = if culprit.as_deref() == Some(id.as_str()) {
                    panicked(&spool, &id, &what).await
                } else {
                    Next::At(queue::now())
                };
                results.push((id, next));
            }
            results
        }
    }
}

/// What a delivery task's failure says, for the log and the dead letter.
fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
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
async fn deliver(
    app: &App,
    spool: &Spool,
    pace: &Pace,
    ids: Vec<String>,
    current: &Current,
    stop: &CancellationToken,
) -> Vec<(String, Next)> {
    let mut results = Vec::new();
    let mut todo = Vec::new();
    let max_age = spool.config.max_age();
    let on = |id: Option<&String>| *current.lock().unwrap_or_else(|e| e.into_inner()) = id.cloned();
    for id in ids {
        let q = spool.queue.clone();
        let lid = id.clone();
        on(Some(&id));
        match blocking(move || q.load(Place::Queue, &lid)).await {
            Ok((env, status)) if env.pending(&status).next().is_none() => {
                // Delivered to all, or reported: only the removal is left.
                let next = settle(app, spool, env, status, &[], vec![], Why::Refused).await;
                results.push((id, next));
            }
            Ok((env, status)) => {
                let age = queue::now().saturating_sub(status.age_from(env.received_at));
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
    on(None);
    let Some((_, first, _)) = todo.first() else {
        return results;
    };
    let identity = app
        .accounts()
        .spooled_identity(&first.account, &first.mailbox);
    if let Some(id) = identity.as_ref().ok().filter(|id| id.graph) {
        for (mid, env, status) in todo {
            if stop.is_cancelled() {
                results.push((mid, Next::At(queue::now())));
                continue;
            }
            on(Some(&mid));
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
        if broken || stop.is_cancelled() {
            results.push((id, Next::At(queue::now())));
            continue;
        }
        on(Some(&id));
        tokio::select! {
            _ = paced(pace, spool, &env) => {}
            _ = stop.cancelled() => {
                results.push((id, Next::At(queue::now())));
                continue;
            }
        }
        let retry = status.attempts > 0;
        let pending: Vec<String> = env.pending(&status).cloned().collect();
        let path = spool.queue.message_path(Place::Queue, &id);
        let mark_id = id.clone();
        let mut doubted = false;
        let sent = Dialer::send_message(
            &mut upstream.conn,
            &env.sender,
            &env.params,
            &pending,
            &path,
            || {
                off_async(|| {
                    doubted = was_in_doubt(spool, &mark_id);
                    spool.queue.mark_sending(&mark_id)
                })
            },
        )
        .await;
        if doubted {
            count_resend(&id);
        }
        match sent {
            Err(e) => {
                // If the end went out, its mark stays: the next attempt
                // is counted as a possible duplicate.
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
                // The mark is cleared once the outcome is on disk: a crash
                // or a failed write before that leaves it.
                let next = apply(app, spool, env, status, outcome).await;
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
    let (q, mark_id) = (spool.queue.clone(), env.id.clone());
    let doubted = blocking(move || {
        let doubted = q.clear_sending(&mark_id);
        q.mark_sending(&mark_id).map(|()| doubted)
    })
    .await;
    match doubted {
        Ok(true) => count_resend(&env.id),
        Ok(false) => {}
        Err(e) => return defer(spool, &env.id, status, format!("spool: {e}"), retry).await,
    }
    let mut doubt = Doubt::default();
    let sent = app
        .graph
        .send(&token.secret, &env.mailbox, &message, &pending, &mut doubt)
        .await;
    super::settle::count_graph_doubt(&doubt, sent.is_err());
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
        Err(e) => {
            if !doubt.open {
                // Graph said no: no copy of this attempt is out there.
                let (q, mid) = (spool.queue.clone(), env.id.clone());
                let _ = blocking(move || Ok(q.clear_sending(&mid))).await;
            }
            defer(spool, &env.id, status, e.to_string(), retry).await
        }
    };
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_delivery_ends_its_batch_and_buries_the_message_after_a_few() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(super::super::tests::spool(dir.path()));
        let ids: Vec<String> = (0..2)
            .map(|_| super::super::tests::queued(&spool))
            .collect();
        let culprit = ids[1].clone();
        for round in 1..=settle_max_panics() {
            let c = culprit.clone();
            let results = supervised(spool.clone(), ids.clone(), move |_, current| async move {
                *current.lock().unwrap() = Some(c);
                panic!("planner bug");
            })
            .await;
            // Both messages come back to the worker: the mailbox is free.
            assert_eq!(results.len(), 2, "round {round}");
            assert!(matches!(results[0].1, Next::At(_)));
            let dead = spool.queue.find(&culprit) == Some(Place::Dead);
            assert_eq!(dead, round == settle_max_panics(), "round {round}");
        }
        let (_, status) = spool.queue.load(Place::Dead, &culprit).unwrap();
        let why = status.dead_because.unwrap();
        assert!(why.contains("planner bug"), "{why}");
        assert_eq!(spool.queue.find(&ids[0]), Some(Place::Queue));
    }

    fn settle_max_panics() -> u32 {
        super::super::settle::MAX_PANICS
    }
}
