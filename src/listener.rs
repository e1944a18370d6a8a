//! One `[[listener]]`: its protocol and rules (TLS mode, plaintext
//! passwords, PROXY header and the load balancers allowed to send it), the
//! TLS acceptor that a reload can replace, and the slots that bound its
//! connections.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{Delivery, ListenerConfig, Protocol, TlsMode};
use crate::net::proxy_protocol::TrustedProxies;

/// One `[[listener]]`, ready to serve.
pub struct Listener {
    pub protocol: Protocol,
    pub tls: TlsMode,
    /// The certificate's PEM files and the acceptor built from them,
    /// replaced on reload (SIGHUP); a session keeps the one it started with.
    tls_files: Option<(PathBuf, PathBuf)>,
    tls_acceptor: ArcSwapOption<TlsAcceptor>,
    pub allow_plaintext_auth: bool,
    /// With `proxy_protocol`: the load balancers whose PROXY header is
    /// read; a connection from any other peer is closed unread.
    pub proxy_from: Option<TrustedProxies>,
    /// IMAP: sessions move to a new upstream login before their token expires.
    pub session_continuity: bool,
    /// SMTP: live relay, or store and forward.
    pub delivery: Delivery,
    max_connections: usize,
    slots: Arc<Semaphore>,
}

/// A device's place on its listener; the place is free again when dropped.
pub type ListenerSlot = OwnedSemaphorePermit;

impl Listener {
    pub fn new(config: &ListenerConfig) -> Result<Listener, String> {
        let tls_files = match (&config.cert_file, &config.key_file, config.tls) {
            (_, _, TlsMode::None) => None,
            (Some(cert), Some(key), _) => Some((cert.clone(), key.clone())),
            _ => {
                return Err(format!(
                    "listener {}: cert_file and key_file are required",
                    config.listen
                ))
            }
        };
        let tls_acceptor = match &tls_files {
            Some((cert, key)) => Some(Arc::new(crate::net::tls::server_acceptor(cert, key)?)),
            None => None,
        };
        Ok(Listener {
            protocol: config.protocol,
            tls: config.tls,
            tls_files,
            tls_acceptor: ArcSwapOption::new(tls_acceptor),
            allow_plaintext_auth: config.allow_plaintext_auth,
            session_continuity: config.session_continuity.unwrap_or(true),
            delivery: config.delivery,
            proxy_from: config
                .proxy_protocol
                .then(|| TrustedProxies::new(config.proxy_from_networks())),
            max_connections: config.max_connections,
            slots: Arc::new(Semaphore::new(config.max_connections)),
        })
    }

    /// The TLS acceptor for new handshakes, if the listener has a certificate.
    pub fn tls_acceptor(&self) -> Option<Arc<TlsAcceptor>> {
        self.tls_acceptor.load_full()
    }

    /// A place for one more device, or why there is none.
    pub fn admit(&self) -> Result<ListenerSlot, String> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            format!(
                "listener connection limit ({}) reached",
                self.max_connections
            )
        })
    }

    /// Devices connected now, and the most this listener admits.
    pub fn sessions(&self) -> (usize, usize) {
        let free = self.slots.available_permits();
        (
            self.max_connections.saturating_sub(free),
            self.max_connections,
        )
    }

    /// Read the certificate and key again. On any error the old ones stay.
    pub fn reload_tls(&self) -> Result<(), String> {
        if let Some((cert, key)) = &self.tls_files {
            let acceptor = crate::net::tls::server_acceptor(cert, key)?;
            self.tls_acceptor.store(Some(Arc::new(acceptor)));
        }
        Ok(())
    }
}
