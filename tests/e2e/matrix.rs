//! Every combination, one table: account kind (exact login, `*@domain`
//! pattern, shared mailbox `login\shared@domain`, `[[relay]]` rule, an
//! account with `rewrite_sender` whose device has a fixed sender) x the
//! listener's delivery (session, spool) x how mail leaves (SMTP, Microsoft
//! Graph) x protocol (SMTP, IMAP, POP3), plus the `password` grant and the
//! relay rules a config must refuse. Each cell either works end to end
//! against the real upstream or is refused when the config is loaded; no
//! cell may do anything else. `docs/combinations.md` is the same table in
//! words.
//!
//! Three oxbridge processes serve every running cell: one whose accounts
//! send over SMTP, one with `[upstream] send = "graph"`, one with the
//! `password` grant; each has the same four listeners. Cells run side by
//! side; SMTP cells are then read back from Dovecot, where the message's
//! `Return-Path` names the mailbox that sent it (Postfix refuses any
//! sender but the logged-in mailbox, and the Graph stand-in sends as the
//! mailbox of its URL).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::Smtp as SmtpDevice;
use crate::harness::*;

use Delivery::*;
use Expect::*;
use Kind::*;
use Proto::{Imap, Pop3, Smtp};
use Sending::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `matrix-exact@example.test`, client_credentials, mailbox alice.
    Exact,
    /// `*@example.test`, client_credentials; the device logs in as bob.
    Pattern,
    /// `matrix-owner@example.test\bob@example.test`: the owner's own
    /// mailbox is alice, `allow_shared` lists bob.
    Shared,
    /// A device from 127.0.0.2, a `[[relay]]` network, as
    /// `matrix-relay@example.test` (client_credentials, mailbox alice).
    Relay,
    /// `*@example.test` with `grant = "password"`: alice with her own
    /// password, exchanged at the token endpoint.
    PasswordPattern,
    /// `matrix-fixed@example.test`, client_credentials, mailbox alice,
    /// `rewrite_sender = true`; the device's MAIL FROM is its own fixed
    /// address, which the upstream would refuse.
    FixedSender,
    /// A `[[relay]]` rule whose account is a `*@domain` pattern.
    RelayToPattern,
    /// A `[[relay]]` rule whose account has `grant = "password"`.
    RelayToPassword,
    /// `[[relay]]` rules in a config with no SMTP listener.
    RelayWithoutSmtp,
    /// `*@example.test` with `grant = "refresh_token"`.
    RefreshTokenPattern,
    /// `*@example.test` with a `mailbox`.
    PatternWithMailbox,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Delivery {
    /// `delivery = "session"` (the default) on the listener the device uses.
    Session,
    /// `delivery = "spool"` on the listener the device uses.
    Spool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sending {
    /// SMTP with XOAUTH2 (the default).
    ViaSmtp,
    /// Microsoft Graph: `[upstream] send = "graph"`; for the `password`
    /// grant, which that leaves on SMTP, the account's own `send = "graph"`.
    ViaGraph,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    Smtp,
    Imap,
    Pop3,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// SMTP: the message arrives once in the mailbox, sent as that mailbox.
    /// IMAP: login, SELECT INBOX, FETCH of a message put in that mailbox.
    /// POP3: login, STAT, RETR of it.
    Works,
    /// A device from a relay network: a mailbox command before login is
    /// refused; with the account's login and password it works.
    NeedsPassword,
    /// The login gets this reply (its start).
    Refused(&'static str),
    /// `oxbridge check --offline` exits 2 with an error naming this key.
    RefusedAtLoad(&'static str),
}

struct Cell {
    kind: Kind,
    delivery: Delivery,
    sending: Sending,
    proto: Proto,
    expect: Expect,
}

const fn c(kind: Kind, delivery: Delivery, sending: Sending, proto: Proto, expect: Expect) -> Cell {
    Cell {
        kind,
        delivery,
        sending,
        proto,
        expect,
    }
}

/// Only SMTP listeners spool.
const SPOOL_NOT_HERE: Expect = RefusedAtLoad("listener[0].delivery");

#[rustfmt::skip]
const CELLS: &[Cell] = &[
    // kind     delivery  sending   protocol  expectation
    c(Exact,    Session,  ViaSmtp,  Smtp,     Works),
    c(Exact,    Session,  ViaSmtp,  Imap,     Works),
    c(Exact,    Session,  ViaSmtp,  Pop3,     Works),
    c(Exact,    Session,  ViaGraph, Smtp,     Works),
    c(Exact,    Session,  ViaGraph, Imap,     Works),
    c(Exact,    Session,  ViaGraph, Pop3,     Works),
    c(Exact,    Spool,    ViaSmtp,  Smtp,     Works),
    c(Exact,    Spool,    ViaSmtp,  Imap,     SPOOL_NOT_HERE),
    c(Exact,    Spool,    ViaSmtp,  Pop3,     SPOOL_NOT_HERE),
    c(Exact,    Spool,    ViaGraph, Smtp,     Works),
    c(Exact,    Spool,    ViaGraph, Imap,     SPOOL_NOT_HERE),
    c(Exact,    Spool,    ViaGraph, Pop3,     SPOOL_NOT_HERE),

    c(Pattern,  Session,  ViaSmtp,  Smtp,     Works),
    c(Pattern,  Session,  ViaSmtp,  Imap,     Works),
    c(Pattern,  Session,  ViaSmtp,  Pop3,     Works),
    c(Pattern,  Session,  ViaGraph, Smtp,     Works),
    c(Pattern,  Session,  ViaGraph, Imap,     Works),
    c(Pattern,  Session,  ViaGraph, Pop3,     Works),
    c(Pattern,  Spool,    ViaSmtp,  Smtp,     Works),
    c(Pattern,  Spool,    ViaSmtp,  Imap,     SPOOL_NOT_HERE),
    c(Pattern,  Spool,    ViaSmtp,  Pop3,     SPOOL_NOT_HERE),
    c(Pattern,  Spool,    ViaGraph, Smtp,     Works),
    c(Pattern,  Spool,    ViaGraph, Imap,     SPOOL_NOT_HERE),
    c(Pattern,  Spool,    ViaGraph, Pop3,     SPOOL_NOT_HERE),

    c(Shared,   Session,  ViaSmtp,  Smtp,     Works),
    c(Shared,   Session,  ViaSmtp,  Imap,     Works),
    c(Shared,   Session,  ViaSmtp,  Pop3,     Works),
    c(Shared,   Session,  ViaGraph, Smtp,     Works),
    c(Shared,   Session,  ViaGraph, Imap,     Works),
    c(Shared,   Session,  ViaGraph, Pop3,     Works),
    c(Shared,   Spool,    ViaSmtp,  Smtp,     Works),
    c(Shared,   Spool,    ViaSmtp,  Imap,     SPOOL_NOT_HERE),
    c(Shared,   Spool,    ViaSmtp,  Pop3,     SPOOL_NOT_HERE),
    c(Shared,   Spool,    ViaGraph, Smtp,     Works),
    c(Shared,   Spool,    ViaGraph, Imap,     SPOOL_NOT_HERE),
    c(Shared,   Spool,    ViaGraph, Pop3,     SPOOL_NOT_HERE),

    c(Relay,    Session,  ViaSmtp,  Smtp,     Works),
    c(Relay,    Session,  ViaSmtp,  Imap,     NeedsPassword),
    c(Relay,    Session,  ViaSmtp,  Pop3,     NeedsPassword),
    c(Relay,    Session,  ViaGraph, Smtp,     Works),
    c(Relay,    Session,  ViaGraph, Imap,     NeedsPassword),
    c(Relay,    Session,  ViaGraph, Pop3,     NeedsPassword),
    c(Relay,    Spool,    ViaSmtp,  Smtp,     Works),
    c(Relay,    Spool,    ViaSmtp,  Imap,     SPOOL_NOT_HERE),
    c(Relay,    Spool,    ViaSmtp,  Pop3,     SPOOL_NOT_HERE),
    c(Relay,    Spool,    ViaGraph, Smtp,     Works),
    c(Relay,    Spool,    ViaGraph, Imap,     SPOOL_NOT_HERE),
    c(Relay,    Spool,    ViaGraph, Pop3,     SPOOL_NOT_HERE),

    // A fixed sender is sent as the mailbox on every way out.
    c(FixedSender, Session, ViaSmtp,  Smtp, Works),
    c(FixedSender, Session, ViaGraph, Smtp, Works),
    c(FixedSender, Spool,   ViaSmtp,  Smtp, Works),
    c(FixedSender, Spool,   ViaGraph, Smtp, Works),

    // The password grant: live sessions only; Graph needs an app token.
    c(PasswordPattern, Session, ViaSmtp,  Smtp, Works),
    c(PasswordPattern, Session, ViaSmtp,  Imap, Works),
    c(PasswordPattern, Session, ViaSmtp,  Pop3, Works),
    c(PasswordPattern, Spool,   ViaSmtp,  Smtp, Refused("535 5.7.8 ")),
    c(PasswordPattern, Session, ViaGraph, Smtp, RefusedAtLoad("account[1].send")),
    // A relayed device sends no password: its rule needs an exact account
    // whose grant needs none.
    c(RelayToPattern,  Session, ViaSmtp,  Smtp, RefusedAtLoad("relay[0].account")),
    c(RelayToPassword, Session, ViaSmtp,  Smtp, RefusedAtLoad("relay[0].account")),
    // Relaying is SMTP only.
    c(RelayWithoutSmtp, Session, ViaSmtp, Imap, RefusedAtLoad("relay[0]")),
    // A pattern is many users: no one user's consent, no one mailbox.
    c(RefreshTokenPattern, Session, ViaSmtp, Smtp, RefusedAtLoad("account[3].grant")),
    c(PatternWithMailbox,  Session, ViaSmtp, Smtp, RefusedAtLoad("account[3].mailbox")),
];

/// The matrix accounts' local passwords.
const EXACT_PASSWORD: &str = "matrix-exact-pass";
const OWNER_PASSWORD: &str = "matrix-owner-pass";
const RELAY_PASSWORD: &str = "matrix-relay-pass";
const PATTERN_PASSWORD: &str = "matrix-pattern-pass";
const RELAY_NETWORK_ADDRESS: &str = "127.0.0.2";
const RELAY_ACCOUNT: &str = "matrix-relay@example.test";
const FIXED_PASSWORD: &str = "matrix-fixed-pass";
/// The address a fixed-sender device sends as.
const FIXED_SENDER: &str = "scanner@printer.local";

/// Cells at once: enough to keep the run short, few enough for a small
/// machine.
const WORKERS: usize = 8;
/// How long SMTP cells' messages may take to arrive (spooled ones retry
/// every second or two).
const ARRIVAL_LIMIT: Duration = Duration::from_secs(30);
/// Each world's listeners, in this order.
const SMTP_SESSION: usize = 0;
const SMTP_SPOOL: usize = 1;
const IMAP: usize = 2;
const POP3: usize = 3;

impl Cell {
    fn name(&self) -> String {
        format!(
            "{:?}-{:?}-{:?}-{:?}",
            self.kind, self.delivery, self.sending, self.proto
        )
        .to_lowercase()
    }

    /// What the device types as its user name.
    fn login(&self) -> String {
        match self.kind {
            Exact => "matrix-exact@example.test".into(),
            Pattern => BOB.into(),
            Shared => format!("matrix-owner@example.test\\{BOB}"),
            Relay => RELAY_ACCOUNT.into(),
            FixedSender => "matrix-fixed@example.test".into(),
            _ => ALICE.into(),
        }
    }

    fn password(&self) -> String {
        match self.kind {
            Exact => EXACT_PASSWORD.into(),
            Pattern => PATTERN_PASSWORD.into(),
            Shared => OWNER_PASSWORD.into(),
            Relay => RELAY_PASSWORD.into(),
            FixedSender => FIXED_PASSWORD.into(),
            _ => upstream().password(ALICE),
        }
    }

    /// The mailbox the cell must reach.
    fn mailbox(&self) -> &'static str {
        match self.kind {
            Pattern | Shared => BOB,
            _ => ALICE,
        }
    }
}

/// The four listeners every world has (see the port constants).
fn world_listeners(spool_on: Option<&str>) -> String {
    let plain = |p: &str| listener(p, "none", true);
    match spool_on {
        // A load-refusal cell: one listener, the cell's, spooling.
        Some(p) => plain(p) + "delivery = \"spool\"\n",
        None => [
            plain("smtp"),
            plain("smtp") + "delivery = \"spool\"\n",
            plain("imap"),
            plain("pop3"),
        ]
        .join("\n"),
    }
}

/// Fast retries for the spooling listener's worker.
const SPOOL: &str = "[spool]\nretry_min_s = 1\nretry_max_s = 2\nmessages_per_minute = 6000\n";

/// The pattern account's grant (and other keys) in the worlds.
const PATTERN_KEYS: &str = "grant = \"client_credentials\"";

/// A config with the matrix accounts (account[3] the pattern, with
/// `pattern_keys`) and a relay rule for 127.0.0.2 as `relay_account`;
/// with `graph`, every client_credentials account sends through Graph.
fn matrix_config(listeners: &str, graph: bool, relay_account: &str, pattern_keys: &str) -> String {
    let up = upstream();
    let send = match graph {
        true => format!("send = \"graph\"\ngraph = \"{}\"\n", up.get("GRAPH_URL")),
        false => String::new(),
    };
    let account = |login: &str, password: &str, rest: &str| {
        format!(
            "[[account]]\nlogin = \"{login}\"\npassword_hash = \"{}\"\n{rest}\n",
            argon2_hash(password)
        )
    };
    format!(
        r#"
state_dir = "/tmp/oxbridge-test-state"

[log]
level = "debug"
format = "json"

[upstream]
smtp = "{smtp}"
imap = "{imap}"
pop3 = "{pop3}"
ca_file = "{ca}"
{send}
[oauth]
client_id = "{client_id}"
client_secret = "{client_secret}"
token_url = "{token_url}"

{listeners}

{exact}{owner}{relay}{pattern}{fixed}
[[relay]]
from_networks = ["{RELAY_NETWORK_ADDRESS}/32"]
account = "{relay_account}"

{SPOOL}
"#,
        smtp = up.addr("smtp"),
        imap = up.addr("imap"),
        pop3 = up.addr("pop3"),
        ca = up.ca(),
        client_id = up.get("APP_CLIENT_ID"),
        client_secret = up.get("APP_CLIENT_SECRET"),
        token_url = up.token_url(),
        exact = account(
            "matrix-exact@example.test",
            EXACT_PASSWORD,
            &format!("{PATTERN_KEYS}\nmailbox = \"{ALICE}\"")
        ),
        owner = account(
            "matrix-owner@example.test",
            OWNER_PASSWORD,
            &format!("{PATTERN_KEYS}\nmailbox = \"{ALICE}\"\nallow_shared = [\"{BOB}\"]")
        ),
        relay = account(
            RELAY_ACCOUNT,
            RELAY_PASSWORD,
            &format!("{PATTERN_KEYS}\nmailbox = \"{ALICE}\"")
        ),
        pattern = account("*@example.test", PATTERN_PASSWORD, pattern_keys),
        fixed = account(
            "matrix-fixed@example.test",
            FIXED_PASSWORD,
            &format!("{PATTERN_KEYS}\nmailbox = \"{ALICE}\"\nrewrite_sender = true")
        ),
    )
}

/// The harness's usual config: account[0] the scanner, account[1]
/// `*@example.test` with the password grant.
fn password_config(listeners: &str, graph: bool) -> String {
    let cfg = config(listeners, SPOOL);
    let pattern = "login = \"*@example.test\"\ngrant = \"password\"\n";
    assert!(cfg.contains(pattern));
    match graph {
        true => cfg.replace(pattern, &format!("{pattern}send = \"graph\"\n")),
        false => cfg,
    }
}

/// The config a load-refusal cell is about.
fn refused_config(cell: &Cell) -> String {
    let spool_on = match (cell.delivery, cell.proto) {
        (Spool, Imap) => Some("imap"),
        (Spool, Pop3) => Some("pop3"),
        _ => None,
    };
    let listeners = world_listeners(spool_on);
    let graph = cell.sending == ViaGraph;
    match cell.kind {
        PasswordPattern => password_config(&listeners, graph),
        RelayToPattern => matrix_config(&listeners, graph, "*@example.test", PATTERN_KEYS),
        RefreshTokenPattern => matrix_config(
            &listeners,
            graph,
            RELAY_ACCOUNT,
            "grant = \"refresh_token\"",
        ),
        PatternWithMailbox => matrix_config(
            &listeners,
            graph,
            RELAY_ACCOUNT,
            &format!("{PATTERN_KEYS}\nmailbox = \"{ALICE}\""),
        ),
        RelayWithoutSmtp => matrix_config(
            &listener("imap", "none", true),
            graph,
            RELAY_ACCOUNT,
            PATTERN_KEYS,
        ),
        RelayToPassword => format!(
            "{}\n[[account]]\nlogin = \"carol@example.test\"\ngrant = \"password\"\n",
            matrix_config(&listeners, graph, "carol@example.test", PATTERN_KEYS)
        ),
        _ => matrix_config(&listeners, graph, RELAY_ACCOUNT, PATTERN_KEYS),
    }
}

/// One running oxbridge and its state directory (its spool).
struct World {
    proxy: Proxy,
    _state: tempfile::TempDir,
}

impl World {
    fn start(cfg: String) -> World {
        let state = tempfile::tempdir().unwrap();
        World {
            proxy: Proxy::start(&with_state_dir(&cfg, state.path())),
            _state: state,
        }
    }

    /// The distinct warnings and errors in its log (message and error,
    /// how often), for a failure's message.
    fn complaints(&self) -> String {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for line in self.proxy.logs().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if !matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
                continue;
            }
            let what = format!("{} {}", v["message"], v["error"]);
            match seen.iter_mut().find(|(w, _)| *w == what) {
                Some((_, n)) => *n += 1,
                None => seen.push((what, 1)),
            }
        }
        seen.iter()
            .map(|(what, n)| format!("{n} x {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

struct Worlds {
    smtp: World,
    graph: World,
    password: World,
}

impl Worlds {
    fn of(&self, cell: &Cell) -> &World {
        match (cell.kind, cell.sending) {
            (PasswordPattern, _) => &self.password,
            (_, ViaSmtp) => &self.smtp,
            (_, ViaGraph) => &self.graph,
        }
    }
}

/// What a cell did before the SMTP read-back.
enum Done {
    /// Settled: what was seen.
    Seen(String),
    /// A message sent through oxbridge that must arrive in `mailbox`.
    Sent { id: String, mailbox: &'static str },
}

fn run_cell(
    cell: &Cell,
    worlds: &Worlds,
    seed: Option<&Message>,
    dir: &Path,
    run_tag: &str,
) -> Result<Done, String> {
    let world = worlds.of(cell);
    let port = |i: usize| world.proxy.port(i);
    let (login, password) = (cell.login(), cell.password());
    match (cell.expect, cell.proto) {
        (RefusedAtLoad(key), _) => {
            let out = check_offline(&refused_config(cell));
            let said = text(&out);
            match out.status.code() == Some(2) && said.contains(&format!("{key}:")) {
                true => Ok(Done::Seen(format!("exit 2, {}", said.trim()))),
                false => Err(format!(
                    "wanted exit 2 naming {key}; got {:?}: {said}",
                    out.status.code()
                )),
            }
        }
        (Refused(reply), Smtp) => {
            let i = if cell.delivery == Spool {
                SMTP_SPOOL
            } else {
                SMTP_SESSION
            };
            let mut raw = Raw::connect(port(i));
            raw.reply();
            let got = raw.smtp_login(&login, &password);
            match got.starts_with(reply) {
                true => Ok(Done::Seen(got.trim().to_string())),
                false => Err(format!("wanted {reply:?}..., got {got:?}")),
            }
        }
        (Works, Smtp) => {
            let i = if cell.delivery == Spool {
                SMTP_SPOOL
            } else {
                SMTP_SESSION
            };
            let mailbox = cell.mailbox();
            let m = Message::write(dir, &format!("{run_tag}-{}", cell.name()), mailbox, 0);
            let device = SmtpDevice {
                login: &login,
                password: &password,
                from: match cell.kind {
                    FixedSender => FIXED_SENDER,
                    _ => mailbox,
                },
                to: mailbox,
                ..SmtpDevice::scanner(port(i))
            };
            let device = match cell.kind {
                Relay => SmtpDevice {
                    mech: "NONE",
                    source: Some(RELAY_NETWORK_ADDRESS),
                    ..device
                },
                _ => device,
            };
            let out = device.smtplib(&m.path);
            match out.status.success() {
                true => Ok(Done::Sent { id: m.id, mailbox }),
                false => Err(format!("smtplib: {}", last_words(&out))),
            }
        }
        (Works, Imap | Pop3) => {
            let m = seed.expect("a seeded message");
            let out_path = dir.join(format!("{}.fetched", m.tag));
            let client = Client::new(
                port(if cell.proto == Imap { IMAP } else { POP3 }),
                &login,
                &password,
            );
            let out = match cell.proto {
                Imap => client.fetch(&m.id, &out_path, false),
                _ => client.retr(&m.id, &out_path, false),
            };
            if !out.status.success() {
                return Err(format!("client: {}", last_words(&out)));
            }
            let got = std::fs::read(&out_path).unwrap_or_default();
            match got.ends_with(&m.bytes) {
                true => Ok(Done::Seen(format!(
                    "{} fetched from {}",
                    m.id,
                    cell.mailbox()
                ))),
                false => Err(format!(
                    "{} fetched, but not the bytes put in {}",
                    m.id,
                    cell.mailbox()
                )),
            }
        }
        (NeedsPassword, Imap | Pop3) => {
            let m = seed.expect("a seeded message");
            let by_hand: fn(u16, &str, &str, &str, &str) -> Result<(), String> = match cell.proto {
                Imap => imap_by_hand,
                _ => pop3_by_hand,
            };
            let port = port(if cell.proto == Imap { IMAP } else { POP3 });
            by_hand(port, RELAY_NETWORK_ADDRESS, &login, &password, &m.id).map(|()| {
                Done::Seen(format!(
                    "refused before login; with the password, {} found",
                    m.id
                ))
            })
        }
        (expect, proto) => Err(format!("no way to check {expect:?} over {proto:?}")),
    }
}

/// The SMTP cells' messages, read back from Dovecot until each is there
/// (or the time is up): each must be there once, sent as its mailbox.
fn read_back(
    sent: &[(usize, String, &'static str)],
    run_tag: &str,
) -> Vec<(usize, Result<String, String>)> {
    let deadline = Instant::now() + ARRIVAL_LIMIT;
    let (mut alice, mut bob);
    loop {
        alice = inbox(ALICE, run_tag);
        bob = inbox(BOB, run_tag);
        let arrived = |id: &str, mailbox: &str| {
            let held = if mailbox == ALICE { &alice } else { &bob };
            held.iter().any(|h| h.message_id == id)
        };
        if sent.iter().all(|(_, id, mailbox)| arrived(id, mailbox)) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    sent.iter()
        .map(|(i, id, mailbox)| {
            let (held, other) = if *mailbox == ALICE { (&alice, &bob) } else { (&bob, &alice) };
            let copies: Vec<&Held> = held.iter().filter(|h| &h.message_id == id).collect();
            let elsewhere = other.iter().filter(|h| &h.message_id == id).count();
            let want = format!("<{mailbox}>");
            let r = match copies.as_slice() {
                [one] if one.return_path == want && elsewhere == 0 => {
                    Ok(format!("delivered once to {mailbox}, sent as {mailbox}"))
                }
                [one] if one.return_path != want => Err(format!(
                    "arrived in {mailbox} sent as {} instead of {want}",
                    one.return_path
                )),
                [] => Err(format!(
                    "250 to the device, but not in {mailbox}'s INBOX after {ARRIVAL_LIMIT:?} (copies in the other mailbox: {elsewhere})"
                )),
                more => Err(format!("{} copies in {mailbox}, {elsewhere} elsewhere", more.len())),
            };
            (*i, r)
        })
        .collect()
}

/// A client's last line: its JSON verdict, or the exception it died of.
fn last_words(out: &std::process::Output) -> String {
    text(out)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn expectation(e: Expect) -> String {
    match e {
        Works => "works".into(),
        NeedsPassword => "needs a password".into(),
        Refused(r) => format!("refused {}", r.trim()),
        RefusedAtLoad(key) => format!("refused at load: {key}"),
    }
}

/// Every cell of the table, at once where they can be: each works end to
/// end against the real upstream, or its config is refused when loaded
/// (naming the key); the summary lists each cell's result.
#[test]
fn every_combination_works_or_is_refused_at_load() {
    // The Graph stand-in's request log and throttle hook are shared with
    // the Graph tests.
    let _serial = crate::graph::serial();
    let started = Instant::now();
    upstream();
    let dir = tempfile::tempdir().unwrap();
    let run_tag = unique("matrix");
    let listeners = world_listeners(None);
    let worlds = std::thread::scope(|s| {
        let smtp = s.spawn(|| {
            World::start(matrix_config(
                &listeners,
                false,
                RELAY_ACCOUNT,
                PATTERN_KEYS,
            ))
        });
        let graph =
            s.spawn(|| World::start(matrix_config(&listeners, true, RELAY_ACCOUNT, PATTERN_KEYS)));
        let password = s.spawn(|| World::start(password_config(&listeners, false)));
        Worlds {
            smtp: smtp.join().unwrap(),
            graph: graph.join().unwrap(),
            password: password.join().unwrap(),
        }
    });

    // IMAP and POP3 cells look for a message of their own, put straight
    // into the mailbox they must reach.
    let seeds: Vec<Option<Message>> = CELLS
        .iter()
        .map(|cell| {
            (cell.proto != Smtp && matches!(cell.expect, Works | NeedsPassword)).then(|| {
                Message::write(
                    dir.path(),
                    &format!("{run_tag}-{}", cell.name()),
                    cell.mailbox(),
                    0,
                )
            })
        })
        .collect();
    let deliveries: Vec<(&str, &Path)> = CELLS
        .iter()
        .zip(&seeds)
        .filter_map(|(cell, m)| m.as_ref().map(|m| (cell.mailbox(), m.path.as_path())))
        .collect();
    lmtp_deliver(&deliveries);
    let ready = started.elapsed();

    // SMTP cells first: their spooled messages travel while the rest run.
    let mut order: Vec<usize> = (0..CELLS.len()).collect();
    order.sort_by_key(|&i| CELLS[i].proto != Smtp);
    let mut first: Vec<Result<Done, String>> =
        (0..CELLS.len()).map(|_| Err("not run".into())).collect();
    let took: Vec<std::sync::Mutex<Duration>> = CELLS.iter().map(|_| Default::default()).collect();
    let outcomes = each_at_once(&order, WORKERS, |&i| {
        let t = Instant::now();
        let r = run_cell(&CELLS[i], &worlds, seeds[i].as_ref(), dir.path(), &run_tag);
        *took[i].lock().unwrap() = t.elapsed();
        r
    });
    for (i, r) in order.into_iter().zip(outcomes) {
        first[i] = r;
    }
    let sent: Vec<(usize, String, &'static str)> = first
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(Done::Sent { id, mailbox }) => Some((i, id.clone(), *mailbox)),
            _ => None,
        })
        .collect();
    let mut results: Vec<Result<String, String>> = first
        .into_iter()
        .map(|r| match r {
            Ok(Done::Seen(s)) => Ok(s),
            Ok(Done::Sent { .. }) => Err("not read back".into()),
            Err(e) => Err(e),
        })
        .collect();
    let ran = started.elapsed();
    for (i, r) in read_back(&sent, &run_tag) {
        results[i] = r;
    }

    let mut table = String::from("kind/delivery/sending/protocol: expected -> result\n");
    for ((cell, r), took) in CELLS.iter().zip(&results).zip(&took) {
        let (mark, what) = match r {
            Ok(s) => ("ok  ", s),
            Err(e) => ("FAIL", e),
        };
        let what: String = what
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        let took = *took.lock().unwrap();
        table += &format!(
            "{mark} {} ({took:.1?}): {} -> {what}\n",
            cell.name(),
            expectation(cell.expect)
        );
    }
    let count = |f: &dyn Fn(Expect) -> bool| CELLS.iter().filter(|c| f(c.expect)).count();
    let mut keys: Vec<&str> = CELLS
        .iter()
        .filter_map(|c| match c.expect {
            RefusedAtLoad(k) => Some(k),
            _ => None,
        })
        .collect();
    keys.sort();
    keys.dedup();
    let failed: Vec<String> = CELLS
        .iter()
        .zip(&results)
        .filter_map(|(cell, r)| r.as_ref().err().map(|e| format!("{}: {e}", cell.name())))
        .collect();
    eprintln!(
        "{table}matrix: {} cells: {} work, {} need a password from a relay network, {} refused at login, {} refused at load ({}); {} failed; worlds up and mailboxes seeded after {ready:.1?}, cells run after {ran:.1?}, all read back after {:.1?}",
        CELLS.len(),
        count(&|e| e == Works),
        count(&|e| e == NeedsPassword),
        count(&|e| matches!(e, Refused(_))),
        count(&|e| matches!(e, RefusedAtLoad(_))),
        keys.join(", "),
        failed.len(),
        started.elapsed(),
    );
    assert!(
        failed.is_empty(),
        "{} of {} cells failed:\n{}\n--- SMTP world:\n{}\n--- Graph world:\n{}\n--- password world:\n{}",
        failed.len(),
        CELLS.len(),
        failed.join("\n"),
        worlds.smtp.complaints(),
        worlds.graph.complaints(),
        worlds.password.complaints(),
    );
}
