//! `[[listener]]`: one address a device connects to, with its protocol,
//! TLS (mode, certificate, the oldest TLS version it accepts), PROXY
//! header and delivery. Checked in `validate.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

use super::{parse_network, Delivery, Protocol, DEFAULT_LISTENER_MAX_CONNECTIONS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    pub tls: TlsMode,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    #[serde(default)]
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: the load balancers (networks or addresses)
    /// whose PROXY header is believed; connections from anywhere else are
    /// closed unread.
    pub proxy_from: Option<Vec<String>>,
    /// Connections this listener serves at once.
    #[serde(default = "default_listener_connections")]
    pub max_connections: usize,
    /// IMAP only: move sessions to a new upstream login before their token
    /// expires (default on).
    pub session_continuity: Option<bool>,
    /// SMTP only: live relay, or store and forward.
    #[serde(default)]
    pub delivery: Delivery,
    /// The oldest TLS version a device may use here; below 1.2 the
    /// handshakes are OpenSSL's (old printers), otherwise rustls'.
    pub tls_min_version: Option<TlsVersion>,
    /// Send TLS session tickets (resumption) to devices. Off by default:
    /// some old clients lose a command when tickets arrive right after the
    /// handshake, and a proxy's devices gain little from resuming.
    #[serde(default)]
    pub session_tickets: bool,
}

/// `tls_min_version`: the oldest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.0")]
    V1_0,
    #[serde(rename = "1.1")]
    V1_1,
    #[serde(rename = "1.2")]
    V1_2,
}

impl TlsVersion {
    /// As written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_0 => "1.0",
            TlsVersion::V1_1 => "1.1",
            TlsVersion::V1_2 => "1.2",
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ListenerConfig {
    /// The oldest TLS version accepted (1.2 unless set lower).
    pub fn min_tls(&self) -> TlsVersion {
        self.tls_min_version.unwrap_or(TlsVersion::V1_2)
    }

    /// Accepts TLS older than 1.2: served by OpenSSL.
    pub fn legacy_tls(&self) -> bool {
        self.tls != TlsMode::None && self.min_tls() < TlsVersion::V1_2
    }

    /// `proxy_from`, parsed (validated at load).
    pub fn proxy_from_networks(&self) -> Vec<IpNet> {
        self.proxy_from
            .iter()
            .flatten()
            .filter_map(|n| parse_network(n))
            .collect()
    }
}

/// `listen`: an IP address and a port; the error says how to write one
/// (a bare port or a host name is the usual mistake).
fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        let port = text
            .rsplit(':')
            .next()
            .filter(|p| p.parse::<u16>().is_ok())
            .unwrap_or("587");
        serde::de::Error::custom(format!(
            "{text:?} is not an address and a port: write both, like 0.0.0.0:{port} (every interface) or 192.168.1.10:{port} (invalid socket address syntax)"
        ))
    })
}

fn default_listener_connections() -> usize {
    DEFAULT_LISTENER_MAX_CONNECTIONS
}
