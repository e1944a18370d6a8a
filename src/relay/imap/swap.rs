//! Moving an IMAP session: the new upstream connection is logged in and
//! set up like the device's session ([`prepare`]), then, with the device
//! held at a quiet point, the old connection's last news is collected and
//! the device's view checked against the new one ([`swap`]); the old
//! connection is logged out in the background ([`logout`]).

use std::future::Future;
use std::time::Duration;

use super::renew::REVOKED;
use crate::error::AuthError;
use crate::login::Renewed;
use crate::net::{Conn, LineError};
use crate::wire;
use crate::wire::imap::{literal_suffix, tagged, Reply, Request};
use crate::wire::imap_view::{search_numbers, seen, uidvalidity, Seen, Selected};

/// How long the new connection's commands and the old one's last answers
/// may take, each.
const SWAP_REPLY: Duration = Duration::from_secs(10);
/// Largest response read while moving (a `* SEARCH` of ~1 million UIDs).
const MAX_SWAP_RESPONSE: usize = 8 * 1024 * 1024;
/// The old connection gets this long to answer LOGOUT.
const LOGOUT_WAIT: Duration = Duration::from_secs(5);

/// What the device's session holds at the quiet point it is held at.
pub struct Held {
    /// The tag of the device's IDLE, when it is held inside one.
    pub idle_tag: Option<String>,
    pub enabled: Vec<String>,
    pub selected: Option<Selected>,
}

/// What a new connection was set up for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restored {
    enabled: Vec<String>,
    selected: Option<Selected>,
    /// The UIDVALIDITY the new connection announced.
    uidvalidity: Option<u32>,
    /// The server offers UNSELECT (RFC 3691).
    unselect: bool,
}

/// A new upstream connection, logged in and set up like the device's.
pub struct Prepared {
    pub renewed: Renewed,
    pub restored: Restored,
}

/// Log in again and set the new connection up like the device's session.
pub async fn prepare(
    login: impl Future<Output = Result<Renewed, AuthError>>,
    enabled: Vec<String>,
    selected: Option<Selected>,
) -> Result<Prepared, &'static str> {
    let mut renewed = login.await.map_err(|e| match e {
        AuthError::BadCredentials(REVOKED) => REVOKED,
        _ => "new login failed",
    })?;
    let mut restored = Restored {
        unselect: renewed
            .capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case("UNSELECT")),
        ..Restored::default()
    };
    restore(
        &mut renewed.conn,
        &mut restored,
        &enabled,
        selected.as_ref(),
    )
    .await?;
    Ok(Prepared { renewed, restored })
}

/// One command that brings a new connection closer to the device's state.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Unselect,
    Enable(Vec<String>),
    Select(Selected),
}

/// The commands that take a connection set up as `has` to the device's
/// state: the extensions it enabled (only ever added), then its mailbox
/// selected, or none. ENABLE is sent with no mailbox selected (RFC 5161),
/// so a selected one is closed first; closing is UNSELECT, never CLOSE
/// (which would expunge), and a server without UNSELECT cannot be moved
/// where that is needed.
fn plan(
    has: &Restored,
    enabled: &[String],
    selected: Option<&Selected>,
) -> Result<Vec<Step>, &'static str> {
    let mut steps = Vec::new();
    let mut open = has.selected.as_ref();
    let missing: Vec<String> = enabled
        .iter()
        .filter(|e| !has.enabled.iter().any(|h| h.eq_ignore_ascii_case(e)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        if open.is_some() {
            steps.push(Step::Unselect);
            open = None;
        }
        steps.push(Step::Enable(missing));
    }
    match selected {
        Some(s) if open != Some(s) => steps.push(Step::Select(s.clone())),
        None if open.is_some() => steps.push(Step::Unselect),
        _ => {}
    }
    if steps.contains(&Step::Unselect) && !has.unselect {
        return Err("no UNSELECT to close the mailbox with");
    }
    Ok(steps)
}

