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
