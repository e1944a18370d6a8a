//! The end-to-end tier, one test binary: real clients -> oxbridge (the
//! debug binary, run as a process with a generated config) -> the test
//! upstream (Dovecot, Postfix and a small OAuth identity provider on
//! loopback, `tests/upstream/`), with fault injectors in between.
//!
//! Needs root on Debian: the first test starts the test upstream, which
//! installs Dovecot and Postfix if they are missing; the tests also run
//! swaks, curl, fetchmail, python3, openssl, redis-server and strace
//! (`.ci/run` installs them all). The upstream uses fixed ports and
//! `/tmp/oxbridge-upstream`, so run one e2e binary per machine at a time.
//! `tests/README.md` has the commands; `cargo test --test e2e smtp::`
//! runs one area.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod busy_mailbox;
mod continuity;
mod continuity_moves;
mod continuity_reconcile;
mod devices;
mod faults;
mod graph;
mod identity;
mod imap_pop3;
mod matrix;
mod oauth;
mod old_clients;
mod operator_errors;
mod ops;
mod ops_day_one;
mod prelogin_lines;
mod printers;
mod providers;
mod ready;
mod redis;
mod refusals;
mod regression;
mod repair;
mod rewrite_sender;
mod secrets;
mod session_logins;
mod session_senders;
mod smtp;
mod soak;
mod spool;
mod spool_faults;
mod status;
