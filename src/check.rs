//! `oxbridge check`: for each account and each protocol that has a
//! listener, a real token request and a real upstream XOAUTH2 login, one
//! line each: OK, or the failure and what the administrator should do.
//!
//! A `refresh_token` account first gets a line of its token times as they
//! stood before the check (which refreshes the token itself): when it was
//! consented, how old the stored refresh token is, the last refresh, and
//! when the access token expires.
//!
//! An account that sends through Microsoft Graph gets a Graph token
//! instead of an SMTP login.
//!
//! Accounts that cannot be checked without a device's password (the
//! `password` grant, `*@domain` patterns without a fixed mailbox) are
//! listed as SKIPPED and do not fail the check; so is each protocol an
//! account's `protocols` leave out.
//!
//! `oxbridge check ACCOUNT --send-to ADDRESS` sends a test message
//! instead (`send`).

use std::io::Write;
use std::time::{Duration, Instant};

use crate::app::App;
use crate::config::{Config, Grant, Protocol};
use crate::error::AuthError;
use crate::state::TokenHealth;
use crate::{diagnose, login};

mod send;
pub use send::{send_to, SendError};

/// What the configuration allows that an operator should know about,
/// one WARNING line each (printed by `check` and `check --offline`; they
/// do not fail it): listeners that accept TLS older than 1.2; relay
/// networks that are public or wide (`config::networks`).
pub fn warnings(config: &Config) -> Vec<String> {
    let relays = crate::config::networks::relay_warnings(&config.relays);
    config
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.legacy_tls())
        .map(|(i, l)| {
            format!(
                "listener[{i}] {} {}: WARNING: tls_min_version = \"{}\" accepts TLS {} and CBC suites from old devices; keep this listener on a LAN or VLAN you trust, never the internet",
                l.protocol,
                l.listen,
                l.min_tls(),
                l.min_tls()
            )
        })
        .chain(relays)
        .collect()
}

/// Run every check; `Ok(true)` when none failed.
pub async fn run(config: Config, out: &mut impl Write) -> Result<bool, String> {
    let protocols = config.protocols();
    if protocols.is_empty() {
        writeln!(out, "no [[listener]]: nothing to check").map_err(|e| e.to_string())?;
        return Ok(true);
    }
    let app = App::new(config).map_err(|e| e.to_string())?;
    let mut all_ok = true;
    for account in &app.config.accounts {
        let (lines, ok) = account_lines(&app, &account.login, account.grant).await;
        all_ok &= ok;
        for line in lines {
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
        }
    }
    Ok(all_ok)
}

/// What `oxbridge check` prints for one account (`login`, of `grant`),
/// and whether it all worked: the status page's "Check now" shows the
/// same lines.
pub async fn account_lines(app: &App, login: &str, grant: Grant) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    if grant == Grant::Password || login.starts_with("*@") {
        let why = if grant == Grant::Password {
            "grant = \"password\" needs a user's password; a device's login tests it"
        } else {
            "a *@domain pattern; a device's login tests it"
        };
        lines.push(format!("{login}: SKIPPED ({why})"));
        return (lines, true);
    }
    if grant == Grant::RefreshToken {
        let provider = app.provider_of(login);
        lines.push(match app.tokens.times(&provider, login).await {
            Ok(times) => {
                // An unrotated refresh token (Google's) is kept alive by its use.
                let times = match provider.kind.rotates_refresh_tokens() {
                    true => times,
                    false => TokenHealth {
                        issued: times.issued.max(times.refreshed),
                        ..times
                    },
                };
                times_line(login, &times, crate::state::unix_ms() / 1000)
            }
            Err(e) => format!("{login}: token times unknown: {e}"),
        });
    }
    let mut all_ok = true;
    let accounts = app.accounts();
    for protocol in app.config.protocols() {
        if accounts.protocol_refusal(login, protocol).is_some() {
            lines.push(format!(
                "{login} {protocol}: SKIPPED (not in the account's protocols)"
            ));
            continue;
        }
        let started = Instant::now();
        let result = match accounts.identity(login) {
            // Graph has no call that proves Mail.Send without sending:
            // the token is what can be checked.
            Ok(id) if protocol == Protocol::Smtp && id.graph => {
                app.tokens.graph(&id).await.map(|_| {
                    format!(
                        "{}, Microsoft Graph token; Mail.Send shows with the first message",
                        id.mailbox
                    )
                })
            }
            Ok(id) => login::check_login(app, protocol, &id).await,
            Err(e) => Err(e),
        };
        lines.push(match &result {
            Ok(mailbox) => format!(
                "{login} {protocol}: OK (mailbox {mailbox}, {} ms)",
                started.elapsed().as_millis()
            ),
            Err(e) => {
                all_ok = false;
                failure_line(login, protocol.as_str(), e)
            }
        });
    }
    (lines, all_ok)
}

