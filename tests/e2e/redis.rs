//! Several replicas sharing one Redis (`[store] backend = "redis"`), end to
//! end: a real `redis-server` on a loopback port of its own, two or three
//! oxbridge processes, the real test upstream. Token requests are counted
//! by a forwarder in front of the IDP (this test's own, not the IDP's
//! global stats, which other tests share).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::harness::*;

const LOCAL_PASSWORD: &str = "delegated-local-pass";

/// A config for replicas sharing `redis`: IMAP and SMTP listeners without
/// TLS, the usual accounts plus `delegated@example.test` (refresh_token,
/// mailbox bob), tokens from `token_url`.
fn replica_config(redis: &Redis, key_file: &Path, token_url: &str, limits: &str) -> String {
    let extra = format!(
        "[[account]]\nlogin = \"delegated@example.test\"\npassword_hash = \"{}\"\ngrant = \"refresh_token\"\nmailbox = \"{BOB}\"\n\n\
         [store]\nbackend = \"redis\"\nurl = \"{}\"\nkey_file = \"{}\"\n\n[limits]\n{limits}\n",
        argon2_hash(LOCAL_PASSWORD),
        redis.url(),
        key_file.display()
    );
    let idp = upstream().get("IDP_URL");
    with_token_url(
        &config(&plain_listeners(&["imap", "smtp"]), &extra),
        token_url,
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

/// An IMAP LOGIN through a replica; returns the tagged reply. With `hold`,
/// the session stays open that long (a NOOP) before LOGOUT.
fn imap_login(port: u16, user: &str, password: &str, hold: Duration) -> String {
    let mut c = Raw::connect(port);
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let reply = c.imap_login(user, password);
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

/// The scanner's IMAP LOGIN through a replica, at once out again.
fn scanner_login(port: u16) -> String {
    imap_login(
        port,
        "scanner@example.test",
        SCANNER_PASSWORD,
        Duration::ZERO,
    )
}

/// The delegated account's IMAP LOGIN through a replica.
fn delegated_login(port: u16) -> String {
    imap_login(
        port,
        "delegated@example.test",
        LOCAL_PASSWORD,
        Duration::ZERO,
    )
}

/// `oxbridge login delegated@example.test` (device flow, auto-approved by
/// the test IDP) into Redis.
fn consent(cfg_path: &Path) {
    let out = oxbridge(&["login", "delegated@example.test"], cfg_path);
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("in Redis."), "{text}");
}

/// Wait (up to 20 s) until `count` moves past `before`.
fn wait_for_request(
    count: &std::sync::atomic::AtomicUsize,
    before: usize,
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "no refresh started\n{}", logs());
        std::thread::sleep(Duration::from_millis(10));
    }
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
                scope.spawn(move || scanner_login(port))
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
        Proxy::all_logs(&proxies)
    );
    let requests = count.load(Ordering::SeqCst);
    eprintln!(
        "300 logins over 3 replicas in {:?}: {requests} token request(s)",
        started.elapsed()
    );
    assert_eq!(requests, 1, "{}", Proxy::all_logs(&proxies));
    // The two replicas that did not ask used the token from Redis.
    let from_redis = proxies
        .iter()
        .filter(|p| p.logs().contains("access token from Redis"))
        .count();
    assert!(from_redis >= 1, "{}", Proxy::all_logs(&proxies));
}

