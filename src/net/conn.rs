//! [`Conn`]: a [`Stream`] with a read buffer and a bounded line reader,
//! and the TLS upgrade of either side (STARTTLS).
//!
//! Every read is bounded: a line longer than the limit is reported as
//! [`LineError::TooLong`] and the rest of it is skipped, never buffered.
//! Whatever was read past the last line stays in the buffer as the
//! *residual*, which the relay replays, and which STARTTLS discards.

use std::io;
use std::time::Duration;

use super::device_tls::{DeviceAcceptor, TlsInfo};
use bytes::{Buf, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use super::stream::Stream;

/// How much is read from the socket at a time while looking for a line.
const READ_CHUNK: usize = 8 * 1024;
/// How much of an over-long line is kept for its reply (an IMAP tag).
pub const LONG_LINE_HEAD: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    #[error("connection closed")]
    Closed,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The device sent something that ends the session (a stray PROXY header).
    #[error("{0}")]
    Unexpected(&'static str),
}

impl LineError {
    /// Why the session ends, for the session log line.
    pub fn reason(&self) -> &'static str {
        match self {
            LineError::TooLong(_) => "line too long",
            LineError::Closed => "device closed the connection",
            LineError::Timeout(_) => "idle timeout",
            LineError::Io(_) => "device connection failed",
            LineError::Unexpected(why) => why,
        }
    }
}

/// Where the next line ends in `buf`: `Some(n)` with `n` the length
/// including the LF; `None` when more bytes are needed.
pub fn find_line_end(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|b| *b == b'\n').map(|i| i + 1)
}

/// Strip one trailing LF and, before it, one CR.
pub fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A stream with a read buffer: reads bounded lines and exact byte counts.
pub struct Conn {
    stream: Stream,
    buf: BytesMut,
    /// Set after an over-long line: skip bytes up to the next LF.
    skipping: bool,
    /// The first bytes of the last over-long line ([`Conn::take_long_line_head`]).
    head: Vec<u8>,
}

impl Conn {
    pub fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            skipping: false,
            head: Vec::new(),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Read one line (without its CR LF) of at most `max` bytes, waiting at
    /// most `wait`. An over-long line yields `TooLong` once; the reader then
    /// skips to the end of that line on the next call.
    pub async fn read_line(&mut self, max: usize, wait: Duration) -> Result<Vec<u8>, LineError> {
        match tokio::time::timeout(wait, self.read_line_inner(max)).await {
            Ok(r) => r,
            Err(_) => Err(LineError::Timeout(wait)),
        }
    }

    async fn read_line_inner(&mut self, max: usize) -> Result<Vec<u8>, LineError> {
        loop {
            if self.skipping {
                match find_line_end(&self.buf) {
                    Some(n) => {
                        self.buf.advance(n);
                        self.skipping = false;
                    }
                    None => self.buf.clear(),
                }
            }
            if !self.skipping {
                if let Some(n) = find_line_end(&self.buf) {
                    if n > max + 2 {
                        self.keep_head();
                        self.buf.advance(n);
                        return Err(LineError::TooLong(max));
                    }
                    let line = self.buf.split_to(n);
                    return Ok(strip_eol(&line).to_vec());
                }
                if self.buf.len() > max + 1 {
                    self.keep_head();
                    self.buf.clear();
                    self.skipping = true;
                    return Err(LineError::TooLong(max));
                }
            }
            self.fill().await?;
        }
    }

    /// Keep the start of the over-long line at the front of the buffer.
    fn keep_head(&mut self) {
        self.head.clear();
        self.head
            .extend_from_slice(&self.buf[..self.buf.len().min(LONG_LINE_HEAD)]);
    }

