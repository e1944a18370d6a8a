//! oxbridge: a proxy that lets password-only mail clients use OAuth-only
//! mail servers.
//!
//! # Layout
//!
//! A session travels one way: **server -> device -> login -> upstream ->
//! relay**, and the modules read in that order.
//!
//! * `server`: `oxbridge run`: bind, admin endpoint, reload, accept loop,
//!   one task per session, drain. `listener`: one `[[listener]]`, its rules,
//!   its reloadable TLS acceptor (rustls, or OpenSSL for old devices) and
//!   connection slots.
//! * `net`: bytes in and out, no protocol: streams, the bounded line reader,
//!   TLS towards devices and upstream, the self-signed certificate,
//!   dialling out, the PROXY header.
//! * `wire`: pure protocol code, no I/O: each protocol's commands,
//!   receivers and every reply, worded in one table per protocol; SASL;
//!   the IMAP session as the relay follows it.
//! * `device`: before login: one driver, and per protocol a state machine
//!   that turns a command into a step (reply, start TLS, log in, close);
//!   what a device is called and the refusals it gets (`device::refusal`).
//! * `login`: throttle -> account -> mailbox slot -> token and dial ->
//!   XOAUTH2 -> one retry; `accounts`, `throttle`, `limits` serve it.
//!   `mailbox`: the checked address a device's login becomes, which is all
//!   that goes upstream.
//! * `upstream`: dial, greeting, STARTTLS and XOAUTH2 per protocol; the
//!   SMTP capability cache. It never sees the whole app.
//! * `relay`: after login, bytes both ways until the session ends; IMAP
//!   sessions move to a new upstream login before their token expires.
//! * `app`: what every session shares. `config`: the TOML file and its
//!   validation. `oauth`: where tokens come from; `keepalive` keeps idle
//!   refresh tokens alive. `state`: what is kept (on disk, or in Redis for
//!   several replicas).
//! * `spool`: SMTP store and forward: a spooling listener's dialogue after
//!   login, the on-disk queue, the delivery worker, delivery reports and
//!   `oxbridge queue`.
//! * `error`, `diagnose`: why a login failed, and what to do about it.
//!   `metrics`, `health` (the servers oxbridge depends on, as last seen),
//!   `admin`, `status` (the page at `/`), `autodiscover`, `check`: what
//!   operators see. `preflight`: what `run` will load from this machine,
//!   looked at first by `check` and `run`; `fixes`: the operator's fix
//!   beside each such failure.

mod accounts;
pub mod admin;
mod app;
mod autodiscover;
pub mod check;
pub mod config;
mod device;
mod diagnose;
mod error;
mod fixes;
mod health;
mod keepalive;
mod limits;
mod listener;
mod login;
pub mod mailbox;
mod metrics;
pub mod net;
pub mod oauth;
mod preflight;
mod relay;
mod server;
mod spool;
mod state;
mod status;
mod throttle;
mod upstream;
pub mod wire;

pub use accounts::hash_password;
pub use app::{open_store, StartError};
pub use preflight::{offline as preflight, Preflight};
pub use server::{run, Control};
pub use spool::cli::{run as queue, Action as QueueAction};
pub use state::{Event, State};
