//! The status page's HTML, rendered from a [`View`] by a pure function:
//! no JavaScript, a viewport for phones, a refresh every
//! [`REFRESH_S`] seconds, every text escaped (maud). The view holds no
//! secret, so neither can the page.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::board::{DeviceEntry, Failure, Logins, RefusalEntry};
use super::forms;
use crate::limits::MailboxUse;

/// The page reloads itself this often.
pub const REFRESH_S: u64 = 10;
/// A refresh token unused this long is flagged (Microsoft Entra ends one
/// after 90 days without use).
pub const REFRESH_IDLE_WARN_S: u64 = 30 * 86400;

/// Everything the page shows, gathered at one moment.
#[derive(Debug, Clone)]
pub struct View {
    pub version: &'static str,
    pub host: String,
    /// Unix seconds.
    pub now: u64,
    pub started: u64,
    /// `/readyz`'s verdict: None when ready, else why not.
    pub not_ready: Option<String>,
    /// Outages of what oxbridge depends on (health facts, not readiness).
    pub health: Vec<String>,
    pub listeners: Vec<ListenerRow>,
    pub accounts: Vec<AccountRow>,
    /// Mailboxes with upstream sessions or waiting devices.
    pub mailboxes: Vec<MailboxUse>,
    /// Session counts are this replica's (the Redis store counts all).
    pub replicas: bool,
    pub failures: Vec<Failure>,
    pub spool: Option<SpoolView>,
    /// Refusals other than failed logins, newest first.
    pub refusals: Vec<RefusalEntry>,
    /// Devices heard from lately, the most recent first.
    pub devices: Vec<DeviceEntry>,
    /// The anti-forgery token of this page's forms; `None`: no actions
    /// (they need an admin token).
    pub form_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListenerRow {
    pub protocol: &'static str,
    pub address: String,
    pub tls: &'static str,
    /// SMTP: "session" or "spool".
    pub delivery: Option<&'static str>,
    pub sessions: usize,
    pub max: usize,
    /// `tls_min_version` when below 1.2 (old devices' TLS accepted).
    pub legacy_from: Option<&'static str>,
    /// Device handshakes so far per TLS version.
    pub tls_mix: Vec<(&'static str, u64)>,
    /// The certificate's SHA-256 fingerprint, and whether it is the
    /// self-signed one.
    pub certificate: Option<(String, bool)>,
}

#[derive(Debug, Clone)]
pub struct AccountRow {
    pub login: String,
    pub grant: &'static str,
    /// The mailbox it logs in to (for a `*@domain` pattern, each user's own).
    pub mailbox: String,
    pub sends: &'static str,
    /// Its `[[provider]]` as `name (kind)`; empty for `[oauth]`'s accounts.
    pub provider: String,
    pub token: TokenView,
    pub logins: Logins,
    /// (protocol, sessions now, limit) of its mailbox.
    pub sessions: Vec<(&'static str, usize, usize)>,
}

/// What is known of an account's access and refresh tokens (Unix seconds).
#[derive(Debug, Clone, Default)]
pub struct TokenView {
    pub access_expires: Option<u64>,
    pub obtained: Option<u64>,
    /// The last failure, when it came after the last success.
    pub error: Option<(u64, String)>,
    /// `refresh_token` accounts: the stored refresh token's issue and the
    /// last refresh that worked.
    pub refresh_issued: Option<u64>,
    pub refreshed: Option<u64>,
    pub refresh_token: bool,
}

#[derive(Debug, Clone)]
pub struct SpoolView {
    pub waiting: usize,
    pub dead: usize,
    pub oldest_age: Option<u64>,
    /// The oldest waiting messages.
    pub rows: Vec<SpoolRow>,
}

#[derive(Debug, Clone)]
pub struct SpoolRow {
    pub id: String,
    pub age: u64,
    pub from: String,
    pub to: String,
    pub attempts: u32,
    pub last_error: String,
}

/// How a row is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Warn,
    Bad,
    Unknown,
}

impl Health {
    fn class(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Warn => "warn",
            Health::Bad => "bad",
            Health::Unknown => "unknown",
        }
    }
}

impl TokenView {
    /// The token's state in a word or two, and its mark.
    pub fn verdict(&self, now: u64) -> (Health, String) {
        if let Some((_, error)) = &self.error {
            return (Health::Bad, format!("last request failed: {error}"));
        }
        let last_use = self.refreshed.max(self.refresh_issued);
        if self.refresh_token {
            match last_use {
                None => return (Health::Bad, "no refresh token: run oxbridge login".into()),
                Some(t) if now.saturating_sub(t) > REFRESH_IDLE_WARN_S => {
                    return (
                        Health::Warn,
                        format!(
                            "refresh token unused for {}; it ends after 90 days unused",
                            span(now.saturating_sub(t))
                        ),
                    )
                }
                _ => {}
            }
        }
        match self.access_expires {
            Some(t) if t > now => match self.obtained {
                Some(got) => (
                    Health::Ok,
                    format!(
                        "valid for {}, obtained {} ago",
                        span(t - now),
                        span(now.saturating_sub(got))
                    ),
                ),
                None => (Health::Ok, format!("valid for {}", span(t - now))),
            },
            Some(t) => (
                Health::Unknown,
                format!("expired {} ago; renewed at the next login", span(now - t)),
            ),
            None => (
                Health::Unknown,
                "none yet; fetched at the first login".into(),
            ),
        }
    }
}

impl Logins {
    fn verdict(&self, now: u64) -> (Health, String) {
        match (self.last_ok, self.last_failure) {
            (_, Some(f)) if self.failing > 0 => (
                Health::Bad,
                format!(
                    "{} failed since the last success, latest {} ago",
                    self.failing,
                    span(now.saturating_sub(f))
                ),
            ),
            (Some(ok), _) => (
                Health::Ok,
                format!("last login {} ago", span(now.saturating_sub(ok))),
            ),
            _ => (Health::Unknown, "no login yet".into()),
        }
    }
}

/// A duration as `45s`, `12m`, `3h 20m`, `4d 2h`.
pub fn span(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 .75rem 2rem;max-width:70rem;color:#1b1b1b;background:#fafafa;line-height:1.35}\
h1{font-size:1.3rem;margin:.8rem 0 .2rem}h2{font-size:1.05rem;margin:1.4rem 0 .4rem}\
p.meta{margin:.2rem 0;color:#555;font-size:.9rem}\
.wrap{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.9rem;background:#fff}\
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}\
th{background:#f0f0f0;font-weight:600;white-space:nowrap}td.num{text-align:right;white-space:nowrap}\
.ok{color:#176f2c}.warn{color:#8a5a00}.bad{color:#b00020;font-weight:600}.unknown{color:#555}\
.pill{display:inline-block;padding:.05rem .45rem;border-radius:.6rem;font-size:.8rem;border:1px solid currentColor}\
.fix{color:#333;font-size:.85rem}form.act{display:inline-block;margin:0 .3rem .2rem 0}code{font-size:.85rem;word-break:break-all}p.none{color:#555;margin:.2rem 0}\
@media (max-width:40rem){thead{display:none}table,tbody,tr,td{display:block}table{background:none}\
tr{background:#fff;border:1px solid #ddd;border-radius:.3rem;margin:0 0 .6rem}\
td,td.num{border-bottom:1px solid #eee;text-align:left;white-space:normal}\
td::before{content:attr(data-label);display:block;font-size:.72rem;color:#666;text-transform:uppercase;letter-spacing:.03em}}";

/// The whole page.
pub fn render(v: &View) -> String {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content=(REFRESH_S);
                title { "oxbridge on " (v.host) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "oxbridge on " (v.host) }
                p.meta {
                    "version " (v.version) " · up " (span(v.now.saturating_sub(v.started)))
                    " · this page refreshes every " (REFRESH_S) " s · "
                    @match &v.not_ready {
                        None => span.ok { "ready" },
                        Some(why) => span.bad { "not ready: " (why) },
                    }
                }
                @for problem in &v.health { p.meta { span.bad { (problem) } } }
                (listeners(v))
                (accounts(v))
                (mailboxes(v))
                (failures(v))
                (refusals(v))
                (devices(v))
                @if let Some(spool) = &v.spool { (queue(spool, v.form_token.as_deref())) }
            }
        }
    };
    page.into_string()
}

fn mark(health: Health, text: &str) -> Markup {
    html! { span class=(health.class()) { (text) } }
}

fn listeners(v: &View) -> Markup {
    html! {
        h2 id="listeners" { "Listeners" }
        div.wrap { table {
            thead { tr { th { "protocol" } th { "address" } th { "TLS" } th { "delivery" } th { "sessions" } th { "device TLS versions" } th { "certificate (SHA-256)" } } }
            tbody {
                @for l in &v.listeners {
                    tr {
                        td data-label="protocol" { (l.protocol) } td data-label="address" { code { (l.address) } }
                        td data-label="TLS" {
                            (l.tls)
                            @if let Some(from) = l.legacy_from { " " (mark(Health::Warn, &format!("TLS {from} and later"))) }
                        }
                        td data-label="delivery" { (l.delivery.unwrap_or("-")) }
                        td.num data-label="sessions" { (l.sessions) " / " (l.max) }
                        td data-label="device TLS versions" {
                            @if l.tls_mix.is_empty() { "-" }
                            @for (i, (version, n)) in l.tls_mix.iter().enumerate() {
                                @if i > 0 { ", " }
                                (version) ": " (n)
                            }
                        }
                        td data-label="certificate (SHA-256)" {
                            @match &l.certificate {
                                Some((fingerprint, self_signed)) => {
                                    @if *self_signed { "self-signed " }
                                    code.fingerprint { (fingerprint) }
                                }
                                None => "-",
                            }
                        }
                    }
                }
            }
        } }
    }
}

fn accounts(v: &View) -> Markup {
    html! {
        h2 id="accounts" { "Accounts" }
        @if v.accounts.is_empty() { p.none { "No [[account]] in the configuration." } }
        @else {
            div.wrap { table {
                thead { tr {
                    th { "login" } th { "grant" } th { "mailbox" } th { "access token" }
                    th { "refresh token" } th { "device logins" } th { "upstream sessions" }
                    @if v.form_token.is_some() { th { "actions" } }
                } }
                tbody {
                    @for a in &v.accounts {
                        @let (token_health, token_text) = a.token.verdict(v.now);
                        @let (login_health, login_text) = a.logins.verdict(v.now);
                        tr {
                            td data-label="login" { code { (a.login) } }
                            td data-label="grant" { (a.grant) @if a.sends != "SMTP" { br; small { "sends through " (a.sends) } } @if !a.provider.is_empty() { br; small { "provider " (a.provider) } } }
                            td data-label="mailbox" { (a.mailbox) }
                            td data-label="access token" { (mark(token_health, &token_text)) }
                            td data-label="refresh token" {
                                @if a.token.refresh_token {
                                    "issued " (ago(v.now, a.token.refresh_issued)) br;
                                    "last refresh " (ago(v.now, a.token.refreshed))
                                } @else { "-" }
                            }
                            td data-label="device logins" { (mark(login_health, &login_text)) }
                            td data-label="upstream sessions" {
                                @for (protocol, sessions, limit) in &a.sessions {
                                    @let full = sessions >= limit;
                                    span class=(if full { "pill bad" } else { "pill" }) { (protocol) " " (sessions) "/" (limit) } " "
                                }
                            }
                            @if let Some(t) = &v.form_token {
                                td data-label="actions" { (forms::account(t, &a.login, a.token.refresh_token, a.token.refresh_issued.is_some())) }
                            }
                        }
                    }
                }
            } }
        }
    }
}

fn ago(now: u64, at: Option<u64>) -> String {
    match at {
        Some(t) => format!("{} ago", span(now.saturating_sub(t))),
        None => "never".into(),
    }
}

fn mailboxes(v: &View) -> Markup {
    html! {
        h2 id="mailboxes" { "Upstream sessions per mailbox" }
        @if v.replicas { p.meta { "Counts of this replica; the limit holds over all replicas." } }
        @if v.mailboxes.is_empty() { p.none { "No upstream session open." } }
        @else {
            div.wrap { table {
                thead { tr { th { "mailbox" } th { "protocol" } th { "sessions / limit" } th { "devices waiting" } } }
                tbody {
                    @for m in &v.mailboxes {
                        @let health = if m.waiting > 0 { Health::Bad } else if m.sessions >= m.limit { Health::Warn } else { Health::Ok };
                        tr {
                            td data-label="mailbox" { (m.mailbox) } td data-label="protocol" { (m.protocol.as_str()) }
                            td.num data-label="sessions / limit" { (mark(health, &format!("{} / {}", m.sessions, m.limit))) }
                            td.num data-label="devices waiting" { (m.waiting) }
                        }
                    }
                }
            } }
        }
    }
}

fn failures(v: &View) -> Markup {
    html! {
        h2 id="failures" { "Last login failures" }
        @if v.failures.is_empty() { p.none { "None since start." } }
        @else {
            div.wrap { table {
                thead { tr { th { "when" } th { "protocol" } th { "device" } th { "account" } th { "what went wrong" } } }
                tbody {
                    @for f in &v.failures {
                        tr {
                            td data-label="when" { (span(v.now.saturating_sub(f.at))) " ago" }
                            td data-label="protocol" { (f.protocol.as_str()) }
                            td data-label="device" { code { (f.peer) } }
                            td data-label="account" { @match &f.account { Some(a) => code { (a) }, None => span.unknown { "no such account" } } }
                            td data-label="what went wrong" {
                                span.bad { (f.reason) } ": " (f.error)
                                @if let Some(fix) = f.fix { br; span.fix { "Fix: " (fix) } }
                            }
                        }
                    }
                }
            } }
        }
    }
}

fn refusals(v: &View) -> Markup {
    html! {
        h2 id="refusals" { "Last refusals" }
        @if v.refusals.is_empty() { p.none { "None since start." } }
        @else {
            div.wrap { table {
                thead { tr { th { "when" } th { "protocol" } th { "device" } th { "login" } th { "what the device was told" } } }
                tbody {
                    @for r in &v.refusals {
                        tr {
                            td data-label="when" { (span(v.now.saturating_sub(r.at))) " ago" }
                            td data-label="protocol" { (r.protocol.as_str()) }
                            td data-label="device" { code { (r.peer) } @if let Some(name) = &r.name { " " (name) } }
                            td data-label="login" { @match &r.login { Some(l) => code { (l) }, None => span.unknown { "none" } } }
                            td data-label="what the device was told" {
                                span.bad { (r.reason) } ": " code { (r.said) }
                                @if let Some(fix) = r.fix { br; span.fix { "Fix: " (fix) } }
                            }
                        }
                    }
                }
            } }
        }
    }
}

fn devices(v: &View) -> Markup {
    html! {
        h2 id="devices" { "Devices" }
        @if v.devices.is_empty() { p.none { "None since start." } }
        @else {
            div.wrap { table {
                thead { tr { th { "device" } th { "name" } th { "login" } th { "protocol" } th { "TLS" } th { "last success" } th { "last failure" } } }
                tbody {
                    @for d in &v.devices {
                        tr {
                            td data-label="device" { code { (d.peer) } }
                            td data-label="name" { @match &d.name { Some(n) => (n), None => span.unknown { "not given" } } }
                            td data-label="login" { @match &d.login { Some(l) => code { (l) }, None => span.unknown { "none" } } }
                            td data-label="protocol" { (d.protocol.as_str()) }
                            td data-label="TLS" { (d.tls.unwrap_or("none")) }
                            td data-label="last success" { (ago(v.now, d.last_ok)) }
                            td data-label="last failure" {
                                @match &d.last_failure {
                                    None => span.unknown { "none" },
                                    Some((at, what, fix)) => {
                                        (span(v.now.saturating_sub(*at))) " ago: " span.bad { (what) }
                                        @if let Some(fix) = fix { br; span.fix { "Fix: " (fix) } }
                                    }
                                }
                            }
                        }
                    }
                }
            } }
        }
    }
}

fn queue(s: &SpoolView, form_token: Option<&str>) -> Markup {
    html! {
        h2 id="queue" { "SMTP queue" }
        p.meta {
            (s.waiting) " waiting"
            @if let Some(age) = s.oldest_age { ", the oldest for " (span(age)) }
            " · "
            @if s.dead > 0 { span.bad { (s.dead) " dead letters" } } @else { "0 dead letters" }
            " · " code { "oxbridge queue list" } " has the rest"
        }
        @if !s.rows.is_empty() {
            div.wrap { table {
                thead { tr { th { "id" } th { "age" } th { "from" } th { "to" } th { "tries" } th { "last error" } @if form_token.is_some() { th { "actions" } } } }
                tbody {
                    @for r in &s.rows {
                        tr {
                            td data-label="id" { code { (r.id) } } td.num data-label="age" { (span(r.age)) } td data-label="from" { (r.from) } td data-label="to" { (r.to) }
                            td.num data-label="tries" { (r.attempts) } td data-label="last error" { (r.last_error) }
                            @if let Some(t) = form_token { td data-label="actions" { (forms::message(t, &r.id)) } }
                        }
                    }
                }
            } }
        }
    }
}

#[cfg(test)]
#[path = "page_tests.rs"]
mod tests;
