//! Several replicas sharing one Redis (`[store] backend = "redis"`), end to
//! end: a real `redis-server` on a loopback port of its own, two or three
//! oxbridge processes, the real test upstream. Token requests are counted
//! by a forwarder in front of the IDP (this test's own, not the IDP's
//! global stats, which other test runs share).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const BOB: &str = "bob@example.test";
const LOCAL_PASSWORD: &str = "delegated-local-pass";
const LIMIT: Duration = Duration::from_secs(120);

/// A `redis-server` of this test: its own port and directory, no
/// persistence. Killed on drop.
struct Redis {
    port: u16,
    password: Option<String>,
    /// TLS only (the test upstream's certificate for `localhost`).
    tls: bool,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(None, false)
    }

    /// With `requirepass` (AUTH in the URL), and/or TLS only.
    fn start_with(password: Option<&str>, tls: bool) -> Redis {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut r = Redis {
            port,
            password: password.map(String::from),
            tls,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.restart();
        r
    }

    /// Start (again) on the same port.
    fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        if self.tls {
            let dir = upstream().get("OXB_UPSTREAM_DIR");
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", &format!("{dir}/tls/server.crt")])
                .args(["--tls-key-file", &format!("{dir}/tls/server.key")])
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        let (scheme, host) = match self.tls {
            true => ("rediss", "localhost"),
            false => ("redis", "127.0.0.1"),
        };
        match &self.password {
            Some(pw) => format!("{scheme}://:{pw}@{host}:{}/0", self.port),
            None => format!("{scheme}://{host}:{}/", self.port),
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if let Some(pw) = &self.password {
            cmd.args(["--no-auth-warning", "-a", pw]);
        }
        if self.tls {
            cmd.args(["--tls", "--cacert", upstream().ca()]);
        }
        let out = cmd
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The IDP's token endpoint behind a counting forwarder: (token_url, count).
fn counted_token_url(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let up = upstream();
    let url = up.token_url().to_string();
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (addr, count) = counting_forwarder(authority, delay);
    (format!("http://{addr}/{path}"), count)
}

/// A config for replicas sharing `redis`: IMAP and SMTP listeners without
/// TLS, the usual accounts plus `delegated@example.test` (refresh_token,
/// mailbox bob), tokens from `token_url`.
fn replica_config(redis: &Redis, key_file: &Path, token_url: &str, limits: &str) -> String {
    let up = upstream();
    let listeners = format!(
        "{}\n{}",
        listener("imap", "none", true),
        listener("smtp", "none", true)
    );
    let extra = format!(
        "[[account]]\nlogin = \"delegated@example.test\"\npassword_hash = \"{}\"\ngrant = \"refresh_token\"\nmailbox = \"{BOB}\"\n\n\
         [store]\nbackend = \"redis\"\nurl = \"{}\"\nkey_file = \"{}\"\n\n[limits]\n{limits}\n",
        argon2_hash(LOCAL_PASSWORD),
        redis.url(),
        key_file.display()
    );
    let idp = up.get("IDP_URL");
    config(up, "", &listeners, &extra)
        .replace(
            &format!("token_url = \"{}\"", up.token_url()),
            &format!("token_url = \"{token_url}\""),
        )
        .replace(
            "[oauth]\n",
            &format!("[oauth]\ndevice_code_url = \"{idp}/common/oauth2/v2.0/devicecode\"\n"),
        )
}

fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("store.key");
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    std::fs::write(&path, key).unwrap();
    path
}

fn write_config(dir: &Path, cfg: &str) -> PathBuf {
    let path = dir.join("oxbridge.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// An IMAP LOGIN through a replica; returns the tagged reply. With `hold`,
/// the session stays open that long (a NOOP) before LOGOUT.
fn imap_login(port: u16, user: &str, password: &str, hold: Duration) -> String {
    let mut c = Raw::connect(port);
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.send(&format!("a LOGIN \"{user}\" \"{password}\""));
    let reply = c.until("a ");
    let tagged = reply.lines().last().unwrap_or("").to_string();
    if tagged.starts_with("a OK") {
        if !hold.is_zero() {
            std::thread::sleep(hold);
            c.send("n NOOP");
            c.until("n ");
        }
        c.send("b LOGOUT");
        c.until("b ");
    }
    tagged
}

/// `oxbridge login delegated@example.test` (device flow, auto-approved by
/// the test IDP) into Redis.
fn consent(cfg_path: &Path) {
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .args(["login", "delegated@example.test", "--config"])
            .arg(cfg_path),
        LIMIT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("in Redis."), "{text}");
}

fn logs(proxies: &[Proxy]) -> String {
    proxies
        .iter()
        .enumerate()
        .map(|(i, p)| format!("--- replica {i}\n{}", p.logs()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 300 devices at once, spread over three replicas, one account: the
/// token endpoint sees exactly one request.
#[test]
fn three_hundred_logins_over_three_replicas_make_one_token_request() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let (token_url, count) = counted_token_url(Duration::from_millis(500));
    let limits = "imap_sessions_per_mailbox = 400\nmailbox_queue = 400\nmax_connections = 1000";
    let cfg = replica_config(&redis, &key, &token_url, limits);
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&cfg)).collect();
    let ports: Vec<u16> = proxies.iter().map(|p| p.port(0)).collect();
    let started = Instant::now();
    let replies: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..300)
            .map(|i| {
                let port = ports[i % 3];
                scope.spawn(move || {
                    imap_login(
                        port,
                        "scanner@example.test",
                        SCANNER_PASSWORD,
                        Duration::ZERO,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.starts_with("a OK")).count();
    assert_eq!(
        ok,
        300,
        "{:?}\n{}",
        replies.iter().find(|r| !r.starts_with("a OK")),
        logs(&proxies)
    );
    let requests = count.load(Ordering::SeqCst);
    eprintln!(
        "300 logins over 3 replicas in {:?}: {requests} token request(s)",
        started.elapsed()
    );
    assert_eq!(requests, 1, "{}", logs(&proxies));
    // The two replicas that did not ask used the token from Redis.
    let from_redis = proxies
        .iter()
        .filter(|p| p.logs().contains("access token from Redis"))
        .count();
    assert!(from_redis >= 1, "{}", logs(&proxies));
}

/// Per-mailbox limit 3 (IMAP) holds over two replicas, measured at the
/// upstream: never more than three sessions of the mailbox at once.
#[test]
fn mailbox_limit_holds_across_replicas() {
    let up = upstream();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let forwarder = Forwarder::start(&format!("127.0.0.1:{}", up.imaps_port()), None);
    let limits = "imap_sessions_per_mailbox = 3\nmailbox_wait_s = 60";
    let cfg = replica_config(&redis, &key, up.token_url(), limits).replace(
        &format!("imap = \"localhost:{}\"", up.imaps_port()),
        &format!("imap = \"localhost:{}\"", forwarder.addr.port()),
    );
    let proxies: Vec<Proxy> = (0..2).map(|_| Proxy::start(&cfg)).collect();
    let ports: Vec<u16> = proxies.iter().map(|p| p.port(0)).collect();
    let replies: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let port = ports[i % 2];
                scope.spawn(move || {
                    imap_login(
                        port,
                        "scanner@example.test",
                        SCANNER_PASSWORD,
                        Duration::from_millis(700),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        replies.iter().all(|r| r.starts_with("a OK")),
        "{replies:?}\n{}",
        logs(&proxies)
    );
    let max = forwarder.max.load(Ordering::SeqCst);
    eprintln!("10 sessions over 2 replicas, limit 3: at most {max} upstream sessions at once");
    assert_eq!(max, 3, "{}", logs(&proxies));
    // Every slot was given back.
    assert!(forwarder.wait_idle(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let held = redis.cli(&["ZCARD", "oxbridge:slots:imap:alice@example.test"]);
        if held == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "slots still held: {held}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rotated refresh token written by one replica is the one the next
/// replica uses (the test IDP accepts each refresh token exactly once).
#[test]
fn a_rotated_refresh_token_is_used_by_the_other_replicas() {
    let up = upstream();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let (token_url, count) = counted_token_url(Duration::ZERO);
    let cfg = replica_config(&redis, &key, &token_url, "");
    consent(&write_config(dir.path(), &cfg));
    let stored = redis.cli(&["GET", "oxbridge:rt:delegated@example.test"]);
    assert!(!stored.is_empty() && !stored.contains("rt."), "{stored}");
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&cfg)).collect();
    let before = count.load(Ordering::SeqCst);
    let mut last = String::new();
    for (i, p) in proxies.iter().enumerate() {
        // Each replica starts with no access token cached in Redis, so
        // each must refresh, with the refresh token the previous one stored.
        assert_eq!(
            redis.cli(&["DEL", "oxbridge:at:refresh:delegated@example.test"]),
            if i == 0 { "0" } else { "1" }
        );
        let reply = imap_login(
            p.port(0),
            "delegated@example.test",
            LOCAL_PASSWORD,
            Duration::ZERO,
        );
        assert!(
            reply.starts_with("a OK"),
            "replica {i}: {reply}\n{}",
            logs(&proxies)
        );
        let now = redis.cli(&["GET", "oxbridge:rt:delegated@example.test"]);
        assert_ne!(now, last, "replica {i} did not rotate the refresh token");
        last = now;
    }
    assert_eq!(count.load(Ordering::SeqCst) - before, 3);
    assert!(
        !logs(&proxies).contains("invalid_grant"),
        "{}",
        logs(&proxies)
    );
    let _ = up;
}

/// A token endpoint in front of the IDP that counts refresh requests and
/// holds the first `holds` of them for `hold` and forwards it only if its client is still
/// connected then (a replica killed meanwhile never reaches the IDP, as
/// with a crash before the request left).
fn holding_token_url(hold: Duration, holds: usize) -> (String, Arc<AtomicUsize>) {
    let up = upstream();
    let url = up.token_url().to_string();
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let authority = authority.to_string();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for mut client in l.incoming().flatten() {
            let (authority, seen) = (authority.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 16384];
                client
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                // Headers and body (Content-Length).
                loop {
                    match client.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                    let text = String::from_utf8_lossy(&request).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse().unwrap_or(0))
                            .unwrap_or(0);
                        if request.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                // Only refreshes are held and counted (not the device flow's polls).
                if String::from_utf8_lossy(&request).contains("grant_type=refresh_token")
                    && seen.fetch_add(1, Ordering::SeqCst) < holds
                {
                    std::thread::sleep(hold);
                }
                client.set_nonblocking(true).unwrap();
                if matches!(client.read(&mut buf), Ok(0)) {
                    return; // the client died while held
                }
                client.set_nonblocking(false).unwrap();
                let mut server = TcpStream::connect(&authority).unwrap();
                let _ = server.write_all(&request);
                let _ = server.shutdown(std::net::Shutdown::Write);
                let mut answer = Vec::new();
                let _ = server.read_to_end(&mut answer);
                let _ = client.write_all(&answer);
            });
        }
    });
    (format!("http://{addr}/{path}"), count)
}

/// A replica killed while its refresh is under way (lease held, request
/// sent) loses nothing: the stored refresh token still works, and another
/// replica gets the token once the lease has expired (within 10 s, as its
/// holder no longer renews it).
#[test]
fn killing_a_replica_mid_refresh_keeps_the_refresh_token() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let (token_url, count) = holding_token_url(Duration::from_secs(3), 1);
    let cfg = replica_config(&redis, &key, &token_url, "");
    consent(&write_config(dir.path(), &cfg));
    let stored = redis.cli(&["GET", "oxbridge:rt:delegated@example.test"]);
    let mut a = Proxy::start(&cfg);
    let b = Proxy::start(&cfg);
    let before = count.load(Ordering::SeqCst);
    let port_a = a.port(0);
    let victim = std::thread::spawn(move || {
        imap_login(
            port_a,
            "delegated@example.test",
            LOCAL_PASSWORD,
            Duration::ZERO,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(Ordering::SeqCst) == before {
        assert!(
            Instant::now() < deadline,
            "no refresh started\n{}",
            a.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        redis.cli(&["EXISTS", "oxbridge:lease:refresh:delegated@example.test"]),
        "1"
    );
    unsafe_kill_9(a.pid());
    assert!(!victim.join().unwrap().starts_with("a OK"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.is_running() {
        assert!(Instant::now() < deadline, "replica A survived kill -9");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        redis.cli(&["GET", "oxbridge:rt:delegated@example.test"]),
        stored,
        "the stored refresh token was touched"
    );
    // Replica B waits for the dead replica's lease to expire, then refreshes.
    let started = Instant::now();
    let reply = imap_login(
        b.port(0),
        "delegated@example.test",
        LOCAL_PASSWORD,
        Duration::ZERO,
    );
    assert!(reply.starts_with("a OK"), "{reply}\n{}", b.logs());
    eprintln!("replica B logged in {:?} after the kill", started.elapsed());
    // The lease (10 s) expired and B took it.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_ne!(
        redis.cli(&["GET", "oxbridge:rt:delegated@example.test"]),
        stored
    );
    assert!(!b.logs().contains("invalid_grant"), "{}", b.logs());
}

fn unsafe_kill_9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Redis stops: sessions with a cached token go on, a new token is fetched
/// by the replica alone, limits and throttling fall back to the replica's
/// own, all with warnings; when Redis returns, the replicas use it again.
/// Redis asks for a password (AUTH from the URL), which no log line shows.
#[test]
fn redis_down_degrades_then_recovers() {
    let up = upstream();
    let mut redis = Redis::start_with(Some("redis-pw-MARKER"), false);
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let cfg = replica_config(&redis, &key, up.token_url(), "");
    let proxies: Vec<Proxy> = (0..2).map(|_| Proxy::start(&cfg)).collect();
    for p in &proxies {
        let r = imap_login(
            p.port(0),
            "scanner@example.test",
            SCANNER_PASSWORD,
            Duration::ZERO,
        );
        assert!(r.starts_with("a OK"), "{r}\n{}", logs(&proxies));
    }
    assert_eq!(redis.cli(&["EXISTS", "oxbridge:at:app"]), "1");
    // Sealed: no JWT (`eyJ...`) in clear.
    let sealed = redis.cli(&["GET", "oxbridge:at:app"]);
    assert!(sealed.len() > 100 && !sealed.contains("eyJ"), "{sealed}");

    redis.stop();
    // The cached app token keeps both replicas going.
    for p in &proxies {
        let t = Instant::now();
        let r = imap_login(
            p.port(0),
            "scanner@example.test",
            SCANNER_PASSWORD,
            Duration::ZERO,
        );
        assert!(r.starts_with("a OK"), "{r}\n{}", logs(&proxies));
        eprintln!("login with Redis down: {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        p.wait_log(&["Redis unavailable; limiting upstream sessions per replica"]);
    }
    // A token nobody has cached: this replica asks alone.
    let alice = up.password("alice@example.test");
    let r = imap_login(
        proxies[0].port(0),
        "alice@example.test",
        &alice,
        Duration::ZERO,
    );
    assert!(r.starts_with("a OK"), "{r}\n{}", logs(&proxies));
    proxies[0].wait_log(&["Redis unavailable; requesting the token without the other replicas"]);
    // A failed login is still counted (locally) and refused.
    let r = imap_login(
        proxies[1].port(0),
        "scanner@example.test",
        "wrong",
        Duration::ZERO,
    );
    assert!(r.starts_with("a NO"), "{r}");
    proxies[1].wait_log(&["counting failed logins on this replica only"]);

    redis.restart();
    // Back: a new token is shared again, and slots are counted in Redis.
    let bob = up.password(BOB);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = imap_login(proxies[1].port(0), BOB, &bob, Duration::ZERO);
        assert!(r.starts_with("a OK"), "{r}\n{}", logs(&proxies));
        if redis.cli(&["EXISTS", "oxbridge:at:password:bob@example.test"]) == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not use Redis again\n{}",
            logs(&proxies)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The other replica finds bob's token in Redis (same password).
    let r = imap_login(proxies[0].port(0), BOB, &bob, Duration::ZERO);
    assert!(r.starts_with("a OK"), "{r}");
    proxies[0].wait_log(&["access token from Redis"]);
    assert!(!logs(&proxies).contains("redis-pw-MARKER"));
}

/// Failed logins count over all replicas: failures on one replica lock the
/// account out on the other, even for the right password.
#[test]
fn failed_logins_lock_out_across_replicas() {
    let up = upstream();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let limits = "login_delay_ms = 10\nlogin_lockout_failures = 3\nlogin_lockout_s = 60";
    let cfg = replica_config(&redis, &key, up.token_url(), limits);
    let proxies: Vec<Proxy> = (0..2).map(|_| Proxy::start(&cfg)).collect();
    for i in 0..3 {
        let r = imap_login(
            proxies[i % 2].port(0),
            "scanner@example.test",
            "wrong-password",
            Duration::ZERO,
        );
        assert!(r.starts_with("a NO"), "{r}");
    }
    assert_eq!(
        redis.cli(&["EXISTS", "oxbridge:lock:acct:scanner@example.test"]),
        "1"
    );
    for p in &proxies {
        let r = imap_login(
            p.port(0),
            "scanner@example.test",
            SCANNER_PASSWORD,
            Duration::ZERO,
        );
        assert!(r.starts_with("a NO"), "{r}\n{}", logs(&proxies));
        p.wait_log(&["locked out after failed logins"]);
    }
}

/// A refresh slower than the lease (its first attempt times out after the
/// 10 s HTTP timeout, the retry succeeds: over 10 s in all): its holder
/// renews the lease, so another replica waits for the result instead of
/// sending a request of its own.
#[test]
fn a_slow_refresh_keeps_its_lease() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let (token_url, count) = holding_token_url(Duration::from_secs(12), 1);
    let cfg = replica_config(&redis, &key, &token_url, "");
    consent(&write_config(dir.path(), &cfg));
    let proxies: Vec<Proxy> = (0..2).map(|_| Proxy::start(&cfg)).collect();
    let before = count.load(Ordering::SeqCst);
    let replies: Vec<String> = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            imap_login(
                proxies[0].port(0),
                "delegated@example.test",
                LOCAL_PASSWORD,
                Duration::ZERO,
            )
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while count.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "no refresh started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let second = scope.spawn(|| {
            imap_login(
                proxies[1].port(0),
                "delegated@example.test",
                LOCAL_PASSWORD,
                Duration::ZERO,
            )
        });
        vec![first.join().unwrap(), second.join().unwrap()]
    });
    assert!(
        replies.iter().all(|r| r.starts_with("a OK")),
        "{replies:?}\n{}",
        logs(&proxies)
    );
    // Replica 0's timed-out attempt and its retry; nothing from replica 1.
    assert!(
        !proxies[1].logs().contains("access token obtained"),
        "{}",
        logs(&proxies)
    );
    proxies[1].wait_log(&["access token from Redis"]);
    assert_eq!(
        count.load(Ordering::SeqCst) - before,
        2,
        "{}",
        logs(&proxies)
    );
}

/// `rediss://` with AUTH: the server's certificate is verified against the
/// system roots (here the test CA, through SSL_CERT_FILE).
#[test]
fn tls_and_auth_to_redis() {
    let up = upstream();
    let redis = Redis::start_with(Some("tls-pw-MARKER"), true);
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let cfg = replica_config(&redis, &key, up.token_url(), "");
    let proxy = Proxy::start_with_env(&cfg, &[("SSL_CERT_FILE", up.ca())]);
    let r = imap_login(
        proxy.port(0),
        "scanner@example.test",
        SCANNER_PASSWORD,
        Duration::ZERO,
    );
    assert!(r.starts_with("a OK"), "{r}\n{}", proxy.logs());
    assert_eq!(redis.cli(&["EXISTS", "oxbridge:at:app"]), "1");
    proxy.wait_log(&["connected to the Redis store"]);
    assert!(!proxy.logs().contains("tls-pw-MARKER"));

    // A Redis whose certificate is not trusted is not used.
    let untrusted = Proxy::start(&cfg);
    let r = imap_login(
        untrusted.port(0),
        "scanner@example.test",
        SCANNER_PASSWORD,
        Duration::ZERO,
    );
    assert!(r.starts_with("a OK"), "{r}\n{}", untrusted.logs());
    untrusted.wait_log(&["Redis unavailable"]);
    assert!(!untrusted.logs().contains("connected to the Redis store"));
}
