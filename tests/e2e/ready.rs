//! Readiness keeps mail flowing: with the token endpoint down, `/readyz`
//! still answers 200, so the shipped HAProxy recipe
//! (`deploy/haproxy/haproxy.cfg`, run by Debian's `haproxy` with only its
//! addresses and ports changed to the test's) keeps the replica in
//! rotation and a device gets `250` from a spooling listener through it.
//! The outage is a health fact: `/healthz`'s detail, the metrics and the
//! status page name it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// How long HAProxy may take to say where its health checks stand: the
/// recipe checks every 5 s and takes a server out after 2 failures.
const CHECKS_SETTLE: Duration = Duration::from_secs(12);

/// HAProxy running the shipped recipe; stopped when dropped.
struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
    front: u16,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped recipe with its SMTP part pointed at one oxbridge: the
/// replica's listener at `smtp`, its admin endpoint (the health check)
/// at `admin`, the front on `front`, and a stats socket at `stats` so the
/// test can read the health checks' verdict; `maxconn` fits a test
/// machine. The rest of the global settings, the defaults, the backend's
/// balance and health-check lines stay the recipe's own.
fn adapted_recipe(smtp: u16, admin: u16, front: u16, stats: &Path) -> String {
    let recipe = std::fs::read_to_string(repo().join("deploy/haproxy/haproxy.cfg"))
        .expect("deploy/haproxy/haproxy.cfg");
    let mut out = String::new();
    let mut keep = false;
    let mut server_done = false;
    for line in recipe.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            keep = matches!(
                line.trim(),
                "global" | "defaults" | "backend oxbridge_smtp" | "frontend smtp_submission"
            );
            if keep {
                out.push_str(line);
                out.push('\n');
                if line.trim() == "global" {
                    out.push_str(&format!(
                        "    stats socket {} level admin\n",
                        stats.display()
                    ));
                }
            }
            continue;
        }
        if !keep {
            continue;
        }
        let t = line.trim();
        let adapted = if t.starts_with("server ") {
            if server_done {
                continue;
            }
            server_done = true;
            format!("    server ox1 127.0.0.1:{smtp}")
        } else if t.starts_with("maxconn ") {
            // Sizing, not health: the recipe's 20000 needs 40000 file
            // descriptors, more than a test machine may allow.
            "    maxconn 1000".to_string()
        } else if t.starts_with("bind ") {
            format!("    bind 127.0.0.1:{front}")
        } else if t.starts_with("default-server ") {
            assert!(t.contains("check port 9090"), "the recipe's check: {t}");
            line.replace("check port 9090", &format!("check port {admin}"))
        } else {
            line.to_string()
        };
        out.push_str(&adapted);
        out.push('\n');
    }
    for must in [
        "option httpchk GET /readyz",
        "send-proxy-v2",
        "inter 5s fall 2 rise 2",
    ] {
        assert!(out.contains(must), "the recipe lost {must:?}:\n{out}");
    }
    out
}

impl Haproxy {
    fn start(smtp: u16, admin: u16) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let front = free_port();
        let cfg = adapted_recipe(smtp, admin, front, &dir.path().join("stats.sock"));
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let checked = run(
            Command::new("haproxy").arg("-c").arg("-f").arg(&path),
            Duration::from_secs(20),
        );
        assert!(checked.status.success(), "{cfg}\n{}", text(&checked));
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let haproxy = Haproxy { child, dir, front };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", front)).is_err() {
            assert!(Instant::now() < deadline, "haproxy: {}", haproxy.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        haproxy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    fn stats_socket(&self) -> PathBuf {
        self.dir.path().join("stats.sock")
    }

    /// The replica's (`ox1`) server `status` and `check_status` from
    /// HAProxy's `show stat`.
    fn server_state(&self) -> (String, String) {
        let out = run(
            Command::new("python3")
                .arg("-c")
                .arg(STATS_CLIENT)
                .arg(self.stats_socket()),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "show stat: {}", text(&out));
        let csv = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
        let row: Vec<&str> = lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|r| r.first() == Some(&"oxbridge_smtp") && r.get(1) == Some(&"ox1"))
            .unwrap_or_else(|| panic!("no ox1 in:\n{csv}"));
        // "* L7OK": that check is under way; its last result is the rest.
        (
            row[col("status")].to_string(),
            row[col("check_status")]
                .trim_start_matches("* ")
                .to_string(),
        )
    }
}

/// Reads HAProxy's `show stat` from the stats socket given as argv[1].
const STATS_CLIENT: &str = "import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b'show stat\\n')
data = b''
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
sys.stdout.write(data.decode())
";

/// A spooling SMTP listener behind HAProxy (PROXY v2 from loopback only),
/// with its token endpoint at a port where nothing listens.
fn token_endpoint_down(state: &Path) -> String {
    let listener = listener("smtp", "none", true)
        + "delivery = \"spool\"\nproxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n";
    let cfg = config(
        &listener,
        &format!("{ADMIN}\n[spool]\nretry_min_s = 1\nretry_max_s = 2\n"),
    );
    let cfg = with_token_url(&cfg, &format!("http://127.0.0.1:{}/token", closed_port()));
    with_state_dir(&cfg, state)
}

