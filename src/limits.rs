//! Upstream sessions per mailbox: Exchange Online refuses a fourth SMTP
//! session of one mailbox (`432 4.3.2`), so oxbridge holds further devices
//! in a bounded queue until a session ends, instead of failing them there.
//!
//! One semaphore per (protocol, mailbox); a device waits at most
//! `[limits] mailbox_wait_s` (SMTP, 120 s) or `imap_mailbox_wait_s` /
//! `pop3_mailbox_wait_s` (10 s: those sessions last hours, so a queue would
//! only hold a device silently), and at most `mailbox_queue` devices wait
//! for one mailbox at once. The permit lives as long as the relayed session.
//!
//! With the Redis backend, the count is over all replicas: a sorted set per
//! (protocol, mailbox) whose members are `replica:slot` scored by their
//! expiry. Taking a slot is one script (drop expired members, count, add if
//! below the limit); a held slot is renewed every [`HEARTBEAT`] to expire
//! [`SLOT_LIFE`] later, and removed when the session ends, so a crashed
//! replica's slots free themselves. Waiting devices look again with
//! backoff. When the state counts alone (the file backend always; Redis
//! when it fails, with a warning) this process's own semaphores apply: the
//! limit then holds per replica only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{LimitsConfig, Protocol};
use crate::error::AuthError;
use crate::state::State;

/// How long a slot in Redis lives without a heartbeat.
pub const SLOT_LIFE: Duration = Duration::from_secs(30);
/// How often a held slot in Redis is renewed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// First and longest pause between looks for a free slot in Redis.
pub const SLOT_POLL_FIRST: Duration = Duration::from_millis(25);
pub const SLOT_POLL_MAX: Duration = Duration::from_millis(500);

/// One upstream session of a mailbox, held until dropped.
pub struct Slot {
    hold: Hold,
    /// Counts the session on the status page while it is held.
    gate: Arc<Gate>,
}

enum Hold {
    /// A permit of this process's semaphore, given back when dropped.
    Local { _permit: OwnedSemaphorePermit },
    /// A member of the replicas' set; dropping it stops the heartbeat,
    /// which then removes the member.
    Replicas(CancellationToken),
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.in_use.fetch_sub(1, Ordering::SeqCst);
        if let Hold::Replicas(stop) = &self.hold {
            stop.cancel();
        }
    }
}

/// A mailbox's upstream sessions held by this process, for the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxUse {
    pub protocol: Protocol,
    pub mailbox: String,
    pub sessions: usize,
    pub waiting: usize,
    pub limit: usize,
}

/// A device counted among those waiting for a mailbox while alive (also
/// when its login is dropped while it waits).
struct InLine<'g>(&'g AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Idle entries are swept once the map holds this many.
const SWEEP_AT: usize = 1024;

struct Gate {
    sessions: Arc<Semaphore>,
    waiting: AtomicUsize,
    in_use: AtomicUsize,
}

pub struct MailboxLimits {
    per_protocol: [usize; 3],
    wait: [Duration; 3],
    queue: usize,
    gates: Mutex<HashMap<(Protocol, String), Arc<Gate>>>,
    state: Arc<State>,
}

fn index(p: Protocol) -> usize {
    match p {
        Protocol::Smtp => 0,
        Protocol::Imap => 1,
        Protocol::Pop3 => 2,
    }
}

impl MailboxLimits {
    /// The limits of `[limits]`, counted over the replicas of `state`.
    pub fn new(limits: &LimitsConfig, state: Arc<State>) -> MailboxLimits {
        MailboxLimits {
            per_protocol: [Protocol::Smtp, Protocol::Imap, Protocol::Pop3]
                .map(|p| limits.sessions_per_mailbox(p)),
            wait: [Protocol::Smtp, Protocol::Imap, Protocol::Pop3].map(|p| limits.mailbox_wait(p)),
            queue: limits.mailbox_queue,
            gates: Mutex::new(HashMap::new()),
            state,
        }
    }

