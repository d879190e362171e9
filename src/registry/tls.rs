//! The TLS side of lazypull's clients of a registry (`registries[].tls`): an extra CA bundle,
//! a client certificate for registries that require one (mTLS), or no verification at all.
//! One place turns these files into settings for oci-client and for the plain reqwest clients
//! (manifests, referrers, the `/images` listing), so every request to a host presents the same
//! identity and trusts the same roots.

use super::error_chain;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `registries[].tls`.
#[derive(Clone, Debug, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// CA bundle (PEM) trusted for this registry, besides the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) presented when the registry asks for one; with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Accept any server certificate (testing only).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.ca {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("tls.cert and tls.key must be given together")]
    Half,
    #[error("tls.cert {cert} / tls.key {key}: {reason}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

impl ClientTls {
    /// The CA bundle's PEM, if one is set.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, TlsError> {
        let Some(path) = &self.ca else {
            return Ok(None);
        };
        let ca_err = |reason: String| TlsError::Ca {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no certificate in it".into()));
        }
        Ok(Some(pem))
    }

    /// The client certificate chain and key in one PEM buffer (what `reqwest::Identity` and
    /// the patched oci-client take), if both are set; checked by building a client with it.
    pub fn identity_pem(&self) -> Result<Option<Vec<u8>>, TlsError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => return Err(TlsError::Half),
        };
        let id_err = |reason: String| TlsError::Identity {
            cert: cert.clone(),
            key: key.clone(),
            reason,
        };
        let read = |p: &Path| std::fs::read(p).map_err(|e| id_err(format!("{}: {e}", p.display())));
        let mut pem = read(cert)?;
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        pem.extend_from_slice(&read(key)?);
        // `Identity::from_pem` only splits the PEM sections; building a client parses the key.
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| id_err(error_chain(&e)))?;
        reqwest::Client::builder()
            .identity(id)
            .build()
            .map_err(|e| id_err(error_chain(&e)))?;
        Ok(Some(pem))
    }

    /// Both files readable and well-formed (the config's validation).
    pub fn check(&self) -> Result<(), TlsError> {
        self.ca_pem()?;
        self.identity_pem()?;
        Ok(())
    }

    /// These settings on a reqwest client.
    pub fn apply(&self, mut b: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, TlsError> {
        b = b.danger_accept_invalid_certs(self.insecure_skip_verify);
        if let Some(pem) = self.ca_pem()? {
            // ca_pem parsed this bundle already.
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| TlsError::Ca {
                path: self.ca.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
            b = b.tls_certs_merge(certs);
        }
        if let Some(pem) = self.identity_pem()? {
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| TlsError::Identity {
                cert: self.cert.clone().unwrap_or_default(),
                key: self.key.clone().unwrap_or_default(),
                reason: error_chain(&e),
            })?;
            b = b.identity(id);
        }
        Ok(b)
    }

    /// These settings on an oci-client configuration.
    pub fn apply_oci(&self, cfg: &mut oci_client::client::ClientConfig) -> Result<(), TlsError> {
        cfg.accept_invalid_certificates = self.insecure_skip_verify;
        if let Some(pem) = self.ca_pem()? {
            for block in pem_certificates(&pem) {
                cfg.extra_root_certificates
                    .push(oci_client::client::Certificate {
                        encoding: oci_client::client::CertificateEncoding::Pem,
                        data: block,
                    });
            }
        }
        cfg.client_identity_pem = self.identity_pem()?;
        Ok(())
    }
}

/// Each `CERTIFICATE` block of a bundle on its own (oci-client takes one certificate per entry).
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(pem);
    let mut out = vec![];
    let mut rest = text.as_ref();
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let stop = start + len + END.len();
        out.push(format!("{}\n", &rest[start..stop]).into_bytes());
        rest = &rest[stop..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_splits_into_its_certificates() {
        let pem = b"junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let certs = pem_certificates(pem);
        assert_eq!(certs.len(), 2);
        assert!(String::from_utf8_lossy(&certs[1]).contains("BBB"));
        assert!(pem_certificates(b"-----BEGIN CERTIFICATE-----\nAAA").is_empty());
    }

    #[test]
    fn cert_without_key_is_refused() {
        let t = ClientTls {
            cert: Some("/nonexistent/cert.pem".into()),
            ..Default::default()
        };
        assert!(matches!(t.identity_pem(), Err(TlsError::Half)));
        assert!(ClientTls::default().identity_pem().unwrap().is_none());
    }

    #[test]
    fn unreadable_or_malformed_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem either").unwrap();
        let t = ClientTls {
            cert: Some(cert),
            key: Some(key.clone()),
            ..Default::default()
        };
        assert!(matches!(t.identity_pem(), Err(TlsError::Identity { .. })));
        let t = ClientTls {
            ca: Some(key),
            ..Default::default()
        };
        let e = t.ca_pem().unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
    }
}