/// Poll `path` on the admin endpoint until its body contains `needle`.
fn wait_admin(admin: std::net::SocketAddr, path: &str, needle: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = curl(admin, path);
        if body.contains(needle) || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn token_endpoint_down_keeps_the_replica_ready_and_mail_flowing_through_haproxy() {
    let state = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&token_endpoint_down(state.path()));
    let admin = proxy.admin_addr();

    let (status, body) = curl(admin, "/readyz");
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "{}",
        proxy.logs()
    );

    // HAProxy's own health checks (the recipe's, on /readyz) keep it in.
    let haproxy = Haproxy::start(proxy.port(0), admin.port());
    let started = Instant::now();
    let (state_now, check) = loop {
        let (s, c) = haproxy.server_state();
        if (started.elapsed() >= CHECKS_SETTLE && !c.is_empty() && c != "INI")
            || started.elapsed() > CHECKS_SETTLE * 2
        {
            break (s, c);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        (state_now.as_str(), check.as_str()),
        ("UP", "L7OK"),
        "haproxy:\n{}",
        haproxy.log()
    );

    // A device's mail through HAProxy: 250, queued.
    let dir = tempfile::tempdir().unwrap();
    let m = Message::write(dir.path(), "ready-haproxy", ALICE, 0);
    let out = Smtp::scanner(haproxy.front).swaks(&m.path);
    let said = text(&out);
    assert!(
        out.status.success() && said.contains("250 2.0.0 Ok: queued as "),
        "{said}\nhaproxy:\n{}\n{}",
        haproxy.log(),
        proxy.logs()
    );

    // The outage is a health fact: /healthz (still 200, first line ok)...
    let (status, health) = wait_admin(admin, "/healthz", "token endpoint: unreachable since ");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health.lines().next(), Some("ok"), "{health}");
    let line = health
        .lines()
        .find(|l| l.starts_with("token endpoint: unreachable since "))
        .unwrap_or_else(|| panic!("no token endpoint line in:\n{health}\n{}", proxy.logs()));
    assert!(line.contains("Z (last error: "), "{line}");
    // ... the metric ...
    assert_eq!(
        scrape(admin).get("oxbridge_token_endpoint_reachable"),
        Some(&0.0)
    );
    // ... and the status page.
    let (status, page) = wait_admin(admin, "/", "token endpoint unreachable since ");
    assert_eq!(status, 200);
    assert!(
        page.contains("token endpoint unreachable since "),
        "the page does not name the outage:\n{page}"
    );
    // Still ready, and still in HAProxy's rotation.
    assert_eq!(curl(admin, "/readyz").0, 200);
    assert_eq!(haproxy.server_state().0, "UP", "{}", haproxy.log());
}

/// Poll `path` until it answers `status`.
fn wait_status(admin: std::net::SocketAddr, path: &str, status: u16) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = curl(admin, path);
        if got.0 == status || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn readyz_follows_the_redis_store_and_never_shows_its_password() {
    let password = "ready-redis-secret-5f1c";
    let mut redis = Redis::start_with(Some(password), false);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("store.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let store = format!(
        "{ADMIN}\n[store]\nbackend = \"redis\"\nurl = \"{}\"\nkey_file = \"{}\"\n",
        redis.url(),
        key.display()
    );
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), &store));
    let admin = proxy.admin_addr();
    assert_eq!(curl(admin, "/readyz"), (200, "ready\n".to_string()));
    let (_, health) = curl(admin, "/healthz");
    assert!(
        health.contains("\nstore: redis reachable since "),
        "{health}"
    );

    // Redis stopped: this replica cannot share tokens and limits, so it
    // takes no devices; it is still alive.
    redis.stop();
    let (status, body) = wait_status(admin, "/readyz", 503);
    assert_eq!(status, 503, "{body}\n{}", proxy.logs());
    assert!(
        body.starts_with("not ready: the Redis store does not answer ("),
        "{body}"
    );
    let (status, health) = curl(admin, "/healthz");
    assert_eq!(status, 200, "{health}");
    assert!(health.starts_with("ok\n"), "{health}");
    assert!(
        health.contains("\nstore: redis unreachable since "),
        "{health}"
    );
    for text in [&body, &health] {
        assert!(!text.contains(password), "{text}");
    }

    // Back: ready again.
    redis.restart();
    let (status, body) = wait_status(admin, "/readyz", 200);
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "{}",
        proxy.logs()
    );
}

/// A liveness probe gives up after a second (Kubernetes' default): while
/// Redis hangs, `/healthz` must still answer at once, or every replica
/// would be restarted for an outage a restart does not cure.
#[test]
fn healthz_answers_at_once_while_redis_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("store.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let store = format!(
        "{ADMIN}\n[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{}/\"\nkey_file = \"{}\"\n",
        blackhole(),
        key.display()
    );
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), &store));
    let admin = proxy.admin_addr();
    for _ in 0..3 {
        let started = Instant::now();
        let (status, health) = curl(admin, "/healthz");
        let took = started.elapsed();
        assert_eq!(status, 200, "{health}");
        assert!(
            took < Duration::from_millis(500),
            "/healthz took {took:?}:\n{health}"
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    let (status, health) = curl(admin, "/healthz");
    assert!(
        status == 200 && health.contains("\nstore: redis unreachable since "),
        "{health}"
    );
    let started = Instant::now();
    let (status, body) = curl(admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(3), "{body}");
}
