//! oxbridge itself: a `run` process started with a generated config, whose
//! JSON log lines are collected (and waited for), and one-shot subcommands
//! (`check`, `login`, `healthcheck`) run against a config file.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{run, CLIENT_LIMIT};

/// How long oxbridge may take to listen, or to write an awaited log line.
const START_LIMIT: Duration = Duration::from_secs(20);
const LOG_LIMIT: Duration = Duration::from_secs(15);
/// How long a drain after SIGTERM may take.
const TERM_LIMIT: Duration = Duration::from_secs(40);

/// A running oxbridge process; its log lines (JSON) are collected.
pub struct Proxy {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    pub addrs: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Proxy::start_with_env(config, &[])
    }

    /// Start with extra environment variables (RUST_LOG=trace, say).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oxbridge.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn oxbridge");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let want = config.matches("[[listener]]").count();
        let deadline = Instant::now() + START_LIMIT;
        let addrs = loop {
            let found: Vec<SocketAddr> = logs
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["message"] == "listening")
                .filter_map(|v| v["address"].as_str().and_then(|a| a.parse().ok()))
                .collect();
            if found.len() == want {
                break found;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "oxbridge exited with {status}:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "oxbridge did not listen:\n{}",
                logs.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Proxy {
            child,
            logs,
            addrs,
            dir,
        }
    }

    pub fn port(&self, i: usize) -> u16 {
        self.addrs[i].port()
    }

    /// The admin endpoint's address (from its "admin endpoint listening" line).
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_log(&["admin endpoint listening"]);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["address"].as_str().unwrap().parse().unwrap()
    }

    /// The config file the proxy runs with (rewrite it, then `signal("HUP")`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("oxbridge.toml")
    }

    pub fn signal(&self, sig: &str) {
        kill(self.child.id(), sig);
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The logs of several proxies (replicas), each under its number.
    pub fn all_logs(proxies: &[Proxy]) -> String {
        proxies
            .iter()
            .enumerate()
            .map(|(i, p)| format!("--- replica {i}\n{}", p.logs()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wait until a log line contains every one of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + LOG_LIMIT;
        loop {
            if let Some(l) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the proxy process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory of the proxy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + TERM_LIMIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "oxbridge ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// `oxbridge ARGS --config CONFIG` (check, login, healthcheck), run to its end.
pub fn oxbridge(args: &[&str], config: &Path) -> Output {
    run(
        Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .args(args)
            .arg("--config")
            .arg(config),
        CLIENT_LIMIT,
    )
}

/// Write `cfg` as `oxbridge.toml` in `dir`; returns its path.
pub fn write_config(dir: &Path, cfg: &str) -> PathBuf {
    let path = dir.join("oxbridge.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// The refresh token stored under `key` in the `state_dir` of the config
/// at `cfg_path` (an `[[account]]` login; `NAME:login` for a
/// `[[provider]]`'s), as `oxbridge login` stored it.
pub fn stored_refresh(cfg_path: &Path, key: &str) -> Option<String> {
    use secrecy::ExposeSecret;
    let config = oxbridge::config::Config::load(cfg_path).unwrap();
    oxbridge::open_store(&config)
        .unwrap()
        .load(key)
        .unwrap()
        .map(|t| t.expose_secret().to_string())
}
