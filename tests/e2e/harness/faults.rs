//! Fault injection between oxbridge and what it talks to: TCP forwarders
//! that count connections and cut them (after so many bytes, or at
//! random), token endpoints that count, hold back or fail requests, a
//! server that never answers, and a port where nothing listens.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::spawn;
use std::time::{Duration, Instant};

use super::upstream;

/// Copy `from` to `to` until either ends, or until more than `limit`
/// bytes would have gone (then: true, cut). `each` sees every chunk
/// before it is written.
fn pump(
    from: &mut TcpStream,
    to: &mut TcpStream,
    limit: Option<usize>,
    mut each: impl FnMut(&[u8]),
) -> bool {
    let mut buf = [0u8; 16384];
    let mut sent = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if limit.is_some_and(|limit| sent + n > limit) {
            return true;
        }
        each(&buf[..n]);
        sent += n;
        if to.write_all(&buf[..n]).is_err() {
            return false;
        }
    }
}

/// Accept connections on `l` and hand each, with a new connection to
/// `target`, to `forward`; a client whose server cannot be reached is dropped.
fn serve(l: TcpListener, target: String, forward: impl Fn(TcpStream, TcpStream) + Send + 'static) {
    spawn(move || {
        for client in l.incoming().flatten() {
            if let Ok(server) = TcpStream::connect(&target) {
                forward(client, server);
            }
        }
    });
}

fn both(s: &TcpStream) -> (TcpStream, TcpStream) {
    (s.try_clone().unwrap(), s.try_clone().unwrap())
}

/// A TCP forwarder to `target` the test controls: it counts open and peak
/// connections, and can cut every connection once `cut_after` bytes went
/// from client to server (a mail server that dies mid-DATA), or once
/// `cut_down_after` bytes came back (one that dies mid-FETCH).
pub struct Forwarder {
    pub addr: SocketAddr,
    pub open: Arc<AtomicUsize>,
    pub max: Arc<AtomicUsize>,
}

impl Forwarder {
    pub fn start(target: &str, cut_after: Option<usize>) -> Forwarder {
        Forwarder::start_cutting(target, cut_after, None)
    }

    pub fn start_cutting(
        target: &str,
        cut_after: Option<usize>,
        cut_down_after: Option<usize>,
    ) -> Forwarder {
        Forwarder::start_on("127.0.0.1:0", target, cut_after, cut_down_after)
    }

