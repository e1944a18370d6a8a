//! The PROXY protocol (v1 text and v2 binary, as HAProxy and cloud load
//! balancers send it): the real client address in front of a connection.
//!
//! [`parse`] is a plain function over the bytes received so far (the `ppp`
//! crate does the decoding); [`read`] reads a header off a connection,
//! bounded in size and time, without consuming what follows it.
//! [`looks_like_header`] spots a header sent to a listener that does not
//! expect one.
//!
//! Promises: a header is read only from a [`TrustedPeer`], a connection
//! whose real TCP peer is inside the listener's `proxy_from`; only
//! [`TrustedProxies::check`] makes one. Anyone else could claim any
//! address (one inside a `[[relay]]` network, or a new one per guess past
//! the login throttle), so their connections are closed unread.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use ppp::v2::Command;
use ppp::{HeaderResult, PartialResult};

use tokio::net::TcpStream;

/// The largest header read (v1 is at most 107 bytes; v2 with TLVs may be longer).
pub const MAX_HEADER: usize = 4096;
/// How long a load balancer may take to send the header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between looks at a header that has not fully arrived.
const PEEK_PAUSE: Duration = Duration::from_millis(5);
/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The load balancers whose PROXY header a listener believes: its
/// `proxy_from` networks.
#[derive(Debug, Clone)]
pub struct TrustedProxies(Vec<IpNet>);

/// A connection's real TCP peer, found inside `proxy_from`: the only kind
/// of peer whose PROXY header [`read`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedPeer(SocketAddr);

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(networks)
    }

    /// `peer` as a trusted load balancer, or None: then nothing may be
    /// read from the connection. An IPv4 peer on an IPv6 socket
    /// (`::ffff:10.0.0.5`) is checked as the IPv4 address it is.
    pub fn check(&self, peer: SocketAddr) -> Option<TrustedPeer> {
        let ip = peer.ip().to_canonical();
        self.0
            .iter()
            .any(|n| n.contains(&ip))
            .then_some(TrustedPeer(peer))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A header of `length` bytes; `source` is the client (None for LOCAL
    /// or UNKNOWN: a health check, the connection's own address stands).
    Header {
        source: Option<SocketAddr>,
        length: usize,
    },
    Invalid(String),
}

pub fn parse(buf: &[u8]) -> Parsed {
    let result = HeaderResult::parse(buf);
    match result {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            };
            Parsed::Header {
                source,
                length: h.header.len(),
            }
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, ppp::v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            Parsed::Header {
                source,
                length: h.header.len(),
            }
        }
        HeaderResult::V1(Err(e)) if !e.is_incomplete() || !could_be_v1(buf) => {
            Parsed::Invalid(e.to_string())
        }
        HeaderResult::V2(Err(e)) if !e.is_incomplete() => Parsed::Invalid(e.to_string()),
        _ => Parsed::Incomplete,
    }
}

/// Whether `buf` can still grow into a v1 header.
fn could_be_v1(buf: &[u8]) -> bool {
    let n = buf.len().min(6);
    buf[..n] == b"PROXY "[..n] && !buf.contains(&b'\n')
}

/// Whether the first bytes a device sent are a PROXY header (v1 or v2).
pub fn looks_like_header(first: &[u8]) -> bool {
    first.starts_with(b"PROXY ")
        || first.starts_with(&V2_SIGNATURE[..4])
            && V2_SIGNATURE.starts_with(&first[..first.len().min(12)])
}

