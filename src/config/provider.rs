//! OAuth providers: `[oauth]` (the provider of every account without
//! `provider`) and the named `[[provider]]`s beside it, each an OAuth app
//! with its own endpoints, scopes and upstream mail hosts.
//!
//! Owns: the kinds' defaults (Microsoft 365 by cloud, Outlook.com's
//! `consumers` authority, Google), the checks of a `[[provider]]` section
//! and of what its accounts may ask of it, and [`Provider`], the resolved
//! form every other module reads. A provider is resolved once at start
//! ([`Config::providers`]); an account's identity carries it.
//!
//! Promises: every default can be overridden (`token_url`,
//! `authorize_url`, `device_code_url`, `scopes`, `smtp`, `imap`, `pop3`);
//! a key that does not apply to a kind is an error naming it; a Google
//! service account's private key is a [`SecretString`] and its `Debug`
//! shows only the account's address.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use secrecy::SecretString;
use serde::Deserialize;

use super::{split_host_port, Cloud, Config, Grant, OAuthConfig, Protocol, DEFAULT_TENANT};

/// Google's endpoints, scope and mail hosts.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const GOOGLE_AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const GOOGLE_DEVICE_CODE_URL: &str = "https://oauth2.googleapis.com/device/code";
pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";
const GOOGLE_HOSTS: [&str; 3] = [
    "smtp.gmail.com:587",
    "imap.gmail.com:993",
    "pop.gmail.com:995",
];
/// Personal Microsoft accounts sign in here.
pub const CONSUMERS_TENANT: &str = "consumers";
const OUTLOOK_COM_HOSTS: [&str; 3] = [
    "smtp-mail.outlook.com:587",
    "outlook.office365.com:993",
    "outlook.office365.com:995",
];
/// Asked for with Microsoft's delegated scopes so that a refresh token is
/// returned (Google uses `access_type=offline` instead).
pub const OFFLINE_SCOPE: &str = "offline_access";

/// What a provider is: its defaults and what its accounts may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProviderKind {
    /// Entra ID and Exchange Online (`[oauth]` is always this kind).
    #[serde(rename = "microsoft")]
    Microsoft,
    /// Personal Microsoft accounts (Outlook.com, Hotmail).
    #[serde(rename = "outlook.com")]
    OutlookCom,
    /// Gmail and Google Workspace.
    #[serde(rename = "google")]
    Google,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Microsoft => "microsoft",
            ProviderKind::OutlookCom => "outlook.com",
            ProviderKind::Google => "google",
        }
    }

    /// Whether its refresh tokens change at each use (Microsoft's do,
    /// Google's do not).
    pub fn rotates_refresh_tokens(self) -> bool {
        self != ProviderKind::Google
    }
}

/// One `[[provider]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub client_secret_file: Option<PathBuf>,
    /// Microsoft: a certificate instead of a secret, as in `[oauth]`.
    pub client_certificate_file: Option<PathBuf>,
    /// Google: the service account's JSON key (app-only accounts).
    pub service_account_file: Option<PathBuf>,
    /// Read from `service_account_file` by [`Config::load`].
    #[serde(skip)]
    pub service_account: Option<ServiceAccountKey>,
    pub tenant: Option<String>,
    pub cloud: Option<Cloud>,
    pub token_url: Option<String>,
    pub authorize_url: Option<String>,
    pub device_code_url: Option<String>,
    /// Replaces the kind's scopes for every grant of this provider.
    pub scopes: Option<Vec<String>>,
    pub smtp: Option<String>,
    pub imap: Option<String>,
    pub pop3: Option<String>,
}

/// A Google service account key file (`"type": "service_account"`).
#[derive(Clone, Deserialize)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key: SecretString,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default)]
    pub token_uri: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ServiceAccountKey {{ client_email: {:?} }}",
            self.client_email
        )
    }
}

impl ServiceAccountKey {
    /// Parse the JSON of a key file; the error never quotes the file.
    pub fn parse(text: &str) -> Result<ServiceAccountKey, String> {
        let key: ServiceAccountKey = serde_json::from_str(text).map_err(|e| {
            format!(
                "not a Google service account key in JSON (line {}, column {}: {})",
                e.line(),
                e.column(),
                match e.classify() {
                    serde_json::error::Category::Data => "a field is missing or of the wrong type",
                    _ => "malformed JSON",
                }
            )
        })?;
        if key.kind != "service_account" {
            return Err(format!(
                "its \"type\" is {:?}, not \"service_account\" (download a key of the service account, not an OAuth client)",
                key.kind
            ));
        }
        if !key.client_email.contains('@') {
            return Err("its client_email is not an address".into());
        }
        if let Some(uri) = &key.token_uri {
            if !(uri.starts_with("https://") || uri.starts_with("http://")) {
                return Err(format!("its token_uri {uri:?} is not an http(s) URL"));
            }
        }
        Ok(key)
    }
}

