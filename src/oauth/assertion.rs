//! Certificate credentials for `client_credentials`: a JWT client assertion
//! (RFC 7523) signed RS256 with the app's private key, carrying the
//! certificate's SHA-1 thumbprint (`x5t`) as Entra ID expects.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::PrivateKeyDer;

/// How long an assertion is valid.
const LIFETIME_S: u64 = 600;
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub struct ClientAssertion {
    key: RsaKeyPair,
    thumbprint: String,
}

impl std::fmt::Debug for ClientAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientAssertion {{ x5t: {} }}", self.thumbprint)
    }
}

impl ClientAssertion {
    /// Load a PEM file holding the certificate and its RSA private key.
    pub fn load(path: &Path) -> Result<ClientAssertion, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cert = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .ok_or_else(|| format!("{}: no certificate found", path.display()))?
            .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        let key = rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?
            .ok_or_else(|| format!("{}: no private key found", path.display()))?;
        let key = match key {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(format!("{}: the private key must be RSA", path.display())),
        }
        .map_err(|e| format!("{}: unusable RSA key: {e}", path.display()))?;
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
        Ok(ClientAssertion {
            key,
            thumbprint: B64URL.encode(digest.as_ref()),
        })
    }

    /// A fresh signed assertion for `client_id` at the token endpoint `audience`.
    pub fn jwt(&self, client_id: &str, audience: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": self.thumbprint});
        let jti: [u8; 16] = rand::random();
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": B64URL.encode(jti),
            "nbf": now,
            "iat": now,
            "exp": now + LIFETIME_S,
        });
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "cannot sign the client assertion".to_string())?;
        Ok(format!("{signing_input}.{}", B64URL.encode(signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
    use std::process::Command;

    #[test]
    fn assertion_is_signed_and_names_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=oxbridge-test",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let both = dir.path().join("both.pem");
        let mut pem = std::fs::read(&cert).unwrap();
        pem.extend(std::fs::read(&key).unwrap());
        std::fs::write(&both, &pem).unwrap();

        let a = ClientAssertion::load(&both).unwrap();
        let jwt = a
            .jwt("app-id", "https://login.example/tenant/oauth2/v2.0/token")
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(claims["iss"], "app-id");
        assert_eq!(claims["sub"], "app-id");
        assert_eq!(
            claims["aud"],
            "https://login.example/tenant/oauth2/v2.0/token"
        );

        // x5t is the SHA-1 of the certificate's DER.
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
        assert_eq!(header["x5t"], B64URL.encode(sha1.as_ref()));

        // The signature verifies with the certificate's public key.
        let public = a.key.public().as_ref().to_vec();
        let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public);
        let signed = format!("{}.{}", parts[0], parts[1]);
        verifier
            .verify(signed.as_bytes(), &B64URL.decode(parts[2]).unwrap())
            .unwrap();
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }
}
