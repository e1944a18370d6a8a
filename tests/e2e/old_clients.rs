//! Old clients' TLS quirks end to end. offlineimap3 (imaplib2) reads and
//! writes one TLS connection from two threads, and loses its first command
//! after STARTTLS when TLS 1.3 session tickets arrive right after the
//! handshake: a listener sends devices no session tickets unless
//! `session_tickets = true`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::harness::*;

/// Syncs in a row. With tickets sent, how often the client hangs depends
/// on the machine's load: from one sync in forty to two in three; the
/// imaplib2 test below shows it more steadily.
const SYNCS: usize = 12;
/// How long one sync of a few small messages may take (it takes about a
/// second); a sync still running then has hung.
const SYNC_LIMIT: Duration = Duration::from_secs(30);
/// Messages in the synced folder.
const MESSAGES: usize = 4;
/// How long the helper client may take.
const HELPER_LIMIT: Duration = Duration::from_secs(60);
/// STARTTLS sessions of imaplib2 alone: without offlineimap's start-up
/// around each it loses its command more often with tickets (one session
/// in ten to one in a hundred, as loaded as the machine is).
const IMAPLIB2_SESSIONS: usize = 100;
/// How long those sessions may take (a lost command costs its 3-s limit).
const IMAPLIB2_LIMIT: Duration = Duration::from_secs(240);

#[test]
fn offlineimap_syncs_over_starttls_every_time() {
    let proxy = Proxy::start(&config(&listener("imap", "starttls", false), ""));
    let dir = tempfile::tempdir().unwrap();
    let folder = unique("oldclients").replace('-', "_");
    let messages: Vec<Message> = (0..MESSAGES)
        .map(|i| Message::write(dir.path(), "offlineimap", ALICE, i * 3000))
        .collect();
    let served = seed(&folder, &messages);
    assert_eq!(
        served.len(),
        MESSAGES,
        "the upstream holds the seeded folder"
    );
    // offlineimap keeps a message's lines with LF, as a Maildir does.
    let mut want: Vec<Vec<u8>> = served.iter().map(|m| crlf_to_lf(m)).collect();
    want.sort();

    let mut failures = Vec::new();
    for i in 0..SYNCS {
        let run_dir = dir.path().join(format!("sync{i}"));
        let rc = offlineimap_config(&run_dir, proxy.port(0), &folder);
        let started = Instant::now();
        let (status, log) = offlineimap(&rc, &run_dir);
        let took = started.elapsed();
        let failure = match status {
            None => Some(format!("hung (killed after {SYNC_LIMIT:?})")),
            Some(s) if !s.success() || log.contains("ERROR") => Some(format!("failed: {s}")),
            Some(_) => {
                let got = maildir_messages(&run_dir.join("mail"));
                (got != want).then(|| {
                    format!(
                        "completed in {took:?} but its Maildir holds {} messages, not the upstream's {}",
                        got.len(),
                        want.len()
                    )
                })
            }
        };
        if let Some(f) = failure {
            failures.push(format!("sync {i}: {f}\n{}", tail(&log, 1500)));
        }
    }
    drop_folder(&folder);
    assert!(
        failures.is_empty(),
        "{} of {SYNCS} offlineimap syncs over STARTTLS did not complete:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn imaplib2_gets_every_answer_after_starttls() {
    let proxy = Proxy::start(&config(&listener("imap", "starttls", false), ""));
    // Debian's python3-imaplib2 is a module of the system's Python.
    let out = run(
        Command::new("/usr/bin/python3")
            .arg(repo().join("tests/clients/imaplib2_starttls.py"))
            .arg(proxy.port(0).to_string())
            .arg(IMAPLIB2_SESSIONS.to_string()),
        IMAPLIB2_LIMIT,
    );
    assert!(out.status.success(), "imaplib2 client: {}", text(&out));
    let result = client_json(&out);
    assert_eq!(
        result["ok"], IMAPLIB2_SESSIONS,
        "imaplib2 lost its command after STARTTLS: {result}"
    );
}

#[test]
fn device_tls_sends_no_session_tickets_by_default() {
    for (mode, probe) in probe_listeners("") {
        assert_eq!(probe["version"], "TLSv1.3", "{mode}: {probe}");
        assert_eq!(probe["ticket"], false, "{mode}: a session ticket was sent");
    }
}

#[test]
fn session_tickets_setting_sends_them() {
    for (mode, probe) in probe_listeners("session_tickets = true\n") {
        assert_eq!(probe["version"], "TLSv1.3", "{mode}: {probe}");
        assert_eq!(probe["ticket"], true, "{mode}: no session ticket was sent");
    }
}

/// A TLS 1.3 handshake with each kind of device TLS, every listener with
/// `extra` in its TOML: implicit and STARTTLS on rustls, implicit on
/// OpenSSL (`tls_min_version = "1.0"`). What [`tickets`] saw, per kind.
fn probe_listeners(extra: &str) -> Vec<(&'static str, serde_json::Value)> {
    let kinds = [
        ("implicit", "implicit", ""),
        ("starttls", "starttls", ""),
        (
            "implicit, OpenSSL",
            "implicit",
            "tls_min_version = \"1.0\"\n",
        ),
    ];
    let listeners: Vec<String> = kinds
        .iter()
        .map(|(_, tls, legacy)| listener("imap", tls, false) + legacy + extra)
        .collect();
    let proxy = Proxy::start(&config(&listeners.join("\n"), ""));
    kinds
        .iter()
        .enumerate()
        .map(|(i, (name, tls, _))| (*name, tickets(proxy.port(i), tls)))
        .collect()
}

/// The helper's arguments that reach alice's mailbox straight at the upstream.
fn upstream_args(cmd: &mut Command) -> &mut Command {
    let up = upstream();
    cmd.args([up.imaps_port(), up.ca(), up.token_url()]).args([
        up.get("PUBLIC_CLIENT_ID"),
        ALICE,
        &up.password(ALICE),
    ])
}

/// Put `messages` into a new upstream `folder`; the folder's messages as
/// the upstream then serves them.
fn seed(folder: &str, messages: &[Message]) -> Vec<Vec<u8>> {
    let mut cmd = python("old_clients.py");
    upstream_args(cmd.arg("seed")).arg(folder);
    cmd.args(messages.iter().map(|m| &m.path));
    let out = run(&mut cmd, HELPER_LIMIT);
    assert!(out.status.success(), "seeding the upstream: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            base64::engine::general_purpose::STANDARD
                .decode(v["body"].as_str().unwrap())
                .unwrap()
        })
        .collect()
}

