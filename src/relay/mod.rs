//! The bridge: once the upstream login is done, bytes are copied both ways
//! untouched until one side is done. IMAP sessions go through [`imap`],
//! which also follows them so that they outlive their token.
//!
//! Whatever either side had sent past its last parsed line (pipelined
//! commands) is replayed first. SMTP sessions with `allowed_senders` go
//! through [`smtp`] instead, which checks every MAIL. The session ends when the upstream closes,
//! when the device fails, when both have been silent for the idle timeout,
//! or on a hard shutdown. A device that half-closes still gets the rest of
//! the upstream's replies.
//!
//! In SMTP, the upstream's replies on their way to the device are
//! watched for refusals (4xx, 5xx: its answers to MAIL, RCPT, DATA), each
//! logged with its fix ([`crate::device::refusal`]). Only that direction
//! is scanned, and only in SMTP, where it carries nothing but replies: a
//! message's bytes go the other way untouched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::config::Protocol;
use crate::device::refusal::{self, Refused, Who};
use crate::net::Conn;
use crate::wire::smtp::stream::RefusalWatch;
use crate::wire::{self, Farewell as Goodbye};

pub mod imap;
pub mod smtp;

/// Size of each direction's copy buffer.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Bytes moved and why the relay ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Relayed {
    pub to_upstream: u64,
    pub to_device: u64,
    pub end: &'static str,
}

/// Milliseconds since `start` of the last byte moved in either direction.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// The device has finished sending (it half-closed).
    device_done: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The pump towards the device speaks for the proxy at the end: it tells
/// the device why the session is closed (silence, a lost upstream).
struct Farewell {
    protocol: Protocol,
    /// Hard shutdown: say goodbye in the protocol, then close.
    abort: CancellationToken,
    /// The last bytes the upstream sent, to tell a goodbye from a loss.
    tail: Vec<u8>,
    /// SMTP: the upstream's refusals, found and recorded for this device.
    watch: Option<Watch>,
}

/// What finds and records an SMTP upstream's refusals for one device.
struct Watch {
    replies: RefusalWatch,
    who: Who,
    once: refusal::Once,
}

impl Farewell {
    fn new(protocol: Protocol, abort: CancellationToken, who: Option<Who>) -> Farewell {
        Farewell {
            protocol,
            abort,
            tail: Vec::with_capacity(TAIL),
            watch: who.filter(|_| protocol == Protocol::Smtp).map(|who| Watch {
                replies: RefusalWatch::default(),
                who,
                once: refusal::Once::default(),
            }),
        }
    }

    /// The upstream's bytes on their way to the device: remembered, and
    /// in SMTP searched for refusals.
    fn heard(&mut self, data: &[u8]) {
        self.remember(data);
        if let Some(w) = self.watch.as_mut() {
            let (who, once) = (&w.who, &mut w.once);
            w.replies.feed(data, |code, line| {
                if let Some(why) = Refused::upstream(code) {
                    once.record(who, why, &String::from_utf8_lossy(line));
                }
            });
        }
    }

    fn remember(&mut self, data: &[u8]) {
        self.tail
            .extend_from_slice(&data[data.len().saturating_sub(TAIL)..]);
        let excess = self.tail.len().saturating_sub(TAIL);
        self.tail.drain(..excess);
    }

    /// Whether the upstream's last words were that the token expired
    /// (Exchange: `-ERR ... AccessTokenExpired` in POP3, `* BYE` in IMAP).
    fn token_expired(&self) -> bool {
        memchr::memmem::find(&self.tail, b"AccessTokenExpired").is_some()
    }

    /// What to tell the device when the upstream went away: SMTP devices
    /// must hear a 4xx unless the server said goodbye (`221`) or the device
    /// had already ended the session, so that a message cut off in DATA is
    /// retried, never taken as sent.
    fn on_upstream_loss(&self, device_done: bool) -> Option<&'static [u8]> {
        match self.protocol {
            Protocol::Smtp if !wire::smtp::said_goodbye(&self.tail) && !device_done => Some(
                wire::smtp::upstream_lost(wire::smtp::awaiting_data(&self.tail)),
            ),
            _ => None,
        }
    }
}

/// Bytes of upstream output kept to recognise its goodbye.
const TAIL: usize = 512;

