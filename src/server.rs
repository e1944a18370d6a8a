//! `oxbridge run`: bind every listener (a port in use fails start-up) and
//! the admin endpoint, then accept; one task per device, which picks its
//! protocol's session once, drives it to a login, relays, and logs one line
//! when it ends. SIGHUP re-reads the configuration; shutdown drains.
//!
//! Shutdown has two steps: `stop` (stop accepting; sessions that have not
//! logged in are told goodbye in their protocol), then after `[limits]
//! drain_s` `abort` (relayed sessions are told goodbye and closed).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::app::{App, StartError};
use crate::config::{Config, Delivery, Protocol, TlsMode};
use crate::device::{self, Context, Dialogue, Handoff, Ready};
use crate::listener::{Listener, ListenerSlot};
use crate::login::LoggedIn;
use crate::net::conn::{Conn, Stream};
use crate::net::proxy_protocol::TrustedPeer;
use crate::net::tls::HANDSHAKE_TIMEOUT;
use crate::wire::smtp::stream::Senders;
use crate::wire::{self, Farewell};
use crate::{admin, autodiscover, relay};

/// How long a turned-away device gets to read why.
const BUSY_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the binary steers a running server: `shutdown` stops it, `reload`
/// (SIGHUP) re-reads `config_path`.
pub struct Control {
    pub config_path: PathBuf,
    pub shutdown: CancellationToken,
    pub reload: Arc<Notify>,
}

/// Bind every listener (so that a port in use fails start-up), then serve
/// until `shutdown` is cancelled and the sessions have drained.
pub async fn run(config: Config, control: Control) -> Result<(), StartError> {
    let metrics = match config.admin {
        Some(_) => Some(crate::metrics::install().map_err(StartError)?),
        None => None,
    };
    let app = Arc::new(App::new(config)?);
    let mut bound = Vec::new();
    let mut endpoints = Vec::new();
    for (i, l) in app.config.listeners.iter().enumerate() {
        let mut listener = Listener::new(l, &app.config.state_dir, &app.hostname)
            .map_err(|e| StartError(format!("listener[{i}]: {e}")))?;
        let socket = crate::net::listen::listen(l.listen).map_err(|e| {
            StartError(crate::fixes::bind_error(
                &format!("listener[{i}].listen"),
                l.listen,
                &e,
            ))
        })?;
        let local = socket.local_addr().map_err(|e| StartError(e.to_string()))?;
        listener.address = local;
        if l.tls == TlsMode::None && l.allow_plaintext_auth && !local.ip().is_loopback() {
            warn!(listener = i, address = %local, "passwords are accepted without TLS on a non-loopback address");
        }
        info!(listener = i, protocol = %l.protocol, address = %local, tls = ?l.tls, tls_min_version = %l.min_tls(), "listening");
        if l.legacy_tls() {
            warn!(listener = i, address = %local, tls_min_version = %l.min_tls(), "accepting TLS older than 1.2 from devices: keep this listener on a network you trust");
        }
        endpoints.push(autodiscover::Endpoint {
            protocol: l.protocol,
            tls: l.tls,
            port: local.port(),
        });
        bound.push((socket, Arc::new(listener)));
    }
    if let (Some(admin), Some(metrics)) = (&app.config.admin, metrics) {
        let socket = TcpListener::bind(admin.listen)
            .await
            .map_err(|e| StartError(crate::fixes::bind_error("admin.listen", admin.listen, &e)))?;
        let local = socket.local_addr().map_err(|e| StartError(e.to_string()))?;
        info!(address = %local, "admin endpoint listening");
        let shown = bound
            .iter()
            .map(|(socket, listener)| crate::status::Bound {
                address: socket
                    .local_addr()
                    .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                listener: listener.clone(),
            })
            .collect();
        tokio::spawn(admin::serve(
            socket,
            app.clone(),
            endpoints,
            shown,
            metrics,
            control.shutdown.clone(),
        ));
    }
    crate::metrics::listeners_bound();
    if app
        .config
        .listeners
        .iter()
        .any(|l| l.protocol == Protocol::Smtp && l.delivery == Delivery::Session)
    {
        let probe_app = app.clone();
        tokio::spawn(async move {
            // Learn the upstream's EHLO ahead of the first device.
            let _ = probe_app.dialer.smtp_capabilities().await;
        });
    }
    let delivery = app.spool.as_ref().map(|spool| {
        spool.clear_drafts();
        tokio::spawn(crate::spool::deliver::run(
            app.clone(),
            spool.clone(),
            control.shutdown.clone(),
        ))
    });
    if !app.tokens.keepalive().is_zero() && !app.accounts().refresh_token_logins().is_empty() {
        tokio::spawn(crate::keepalive::keep_refresh_tokens_alive(
            app.clone(),
            control.shutdown.clone(),
        ));
    }
    let listeners: Vec<_> = bound.iter().map(|(_, l)| l.clone()).collect();
    tokio::spawn(reloader(
        app.clone(),
        listeners,
        control.config_path,
        control.reload,
    ));
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    serve(app, bound, control.shutdown).await;
    if let Some(delivery) = delivery {
        // The delivery worker drains within the same grace period.
        let _ = delivery.await;
    }
    Ok(())
}