fn drop_folder(folder: &str) {
    let mut cmd = python("old_clients.py");
    upstream_args(cmd.arg("drop")).arg(folder);
    let out = run(&mut cmd, HELPER_LIMIT);
    assert!(out.status.success(), "deleting {folder}: {}", text(&out));
}

/// One TLS 1.3 handshake with the listener on `port` and a line read
/// after it: `{"version": ..., "ticket": bool}`.
fn tickets(port: u16, mode: &str) -> serde_json::Value {
    let out = run(
        python("old_clients.py")
            .arg("tickets")
            .arg(port.to_string())
            .arg(upstream().ca())
            .arg(mode),
        HELPER_LIMIT,
    );
    assert!(
        out.status.success(),
        "ticket probe ({mode}): {}",
        text(&out)
    );
    client_json(&out)
}

/// An offlineimaprc in `dir` for one sync of `folder` of alice's mailbox
/// through the STARTTLS listener on `port`, into `dir/mail`.
fn offlineimap_config(dir: &Path, port: u16, folder: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("mail")).unwrap();
    let up = upstream();
    let rc = dir.join("offlineimaprc");
    std::fs::write(
        &rc,
        format!(
            "[general]\naccounts = oxbridge\nmetadata = {dir}/meta\n\n\
             [Account oxbridge]\nlocalrepository = local\nremoterepository = remote\n\n\
             [Repository local]\ntype = Maildir\nlocalfolders = {dir}/mail\n\n\
             [Repository remote]\ntype = IMAP\nremotehost = localhost\nremoteport = {port}\n\
             remoteuser = {ALICE}\nremotepass = {password}\nauth_mechanisms = LOGIN\n\
             ssl = no\nstarttls = yes\nsslcacertfile = {ca}\nreadonly = True\n\
             folderfilter = lambda f: f == '{folder}'\n",
            dir = dir.display(),
            password = up.password(ALICE),
            ca = up.ca(),
        ),
    )
    .unwrap();
    rc
}

/// Run offlineimap once with `rc`: its exit status (`None`: still running
/// after [`SYNC_LIMIT`], then killed) and its output.
fn offlineimap(rc: &Path, dir: &Path) -> (Option<ExitStatus>, String) {
    let log_path = dir.join("offlineimap.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new("offlineimap")
        .args(["-o", "-1", "-u", "basic", "-c"])
        .arg(rc)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("offlineimap (Debian: apt-get install offlineimap3)");
    let deadline = Instant::now() + SYNC_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = String::from_utf8_lossy(&std::fs::read(&log_path).unwrap()).into_owned();
    (status, log)
}

/// Every message file in the Maildirs under `root`, sorted.
fn maildir_messages(root: &Path) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|p| p == "cur" || p == "new")
            {
                found.push(std::fs::read(&path).unwrap());
            }
        }
    }
    found.sort();
    found
}

fn crlf_to_lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if !(b == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    out
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
