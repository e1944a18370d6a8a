//! The IMAP relay: bytes both ways as in the plain relay, while the
//! session is followed ([`View`]) so that it outlives its upstream token.
//!
//! Exchange ends an IMAP session when the token it logged in with expires
//! (`* BYE Session invalidated - AccessTokenExpired`). Before that, this
//! relay logs in again on a new upstream connection (the one login path,
//! [`Renew`]), ENABLEs what the device enabled and selects its mailbox
//! there, while the old connection still relays. Then it holds the device
//! at a quiet point (no command in flight, or inside IDLE after its `+`),
//! checks that the device's view still holds on the new connection (the
//! same UIDVALIDITY; the UIDs the device knows by message number are the
//! first ones there, in the same order), tells the device of messages that
//! arrived meanwhile, IDLEs again under the device's own tag, logs the old
//! connection out and goes on relaying. Nothing of it reaches the device
//! but the updates it would have had.
//!
//! When the session cannot be moved (a COMPRESS, a mailbox name kept only
//! in a literal, a command that does not finish in time, the new login
//! failing, an expunge in between), it ends with `* BYE` at a response
//! boundary a few seconds before the token runs out, never in the middle
//! of a response.
//!
//! Timing, for a token of lifetime L: the new login starts L/4 (at most 5
//! minutes) before expiry; the session ends L/15 (at most 30 s, at least
//! 1 s) before expiry if it has not moved by then.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{write_within, Activity, Relayed, COPY_BUFFER, DEVICE_CLOSED, FAREWELL_WRITE};
use crate::config::Protocol;
use crate::error::AuthError;
use crate::login::Renewed;
use crate::net::stream::Stream;
use crate::net::{Conn, LineError};
use crate::wire::imap::{literal_suffix, tagged, Reply, Request};
use crate::wire::imap_view::{search_numbers, seen, uidvalidity, Framer, Seen, Selected, View};
use crate::wire::{self, Farewell};

/// How long the new connection's commands and the old one's last answers
/// may take, each.
const SWAP_REPLY: Duration = Duration::from_secs(10);
/// The whole move, while the device is held.
const SWAP_TIME: Duration = Duration::from_secs(15);
/// A failed new login is tried again this much later (until the deadline).
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// Largest response read while moving (a `* SEARCH` of ~1 million UIDs).
const MAX_SWAP_RESPONSE: usize = 8 * 1024 * 1024;
/// The old connection gets this long to answer LOGOUT.
const LOGOUT_WAIT: Duration = Duration::from_secs(5);

/// Logs in again upstream for this session (see [`crate::login::renew`]).
pub trait Renew: Send {
    fn renew(&mut self) -> Renewing;
}

/// A new login under way.
pub type Renewing = Pin<Box<dyn Future<Output = Result<Renewed, AuthError>> + Send>>;

impl<F, Fut> Renew for F
where
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<Renewed, AuthError>> + Send + 'static,
{
    fn renew(&mut self) -> Renewing {
        Box::pin(self())
    }
}

/// When the upstream token of a connection expires and how long it lived.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    pub at: Instant,
    pub lifetime: Duration,
}

impl Expiry {
    /// When to log in again.
    fn prepare_at(&self) -> Instant {
        let lead = (self.lifetime / 4).min(Duration::from_secs(300));
        self.at.checked_sub(lead).unwrap_or_else(Instant::now)
    }

    /// When to end a session that has not moved.
    fn bye_at(&self) -> Instant {
        let margin = (self.lifetime / 15).clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.at.checked_sub(margin).unwrap_or_else(Instant::now)
    }
}

/// What the pumps are asked to do, and whether the device side stopped.
#[derive(Debug, Default, Clone, Copy)]
struct Control {
    /// Stop at the next quiet point: the session is about to move.
    pause: bool,
    /// End the device's session at the next response boundary.
    bye: bool,
    /// The device-to-upstream pump has stopped between two commands.
    up_parked: bool,
}

/// What both pumps share.
struct Shared {
    view: Mutex<View>,
    control: watch::Sender<Control>,
    activity: Activity,
    idle: Duration,
    to_upstream: AtomicU64,
    to_device: AtomicU64,
}

impl Shared {
    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// At a response boundary: whether to stop here.
    fn stop_here(&self) -> Option<Stop> {
        let c = *self.control.borrow();
        if c.bye {
            Some(Stop::Bye)
        } else if c.pause && c.up_parked && self.view().quiet().is_some() {
            Some(Stop::Park)
        } else {
            None
        }
    }
}

