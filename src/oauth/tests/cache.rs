//! The access-token cache and the grants' requests: certificate
//! assertions, Retry-After, single flight, password binding, renewal,
//! failure classes and the time a session's token has left.

use super::*;

#[tokio::test]
async fn certificate_credentials_send_an_assertion_not_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("app.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=app",
        ])
        .arg("-keyout")
        .arg(dir.path().join("key.pem"))
        .arg("-out")
        .arg(dir.path().join("cert.pem"))
        .output()
        .unwrap();
    assert!(ok.status.success());
    let mut both = std::fs::read(dir.path().join("cert.pem")).unwrap();
    both.extend(std::fs::read(dir.path().join("key.pem")).unwrap());
    std::fs::write(&pem, both).unwrap();
    let (url, _, bodies) = recording_endpoint(vec![ok_token()], Duration::ZERO).await;
    let config: OAuthConfig = toml::from_str(&format!(
        "client_id = \"app\"\nclient_secret = \"unused-secret\"\nclient_certificate_file = \"{}\"\ntoken_url = \"{url}\"",
        pem.display()
    ))
    .unwrap();
    let tokens = Tokens::with(
        &super::providers(&config),
        &config,
        &[Protocol::Smtp],
        None,
        Arc::new(State::File(None)),
    )
    .unwrap();
    tokens
        .get(
            &identity(Grant::ClientCredentials, "a@x.test", None),
            Protocol::Smtp,
        )
        .await
        .unwrap();
    let body = bodies.lock().unwrap()[0].clone();
    assert!(body.contains("client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"), "{body}");
    assert!(body.contains("client_assertion=ey"), "{body}");
    assert!(!body.contains("unused-secret"), "{body}");
}

fn ok_token() -> (u16, String) {
    ok("tok", 3600)
}