/// A provider resolved: everything a token request, a consent and an
/// upstream connection need.
pub struct Provider {
    /// The `[[provider]]` name; empty for `[oauth]`.
    pub name: String,
    /// Where its keys are in the config (`oauth`, `provider[1]`).
    pub key: String,
    pub kind: ProviderKind,
    /// Microsoft kinds: the cloud (Outlook.com: always global).
    pub cloud: Cloud,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub client_certificate_file: Option<PathBuf>,
    pub service_account: Option<ServiceAccountKey>,
    pub token_url: String,
    pub authorize_url: String,
    pub device_code_url: String,
    scopes: Option<Vec<String>>,
    hosts: [String; 3],
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Provider {{ {} ({}) }}", self.key, self.kind.as_str())
    }
}

impl Provider {
    /// `[oauth]` with the hosts of `[upstream]`.
    pub fn of_oauth(o: &OAuthConfig, upstream: &super::UpstreamConfig) -> Provider {
        Provider {
            name: String::new(),
            key: "oauth".into(),
            kind: ProviderKind::Microsoft,
            cloud: o.cloud,
            client_id: o.client_id.clone(),
            client_secret: o.client_secret.clone(),
            client_certificate_file: o.client_certificate_file.clone(),
            service_account: None,
            token_url: o.token_url(),
            authorize_url: o.authorize_url(),
            device_code_url: o.device_code_url(),
            scopes: None,
            hosts: [Protocol::Smtp, Protocol::Imap, Protocol::Pop3]
                .map(|p| upstream.address(p).to_string()),
        }
    }

    /// One `[[provider]]`, the `i`th of the file.
    fn of(i: usize, p: &ProviderConfig) -> Provider {
        let cloud = p.cloud.unwrap_or_default();
        let microsoft = |tenant: &str, name: &str| cloud.endpoint(tenant, name);
        let (token, authorize, device, hosts) = match p.kind {
            ProviderKind::Microsoft => {
                let tenant = p.tenant.as_deref().unwrap_or(DEFAULT_TENANT);
                (
                    microsoft(tenant, "token"),
                    microsoft(tenant, "authorize"),
                    microsoft(tenant, "devicecode"),
                    [Protocol::Smtp, Protocol::Imap, Protocol::Pop3]
                        .map(|proto| cloud.upstream(proto).to_string()),
                )
            }
            ProviderKind::OutlookCom => (
                microsoft(CONSUMERS_TENANT, "token"),
                microsoft(CONSUMERS_TENANT, "authorize"),
                microsoft(CONSUMERS_TENANT, "devicecode"),
                OUTLOOK_COM_HOSTS.map(String::from),
            ),
            ProviderKind::Google => (
                p.service_account
                    .as_ref()
                    .and_then(|k| k.token_uri.clone())
                    .unwrap_or_else(|| GOOGLE_TOKEN_URL.to_string()),
                GOOGLE_AUTHORIZE_URL.to_string(),
                GOOGLE_DEVICE_CODE_URL.to_string(),
                GOOGLE_HOSTS.map(String::from),
            ),
        };
        // {tenant} means something for Microsoft's own tenants only.
        let fill = |url: &Option<String>, default: String| {
            let url = url.clone().unwrap_or(default);
            match p.kind {
                ProviderKind::Microsoft => {
                    url.replace("{tenant}", p.tenant.as_deref().unwrap_or(DEFAULT_TENANT))
                }
                _ => url,
            }
        };
        let [smtp, imap, pop3] = hosts;
        Provider {
            name: p.name.clone(),
            key: format!("provider[{i}]"),
            kind: p.kind,
            cloud,
            client_id: p.client_id.clone().unwrap_or_default(),
            client_secret: p.client_secret.clone(),
            client_certificate_file: p.client_certificate_file.clone(),
            service_account: p.service_account.clone(),
            token_url: fill(&p.token_url, token),
            authorize_url: fill(&p.authorize_url, authorize),
            device_code_url: fill(&p.device_code_url, device),
            scopes: p.scopes.clone(),
            hosts: [
                p.smtp.clone().unwrap_or(smtp),
                p.imap.clone().unwrap_or(imap),
                p.pop3.clone().unwrap_or(pop3),
            ],
        }
    }

