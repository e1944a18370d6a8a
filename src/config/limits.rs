//! `[limits]`: bounds on connections, time and input, and the default of
//! every one of them.

use serde::Deserialize;

use super::Protocol;

// The defaults of `[limits]`, key by key.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2000;
pub const DEFAULT_PREAUTH_TIMEOUT_S: u64 = 300;
/// Over IMAP IDLE's 29 minutes (RFC 2177), so an idling client is not cut.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 31 * 60;
pub const DEFAULT_MAX_LINE: usize = 4096;
/// Exchange Online's limit of concurrent SMTP sessions per mailbox.
pub const DEFAULT_SMTP_SESSIONS_PER_MAILBOX: usize = 3;
pub const DEFAULT_IMAP_SESSIONS_PER_MAILBOX: usize = 20;
pub const DEFAULT_POP3_SESSIONS_PER_MAILBOX: usize = 20;
pub const DEFAULT_MAILBOX_WAIT_S: u64 = 120;
/// IMAP and POP3 sessions last hours: a device is not kept waiting long.
pub const DEFAULT_LONG_SESSION_MAILBOX_WAIT_S: u64 = 10;
pub const DEFAULT_MAILBOX_QUEUE: usize = 100;
pub const DEFAULT_LOGIN_DELAY_MS: u64 = 250;
pub const DEFAULT_LOGIN_LOCKOUT_FAILURES: u32 = 10;
pub const DEFAULT_LOGIN_LOCKOUT_S: u64 = 900;
pub const DEFAULT_DRAIN_S: u64 = 30;

/// Bounds on connections, time and input; every one has a default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections served at once over all listeners.
    pub max_connections: usize,
    /// Seconds a device may be silent before it has logged in.
    pub preauth_timeout_s: u64,
    /// Seconds a relayed session may be silent both ways (IMAP IDLE needs 30 min).
    pub idle_timeout_s: u64,
    /// Longest command line before login, in bytes.
    pub max_line: usize,
    /// Upstream sessions at once per mailbox (Exchange Online allows 3 for SMTP).
    pub smtp_sessions_per_mailbox: usize,
    pub imap_sessions_per_mailbox: usize,
    pub pop3_sessions_per_mailbox: usize,
    /// Seconds an SMTP device waits for a free upstream session before `421 4.3.2`.
    pub mailbox_wait_s: u64,
    /// The same for IMAP and POP3, whose sessions last hours: then
    /// `NO [UNAVAILABLE]` / `-ERR [SYS/TEMP]`.
    pub imap_mailbox_wait_s: u64,
    pub pop3_mailbox_wait_s: u64,
    /// Devices that may wait for one mailbox at once; more are turned away.
    pub mailbox_queue: usize,
    /// Delay after a failed login, doubled with each further failure (max 4 s).
    pub login_delay_ms: u64,
    /// Failed logins (per client address, and per account) within 15 minutes
    /// that lock it out.
    pub login_lockout_failures: u32,
    /// How long a lockout lasts.
    pub login_lockout_s: u64,
    /// Seconds relayed sessions may run on after SIGTERM before they are
    /// told goodbye and closed.
    pub drain_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            preauth_timeout_s: DEFAULT_PREAUTH_TIMEOUT_S,
            idle_timeout_s: DEFAULT_IDLE_TIMEOUT_S,
            max_line: DEFAULT_MAX_LINE,
            smtp_sessions_per_mailbox: DEFAULT_SMTP_SESSIONS_PER_MAILBOX,
            imap_sessions_per_mailbox: DEFAULT_IMAP_SESSIONS_PER_MAILBOX,
            pop3_sessions_per_mailbox: DEFAULT_POP3_SESSIONS_PER_MAILBOX,
            mailbox_wait_s: DEFAULT_MAILBOX_WAIT_S,
            imap_mailbox_wait_s: DEFAULT_LONG_SESSION_MAILBOX_WAIT_S,
            pop3_mailbox_wait_s: DEFAULT_LONG_SESSION_MAILBOX_WAIT_S,
            mailbox_queue: DEFAULT_MAILBOX_QUEUE,
            login_delay_ms: DEFAULT_LOGIN_DELAY_MS,
            login_lockout_failures: DEFAULT_LOGIN_LOCKOUT_FAILURES,
            login_lockout_s: DEFAULT_LOGIN_LOCKOUT_S,
            drain_s: DEFAULT_DRAIN_S,
        }
    }
}

impl LimitsConfig {
    pub fn sessions_per_mailbox(&self, p: Protocol) -> usize {
        match p {
            Protocol::Smtp => self.smtp_sessions_per_mailbox,
            Protocol::Imap => self.imap_sessions_per_mailbox,
            Protocol::Pop3 => self.pop3_sessions_per_mailbox,
        }
    }

    /// How long a device of `p` waits for a free upstream session.
    pub fn mailbox_wait(&self, p: Protocol) -> std::time::Duration {
        std::time::Duration::from_secs(match p {
            Protocol::Smtp => self.mailbox_wait_s,
            Protocol::Imap => self.imap_mailbox_wait_s,
            Protocol::Pop3 => self.pop3_mailbox_wait_s,
        })
    }
}
