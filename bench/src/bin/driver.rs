//! bench-driver: the client side of every workload. Prints one JSON object
//! on stdout per run; progress goes to stderr.
//!
//!   bench-driver login  --proto P --mode plain|direct --addr A --users U:P,...
//!                       [--ca F --token-file F] [--seq 30 --conc 50 --total 100 --warm 2 --timeout 20]
//!   bench-driver bulk   --proto P --mode M --addr A --users U:P [--pid N] --size BYTES --reps N
//!   bench-driver scale  --addrs A,B --pids N,M --users U:P,... --sessions 10000 --conc 500
//!   bench-driver append --addr A --ca F --token-file F --users U:P --size BYTES
//!
//! `plain` is a password login to a proxy without TLS (IMAP LOGIN, POP3
//! USER/PASS, SMTP AUTH PLAIN); `direct` is XOAUTH2 over TLS straight to the
//! server (implicit TLS for IMAP/POP3, STARTTLS for SMTP) with a bearer token.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxbridge_bench::*;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Proto {
    Imap,
    Pop3,
    Smtp,
}

#[derive(Clone)]
struct Target {
    proto: Proto,
    addr: SocketAddr,
    /// Some: direct XOAUTH2 over TLS with this token.
    direct: Option<(Arc<rustls::ClientConfig>, String)>,
    /// Read the TLS stream through a buffer of this size (0: straight from the socket).
    bufread: usize,
}

type C = Conn<Io>;

fn err<E: std::fmt::Display>(step: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{step}: {e}")
}

async fn tls_upgrade(tcp: TcpStream, cfg: &Arc<rustls::ClientConfig>, bufread: usize) -> Result<Io, String> {
    let name = ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
    if bufread > 0 {
        let s = connector
            .connect(name, BufTcp::new(tcp, bufread))
            .await
            .map_err(err("tls"))?;
        return Ok(Io::TlsBuf(Box::new(s)));
    }
    let s = connector.connect(name, tcp).await.map_err(err("tls"))?;
    Ok(Io::Tls(Box::new(s)))
}

