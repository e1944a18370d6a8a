//! Shared pieces of the benchmark tools: TLS configs from PEM files, a
//! buffered connection with line and bulk reads, SASL strings, test
//! messages, and readings from /proc.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)?;
    rustls_pemfile::certs(&mut pem.as_slice()).collect()
}

pub fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())?
        .ok_or_else(|| io::Error::other(format!("no private key in {}", path.display())))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client that trusts only the CA certificates in `ca`.
pub fn client_config(ca: &Path) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(io::Error::other)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

pub fn server_config(cert: &Path, key: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(io::Error::other)?;
    Ok(Arc::new(cfg))
}

/// A TCP stream whose reads go through a buffer of its own: one `recv` of
/// up to the buffer's size, then served from memory. rustls reads at most
/// 4 KiB per `read_tls`, so under TLS this turns four or more `recv` calls
/// per 16 KiB record into one per buffer.
pub struct BufTcp {
    pub tcp: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl BufTcp {
    pub fn new(tcp: TcpStream, cap: usize) -> Self {
        BufTcp {
            tcp,
            buf: vec![0u8; cap].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }
}

impl AsyncRead for BufTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos == me.end {
            let mut rb = ReadBuf::new(&mut me.buf);
            match Pin::new(&mut me.tcp).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    me.pos = 0;
                    me.end = rb.filled().len();
                }
                other => return other,
            }
        }
        let n = (me.end - me.pos).min(out.remaining());
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for BufTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A client connection, plain or TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS over a buffered reader (see [`BufTcp`]).
    TlsBuf(Box<tokio_rustls::client::TlsStream<BufTcp>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::TlsBuf(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::TlsBuf(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::TlsBuf(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::TlsBuf(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A stream with a read buffer: lines, counted skips, scans for an end marker.
pub struct Conn<S> {
    pub io: S,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S, cap: usize) -> Self {
        Conn {
            io,
            buf: vec![0u8; cap].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    pub fn buffered(&self) -> usize {
        self.end - self.pos
    }

    pub fn into_io(self) -> S {
        self.io
    }

    /// Read more bytes after what is buffered (moving it to the front if needed).
    async fn fill(&mut self) -> io::Result<()> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            if self.end == self.buf.len() {
                return Err(io::Error::other("line longer than the read buffer"));
            }
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(eof());
        }
        self.end += n;
        Ok(())
    }

    /// One line, CRLF included.
    pub async fn line(&mut self) -> io::Result<Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.pos + scanned..self.end]) {
                let stop = self.pos + scanned + i + 1;
                let line = self.buf[self.pos..stop].to_vec();
                self.pos = stop;
                return Ok(line);
            }
            scanned = self.end - self.pos;
            self.fill().await?;
        }
    }

    /// Consume exactly `n` bytes.
    pub async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let avail = self.end - self.pos;
            if avail >= n {
                self.pos += n;
                return Ok(());
            }
            n -= avail;
            self.pos = self.end;
            self.fill().await?;
        }
    }

    /// Exactly `n` bytes.
    pub async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.pos == self.end {
                self.fill().await?;
            }
            let k = (n - out.len()).min(self.end - self.pos);
            out.extend_from_slice(&self.buf[self.pos..self.pos + k]);
            self.pos += k;
        }
        Ok(out)
    }

    /// Consume everything through the first `pat`; returns the bytes consumed.
    pub async fn skip_through(&mut self, pat: &[u8]) -> io::Result<u64> {
        let finder = memchr::memmem::Finder::new(pat);
        let mut total = 0u64;
        loop {
            let hay = &self.buf[self.pos..self.end];
            if let Some(i) = finder.find(hay) {
                let n = i + pat.len();
                self.pos += n;
                return Ok(total + n as u64);
            }
            // keep a possible partial match at the end
            let keep = hay.len().min(pat.len() - 1);
            let drop = hay.len() - keep;
            self.pos += drop;
            total += drop as u64;
            self.fill().await?;
        }
    }

    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    /// An SMTP reply: all its lines; returns (code, last line).
    pub async fn smtp_reply(&mut self) -> io::Result<(u16, Vec<u8>)> {
        loop {
            let l = self.line().await?;
            if l.len() < 4 {
                return Err(io::Error::other(format!("bad SMTP reply {}", show(&l))));
            }
            if l[3] != b'-' {
                let code = std::str::from_utf8(&l[..3])
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| io::Error::other(format!("bad SMTP reply {}", show(&l))))?;
                return Ok((code, l));
            }
        }
    }
}

