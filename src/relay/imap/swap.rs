//! Moving an IMAP session: the new upstream connection is logged in and
//! set up like the device's session ([`prepare`]), then, with the device
//! held at a quiet point, the old connection's last news is collected and
//! the device's view checked against the new one ([`swap`]); the old
//! connection is logged out in the background ([`logout`]).

use std::future::Future;

use super::renew::REVOKED;
use super::talk::{response, send, tagged_as, until_tagged};
use crate::error::AuthError;
use crate::login::Renewed;
use crate::net::Conn;
use crate::wire::imap::Request;
use crate::wire::imap_sync::{
    count_after, reconcile, update, Numbers, Replay, Telling, Unreconciled, Update, BYE,
};
use crate::wire::imap_view::{uidvalidity, Selected};

/// Rounds of asking for UIDs that arrived while they were asked for.
const MAX_ROUNDS: usize = 8;

/// What the device's session holds at the quiet point it is held at.
pub struct Held {
    /// The tag of the device's IDLE, when it is held inside one.
    pub idle_tag: Option<String>,
    /// The device's next command, not sent on yet, is one whose answer
    /// may carry expunges (`imap_view::Next::MovePoint`).
    pub at_command: bool,
    pub enabled: Vec<String>,
    pub selected: Option<Selected>,
    /// How many messages the device was told its mailbox holds.
    pub count: Option<u32>,
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
    /// The message count and RECENT this connection announced last.
    count: Option<u32>,
    recent: Option<u32>,
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
                has.count = None;
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
                has.count = None;
                send(
                    conn,
                    &Request::Select {
                        mailbox: &s.mailbox,
                        examine: s.examine,
                        condstore: s.condstore,
                    },
                )
                .await?;
                let (mut uidvalidity, mut count, mut recent) = (None, None, None);
                until_tagged(conn, |head, _| {
                    if let Some(v) = self::uidvalidity(head) {
                        uidvalidity = Some(v);
                    }
                    if let Update::Recent(n) = update(head) {
                        recent = Some(n);
                    }
                    count = count_after(count, head);
                    Ok(())
                })
                .await
                .map_err(|_| "mailbox not selectable again")?;
                has.selected = Some(s);
                has.uidvalidity = uidvalidity;
                has.count = count;
                has.recent = recent;
            }
        }
    }
    Ok(())
}

/// How a move ended, when the session goes on.
/// The device is to be `told` these bytes first (whole responses; the
/// caller writes them, so that a write cut short is never followed by
/// anything), after which its mailbox holds `count` messages.
pub enum Moved {
    /// The device goes on with the new connection; `replay` is what of
    /// `told` reconciled its view.
    Done {
        told: Vec<u8>,
        replay: Replay,
        count: Option<u32>,
    },
    /// Messages left the mailbox while the device is at rest: it goes on
    /// with the old connection (`told` is that connection's news) until it
    /// sends a command the expunges can be told with.
    Later { told: Vec<u8>, count: Option<u32> },
}

