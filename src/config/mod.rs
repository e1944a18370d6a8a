//! Configuration: the TOML types, their defaults, and
//! [`Config::load`], which reads, parses and validates one file.
//!
//! Owns: the types every other module reads (`crate::config::*`), the
//! default of every key, and where `--config` looks. The checks serde cannot
//! make live in `validate.rs`, one function per section; `[limits]` in
//! `limits.rs`, `[spool]` in `spool.rs`, the clouds' endpoints in
//! `cloud.rs`, and the secrets read from files in `secrets.rs`.
//!
//! Promises: unknown keys and sections are an error (`deny_unknown_fields`);
//! a [`ConfigError`] names the file, the key and what is wrong; secrets
//! (`client_secret`, `password_hash`, a Redis URL) are [`SecretString`]s,
//! so `Debug` of a [`Config`] never prints them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use secrecy::SecretString;
use serde::Deserialize;

mod cloud;
mod limits;
mod listener;
pub(crate) mod networks;
pub mod provider;
mod secrets;
mod spool;
mod validate;

pub use cloud::Cloud;
pub use limits::{
    LimitsConfig, DEFAULT_DRAIN_S, DEFAULT_IDLE_TIMEOUT_S, DEFAULT_IMAP_SESSIONS_PER_MAILBOX,
    DEFAULT_LOGIN_DELAY_MS, DEFAULT_LOGIN_LOCKOUT_FAILURES, DEFAULT_LOGIN_LOCKOUT_S,
    DEFAULT_LONG_SESSION_MAILBOX_WAIT_S, DEFAULT_MAILBOX_QUEUE, DEFAULT_MAILBOX_WAIT_S,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_LINE, DEFAULT_POP3_SESSIONS_PER_MAILBOX,
    DEFAULT_PREAUTH_TIMEOUT_S, DEFAULT_SMTP_SESSIONS_PER_MAILBOX,
};
pub use listener::{ListenerConfig, TlsMode, TlsVersion};
pub use provider::{Provider, ProviderConfig, ProviderKind};
pub use secrets::MIN_ADMIN_TOKEN;
pub use spool::{Delivery, SpoolConfig};

/// Where `--config` looks when neither it nor `$OXBRIDGE_CONFIG` is given.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] = ["./oxbridge.toml", "/etc/oxbridge/oxbridge.toml"];
pub const DEFAULT_STATE_DIR: &str = "/var/lib/oxbridge";
pub const DEFAULT_UPSTREAM_SMTP: &str = "smtp.office365.com:587";
pub const DEFAULT_UPSTREAM_IMAP: &str = "outlook.office365.com:993";
pub const DEFAULT_UPSTREAM_POP3: &str = "outlook.office365.com:995";
/// The `{tenant}` of the endpoints when `oauth.tenant` is not given.
pub const DEFAULT_TENANT: &str = "organizations";
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// The store key's file name in `state_dir` when `store.key_file` is not given.
pub const DEFAULT_STORE_KEY_FILE: &str = "store.key";
/// `max_connections` of one `[[listener]]`.
pub const DEFAULT_LISTENER_MAX_CONNECTIONS: usize = 1000;

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log: LogConfig,
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    pub oauth: OAuthConfig,
    /// More OAuth apps beside `[oauth]`, each with its own upstream.
    #[serde(default, rename = "provider")]
    pub providers: Vec<ProviderConfig>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "account")]
    pub accounts: Vec<AccountConfig>,
    #[serde(default, rename = "relay")]
    pub relays: Vec<RelayConfig>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A file holding the bearer token that `/` and `/metrics` require;
    /// needed when `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
    /// Where a browser reaches this endpoint (`https://host:9090`): the
    /// status page's consent sends the browser back to
    /// `{public_url}/consent/callback`. Unset: the page asks for the
    /// address the browser ended on, as `oxbridge login --paste` does.
    pub public_url: Option<String>,
    /// Read from `token_file` by [`Config::load`].
    #[serde(skip)]
    pub token: Option<SecretString>,
}

impl AdminConfig {
    /// The redirect URI of the status page's consent, with `public_url`.
    pub fn consent_callback(&self) -> Option<String> {
        self.public_url
            .as_ref()
            .map(|u| format!("{}/consent/callback", u.trim_end_matches('/')))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unset: the host of `[oauth] cloud` ([`UpstreamConfig::address`]).
    pub smtp: Option<String>,
    pub imap: Option<String>,
    pub pop3: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// How SMTP mail of `client_credentials` accounts leaves: SMTP, or
    /// Microsoft Graph's sendMail (where SMTP AUTH is off).
    #[serde(default)]
    pub send: SendVia,
    /// Microsoft Graph's address; unset: the cloud's
    /// (`https://graph.microsoft.com/v1.0`).
    pub graph: Option<String>,
    /// Copied from `[oauth] cloud` when the config is parsed.
    #[serde(skip)]
    pub cloud: Cloud,
}

/// The way an account's SMTP mail reaches Exchange Online.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendVia {
    #[default]
    Smtp,
    /// `POST /users/{mailbox}/sendMail` with an app-only Graph token.
    Graph,
}

