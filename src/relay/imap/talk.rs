//! oxbridge's own commands on an upstream IMAP connection while a session
//! moves: one line out, whole responses (lines and literals, bounded) in,
//! and the LOGOUT of a connection no longer used.

use std::time::Duration;

use crate::net::{Conn, LineError};
use crate::wire;
use crate::wire::imap::{literal_suffix, tagged, Request};

/// How long the new connection's commands and the old one's last answers
/// may take, each.
pub const SWAP_REPLY: Duration = Duration::from_secs(10);
/// Largest response read while moving.
const MAX_SWAP_RESPONSE: usize = 8 * 1024 * 1024;
/// The old connection gets this long to answer LOGOUT.
const LOGOUT_WAIT: Duration = Duration::from_secs(5);

pub fn tagged_as(head: &[u8], tag: &str) -> bool {
    head.strip_prefix(tag.as_bytes())
        .is_some_and(|rest| rest.starts_with(b" "))
}

pub async fn send(conn: &mut Conn, request: &Request<'_>) -> Result<(), &'static str> {
    conn.send(&request.to_bytes(), SWAP_REPLY)
        .await
        .map_err(|_| "upstream write failed")
}

/// Read responses to our tagged command, each given to `each` (its first
/// line and all its bytes), up to its tagged `OK`. Only untagged
/// responses may come before it: another tag or a continuation is not
/// ours to pass on.
pub async fn until_tagged(
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
        if !head.starts_with(b"* ") {
            return Err("unexpected response while moving");
        }
        each(&head, &whole)?;
    }
}

/// One whole response (lines and literals) from `conn`: its first line and
/// all its bytes, CRLFs included.
pub async fn response(conn: &mut Conn) -> Result<(Vec<u8>, Vec<u8>), &'static str> {
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
