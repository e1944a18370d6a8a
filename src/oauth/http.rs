//! The HTTP client the oauth2 crate calls: reqwest without redirects, with
//! timeouts, and with 5xx and 429 answers turned into [`HttpError::Status`]
//! so that they count as temporary failures rather than OAuth errors.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use oauth2::{HttpRequest, HttpResponse};
use tracing::debug;

/// How long one HTTP request to the token endpoint may take, all in.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Network(String),
    #[error("HTTP {status}{}", retry_after.map(|s| format!(" (Retry-After {s}s)")).unwrap_or_default())]
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
}

pub struct Http(oauth2::reqwest::Client);

impl Http {
    /// A client trusting the system roots and `ca_file` (`[upstream]
    /// ca_file` holds for token endpoints too), as upstream connections do.
    pub fn new(ca_file: Option<&std::path::Path>) -> Result<Http, String> {
        let tls = crate::net::tls::upstream_config(ca_file)?;
        oauth2::reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(oauth2::reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("oxbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map(Http)
            .map_err(|e| format!("HTTP client: {e}"))
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + Sync + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(&self.0, request))
    }
}

async fn send(http: &oauth2::reqwest::Client, req: HttpRequest) -> Result<HttpResponse, HttpError> {
    let (parts, body) = req.into_parts();
    let response = http
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let why = describe(&e);
            crate::metrics::token_endpoint_failed(&why);
            HttpError::Network(why)
        })?;
    crate::metrics::token_endpoint_contact(true);
    let status = response.status();
    if status.is_server_error() || status.as_u16() == 429 {
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        debug!(status = status.as_u16(), "token endpoint asks to try later");
        return Err(HttpError::Status {
            status: status.as_u16(),
            retry_after,
        });
    }
    let mut builder = oauth2::http::Response::builder().status(status);
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| HttpError::Network(describe(&e)))?;
    builder
        .body(body.to_vec())
        .map_err(|e| HttpError::Network(e.to_string()))
}

/// A transport error, its causes, and the URL (no secret is in a token URL).
fn describe(e: &oauth2::reqwest::Error) -> String {
    use std::error::Error;
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    if let Some(url) = e.url() {
        s.push_str(&format!(" ({})", url.as_str()));
    }
    s
}
