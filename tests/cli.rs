//! The command line: exit statuses, config errors that name the key,
//! `hash-password`, and the example config.

use std::io::Write;
use std::process::{Command, Stdio};

fn oxbridge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_oxbridge"));
    c.env_remove("OXBRIDGE_CONFIG").env_remove("RUST_LOG");
    c
}

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.path().join("oxbridge.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_example_config_parses() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = 0;
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".toml") && name.contains("example") {
            found += 1;
            oxbridge::config::Config::load(&entry.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    assert!(found >= 1, "no example config found");
}

/// The README's "try it without a tenant" config: its `ca_file` exists
/// only once the test upstream has started, so a file that always exists
/// stands in for it here.
#[test]
fn the_demo_config_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/upstream/demo.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let ca = "/tmp/oxbridge-upstream/tls/ca.crt";
    assert!(text.contains(ca), "the demo config no longer names {ca}");
    let text = text.replace(ca, concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    oxbridge::config::Config::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
}

#[test]
fn missing_config_is_a_config_error() {
    let out = oxbridge()
        .args(["run", "--config", "/nonexistent/oxbridge.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/oxbridge.toml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn config_errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    for (broken, key) in [
        (
            example.replace("format = \"text\"", "format = \"text\"\nshade = 1"),
            "shade",
        ),
        (example.replace("tls = \"none\"", "tls = \"maybe\""), "tls"),
        (
            example.replace(
                "smtp = \"smtp.office365.com:587\"",
                "smtp = \"smtp.office365.com\"",
            ),
            "upstream.smtp",
        ),
        (
            example.replace(
                "grant = \"password\"",
                "grant = \"password\"\npassword_hash = \"x\"",
            ),
            "account[1].password_hash",
        ),
        (
            example.replace("# proxy_protocol = false ", "proxy_protocol = true\n# "),
            "listener[0].proxy_from: required with proxy_protocol = true",
        ),
        (
            example.replace(
                "# proxy_from = [\"10.0.0.0/24\"]",
                "proxy_from = [\"10.0.0.0/24\"]",
            ),
            "listener[0].proxy_from: only used with proxy_protocol = true",
        ),
    ] {
        let path = write(&dir, &broken);
        let out = oxbridge()
            .arg("run")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&path.display().to_string()) && err.contains(key),
            "{key}: {err}"
        );
    }
}

#[test]
fn config_from_environment_variable() {
    let out = oxbridge()
        .arg("run")
        .env("OXBRIDGE_CONFIG", "/nonexistent/from-env.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("from-env.toml"));
}

#[test]
fn usage_error_exits_2() {
    let out = oxbridge().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn port_in_use_is_a_runtime_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    let path = write(
        &dir,
        &example.replace("127.0.0.1:2525", &format!("127.0.0.1:{port}")),
    );
    let out = oxbridge()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listener[0].listen") && err.contains(&port.to_string()),
        "{err}"
    );
}

#[test]
fn hash_password_reads_stdin_and_verifies() {
    use argon2::{PasswordHash, PasswordVerifier};
    let mut child = oxbridge()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret printer pw\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let hash = stdout.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!stdout.contains("s3cret") && !String::from_utf8_lossy(&out.stderr).contains("s3cret"));
    let parsed = PasswordHash::new(hash).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"s3cret printer pw", &parsed)
        .is_ok());
    assert!(argon2::Argon2::default()
        .verify_password(b"s3cret printer pw\n", &parsed)
        .is_err());
}

#[test]
fn empty_password_is_refused() {
    let mut child = oxbridge()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

/// GnuTLS clients (msmtp, mpop) send the IP address they connect to as
/// SNI; rustls warns about it on every connection. That is no concern of
/// the operator's: the default log stays quiet, and the device is served.
#[test]
fn ip_address_as_sni_stays_out_of_the_default_log() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian's openssl package) makes the test certificate");
    assert!(made.status.success(), "{made:?}");
    let config = format!(
        "[oauth]\nclient_id = \"00000000-0000-0000-0000-000000000000\"\n\
         [[listener]]\nprotocol = \"imap\"\nlisten = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\n\
         [[account]]\nlogin = \"*@contoso.com\"\ngrant = \"password\"\n",
        cert.display(),
        key.display()
    );
    let path = write(&dir, &config);
    let mut server = oxbridge()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(server.stderr.take().unwrap());
    let mut seen = String::new();
    let port = loop {
        let mut line = String::new();
        assert!(log.read_line(&mut line).unwrap() > 0, "no listener: {seen}");
        seen.push_str(&line);
        if let Some(at) = line.find("address=127.0.0.1:") {
            let digits: String = line[at + 18..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            break digits;
        }
    };
    let mut client = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-servername", "127.0.0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut greeting = String::new();
    let mut reader = BufReader::new(client.stdout.take().unwrap());
    reader.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("* OK [CAPABILITY"), "{greeting:?}");
    drop(client.stdin.take());
    let _ = client.kill();
    let _ = client.wait();
    // SIGTERM, then the rest of the log.
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut log, &mut rest).unwrap();
    let _ = server.wait();
    seen.push_str(&rest);
    assert!(!seen.contains("SNI"), "{seen}");
    assert!(!seen.contains("WARN"), "{seen}");
}

