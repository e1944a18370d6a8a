//! `[spool]` and a listener's `delivery`: SMTP store-and-forward. With
//! `delivery = "spool"` a device's message is answered `250` once it is on
//! disk, then delivered upstream with retries; these keys bound what is
//! taken in and pace what goes out.

use std::path::PathBuf;

use serde::Deserialize;

/// Exchange Online's default message size limit (35 MB, as it counts).
pub const DEFAULT_SPOOL_MAX_MESSAGE_BYTES: u64 = 36_700_160;
/// Exchange Online's recipients per message.
pub const DEFAULT_SPOOL_MAX_RECIPIENTS: usize = 500;
/// Five days, as most MTAs keep a message before bouncing it.
pub const DEFAULT_SPOOL_MAX_AGE_H: f64 = 120.0;
/// Exchange Online's message rate limit per mailbox.
pub const DEFAULT_SPOOL_MESSAGES_PER_MINUTE: u32 = 30;
pub const DEFAULT_SPOOL_RETRY_MIN_S: u64 = 60;
pub const DEFAULT_SPOOL_RETRY_MAX_S: u64 = 3600;
/// The spool's directory under `state_dir` when `dir` is not given.
pub const DEFAULT_SPOOL_SUBDIR: &str = "spool";

/// How an SMTP listener hands a message on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Live relay: the device's `250` is the upstream's.
    #[default]
    Session,
    /// Store and forward: `250` once the message is on disk.
    Spool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Where messages wait; default `state_dir/spool`.
    pub dir: Option<PathBuf>,
    /// Hours a message may wait before its sender is told it failed
    /// (fractions allowed).
    pub max_age_h: f64,
    /// The `SIZE` offered to devices; larger messages are refused at once.
    pub max_message_bytes: u64,
    pub max_recipients: usize,
    /// Messages sent upstream per mailbox and minute.
    pub messages_per_minute: u32,
    /// The first retry comes after this long, doubling up to `retry_max_s`.
    pub retry_min_s: u64,
    pub retry_max_s: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: None,
            max_age_h: DEFAULT_SPOOL_MAX_AGE_H,
            max_message_bytes: DEFAULT_SPOOL_MAX_MESSAGE_BYTES,
            max_recipients: DEFAULT_SPOOL_MAX_RECIPIENTS,
            messages_per_minute: DEFAULT_SPOOL_MESSAGES_PER_MINUTE,
            retry_min_s: DEFAULT_SPOOL_RETRY_MIN_S,
            retry_max_s: DEFAULT_SPOOL_RETRY_MAX_S,
        }
    }
}

impl SpoolConfig {
    /// The spool directory of a config whose state lives in `state_dir`.
    pub fn dir(&self, state_dir: &std::path::Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join(DEFAULT_SPOOL_SUBDIR))
    }

    /// Why the spool cannot be opened, with the fix: `spool.dir: cannot
    /// open DIR: ERROR`, saying where DIR comes from when `spool.dir` is not
    /// set (the operator never wrote that key).
    pub fn open_error(&self, state_dir: &std::path::Path, e: &std::io::Error) -> String {
        let dir = self.dir(state_dir);
        let why = match self.dir {
            Some(_) => String::new(),
            None => format!(
                " (spool.dir is not set, so the spool is state_dir/{DEFAULT_SPOOL_SUBDIR}: a [[listener]] has delivery = \"spool\")"
            ),
        };
        let text = format!("spool.dir: cannot open {}: {e}{why}", dir.display());
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                format!("{text}. Fix: {}", crate::fixes::owner_fix(&dir))
            }
            _ => text,
        }
    }

    pub fn max_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.max_age_h * 3600.0)
    }
}
