//! Credential sources, in the order a pull consults them:
//! the CRI request's AuthConfig, the registry's entry in the config file, `--creds`/`--auth`,
//! docker's `config.json` (`auths` and credential helpers), credentials persisted from an earlier
//! CRI pull, then anonymous. Secrets never reach logs: `Debug` is redacted.

use base64::Engine as _;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Secret {
    Basic { username: String, password: String },
    Bearer { token: String },
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Secret::Bearer { .. } => write!(f, "Bearer(<redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("credentials must be USER:PASSWORD")]
    BadCreds,
    #[error("--auth must be base64 of USER:PASSWORD")]
    BadAuth,
}

impl Secret {
    /// `user:password` as given to `--creds`.
    pub fn from_creds(s: &str) -> Result<Self, AuthError> {
        let (u, p) = s.split_once(':').ok_or(AuthError::BadCreds)?;
        if u.is_empty() {
            return Err(AuthError::BadCreds);
        }
        Ok(Secret::Basic {
            username: u.to_string(),
            password: p.to_string(),
        })
    }
    /// base64(`user:password`) as in docker's config.json `auth` field and `--auth`.
    pub fn from_auth(s: &str) -> Result<Self, AuthError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| AuthError::BadAuth)?;
        let text = String::from_utf8(raw).map_err(|_| AuthError::BadAuth)?;
        Secret::from_creds(&text).map_err(|_| AuthError::BadAuth)
    }
    pub fn to_registry_auth(&self) -> oci_client::secrets::RegistryAuth {
        match self {
            Secret::Basic { username, password } => {
                oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
            }
            Secret::Bearer { token } => oci_client::secrets::RegistryAuth::Bearer(token.clone()),
        }
    }
    /// A fingerprint that tells credentials apart without revealing them (cache keys only).
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// Where a credential came from, named in errors so a user knows what was tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Request,
    ConfigFile,
    Flag,
    DockerConfig(PathBuf),
    Persisted,
    Anonymous,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Request => f.write_str("the request's AuthConfig"),
            Source::ConfigFile => f.write_str("the registries entry of the lazypull config"),
            Source::Flag => f.write_str("--creds/--auth"),
            Source::DockerConfig(p) => write!(f, "docker config {}", p.display()),
            Source::Persisted => f.write_str("credentials saved from an earlier CRI pull"),
            Source::Anonymous => f.write_str("anonymous access (no credentials found)"),
        }
    }
}

/// The docker config file to read: `--docker-config`, else `$DOCKER_CONFIG/config.json`,
/// else `~/.docker/config.json`.
pub fn docker_config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Look `host` up in a docker config file. Docker Hub is stored under its legacy URL.
pub fn from_docker_config(path: &Path, host: &str) -> Option<Secret> {
    let keys: Vec<String> = if host == "docker.io" || host == "index.docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "docker.io".into(),
            "index.docker.io".into(),
        ]
    } else {
        vec![
            host.to_string(),
            format!("https://{host}"),
            format!("http://{host}"),
        ]
    };
    let bytes = std::fs::read(path).ok()?;
    for key in keys {
        match docker_credential::get_credential_from_reader(bytes.as_slice(), &key) {
            Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
                return Some(Secret::Basic {
                    username: u,
                    password: p,
                });
            }
            Ok(docker_credential::DockerCredential::IdentityToken(_)) => {
                tracing::warn!(
                    registry = host,
                    "docker config holds an identity token, which is not supported; ignoring it"
                );
            }
            Err(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_and_redacts() {
        let s = Secret::from_creds("bob:pa:ss").unwrap();
        assert_eq!(
            s,
            Secret::Basic {
                username: "bob".into(),
                password: "pa:ss".into()
            }
        );
        assert!(!format!("{s:?}").contains("pa:ss"));
        assert_eq!(
            Secret::from_auth("Ym9iOnB3").unwrap(),
            Secret::from_creds("bob:pw").unwrap()
        );
        assert_eq!(Secret::from_creds("nocolon"), Err(AuthError::BadCreds));
        assert_eq!(Secret::from_auth("!!!"), Err(AuthError::BadAuth));
    }

    #[test]
    fn reads_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"auths":{"127.0.0.1:5000":{"auth":"Ym9iOnB3"},"https://index.docker.io/v1/":{"auth":"aHViOmh1Yg=="}}}"#).unwrap();
        assert_eq!(
            from_docker_config(&p, "127.0.0.1:5000"),
            Some(Secret::from_creds("bob:pw").unwrap())
        );
        assert_eq!(
            from_docker_config(&p, "docker.io"),
            Some(Secret::from_creds("hub:hub").unwrap())
        );
        assert_eq!(from_docker_config(&p, "other:1"), None);
    }
}