// ---------------------------------------------------------------- check --offline

/// Run `oxbridge ARGS --config PATH` as a user without privileges: as
/// nobody with no capabilities when the test runs as root (root writes
/// anywhere and binds any port, so nothing would fail), else as is.
/// Returns the exit code and stdout then stderr.
fn unprivileged(args: &[&str], path: &std::path::Path) -> (Option<i32>, String) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_oxbridge"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_oxbridge"))
    };
    cmd.env_remove("OXBRIDGE_CONFIG")
        .env_remove("RUST_LOG")
        .args(args)
        .arg("--config")
        .arg(path);
    let out = cmd
        .output()
        .expect("setpriv (util-linux) runs the check unprivileged");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A directory every user may read (tempdir makes them 0700), for files an
/// unprivileged oxbridge must read.
fn open_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Write `name` in `dir`, readable by all.
fn put(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A self-signed certificate and its unencrypted key, `NAME.crt`/`NAME.key`.
fn pair(dir: &tempfile::TempDir, name: &str) -> (String, String) {
    let cert = dir.path().join(format!("{name}.crt")).display().to_string();
    let key = dir.path().join(format!("{name}.key")).display().to_string();
    openssl(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gw",
        "-keyout", &key, "-out", &cert,
    ]);
    (cert, key)
}

/// A config with one listener (`listener` holds its TLS lines) and a
/// `password` grant account, which needs nothing on disk.
fn one_listener(state_dir: &std::path::Path, listen: &str, listener: &str) -> String {
    format!(
        "state_dir = \"{}\"\n[oauth]\nclient_id = \"00000000-0000-0000-0000-000000000000\"\n\
         [[listener]]\nprotocol = \"smtp\"\nlisten = \"{listen}\"\n{listener}\n\
         [[account]]\nlogin = \"*@contoso.com\"\ngrant = \"password\"\n",
        state_dir.display()
    )
}

