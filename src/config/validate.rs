//! The checks serde cannot make, one function per section, run in file
//! order by [`validate`].
//!
//! Promises: every error starts with the key at fault (`listener[0].cert_file:`,
//! `store.url:`) and says what is wrong; no error text quotes a secret (a
//! Redis URL's password, a client secret, a password hash). The first error
//! found is the one returned. Files named by the config are only checked to
//! exist here; reading them is [`Config::load`]'s job (the client secret)
//! or the consumer's (certificates, CA roots).

use ipnet::IpNet;
use secrecy::ExposeSecret;

use crate::mailbox::Mailbox;

use super::{
    parse_network, split_host_port, AccountConfig, AdminConfig, Config, Delivery, Grant,
    LimitsConfig, ListenerConfig, LogConfig, OAuthConfig, Protocol, RelayConfig, SendVia,
    SpoolConfig, StoreBackend, StoreConfig, TlsMode, UpstreamConfig,
};

/// The levels `log.level` accepts (`RUST_LOG` takes full filter directives).
const LOG_LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
/// The shortest `limits.max_line`: RFC 5321's command line, 512 octets.
pub const MIN_MAX_LINE: usize = 512;
/// The longest `store.key_prefix`.
pub const MAX_KEY_PREFIX_LEN: usize = 64;

/// Check a parsed configuration; the error starts with the key.
pub fn validate(c: &Config) -> Result<(), String> {
    oauth(&c.oauth)?;
    super::provider::validate(&c.providers)?;
    admin(c.admin.as_ref())?;
    upstream(&c.upstream)?;
    log(&c.log)?;
    listeners(&c.listeners)?;
    accounts(c)?;
    relays(&c.relays, &c.accounts, &c.listeners)?;
    limits(&c.limits)?;
    spool(&c.spool)?;
    store(&c.store)
}

/// `[admin]`: off loopback, the status page and the metrics need a token.
fn admin(a: Option<&AdminConfig>) -> Result<(), String> {
    let Some(a) = a else { return Ok(()) };
    if !a.listen.ip().is_loopback() && a.token_file.is_none() {
        return Err(format!(
            "admin.token_file: required when admin.listen ({}) is not a loopback address: the status page and /metrics name accounts and mailboxes",
            a.listen
        ));
    }
    if let Some(url) = &a.public_url {
        let plain = url.strip_prefix("https://").or(url.strip_prefix("http://"));
        match plain {
            Some(rest)
                if !rest.is_empty()
                    && !rest.contains(['?', '#', ' ', '@'])
                    && !rest.starts_with('/') => {}
            _ => {
                return Err(format!(
                    "admin.public_url: {url:?} must be an http:// or https:// address without a user, query or fragment, like \"https://oxbridge.example.org:9090\""
                ))
            }
        }
        if a.token_file.is_none() {
            return Err(
                "admin.public_url: the status page's actions need admin.token_file (an admin token, also on loopback)".into(),
            );
        }
    }
    Ok(())
}

/// `[oauth]`: a client id, at most one inline secret source, usable URLs,
/// and a certificate file that exists.
fn oauth(o: &OAuthConfig) -> Result<(), String> {
    if o.client_id.trim().is_empty() {
        return Err("oauth.client_id: must not be empty".into());
    }
    if o.client_secret.is_some() && o.client_secret_file.is_some() {
        return Err(
            "oauth.client_secret: give client_secret or client_secret_file, not both".into(),
        );
    }
    for (key, url) in [
        ("oauth.token_url", o.token_url()),
        ("oauth.device_code_url", o.device_code_url()),
        ("oauth.authorize_url", o.authorize_url()),
    ] {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!(
                "{key}: must be an http:// or https:// URL, got {url:?}"
            ));
        }
    }
    if let Some(cert) = &o.client_certificate_file {
        if !cert.is_file() {
            return Err(format!(
                "oauth.client_certificate_file: {} is not a readable file",
                cert.display()
            ));
        }
    }
    Ok(())
}

/// `[upstream]`: three `host:port` addresses and an optional CA file.
fn upstream(u: &UpstreamConfig) -> Result<(), String> {
    for (key, addr) in [
        ("upstream.smtp", Protocol::Smtp),
        ("upstream.imap", Protocol::Imap),
        ("upstream.pop3", Protocol::Pop3),
    ] {
        let addr = u.address(addr);
        split_host_port(addr).map_err(|e| format!("{key}: {e}"))?;
    }
    if let Some(url) = &u.graph {
        if !url.starts_with("https://") {
            return Err(format!(
                "upstream.graph: {url:?} must be an https:// URL (oxbridge never sends mail unencrypted)"
            ));
        }
    }
    if let Some(ca) = &u.ca_file {
        if !ca.is_file() {
            return Err(format!(
                "upstream.ca_file: {} is not a readable file",
                ca.display()
            ));
        }
    }
    Ok(())
}

