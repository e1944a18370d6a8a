//! What happens to a message after an attempt: its recipients delivered
//! are done, those refused go back to the sender as a report (itself
//! spooled), the rest wait for the next attempt; a message nothing is left
//! to try for is removed, or moved to the dead-letter folder when its
//! sender cannot be told.

use std::io;

use tracing::{info, warn};

use super::dsn::{self, Failure, Why};
use super::queue::{self, Envelope, Place, Status};
use super::Spool;
use crate::app::App;
use crate::error::AuthError;
use crate::upstream::Sent;
use crate::wire::smtp::ServerReply;

/// Bytes of a message read to return its header in a report.
const HEADER_READ: usize = dsn::MAX_RETURNED_HEADER;
/// Delivery attempts of one message that may end in a panic before it
/// goes to the dead-letter folder.
pub(super) const MAX_PANICS: u32 = 3;

/// What became of a message after a run.
pub(super) enum Next {
    Gone,
    At(u64),
}

/// Run a blocking spool operation off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Run a short blocking spool operation (a mark, a sync) from async code
/// that cannot await, without holding up the async threads.
pub(super) use crate::state::file::unblocked as off_async;

/// Before the end of `id` goes upstream again: whether an earlier
/// attempt's end went out without its outcome being recorded (a crash, a
/// cut connection, a failed write, an answer that leaves it open). Its
/// `sending` mark is cleared; the caller marks it again.
pub(super) fn was_in_doubt(spool: &Spool, id: &str) -> bool {
    spool.queue.clear_sending(id)
}

/// A send that may repeat one already delivered: logged and counted.
pub(super) fn count_resend(id: &str) {
    warn!(id = %id, "the message may have been delivered already; sending it again");
    crate::metrics::spool_possible_duplicate();
}

/// Graph was asked again after answers that left open whether it took
/// the message (a 503): each is counted as a possible duplicate.
pub(crate) fn count_graph_doubt(doubt: &crate::upstream::graph::Doubt, failed: bool) {
    for _ in 0..doubt.resent {
        warn!(
            "Microsoft Graph was asked again after an unclear answer; the message may arrive twice"
        );
        crate::metrics::spool_possible_duplicate();
    }
    if failed && doubt.open {
        warn!("Microsoft Graph may have taken the message although it did not say so");
    }
}

/// The delay before attempt `attempts + 1`.
fn backoff(spool: &Spool, attempts: u32) -> u64 {
    let c = &spool.config;
    c.retry_min_s
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
        .min(c.retry_max_s)
}

/// Record a temporary failure of `id`: when to try again, and why.
pub(super) async fn defer(
    spool: &Spool,
    id: &str,
    mut status: Status,
    why: String,
    retry: bool,
) -> Next {
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

/// The fate of each pending recipient after one attempt.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) delivered: Vec<String>,
    pub(super) refused: Vec<Failure>,
    /// Recipients to try again, and the reply that said so.
    pub(super) later: Vec<(String, String)>,
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
    pub(super) fn of(sent: &Sent, pending: &[String]) -> Outcome {
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
pub(super) async fn apply(
    app: &App,
    spool: &Spool,
    env: Envelope,
    mut status: Status,
    o: Outcome,
) -> Next {
    if !o.delivered.is_empty() {
        info!(id = %env.id, recipients = o.delivered.len(), attempts = status.attempts + 1, "delivered");
        status.done.extend(o.delivered.iter().cloned());
        // Who got it is saved before anything else can fail (a report, the
        // removal): a later failure must never send it to them again.
        let (q, id, saved) = (spool.queue.clone(), env.id.clone(), status.clone());
        if let Err(e) = blocking(move || q.save_status(Place::Queue, &id, &saved)).await {
            warn!(id = %env.id, error = %e, "cannot record whom the message was delivered to; it may be sent to them again");
            // The `sending` mark stays: the next attempt counts its resend.
            return Next::At(queue::now() + backoff(spool, status.attempts + 1));
        }
    }
    let (q, id) = (spool.queue.clone(), env.id.clone());
    let _ = blocking(move || Ok(q.clear_sending(&id))).await;
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
pub(super) async fn settle(
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
            let why = format!("cannot write a delivery report: {e}");
            return defer(spool, &id, status, why, true).await;
        }
    }
    let q = spool.queue.clone();
    let rid = id.clone();
    match blocking(move || q.retire(Place::Queue, &rid)).await {
        Ok(()) => Next::Gone,
        Err(e) => {
            warn!(id = %id, error = %e, "cannot remove a finished message from the spool");
            let why = format!("cannot remove the finished message: {e}");
            defer(spool, &id, status, why, true).await
        }
    }
}

/// A delivery of `id` ended in a panic (a bug): the attempt counts, and
/// after [`MAX_PANICS`] the message goes to the dead-letter folder with
/// the reason, so that one message cannot hold its mailbox for ever.
pub(super) async fn panicked(spool: &Spool, id: &str, what: &str) -> Next {
    let q = spool.queue.clone();
    let lid = id.to_string();
    let Ok((_, mut status)) = blocking(move || q.load(Place::Queue, &lid)).await else {
        return Next::At(queue::now() + spool.config.retry_min_s);
    };
    status.panics += 1;
    let why = format!("internal error during delivery: {what}");
    warn!(id = %id, panics = status.panics, error = %why, "a delivery failed unexpectedly");
    if status.panics < MAX_PANICS {
        return defer(spool, id, status, why, true).await;
    }
    let reason = format!("{why} ({} times)", status.panics);
    crate::metrics::spool_dead_letter();
    let (q, bid) = (spool.queue.clone(), id.to_string());
    match blocking(move || q.bury(&bid, status, &reason)).await {
        Ok(()) => {
            warn!(id = %id, "message moved to the dead-letter folder");
            Next::Gone
        }
        Err(e) => {
            warn!(id = %id, error = %e, "cannot move a message to the dead-letter folder");
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
            upstream: &app.upstream_of(&env.account, crate::config::Protocol::Smtp),
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
