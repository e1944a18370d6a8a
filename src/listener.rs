//! One `[[listener]]`: its protocol and rules (TLS mode, plaintext
//! passwords, PROXY header and the load balancers allowed to send it), the
//! TLS acceptor that a reload can replace, the TLS versions its devices
//! used, and the slots that bound its connections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Delivery, ListenerConfig, Protocol, TlsMode, TlsVersion};
use crate::net::device_tls::{DeviceAcceptor, DeviceTlsSettings, TlsInfo, VERSIONS};
use crate::net::proxy_protocol::TrustedProxies;
use crate::net::self_signed;

/// Where a listener's certificate comes from.
enum CertSource {
    /// `cert_file` and `key_file`.
    Files(PathBuf, PathBuf),
    /// Neither: the self-signed pair in this `state_dir`.
    SelfSigned {
        state_dir: PathBuf,
        hostname: String,
    },
}

/// One `[[listener]]`, ready to serve.
pub struct Listener {
    pub protocol: Protocol,
    pub tls: TlsMode,
    /// Where it listens: the configured address until bound, then the bound
    /// one (a port 0 resolved); the `listener` label of its metrics.
    pub address: SocketAddr,
    /// The oldest TLS version accepted (below 1.2: OpenSSL).
    pub tls_min_version: TlsVersion,
    /// The certificate's source and the acceptor built from it, replaced
    /// on reload (SIGHUP); a session keeps the one it started with.
    cert_source: Option<CertSource>,
    tls_settings: DeviceTlsSettings,
    tls_acceptor: ArcSwapOption<DeviceAcceptor>,
    /// The certificate's SHA-256 fingerprint, as `openssl x509` prints it.
    fingerprint: ArcSwap<Option<String>>,
    /// Handshakes done, per [`VERSIONS`] entry.
    tls_versions: [AtomicU64; VERSIONS.len()],
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
    /// `state_dir` and `hostname` serve a TLS listener without certificate
    /// files: its self-signed certificate is made there once.
    pub fn new(
        config: &ListenerConfig,
        state_dir: &std::path::Path,
        hostname: &str,
    ) -> Result<Listener, String> {
        let cert_source = match (&config.cert_file, &config.key_file, config.tls) {
            (_, _, TlsMode::None) => None,
            (Some(cert), Some(key), _) => Some(CertSource::Files(cert.clone(), key.clone())),
            (None, None, _) => Some(CertSource::SelfSigned {
                state_dir: state_dir.to_path_buf(),
                hostname: hostname.to_string(),
            }),
            _ => {
                return Err(format!(
                    "listener {}: give cert_file and key_file, or neither",
                    config.listen
                ))
            }
        };
        let listener = Listener {
            protocol: config.protocol,
            tls: config.tls,
            address: config.listen,
            tls_min_version: config.min_tls(),
            cert_source,
            tls_settings: DeviceTlsSettings {
                min_version: config.min_tls(),
                session_tickets: config.session_tickets,
            },
            tls_acceptor: ArcSwapOption::empty(),
            fingerprint: ArcSwap::from_pointee(None),
            tls_versions: Default::default(),
            allow_plaintext_auth: config.allow_plaintext_auth,
            session_continuity: config.session_continuity.unwrap_or(true),
            delivery: config.delivery,
            proxy_from: config
                .proxy_protocol
                .then(|| TrustedProxies::new(config.proxy_from_networks())),
            max_connections: config.max_connections,
            slots: Arc::new(Semaphore::new(config.max_connections)),
        };
        listener.load_tls(true)?;
        Ok(listener)
    }

    /// The TLS acceptor for new handshakes, if the listener has TLS.
    pub fn tls_acceptor(&self) -> Option<Arc<DeviceAcceptor>> {
        self.tls_acceptor.load_full()
    }

    /// The certificate's SHA-256 fingerprint, if the listener has TLS.
    pub fn fingerprint(&self) -> Option<String> {
        self.fingerprint.load().as_ref().clone()
    }

    /// The certificate is the self-signed one in `state_dir`.
    pub fn self_signed(&self) -> bool {
        matches!(self.cert_source, Some(CertSource::SelfSigned { .. }))
    }

