//! Listening sockets with room for a burst of devices.
//!
//! When more handshakes arrive than a listener's queue holds, Linux answers
//! with SYN cookies and, while the queue stays full, drops the handshake's
//! last ACK: the device believes it is connected and waits in silence for a
//! greeting until it gives up (the bench saw 1 to 72 of 1,000 logins at
//! 500 at once wait 60 s this way, with tokio's default queue of 1,024).
//! A printer fleet reconnecting after a restart is such a burst, so the
//! queue is [`LISTEN_BACKLOG`] (the kernel caps it at
//! `net.core.somaxconn`).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel may hold for a listener before they are accepted.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Bind `addr` (with `SO_REUSEADDR`, as tokio's `bind` does) and listen
/// with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue is as long as asked (or as the kernel allows): the
    /// listening socket's Send-Q in /proc is its backlog.
    #[tokio::test]
    async fn a_listener_queues_a_burst() {
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        let max = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(4096);
        let ss = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&ss.stdout).to_string();
        let send_q: u32 = line
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("ss: {line:?}"));
        assert_eq!(send_q, LISTEN_BACKLOG.min(max), "{line}");
        assert!(send_q > 1024, "no more room than tokio's default: {line}");
    }
}
