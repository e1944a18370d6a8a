//! Listeners and sessions: bind, accept, bound the number of connections,
//! run one task per device, log one line when each session ends, and drain
//! on shutdown.
//!
//! Shutdown has two steps: `stop` (stop accepting; sessions that have not
//! logged in are told `421`), then after [`DRAIN_GRACE`] `abort` (relayed
//! sessions are closed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
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
/// Connections one listener serves at once; more are told to come back later.
pub const MAX_CONNECTIONS_PER_LISTENER: usize = 1000;
/// How long relayed sessions may run on after a shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// One `[[listener]]`, ready to serve.
pub struct Listener {
    pub protocol: Protocol,
    pub tls: TlsMode,
    pub tls_acceptor: Option<TlsAcceptor>,
    pub allow_plaintext_auth: bool,
    slots: Arc<Semaphore>,
}

impl Listener {
    pub fn new(config: &ListenerConfig) -> Result<Listener, String> {
        let tls_acceptor = match (&config.cert_file, &config.key_file, config.tls) {
            (_, _, TlsMode::None) => None,
            (Some(cert), Some(key), _) => Some(crate::tls::server_acceptor(cert, key)?),
            _ => {
                return Err(format!(
                    "listener {}: cert_file and key_file are required",
                    config.listen
                ))
            }
        };
        Ok(Listener {
            protocol: config.protocol,
            tls: config.tls,
            tls_acceptor,
            allow_plaintext_auth: config.allow_plaintext_auth,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_LISTENER)),
        })
    }
}

/// Accept on every listener until `stop`, then wait for sessions to end
/// (forcing them after [`DRAIN_GRACE`]).
pub async fn serve(app: Arc<App>, bound: Vec<(TcpListener, Listener)>, stop: CancellationToken) {
    let abort = CancellationToken::new();
    let tracker = TaskTracker::new();
    for (socket, listener) in bound {
        let (app, stop, abort, sessions) =
            (app.clone(), stop.clone(), abort.clone(), tracker.clone());
        tracker.spawn(accept_loop(
            app,
            socket,
            Arc::new(listener),
            stop,
            abort,
            sessions,
        ));
    }
    tracker.close();
    stop.cancelled().await;
    info!(
        grace_s = DRAIN_GRACE.as_secs(),
        "shutting down: no new connections; draining sessions"
    );
    if tokio::time::timeout(DRAIN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            sessions = tracker.len(),
            "drain grace over; closing remaining sessions"
        );
        abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    info!("all sessions ended");
}

async fn accept_loop(
    app: Arc<App>,
    socket: TcpListener,
    listener: Arc<Listener>,
    stop: CancellationToken,
    abort: CancellationToken,
    sessions: TaskTracker,
) {
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
            _ = stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (app, listener, stop, abort) =
            (app.clone(), listener.clone(), stop.clone(), abort.clone());
        let span = info_span!("session", protocol = %listener.protocol, peer = %peer);
        sessions.spawn(session(app, listener, tcp, stop, abort).instrument(span));
    }
}

async fn session(
    app: Arc<App>,
    listener: Arc<Listener>,
    tcp: TcpStream,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let started = Instant::now();
    let Ok(_slot) = listener.slots.clone().try_acquire_owned() else {
        warn!(
            limit = MAX_CONNECTIONS_PER_LISTENER,
            "connection limit reached; turning the device away"
        );
        let mut conn = Conn::new(Stream::Plain(tcp));
        let _ = conn
            .send(busy_reply(listener.protocol), Duration::from_secs(5))
            .await;
        return;
    };
    let stream = if listener.tls == TlsMode::Implicit {
        let acceptor = listener
            .tls_acceptor
            .as_ref()
            .expect("implicit TLS has an acceptor");
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, crate::tls::accept(acceptor, tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(error = %e, outcome = "tls_failed", "session ended");
                return;
            }
            Err(_) => {
                info!(outcome = "tls_timeout", "session ended");
                return;
            }
        }
    } else {
        Stream::Plain(tcp)
    };
    let conn = Conn::new(stream);
    let outcome = match listener.protocol {
        Protocol::Smtp => smtp::preauth(&app, &listener, conn, stop).await,
        Protocol::Imap => imap::preauth(&app, &listener, conn, stop).await,
        Protocol::Pop3 => pop3::preauth(&app, &listener, conn, stop).await,
    };
    match outcome {
        Preauth::Relay {
            device,
            upstream,
            account,
        } => {
            let r = relay::relay(device, upstream, relay::IDLE_TIMEOUT, abort).await;
            info!(
                account = %account,
                outcome = "relayed",
                end = r.end,
                bytes_to_upstream = r.to_upstream,
                bytes_to_device = r.to_device,
                duration_ms = started.elapsed().as_millis() as u64,
                "session ended"
            );
        }
        Preauth::Closed(why) => {
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
