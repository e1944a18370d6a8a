//! The config fixtures in `tests/config/`: every file in `valid/` loads, and
//! every file in `invalid/` fails with an error that names the file and
//! contains the fragment on its first line (`# error: listener[0].cert_file`).
//!
//! A fixture may also say `# secret: TEXT`: the error must not contain TEXT.
//! Fixtures that need files on disk (certificates, a client secret) write
//! `@FILES@/name`; the test creates those files in a temporary directory,
//! substitutes its path (in the fragment too) and loads a copy from there.
//! Fast tier: no root, no network.

use std::path::{Path, PathBuf};

use oxbridge::config::Config;

/// Stands for the directory of [`FILES`] in a fixture.
const PLACEHOLDER: &str = "@FILES@";
/// What `@FILES@/` offers. The config loader reads only the client secret;
/// the rest need only exist.
const FILES: [(&str, &str); 6] = [
    (
        "cert.pem",
        "certificate: only its existence is checked at load\n",
    ),
    (
        "key.pem",
        "private key: only its existence is checked at load\n",
    ),
    (
        "ca.pem",
        "CA roots: only their existence is checked at load\n",
    ),
    (
        "app.pem",
        "client certificate: only its existence is checked at load\n",
    ),
    ("client_secret", "fixture-client-secret\n"),
    ("empty_secret", "  \n"),
];
const ERROR_PREFIX: &str = "# error: ";
const SECRET_PREFIX: &str = "# secret: ";

/// A fixture ready to load: where it is, and its text with `@FILES@` filled in.
struct Fixture {
    name: String,
    path: PathBuf,
    text: String,
}

/// Every `.toml` in `tests/config/<kind>/`, sorted, with the placeholder
/// resolved against `files`; at least one, or the test would prove nothing.
fn fixtures(kind: &str, files: &Path) -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config")
        .join(kind);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixture in {}", dir.display());
    let copies = files.join(kind);
    std::fs::create_dir_all(&copies).unwrap();
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            if !text.contains(PLACEHOLDER) {
                return Fixture { name, path, text };
            }
            let text = text.replace(PLACEHOLDER, &files.display().to_string());
            let path = copies.join(&name);
            std::fs::write(&path, &text).unwrap();
            Fixture { name, path, text }
        })
        .collect()
}

/// A directory holding [`FILES`].
fn files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in FILES {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    dir
}

#[test]
fn valid_configs_load() {
    let files = files();
    let failures: Vec<String> = fixtures("valid", files.path())
        .into_iter()
        .filter_map(|f| {
            Config::load(&f.path)
                .err()
                .map(|e| format!("{}: {e}", f.name))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_configs_fail_naming_the_file_and_the_mistake() {
    let files = files();
    let mut failures = Vec::new();
    for f in fixtures("invalid", files.path()) {
        let Some(expected) = f
            .text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix(ERROR_PREFIX))
            .filter(|e| !e.trim().is_empty())
        else {
            failures.push(format!("{}: first line is not `{ERROR_PREFIX}...`", f.name));
            continue;
        };
        let err = match Config::load(&f.path) {
            Ok(_) => {
                failures.push(format!("{}: loaded, expected {expected:?}", f.name));
                continue;
            }
            Err(e) => e.to_string(),
        };
        if !err.contains(expected) {
            failures.push(format!("{}: expected {expected:?} in: {err}", f.name));
        }
        if !err.contains(&f.path.display().to_string()) {
            failures.push(format!(
                "{}: the error does not name the file: {err}",
                f.name
            ));
        }
        for secret in f.text.lines().filter_map(|l| l.strip_prefix(SECRET_PREFIX)) {
            if err.contains(secret) {
                failures.push(format!("{}: the error quotes {secret:?}: {err}", f.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