/// Move the held session from `old` to the prepared connection: the old
/// connection's last news and the device's view (its UIDs by message
/// number, asked with FETCH, which carries no expunges), the new
/// connection's view (asked with UID FETCH), then the updates that make
/// the device's message numbers the new connection's.
pub async fn swap(
    old: &mut Conn,
    prepared: &mut Prepared,
    held: Held,
) -> Result<Moved, &'static str> {
    let (new, restored) = (&mut prepared.renewed.conn, &mut prepared.restored);
    restore(new, restored, &held.enabled, held.selected.as_ref()).await?;
    let may_expunge = held.idle_tag.is_some() || held.at_command;
    let mut to_device = Vec::new();
    let mut count = held.count;
    if let Some(tag) = &held.idle_tag {
        send(old, &Request::Done).await?;
        loop {
            let (head, whole) = response(old).await?;
            if tagged_as(&head, tag) {
                break;
            }
            untagged(&head)?;
            count = count_after(count, &head);
            to_device.extend_from_slice(&whole);
        }
    }
    let mut replay = Replay::default();
    if let Some(selected) = &held.selected {
        if restored.uidvalidity != selected.uidvalidity {
            return Err("UIDVALIDITY changed");
        }
        let device_uids = device_view(
            old,
            count.ok_or("message count not known")?,
            may_expunge,
            &mut to_device,
        )
        .await?;
        let now = session_view(new, restored).await?;
        let how = Telling {
            vanished: enabled(&held.enabled, "QRESYNC"),
            recent: !enabled(&held.enabled, "IMAP4REV2"),
            may_expunge,
        };
        match reconcile(&device_uids, &now, how) {
            Ok(r) => replay = r,
            Err(Unreconciled::Later) => {
                return Ok(Moved::Later {
                    told: to_device,
                    count: Some(device_uids.len() as u32),
                });
            }
            Err(Unreconciled::Refused(why)) => return Err(why),
        }
        to_device.extend_from_slice(&replay.bytes);
        count = Some(now.count());
    }
    if let Some(tag) = &held.idle_tag {
        send(new, &Request::Idle(tag)).await?;
        loop {
            let (head, whole) = response(new).await?;
            if head.starts_with(b"+") {
                break;
            }
            if tagged_as(&head, tag) {
                return Err("IDLE refused");
            }
            // Updates since the views were compared: the device's view is
            // the new connection's now, so they are the device's too.
            untagged(&head)?;
            count = count_after(count, &head);
            to_device.extend_from_slice(&whole);
        }
    }
    Ok(Moved::Done {
        told: to_device,
        replay,
        count,
    })
}

fn enabled(exts: &[String], name: &str) -> bool {
    exts.iter().any(|e| e.eq_ignore_ascii_case(name))
}

/// A response the device may be given as it came while it is held.
fn untagged(head: &[u8]) -> Result<(), &'static str> {
    match update(head) {
        Update::Bye => Err(BYE),
        _ if head.starts_with(b"* ") => Ok(()),
        _ => Err("unexpected response while moving"),
    }
}

/// The device's view (UIDs by message number) from the old connection,
/// whose message numbers are the device's: `FETCH n:* (UID)` for the
/// messages whose UIDs are not known, until none is left. What else the
/// old connection says is the device's news, in `to_device`; it never
/// announces expunges during FETCH, and if it does while the device is
/// at rest the move fails (the device could not be told).
async fn device_view(
    old: &mut Conn,
    count: u32,
    may_expunge: bool,
    to_device: &mut Vec<u8>,
) -> Result<Vec<u32>, &'static str> {
    let mut view = Numbers::new(count)?;
    for _ in 0..MAX_ROUNDS {
        let Some(first) = view.first_unknown() else {
            return view.uids();
        };
        send(old, &Request::FetchUids(first)).await?;
        until_tagged(old, |head, whole| {
            match update(head) {
                Update::Fetch { only_uid: true, .. } => return view.apply(head),
                Update::Expunge(_) | Update::Vanished(_) if !may_expunge => {
                    return Err("expunged during FETCH")
                }
                _ => {}
            }
            view.apply(head)?;
            to_device.extend_from_slice(whole);
            Ok(())
        })
        .await?;
    }
    view.uids()
        .map_err(|_| "mailbox kept changing while moving")
}

/// The new connection's view: `UID FETCH 1:* (UID)` (or NOOP while it
/// says the mailbox is empty), its untagged responses applied in the
/// order they came, and again from the highest UID known for messages
/// that arrived meanwhile.
async fn session_view(new: &mut Conn, restored: &mut Restored) -> Result<Numbers, &'static str> {
    let mut view = Numbers::new(restored.count.ok_or("message count not known")?)?;
    view.recent = restored.recent;
    let mut from = 1;
    for _ in 0..MAX_ROUNDS {
        match view.count() {
            0 => send(new, &Request::Noop).await?,
            _ => send(new, &Request::UidFetchUids(from)).await?,
        }
        let answered = until_tagged(new, |head, _| view.apply(head)).await;
        restored.count = Some(view.count());
        restored.recent = view.recent;
        answered?;
        if view.first_unknown().is_none() {
            return Ok(view);
        }
        from = view.highest_known().saturating_add(1);
    }
    Err("mailbox kept changing while moving")
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
            ..Restored::default()
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
