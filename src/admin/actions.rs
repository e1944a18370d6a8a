//! What an operator can do from the status page: Connect / Reconnect a
//! `refresh_token` account (see [`super::consent`]), Check now (what
//! `oxbridge check` prints for one account), and Retry or Drop a message
//! of the SMTP queue.
//!
//! Promises: every action is a POST of a plain form (no JavaScript) behind
//! the admin token, which must be configured (`[admin] token_file`, also
//! on loopback), and carries the anti-forgery token of the page it came
//! from; the consent callback is behind the admin token and takes only a
//! `state` this process issued. A request missing any of these is
//! answered 4xx and changes nothing. No token, code or secret is written
//! to a page, a URL of ours, the log or `/metrics`. Each action is logged
//! with its account (or message) and result, and counted
//! (`oxbridge_admin_actions_total`).

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tracing::{info, warn};

use super::Admin;
use crate::status::notice::{self, Notice};

/// The routes of the actions (put behind the admin token by the caller).
pub fn routes() -> Router<Admin> {
    Router::new()
        .route("/actions/connect", post(connect))
        .route("/actions/paste", post(paste))
        .route("/actions/check", post(check))
        .route("/actions/queue", post(queue))
        .route("/consent/callback", get(callback))
}

/// Headers of the pages the actions answer with.
const NOTICE_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// A page of ours, never cached.
fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, NOTICE_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// An action's result page, logged and counted.
fn done(
    action: &'static str,
    subject: &str,
    result: Result<String, String>,
    lines: Vec<String>,
) -> Response {
    let (ok, text) = match &result {
        Ok(t) => (true, t.clone()),
        Err(e) => (false, e.clone()),
    };
    let outcome = if ok { "ok" } else { "failed" };
    crate::metrics::admin_action(action, outcome);
    if ok {
        info!(action, subject, result = outcome, "status page action");
    } else {
        warn!(action, subject, result = outcome, error = %text, "status page action");
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    html(
        status,
        notice::render(
            &Notice {
                title: text,
                ok,
                lines,
            },
            "../",
        ),
    )
}

/// Refused before anything was done: 4xx, logged and counted.
fn refused(action: &'static str, subject: &str, status: StatusCode, why: &str) -> Response {
    crate::metrics::admin_action(action, "refused");
    warn!(
        action,
        subject,
        result = "refused",
        why,
        "status page action refused"
    );
    html(
        status,
        notice::render(
            &Notice {
                title: format!("Refused: {why}"),
                ok: false,
                lines: Vec::new(),
            },
            "../",
        ),
    )
}

/// A form's fields.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        Form(
            oauth2::url::form_urlencoded::parse(body)
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

/// The refusal, unless actions may run at all (an admin token is
/// configured) and the form carries a fresh anti-forgery token of ours.
fn unadmitted(admin: &Admin, action: &'static str, form: &Form) -> Option<Response> {
    let subject = [form.get("account"), form.get("id")].concat();
    if admin.token.is_none() {
        return Some(refused(
            action,
            &subject,
            StatusCode::FORBIDDEN,
            "actions need an admin token: set [admin] token_file",
        ));
    }
    if !admin
        .forgery
        .check(form.get("csrf"), crate::status::board::now())
    {
        return Some(refused(
            action,
            &subject,
            StatusCode::FORBIDDEN,
            "the form's anti-forgery token is missing, not ours or older than an hour: reload the status page and try again",
        ));
    }
    None
}

async fn connect(State(admin): State<Admin>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = unadmitted(&admin, "connect", &form) {
        return r;
    }
    let account = form.get("account");
    let callback = admin
        .app
        .config
        .admin
        .as_ref()
        .and_then(|a| a.consent_callback());
    match admin
        .consents
        .start(&admin.app, account, callback.as_deref())
    {
        Ok((url, _, _)) if callback.is_some() => {
            crate::metrics::admin_action("connect", "ok");
            info!(
                action = "connect",
                subject = account,
                result = "ok",
                "status page action: sent to the provider's sign-in"
            );
            (StatusCode::SEE_OTHER, [(header::LOCATION, url)]).into_response()
        }
        Ok((url, mailbox, redirect)) => {
            crate::metrics::admin_action("connect", "ok");
            info!(
                action = "connect",
                subject = account,
                result = "ok",
                "status page action: sign-in link shown"
            );
            let token = admin.forgery.issue(crate::status::board::now());
            html(
                StatusCode::OK,
                notice::consent(account, &mailbox, &url, &redirect, &token),
            )
        }
        Err(e) => done("connect", account, Err(e), Vec::new()),
    }
}

async fn paste(State(admin): State<Admin>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = unadmitted(&admin, "consent", &form) {
        return r;
    }
    match admin.consents.take_pasted(form.get("address")) {
        Ok((started, code)) => {
            let account = started.account.clone();
            let result = super::consent::finish(&admin.app, started, code).await;
            done("consent", &account, result, Vec::new())
        }
        Err(why) => refused("consent", "", StatusCode::BAD_REQUEST, &why),
    }
}

#[derive(serde::Deserialize)]
struct Callback {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(State(admin): State<Admin>, Query(q): Query<Callback>) -> Response {
    if admin.token.is_none() {
        return refused(
            "consent",
            "",
            StatusCode::FORBIDDEN,
            "actions need an admin token: set [admin] token_file",
        );
    }
    let Some(started) = q.state.as_deref().and_then(|s| admin.consents.take(s)) else {
        return refused(
            "consent",
            "",
            StatusCode::BAD_REQUEST,
            "this sign-in's state is not one started here, or it was used or is older than 10 minutes: start again with Connect",
        );
    };
    let account = started.account.clone();
    let result = match (q.error, q.code) {
        (Some(error), _) => Err(format!(
            "the provider answered {error}{}",
            q.error_description
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        )),
        (None, Some(code)) => super::consent::finish(&admin.app, started, code).await,
        (None, None) => Err("the provider sent no code".into()),
    };
    done("consent", &account, result, Vec::new())
}

async fn check(State(admin): State<Admin>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = unadmitted(&admin, "check", &form) {
        return r;
    }
    let login = form.get("account");
    let Some(summary) = admin
        .app
        .accounts()
        .summaries()
        .into_iter()
        .find(|a| a.login == login.to_lowercase())
    else {
        return refused("check", login, StatusCode::BAD_REQUEST, "no such account");
    };
    let (lines, ok) = crate::check::account_lines(&admin.app, &summary.login, summary.grant).await;
    let result = match ok {
        true => Ok(format!("Check of {}: OK", summary.login)),
        false => Err(format!("Check of {}: FAILED", summary.login)),
    };
    done("check", &summary.login, result, lines)
}

async fn queue(State(admin): State<Admin>, body: Bytes) -> Response {
    use crate::spool::cli::Action;
    let form = Form::parse(&body);
    let op = form.get("op");
    let action = if op == "drop" { "drop" } else { "retry" };
    if let Some(r) = unadmitted(&admin, action, &form) {
        return r;
    }
    let id = form.get("id").to_string();
    if admin.app.spool.is_none() || !crate::spool::queue::valid_id(&id) {
        return refused(
            action,
            &id,
            StatusCode::BAD_REQUEST,
            "no such message in the spool",
        );
    }
    let what = match op {
        "retry" => Action::Retry(id.clone()),
        "drop" => Action::Drop(id.clone()),
        _ => {
            return refused(
                action,
                &id,
                StatusCode::BAD_REQUEST,
                "op must be retry or drop",
            )
        }
    };
    let app = admin.app.clone();
    let result = tokio::task::spawn_blocking(move || crate::spool::cli::run(&app.config, what))
        .await
        .unwrap_or_else(|e| Err(format!("the spool task failed: {e}")))
        .map(|t| t.trim_end().to_string());
    done(action, &id, result, Vec::new())
}