/// A line for error messages.
pub fn show(l: &[u8]) -> String {
    let s = String::from_utf8_lossy(l);
    let s = s.trim_end();
    if s.len() > 160 {
        format!("{}...", &s[..160])
    } else {
        s.to_string()
    }
}

/// SASL XOAUTH2 initial response, base64.
pub fn xoauth2(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// (user, token) of a base64 XOAUTH2 initial response.
pub fn parse_xoauth2(b64: &[u8]) -> Option<(String, String)> {
    let raw = B64.decode(b64.trim_ascii()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let mut user = None;
    let mut token = None;
    for part in s.split('\x01') {
        if let Some(u) = part.strip_prefix("user=") {
            user = Some(u.to_string());
        } else if let Some(a) = part.strip_prefix("auth=") {
            let t = a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer "))?;
            token = Some(t.to_string());
        }
    }
    Some((user?, token?))
}

/// SASL PLAIN initial response, base64.
pub fn plain(user: &str, pass: &str) -> String {
    B64.encode(format!("\0{user}\0{pass}"))
}

/// A mail message of exactly `size` bytes: headers, then 78-byte CRLF lines
/// of base64-looking text (no line starts with a dot, so it needs no
/// dot-stuffing). Ends with CRLF.
pub fn make_message(size: usize, subject: &str) -> Vec<u8> {
    let head = format!(
        "From: alice@example.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\
         Message-ID: <bench-{size}@example.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    );
    let mut m = Vec::with_capacity(size);
    m.extend_from_slice(head.as_bytes());
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u32 = 0x9e37_79b9;
    let mut line = |m: &mut Vec<u8>, n: usize| {
        // n bytes: n - 2 characters, then CRLF
        for _ in 0..n - 2 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            m.push(alphabet[(x >> 26) as usize]);
        }
        m.extend_from_slice(b"\r\n");
    };
    while m.len() < size {
        let left = size - m.len();
        if left > 2 * 78 {
            line(&mut m, 78);
        } else if left > 78 {
            // the last two lines share what is left, so neither is too short
            line(&mut m, left / 2);
        } else {
            line(&mut m, left.max(2));
        }
    }
    m.truncate(size);
    m
}

/// utime + stime of a process, in seconds (from /proc/PID/stat).
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name, which is in parentheses
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) as f64 / tck.max(1) as f64)
}

/// On-CPU time of all threads of a process, in seconds, from each
/// thread's /proc/PID/task/TID/schedstat (nanoseconds; finer than ticks).
pub fn proc_sched_s(pid: u32) -> Option<f64> {
    let mut ns: u64 = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let p = e.ok()?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(ns as f64 / 1e9)
}

/// VmRSS of a process in KiB.
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Open file descriptors of a process.
pub fn proc_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_size_and_no_dot_lines() {
        for size in (400..800).chain([10 * 1024 * 1024, 25_000_000]) {
            let m = make_message(size, "t");
            assert_eq!(m.len(), size);
            assert!(m.ends_with(b"\r\n"));
            assert!(memchr::memmem::find(&m, b"\r\n.").is_none());
        }
    }

    #[test]
    fn xoauth2_round_trip() {
        let s = xoauth2("a@b", "tok");
        assert_eq!(parse_xoauth2(s.as_bytes()), Some(("a@b".into(), "tok".into())));
    }
}
