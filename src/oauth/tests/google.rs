//! A Google service account: one JWT-bearer request per mailbox however
//! many logins wait for it, the form Google expects, and the mailbox as
//! `sub`.

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;

/// Tokens of one google provider (named "school") whose service account
/// has a fresh key, against the token endpoint `url`.
fn google_tokens(url: &str) -> (Tokens, Arc<crate::config::Provider>) {
    let pem = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .unwrap()
        .stdout;
    let mut config = crate::config::Config::parse(&format!(
        "[oauth]\nclient_id = \"ms\"\n[[listener]]\nprotocol = \"imap\"\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\nallow_plaintext_auth = true\n\
         [[provider]]\nname = \"school\"\nkind = \"google\"\ntoken_url = \"{url}\"\nclient_id = \"unused\"\n\
         [[account]]\nlogin = \"*@school.test\"\ngrant = \"password\"\n"
    ))
    .unwrap();
    let key = serde_json::json!({
        "type": "service_account", "private_key": String::from_utf8(pem).unwrap(),
        "client_email": "relay@proj.iam.gserviceaccount.com",
    });
    config.providers[0].service_account =
        Some(crate::config::provider::ServiceAccountKey::parse(&key.to_string()).unwrap());
    let providers = config.providers();
    let school = providers[1].clone();
    let mut tokens = Tokens::new(&providers, &config, Arc::new(State::File(None))).unwrap();
    tokens.backoff = Duration::from_millis(10);
    (tokens, school)
}

fn sa_identity(mailbox: &str, provider: &Arc<crate::config::Provider>) -> Identity {
    Identity {
        grant: Grant::ClientCredentials,
        provider: provider.clone(),
        ..identity(Grant::ClientCredentials, mailbox, None)
    }
}

#[tokio::test]
async fn concurrent_logins_make_one_jwt_bearer_request_per_mailbox() {
    let (url, count, bodies) =
        recording_endpoint(vec![ok("ya29.one", 3599)], Duration::from_millis(300)).await;
    let (tokens, school) = google_tokens(&url);
    let tokens = Arc::new(tokens);
    let mut waiting = Vec::new();
    for i in 0..20 {
        let mailbox = ["alice@school.test", "bob@school.test"][i % 2];
        let (tokens, id) = (tokens.clone(), sa_identity(mailbox, &school));
        waiting.push(tokio::spawn(async move {
            tokens.get(&id, Protocol::Imap).await.map(|t| t.fresh)
        }));
    }
    let mut fresh = 0;
    for w in waiting {
        fresh += usize::from(w.await.unwrap().unwrap());
    }
    assert_eq!(count.load(Ordering::SeqCst), 2, "one request per mailbox");
    assert_eq!(fresh, 2);
    let mut subs = Vec::new();
    for body in bodies.lock().unwrap().iter() {
        let form = body.split("\r\n\r\n").nth(1).unwrap();
        assert!(
            form.starts_with(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion="
            ),
            "{form}"
        );
        assert!(!form.contains("client_secret"), "{form}");
        let jwt = form.split("assertion=").nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(jwt.split('.').nth(1).unwrap()).unwrap())
                .unwrap();
        assert_eq!(claims["iss"], "relay@proj.iam.gserviceaccount.com");
        assert_eq!(claims["aud"], url.as_str());
        assert_eq!(claims["scope"], "https://mail.google.com/");
        subs.push(claims["sub"].as_str().unwrap().to_string());
    }
    subs.sort();
    assert_eq!(subs, ["alice@school.test", "bob@school.test"]);
}

#[tokio::test]
async fn google_refusals_keep_their_words() {
    let refusal = (
        401,
        r#"{"error":"unauthorized_client","error_description":"Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."}"#.to_string(),
    );
    let (url, count) = endpoint(vec![refusal], Duration::ZERO).await;
    let (tokens, school) = google_tokens(&url);
    let err = tokens
        .get(&sa_identity("alice@school.test", &school), Protocol::Smtp)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, AuthError::TokenRefused(_)), "{err}");
    assert!(err.to_string().contains("Client is unauthorized"), "{err}");
    assert!(crate::diagnose::fix(&err)
        .unwrap()
        .contains("Domain Wide Delegation"));
    assert_eq!(count.load(Ordering::SeqCst), 1, "a refusal is not retried");
}
