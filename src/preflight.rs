//! What `oxbridge run` loads from this machine before it serves, loaded
//! the same way and by the same code, without serving: every listener's
//! certificate and key (the acceptor `run` builds), the listen addresses
//! (bound and released), `state_dir`, the token store's key and the spool
//! directory (written to by this user), the client certificate and the
//! upstream CA roots. `oxbridge check` (with or without `--offline`) runs
//! it after the config has loaded, and so does `run` before it binds:
//! each failure is exit status 2 with its fix, which systemd does not
//! restart.
//!
//! Promises: nothing is left behind. The self-signed certificate of a TLS
//! listener without `cert_file` is not made here (only `run` makes it);
//! where it would be made, `state_dir` must be writable. A directory not
//! there yet is judged by the nearest one that is (which `run` would
//! create it in). A port in use is a warning, not a failure: before a
//! reload the running oxbridge holds its own ports. Files and directories
//! are checked as the user this process runs as, which the first line
//! names.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, Grant, StoreBackend, TlsMode};
use crate::fixes;
use crate::listener::Listener;
use crate::net::self_signed;
use crate::state::seal::KeySource;
use crate::state::State;

/// What the look found: lines to print, and the failures (each with its
/// fix), which make `check` and `run` exit 2.
#[derive(Debug, Default)]
pub struct Preflight {
    pub lines: Vec<String>,
    pub failures: Vec<String>,
    /// Addresses that cannot be bound now but may be soon (not there yet
    /// at boot, a floating address on a standby node): failures to
    /// `check`, not to `run`, which binds for real and exits 1 (systemd
    /// then retries) rather than 2 (it would not).
    pub unavailable: Vec<String>,
}

/// Look at everything `run` will load for `config`.
pub fn offline(config: &Config) -> Preflight {
    let mut p = Preflight::default();
    let user = fixes::user();
    p.lines.push(format!(
        "files and directories checked as {user}: `oxbridge run` must run as this user for these lines to hold"
    ));
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        p.lines.push(
            "WARNING: root may write anywhere: run this check as the user oxbridge runs as".into(),
        );
    }
    listeners(config, &user, &mut p);
    if let Some(admin) = &config.admin {
        bind("admin.listen", admin.listen, &mut p);
    }
    store(config, &user, &mut p);
    spool(config, &user, &mut p);
    upstream(config, &mut p);
    p
}

/// Each listener: its certificate (or where the self-signed one will be
/// made) and its address.
fn listeners(config: &Config, user: &str, p: &mut Preflight) {
    for (i, l) in config.listeners.iter().enumerate() {
        let key = format!("listener[{i}]");
        let mut said = format!("{key} {} {}: can listen", l.protocol, l.listen);
        if l.tls != TlsMode::None {
            let (cert, private) = self_signed::paths(&config.state_dir);
            let to_make = l.cert_file.is_none() && !exists(&cert) && !exists(&private);
            if to_make {
                match writable(&config.state_dir) {
                    Ok(()) => said.push_str(&format!(
                        "; `run` makes its self-signed certificate in {} (not made by this check)",
                        cert.parent().unwrap_or(config.state_dir.as_path()).display()
                    )),
                    Err(e) => p.failures.push(format!(
                        "{key}: no cert_file, so `run` makes a self-signed certificate in state_dir/tls; {}",
                        fixes::not_writable("state_dir", &config.state_dir, user, &e)
                    )),
                }
            } else {
                // The acceptor `run` builds, from the same files.
                match Listener::new(l, &config.state_dir, "oxbridge") {
                    Ok(built) => said.push_str(&format!(
                        "; certificate and key load (SHA-256 {})",
                        built.fingerprint().unwrap_or_default()
                    )),
                    Err(e) => p.failures.push(format!("{key}: {e}")),
                }
            }
        }
        if bind(&format!("{key}.listen"), l.listen, p) {
            p.lines.push(said);
        }
    }
}

/// Bind `addr` and release it at once; `true` if it could be bound. A
/// port in use is a warning line; only a refusal (a port below 1024
/// without the capability) is a failure `run` stops on.
fn bind(key: &str, addr: SocketAddr, p: &mut Preflight) -> bool {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            p.lines.push(fixes::in_use_warning(key, addr));
            false
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            p.failures.push(fixes::bind_error(key, addr, &e));
            false
        }
        Err(e) => {
            p.unavailable.push(fixes::bind_error(key, addr, &e));
            false
        }
    }
}