impl UpstreamConfig {
    /// Microsoft Graph's base URL.
    pub fn graph_url(&self) -> String {
        self.graph
            .clone()
            .unwrap_or_else(|| format!("{}/v1.0", self.cloud.graph_resource()))
    }

    /// The `host:port` of `protocol`'s server: as configured, else the
    /// cloud's.
    pub fn address(&self, protocol: Protocol) -> &str {
        let set = match protocol {
            Protocol::Smtp => &self.smtp,
            Protocol::Imap => &self.imap,
            Protocol::Pop3 => &self.pop3,
        };
        set.as_deref()
            .unwrap_or_else(|| self.cloud.upstream(protocol))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    pub tenant: Option<String>,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub client_secret_file: Option<PathBuf>,
    /// PEM with a certificate and its private key: `client_credentials`
    /// authenticates with a signed JWT client assertion instead of a secret.
    pub client_certificate_file: Option<PathBuf>,
    pub token_url: Option<String>,
    pub device_code_url: Option<String>,
    pub authorize_url: Option<String>,
    /// Sets the authority, the scopes' resource and the upstream hosts.
    #[serde(default)]
    pub cloud: Cloud,
    /// IMAP and POP3 logins get a token with at least this long left (or
    /// three quarters of its lifetime, for tokens that live shorter):
    /// their sessions last hours, SMTP's seconds.
    #[serde(default = "default_session_token_left_s")]
    pub session_token_left_s: u64,
    /// SMTP logins get a token with at least this long left (or three
    /// quarters of its lifetime): Microsoft's High Volume Email refuses
    /// tokens about to expire (`5.5.127 Token will expire soon`).
    #[serde(default = "default_smtp_token_left_s")]
    pub smtp_token_left_s: u64,
    /// Each `refresh_token` account's refresh token is exchanged at least
    /// this often (jittered), so that Entra's inactivity limit (90 days)
    /// never ends it while its device is idle; 0 turns it off.
    #[serde(default = "default_refresh_keepalive_s")]
    pub refresh_keepalive_s: u64,
}

pub const DEFAULT_REFRESH_KEEPALIVE_S: u64 = 7 * 24 * 3600;

fn default_refresh_keepalive_s() -> u64 {
    DEFAULT_REFRESH_KEEPALIVE_S
}

pub const DEFAULT_SESSION_TOKEN_LEFT_S: u64 = 2700;

pub const DEFAULT_SMTP_TOKEN_LEFT_S: u64 = 600;

fn default_smtp_token_left_s() -> u64 {
    DEFAULT_SMTP_TOKEN_LEFT_S
}

fn default_session_token_left_s() -> u64 {
    DEFAULT_SESSION_TOKEN_LEFT_S
}

impl OAuthConfig {
    /// An endpoint: as configured, else the cloud's authority's; with
    /// `{tenant}` filled in.
    fn endpoint(&self, explicit: &Option<String>, name: &str) -> String {
        let template = match explicit {
            Some(url) => url.clone(),
            None => self.cloud.endpoint("{tenant}", name),
        };
        template.replace("{tenant}", self.tenant.as_deref().unwrap_or(DEFAULT_TENANT))
    }

    /// The token endpoint, with `{tenant}` filled in.
    pub fn token_url(&self) -> String {
        self.endpoint(&self.token_url, "token")
    }

    pub fn device_code_url(&self) -> String {
        self.endpoint(&self.device_code_url, "devicecode")
    }

