//! TLS towards devices: the acceptor a listener hands its handshakes to,
//! chosen once when the listener is built.
//!
//! - [`DeviceAcceptor::Modern`] is rustls: TLS 1.2 and 1.3 with AEAD
//!   suites, every listener's default.
//! - [`DeviceAcceptor::Legacy`] is OpenSSL, for a listener whose
//!   `tls_min_version` is below 1.2: old printers and applications that
//!   speak TLS 1.0/1.1 or CBC suites with RSA key exchange. It still
//!   prefers TLS 1.3, then TLS 1.2 with ECDHE and AEAD, whenever the device
//!   offers them. SSL 2/3, RC4, 3DES, NULL, export, anonymous, MD5 and DHE
//!   suites are never offered.
//!
//! Neither sends TLS session tickets unless the listener asks for them
//! (`session_tickets = true`): some old clients lose a command when tickets
//! arrive right after the handshake, and resuming buys a proxy's devices
//! little.
//!
//! Nothing above `net/` knows which acceptor served a session: it gets a
//! [`Stream`] and a [`TlsInfo`] (the negotiated version and suite, for the
//! log, the metrics and the status page).

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use openssl::pkey::PKey;
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslOptions, SslSessionCacheMode, SslVersion};
use openssl::x509::X509;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::stream::Stream;
use crate::config::TlsVersion;

/// The TLS 1.2-and-older suites of a legacy listener, best first: ECDHE
/// with AEAD, ECDHE with CBC (Windows 7, Java 7), then RSA key exchange
/// (printers that know nothing else), ending with `AES128-SHA`, the suite
/// every device of that era offers. `@SECLEVEL=0` is what OpenSSL 3 needs
/// to speak TLS 1.0/1.1 at all (their handshakes sign with SHA-1/MD5).
pub const LEGACY_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:\
ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:\
ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:\
AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA:\
!aNULL:!eNULL:!EXPORT:!RC4:!3DES:!MD5:!DSS:!PSK:!SRP:@SECLEVEL=0";

/// Key exchange groups of a legacy listener: the NIST curves first, the
/// only ones old ECDHE clients know.
const LEGACY_GROUPS: &str = "P-256:P-384:X25519";

/// The smallest RSA key a legacy listener takes (what rustls takes).
const MIN_RSA_BITS: u32 = 2048;

/// Tickets a listener with `session_tickets = true` sends after a TLS 1.3
/// handshake (rustls' and OpenSSL's default).
const TICKETS: usize = 2;

/// How a listener's TLS is set up, from its `[[listener]]`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTlsSettings {
    pub min_version: TlsVersion,
    pub session_tickets: bool,
}

/// A listener's certificate: the chain and key as PEM.
pub struct CertPem {
    pub chain: Vec<u8>,
    pub key: Vec<u8>,
}

/// What a handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.0` .. `TLSv1.3`.
    pub version: &'static str,
    /// The suite's IANA name, like `TLS_RSA_WITH_AES_128_CBC_SHA`.
    pub cipher: String,
}

/// The versions [`TlsInfo::version`] can hold, oldest first.
pub const VERSIONS: [&str; 4] = ["TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"];

/// A listener's TLS acceptor, chosen once from its settings.
pub enum DeviceAcceptor {
    Modern(TlsAcceptor),
    Legacy(SslAcceptor),
}

impl DeviceAcceptor {
    pub fn new(cert: &CertPem, settings: DeviceTlsSettings) -> Result<DeviceAcceptor, String> {
        if settings.min_version < TlsVersion::V1_2 {
            legacy(cert, settings).map(DeviceAcceptor::Legacy)
        } else {
            modern(cert, settings).map(DeviceAcceptor::Modern)
        }
    }

