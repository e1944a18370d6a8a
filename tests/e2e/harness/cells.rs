//! What a table-driven test of many cells needs: cells run side by side
//! (a panic is that cell's failure, not the run's), messages put straight
//! into a mailbox over Dovecot's LMTP socket, a mailbox's messages read
//! back with the identity that sent them (`Return-Path`), a config checked
//! offline, and IMAP and POP3 sessions by hand from a chosen local address.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{oxbridge, run, text, upstream, write_config, Raw};

/// How long putting messages into mailboxes, or listing them, may take.
const UPSTREAM_LIMIT: Duration = Duration::from_secs(60);
/// How long a session by hand waits for a line: a reply that does not come
/// is a failure, and the run should not wait a minute for it.
const BY_HAND_LIMIT: Duration = Duration::from_secs(15);
/// POP3 messages looked at (newest first) to find one by its Message-ID.
const POP3_SEARCH_DEPTH: usize = 500;

/// `f` on every item, at most `workers` at a time; the results in the
/// items' order. A panic in `f` (an assertion, a client's time limit) is
/// that item's `Err`, with the panic's message.
pub fn each_at_once<T, R, F>(items: &[T], workers: usize, f: F) -> Vec<Result<R, String>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> Result<R, String> + Sync,
{
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<R, String>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(item) = items.get(i) else { break };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(item)))
                    .unwrap_or_else(|p| Err(panic_text(p)));
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not run".into())))
        .collect()
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// Deliver each (recipient, message file) straight into the test
/// upstream's Dovecot over its LMTP socket: the mailbox gets it whatever
/// oxbridge does, so a session through oxbridge can look for it.
pub fn lmtp_deliver(messages: &[(&str, &Path)]) {
    const SCRIPT: &str = r#"
import smtplib, sys
sock, pairs = sys.argv[1], sys.argv[2:]
with smtplib.LMTP(sock, local_hostname="localhost", timeout=50) as lm:
    for rcpt, path in zip(pairs[::2], pairs[1::2]):
        lm.sendmail(rcpt, [rcpt], open(path, "rb").read(), mail_options=["BODY=8BITMIME"])
"#;
    let socket = format!("{}/dovecot/run/lmtp", upstream().dir());
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT, &socket]);
    for (rcpt, path) in messages {
        cmd.arg(rcpt).arg(path);
    }
    let out = run(&mut cmd, UPSTREAM_LIMIT);
    assert!(out.status.success(), "LMTP delivery: {}", text(&out));
}

/// One message in a mailbox, as Dovecot holds it.
#[derive(Debug, Clone)]
pub struct Held {
    pub message_id: String,
    /// The envelope sender the upstream took it from: the mailbox that
    /// logged in (Postfix refuses any other) or that Graph sent as.
    pub return_path: String,
}

/// The messages in `user`'s INBOX whose Subject contains `subject`, read
/// straight from Dovecot (IMAPS, a token of the test IDP).
pub fn inbox(user: &str, subject: &str) -> Vec<Held> {
    const SCRIPT: &str = r#"
import imaplib, json, ssl, sys, urllib.parse, urllib.request
port, ca, token_url, client_id, user, password, subject = sys.argv[1:]
body = urllib.parse.urlencode({"grant_type": "password", "client_id": client_id,
    "username": user, "password": password,
    "scope": "https://outlook.office.com/IMAP.AccessAsUser.All"}).encode()
token = json.load(urllib.request.urlopen(token_url, body, timeout=10))["access_token"]
imap = imaplib.IMAP4_SSL("localhost", int(port), ssl_context=ssl.create_default_context(cafile=ca), timeout=50)
imap.authenticate("XOAUTH2", lambda _: ("user=%s\x01auth=Bearer %s\x01\x01" % (user, token)).encode())
imap.select("INBOX", readonly=True)
uids = imap.uid("SEARCH", None, "SUBJECT", '"%s"' % subject)[1][0].split()
for start in range(0, len(uids), 500):
    typ, parts = imap.uid("FETCH", b",".join(uids[start:start + 500]),
                          "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID RETURN-PATH)])")
    for part in parts:
        if isinstance(part, tuple):
            fields = {}
            for line in part[1].decode(errors="replace").splitlines():
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
            print(json.dumps({"id": fields.get("message-id", ""), "rp": fields.get("return-path", "")}))
imap.logout()
"#;
    let up = upstream();
    let out = run(
        Command::new("python3")
            .args(["-c", SCRIPT, up.imaps_port(), up.ca(), up.token_url()])
            .args([
                up.get("PUBLIC_CLIENT_ID"),
                user,
                &up.password(user),
                subject,
            ]),
        UPSTREAM_LIMIT,
    );
    assert!(
        out.status.success(),
        "reading {user}'s INBOX: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Held {
            message_id: v["id"].as_str().unwrap_or("").to_string(),
            return_path: v["rp"].as_str().unwrap_or("").to_string(),
        })
        .collect()
}

