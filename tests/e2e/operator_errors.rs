//! Errors the operator must fix, seen where the operator looks: the token
//! endpoint out of reach at login time is one warning per login, carrying
//! the same fix `oxbridge check` prints.

use crate::harness::*;

/// A login while the token endpoint cannot be reached: the device gets
/// `454`, and the log has one warning for it, with the fix, not one per
/// attempt of the token request.
#[test]
fn an_unreachable_token_endpoint_is_one_warning_with_its_fix() {
    let url = format!("http://127.0.0.1:{}/token", closed_port());
    let proxy = Proxy::start(&with_token_url(
        &config(&listener("smtp", "none", true), ""),
        &url,
    ));
    let mut c = Raw::connect(proxy.port(0));
    assert!(c.reply().starts_with("220 "));
    let r = c.smtp_login("scanner@example.test", SCANNER_PASSWORD);
    assert!(r.starts_with("454 4.7.0"), "{r}\n{}", proxy.logs());
    let line = proxy.wait_log(&["login failed", "token_unavailable"]);
    assert!(
        line.contains("\"fix\":")
            && line.contains("check [oauth] token_url/tenant and outbound HTTPS"),
        "{line}"
    );
    let logs = proxy.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") && l.contains("token"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
}