    /// Whether this is `[oauth]`.
    pub fn is_default(&self) -> bool {
        self.name.is_empty()
    }

    /// The `host:port` of `protocol`'s server.
    pub fn address(&self, protocol: Protocol) -> &str {
        match protocol {
            Protocol::Smtp => &self.hosts[0],
            Protocol::Imap => &self.hosts[1],
            Protocol::Pop3 => &self.hosts[2],
        }
    }

    /// The scopes of an app-only token (`client_credentials`).
    pub fn app_scopes(&self) -> Vec<String> {
        if let Some(s) = &self.scopes {
            return s.clone();
        }
        match self.kind {
            ProviderKind::Google => vec![GOOGLE_SCOPE.to_string()],
            _ => vec![format!("{}/.default", self.cloud.app_resource())],
        }
    }

    /// The scopes of a delegated token for these protocols, sorted,
    /// without duplicates; with `offline_access` for Microsoft's kinds
    /// when a refresh token is wanted.
    pub fn delegated_scopes(&self, protocols: &[Protocol], offline: bool) -> Vec<String> {
        let mut scopes = match (&self.scopes, self.kind) {
            (Some(s), _) => s.clone(),
            (None, ProviderKind::Google) => vec![GOOGLE_SCOPE.to_string()],
            (None, _) => protocols
                .iter()
                .map(|p| delegated_scope(self.cloud, *p))
                .collect(),
        };
        scopes.sort();
        scopes.dedup();
        if offline
            && self.kind != ProviderKind::Google
            && !scopes.iter().any(|s| s == OFFLINE_SCOPE)
        {
            scopes.push(OFFLINE_SCOPE.to_string());
        }
        scopes
    }

    /// Where `account`'s refresh token and token times are kept: the
    /// account's login for `[oauth]` (as always), `NAME:login` for a
    /// `[[provider]]`, so that a token consented at one provider is never
    /// sent to another after the account's `provider` changes.
    pub fn store_key(&self, account: &str) -> String {
        match self.is_default() {
            true => account.to_string(),
            false => format!("{}:{account}", self.name),
        }
    }

    /// Microsoft Graph's app-only scope (Microsoft kind only).
    pub fn graph_scope(&self) -> String {
        format!("{}/.default", self.cloud.graph_resource())
    }
}

/// The delegated scope of one protocol in `cloud`
/// (`https://outlook.office.com/IMAP.AccessAsUser.All` worldwide).
pub fn delegated_scope(cloud: Cloud, p: Protocol) -> String {
    let permission = match p {
        Protocol::Smtp => "SMTP.Send",
        Protocol::Imap => "IMAP.AccessAsUser.All",
        Protocol::Pop3 => "POP.AccessAsUser.All",
    };
    format!("{}/{permission}", cloud.delegated_resource())
}

impl Config {
    /// Every provider, resolved: `[oauth]` first, then the `[[provider]]`s
    /// in file order. Called once at start.
    pub fn providers(&self) -> Vec<Arc<Provider>> {
        let mut all = vec![Arc::new(Provider::of_oauth(&self.oauth, &self.upstream))];
        all.extend(
            self.providers
                .iter()
                .enumerate()
                .map(|(i, p)| Arc::new(Provider::of(i, p))),
        );
        all
    }
}

/// The provider `name` names (`None`: `[oauth]`), from a resolved list.
pub fn find<'a>(all: &'a [Arc<Provider>], name: Option<&str>) -> Option<&'a Arc<Provider>> {
    all.iter().find(|p| p.name == name.unwrap_or(""))
}

/// `[[provider]]`: unique names, and per kind the keys that apply.
pub fn validate(providers: &[ProviderConfig]) -> Result<(), String> {
    for (i, p) in providers.iter().enumerate() {
        let key = format!("provider[{i}]");
        one(&key, p)?;
        if let Some(j) = providers[..i]
            .iter()
            .position(|o| o.name.eq_ignore_ascii_case(&p.name))
        {
            return Err(format!("{key}.name: {:?} is already provider[{j}]", p.name));
        }
    }
    Ok(())
}

