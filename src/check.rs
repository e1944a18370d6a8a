//! `oxbridge check`: for each account and each protocol that has a
//! listener, a real token request and a real upstream XOAUTH2 login, one
//! line each: OK, or the failure and what the administrator should do.
//!
//! Accounts that cannot be checked without a device's password (the
//! `password` grant, `*@domain` patterns without a fixed mailbox) are
//! listed as SKIPPED and do not fail the check.

use std::io::Write;
use std::time::Instant;

use crate::app::App;
use crate::config::{Config, Grant};
use crate::error::AuthError;
use crate::{diagnose, login};

/// Run every check; `Ok(true)` when none failed.
pub async fn run(config: Config, out: &mut impl Write) -> Result<bool, String> {
    let protocols = config.protocols();
    if protocols.is_empty() {
        writeln!(out, "no [[listener]]: nothing to check").map_err(|e| e.to_string())?;
        return Ok(true);
    }
    let app = App::new(config).map_err(|e| e.to_string())?;
    let mut all_ok = true;
    for account in &app.config.accounts {
        let login = &account.login;
        if account.grant == Grant::Password || login.starts_with("*@") {
            let why = if account.grant == Grant::Password {
                "grant = \"password\" needs a user's password; a device's login tests it"
            } else {
                "a *@domain pattern; a device's login tests it"
            };
            writeln!(out, "{login}: SKIPPED ({why})").map_err(|e| e.to_string())?;
            continue;
        }
        for &protocol in &protocols {
            let started = Instant::now();
            let result = match app.accounts().identity(login) {
                Ok(id) => login::check_login(&app, protocol, &id).await,
                Err(e) => Err(e),
            };
            let line = match &result {
                Ok(mailbox) => format!(
                    "{login} {protocol}: OK (mailbox {mailbox}, {} ms)",
                    started.elapsed().as_millis()
                ),
                Err(e) => {
                    all_ok = false;
                    failure_line(login, protocol.as_str(), e)
                }
            };
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
        }
    }
    Ok(all_ok)
}

fn failure_line(login: &str, protocol: &str, e: &AuthError) -> String {
    match diagnose::advice(e) {
        Some(fix) => format!("{login} {protocol}: FAILED: {e}. Fix: {fix}"),
        None => format!("{login} {protocol}: FAILED: {e}"),
    }
}
