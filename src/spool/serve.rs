//! Drives a spooling session ([`Intake`]): reads with bounds and time
//! limits, streams the message into a spool draft (or into memory for an
//! account that sends through Microsoft Graph at once), then commits it
//! (`250` once on disk) or sends it and answers with Graph's outcome.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::intake::{Input, Intake, Rules, Step, Stored, Then};
use super::queue::{self, Draft, Envelope};
use super::Spool;
use crate::accounts::Identity;
use crate::app::App;
use crate::error::AuthError;
use crate::net::{Conn, LineError};
use crate::upstream::graph::{Doubt, GraphError};
use crate::wire::message::{DataReader, LineEnds};
use crate::wire::sender_rewrite::Rewriter;
use crate::wire::smtp::Reply;

/// Message bytes gathered before they are written to the draft.
const WRITE_BATCH: usize = 256 * 1024;

/// A logged-in device on a spooling listener.
pub struct Device {
    pub conn: Conn,
    pub id: Identity,
    /// Logged in by a `[[relay]]` rule.
    pub relay: bool,
    pub helo: String,
    pub peer: SocketAddr,
}

/// Where a taken message goes.
pub enum Sink {
    /// The spool: `250` once it is on disk; the worker delivers it.
    Spool(Arc<Spool>),
    /// Microsoft Graph, at once: `250` once Graph took it.
    Graph(Arc<App>),
}

/// A message being read: into a spool draft, or into memory for Graph.
/// BDAT chunks pass through `ends`, so that they are stored like DATA.
struct Body {
    to: To,
    size: u64,
    ends: LineEnds,
    /// `rewrite_sender`: the header block's rewrite, until it is written.
    head: Option<Rewriter>,
    /// The header block was too big to rewrite: nothing more is written.
    head_too_big: bool,
}

enum To {
    /// Written off the async threads; `None` only while a write runs.
    Draft(Option<Draft>),
    Memory(Vec<u8>),
}

impl Body {
    /// A new message for `sink`: a spool draft is made off the async threads.
    async fn new(sink: &Sink, rewrite: Option<&str>) -> std::io::Result<Body> {
        let to = match sink {
            Sink::Spool(spool) => {
                let q = spool.queue.clone();
                To::Draft(Some(blocking(move || q.draft()).await?))
            }
            Sink::Graph(_) => To::Memory(Vec::new()),
        };
        Ok(Body {
            to,
            size: 0,
            ends: LineEnds::default(),
            head: rewrite.map(Rewriter::new),
            head_too_big: false,
        })
    }

    /// Append the message's next `bytes`, its header block rewritten
    /// where the sender is (held until the block ends).
    async fn take(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        if self.head_too_big {
            return Ok(());
        }
        let bytes = match self.head.as_mut() {
            Some(head) => {
                let mut out = Vec::new();
                if head.feed(&bytes, &mut out).is_err() {
                    self.head_too_big = true;
                    self.head = None;
                    return Ok(());
                }
                if !head.in_head() {
                    self.head = None;
                }
                out
            }
            None => bytes,
        };
        match bytes.is_empty() {
            true => Ok(()),
            false => self.write(bytes).await,
        }
    }

    /// The message has ended: a header block still held (no body) is
    /// written.
    async fn finish(&mut self) -> std::io::Result<()> {
        let Some(mut head) = self.head.take() else {
            return Ok(());
        };
        let mut out = Vec::new();
        head.finish(&mut out);
        self.write(out).await
    }

    /// Append `bytes`; a draft is written by a blocking task, never on
    /// the async threads (a slow disk holds up this session only).
    async fn write(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        let n = bytes.len() as u64;
        match &mut self.to {
            To::Draft(slot) => {
                let mut d = slot.take().ok_or_else(|| std::io::Error::other("closed"))?;
                let (d, r) = tokio::task::spawn_blocking(move || {
                    let r = d.write(&bytes);
                    (d, r)
                })
                .await
                .map_err(std::io::Error::other)?;
                *slot = Some(d);
                r?;
            }
            To::Memory(m) => m.extend_from_slice(&bytes),
        }
        self.size += n;
        Ok(())
    }
}

/// Run a blocking spool operation off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// How a spooled session went.
pub struct Served {
    pub messages: u32,
    pub bytes: u64,
    pub end: &'static str,
}

/// What the session needs besides the device.
pub struct Setup {
    pub host: String,
    /// What EHLO offers after login.
    pub keywords: Vec<String>,
    pub rules: Rules,
    pub max_line: usize,
    pub timeout: Duration,
}

