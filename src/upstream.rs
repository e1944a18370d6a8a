//! Dialling the real mail server: TCP with a timeout, then TLS verified
//! against the system roots plus `ca_file`. The protocol modules speak the
//! greeting and the XOAUTH2 login over what this returns.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::split_host_port;
use crate::error::AuthError;
use crate::line::{Conn, Stream};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the upstream may take for one reply (an XOAUTH2 check included).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest reply line accepted from upstream before authentication.
pub const MAX_REPLY_LINE: usize = 8 * 1024;
/// The most lines one multi-line reply (EHLO, CAPA) may have.
pub const MAX_REPLY_LINES: usize = 256;

/// Open TCP to `addr` (`host:port`), trying each address it resolves to.
pub async fn connect(addr: &str) -> Result<TcpStream, AuthError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(AuthError::UpstreamUnavailable(format!(
            "connect to {addr}: {e}"
        ))),
        Err(_) => Err(AuthError::UpstreamUnavailable(format!(
            "connect to {addr}: timed out after {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Turn a plain upstream connection into verified TLS for the host of `addr`.
pub async fn start_tls(
    connector: &TlsConnector,
    addr: &str,
    conn: &mut Conn,
) -> Result<(), AuthError> {
    let (host, _) = split_host_port(addr).map_err(AuthError::UpstreamUnavailable)?;
    conn.connect_tls(connector, host, TLS_HANDSHAKE_TIMEOUT)
        .await
        .map_err(|e| AuthError::UpstreamUnavailable(format!("TLS with {addr}: {e}")))
}

/// Connect with implicit TLS (IMAPS, POP3S).
pub async fn connect_tls(connector: &TlsConnector, addr: &str) -> Result<Conn, AuthError> {
    let mut conn = connect_plain(addr).await?;
    start_tls(connector, addr, &mut conn).await?;
    Ok(conn)
}

/// Connect without TLS (SMTP before STARTTLS).
pub async fn connect_plain(addr: &str) -> Result<Conn, AuthError> {
    Ok(Conn::new(Stream::Plain(connect(addr).await?)))
}

/// Printable, bounded text of a server line for the log.
pub fn printable(line: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(line)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(200)
        .collect();
    text
}