/// Per-mailbox limit 3 (IMAP) holds over two replicas, measured at the
/// upstream: never more than three sessions of the mailbox at once.
#[test]
fn mailbox_limit_holds_across_replicas() {
    let up = upstream();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let forwarder = Forwarder::start(&up.loopback("imap"), None);
    let limits = "imap_sessions_per_mailbox = 3\nimap_mailbox_wait_s = 60";
    let cfg = reroute(
        &replica_config(&redis, &key, up.token_url(), limits),
        "imap",
        &format!("localhost:{}", forwarder.addr.port()),
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
        Proxy::all_logs(&proxies)
    );
    let max = forwarder.max.load(Ordering::SeqCst);
    eprintln!("10 sessions over 2 replicas, limit 3: at most {max} upstream sessions at once");
    assert_eq!(max, 3, "{}", Proxy::all_logs(&proxies));
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
        let reply = delegated_login(p.port(0));
        assert!(
            reply.starts_with("a OK"),
            "replica {i}: {reply}\n{}",
            Proxy::all_logs(&proxies)
        );
        let now = redis.cli(&["GET", "oxbridge:rt:delegated@example.test"]);
        assert_ne!(now, last, "replica {i} did not rotate the refresh token");
        last = now;
    }
    assert_eq!(count.load(Ordering::SeqCst) - before, 3);
    assert!(
        !Proxy::all_logs(&proxies).contains("invalid_grant"),
        "{}",
        Proxy::all_logs(&proxies)
    );
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
    let (token_url, count) = counted_refresh_url(Duration::from_secs(3), 1);
    let cfg = replica_config(&redis, &key, &token_url, "");
    consent(&write_config(dir.path(), &cfg));
    let stored = redis.cli(&["GET", "oxbridge:rt:delegated@example.test"]);
    let mut a = Proxy::start(&cfg);
    let b = Proxy::start(&cfg);
    let before = count.load(Ordering::SeqCst);
    let port_a = a.port(0);
    let victim = std::thread::spawn(move || delegated_login(port_a));
    wait_for_request(&count, before, || a.logs());
    assert_eq!(
        redis.cli(&["EXISTS", "oxbridge:lease:refresh:delegated@example.test"]),
        "1"
    );
    a.signal("KILL");
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
    let reply = delegated_login(b.port(0));
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
    let logs = || Proxy::all_logs(&proxies);
    for p in &proxies {
        let r = scanner_login(p.port(0));
        assert!(r.starts_with("a OK"), "{r}\n{}", logs());
    }
    assert_eq!(redis.cli(&["EXISTS", "oxbridge:at:app"]), "1");
    // Sealed: no JWT (`eyJ...`) in clear.
    let sealed = redis.cli(&["GET", "oxbridge:at:app"]);
    assert!(sealed.len() > 100 && !sealed.contains("eyJ"), "{sealed}");

    redis.stop();
    // The cached app token keeps both replicas going.
    for p in &proxies {
        let t = Instant::now();
        let r = scanner_login(p.port(0));
        assert!(r.starts_with("a OK"), "{r}\n{}", logs());
        eprintln!("login with Redis down: {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        p.wait_log(&["Redis unavailable; limiting upstream sessions per replica"]);
    }
    // A token nobody has cached: this replica asks alone.
    let alice = up.password(ALICE);
    let r = imap_login(proxies[0].port(0), ALICE, &alice, Duration::ZERO);
    assert!(r.starts_with("a OK"), "{r}\n{}", logs());
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
        assert!(r.starts_with("a OK"), "{r}\n{}", logs());
        if redis.cli(&["EXISTS", "oxbridge:at:password:bob@example.test"]) == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not use Redis again\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The other replica finds bob's token in Redis (same password).
    let r = imap_login(proxies[0].port(0), BOB, &bob, Duration::ZERO);
    assert!(r.starts_with("a OK"), "{r}");
    proxies[0].wait_log(&["access token from Redis"]);
    assert!(!logs().contains("redis-pw-MARKER"));
}

/// Failed logins count over all replicas: failures on one replica lock the
/// account out on the other, even for the right password.
#[test]
fn failed_logins_lock_out_across_replicas() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let limits = "login_delay_ms = 10\nlogin_lockout_failures = 3\nlogin_lockout_s = 60";
    let cfg = replica_config(&redis, &key, upstream().token_url(), limits);
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
        let r = scanner_login(p.port(0));
        assert!(r.starts_with("a NO"), "{r}\n{}", Proxy::all_logs(&proxies));
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
    let (token_url, count) = counted_refresh_url(Duration::from_secs(12), 1);
    let cfg = replica_config(&redis, &key, &token_url, "");
    consent(&write_config(dir.path(), &cfg));
    let proxies: Vec<Proxy> = (0..2).map(|_| Proxy::start(&cfg)).collect();
    let logs = || Proxy::all_logs(&proxies);
    let before = count.load(Ordering::SeqCst);
    let replies: Vec<String> = std::thread::scope(|scope| {
        let first = scope.spawn(|| delegated_login(proxies[0].port(0)));
        wait_for_request(&count, before, String::new);
        let second = scope.spawn(|| delegated_login(proxies[1].port(0)));
        vec![first.join().unwrap(), second.join().unwrap()]
    });
    assert!(
        replies.iter().all(|r| r.starts_with("a OK")),
        "{replies:?}\n{}",
        logs()
    );
    // Replica 0's timed-out attempt and its retry; nothing from replica 1.
    assert!(
        !proxies[1].logs().contains("access token obtained"),
        "{}",
        logs()
    );
    proxies[1].wait_log(&["access token from Redis"]);
    assert_eq!(count.load(Ordering::SeqCst) - before, 2, "{}", logs());
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
    let r = scanner_login(proxy.port(0));
    assert!(r.starts_with("a OK"), "{r}\n{}", proxy.logs());
    assert_eq!(redis.cli(&["EXISTS", "oxbridge:at:app"]), "1");
    proxy.wait_log(&["connected to the Redis store"]);
    assert!(!proxy.logs().contains("tls-pw-MARKER"));

    // A Redis whose certificate is not trusted is not used.
    let untrusted = Proxy::start(&cfg);
    let r = scanner_login(untrusted.port(0));
    assert!(r.starts_with("a OK"), "{r}\n{}", untrusted.logs());
    untrusted.wait_log(&["Redis unavailable"]);
    assert!(!untrusted.logs().contains("connected to the Redis store"));
}