/// Take the device's messages until it quits, fails or is told goodbye.
pub async fn serve(
    sink: Sink,
    setup: Setup,
    mut device: Device,
    stop: &CancellationToken,
) -> Served {
    let Setup {
        host,
        keywords,
        rules,
        max_line,
        timeout,
    } = setup;
    let mut intake = Intake::new(host, keywords, rules);
    let rewrite = device.id.rewrite_sender.then(|| device.id.mailbox.clone());
    if let Some(mailbox) = &rewrite {
        intake.rewrite_sender(mailbox.clone());
    }
    let mut served = Served {
        messages: 0,
        bytes: 0,
        end: "",
    };
    let mut body: Option<Body> = None;
    let mut step = Step {
        reply: Vec::new(),
        then: Then::Read,
    };
    loop {
        if !step.reply.is_empty() && device.conn.send(&step.reply, timeout).await.is_err() {
            served.end = "device write failed";
            return served;
        }
        step = match step.then {
            Then::Read => {
                let line = tokio::select! {
                    line = device.conn.read_line(max_line, timeout) => Some(line),
                    _ = stop.cancelled() => None,
                };
                match line {
                    None => intake.on(Input::Shutdown),
                    Some(Ok(line)) => intake.on(Input::Line(&line)),
                    Some(Err(LineError::TooLong(_))) => intake.on(Input::TooLong),
                    Some(Err(LineError::Timeout(_))) => intake.on(Input::Timeout),
                    Some(Err(e)) => {
                        served.end = e.reason();
                        return served;
                    }
                }
            }
            Then::ReadData { max } => {
                let mut b = match Body::new(&sink, rewrite.as_deref()).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(error = %e, "cannot start a message in the spool");
                        let _ = device
                            .conn
                            .send(&Reply::NotStored.to_bytes(), timeout)
                            .await;
                        served.end = "spool unavailable";
                        return served;
                    }
                };
                match read_data(&mut device.conn, &mut b, max, timeout).await {
                    Ok(_) if b.head_too_big => intake.on(Input::HeaderTooBig),
                    Ok(too_big) => {
                        body = Some(b);
                        intake.on(Input::DataEnd { too_big })
                    }
                    Err(LineError::Timeout(_)) => Step::close(Reply::DataTimeout, "data timeout"),
                    Err(LineError::Io(e)) if e.kind() != std::io::ErrorKind::ConnectionReset => {
                        warn!(error = %e, "cannot write a message to the spool");
                        Step::close(Reply::NotStored, "spool write failed")
                    }
                    Err(e) => {
                        served.end = e.reason();
                        return served;
                    }
                }
            }
            Then::ReadChunk { size, keep } => {
                let mut stored = Ok(());
                if keep && body.is_none() {
                    match Body::new(&sink, rewrite.as_deref()).await {
                        Ok(b) => body = Some(b),
                        Err(e) => stored = Err(e),
                    }
                }
                let result = match body.as_mut().filter(|_| keep && stored.is_ok()) {
                    Some(b) => read_chunk(&mut device.conn, b, size, timeout).await,
                    None => device.conn.discard(size, timeout).await.map(Ok),
                };
                let too_big = body.as_ref().is_some_and(|b| b.head_too_big);
                match result.map(|written| stored.and(written)) {
                    Ok(Ok(())) if too_big && keep => {
                        body = None;
                        intake.on(Input::HeaderTooBig)
                    }
                    Ok(Ok(())) => intake.on(Input::Chunk),
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot write a message to the spool");
                        body = None;
                        intake.on(Input::ChunkNotStored)
                    }
                    Err(LineError::Timeout(_)) => Step::close(Reply::DataTimeout, "data timeout"),
                    Err(e) => {
                        served.end = e.reason();
                        return served;
                    }
                }
            }
            Then::Store(stored) => {
                let Some(mut b) = body.take() else {
                    served.end = "store without a message";
                    return served;
                };
                if let Err(e) = b.finish().await {
                    warn!(error = %e, "cannot write a message to the spool");
                    step = intake.on(Input::Stored(Err(())));
                    continue;
                }
                let size = b.size;
                match (b.to, &sink) {
                    (To::Draft(Some(d)), Sink::Spool(spool)) => {
                        match commit(spool, d, *stored, &device).await {
                            Ok(id) => {
                                served.messages += 1;
                                served.bytes += size;
                                intake.on(Input::Stored(Ok(&id)))
                            }
                            Err(()) => intake.on(Input::Stored(Err(()))),
                        }
                    }
                    (To::Memory(m), Sink::Graph(app)) => {
                        let reply = send_now(app, &device.id, &m, &stored.recipients).await;
                        if reply == Reply::SentByGraph {
                            served.messages += 1;
                            served.bytes += size;
                        }
                        Step::read(reply)
                    }
                    _ => intake.on(Input::Stored(Err(()))),
                }
            }
            Then::Close(why) => {
                served.end = why;
                return served;
            }
        };
        if !matches!(step.then, Then::Store(_) | Then::ReadChunk { .. }) && !intake.chunking() {
            body = None;
        }
    }
}

