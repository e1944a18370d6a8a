//! The admin HTTP endpoint (`[admin] listen`): `/healthz` (the process
//! answers), `/readyz` (listeners bound, token endpoint reachable, not
//! shutting down), `/metrics` (Prometheus text) and POX Autodiscover
//! (`POST /autodiscover/autodiscover.xml`). It carries no secret: the
//! metrics have no account names, Autodiscover echoes only the address
//! it was asked about.

use std::net::SocketAddr;
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

use crate::app::App;
use crate::{autodiscover, metrics};

/// A token endpoint contact younger than this decides readiness.
pub const READY_TOKEN_AGE: Duration = Duration::from_secs(300);
/// How long a readiness probe may wait to reach the token endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Admin {
    app: Arc<App>,
    endpoints: Arc<Vec<autodiscover::Endpoint>>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
}

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
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
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) {
    let admin = Admin {
        app,
        endpoints: Arc::new(endpoints),
        metrics,
        shutdown,
    };
    if let Err(e) = axum::serve(socket, router(admin)).await {
        error!(error = %e, "admin endpoint failed");
    }
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let not_ready = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    };
    if admin.shutdown.is_cancelled() {
        return not_ready("shutting down").into_response();
    }
    if !metrics::are_listeners_bound() {
        return not_ready("listeners not bound yet").into_response();
    }
    let reached = match metrics::token_endpoint_recent(READY_TOKEN_AGE) {
        Some(reached) => reached,
        None => probe_token_endpoint(&admin.app.config.oauth.token_url()).await,
    };
    if !reached {
        return not_ready("token endpoint unreachable").into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// Can a TCP connection to the token endpoint be opened? The answer is
/// remembered like any other contact.
async fn probe_token_endpoint(url: &str) -> bool {
    let Ok(url) = oauth2::url::Url::parse(url) else {
        return false;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let reached = matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    );
    debug!(reached, "probed the token endpoint");
    metrics::token_endpoint_contact(reached);
    reached
}

async fn render_metrics(State(admin): State<Admin>) -> Response {
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
    if !admin.app.accounts().matches(&address) {
        debug!(address = %address, "autodiscover: no account matches");
        return xml(
            StatusCode::OK,
            autodiscover::error(500, "The e-mail address cannot be found."),
        );
    }
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
    use super::host_name;

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
}
