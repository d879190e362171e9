//! The TLS side of lazypull's clients of a registry (`registries[].tls`): an extra CA bundle,
//! a client certificate for registries that require one (mTLS), or no verification at all.
//! One place turns these files into settings for oci-client and for the plain reqwest clients
//! (manifests, referrers, the `/images` listing), so every request to a host presents the same
//! identity and trusts the same roots.

use super::error_chain;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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
    /// The CA bundle's certificates (DER), none when no CA is set.
    fn ca_certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let Some(path) = &self.ca else {
            return Ok(vec![]);
        };
        let ca_err = |reason: String| TlsError::Ca {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no certificate in it".into()));
        }
        Ok(certs)
    }

    /// The client certificate chain and key in one PEM buffer (what `reqwest::Identity` and
    /// the patched oci-client take), if both are set: at least one certificate and a key.
    fn identity_pem(&self) -> Result<Option<Vec<u8>>, TlsError> {
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
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| id_err(e.to_string()))?;
        if chain.is_empty() {
            return Err(id_err("no certificate in tls.cert".into()));
        }
        let key_pem = read(key)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| id_err(e.to_string()))?;
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        pem.extend_from_slice(&key_pem);
        Ok(Some(pem))
    }

    /// Both files readable and well-formed (the config's validation, once at start): a
    /// client is built with the identity, which is where rustls parses the key itself.
    pub fn check(&self) -> Result<(), TlsError> {
        self.ca_certs()?;
        if let Some(pem) = self.identity_pem()? {
            let id_err = |reason: String| TlsError::Identity {
                cert: self.cert.clone().unwrap_or_default(),
                key: self.key.clone().unwrap_or_default(),
                reason,
            };
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| id_err(error_chain(&e)))?;
            reqwest::Client::builder()
                .identity(id)
                .build()
                .map_err(|e| id_err(error_chain(&e)))?;
        }
        Ok(())
    }

    /// These settings on a reqwest client.
    pub fn apply(&self, mut b: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, TlsError> {
        b = b.danger_accept_invalid_certs(self.insecure_skip_verify);
        let ca = self.ca_certs()?;
        if !ca.is_empty() {
            let certs = ca
                .iter()
                .map(|der| reqwest::Certificate::from_der(der))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Ca {
                    path: self.ca.clone().unwrap_or_default(),
                    reason: error_chain(&e),
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
        cfg.extra_root_certificates
            .extend(
                self.ca_certs()?
                    .into_iter()
                    .map(|der| oci_client::client::Certificate {
                        encoding: oci_client::client::CertificateEncoding::Der,
                        data: der.to_vec(),
                    }),
            );
        cfg.client_identity_pem = self.identity_pem()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = t.ca_certs().unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
    }
}
