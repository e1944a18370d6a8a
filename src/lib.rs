//! oxbridge: a proxy that lets password-only mail clients use OAuth-only
//! mail servers.
//!
//! # Layout
//!
//! * `config`: the TOML file, defaults and validation (errors name the key).
//! * `server`: listeners, the accept loop, one task per session, drain.
//! * `proxy_protocol`: the PROXY v1/v2 header from a load balancer.
//! * `limits`: upstream sessions per mailbox, with a bounded wait.
//! * `line`: where bytes enter: plain/TLS streams and a bounded line reader.
//! * `tls`: local TLS from PEM files; the one verified upstream client config.
//! * `sasl`: PLAIN/LOGIN decoding, XOAUTH2 encoding.
//! * `accounts`: local login -> account; Argon2id verification.
//! * `oauth`: where a token comes from: grants, the single-flight cache,
//!   consent (`oxbridge login`), certificate assertions.
//! * `store`: refresh tokens on disk, encrypted, written atomically.
//! * `throttle`: delays and lockouts after failed logins.
//! * `upstream`: dialling the real server.
//! * `proto::smtp`: the device side until login, and the upstream login.
//! * `relay`: after login, bytes both ways until the session ends.
//! * `error`: why a login failed, and the reply each failure earns.
//!
//! A session starts in `server::session`, is handled by a protocol's
//! `preauth` until the upstream login succeeds, then ends in `relay::relay`.

pub mod accounts;
pub mod config;
pub mod error;
pub mod limits;
pub mod line;
pub mod oauth;
pub mod proto;
pub mod proxy_protocol;
pub mod relay;
pub mod sasl;
pub mod server;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, Protocol, TlsMode};

/// What every session shares, built once at start-up.
pub struct App {
    pub config: Config,
    pub accounts: accounts::Accounts,
    pub tokens: oauth::Tokens,
    pub upstream_tls: TlsConnector,
    pub smtp_caps: proto::smtp::CapsCache,
    pub mailbox_limits: limits::MailboxLimits,
    pub throttle: throttle::Throttle,
    /// The name oxbridge gives itself in greetings.
    pub hostname: String,
}

/// A start-up failure: the message names what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

impl App {
    pub fn new(config: Config) -> Result<App, StartError> {
        let store = if config
            .accounts
            .iter()
            .any(|a| a.grant == config::Grant::RefreshToken)
        {
            Some(Arc::new(
                open_store(&config).map_err(|e| StartError(e.to_string()))?,
            ))
        } else {
            None
        };
        let tokens =
            oauth::Tokens::new(&config.oauth, &config.protocols(), store).map_err(StartError)?;
        let upstream_tls = tls::upstream_connector(config.upstream.ca_file.as_deref())
            .map_err(|e| StartError(format!("upstream.ca_file: {e}")))?;
        Ok(App {
            accounts: accounts::Accounts::new(&config.accounts),
            tokens,
            upstream_tls,
            smtp_caps: Default::default(),
            mailbox_limits: limits::MailboxLimits::new(&config.limits),
            throttle: throttle::Throttle::new(&config.limits),
            hostname: hostname(),
            config,
        })
    }
}

impl App {
    /// The `[[relay]]` rule whose networks hold `ip`, if any.
    pub fn relay_rule(&self, ip: std::net::IpAddr) -> Option<&config::RelayConfig> {
        let ip = ip.to_canonical();
        self.config
            .relays
            .iter()
            .find(|r| r.networks().iter().any(|n| n.contains(&ip)))
    }
}

/// The token store of this config.
pub fn open_store(config: &Config) -> Result<store::Store, store::StoreError> {
    let key_file = config.store_key_file();
    let key = match &config.store.key_env {
        Some(var) => store::KeySource::Env(var),
        None => store::KeySource::File(&key_file),
    };
    store::Store::open(&config.state_dir, key)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        })
        .unwrap_or_else(|| "oxbridge".into())
}

/// Bind every listener (so that a port in use fails start-up), then serve
/// until `shutdown` is cancelled and the sessions have drained.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let app = Arc::new(App::new(config)?);
    let mut bound = Vec::new();
    for (i, l) in app.config.listeners.iter().enumerate() {
        let listener =
            server::Listener::new(l).map_err(|e| StartError(format!("listener[{i}]: {e}")))?;
        let socket = TcpListener::bind(l.listen).await.map_err(|e| {
            StartError(format!(
                "listener[{i}].listen: cannot bind {}: {e}",
                l.listen
            ))
        })?;
        let local = socket.local_addr().map_err(|e| StartError(e.to_string()))?;
        if l.tls == TlsMode::None && l.allow_plaintext_auth && !local.ip().is_loopback() {
            warn!(listener = i, address = %local, "passwords are accepted without TLS on a non-loopback address");
        }
        info!(listener = i, protocol = %l.protocol, address = %local, tls = ?l.tls, "listening");
        bound.push((socket, listener));
    }
    if app.config.admin.is_some() {
        warn!("[admin] is configured but this version does not serve it yet");
    }
    if app
        .config
        .listeners
        .iter()
        .any(|l| l.protocol == Protocol::Smtp)
    {
        let probe_app = app.clone();
        tokio::spawn(async move {
            // Learn the upstream's EHLO ahead of the first device.
            let _ = probe_app.smtp_caps.get(&probe_app).await;
        });
    }
    server::serve(app, bound, shutdown).await;
    Ok(())
}
