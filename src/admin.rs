//! The admin HTTP endpoint (`[admin] listen`): `/` (the status page),
//! `/healthz` (the process answers; its body details the health facts),
//! `/readyz` (this replica can take devices: listeners bound, not
//! shutting down, the Redis store answering where one is configured),
//! `/metrics` (Prometheus text) and POX Autodiscover
//! (`POST /autodiscover/autodiscover.xml`).
//!
//! The token endpoint's and the upstreams' reachability are health facts
//! ([`crate::health`]), never readiness: while Entra ID is down a spooling
//! listener still answers `250`, so a load balancer must keep sending.
//!
//! It carries no secret. The status page and the metrics name accounts
//! and mailboxes, so with `[admin] token_file` (required off loopback)
//! they answer only a request that carries that token, as
//! `Authorization: Bearer` or as the password of HTTP Basic (which a
//! browser asks for). The probes and Autodiscover stay open: kubelets and
//! mail clients carry no token, and they learn nothing about accounts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use axum::middleware;

use crate::app::App;
use crate::config::StoreBackend;
use crate::status::{self, Bound};
use crate::{autodiscover, health, metrics};

mod actions;
mod consent;
mod guard;

use guard::{authorized, digest, Forgery};

/// A token endpoint fact older than this is renewed, in the background,
/// when someone looks (`/healthz`, the status page, `/metrics`), so that
/// the metric and the alert on it stay current while no device logs in.
pub const TOKEN_FACT_AGE: Duration = Duration::from_secs(300);
/// How long a background probe may wait to reach the token endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `/readyz` waits for the Redis store's PING.
const STORE_PING_TIMEOUT: Duration = Duration::from_millis(1500);
/// `/healthz` and the status page never wait for Redis: they show its
/// last PING, renewed in the background when older than this.
const STORE_FACT_AGE_S: u64 = 5;
/// One background probe of the token endpoint at a time.
static PROBING: AtomicBool = AtomicBool::new(false);
/// One background PING of the Redis store at a time.
static PINGING: AtomicBool = AtomicBool::new(false);

#[derive(Clone)]
struct Admin {
    app: Arc<App>,
    endpoints: Arc<Vec<autodiscover::Endpoint>>,
    listeners: Arc<Vec<Bound>>,
    /// Unix second the process started.
    started: u64,
    /// SHA-256 of `[admin] token_file`'s token, compared with the
    /// request's (so the comparison takes the same time for any guess).
    token: Option<[u8; 32]>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    /// The anti-forgery tokens of the status page's forms.
    forgery: Arc<Forgery>,
    /// Consents started from the status page.
    consents: Arc<consent::Consents>,
    /// The status page's `Content-Security-Policy`: its forms may go to
    /// this endpoint, and Connect on to the providers' sign-in pages.
    page_policy: Arc<String>,
}

fn router(admin: Admin) -> Router {
    let guarded = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(render_metrics))
        .merge(actions::routes())
        .route_layer(middleware::from_fn_with_state(admin.clone(), authorized));
    Router::new()
        .merge(guarded)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/autodiscover/autodiscover.xml", post(autodiscover))
        .route("/Autodiscover/Autodiscover.xml", post(autodiscover))
        .layer(DefaultBodyLimit::max(autodiscover::MAX_REQUEST))
        .with_state(admin)
}

/// Serve until the process ends (it stays up during the drain so that
/// `/readyz` can say "shutting down").
pub async fn serve(
    socket: TcpListener,
    app: Arc<App>,
    endpoints: Vec<autodiscover::Endpoint>,
    listeners: Vec<Bound>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) {
    let token = app
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.as_ref())
        .map(digest);
    let page_policy = Arc::new(page_policy(&app));
    let admin = Admin {
        forgery: Arc::new(Forgery::new()),
        consents: Arc::default(),
        page_policy,
        app,
        endpoints: Arc::new(endpoints),
        listeners: Arc::new(listeners),
        started: status::board::now(),
        token,
        metrics,
        shutdown,
    };
    if let Err(e) = axum::serve(socket, router(admin)).await {
        error!(error = %e, "admin endpoint failed");
    }
}