/// Three replicas keeping one account's refresh token alive every 2 s,
/// against an IDP whose refresh tokens die after 6 s unused: one refresh
/// per period in all (the keepalive lease), not one per replica, and the
/// token still works through each replica at the end.
#[test]
fn three_replicas_keep_a_refresh_token_alive_with_one_refresh_per_period() {
    const PERIOD_S: usize = 2;
    const RUN_S: usize = 16;
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let (token_url, count) = counted_refresh_url(Duration::ZERO, 0);
    let idle_url = token_url.replacen("/common/", "/idle-6/", 1);
    assert_ne!(idle_url, token_url);
    let cfg = replica_config(&redis, &key, &idle_url, "").replacen(
        "[oauth]\n",
        &format!("[oauth]\nrefresh_keepalive_s = {PERIOD_S}\n"),
        1,
    );
    consent(&write_config(dir.path(), &cfg));
    let before = count.load(Ordering::SeqCst);
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&cfg)).collect();
    std::thread::sleep(Duration::from_secs(RUN_S as u64));
    let made = count.load(Ordering::SeqCst) - before;
    // One per period makes 8 in 16 s (a little fewer: a period starts when
    // the lease ends and a replica next looks); each replica on its own
    // would make 24.
    let per_period = RUN_S / PERIOD_S;
    assert!(
        (per_period - 3..=per_period + 1).contains(&made),
        "{made} refreshes in {RUN_S} s\n{}",
        Proxy::all_logs(&proxies)
    );
    for (i, p) in proxies.iter().enumerate() {
        redis.cli(&["DEL", "oxbridge:at:refresh:delegated@example.test"]);
        let reply = delegated_login(p.port(0));
        assert!(
            reply.starts_with("a OK"),
            "replica {i}: {reply}\n{}",
            Proxy::all_logs(&proxies)
        );
    }
    let logs = Proxy::all_logs(&proxies);
    assert!(!logs.contains("invalid_grant"), "{logs}");
    assert!(logs.contains("refresh token kept alive"), "{logs}");
}

/// Slots expire by Redis's clock, not by each replica's. A replica whose
/// clock runs ten minutes ahead must not take the slot another replica
/// holds (to it, every other replica's slot looks long expired), and the
/// slot of a replica ten minutes behind must not look expired to the
/// others: either way the mailbox limit of one holds, measured at the
/// upstream.
#[test]
fn replicas_whose_clocks_are_off_keep_the_mailbox_limit() {
    let up = upstream();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let forwarder = Forwarder::start(&up.loopback("imap"), None);
    let limits = "imap_sessions_per_mailbox = 1\nimap_mailbox_wait_s = 2";
    let cfg = reroute(
        &replica_config(&redis, &key, up.token_url(), limits),
        "imap",
        &format!("localhost:{}", forwarder.addr.port()),
    );
    let skewed = |offset: &str| {
        let env = skewed_clock(offset);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Proxy::start_with_env(&cfg, &env)
    };
    let on_time = Proxy::start(&cfg);
    let ahead = skewed("+10m");
    let behind = skewed("-10m");
    // The skew is real: each replica's own log lines are stamped off.
    let stamp = |p: &Proxy| -> std::time::SystemTime {
        let line = p.wait_log(&["\"timestamp\""]);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        humantime::parse_rfc3339_weak(v["timestamp"].as_str().unwrap().trim_end_matches('Z'))
            .unwrap()
    };
    for (early, late) in [(&on_time, &ahead), (&behind, &on_time)] {
        let skew = stamp(late).duration_since(stamp(early)).unwrap_or_default();
        assert!(
            skew > Duration::from_secs(500),
            "clock not skewed: {skew:?}"
        );
    }

    for (name, holder, other) in [("ahead", &on_time, &ahead), ("behind", &behind, &on_time)] {
        // `holder` holds the mailbox's only slot ...
        let mut held = Raw::connect(holder.port(0));
        assert!(held.line().starts_with("* OK"));
        let r = held.imap_login("scanner@example.test", SCANNER_PASSWORD);
        assert!(
            r.lines().last().unwrap_or("").starts_with("a OK"),
            "{name}: {r}"
        );
        // ... so `other` waits its 2 s and turns the device away.
        let r = imap_login(
            other.port(0),
            "scanner@example.test",
            SCANNER_PASSWORD,
            Duration::ZERO,
        );
        let at_once = forwarder.max.load(Ordering::SeqCst);
        assert!(
            r.starts_with("a NO"),
            "{name}: a held slot was taken ({at_once} upstream sessions at once): {r}\n{}\n{}",
            holder.logs(),
            other.logs()
        );
        assert_eq!(at_once, 1, "{name}");
        held.send("b LOGOUT");
        held.until("b ");
        // Once it is free, `other` takes it.
        let r = imap_login(
            other.port(0),
            "scanner@example.test",
            SCANNER_PASSWORD,
            Duration::ZERO,
        );
        assert!(r.starts_with("a OK"), "{name}: {r}");
    }
}

