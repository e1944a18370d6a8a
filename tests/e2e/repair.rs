//! Consent and repair from the status page, end to end: headless Chromium
//! driven by puppeteer-core (`tests/clients/status_actions.js`) clicks
//! Reconnect on an account whose refresh token the IdP revoked, passes the
//! IdP's sign-in and lands on the page that says the account is connected
//! (with `[admin] public_url`: the provider's redirect to the callback;
//! without: the paste form); a device then logs in without a restart.
//! Consenting as another user is refused and keeps the old token. Forged
//! requests (no anti-forgery token, no admin token, an unknown or reused
//! `state`) get 4xx and change nothing. Check now, Retry and Drop work
//! from the page; no token, code or secret reaches a page or the log.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use crate::harness::*;

const TOKEN: &str = "repair-admin-token-5d1c9e";
const LOCAL: &str = "repair-local-pass";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config with an admin endpoint guarded by [`TOKEN`] on `port` (with
/// `public_url` if asked), the IdP's device and authorize endpoints, a
/// state_dir in `dir`, SMTP and IMAP listeners, and `account` (refresh_token,
/// mailbox bob).
fn repair_config(dir: &Path, port: u16, public_url: bool, account: &str, extra: &str) -> String {
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let public = match public_url {
        true => format!("public_url = \"http://127.0.0.1:{port}\"\n"),
        false => String::new(),
    };
    let idp = upstream().get("IDP_URL");
    let cfg = config(
        &plain_listeners(&["smtp", "imap"]),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n{public}\n\
             [[account]]\nlogin = \"{account}\"\npassword_hash = \"{}\"\ngrant = \"refresh_token\"\nmailbox = \"{BOB}\"\n\n{extra}",
            token_file.display(),
            argon2_hash(LOCAL)
        ),
    );
    with_state_dir(&cfg, &dir.join("state")).replace(
        "[oauth]\n",
        &format!(
            "[oauth]\ndevice_code_url = \"{idp}/common/oauth2/v2.0/devicecode\"\nauthorize_url = \"{idp}/common/oauth2/v2.0/authorize\"\n"
        ),
    )
}

/// Consent once with `oxbridge login` (the IdP approves the device code),
/// then revoke that refresh token at the IdP: the account is broken.
fn consented_then_revoked(cfg_path: &Path, account: &str) -> String {
    let out = oxbridge(&["login", account], cfg_path);
    assert!(out.status.success(), "{}", text(&out));
    let old = stored_refresh(cfg_path, account).unwrap();
    upstream().idp_post("/admin/revoke", &serde_json::json!({ "token": old }));
    old
}

fn imap_login(proxy: &Proxy, login: &str) -> String {
    let mut c = Raw::connect(proxy.port(1));
    c.line();
    let answer = c.imap_login(login, LOCAL);
    c.send("z LOGOUT");
    answer
}

/// `status_actions.js` against the proxy's admin endpoint: its JSON.
fn browser(proxy: &Proxy, args: &[&str]) -> serde_json::Value {
    npm_clients();
    let out = run(
        Command::new("node")
            .arg(repo().join("tests/clients/status_actions.js"))
            .args(["--url", &format!("http://{}", proxy.admin_addr())])
            .args(["--token", TOKEN])
            .args(args),
        CLIENT_LIMIT,
    );
    let json = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|_| panic!("status_actions.js: {}", text(&out)));
    assert!(v.get("error").is_none(), "{v}\n{}", proxy.logs());
    v
}