/// Each way a certificate or key cannot be used is found by `check
/// --offline` (exit 2, the key and the fix), on a rustls listener and on an
/// OpenSSL one (`tls_min_version = "1.0"`); `run` would have failed on it.
#[test]
fn check_offline_refuses_each_unusable_certificate_or_key_with_its_fix() {
    let dir = open_dir();
    let (cert, key) = pair(&dir, "gw");
    let (_, other_key) = pair(&dir, "other");
    let der = dir.path().join("gw.der").display().to_string();
    openssl(&["x509", "-in", &cert, "-outform", "der", "-out", &der]);
    let encrypted = dir.path().join("encrypted.key").display().to_string();
    openssl(&[
        "pkey",
        "-in",
        &key,
        "-aes128",
        "-passout",
        "pass:secret",
        "-out",
        &encrypted,
    ]);
    let cases = [
        (
            &der,
            &key,
            "listener[0]: cert_file",
            "PEM expected (convert it: openssl x509 -inform der -in",
        ),
        (
            &cert,
            &encrypted,
            "listener[0]: key_file",
            "encrypted with a passphrase; decrypt it: openssl pkey -in",
        ),
        (
            &cert,
            &other_key,
            "listener[0]: key_file",
            "does not match the certificate",
        ),
        (
            &cert,
            &cert,
            "listener[0]: key_file",
            "holds a certificate, not a private key",
        ),
    ];
    for legacy in ["", "tls_min_version = \"1.0\"\n"] {
        for (c, k, key_name, fix) in cases {
            let tls =
                format!("tls = \"starttls\"\ncert_file = \"{c}\"\nkey_file = \"{k}\"\n{legacy}");
            let path = write(&dir, &one_listener(dir.path(), "127.0.0.1:0", &tls));
            // `run` finds it the same way, with the same exit status (a
            // config error, which systemd does not restart).
            for command in [&["check", "--offline"][..], &["run"][..]] {
                let out = oxbridge()
                    .args(command)
                    .arg("--config")
                    .arg(&path)
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(2),
                    "{command:?} {legacy}{fix}: {err}"
                );
                assert!(
                    err.contains(key_name) && err.contains(fix),
                    "{command:?} {legacy}{fix}: {err}"
                );
                assert!(!err.contains("secret"), "{err}");
            }
        }
    }
    // The good pair passes.
    let tls = format!("tls = \"implicit\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n");
    let path = write(&dir, &one_listener(dir.path(), "127.0.0.1:0", &tls));
    let out = oxbridge()
        .args(["check", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// A port below 1024 without CAP_NET_BIND_SERVICE: `check --offline`
/// says so with the three ways out, and exits 2; so does `run`, which
/// systemd then stops restarting.
#[test]
fn a_low_port_without_the_capability_names_cap_net_bind_service() {
    let dir = open_dir();
    let state = dir.path().join("state");
    let path = put(
        &dir,
        "oxbridge.toml",
        &one_listener(
            &state,
            "127.0.0.1:25",
            "tls = \"none\"\nallow_plaintext_auth = true",
        ),
    );
    for command in [&["check", "--offline"][..], &["run"][..]] {
        let (code, text) = unprivileged(command, &path);
        assert_eq!(code, Some(2), "{command:?}: {text}");
        for fix in [
            "listener[0].listen: cannot bind 127.0.0.1:25: Permission denied",
            "ports below 1024 need CAP_NET_BIND_SERVICE",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "setcap 'cap_net_bind_service=+ep'",
            "a port of 1024 or above",
        ] {
            assert!(text.contains(fix), "{command:?}: {fix}: {text}");
        }
    }
}

/// A port another program holds is a warning for `check` (before a
/// reload the running oxbridge holds its own ports) that names how to find
/// the program; an address this machine does not have is a failure.
#[test]
fn a_port_in_use_is_a_warning_and_a_foreign_address_a_failure() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = open_dir();
    let listener = "tls = \"none\"\nallow_plaintext_auth = true";
    let path = write(
        &dir,
        &one_listener(dir.path(), &format!("127.0.0.1:{port}"), listener),
    );
    let out = oxbridge()
        .args(["check", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        said.contains(&format!(
            "listener[0].listen: WARNING: 127.0.0.1:{port} is in use now"
        )) && said.contains(&format!("ss -ltnp 'sport = :{port}'")),
        "{said}"
    );
    let path = write(&dir, &one_listener(dir.path(), "192.0.2.1:2525", listener));
    let out = oxbridge()
        .args(["check", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("listener[0].listen: cannot bind 192.0.2.1:2525")
            && err.contains("no interface of this machine has that address"),
        "{err}"
    );
    // `run` exits 1 there, not 2: the address may come (DHCP at boot, a
    // floating address), and systemd retries only what is not a config
    // error.
    let out = oxbridge()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot bind 192.0.2.1:2525"), "{err}");
}

/// A `state_dir` the running user cannot write, where `run` would need it
/// (a self-signed certificate, a token store, the spool): `check
/// --offline` names the user it ran as and who must own the directory.
/// The self-signed certificate is not made by the check.
#[test]
fn an_unwritable_state_dir_names_the_user_and_who_must_own_it() {
    let dir = open_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap(); // root's, 0755
    let path = put(
        &dir,
        "oxbridge.toml",
        &one_listener(&state, "127.0.0.1:0", "tls = \"implicit\""),
    );
    let (code, text) = unprivileged(&["check", "--offline"], &path);
    assert_eq!(code, Some(2), "{text}");
    let dir_shown = state.display().to_string();
    for fix in [
        format!("state_dir: {dir_shown}: not writable by "),
        "Permission denied".to_string(),
        "StateDirectory=oxbridge".to_string(),
        "chown -R ".to_string(),
    ] {
        assert!(text.contains(&fix), "{fix}: {text}");
    }
    assert!(
        !state.join("tls").exists(),
        "the check made the certificate"
    );
    // Writable: OK, and still nothing made.
    let out = oxbridge()
        .args(["check", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        !state.join("tls").exists(),
        "the check made the certificate"
    );
}

/// The spool under `state_dir` when `spool.dir` is not set: its error
/// says where the directory comes from.
#[test]
fn an_unwritable_default_spool_names_state_dir_spool() {
    let dir = open_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap(); // root's, 0755
    let path = put(
        &dir,
        "oxbridge.toml",
        &one_listener(
            &state,
            "127.0.0.1:0",
            "tls = \"none\"\nallow_plaintext_auth = true\ndelivery = \"spool\"",
        ),
    );
    let (code, text) = unprivileged(&["check", "--offline"], &path);
    assert_eq!(code, Some(2), "{text}");
    let spool = state.join("spool").display().to_string();
    assert!(
        text.contains(&format!("spool.dir: cannot open {spool}"))
            && text.contains("spool.dir is not set, so the spool is state_dir/spool")
            && text.contains("delivery = \"spool\""),
        "{text}"
    );
}

/// `oxbridge queue list` where no listener spools says which setting
/// makes a spool.
#[test]
fn queue_without_a_spool_says_which_setting_makes_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        &one_listener(
            dir.path(),
            "127.0.0.1:0",
            "tls = \"none\"\nallow_plaintext_auth = true",
        ),
    );
    let out = oxbridge()
        .args(["queue", "list", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no [[listener]] has delivery = \"spool\"")
            && err.contains("an SMTP [[listener]] with delivery = \"spool\""),
        "{err}"
    );
}