/// On each reload request: re-read the config file and the listeners'
/// certificates. A file that does not load changes nothing.
async fn reloader(
    app: Arc<App>,
    listeners: Vec<Arc<Listener>>,
    path: PathBuf,
    reload: Arc<Notify>,
) {
    loop {
        reload.notified().await;
        notify_systemd(&[sd_notify::NotifyState::Reloading]);
        // Files are read (and Argon2 caches dropped) off the async workers.
        let (app2, listeners2, path2) = (app.clone(), listeners.clone(), path.clone());
        let ok = tokio::task::spawn_blocking(move || reload_once(&app2, &listeners2, &path2))
            .await
            .unwrap_or(false);
        crate::metrics::reloaded(ok);
        notify_systemd(&[sd_notify::NotifyState::Ready]);
    }
}

fn reload_once(app: &App, listeners: &[Arc<Listener>], path: &std::path::Path) -> bool {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return false;
        }
    };
    let accounts = config.accounts.len();
    let ignored = match app.reload(config) {
        Ok(ignored) => ignored,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return false;
        }
    };
    let mut ok = true;
    for (i, l) in listeners.iter().enumerate() {
        if let Err(e) = l.reload_tls() {
            tracing::error!(listener = i, error = %e, "certificate reload failed; keeping the old certificate");
            ok = false;
        }
    }
    if !ignored.is_empty() {
        warn!(sections = ?ignored, "these changes need a restart; not applied");
    }
    info!(accounts, "configuration reloaded");
    ok
}

/// Tell systemd (`Type=notify`) where we are; a no-op elsewhere.
pub fn notify_systemd(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, state);
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
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
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

/// How often a listener logs the untrusted peers it closed.
const UNTRUSTED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The last untrusted peer logged, and how many were closed since.
#[derive(Default)]
struct Untrusted {
    last: Option<Instant>,
    more: u64,
}