#[test]
fn reconnect_from_the_page_with_public_url_repairs_a_revoked_account() {
    let dir = tempfile::tempdir().unwrap();
    let account = format!("{}@example.test", unique("desk"));
    let port = free_port();
    let cfg = repair_config(dir.path(), port, true, &account, "");
    let cfg_path = write_config(dir.path(), &cfg);
    let old = consented_then_revoked(&cfg_path, &account);
    let proxy = Proxy::start(&cfg);
    let refused = imap_login(&proxy, &account);
    assert!(
        refused.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "{refused}"
    );

    let v = browser(&proxy, &["--mode", "callback", "--account", &account]);
    assert_eq!(v["label"], "Reconnect", "{v}");
    assert_eq!(v["path"], "/consent/callback", "{v}");
    assert_eq!(v["ok"], true, "{v}\n{}", proxy.logs());
    let said = v["result"].as_str().unwrap();
    assert!(
        said.starts_with(&format!(
            "{account} is connected: the new consent opens {BOB} (proven by a imap login)"
        )),
        "{said}"
    );
    let new = stored_refresh(&cfg_path, &account).unwrap();
    assert_ne!(new, old);
    // Without a restart, the device logs in.
    let answer = imap_login(&proxy, &account);
    assert!(answer.starts_with("a OK"), "{answer}\n{}", proxy.logs());
    let logs = proxy.logs();
    assert!(
        logs.contains("\"action\":\"consent\"") && logs.contains("\"result\":\"ok\""),
        "{logs}"
    );
    assert!(
        !logs.contains(&new) && !logs.contains("code="),
        "a secret in the log"
    );
    let m = metrics(proxy.admin_addr());
    assert_eq!(
        value(
            &m,
            "oxbridge_admin_actions_total",
            &[("action", "consent"), ("result", "ok")]
        ),
        1.0
    );
}

#[test]
fn reconnect_with_the_paste_form_repairs_a_revoked_account() {
    let dir = tempfile::tempdir().unwrap();
    let account = format!("{}@example.test", unique("erp"));
    let cfg = repair_config(dir.path(), free_port(), false, &account, "");
    let cfg_path = write_config(dir.path(), &cfg);
    let old = consented_then_revoked(&cfg_path, &account);
    let proxy = Proxy::start(&cfg);
    assert!(imap_login(&proxy, &account).starts_with("a NO"));

    let landing = "https://login.microsoftonline.com/common/oauth2/nativeclient";
    let v = browser(
        &proxy,
        &[
            "--mode",
            "paste",
            "--account",
            &account,
            "--landing",
            landing,
        ],
    );
    assert_eq!(v["path"], "/actions/paste", "{v}");
    assert_eq!(v["ok"], true, "{v}\n{}", proxy.logs());
    assert!(
        v["result"].as_str().unwrap().contains("is connected"),
        "{v}"
    );
    assert_ne!(stored_refresh(&cfg_path, &account).unwrap(), old);
    assert!(
        imap_login(&proxy, &account).starts_with("a OK"),
        "{}",
        proxy.logs()
    );
}

/// The same Reconnect, but the IdP's sign-in is done as alice for an
/// account whose mailbox is bob: refused with a clear message, and the
/// stored consent (bob's, still working) is kept.
#[test]
fn consenting_as_another_user_is_refused_and_the_old_token_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (client_id, secret) = (
        format!("{}.apps.googleusercontent.com", unique("repair")),
        "g-secret",
    );
    let register = |consent_as: &str| {
        upstream().idp_post(
            "/admin/google/client",
            &serde_json::json!({"client_id": client_id, "client_secret": secret, "consent_as": consent_as}),
        )
    };
    register("");
    let idp = upstream().get("IDP_URL");
    let up = upstream();
    let account = format!("{}@home.test", unique("gmail"));
    let provider = format!(
        "[[provider]]\nname = \"gmail\"\nkind = \"google\"\nclient_id = \"{client_id}\"\nclient_secret = \"{secret}\"\n\
         token_url = \"{idp}/google/token\"\nauthorize_url = \"{idp}/google/auth\"\nsmtp = \"{}\"\nimap = \"{}\"\npop3 = \"{}\"\n\n\
         [[account]]\nlogin = \"{account}\"\npassword_hash = \"{}\"\ngrant = \"refresh_token\"\nprovider = \"gmail\"\nmailbox = \"{BOB}\"\n",
        up.addr("smtp"),
        up.addr("imap"),
        up.addr("pop3"),
        argon2_hash(LOCAL)
    );
    let port = free_port();
    let cfg = repair_config(dir.path(), port, true, "unused@example.test", &provider);
    let cfg_path = write_config(dir.path(), &cfg);
    let out = crate::providers::paste_consent(&cfg_path, &account, "/google/auth?");
    assert!(out.status.success(), "{}", text(&out));
    let before = stored_refresh(&cfg_path, &format!("gmail:{account}")).unwrap();
    let proxy = Proxy::start(&cfg);
    assert!(
        imap_login(&proxy, &account).starts_with("a OK"),
        "{}",
        proxy.logs()
    );

    register(ALICE);
    let v = browser(&proxy, &["--mode", "callback", "--account", &account]);
    assert_eq!(v["ok"], false, "{v}");
    let said = v["result"].as_str().unwrap();
    assert!(
        said.starts_with(&format!(
            "the new consent does not open {BOB} (imap login refused:"
        )),
        "{said}"
    );
    assert!(
        said.ends_with(&format!(
            "Sign in as {BOB}. The stored consent is unchanged"
        )),
        "{said}"
    );
    assert_eq!(
        stored_refresh(&cfg_path, &format!("gmail:{account}")).unwrap(),
        before,
        "the old token was replaced"
    );
    assert!(
        imap_login(&proxy, &account).starts_with("a OK"),
        "{}",
        proxy.logs()
    );
    register("");
}