/// Bring `conn`, set up as `has`, to the device's state (see [`plan`]).
async fn restore(
    conn: &mut Conn,
    has: &mut Restored,
    enabled: &[String],
    selected: Option<&Selected>,
) -> Result<(), &'static str> {
    for step in plan(has, enabled, selected)? {
        match step {
            Step::Unselect => {
                send(conn, &Request::Unselect).await?;
                until_tagged(conn, |_, _| Ok(())).await?;
                has.selected = None;
                has.uidvalidity = None;
            }
            Step::Enable(exts) => {
                send(conn, &Request::Enable(&exts)).await?;
                until_tagged(conn, |_, _| Ok(())).await?;
                has.enabled.extend(exts);
            }
            Step::Select(s) => {
                // Whatever was selected is closed, even if this fails.
                has.selected = None;
                has.uidvalidity = None;
                send(
                    conn,
                    &Request::Select {
                        mailbox: &s.mailbox,
                        examine: s.examine,
                        condstore: s.condstore,
                    },
                )
                .await?;
                let mut uidvalidity = None;
                until_tagged(conn, |head, _| {
                    if let Some(v) = self::uidvalidity(head) {
                        uidvalidity = Some(v);
                    }
                    Ok(())
                })
                .await
                .map_err(|_| "mailbox not selectable again")?;
                has.selected = Some(s);
                has.uidvalidity = uidvalidity;
            }
        }
    }
    Ok(())
}

/// Move the held session from `old` to `new`; on success the device has
/// been told what changed (that many bytes) and `new` is where its next
/// byte goes.
pub async fn swap(
    device: &mut Conn,
    old: &mut Conn,
    new: &mut Conn,
    held: Held,
    restored: &mut Restored,
) -> Result<u64, &'static str> {
    let Held {
        idle_tag,
        enabled,
        selected,
    } = held;
    restore(new, restored, &enabled, selected.as_ref()).await?;
    let mut to_device = Vec::new();
    if let Some(tag) = &idle_tag {
        send(old, &Request::Done).await?;
        loop {
            let (head, whole) = response(old).await?;
            if head.starts_with(format!("{tag} ").as_bytes()) {
                break;
            }
            forwardable(&head)?;
            to_device.extend_from_slice(&whole);
        }
    }
    if let Some(selected) = &selected {
        if restored.uidvalidity != selected.uidvalidity {
            return Err("UIDVALIDITY changed");
        }
        send(old, &Request::UidSearchAll).await?;
        let mut known = None;
        until_tagged(old, |head, whole| {
            if let Some(uids) = search_numbers(head) {
                known = Some(uids);
                return Ok(());
            }
            forwardable(head)?;
            to_device.extend_from_slice(whole);
            Ok(())
        })
        .await?;
        send(new, &Request::UidSearchAll).await?;
        let mut now = None;
        let mut fetches = Vec::new();
        until_tagged(new, |head, whole| {
            if let Some(uids) = search_numbers(head) {
                now = Some(uids);
                return Ok(());
            }
            match seen(head) {
                Seen::Expunge => return Err("expunged while moving"),
                Seen::Fetch => fetches.extend_from_slice(whole),
                _ => {}
            }
            Ok(())
        })
        .await?;
        let (known, now) = (
            known.ok_or("no SEARCH answer")?,
            now.ok_or("no SEARCH answer")?,
        );
        if !now.starts_with(&known) {
            return Err("expunged while moving");
        }
        if now.len() > known.len() {
            to_device.extend_from_slice(&Reply::Exists(now.len()).to_bytes());
        }
        to_device.extend_from_slice(&fetches);
    }
    if let Some(tag) = &idle_tag {
        send(new, &Request::Idle(tag)).await?;
        loop {
            let (head, whole) = response(new).await?;
            if head.starts_with(b"+") {
                break;
            }
            if tagged_as(&head, tag) {
                return Err("IDLE refused");
            }
            // Updates since the SEARCH are the device's too.
            forwardable(&head)?;
            to_device.extend_from_slice(&whole);
        }
    }
    if !to_device.is_empty() {
        device
            .send(&to_device, SWAP_REPLY)
            .await
            .map_err(|_| "device write failed")?;
    }
    Ok(to_device.len() as u64)
}

/// An untagged response the device may get while it is held; an expunge
/// ends the move (the device's message numbers would no longer match).
fn forwardable(head: &[u8]) -> Result<(), &'static str> {
    match seen(head) {
        Seen::Expunge => Err("expunged while moving"),
        Seen::Bye { .. } => Err("upstream said BYE while moving"),
        _ if head.starts_with(b"* ") => Ok(()),
        _ => Err("unexpected response while moving"),
    }
}

fn tagged_as(head: &[u8], tag: &str) -> bool {
    head.strip_prefix(tag.as_bytes())
        .is_some_and(|rest| rest.starts_with(b" "))
}

async fn send(conn: &mut Conn, request: &Request<'_>) -> Result<(), &'static str> {
    conn.send(&request.to_bytes(), SWAP_REPLY)
        .await
        .map_err(|_| "upstream write failed")
}

/// Read responses to our tagged command, each given to `each` (its first
/// line and all its bytes), up to its tagged `OK`.
async fn until_tagged(
    conn: &mut Conn,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), &'static str>,
) -> Result<(), &'static str> {
    loop {
        let (head, whole) = response(conn).await?;
        if let Some((status, _)) = tagged(&head) {
            return match status {
                "OK" => Ok(()),
                _ => Err("upstream refused a command while moving"),
            };
        }
        each(&head, &whole)?;
    }
}