#[tokio::test]
async fn retry_after_is_honoured_within_bounds() {
    let (url, count) = endpoint(vec![(429, String::new()), ok("tok", 3600)], Duration::ZERO).await;
    let tokens = tokens(&url);
    let t = std::time::Instant::now();
    tokens
        .get(
            &identity(Grant::ClientCredentials, "a@x.test", None),
            Protocol::Smtp,
        )
        .await
        .unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn concurrent_logins_make_one_request_then_hit_the_cache() {
    assert!(refresh_margin(Duration::from_secs(3600)) >= Duration::from_secs(600));
    assert!(refresh_margin(Duration::from_secs(3600)) <= Duration::from_secs(720));
    let (url, count) = endpoint(vec![ok("tok-1", 3600)], Duration::from_millis(200)).await;
    let tokens = Arc::new(tokens(&url));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let id = identity(Grant::ClientCredentials, &format!("dev{i}@x.test"), None);
            tokens
                .get(&id, Protocol::Smtp)
                .await
                .map(|t| t.secret.expose_secret().to_string())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "tok-1");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
    let again = tokens
        .get(
            &identity(Grant::ClientCredentials, "a@x.test", None),
            Protocol::Smtp,
        )
        .await
        .unwrap();
    assert!(!again.fresh);
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn password_grant_cache_is_bound_to_the_password() {
    let (url, count) = endpoint(vec![ok("tok-a", 3600), ok("tok-b", 3600)], Duration::ZERO).await;
    let tokens = tokens(&url);
    let right = identity(Grant::Password, "u@x.test", Some("right"));
    assert!(tokens.get(&right, Protocol::Smtp).await.unwrap().fresh);
    assert!(!tokens.get(&right, Protocol::Smtp).await.unwrap().fresh);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Another password never gets the cached token: it goes to the endpoint.
    let other = identity(Grant::Password, "u@x.test", Some("other"));
    let t = tokens.get(&other, Protocol::Smtp).await.unwrap();
    assert!(t.fresh);
    assert_eq!(t.secret.expose_secret(), "tok-b");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn refused_cached_token_is_replaced() {
    let (url, count) = endpoint(vec![ok("tok-1", 3600), ok("tok-2", 3600)], Duration::ZERO).await;
    let tokens = tokens(&url);
    let id = identity(Grant::ClientCredentials, "a@x.test", None);
    let first = tokens.get(&id, Protocol::Smtp).await.unwrap();
    tokens.invalidate(&id, &first.secret).await;
    let second = tokens.get(&id, Protocol::Smtp).await.unwrap();
    assert_eq!(second.secret.expose_secret(), "tok-2");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn tokens_are_renewed_before_expiry() {
    let (url, count) = endpoint(vec![ok("short", 1), ok("next", 3600)], Duration::ZERO).await;
    let tokens = tokens(&url);
    let id = identity(Grant::ClientCredentials, "a@x.test", None);
    assert_eq!(
        tokens
            .get(&id, Protocol::Smtp)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "short"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        tokens
            .get(&id, Protocol::Smtp)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "next"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failures_are_classified() {
    let refused = (
        400,
        r#"{"error":"invalid_grant","error_description":"AADSTS50126: Error validating credentials.\r\nTrace ID: x","error_codes":[50126]}"#.to_string(),
    );
    let (url, _) = endpoint(vec![refused], Duration::ZERO).await;
    let err = tokens(&url)
        .get(
            &identity(Grant::Password, "u@x.test", Some("pw-marker")),
            Protocol::Smtp,
        )
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, AuthError::TokenRefused(d) if d == "invalid_grant: AADSTS50126: Error validating credentials."),
        "{err}"
    );
    assert!(!err.to_string().contains("pw-marker"));

    for reply in [
        (503, "".to_string()),
        (429, "{}".to_string()),
        (200, "garbage".to_string()),
        (400, r#"{"error":"temporarily_unavailable"}"#.to_string()),
    ] {
        let (url, _) = endpoint(vec![reply.clone()], Duration::ZERO).await;
        let err = tokens(&url)
            .get(
                &identity(Grant::ClientCredentials, "a@x.test", None),
                Protocol::Smtp,
            )
            .await
            .err()
            .unwrap();
        assert!(err.is_temporary(), "{reply:?} -> {err}");
    }
}

#[tokio::test]
async fn a_temporary_failure_keeps_a_still_valid_token() {
    // 4 s lifetime: renewed after 3 s, expires after 4 s; retries fit in between.
    let (url, count) = endpoint(vec![ok("tok-1", 4), (503, String::new())], Duration::ZERO).await;
    let tokens = tokens(&url);
    let id = identity(Grant::ClientCredentials, "a@x.test", None);
    tokens.get(&id, Protocol::Smtp).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let t = tokens.get(&id, Protocol::Smtp).await.unwrap();
    assert_eq!(t.secret.expose_secret(), "tok-1");
    assert_eq!(count.load(Ordering::SeqCst), 1 + MAX_ATTEMPTS as usize);
}

#[tokio::test]
async fn session_logins_get_a_token_with_three_quarters_of_its_life_left() {
    // 4 s tokens: IMAP and POP3 need 3 s left, SMTP (set to 2 s here) less.
    let (url, count) = endpoint(
        vec![ok("tok-1", 4), ok("tok-2", 4), ok("tok-3", 4)],
        Duration::ZERO,
    )
    .await;
    let mut tokens = tokens(&url);
    tokens.smtp_left = Duration::from_secs(2);
    let id = identity(Grant::ClientCredentials, "a@x.test", None);
    let first = tokens.get(&id, Protocol::Imap).await.unwrap();
    assert_eq!(first.lifetime, Duration::from_secs(4));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // 2.8 s left: enough for SMTP, not for a session.
    let smtp = tokens.get(&id, Protocol::Smtp).await.unwrap();
    assert_eq!(smtp.secret.expose_secret(), "tok-1");
    let pop3 = tokens.get(&id, Protocol::Pop3).await.unwrap();
    assert_eq!(pop3.secret.expose_secret(), "tok-2");
    assert!(pop3.expires_at - Instant::now() >= Duration::from_secs(3));
    // The newer token now serves everyone.
    let smtp = tokens.get(&id, Protocol::Smtp).await.unwrap();
    assert_eq!(smtp.secret.expose_secret(), "tok-2");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn session_logins_want_the_configured_time_left() {
    let (url, count) = endpoint(vec![ok("tok-1", 4), ok("tok-2", 4)], Duration::ZERO).await;
    let mut tokens = tokens(&url);
    assert_eq!(
        tokens.session_need(Protocol::Imap, Duration::from_secs(3600)),
        Duration::from_secs(2700)
    );
    assert_eq!(
        tokens.session_need(Protocol::Imap, Duration::from_secs(600)),
        Duration::from_secs(450)
    );
    // SMTP: ten minutes (Microsoft's High Volume Email refuses less).
    assert_eq!(
        tokens.session_need(Protocol::Smtp, Duration::from_secs(3600)),
        Duration::from_secs(600)
    );
    assert_eq!(
        tokens.session_need(Protocol::Smtp, Duration::from_secs(60)),
        Duration::from_secs(45)
    );
    // 4 s tokens with 2 s configured (less than three quarters, 3 s):
    // 1.5 s old still serves a session, 2.3 s old does not.
    tokens.session_left = Duration::from_secs(2);
    tokens.smtp_left = Duration::from_secs(1);
    let id = identity(Grant::ClientCredentials, "a@x.test", None);
    let get = |p| {
        let (tokens, id) = (&tokens, &id);
        async move {
            tokens
                .get(id, p)
                .await
                .unwrap()
                .secret
                .expose_secret()
                .to_string()
        }
    };
    assert_eq!(get(Protocol::Imap).await, "tok-1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(Protocol::Imap).await, "tok-1");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(get(Protocol::Smtp).await, "tok-1");
    assert_eq!(get(Protocol::Imap).await, "tok-2");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}