/// Why this replica cannot take devices, if it cannot: shutting down,
/// listeners not bound, or the Redis store not answering. The health
/// facts of the token endpoint and the upstreams are not a reason: a
/// spooling listener takes mail while they are down, and every other
/// listener answers devices with the protocol's temporary failure.
fn readiness(shutting_down: bool, listeners_bound: bool, facts: &health::Facts) -> Option<String> {
    if shutting_down {
        return Some("shutting down".into());
    }
    if !listeners_bound {
        return Some("listeners not bound yet".into());
    }
    match &facts.store {
        health::Store::Redis(Some(c)) if !c.reachable => Some(format!(
            "the Redis store does not answer ({})",
            c.error.as_deref().unwrap_or("no answer")
        )),
        _ => None,
    }
}

fn redis(admin: &Admin) -> bool {
    admin.app.config.store.backend == StoreBackend::Redis
}

/// PING the Redis store (bounded) and remember its answer.
async fn ping_store(app: &App) {
    let error = match tokio::time::timeout(STORE_PING_TIMEOUT, app.state.reachable()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "no answer to PING within {} ms",
            STORE_PING_TIMEOUT.as_millis()
        )),
    };
    health::store(error.as_deref());
}

/// What this process knows, without waiting for anything: stale facts
/// (the token endpoint's, Redis's) are renewed in the background.
fn facts(admin: &Admin) -> health::Facts {
    if metrics::token_endpoint_recent(TOKEN_FACT_AGE).is_none() {
        renew_token_fact(admin.app.config.oauth.token_url());
    }
    let facts = health::facts(&admin.app.config.protocols(), redis(admin));
    if let health::Store::Redis(last) = &facts.store {
        let stale = !last
            .as_ref()
            .is_some_and(|c| health::unix_now().saturating_sub(c.last) < STORE_FACT_AGE_S);
        if stale && !PINGING.swap(true, Ordering::AcqRel) {
            let app = admin.app.clone();
            tokio::spawn(async move {
                ping_store(&app).await;
                PINGING.store(false, Ordering::Release);
            });
        }
    }
    facts
}

/// `/readyz`'s verdict: Redis is asked now (1.5 s at most).
async fn not_ready(admin: &Admin) -> Option<String> {
    if redis(admin) {
        ping_store(&admin.app).await;
    }
    let facts = health::facts(&[], redis(admin));
    readiness(
        admin.shutdown.is_cancelled(),
        metrics::are_listeners_bound(),
        &facts,
    )
}

async fn readyz(State(admin): State<Admin>) -> Response {
    match not_ready(&admin).await {
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
        None => (StatusCode::OK, "ready\n").into_response(),
    }
}

/// `200 ok` while the process serves, then one line per health fact.
async fn healthz(State(admin): State<Admin>) -> Response {
    let body = health::detail(&facts(&admin));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Headers of the status page: nothing loads from elsewhere, nothing is
/// kept by caches or shown in a frame; its forms go to this endpoint and,
/// through Connect's redirect, to the providers' sign-in pages.
fn page_policy(app: &App) -> String {
    let mut origins: Vec<String> = app
        .providers
        .iter()
        .filter_map(|p| oauth2::url::Url::parse(&p.authorize_url).ok())
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o != "null")
        .collect();
    origins.sort();
    origins.dedup();
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self' {}",
        origins.join(" ")
    )
}

async fn status_page(State(admin): State<Admin>) -> Response {
    let facts = facts(&admin);
    let not_ready = readiness(
        admin.shutdown.is_cancelled(),
        metrics::are_listeners_bound(),
        &facts,
    );
    let mut view = status::gather(&admin.app, &admin.listeners, admin.started, not_ready).await;
    view.health = health::problems(&facts);
    // Forms only where an admin token guards them.
    view.form_token = admin.token.map(|_| admin.forgery.issue(view.now));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, admin.page_policy.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        status::page::render(&view),
    )
        .into_response()
}

/// Probe the token endpoint in the background, unless a probe is under way.
fn renew_token_fact(url: String) {
    if PROBING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async move {
        probe_token_endpoint(&url).await;
        PROBING.store(false, Ordering::Release);
    });
}

/// Can a TCP connection to the token endpoint be opened? The answer is
/// remembered like any other contact.
async fn probe_token_endpoint(url: &str) {
    let Ok(parsed) = oauth2::url::Url::parse(url) else {
        return metrics::token_endpoint_failed(&format!("cannot parse {url}"));
    };
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return metrics::token_endpoint_failed(&format!("no host or port in {url}"));
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let connect = tokio::net::TcpStream::connect((host.clone(), port));
    let failure = match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("cannot connect: {e} ({host}:{port})")),
        Err(_) => Some(format!(
            "cannot connect: no answer within {} s ({host}:{port})",
            PROBE_TIMEOUT.as_secs()
        )),
    };
    debug!(reached = failure.is_none(), "probed the token endpoint");
    match failure {
        None => metrics::token_endpoint_contact(true),
        Some(why) => metrics::token_endpoint_failed(&why),
    }
}

