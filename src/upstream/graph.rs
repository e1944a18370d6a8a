//! Microsoft Graph as the way out for SMTP mail where SMTP AUTH is off:
//! `POST /users/{mailbox}/sendMail` with the MIME message, or for a
//! message over Graph's 4 MB request limit a draft whose large
//! attachments are uploaded apart (upload sessions, up to 150 MB), then
//! `send`. A 429 or 503 is waited out as its Retry-After says, a few
//! times, before it counts as a temporary failure.

use std::path::Path;
use std::time::Duration;

use oauth2::reqwest;
use secrecy::{ExposeSecret, SecretString};
use tracing::{debug, info};

use crate::wire::graph::{self as wire, Attachment, Plan};

/// How long one Graph request may take, all in.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of one request that Graph throttles (429, 503).
pub const MAX_THROTTLED_TRIES: u32 = 4;

/// Why Graph did not take a message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphError {
    /// Try again later: network, 5xx, throttling that did not end.
    #[error("{0}")]
    Temporary(String),
    /// Graph refused oxbridge's token (401, 403): a setup problem.
    #[error("{0}")]
    Auth(String),
    /// Graph refused the message itself; trying again will not help.
    #[error("{0}")]
    Refused(String),
}

/// The Graph client: one HTTPS connection pool, verified like every upstream.
pub struct Graph {
    http: reqwest::Client,
    base: String,
}

/// A transport failure as text, without the URL: an upload URL carries
/// its own authorization, which must not reach a log or the spool.
fn network(e: reqwest::Error) -> GraphError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    GraphError::Temporary(format!("Graph unreachable: {text}"))
}

/// What a finished request answered.
struct Answer {
    status: u16,
    body: bytes::Bytes,
}

impl Answer {
    fn json(&self, field: &str) -> Option<String> {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()?
            .get(field)?
            .as_str()
            .map(str::to_string)
    }

    /// Fail unless the status is `want`.
    fn expect(self, want: u16, what: &str) -> Result<Answer, GraphError> {
        if self.status == want {
            return Ok(self);
        }
        let line = format!("{what}: {}", wire::error_line(self.status, &self.body));
        Err(match self.status {
            401 | 403 => GraphError::Auth(line),
            408 | 429 | 500..=599 => GraphError::Temporary(line),
            _ => GraphError::Refused(line),
        })
    }
}

impl Graph {
    /// A client for the Graph at `base` (`https://graph.microsoft.com/v1.0`),
    /// trusting the system roots and `ca_file`.
    pub fn new(base: &str, ca_file: Option<&Path>) -> Result<Graph, String> {
        let tls = crate::net::tls::upstream_config(ca_file)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("oxbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("Graph client: {e}"))?;
        Ok(Graph {
            http,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    /// Send a request built by `build`, waiting out throttling.
    async fn call(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer, GraphError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let response = build().send().await.map_err(network)?;
            let status = response.status().as_u16();
            if matches!(status, 429 | 503) && tries < MAX_THROTTLED_TRIES {
                let wait = wire::retry_after(
                    response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()),
                );
                info!(
                    status,
                    wait_ms = wait.as_millis() as u64,
                    "Graph asks to wait; waiting"
                );
                crate::metrics::graph_request("throttled");
                tokio::time::sleep(wait).await;
                continue;
            }
            let body = response.bytes().await.map_err(network)?;
            crate::metrics::graph_request(if (200..300).contains(&status) {
                "ok"
            } else {
                "error"
            });
            return Ok(Answer { status, body });
        }
    }

    /// POST `body` to `url` with the token, waiting out throttling.
    async fn post(
        &self,
        url: &str,
        token: &SecretString,
        content_type: &'static str,
        body: &str,
    ) -> Result<Answer, GraphError> {
        self.call(|| {
            self.http
                .post(url)
                .bearer_auth(token.expose_secret())
                .header("content-type", content_type)
                .body(body.to_string())
        })
        .await
    }

    fn url(&self, mailbox: &str, tail: &str) -> String {
        format!("{}/users/{mailbox}{tail}", self.base)
    }

    /// Send `message` (MIME) from `mailbox` to `recipients` with `token`.
    pub async fn send(
        &self,
        token: &SecretString,
        mailbox: &str,
        message: &[u8],
        recipients: &[String],
    ) -> Result<(), GraphError> {
        let message = wire::with_envelope(message, recipients);
        match wire::plan(&message).map_err(GraphError::Refused)? {
            Plan::Whole(mime) => {
                let url = self.url(mailbox, "/sendMail");
                self.post(&url, token, "text/plain", &mime)
                    .await?
                    .expect(202, "sendMail")?;
                Ok(())
            }
            Plan::Draft { mime, attachments } => {
                let url = self.url(mailbox, "/messages");
                let draft = self
                    .post(&url, token, "text/plain", &mime)
                    .await?
                    .expect(201, "create draft")?;
                let id = draft.json("id").ok_or_else(|| {
                    GraphError::Temporary("create draft: no id in the answer".into())
                })?;
                let result = self.complete(token, mailbox, &id, &attachments).await;
                if result.is_err() {
                    // Best effort: no half-made draft is left in the mailbox.
                    let url = self.url(mailbox, &format!("/messages/{id}"));
                    let _ = self
                        .http
                        .delete(&url)
                        .bearer_auth(token.expose_secret())
                        .send()
                        .await;
                }
                result
            }
        }
    }

    /// Add the attachments to draft `id`, then send it.
    async fn complete(
        &self,
        token: &SecretString,
        mailbox: &str,
        id: &str,
        attachments: &[Attachment],
    ) -> Result<(), GraphError> {
        for a in attachments {
            if a.bytes.len() < wire::MIN_UPLOAD_SESSION {
                let url = self.url(mailbox, &format!("/messages/{id}/attachments"));
                let body = wire::small_attachment(a);
                self.post(&url, token, "application/json", &body)
                    .await?
                    .expect(201, "add attachment")?;
                continue;
            }
            let url = self.url(
                mailbox,
                &format!("/messages/{id}/attachments/createUploadSession"),
            );
            let body = wire::upload_session(a);
            let session = self
                .post(&url, token, "application/json", &body)
                .await?
                .expect(201, "create upload session")?;
            let upload = session
                .json("uploadUrl")
                .ok_or_else(|| GraphError::Temporary("upload session: no uploadUrl".into()))?;
            let total = a.bytes.len();
            let mut from = 0;
            while from < total {
                let chunk = &a.bytes[from..(from + wire::UPLOAD_CHUNK).min(total)];
                let range = wire::content_range(from, chunk.len(), total);
                let last = from + chunk.len() == total;
                // The upload URL carries its own authorization: no token.
                let answer = self
                    .call(|| {
                        self.http
                            .put(&upload)
                            .header("content-range", range.clone())
                            .header("content-type", "application/octet-stream")
                            .body(chunk.to_vec())
                    })
                    .await?;
                answer.expect(if last { 201 } else { 200 }, "upload")?;
                debug!(range = %range, "attachment range uploaded");
                from += chunk.len();
            }
        }
        let url = self.url(mailbox, &format!("/messages/{id}/send"));
        self.call(|| {
            self.http
                .post(&url)
                .bearer_auth(token.expose_secret())
                .header("content-length", "0")
        })
        .await?
        .expect(202, "send draft")?;
        Ok(())
    }
}
