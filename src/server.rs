//! Listeners and sessions: bind, accept, bound the number of connections
//! (per listener and overall), read a PROXY header where configured, run one
//! task per device, log one line when each session ends, and drain on
//! shutdown.
//!
//! Shutdown has two steps: `stop` (stop accepting; sessions that have not
//! logged in are told goodbye in their protocol), then after `[limits]
//! drain_s` `abort` (relayed sessions are told goodbye and closed).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::config::{ListenerConfig, Protocol, TlsMode};
use crate::line::{Conn, Stream};
use crate::proto::{imap, pop3, smtp, Preauth};
use crate::relay;
use crate::App;

pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a turned-away device gets to read why.
const BUSY_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One `[[listener]]`, ready to serve.
pub struct Listener {
    pub protocol: Protocol,
    pub tls: TlsMode,
    /// The certificate's PEM files and the acceptor built from them,
    /// replaced on reload (SIGHUP); a session keeps the one it started with.
    tls_files: Option<(PathBuf, PathBuf)>,
    tls_acceptor: ArcSwapOption<TlsAcceptor>,
    pub allow_plaintext_auth: bool,
    pub proxy_protocol: bool,
    max_connections: usize,
    slots: Arc<Semaphore>,
}

impl Listener {
    pub fn new(config: &ListenerConfig) -> Result<Listener, String> {
        let tls_files = match (&config.cert_file, &config.key_file, config.tls) {
            (_, _, TlsMode::None) => None,
            (Some(cert), Some(key), _) => Some((cert.clone(), key.clone())),
            _ => {
                return Err(format!(
                    "listener {}: cert_file and key_file are required",
                    config.listen
                ))
            }
        };
        let tls_acceptor = match &tls_files {
            Some((cert, key)) => Some(Arc::new(crate::tls::server_acceptor(cert, key)?)),
            None => None,
        };
        Ok(Listener {
            protocol: config.protocol,
            tls: config.tls,
            tls_files,
            tls_acceptor: ArcSwapOption::new(tls_acceptor),
            allow_plaintext_auth: config.allow_plaintext_auth,
            proxy_protocol: config.proxy_protocol,
            max_connections: config.max_connections,
            slots: Arc::new(Semaphore::new(config.max_connections)),
        })
    }

    /// The TLS acceptor for new handshakes, if the listener has a certificate.
    pub fn tls_acceptor(&self) -> Option<Arc<TlsAcceptor>> {
        self.tls_acceptor.load_full()
    }

    /// Read the certificate and key again. On any error the old ones stay.
    pub fn reload_tls(&self) -> Result<(), String> {
        if let Some((cert, key)) = &self.tls_files {
            let acceptor = crate::tls::server_acceptor(cert, key)?;
            self.tls_acceptor.store(Some(Arc::new(acceptor)));
        }
        Ok(())
    }
}

/// Accept on every listener until `stop`, then wait for sessions to end
/// (forcing them after `[limits] drain_s`).
pub async fn serve(
    app: Arc<App>,
    bound: Vec<(TcpListener, Arc<Listener>)>,
    stop: CancellationToken,
) {
    let abort = CancellationToken::new();
    let tracker = TaskTracker::new();
    let connections = Arc::new(Semaphore::new(app.config.limits.max_connections));
    for (socket, listener) in bound {
        let ctx = Ctx {
            app: app.clone(),
            listener,
            connections: connections.clone(),
            stop: stop.clone(),
            abort: abort.clone(),
        };
        tracker.spawn(accept_loop(ctx, socket, tracker.clone()));
    }
    tracker.close();
    stop.cancelled().await;
    crate::notify_systemd(&[sd_notify::NotifyState::Stopping]);
    let grace = Duration::from_secs(app.config.limits.drain_s);
    info!(
        grace_s = grace.as_secs(),
        "shutting down: no new connections; draining sessions"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            sessions = tracker.len(),
            "drain grace over; closing remaining sessions"
        );
        abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    info!("all sessions ended");
}

/// What each session of a listener shares.
#[derive(Clone)]
struct Ctx {
    app: Arc<App>,
    listener: Arc<Listener>,
    connections: Arc<Semaphore>,
    stop: CancellationToken,
    abort: CancellationToken,
}

