//! The token cache, the grants and the lease against a fake token
//! endpoint on a loopback port (and a Redis that is never there): the
//! endpoint and the helpers, refresh-token rotation and its failures here;
//! the cache and the grants' requests in `tests/cache.rs`.

use super::*;
use crate::state::seal::KeySource;
use crate::state::{FileStore, RedisStore};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A fake token endpoint: answers each request after `delay` with the
/// next of `replies` (the last one repeats), counting requests.
async fn endpoint(replies: Vec<(u16, String)>, delay: Duration) -> (String, Arc<AtomicUsize>) {
    let (url, count, _) = recording_endpoint(replies, delay).await;
    (url, count)
}

type Bodies = Arc<std::sync::Mutex<Vec<String>>>;

/// [`endpoint`], also keeping every request it received.
async fn recording_endpoint(
    replies: Vec<(u16, String)>,
    delay: Duration,
) -> (String, Arc<AtomicUsize>, Bodies) {
    let bodies: Bodies = Default::default();
    let log = bodies.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/tenant/oauth2/v2.0/token",
        listener.local_addr().unwrap()
    );
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let (status, body) = replies[n.min(replies.len() - 1)].clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                // Read the headers and the body (Content-Length).
                loop {
                    let k = s.read(&mut buf).await.unwrap_or(0);
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                    let text = String::from_utf8_lossy(&got).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).into_owned());
                tokio::time::sleep(delay).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, count, bodies)
}

fn ok(token: &str, expires_in: u64) -> (u16, String) {
    (
        200,
        format!(r#"{{"token_type":"Bearer","expires_in":{expires_in},"access_token":"{token}"}}"#),
    )
}

/// The tokens of the file backend without a token store.
fn tokens(url: &str) -> Tokens {
    tokens_in(url, State::File(None))
}

fn tokens_in(url: &str, state: State) -> Tokens {
    let config: OAuthConfig = toml::from_str(&format!(
        "client_id = \"app\"\nclient_secret = \"app-secret\"\ntoken_url = \"{url}\""
    ))
    .unwrap();
    let mut t = Tokens::with(
        &providers(&config),
        &config,
        &[Protocol::Smtp],
        None,
        Arc::new(state),
    )
    .unwrap();
    t.backoff = Duration::from_millis(10);
    t
}

fn file_store(dir: &std::path::Path) -> FileStore {
    FileStore::open(dir, &KeySource::File(dir.join("k"))).unwrap()
}

/// Tokens of the file backend with a token store in `dir` (holding
/// `refresh_token`, if any), and a second handle on that store.
fn with_store(
    url: &str,
    dir: &std::path::Path,
    refresh_token: Option<&str>,
) -> (Tokens, FileStore) {
    let store = file_store(dir);
    if let Some(rt) = refresh_token {
        store
            .save("acct@x.test", &SecretString::from(rt.to_string()))
            .unwrap();
    }
    (tokens_in(url, State::File(Some(store))), file_store(dir))
}

fn rotated(token: &str, expires_in: u64, refresh: &str) -> (u16, String) {
    (
        200,
        format!(
            r#"{{"token_type":"Bearer","expires_in":{expires_in},"access_token":"{token}","refresh_token":"{refresh}"}}"#
        ),
    )
}

fn stored(store: &FileStore) -> String {
    store
        .load("acct@x.test")
        .unwrap()
        .unwrap()
        .expose_secret()
        .to_string()
}

#[tokio::test]
async fn refresh_rotation_is_persisted_and_the_old_token_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (url, count, bodies) = recording_endpoint(
        vec![rotated("at-1", 1, "rt-2"), rotated("at-2", 3600, "rt-3")],
        Duration::ZERO,
    )
    .await;
    let (tokens, store) = with_store(&url, dir.path(), Some("rt-1"));
    let id = identity(Grant::RefreshToken, "acct@x.test", None);
    assert_eq!(
        tokens
            .get(&id, Protocol::Smtp)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "at-1"
    );
    assert_eq!(stored(&store), "rt-2");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        tokens
            .get(&id, Protocol::Smtp)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "at-2"
    );
    assert_eq!(stored(&store), "rt-3");
    let bodies = bodies.lock().unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(
        bodies[0].contains("grant_type=refresh_token") && bodies[0].contains("refresh_token=rt-1"),
        "{}",
        bodies[0]
    );
    assert!(bodies[0].contains("offline_access"), "{}", bodies[0]);
    assert!(
        bodies[1].contains("refresh_token=rt-2") && !bodies[1].contains("rt-1"),
        "{}",
        bodies[1]
    );
    for f in std::fs::read_dir(dir.path().join("tokens")).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(4).any(|w| w == b"rt-3"),
            "refresh token in clear text on disk"
        );
    }
}

