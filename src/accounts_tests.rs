use super::*;

fn account(
    login: &str,
    grant: Grant,
    password: Option<&str>,
    mailbox: Option<&str>,
) -> AccountConfig {
    AccountConfig {
        login: login.into(),
        grant,
        password_hash: password.map(|p| {
            SecretString::from(hash_password(&SecretString::from(p.to_string())).unwrap())
        }),
        mailbox: mailbox.map(String::from),
        allow_shared: Vec::new(),
        allowed_senders: Vec::new(),
        send: None,
        rewrite_sender: false,
        protocols: None,
        provider: None,
    }
}

fn pw(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

#[tokio::test]
async fn exact_pattern_and_failures() {
    let accounts = Accounts::new(
        SendVia::Smtp,
        &[
            account(
                "Scanner@Example.test",
                Grant::ClientCredentials,
                Some("right"),
                Some("scans@example.test"),
            ),
            account("*@example.test", Grant::Password, None, None),
            account(
                "*@other.test",
                Grant::ClientCredentials,
                Some("domainpw"),
                None,
            ),
        ],
        &crate::config::provider::test_providers(),
    );
    let id = accounts
        .authenticate("scanner@example.TEST", pw("right"))
        .await
        .unwrap();
    assert_eq!(id.mailbox, "scans@example.test");
    assert_eq!(id.grant, Grant::ClientCredentials);
    assert!(id.password.is_none());

    let err = accounts
        .authenticate("scanner@example.test", pw("wrong"))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, AuthError::BadCredentials("wrong password")));

    let id = accounts
        .authenticate("Anyone@example.test", pw("whatever"))
        .await
        .unwrap();
    assert_eq!(
        (id.mailbox.as_str(), id.grant),
        ("anyone@example.test", Grant::Password)
    );
    assert_eq!(id.password.unwrap().expose_secret(), "whatever");

    let id = accounts
        .authenticate("x@other.test", pw("domainpw"))
        .await
        .unwrap();
    assert_eq!(id.mailbox, "x@other.test");

    let err = accounts
        .authenticate("nobody@nowhere.test", pw("right"))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, AuthError::BadCredentials("unknown user")));
}

#[tokio::test]
async fn shared_mailboxes_need_allow_shared() {
    let mut scanner = account(
        "scanner@x.test",
        Grant::ClientCredentials,
        Some("pw"),
        Some("scans@x.test"),
    );
    scanner.allow_shared = vec!["Reception@x.test".into(), "*@shared.x.test".into()];
    let accounts = Accounts::new(
        SendVia::Smtp,
        &[scanner, account("*@x.test", Grant::Password, None, None)],
        &crate::config::provider::test_providers(),
    );
    let id = accounts
        .authenticate("scanner@x.test\\reception@x.test", pw("pw"))
        .await
        .unwrap();
    assert_eq!(
        (id.login.as_str(), id.mailbox.as_str()),
        ("scanner@x.test", "reception@x.test")
    );
    let id = accounts
        .authenticate("scanner@x.test\\hr@shared.x.test", pw("pw"))
        .await
        .unwrap();
    assert_eq!(id.mailbox, "hr@shared.x.test");
    let err = accounts
        .authenticate("scanner@x.test\\ceo@x.test", pw("pw"))
        .await
        .err()
        .unwrap();
    assert!(matches!(
        err,
        AuthError::BadCredentials("shared mailbox not allowed for this account")
    ));
    assert!(accounts
        .authenticate("scanner@x.test\\reception@x.test", pw("bad"))
        .await
        .is_err());
    // A password-grant account without allow_shared cannot open others' mailboxes.
    assert!(accounts
        .authenticate("u@x.test\\ceo@x.test", pw("any"))
        .await
        .is_err());
}

