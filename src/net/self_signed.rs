//! The certificate of a TLS listener that names no `cert_file`/`key_file`:
//! a self-signed RSA 2048 certificate (which every old device can use),
//! made once and kept in `state_dir/tls/`, so that a device that pinned it
//! keeps working across restarts.
//!
//! Promises: an existing pair is always reused, never replaced; a broken
//! or half-present pair is an error naming the file, not a new
//! certificate (a device that pinned the old one would stop working
//! without a word). A new pair is written to temporary files and renamed
//! into place, key first, so a crash leaves no half-written certificate.
//! The key file is 0600 in a 0700 directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};
use sha2::{Digest, Sha256};

use super::device_tls::CertPem;

/// The folder in `state_dir`.
pub const DIR: &str = "tls";
/// The certificate and key files in it.
pub const CERT_FILE: &str = "self-signed.crt";
pub const KEY_FILE: &str = "self-signed.key";
/// RSA key size: what every old device handles.
const RSA_BITS: u32 = 2048;
/// Validity: long, since devices pin it rather than renew it.
const VALID_DAYS: u32 = 3650;

/// Where the pair lives for `state_dir`.
pub fn paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = state_dir.join(DIR);
    (dir.join(CERT_FILE), dir.join(KEY_FILE))
}

/// The pair in `state_dir`, made first if there is none. `true` when it
/// was made now.
pub fn load_or_make(state_dir: &Path, hostname: &str) -> Result<(CertPem, bool), String> {
    let (cert_path, key_path) = paths(state_dir);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => Ok((read(&cert_path, &key_path)?, false)),
        (false, false) => {
            make(state_dir, hostname)?;
            Ok((read(&cert_path, &key_path)?, true))
        }
        (true, false) => Err(format!(
            "{}: missing beside {}; restore it, or remove both to make a new certificate",
            key_path.display(),
            cert_path.display()
        )),
        (false, true) => Err(format!(
            "{}: missing beside {}; restore it, or remove both to make a new certificate",
            cert_path.display(),
            key_path.display()
        )),
    }
}

/// Read a certificate and key pair from PEM files.
pub fn read(cert_path: &Path, key_path: &Path) -> Result<CertPem, String> {
    let chain = fs::read(cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key = fs::read(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    Ok(CertPem { chain, key })
}

/// The SHA-256 fingerprint of the first certificate in `pem`, as
/// `openssl x509 -fingerprint -sha256` prints it (`AB:CD:...`).
pub fn fingerprint(pem: &[u8]) -> Option<String> {
    let der = rustls_pemfile::certs(&mut &pem[..]).next()?.ok()?;
    let digest = Sha256::digest(der.as_ref());
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    Some(hex.join(":"))
}

fn make(state_dir: &Path, hostname: &str) -> Result<(), String> {
    let (cert_path, key_path) = paths(state_dir);
    let dir = state_dir.join(DIR);
    create_private_dir(&dir)?;
    let (cert, key) = generate(hostname).map_err(|e| format!("making a certificate: {e}"))?;
    write_new(&key_path, &key, 0o600)?;
    write_new(&cert_path, &cert, 0o644)?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// Write `data` to a temporary file beside `path`, sync it, rename it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let fail = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(data).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A new self-signed certificate for `hostname` (and `localhost`), PEM.
fn generate(hostname: &str) -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
    let rsa = Rsa::generate(RSA_BITS)?;
    let key = PKey::from_rsa(rsa)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", hostname)?;
    name.append_entry_by_text("O", "oxbridge self-signed")?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(VALID_DAYS)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let mut san = SubjectAlternativeName::new();
    san.dns(hostname).dns("localhost").ip("127.0.0.1");
    let san = san.build(&b.x509v3_context(None, None))?;
    b.append_extension(san)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok((b.build().to_pem()?, key.private_key_to_pem_pkcs8()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_once_then_reused_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let (first, made) = load_or_make(dir.path(), "printer-gw").unwrap();
        assert!(made);
        let (second, made) = load_or_make(dir.path(), "printer-gw").unwrap();
        assert!(!made);
        let fp = fingerprint(&first.chain).unwrap();
        assert_eq!(fp.len(), 32 * 3 - 1, "{fp}");
        assert_eq!(Some(fp), fingerprint(&second.chain));
        let (_, key) = paths(dir.path());
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let folder = fs::metadata(dir.path().join(DIR))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(folder, 0o700);
        let cert = X509::from_pem(&first.chain).unwrap();
        assert_eq!(cert.public_key().unwrap().bits(), RSA_BITS);
    }

    #[test]
    fn a_state_dir_not_made_yet_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        load_or_make(&state, "gw").unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn half_a_pair_is_an_error_not_a_new_certificate() {
        let dir = tempfile::tempdir().unwrap();
        load_or_make(dir.path(), "gw").unwrap();
        let (cert, key) = paths(dir.path());
        let kept = fs::read(&cert).unwrap();
        fs::remove_file(&key).unwrap();
        let err = load_or_make(dir.path(), "gw").err().unwrap();
        assert!(err.contains("self-signed.key: missing"), "{err}");
        assert_eq!(fs::read(&cert).unwrap(), kept);
    }
}
