//! The SMTP relay of a session whose envelope senders are restricted
//! (`allowed_senders` of its account or `[[relay]]` rule): the device's
//! bytes go through [`Tracker`], which passes commands, messages and
//! chunks on and holds back every MAIL with a sender not allowed; the
//! device gets `550 5.7.1` for it in its turn among the upstream's
//! replies. One task reads both sides, so that a local reply is written
//! only once the upstream has answered everything sent before it.
//! An account with `rewrite_sender` goes through it too: its MAIL FROM
//! and each message's header block are rewritten to its mailbox, and a
//! header block too big for that ends the session after `552 5.3.4`.
//! Sessions without either use the plain byte relay.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{drain, write_within, Farewell, Relayed, DEVICE_CLOSED, FAREWELL_WRITE};
use super::{COPY_BUFFER, UPSTREAM_LOST};
use crate::config::Protocol;
use crate::device::refusal::{self, Refused, Who};
use crate::net::Conn;
use crate::wire::smtp::stream::{Next, Replies, Senders, Tracker};
use crate::wire::smtp::Reply;
use crate::wire::{self, Farewell as Goodbye};

/// Why a session ended on a header too big to rewrite.
const HEADER_TOO_BIG: &str = "message header too big";

/// Device bytes read ahead of what the tracker has taken.
const MAX_AHEAD: usize = 256 * 1024;

/// Relay an SMTP session, checking every MAIL against `senders`; `who` is
/// the device, for the refusals' log lines.
pub async fn relay(
    device: Conn,
    upstream: Conn,
    idle: Duration,
    abort: CancellationToken,
    (senders, who): (Senders, Option<Who>),
) -> Relayed {
    let (mut device, ahead) = device.into_parts();
    let (mut upstream, upstream_residual) = upstream.into_parts();
    let mut s = Session {
        tracker: Tracker::new(senders),
        replies: Replies::default(),
        owed: 0,
        held: None,
        ahead,
        farewell: Farewell::new(Protocol::Smtp, abort.clone(), who),
        relayed: Relayed::default(),
        device_done: false,
        abort: false,
    };
    let mut from_upstream = vec![0u8; COPY_BUFFER];
    let mut out = Vec::with_capacity(COPY_BUFFER);
    let mut last = Instant::now();
    let mut upstream_shut = false;
    if !upstream_residual.is_empty() {
        if let Err(e) = s
            .send_device(&mut device, &upstream_residual, idle, true)
            .await
        {
            return s.end(e);
        }
    }
    loop {
        // Take what the device sent, as far as the upstream's answers allow.
        while s.held.is_none() && !s.ahead.is_empty() {
            out.clear();
            match s.tracker.next(&s.ahead, &mut out) {
                Next::Forward { consumed, command } => {
                    s.ahead.advance(consumed);
                    s.owed += command as u64;
                    if let Err(e) = write_within(&mut upstream, &out, idle).await {
                        return s.end(e);
                    }
                    s.relayed.to_upstream += out.len() as u64;
                }
                Next::Refuse {
                    consumed,
                    reply,
                    sender,
                } => {
                    s.ahead.advance(consumed);
                    if let (Some(sender), Some(w)) = (sender, s.farewell.watch.as_mut()) {
                        debug!(sender = %sender.escape_debug(), "MAIL refused: sender not allowed");
                        let said = refusal::first_line(&reply.to_bytes());
                        w.once.record(&w.who, Refused::SenderNotAllowed, &said);
                    }
                    s.held = Some(reply);
                }
                Next::Abort { consumed, reply } => {
                    s.ahead.advance(consumed);
                    warn!("message refused: its header is too big to rewrite its sender");
                    s.held = Some(reply);
                    s.abort = true;
                }
                Next::NeedMore | Next::AwaitReply => break,
            }
        }
        if let Some(reply) = s.held.as_ref().filter(|_| s.owed == 0) {
            let bytes = reply.to_bytes();
            s.held = None;
            if let Err(e) = s.send_device(&mut device, &bytes, idle, false).await {
                return s.end(e);
            }
            if s.abort {
                // The upstream's message is left unfinished: closing its
                // connection makes it drop the message.
                let _ = device.shutdown().await;
                return s.end(HEADER_TOO_BIG);
            }
            continue;
        }
        // The device is done (what is left is no whole line, unless it
        // waits for DATA's answer): the upstream may still answer it.
        let taken = s.ahead.is_empty() || !s.tracker.awaits_data_reply();
        if s.device_done && taken && s.held.is_none() && !upstream_shut {
            upstream_shut = true;
            let _ = upstream.shutdown().await;
        }
        let read_device = !s.device_done && s.ahead.len() < MAX_AHEAD;
        tokio::select! {
            r = device.read_buf(&mut s.ahead), if read_device => match r {
                Ok(n) if n > 0 => last = Instant::now(),
                Ok(_) => s.device_done = true,
                Err(_) => return s.end("read failed"),
            },
            r = upstream.read(&mut from_upstream) => match r {
                Ok(n) if n > 0 => {
                    last = Instant::now();
                    let data = &from_upstream[..n];
                    s.count_replies(data);
                    if let Err(e) = s.send_device(&mut device, data, idle, true).await {
                        return s.end(e);
                    }
                }
                result => {
                    let lost = s.farewell.on_upstream_loss(s.device_done);
                    if let Some(text) = lost {
                        let _ = write_within(&mut device, text, FAREWELL_WRITE).await;
                        // Let the device finish sending and read the 4xx.
                        let _ = device.shutdown().await;
                        drain(&mut device, &mut from_upstream).await;
                        return s.end(UPSTREAM_LOST);
                    }
                    let _ = device.shutdown().await;
                    let done = s.device_done;
                    return s.end(match (result, done) {
                        (Ok(_), true) => DEVICE_CLOSED,
                        (Ok(_), false) => "upstream closed",
                        (Err(_), _) => "upstream failed",
                    });
                }
            },
            _ = tokio::time::sleep_until(last + idle) => {
                let _ = write_within(&mut device, wire::farewell(Protocol::Smtp, Goodbye::Idle), FAREWELL_WRITE).await;
                let _ = device.shutdown().await;
                return s.end("idle timeout");
            }
            _ = abort.cancelled() => {
                let _ = write_within(&mut device, wire::farewell(Protocol::Smtp, Goodbye::Shutdown), FAREWELL_WRITE).await;
                let _ = device.shutdown().await;
                return s.end("shutdown");
            }
        }
    }
}