/// curl `url` (with the admin token unless `token` is None, and `form`
/// POSTed if any): (status, body, Location).
fn curl_admin(url: &str, token: Option<&str>, form: &[(&str, &str)]) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-m",
        "30",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{redirect_url}",
    ]);
    if let Some(t) = token {
        cmd.args(["-u", &format!("admin:{t}")]);
    }
    for (k, v) in form {
        cmd.args(["--data-urlencode", &format!("{k}={v}")]);
    }
    let out = run(cmd.arg(url), CLIENT_LIMIT);
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = all.rsplit_once('\n').unwrap();
    let (code, location) = tail.split_once(' ').unwrap_or((tail, ""));
    (
        code.parse().unwrap_or(0),
        body.to_string(),
        location.trim().to_string(),
    )
}

fn post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    form: &[(&str, &str)],
) -> (u16, String, String) {
    curl_admin(&format!("http://{addr}{path}"), token, form)
}

fn get(url: &str, token: Option<&str>) -> (u16, String, String) {
    curl_admin(url, token, &[])
}

/// The metrics, read with the admin token.
fn metrics(addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    let (status, body, _) = get(&format!("http://{addr}/metrics"), Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The anti-forgery token of the status page's forms.
fn form_token(addr: SocketAddr) -> String {
    let (status, page, _) = get(&format!("http://{addr}/"), Some(TOKEN));
    assert_eq!(status, 200, "{page}");
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form on the page")
        + 19;
    page[at..].split('"').next().unwrap().to_string()
}

#[test]
fn forged_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let account = format!("{}@example.test", unique("forge"));
    let port = free_port();
    let cfg = repair_config(dir.path(), port, true, &account, "");
    let cfg_path = write_config(dir.path(), &cfg);
    let proxy = Proxy::start(&cfg);
    let admin = proxy.admin_addr();
    let csrf = form_token(admin);
    let connect = [("csrf", csrf.as_str()), ("account", account.as_str())];
    let no_csrf = [("account", account.as_str())];

    // No anti-forgery token, another's, or no admin token: 4xx, nothing started.
    assert_eq!(
        post(admin, "/actions/connect", Some(TOKEN), &no_csrf).0,
        403
    );
    let forged = [
        ("csrf", "1765000000.Zm9yZ2Vk"),
        ("account", account.as_str()),
    ];
    assert_eq!(post(admin, "/actions/connect", Some(TOKEN), &forged).0, 403);
    assert_eq!(post(admin, "/actions/connect", None, &connect).0, 401);
    assert_eq!(post(admin, "/actions/check", None, &connect).0, 401);
    assert_eq!(
        post(
            admin,
            "/actions/queue",
            Some(TOKEN),
            &[("id", "x"), ("op", "drop")]
        )
        .0,
        403
    );
    // A real one, by hand: connect, the IdP's sign-in, the callback once...
    let (status, _, authorize) = post(admin, "/actions/connect", Some(TOKEN), &connect);
    assert_eq!(status, 303, "{authorize}");
    assert!(
        authorize.contains("/authorize?") && authorize.contains("state="),
        "{authorize}"
    );
    let (status, _, callback) = get(&authorize, None);
    assert_eq!(status, 302, "{callback}");
    assert!(
        callback.starts_with(&format!("http://127.0.0.1:{port}/consent/callback?")),
        "{callback}"
    );
    // While it waits, a callback with a state nobody issued.
    let unknown = format!("http://{admin}/consent/callback?state=made-up&code=stolen");
    let (status, body, _) = get(&unknown, Some(TOKEN));
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains("stolen"), "{body}");
    assert_eq!(get(&unknown, None).0, 401);

    // ... refused without the admin token (and not used up by that) ...
    assert_eq!(get(&callback, None).0, 401);
    let (status, body, _) = get(&callback, Some(TOKEN));
    assert_eq!(status, 200, "{body}\n{}", proxy.logs());
    assert!(body.contains("is connected"), "{body}");
    let code = callback
        .split("code=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let refresh = stored_refresh(&cfg_path, &account).unwrap();
    for secret in [code, refresh.as_str()] {
        assert!(!body.contains(secret), "a secret on the page");
        assert!(!proxy.logs().contains(secret), "a secret in the log");
    }
    // ... and never twice.
    let (status, body, _) = get(&callback, Some(TOKEN));
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        stored_refresh(&cfg_path, &account).unwrap(),
        refresh,
        "a reused state changed the token"
    );
    let m = metrics(admin);
    let refused = value(&m, "oxbridge_admin_actions_total", &[("result", "refused")]);
    assert!(refused >= 5.0, "{refused}");
}