fn failure_line(login: &str, protocol: &str, e: &AuthError) -> String {
    match diagnose::advice(e) {
        Some(fix) => format!("{login} {protocol}: FAILED: {e}. Fix: {fix}"),
        None => format!("{login} {protocol}: FAILED: {e}"),
    }
}

/// Entra ends a refresh token unused this long (seconds).
const INACTIVITY_LIMIT_S: u64 = 90 * 24 * 3600;
/// A refresh token older than this gets a warning.
const WARN_AGE_S: u64 = 60 * 24 * 3600;

/// `login: tokens: ...`, the recorded times as of Unix second `now`.
fn times_line(login: &str, t: &TokenHealth, now: u64) -> String {
    let Some(issued) = t.issued else {
        return format!("{login}: tokens: no times recorded yet (they are from the next `oxbridge login` or refresh on)");
    };
    let mut parts = Vec::new();
    if let Some(at) = t.consented {
        parts.push(format!("consented {}", when(at, now)));
    }
    parts.push(format!("refresh token issued {}", when(issued, now)));
    parts.push(match t.refreshed {
        Some(at) => format!("last refresh {}", when(at, now)),
        None => "no refresh yet".into(),
    });
    if let Some(at) = t.access_expires {
        parts.push(format!("access token expires {}", when(at, now)));
    }
    let age = now.saturating_sub(issued);
    let mut line = format!("{login}: tokens: {}", parts.join("; "));
    if age >= WARN_AGE_S {
        line.push_str(&format!(
            "; WARNING: the refresh token was last renewed {} days ago and ends after {} days unused: keep oxbridge running with [oauth] refresh_keepalive_s, or run `oxbridge login {login}`",
            age / 86_400,
            INACTIVITY_LIMIT_S / 86_400
        ));
    }
    line
}

/// `2026-12-03T07:30:00Z (3d 2h ago)` or `(in 58m)`.
fn when(at: u64, now: u64) -> String {
    let stamp = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(at));
    match at.cmp(&now) {
        std::cmp::Ordering::Greater => format!("{stamp} (in {})", span(at - now)),
        std::cmp::Ordering::Equal => format!("{stamp} (now)"),
        std::cmp::Ordering::Less => format!("{stamp} ({} ago)", span(now - at)),
    }
}

/// A span to two units: `3d 2h`, `2h 5m`, `58m`, `40s`.
fn span(s: u64) -> String {
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_for_old_tls_gets_a_warning_line_and_others_none() {
        let base = |extra: &str| {
            format!("[oauth]\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[[listener]]\nprotocol = \"imap\"\nlisten = \"0.0.0.0:993\"\ntls = \"implicit\"\n{extra}[[account]]\nlogin = \"a@x.test\"\ngrant = \"password\"\n")
        };
        let config = Config::parse(&base("")).unwrap();
        assert!(warnings(&config).is_empty());
        let config = Config::parse(&base("tls_min_version = \"1.1\"\n")).unwrap();
        assert_eq!(
            warnings(&config),
            ["listener[0] imap 0.0.0.0:993: WARNING: tls_min_version = \"1.1\" accepts TLS 1.1 and CBC suites from old devices; keep this listener on a LAN or VLAN you trust, never the internet"]
        );
    }

    #[test]
    fn token_times_read_as_dates_ages_and_a_warning_when_old() {
        let day = 86_400;
        let now = 1_796_000_000; // 2026-11-30T00:53:20Z
        let t = TokenHealth {
            consented: Some(now - 70 * day),
            issued: Some(now - 3 * day - 7200),
            refreshed: Some(now - 3 * day - 7200),
            access_expires: Some(now - 3 * day - 3600 + 59),
        };
        assert_eq!(
            times_line("a@x.test", &t, now),
            "a@x.test: tokens: consented 2026-09-21T00:53:20Z (70d 0h ago); \
             refresh token issued 2026-11-26T22:53:20Z (3d 2h ago); \
             last refresh 2026-11-26T22:53:20Z (3d 2h ago); \
             access token expires 2026-11-26T23:54:19Z (3d 0h ago)"
        );
        let old = TokenHealth {
            issued: Some(now - 61 * day),
            refreshed: None,
            access_expires: Some(now + 3000),
            ..t
        };
        let line = times_line("a@x.test", &old, now);
        assert!(
            line.contains("no refresh yet; access token expires 2026-11-30T01:43:20Z (in 50m)"),
            "{line}"
        );
        assert!(line.ends_with("; WARNING: the refresh token was last renewed 61 days ago and ends after 90 days unused: keep oxbridge running with [oauth] refresh_keepalive_s, or run `oxbridge login a@x.test`"), "{line}");
        assert!(times_line("a@x.test", &TokenHealth::default(), now)
            .starts_with("a@x.test: tokens: no times recorded yet"));
        assert_eq!(
            [span(40), span(61), span(3 * 3600 + 125), when(now, now)],
            ["40s", "1m", "3h 2m", "2026-11-30T00:53:20Z (now)"].map(String::from)
        );
    }
}