/// `[log]`: a bare level (the format is an enum, checked by serde).
fn log(l: &LogConfig) -> Result<(), String> {
    if !LOG_LEVELS.contains(&l.level.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "log.level: must be one of error, warn, info, debug, trace, off; got {:?}",
            l.level
        ));
    }
    Ok(())
}

/// `[[listener]]`: at least one, each valid, no address used twice (port 0
/// excepted: the tests bind several of those).
fn listeners(listeners: &[ListenerConfig]) -> Result<(), String> {
    if listeners.is_empty() {
        return Err("listener: at least one [[listener]] is needed".into());
    }
    for (i, l) in listeners.iter().enumerate() {
        let key = format!("listener[{i}]");
        listener(&key, l)?;
        for (j, other) in listeners.iter().enumerate().take(i) {
            if other.listen == l.listen && l.listen.port() != 0 {
                return Err(format!(
                    "{key}.listen: {} is already used by listener[{j}]",
                    l.listen
                ));
            }
        }
    }
    Ok(())
}

/// One `[[listener]]`: with TLS, a certificate and key that exist (or
/// neither: a self-signed one is made in `state_dir`).
fn listener(key: &str, l: &ListenerConfig) -> Result<(), String> {
    if l.tls != TlsMode::None {
        match (&l.cert_file, &l.key_file) {
            (Some(_), None) => {
                return Err(format!(
                    "{key}.key_file: required with cert_file (or leave both out for a self-signed certificate)"
                ))
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{key}.cert_file: required with key_file (or leave both out for a self-signed certificate)"
                ))
            }
            _ => {}
        }
        for (name, value) in [("cert_file", &l.cert_file), ("key_file", &l.key_file)] {
            if let Some(p) = value {
                if !p.is_file() {
                    return Err(format!(
                        "{key}.{name}: {} is not a readable file",
                        p.display()
                    ));
                }
            }
        }
    } else {
        for (name, set) in [
            ("tls_min_version", l.tls_min_version.is_some()),
            ("session_tickets", l.session_tickets),
        ] {
            if set {
                return Err(format!(
                    "{key}.{name}: only for TLS listeners (tls = \"starttls\" or \"implicit\"); remove it here"
                ));
            }
        }
    }
    if l.max_connections == 0 {
        return Err(format!("{key}.max_connections: must be at least 1"));
    }
    if l.delivery == Delivery::Spool && l.protocol != Protocol::Smtp {
        return Err(format!(
            "{key}.delivery: only SMTP listeners can spool; remove it here"
        ));
    }
    proxy_from(key, l)?;
    if l.session_continuity.is_some() && l.protocol != Protocol::Imap {
        return Err(format!(
            "{key}.session_continuity: only IMAP sessions move to a new login; remove it here"
        ));
    }
    Ok(())
}

/// A listener's `proxy_from`: required with `proxy_protocol` (anyone else
/// could claim any client address), refused without it.
fn proxy_from(key: &str, l: &ListenerConfig) -> Result<(), String> {
    match (l.proxy_protocol, &l.proxy_from) {
        (true, None) => Err(format!(
            "{key}.proxy_from: required with proxy_protocol = true: list the load balancers whose PROXY header is believed, like [\"10.0.0.0/24\"]"
        )),
        (true, Some(list)) if list.is_empty() => Err(format!(
            "{key}.proxy_from: list at least one load balancer network"
        )),
        (true, Some(list)) => match list.iter().find(|n| parse_network(n).is_none()) {
            Some(bad) => Err(format!(
                "{key}.proxy_from: {bad:?} is not a network like 10.0.0.0/24 or an address"
            )),
            None => Ok(()),
        },
        (false, Some(_)) => Err(format!(
            "{key}.proxy_from: only used with proxy_protocol = true; remove it here"
        )),
        (false, None) => Ok(()),
    }
}

/// `[[account]]`: at least one, each valid, no login twice (case-insensitive).
fn accounts(c: &Config) -> Result<(), String> {
    let accounts = &c.accounts;
    if accounts.is_empty() {
        return Err("account: at least one [[account]] is needed".into());
    }
    for (i, a) in accounts.iter().enumerate() {
        let key = format!("account[{i}]");
        account(&key, a, c)?;
        for (j, other) in accounts.iter().enumerate().take(i) {
            if other.login.eq_ignore_ascii_case(&a.login) {
                return Err(format!(
                    "{key}.login: {:?} is already account[{j}]",
                    a.login
                ));
            }
        }
    }
    Ok(())
}

