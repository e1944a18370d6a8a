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