    /// A forwarder listening on `bind` (another loopback address, say).
    pub fn start_on(
        bind: &str,
        target: &str,
        cut_after: Option<usize>,
        cut_down_after: Option<usize>,
    ) -> Forwarder {
        let l = TcpListener::bind(bind).unwrap();
        let addr = l.local_addr().unwrap();
        let (open, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, m) = (open.clone(), max.clone());
        serve(l, target.to_string(), move |client, server| {
            forward_counted(client, server, &o, &m, cut_after, cut_down_after)
        });
        Forwarder { addr, open, max }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Wait until no connection is open through the forwarder.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.open() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// Forward one connection both ways, counting it open in `open` (and the
/// peak in `max`), cutting it after so many bytes either way.
fn forward_counted(
    client: TcpStream,
    server: TcpStream,
    open: &Arc<AtomicUsize>,
    max: &Arc<AtomicUsize>,
    cut_after: Option<usize>,
    cut_down_after: Option<usize>,
) {
    // The proxy closes a session before it opens the next one, but the
    // threads below notice that close a moment later: give them that
    // moment before counting the newcomer. (A session that really
    // overlaps lives far longer than this.)
    std::thread::sleep(Duration::from_millis(50));
    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
    max.fetch_max(now, Ordering::SeqCst);
    let ((mut c_read, mut c_write), (mut s_read, mut s_write)) = (both(&client), both(&server));
    // Counted closed at the first end of either side, before anyone can
    // learn of it (and open the next connection).
    let done = Arc::new(AtomicBool::new(false));
    let close = {
        let o = open.clone();
        move || {
            if !done.swap(true, Ordering::SeqCst) {
                o.fetch_sub(1, Ordering::SeqCst);
            }
        }
    };
    let close_too = close.clone();
    spawn(move || {
        pump(&mut c_read, &mut s_write, cut_after, |_| {});
        // Cut both ways at once.
        close();
        let _ = server.shutdown(Shutdown::Both);
        let _ = client.shutdown(Shutdown::Both);
    });
    spawn(move || {
        if pump(&mut s_read, &mut c_write, cut_down_after, |_| {}) {
            let _ = s_read.shutdown(Shutdown::Both);
        }
        close_too();
        let _ = c_write.shutdown(Shutdown::Both);
    });
}

/// A server that is down, then started: a counting forwarder to `target`
/// whose port refuses connections until [`Outage::up`], as a stopped
/// Postfix's would.
pub struct Outage {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
}

impl Outage {
    /// Down at first.
    pub fn start(target: &str) -> Outage {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let up = Arc::new(AtomicBool::new(false));
        let (open, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (u, o, m, target) = (up.clone(), open.clone(), max.clone(), target.to_string());
        spawn(move || {
            let mut listener: Option<TcpListener> = None;
            let mut sessions: Vec<TcpStream> = Vec::new();
            loop {
                if !u.load(Ordering::SeqCst) {
                    listener = None;
                    for s in sessions.drain(..) {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let l = match &listener {
                    Some(l) => l,
                    None => match TcpListener::bind(addr) {
                        Ok(l) => {
                            l.set_nonblocking(true).unwrap();
                            listener.insert(l)
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                    },
                };
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        if let Ok(server) = TcpStream::connect(&target) {
                            sessions.push(client.try_clone().unwrap());
                            let (o, m) = (o.clone(), m.clone());
                            spawn(move || forward_counted(client, server, &o, &m, None, None));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Outage { addr, up, max }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Down again: every connection through it is cut (no goodbye, no TLS
    /// close_notify), and new ones are refused.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
    }

    /// The most connections that were open at once.
    pub fn peak(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

/// A forwarder to `target` that cuts about one connection in seven after
/// a random number of bytes towards the server (never after the server's
/// reply is on its way, so a cut cannot turn an accepted message into a
/// lost acknowledgement). Returns its port and how many it chose to cut.
pub fn chaos_forwarder(target: String, seed: u64) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cuts = Arc::new(AtomicUsize::new(0));
    let counted = cuts.clone();
    let rng = AtomicU64::new(seed);
    serve(l, target, move |client, server| {
        // xorshift, shared
        let mut x = rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        rng.store(x, Ordering::Relaxed);
        let cut_after = (x % 7 == 0).then_some((x >> 8) as usize % 6000);
        if cut_after.is_some() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        let ((mut c_read, mut c_write), (mut s_read, mut s_write)) = (both(&client), both(&server));
        spawn(move || {
            pump(&mut c_read, &mut s_write, cut_after, |_| {});
            let _ = server.shutdown(Shutdown::Both);
            let _ = client.shutdown(Shutdown::Both);
        });
        spawn(move || {
            let _ = std::io::copy(&mut s_read, &mut c_write);
            let _ = c_write.shutdown(Shutdown::Both);
        });
    });
    (port, cuts)
}

/// The test IDP's token endpoint: (host:port, path).
fn idp_token_endpoint() -> (String, String) {
    let url = upstream().token_url();
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    (authority.to_string(), path.to_string())
}

/// The IDP's token endpoint behind a forwarder that counts HTTP requests
/// (reads starting with "POST " or "GET ") and holds each one back by
/// `delay`, so that concurrent token requests would overlap. Returns the
/// token URL to configure and the count.
pub fn counted_token_url(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let (authority, path) = idp_token_endpoint();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    serve(l, authority, move |client, server| {
        let ((mut c_read, mut c_write), (mut s_read, mut s_write)) = (both(&client), both(&server));
        let seen = seen.clone();
        spawn(move || {
            pump(&mut c_read, &mut s_write, None, |chunk| {
                if chunk.starts_with(b"POST ") || chunk.starts_with(b"GET ") {
                    seen.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(delay);
                }
            });
            let _ = s_write.shutdown(Shutdown::Write);
        });
        spawn(move || {
            let _ = std::io::copy(&mut s_read, &mut c_write);
            let _ = c_write.shutdown(Shutdown::Write);
        });
    });
    (format!("http://{addr}/{path}"), count)
}

/// The IDP's token endpoint behind one that counts refresh requests (not
/// the other grants), holds the first `holds` of them for `hold`, and
/// forwards a request only if its client is still connected then (a
/// replica killed meanwhile never reaches the IDP, as with a crash before
/// the request left). Returns the token URL to configure and the count.
pub fn counted_refresh_url(hold: Duration, holds: usize) -> (String, Arc<AtomicUsize>) {
    let (authority, path) = idp_token_endpoint();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    spawn(move || {
        for mut client in l.incoming().flatten() {
            let (authority, seen) = (authority.clone(), seen.clone());
            spawn(move || {
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
                let _ = server.shutdown(Shutdown::Write);
                let mut answer = Vec::new();
                let _ = server.read_to_end(&mut answer);
                let _ = client.write_all(&answer);
            });
        }
    });
    (format!("http://{addr}/{path}"), count)
}

/// A TCP server that answers every HTTP request with `response` (a fault
/// injector for the token endpoint). Returns its URL.
pub fn http_responder(response: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    spawn(move || {
        for mut s in l.incoming().flatten() {
            spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
                let _ = s.write_all(response.as_bytes());
            });
        }
    });
    format!("http://{addr}/tenant/oauth2/v2.0/token")
}

/// A server that accepts connections and never says a word.
pub fn blackhole() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

/// A port with nothing listening on it.
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