    /// A device's handshake is done: count its version here and in the
    /// metrics, and put version and suite on the session's log span.
    pub fn tls_established(&self, info: &TlsInfo) {
        if let Some(i) = VERSIONS.iter().position(|v| *v == info.version) {
            self.tls_versions[i].fetch_add(1, Ordering::Relaxed);
        }
        crate::metrics::device_tls_session(self.address, info.version);
        let span = tracing::Span::current();
        span.record("tls_version", info.version);
        span.record("tls_cipher", info.cipher.as_str());
    }

    /// Handshakes so far per TLS version (those used at least once).
    pub fn tls_mix(&self) -> Vec<(&'static str, u64)> {
        VERSIONS
            .iter()
            .zip(&self.tls_versions)
            .map(|(v, n)| (*v, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
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

    /// Read the certificate and key again (SIGHUP). On any error the old
    /// ones stay. A self-signed pair is read back like files (an operator
    /// may replace it), never made here: its files gone is an error.
    pub fn reload_tls(&self) -> Result<(), String> {
        self.load_tls(false)
    }

    /// Build the acceptor from the certificate; `make`: the self-signed
    /// pair may be made first (at start).
    fn load_tls(&self, make: bool) -> Result<(), String> {
        let (pem, origin) = match &self.cert_source {
            None => return Ok(()),
            Some(CertSource::Files(cert, key)) => {
                (self_signed::read(cert, key)?, (cert.clone(), key.clone()))
            }
            Some(CertSource::SelfSigned {
                state_dir,
                hostname,
            }) => {
                let pem = if make {
                    let (pem, made) = self_signed::load_or_make(state_dir, hostname)?;
                    if made {
                        tracing::warn!(listener = %self.address, sha256 = %self_signed::fingerprint(&pem.chain).unwrap_or_default(), "made a new self-signed certificate for devices: devices that pinned an earlier one must accept this one");
                    }
                    pem
                } else {
                    self_signed::load(state_dir)?
                };
                (pem, self_signed::paths(state_dir))
            }
        };
        // The error names the key at fault (a self-signed pair: the file).
        let acceptor = DeviceAcceptor::new(&pem, self.tls_settings).map_err(|e| {
            let (name, file, why) = match e.strip_prefix("key: ") {
                Some(why) => ("key_file ", &origin.1, why),
                None => (
                    "cert_file ",
                    &origin.0,
                    e.strip_prefix("certificate: ").unwrap_or(&e),
                ),
            };
            let name = if self.self_signed() { "" } else { name };
            format!("{name}{}: {why}", file.display())
        })?;
        let fingerprint = self_signed::fingerprint(&pem.chain);
        if self.self_signed() {
            tracing::info!(listener = %self.address, file = %origin.0.display(), sha256 = %fingerprint.as_deref().unwrap_or(""), "using the self-signed certificate for devices");
        }
        self.fingerprint.store(Arc::new(fingerprint));
        self.tls_acceptor.store(Some(Arc::new(acceptor)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> ListenerConfig {
        toml::from_str(toml).unwrap()
    }

    /// The self-signed certificate survives a restart (a new `Listener`)
    /// and is re-read on reload, so replacing its files changes it.
    #[test]
    fn a_self_signed_listener_keeps_its_certificate_and_reload_reads_it_again() {
        let state = tempfile::tempdir().unwrap();
        let l = config("protocol = \"smtp\"\nlisten = \"127.0.0.1:0\"\ntls = \"implicit\"\ntls_min_version = \"1.0\"\n");
        let first = Listener::new(&l, state.path(), "gw").unwrap();
        assert!(first.self_signed());
        let fingerprint = first.fingerprint().expect("a fingerprint");
        let again = Listener::new(&l, state.path(), "gw").unwrap();
        assert_eq!(again.fingerprint().as_deref(), Some(fingerprint.as_str()));
        // An operator replaces the pair: reload takes the new one.
        let other = tempfile::tempdir().unwrap();
        self_signed::load_or_make(other.path(), "gw").unwrap();
        let (cert, key) = self_signed::paths(state.path());
        let (new_cert, new_key) = self_signed::paths(other.path());
        std::fs::copy(&new_cert, &cert).unwrap();
        std::fs::copy(&new_key, &key).unwrap();
        again.reload_tls().unwrap();
        let changed = again.fingerprint().unwrap();
        assert_ne!(changed, fingerprint);
        // A broken file leaves the running certificate in place.
        std::fs::write(&cert, b"not a certificate").unwrap();
        assert!(again.reload_tls().is_err());
        assert_eq!(again.fingerprint(), Some(changed));
    }
}
