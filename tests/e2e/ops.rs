//! Operations, end to end: the admin endpoint (health, readiness,
//! Prometheus metrics scraped over HTTP with curl, POX Autodiscover),
//! JSON log lines, `oxbridge check` against the real upstream and against
//! a fake that refuses like Exchange Online, and SIGHUP reloads.

use std::process::{Command, Output};

use crate::harness::*;

/// What the per-mailbox limits and the throttle hold is in `/metrics`,
/// and back to zero once the sessions end: a held upstream slot, the
/// entries a wrong password leaves (the client address and the account).
#[test]
fn slots_and_throttle_entries_are_gauges() {
    let proxy = Proxy::start(&config(&plain_listeners(&["imap"]), ADMIN));
    let admin = proxy.admin_addr();
    let gauge = |name: &str, labels: &[(&str, &str)]| value(&scrape(admin), name, labels);
    let imap = [("protocol", "imap")];
    assert_eq!(gauge("oxbridge_upstream_slots_held", &imap), 0.0);
    let mut c = Raw::connect(proxy.port(0));
    c.line();
    let r = c.imap_login("scanner@example.test", SCANNER_PASSWORD);
    assert!(r.lines().last().unwrap_or("").starts_with("a OK"), "{r}");
    let held = scrape(admin);
    assert_eq!(value(&held, "oxbridge_upstream_slots_held", &imap), 1.0);
    assert_eq!(
        value(
            &held,
            "oxbridge_upstream_slots_held",
            &[("protocol", "smtp")]
        ),
        0.0
    );
    assert_eq!(value(&held, "oxbridge_upstream_slot_waiting", &imap), 0.0);
    c.send("b LOGOUT");
    c.until("b ");
    proxy.wait_log(&["session ended", "relayed"]);
    // The slot is given back just after the session's last log line.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gauge("oxbridge_upstream_slots_held", &imap) != 0.0 {
        assert!(std::time::Instant::now() < deadline, "the slot stays held");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(gauge("oxbridge_throttle_entries", &[]), 0.0);
    let mut c = Raw::connect(proxy.port(0));
    c.line();
    let r = c.imap_login("scanner@example.test", "wrong");
    assert!(r.lines().last().unwrap_or("").starts_with("a NO"), "{r}");
    let after = scrape(admin);
    assert_eq!(value(&after, "oxbridge_throttle_entries", &[]), 2.0);
    assert_eq!(value(&after, "oxbridge_throttle_checking", &[]), 0.0);
    assert_eq!(value(&after, "oxbridge_upstream_slots_held", &imap), 0.0);
}