    /// The device's handshake (the caller bounds its time).
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<(Stream, TlsInfo)> {
        match self {
            DeviceAcceptor::Modern(acceptor) => {
                let tls = acceptor.accept(tcp).await?;
                let conn = tls.get_ref().1;
                let info = TlsInfo {
                    version: match conn.protocol_version() {
                        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                        _ => "TLSv1.2",
                    },
                    cipher: conn
                        .negotiated_cipher_suite()
                        .map(|s| iana_name(&format!("{:?}", s.suite())))
                        .unwrap_or_default(),
                };
                Ok((Stream::Server(Box::new(tls)), info))
            }
            DeviceAcceptor::Legacy(acceptor) => {
                let ssl = Ssl::new(acceptor.context()).map_err(io::Error::other)?;
                let mut tls = tokio_openssl::SslStream::new(ssl, tcp).map_err(io::Error::other)?;
                Pin::new(&mut tls)
                    .accept()
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let ssl = tls.ssl();
                let info = TlsInfo {
                    version: version_name(ssl.version_str()),
                    cipher: ssl
                        .current_cipher()
                        .map(|c| c.standard_name().unwrap_or(c.name()).to_string())
                        .unwrap_or_default(),
                };
                Ok((Stream::Legacy(Box::new(tls)), info))
            }
        }
    }
}

/// rustls' suite names as IANA writes them (`TLS13_AES_128_GCM_SHA256`
/// is `TLS_AES_128_GCM_SHA256`).
fn iana_name(rustls_name: &str) -> String {
    match rustls_name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => rustls_name.to_string(),
    }
}

/// OpenSSL's version names, the way [`VERSIONS`] spells them.
fn version_name(openssl: &str) -> &'static str {
    match openssl {
        "TLSv1" => "TLSv1.0",
        "TLSv1.1" => "TLSv1.1",
        "TLSv1.2" => "TLSv1.2",
        "TLSv1.3" => "TLSv1.3",
        _ => "unknown",
    }
}

/// A key that is not the certificate's: the error both acceptors give.
pub const KEY_MISMATCH: &str = "key: does not match the certificate: cert_file and key_file are not one pair (compare `openssl x509 -noout -pubkey -in CERT` with `openssl pkey -pubout -in KEY`: they must print the same)";

/// The certificates of a PEM file, the server's first; an error says why
/// there are none and what to do.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: bad PEM: {e}"))?;
    if chain.is_empty() {
        return Err(no_certificate(pem));
    }
    Ok(chain)
}

/// The private key of a PEM file (never a passphrase prompt); an error
/// says why there is none and what to do.
fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    if holds(pem, b"ENCRYPTED") {
        return Err(no_key(pem));
    }
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("key: bad PEM: {e}"))?
        .ok_or_else(|| no_key(pem))
}

fn holds(data: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(data, needle).is_some()
}

/// Why `pem` holds no certificate, with the fix.
fn no_certificate(pem: &[u8]) -> String {
    if !holds(pem, b"-----BEGIN") {
        "certificate: PEM expected (convert it: openssl x509 -inform der -in cert.der -out cert.pem); this file looks like DER (binary)".into()
    } else if holds(pem, b"PRIVATE KEY-----") {
        "certificate: this file holds a private key, not a certificate: set cert_file to the certificate (-----BEGIN CERTIFICATE-----)".into()
    } else {
        "certificate: no certificate found: cert_file must hold PEM certificates (-----BEGIN CERTIFICATE-----), the server's first".into()
    }
}

/// Why `pem` holds no usable private key, with the fix.
fn no_key(pem: &[u8]) -> String {
    if holds(pem, b"ENCRYPTED") {
        "key: encrypted with a passphrase; decrypt it: openssl pkey -in key.pem -out key-plain.pem, chmod 600 key-plain.pem and set key_file to it (oxbridge starts unattended: nobody is there to type a passphrase)".into()
    } else if !holds(pem, b"-----BEGIN") {
        "key: PEM expected (convert it: openssl pkey -inform der -in key.der -out key.pem); this file looks like DER (binary)".into()
    } else if holds(pem, b"-----BEGIN CERTIFICATE") {
        "key: this file holds a certificate, not a private key: set key_file to the private key (-----BEGIN PRIVATE KEY-----), the file made with the certificate request".into()
    } else {
        "key: no private key found: key_file must hold a PEM private key (-----BEGIN PRIVATE KEY-----)".into()
    }
}