/// One `[[account]]`: a login or `*@domain` pattern, a password hash exactly
/// when the grant checks the password locally, the credentials the grant
/// needs, and well-formed mailboxes.
fn account(key: &str, a: &AccountConfig, c: &Config) -> Result<(), String> {
    let oauth = &c.oauth;
    validate_login_pattern(&a.login, a.mailbox.is_some())
        .map_err(|e| format!("{key}.login: {e}"))?;
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
        (_, Some(hash)) => password_hash(key, hash.expose_secret())?,
        _ => {}
    }
    if let Some(name) = &a.provider {
        let Some(p) = c.providers.iter().find(|p| &p.name == name) else {
            return Err(format!("{key}.provider: no [[provider]] is named {name:?}"));
        };
        super::provider::account_grant(key, a.grant, p)?;
        if a.send == Some(SendVia::Graph) {
            return Err(format!(
                "{key}.send: \"graph\" sends with [oauth]'s app; an account of provider {name:?} sends over SMTP"
            ));
        }
    } else if a.grant == Grant::ClientCredentials
        && oauth.client_secret.is_none()
        && oauth.client_secret_file.is_none()
        && oauth.client_certificate_file.is_none()
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
    if a.send == Some(SendVia::Graph) && a.grant != Grant::ClientCredentials {
        return Err(format!(
            "{key}.send: \"graph\" sends with an app-only token and needs grant = \"client_credentials\" (application permission Mail.Send)"
        ));
    }
    for sender in &a.allowed_senders {
        validate_address_or_pattern(sender).map_err(|e| format!("{key}.allowed_senders: {e}"))?;
    }
    protocols::account(key, a)?;
    for shared in &a.allow_shared {
        validate_address_or_pattern(shared).map_err(|e| format!("{key}.allow_shared: {e}"))?;
    }
    if let Some(m) = &a.mailbox {
        if a.login.starts_with("*@") {
            return Err(format!(
                "{key}.mailbox: cannot be set on a pattern login (each user is its own mailbox)"
            ));
        }
        validate_address(m).map_err(|e| format!("{key}.mailbox: {e}"))?;
    }
    Ok(())
}

/// A PHC string from `oxbridge hash-password`. One whose `$` parts a
/// shell removed (`=19=19456,t=2,p=1...`) is told so; the hash is never
/// quoted back.
fn password_hash(key: &str, hash: &str) -> Result<(), String> {
    let eaten = !hash.starts_with('$') && (hash.contains(",t=") || hash.starts_with("=19"));
    if eaten {
        return Err(format!(
            "{key}.password_hash: not a whole hash: it must start with $argon2id$, and its $ parts are gone, as a shell removes them from a double-quoted or unquoted string; quote the hash with single quotes ('$argon2id$v=19$...') or paste it into this file with an editor"
        ));
    }
    argon2::PasswordHash::new(hash).map(drop).map_err(|e| {
        format!("{key}.password_hash: not a PHC string from `oxbridge hash-password` ({e})")
    })
}

/// `[[relay]]`: each rule valid, and an SMTP listener to relay through.
fn relays(
    relays: &[RelayConfig],
    accounts: &[AccountConfig],
    listeners: &[ListenerConfig],
) -> Result<(), String> {
    for (i, r) in relays.iter().enumerate() {
        relay(&format!("relay[{i}]"), r, accounts)?;
    }
    if !listeners.iter().any(|l| l.protocol == Protocol::Smtp) && !relays.is_empty() {
        return Err("relay[0]: relaying needs an SMTP [[listener]]".into());
    }
    Ok(())
}

/// One `[[relay]]`: networks that parse and are private (or allowed to
/// be public, see `networks`), and an exact account whose grant needs no
/// device password (a relayed device sends none) and that may send.
fn relay(key: &str, r: &RelayConfig, accounts: &[AccountConfig]) -> Result<(), String> {
    for n in &r.from_networks {
        n.parse::<IpNet>().map_err(|_| {
            format!("{key}.from_networks: {n:?} is not a network like 192.168.10.0/24")
        })?;
    }
    let Some(account) = accounts
        .iter()
        .find(|a| a.login.eq_ignore_ascii_case(&r.account))
    else {
        return Err(format!(
            "{key}.account: no [[account]] has login {:?}",
            r.account
        ));
    };
    if r.from_networks.is_empty() {
        return Err(format!("{key}.from_networks: list at least one network"));
    }
    if account.grant == Grant::Password || account.login.starts_with("*@") {
        return Err(format!(
            "{key}.account: must be an exact login with grant client_credentials or refresh_token (no password to exchange)"
        ));
    }
    protocols::relay_account(key, account)?;
    super::networks::check_relay(key, r)?;
    for sender in &r.allowed_senders {
        validate_address_or_pattern(sender).map_err(|e| format!("{key}.allowed_senders: {e}"))?;
    }
    Ok(())
}