/// Read the header a trusted load balancer must send first, and no byte
/// more (with implicit TLS the handshake follows it); returns the client's
/// address (or the balancer's own for LOCAL/UNKNOWN headers: health checks).
pub async fn read(tcp: &TcpStream, balancer: TrustedPeer) -> Result<SocketAddr, String> {
    let peer = balancer.0;
    let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
    let mut buf = vec![0u8; MAX_HEADER];
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .map_err(|_| "no PROXY header".to_string())?
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err("connection closed before the PROXY header".into());
        }
        match parse(&buf[..n]) {
            Parsed::Header { source, length } => {
                // Consume exactly the header.
                let mut header = vec![0u8; length];
                let mut got = 0;
                while got < length {
                    // The bytes were peeked: they are there to read.
                    match tcp.try_read(&mut header[got..]) {
                        Ok(0) => return Err("connection closed in the PROXY header".into()),
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            tokio::time::timeout_at(deadline, tcp.readable())
                                .await
                                .map_err(|_| "no PROXY header".to_string())?
                                .map_err(|e| e.to_string())?;
                        }
                        Err(e) => return Err(format!("reading the PROXY header: {e}")),
                    }
                }
                return Ok(source.unwrap_or(peer));
            }
            Parsed::Invalid(e) => return Err(format!("invalid PROXY header: {e}")),
            Parsed::Incomplete if n >= MAX_HEADER => return Err("PROXY header too long".into()),
            Parsed::Incomplete => {}
        }
        if n == seen {
            // Nothing new yet: wait a little for the rest of the header.
            tokio::time::sleep(PEEK_PAUSE).await;
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 192.168.10.7 10.0.0.1 51000 587\r\nEHLO x\r\n";
        assert_eq!(
            parse(h),
            Parsed::Header {
                source: Some("192.168.10.7:51000".parse().unwrap()),
                length: 44
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n";
        assert!(matches!(parse(h), Parsed::Header { source: Some(s), .. } if s.port() == 4000));
        assert!(matches!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                source: None,
                length: 15
            }
        ));
        assert_eq!(parse(b"PROXY TCP4 192.168"), Parsed::Incomplete);
        assert_eq!(parse(b"PRO"), Parsed::Incomplete);
        assert!(matches!(
            parse(b"PROXY TCP4 nonsense here 1 2\r\n"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(parse(b"EHLO printer\r\n"), Parsed::Invalid(_)));
    }

    #[test]
    fn v2_headers() {
        let mut addr = vec![192, 168, 10, 7, 10, 0, 0, 1];
        addr.extend_from_slice(&51000u16.to_be_bytes());
        addr.extend_from_slice(&587u16.to_be_bytes());
        let mut h = v2(1, 0x11, &addr);
        let length = h.len();
        h.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&h),
            Parsed::Header {
                source: Some("192.168.10.7:51000".parse().unwrap()),
                length
            }
        );
        assert_eq!(parse(&h[..14]), Parsed::Incomplete);
        let local = v2(0, 0, &[]);
        assert_eq!(
            parse(&local),
            Parsed::Header {
                source: None,
                length: 16
            }
        );
        let mut bad = v2(1, 0x11, &addr);
        bad[12] = 0x31;
        assert!(matches!(parse(&bad), Parsed::Invalid(_)));
    }

    #[test]
    fn only_peers_inside_proxy_from_are_trusted() {
        let trusted = TrustedProxies::new(vec![
            "10.0.0.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
            "192.168.1.7/32".parse().unwrap(),
        ]);
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for inside in [
            "10.0.0.9:4000",
            "[2001:db8::5]:4000",
            "192.168.1.7:1",
            "[::ffff:10.0.0.200]:4000",
        ] {
            assert_eq!(
                trusted.check(at(inside)),
                Some(TrustedPeer(at(inside))),
                "{inside}"
            );
        }
        for outside in [
            "10.0.1.9:4000",
            "127.0.0.1:4000",
            "192.168.1.8:1",
            "[::1]:4000",
            "[::ffff:10.0.1.1]:4000",
        ] {
            assert_eq!(trusted.check(at(outside)), None, "{outside}");
        }
        assert_eq!(TrustedProxies::new(vec![]).check(at("10.0.0.9:1")), None);
    }

    #[test]
    fn headers_are_recognised_where_they_do_not_belong() {
        assert!(looks_like_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2"));
        assert!(looks_like_header(&V2_SIGNATURE[..]));
        assert!(looks_like_header(b"\r\n\r\n\0"));
        assert!(!looks_like_header(b"EHLO x"));
        assert!(!looks_like_header(b"\r\n"));
    }
}