async fn render_metrics(State(admin): State<Admin>) -> Response {
    if metrics::token_endpoint_recent(TOKEN_FACT_AGE).is_none() {
        renew_token_fact(admin.app.config.oauth.token_url());
    }
    metrics::held(
        &admin.app.mailbox_limits.in_use(),
        admin.app.throttle.census(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        admin.metrics.render(),
    )
        .into_response()
}

async fn autodiscover(State(admin): State<Admin>, headers: HeaderMap, body: Bytes) -> Response {
    let xml = |status: StatusCode, body: String| {
        (
            status,
            [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
            body,
        )
            .into_response()
    };
    let Some(address) = autodiscover::requested_address(&body) else {
        return xml(StatusCode::OK, autodiscover::error(600, "Invalid Request"));
    };
    // Whether an account covers the address is not looked up: the answer
    // would tell an unauthenticated caller which addresses are configured.
    let server = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(host_name)
        .unwrap_or_else(|| admin.app.hostname.clone());
    xml(
        StatusCode::OK,
        autodiscover::settings(&address, &server, &admin.endpoints),
    )
}

/// The host part of a `Host` header (`name`, `name:port`, `[v6]:port`).
fn host_name(host: &str) -> Option<String> {
    if let Ok(addr) = host.parse::<SocketAddr>() {
        return Some(addr.ip().to_string());
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    valid.then(|| name.to_string())
}

/// `oxbridge healthcheck`: a plain HTTP GET of `/healthz`, answered 200.
pub fn probe_health(address: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    const TIMEOUT: Duration = Duration::from_secs(5);
    let mut tcp = std::net::TcpStream::connect_timeout(&address, TIMEOUT)
        .map_err(|e| format!("{address}: {e}"))?;
    tcp.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(tcp, "GET /healthz HTTP/1.0\r\nHost: {address}\r\n\r\n")
        .map_err(|e| format!("{address}: {e}"))?;
    let mut head = [0u8; 64];
    let n = tcp.read(&mut head).map_err(|e| format!("{address}: {e}"))?;
    let status = String::from_utf8_lossy(&head[..n]);
    let status = status.lines().next().unwrap_or("");
    if status.starts_with("HTTP/1.") && status.split(' ').nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("{address}: /healthz answered {status:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::{host_name, readiness};
    use crate::config::Protocol;
    use crate::health::{noted, Facts, Store};

    #[test]
    fn host_header_forms() {
        assert_eq!(
            host_name("mail.example.com").as_deref(),
            Some("mail.example.com")
        );
        assert_eq!(
            host_name("mail.example.com:9090").as_deref(),
            Some("mail.example.com")
        );
        assert_eq!(host_name("127.0.0.1:9090").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_name("[::1]:9090").as_deref(), Some("::1"));
        assert_eq!(host_name("evil<x>"), None);
    }

    #[test]
    fn readiness_ignores_the_token_endpoint_and_upstreams() {
        let outage = Facts {
            token_endpoint: Some(noted(None, false, Some("cannot connect"), 1)),
            upstreams: vec![(Protocol::Smtp, Some(noted(None, false, Some("refused"), 1)))],
            store: Store::File,
        };
        assert_eq!(readiness(false, true, &outage), None);
        let redis_up = Facts {
            store: Store::Redis(Some(noted(None, true, None, 1))),
            ..outage.clone()
        };
        assert_eq!(readiness(false, true, &redis_up), None);
        let unchecked = Facts {
            store: Store::Redis(None),
            ..outage.clone()
        };
        assert_eq!(readiness(false, true, &unchecked), None);
    }

    #[test]
    fn readiness_is_listeners_bound_not_draining_and_the_store_answering() {
        let fine = Facts::default();
        assert_eq!(
            readiness(true, true, &fine).as_deref(),
            Some("shutting down")
        );
        assert_eq!(
            readiness(false, false, &fine).as_deref(),
            Some("listeners not bound yet")
        );
        let redis_down = Facts {
            store: Store::Redis(Some(noted(None, false, Some("timed out"), 1))),
            ..Facts::default()
        };
        assert_eq!(
            readiness(false, true, &redis_down).as_deref(),
            Some("the Redis store does not answer (timed out)")
        );
        assert_eq!(
            readiness(true, true, &redis_down).as_deref(),
            Some("shutting down")
        );
    }
}