/// The token store, where `run` opens one: `state_dir` and `tokens/`
/// writable, and the key readable (or, for the file backend, makeable).
fn store(config: &Config, user: &str, p: &mut Preflight) {
    let refresh = config
        .accounts
        .iter()
        .any(|a| a.grant == Grant::RefreshToken);
    let key = KeySource::of(config);
    match config.store.backend {
        StoreBackend::Redis => {
            if let Err(e) = key.read(false) {
                p.failures.push(format!(
                    "{e}. Fix: every replica needs the same key: give each the same file (32 random bytes: head -c 32 /dev/urandom > FILE; chmod 600 FILE) or the same key_env"
                ));
            }
        }
        StoreBackend::File if refresh => {
            let tokens = config.state_dir.join("tokens");
            if let Err(e) = writable(&tokens) {
                p.failures.push(format!(
                    "a refresh_token account keeps its token in state_dir; {}",
                    fixes::not_writable("state_dir", &config.state_dir, user, &e)
                ));
                return;
            }
            let result = match &key {
                KeySource::File(path) if !exists(path) => match path.parent() {
                    Some(dir) => writable(dir).map_err(|e| {
                        fixes::not_writable("store.key_file", dir, user, &e)
                            + " (the key file is made there on first use)"
                    }),
                    None => Ok(()),
                },
                _ => key.read(false).map(drop),
            };
            match result {
                Ok(()) => p.lines.push(format!(
                    "token store: {} is writable",
                    config.state_dir.display()
                )),
                Err(e) => p.failures.push(e),
            }
        }
        StoreBackend::File => {}
    }
}

/// The spool of a listener with `delivery = "spool"`: its directory and
/// the folders `run` makes in it, writable.
fn spool(config: &Config, user: &str, p: &mut Preflight) {
    if !config.spools() {
        return;
    }
    let dir = config.spool.dir(&config.state_dir);
    let failed = ["", "tmp", "queue", "dead", "retry"]
        .into_iter()
        .find_map(|sub| writable(&dir.join(sub)).err());
    match failed {
        None => p
            .lines
            .push(format!("spool: {} is writable", dir.display())),
        Some(e) => {
            let e = io::Error::new(e.kind(), format!("not writable by {user}: {e}"));
            p.failures
                .push(config.spool.open_error(&config.state_dir, &e));
        }
    }
}

/// The upstream TLS roots (`upstream.ca_file`) and the client certificate
/// (`oauth.client_certificate_file`), read as `run` reads them.
fn upstream(config: &Config, p: &mut Preflight) {
    let providers = config.providers();
    if let Err(e) = crate::upstream::Dialer::new(&config.upstream, &providers[0]) {
        p.failures.push(e);
    }
    let nothing = Arc::new(State::File(None));
    if let Err(e) = crate::oauth::Tokens::new(&providers, config, nothing) {
        p.failures.push(e);
    }
}

/// Whether something is at `path` (a broken link counts).
fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Whether this user can make files in `dir`, or, if it is not there yet,
/// in the nearest directory above it that is (where `run` would make it):
/// a file is made and removed at once.
pub fn writable(dir: &Path) -> io::Result<()> {
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(io::Error::other("not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match at.parent() {
                Some(up) if !up.as_os_str().is_empty() => at = up,
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    let probe = at.join(format!(
        ".oxbridge-check-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_not_made_yet_is_judged_by_the_one_above_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        writable(&dir.path().join("a/b/c")).unwrap();
        assert!(!dir.path().join("a").exists());
        writable(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = writable(&file).unwrap_err();
        assert_eq!(err.to_string(), "not a directory");
    }

    #[test]
    fn a_config_whose_files_are_fine_has_no_failure_and_makes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let text = format!(
            "state_dir = \"{}\"\n[oauth]\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             [[listener]]\nprotocol = \"imap\"\nlisten = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
             [[listener]]\nprotocol = \"smtp\"\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\n\
             allow_plaintext_auth = true\ndelivery = \"spool\"\n\
             [[account]]\nlogin = \"a@x.test\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$P4NFpwJiZMZfcER4vR97Aw$GUbATMYy+8jUE/yMpkmNHEcWYQ5nKwBQB/cBygLpvsU\"\n\
             grant = \"refresh_token\"\n",
            state.display()
        );
        let config = Config::parse(&text).unwrap();
        let p = offline(&config);
        assert!(p.failures.is_empty(), "{p:?}");
        assert!(!state.exists(), "the check made {}", state.display());
        let lines = p.lines.join("\n");
        assert!(lines.contains("listener[0] imap 127.0.0.1:0: can listen; `run` makes its self-signed certificate in"), "{lines}");
        assert!(
            lines.contains("spool: ") && lines.contains("token store: "),
            "{lines}"
        );
        assert!(!lines.contains(": OK"), "{lines}");
    }
}