/// Copy one direction until EOF (then shut the writer down) or an error.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    residual: BytesMut,
    activity: Arc<Activity>,
    idle: Duration,
    count: Arc<AtomicU64>,
    mut farewell: Option<Farewell>,
) -> Result<(), &'static str>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !residual.is_empty() {
        write_within(&mut to, &residual, idle).await?;
        count.fetch_add(residual.len() as u64, Ordering::Relaxed);
        if let Some(f) = farewell.as_mut() {
            f.heard(&residual);
        }
    }
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let read = match &farewell {
            Some(f) => tokio::select! {
                r = tokio::time::timeout(idle, from.read(&mut buf)) => r,
                _ = f.abort.cancelled() => {
                    let _ = write_within(&mut to, wire::farewell(f.protocol, Goodbye::Shutdown), FAREWELL_WRITE).await;
                    let _ = to.shutdown().await;
                    return Err("shutdown");
                }
            },
            None => tokio::time::timeout(idle, from.read(&mut buf)).await,
        };
        let n = match (read, &farewell) {
            (Ok(Ok(n)), _) if n > 0 => n,
            (Ok(result), Some(f)) => {
                if f.token_expired() {
                    crate::metrics::upstream_expiry(f.protocol);
                }
                let lost = f.on_upstream_loss(activity.device_done.load(Ordering::Relaxed));
                if let Some(text) = lost {
                    let _ = write_within(&mut to, text, FAREWELL_WRITE).await;
                }
                let _ = to.shutdown().await;
                return match (result, lost) {
                    (_, Some(_)) => Err(UPSTREAM_LOST),
                    (Ok(_), None) => Ok(()),
                    (Err(_), None) => Err("upstream failed"),
                };
            }
            (Ok(Ok(_)), None) => {
                // The device half-closed: an upstream that closes after
                // this is answering the device's end, not lost.
                activity.device_done.store(true, Ordering::Relaxed);
                let _ = to.shutdown().await;
                return Ok(());
            }
            (Ok(Err(_)), None) => return Err("read failed"),
            // Only the pump towards the device ends the session on silence,
            // with the protocol's goodbye.
            (Err(_), Some(f)) if activity.idle_for() >= idle => {
                let _ = write_within(
                    &mut to,
                    wire::farewell(f.protocol, Goodbye::Idle),
                    FAREWELL_WRITE,
                )
                .await;
                let _ = to.shutdown().await;
                return Err("idle timeout");
            }
            (Err(_), _) => continue,
        };
        activity.touch();
        if let Err(e) = write_within(&mut to, &buf[..n], idle).await {
            if farewell.is_none() {
                // The upstream is gone: keep reading what the device still
                // sends (its DATA), so that it reads our 4xx instead of
                // being reset.
                drain(&mut from, &mut buf).await;
            }
            return Err(e);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(f) = farewell.as_mut() {
            f.heard(&buf[..n]);
        }
        activity.touch();
    }
}