#[test]
fn without_an_admin_token_the_page_has_no_actions() {
    let cfg = config(
        &plain_listeners(&["smtp"]),
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let proxy = Proxy::start(&cfg);
    let admin = proxy.admin_addr();
    let (status, page, _) = get(&format!("http://{admin}/"), None);
    assert_eq!(status, 200);
    assert!(!page.contains("<form"), "{page}");
    let (status, body, _) = post(
        admin,
        "/actions/check",
        None,
        &[("csrf", "1.x"), ("account", "scanner@example.test")],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("set [admin] token_file"), "{body}");
}

/// Check now runs what `oxbridge check` runs for the account; Retry and
/// Drop act on a message the spool holds (its server is unreachable).
#[test]
fn check_now_retry_and_drop_work_from_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let account = format!("{}@example.test", unique("ops"));
    let spool = listener("smtp", "none", true) + "delivery = \"spool\"\n";
    let cfg = repair_config(dir.path(), free_port(), false, &account, "").replacen(
        "[[listener]]",
        &format!("{spool}\n[[listener]]"),
        1,
    );
    let proxy = Proxy::start(&cfg);
    let v = browser(
        &proxy,
        &[
            "--mode",
            "click",
            "--action",
            "actions/check",
            "--field",
            "account=scanner@example.test",
        ],
    );
    assert_eq!(v["label"], "Check now", "{v}");
    assert_eq!(v["result"], "Check of scanner@example.test: OK", "{v}");
    let lines = v["lines"].as_str().unwrap();
    assert!(
        lines.contains("scanner@example.test imap: OK (mailbox alice@example.test"),
        "{lines}"
    );
    let v = browser(
        &proxy,
        &[
            "--mode",
            "click",
            "--action",
            "actions/check",
            "--field",
            &format!("account={account}"),
        ],
    );
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["lines"]
            .as_str()
            .unwrap()
            .contains("no refresh token stored"),
        "{v}"
    );

    // A spooled message whose server is gone: Retry, then Drop.
    let stopped = format!("127.0.0.1:{}", free_port());
    drop(proxy);
    let cfg = reroute(&cfg, "smtp", &stopped);
    let proxy = Proxy::start(&cfg);
    let m = Message::write(dir.path(), "repair", ALICE, 0);
    let sent = crate::harness::Smtp::scanner(proxy.port(0)).swaks(&m.path);
    assert!(sent.status.success(), "{}", text(&sent));
    let id = proxy
        .wait_log(&["message spooled"])
        .split("\"id\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the spooled message's id in the log")
        .to_string();
    let v = browser(
        &proxy,
        &[
            "--mode",
            "click",
            "--action",
            "actions/queue",
            "--field",
            &format!("id={id}"),
            "--field",
            "op=retry",
        ],
    );
    assert_eq!(
        v["result"],
        format!("{id}: will be tried within a second (if oxbridge is running)"),
        "{v}"
    );
    let v = browser(
        &proxy,
        &[
            "--mode",
            "click",
            "--action",
            "actions/queue",
            "--field",
            &format!("id={id}"),
            "--field",
            "op=drop",
        ],
    );
    assert_eq!(
        v["result"],
        format!("{id}: dropped; its sender is not told"),
        "{v}"
    );
    let (_, page, _) = get(&format!("http://{}/", proxy.admin_addr()), Some(TOKEN));
    assert!(!page.contains(&id), "{page}");
}