fn one(key: &str, p: &ProviderConfig) -> Result<(), String> {
    let valid_name = !p.name.is_empty()
        && p.name.len() <= 64
        && p.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid_name {
        return Err(format!(
            "{key}.name: {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
            p.name
        ));
    }
    let refuse = |name: &str, set: bool, why: &str| match set {
        true => Err(format!("{key}.{name}: {why}; remove it")),
        false => Ok(()),
    };
    let kind = p.kind.as_str();
    if p.kind != ProviderKind::Microsoft {
        let why = format!("only for kind = \"microsoft\" (this one is {kind:?})");
        refuse("tenant", p.tenant.is_some(), &why)?;
        refuse("cloud", p.cloud.is_some(), &why)?;
        refuse(
            "client_certificate_file",
            p.client_certificate_file.is_some(),
            &why,
        )?;
    }
    let why = format!("only for kind = \"google\" (this one is {kind:?})");
    refuse(
        "service_account_file",
        p.kind != ProviderKind::Google && p.service_account_file.is_some(),
        &why,
    )?;
    if p.client_secret.is_some() && p.client_secret_file.is_some() {
        return Err(format!(
            "{key}.client_secret: give client_secret or client_secret_file, not both"
        ));
    }
    if p.client_id.as_deref().is_some_and(|c| c.trim().is_empty()) {
        return Err(format!("{key}.client_id: must not be empty"));
    }
    if p.client_id.is_none() && p.service_account_file.is_none() {
        return Err(format!(
            "{key}.client_id: required (only a google provider with service_account_file may leave it out)"
        ));
    }
    for (name, url) in [
        ("token_url", &p.token_url),
        ("authorize_url", &p.authorize_url),
        ("device_code_url", &p.device_code_url),
    ] {
        if let Some(url) = url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(format!(
                    "{key}.{name}: must be an http:// or https:// URL, got {url:?}"
                ));
            }
        }
    }
    if let Some(scopes) = &p.scopes {
        if scopes.is_empty() || scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
            return Err(format!(
                "{key}.scopes: a list of one or more scopes, each without spaces"
            ));
        }
    }
    for (name, addr) in [("smtp", &p.smtp), ("imap", &p.imap), ("pop3", &p.pop3)] {
        if let Some(addr) = addr {
            split_host_port(addr).map_err(|e| format!("{key}.{name}: {e}"))?;
        }
    }
    for (name, file) in [
        ("client_certificate_file", &p.client_certificate_file),
        ("service_account_file", &p.service_account_file),
    ] {
        if let Some(f) = file {
            if !f.is_file() {
                return Err(format!(
                    "{key}.{name}: {} is not a readable file",
                    f.display()
                ));
            }
        }
    }
    Ok(())
}

/// What an account of `grant` needs from the provider `p` (`None`:
/// `[oauth]`, checked in `validate.rs`); the error starts with `key`.
pub fn account_grant(key: &str, grant: Grant, p: &ProviderConfig) -> Result<(), String> {
    let name = &p.name;
    match (p.kind, grant) {
        (ProviderKind::OutlookCom, Grant::ClientCredentials | Grant::Password) => Err(format!(
            "{key}.grant: provider {name:?} is outlook.com, where only grant = \"refresh_token\" exists (personal Microsoft accounts have no app-only access and no password grant)"
        )),
        (ProviderKind::Google, Grant::Password) => Err(format!(
            "{key}.grant: provider {name:?} is google, which has no password grant; use \"client_credentials\" (a service account) or \"refresh_token\""
        )),
        (ProviderKind::Google, Grant::ClientCredentials) if p.service_account_file.is_none() => {
            Err(format!(
                "{key}.grant: client_credentials on provider {name:?} is a service account: set service_account_file on the provider"
            ))
        }
        (ProviderKind::Microsoft, Grant::ClientCredentials)
            if p.client_secret.is_none()
                && p.client_secret_file.is_none()
                && p.client_certificate_file.is_none() =>
        {
            Err(format!(
                "{key}.grant: client_credentials needs client_secret, client_secret_file or client_certificate_file on provider {name:?}"
            ))
        }
        (_, Grant::RefreshToken) if p.client_id.is_none() => Err(format!(
            "{key}.grant: refresh_token needs client_id on provider {name:?}"
        )),
        (ProviderKind::Google, Grant::RefreshToken)
            if p.client_secret.is_none() && p.client_secret_file.is_none() =>
        {
            Err(format!(
                "{key}.grant: refresh_token on provider {name:?} needs its OAuth client's secret (client_secret or client_secret_file)"
            ))
        }
        _ => Ok(()),
    }
}

/// `[oauth]` alone, for tests that need accounts.
#[cfg(test)]
pub fn test_providers() -> Vec<Arc<Provider>> {
    let oauth: OAuthConfig = toml::from_str("client_id = \"app\"").expect("a minimal [oauth]");
    vec![Arc::new(Provider::of_oauth(&oauth, &Default::default()))]
}

#[cfg(test)]
#[path = "provider_tests.rs"]
mod tests;
