//! The certificate of a TLS listener that names no `cert_file`/`key_file`:
//! a self-signed RSA 2048 certificate (which every old device can use),
//! made once and kept in `state_dir/tls/`, so that a device that pinned it
//! keeps working across restarts.
//!
//! Promises: an existing pair is always reused, never replaced; a broken
//! or half-present pair is an error naming the file, not a new
//! certificate (a device that pinned the old one would stop working
//! without a word). A new pair is written, synced, into a folder of its
//! own, which is then renamed to `tls` in one step: a crash leaves either
//! no pair or a whole one, and of two processes making one at once, the
//! second takes the first's. The key file is 0600 in a 0700 folder; a
//! folder or key others can read is warned about.

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
    let made = match (present(&cert_path)?, present(&key_path)?) {
        (true, true) => false,
        (false, false) => make(state_dir, hostname)?,
        (true, false) => return Err(half_pair(&key_path, &cert_path)),
        (false, true) => return Err(half_pair(&cert_path, &key_path)),
    };
    warn_if_open(state_dir);
    Ok((read(&cert_path, &key_path)?, made))
}

/// The pair as it is now, never made: for a reload.
pub fn load(state_dir: &Path) -> Result<CertPem, String> {
    let (cert_path, key_path) = paths(state_dir);
    match (present(&cert_path)?, present(&key_path)?) {
        (true, true) => read(&cert_path, &key_path),
        (_, false) => Err(half_pair(&key_path, &cert_path)),
        (false, true) => Err(half_pair(&cert_path, &key_path)),
    }
}

fn half_pair(missing: &Path, beside: &Path) -> String {
    format!(
        "{}: missing beside {}; restore it, or remove both (and restart) to make a new certificate",
        missing.display(),
        beside.display()
    )
}

/// Whether `path` is there; any error but "not found" is an error (a
/// mount not there yet must not look like "make a new one").
fn present(path: &Path) -> Result<bool, String> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Warn when others may read the key or plant a pair of their own.
fn warn_if_open(state_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let (_, key) = paths(state_dir);
    for (path, mode_ok) in [(state_dir.join(DIR), 0o700), (key, 0o600)] {
        if let Ok(meta) = fs::metadata(&path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & !mode_ok != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "others may read or change the self-signed certificate's files: chmod {mode_ok:o} it");
            }
        }
    }
}

/// Read a certificate and key pair from PEM files.
pub fn read(cert_path: &Path, key_path: &Path) -> Result<CertPem, String> {
    let chain = fs::read(cert_path).map_err(|e| unreadable(cert_path, &e))?;
    let key = fs::read(key_path).map_err(|e| unreadable(key_path, &e))?;
    Ok(CertPem { chain, key })
}

/// `PATH: ERROR`, with the fix when this user may not read it.
fn unreadable(path: &Path, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "{}: {e}. Fix: the user oxbridge runs as must be able to read it, for example \
             `chgrp ssl-cert {0}; chmod 640 {0}` with SupplementaryGroups=ssl-cert in the \
             systemd unit",
            path.display()
        ),
        _ => format!("{}: {e}", path.display()),
    }
}

/// The SHA-256 fingerprint of the first certificate in `pem`, as
/// `openssl x509 -fingerprint -sha256` prints it (`AB:CD:...`).
pub fn fingerprint(pem: &[u8]) -> Option<String> {
    let der = rustls_pemfile::certs(&mut &pem[..]).next()?.ok()?;
    let digest = Sha256::digest(der.as_ref());
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    Some(hex.join(":"))
}

/// Make a pair in a new folder beside `tls` and rename it to `tls`.
/// `false` when another process got there first (its pair is used).
fn make(state_dir: &Path, hostname: &str) -> Result<bool, String> {
    create_private_dir(state_dir)?;
    let target = state_dir.join(DIR);
    // An empty `tls` (made by hand, or by an older version) is replaced.
    let _ = fs::remove_dir(&target);
    let staging = state_dir.join(format!(
        ".{DIR}-new-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = stage(&staging, hostname).and_then(|()| {
        match fs::rename(&staging, &target) {
            Ok(()) => Ok(true),
            // Another process published its pair first.
            Err(e) if target.is_dir() && e.raw_os_error().is_some() => Ok(false),
            Err(e) => Err(format!("{}: {e}", target.display())),
        }
    });
    let _ = fs::remove_dir_all(&staging);
    let made = result?;
    sync_dir(state_dir)?;
    Ok(made)
}

/// The key (0600) and certificate, synced, in a new 0700 folder.
fn stage(staging: &Path, hostname: &str) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(staging)
        .map_err(|e| format!("{}: {e}", staging.display()))?;
    let (cert, key) = generate(hostname).map_err(|e| format!("making a certificate: {e}"))?;
    write_new(&staging.join(KEY_FILE), &key, 0o600)?;
    write_new(&staging.join(CERT_FILE), &cert, 0o644)?;
    sync_dir(staging)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
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

/// Write `data` to a new file and sync it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    f.write_all(data).map_err(fail)?;
    f.sync_all().map_err(fail)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
    // A day early: printers' clocks are often behind.
    let not_before = Asn1Time::from_unix(unix_now() - 86_400)?;
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

    /// Several processes making the pair at once (replicas sharing a
    /// `state_dir`) all end up with the one that was published.
    #[test]
    fn racing_makers_share_one_pair() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_path_buf();
        let makers: Vec<_> = (0..4)
            .map(|_| {
                let state = state.clone();
                std::thread::spawn(move || load_or_make(&state, "gw").unwrap().0.chain)
            })
            .collect();
        let chains: Vec<_> = makers.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(chains.windows(2).all(|w| w[0] == w[1]));
        let left: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from(DIR)],
            "staging folders left behind"
        );
        let (cert, key) = paths(&state);
        let pem = read(&cert, &key).unwrap();
        let acceptor = super::super::device_tls::DeviceAcceptor::new(
            &pem,
            super::super::device_tls::DeviceTlsSettings {
                min_version: crate::config::TlsVersion::V1_0,
                session_tickets: false,
            },
        );
        assert!(acceptor.is_ok(), "the key matches the certificate");
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
        assert!(load(dir.path()).is_err());
    }
}
