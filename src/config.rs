//! Configuration: the TOML types of `DESIGN.md`, their defaults, and
//! `validate()`, which checks what serde cannot and names the key at fault.
//!
//! Unknown keys are an error (`deny_unknown_fields`). Secrets
//! (`client_secret`, `password_hash`) are [`SecretString`]s, so `Debug` of
//! a [`Config`] never prints them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Where `--config` looks when neither it nor `$OXBRIDGE_CONFIG` is given.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] = ["./oxbridge.toml", "/etc/oxbridge/oxbridge.toml"];
pub const DEFAULT_STATE_DIR: &str = "/var/lib/oxbridge";
pub const DEFAULT_UPSTREAM_SMTP: &str = "smtp.office365.com:587";
pub const DEFAULT_UPSTREAM_IMAP: &str = "outlook.office365.com:993";
pub const DEFAULT_UPSTREAM_POP3: &str = "outlook.office365.com:995";
pub const DEFAULT_TOKEN_URL: &str = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token";
pub const DEFAULT_DEVICE_CODE_URL: &str =
    "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode";
pub const DEFAULT_AUTHORIZE_URL: &str =
    "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize";

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default = "default_smtp")]
    pub smtp: String,
    #[serde(default = "default_imap")]
    pub imap: String,
    #[serde(default = "default_pop3")]
    pub pop3: String,
    pub ca_file: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            smtp: default_smtp(),
            imap: default_imap(),
            pop3: default_pop3(),
            ca_file: None,
        }
    }
}

impl UpstreamConfig {
    pub fn address(&self, protocol: Protocol) -> &str {
        match protocol {
            Protocol::Smtp => &self.smtp,
            Protocol::Imap => &self.imap,
            Protocol::Pop3 => &self.pop3,
        }
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
}

impl OAuthConfig {
    fn endpoint(&self, explicit: &Option<String>, default: &str) -> String {
        let template = explicit.as_deref().unwrap_or(default);
        template.replace(
            "{tenant}",
            self.tenant.as_deref().unwrap_or("organizations"),
        )
    }

    /// The token endpoint, with `{tenant}` filled in.
    pub fn token_url(&self) -> String {
        self.endpoint(&self.token_url, DEFAULT_TOKEN_URL)
    }

    pub fn device_code_url(&self) -> String {
        self.endpoint(&self.device_code_url, DEFAULT_DEVICE_CODE_URL)
    }

    pub fn authorize_url(&self) -> String {
        self.endpoint(&self.authorize_url, DEFAULT_AUTHORIZE_URL)
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    pub listen: SocketAddr,
    pub tls: TlsMode,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Connections this listener serves at once.
    #[serde(default = "default_listener_connections")]
    pub max_connections: usize,
}

fn default_listener_connections() -> usize {
    1000
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub from_networks: Vec<String>,
    pub account: String,
    /// Envelope senders allowed (exact or `*@domain`); empty: any.
    #[serde(default)]
    pub allowed_senders: Vec<String>,
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
    /// Seconds a device waits for a free upstream session before `421 4.3.2`.
    pub mailbox_wait_s: u64,
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
            max_connections: 2000,
            preauth_timeout_s: 300,
            idle_timeout_s: 31 * 60,
            max_line: 4096,
            smtp_sessions_per_mailbox: 3,
            imap_sessions_per_mailbox: 20,
            pop3_sessions_per_mailbox: 20,
            mailbox_wait_s: 120,
            mailbox_queue: 100,
            login_delay_ms: 250,
            login_lockout_failures: 10,
            login_lockout_s: 900,
            drain_s: 30,
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
    "info".into()
}
fn default_smtp() -> String {
    DEFAULT_UPSTREAM_SMTP.into()
}
fn default_imap() -> String {
    DEFAULT_UPSTREAM_IMAP.into()
}
fn default_pop3() -> String {
    DEFAULT_UPSTREAM_POP3.into()
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
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATHS[1]))
}