async fn accept_loop(ctx: Ctx, socket: TcpListener, sessions: TaskTracker) {
    let local = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut untrusted = Untrusted::default();
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
        // Behind a load balancer, only the balancer may speak first: from
        // anyone else a PROXY header could claim any client address.
        let balancer = match &ctx.listener.proxy_from {
            None => None,
            Some(trusted) => match trusted.check(peer) {
                Some(balancer) => Some(balancer),
                None => {
                    crate::metrics::proxy_untrusted(local);
                    // One line per interval: a flood of connections is
                    // counted, not logged line by line.
                    if untrusted
                        .last
                        .map_or(true, |t| t.elapsed() >= UNTRUSTED_LOG_INTERVAL)
                    {
                        warn!(listener = %local, peer = %peer, more = untrusted.more, "connection from an untrusted peer closed unread: PROXY headers are believed only from proxy_from");
                        untrusted = Untrusted {
                            last: Some(Instant::now()),
                            more: 0,
                        };
                    } else {
                        untrusted.more += 1;
                    }
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!(
            "session",
            protocol = %ctx.listener.protocol,
            peer = %peer,
            client = tracing::field::Empty,
            device_name = tracing::field::Empty,
            login = tracing::field::Empty,
            tls_version = tracing::field::Empty,
            tls_cipher = tracing::field::Empty
        );
        sessions.spawn(session(ctx.clone(), tcp, peer, balancer).instrument(span));
    }
}

/// Take a listener slot and a global slot, or say why not.
fn admit(ctx: &Ctx) -> Result<(ListenerSlot, OwnedSemaphorePermit), String> {
    let listener = ctx.listener.admit()?;
    let global = ctx.connections.clone().try_acquire_owned().map_err(|_| {
        format!(
            "global connection limit ({}) reached",
            ctx.app.config.limits.max_connections
        )
    })?;
    Ok((listener, global))
}

/// One device's session; `balancer` is set on a `proxy_protocol` listener
/// (the peer was found in `proxy_from`), and only then is a header read.
async fn session(ctx: Ctx, tcp: TcpStream, mut peer: SocketAddr, balancer: Option<TrustedPeer>) {
    let started = Instant::now();
    let protocol = ctx.listener.protocol;
    let _slots = match admit(&ctx) {
        Ok(s) => s,
        Err(why) => {
            let said = wire::farewell(protocol, Farewell::Busy);
            device::refusal::turned_away(protocol, peer.ip(), &why, said);
            crate::metrics::session_ended(protocol, "busy", 0, 0);
            let mut conn = Conn::new(Stream::Plain(tcp));
            let _ = conn
                .send(wire::farewell(protocol, Farewell::Busy), BUSY_WRITE_TIMEOUT)
                .await;
            return;
        }
    };
    let _active = crate::metrics::ActiveSession::new(protocol);
    if let Some(balancer) = balancer {
        match crate::net::proxy_protocol::read(&tcp, balancer).await {
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
    let mut tls_version = None;
    let stream = if ctx.listener.tls == TlsMode::Implicit {
        let acceptor = ctx
            .listener
            .tls_acceptor()
            .expect("implicit TLS has an acceptor");
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok((s, info))) => {
                ctx.listener.tls_established(&info);
                tls_version = Some(info.version);
                s
            }
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
    let app = &ctx.app;
    let host = app.hostname.clone();
    let context = Context {
        host,
        tls: conn.is_tls(),
        can_starttls: ctx.listener.tls == TlsMode::Starttls,
        allow_plaintext_auth: ctx.listener.allow_plaintext_auth,
    };
    // The protocol is chosen here, once; one driver runs every session.
    let mut dialogue: Box<dyn Dialogue> = match protocol {
        Protocol::Smtp => Box::new(device::smtp::Session::new(
            context,
            app.relay_rule(peer.ip()),
            match ctx.listener.delivery {
                Delivery::Spool => app.spool.as_ref().map(|s| s.keywords()),
                Delivery::Session => None,
            },
        )),
        Protocol::Imap => Box::new(device::imap::Session::new(context)),
        Protocol::Pop3 => Box::new(device::pop3::Session::new(context)),
    };
    // The accounts before the login: a moving IMAP session checks that its
    // account did not change while the device logged in.
    let accounts = (protocol == Protocol::Imap).then(|| app.accounts());
    // Boxed: the login's state (parsers, token and upstream futures) is
    // freed when it ends instead of staying in every relayed session's task.
    let handoff = Box::pin(device::drive(
        app,
        &ctx.listener,
        (conn, tls_version),
        peer,
        &ctx.stop,
        dialogue.as_mut(),
    ))
    .await;
    drop(dialogue);
    match handoff {
        Handoff::Relay(ready) => {
            let Ready {
                device,
                login,
                senders,
                who,
            } = *ready;
            let LoggedIn { upstream, id } = login;
            let idle = Duration::from_secs(app.config.limits.idle_timeout_s);
            // The mailbox's slot is held until the relay ends.
            let _mailbox_slot = upstream.slot;
            let r = match protocol {
                Protocol::Imap => {
                    let expiry = relay::imap::Expiry {
                        at: upstream.expires_at,
                        lifetime: upstream.lifetime,
                    };
                    let renew = match (ctx.listener.session_continuity, accounts) {
                        (true, Some(before)) => Some(Box::new(relay::imap::Renewer::new(
                            ctx.app.clone(),
                            id.clone(),
                            &before,
                        ))
                            as Box<dyn relay::imap::Renew>),
                        _ => None,
                    };
                    relay::imap::relay(
                        device,
                        upstream.conn,
                        expiry,
                        idle,
                        ctx.abort.clone(),
                        renew,
                    )
                    .await
                }
                _ => {
                    let chunking = upstream.capabilities.iter().any(|c| {
                        c.split(' ')
                            .next()
                            .is_some_and(|k| k.eq_ignore_ascii_case("CHUNKING"))
                    });
                    let senders = senders.map(|s| Senders { chunking, ..s });
                    relay::relay(
                        device,
                        upstream.conn,
                        idle,
                        (protocol, Some(who)),
                        ctx.abort.clone(),
                        senders,
                    )
                    .await
                }
            };
            info!(
                account = %id.account,
                mailbox = %id.mailbox,
                upstream = %id.provider.address(protocol),
                outcome = "relayed",
                end = r.end,
                bytes_to_upstream = r.to_upstream,
                bytes_to_device = r.to_device,
                duration_ms = started.elapsed().as_millis() as u64,
                "session ended"
            );
            crate::metrics::session_ended(protocol, "relayed", r.to_upstream, r.to_device);
        }
        Handoff::Spool(device) => {
            let sink = match (&app.spool, ctx.listener.delivery) {
                (Some(spool), Delivery::Spool) => crate::spool::serve::Sink::Spool(spool.clone()),
                _ => crate::spool::serve::Sink::Graph(ctx.app.clone()),
            };
            let (account, mailbox) = (device.id.account.clone(), device.id.mailbox.clone());
            let config = &app.config.spool;
            let rules = crate::spool::intake::Rules {
                max_bytes: config.max_message_bytes,
                max_recipients: config.max_recipients,
                allowed_senders: match device.relay {
                    true => app
                        .relay_rule(peer.ip())
                        .map(|r| r.allowed_senders)
                        .unwrap_or_default(),
                    false => app.accounts().allowed_senders(&device.id.account),
                },
            };
            let limits = &app.config.limits;
            let setup = crate::spool::serve::Setup {
                host: app.hostname.clone(),
                keywords: crate::spool::keywords(config),
                rules,
                max_line: limits.max_line,
                timeout: Duration::from_secs(limits.preauth_timeout_s),
            };
            let served = crate::spool::serve::serve(sink, setup, *device, &ctx.abort).await;
            info!(
                account = %account,
                mailbox = %mailbox,
                outcome = "spooled",
                end = served.end,
                messages = served.messages,
                bytes = served.bytes,
                duration_ms = started.elapsed().as_millis() as u64,
                "session ended"
            );
            crate::metrics::session_ended(protocol, "spooled", served.bytes, 0);
        }
        Handoff::Closed(why) => {
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
