//! `[[provider]]`: the kinds' defaults, the overrides, and the errors
//! that name the key.

use super::*;
use crate::config::Config;

/// A config with `[oauth]`, one listener, and `extra` after them.
fn config(extra: &str) -> Result<Config, String> {
    Config::parse(&format!(
        r#"
[oauth]
client_id = "ms-app"
client_secret = "s"
[[listener]]
protocol = "imap"
listen = "127.0.0.1:0"
tls = "none"
allow_plaintext_auth = true
{extra}
"#
    ))
}

const HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$2k2ldtr2YMlJk4fHSjm4jSm1AFbT+9hcD1qhR8w1T8E";

fn account(login: &str, grant: &str, provider: &str) -> String {
    let hash = match grant {
        "password" => String::new(),
        _ => format!("password_hash = '{HASH}'\n"),
    };
    format!(
        "[[account]]\nlogin = \"{login}\"\ngrant = \"{grant}\"\n{hash}provider = \"{provider}\"\n"
    )
}

#[test]
fn each_kind_fills_in_endpoints_scopes_and_hosts() {
    let c = config(&format!(
        "[[provider]]\nname = \"home\"\nkind = \"outlook.com\"\nclient_id = \"c\"\n\
         [[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"gc\"\nclient_secret = \"gs\"\n{}{}",
        account("a@outlook.test", "refresh_token", "home"),
        account("b@gmail.test", "refresh_token", "g"),
    ))
    .unwrap();
    let all = c.providers();
    assert_eq!(all.len(), 3);
    assert!(all[0].is_default());
    let home = find(&all, Some("home")).unwrap();
    assert_eq!(
        home.token_url,
        "https://login.microsoftonline.com/consumers/oauth2/v2.0/token"
    );
    assert_eq!(home.address(Protocol::Smtp), "smtp-mail.outlook.com:587");
    assert_eq!(home.address(Protocol::Imap), "outlook.office365.com:993");
    assert_eq!(
        home.delegated_scopes(&[Protocol::Imap], true),
        [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access"
        ]
    );
    let g = find(&all, Some("g")).unwrap();
    assert_eq!(g.token_url, GOOGLE_TOKEN_URL);
    assert_eq!(g.authorize_url, GOOGLE_AUTHORIZE_URL);
    assert_eq!(
        [Protocol::Smtp, Protocol::Imap, Protocol::Pop3].map(|p| g.address(p)),
        [
            "smtp.gmail.com:587",
            "imap.gmail.com:993",
            "pop.gmail.com:995"
        ]
    );
    // Google: one scope, and no offline_access (access_type=offline instead).
    assert_eq!(
        g.delegated_scopes(&[Protocol::Imap, Protocol::Smtp], true),
        [GOOGLE_SCOPE]
    );
    assert_eq!(g.app_scopes(), [GOOGLE_SCOPE]);
    assert!(!g.kind.rotates_refresh_tokens() && home.kind.rotates_refresh_tokens());
}

#[test]
fn every_default_can_be_overridden() {
    let c = config(&format!(
        "[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"gc\"\nclient_secret = \"gs\"\n\
         token_url = \"http://127.0.0.1:9/google/token\"\nauthorize_url = \"http://127.0.0.1:9/google/auth\"\n\
         scopes = [\"x\", \"y\"]\nsmtp = \"127.0.0.1:25\"\nimap = \"127.0.0.1:143\"\npop3 = \"127.0.0.1:110\"\n{}",
        account("b@gmail.test", "refresh_token", "g"),
    ))
    .unwrap();
    let g = c.providers().pop().unwrap();
    assert_eq!(g.token_url, "http://127.0.0.1:9/google/token");
    assert_eq!(g.authorize_url, "http://127.0.0.1:9/google/auth");
    assert_eq!(g.delegated_scopes(&[Protocol::Imap], true), ["x", "y"]);
    assert_eq!(g.address(Protocol::Pop3), "127.0.0.1:110");
}

#[test]
fn accounts_without_provider_keep_oauth() {
    let c = config(&format!(
        "[[account]]\nlogin = \"p@x.test\"\ngrant = \"client_credentials\"\npassword_hash = '{HASH}'\n"
    ))
    .unwrap();
    let all = c.providers();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].key, "oauth");
    assert_eq!(
        find(&all, None).unwrap().address(Protocol::Smtp),
        "smtp.office365.com:587"
    );
}

