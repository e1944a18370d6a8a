//! Upstream sessions per mailbox: Exchange Online refuses a fourth SMTP
//! session of one mailbox (`432 4.3.2`), so oxbridge holds further devices
//! in a bounded queue until a session ends, instead of failing them there.
//!
//! One semaphore per (protocol, mailbox); a device waits at most
//! `[limits] mailbox_wait_s`, and at most `mailbox_queue` devices wait for
//! one mailbox at once. The permit lives as long as the relayed session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LimitsConfig, Protocol};
use crate::error::AuthError;

/// Idle entries are swept once the map holds this many.
const SWEEP_AT: usize = 1024;

struct Gate {
    sessions: Arc<Semaphore>,
    waiting: AtomicUsize,
}

pub struct MailboxLimits {
    per_protocol: [usize; 3],
    wait: Duration,
    queue: usize,
    gates: Mutex<HashMap<(Protocol, String), Arc<Gate>>>,
}

fn index(p: Protocol) -> usize {
    match p {
        Protocol::Smtp => 0,
        Protocol::Imap => 1,
        Protocol::Pop3 => 2,
    }
}

impl MailboxLimits {
    pub fn new(limits: &LimitsConfig) -> MailboxLimits {
        MailboxLimits {
            per_protocol: [Protocol::Smtp, Protocol::Imap, Protocol::Pop3]
                .map(|p| limits.sessions_per_mailbox(p)),
            wait: Duration::from_secs(limits.mailbox_wait_s),
            queue: limits.mailbox_queue,
            gates: Mutex::new(HashMap::new()),
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
                })
            })
            .clone()
    }

    /// A session slot for this mailbox, waiting in line if all are taken.
    pub async fn acquire(
        &self,
        protocol: Protocol,
        mailbox: &str,
    ) -> Result<OwnedSemaphorePermit, AuthError> {
        let gate = self.gate(protocol, mailbox);
        if let Ok(permit) = gate.sessions.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if gate.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(AuthError::Busy(format!(
                "{} devices already wait for {mailbox}",
                self.queue
            )));
        }
        let result = tokio::time::timeout(self.wait, gate.sessions.clone().acquire_owned()).await;
        gate.waiting.fetch_sub(1, Ordering::SeqCst);
        match result {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(AuthError::Busy(format!(
                "no free {protocol} session for {mailbox} within {} s",
                self.wait.as_secs()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(smtp: usize, wait_ms: u64, queue: usize) -> MailboxLimits {
        let mut l = MailboxLimits::new(&LimitsConfig {
            smtp_sessions_per_mailbox: smtp,
            mailbox_queue: queue,
            ..Default::default()
        });
        l.wait = Duration::from_millis(wait_ms);
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
}
