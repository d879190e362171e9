//! TLS for the daemon's HTTP side (`mirror.tls`): a certificate and key from PEM files, and
//! optionally client certificates (mTLS) verified against a CA file or the system store.
//! rustls (aws-lc-rs, the provider the registry client already uses).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Whether clients must present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Any client (server-side TLS only).
    #[default]
    None,
    /// Only clients with a certificate the client CA signed.
    Verify,
}

/// What a TLS listener needs.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_auth: ClientAuth,
    /// CA bundle for client certificates; `None`: the system's trust store.
    pub client_ca: Option<PathBuf>,
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(String) -> TlsError + use<> {
    let path = path.to_path_buf();
    move |reason| TlsError::File { what, path, reason }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path)(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path)(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(what, path)("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Build the acceptor; errors name the file and what is wrong with it.
pub fn acceptor(f: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let chain = certs("certificate", &f.cert)?;
    let key = PrivateKeyDer::from_pem_file(&f.key)
        .map_err(|e| file_err("private key", &f.key)(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match f.client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Verify => {
            let mut roots = rustls::RootCertStore::empty();
            match &f.client_ca {
                Some(p) => {
                    for c in certs("client CA", p)? {
                        roots
                            .add(c)
                            .map_err(|e| file_err("client CA", p)(e.to_string()))?;
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    for c in found.certs {
                        // Certificates of the store rustls cannot use are skipped.
                        let _ = roots.add(c);
                    }
                    if roots.is_empty() {
                        return Err(TlsError::Setup(
                            "client_auth: verify without client_ca, and the system trust store is empty".into(),
                        ));
                    }
                }
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Setup(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup(format!("certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsFiles {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
            ..Default::default()
        };
        let e = acceptor(&missing).err().expect("refused").to_string();
        assert!(e.contains("certificate") && e.contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = acceptor(&TlsFiles {
            cert: empty,
            key: dir.path().join("nope.key"),
            ..Default::default()
        })
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