    fn gate(&self, protocol: Protocol, mailbox: &str) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        let max = self.per_protocol[index(protocol)];
        if gates.len() >= SWEEP_AT {
            gates.retain(|_, g| Arc::strong_count(g) > 1 || g.sessions.available_permits() < max);
        }
        gates
            .entry((protocol, mailbox.to_lowercase()))
            .or_insert_with(|| {
                Arc::new(Gate {
                    sessions: Arc::new(Semaphore::new(max)),
                    waiting: AtomicUsize::new(0),
                    in_use: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// A session slot for this mailbox, waiting in line if all are taken:
    /// over all replicas, or in this process when the state counts alone.
    /// A wait and a refusal are counted (`oxbridge_mailbox_full_total`).
    pub async fn acquire(&self, protocol: Protocol, mailbox: &str) -> Result<Slot, AuthError> {
        let gate = self.gate(protocol, mailbox);
        match self.hold(protocol, mailbox, &gate).await {
            Ok((hold, waited)) => {
                if waited {
                    crate::metrics::mailbox_full(protocol, mailbox, "waited");
                }
                gate.in_use.fetch_add(1, Ordering::SeqCst);
                Ok(Slot { hold, gate })
            }
            Err(e) => {
                crate::metrics::mailbox_full(protocol, mailbox, "refused");
                Err(e)
            }
        }
    }

    /// The mailboxes with sessions held or devices waiting in this
    /// process, busiest first.
    pub fn in_use(&self) -> Vec<MailboxUse> {
        let gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        let mut used: Vec<MailboxUse> = gates
            .iter()
            .map(|((protocol, mailbox), g)| MailboxUse {
                protocol: *protocol,
                mailbox: mailbox.clone(),
                sessions: g.in_use.load(Ordering::SeqCst),
                waiting: g.waiting.load(Ordering::SeqCst),
                limit: self.per_protocol[index(*protocol)],
            })
            .filter(|u| u.sessions > 0 || u.waiting > 0)
            .collect();
        used.sort_by(|a, b| {
            (b.sessions + b.waiting)
                .cmp(&(a.sessions + a.waiting))
                .then_with(|| a.mailbox.cmp(&b.mailbox))
                .then_with(|| a.protocol.as_str().cmp(b.protocol.as_str()))
        });
        used
    }

    /// The slot itself, and whether the device had to wait for it.
    async fn hold(
        &self,
        protocol: Protocol,
        mailbox: &str,
        gate: &Gate,
    ) -> Result<(Hold, bool), AuthError> {
        let limit = self.per_protocol[index(protocol)];
        let set = format!("{protocol}:{}", mailbox.to_lowercase());
        let wait = self.wait[index(protocol)];
        let started = tokio::time::Instant::now();
        let mut pause = SLOT_POLL_FIRST;
        let mut in_line: Option<InLine> = None;
        loop {
            match self.state.acquire_slot(&set, limit, SLOT_LIFE).await {
                Ok(Some(member)) => {
                    let hold = Hold::Replicas(heartbeat(self.state.clone(), set, member));
                    return Ok((hold, in_line.is_some()));
                }
                Ok(None) => {}
                Err(alone) => {
                    if let Some(e) = alone.failure() {
                        tracing::warn!(%mailbox, error = %e, "Redis unavailable; limiting upstream sessions per replica");
                        crate::metrics::redis_error("limits");
                    }
                    let queued = in_line.take().is_some();
                    let left = wait.saturating_sub(started.elapsed());
                    return self
                        .acquire_local_within(protocol, mailbox, gate, left)
                        .await
                        .map(|(permit, waited)| {
                            (Hold::Local { _permit: permit }, waited || queued)
                        });
                }
            }
            if in_line.is_none() {
                in_line = Some(self.join_line(gate, mailbox)?);
            }
            if started.elapsed() + pause > wait {
                return Err(AuthError::Busy(format!(
                    "no free {protocol} session for {mailbox} within {} s",
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(SLOT_POLL_MAX);
        }
    }

    /// A place among the devices waiting for `gate`, unless
    /// `mailbox_queue` of them already wait.
    fn join_line<'g>(&self, gate: &'g Gate, mailbox: &str) -> Result<InLine<'g>, AuthError> {
        if gate.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(AuthError::Busy(format!(
                "{} devices already wait for {mailbox}",
                self.queue
            )));
        }
        Ok(InLine(&gate.waiting))
    }

    async fn acquire_local_within(
        &self,
        protocol: Protocol,
        mailbox: &str,
        gate: &Gate,
        wait: Duration,
    ) -> Result<(OwnedSemaphorePermit, bool), AuthError> {
        if let Ok(permit) = gate.sessions.clone().try_acquire_owned() {
            return Ok((permit, false));
        }
        let in_line = self.join_line(gate, mailbox)?;
        let result = tokio::time::timeout(wait, gate.sessions.clone().acquire_owned()).await;
        drop(in_line);
        match result {
            Ok(Ok(permit)) => Ok((permit, true)),
            _ => Err(AuthError::Busy(format!(
                "no free {protocol} session for {mailbox} within {} s",
                self.wait[index(protocol)].as_secs()
            ))),
        }
    }
}

/// Keep `member` of `set` alive until the returned token is cancelled,
/// then remove it.
fn heartbeat(state: Arc<State>, set: String, member: String) -> CancellationToken {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.cancelled() => break,
                _ = tokio::time::sleep(HEARTBEAT) => {
                    match state.renew_slot(&set, &member, SLOT_LIFE).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(slot = %set, "session slot in Redis expired while held (Redis restarted?)"),
                        Err(e) => {
                            tracing::debug!(slot = %set, error = %e, "cannot renew the session slot in Redis");
                            if e.failure().is_some() {
                                crate::metrics::redis_error("limits");
                            }
                        }
                    }
                }
            }
        }
        if let Err(e) = state.release_slot(&set, &member).await {
            tracing::warn!(slot = %set, error = %e, "cannot release the session slot in Redis; it expires by itself");
        }
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(smtp: usize, wait_ms: u64, queue: usize) -> MailboxLimits {
        let mut l = MailboxLimits::new(
            &LimitsConfig {
                smtp_sessions_per_mailbox: smtp,
                mailbox_queue: queue,
                ..Default::default()
            },
            Arc::new(State::File(None)),
        );
        l.wait = [Duration::from_millis(wait_ms); 3];
        l
    }

    #[tokio::test]
    async fn waits_for_a_free_session() {
        let l = Arc::new(limits(2, 2000, 10));
        let a = l.acquire(Protocol::Smtp, "m@x.test").await.unwrap();
        let _b = l.acquire(Protocol::Smtp, "M@x.test").await.unwrap();
        // Other mailboxes and protocols are not affected.
        let _c = l.acquire(Protocol::Smtp, "other@x.test").await.unwrap();
        let _d = l.acquire(Protocol::Imap, "m@x.test").await.unwrap();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire(Protocol::Smtp, "m@x.test").await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        drop(a);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn the_status_page_sees_held_sessions_and_waiting_devices() {
        let l = Arc::new(limits(1, 2000, 10));
        assert_eq!(l.in_use(), vec![]);
        let held = l.acquire(Protocol::Smtp, "M@x.test").await.unwrap();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire(Protocol::Smtp, "m@x.test").await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = |sessions, waiting| MailboxUse {
            protocol: Protocol::Smtp,
            mailbox: "m@x.test".into(),
            sessions,
            waiting,
            limit: 1,
        };
        assert_eq!(l.in_use(), vec![seen(1, 1)]);
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(l.in_use(), vec![]);
    }

    /// A device that gives up while it waits (its login future dropped)
    /// leaves the line: the queue and the gauge do not keep it.
    #[tokio::test]
    async fn a_dropped_wait_leaves_the_line() {
        let l = Arc::new(limits(1, 2000, 1));
        let held = l.acquire(Protocol::Smtp, "m@x.test").await.unwrap();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            l.acquire(Protocol::Smtp, "m@x.test"),
        )
        .await;
        assert!(gave_up.is_err());
        assert_eq!(l.in_use()[0].waiting, 0);
        drop(held);
        assert!(l.acquire(Protocol::Smtp, "m@x.test").await.is_ok());
    }

    #[tokio::test]
    async fn gives_up_after_the_wait_and_bounds_the_queue() {
        let l = Arc::new(limits(1, 200, 1));
        let _a = l.acquire(Protocol::Smtp, "m@x.test").await.unwrap();
        let first = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire(Protocol::Smtp, "m@x.test").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The queue (1) is full: turned away at once.
        let err = l.acquire(Protocol::Smtp, "m@x.test").await.err().unwrap();
        assert!(matches!(err, AuthError::Busy(_)));
        // The waiter gives up after 200 ms.
        assert!(matches!(first.await.unwrap(), Err(AuthError::Busy(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn long_sessions_are_not_queued_for_long() {
        let l = MailboxLimits::new(
            &LimitsConfig {
                smtp_sessions_per_mailbox: 1,
                imap_sessions_per_mailbox: 1,
                pop3_sessions_per_mailbox: 1,
                ..Default::default()
            },
            Arc::new(State::File(None)),
        );
        let mut held = Vec::new();
        for p in [Protocol::Smtp, Protocol::Imap, Protocol::Pop3] {
            held.push(l.acquire(p, "m@x.test").await.unwrap());
        }
        for p in [Protocol::Imap, Protocol::Pop3] {
            let started = tokio::time::Instant::now();
            let err = l.acquire(p, "m@x.test").await.err().unwrap();
            assert!(matches!(err, AuthError::Busy(_)), "{p}");
            assert_eq!(started.elapsed(), Duration::from_secs(10), "{p}");
        }
        // SMTP keeps its long queue.
        let smtp = tokio::time::timeout(
            Duration::from_secs(60),
            l.acquire(Protocol::Smtp, "m@x.test"),
        );
        assert!(smtp.await.is_err(), "still waiting after 60 s");
    }
}
