//! The IMAP relay against sockets of the test's own: a device, an
//! upstream that never answers one command, and a new login.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{relay, Expiry, Renew, QUIET_WAIT};
use crate::login::Renewed;
use crate::net::conn::tests::pair;

const WAIT: Duration = Duration::from_secs(15);

async fn line(from: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    tokio::time::timeout(WAIT, from.read_line(&mut l))
        .await
        .expect("a line in time")
        .unwrap();
    l
}

/// A command the upstream never answers leaves the session without a
/// quiet point: the device is held for the move no longer than
/// [`QUIET_WAIT`] of silence, then its commands go through again, and the
/// new login is logged out.
#[tokio::test]
async fn a_device_is_not_held_for_an_answer_that_never_comes() {
    let (device, mut device_peer) = pair().await;
    let (upstream, upstream_peer) = pair().await;
    let (fresh, fresh_peer) = pair().await;
    let mut upstream_peer = BufReader::new(upstream_peer);
    let mut fresh_peer = BufReader::new(fresh_peer);
    // A move is due at once; the BYE would come 11 s from now.
    let lifetime = Duration::from_secs(60);
    let expiry = Expiry {
        at: Instant::now() + lifetime / 4,
        lifetime,
    };
    let mut fresh = Some(fresh);
    let renew = move || {
        let conn = fresh.take();
        async move {
            Ok(Renewed {
                conn: conn.expect("one new login"),
                capabilities: vec!["UNSELECT".into()],
                expires_at: Instant::now() + lifetime,
                lifetime,
            })
        }
    };
    let relay = tokio::spawn(relay(
        device,
        upstream,
        expiry,
        Duration::from_secs(60),
        CancellationToken::new(),
        Some(Box::new(renew) as Box<dyn Renew>),
    ));
    device_peer.write_all(b"a NOOP\r\n").await.unwrap();
    assert_eq!(line(&mut upstream_peer).await, "a NOOP\r\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    device_peer.write_all(b"b NOOP\r\n").await.unwrap();
    assert_eq!(line(&mut upstream_peer).await, "b NOOP\r\n");
    let held = sent.elapsed();
    assert!(held < QUIET_WAIT + Duration::from_secs(2), "held {held:?}");
    assert_eq!(line(&mut fresh_peer).await, "oxb1 LOGOUT\r\n");
    relay.abort();
}
