//! The secrets a config names by file: `[oauth] client_secret_file` and
//! `[admin] token_file`, read by [`Config::load`] after the text has
//! parsed and validated.
//!
//! Promises: an error names the key and the file, never the secret; the
//! secrets end up in [`SecretString`]s; a file that is empty (client
//! secret) or too short to be a token (admin token) is refused.

use secrecy::SecretString;

use super::Config;

/// The shortest admin bearer token accepted.
pub const MIN_ADMIN_TOKEN: usize = 16;

impl Config {
    pub(super) fn load_secret_files(&mut self) -> Result<(), String> {
        if let Some(path) = &self.oauth.client_secret_file {
            let secret = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "oauth.client_secret_file: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(format!(
                    "oauth.client_secret_file: {} is empty",
                    path.display()
                ));
            }
            self.oauth.client_secret = Some(SecretString::from(secret.to_string()));
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
