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

/// Whether Graph may have taken a message it did not say it took: each
/// such case can make a duplicate when the message is sent again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Doubt {
    /// The final request (`sendMail`, `send`) was sent again after an
    /// answer that leaves it open whether Graph took it (a 503).
    pub resent: u32,
    /// The send failed after its final request went out without a clear
    /// answer (a timeout, a cut, a 5xx): Graph may have taken it.
    pub open: bool,
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
        self.call_final(build, &mut None).await
    }

    /// [`Graph::call`] for a request that sends the message: what leaves
    /// it open whether Graph took it is noted in `doubt`.
    async fn call_final(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        doubt: &mut Option<&mut Doubt>,
    ) -> Result<Answer, GraphError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let response = match build().send().await {
                Ok(r) => r,
                Err(e) => {
                    if let Some(d) = doubt.as_deref_mut() {
                        // Refused before it was sent, or perhaps taken.
                        d.open = !e.is_connect();
                    }
                    return Err(network(e));
                }
            };
            let status = response.status().as_u16();
            if let Some(d) = doubt.as_deref_mut() {
                d.open = status >= 500;
            }
            if matches!(status, 429 | 503) && tries < MAX_THROTTLED_TRIES {
                if status == 503 {
                    if let Some(d) = doubt.as_deref_mut() {
                        d.resent += 1;
                    }
                }
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

    /// `base/users/{mailbox}/{tail...}`, each segment percent-encoded: a
    /// mailbox or an id never adds a path segment, a query or a fragment.
    fn url(&self, mailbox: &str, tail: &[&str]) -> Result<String, GraphError> {
        users_url(&self.base, mailbox, tail)
    }

    /// Send `message` (MIME) from `mailbox` to `recipients` with `token`;
    /// `doubt` says whether Graph may have taken it when it did not say so.
    pub async fn send(
        &self,
        token: &SecretString,
        mailbox: &str,
        message: &[u8],
        recipients: &[String],
        doubt: &mut Doubt,
    ) -> Result<(), GraphError> {
        let message = wire::with_envelope(message, recipients);
        match wire::plan(&message).map_err(GraphError::Refused)? {
            Plan::Whole(mime) => {
                let url = self.url(mailbox, &["sendMail"])?;
                self.call_final(
                    || {
                        self.http
                            .post(&url)
                            .bearer_auth(token.expose_secret())
                            .header("content-type", "text/plain")
                            .body(mime.clone())
                    },
                    &mut Some(doubt),
                )
                .await?
                .expect(202, "sendMail")?;
                Ok(())
            }
            Plan::Draft { mime, attachments } => {
                let url = self.url(mailbox, &["messages"])?;
                let draft = self
                    .post(&url, token, "text/plain", &mime)
                    .await?
                    .expect(201, "create draft")?;
                let id = draft.json("id").ok_or_else(|| {
                    GraphError::Temporary("create draft: no id in the answer".into())
                })?;
                let result = self
                    .complete(token, mailbox, &id, &attachments, doubt)
                    .await;
                let draft = self.url(mailbox, &["messages", &id]);
                if let (Err(_), false, Ok(url)) = (&result, doubt.open, draft) {
                    // Best effort: no half-made draft is left in the mailbox.
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
        doubt: &mut Doubt,
    ) -> Result<(), GraphError> {
        for a in attachments {
            if a.bytes.len() < wire::MIN_UPLOAD_SESSION {
                let url = self.url(mailbox, &["messages", id, "attachments"])?;
                let body = wire::small_attachment(a);
                self.post(&url, token, "application/json", &body)
                    .await?
                    .expect(201, "add attachment")?;
                continue;
            }
            let url = self.url(
                mailbox,
                &["messages", id, "attachments", "createUploadSession"],
            )?;
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
        let url = self.url(mailbox, &["messages", id, "send"])?;
        self.call_final(
            || {
                self.http
                    .post(&url)
                    .bearer_auth(token.expose_secret())
                    .header("content-length", "0")
            },
            &mut Some(doubt),
        )
        .await?
        .expect(202, "send draft")?;
        Ok(())
    }
}

/// `base/users/{mailbox}/{tail...}` with every segment percent-encoded.
/// A segment with a control character is refused (URL parsers drop tabs
/// and line breaks, which would name another mailbox).
fn users_url(base: &str, mailbox: &str, tail: &[&str]) -> Result<String, GraphError> {
    let segments = || std::iter::once(&mailbox).chain(tail);
    if mailbox.is_empty() || segments().any(|s| s.chars().any(char::is_control)) {
        return Err(GraphError::Refused(format!(
            "\"{}\" cannot name a mailbox in Microsoft Graph",
            mailbox.escape_debug()
        )));
    }
    let mut url = reqwest::Url::parse(base)
        .map_err(|e| GraphError::Refused(format!("upstream.graph: {e}")))?;
    url.path_segments_mut()
        .map_err(|()| GraphError::Refused("upstream.graph cannot have a path".into()))?
        .pop_if_empty()
        .push("users")
        .push(mailbox)
        .extend(tail);
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_mailboxes_stay_one_path_segment() {
        let base = "https://graph.test/v1.0";
        assert_eq!(
            users_url(base, "scans@contoso.test", &["sendMail"]).unwrap(),
            "https://graph.test/v1.0/users/scans@contoso.test/sendMail"
        );
        for (mailbox, encoded) in [
            ("a/../../me@x.test", "a%2F..%2F..%2Fme@x.test"),
            ("a?x=1@x.test", "a%3Fx=1@x.test"),
            ("a#f@x.test", "a%23f@x.test"),
            ("a%2F@x.test", "a%252F@x.test"),
            ("a b@x.test", "a%20b@x.test"),
        ] {
            assert_eq!(
                users_url(base, mailbox, &["messages", "AA/b=", "send"]).unwrap(),
                format!("https://graph.test/v1.0/users/{encoded}/messages/AA%2Fb=/send"),
                "{mailbox:?}"
            );
        }
        for hostile in ["a\r\nX: y@x.test", "a\tb@x.test", "a\u{1}b@x.test", ""] {
            assert!(
                matches!(
                    users_url(base, hostile, &["sendMail"]),
                    Err(GraphError::Refused(_))
                ),
                "{hostile:?}"
            );
        }
    }

    /// A loopback HTTP server answering each request with the next of
    /// `answers` (status, extra header lines); its address.
    async fn scripted(answers: Vec<(u16, &'static str)>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for (status, extra) in answers {
                let Ok((mut c, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Headers, then the body its Content-Length announces.
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .split("content-length:")
                            .nth(1)
                            .and_then(|v| v.split("\r\n").next())
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = c.write_all(reply.as_bytes()).await;
            }
        });
        format!("http://{addr}/v1.0")
    }

    async fn send_to(base: &str) -> (Result<(), GraphError>, Doubt) {
        let graph = Graph::new(base, None).unwrap();
        let mut doubt = Doubt::default();
        let token = SecretString::from("t".to_string());
        let message = b"From: a@x.test\r\nTo: b@x.test\r\n\r\nhi\r\n";
        let result = graph
            .send(
                &token,
                "a@x.test",
                message,
                &["b@x.test".into()],
                &mut doubt,
            )
            .await;
        (result, doubt)
    }

    #[tokio::test]
    async fn unclear_answers_to_a_send_leave_doubt() {
        // A 503 asked again, then taken: one resend that may be a duplicate.
        let base = scripted(vec![(503, "retry-after: 0\r\n"), (202, "")]).await;
        let (result, doubt) = send_to(&base).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            doubt,
            Doubt {
                resent: 1,
                open: false
            }
        );
        // A 504: Graph may have taken it.
        let (result, doubt) = send_to(&scripted(vec![(504, "")]).await).await;
        assert!(
            matches!(result, Err(GraphError::Temporary(_))),
            "{result:?}"
        );
        assert_eq!(
            doubt,
            Doubt {
                resent: 0,
                open: true
            }
        );
        // A 429 is a clear no; so is a 400.
        let base = scripted(vec![(429, "retry-after: 0\r\n"), (400, "")]).await;
        let (result, doubt) = send_to(&base).await;
        assert!(matches!(result, Err(GraphError::Refused(_))), "{result:?}");
        assert_eq!(doubt, Doubt::default());
        // Nobody listening: never sent.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1.0", closed.local_addr().unwrap());
        drop(closed);
        let (_, doubt) = send_to(&base).await;
        assert_eq!(doubt, Doubt::default());
    }
}