enum Stop {
    Park,
    Bye,
}

enum Up {
    /// Stopped between two commands, for a move.
    Parked,
    /// The device half-closed.
    Closed,
    Failed(&'static str),
}

enum Down {
    /// Stopped at a quiet point, for a move.
    Parked,
    Ended(&'static str),
}

/// Device to upstream: forward commands, note each in the view, stop
/// between two commands when a move is due.
async fn up_pump(
    from: &mut ReadHalf<Stream>,
    to: &mut WriteHalf<Stream>,
    pending: &mut BytesMut,
    framer: &mut Framer,
    shared: &Shared,
    changes: &mut watch::Receiver<Control>,
) -> Up {
    loop {
        let mut at = 0;
        while at < pending.len() && !(framer.at_boundary() && shared.control.borrow().pause) {
            let (n, unit) = framer.feed(&pending[at..]);
            at += n;
            if let Some(unit) = unit {
                shared.view().command(&unit);
            }
        }
        if at > 0 {
            if let Err(e) = write_within(to, &pending[..at], shared.idle).await {
                return Up::Failed(e);
            }
            shared.to_upstream.fetch_add(at as u64, Ordering::Relaxed);
            pending.advance(at);
            shared.activity.touch();
        }
        if framer.at_boundary() && shared.control.borrow().pause {
            shared.control.send_modify(|c| c.up_parked = true);
            return Up::Parked;
        }
        pending.reserve(COPY_BUFFER);
        tokio::select! {
            r = from.read_buf(pending) => match r {
                Ok(0) => {
                    shared.activity.device_done.store(true, Ordering::Relaxed);
                    let _ = to.shutdown().await;
                    return Up::Closed;
                }
                Ok(_) => shared.activity.touch(),
                Err(_) => return Up::Failed("read failed"),
            },
            _ = changes.changed() => {}
        }
    }
}

/// Upstream to device: forward responses, note each in the view, stop at
/// a quiet point when a move is due, or say goodbye.
async fn down_pump(
    from: &mut ReadHalf<Stream>,
    to: &mut WriteHalf<Stream>,
    pending: &mut BytesMut,
    framer: &mut Framer,
    shared: &Shared,
    changes: &mut watch::Receiver<Control>,
    abort: &CancellationToken,
) -> Down {
    loop {
        let mut at = 0;
        let mut stop = None;
        loop {
            if framer.at_boundary() {
                stop = shared.stop_here();
                if stop.is_some() {
                    break;
                }
            }
            if at == pending.len() {
                break;
            }
            let (n, unit) = framer.feed(&pending[at..]);
            at += n;
            if let Some(unit) = unit {
                if shared.view().response(&unit) == (Seen::Bye { expired: true }) {
                    crate::metrics::upstream_expiry(Protocol::Imap);
                }
            }
        }
        if at > 0 {
            if let Err(e) = write_within(to, &pending[..at], shared.idle).await {
                return Down::Ended(e);
            }
            shared.to_device.fetch_add(at as u64, Ordering::Relaxed);
            pending.advance(at);
            shared.activity.touch();
        }
        match stop {
            Some(Stop::Park) => return Down::Parked,
            Some(Stop::Bye) => {
                let _ = write_within(to, &Reply::LoginExpired.to_bytes(), FAREWELL_WRITE).await;
                let _ = to.shutdown().await;
                return Down::Ended(LOGIN_EXPIRED);
            }
            None => {}
        }
        pending.reserve(COPY_BUFFER);
        tokio::select! {
            r = tokio::time::timeout(shared.idle, from.read_buf(pending)) => match r {
                Ok(Ok(0)) => {
                    let _ = to.shutdown().await;
                    return Down::Ended(if shared.activity.device_done.load(Ordering::Relaxed) {
                        DEVICE_CLOSED
                    } else {
                        "upstream closed"
                    });
                }
                Ok(Ok(_)) => shared.activity.touch(),
                Ok(Err(_)) => {
                    let _ = to.shutdown().await;
                    return Down::Ended("upstream failed");
                }
                Err(_) if shared.activity.idle_for() >= shared.idle => {
                    let _ = write_within(to, wire::farewell(Protocol::Imap, Farewell::Idle), FAREWELL_WRITE).await;
                    let _ = to.shutdown().await;
                    return Down::Ended("idle timeout");
                }
                Err(_) => {}
            },
            _ = changes.changed() => {}
            _ = abort.cancelled() => {
                let _ = write_within(to, wire::farewell(Protocol::Imap, Farewell::Shutdown), FAREWELL_WRITE).await;
                let _ = to.shutdown().await;
                return Down::Ended("shutdown");
            }
        }
    }
}

/// Why a session ended when it could not move before its token expired.
const LOGIN_EXPIRED: &str = "login expired";

/// What a new connection was set up for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Restored {
    enabled: Vec<String>,
    selected: Option<Selected>,
    /// The UIDVALIDITY the new connection announced.
    uidvalidity: Option<u32>,
}

/// A new login and its setup under way.
type Preparing = Pin<Box<dyn Future<Output = Result<Prepared, &'static str>> + Send>>;

/// A new upstream connection, logged in and set up like the device's.
struct Prepared {
    renewed: Renewed,
    restored: Restored,
}

/// Relay a logged-in IMAP session until it ends. With `renew`, the session
/// moves to a new upstream connection before each token expires; without,
/// the upstream ends it when it wants.
pub async fn relay(
    device: Conn,
    upstream: Conn,
    expiry: Expiry,
    idle: Duration,
    abort: CancellationToken,
    mut renew: Option<Box<dyn Renew + '_>>,
) -> Relayed {
    let (control, _) = watch::channel(Control::default());
    let shared = Shared {
        view: Mutex::new(View::default()),
        control,
        activity: Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            device_done: AtomicBool::new(false),
        },
        idle,
        to_upstream: AtomicU64::new(0),
        to_device: AtomicU64::new(0),
    };
    let relayed = |end| Relayed {
        to_upstream: shared.to_upstream.load(Ordering::Relaxed),
        to_device: shared.to_device.load(Ordering::Relaxed),
        end,
    };
    let (mut device, mut upstream, mut expiry) = (device, upstream, expiry);
    let mut up_framer = Framer::default();
    loop {
        let (device_stream, mut device_pending) = device.into_parts();
        let (upstream_stream, mut upstream_pending) = upstream.into_parts();
        let (mut device_r, mut device_w) = tokio::io::split(device_stream);
        let (mut upstream_r, mut upstream_w) = tokio::io::split(upstream_stream);
        let mut down_framer = Framer::default();
        shared.control.send_replace(Control::default());
        let (mut up_changes, mut down_changes) =
            (shared.control.subscribe(), shared.control.subscribe());
        let mut prepared: Option<Prepared> = None;
        let mut paused_at = None;
        let ended = {
            let up = up_pump(
                &mut device_r,
                &mut upstream_w,
                &mut device_pending,
                &mut up_framer,
                &shared,
                &mut up_changes,
            );
            let down = down_pump(
                &mut upstream_r,
                &mut device_w,
                &mut upstream_pending,
                &mut down_framer,
                &shared,
                &mut down_changes,
                &abort,
            );
            tokio::pin!(up, down);
            let mut up_done = false;
            let mut preparing: Option<Preparing> = None;
            let mut next_try = tokio::time::Instant::from_std(expiry.prepare_at());
            let bye_at = tokio::time::Instant::from_std(expiry.bye_at());
            let mut refusal: &'static str = "not moved in time";
            let mut bye = false;
            let moving = renew.is_some();
            loop {
                tokio::select! {
                    d = &mut down => break match d {
                        Down::Parked => None,
                        Down::Ended(why) => {
                            if why == LOGIN_EXPIRED {
                                warn!(reason = refusal, "IMAP session could not move to a new upstream login; ended before its token expired");
                                crate::metrics::imap_swap_refused(refusal);
                            }
                            Some(why)
                        }
                    },
                    u = &mut up, if !up_done => match u {
                        Up::Parked | Up::Closed => up_done = true,
                        Up::Failed(why) => break Some(why),
                    },
                    _ = tokio::time::sleep_until(next_try), if moving && preparing.is_none() && prepared.is_none() && !bye && !shared.activity.device_done.load(Ordering::Relaxed) => {
                        let snapshot = {
                            let v = shared.view();
                            v.unmovable.ok_or_else(|| (v.enabled.clone(), v.selected.clone()))
                        };
                        match snapshot {
                            Ok(why) => {
                                refusal = why;
                                next_try = bye_at + Duration::from_secs(3600);
                            }
                            Err((enabled, selected)) => {
                                let login = renew.as_mut().expect("moving").renew();
                                preparing = Some(Box::pin(prepare(login, enabled, selected)));
                            }
                        }
                    }
                    r = async { preparing.as_mut().expect("guarded").await }, if preparing.is_some() => {
                        preparing = None;
                        match r {
                            Ok(p) => {
                                prepared = Some(p);
                                paused_at = Some(Instant::now());
                                shared.control.send_modify(|c| c.pause = true);
                            }
                            Err(why) => {
                                refusal = why;
                                next_try = tokio::time::Instant::now() + RENEW_RETRY;
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(bye_at), if moving && !bye => {
                        bye = true;
                        shared.control.send_modify(|c| c.bye = true);
                    }
                }
            }
        };
        if let Some(why) = ended {
            if let Some(p) = prepared {
                logout(p.renewed.conn);
            }
            return relayed(why);
        }
        // Both pumps stopped at a quiet point: move the session.
        let mut device_conn = Conn::from_parts(device_r.unsplit(device_w), device_pending);
        let old = Conn::from_parts(upstream_r.unsplit(upstream_w), upstream_pending);
        let Prepared {
            renewed,
            mut restored,
        } = prepared.expect("parked only when prepared");
        let mut new = renewed.conn;
        let mut old = old;
        let moved = tokio::time::timeout(
            SWAP_TIME,
            swap(&mut device_conn, &mut old, &mut new, &shared, &mut restored),
        )
        .await
        .unwrap_or(Err("timed out"));
        let held = paused_at.map(|t| t.elapsed()).unwrap_or_default();
        logout(old);
        match moved {
            Ok(()) => {
                crate::metrics::imap_swap(held);
                info!(
                    held_ms = held.as_millis() as u64,
                    token_left_s = renewed
                        .expires_at
                        .saturating_duration_since(Instant::now())
                        .as_secs(),
                    "IMAP session moved to a new upstream login"
                );
                device = device_conn;
                upstream = new;
                expiry = Expiry {
                    at: renewed.expires_at,
                    lifetime: renewed.lifetime,
                };
            }
            Err(why) => {
                warn!(reason = why, "IMAP session could not move to a new upstream login; ended before its token expired");
                crate::metrics::imap_swap_refused(why);
                let _ = device_conn
                    .send(&Reply::LoginExpired.to_bytes(), FAREWELL_WRITE)
                    .await;
                logout(new);
                return relayed(LOGIN_EXPIRED);
            }
        }
    }
}

/// Log in again and set the new connection up like the device's session.
async fn prepare(
    login: Renewing,
    enabled: Vec<String>,
    selected: Option<Selected>,
) -> Result<Prepared, &'static str> {
    let mut renewed = login.await.map_err(|_| "new login failed")?;
    let restored = restore(&mut renewed.conn, enabled, selected).await?;
    Ok(Prepared { renewed, restored })
}

/// ENABLE and SELECT (or EXAMINE) on `conn` as the device did.
async fn restore(
    conn: &mut Conn,
    enabled: Vec<String>,
    selected: Option<Selected>,
) -> Result<Restored, &'static str> {
    if !enabled.is_empty() {
        send(conn, &Request::Enable(&enabled)).await?;
        until_tagged(conn, |_, _| Ok(())).await?;
    }
    let mut uidvalidity = None;
    if let Some(s) = &selected {
        send(
            conn,
            &Request::Select {
                mailbox: &s.mailbox,
                examine: s.examine,
                condstore: s.condstore,
            },
        )
        .await?;
        until_tagged(conn, |head, _| {
            if let Some(v) = self::uidvalidity(head) {
                uidvalidity = Some(v);
            }
            Ok(())
        })
        .await
        .map_err(|_| "mailbox not selectable again")?;
    }
    Ok(Restored {
        enabled,
        selected,
        uidvalidity,
    })
}

/// Move the held session from `old` to `new`; on success the device has
/// been told what changed and `new` is where its next byte goes.
async fn swap(
    device: &mut Conn,
    old: &mut Conn,
    new: &mut Conn,
    shared: &Shared,
    restored: &mut Restored,
) -> Result<(), &'static str> {
    let (idle_tag, enabled, selected) = {
        let v = shared.view();
        let idle_tag = v.quiet().flatten().map(str::to_string);
        (idle_tag, v.enabled.clone(), v.selected.clone())
    };
    if restored.enabled != enabled || restored.selected != selected {
        *restored = restore(new, enabled, selected.clone()).await?;
    }
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
        shared
            .to_device
            .fetch_add(to_device.len() as u64, Ordering::Relaxed);
    }
    Ok(())
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
fn logout(mut conn: Conn) {
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