impl Config {
    /// Where the token store's key comes from.
    pub fn store_key_file(&self) -> PathBuf {
        self.store
            .key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("store.key"))
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
        let sections: [(&'static str, bool); 8] = [
            ("state_dir", self.state_dir != new.state_dir),
            ("log", differs(&self.log, &new.log)),
            ("admin", differs(&self.admin, &new.admin)),
            ("upstream", differs(&self.upstream, &new.upstream)),
            ("oauth", differs(&self.oauth, &new.oauth)),
            ("listener", differs(&self.listeners, &new.listeners)),
            ("store", differs(&self.store, &new.store)),
            ("limits", differs(&self.limits, &new.limits)),
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
        let config: Config = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn load_secret_files(&mut self) -> Result<(), String> {
        if let Some(path) = &self.oauth.client_secret_file {
            let secret = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "oauth.client_secret_file: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(format!(
                    "oauth.client_secret_file: {} is empty",
                    path.display()
                ));
            }
            self.oauth.client_secret = Some(SecretString::from(secret.to_string()));
        }
        Ok(())
    }

    /// The checks serde cannot make. Each error starts with the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.oauth.client_id.trim().is_empty() {
            return Err("oauth.client_id: must not be empty".into());
        }
        if self.oauth.client_secret.is_some() && self.oauth.client_secret_file.is_some() {
            return Err(
                "oauth.client_secret: give client_secret or client_secret_file, not both".into(),
            );
        }
        for (key, url) in [
            ("oauth.token_url", self.oauth.token_url()),
            ("oauth.device_code_url", self.oauth.device_code_url()),
            ("oauth.authorize_url", self.oauth.authorize_url()),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(format!(
                    "{key}: must be an http:// or https:// URL, got {url:?}"
                ));
            }
        }
        for (key, addr) in [
            ("upstream.smtp", &self.upstream.smtp),
            ("upstream.imap", &self.upstream.imap),
            ("upstream.pop3", &self.upstream.pop3),
        ] {
            split_host_port(addr).map_err(|e| format!("{key}: {e}"))?;
        }
        if let Some(cert) = &self.oauth.client_certificate_file {
            if !cert.is_file() {
                return Err(format!(
                    "oauth.client_certificate_file: {} is not a readable file",
                    cert.display()
                ));
            }
        }
        if self.store.key_file.is_some() && self.store.key_env.is_some() {
            return Err("store.key_env: give key_file or key_env, not both".into());
        }
        if let Some(ca) = &self.upstream.ca_file {
            if !ca.is_file() {
                return Err(format!(
                    "upstream.ca_file: {} is not a readable file",
                    ca.display()
                ));
            }
        }
        if !matches!(
            self.log.level.to_ascii_lowercase().as_str(),
            "error" | "warn" | "info" | "debug" | "trace" | "off"
        ) {
            return Err(format!(
                "log.level: must be one of error, warn, info, debug, trace, off; got {:?}",
                self.log.level
            ));
        }
        if self.listeners.is_empty() {
            return Err("listener: at least one [[listener]] is needed".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listener[{i}]");
            if l.tls != TlsMode::None {
                for (name, value) in [("cert_file", &l.cert_file), ("key_file", &l.key_file)] {
                    match value {
                        None => {
                            return Err(format!(
                                "{key}.{name}: required when tls = \"{}\"",
                                tls_name(l.tls)
                            ))
                        }
                        Some(p) if !p.is_file() => {
                            return Err(format!(
                                "{key}.{name}: {} is not a readable file",
                                p.display()
                            ))
                        }
                        _ => {}
                    }
                }
            }
            if l.max_connections == 0 {
                return Err(format!("{key}.max_connections: must be at least 1"));
            }
            for (j, other) in self.listeners.iter().enumerate().take(i) {
                if other.listen == l.listen && l.listen.port() != 0 {
                    return Err(format!(
                        "{key}.listen: {} is already used by listener[{j}]",
                        l.listen
                    ));
                }
            }
        }
        if self.accounts.is_empty() {
            return Err("account: at least one [[account]] is needed".into());
        }
        for (i, a) in self.accounts.iter().enumerate() {
            let key = format!("account[{i}]");
            validate_login_pattern(&a.login).map_err(|e| format!("{key}.login: {e}"))?;
            match (a.grant, &a.password_hash) {
                (Grant::Password, Some(_)) => {
                    return Err(format!(
                        "{key}.password_hash: not used with grant = \"password\" (the device's password is checked by the token endpoint); remove it"
                    ))
                }
                (Grant::ClientCredentials | Grant::RefreshToken, None) => {
                    return Err(format!(
                        "{key}.password_hash: required with grant = \"{}\" (make one with `oxbridge hash-password`)",
                        a.grant
                    ))
                }
                (_, Some(hash)) => {
                    argon2::PasswordHash::new(hash.expose_secret()).map_err(|e| {
                        format!("{key}.password_hash: not a PHC string from `oxbridge hash-password` ({e})")
                    })?;
                }
                _ => {}
            }
            if a.grant == Grant::ClientCredentials
                && self.oauth.client_secret.is_none()
                && self.oauth.client_secret_file.is_none()
                && self.oauth.client_certificate_file.is_none()
            {
                return Err(format!(
                    "{key}.grant: client_credentials needs oauth.client_secret, oauth.client_secret_file or oauth.client_certificate_file"
                ));
            }
            if a.grant == Grant::RefreshToken && a.login.starts_with("*@") {
                return Err(format!(
                    "{key}.grant: refresh_token needs one consenting user per account; a *@domain login cannot have one"
                ));
            }
            for shared in &a.allow_shared {
                let addr = shared.strip_prefix("*@").map(|d| format!("x@{d}"));
                validate_address(addr.as_deref().unwrap_or(shared))
                    .map_err(|e| format!("{key}.allow_shared: {e}"))?;
            }
            if !a.allow_shared.is_empty() && a.login.contains('\\') {
                return Err(format!("{key}.login: must not contain a backslash"));
            }
            if let Some(m) = &a.mailbox {
                if a.login.starts_with("*@") {
                    return Err(format!("{key}.mailbox: cannot be set on a pattern login (each user is its own mailbox)"));
                }
                validate_address(m).map_err(|e| format!("{key}.mailbox: {e}"))?;
            }
            for (j, other) in self.accounts.iter().enumerate().take(i) {
                if other.login.eq_ignore_ascii_case(&a.login) {
                    return Err(format!(
                        "{key}.login: {:?} is already account[{j}]",
                        a.login
                    ));
                }
            }
        }
        for (i, r) in self.relays.iter().enumerate() {
            let key = format!("relay[{i}]");
            for n in &r.from_networks {
                n.parse::<IpNet>().map_err(|_| {
                    format!("{key}.from_networks: {n:?} is not a network like 192.168.10.0/24")
                })?;
            }
            if !self
                .accounts
                .iter()
                .any(|a| a.login.eq_ignore_ascii_case(&r.account))
            {
                return Err(format!(
                    "{key}.account: no [[account]] has login {:?}",
                    r.account
                ));
            }
        }
        for (i, r) in self.relays.iter().enumerate() {
            let key = format!("relay[{i}]");
            if r.from_networks.is_empty() {
                return Err(format!("{key}.from_networks: list at least one network"));
            }
            let account = self
                .accounts
                .iter()
                .find(|a| a.login.eq_ignore_ascii_case(&r.account));
            if account.is_some_and(|a| a.grant == Grant::Password || a.login.starts_with("*@")) {
                return Err(format!(
                    "{key}.account: must be an exact login with grant client_credentials or refresh_token (no password to exchange)"
                ));
            }
            for sender in &r.allowed_senders {
                let addr = sender.strip_prefix("*@").map(|d| format!("x@{d}"));
                validate_address(addr.as_deref().unwrap_or(sender))
                    .map_err(|e| format!("{key}.allowed_senders: {e}"))?;
            }
        }
        if !self.listeners.iter().any(|l| l.protocol == Protocol::Smtp) && !self.relays.is_empty() {
            return Err("relay[0]: relaying needs an SMTP [[listener]]".into());
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_connections", l.max_connections),
            ("limits.preauth_timeout_s", l.preauth_timeout_s as usize),
            ("limits.idle_timeout_s", l.idle_timeout_s as usize),
            (
                "limits.smtp_sessions_per_mailbox",
                l.smtp_sessions_per_mailbox,
            ),
            (
                "limits.imap_sessions_per_mailbox",
                l.imap_sessions_per_mailbox,
            ),
            (
                "limits.pop3_sessions_per_mailbox",
                l.pop3_sessions_per_mailbox,
            ),
            (
                "limits.login_lockout_failures",
                l.login_lockout_failures as usize,
            ),
        ] {
            if value == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if l.max_line < 512 {
            return Err("limits.max_line: must be at least 512 (RFC 5321's command line)".into());
        }
        match (self.store.backend, &self.store.url) {
            (StoreBackend::Redis, None) => return Err(
                "store.url: needed with backend = \"redis\" (redis://host:6379 or rediss://...)"
                    .into(),
            ),
            (StoreBackend::Redis, Some(url)) => {
                let url = url.expose_secret();
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err("store.url: must start with redis:// or rediss://".into());
                }
                // The parser's message may quote the URL: never print it.
                if redis::Client::open(url).is_err() {
                    return Err(
                        "store.url: not a valid Redis URL (redis://[user:password@]host:port[/db])"
                            .into(),
                    );
                }
                if self.store.key_file.is_none() && self.store.key_env.is_none() {
                    return Err("store.key_file: with backend = \"redis\" give key_file or key_env explicitly: every replica needs the same key".into());
                }
                if self
                    .store
                    .key_prefix
                    .as_deref()
                    .is_some_and(|p| p.len() > 64)
                {
                    return Err("store.key_prefix: at most 64 characters".into());
                }
            }
            (StoreBackend::File, Some(_)) => {
                return Err("store.url: only used with backend = \"redis\"".into());
            }
            (StoreBackend::File, None) => {
                if self.store.key_prefix.is_some() {
                    return Err("store.key_prefix: only used with backend = \"redis\"".into());
                }
            }
        }
        Ok(())
    }
}