/// Commit a draft to the spool; the id, or `Err` when it could not be.
async fn commit(
    spool: &Arc<Spool>,
    draft: Draft,
    stored: Stored,
    device: &Device,
) -> Result<String, ()> {
    let size = draft.size;
    let envelope = Envelope {
        id: String::new(),
        account: device.id.account.clone(),
        mailbox: device.id.mailbox.to_string(),
        relay: device.relay,
        sender: stored.sender,
        recipients: stored.recipients,
        params: stored.params,
        received_at: queue::now(),
        client: device.peer.ip().to_string(),
        helo: device.helo.clone(),
        size,
        report: false,
    };
    let rcpts = envelope.recipients.len();
    match tokio::task::spawn_blocking(move || draft.commit(envelope)).await {
        Ok(Ok(id)) => {
            info!(id = %id, size, recipients = rcpts, account = %device.id.account, "message spooled");
            crate::metrics::spooled(size);
            spool.queued(&id);
            Ok(id)
        }
        Ok(Err(e)) => {
            warn!(error = %e, "cannot commit a message to the spool");
            Err(())
        }
        Err(_) => Err(()),
    }
}

/// Send a message through Microsoft Graph now; the device's reply.
async fn send_now(
    app: &App,
    id: &Identity,
    message: &[u8],
    recipients: &[String],
) -> Reply<'static> {
    let mut doubt = Doubt::default();
    let result = match app.tokens.graph(id).await {
        Ok(token) => {
            app.graph
                .send(&token.secret, &id.mailbox, message, recipients, &mut doubt)
                .await
        }
        Err(e) if e.is_temporary() => Err(GraphError::Temporary(e.to_string())),
        Err(e) => Err(GraphError::Auth(e.to_string())),
    };
    super::settle::count_graph_doubt(&doubt, result.is_err());
    match result {
        Ok(()) => {
            info!(account = %id.account, mailbox = %id.mailbox, size = message.len(), recipients = recipients.len(), "sent through Microsoft Graph");
            Reply::SentByGraph
        }
        Err(e) => {
            match crate::diagnose::advice(&AuthError::UpstreamRefused(e.to_string())) {
                Some(fix) => {
                    warn!(account = %id.account, mailbox = %id.mailbox, error = %e, fix, "Microsoft Graph did not take the message")
                }
                None => {
                    warn!(account = %id.account, mailbox = %id.mailbox, error = %e, "Microsoft Graph did not take the message")
                }
            }
            match e {
                GraphError::Temporary(_) => Reply::GraphTemporary,
                GraphError::Auth(_) => Reply::GraphAuth,
                GraphError::Refused(_) => Reply::GraphRefused,
            }
        }
    }
}

/// Read DATA's body into `draft` up to `max` bytes; past that, read on
/// to its end and drop it. Returns whether the message was too big.
async fn read_data(
    conn: &mut Conn,
    draft: &mut Body,
    max: u64,
    timeout: Duration,
) -> Result<bool, LineError> {
    let mut reader = DataReader::default();
    let mut out = Vec::with_capacity(WRITE_BATCH + 4096);
    let mut too_big = false;
    loop {
        if conn.buffered().is_empty() {
            conn.fill_within(timeout).await?;
        }
        let input = conn.buffered();
        let end = reader.feed(input, &mut out);
        let consumed = end.unwrap_or(input.len());
        conn.consume(consumed);
        if !too_big && draft.size + out.len() as u64 > max {
            too_big = true;
        }
        if too_big {
            out.clear();
        } else if out.len() >= WRITE_BATCH || end.is_some() {
            let batch = std::mem::replace(&mut out, Vec::with_capacity(WRITE_BATCH + 4096));
            draft.take(batch).await?;
        }
        if end.is_some() {
            return Ok(too_big);
        }
    }
}

/// Read a BDAT chunk of `size` bytes into `draft`, bare LF written as
/// CRLF as in DATA. A failed write does not stop the reading: the rest of
/// the chunk is read and dropped, and the write's error returned inside.
async fn read_chunk(
    conn: &mut Conn,
    draft: &mut Body,
    mut size: u64,
    timeout: Duration,
) -> Result<std::io::Result<()>, LineError> {
    let mut out = Vec::with_capacity(WRITE_BATCH + 4096);
    let mut written = Ok(());
    while size > 0 {
        if conn.buffered().is_empty() {
            conn.fill_within(timeout).await?;
        }
        let take = (conn.buffered().len() as u64).min(size) as usize;
        if written.is_ok() {
            draft.ends.feed(&conn.buffered()[..take], &mut out);
        }
        conn.consume(take);
        size -= take as u64;
        if written.is_ok() && (out.len() >= WRITE_BATCH || size == 0) {
            let batch = std::mem::replace(&mut out, Vec::with_capacity(WRITE_BATCH + 4096));
            written = draft.take(batch).await;
        }
    }
    Ok(written)
}
