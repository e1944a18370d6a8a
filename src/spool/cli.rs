//! `oxbridge queue`: what waits in the spool, why, and what to do with it.
//! It reads and changes the spool directory directly, so it works with
//! the server running or not; a running server sees a retry within a
//! second.

use std::fmt::Write as _;

use super::queue::{now, Envelope, Place, Queue, Status};
use crate::config::Config;
use crate::wire::message::{header_section, header_value};

/// What `oxbridge queue` was asked to do.
pub enum Action {
    List,
    Show(String),
    Retry(String),
    RetryAll,
    Drop(String),
}

/// Run `action` on the spool of `config`; the text to print, or the error.
pub fn run(config: &Config, action: Action) -> Result<String, String> {
    let dir = config.spool.dir(&config.state_dir);
    let queue = Queue::existing(&dir).map_err(|e| no_spool(config, &dir, &e))?;
    match action {
        Action::List => list(&queue),
        Action::Show(id) => show(&queue, &id),
        Action::Retry(id) => {
            queue.request_retry(&id).map_err(|e| e.to_string())?;
            Ok(format!(
                "{id}: will be tried within a second (if oxbridge is running)\n"
            ))
        }
        Action::RetryAll => {
            let ids = queue.ids(Place::Queue).map_err(|e| e.to_string())?;
            for id in &ids {
                queue.request_retry(id).map_err(|e| format!("{id}: {e}"))?;
            }
            Ok(format!(
                "{} messages will be tried within a second\n",
                ids.len()
            ))
        }
        Action::Drop(id) => {
            let place = queue
                .find(&id)
                .ok_or_else(|| format!("no message {id} in the spool"))?;
            queue.retire(place, &id).map_err(|e| e.to_string())?;
            Ok(format!("{id}: dropped; its sender is not told\n"))
        }
    }
}

/// Why there is no spool at `dir` to look at, and where one comes from.
fn no_spool(config: &Config, dir: &std::path::Path, e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::NotFound {
        return format!("spool {}: {e}", dir.display());
    }
    if config.spools() {
        format!(
            "spool {}: holds no spool yet: `oxbridge run` makes it when it starts. Fix: if oxbridge runs already, give `oxbridge queue` the service's --config (its state_dir and spool.dir) and run it as the service's user",
            dir.display()
        )
    } else {
        format!(
            "spool {}: holds no spool: no [[listener]] has delivery = \"spool\". Fix: only an SMTP [[listener]] with delivery = \"spool\" keeps messages to deliver later; `oxbridge run` makes the spool for it, then `oxbridge queue` shows what waits there",
            dir.display()
        )
    }
}

/// A duration as `3d 4h`, `5m 2s`.
fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn one_line(env: &Envelope, status: &Status, place: Place) -> String {
    let t = now();
    let to = env.pending_summary(status);
    let next = match place {
        Place::Dead => "dead".to_string(),
        Place::Queue if status.next_attempt_at <= t => "now".to_string(),
        Place::Queue => format!("in {}", age(status.next_attempt_at - t)),
    };
    let why = status
        .dead_because
        .as_deref()
        .or(status.last_error.as_deref())
        .unwrap_or("");
    format!(
        "{}  {:>7}  {:>9}  {:>3}  {:>9}  <{}> -> {}  {}",
        env.id,
        age(t.saturating_sub(env.received_at)),
        size(env.size),
        status.attempts,
        next,
        env.sender,
        to,
        why
    )
}

fn list(queue: &Queue) -> Result<String, String> {
    let mut out = String::new();
    for place in [Place::Queue, Place::Dead] {
        let ids = queue.ids(place).map_err(|e| e.to_string())?;
        let title = match place {
            Place::Queue => "waiting",
            Place::Dead => "dead letters (neither delivered nor reported; `oxbridge queue retry ID` puts one back)",
        };
        let _ = writeln!(out, "{title}: {}", ids.len());
        if ids.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "ID                   AGE       SIZE  TRY       NEXT  FROM -> TO  LAST ERROR"
        );
        for id in ids {
            match queue.load(place, &id) {
                Ok((env, status)) => {
                    let _ = writeln!(out, "{}", one_line(&env, &status, place));
                }
                Err(e) => {
                    let _ = writeln!(out, "{id}  (unreadable: {e})");
                }
            }
        }
    }
    Ok(out)
}

fn show(queue: &Queue, id: &str) -> Result<String, String> {
    let place = queue
        .find(id)
        .ok_or_else(|| format!("no message {id} in the spool"))?;
    let (env, status) = queue.load(place, id).map_err(|e| e.to_string())?;
    let path = queue.message_path(place, id);
    let start = std::fs::read(&path)
        .map(|mut b| {
            b.truncate(64 * 1024);
            b
        })
        .unwrap_or_default();
    let headers = header_section(&start, start.len());
    let mut out = String::new();
    let t = now();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<14} {v}");
    };
    row("id", env.id.clone());
    row(
        "where",
        match place {
            Place::Queue => "waiting".into(),
            Place::Dead => "dead letter".into(),
        },
    );
    row(
        "account",
        format!("{} (mailbox {})", env.account, env.mailbox),
    );
    row(
        "from device",
        format!(
            "{} (EHLO {}){}",
            env.client,
            env.helo,
            if env.relay { ", relay rule" } else { "" }
        ),
    );
    row(
        "received",
        format!("{} ago", age(t.saturating_sub(env.received_at))),
    );
    row("size", size(env.size));
    row("sender", format!("<{}>", env.sender));
    for r in &env.recipients {
        let done = status.done.iter().any(|d| d.eq_ignore_ascii_case(r));
        row(
            "recipient",
            format!("<{r}>{}", if done { " (done)" } else { "" }),
        );
    }
    row("attempts", status.attempts.to_string());
    if place == Place::Queue {
        row(
            "next attempt",
            match status.next_attempt_at {
                n if n <= t => "now".into(),
                n => format!("in {}", age(n - t)),
            },
        );
    }
    if let Some(e) = &status.last_error {
        row("last error", e.clone());
    }
    if let Some(d) = &status.dead_because {
        row("dead because", d.clone());
    }
    if env.report {
        row("report", "a delivery report oxbridge wrote".into());
    }
    for h in ["Subject", "From", "To", "Date", "Message-ID"] {
        if let Some(v) = header_value(headers, h) {
            row(&h.to_ascii_lowercase(), v);
        }
    }
    row("file", path.display().to_string());
    Ok(out)
}