async fn accept_loop(ctx: Ctx, socket: TcpListener, sessions: TaskTracker) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = ctx.stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!("session", protocol = %ctx.listener.protocol, peer = %peer, client = tracing::field::Empty);
        sessions.spawn(session(ctx.clone(), tcp, peer).instrument(span));
    }
}

/// Take a listener slot and a global slot, or say why not.
fn admit(ctx: &Ctx) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), String> {
    let listener = ctx
        .listener
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            format!(
                "listener connection limit ({}) reached",
                ctx.listener.max_connections
            )
        })?;
    let global = ctx.connections.clone().try_acquire_owned().map_err(|_| {
        format!(
            "global connection limit ({}) reached",
            ctx.app.config.limits.max_connections
        )
    })?;
    Ok((listener, global))
}

async fn session(ctx: Ctx, tcp: TcpStream, mut peer: SocketAddr) {
    let started = Instant::now();
    let protocol = ctx.listener.protocol;
    let _slots = match admit(&ctx) {
        Ok(s) => s,
        Err(why) => {
            warn!(reason = %why, "turning the device away");
            crate::metrics::session_ended(protocol, "busy", 0, 0);
            let mut conn = Conn::new(Stream::Plain(tcp));
            let _ = conn.send(busy_reply(protocol), BUSY_WRITE_TIMEOUT).await;
            return;
        }
    };
    let _active = crate::metrics::ActiveSession::new(protocol);
    if ctx.listener.proxy_protocol {
        match crate::proxy_protocol::read(&tcp, peer).await {
            Ok(client) => {
                peer = client;
                tracing::Span::current().record("client", tracing::field::display(client));
            }
            Err(why) => {
                info!(outcome = "rejected", reason = %why, "session ended");
                crate::metrics::session_ended(protocol, "rejected", 0, 0);
                return;
            }
        }
    }
    let stream = if ctx.listener.tls == TlsMode::Implicit {
        let acceptor = ctx
            .listener
            .tls_acceptor()
            .expect("implicit TLS has an acceptor");
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, crate::tls::accept(&acceptor, tcp)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(error = %e, outcome = "tls_failed", "session ended");
                crate::metrics::session_ended(protocol, "tls_failed", 0, 0);
                return;
            }
            Err(_) => {
                info!(outcome = "tls_timeout", "session ended");
                crate::metrics::session_ended(protocol, "tls_timeout", 0, 0);
                return;
            }
        }
    } else {
        Stream::Plain(tcp)
    };
    let conn = Conn::new(stream);
    let (app, listener, stop) = (&ctx.app, &ctx.listener, ctx.stop.clone());
    // Boxed: the login's state (parsers, token and upstream futures) is
    // freed when it ends instead of staying in every relayed session's task.
    let outcome = match protocol {
        Protocol::Smtp => Box::pin(smtp::preauth(app, listener, conn, peer, stop)).await,
        Protocol::Imap => Box::pin(imap::preauth(app, listener, conn, peer, stop)).await,
        Protocol::Pop3 => Box::pin(pop3::preauth(app, listener, conn, peer, stop)).await,
    };
    match outcome {
        Preauth::Relay {
            device,
            upstream,
            account,
            mailbox,
            _mailbox_slot,
        } => {
            let idle = Duration::from_secs(app.config.limits.idle_timeout_s);
            let r = relay::relay(device, upstream, idle, protocol, ctx.abort.clone()).await;
            info!(
                account = %account,
                mailbox = %mailbox,
                upstream = %app.config.upstream.address(protocol),
                outcome = "relayed",
                end = r.end,
                bytes_to_upstream = r.to_upstream,
                bytes_to_device = r.to_device,
                duration_ms = started.elapsed().as_millis() as u64,
                "session ended"
            );
            crate::metrics::session_ended(protocol, "relayed", r.to_upstream, r.to_device);
        }
        Preauth::Closed(why) => {
            crate::metrics::session_ended(protocol, "closed", 0, 0);
            info!(
                outcome = "closed",
                reason = why,
                duration_ms = started.elapsed().as_millis() as u64,
                "session ended"
            );
        }
    }
}

fn busy_reply(protocol: Protocol) -> &'static [u8] {
    match protocol {
        Protocol::Smtp => b"421 4.7.0 Too many connections, try again later\r\n",
        Protocol::Imap => b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        Protocol::Pop3 => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    }
}
