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

use super::dsn::{self, Failure, Why};
use super::queue::{self, Envelope, Place, Queue, Status};
use super::Spool;
use crate::app::App;
use crate::error::AuthError;
use crate::upstream::graph::GraphError;
use crate::upstream::{Dialer, Sent};
use crate::wire::smtp::ServerReply;

/// The longest pause between looks at the queue (retry requests from
/// `oxbridge queue retry` are seen within it).
const TICK: Duration = Duration::from_secs(1);
/// Bytes of a message read to return its header in a report.
const HEADER_READ: usize = dsn::MAX_RETURNED_HEADER;

/// A message the worker knows of.
struct Due {
    /// Account and mailbox: the messages of one are sent in one session.
    key: String,
    at: u64,
    received_at: u64,
}

/// What became of a message after a run.
enum Next {
    Gone,
    At(u64),
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

/// Wait until `mailbox` may have its next message.
async fn paced(pace: &Pace, mailbox: &str, per_minute: u32) {
    let gap = Duration::from_secs(60) / per_minute.max(1);
    let wait = {
        let mut last = pace.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let next = last.get(mailbox).map_or(now, |t| (*t + gap).max(now));
        last.insert(mailbox.to_string(), next);
        next - now
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// Run a blocking spool operation off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// The delay before attempt `attempts + 1`.
fn backoff(spool: &Spool, attempts: u32) -> u64 {
    let c = &spool.config;
    c.retry_min_s
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
        .min(c.retry_max_s)
}

/// Record a temporary failure of `id`: when to try again, and why.
async fn defer(spool: &Spool, id: &str, mut status: Status, why: String, retry: bool) -> Next {
    status.attempts += 1;
    status.next_attempt_at = queue::now() + backoff(spool, status.attempts);
    warn!(id = %id, attempts = status.attempts, retry_in_s = status.next_attempt_at - queue::now(), error = %why, "delivery deferred");
    status.last_error = Some(why);
    crate::metrics::spool_delivery("deferred", retry);
    let (q, id, at) = (spool.queue.clone(), id.to_string(), status.next_attempt_at);
    match blocking(move || q.save_status(Place::Queue, &id, &status)).await {
        Ok(()) => Next::At(at),
        Err(e) => {
            warn!(error = %e, "cannot record a deferral");
            Next::At(at)
        }
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
        paced(
            pace,
            &env.mailbox.to_lowercase(),
            spool.config.messages_per_minute,
        )
        .await;
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
    paced(
        pace,
        &env.mailbox.to_lowercase(),
        spool.config.messages_per_minute,
    )
    .await;
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

/// The fate of each pending recipient after one attempt.
#[derive(Debug, Default)]
struct Outcome {
    delivered: Vec<String>,
    refused: Vec<Failure>,
    /// Recipients to try again, and the reply that said so.
    later: Vec<(String, String)>,
}

fn line(reply: &ServerReply) -> String {
    let text: Vec<String> = reply
        .lines
        .iter()
        .map(|l| crate::wire::printable(l))
        .collect();
    format!("{} {}", reply.code, text.join(" "))
}

impl Outcome {
    fn of(sent: &Sent, pending: &[String]) -> Outcome {
        let mut o = Outcome::default();
        let fail = |o: &mut Outcome, r: &str, reply: &ServerReply| {
            if reply.code >= 500 {
                o.refused.push(Failure {
                    recipient: r.to_string(),
                    reply: line(reply),
                });
            } else {
                o.later.push((r.to_string(), line(reply)));
            }
        };
        if sent.mail.code / 100 != 2 {
            for r in pending {
                fail(&mut o, r, &sent.mail);
            }
            return o;
        }
        for (r, reply) in &sent.recipients {
            if reply.code / 100 != 2 {
                fail(&mut o, r, reply);
                continue;
            }
            match &sent.data {
                Some(d) if d.code / 100 == 2 => o.delivered.push(r.clone()),
                Some(d) => fail(&mut o, r, d),
                None => o.later.push((r.clone(), "no answer to the message".into())),
            }
        }
        o
    }
}

/// Record one attempt's outcome: delivered recipients are done; refused
/// ones are reported; the rest wait for the next attempt.
async fn apply(app: &App, spool: &Spool, env: Envelope, mut status: Status, o: Outcome) -> Next {
    if !o.delivered.is_empty() {
        info!(id = %env.id, recipients = o.delivered.len(), attempts = status.attempts + 1, "delivered");
    }
    status.done.extend(o.delivered.iter().cloned());
    if o.later.is_empty() {
        return settle(
            app,
            spool,
            env,
            status,
            &o.delivered,
            o.refused,
            Why::Refused,
        )
        .await;
    }
    if !o.refused.is_empty() {
        if let Err(e) = report(app, spool, &env, &o.refused, Why::Refused).await {
            warn!(id = %env.id, error = %e, "cannot write a delivery report; will try again");
        } else {
            status
                .done
                .extend(o.refused.iter().map(|f| f.recipient.clone()));
        }
    }
    let why = o.later.first().map(|(_, r)| r.clone()).unwrap_or_default();
    defer(spool, &env.id, status, why, false).await
}

/// Nothing is left to try: report the failures (if any), then remove the
/// message; what cannot be reported goes to the dead-letter folder.
async fn settle(
    app: &App,
    spool: &Spool,
    env: Envelope,
    status: Status,
    _delivered: &[String],
    failures: Vec<Failure>,
    why: Why,
) -> Next {
    let id = env.id.clone();
    if !failures.is_empty() {
        if let Err(e) = report(app, spool, &env, &failures, why).await {
            if e.kind() == io::ErrorKind::Unsupported {
                let reason = format!(
                    "undeliverable ({}), and its sender cannot be told: {e}",
                    failures[0].reply
                );
                warn!(id = %id, reason = %reason, "message moved to the dead-letter folder");
                crate::metrics::spool_dead_letter();
                let q = spool.queue.clone();
                let bid = id.clone();
                if let Err(e) = blocking(move || q.bury(&bid, status, &reason)).await {
                    warn!(id = %id, error = %e, "cannot move a message to the dead-letter folder");
                    return Next::At(queue::now() + spool.config.retry_max_s);
                }
                return Next::Gone;
            }
            warn!(id = %id, error = %e, "cannot write a delivery report; will try again");
            return Next::At(queue::now() + spool.config.retry_min_s);
        }
    }
    let q = spool.queue.clone();
    let rid = id.clone();
    match blocking(move || q.retire(Place::Queue, &rid)).await {
        Ok(()) => Next::Gone,
        Err(e) => {
            warn!(id = %id, error = %e, "cannot remove a finished message from the spool");
            Next::At(queue::now() + spool.config.retry_max_s)
        }
    }
}

/// Spool a report of `failures` to the sender of `env`. A report about a
/// report, or to the null sender, is refused (`Unsupported`).
async fn report(
    app: &App,
    spool: &Spool,
    env: &Envelope,
    failures: &[Failure],
    why: Why,
) -> io::Result<()> {
    if env.report || env.sender.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            if env.report {
                "it is itself a delivery report"
            } else {
                "it has the null sender"
            },
        ));
    }
    let advice = crate::diagnose::advice(&AuthError::UpstreamRefused(failures[0].reply.clone()));
    let path = spool.queue.message_path(Place::Queue, &env.id);
    let start = blocking(move || {
        use std::io::Read;
        let mut buf = vec![0u8; HEADER_READ];
        let mut f = std::fs::File::open(path)?;
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        buf.truncate(n);
        Ok(buf)
    })
    .await?;
    let now = queue::now();
    let bytes = dsn::report(
        &dsn::Report {
            host: &app.hostname,
            from: &env.mailbox,
            upstream: app.dialer.address(crate::config::Protocol::Smtp),
            why,
            failures,
            advice,
            waited_h: now.saturating_sub(env.received_at) as f64 / 3600.0,
            now,
        },
        env,
        &start,
    );
    let report = Envelope {
        id: String::new(),
        account: env.account.clone(),
        mailbox: env.mailbox.clone(),
        relay: false,
        sender: env.mailbox.clone(),
        recipients: vec![env.sender.clone()],
        params: vec!["BODY=8BITMIME".into()],
        received_at: now,
        client: "oxbridge".into(),
        helo: app.hostname.clone(),
        size: 0,
        report: true,
    };
    let q = spool.queue.clone();
    let new_id = blocking(move || {
        let mut d = q.draft()?;
        d.write(&bytes)?;
        d.commit(report)
    })
    .await?;
    info!(id = %env.id, report = %new_id, to = %env.sender, why = ?why, "delivery report spooled for the sender");
    crate::metrics::spool_bounce(match why {
        Why::Refused => "refused",
        Why::Expired => "expired",
    });
    spool.queued(&new_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> ServerReply {
        ServerReply {
            code,
            lines: vec![text.as_bytes().to_vec()],
        }
    }

    #[test]
    fn replies_sort_recipients_into_delivered_refused_and_later() {
        let pending = vec!["a@x".to_string(), "b@x".into(), "c@x".into()];
        let sent = Sent {
            mail: reply(250, "2.1.0 ok"),
            recipients: vec![
                ("a@x".into(), reply(250, "2.1.5 ok")),
                ("b@x".into(), reply(550, "5.1.1 unknown")),
                ("c@x".into(), reply(451, "4.3.2 throttled")),
            ],
            data: Some(reply(250, "2.0.0 queued")),
        };
        let o = Outcome::of(&sent, &pending);
        assert_eq!(o.delivered, ["a@x"]);
        assert_eq!(o.refused[0].reply, "550 5.1.1 unknown");
        assert_eq!(
            o.later,
            [("c@x".to_string(), "451 4.3.2 throttled".to_string())]
        );
        let refused_at_end = Sent {
            data: Some(reply(554, "5.2.252 SendAsDenied")),
            ..sent
        };
        let o = Outcome::of(&refused_at_end, &pending);
        assert!(o.delivered.is_empty());
        assert_eq!(
            o.refused
                .iter()
                .map(|f| f.recipient.as_str())
                .collect::<Vec<_>>(),
            ["a@x", "b@x"]
        );
        let mail_deferred = Sent {
            mail: reply(421, "4.3.2 busy"),
            recipients: vec![],
            data: None,
        };
        assert_eq!(Outcome::of(&mail_deferred, &pending).later.len(), 3);
    }
}
