//! The two pumps of a followed IMAP session: device to upstream and
//! upstream to device, bytes as they come, each command and response
//! noted in the [`View`]; at a move they stop where the session is quiet
//! (or, after a move found messages gone, at a command that may carry
//! expunges), and at the end the one towards the device says goodbye.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::LOGIN_EXPIRED;
use crate::config::Protocol;
use crate::net::stream::Stream;
use crate::relay::{write_within, Activity, COPY_BUFFER, DEVICE_CLOSED, FAREWELL_WRITE};
use crate::wire::imap::Reply;
use crate::wire::imap_frame::Framer;
use crate::wire::imap_view::{next_command, Next, Seen, View};
use crate::wire::{self, Farewell};

/// What the pumps are asked to do, and whether the device side stopped.
#[derive(Debug, Default, Clone, Copy)]
pub struct Control {
    /// Stop at the next quiet point: the session is about to move.
    pub pause: bool,
    /// ... and only where the device has sent a command that may carry
    /// expunges (`Next::MovePoint`), held before it is sent on: a move
    /// at rest found messages gone.
    pub at_command: bool,
    /// End the device's session at the next response boundary.
    pub bye: bool,
    /// The device-to-upstream pump has stopped between two commands.
    pub up_parked: bool,
    /// The upstream refused the literal the device's command was waiting
    /// to send: that command is over, and the device's next byte starts a
    /// new one.
    pub literal_refused: bool,
}

/// What both pumps share.
pub struct Shared {
    pub view: Mutex<View>,
    pub control: watch::Sender<Control>,
    pub activity: Activity,
    pub idle: Duration,
    pub to_upstream: AtomicU64,
    pub to_device: AtomicU64,
    /// When the device-to-upstream pump parked (ms since the start), or 0.
    pub parked_ms: AtomicU64,
}

impl Shared {
    pub fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the device has been held, if it is.
    pub fn held_for(&self) -> Option<Duration> {
        match self.parked_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.activity
                    .start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
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

pub enum Up {
    /// The device half-closed.
    Closed,
    Failed(&'static str),
}

pub enum Down {
    /// Stopped at a quiet point, for a move.
    Parked,
    Ended(&'static str),
}

/// What the device-to-upstream pump does at a command boundary.
#[derive(PartialEq, Eq)]
enum Hold {
    /// Send the next command on.
    Go,
    /// Wait for the rest of the next command's line.
    Wait,
    /// Stop here: the session is about to move.
    Park,
}

fn hold(shared: &Shared, next: &[u8]) -> Hold {
    let c = *shared.control.borrow();
    if !c.pause {
        return Hold::Go;
    }
    if !c.at_command {
        return Hold::Park;
    }
    match next_command(next) {
        Next::MovePoint => Hold::Park,
        Next::Incomplete => Hold::Wait,
        Next::Other => Hold::Go,
    }
}

/// Device to upstream: forward commands, note each in the view, stop
/// between two commands when a move is due and wait there until the move
/// is done (this future is then dropped) or given up.
pub async fn up_pump(
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
        while at < pending.len()
            && !(framer.at_boundary() && hold(shared, &pending[at..]) != Hold::Go)
        {
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
        if framer.at_boundary() && hold(shared, pending) == Hold::Park {
            let ms = shared.activity.start.elapsed().as_millis().max(1) as u64;
            shared.parked_ms.store(ms, Ordering::Relaxed);
            shared.control.send_modify(|c| c.up_parked = true);
            while shared.control.borrow().pause {
                if changes.changed().await.is_err() {
                    return Up::Failed("relay stopped");
                }
            }
            shared.parked_ms.store(0, Ordering::Relaxed);
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
pub async fn down_pump(
    from: &mut ReadHalf<Stream>,
    to: &mut WriteHalf<Stream>,
    pending: &mut BytesMut,
    framer: &mut Framer,
    shared: &Shared,
    changes: &mut watch::Receiver<Control>,
    abort: &CancellationToken,
) -> Down {
    // Whether the server said goodbye itself; if it closes without one,
    // the device hears ours (never a connection dropped in silence).
    let mut said_bye = false;
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
                let seen = shared.view().response(&unit);
                said_bye |= matches!(seen, Seen::Bye { .. });
                match seen {
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
                    let done = shared.activity.device_done.load(Ordering::Relaxed);
                    if !done {
                        lost(to, framer, pending, said_bye).await;
                    }
                    let _ = to.shutdown().await;
                    return Down::Ended(if done { DEVICE_CLOSED } else { "upstream closed" });
                }
                Ok(Ok(_)) => shared.activity.touch(),
                Ok(Err(_)) => {
                    if !shared.activity.device_done.load(Ordering::Relaxed) {
                        lost(to, framer, pending, said_bye).await;
                    }
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

/// The upstream went away without a `BYE`: tell the device, if the last
/// response it got was whole (a `BYE` inside a cut literal would be read
/// as the literal's bytes).
async fn lost(to: &mut WriteHalf<Stream>, framer: &Framer, pending: &BytesMut, said_bye: bool) {
    if !said_bye && framer.at_boundary() && pending.is_empty() {
        let _ = write_within(to, &Reply::UpstreamLost.to_bytes(), FAREWELL_WRITE).await;
    }
}
