//! Signed JWTs (RFC 7523, RS256), one signer for both uses:
//!
//! * a client assertion for `client_credentials` with a certificate,
//!   carrying the certificate's SHA-1 thumbprint (`x5t`) as Entra ID
//!   expects ([`ClientAssertion`]);
//! * a Google service account's JWT-bearer grant with domain-wide
//!   delegation: `iss` its address, `sub` the mailbox, `scope`, `aud` the
//!   token URL ([`ServiceAccount`]).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::PrivateKeyDer;
use secrecy::ExposeSecret;

use crate::config::provider::ServiceAccountKey;

/// How long a client assertion is valid.
const LIFETIME_S: u64 = 600;
/// How long a service account's grant JWT is valid (Google allows an hour).
const GRANT_LIFETIME_S: u64 = 3600;
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// RFC 7523's grant type: a JWT in exchange for an access token.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// An RSA private key that signs JWTs with RS256.
struct Signer(RsaKeyPair);

impl Signer {
    /// The first RSA private key in `pem`; errors name `what`.
    fn from_pem(pem: &[u8], what: &str) -> Result<Signer, String> {
        let key = rustls_pemfile::private_key(&mut &pem[..])
            .map_err(|e| format!("{what}: bad PEM: {e}"))?
            .ok_or_else(|| format!("{what}: no private key found"))?;
        match key {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(format!("{what}: the private key must be RSA")),
        }
        .map(Signer)
        .map_err(|e| format!("{what}: unusable RSA key: {e}"))
    }

    /// `header.claims.signature`, each base64url.
    fn sign(&self, header: serde_json::Value, claims: serde_json::Value) -> Result<String, String> {
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "cannot sign the JWT".to_string())?;
        Ok(format!("{signing_input}.{}", B64URL.encode(signature)))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct ClientAssertion {
    signer: Signer,
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
        let signer = Signer::from_pem(&pem, &path.display().to_string())?;
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
        Ok(ClientAssertion {
            signer,
            thumbprint: B64URL.encode(digest.as_ref()),
        })
    }

    /// A fresh signed assertion for `client_id` at the token endpoint `audience`.
    pub fn jwt(&self, client_id: &str, audience: &str) -> Result<String, String> {
        let now = now();
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
        self.signer.sign(header, claims)
    }
}

/// A Google service account with domain-wide delegation.
pub struct ServiceAccount {
    signer: Signer,
    email: String,
    key_id: Option<String>,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceAccount {{ {} }}", self.email)
    }
}

impl ServiceAccount {
    /// The signer of a parsed key file; errors name `what`.
    pub fn new(key: &ServiceAccountKey, what: &str) -> Result<ServiceAccount, String> {
        Ok(ServiceAccount {
            signer: Signer::from_pem(key.private_key.expose_secret().as_bytes(), what)?,
            email: key.client_email.clone(),
            key_id: key.private_key_id.clone(),
        })
    }

    /// The service account's address (`iss`).
    pub fn email(&self) -> &str {
        &self.email
    }

    /// A grant JWT acting as `mailbox` for `scope` at the token URL `audience`.
    pub fn jwt(&self, mailbox: &str, scope: &str, audience: &str) -> Result<String, String> {
        let now = now();
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = serde_json::Value::String(kid.clone());
        }
        let claims = serde_json::json!({
            "iss": self.email,
            "sub": mailbox,
            "scope": scope,
            "aud": audience,
            "iat": now,
            "exp": now + GRANT_LIFETIME_S,
        });
        self.signer.sign(header, claims)
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
        let public = a.signer.0.public().as_ref().to_vec();
        let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public);
        let signed = format!("{}.{}", parts[0], parts[1]);
        verifier
            .verify(signed.as_bytes(), &B64URL.decode(parts[2]).unwrap())
            .unwrap();
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_service_account_grant_acts_as_the_mailbox() {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let pem = String::from_utf8(out.stdout).unwrap();
        let text = serde_json::json!({
            "type": "service_account", "private_key_id": "kid-1", "private_key": pem,
            "client_email": "relay@proj.iam.gserviceaccount.com",
        })
        .to_string();
        let key = ServiceAccountKey::parse(&text).unwrap();
        let sa = ServiceAccount::new(&key, "test").unwrap();
        let jwt = sa
            .jwt(
                "scans@school.test",
                "https://mail.google.com/",
                "https://oauth2.googleapis.com/token",
            )
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "kid-1");
        assert_eq!(claims["iss"], "relay@proj.iam.gserviceaccount.com");
        assert_eq!(claims["sub"], "scans@school.test");
        assert_eq!(claims["scope"], "https://mail.google.com/");
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 3600, "Google takes at most an hour");
        let public = sa.signer.0.public().as_ref().to_vec();
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public)
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &B64URL.decode(parts[2]).unwrap(),
            )
            .unwrap();
        assert!(!format!("{sa:?}").contains("PRIVATE"));
    }
}