/// `[limits]`: no bound is zero, and a command line fits RFC 5321's.
/// `[spool]`: every bound at least 1, retries that grow.
fn spool(s: &SpoolConfig) -> Result<(), String> {
    if !(s.max_age_h.is_finite() && s.max_age_h > 0.0) {
        return Err("spool.max_age_h: must be more than 0".into());
    }
    for (key, value) in [
        ("spool.max_message_bytes", s.max_message_bytes),
        ("spool.max_recipients", s.max_recipients as u64),
        (
            "spool.messages_per_minute",
            u64::from(s.messages_per_minute),
        ),
        ("spool.retry_min_s", s.retry_min_s),
    ] {
        if value == 0 {
            return Err(format!("{key}: must be at least 1"));
        }
    }
    if s.retry_max_s < s.retry_min_s {
        return Err("spool.retry_max_s: must be at least spool.retry_min_s".into());
    }
    Ok(())
}

fn limits(l: &LimitsConfig) -> Result<(), String> {
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
    if l.max_line < MIN_MAX_LINE {
        return Err(format!(
            "limits.max_line: must be at least {MIN_MAX_LINE} (RFC 5321's command line)"
        ));
    }
    Ok(())
}

/// `[store]`: one key source; with Redis a URL that parses (never quoted
/// back) and an explicit key every replica shares; the Redis-only keys
/// refused with the file backend.
fn store(s: &StoreConfig) -> Result<(), String> {
    if s.key_file.is_some() && s.key_env.is_some() {
        return Err("store.key_env: give key_file or key_env, not both".into());
    }
    match (s.backend, &s.url) {
        (StoreBackend::Redis, None) => Err(
            "store.url: needed with backend = \"redis\" (redis://host:6379 or rediss://...)".into(),
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
            if s.key_file.is_none() && s.key_env.is_none() {
                return Err("store.key_file: with backend = \"redis\" give key_file or key_env explicitly: every replica needs the same key".into());
            }
            if s.key_prefix
                .as_deref()
                .is_some_and(|p| p.len() > MAX_KEY_PREFIX_LEN)
            {
                return Err(format!(
                    "store.key_prefix: at most {MAX_KEY_PREFIX_LEN} characters"
                ));
            }
            Ok(())
        }
        (StoreBackend::File, Some(_)) => {
            Err("store.url: only used with backend = \"redis\"".into())
        }
        (StoreBackend::File, None) => {
            if s.key_prefix.is_some() {
                return Err("store.key_prefix: only used with backend = \"redis\"".into());
            }
            Ok(())
        }
    }
}

/// A login: `*@domain`, a mailbox, or (where `mailbox` names the mailbox)
/// a local name. Never a backslash, which separates a shared mailbox.
fn validate_login_pattern(login: &str, has_mailbox: bool) -> Result<(), String> {
    if let Some(domain) = login.strip_prefix("*@") {
        return match Mailbox::parse(&format!("x@{domain}")) {
            Ok(_) if !domain.contains('*') => Ok(()),
            _ => Err(format!("{login:?}: a pattern must be *@domain")),
        };
    }
    if login.contains('*') {
        return Err(format!("{login:?}: only the form *@domain may use *"));
    }
    if login.contains('\\') {
        return Err(format!(
            "{login:?}: must not contain a backslash (it separates a shared mailbox)"
        ));
    }
    if has_mailbox {
        if login.is_empty() || login.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{login:?}: must be a non-empty name without spaces"
            ));
        }
        return Ok(());
    }
    Mailbox::parse(login).map(drop).map_err(|e| {
        format!("{login:?}: not a mail address ({e}); set mailbox if the login is only a name")
    })
}

/// An exact address, or `*@domain` (checked as if it were `x@domain`).
fn validate_address_or_pattern(entry: &str) -> Result<(), String> {
    let addr = entry.strip_prefix("*@").map(|d| format!("x@{d}"));
    validate_address(addr.as_deref().unwrap_or(entry))
}

fn validate_address(addr: &str) -> Result<(), String> {
    Mailbox::parse(addr)
        .map(drop)
        .map_err(|e| format!("{addr:?} is not a mail address ({e})"))
}

mod protocols;
#[cfg(test)]
mod tests;