/// One whole response (lines and literals) from `conn`: its first line and
/// all its bytes, CRLFs included.
async fn response(conn: &mut Conn) -> Result<(Vec<u8>, Vec<u8>), &'static str> {
    let mut head = None;
    let mut whole = Vec::new();
    loop {
        let line = conn
            .read_line(MAX_SWAP_RESPONSE, SWAP_REPLY)
            .await
            .map_err(|e| match e {
                LineError::TooLong(_) => "response too large while moving",
                _ => "upstream read failed while moving",
            })?;
        whole.extend_from_slice(&line);
        whole.extend_from_slice(wire::CRLF);
        let literal = literal_suffix(&line);
        if head.is_none() {
            head = Some(line);
        }
        match literal {
            Some((n, _)) if whole.len() as u64 + n > MAX_SWAP_RESPONSE as u64 => {
                return Err("response too large while moving")
            }
            Some((n, _)) => {
                let data = conn
                    .read_exact(n as usize, SWAP_REPLY)
                    .await
                    .map_err(|_| "upstream read failed while moving")?;
                whole.extend_from_slice(&data);
            }
            None => return Ok((head.unwrap_or_default(), whole)),
        }
    }
}

/// Say LOGOUT on a connection that is no longer used, in the background.
pub fn logout(mut conn: Conn) {
    tokio::spawn(async move {
        if conn
            .send(&Request::Logout.to_bytes(), LOGOUT_WAIT)
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(LOGOUT_WAIT, async {
                while conn.read_line(MAX_SWAP_RESPONSE, LOGOUT_WAIT).await.is_ok() {}
            })
            .await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox() -> Selected {
        Selected {
            mailbox: b"INBOX".to_vec(),
            examine: false,
            condstore: false,
            uidvalidity: Some(7),
        }
    }

    fn has(enabled: &[&str], selected: Option<Selected>) -> Restored {
        Restored {
            enabled: enabled.iter().map(|e| e.to_string()).collect(),
            selected,
            uidvalidity: Some(7),
            unselect: true,
        }
    }

    fn exts(e: &[&str]) -> Vec<String> {
        e.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn a_fresh_connection_enables_before_it_selects() {
        let fresh = Restored {
            unselect: true,
            ..Restored::default()
        };
        assert_eq!(
            plan(&fresh, &exts(&["CONDSTORE"]), Some(&inbox())),
            Ok(vec![
                Step::Enable(exts(&["CONDSTORE"])),
                Step::Select(inbox())
            ])
        );
        assert_eq!(plan(&fresh, &[], None), Ok(vec![]));
    }

    #[test]
    fn a_mailbox_the_device_closed_is_closed() {
        assert_eq!(
            plan(&has(&[], Some(inbox())), &[], None),
            Ok(vec![Step::Unselect])
        );
        let mut no_unselect = has(&[], Some(inbox()));
        no_unselect.unselect = false;
        assert!(plan(&no_unselect, &[], None).is_err());
    }

    #[test]
    fn enable_is_never_sent_with_a_mailbox_selected() {
        // Enabled after the device closed its mailbox.
        assert_eq!(
            plan(&has(&[], Some(inbox())), &exts(&["CONDSTORE"]), None),
            Ok(vec![Step::Unselect, Step::Enable(exts(&["CONDSTORE"]))])
        );
        // ... and then selected it again.
        assert_eq!(
            plan(
                &has(&["QRESYNC"], Some(inbox())),
                &exts(&["qresync", "CONDSTORE"]),
                Some(&inbox())
            ),
            Ok(vec![
                Step::Unselect,
                Step::Enable(exts(&["CONDSTORE"])),
                Step::Select(inbox())
            ])
        );
    }

    #[test]
    fn nothing_is_sent_for_what_holds_already() {
        assert_eq!(
            plan(
                &has(&["CONDSTORE"], Some(inbox())),
                &exts(&["CONDSTORE"]),
                Some(&inbox())
            ),
            Ok(vec![])
        );
        let sent = Selected {
            mailbox: b"Sent Items".to_vec(),
            ..inbox()
        };
        assert_eq!(
            plan(&has(&[], Some(inbox())), &[], Some(&sent)),
            Ok(vec![Step::Select(sent)])
        );
    }
}
