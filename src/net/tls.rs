//! TLS towards the upstream servers: one client config, built once and
//! shared with `Arc`, for every upstream connection and token endpoint.
//! (Devices' TLS is `device_tls`.)
//!
//! Upstream certificates are always verified, against the system roots plus
//! `[upstream].ca_file`. Nothing here can turn verification off.

use std::path::Path;
use std::sync::Arc;

use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// How long a TLS handshake may take, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The one client config for upstream: system roots plus `ca_file`.
pub fn upstream_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    Ok(TlsConnector::from(Arc::new(upstream_config(ca_file)?)))
}

/// [`upstream_connector`]'s configuration, for HTTPS clients (Microsoft Graph).
pub fn upstream_config(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system store can hold certificates rustls cannot use; skip them.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in read_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted root certificates: install ca-certificates or set upstream.ca_file".into(),
        );
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