#[tokio::test]
async fn a_repeated_correct_login_skips_argon2() {
    let accounts = Accounts::new(
        SendVia::Smtp,
        &[account(
            "a@x.test",
            Grant::ClientCredentials,
            Some("right"),
            None,
        )],
        &crate::config::provider::test_providers(),
    );
    let t = std::time::Instant::now();
    accounts
        .authenticate("a@x.test", pw("right"))
        .await
        .unwrap();
    let first = t.elapsed();
    let t = std::time::Instant::now();
    accounts
        .authenticate("a@x.test", pw("right"))
        .await
        .unwrap();
    let again = t.elapsed();
    assert!(again * 10 < first, "first {first:?}, again {again:?}");
    // A wrong password is still checked in full, and refused.
    assert!(accounts
        .authenticate("a@x.test", pw("wrong"))
        .await
        .is_err());
    assert_eq!(accounts.verified.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_user_costs_a_hash_too() {
    let accounts = Accounts::new(
        SendVia::Smtp,
        &[account(
            "a@x.test",
            Grant::ClientCredentials,
            Some("p"),
            None,
        )],
        &crate::config::provider::test_providers(),
    );
    let t = std::time::Instant::now();
    let _ = accounts.authenticate("a@x.test", pw("bad")).await;
    let known = t.elapsed();
    let t = std::time::Instant::now();
    let _ = accounts.authenticate("zz@x.test", pw("bad")).await;
    let unknown = t.elapsed();
    // Both run one Argon2 verification; neither is near-instant.
    assert!(
        unknown * 4 > known,
        "unknown {unknown:?} vs known {known:?}"
    );
}

fn other_domain() -> Accounts {
    Accounts::new(
        SendVia::Smtp,
        &[
            account(
                "*@other.test",
                Grant::ClientCredentials,
                Some("domainpw"),
                None,
            ),
            account("*@example.test", Grant::Password, None, None),
            account(
                "printer",
                Grant::ClientCredentials,
                Some("pw"),
                Some("scans@example.test"),
            ),
        ],
        &crate::config::provider::test_providers(),
    )
}

#[tokio::test]
async fn a_pattern_takes_only_a_mailbox_of_its_domain() {
    let accounts = other_domain();
    // Once matched *@other.test, and its \x01 made the upstream log in as bob.
    for login in [
        "bob@example.test\x01x=y@other.test",
        "bob@example.test\r\nx@other.test",
        "bob@example.test\0x@other.test",
        "bob@example.test/x@other.test",
        "bob@example.test@other.test",
        "bob%example.test@other.test",
        "bob?x@other.test",
        "bob#x@other.test",
        "\"bob@example.test\"@other.test",
        "bob@sub.other.test",
        "bob@other.test.evil",
    ] {
        let err = accounts
            .authenticate(login, pw("domainpw"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{:?} logged in", login.escape_debug()));
        assert!(
            matches!(err, AuthError::BadCredentials(_)),
            "{:?}: {err}",
            login.escape_debug()
        );
        assert_eq!(accounts.account_of(login), None);
        assert!(!accounts.sends_via_graph(login));
    }
    // A password-grant pattern carries no hostile name to the token endpoint.
    assert!(accounts
        .authenticate("x\x01y@example.test", pw("any"))
        .await
        .is_err());
    let id = accounts
        .authenticate(" Bob@Other.TEST ", pw("domainpw"))
        .await
        .unwrap();
    assert_eq!(
        (id.mailbox.as_str(), id.login.as_str()),
        ("bob@other.test", "bob@other.test")
    );
    // An exact login need not be an address when its account names a mailbox.
    let id = accounts.authenticate("PRINTER", pw("pw")).await.unwrap();
    assert_eq!(id.mailbox.as_str(), "scans@example.test");
}

#[tokio::test]
async fn both_halves_of_a_shared_login_must_be_mailboxes() {
    let mut scanner = account("scanner@x.test", Grant::ClientCredentials, Some("pw"), None);
    scanner.allow_shared = vec!["*@x.test".into()];
    let accounts = Accounts::new(
        SendVia::Smtp,
        &[scanner],
        &crate::config::provider::test_providers(),
    );
    for login in [
        "scanner@x.test\\a\x01b@x.test",
        "scanner@x.test\\a/b@x.test",
        "scanner@x.test\\a@x.test\\b@x.test",
        "scanner@x.test\\\"a@y\"@x.test",
        "scanner@x.test\\",
        "scanner@x.test\x01\\a@x.test",
    ] {
        assert!(
            accounts.authenticate(login, pw("pw")).await.is_err(),
            "{:?}",
            login.escape_debug()
        );
    }
    let id = accounts
        .authenticate("scanner@x.test\\a@x.test", pw("pw"))
        .await
        .unwrap();
    assert_eq!(id.mailbox.as_str(), "a@x.test");
}

#[test]
fn spooled_mail_of_a_pattern_account_resolves_like_a_login() {
    let mut shared = account("*@other.test", Grant::ClientCredentials, Some("p"), None);
    shared.allow_shared = vec!["reception@shared.test".into()];
    let accounts = Accounts::new(
        SendVia::Graph,
        &[
            shared,
            account("*@example.test", Grant::Password, None, None),
        ],
        &crate::config::provider::test_providers(),
    );
    let id = accounts
        .spooled_identity("*@other.test", "bob@other.test")
        .unwrap();
    assert_eq!(
        (id.account.as_str(), id.mailbox.as_str(), id.grant, id.graph),
        (
            "*@other.test",
            "bob@other.test",
            Grant::ClientCredentials,
            true
        )
    );
    let id = accounts
        .spooled_identity("*@Other.test", "reception@shared.test")
        .unwrap();
    assert_eq!(id.mailbox.as_str(), "reception@shared.test");
    // Another domain, a hostile mailbox, a password-grant pattern, a pattern gone.
    assert!(matches!(
        accounts.spooled_identity("*@other.test", "ceo@example.test"),
        Err(AuthError::Authorization(_))
    ));
    assert!(accounts
        .spooled_identity("*@other.test", "bob@example.test\x01x@other.test")
        .is_err());
    assert!(accounts
        .spooled_identity("*@example.test", "bob@example.test")
        .is_err());
    assert!(matches!(
        accounts.spooled_identity("*@gone.test", "bob@gone.test"),
        Err(AuthError::BadCredentials(_))
    ));
}

#[test]
fn the_log_names_accounts_never_an_unknown_login() {
    let accounts = other_domain();
    assert_eq!(accounts.describe("Bob@Other.test"), "bob@other.test");
    assert_eq!(accounts.describe("PRINTER"), "printer");
    assert_eq!(
        accounts.describe("printer\\Reception@x.test"),
        "printer\\reception@x.test"
    );
    assert!(accounts
        .describe("printer\\hunter2")
        .starts_with("printer\\(not a mailbox"));
    for (typed, starts) in [
        (
            "hunter2-typed-as-login",
            "not a mailbox (not exactly one @) #",
        ),
        ("hunter2@typed", "unknown user #"),
        (
            "hunter2@example.test\x01",
            "not a mailbox (a control character) #",
        ),
        (
            "bob@example.test\x01x=y@other.test",
            "not a mailbox (a control character) #",
        ),
        (
            "hunter2\\x@other.test",
            "not a mailbox (not exactly one @) #",
        ),
    ] {
        let shown = accounts.describe(typed);
        assert!(shown.starts_with(starts), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("x=y"),
            "{shown}"
        );
        assert!(!shown.contains(char::is_control), "{shown:?}");
        assert_eq!(shown, accounts.describe(typed), "stable");
    }
    assert_ne!(accounts.describe("hunter2"), accounts.describe("hunter3"));
    // A mailbox no account covers, in a domain an exact account lives in.
    assert!(accounts
        .describe("nobody@example.test")
        .starts_with("nobody@example.test"));
    let exact_only = Accounts::new(
        SendVia::Smtp,
        &[account(
            "a@x.test",
            Grant::ClientCredentials,
            Some("p"),
            None,
        )],
        &crate::config::provider::test_providers(),
    );
    assert!(exact_only
        .describe("zz@x.test")
        .starts_with("unknown user at x.test #"));
}

/// The throttle's counters (in Redis with replicas) never hold what a
/// device typed unless it names an account or a mailbox.
#[test]
fn the_throttle_counts_an_unknown_login_by_a_hash() {
    let accounts = other_domain();
    let typed = "Hunter2-Secret";
    let claim = accounts.claim(typed);
    assert!(claim.credential.starts_with("unknown #"), "{claim:?}");
    assert!(!claim.credential.to_lowercase().contains("hunter2"));
    assert_eq!(claim.credential, accounts.claim(typed).credential);
    let claim = accounts.claim(&format!("bob@other.test\\{typed}"));
    assert_eq!(claim.credential, "*@other.test");
    let shared = claim.shared.unwrap();
    assert!(
        shared.starts_with('#') && !shared.contains("hunter2"),
        "{shared}"
    );
    let claim = accounts.claim("bob@other.test\\desk@other.test");
    assert_eq!(claim.shared.as_deref(), Some("desk@other.test"));
}

/// `protocols`: a login over a protocol its account leaves out is refused
/// by the account alone (a pattern's users, the `\shared` form too);
/// other protocols, other accounts and unknown logins are left to the
/// password check. An IMAP session's stamp changes when IMAP is taken away.
#[test]
fn a_protocol_the_account_leaves_out_is_refused_naming_the_account_and_protocols() {
    let limited = |login: &str, grant, password, protocols: &[Protocol]| AccountConfig {
        protocols: Some(protocols.to_vec()),
        ..account(login, grant, password, Some("scans@x.test"))
    };
    let accounts = Accounts::new(
        SendVia::Smtp,
        &[
            limited(
                "printer@x.test",
                Grant::ClientCredentials,
                Some("p"),
                &[Protocol::Smtp],
            ),
            AccountConfig {
                protocols: Some(vec![Protocol::Imap, Protocol::Pop3]),
                ..account("*@readers.test", Grant::Password, None, None)
            },
            account("reader@x.test", Grant::ClientCredentials, Some("p"), None),
        ],
        &crate::config::provider::test_providers(),
    );
    let refusal = |login: &str, p| accounts.protocol_refusal(login, p).map(|e| e.to_string());
    assert_eq!(
        refusal("PRINTER@x.test", Protocol::Imap).as_deref(),
        Some("protocol not allowed: account printer@x.test has protocols = [\"smtp\"]; the device logged in over imap")
    );
    assert!(refusal("printer@x.test\\desk@x.test", Protocol::Pop3).is_some());
    assert_eq!(refusal("printer@x.test", Protocol::Smtp), None);
    assert_eq!(
        refusal("anna@readers.test", Protocol::Smtp).as_deref(),
        Some("protocol not allowed: account *@readers.test has protocols = [\"imap\", \"pop3\"]; the device logged in over smtp")
    );
    assert_eq!(refusal("anna@readers.test", Protocol::Imap), None);
    assert_eq!(refusal("reader@x.test", Protocol::Pop3), None);
    assert_eq!(refusal("nobody@x.test", Protocol::Imap), None);
    let err = accounts
        .protocol_refusal("printer@x.test", Protocol::Imap)
        .unwrap();
    assert_eq!(err.reason(), "protocol_not_allowed");
    assert_eq!(err.refusal(), crate::wire::Refusal::BadCredentials);

    // The stamp an IMAP session moves by: the same while IMAP is allowed.
    let hash = hash_password(&pw("p")).unwrap();
    let reader = |protocols: Option<Vec<Protocol>>| {
        Accounts::new(
            SendVia::Smtp,
            &[AccountConfig {
                protocols,
                password_hash: Some(SecretString::from(hash.clone())),
                ..account("reader@x.test", Grant::ClientCredentials, None, None)
            }],
            &crate::config::provider::test_providers(),
        )
    };
    let before = reader(None);
    let id = before.identity("reader@x.test").unwrap();
    let stamp = before.stamp(&id);
    assert!(stamp.is_some());
    assert_eq!(
        reader(Some(vec![Protocol::Imap, Protocol::Smtp])).stamp(&id),
        stamp
    );
    assert_ne!(reader(Some(vec![Protocol::Smtp])).stamp(&id), stamp);
}

#[test]
fn an_account_of_a_provider_added_since_the_start_is_refused() {
    let mut a = account("x@school.test", Grant::ClientCredentials, Some("pw"), None);
    a.provider = Some("school".into());
    let known = crate::config::provider::test_providers();
    let err = Accounts::unknown_provider(std::slice::from_ref(&a), &known).unwrap_err();
    assert!(
        err.contains("\"school\"") && err.contains("restart"),
        "{err}"
    );
    // Built anyway (never by a reload, which refuses first), it is left
    // out rather than given another provider's tokens.
    let accounts = Accounts::new(SendVia::Smtp, &[a], &known);
    assert!(accounts.summaries().is_empty());
}