/// What the relay keeps between reads.
struct Session {
    tracker: Tracker,
    replies: Replies,
    /// Replies the upstream owes for what was passed on.
    owed: u64,
    /// A local reply waiting for the upstream's owed ones.
    held: Option<Reply<'static>>,
    /// Device bytes not yet taken by the tracker.
    ahead: BytesMut,
    farewell: Farewell,
    relayed: Relayed,
    device_done: bool,
    /// The session ends once `held` is written (see [`Next::Abort`]).
    abort: bool,
}

impl Session {
    fn count_replies(&mut self, data: &[u8]) {
        let (tracker, owed) = (&mut self.tracker, &mut self.owed);
        self.replies.feed(data, |code| {
            *owed = owed.saturating_sub(1);
            if *owed == 0 && tracker.awaits_data_reply() {
                tracker.data_answered(code);
            }
        });
    }

    /// Write to the device what the upstream said (`upstream`), or a
    /// reply of oxbridge's own.
    async fn send_device<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        device: &mut W,
        data: &[u8],
        idle: Duration,
        upstream: bool,
    ) -> Result<(), &'static str> {
        write_within(device, data, idle).await?;
        self.relayed.to_device += data.len() as u64;
        match upstream {
            true => self.farewell.heard(data),
            false => self.farewell.remember(data),
        }
        Ok(())
    }

    fn end(self, why: &'static str) -> Relayed {
        Relayed {
            end: why,
            ..self.relayed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::conn::tests::pair;
    use tokio::io::{AsyncBufReadExt, BufReader};

    const WAIT: Duration = Duration::from_secs(5);

    /// A refused MAIL in a pipelined group: the upstream never sees it,
    /// and the device reads its 550 between the replies around it. Then
    /// the upstream vanishes in a message: the device hears it was not
    /// accepted.
    #[tokio::test]
    async fn a_refused_mail_is_answered_in_its_turn() {
        let (device, mut device_peer) = pair().await;
        let (upstream, upstream_peer) = pair().await;
        let senders = Senders {
            allowed: vec!["scan@x.test".into()],
            relay: false,
            chunking: true,
            rewrite: None,
        };
        let relay = tokio::spawn(relay(
            device,
            upstream,
            WAIT,
            CancellationToken::new(),
            (senders, None),
        ));
        device_peer
            .write_all(b"NOOP\r\nMAIL FROM:<boss@x.test>\r\nMAIL FROM:<scan@x.test>\r\nDATA\r\n")
            .await
            .unwrap();
        let (up_r, mut up_w) = tokio::io::split(upstream_peer);
        let mut up = BufReader::new(up_r);
        let mut line = String::new();
        up.read_line(&mut line).await.unwrap();
        assert_eq!(line, "NOOP\r\n");
        // Nothing more until the NOOP is answered: the refusal waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), up.read_line(&mut line))
                .await
                .is_err()
        );
        up_w.write_all(b"250 2.0.0 Ok\r\n").await.unwrap();
        line.clear();
        up.read_line(&mut line).await.unwrap();
        assert_eq!(line, "MAIL FROM:<scan@x.test>\r\n");
        line.clear();
        up.read_line(&mut line).await.unwrap();
        assert_eq!(line, "DATA\r\n");
        up_w.write_all(b"250 2.1.0 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
            .await
            .unwrap();
        let mut seen = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.ends_with(b"354 End data with <CR><LF>.<CR><LF>\r\n") {
            let n = tokio::time::timeout(WAIT, device_peer.read(&mut seen))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&seen[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            "250 2.0.0 Ok\r\n550 5.7.1 Sender address not allowed for this login\r\n250 2.1.0 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        device_peer
            .write_all(b"MAIL FROM:<boss@x.test>\r\n")
            .await
            .unwrap();
        line.clear();
        up.read_line(&mut line).await.unwrap();
        assert_eq!(line, "MAIL FROM:<boss@x.test>\r\n", "message text");
        drop(up);
        drop(up_w);
        let mut after = Vec::new();
        tokio::time::timeout(WAIT, device_peer.read_to_end(&mut after))
            .await
            .unwrap()
            .unwrap();
        assert!(
            after.starts_with(b"421 4.4.2 Connection to the mail server lost during the message"),
            "{}",
            String::from_utf8_lossy(&after)
        );
        // The device, told, ends its side; the relay stops draining it.
        device_peer.shutdown().await.unwrap();
        let r = tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
        assert_eq!(r.end, UPSTREAM_LOST);
    }

    /// rewrite_sender: a header block over the bound is answered 552 once
    /// the device has ended its message; none of it reaches the upstream,
    /// whose unfinished message the closed connection drops.
    #[tokio::test]
    async fn a_header_too_big_to_rewrite_ends_the_session_after_552() {
        let (device, mut device_peer) = pair().await;
        let (upstream, upstream_peer) = pair().await;
        let senders = Senders {
            allowed: vec![],
            relay: false,
            chunking: true,
            rewrite: Some(crate::mailbox::Mailbox::parse("scans@x.test").unwrap()),
        };
        let relay = tokio::spawn(relay(
            device,
            upstream,
            WAIT,
            CancellationToken::new(),
            (senders, None),
        ));
        device_peer.write_all(b"DATA\r\n").await.unwrap();
        let (up_r, mut up_w) = tokio::io::split(upstream_peer);
        let mut up = BufReader::new(up_r);
        let mut line = String::new();
        up.read_line(&mut line).await.unwrap();
        assert_eq!(line, "DATA\r\n");
        up_w.write_all(b"354 go\r\n").await.unwrap();
        let mut go = [0u8; 8];
        device_peer.read_exact(&mut go).await.unwrap();
        assert_eq!(&go, b"354 go\r\n");
        let message = format!("X: {}\r\n\r\nbody\r\n.\r\n", "a".repeat(70_000));
        device_peer.write_all(message.as_bytes()).await.unwrap();
        let mut after = Vec::new();
        tokio::time::timeout(WAIT, device_peer.read_to_end(&mut after))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&after),
            "552 5.3.4 Message header too big to rewrite its sender\r\n"
        );
        let mut upstream_saw = Vec::new();
        tokio::time::timeout(WAIT, up.read_to_end(&mut upstream_saw))
            .await
            .unwrap()
            .unwrap();
        assert!(upstream_saw.is_empty(), "{upstream_saw:?}");
        let r = tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
        assert_eq!(r.end, HEADER_TOO_BIG);
    }
}
