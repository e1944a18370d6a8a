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
//! of a response. A device is held only while a quiet point can come: if
//! none comes within [`QUIET_WAIT`] of silence (or [`QUIET_MAX`] in all),
//! the device goes on and its session ends with that `* BYE`.
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

pub use self::renew::{Renew, Renewer};
use self::swap::{logout, prepare, swap, Held, Prepared};
use super::{write_within, Activity, Relayed, COPY_BUFFER, DEVICE_CLOSED, FAREWELL_WRITE};
use crate::config::Protocol;
use crate::net::stream::Stream;
use crate::net::Conn;
use crate::wire::imap::Reply;
use crate::wire::imap_frame::Framer;
use crate::wire::imap_view::{Seen, View};
use crate::wire::{self, Farewell};

mod renew;
mod swap;
#[cfg(test)]
mod tests;

/// The whole move, while the device is held.
const SWAP_TIME: Duration = Duration::from_secs(15);
/// A device held for a move goes on without it when nothing moved either
/// way for this long and the session is still not at a quiet point...
const QUIET_WAIT: Duration = Duration::from_secs(5);
/// ... or when it has been held this long.
const QUIET_MAX: Duration = Duration::from_secs(30);
/// How often a held device's wait is checked.
const QUIET_POLL: Duration = Duration::from_secs(1);
/// A failed new login is tried again this much later (until the deadline).
const RENEW_RETRY: Duration = Duration::from_secs(5);

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
    /// The upstream refused the literal the device's command was waiting
    /// to send: that command is over, and the device's next byte starts a
    /// new one.
    literal_refused: bool,
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
/// between two commands when a move is due and wait there until the move
/// is done (this future is then dropped) or given up.
async fn up_pump(
    from: &mut ReadHalf<Stream>,
    to: &mut WriteHalf<Stream>,
    pending: &mut BytesMut,
    framer: &mut Framer,
    shared: &Shared,
    changes: &mut watch::Receiver<Control>,
) -> Up {
    loop {
        if shared.control.borrow().literal_refused {
            // Only while the literal is still awaited: a device that sent
            // its bytes without waiting for `+` is already past it.
            if framer.awaits_literal().is_some() {
                framer.cancel_literal();
            }
            shared.control.send_modify(|c| c.literal_refused = false);
        }
        let mut at = 0;
        while at < pending.len() && !(framer.at_boundary() && shared.control.borrow().pause) {
            let (n, unit) = framer.feed(&pending[at..]);
            at += n;
            match unit {
                Some(unit) => shared.view().command(&unit),
                None => {
                    if let Some(head) = framer.awaits_literal() {
                        shared.view().literal_announced(head);
                    }
                }
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
            while shared.control.borrow().pause {
                if changes.changed().await.is_err() {
                    return Up::Failed("relay stopped");
                }
            }
            shared.control.send_modify(|c| c.up_parked = false);
            continue;
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
                match shared.view().response(&unit) {
                    Seen::Bye { expired: true } => crate::metrics::upstream_expiry(Protocol::Imap),
                    Seen::LiteralRefused => {
                        shared.control.send_modify(|c| c.literal_refused = true)
                    }
                    _ => {}
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

/// A new login and its setup under way.
type Preparing = Pin<Box<dyn Future<Output = Result<Prepared, &'static str>> + Send>>;

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
                        Up::Closed => up_done = true,
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
                            Err(why) if why == renew::REVOKED => {
                                // No new login for a removed or changed
                                // account: the BYE now, between responses.
                                refusal = why;
                                bye = true;
                                shared.control.send_modify(|c| c.bye = true);
                            }
                            Err(why) => {
                                refusal = why;
                                next_try = tokio::time::Instant::now() + RENEW_RETRY;
                            }
                        }
                    }
                    _ = tokio::time::sleep(QUIET_POLL), if prepared.is_some() => {
                        let held = paused_at.map(|t| t.elapsed()).unwrap_or_default();
                        let stalled = shared.activity.idle_for() >= QUIET_WAIT || held >= QUIET_MAX;
                        // Quiet: the pump towards the device parks (or has
                        // parked, and is writing its last bytes).
                        let quiet = shared.view().quiet().is_some();
                        if shared.control.borrow().up_parked && stalled && !quiet {
                            // No quiet point in sight (an answer the view
                            // waits for may never come): let the device go
                            // on, and end its session with the BYE instead.
                            shared.control.send_modify(|c| c.pause = false);
                            if let Some(p) = prepared.take() {
                                logout(p.renewed.conn);
                            }
                            refusal = "no quiet point";
                            next_try = bye_at + Duration::from_secs(3600);
                            warn!(held_ms = held.as_millis() as u64, "IMAP session not moved: no quiet point came; it ends before its token expires");
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
        let held = {
            let v = shared.view();
            Held {
                idle_tag: v.quiet().flatten().map(str::to_string),
                enabled: v.enabled.clone(),
                selected: v.selected.clone(),
            }
        };
        let moved = tokio::time::timeout(
            SWAP_TIME,
            swap(&mut device_conn, &mut old, &mut new, held, &mut restored),
        )
        .await
        .unwrap_or(Err("timed out"))
        .map(|told| {
            shared.to_device.fetch_add(told, Ordering::Relaxed);
        });
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
