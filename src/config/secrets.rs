//! The secrets a config names by file: `client_secret_file` (`[oauth]`
//! and `[[provider]]`), a provider's `service_account_file` and
//! `[admin] token_file`, read by [`Config::load`] after the text has
//! parsed and validated.
//!
//! Promises: an error names the key and the file, never the secret; the
//! secrets end up in [`SecretString`]s; a file that is empty (client
//! secret) or too short to be a token (admin token) is refused.

use secrecy::SecretString;

use super::provider::ServiceAccountKey;
use super::Config;

/// The shortest admin bearer token accepted.
pub const MIN_ADMIN_TOKEN: usize = 16;

impl Config {
    pub(super) fn load_secret_files(&mut self) -> Result<(), String> {
        if let Some(path) = &self.oauth.client_secret_file {
            self.oauth.client_secret = Some(read_secret("oauth", path)?);
        }
        for (i, p) in self.providers.iter_mut().enumerate() {
            let key = format!("provider[{i}]");
            if let Some(path) = &p.client_secret_file {
                p.client_secret = Some(read_secret(&key, path)?);
            }
            if let Some(path) = &p.service_account_file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "{key}.service_account_file: cannot read {}: {e}",
                        path.display()
                    )
                })?;
                let account = ServiceAccountKey::parse(&text)
                    .map_err(|e| format!("{key}.service_account_file: {}: {e}", path.display()))?;
                p.service_account = Some(account);
            }
        }
        if let Some(admin) = &mut self.admin {
            if let Some(path) = &admin.token_file {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    format!("admin.token_file: cannot read {}: {e}", path.display())
                })?;
                let token = token.trim();
                if token.len() < MIN_ADMIN_TOKEN {
                    return Err(format!(
                        "admin.token_file: {} holds {} characters; use at least {MIN_ADMIN_TOKEN} (for example `openssl rand -hex 32`)",
                        path.display(),
                        token.len()
                    ));
                }
                admin.token = Some(SecretString::from(token.to_string()));
            }
        }
        Ok(())
    }
}

/// A client secret from `{key}.client_secret_file`: trimmed, not empty.
fn read_secret(key: &str, path: &std::path::Path) -> Result<SecretString, String> {
    let secret = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{key}.client_secret_file: cannot read {}: {e}",
            path.display()
        )
    })?;
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(format!(
            "{key}.client_secret_file: {} is empty",
            path.display()
        ));
    }
    Ok(SecretString::from(secret.to_string()))
}
