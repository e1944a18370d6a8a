//! Several devices on one busy mailbox, through sessions that outlive
//! their short tokens: each device appends, flags, expunges, fetches,
//! searches and IDLEs at random, keeps a model of its view of the folder
//! (`harness::imap_model`) and checks it against every response, and at
//! the end against Dovecot itself. Moves of a session onto a new upstream
//! login must keep every view true and end no session.
//!
//! `OXB_BUSY_SECS` (default 60) sets how long the devices work and
//! `OXB_BUSY_SEED` the random seed (printed) so that a run can be made
//! again; the summary line `busy mailbox: moves=...` is for the bench.

use std::collections::{BTreeSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::imap_model::{parse, response_end, Cmd, Response, View};
use crate::harness::*;

/// The tokens' lifetime (the identity provider's `ttl-20` tenant): a move
/// is due 15 s after each login and the session ends about 18.7 s after
/// it if it has not moved, which leaves a new login and its SELECT more
/// than 3 s to be ready even on a loaded machine, while a minute's run
/// still sees three moves per session.
const LIFETIME: Duration = Duration::from_secs(20);
const DEVICES: usize = 4;
/// Whose mailbox: Alice's, as in the other tests with short tokens (the
/// tests of `continuity` check that Bob's logins at the front had 90 s
/// tokens, and may run at the same time).
const USER: &str = ALICE;
/// Messages in the folder when the devices start.
const SEED_MESSAGES: usize = 20;
/// How long one response may take (a move holds a device for
/// milliseconds; the proxy gives up a move after 15 s).
const READ_LIMIT: Duration = Duration::from_secs(20);
/// How often each device checks its whole message number -> UID map.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How much of a device's conversation a failure shows.
const TAIL: usize = 40;
/// How much of one line the transcript keeps.
const TAIL_LINE: usize = 300;

/// How long the devices work (`OXB_BUSY_SECS`).
fn busy_secs() -> u64 {
    std::env::var("OXB_BUSY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// The run's seed (`OXB_BUSY_SEED`, else the clock).
fn seed() -> u64 {
    std::env::var("OXB_BUSY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// A proxy with one plain IMAP listener whose upstream is the
/// Exchange-like front and whose tokens live [`LIFETIME`].
fn short_token_proxy() -> Proxy {
    Proxy::start(&crate::continuity_moves::front_config(LIFETIME))
}

/// A new folder in [`USER`]'s mailbox holding [`SEED_MESSAGES`] messages.
fn seeded_folder(port: u16) -> String {
    let name = unique("busy");
    let mut c = Raw::connect(port);
    c.line();
    assert!(c
        .imap_login(USER, &upstream().password(USER))
        .contains("a OK"));
    c.send(&format!("c CREATE \"{name}\""));
    assert!(c.until("c ").contains("c OK"), "CREATE {name}");
    for i in 0..SEED_MESSAGES {
        let m = short_message(USER, &unique("seed"), &format!("seed {i}"));
        c.send(&format!("p{i} APPEND \"{name}\" {{{}+}}", m.len()));
        c.write(m.as_bytes());
        c.write(b"\r\n");
        let reply = c.until(&format!("p{i} "));
        assert!(reply.contains(&format!("p{i} OK")), "{reply}");
    }
    c.send("z LOGOUT");
    c.until("z ");
    name
}

/// The folder as Dovecot itself has it (its own port, XOAUTH2, read
/// only): (UID, flags) in UID order.
fn dovecot_folder(folder: &str) -> Vec<(u32, BTreeSet<String>)> {
    const SCRIPT: &str = r#"
import imaplib, json, re, ssl, sys, urllib.parse, urllib.request
port, ca, url, client, user, password, folder = sys.argv[1:8]
body = urllib.parse.urlencode({"grant_type": "password", "client_id": client, "username": user,
    "password": password, "scope": "https://outlook.office.com/IMAP.AccessAsUser.All"}).encode()
token = json.load(urllib.request.urlopen(url, body, timeout=10))["access_token"]
imap = imaplib.IMAP4_SSL("localhost", int(port), ssl_context=ssl.create_default_context(cafile=ca), timeout=30)
imap.authenticate("XOAUTH2", lambda _: ("user=%s\x01auth=Bearer %s\x01\x01" % (user, token)).encode())
typ, _ = imap.select('"%s"' % folder, readonly=True)
assert typ == "OK", typ
typ, data = imap.uid("FETCH", "1:*", "(FLAGS)")
assert typ == "OK", (typ, data)
out = []
for d in data:
    if not d:
        continue
    uid, flags = re.search(rb"UID (\d+)", d), re.search(rb"FLAGS \(([^)]*)\)", d)
    out.append([int(uid.group(1)), flags.group(1).decode().split()])
print(json.dumps(sorted(out)))
imap.logout()
"#;
    let up = upstream();
    let out = run(
        std::process::Command::new("python3")
            .args(["-c", SCRIPT, up.imaps_port(), up.ca(), up.token_url()])
            .args([up.get("PUBLIC_CLIENT_ID"), USER, &up.password(USER), folder]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    let list: Vec<(u32, Vec<String>)> =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    list.into_iter()
        .map(|(uid, flags)| (uid, flags.into_iter().collect()))
        .collect()
}

/// A log line of the proxy, short: its time, level, message and fields.
fn compact(line: &str) -> String {
    let Ok(serde_json::Value::Object(v)) = serde_json::from_str(line) else {
        return line.to_string();
    };
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default();
    let time = s("timestamp").get(11..23).unwrap_or_default();
    let peer = v
        .get("span")
        .and_then(|x| x.get("peer"))
        .and_then(|x| x.as_str())
        .unwrap_or_default();
    let fields: Vec<String> = v
        .iter()
        .filter(|(k, _)| {
            !["timestamp", "level", "message", "target", "span", "spans"].contains(&k.as_str())
        })
        .map(|(k, x)| format!("{k}={x}"))
        .collect();
    format!(
        "{time} {} {peer} {} {}",
        s("level"),
        s("message"),
        fields.join(" ")
    )
}

/// A connection read whole response by whole response, every read
/// bounded by a deadline.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn connect(port: u16) -> Result<Conn, String> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("write: {e}"))
    }

    /// The next whole response, or None if `deadline` passed first.
    fn next(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, String> {
        loop {
            if let Some(end) = response_end(&self.buf)? {
                return Ok(Some(self.buf.drain(..end).collect()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            if !self.fill()? {
                return Err("connection closed".into());
            }
        }
    }

    /// Read what is there; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(true),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// Whole responses that came with no command in progress.
    fn unasked(&mut self) -> Result<Vec<Vec<u8>>, String> {
        self.stream
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let more = self.fill();
        self.stream
            .set_nonblocking(false)
            .map_err(|e| e.to_string())?;
        let _ = more?;
        let mut all = Vec::new();
        while let Some(end) = response_end(&self.buf)? {
            all.push(self.buf.drain(..end).collect());
        }
        Ok(all)
    }
}

/// Why a device stopped what it was doing.
enum Fail {
    /// The session ended with `* BYE` (the device logs in again).
    Bye(String),
    /// Anything else: a desync, a refusal, a hang.
    Broken(String),
}

/// A tagged answer.
struct Answer {
    status: String,
    text: String,
    untagged: Vec<String>,
}

/// What a device counts.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    ops: u64,
    expunges: u64,
    appends: u64,
    /// NO for a message another device had just expunged.
    expunged_refusals: u64,
    byes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Append,
    AppendSync,
    Flag,
    Unflag,
    Seen,
    Expunge,
    FetchOne,
    FetchRange,
    UidFetch,
    SearchAll,
    SearchUnseen,
    UidSearchAll,
    Noop,
    Idle,
    /// Nothing in flight for 0.5 to 2 s: a move may come while the
    /// device is at rest, and must then tell it of no expunge.
    Rest,
}

/// (op, weight) of a ticketing system (IDLE and NOOP) and of people at
/// work (FETCH, STORE, EXPUNGE).
const WATCHER: [(Op, u32); 15] = [
    (Op::Append, 4),
    (Op::AppendSync, 1),
    (Op::Flag, 2),
    (Op::Unflag, 2),
    (Op::Seen, 6),
    (Op::Expunge, 3),
    (Op::FetchOne, 4),
    (Op::FetchRange, 2),
    (Op::UidFetch, 5),
    (Op::SearchAll, 3),
    (Op::SearchUnseen, 5),
    (Op::UidSearchAll, 6),
    (Op::Noop, 25),
    (Op::Idle, 30),
    (Op::Rest, 5),
];
const WORKER: [(Op, u32); 15] = [
    (Op::Append, 9),
    (Op::AppendSync, 3),
    (Op::Flag, 10),
    (Op::Unflag, 8),
    (Op::Seen, 6),
    (Op::Expunge, 12),
    (Op::FetchOne, 12),
    (Op::FetchRange, 8),
    (Op::UidFetch, 8),
    (Op::SearchAll, 4),
    (Op::SearchUnseen, 3),
    (Op::UidSearchAll, 5),
    (Op::Noop, 5),
    (Op::Idle, 5),
    (Op::Rest, 0),
];

/// One device: its connection, its model and its transcript.
struct Device<'a> {
    n: usize,
    worker: bool,
    port: u16,
    folder: &'a str,
    conn: Option<Conn>,
    view: View,
    rng: StdRng,
    tail: VecDeque<String>,
    start: Instant,
    tag: u64,
    uidplus: bool,
    literal_plus: bool,
    stats: Stats,
    /// The transcript around the first BYE.
    first_bye: Option<String>,
    /// The last response read, whole.
    last: Vec<u8>,
}

impl<'a> Device<'a> {
    fn new(n: usize, port: u16, folder: &'a str, seed: u64, start: Instant) -> Device<'a> {
        Device {
            n,
            worker: n % 2 == 1,
            port,
            folder,
            conn: None,
            view: View::default(),
            rng: StdRng::seed_from_u64(seed.wrapping_add(n as u64)),
            tail: VecDeque::new(),
            start,
            tag: 0,
            uidplus: false,
            literal_plus: false,
            stats: Stats::default(),
            first_bye: None,
            last: Vec::new(),
        }
    }

    fn note(&mut self, dir: &str, bytes: &[u8]) {
        let mut line = format!(
            "{:7.3} {dir} {}",
            self.start.elapsed().as_secs_f64(),
            String::from_utf8_lossy(bytes).escape_debug()
        );
        if line.len() > TAIL_LINE {
            let mut cut = TAIL_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" ...");
        }
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The device's failure with its transcript's tail.
    fn report(&self, why: &str) -> String {
        let kind = if self.worker { "worker" } else { "watcher" };
        let tail: Vec<&str> = self.tail.iter().map(String::as_str).collect();
        format!(
            "device {} ({kind}): {why}\n--- its last {} lines:\n{}",
            self.n,
            tail.len(),
            tail.join("\n")
        )
    }

    fn conn(&mut self) -> Result<&mut Conn, Fail> {
        self.conn
            .as_mut()
            .ok_or_else(|| Fail::Broken("not connected".into()))
    }

    fn write(&mut self, bytes: &[u8], shown: &[u8]) -> Result<(), Fail> {
        self.note("C:", shown);
        self.conn()?.write(bytes).map_err(Fail::Broken)
    }

    /// Read one response (`Ok(None)`: `deadline` came first), apply it to
    /// the model and check it.
    fn read_until(&mut self, deadline: Instant) -> Result<Option<Response>, Fail> {
        let got = self.conn()?.next(deadline).map_err(Fail::Broken)?;
        let Some(whole) = got else { return Ok(None) };
        self.take(&whole).map(Some)
    }

    fn take(&mut self, whole: &[u8]) -> Result<Response, Fail> {
        self.note("S:", whole);
        self.last = whole.to_vec();
        let r = parse(whole).map_err(Fail::Broken)?;
        if let Response::Bye(text) = &r {
            return Err(Fail::Bye(text.clone()));
        }
        self.view.apply(&r).map_err(Fail::Broken)?;
        Ok(r)
    }

    fn read(&mut self) -> Result<Response, Fail> {
        let deadline = Instant::now() + READ_LIMIT;
        self.read_until(deadline)?
            .ok_or_else(|| Fail::Broken(format!("no response within {READ_LIMIT:?}")))
    }

    /// What came while no command was in progress.
    fn at_rest(&mut self) -> Result<(), Fail> {
        self.view.begin(Cmd::Rest);
        let unasked = self.conn()?.unasked().map_err(Fail::Broken)?;
        for whole in unasked {
            self.take(&whole)?;
        }
        Ok(())
    }

    fn next_tag(&mut self) -> String {
        self.tag += 1;
        format!("d{}t{}", self.n, self.tag)
    }

    /// Read up to the tagged answer to `tag`.
    fn answer(&mut self, tag: &str) -> Result<Answer, Fail> {
        let mut untagged = Vec::new();
        loop {
            match self.read()? {
                Response::Tagged {
                    tag: t,
                    status,
                    text,
                } => {
                    if t != tag {
                        return Err(Fail::Broken(format!("an answer tagged {t}, not {tag}")));
                    }
                    self.view.end(&status).map_err(Fail::Broken)?;
                    if status == "BAD" {
                        return Err(Fail::Broken(format!("BAD {text}")));
                    }
                    return Ok(Answer {
                        status,
                        text,
                        untagged,
                    });
                }
                Response::Continue => return Err(Fail::Broken("an unexpected `+`".into())),
                _ => untagged.push(String::from_utf8_lossy(&self.last).into_owned()),
            }
        }
    }

    /// Send `tag command` (seen as `cmd` by the model); its answer.
    fn command(&mut self, command: &str, cmd: Cmd) -> Result<Answer, Fail> {
        self.at_rest()?;
        let tag = self.next_tag();
        self.view.begin(cmd);
        let line = format!("{tag} {command}\r\n");
        self.write(line.as_bytes(), line.as_bytes())?;
        self.answer(&tag)
    }

    /// [`Device::command`] that must be answered OK; a NO is accepted only
    /// where `expunged_ok` and it names a message expunged meanwhile.
    fn ok(&mut self, command: &str, cmd: Cmd, expunged_ok: bool) -> Result<Answer, Fail> {
        let a = self.command(command, cmd)?;
        self.stats.ops += 1;
        match a.status.as_str() {
            "OK" => Ok(a),
            "NO" if expunged_ok && a.text.contains("EXPUNGEISSUED") => {
                self.stats.expunged_refusals += 1;
                Ok(a)
            }
            _ => Err(Fail::Broken(format!("{command}: {} {}", a.status, a.text))),
        }
    }

    /// Connect, LOGIN, CAPABILITY and SELECT the folder, with a new model.
    fn login(&mut self) -> Result<(), Fail> {
        self.conn = Some(Conn::connect(self.port).map_err(Fail::Broken)?);
        self.view = View::default();
        self.view.begin(Cmd::Other);
        self.read()?;
        let password = upstream().password(USER);
        let tag = self.next_tag();
        let line = format!("{tag} LOGIN \"{USER}\" \"{password}\"\r\n");
        let shown = format!("{tag} LOGIN \"{USER}\" ***");
        self.write(line.as_bytes(), shown.as_bytes())?;
        let a = self.answer(&tag)?;
        if a.status != "OK" {
            return Err(Fail::Broken(format!("LOGIN: {} {}", a.status, a.text)));
        }
        let caps = self.command("CAPABILITY", Cmd::Other)?.untagged.join(" ");
        let has = |c: &str| {
            caps.split([' ', '"', '\r', '\n'])
                .any(|w| w.eq_ignore_ascii_case(c))
        };
        self.uidplus = has("UIDPLUS");
        self.literal_plus = has("LITERAL+");
        let folder = self.folder;
        let a = self.command(&format!("SELECT \"{folder}\""), Cmd::Other)?;
        if a.status != "OK" {
            return Err(Fail::Broken(format!("SELECT: {} {}", a.status, a.text)));
        }
        Ok(())
    }

    fn pick(&mut self) -> Op {
        let count = self.view.count();
        let table = if self.worker { WORKER } else { WATCHER };
        let weights: Vec<(Op, u32)> = table
            .iter()
            .map(|&(op, w)| {
                let w = match op {
                    Op::Append | Op::AppendSync if count < 10 => w * 4,
                    Op::Append | Op::AppendSync if count > 40 => (w / 4).max(1),
                    Op::Expunge if count > 40 => w * 4,
                    _ => w,
                };
                (op, w)
            })
            .collect();
        let total: u32 = weights.iter().map(|w| w.1).sum();
        let mut at = self.rng.gen_range(0..total);
        for (op, w) in weights {
            if at < w {
                return op;
            }
            at -= w;
        }
        Op::Noop
    }

    fn any_message(&mut self) -> usize {
        self.rng.gen_range(1..=self.view.count())
    }

    /// One random operation.
    fn op(&mut self) -> Result<(), Fail> {
        let mut op = self.pick();
        let needs_message = !matches!(
            op,
            Op::Append
                | Op::AppendSync
                | Op::SearchAll
                | Op::SearchUnseen
                | Op::UidSearchAll
                | Op::Noop
                | Op::Idle
                | Op::Rest
        );
        if needs_message && self.view.count() == 0 {
            op = Op::Append;
        }
        match op {
            Op::Append => self.append(!self.literal_plus),
            Op::AppendSync => self.append(true),
            Op::Flag | Op::Unflag | Op::Seen => {
                let n = self.any_message();
                let change = match op {
                    Op::Flag => "+FLAGS (\\Flagged)",
                    Op::Unflag => "-FLAGS (\\Flagged)",
                    _ => "+FLAGS (\\Seen)",
                };
                self.ok(&format!("STORE {n} {change}"), Cmd::BySequence, true)
                    .map(drop)
            }
            Op::Expunge => self.expunge(),
            Op::FetchOne => {
                let n = self.any_message();
                self.ok(&format!("FETCH {n} (UID FLAGS)"), Cmd::BySequence, true)
                    .map(drop)
            }
            Op::FetchRange => {
                let a = self.any_message();
                let b = self.rng.gen_range(a..=self.view.count().min(a + 10));
                self.ok(&format!("FETCH {a}:{b} (UID)"), Cmd::BySequence, true)
                    .map(drop)
            }
            Op::UidFetch => {
                let n = self.any_message();
                match self.view.msgs[n - 1].uid {
                    Some(uid) => self.ok(&format!("UID FETCH {uid} (FLAGS)"), Cmd::Other, true),
                    None => self.ok(&format!("FETCH {n} (UID FLAGS)"), Cmd::BySequence, true),
                }
                .map(drop)
            }
            Op::SearchAll => self.ok("SEARCH ALL", Cmd::Search, false).map(drop),
            Op::SearchUnseen => self.ok("SEARCH UNSEEN", Cmd::Search, false).map(drop),
            Op::UidSearchAll => self
                .ok("UID SEARCH ALL", Cmd::UidSearchAll, false)
                .map(drop),
            Op::Noop => self.ok("NOOP", Cmd::Other, false).map(drop),
            Op::Idle => self.idle(),
            Op::Rest => {
                let rest = self.rng.gen_range(500..2000);
                std::thread::sleep(Duration::from_millis(rest));
                self.at_rest()
            }
        }
    }

    /// APPEND a small message to the folder, with a synchronising literal
    /// (waiting for `+`) or LITERAL+.
    fn append(&mut self, synchronising: bool) -> Result<(), Fail> {
        let size = self.rng.gen_range(10..2000);
        let body: String = (0..size)
            .map(|i| if i % 70 == 69 { '\n' } else { 'x' })
            .collect();
        let message = short_message(USER, &unique("busy"), &body.replace('\n', "\r\n"));
        self.at_rest()?;
        let tag = self.next_tag();
        self.view.begin(Cmd::Other);
        let folder = self.folder;
        let plus = if synchronising { "" } else { "+" };
        let head = format!("{tag} APPEND \"{folder}\" {{{}{plus}}}\r\n", message.len());
        self.write(head.as_bytes(), head.as_bytes())?;
        if synchronising {
            loop {
                match self.read()? {
                    Response::Continue => break,
                    Response::Tagged { status, text, .. } => {
                        return Err(Fail::Broken(format!("APPEND: {status} {text}")))
                    }
                    _ => {}
                }
            }
        }
        let rest = format!("{message}\r\n");
        self.write(
            rest.as_bytes(),
            format!("<message of {} bytes>", message.len()).as_bytes(),
        )?;
        let a = self.answer(&tag)?;
        self.stats.ops += 1;
        self.stats.appends += 1;
        match a.status.as_str() {
            "OK" => Ok(()),
            _ => Err(Fail::Broken(format!("APPEND: {} {}", a.status, a.text))),
        }
    }

    /// Mark a random message \Deleted, then EXPUNGE (or UID EXPUNGE it).
    fn expunge(&mut self) -> Result<(), Fail> {
        let n = self.any_message();
        self.ok(
            &format!("STORE {n} +FLAGS.SILENT (\\Deleted)"),
            Cmd::BySequence,
            true,
        )?;
        // Its flags changed without the server saying so.
        self.view.forget_flags(n);
        let uid = self.view.msgs.get(n - 1).and_then(|m| m.uid);
        self.stats.expunges += 1;
        match uid {
            Some(uid) if self.uidplus && self.rng.gen_bool(0.4) => {
                self.ok(&format!("UID EXPUNGE {uid}"), Cmd::Other, false)
            }
            _ => self.ok("EXPUNGE", Cmd::Other, false),
        }
        .map(drop)
    }

    /// IDLE for 0.2 to 2 s, reading what comes, then DONE.
    fn idle(&mut self) -> Result<(), Fail> {
        self.at_rest()?;
        let tag = self.next_tag();
        self.view.begin(Cmd::Other);
        let line = format!("{tag} IDLE\r\n");
        self.write(line.as_bytes(), line.as_bytes())?;
        loop {
            match self.read()? {
                Response::Continue => break,
                Response::Tagged { status, text, .. } => {
                    return Err(Fail::Broken(format!("IDLE: {status} {text}")))
                }
                _ => {}
            }
        }
        let until = Instant::now() + Duration::from_millis(self.rng.gen_range(200..2000));
        while let Some(r) = self.read_until(until)? {
            if let Response::Tagged { status, text, .. } = r {
                return Err(Fail::Broken(format!(
                    "IDLE ended by the server: {status} {text}"
                )));
            }
        }
        self.write(b"DONE\r\n", b"DONE\r\n")?;
        let a = self.answer(&tag)?;
        self.stats.ops += 1;
        match a.status.as_str() {
            "OK" => Ok(()),
            _ => Err(Fail::Broken(format!("IDLE: {} {}", a.status, a.text))),
        }
    }

    /// `FETCH 1:* (UID)`: the whole message number -> UID map.
    fn check_all(&mut self) -> Result<(), Fail> {
        if self.view.count() == 0 {
            return Ok(());
        }
        self.ok("FETCH 1:* (UID)", Cmd::AllUids, true).map(drop)
    }

    /// Work until `until` (or until another device failed); BYEs are
    /// counted and the device logs in again. An error is the report.
    fn work(&mut self, until: Instant, stop: &AtomicBool) -> Result<(), String> {
        let mut checked = Instant::now();
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            let r = if checked.elapsed() >= CHECK_EVERY {
                checked = Instant::now();
                self.check_all()
            } else {
                self.op()
            };
            match r {
                Ok(()) => {}
                Err(Fail::Bye(text)) => {
                    self.stats.byes += 1;
                    if self.first_bye.is_none() {
                        self.first_bye = Some(self.report(&format!("BYE {text}")));
                    }
                    self.conn = None;
                    self.login().map_err(|f| self.failed(f))?;
                }
                Err(f) => return Err(self.failed(f)),
            }
            let pause = if self.worker { 10..100 } else { 20..200 };
            std::thread::sleep(Duration::from_millis(self.rng.gen_range(pause)));
        }
        Ok(())
    }

    fn failed(&self, f: Fail) -> String {
        match f {
            Fail::Bye(text) => self.report(&format!("BYE {text}")),
            Fail::Broken(why) => self.report(&why),
        }
    }

    /// NOOP (what the device still had to hear), then LOGOUT.
    fn finish(&mut self) -> Result<(), String> {
        self.ok("NOOP", Cmd::Other, false)
            .map_err(|f| self.failed(f))?;
        self.at_rest().map_err(|f| self.failed(f))?;
        let line = "z LOGOUT\r\n";
        self.write(line.as_bytes(), line.as_bytes())
            .map_err(|f| self.failed(f))?;
        let deadline = Instant::now() + READ_LIMIT;
        loop {
            let got = match self.conn.as_mut() {
                Some(c) => c.next(deadline),
                None => Err("not connected".into()),
            };
            match got {
                Ok(Some(r)) if r.starts_with(b"z ") => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => return Err(self.report("no answer to LOGOUT")),
                Err(e) => return Err(self.report(&e)),
            }
        }
    }
}

/// What a device ended with.
struct Ended {
    n: usize,
    view: View,
    stats: Stats,
    first_bye: Option<String>,
    result: Result<(), String>,
    report: String,
}

/// Four devices (two in IDLE and NOOP like a ticketing system, two at
/// FETCH, STORE and EXPUNGE like people at work) on one folder through
/// sessions of 20-second tokens, each session moved about every 15 s: no
/// response ever disagrees with a device's model of the folder, the
/// models agree with Dovecot at the end, no device gets a BYE, every
/// session moves about once per token lifetime and no move is refused.
#[test]
fn several_devices_on_one_busy_mailbox_keep_a_true_view_across_moves() {
    let busy = busy_secs();
    let seed = seed();
    eprintln!("busy mailbox: seed={seed} secs={busy} (OXB_BUSY_SEED, OXB_BUSY_SECS)");
    let began = Instant::now();
    let proxy = short_token_proxy();
    let port = proxy.port(0);
    let folder = seeded_folder(port);
    let stop = AtomicBool::new(false);
    let finished = AtomicUsize::new(0);
    let start = Instant::now();
    let until = start + Duration::from_secs(busy);
    let ended: Vec<Ended> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..DEVICES)
            .map(|n| {
                let (folder, stop, finished) = (&folder, &stop, &finished);
                scope.spawn(move || {
                    let mut d = Device::new(n, port, folder, seed, start);
                    let mut result = d.login().map_err(|f| d.failed(f));
                    if result.is_ok() {
                        result = d.work(until, stop);
                    }
                    if result.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    // Nobody changes the folder from here on: wait for the
                    // others, then hear the last news.
                    finished.fetch_add(1, Ordering::SeqCst);
                    let wait = Instant::now() + READ_LIMIT;
                    while finished.load(Ordering::SeqCst) < DEVICES && Instant::now() < wait {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if result.is_ok() {
                        result = d.finish();
                    }
                    Ended {
                        n,
                        report: d.report("at the end"),
                        view: d.view.clone(),
                        stats: d.stats,
                        first_bye: d.first_bye.clone(),
                        result,
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let worked = start.elapsed();
    let server = dovecot_folder(&folder);
    let mut failures: Vec<String> = ended
        .iter()
        .filter_map(|e| e.result.as_ref().err().cloned())
        .collect();
    for e in ended.iter().filter(|e| e.result.is_ok()) {
        if let Err(why) = e.view.compare(&server) {
            failures.push(format!(
                "device {} disagrees with Dovecot: {why}\n{}",
                e.n, e.report
            ));
        }
    }
    let m = scrape(proxy.admin_addr());
    // (+ 0.0: an empty sum is -0.)
    let moves = value(&m, "oxbridge_imap_swaps_total", &[]) + 0.0;
    let refused = value(&m, "oxbridge_imap_swap_refusals_total", &[]) + 0.0;
    let total = ended.iter().fold(Stats::default(), |mut t, e| {
        t.ops += e.stats.ops;
        t.expunges += e.stats.expunges;
        t.appends += e.stats.appends;
        t.expunged_refusals += e.stats.expunged_refusals;
        t.byes += e.stats.byes;
        t
    });
    let refusals: Vec<&String> = m
        .keys()
        .filter(|k| k.starts_with("oxbridge_imap_swap_refusals_total{"))
        .collect();
    eprintln!(
        "busy mailbox: moves={moves} refused={refused} byes={} ops={} expunges={} appends={} seed={seed}",
        total.byes, total.ops, total.expunges, total.appends
    );
    eprintln!(
        "busy mailbox: deferred={} reconciled={} told expunges={} arrivals={} flags={}",
        value(&m, "oxbridge_imap_swap_deferrals_total", &[]) + 0.0,
        value(&m, "oxbridge_imap_reconciliations_total", &[]) + 0.0,
        value(&m, "oxbridge_imap_reconciled_total", &[("kind", "expunge")]) + 0.0,
        value(&m, "oxbridge_imap_reconciled_total", &[("kind", "arrival")]) + 0.0,
        value(&m, "oxbridge_imap_reconciled_total", &[("kind", "flags")]) + 0.0,
    );
    eprintln!(
        "busy mailbox: {} NO for messages expunged meanwhile, {} messages at the end, worked {worked:?}, {:?} in all; refusals: {:?}",
        total.expunged_refusals,
        server.len(),
        began.elapsed(),
        refusals.iter().map(|k| (k.as_str(), m[*k])).collect::<Vec<_>>()
    );
    let logs: Vec<String> = proxy.logs().lines().map(compact).collect();
    let moves_log: Vec<&str> = logs
        .iter()
        .map(String::as_str)
        .filter(|l| {
            l.contains("could not move") || l.contains("not moved") || l.contains("moved to a new")
        })
        .collect();
    let moves_log = moves_log.join("\n");
    assert!(
        failures.is_empty(),
        "{}\n--- the proxy's log:\n{}",
        failures.join("\n\n"),
        logs.join("\n")
    );
    let byes: Vec<&String> = ended.iter().filter_map(|e| e.first_bye.as_ref()).collect();
    assert_eq!(
        total.byes,
        0,
        "devices got BYE ({} in all); the first of each:\n{}\n--- the proxy's moves:\n{}",
        total.byes,
        byes.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n\n"),
        moves_log
    );
    let lifetimes = busy / LIFETIME.as_secs();
    let want = (DEVICES as u64 * lifetimes).saturating_sub(DEVICES as u64) as f64;
    assert!(
        moves >= want,
        "{moves} moves, want at least {want}\n{}",
        moves_log
    );
    assert_eq!(refused, 0.0, "{refusals:?}\n{}", moves_log);
}