fn tls_name(t: TlsMode) -> &'static str {
    match t {
        TlsMode::None => "none",
        TlsMode::Starttls => "starttls",
        TlsMode::Implicit => "implicit",
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

fn validate_login_pattern(login: &str) -> Result<(), String> {
    if let Some(domain) = login.strip_prefix("*@") {
        if domain.is_empty() || domain.contains(['@', '*']) {
            return Err(format!("{login:?}: a pattern must be *@domain"));
        }
        return Ok(());
    }
    if login.contains('*') {
        return Err(format!("{login:?}: only the form *@domain may use *"));
    }
    if login.is_empty() || login.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{login:?}: must be a non-empty name without spaces"
        ));
    }
    Ok(())
}

fn validate_address(addr: &str) -> Result<(), String> {
    match addr.split_once('@') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() && !addr.contains(char::is_whitespace) => {
            Ok(())
        }
        _ => Err(format!("{addr:?} is not a mail address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$SGsYHx3A0b4qK9nWwGGXkRkz0bTjv1z7EJn0P4sPjgA";

    fn base(extra: &str) -> String {
        format!(
            r#"
[oauth]
client_id = "id"
client_secret = "s3cret-value"
token_url = "http://127.0.0.1:1/token"

[[listener]]
protocol = "smtp"
listen = "127.0.0.1:2525"
tls = "none"
allow_plaintext_auth = true

[[account]]
login = "scanner@example.test"
password_hash = "{HASH}"
grant = "client_credentials"
{extra}
"#
        )
    }

    #[test]
    fn redis_store_needs_a_url_and_an_explicit_key() {
        let store = |body: &str| Config::parse(&base(&format!("\n[store]\n{body}")));
        let ok = store(
            "backend = \"redis\"\nurl = \"rediss://:pw-marker@redis.internal:6380/2\"\nkey_env = \"K\"\nkey_prefix = \"ox1:\"",
        )
        .unwrap();
        assert_eq!(ok.store.backend, StoreBackend::Redis);
        assert!(!format!("{:?}", ok.store).contains("pw-marker"));
        for (body, key) in [
            ("backend = \"redis\"\nkey_env = \"K\"", "store.url: needed"),
            (
                "backend = \"redis\"\nurl = \"http://x\"\nkey_env = \"K\"",
                "store.url: must start with",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://x:6379\"",
                "store.key_file: with backend = \"redis\"",
            ),
            ("url = \"redis://x:6379\"", "store.url: only used"),
            ("key_prefix = \"a:\"", "store.key_prefix: only used"),
        ] {
            let err = store(body).unwrap_err().to_string();
            assert!(err.contains(key), "{body}: {err}");
            assert!(!err.contains("pw-marker"));
        }
        let err =
            store("backend = \"redis\"\nurl = \"redis://:pw-marker@x:notaport\"\nkey_env = \"K\"")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("store.url") && !err.contains("pw-marker"),
            "{err}"
        );
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(&base("")).unwrap();
        assert_eq!(c.upstream.smtp, DEFAULT_UPSTREAM_SMTP);
        assert_eq!(c.upstream.imap, DEFAULT_UPSTREAM_IMAP);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.oauth.token_url(), "http://127.0.0.1:1/token");
    }

    #[test]
    fn tenant_fills_the_default_endpoints() {
        let text = base("").replace(
            "token_url = \"http://127.0.0.1:1/token\"",
            "tenant = \"contoso.onmicrosoft.com\"",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            c.oauth.token_url(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&base("colour = \"red\"")).unwrap_err();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn bad_enum_value_is_named() {
        let err =
            Config::parse(&base("").replace("tls = \"none\"", "tls = \"sometimes\"")).unwrap_err();
        assert!(err.contains("tls") && err.contains("sometimes"), "{err}");
    }

    #[test]
    fn tls_listener_needs_cert() {
        let err =
            Config::parse(&base("").replace("tls = \"none\"", "tls = \"starttls\"")).unwrap_err();
        assert_eq!(
            err,
            "listener[0].cert_file: required when tls = \"starttls\""
        );
    }

    #[test]
    fn password_grant_refuses_a_hash_and_others_need_one() {
        let err = Config::parse(&base("").replace("client_credentials", "password")).unwrap_err();
        assert!(
            err.starts_with("account[0].password_hash: not used"),
            "{err}"
        );
        let text = base("").replace(&format!("password_hash = \"{HASH}\"\n"), "");
        let err = Config::parse(&text).unwrap_err();
        assert!(
            err.starts_with("account[0].password_hash: required"),
            "{err}"
        );
    }

    #[test]
    fn bad_hash_is_named() {
        let err = Config::parse(&base("").replace(HASH, "plain-text")).unwrap_err();
        assert!(
            err.starts_with("account[0].password_hash: not a PHC string"),
            "{err}"
        );
    }

    #[test]
    fn bad_upstream_is_named() {
        let err =
            Config::parse(&format!("[upstream]\nsmtp = \"nohostport\"\n{}", base(""))).unwrap_err();
        assert!(err.starts_with("upstream.smtp:"), "{err}");
    }

    #[test]
    fn duplicate_login_and_bad_pattern_are_named() {
        let dup = "[[account]]\nlogin = \"SCANNER@example.test\"\ngrant = \"password\"\n";
        let err = Config::parse(&base(dup)).unwrap_err();
        assert!(err.starts_with("account[1].login:"), "{err}");
        let pat = "[[account]]\nlogin = \"a*@example.test\"\ngrant = \"password\"\n";
        let err = Config::parse(&base(pat)).unwrap_err();
        assert!(err.starts_with("account[1].login:"), "{err}");
    }

    #[test]
    fn client_secret_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "from-file-secret\n").unwrap();
        let text = base("").replace(
            "client_secret = \"s3cret-value\"",
            &format!("client_secret_file = \"{}\"", secret.display()),
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(
            c.oauth.client_secret.unwrap().expose_secret(),
            "from-file-secret"
        );
        std::fs::write(&secret, "  \n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("oauth.client_secret_file") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = Config::parse(&base("")).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret-value"), "{dbg}");
        assert!(!dbg.contains("SGsYHx3A0b4q"), "{dbg}");
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("smtp.office365.com:587").unwrap(),
            ("smtp.office365.com", 587)
        );
        assert_eq!(split_host_port("[::1]:993").unwrap(), ("::1", 993));
        assert!(split_host_port("host").is_err());
        assert!(split_host_port("host:0").is_err());
        assert!(split_host_port(":25").is_err());
    }
}
