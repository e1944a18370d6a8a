//! SMTP store and forward, for listeners with `delivery = "spool"`: the
//! device's message is taken here ([`intake`], driven by [`serve`]), kept
//! on disk ([`queue`])
//! and sent upstream later with retries ([`deliver`]); after each attempt
//! `settle` records what became of it, and what cannot be delivered goes
//! back to its sender as a report ([`dsn`]).

pub mod cli;
pub mod deliver;
pub mod dsn;
pub mod intake;
pub mod queue;
pub mod serve;
mod settle;

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::config::SpoolConfig;
use queue::Queue;

/// What EHLO offers once oxbridge takes messages itself (a spooling
/// listener, or an account that sends through Microsoft Graph).
pub fn keywords(config: &SpoolConfig) -> Vec<String> {
    vec![
        format!("SIZE {}", config.max_message_bytes),
        "8BITMIME".into(),
        "PIPELINING".into(),
        "CHUNKING".into(),
        "ENHANCEDSTATUSCODES".into(),
    ]
}

/// The spool every spooling listener and the delivery worker share.
pub struct Spool {
    pub queue: Queue,
    pub config: SpoolConfig,
    /// Messages taken since the worker last looked.
    arrivals: Mutex<Vec<String>>,
    wake: Notify,
}

impl Spool {
    /// Open the spool directory of `config` (created 0700).
    pub fn open(config: &crate::config::Config) -> std::io::Result<Spool> {
        let dir = config.spool.dir(&config.state_dir);
        Ok(Spool {
            queue: Queue::open(&dir)?,
            config: config.spool.clone(),
            arrivals: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Remove the drafts a crash left (see [`Queue::clear_drafts`]).
    pub fn clear_drafts(&self) {
        self.queue.clear_drafts();
    }

    /// What a spooling listener offers in EHLO: its own extensions, since
    /// oxbridge itself takes the message.
    pub fn keywords(&self) -> Vec<String> {
        keywords(&self.config)
    }

    /// A message entered the queue: wake the worker.
    pub fn queued(&self, id: &str) {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.to_string());
        self.wake.notify_one();
    }

    fn take_arrivals(&self) -> Vec<String> {
        std::mem::take(&mut *self.arrivals.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A spool in `dir` with the default settings.
    pub(crate) fn spool(dir: &std::path::Path) -> Spool {
        Spool {
            queue: Queue::open(dir).unwrap(),
            config: SpoolConfig::default(),
            arrivals: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// A message from scanner@contoso.test to a@b.test, in the queue.
    pub(crate) fn queued(spool: &Spool) -> String {
        let mut d = spool.queue.draft().unwrap();
        d.write(b"Subject: x\r\n\r\nhi\r\n").unwrap();
        d.commit(queue::Envelope {
            id: String::new(),
            account: "scanner@contoso.test".into(),
            mailbox: "scanner@contoso.test".into(),
            relay: false,
            sender: "scanner@contoso.test".into(),
            recipients: vec!["a@b.test".into()],
            params: vec![],
            received_at: queue::now(),
            client: "192.0.2.1".into(),
            helo: "printer".into(),
            size: 0,
            report: false,
        })
        .unwrap()
    }
}