/// Connect and log in; the connection is returned logged in.
async fn login(t: &Target, user: &str, pass: &str, cap: usize) -> Result<C, String> {
    let tcp = TcpStream::connect(t.addr).await.map_err(err("connect"))?;
    let _ = tcp.set_nodelay(true);
    match (t.proto, &t.direct) {
        (Proto::Imap, None) => {
            let mut c = Conn::new(Io::Plain(tcp), cap);
            let g = c.line().await.map_err(err("greeting"))?;
            if !g.starts_with(b"* OK") {
                return Err(format!("greeting: {}", show(&g)));
            }
            let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
            c.send(format!("a1 LOGIN \"{}\" \"{}\"\r\n", q(user), q(pass)).as_bytes())
                .await
                .map_err(err("LOGIN"))?;
            imap_tagged(&mut c, "a1", false).await?;
            Ok(c)
        }
        (Proto::Imap, Some((cfg, token))) => {
            let mut c = Conn::new(tls_upgrade(tcp, cfg, t.bufread).await?, cap);
            let g = c.line().await.map_err(err("greeting"))?;
            if !g.starts_with(b"* OK") {
                return Err(format!("greeting: {}", show(&g)));
            }
            c.send(format!("a1 AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(user, token)).as_bytes())
                .await
                .map_err(err("AUTHENTICATE"))?;
            imap_tagged(&mut c, "a1", true).await?;
            Ok(c)
        }
        (Proto::Pop3, None) => {
            let mut c = Conn::new(Io::Plain(tcp), cap);
            expect_ok(&mut c, "greeting").await?;
            c.send(format!("USER {user}\r\n").as_bytes()).await.map_err(err("USER"))?;
            expect_ok(&mut c, "USER").await?;
            c.send(format!("PASS {pass}\r\n").as_bytes()).await.map_err(err("PASS"))?;
            expect_ok(&mut c, "PASS").await?;
            Ok(c)
        }
        (Proto::Pop3, Some((cfg, token))) => {
            let mut c = Conn::new(tls_upgrade(tcp, cfg, t.bufread).await?, cap);
            expect_ok(&mut c, "greeting").await?;
            c.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2(user, token)).as_bytes())
                .await
                .map_err(err("AUTH"))?;
            let l = c.line().await.map_err(err("AUTH"))?;
            if l.starts_with(b"+OK") {
                return Ok(c);
            }
            if l.starts_with(b"+ ") {
                c.send(b"\r\n").await.map_err(err("AUTH"))?;
                let l = c.line().await.map_err(err("AUTH"))?;
                return Err(format!("AUTH: {}", show(&l)));
            }
            Err(format!("AUTH: {}", show(&l)))
        }
        (Proto::Smtp, None) => {
            let mut c = Conn::new(Io::Plain(tcp), cap);
            smtp_expect(&mut c, 220, "greeting").await?;
            c.send(b"EHLO bench.example.test\r\n").await.map_err(err("EHLO"))?;
            smtp_expect(&mut c, 250, "EHLO").await?;
            c.send(format!("AUTH PLAIN {}\r\n", plain(user, pass)).as_bytes())
                .await
                .map_err(err("AUTH"))?;
            smtp_expect(&mut c, 235, "AUTH").await?;
            Ok(c)
        }
        (Proto::Smtp, Some((cfg, token))) => {
            let mut c = Conn::new(Io::Plain(tcp), 4096);
            smtp_expect(&mut c, 220, "greeting").await?;
            c.send(b"EHLO bench.example.test\r\n").await.map_err(err("EHLO"))?;
            smtp_expect(&mut c, 250, "EHLO").await?;
            c.send(b"STARTTLS\r\n").await.map_err(err("STARTTLS"))?;
            smtp_expect(&mut c, 220, "STARTTLS").await?;
            let Io::Plain(tcp) = c.into_io() else { unreachable!() };
            let mut c = Conn::new(tls_upgrade(tcp, cfg, t.bufread).await?, cap);
            c.send(b"EHLO bench.example.test\r\n").await.map_err(err("EHLO"))?;
            smtp_expect(&mut c, 250, "EHLO after STARTTLS").await?;
            c.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2(user, token)).as_bytes())
                .await
                .map_err(err("AUTH"))?;
            let (code, l) = c.smtp_reply().await.map_err(err("AUTH"))?;
            match code {
                235 => Ok(c),
                334 => {
                    c.send(b"\r\n").await.map_err(err("AUTH"))?;
                    let (_, l) = c.smtp_reply().await.map_err(err("AUTH"))?;
                    Err(format!("AUTH: {}", show(&l)))
                }
                _ => Err(format!("AUTH: {}", show(&l))),
            }
        }
    }
}

async fn imap_tagged(c: &mut C, tag: &str, answer_challenge: bool) -> Result<(), String> {
    let want = format!("{tag} ");
    loop {
        let l = c.line().await.map_err(err(tag))?;
        if l.starts_with(b"+") && answer_challenge {
            c.send(b"\r\n").await.map_err(err(tag))?;
            continue;
        }
        if l.starts_with(want.as_bytes()) {
            return if l[want.len()..].starts_with(b"OK") {
                Ok(())
            } else {
                Err(show(&l))
            };
        }
    }
}

async fn expect_ok(c: &mut C, step: &str) -> Result<(), String> {
    let l = c.line().await.map_err(err(step))?;
    if l.starts_with(b"+OK") {
        Ok(())
    } else {
        Err(format!("{step}: {}", show(&l)))
    }
}

async fn smtp_expect(c: &mut C, want: u16, step: &str) -> Result<(), String> {
    let (code, l) = c.smtp_reply().await.map_err(err(step))?;
    if code == want {
        Ok(())
    } else {
        Err(format!("{step}: {}", show(&l)))
    }
}

