//! Health facts: the servers oxbridge depends on (the token endpoint, each
//! upstream, the Redis store) as last seen, and how `/healthz` and the
//! status page word them. None of it decides readiness: a replica whose
//! token endpoint or upstream is down still takes devices (a spooling
//! listener answers `250` and delivers later), so a load balancer must not
//! take it out. [`metrics`](crate::metrics) records the contacts here.
//!
//! Error texts kept here are transport errors and addresses, never a
//! secret, and are cut to one bounded line.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Protocol;

/// The longest error text a health fact keeps.
pub const MAX_CONTACT_ERROR: usize = 240;

/// A server oxbridge depends on, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub reachable: bool,
    /// Unix second of the first contact with this result in a row.
    pub since: u64,
    /// Unix second of the last contact.
    pub last: u64,
    /// The last error while unreachable: one line, at most
    /// [`MAX_CONTACT_ERROR`] bytes.
    pub error: Option<String>,
}

/// `previous` after a contact at `now` that reached the server or not,
/// failing with `error`.
pub fn noted(
    previous: Option<&Contact>,
    reachable: bool,
    error: Option<&str>,
    now: u64,
) -> Contact {
    let since = match previous {
        Some(p) if p.reachable == reachable => p.since,
        _ => now,
    };
    let error = match (reachable, error) {
        (true, _) => None,
        (false, Some(e)) => Some(one_line(e)),
        (false, None) => previous
            .filter(|p| !p.reachable)
            .and_then(|p| p.error.clone()),
    };
    Contact {
        reachable,
        since,
        last: now,
        error,
    }
}

/// `text` without control characters, cut to [`MAX_CONTACT_ERROR`] bytes.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_CONTACT_ERROR {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

static TOKEN_ENDPOINT: Mutex<Option<Contact>> = Mutex::new(None);
/// The Redis store's last PING.
static STORE: Mutex<Option<Contact>> = Mutex::new(None);
/// Per upstream protocol, in [`PROTOCOLS`] order.
static UPSTREAMS: Mutex<[Option<Contact>; 3]> = Mutex::new([None, None, None]);
const PROTOCOLS: [Protocol; 3] = [Protocol::Smtp, Protocol::Imap, Protocol::Pop3];

fn index(protocol: Protocol) -> usize {
    PROTOCOLS.iter().position(|p| *p == protocol).unwrap_or(0)
}

/// A contact with the token endpoint.
pub fn token_endpoint(reachable: bool, error: Option<&str>) {
    let mut slot = TOKEN_ENDPOINT.lock().unwrap_or_else(|e| e.into_inner());
    *slot = Some(noted(slot.as_ref(), reachable, error, unix_now()));
}

/// A dial of `protocol`'s upstream: `error` is None when it worked.
pub fn upstream(protocol: Protocol, error: Option<&str>) {
    let mut all = UPSTREAMS.lock().unwrap_or_else(|e| e.into_inner());
    let slot = &mut all[index(protocol)];
    *slot = Some(noted(slot.as_ref(), error.is_none(), error, unix_now()));
}

/// A PING of the Redis store: `error` is None when it answered.
pub fn store(error: Option<&str>) {
    let mut slot = STORE.lock().unwrap_or_else(|e| e.into_inner());
    *slot = Some(noted(slot.as_ref(), error.is_none(), error, unix_now()));
}

/// The state store as this process last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Store {
    /// The file store: nothing to reach.
    #[default]
    File,
    /// Redis: its last PING, None before the first.
    Redis(Option<Contact>),
}

/// What this process knows now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// None until the token endpoint was contacted.
    pub token_endpoint: Option<Contact>,
    /// The upstreams of the configured protocols; None until dialled.
    pub upstreams: Vec<(Protocol, Option<Contact>)>,
    pub store: Store,
}

/// The recorded facts for the configured `protocols`, with the Redis
/// store's if `redis`.
pub fn facts(protocols: &[Protocol], redis: bool) -> Facts {
    let all = UPSTREAMS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let store = match redis {
        true => Store::Redis(STORE.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        false => Store::File,
    };
    Facts {
        token_endpoint: TOKEN_ENDPOINT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        upstreams: protocols
            .iter()
            .map(|p| (*p, all[index(*p)].clone()))
            .collect(),
        store,
    }
}

fn stamp(at: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(at)).to_string()
}

/// A server's state: `reachable since T` or `unreachable since T (last
/// error: E)`, and when it was last contacted; `never` before that.
fn status(c: &Option<Contact>, never: &str) -> String {
    match c {
        None => never.to_string(),
        Some(c) if c.reachable => format!(
            "reachable since {} (last contact {})",
            stamp(c.since),
            stamp(c.last)
        ),
        Some(c) => format!(
            "unreachable since {} (last error: {}; last contact {})",
            stamp(c.since),
            c.error.as_deref().unwrap_or("no answer"),
            stamp(c.last)
        ),
    }
}