/// Read and drop what a device still sends after its upstream is gone,
/// bounded in bytes and time.
async fn drain<R: AsyncRead + Unpin>(from: &mut R, buf: &mut [u8]) {
    let mut left = DRAIN_LIMIT;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    while left > 0 {
        match tokio::time::timeout_at(deadline, from.read(buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// Why a relay ended when the upstream vanished without saying goodbye.
const UPSTREAM_LOST: &str = "upstream lost";
/// Why a relay ended when the device ended it (it half-closed, then the
/// upstream finished).
const DEVICE_CLOSED: &str = "device closed";

/// How much a device may still send after its upstream is gone.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// On a hard shutdown, let the pump towards the device say goodbye.
async fn goodbye<F: std::future::Future<Output = Result<(), &'static str>> + Unpin>(
    to_device: &mut F,
) -> &'static str {
    let _ = tokio::time::timeout(FAREWELL_WRITE, to_device).await;
    "shutdown"
}

/// How long the device gets to take a farewell reply.
const FAREWELL_WRITE: Duration = Duration::from_secs(5);

async fn write_within<W: AsyncWrite + Unpin>(
    to: &mut W,
    data: &[u8],
    wait: Duration,
) -> Result<(), &'static str> {
    let write = async {
        to.write_all(data).await?;
        to.flush().await
    };
    match tokio::time::timeout(wait, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("write failed"),
        Err(_) => Err("write timed out"),
    }
}

/// Relay a logged-in session until it ends. An SMTP session whose
/// senders are restricted goes through [`smtp::relay`], which checks every
/// MAIL; every other session is copied byte for byte. `who` is the device,
/// for the upstream's refusals (SMTP).
pub async fn relay(
    device: Conn,
    upstream: Conn,
    idle: Duration,
    (protocol, who): (Protocol, Option<Who>),
    abort: CancellationToken,
    senders: Option<wire::smtp::stream::Senders>,
) -> Relayed {
    if let (Protocol::Smtp, Some(senders)) = (protocol, senders) {
        return smtp::relay(device, upstream, idle, abort, (senders, who)).await;
    }
    let (device, device_residual) = device.into_parts();
    let (upstream, upstream_residual) = upstream.into_parts();
    let (device_r, device_w) = tokio::io::split(device);
    let (upstream_r, upstream_w) = tokio::io::split(upstream);
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        device_done: AtomicBool::new(false),
    });
    let ended = activity.clone();
    let (up_count, down_count) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let to_upstream = pump(
        device_r,
        upstream_w,
        device_residual,
        activity.clone(),
        idle,
        up_count.clone(),
        None,
    );
    let farewell = Farewell::new(protocol, abort.clone(), who);
    let to_device = pump(
        upstream_r,
        device_w,
        upstream_residual,
        activity,
        idle,
        down_count.clone(),
        Some(farewell),
    );
    tokio::pin!(to_upstream, to_device);

    let end = tokio::select! {
        r = &mut to_device => match r {
            Ok(()) if ended.device_done.load(Ordering::Relaxed) => DEVICE_CLOSED,
            Ok(()) => "upstream closed",
            Err(UPSTREAM_LOST) => {
                // Let the device finish sending (drained) and read the 4xx.
                tokio::select! {
                    _ = tokio::time::timeout(DRAIN_TIME, &mut to_upstream) => {}
                    _ = abort.cancelled() => {}
                }
                UPSTREAM_LOST
            }
            Err(e) => e,
        },
        r = &mut to_upstream => match r {
            // The device half-closed: let the upstream finish answering.
            Ok(()) => tokio::select! {
                r = &mut to_device => r.err().unwrap_or(DEVICE_CLOSED),
                _ = abort.cancelled() => goodbye(&mut to_device).await,
            },
            Err(e) => e,
        },
        _ = abort.cancelled() => goodbye(&mut to_device).await,
    };
    Relayed {
        to_upstream: up_count.load(Ordering::Relaxed),
        to_device: down_count.load(Ordering::Relaxed),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::conn::tests::pair;

    fn farewell(protocol: Protocol) -> Farewell {
        Farewell::new(protocol, CancellationToken::new(), None)
    }

    #[test]
    fn farewell_keeps_a_bounded_tail() {
        let mut f = farewell(Protocol::Smtp);
        f.remember(&vec![b'x'; 10_000]);
        f.remember(b"\r\n221 Bye\r\n");
        assert!(f.tail.len() <= TAIL);
        assert!(f.on_upstream_loss(false).is_none());
        f.remember(b"354 go ahead\r\n");
        assert_eq!(
            f.on_upstream_loss(false).unwrap(),
            b"421 4.4.2 Connection to the mail server lost during the message; it was not accepted, try again\r\n"
        );
        f.remember(b"250 2.0.0 Ok: queued as 4A\r\n");
        assert_eq!(
            f.on_upstream_loss(false).unwrap(),
            b"421 4.4.2 Connection to the mail server lost, try again later\r\n",
            "after a 250 the device must not hear that nothing was accepted"
        );
        assert!(f.on_upstream_loss(true).is_none());
        assert!(farewell(Protocol::Imap).on_upstream_loss(false).is_none());
        let mut f = farewell(Protocol::Pop3);
        f.remember(b"+OK 3 messages\r\n");
        assert!(!f.token_expired());
        f.remember(b"-ERR Session invalidated - AccessTokenExpired\r\n");
        assert!(f.token_expired());
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// nodemailer's habit: the message is accepted, and the device
    /// half-closes without QUIT. The upstream then closes too. The device
    /// must not be told that nothing was accepted, and the session ended by
    /// the device.
    #[tokio::test]
    async fn device_half_close_after_queued_is_the_device_ending() {
        let (device, mut device_peer) = pair().await;
        let (upstream, mut upstream_peer) = pair().await;
        let relay = tokio::spawn(relay(
            device,
            upstream,
            WAIT,
            (Protocol::Smtp, None),
            CancellationToken::new(),
            None,
        ));
        let queued = b"250 2.0.0 Ok: queued as 4A\r\n";
        upstream_peer.write_all(queued).await.unwrap();
        let mut got = vec![0u8; queued.len()];
        tokio::time::timeout(WAIT, device_peer.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        device_peer.shutdown().await.unwrap();
        // The upstream sees the device's end, and closes (Postfix does).
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, upstream_peer.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        drop(upstream_peer);
        let mut after = Vec::new();
        tokio::time::timeout(WAIT, device_peer.read_to_end(&mut after))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&after), "");
        let r = tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
        assert_eq!(r.end, "device closed");
    }

    /// The upstream's refusal after login reaches the device untouched and
    /// the board with its fix; a 250 does not, nor a POP3 `-ERR`.
    #[tokio::test]
    async fn the_upstreams_refusals_are_recorded_with_their_fix() {
        let peer: std::net::IpAddr = "192.0.2.77".parse().unwrap();
        for (protocol, expected) in [(Protocol::Pop3, 0), (Protocol::Smtp, 1)] {
            let (device, mut device_peer) = pair().await;
            let (upstream, mut upstream_peer) = pair().await;
            let who = Who::new(protocol, peer, None);
            let relay = tokio::spawn(relay(
                device,
                upstream,
                WAIT,
                (protocol, Some(who)),
                CancellationToken::new(),
                None,
            ));
            let said: &[u8] = match protocol {
                Protocol::Smtp => b"250 2.1.0 Ok\r\n550 5.7.60 SMTP; Client does not have permissions to send as this sender\r\n",
                _ => b"+OK\r\n-ERR 5.7.60 no such message\r\n",
            };
            upstream_peer.write_all(said).await.unwrap();
            drop(upstream_peer);
            let mut got = Vec::new();
            tokio::time::timeout(WAIT, device_peer.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert!(got.starts_with(said), "{}", String::from_utf8_lossy(&got));
            device_peer.shutdown().await.unwrap();
            tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
            let seen: Vec<_> = crate::status::board::refusals()
                .into_iter()
                .filter(|r| r.peer == peer)
                .collect();
            assert_eq!(seen.len(), expected, "{protocol:?}: {seen:?}");
        }
        let seen = crate::status::board::refusals()
            .into_iter()
            .find(|r| r.peer == peer)
            .unwrap();
        assert_eq!(seen.reason, "upstream_refused");
        assert!(seen.said.starts_with("550 5.7.60 SMTP;"), "{}", seen.said);
        assert!(seen.fix.unwrap().contains("Add-RecipientPermission"));
    }

    /// The upstream vanishes in the middle of DATA: the device hears that
    /// the message was not accepted.
    #[tokio::test]
    async fn upstream_lost_in_data_tells_the_device() {
        let (device, mut device_peer) = pair().await;
        let (upstream, mut upstream_peer) = pair().await;
        let relay = tokio::spawn(relay(
            device,
            upstream,
            WAIT,
            (Protocol::Smtp, None),
            CancellationToken::new(),
            None,
        ));
        let go_ahead = b"354 End data with <CR><LF>.<CR><LF>\r\n";
        upstream_peer.write_all(go_ahead).await.unwrap();
        let mut got = vec![0u8; go_ahead.len()];
        device_peer.read_exact(&mut got).await.unwrap();
        drop(upstream_peer);
        let mut after = Vec::new();
        tokio::time::timeout(WAIT, device_peer.read_to_end(&mut after))
            .await
            .unwrap()
            .unwrap();
        assert!(
            after.starts_with(b"421 4.4.2 Connection to the mail server lost during the message")
        );
        // The device, told, ends its side; the relay stops draining it.
        device_peer.shutdown().await.unwrap();
        let r = tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
        assert_eq!(r.end, "upstream lost");
    }
}