fn modern(cert: &CertPem, settings: DeviceTlsSettings) -> Result<TlsAcceptor, String> {
    let chain = certificates(&cert.chain)?;
    let key = private_key(&cert.key)?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => KEY_MISMATCH.to_string(),
                e => format!("certificate: {e}"),
            })?;
    if !settings.session_tickets {
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    } else {
        config.send_tls13_tickets = TICKETS;
    }
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn legacy(cert: &CertPem, settings: DeviceTlsSettings) -> Result<SslAcceptor, String> {
    let ssl_err = |what: &str, e: openssl::error::ErrorStack| format!("{what}: {e}");
    // Read as rustls reads them first, for the same errors.
    certificates(&cert.chain)?;
    let mut chain = X509::stack_from_pem(&cert.chain)
        .map_err(|e| ssl_err("certificate: bad PEM", e))?
        .into_iter();
    let leaf = chain.next().ok_or_else(|| no_certificate(&cert.chain))?;
    // The key as rustls reads it (an encrypted key is refused, never a
    // passphrase prompt on a terminal), then handed over as DER.
    let der = private_key(&cert.key)?;
    let key =
        PKey::private_key_from_der(der.secret_der()).map_err(|e| ssl_err("key: unusable", e))?;
    // @SECLEVEL=0 would let OpenSSL take any key: keep rustls' floor.
    if key.rsa().is_ok() && key.bits() < MIN_RSA_BITS {
        return Err(format!(
            "key: RSA {} bits; use at least {MIN_RSA_BITS}",
            key.bits()
        ));
    }
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| ssl_err("OpenSSL", e))?;
    let oldest = match settings.min_version {
        TlsVersion::V1_0 => SslVersion::TLS1,
        TlsVersion::V1_1 => SslVersion::TLS1_1,
        TlsVersion::V1_2 => SslVersion::TLS1_2,
    };
    // The preset refuses TLS 1.0/1.1 by option as well as by floor.
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    b.set_min_proto_version(Some(oldest))
        .map_err(|e| ssl_err("OpenSSL", e))?;
    b.set_max_proto_version(None)
        .map_err(|e| ssl_err("OpenSSL", e))?;
    b.set_cipher_list(LEGACY_CIPHERS)
        .map_err(|e| ssl_err("OpenSSL cipher list", e))?;
    b.set_groups_list(LEGACY_GROUPS)
        .map_err(|e| ssl_err("OpenSSL groups", e))?;
    b.set_options(
        SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::NO_COMPRESSION
            | SslOptions::NO_RENEGOTIATION
            // No empty records before TLS 1.0 CBC data (the preset's BEAST
            // counter-measure): some embedded stacks read one as the end.
            | SslOptions::DONT_INSERT_EMPTY_FRAGMENTS,
    );
    if settings.session_tickets {
        b.set_num_tickets(TICKETS)
            .map_err(|e| ssl_err("OpenSSL", e))?;
        b.set_session_id_context(b"oxbridge")
            .map_err(|e| ssl_err("OpenSSL", e))?;
    } else {
        b.set_num_tickets(0).map_err(|e| ssl_err("OpenSSL", e))?;
        b.set_options(SslOptions::NO_TICKET);
        b.set_session_cache_mode(SslSessionCacheMode::OFF);
    }
    b.set_certificate(&leaf)
        .map_err(|e| ssl_err("certificate", e))?;
    for extra in chain {
        b.add_extra_chain_cert(extra)
            .map_err(|e| ssl_err("certificate chain", e))?;
    }
    // OpenSSL compares key and certificate in both calls.
    b.set_private_key(&key)
        .map_err(|_| KEY_MISMATCH.to_string())?;
    b.check_private_key()
        .map_err(|_| KEY_MISMATCH.to_string())?;
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_as_iana_and_openssl_versions_as_ours() {
        assert_eq!(
            iana_name("TLS13_AES_128_GCM_SHA256"),
            "TLS_AES_128_GCM_SHA256"
        );
        assert_eq!(
            iana_name("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        );
        assert_eq!(version_name("TLSv1"), "TLSv1.0");
        assert_eq!(version_name("TLSv1.3"), "TLSv1.3");
        assert_eq!(version_name("SSLv3"), "unknown");
    }

    use openssl::ssl::{SslConnector, SslVerifyMode};

    fn acceptor(min_version: TlsVersion, session_tickets: bool) -> DeviceAcceptor {
        let dir = tempfile::tempdir().unwrap();
        let (pem, _) = crate::net::self_signed::load_or_make(dir.path(), "gw").unwrap();
        DeviceAcceptor::new(
            &pem,
            DeviceTlsSettings {
                min_version,
                session_tickets,
            },
        )
        .unwrap()
    }

    /// One handshake from an OpenSSL client pinned to `version` and
    /// `ciphers` (as an old device would be): what the server saw, or its
    /// error.
    async fn handshake(
        server: DeviceAcceptor,
        version: SslVersion,
        ciphers: &str,
    ) -> Result<TlsInfo, String> {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let accepting = tokio::spawn(async move {
            let (tcp, _) = socket.accept().await.unwrap();
            server.accept(tcp).await.map(|(_, info)| info)
        });
        let mut c = SslConnector::builder(SslMethod::tls_client()).unwrap();
        c.set_verify(SslVerifyMode::NONE);
        c.set_min_proto_version(Some(version)).unwrap();
        c.set_max_proto_version(Some(version)).unwrap();
        c.set_cipher_list(ciphers).unwrap();
        let ssl = c.build().configure().unwrap().into_ssl("gw").unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut client = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
        let _ = Pin::new(&mut client).connect().await;
        let seen = accepting.await.unwrap().map_err(|e| e.to_string());
        drop(client);
        seen
    }

    const OLD: &str = "AES128-SHA:@SECLEVEL=0";

    #[test]
    fn a_legacy_listener_refuses_a_short_rsa_key_and_an_encrypted_one() {
        let settings = DeviceTlsSettings {
            min_version: TlsVersion::V1_0,
            session_tickets: false,
        };
        let key = PKey::from_rsa(openssl::rsa::Rsa::generate(1024).unwrap()).unwrap();
        let mut b = X509::builder().unwrap();
        b.set_pubkey(&key).unwrap();
        let (from, to) = (
            openssl::asn1::Asn1Time::days_from_now(0).unwrap(),
            openssl::asn1::Asn1Time::days_from_now(1).unwrap(),
        );
        b.set_not_before(&from).unwrap();
        b.set_not_after(&to).unwrap();
        b.sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        let short = CertPem {
            chain: b.build().to_pem().unwrap(),
            key: key.private_key_to_pem_pkcs8().unwrap(),
        };
        let err = DeviceAcceptor::new(&short, settings).err().unwrap();
        assert_eq!(err, "key: RSA 1024 bits; use at least 2048");
        let encrypted = CertPem {
            chain: short.chain.clone(),
            key: key
                .private_key_to_pem_pkcs8_passphrase(
                    openssl::symm::Cipher::aes_128_cbc(),
                    b"secret",
                )
                .unwrap(),
        };
        let err = DeviceAcceptor::new(&encrypted, settings).err().unwrap();
        assert!(
            err.starts_with("key: encrypted with a passphrase; decrypt it: openssl pkey -in key.pem -out key-plain.pem"),
            "{err}"
        );
    }

    /// Each file that is not what its key names says so, with its fix, on
    /// both acceptors.
    #[test]
    fn a_wrong_file_in_cert_file_or_key_file_says_what_it_is_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let (good, _) = crate::net::self_signed::load_or_make(dir.path(), "gw").unwrap();
        let other = tempfile::tempdir().unwrap();
        let (other, _) = crate::net::self_signed::load_or_make(other.path(), "gw").unwrap();
        let der = X509::from_pem(&good.chain).unwrap().to_der().unwrap();
        let key_der = PKey::private_key_from_pem(&good.key)
            .unwrap()
            .private_key_to_der()
            .unwrap();
        let cases: [(Vec<u8>, Vec<u8>, &str); 6] = [
            (der, good.key.clone(), "certificate: PEM expected (convert it: openssl x509 -inform der -in cert.der -out cert.pem)"),
            (good.key.clone(), good.key.clone(), "certificate: this file holds a private key, not a certificate"),
            (good.chain.clone(), key_der, "key: PEM expected (convert it: openssl pkey -inform der -in key.der -out key.pem)"),
            (good.chain.clone(), good.chain.clone(), "key: this file holds a certificate, not a private key: set key_file to the private key"),
            (good.chain.clone(), other.key.clone(), KEY_MISMATCH),
            (good.chain.clone(), b"-----BEGIN NOTHING-----\nAAAA\n-----END NOTHING-----\n".to_vec(), "key: no private key found: key_file must hold a PEM private key"),
        ];
        for min_version in [TlsVersion::V1_2, TlsVersion::V1_0] {
            let settings = DeviceTlsSettings {
                min_version,
                session_tickets: false,
            };
            for (chain, key, expected) in &cases {
                let pem = CertPem {
                    chain: chain.clone(),
                    key: key.clone(),
                };
                let err = DeviceAcceptor::new(&pem, settings).err().unwrap();
                assert!(err.starts_with(expected), "{min_version}: {err}");
            }
        }
    }

    #[tokio::test]
    async fn an_old_device_gets_tls_1_0_with_aes128_sha_on_a_legacy_listener_only() {
        let info = handshake(acceptor(TlsVersion::V1_0, false), SslVersion::TLS1, OLD)
            .await
            .unwrap();
        assert_eq!(
            info,
            TlsInfo {
                version: "TLSv1.0",
                cipher: "TLS_RSA_WITH_AES_128_CBC_SHA".into()
            }
        );
        let info = handshake(acceptor(TlsVersion::V1_1, false), SslVersion::TLS1_1, OLD)
            .await
            .unwrap();
        assert_eq!(info.version, "TLSv1.1");
        // 1.1 is the floor there; the default listener takes neither.
        assert!(
            handshake(acceptor(TlsVersion::V1_1, false), SslVersion::TLS1, OLD)
                .await
                .is_err()
        );
        assert!(
            handshake(acceptor(TlsVersion::V1_2, false), SslVersion::TLS1, OLD)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_legacy_listener_still_prefers_modern_tls_and_never_offers_broken_suites() {
        let info = handshake(
            acceptor(TlsVersion::V1_0, false),
            SslVersion::TLS1_3,
            "DEFAULT",
        )
        .await
        .unwrap();
        assert_eq!(info.version, "TLSv1.3");
        let both = "AES128-SHA:ECDHE-RSA-AES128-GCM-SHA256:@SECLEVEL=0";
        let info = handshake(acceptor(TlsVersion::V1_0, false), SslVersion::TLS1_2, both)
            .await
            .unwrap();
        assert_eq!(info.cipher, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256");
        for broken in ["DHE-RSA-AES128-SHA", "NULL-SHA", "ADH-AES128-SHA"] {
            let only = format!("{broken}:@SECLEVEL=0");
            let seen = handshake(acceptor(TlsVersion::V1_0, false), SslVersion::TLS1, &only).await;
            assert!(seen.is_err(), "{broken} accepted: {seen:?}");
        }
    }
}