    /// The first [`LONG_LINE_HEAD`] bytes of the last line reported as
    /// `TooLong`, once (they may hold a password: not kept after).
    pub fn take_long_line_head(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.head)
    }

    /// Read exactly `n` bytes (an IMAP literal, a BDAT chunk), waiting at most `wait`.
    pub async fn read_exact(&mut self, n: usize, wait: Duration) -> Result<Vec<u8>, LineError> {
        let fut = async {
            while self.buf.len() < n {
                self.fill().await?;
            }
            Ok(self.buf.split_to(n).to_vec())
        };
        match tokio::time::timeout(wait, fut).await {
            Ok(r) => r,
            Err(_) => Err(LineError::Timeout(wait)),
        }
    }

    /// Read and drop exactly `n` bytes without holding them all at once.
    pub async fn discard(&mut self, mut n: u64, wait: Duration) -> Result<(), LineError> {
        let fut = async {
            loop {
                let take = (self.buf.len() as u64).min(n) as usize;
                self.buf.advance(take);
                n -= take as u64;
                if n == 0 {
                    return Ok(());
                }
                self.fill().await?;
            }
        };
        match tokio::time::timeout(wait, fut).await {
            Ok(r) => r,
            Err(_) => Err(LineError::Timeout(wait)),
        }
    }

    async fn fill(&mut self) -> Result<(), LineError> {
        self.buf.reserve(READ_CHUNK);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(LineError::Closed);
        }
        Ok(())
    }

    /// Write all of `data` and flush, waiting at most `wait`. A write
    /// that failed or timed out may have left part of a TLS record behind
    /// (OpenSSL cannot take a different write after that): the connection
    /// is closed then, and every later write fails at once.
    pub async fn send(&mut self, data: &[u8], wait: Duration) -> io::Result<()> {
        let fut = async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        };
        let result = match tokio::time::timeout(wait, fut).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
        };
        if result.is_err() {
            self.stream = Stream::Detached;
        }
        result
    }

    /// STARTTLS from a device: anything buffered so far is dropped (it was
    /// sent before the handshake) and its size returned with what the
    /// handshake negotiated.
    pub async fn accept_tls(
        &mut self,
        acceptor: &DeviceAcceptor,
        wait: Duration,
    ) -> io::Result<(usize, TlsInfo)> {
        let dropped = self.discard_buffer();
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Detached) else {
            return Err(io::Error::other("TLS is already active"));
        };
        let (tls, info) = tokio::time::timeout(wait, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        self.stream = tls;
        Ok((dropped, info))
    }

    /// STARTTLS towards the upstream server `host`. Fails if the server sent
    /// anything after its go-ahead (it would be read as if protected).
    pub async fn connect_tls(
        &mut self,
        connector: &tokio_rustls::TlsConnector,
        host: &str,
        wait: Duration,
    ) -> io::Result<()> {
        if self.has_residual() {
            return Err(io::Error::other("data sent before the TLS handshake"));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Detached) else {
            return Err(io::Error::other("TLS is already active"));
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = tokio::time::timeout(wait, connector.connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        self.stream = Stream::Client(Box::new(tls));
        Ok(())
    }

    /// What has been read but not consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Drop the first `n` buffered bytes (a parsed header).
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
    }

    /// Read more bytes into the buffer, waiting at most `wait`.
    pub async fn fill_within(&mut self, wait: Duration) -> Result<(), LineError> {
        match tokio::time::timeout(wait, self.fill()).await {
            Ok(r) => r,
            Err(_) => Err(LineError::Timeout(wait)),
        }
    }

    /// Put bytes back in front of the buffer (a command to replay upstream).
    pub fn unread(&mut self, data: &[u8]) {
        let mut joined = BytesMut::with_capacity(data.len() + self.buf.len());
        joined.extend_from_slice(data);
        joined.extend_from_slice(&self.buf);
        self.buf = joined;
    }

    /// Whether bytes past the last line are waiting in the buffer.
    pub fn has_residual(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Drop anything buffered (on STARTTLS: bytes sent before the handshake
    /// must not be read as if they came through TLS).
    pub fn discard_buffer(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        n
    }

    /// The stream and whatever was read but not yet consumed.
    pub fn into_parts(self) -> (Stream, BytesMut) {
        (self.stream, self.buf)
    }

    /// A connection again from [`Conn::into_parts`]: `buf` is read first.
    pub fn from_parts(stream: Stream, buf: BytesMut) -> Conn {
        Conn {
            stream,
            buf,
            skipping: false,
            head: Vec::new(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// Two connected sockets on loopback: ours as a [`Conn`], and the peer's.
    pub(crate) async fn pair() -> (Conn, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (Conn::new(Stream::Plain(b.unwrap().0)), a.unwrap())
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn eol_forms() {
        assert_eq!(strip_eol(b"abc\r\n"), b"abc");
        assert_eq!(strip_eol(b"abc\n"), b"abc");
        assert_eq!(strip_eol(b"abc\r\r\n"), b"abc\r");
        assert_eq!(find_line_end(b"ab\ncd"), Some(3));
        assert_eq!(find_line_end(b"abcd"), None);
    }

    #[tokio::test]
    async fn lines_and_residual() {
        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"EHLO x\r\nAUTH PLAIN\r\nMAIL FROM:<a>")
            .await
            .unwrap();
        assert_eq!(conn.read_line(100, WAIT).await.unwrap(), b"EHLO x");
        assert_eq!(conn.read_line(100, WAIT).await.unwrap(), b"AUTH PLAIN");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, residual) = conn.into_parts();
        assert_eq!(&residual[..], b"MAIL FROM:<a>");
    }

    #[tokio::test]
    async fn long_line_is_reported_once_and_skipped() {
        let (mut conn, mut peer) = pair().await;
        let mut data = vec![b'x'; 50_000];
        data.extend_from_slice(b"\r\nNOOP\r\n");
        peer.write_all(&data).await.unwrap();
        assert!(matches!(
            conn.read_line(512, WAIT).await,
            Err(LineError::TooLong(512))
        ));
        assert_eq!(conn.take_long_line_head(), [b'x'; LONG_LINE_HEAD]);
        assert_eq!(conn.take_long_line_head(), b"");
        assert_eq!(conn.read_line(512, WAIT).await.unwrap(), b"NOOP");
        assert!(
            conn.buf.capacity() < 64 * 1024,
            "buffer grew to {}",
            conn.buf.capacity()
        );
    }

    #[tokio::test]
    async fn exact_limit_is_accepted() {
        let (mut conn, mut peer) = pair().await;
        let mut data = vec![b'y'; 512];
        data.extend_from_slice(b"\r\n");
        data.extend(vec![b'z'; 513]);
        data.extend_from_slice(b"\r\n");
        peer.write_all(&data).await.unwrap();
        assert_eq!(conn.read_line(512, WAIT).await.unwrap().len(), 512);
        assert!(matches!(
            conn.read_line(512, WAIT).await,
            Err(LineError::TooLong(_))
        ));
        assert_eq!(conn.take_long_line_head(), [b'z'; LONG_LINE_HEAD]);
    }

    #[tokio::test]
    async fn timeout_and_close() {
        let (mut conn, peer) = pair().await;
        assert!(matches!(
            conn.read_line(10, Duration::from_millis(50)).await,
            Err(LineError::Timeout(_))
        ));
        drop(peer);
        assert!(matches!(
            conn.read_line(10, WAIT).await,
            Err(LineError::Closed)
        ));
    }

    #[tokio::test]
    async fn discard_and_exact() {
        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"0123456789NOOP\r\n").await.unwrap();
        conn.discard(4, WAIT).await.unwrap();
        assert_eq!(conn.read_exact(6, WAIT).await.unwrap(), b"456789");
        assert_eq!(conn.read_line(10, WAIT).await.unwrap(), b"NOOP");
    }
}