#[test]
fn metrics_health_readiness_and_json_logs() {
    let proxy = Proxy::start(&config(&plain_listeners(&["imap", "smtp"]), ADMIN));
    let admin = proxy.admin_addr();

    let (status, health) = curl(admin, "/healthz");
    assert_eq!(
        (status, health.lines().next()),
        (200, Some("ok")),
        "{health}"
    );
    let (status, body) = curl(admin, "/readyz");
    assert_eq!(status, 200, "{body}");

    let before = scrape(admin);
    let out =
        Client::new(proxy.port(0), "scanner@example.test", SCANNER_PASSWORD).imap("login", &[]);
    assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
    proxy.wait_log(&["session ended", "relayed", "\"protocol\":\"imap\""]);
    let mut raw = Raw::connect(proxy.port(1));
    raw.reply();
    raw.send("EHLO metrics.test");
    raw.reply();
    raw.send("AUTH PLAIN AHNjYW5uZXJAZXhhbXBsZS50ZXN0AHdyb25n"); // scanner / "wrong"
    assert!(raw.reply().starts_with("535"));
    raw.send("QUIT");
    raw.reply();
    proxy.wait_log(&["session ended", "\"protocol\":\"smtp\""]);
    let after = scrape(admin);

    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let relayed = [("protocol", "imap"), ("outcome", "relayed")];
    assert_eq!(delta("oxbridge_sessions_total", &relayed), 1.0);
    assert_eq!(
        delta(
            "oxbridge_logins_total",
            &[("protocol", "imap"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "oxbridge_auth_failures_total",
            &[("protocol", "smtp"), ("reason", "bad_credentials")]
        ),
        1.0
    );
    assert!(delta("oxbridge_throttled_logins_total", &[("kind", "delayed")]) >= 1.0);
    assert!(
        value(
            &after,
            "oxbridge_token_requests_total",
            &[("grant", "client_credentials"), ("result", "ok")]
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "oxbridge_token_request_duration_seconds_count",
            &[("grant", "client_credentials")]
        ) >= 1.0
    );
    assert!(
        delta(
            "oxbridge_upstream_connect_duration_seconds_count",
            &[("protocol", "imap")]
        ) >= 1.0
    );
    for direction in ["to_upstream", "to_device"] {
        assert!(
            delta(
                "oxbridge_relayed_bytes_total",
                &[("protocol", "imap"), ("direction", direction)]
            ) > 0.0,
            "{direction}"
        );
    }
    assert_eq!(value(&after, "oxbridge_sessions_active", &[]), 0.0);
    // Logins per configured account: scanner's IMAP login and its wrong
    // SMTP password.
    for (protocol, result) in [("imap", "ok"), ("smtp", "failed")] {
        let labels = [
            ("account", "scanner@example.test"),
            ("protocol", protocol),
            ("result", result),
        ];
        assert_eq!(delta("oxbridge_account_logins_total", &labels), 1.0);
    }
    // No secret in the metrics.
    let (_, body) = curl(admin, "/metrics");
    assert!(!body.contains(SCANNER_PASSWORD));

    // Every log line is one JSON object with timestamp, level and message.
    let logs = proxy.logs();
    assert!(logs.lines().count() > 5);
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "message"] {
            assert!(v.get(key).is_some(), "{key} missing: {line}");
        }
    }

    // A proxy whose token endpoint is down is alive and ready: the outage
    // is a health fact (tests/e2e/ready.rs), not a reason to take it out.
    let first_admin = admin;
    let down = with_token_url(
        &config(&listener("smtp", "none", true), ADMIN),
        &format!("http://127.0.0.1:{}/token", closed_port()),
    );
    let proxy = Proxy::start(&down);
    let admin = proxy.admin_addr();
    assert_eq!(curl(admin, "/healthz").0, 200);
    let (status, body) = curl(admin, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let reachable = |admin| value(&scrape(admin), "oxbridge_token_endpoint_reachable", &[]);
    assert_eq!(reachable(admin), 0.0);
    assert_eq!(reachable(first_admin), 1.0);
}

#[test]
fn healthcheck_subcommand_follows_the_admin_endpoint() {
    let admin = format!("[admin]\nlisten = \"127.0.0.1:{}\"\n", closed_port());
    let mut proxy = Proxy::start(&config(&listener("smtp", "none", true), &admin));
    proxy.admin_addr();
    let out = oxbridge(&["healthcheck"], &proxy.config_path());
    assert!(out.status.success(), "{}", text(&out));
    let path = proxy.config_path();
    let kept = std::fs::read_to_string(&path).unwrap();
    proxy.terminate();
    std::fs::write(&path, kept).unwrap();
    let out = oxbridge(&["healthcheck"], &path);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn autodiscover_describes_the_listeners() {
    let listeners = format!(
        "{}{}{}{}",
        listener("imap", "implicit", false),
        listener("imap", "none", true),
        listener("pop3", "starttls", false),
        listener("smtp", "starttls", false),
    );
    let proxy = Proxy::start(&config(&listeners, ADMIN));
    let admin = proxy.admin_addr();
    let ask = |email: &str| {
        let out = run(
            python("autodiscover.py").args([
                "--url",
                &format!("http://{admin}/autodiscover/autodiscover.xml"),
                "--email",
                email,
                "--host-header",
                "mail.example.test:8080",
            ]),
            CLIENT_LIMIT,
        );
        assert!(out.status.success(), "{}\n{}", text(&out), proxy.logs());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // A user of the *@example.test pattern.
    let v = ask("printer7@example.test");
    let p = &v["protocols"];
    assert_eq!(p["IMAP"]["Port"], proxy.port(0).to_string(), "{v}");
    assert_eq!(p["IMAP"]["SSL"], "on");
    assert_eq!(p["IMAP"]["Encryption"], "SSL");
    assert_eq!(p["POP3"]["Port"], proxy.port(2).to_string());
    assert_eq!(p["POP3"]["Encryption"], "TLS");
    assert_eq!(p["SMTP"]["Port"], proxy.port(3).to_string());
    assert_eq!(p["SMTP"]["UsePOPAuth"], "on");
    for t in ["IMAP", "POP3", "SMTP"] {
        assert_eq!(p[t]["Server"], "mail.example.test", "{v}");
        assert_eq!(p[t]["LoginName"], "printer7@example.test");
    }
    // An address no account matches gets the same settings (Autodiscover
    // is unauthenticated: it must not tell which addresses are configured).
    let v = ask("someone@elsewhere.test");
    assert_eq!(
        v["protocols"]["SMTP"]["Port"],
        proxy.port(3).to_string(),
        "{v}"
    );
    // A request without an address: 600.
    let out = run(
        Command::new("curl").args([
            "-sS",
            "-d",
            "<Autodiscover/>",
            &format!("http://{admin}/autodiscover/autodiscover.xml"),
        ]),
        CLIENT_LIMIT,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("<ErrorCode>600</ErrorCode>"),
        "{}",
        text(&out)
    );
}

/// `oxbridge check` with `cfg`.
fn oxbridge_check(cfg: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    oxbridge(&["check"], &write_config(dir.path(), cfg))
}

#[test]
fn check_against_the_real_upstream() {
    let up = upstream();
    let out = oxbridge_check(&config(&plain_listeners(&["smtp", "imap", "pop3"]), ""));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for p in ["smtp", "imap", "pop3"] {
        assert!(
            t.contains(&format!(
                "scanner@example.test {p}: OK (mailbox alice@example.test"
            )),
            "{t}"
        );
    }
    assert!(t.contains("*@example.test: SKIPPED"), "{t}");
    assert_eq!(t.matches(": OK").count(), 3, "{t}");

    // A wrong client secret: the token endpoint's refusal, with the fix.
    let bad = config(&listener("imap", "none", true), "").replace(
        &format!("client_secret = \"{}\"", up.get("APP_CLIENT_SECRET")),
        "client_secret = \"not-the-secret\"",
    );
    let out = oxbridge_check(&bad);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("scanner@example.test imap: FAILED: token refused"),
        "{t}"
    );
    assert!(t.contains("Fix:"), "{t}");
    assert!(!t.contains("not-the-secret"), "{t}");

    // A bad config: exit 2, nothing checked.
    let out = oxbridge_check("state_dir = 1\n");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// `cfg` with `fake` as the upstream of every protocol.
fn upstream_of(fake: &Spawned, cfg: &str) -> String {
    reroute_all(cfg, &format!("localhost:{}", fake.1))
}

#[test]
fn check_diagnoses_exchange_refusals() {
    // (protocol, stage, the server's reply, a piece of the fix)
    let cases = [
        ("smtp", "auth", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.", "Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
        ("smtp", "auth", "535 5.7.3 Authentication unsuccessful [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]", "Add-MailboxPermission"),
        ("smtp", "mail", "530 5.7.57 Client not authenticated to send mail. [AM0PR01CA0001]", "-SmtpClientAuthenticationDisabled $false"),
        ("smtp", "auth", "550 5.7.30 Basic authentication is not supported for Client Submission.", "SMTP.SendAsApp"),
        ("smtp", "mail", "554 5.2.252 SendAsDenied; alice@example.test not allowed to send as scans@example.test", "Add-RecipientPermission"),
        ("smtp", "mail", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=AM0PR01MB0001]", "smtp_sessions_per_mailbox"),
        ("imap", "auth", "NO User is authenticated but not connected.", "-ImapEnabled $true"),
        ("pop3", "auth", "-ERR User is authenticated but not connected.", "-PopEnabled $true"),
        ("imap", "auth", "NO AUTHENTICATE failed.", "IMAP.AccessAsApp"),
        ("smtp", "auth", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.", "a value of $true on the mailbox"),
        ("smtp", "mail", "550 5.7.60 SMTP; Client does not have permissions to send as this sender.", "-AccessRights SendAs"),
        ("smtp", "mail", "550 5.5.105 High Volume Email only allows sending to internal recipients.", "High Volume Email"),
        ("smtp", "auth", "501 5.5.127 Authentication unsuccessful, Token will expire soon.", "smtp_token_left_s"),
    ];
    for (protocol, stage, reply, fix) in cases {
        let fake = Spawned::fake_upstream(protocol, stage, reply);
        let cfg = upstream_of(&fake, &config(&listener(protocol, "none", true), ""));
        let out = oxbridge_check(&cfg);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{reply}: {t}");
        let line = t
            .lines()
            .find(|l| l.starts_with(&format!("scanner@example.test {protocol}: FAILED")))
            .unwrap_or_else(|| panic!("{reply}: no FAILED line:\n{t}"));
        assert!(line.contains(fix), "{reply}:\n{line}");
    }

    // In service, a device's failed login logs the same fix.
    let fake = Spawned::fake_upstream("smtp", "auth", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.");
    let proxy = Proxy::start(&upstream_of(
        &fake,
        &config(&listener("smtp", "none", true), ""),
    ));
    let mut raw = Raw::connect(proxy.port(0));
    raw.reply();
    assert!(raw
        .smtp_login("scanner@example.test", SCANNER_PASSWORD)
        .starts_with("535 5.7.8"));
    proxy.wait_log(&["login failed", "5.7.139", "Set-TransportConfig"]);
}

/// Entra's refusals at the token endpoint, as its JSON says them, each
/// end in `oxbridge check` with their fix.
#[test]
fn check_diagnoses_entra_refusals() {
    // (status, error, error_description, a piece of the fix)
    let cases = [
        (401, "invalid_client", "AADSTS700025: Client is public so neither 'client_assertion' nor 'client_secret' should be presented.", "remove client_secret"),
        (400, "unauthorized_client", "AADSTS7000229: The client application 00000000-0000-0000-0000-000000000000 is missing service principal in the tenant 11111111-1111-1111-1111-111111111111.", "New-MgServicePrincipal"),
        (400, "invalid_grant", "AADSTS53003: Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.", "--paste"),
    ];
    for (status, error, description, fix) in cases {
        let body = serde_json::json!({
            "error": error,
            "error_description": description,
            "error_codes": [description[6..].split(':').next().unwrap().parse::<u64>().unwrap()],
        })
        .to_string();
        let endpoint = crate::common::FakeHttp::start(move |_, _| (status, body.clone()));
        let cfg = config(&listener("smtp", "none", true), "").replace(
            &format!("token_url = \"{}\"", upstream().token_url()),
            &format!("token_url = \"{}/t/oauth2/v2.0/token\"", endpoint.base),
        );
        let out = oxbridge_check(&cfg);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{description}: {t}");
        let line = t
            .lines()
            .find(|l| l.starts_with("scanner@example.test smtp: FAILED"))
            .unwrap_or_else(|| panic!("{description}: no FAILED line:\n{t}"));
        assert!(line.contains(fix), "{description}:\n{line}");
    }
}

#[test]
fn sighup_reloads_accounts_and_certificates() {
    let dir = upstream().dir();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("c.pem"), certs.path().join("k.pem"));
    std::fs::copy(format!("{dir}/tls/server.crt"), &cert).unwrap();
    std::fs::copy(format!("{dir}/tls/server.key"), &key).unwrap();
    let listeners = format!(
        "{}{}",
        listener("smtp", "none", true),
        listener("imap", "implicit", false)
            .replace(&format!("{dir}/tls/server.crt"), cert.to_str().unwrap())
            .replace(&format!("{dir}/tls/server.key"), key.to_str().unwrap())
    );
    let cfg = config(&listeners, "");
    let proxy = Proxy::start(&cfg);
    let smtp = proxy.port(0);
    let auth = |password: &str| {
        let mut raw = Raw::connect(smtp);
        raw.reply();
        (raw.smtp_login("scanner@example.test", password), raw)
    };
    // A session relayed before the reload.
    let (r, mut before) = auth(SCANNER_PASSWORD);
    assert!(r.starts_with("235"), "{r}");
    let issuer = |cafile: &str| {
        let out = run(
            Command::new("openssl")
                .args(["s_client", "-connect"])
                .arg(format!("127.0.0.1:{}", proxy.port(1)))
                .args(["-CAfile", cafile, "-verify_return_error", "-brief"]),
            CLIENT_LIMIT,
        );
        text(&out)
    };
    let t = issuer(&format!("{dir}/tls/ca.crt"));
    assert!(t.contains("CONNECTION ESTABLISHED"), "{t}");

    // A broken file changes nothing.
    std::fs::write(proxy.config_path(), "this is not toml [").unwrap();
    proxy.signal("HUP");
    proxy.wait_log(&["reload failed; keeping the running configuration"]);
    assert!(auth(SCANNER_PASSWORD).0.starts_with("235"));

    // New password for the account, new certificate for the listener.
    let new_password = "reloaded-password-2";
    let new_cfg = cfg.replace(
        cfg.lines()
            .find(|l| l.starts_with("password_hash"))
            .unwrap(),
        &format!("password_hash = \"{}\"", argon2_hash(new_password)),
    );
    assert_ne!(new_cfg, cfg);
    std::fs::write(proxy.config_path(), &new_cfg).unwrap();
    std::fs::copy(format!("{dir}/tls/rogue-server.crt"), &cert).unwrap();
    std::fs::copy(format!("{dir}/tls/rogue-server.key"), &key).unwrap();
    proxy.signal("HUP");
    proxy.wait_log(&["configuration reloaded"]);
    assert!(auth(SCANNER_PASSWORD).0.starts_with("535"));
    assert!(auth(new_password).0.starts_with("235"));
    let t = issuer(&format!("{dir}/tls/rogue-ca.crt"));
    assert!(t.contains("CONNECTION ESTABLISHED"), "{t}");
    let t = issuer(&format!("{dir}/tls/ca.crt"));
    assert!(!t.contains("CONNECTION ESTABLISHED"), "{t}");

    // The session from before the reload is still relayed.
    before.send("NOOP");
    let r = before.reply();
    assert!(r.starts_with("250"), "{r}");
    before.send("QUIT");
    assert!(before.reply().starts_with("221"));
}
