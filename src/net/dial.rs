//! Dialling out: TCP with a timeout, then TLS verified against the system
//! roots plus `[upstream].ca_file` (the connector of [`super::tls`]). No
//! protocol is spoken here; `upstream` reads the greeting over what this
//! returns.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::conn::{Conn, Stream};
use super::tls::HANDSHAKE_TIMEOUT;

/// How long a TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Split `host:port` (or `[v6]:port`) into the host and the port.
fn host_of(addr: &str) -> Result<&str, String> {
    crate::config::split_host_port(addr).map(|(host, _)| host)
}

/// Open TCP to `addr` (`host:port`), trying each address it resolves to.
pub async fn connect(addr: &str) -> Result<Conn, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(Conn::new(Stream::Plain(tcp)))
        }
        Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
        Err(_) => Err(format!(
            "connect to {addr}: timed out after {CONNECT_TIMEOUT:?}"
        )),
    }
}

/// Turn a plain connection into verified TLS for the host of `addr`.
pub async fn start_tls(
    connector: &TlsConnector,
    addr: &str,
    conn: &mut Conn,
) -> Result<(), String> {
    conn.connect_tls(connector, host_of(addr)?, HANDSHAKE_TIMEOUT)
        .await
        .map_err(|e| format!("TLS with {addr}: {e}"))
}

/// Connect with implicit TLS (IMAPS, POP3S).
pub async fn connect_tls(connector: &TlsConnector, addr: &str) -> Result<Conn, String> {
    let mut conn = connect(addr).await?;
    start_tls(connector, addr, &mut conn).await?;
    Ok(conn)
}