/// `/healthz`'s body: `ok`, then one line per fact. The first line stays
/// `ok` whatever the facts say: the process serves.
pub fn detail(f: &Facts) -> String {
    let mut lines = vec!["ok".to_string()];
    lines.push(format!(
        "token endpoint: {}",
        status(&f.token_endpoint, "not contacted yet")
    ));
    for (protocol, c) in &f.upstreams {
        lines.push(format!(
            "upstream {}: {}",
            protocol.as_str(),
            status(c, "not dialled yet")
        ));
    }
    lines.push(match &f.store {
        Store::File => "store: file (nothing to reach)".to_string(),
        Store::Redis(c) => format!("store: redis {}", status(c, "not checked yet")),
    });
    let mut body = lines.join("\n");
    body.push('\n');
    body
}

/// The outages an operator should see on the status page, in words.
pub fn problems(f: &Facts) -> Vec<String> {
    let mut out = Vec::new();
    let down = |c: &Option<Contact>| c.as_ref().filter(|c| !c.reachable).cloned();
    if let Some(c) = down(&f.token_endpoint) {
        out.push(format!(
            "token endpoint unreachable since {} (last error: {}): new logins fail; spooled mail waits and is delivered when it is back",
            stamp(c.since),
            c.error.as_deref().unwrap_or("no answer"),
        ));
    }
    for (protocol, c) in &f.upstreams {
        if let Some(c) = down(c) {
            out.push(format!(
                "upstream {} unreachable since {} (last error: {})",
                protocol.as_str(),
                stamp(c.since),
                c.error.as_deref().unwrap_or("no answer"),
            ));
        }
    }
    if let Store::Redis(c) = &f.store {
        if let Some(c) = down(c) {
            out.push(format!(
                "Redis store unreachable since {} (last error: {})",
                stamp(c.since),
                c.error.as_deref().unwrap_or("no answer"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_the_first_contact_with_the_same_result() {
        let down = noted(None, false, Some("cannot connect"), 100);
        assert_eq!(
            down,
            Contact {
                reachable: false,
                since: 100,
                last: 100,
                error: Some("cannot connect".into())
            }
        );
        // Still down: since stays, the error is kept when none is given.
        let still = noted(Some(&down), false, None, 160);
        assert_eq!((still.since, still.last), (100, 160));
        assert_eq!(still.error.as_deref(), Some("cannot connect"));
        // Back: a new since, no error.
        let up = noted(Some(&still), true, None, 200);
        assert_eq!(
            (up.reachable, up.since, up.error.clone()),
            (true, 200, None)
        );
        assert_eq!(noted(Some(&up), true, None, 260).since, 200);
    }

    #[test]
    fn a_kept_error_is_one_bounded_line() {
        let c = noted(None, false, Some("a\r\nb\u{1}c\0d"), 1);
        assert_eq!(c.error.as_deref(), Some("a  b c d"));
        let long = "x".repeat(10 * MAX_CONTACT_ERROR);
        let kept = noted(None, false, Some(&long), 1).error.unwrap();
        assert!(
            kept.len() <= MAX_CONTACT_ERROR + '…'.len_utf8(),
            "{}",
            kept.len()
        );
    }

    #[test]
    fn healthz_detail_names_an_outage_under_a_first_line_ok() {
        // 2026-12-06T04:10:00Z
        let t = 1_796_530_200;
        let f = Facts {
            token_endpoint: Some(noted(None, false, Some("cannot connect: refused\r\nX"), t)),
            upstreams: vec![
                (Protocol::Smtp, Some(noted(None, true, None, t + 5))),
                (Protocol::Imap, None),
            ],
            store: Store::Redis(Some(noted(None, false, Some("timed out"), t + 7))),
        };
        assert_eq!(
            detail(&f),
            "ok\n\
             token endpoint: unreachable since 2026-12-06T04:10:00Z (last error: cannot connect: refused  X; last contact 2026-12-06T04:10:00Z)\n\
             upstream smtp: reachable since 2026-12-06T04:10:05Z (last contact 2026-12-06T04:10:05Z)\n\
             upstream imap: not dialled yet\n\
             store: redis unreachable since 2026-12-06T04:10:07Z (last error: timed out; last contact 2026-12-06T04:10:07Z)\n"
        );
        let p = problems(&f);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with(
            "token endpoint unreachable since 2026-12-06T04:10:00Z (last error: cannot connect"
        ));
        assert_eq!(
            p[1],
            "Redis store unreachable since 2026-12-06T04:10:07Z (last error: timed out)"
        );
        // Nothing down, nothing to say; the file store needs nothing.
        let fine = Facts::default();
        assert!(problems(&fine).is_empty());
        let unchecked = Facts {
            store: Store::Redis(None),
            ..Facts::default()
        };
        assert!(detail(&unchecked).ends_with("\nstore: redis not checked yet\n"));
        assert_eq!(
            detail(&fine),
            "ok\ntoken endpoint: not contacted yet\nstore: file (nothing to reach)\n"
        );
    }
}
