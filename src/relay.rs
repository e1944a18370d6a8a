//! The bridge: once the upstream login is done, bytes are copied both ways
//! untouched until one side is done.
//!
//! Whatever either side had sent past its last parsed line (pipelined
//! commands) is replayed first. The session ends when the upstream closes,
//! when the device fails, when both have been silent for the idle timeout,
//! or on a hard shutdown. A device that half-closes still gets the rest of
//! the upstream's replies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::line::Conn;

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

/// Copy one direction until EOF (then shut the writer down) or an error.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    residual: BytesMut,
    activity: Arc<Activity>,
    idle: Duration,
    count: Arc<AtomicU64>,
    goodbye: Option<&'static [u8]>,
) -> Result<(), &'static str>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !residual.is_empty() {
        write_within(&mut to, &residual, idle).await?;
        count.fetch_add(residual.len() as u64, Ordering::Relaxed);
    }
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match tokio::time::timeout(idle, from.read(&mut buf)).await {
            Ok(Ok(0)) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Err("read failed"),
            // Only the pump towards the device ends the session on silence,
            // with the protocol's goodbye.
            Err(_) => match goodbye {
                Some(text) if activity.idle_for() >= idle => {
                    let _ = write_within(&mut to, text, Duration::from_secs(5)).await;
                    let _ = to.shutdown().await;
                    return Err("idle timeout");
                }
                _ => continue,
            },
        };
        activity.touch();
        write_within(&mut to, &buf[..n], idle).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

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

/// Relay a logged-in session until it ends.
pub async fn relay(
    device: Conn,
    upstream: Conn,
    idle: Duration,
    goodbye: &'static [u8],
    abort: CancellationToken,
) -> Relayed {
    let (device, device_residual) = device.into_parts();
    let (upstream, upstream_residual) = upstream.into_parts();
    let (device_r, device_w) = tokio::io::split(device);
    let (upstream_r, upstream_w) = tokio::io::split(upstream);
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
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
    let to_device = pump(
        upstream_r,
        device_w,
        upstream_residual,
        activity,
        idle,
        down_count.clone(),
        Some(goodbye),
    );
    tokio::pin!(to_upstream, to_device);

    let end = tokio::select! {
        r = &mut to_device => match r {
            Ok(()) => "upstream closed",
            Err(e) => e,
        },
        r = &mut to_upstream => match r {
            // The device half-closed: let the upstream finish answering.
            Ok(()) => tokio::select! {
                r = &mut to_device => r.err().unwrap_or("device closed"),
                _ = abort.cancelled() => "shutdown",
            },
            Err(e) => e,
        },
        _ = abort.cancelled() => "shutdown",
    };
    Relayed {
        to_upstream: up_count.load(Ordering::Relaxed),
        to_device: down_count.load(Ordering::Relaxed),
        end,
    }
}