async fn logout(mut c: C, proto: Proto) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        match proto {
            Proto::Imap => {
                c.send(b"z LOGOUT\r\n").await.ok()?;
                imap_tagged(&mut c, "z", false).await.ok()
            }
            Proto::Pop3 => {
                c.send(b"QUIT\r\n").await.ok()?;
                c.line().await.ok().map(|_| ())
            }
            Proto::Smtp => {
                c.send(b"QUIT\r\n").await.ok()?;
                c.smtp_reply().await.ok().map(|_| ())
            }
        }
    })
    .await;
    let _ = c.io.shutdown().await;
}

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }
    fn need(&self, name: &str) -> io::Result<&str> {
        self.get(name)
            .ok_or_else(|| io::Error::other(format!("missing --{name}")))
    }
    fn num(&self, name: &str, default: f64) -> f64 {
        self.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
    fn users(&self) -> io::Result<Vec<(String, String)>> {
        Ok(self
            .need("users")?
            .split(',')
            .map(|up| match up.split_once(':') {
                Some((u, p)) => (u.to_string(), p.to_string()),
                None => (up.to_string(), String::new()),
            })
            .collect())
    }
    fn target(&self) -> io::Result<Target> {
        let proto = match self.need("proto")? {
            "imap" => Proto::Imap,
            "pop3" => Proto::Pop3,
            "smtp" => Proto::Smtp,
            p => return Err(io::Error::other(format!("unknown protocol {p}"))),
        };
        let addr = self.need("addr")?.parse().map_err(io::Error::other)?;
        let direct = match self.get("mode").unwrap_or("plain") {
            "plain" => None,
            "direct" => {
                let cfg = client_config(self.need("ca")?.as_ref())?;
                let token = std::fs::read_to_string(self.need("token-file")?)?
                    .trim()
                    .to_string();
                Some((cfg, token))
            }
            m => return Err(io::Error::other(format!("unknown mode {m}"))),
        };
        Ok(Target {
            proto,
            addr,
            direct,
            bufread: self.num("bufread", 0.0) as usize,
        })
    }
}

fn raise_nofile() {
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() -> io::Result<()> {
    raise_nofile();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        return Err(io::Error::other("usage: bench-driver login|bulk|scale|append ..."));
    };
    let a = Args(argv);
    let threads = a.num("threads", 2.0) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match cmd.as_str() {
            "login" => login_workload(&a).await,
            "bulk" => bulk_workload(&a).await,
            "scale" => scale_workload(&a).await,
            "append" => append(&a).await,
            c => Err(io::Error::other(format!("unknown command {c}"))),
        }
    })?;
    println!("{out}");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One timed login and a logout; Ok(latency) or Err(reason).
async fn timed_login(t: &Target, user: &str, pass: &str, timeout: Duration) -> Result<f64, String> {
    let t0 = Instant::now();
    match tokio::time::timeout(timeout, login(t, user, pass, 8192)).await {
        Ok(Ok(c)) => {
            let lat = ms(t0.elapsed());
            logout(c, t.proto).await;
            Ok(lat)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("timeout after {timeout:?}")),
    }
}

fn errors_json(errs: &[String]) -> Value {
    let mut samples: Vec<&String> = errs.iter().collect();
    samples.sort();
    samples.dedup();
    samples.truncate(5);
    json!(samples)
}

