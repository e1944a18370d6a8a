//! What every session shares, built once at start-up: the configuration,
//! the accounts and relay rules (which a reload replaces), the token cache,
//! the upstream dialer, the per-mailbox limits and the login throttle.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::accounts::Accounts;
use crate::config::{Config, Grant, Provider, RelayConfig};
use crate::spool::Spool;
use crate::state::{FileStore, State, StateError};
use crate::upstream::graph::Graph;
use crate::upstream::Dialer;
use crate::{limits, oauth, throttle};

/// What every session shares, built once at start-up.
pub struct App {
    /// The configuration read at start. `[[account]]` and `[[relay]]` are
    /// read from `accounts` and `relays` instead, which a reload replaces.
    pub config: Config,
    accounts: ArcSwap<Accounts>,
    relays: ArcSwap<Vec<RelayConfig>>,
    pub tokens: oauth::Tokens,
    /// `[oauth]` and the `[[provider]]`s, resolved once.
    pub providers: Vec<Arc<Provider>>,
    /// How the upstream servers are reached.
    pub dialer: Dialer,
    pub mailbox_limits: limits::MailboxLimits,
    pub throttle: throttle::Throttle,
    /// The name oxbridge gives itself in greetings.
    pub hostname: String,
    /// The SMTP spool, when a listener has `delivery = "spool"`.
    pub spool: Option<Arc<Spool>>,
    /// Microsoft Graph, for accounts whose mail leaves that way.
    pub graph: Graph,
    /// Where tokens and shared counters live (readiness pings it).
    pub state: Arc<State>,
}

/// A start-up failure: the message names what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

impl App {
    pub fn new(config: Config) -> Result<App, StartError> {
        // The one place where the backend (files or Redis) is chosen.
        let state = Arc::new(State::open(&config).map_err(|e| StartError(e.to_string()))?);
        let providers = config.providers();
        let tokens = oauth::Tokens::new(&providers, &config, state.clone()).map_err(StartError)?;
        let mailbox_limits = limits::MailboxLimits::new(&config.limits, state.clone());
        let throttle = throttle::Throttle::new(&config.limits, state.clone());
        // Devices see an SMTP server's EHLO before they log in: that of the
        // first account that may send, whatever its provider.
        let sender = config
            .accounts
            .iter()
            .find(|a| a.allows(crate::config::Protocol::Smtp))
            .and_then(|a| crate::config::provider::find(&providers, a.provider.as_deref()));
        let dialer =
            Dialer::new(&config.upstream, sender.unwrap_or(&providers[0])).map_err(StartError)?;
        let spool = match config.spools() {
            true => Some(Arc::new(Spool::open(&config).map_err(|e| {
                StartError(config.spool.open_error(&config.state_dir, &e))
            })?)),
            false => None,
        };
        let graph = Graph::new(
            &config.upstream.graph_url(),
            config.upstream.ca_file.as_deref(),
        )
        .map_err(StartError)?;
        Ok(App {
            spool,
            graph,
            state,
            accounts: ArcSwap::from_pointee(Accounts::new(
                config.upstream.send,
                &config.accounts,
                &providers,
            )),
            providers,
            relays: ArcSwap::from_pointee(config.relays.clone()),
            tokens,
            dialer,
            mailbox_limits,
            throttle,
            hostname: hostname(),
            config,
        })
    }
}

impl App {
    /// The accounts in force now (a reload may replace them).
    pub fn accounts(&self) -> Arc<Accounts> {
        self.accounts.load_full()
    }

    /// The `host:port` of `protocol`'s server for `account` (a configured
    /// login): its provider's, else `[oauth]`'s.
    pub fn upstream_of(&self, account: &str, protocol: crate::config::Protocol) -> String {
        self.provider_of(account).address(protocol).to_string()
    }

    /// The provider of `account` (a configured login): its own, else
    /// `[oauth]`'s.
    pub fn provider_of(&self, account: &str) -> Arc<Provider> {
        self.accounts()
            .provider_of(account)
            .unwrap_or_else(|| self.providers[0].clone())
    }

    /// The `[[relay]]` rule whose networks hold `ip`, if any.
    pub fn relay_rule(&self, ip: std::net::IpAddr) -> Option<RelayConfig> {
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
        let needs_store = new.accounts.iter().any(|a| a.grant == Grant::RefreshToken);
        if needs_store && !self.tokens.has_store() {
            return Err("the first refresh_token account needs a restart (the token store is opened at start)".into());
        }
        if format!("{:?}", self.config.providers) != format!("{:?}", new.providers) {
            return Err("[[provider]] changed: providers are read at start, restart to apply it (nothing was reloaded)".into());
        }
        Accounts::unknown_provider(&new.accounts, &self.providers)?;
        let ignored = self.config.restart_only_changes(&new);
        self.accounts.store(Arc::new(Accounts::new(
            new.upstream.send,
            &new.accounts,
            &self.providers,
        )));
        self.relays.store(Arc::new(new.relays));
        Ok(ignored)
    }
}

/// The file token store of this config (`state_dir`), whatever its
/// backend: for the tests and tools that read refresh tokens directly.
pub fn open_store(config: &Config) -> Result<FileStore, StateError> {
    FileStore::of(config)
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
