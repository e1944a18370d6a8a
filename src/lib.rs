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
//! * `state`: the backend chosen once (files in `state_dir`, or Redis for
//!   several replicas: tokens, the refresh lease, session slots, failure
//!   counters), sealed by one `state::seal`.
//! * `throttle`: delays and lockouts after failed logins.
//! * `upstream`: dialling the real server.
//! * `proto::smtp`: the device side until login, and the upstream login.
//! * `relay`: after login, bytes both ways until the session ends.
//! * `error`: why a login failed, and the reply each failure earns.
//! * `metrics`: what is counted; `admin`: /healthz, /readyz, /metrics and
//!   Autodiscover over HTTP.
//! * `check`: `oxbridge check`, and what an upstream refusal means for the
//!   administrator (`diagnose`).
//!
//! A session starts in `server::session`, is handled by a protocol's
//! `preauth` until the upstream login succeeds, then ends in `relay::relay`.

pub mod accounts;
pub mod admin;
pub mod autodiscover;
pub mod check;
pub mod config;
pub mod diagnose;
pub mod error;
pub mod limits;
pub mod line;
pub mod metrics;
pub mod oauth;
pub mod proto;
pub mod proxy_protocol;
pub mod relay;
pub mod sasl;
pub mod server;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, Protocol, TlsMode};

/// What every session shares, built once at start-up.
pub struct App {
    /// The configuration read at start. `[[account]]` and `[[relay]]` are
    /// read from `accounts` and `relays` instead, which a reload replaces.
    pub config: Config,
    accounts: ArcSwap<accounts::Accounts>,
    relays: ArcSwap<Vec<config::RelayConfig>>,
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
        let state = Arc::new(state::State::open(&config).map_err(|e| StartError(e.to_string()))?);
        let tokens = oauth::Tokens::new(&config.oauth, &config.protocols(), state.clone())
            .map_err(StartError)?;
        let mailbox_limits = limits::MailboxLimits::new(&config.limits, state.clone());
        let throttle = throttle::Throttle::new(&config.limits, state);
        let upstream_tls = tls::upstream_connector(config.upstream.ca_file.as_deref())
            .map_err(|e| StartError(format!("upstream.ca_file: {e}")))?;
        Ok(App {
            accounts: ArcSwap::from_pointee(accounts::Accounts::new(&config.accounts)),
            relays: ArcSwap::from_pointee(config.relays.clone()),
            tokens,
            upstream_tls,
            smtp_caps: Default::default(),
            mailbox_limits,
            throttle,
            hostname: hostname(),
            config,
        })
    }
}

impl App {
    /// The accounts in force now (a reload may replace them).
    pub fn accounts(&self) -> Arc<accounts::Accounts> {
        self.accounts.load_full()
    }

    /// The `[[relay]]` rule whose networks hold `ip`, if any.
    pub fn relay_rule(&self, ip: std::net::IpAddr) -> Option<config::RelayConfig> {
        let ip = ip.to_canonical();
        self.relays
            .load()
            .iter()
            .find(|r| r.networks().iter().any(|n| n.contains(&ip)))
            .cloned()
    }

    /// Apply a re-read configuration: `[[account]]` and `[[relay]]` take
    /// effect for new logins; sessions under way keep going. Other sections
    /// need a restart: a change there is reported, not applied.
    pub fn reload(&self, new: Config) -> Result<Vec<&'static str>, String> {
        let needs_store = new
            .accounts
            .iter()
            .any(|a| a.grant == config::Grant::RefreshToken);
        if needs_store && !self.tokens.has_store() {
            return Err("the first refresh_token account needs a restart (the token store is opened at start)".into());
        }
        let ignored = self.config.restart_only_changes(&new);
        self.accounts
            .store(Arc::new(accounts::Accounts::new(&new.accounts)));
        self.relays.store(Arc::new(new.relays));
        Ok(ignored)
    }
}

/// The file token store of this config (`state_dir`), whatever its
/// backend: for the tests and tools that read refresh tokens directly.
pub fn open_store(config: &Config) -> Result<state::FileStore, state::StateError> {
    state::FileStore::of(config)
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

/// How the binary steers a running server: `shutdown` stops it, `reload`
/// (SIGHUP) re-reads `config_path`.
pub struct Control {
    pub config_path: PathBuf,
    pub shutdown: CancellationToken,
    pub reload: Arc<Notify>,
}

/// Bind every listener (so that a port in use fails start-up), then serve
/// until `shutdown` is cancelled and the sessions have drained.
pub async fn run(config: Config, control: Control) -> Result<(), StartError> {
    let metrics = match config.admin {
        Some(_) => Some(metrics::install().map_err(StartError)?),
        None => None,
    };
    let app = Arc::new(App::new(config)?);
    let mut bound = Vec::new();
    let mut endpoints = Vec::new();
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
        endpoints.push(autodiscover::Endpoint {
            protocol: l.protocol,
            tls: l.tls,
            port: local.port(),
        });
        bound.push((socket, Arc::new(listener)));
    }
    if let (Some(admin), Some(metrics)) = (&app.config.admin, metrics) {
        let socket = TcpListener::bind(admin.listen)
            .await
            .map_err(|e| StartError(format!("admin.listen: cannot bind {}: {e}", admin.listen)))?;
        let local = socket.local_addr().map_err(|e| StartError(e.to_string()))?;
        info!(address = %local, "admin endpoint listening");
        tokio::spawn(admin::serve(
            socket,
            app.clone(),
            endpoints,
            metrics,
            control.shutdown.clone(),
        ));
    }
    crate::metrics::listeners_bound();
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
    let listeners: Vec<_> = bound.iter().map(|(_, l)| l.clone()).collect();
    tokio::spawn(reloader(
        app.clone(),
        listeners,
        control.config_path,
        control.reload,
    ));
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    server::serve(app, bound, control.shutdown).await;
    Ok(())
}

/// On each reload request: re-read the config file and the listeners'
/// certificates. A file that does not load changes nothing.
async fn reloader(
    app: Arc<App>,
    listeners: Vec<Arc<server::Listener>>,
    path: PathBuf,
    reload: Arc<Notify>,
) {
    loop {
        reload.notified().await;
        notify_systemd(&[sd_notify::NotifyState::Reloading]);
        let ok = reload_once(&app, &listeners, &path);
        crate::metrics::reloaded(ok);
        notify_systemd(&[sd_notify::NotifyState::Ready]);
    }
}

fn reload_once(app: &App, listeners: &[Arc<server::Listener>], path: &std::path::Path) -> bool {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return false;
        }
    };
    let accounts = config.accounts.len();
    let ignored = match app.reload(config) {
        Ok(ignored) => ignored,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return false;
        }
    };
    let mut ok = true;
    for (i, l) in listeners.iter().enumerate() {
        if let Err(e) = l.reload_tls() {
            tracing::error!(listener = i, error = %e, "certificate reload failed; keeping the old certificate");
            ok = false;
        }
    }
    if !ignored.is_empty() {
        warn!(sections = ?ignored, "these changes need a restart; not applied");
    }
    info!(accounts, "configuration reloaded");
    ok
}

/// Tell systemd (`Type=notify`) where we are; a no-op elsewhere.
pub fn notify_systemd(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, state);
}