async fn login_workload(a: &Args) -> io::Result<Value> {
    let t = Arc::new(a.target()?);
    let users = Arc::new(a.users()?);
    let timeout = Duration::from_secs_f64(a.num("timeout", 20.0));
    let seq = a.num("seq", 30.0) as usize;
    let conc = a.num("conc", 50.0) as usize;
    let total = a.num("total", 100.0) as usize;
    let warm = a.num("warm", 2.0) as usize;
    let pid = a.num("pid", 0.0) as u32;
    let cpu = |pid: u32| if pid > 0 { proc_cpu_s(pid) } else { None };
    let me = std::process::id();

    let mut warm_errors = Vec::new();
    for i in 0..warm * users.len() {
        let (u, p) = &users[i % users.len()];
        if let Err(e) = timed_login(&t, u, p, timeout).await {
            warm_errors.push(e);
        }
    }

    let mut seq_lat = Vec::new();
    let mut seq_err = Vec::new();
    let (p0, m0) = (cpu(pid), cpu(me));
    let t_seq = Instant::now();
    for i in 0..seq {
        let (u, p) = &users[i % users.len()];
        match timed_login(&t, u, p, timeout).await {
            Ok(l) => seq_lat.push(l),
            Err(e) => seq_err.push(e),
        }
    }
    let seq_wall = t_seq.elapsed().as_secs_f64();
    let (p1, m1) = (cpu(pid), cpu(me));
    eprintln!(
        "  seq: {} ok, {} errors in {seq_wall:.2}s",
        seq_lat.len(),
        seq_err.len()
    );

    let next = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    for _ in 0..conc.min(total) {
        let (t, users, next, tx) = (t.clone(), users.clone(), next.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (u, p) = &users[i % users.len()];
                let r = timed_login(&t, u, p, timeout).await;
                let _ = tx.send(r);
            }
        });
    }
    drop(tx);
    let mut conc_lat = Vec::new();
    let mut conc_err = Vec::new();
    while let Some(r) = rx.recv().await {
        match r {
            Ok(l) => conc_lat.push(l),
            Err(e) => conc_err.push(e),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let (p2, m2) = (cpu(pid), cpu(me));
    eprintln!(
        "  conc: {} ok, {} errors in {wall:.2}s",
        conc_lat.len(),
        conc_err.len()
    );
    let d = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| y - x);
    Ok(json!({
        "warm_errors": warm_errors.len(),
        "warm_error_samples": errors_json(&warm_errors),
        "seq": {"lat_ms": seq_lat, "errors": seq_err.len(), "error_samples": errors_json(&seq_err), "wall_s": seq_wall,
                "proxy_cpu_s": d(p0, p1), "driver_cpu_s": d(m0, m1)},
        "conc": {"lat_ms": conc_lat, "errors": conc_err.len(), "error_samples": errors_json(&conc_err),
                 "wall_s": wall, "concurrency": conc, "total": total,
                 "proxy_cpu_s": d(p1, p2), "driver_cpu_s": d(m1, m2)},
    }))
}

async fn bulk_workload(a: &Args) -> io::Result<Value> {
    let t = a.target()?;
    let users = a.users()?;
    let (user, pass) = &users[0];
    let pid = a.num("pid", 0.0) as u32;
    let reps = a.num("reps", 5.0) as usize;
    let size = a.num("size", 10.0 * 1048576.0) as usize;
    let timeout = Duration::from_secs_f64(a.num("timeout", 120.0));
    let from = a.get("from").unwrap_or(user).to_string();
    let rcpt = a.get("rcpt").unwrap_or("sink@discard.invalid").to_string();
    let mut c = login(&t, user, pass, 256 * 1024)
        .await
        .map_err(io::Error::other)?;
    if t.proto == Proto::Imap {
        c.send(b"s SELECT INBOX\r\n").await?;
        imap_tagged(&mut c, "s", false)
            .await
            .map_err(io::Error::other)?;
    }
    let body = if t.proto == Proto::Smtp {
        make_message(size, "bench bulk SMTP DATA")
    } else {
        Vec::new()
    };
    let me = std::process::id();
    let self0 = proc_cpu_s(me);
    let cpu0 = (pid > 0).then(|| proc_cpu_s(pid)).flatten();
    let sched0 = (pid > 0).then(|| proc_sched_s(pid)).flatten();
    let mut mbps = Vec::new();
    let mut secs = Vec::new();
    let mut bytes_total = 0u64;
    for r in 0..reps {
        let (n, dt) = tokio::time::timeout(timeout, one_transfer(&mut c, t.proto, r, &body, &from, &rcpt))
            .await
            .map_err(|_| io::Error::other(format!("transfer {r} timed out after {timeout:?}")))?
            .map_err(io::Error::other)?;
        bytes_total += n;
        secs.push(dt);
        mbps.push(n as f64 / dt / 1e6);
    }
    let cpu1 = (pid > 0).then(|| proc_cpu_s(pid)).flatten();
    let self1 = proc_cpu_s(me);
    let sched1 = (pid > 0).then(|| proc_sched_s(pid)).flatten();
    logout(c, t.proto).await;
    let d = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| y - x);
    Ok(json!({
        "bytes_each": bytes_total / reps.max(1) as u64,
        "bytes_total": bytes_total,
        "mbps": mbps,
        "secs": secs,
        "cpu_s": d(cpu0, cpu1),
        "sched_s": d(sched0, sched1),
        "driver_cpu_s": d(self0, self1),
    }))
}