#[test]
fn a_combination_that_cannot_work_names_the_key() {
    let google = "[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"gc\"\n";
    let outlook = "[[provider]]\nname = \"home\"\nkind = \"outlook.com\"\nclient_id = \"c\"\n";
    let cases = [
        (
            format!("{outlook}{}", account("a@x.test", "client_credentials", "home")),
            "account[0].grant: provider \"home\" is outlook.com",
        ),
        (
            format!("{outlook}{}", account("*@x.test", "password", "home")),
            "account[0].grant: provider \"home\" is outlook.com",
        ),
        (
            format!("{google}{}", account("*@x.test", "password", "g")),
            "account[0].grant: provider \"g\" is google, which has no password grant",
        ),
        (
            format!("{google}{}", account("a@x.test", "client_credentials", "g")),
            "account[0].grant: client_credentials on provider \"g\" is a service account",
        ),
        (
            format!("{google}{}", account("a@x.test", "refresh_token", "g")),
            "account[0].grant: refresh_token on provider \"g\" needs its OAuth client's secret",
        ),
        (
            format!("{google}tenant = \"t\"\n{}", account("a@x.test", "refresh_token", "g")),
            "provider[0].tenant: only for kind = \"microsoft\"",
        ),
        (
            format!("{outlook}cloud = \"usgov\"\n{}", account("a@x.test", "refresh_token", "home")),
            "provider[0].cloud: only for kind = \"microsoft\"",
        ),
        (
            account("a@x.test", "refresh_token", "nowhere"),
            "account[0].provider: no [[provider]] is named \"nowhere\"",
        ),
        (
            format!("{google}{google}{}", account("a@x.test", "refresh_token", "g")),
            "provider[1].name: \"g\" is already provider[0]",
        ),
        (
            "[[provider]]\nname = \"bad name\"\nkind = \"google\"\nclient_id = \"c\"\n".to_string(),
            "provider[0].name:",
        ),
        (
            "[[provider]]\nname = \"g\"\nkind = \"google\"\n".to_string(),
            "provider[0].client_id: required",
        ),
        (
            format!("{google}smtp = \"nohost\"\n"),
            "provider[0].smtp:",
        ),
        (
            format!("{google}service_account_file = \"/nonexistent/sa.json\"\n"),
            "provider[0].service_account_file: /nonexistent/sa.json is not a readable file",
        ),
        (
            "[[provider]]\nname = \"m\"\nkind = \"microsoft\"\nclient_id = \"c\"\nservice_account_file = \"/etc/hostname\"\n".to_string(),
            "provider[0].service_account_file: only for kind = \"google\"",
        ),
        (
            "[[provider]]\nname = \"m\"\nkind = \"yahoo\"\nclient_id = \"c\"\n".to_string(),
            "unknown variant `yahoo`",
        ),
    ];
    for (extra, want) in cases {
        let extra = if extra.contains("[[account]]") {
            extra
        } else {
            format!("{extra}{}", account_default())
        };
        let err = config(&extra)
            .err()
            .unwrap_or_else(|| panic!("accepted: {extra}"));
        assert!(err.contains(want), "{err}\nwanted: {want}");
    }
}

fn account_default() -> String {
    format!("[[account]]\nlogin = \"p@x.test\"\ngrant = \"client_credentials\"\npassword_hash = '{HASH}'\n")
}

#[test]
fn a_graph_sender_stays_with_oauth() {
    let err = config(&format!(
        "[[provider]]\nname = \"m\"\nkind = \"microsoft\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{}send = \"graph\"\n",
        account("a@x.test", "client_credentials", "m")
    ))
    .unwrap_err();
    assert!(err.starts_with("account[0].send:"), "{err}");
}

#[test]
fn a_service_account_key_is_read_and_never_printed() {
    let text = r#"{"type": "service_account", "project_id": "p", "private_key_id": "k1",
        "private_key": "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n",
        "client_email": "sa@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token"}"#;
    let key = ServiceAccountKey::parse(text).unwrap();
    assert_eq!(key.client_email, "sa@p.iam.gserviceaccount.com");
    assert_eq!(key.private_key_id.as_deref(), Some("k1"));
    let debug = format!("{key:?}");
    assert!(
        !debug.contains("SECRETKEYBYTES") && debug.contains("sa@p"),
        "{debug}"
    );
    let oauth_client = text.replace("service_account", "authorized_user");
    let err = ServiceAccountKey::parse(&oauth_client).unwrap_err();
    assert!(err.contains("not \"service_account\""), "{err}");
    let err = ServiceAccountKey::parse("{\"private_key\": \"SECRETKEYBYTES\"").unwrap_err();
    assert!(!err.contains("SECRETKEYBYTES"), "{err}");
}

#[test]
fn a_providers_accounts_keep_their_tokens_apart() {
    let c = config(&format!(
        "[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"gc\"\nclient_secret = \"s\"\n\
         token_url = \"http://127.0.0.1:9/{{tenant}}/token\"\n{}",
        account("b@x.test", "refresh_token", "g"),
    ))
    .unwrap();
    let all = c.providers();
    // [oauth]'s as always; a provider's under its name, so that a token
    // consented at one provider is never sent to another.
    assert_eq!(all[0].store_key("b@x.test"), "b@x.test");
    assert_eq!(all[1].store_key("b@x.test"), "g:b@x.test");
    // {tenant} is Microsoft's: left alone elsewhere.
    assert_eq!(all[1].token_url, "http://127.0.0.1:9/{tenant}/token");
}

#[test]
fn names_differing_in_case_and_bad_key_files_are_refused() {
    let err = config(
        "[[provider]]\nname = \"Google\"\nkind = \"google\"\nclient_id = \"a\"\n\
         [[provider]]\nname = \"google\"\nkind = \"google\"\nclient_id = \"b\"\n",
    )
    .unwrap_err();
    assert!(
        err.starts_with("provider[1].name: \"google\" is already provider[0]"),
        "{err}"
    );
    let text = r#"{"type":"service_account","private_key":"x","client_email":"a@b","token_uri":"file:///etc/passwd"}"#;
    let err = ServiceAccountKey::parse(text).unwrap_err();
    assert!(err.contains("is not an http(s) URL"), "{err}");
}