#[tokio::test]
async fn redis_down_keeps_and_uses_the_rotated_refresh_token() {
    let (url, _, bodies) = recording_endpoint(
        vec![rotated("at-1", 1, "rt-2"), rotated("at-2", 3600, "rt-3")],
        Duration::ZERO,
    )
    .await;
    // Nothing listens on port 1: every Redis operation fails.
    let redis = Arc::new(
        RedisStore::new(
            &SecretString::from("redis://127.0.0.1:1/".to_string()),
            None,
            secrecy::SecretBox::new(Box::new(vec![3u8; 32])),
        )
        .unwrap(),
    );
    redis
        .save_refresh_or_keep("acct@x.test", &SecretString::from("rt-1".to_string()))
        .await;
    let tokens = tokens_in(&url, State::Redis(redis.clone()));
    let id = identity(Grant::RefreshToken, "acct@x.test", None);
    assert_eq!(
        tokens
            .get(&id, Protocol::Smtp)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "at-1"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        tokens
            .get(&id, Protocol::Smtp)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "at-2"
    );
    let bodies = bodies.lock().unwrap().clone();
    assert!(bodies[0].contains("refresh_token=rt-1"), "{}", bodies[0]);
    assert!(bodies[1].contains("refresh_token=rt-2"), "{}", bodies[1]);
    assert_eq!(redis.pending_writes(), 1);
    assert_eq!(
        redis
            .load_refresh("acct@x.test")
            .await
            .unwrap()
            .unwrap()
            .expose_secret(),
        "rt-3"
    );
}

#[tokio::test]
async fn expiry_during_a_burst_refreshes_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, count) = endpoint(
        vec![rotated("at-1", 1, "rt-2"), rotated("at-2", 3600, "rt-3")],
        Duration::from_millis(200),
    )
    .await;
    let (tokens, _store) = with_store(&url, dir.path(), Some("rt-1"));
    let tokens = Arc::new(tokens);
    let id = identity(Grant::RefreshToken, "acct@x.test", None);
    tokens.get(&id, Protocol::Smtp).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let id = identity(Grant::RefreshToken, "acct@x.test", None);
            tokens
                .get(&id, Protocol::Smtp)
                .await
                .map(|t| t.secret.expose_secret().to_string())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "at-2");
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn endpoint_down_longer_than_the_token_life_then_back() {
    let dir = tempfile::tempdir().unwrap();
    let down = (503, String::new());
    let mut replies = vec![rotated("at-1", 1, "rt-2")];
    replies.extend(std::iter::repeat_n(down, 6));
    replies.push(rotated("at-2", 3600, "rt-3"));
    let (url, count) = endpoint(replies, Duration::ZERO).await;
    let (tokens, store) = with_store(&url, dir.path(), Some("rt-1"));
    let id = identity(Grant::RefreshToken, "acct@x.test", None);
    tokens.get(&id, Protocol::Smtp).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        let err = tokens.get(&id, Protocol::Smtp).await.err().unwrap();
        assert!(err.is_temporary(), "{err}");
        assert_eq!(
            stored(&store),
            "rt-2",
            "a temporary failure must not touch the stored token"
        );
    }
    assert_eq!(count.load(Ordering::SeqCst), 1 + 2 * MAX_ATTEMPTS as usize);
    assert_eq!(
        tokens
            .get(&id, Protocol::Smtp)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "at-2"
    );
    assert_eq!(stored(&store), "rt-3");
}

#[tokio::test]
async fn invalid_grant_says_what_to_do_and_keeps_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let refused = (
        400,
        r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity."}"#.to_string(),
    );
    let (url, _) = endpoint(vec![refused], Duration::ZERO).await;
    let (tokens, store) = with_store(&url, dir.path(), Some("rt-1"));
    let err = tokens
        .get(
            &identity(Grant::RefreshToken, "acct@x.test", None),
            Protocol::Smtp,
        )
        .await
        .err()
        .unwrap();
    assert!(!err.is_temporary());
    let text = err.to_string();
    assert!(
        text.contains("AADSTS700082") && text.contains("run `oxbridge login acct@x.test`"),
        "{text}"
    );
    assert_eq!(stored(&store), "rt-1");

    let (tokens, _) = with_store(&url, tempfile::tempdir().unwrap().path(), None);
    let err = tokens
        .get(
            &identity(Grant::RefreshToken, "acct@x.test", None),
            Protocol::Smtp,
        )
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("no refresh token stored; run `oxbridge login acct@x.test`"),
        "{err}"
    );
}

fn identity(grant: Grant, login: &str, password: Option<&str>) -> Identity {
    Identity {
        account: login.into(),
        login: login.into(),
        mailbox: crate::mailbox::Mailbox::parse(login).unwrap(),
        grant,
        password: password.map(|p| SecretString::from(p.to_string())),
        graph: false,
        rewrite_sender: false,
        provider: crate::config::provider::test_providers().remove(0),
    }
}

/// `[oauth]` as the only provider.
fn providers(config: &OAuthConfig) -> Vec<Arc<crate::config::Provider>> {
    vec![Arc::new(crate::config::Provider::of_oauth(
        config,
        &Default::default(),
    ))]
}

mod cache;
mod google;