/// One FETCH / RETR / DATA; returns (message bytes, seconds).
async fn one_transfer(
    c: &mut C,
    proto: Proto,
    r: usize,
    body: &[u8],
    from: &str,
    rcpt: &str,
) -> Result<(u64, f64), String> {
    match proto {
        Proto::Imap => {
            let tag = format!("f{r}");
            let t0 = Instant::now();
            c.send(format!("{tag} FETCH 1 BODY.PEEK[]\r\n").as_bytes())
                .await
                .map_err(err("FETCH"))?;
            let mut n = 0u64;
            loop {
                let l = c.line().await.map_err(err("FETCH"))?;
                if l.starts_with(b"* ") && l.ends_with(b"}\r\n") {
                    let open = l.iter().rposition(|b| *b == b'{').ok_or("FETCH: no literal")?;
                    let len: usize = std::str::from_utf8(&l[open + 1..l.len() - 3])
                        .ok()
                        .and_then(|s| s.trim_end_matches('+').parse().ok())
                        .ok_or_else(|| format!("FETCH: bad literal {}", show(&l)))?;
                    c.skip(len).await.map_err(err("FETCH literal"))?;
                    n += len as u64;
                } else if l.starts_with(tag.as_bytes()) {
                    if !l[tag.len()..].starts_with(b" OK") {
                        return Err(format!("FETCH: {}", show(&l)));
                    }
                    break;
                }
            }
            Ok((n, t0.elapsed().as_secs_f64()))
        }
        Proto::Pop3 => {
            let t0 = Instant::now();
            c.send(b"RETR 1\r\n").await.map_err(err("RETR"))?;
            expect_ok(c, "RETR").await?;
            let n = c.skip_through(b"\r\n.\r\n").await.map_err(err("RETR body"))?;
            Ok((n - 3, t0.elapsed().as_secs_f64()))
        }
        Proto::Smtp => {
            c.send(format!("MAIL FROM:<{from}>\r\n").as_bytes())
                .await
                .map_err(err("MAIL"))?;
            smtp_expect(c, 250, "MAIL").await?;
            c.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
                .await
                .map_err(err("RCPT"))?;
            smtp_expect(c, 250, "RCPT").await?;
            let t0 = Instant::now();
            c.send(b"DATA\r\n").await.map_err(err("DATA"))?;
            smtp_expect(c, 354, "DATA").await?;
            c.io.write_all(body).await.map_err(err("DATA body"))?;
            c.send(b".\r\n").await.map_err(err("DATA end"))?;
            smtp_expect(c, 250, "end of DATA").await?;
            Ok((body.len() as u64, t0.elapsed().as_secs_f64()))
        }
    }
}

/// Put one message of `--size` bytes into the user's INBOX (direct IMAP).
async fn append(a: &Args) -> io::Result<Value> {
    let t = a.target()?;
    let users = a.users()?;
    let size = a.num("size", 10.0 * 1048576.0) as usize;
    let msg = make_message(size, "bench bulk FETCH/RETR");
    let mut c = login(&t, &users[0].0, &users[0].1, 64 * 1024)
        .await
        .map_err(io::Error::other)?;
    c.send(format!("p APPEND INBOX {{{size}+}}\r\n").as_bytes())
        .await?;
    c.io.write_all(&msg).await?;
    c.send(b"\r\n").await?;
    imap_tagged(&mut c, "p", false)
        .await
        .map_err(io::Error::other)?;
    logout(c, Proto::Imap).await;
    Ok(json!({"appended": size}))
}

enum Held {
    Up(f64),
    Failed(String),
}

