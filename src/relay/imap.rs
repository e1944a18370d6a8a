//! The IMAP relay: bytes both ways as in the plain relay, while the
//! session is followed ([`View`]) so that it outlives its upstream token.
//!
//! Exchange ends an IMAP session when the token it logged in with expires
//! (`* BYE Session invalidated - AccessTokenExpired`). Before that, this
//! relay logs in again on a new upstream connection (the one login path,
//! [`Renew`]), ENABLEs what the device enabled and selects its mailbox
//! there, while the old connection still relays. Then it holds the device
//! at a quiet point (no command in flight, or inside IDLE after its `+`),
//! reads the device's view from the old connection and the new one's
//! (`swap`), tells the device what changed between them (expunges,
//! arrivals, flags: `wire::imap_sync`), IDLEs again under the device's own
//! tag, logs the old connection out and goes on relaying. Nothing of it
//! reaches the device but the updates it would have had.
//!
//! Expunges may only be told inside IDLE or in the answer to a command
//! (RFC 3501 7.4.1): a move at rest that finds messages gone leaves the
//! session on the old connection, and is made again before the device's
//! next command that may carry them (`imap_view::next_command`), which is
//! held until then and sent to the new connection after.
//!
//! When the session cannot be moved (a COMPRESS, a mailbox name kept only
//! in a literal, a command that does not finish in time, the new login
//! failing, a changed UIDVALIDITY, no such command before the deadline),
//! it ends with `* BYE` at a response boundary a few seconds before the
//! token runs out, never in the middle of a response. A device is held
//! only while a quiet point can come: if none comes within [`QUIET_WAIT`]
//! of silence (or [`QUIET_MAX`] in all), the device goes on and its session
//! ends with that `* BYE`.
//!
//! Timing, for a token of lifetime L: the new login starts L/4 (at most 5
//! minutes) before expiry; the session ends L/15 (at most 30 s, at least
//! 1 s) before expiry if it has not moved by then.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::pumps::{down_pump, up_pump, Control, Down, Shared, Up};
pub use self::renew::{Renew, Renewer};
use self::swap::{prepare, swap, Held, Moved, Prepared};
use self::talk::{logout, SWAP_REPLY};
use super::{Activity, Relayed, FAREWELL_WRITE};
use crate::net::Conn;
use crate::wire::imap::Reply;
use crate::wire::imap_frame::Framer;
use crate::wire::imap_view::{next_command, Next, View};

mod pumps;
mod renew;
mod swap;
mod talk;
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

/// Why a session ended when it could not move before its token expired.
pub const LOGIN_EXPIRED: &str = "login expired";

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
        parked_ms: AtomicU64::new(0),
    };
    let relayed = |end| Relayed {
        to_upstream: shared.to_upstream.load(Ordering::Relaxed),
        to_device: shared.to_device.load(Ordering::Relaxed),
        end,
    };
    let (mut device, mut upstream, mut expiry) = (device, upstream, expiry);
    let mut up_framer = Framer::default();
    // A new connection ready for a move that had to wait for a command.
    let mut waiting: Option<Prepared> = None;
    loop {
        let (device_stream, mut device_pending) = device.into_parts();
        let (upstream_stream, mut upstream_pending) = upstream.into_parts();
        let (mut device_r, mut device_w) = tokio::io::split(device_stream);
        let (mut upstream_r, mut upstream_w) = tokio::io::split(upstream_stream);
        let mut down_framer = Framer::default();
        let at_command = waiting.is_some();
        shared.control.send_replace(Control {
            pause: at_command,
            at_command,
            ..Control::default()
        });
        let (mut up_changes, mut down_changes) =
            (shared.control.subscribe(), shared.control.subscribe());
        let mut prepared: Option<Prepared> = waiting.take();
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
            let mut refusal: &'static str = match at_command {
                true => "no command to move at",
                false => "not moved in time",
            };
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
                        let held = shared.held_for().unwrap_or_default();
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
        let at_command = next_command(&device_pending) == Next::MovePoint;
        let mut device_conn = Conn::from_parts(device_r.unsplit(device_w), device_pending);
        let mut old = Conn::from_parts(upstream_r.unsplit(upstream_w), upstream_pending);
        let mut p = prepared.expect("parked only when prepared");
        let held = {
            let v = shared.view();
            Held {
                idle_tag: v.quiet().flatten().map(str::to_string),
                at_command,
                enabled: v.enabled.clone(),
                selected: v.selected.clone(),
                count: v.count,
            }
        };
        let moved = tokio::time::timeout(SWAP_TIME, swap(&mut old, &mut p, held))
            .await
            .unwrap_or(Err("timed out"));
        // What the device is told goes out whole or ends the session: a
        // write cut short is followed by nothing (not even the BYE).
        let told = match &moved {
            Ok(Moved::Done { told, .. } | Moved::Later { told, .. }) => told.as_slice(),
            Err(_) => &[],
        };
        if !told.is_empty() {
            if let Err(e) = device_conn.send(told, SWAP_REPLY).await {
                warn!(error = %e, "IMAP session ended while it moved: the device did not take its updates");
                logout(old);
                logout(p.renewed.conn);
                return relayed("device write failed");
            }
            shared
                .to_device
                .fetch_add(told.len() as u64, Ordering::Relaxed);
        }
        let held = shared.held_for().unwrap_or_default();
        shared.parked_ms.store(0, Ordering::Relaxed);
        match moved {
            Ok(Moved::Done { replay, count, .. }) => {
                // What the device was told here bypassed the view.
                shared.view().count = count;
                logout(old);
                crate::metrics::imap_swap(held);
                crate::metrics::imap_reconciled(replay.expunged, replay.arrived, replay.flags);
                info!(
                    held_ms = held.as_millis() as u64,
                    expunged = replay.expunged,
                    arrived = replay.arrived,
                    flags = replay.flags,
                    token_left_s = p
                        .renewed
                        .expires_at
                        .saturating_duration_since(Instant::now())
                        .as_secs(),
                    "IMAP session moved to a new upstream login"
                );
                expiry = Expiry {
                    at: p.renewed.expires_at,
                    lifetime: p.renewed.lifetime,
                };
                device = device_conn;
                upstream = p.renewed.conn;
            }
            Ok(Moved::Later { count, .. }) => {
                shared.view().count = count;
                // The session goes on with the old connection; the move is
                // made at the device's next command that may carry the
                // expunges (or the session ends with the BYE in time).
                crate::metrics::imap_swap_deferred(DEFERRED);
                info!(
                    held_ms = held.as_millis() as u64,
                    reason = DEFERRED,
                    "IMAP session move waits for the device's next command"
                );
                device = device_conn;
                upstream = old;
                waiting = Some(p);
            }
            Err(why) => {
                logout(old);
                warn!(reason = why, "IMAP session could not move to a new upstream login; ended before its token expired");
                crate::metrics::imap_swap_refused(why);
                let _ = device_conn
                    .send(&Reply::LoginExpired.to_bytes(), FAREWELL_WRITE)
                    .await;
                logout(p.renewed.conn);
                return relayed(LOGIN_EXPIRED);
            }
        }
    }
}

/// Why a move waits for a command.
const DEFERRED: &str = "expunged while at rest";
