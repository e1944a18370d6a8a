//! A `redis-server` of a test's own, for replicas that share one store: a
//! free loopback port, its own directory, no persistence, optionally a
//! password and TLS (with the test upstream's certificate). Killed on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::upstream;

/// How long redis-server may take to answer PING.
const START_LIMIT: Duration = Duration::from_secs(10);

pub struct Redis {
    port: u16,
    password: Option<String>,
    /// TLS only (the test upstream's certificate for `localhost`).
    tls: bool,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None, false)
    }

    /// With `requirepass` (AUTH in the URL), and/or TLS only.
    pub fn start_with(password: Option<&str>, tls: bool) -> Redis {
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
    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        if self.tls {
            let dir = upstream().dir();
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
        let deadline = Instant::now() + START_LIMIT;
        while self.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        let (scheme, host) = match self.tls {
            true => ("rediss", "localhost"),
            false => ("redis", "127.0.0.1"),
        };
        match &self.password {
            Some(pw) => format!("{scheme}://:{pw}@{host}:{}/0", self.port),
            None => format!("{scheme}://{host}:{}/", self.port),
        }
    }

    /// `redis-cli ARGS` against this server; its trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> String {
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

/// Where Debian's `libfaketime` puts its library (`apt install libfaketime`).
const LIBFAKETIME: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

/// The environment that runs a process with its wall clock `offset` away
/// from the machine's (libfaketime's syntax: `+10m`, `-1h`): a replica on a
/// host whose clock is off.
pub fn skewed_clock(offset: &str) -> Vec<(&'static str, String)> {
    let lib = LIBFAKETIME
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libfaketime (apt install libfaketime)");
    vec![("LD_PRELOAD", lib.to_string()), ("FAKETIME", offset.into())]
}