async fn scale_workload(a: &Args) -> io::Result<Value> {
    let addrs: Vec<SocketAddr> = a
        .need("addrs")?
        .split(',')
        .map(|s| s.parse().map_err(io::Error::other))
        .collect::<io::Result<_>>()?;
    let pids: Vec<u32> = a
        .get("pids")
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect();
    let users = Arc::new(a.users()?);
    let n = a.num("sessions", 10000.0) as usize;
    let conc = a.num("conc", 500.0) as usize;
    let timeout = Duration::from_secs_f64(a.num("timeout", 60.0));
    let settle = Duration::from_secs_f64(a.num("settle", 2.0));
    let rss = |pids: &[u32]| pids.iter().filter_map(|p| proc_rss_kib(*p)).sum::<u64>();
    let fds = |pids: &[u32]| pids.iter().filter_map(|p| proc_fds(*p)).sum::<usize>();
    let rss0 = rss(&pids);
    let fds0 = fds(&pids);

    let sem = Arc::new(Semaphore::new(conc));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (alive_tx, mut alive_rx) = mpsc::unbounded_channel::<bool>();
    let (phase_tx, phase_rx) = watch::channel(0u8);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let t = Target {
            proto: Proto::Imap,
            addr: addrs[i % addrs.len()],
            direct: None,
            bufread: 0,
        };
        let (users, sem, tx, alive_tx) = (users.clone(), sem.clone(), tx.clone(), alive_tx.clone());
        let mut phase = phase_rx.clone();
        tasks.push(tokio::spawn(async move {
            let (u, p) = &users[i % users.len()];
            let permit = sem.acquire_owned().await.unwrap();
            let r = tokio::time::timeout(timeout, login(&t, u, p, 1024)).await;
            drop(permit);
            let mut c = match r {
                Ok(Ok(c)) => {
                    let _ = tx.send(Held::Up(t0.elapsed().as_secs_f64()));
                    c
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Held::Failed(e));
                    return;
                }
                Err(_) => {
                    let _ = tx.send(Held::Failed(format!("login timeout after {timeout:?}")));
                    return;
                }
            };
            drop(tx);
            let _ = phase.wait_for(|p| *p >= 1).await;
            let ok = tokio::time::timeout(Duration::from_secs(60), async {
                c.send(b"n NOOP\r\n").await.ok()?;
                imap_tagged(&mut c, "n", false).await.ok()
            })
            .await
            .ok()
            .flatten()
            .is_some();
            let _ = alive_tx.send(ok);
            drop(alive_tx);
            let _ = phase.wait_for(|p| *p >= 2).await;
            logout(c, Proto::Imap).await;
        }));
        if i % 1000 == 999 {
            tokio::task::yield_now().await;
        }
    }
    drop(tx);
    drop(alive_tx);
    let mut up = 0usize;
    let mut last_up = 0f64;
    let mut failed = Vec::new();
    while let Some(h) = rx.recv().await {
        match h {
            Held::Up(at) => {
                up += 1;
                last_up = last_up.max(at);
            }
            Held::Failed(e) => failed.push(e),
        }
        let done = up + failed.len();
        if done % 2000 == 0 {
            eprintln!("  {done}/{n} logins done at {:.1}s", t0.elapsed().as_secs_f64());
        }
    }
    let t_all = t0.elapsed().as_secs_f64();
    eprintln!("  {up} up, {} failed; all done in {t_all:.2}s", failed.len());
    tokio::time::sleep(settle).await;
    let rss1 = rss(&pids);
    let fds1 = fds(&pids);
    let _ = phase_tx.send(1);
    let mut alive = 0usize;
    let mut dead = 0usize;
    while let Some(ok) = alive_rx.recv().await {
        if ok {
            alive += 1;
        } else {
            dead += 1;
        }
    }
    let rss2 = rss(&pids);
    let _ = phase_tx.send(2);
    for task in tasks {
        let _ = task.await;
    }
    let per = if up > 0 {
        (rss1 as f64 - rss0 as f64) / up as f64
    } else {
        0.0
    };
    Ok(json!({
        "sessions": n,
        "processes": pids.len(),
        "established": up,
        "errors": failed.len(),
        "error_samples": errors_json(&failed),
        "establish_s": last_up,
        "all_done_s": t_all,
        "rss0_kib": rss0,
        "rss1_kib": rss1,
        "rss_after_noop_kib": rss2,
        "rss_per_session_kib": per,
        "fds0": fds0,
        "fds1": fds1,
        "alive_after": alive,
        "dead_after": dead,
    }))
}