/// Redis restarted between two logins: the next login's first use of the
/// store (the throttle, the mailbox's slot) goes to the new Redis at once,
/// not to the connection the old one closed; nothing falls back to this
/// replica alone.
#[test]
fn a_redis_restart_costs_no_store_operation() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let cfg = replica_config(&redis, &key, upstream().token_url(), "");
    let proxy = Proxy::start(&cfg);
    let logs = || proxy.logs();
    let r = scanner_login(proxy.port(0));
    assert!(r.starts_with("a OK"), "{r}\n{}", logs());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.cli(&["KEYS", "oxbridge:slots:*"]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the slot was not released\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    redis.stop();
    redis.restart();
    let mut c = Raw::connect(proxy.port(0));
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let reply = c.imap_login("scanner@example.test", SCANNER_PASSWORD);
    assert!(
        reply.lines().last().unwrap_or("").starts_with("a OK"),
        "{reply}"
    );
    let slots = redis.cli(&["KEYS", "oxbridge:slots:*"]);
    c.send("b LOGOUT");
    c.until("b ");
    assert!(
        slots.contains("oxbridge:slots:imap:"),
        "no slot in Redis: {slots:?}\n{}",
        logs()
    );
    let text = logs();
    assert!(!text.contains("Redis unavailable"), "{text}");
    assert!(!text.contains("broken pipe"), "{text}");
}

/// The store sends a command again when its connection closed under it,
/// and the first one may have run (only its reply was lost): taking a
/// slot or the refresh lease twice with one request's arguments answers
/// "taken" both times and holds one slot, so that a lost reply leaves
/// neither an orphaned slot nor a lease its owner thinks is another's.
#[test]
fn a_slot_or_lease_request_sent_twice_takes_one() {
    const NOW: &str = include_str!("../../src/state/redis/now.lua");
    const ACQUIRE: &str = include_str!("../../src/state/redis/acquire_slot.lua");
    const TAKE_LEASE: &str = include_str!("../../src/state/redis/take_lease.lua");
    let redis = Redis::start();
    let acquire = format!("{NOW}{ACQUIRE}");
    let slot = |member: &str| redis.cli(&["EVAL", &acquire, "1", "slots", "30000", "2", member]);
    assert_eq!(slot("r1:a"), "1");
    assert_eq!(slot("r1:a"), "1", "the same request again");
    assert_eq!(redis.cli(&["ZCARD", "slots"]), "1");
    assert_eq!(slot("r1:b"), "1");
    assert_eq!(slot("r1:c"), "0", "the limit of 2 holds");
    assert_eq!(slot("r1:b"), "1");
    assert_eq!(redis.cli(&["ZCARD", "slots"]), "2");
    let lease = |fence: &str| redis.cli(&["EVAL", TAKE_LEASE, "1", "lease", fence, "10000"]);
    assert_eq!(lease("r1:f1"), "1");
    assert_eq!(lease("r1:f1"), "1", "the same request again");
    assert_eq!(lease("r2:f2"), "0", "another replica's");
    assert_eq!(redis.cli(&["GET", "lease"]), "r1:f1");
}