/// `oxbridge check --offline` of `cfg`: the configuration is loaded and
/// validated, nothing is contacted.
pub fn check_offline(cfg: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    oxbridge(&["check", "--offline"], &write_config(dir.path(), cfg))
}

/// A connection by hand from `local`, with a short read limit.
fn by_hand(port: u16, local: &str) -> Raw {
    let raw = Raw::connect_from(port, local);
    // The reader is a clone of the same socket: one timeout for both.
    raw.writer.set_read_timeout(Some(BY_HAND_LIMIT)).unwrap();
    raw
}

/// The lines up to and including the tagged reply `tag`; its last line.
fn imap_command(raw: &mut Raw, tag: &str, command: &str) -> (String, String) {
    raw.send(&format!("{tag} {command}"));
    let all = raw.until(&format!("{tag} "));
    let last = all.lines().last().unwrap_or("").to_string();
    (all, last)
}

/// IMAP by hand from the local address `local`: a mailbox command before
/// login is refused; then LOGIN, SELECT INBOX, and the message
/// `message_id` found and its header fetched. What went wrong, if anything.
pub fn imap_by_hand(
    port: u16,
    local: &str,
    login: &str,
    password: &str,
    message_id: &str,
) -> Result<(), String> {
    let mut raw = by_hand(port, local);
    let greeting = raw.line();
    if !greeting.starts_with("* OK") {
        return Err(format!("greeting {greeting:?}"));
    }
    let (_, last) = imap_command(&mut raw, "a", "SELECT INBOX");
    if !last.starts_with("a BAD ") {
        return Err(format!("SELECT before login answered {last:?}"));
    }
    let (_, last) = imap_command(&mut raw, "b", &format!("LOGIN \"{login}\" \"{password}\""));
    if !last.starts_with("b OK ") {
        return Err(format!("LOGIN answered {last:?}"));
    }
    let (all, last) = imap_command(&mut raw, "c", "SELECT INBOX");
    if !last.starts_with("c OK ") {
        return Err(format!("after LOGIN, SELECT answered {all:?}"));
    }
    let (all, _) = imap_command(
        &mut raw,
        "d",
        &format!("UID SEARCH HEADER Message-ID \"{message_id}\""),
    );
    let uid = all
        .lines()
        .find_map(|l| l.strip_prefix("* SEARCH "))
        .and_then(|uids| uids.split_whitespace().last())
        .ok_or_else(|| format!("UID SEARCH found no {message_id}: {all:?}"))?
        .to_string();
    let (all, last) = imap_command(
        &mut raw,
        "e",
        &format!("UID FETCH {uid} (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"),
    );
    if !last.starts_with("e OK ") || !all.contains(message_id) {
        return Err(format!("UID FETCH answered {all:?}"));
    }
    imap_command(&mut raw, "f", "LOGOUT");
    Ok(())
}

/// POP3 by hand from the local address `local`: STAT before login is
/// refused; then USER, PASS, and the message `message_id` found by
/// `TOP n 0`, newest first. What went wrong, if anything.
pub fn pop3_by_hand(
    port: u16,
    local: &str,
    login: &str,
    password: &str,
    message_id: &str,
) -> Result<(), String> {
    let mut raw = by_hand(port, local);
    let say = |raw: &mut Raw, line: &str| {
        raw.send(line);
        raw.line()
    };
    let greeting = raw.line();
    if !greeting.starts_with("+OK") {
        return Err(format!("greeting {greeting:?}"));
    }
    let stat = say(&mut raw, "STAT");
    if !stat.starts_with("-ERR") {
        return Err(format!("STAT before login answered {stat:?}"));
    }
    let user = say(&mut raw, &format!("USER {login}"));
    let pass = say(&mut raw, &format!("PASS {password}"));
    if !user.starts_with("+OK") || !pass.starts_with("+OK") {
        return Err(format!("USER answered {user:?}, PASS {pass:?}"));
    }
    let stat = say(&mut raw, "STAT");
    let count: usize = stat
        .strip_prefix("+OK ")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("after PASS, STAT answered {stat:?}"))?;
    let wanted = format!("message-id: {}", message_id.to_lowercase());
    for n in (1..=count).rev().take(POP3_SEARCH_DEPTH) {
        if !say(&mut raw, &format!("TOP {n} 0")).starts_with("+OK") {
            continue; // expunged by another session meanwhile
        }
        let head = raw.until(".\r\n");
        if head.lines().any(|l| l.trim_end().to_lowercase() == wanted) {
            say(&mut raw, "QUIT");
            return Ok(());
        }
    }
    Err(format!(
        "no {message_id} among the newest of {count} messages"
    ))
}