    pub fn authorize_url(&self) -> String {
        self.endpoint(&self.authorize_url, "authorize")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A network (`10.0.0.0/24`) or one address (`10.0.0.5`, `2001:db8::5`).
pub fn parse_network(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    ClientCredentials,
    RefreshToken,
    Password,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken => "refresh_token",
            Grant::Password => "password",
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub login: String,
    pub password_hash: Option<SecretString>,
    pub grant: Grant,
    pub mailbox: Option<String>,
    /// Shared mailboxes this account may open with the device login form
    /// `login\shared@domain` (exact addresses or `*@domain`).
    #[serde(default)]
    pub allow_shared: Vec<String>,
    /// How this account's SMTP mail leaves; default `[upstream] send`
    /// for `client_credentials` accounts, else SMTP.
    pub send: Option<SendVia>,
    /// Envelope senders this account's SMTP sessions may use, spooled or
    /// relayed (exact or `*@domain`; the null sender never, once set);
    /// empty: any, and the upstream decides.
    #[serde(default)]
    pub allowed_senders: Vec<String>,
    /// Devices with a fixed sender: MAIL FROM and the `From:` header
    /// become the mailbox, the device's address goes to `Reply-To:`.
    #[serde(default)]
    pub rewrite_sender: bool,
    /// The protocols a login of this account may use; unset: every one.
    /// A printer that only sends gets `["smtp"]`, so that its password
    /// (often readable on its own web page) opens no mailbox.
    pub protocols: Option<Vec<Protocol>>,
    /// The `[[provider]]` its tokens come from; unset: `[oauth]`.
    pub provider: Option<String>,
}

impl AccountConfig {
    /// Whether a login of this account may use `protocol`.
    pub fn allows(&self, protocol: Protocol) -> bool {
        self.protocols
            .as_ref()
            .map_or(true, |list| list.contains(&protocol))
    }
}

/// `protocols` as the config writes it: `["smtp", "imap"]`.
pub fn protocols_text(protocols: &[Protocol]) -> String {
    let names: Vec<String> = protocols
        .iter()
        .map(|p| format!("{:?}", p.as_str()))
        .collect();
    format!("[{}]", names.join(", "))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub from_networks: Vec<String>,
    pub account: String,
    /// Envelope senders allowed (exact or `*@domain`); empty: any.
    #[serde(default)]
    pub allowed_senders: Vec<String>,
    /// `from_networks` may hold public addresses (see [`networks`]);
    /// without it such a rule is refused at load: an open relay by typo.
    #[serde(default)]
    pub allow_public_networks: bool,
}

impl RelayConfig {
    /// The networks, parsed (validated at load).
    pub fn networks(&self) -> Vec<IpNet> {
        self.from_networks
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: StoreBackend,
    /// With `backend = "redis"`: `redis://[user:password@]host:port[/db]`,
    /// or `rediss://` for TLS (verified against the system roots).
    pub url: Option<SecretString>,
    /// With `backend = "redis"`: what every key oxbridge writes starts with
    /// (default `oxbridge:`), so that several deployments can share a Redis.
    pub key_prefix: Option<String>,
    /// The store's encryption key (32 raw bytes); default `state_dir/store.key`,
    /// created on first use.
    pub key_file: Option<PathBuf>,
    /// Or: the name of an environment variable holding the key in base64.
    pub key_env: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    File,
    Redis,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.into()
}

/// Which file `--config` means: the flag, then `$OXBRIDGE_CONFIG` (clap
/// fills the flag from it), then the first of [`DEFAULT_CONFIG_PATHS`] that
/// exists (the last one if none does, so the error names it).
pub fn resolve_path(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    DEFAULT_CONFIG_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATHS[DEFAULT_CONFIG_PATHS.len() - 1]))
}

impl Config {
    /// Where the token store's key comes from.
    pub fn store_key_file(&self) -> PathBuf {
        self.store
            .key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join(DEFAULT_STORE_KEY_FILE))
    }

    /// Whether any SMTP listener spools (the delivery worker runs).
    pub fn spools(&self) -> bool {
        self.listeners.iter().any(|l| l.delivery == Delivery::Spool)
    }

    /// The protocols that have listeners (what delegated tokens are asked for).
    pub fn protocols(&self) -> Vec<Protocol> {
        let mut p: Vec<Protocol> = self.listeners.iter().map(|l| l.protocol).collect();
        p.sort_by_key(|p| *p as u8);
        p.dedup();
        p
    }

    /// The sections that differ in `new` but take effect only at start
    /// (everything but `[[account]]` and `[[relay]]`). Secrets compare by
    /// their redacted form: a changed client secret is not seen here.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        fn differs<T: fmt::Debug>(a: &T, b: &T) -> bool {
            format!("{a:?}") != format!("{b:?}")
        }
        let mut changed = Vec::new();
        let sections: [(&'static str, bool); 10] = [
            ("state_dir", self.state_dir != new.state_dir),
            ("log", differs(&self.log, &new.log)),
            ("admin", differs(&self.admin, &new.admin)),
            ("upstream", differs(&self.upstream, &new.upstream)),
            ("oauth", differs(&self.oauth, &new.oauth)),
            ("provider", differs(&self.providers, &new.providers)),
            ("listener", differs(&self.listeners, &new.listeners)),
            ("store", differs(&self.store, &new.store)),
            ("limits", differs(&self.limits, &new.limits)),
            ("spool", differs(&self.spool, &new.spool)),
        ];
        for (name, d) in sections {
            if d {
                changed.push(name);
            }
        }
        changed
    }

    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError {
            file: path.display().to_string(),
            message,
        })?;
        config.load_secret_files().map_err(|message| ConfigError {
            file: path.display().to_string(),
            message,
        })?;
        Ok(config)
    }

    /// Parse and validate TOML text; the error names the key.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        config.upstream.cloud = config.oauth.cloud;
        config.validate()?;
        Ok(config)
    }

    /// The checks serde cannot make (`validate.rs`, one function per
    /// section). Each error starts with the key.
    pub fn validate(&self) -> Result<(), String> {
        validate::validate(self)
    }
}

/// Split `host:port` (`[v6]:port` too) into its parts.
pub fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} must be host:port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("{addr:?} has no host"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{addr:?} has no valid port"))?;
    Ok((host, port))
}

#[cfg(test)]
mod tests;
