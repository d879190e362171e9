//! Distribution client over `oci-client`: per-registry scheme/TLS, mirrors with fallback to the
//! upstream, credential sources, bounded bodies, retries with backoff on 5xx/timeouts.
//!
//! Redirects (blob storage backends) are followed by reqwest, which drops `Authorization` when
//! the host changes; oci-client also refuses to authenticate requests outside the registry.

pub mod auth;
pub mod early;
pub mod seam;
pub mod tls;

use crate::oci::{self, Digest, Reference};
use auth::{Secret, Source};
use bytes::Bytes;
use futures_util::{StreamExt, stream::BoxStream};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "registry {registry} refused access to {repository} ({status}); credentials tried: {tried}"
    )]
    Unauthorized {
        registry: String,
        repository: String,
        status: &'static str,
        tried: String,
    },
    #[error("{what} not found in {registry}")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} unreachable: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("registry {registry} answered with an error: {reason}")]
    Server { registry: String, reason: String },
    #[error("{what} from {registry} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        registry: String,
        what: String,
        size: u64,
        limit: u64,
    },
    #[error("digest mismatch for {what} from {registry}: expected {expected}, got {actual}")]
    DigestMismatch {
        registry: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("truncated body for {what} from {registry}: got {got} of {expected} bytes")]
    Truncated {
        registry: String,
        what: String,
        got: u64,
        expected: u64,
    },
    #[error(transparent)]
    Oci(#[from] oci::OciError),
}

impl RegistryError {
    /// Worth retrying (possibly on another endpoint): network trouble and 5xx/429.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. }
                | RegistryError::Server { .. }
                | RegistryError::Truncated { .. }
        )
    }
}

pub type Result<T> = std::result::Result<T, RegistryError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

/// One registry host's settings (config file `registries:`).
#[derive(Clone, Debug, Default)]
pub struct HostConfig {
    pub name: String,
    pub scheme: Option<Scheme>,
    /// Mirrors tried in order before the upstream: `http://host:port` or `https://host`.
    pub mirrors: Vec<String>,
    pub auth: Option<Secret>,
    pub tls: tls::ClientTls,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub hosts: Vec<HostConfig>,
    /// `--creds`/`--auth`: used for any registry without a more specific credential.
    pub default_secret: Option<Secret>,
    pub docker_config: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hosts: vec![],
            default_secret: None,
            docker_config: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retries: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Credentials that come with one operation (the CRI request's, or persisted ones).
#[derive(Clone, Debug, Default)]
pub struct OpCreds {
    pub request: Option<Secret>,
    pub persisted: Option<Secret>,
}

/// A place to fetch from: a mirror or the upstream itself.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    host: String,
    scheme: Scheme,
    is_mirror: bool,
    /// Another lazypull node (`peers:`): asked for content by digest before any mirror and
    /// the upstream, anonymously, with the peer user agent (it answers from its store only).
    is_peer: bool,
}

fn is_loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .map(|(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
        .unwrap_or(host);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parse a mirror URL (`http://h:p`, `https://h`, or a bare host meaning https).
pub fn parse_endpoint(url: &str) -> std::result::Result<(Scheme, String), String> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else {
        (Scheme::Https, url)
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(format!(
            "mirror {url:?} must be SCHEME://HOST[:PORT] with no path"
        ));
    }
    Ok((scheme, host.to_string()))
}

pub struct Registry {
    opts: Options,
    clients: Mutex<HashMap<(String, Scheme, u64), oci_client::Client>>,
    /// Endpoints that challenged an anonymous blob request (they want the token flow even
    /// without credentials).
    needs_token: Mutex<std::collections::HashSet<(String, Scheme)>>,
    /// Plain HTTP clients for anonymous manifest requests, by endpoint (see `bare_manifest`).
    http: Mutex<HashMap<(String, Scheme, bool), reqwest::Client>>,
    /// Other lazypull nodes, asked first for content by digest (see `set_peers`).
    peers: std::sync::RwLock<Vec<Endpoint>>,
}

/// Client-cache key of the "bare" anonymous client: it never stores auth, so oci-client does
/// not probe `/v2/` before each request (it re-probes on every request when a registry needs
/// no auth, which doubles the latency of each on-demand read).
const BARE: u64 = u64::MAX;

/// Client-cache key of a peer's client (always anonymous, with the peer user agent).
const PEER: u64 = u64::MAX - 1;

/// A peer that does not accept a connection within this is skipped (it answers from its store
/// or not at all: failing over fast is the point).
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The user agent of requests to peers (see `http::mirror::PEER_USER_AGENT_PREFIX`).
const PEER_USER_AGENT: &str = concat!("lazypull-peer/", env!("CARGO_PKG_VERSION"));

/// A blob body stream positioned at the requested offset (when the registry ignores `Range`
/// and sends the whole blob, the bytes before the offset are dropped here).
pub struct BlobBody {
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
    /// The body's length as the registry announced it (from the requested offset on).
    pub len: Option<u64>,
    /// Answered from bytes fetched ahead (`registry::early`), which were counted on the link
    /// when they were fetched (what the answer fetches after them is counted then too).
    pub early: bool,
}

/// Drop the first `skip` bytes of a stream.
fn skip_prefix(
    stream: BoxStream<'static, std::io::Result<Bytes>>,
    mut skip: u64,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    if skip == 0 {
        return stream;
    }
    stream
        .filter_map(move |item| {
            let out = match item {
                Ok(chunk) if skip >= chunk.len() as u64 => {
                    skip -= chunk.len() as u64;
                    None
                }
                Ok(chunk) => {
                    let s = std::mem::take(&mut skip) as usize;
                    Some(Ok(chunk.slice(s..)))
                }
                Err(e) => Some(Err(e)),
            };
            futures_util::future::ready(out)
        })
        .boxed()
}

impl Registry {
    pub fn new(opts: Options) -> Arc<Self> {
        Arc::new(Registry {
            opts,
            clients: Mutex::new(HashMap::new()),
            needs_token: Mutex::new(Default::default()),
            http: Mutex::new(HashMap::new()),
            peers: std::sync::RwLock::new(vec![]),
        })
    }

    fn host_config(&self, host: &str) -> Option<&HostConfig> {
        self.opts.hosts.iter().find(|h| h.name == host)
    }

    fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let cfg = self.host_config(registry);
        let mut out = vec![];
        for m in cfg.map(|c| c.mirrors.as_slice()).unwrap_or_default() {
            if let Ok((scheme, host)) = parse_endpoint(m) {
                out.push(Endpoint {
                    host,
                    scheme,
                    is_mirror: true,
                    is_peer: false,
                });
            }
        }
        let scheme = cfg
            .and_then(|c| c.scheme)
            .unwrap_or(if is_loopback(registry) {
                Scheme::Http
            } else {
                Scheme::Https
            });
        let host = if registry == "docker.io" {
            "index.docker.io".to_string()
        } else {
            registry.to_string()
        };
        out.push(Endpoint {
            host,
            scheme,
            is_mirror: false,
            is_peer: false,
        });
        out
    }

    /// Set the lazypull nodes asked first for content by digest (`http://host:port` URLs of
    /// their mirrors); invalid entries are logged and left out.
    pub fn set_peers(&self, urls: &[String]) {
        let mut peers = vec![];
        for u in urls {
            match parse_endpoint(u) {
                Ok((scheme, host)) => peers.push(Endpoint {
                    host,
                    scheme,
                    is_mirror: true,
                    is_peer: true,
                }),
                Err(e) => tracing::warn!(peer = %u, error = %e, "peer left out"),
            }
        }
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    /// The peers asked now.
    pub fn peers(&self) -> Vec<String> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| e.host.clone())
            .collect()
    }

    /// Peers (for content by digest of a registry a peer can name in its path: a host with a
    /// dot or a port), then [`Registry::endpoints`].
    fn endpoints_for(&self, registry: &str, by_digest: bool) -> Vec<Endpoint> {
        let mut out = vec![];
        if by_digest && (registry.contains('.') || registry.contains(':')) {
            out.extend(
                self.peers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned(),
            );
        }
        out.extend(self.endpoints(registry));
        out
    }

    /// The credential for `host` and where it came from (highest priority first).
    fn credential(&self, host: &str, creds: &OpCreds, upstream: bool) -> (Option<Secret>, Source) {
        if upstream && let Some(s) = &creds.request {
            return (Some(s.clone()), Source::Request);
        }
        if let Some(s) = self.host_config(host).and_then(|c| c.auth.clone()) {
            return (Some(s), Source::ConfigFile);
        }
        if !upstream {
            // Mirrors get only their own configured credentials, never the upstream's.
            return (None, Source::Anonymous);
        }
        if let Some(s) = &self.opts.default_secret {
            return (Some(s.clone()), Source::Flag);
        }
        if let Some(path) = auth::docker_config_path(self.opts.docker_config.as_deref())
            && let Some(s) = auth::from_docker_config(&path, host)
        {
            return (Some(s), Source::DockerConfig(path));
        }
        if let Some(s) = &creds.persisted {
            return (Some(s.clone()), Source::Persisted);
        }
        (None, Source::Anonymous)
    }

    fn client(&self, ep: &Endpoint, secret: Option<&Secret>) -> oci_client::Client {
        self.client_keyed(ep, secret.map(Secret::fingerprint).unwrap_or(0))
    }

    fn client_keyed(&self, ep: &Endpoint, fingerprint: u64) -> oci_client::Client {
        let key = (
            ep.host.clone(),
            ep.scheme,
            if ep.is_peer { PEER } else { fingerprint },
        );
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(key)
            .or_insert_with(|| {
                let mut config = ClientConfig {
                    protocol: match ep.scheme {
                        Scheme::Http => ClientProtocol::Http,
                        Scheme::Https => ClientProtocol::Https,
                    },
                    connect_timeout: Some(if ep.is_peer {
                        self.opts.connect_timeout.min(PEER_CONNECT_TIMEOUT)
                    } else {
                        self.opts.connect_timeout
                    }),
                    read_timeout: Some(self.opts.read_timeout),
                    user_agent: if ep.is_peer {
                        PEER_USER_AGENT
                    } else {
                        concat!("lazypull/", env!("CARGO_PKG_VERSION"))
                    },
                    platform_resolver: None,
                    ..Default::default()
                };
                // The config's validation read these files at start; if they have gone bad
                // since, requests go out without them and the registry's answer says why.
                if let Some(tls) = self.host_config(&ep.host).map(|c| &c.tls)
                    && let Err(e) = tls.apply_oci(&mut config)
                {
                    tracing::error!(registry = %ep.host, error = %e, "registry TLS settings");
                }
                oci_client::Client::new(config)
            })
            .clone()
    }

    fn reference_at(r: &Reference, ep: &Endpoint, digest: Option<&str>) -> Reference {
        // A peer's mirror learns the upstream from the path's first segment.
        let repo = if ep.is_peer {
            format!("{}/{}", r.registry(), r.repository())
        } else {
            r.repository().to_string()
        };
        match digest.or(r.digest()) {
            Some(d) => Reference::with_digest(ep.host.clone(), repo, d.to_string()),
            None => Reference::with_tag(
                ep.host.clone(),
                repo,
                r.tag().unwrap_or("latest").to_string(),
            ),
        }
    }

    /// Run `op` on each endpoint (mirrors first), retrying transient failures with backoff.
    async fn on_endpoints<T, F, Fut>(
        &self,
        r: &Reference,
        creds: &OpCreds,
        what: &str,
        op: F,
    ) -> Result<T>
    where
        F: Fn(oci_client::Client, Reference, Option<Secret>, Source, Endpoint) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.on_endpoints_with(r, creds, what, false, op).await
    }

    /// [`Registry::on_endpoints`], peers first when `by_digest` (content addressed by digest:
    /// whoever has it serves the same bytes).
    async fn on_endpoints_with<T, F, Fut>(
        &self,
        r: &Reference,
        creds: &OpCreds,
        what: &str,
        by_digest: bool,
        op: F,
    ) -> Result<T>
    where
        F: Fn(oci_client::Client, Reference, Option<Secret>, Source, Endpoint) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let endpoints = self.endpoints_for(r.registry(), by_digest);
        let mut last = None;
        for ep in endpoints {
            let (secret, source) = if ep.is_peer {
                (None, Source::Anonymous)
            } else {
                self.credential(
                    if ep.is_mirror { &ep.host } else { r.registry() },
                    creds,
                    !ep.is_mirror,
                )
            };
            let client = self.client(&ep, secret.as_ref());
            let mut attempt = 0;
            loop {
                let reference = Self::reference_at(r, &ep, None);
                match op(
                    client.clone(),
                    reference,
                    secret.clone(),
                    source.clone(),
                    ep.clone(),
                )
                .await
                {
                    Ok(v) => return Ok(v),
                    // A failing mirror hands over to the next endpoint at once; the upstream, the
                    // last resort, gets the retries with backoff.
                    Err(e) if e.is_transient() && !ep.is_mirror && attempt < self.opts.retries => {
                        let delay = self.opts.backoff * 2u32.pow(attempt);
                        tracing::warn!(registry = %ep.host, %what, error = %e, attempt, "transient registry error; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        attempt += 1;
                    }
                    Err(e) => {
                        if ep.is_peer {
                            // A peer without the content says so at once: the usual case.
                            tracing::debug!(peer = %ep.host, %what, error = %e, "peer cannot serve; trying the next endpoint");
                        } else if ep.is_mirror {
                            tracing::warn!(mirror = %ep.host, %what, error = %e, "mirror failed; trying the next endpoint");
                        }
                        last = Some(e);
                        break;
                    }
                }
            }
        }
        // endpoints() always yields the upstream, so `last` is set when we get here.
        Err(last.unwrap_or_else(|| RegistryError::Unreachable {
            registry: r.registry().into(),
            reason: "no endpoint".into(),
        }))
    }

    /// Fetch a manifest or index by the reference's tag or digest (or `digest`, when given).
    /// Returns the bytes and their digest; a digest in the reference is verified.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        digest: Option<&Digest>,
        creds: &OpCreds,
    ) -> Result<(Bytes, Digest)> {
        let what = format!(
            "manifest {}",
            digest
                .map(|d| d.to_string())
                .unwrap_or_else(|| r.to_string())
        );
        let want = digest
            .cloned()
            .or_else(|| r.digest().and_then(|d| Digest::parse(d).ok()));
        let by_digest = want.is_some();
        self.on_endpoints_with(
            r,
            creds,
            &what,
            by_digest,
            |client, reference, secret, source, ep| {
                let reference = match &want {
                    Some(d) => Reference::with_digest(
                        reference.registry().into(),
                        reference.repository().into(),
                        d.to_string(),
                    ),
                    None => reference,
                };
                let want = want.clone();
                let what = what.clone();
                async move {
                    let auth = auth_of(secret.as_ref());
                    let body = self
                        .anonymous_first(
                            &ep,
                            secret.as_ref(),
                            |_| self.bare_manifest(&ep, &reference, &source, &what),
                            || async {
                                client
                                    .pull_manifest_raw(&reference, &auth, oci::MANIFEST_ACCEPT)
                                    .await
                                    .map(|(body, _)| body)
                                    .map_err(|e| {
                                        classify(
                                            e,
                                            &ep.host,
                                            reference.repository(),
                                            &what,
                                            &source,
                                        )
                                    })
                            },
                        )
                        .await?;
                    if body.len() > oci::MAX_MANIFEST_BYTES {
                        return Err(RegistryError::TooLarge {
                            registry: ep.host.clone(),
                            what,
                            size: body.len() as u64,
                            limit: oci::MAX_MANIFEST_BYTES as u64,
                        });
                    }
                    let actual = Digest::of(&body);
                    if let Some(expected) = want
                        && expected != actual
                    {
                        return Err(RegistryError::DigestMismatch {
                            registry: ep.host.clone(),
                            what,
                            expected,
                            actual,
                        });
                    }
                    Ok((body, actual))
                }
            },
        )
        .await
    }

    /// The digest the registry gives for a tag now (a HEAD of the manifest; registries that
    /// send no `Docker-Content-Digest` get a GET, hashed by oci-client).
    pub async fn manifest_digest(&self, r: &Reference, creds: &OpCreds) -> Result<Digest> {
        let what = format!("digest of {r}");
        self.on_endpoints(r, creds, &what, |client, reference, secret, source, ep| {
            let what = what.clone();
            async move {
                let auth = auth_of(secret.as_ref());
                let d = client
                    .fetch_manifest_digest(&reference, &auth)
                    .await
                    .map_err(|e| classify(e, &ep.host, reference.repository(), &what, &source))?;
                Ok(Digest::parse(&d)?)
            }
        })
        .await
    }

    /// Fetch a small blob (an image config) whole, bounded by `limit`, verified against `d`.
    pub async fn fetch_small_blob(
        &self,
        r: &Reference,
        d: &Digest,
        limit: usize,
        creds: &OpCreds,
    ) -> Result<Vec<u8>> {
        let what = format!("blob {d}");
        self.on_endpoints_with(
            r,
            creds,
            &what,
            true,
            |client, reference, secret, source, ep| {
                let what = what.clone();
                async move {
                    let body = self
                        .blob_request(
                            &client,
                            &reference,
                            d,
                            0,
                            None,
                            secret.as_ref(),
                            &source,
                            &ep,
                            &what,
                        )
                        .await?;
                    let mut stream = body.stream;
                    let mut buf = Vec::new();
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| RegistryError::Unreachable {
                            registry: ep.host.clone(),
                            reason: e.to_string(),
                        })?;
                        if buf.len() + chunk.len() > limit {
                            return Err(RegistryError::TooLarge {
                                registry: ep.host.clone(),
                                what,
                                size: (buf.len() + chunk.len()) as u64,
                                limit: limit as u64,
                            });
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    let actual = Digest::of(&buf);
                    if &actual != d {
                        return Err(RegistryError::DigestMismatch {
                            registry: ep.host.clone(),
                            what,
                            expected: d.clone(),
                            actual,
                        });
                    }
                    Ok(buf)
                }
            },
        )
        .await
    }

    /// Fetch exactly `len` bytes of a blob at `offset` with one range request (bounded: a
    /// registry ignoring `Range` is read only as far as needed). The caller verifies the bytes.
    pub async fn fetch_range(
        &self,
        r: &Reference,
        d: &Digest,
        offset: u64,
        len: u64,
        creds: &OpCreds,
    ) -> Result<Vec<u8>> {
        let what = format!("bytes {offset}+{len} of blob {d}");
        self.on_endpoints_with(
            r,
            creds,
            &what,
            true,
            |client, reference, secret, source, ep| {
                let what = what.clone();
                async move {
                    let body = self
                        .blob_request(
                            &client,
                            &reference,
                            d,
                            offset,
                            Some(len),
                            secret.as_ref(),
                            &source,
                            &ep,
                            &what,
                        )
                        .await?;
                    let mut stream = body.stream;
                    let mut buf = Vec::with_capacity(len.min(1 << 24) as usize);
                    while (buf.len() as u64) < len {
                        let Some(chunk) = stream.next().await else {
                            break;
                        };
                        let chunk = chunk.map_err(|e| RegistryError::Unreachable {
                            registry: ep.host.clone(),
                            reason: e.to_string(),
                        })?;
                        let want = (len - buf.len() as u64).min(chunk.len() as u64) as usize;
                        buf.extend_from_slice(&chunk[..want]);
                    }
                    if (buf.len() as u64) < len {
                        return Err(RegistryError::Truncated {
                            registry: ep.host.clone(),
                            what,
                            got: buf.len() as u64,
                            expected: len,
                        });
                    }
                    Ok(buf)
                }
            },
        )
        .await
    }

    /// A HEAD of blob `d` on the endpoints its reads would use (mirrors first): `Ok` when it
    /// exists. No byte of the blob is transferred; the connection it opens stays in the pool of
    /// the client the reads use, which is what `Access::warm` wants.
    pub async fn touch_blob(&self, r: &Reference, d: &Digest, creds: &OpCreds) -> Result<()> {
        let what = format!("blob {d}");
        self.on_endpoints_with(
            r,
            creds,
            &what,
            true,
            |client, reference, secret, source, ep| {
                let what = what.clone();
                async move {
                    let (reference, source, ep, what) = (&reference, &source, &ep, &what);
                    let secret = secret.as_ref();
                    self.anonymous_first(
                        ep,
                        secret,
                        |bare| async move {
                            head_blob(&bare, reference, d, None, source, ep, what, false).await
                        },
                        || async move {
                            head_blob(&client, reference, d, secret, source, ep, what, true).await
                        },
                    )
                    .await
                }
            },
        )
        .await
    }

    /// Open a blob for streaming from `offset`, `len` bytes or to its end (a range request).
    /// The body may run past `len` when the registry ignores `Range`: the caller stops reading.
    /// The caller verifies the bytes: partial bodies cannot be checked here.
    pub async fn open_blob(
        &self,
        r: &Reference,
        d: &Digest,
        offset: u64,
        len: Option<u64>,
        creds: &OpCreds,
    ) -> Result<BlobBody> {
        let what = format!("blob {d}");
        self.on_endpoints_with(
            r,
            creds,
            &what,
            true,
            |client, reference, secret, source, ep| {
                let what = what.clone();
                async move {
                    self.blob_request(
                        &client,
                        &reference,
                        d,
                        offset,
                        len,
                        secret.as_ref(),
                        &source,
                        &ep,
                        &what,
                    )
                    .await
                }
            },
        )
        .await
    }
}

/// The credential oci-client sends: the secret's, else anonymous.
fn auth_of(secret: Option<&Secret>) -> oci_client::secrets::RegistryAuth {
    secret
        .map(Secret::to_registry_auth)
        .unwrap_or(oci_client::secrets::RegistryAuth::Anonymous)
}

/// Tags of one repository listed at once, at most.
pub const MAX_TAGS: usize = 10_000;

/// Referrers of one artifact type looked at, at most.
pub const MAX_REFERRERS: usize = 64;

/// Where a push goes: the upstream's client, the reference there, whose credential it uses.
struct Upstream {
    client: oci_client::Client,
    reference: Reference,
    source: Source,
    host: String,
}

impl Upstream {
    fn err(&self, e: OciDistributionError, what: &str) -> RegistryError {
        classify(
            e,
            &self.host,
            self.reference.repository(),
            what,
            &self.source,
        )
    }
}

impl Registry {
    /// A client for the upstream endpoint of `r` (pushes never go to mirrors), authenticated
    /// for pushing with the credential `r`'s registry gets.
    async fn push_target(&self, r: &Reference, creds: &OpCreds, what: &str) -> Result<Upstream> {
        // endpoints() always ends with the upstream.
        let ep = self
            .endpoints(r.registry())
            .pop()
            .unwrap_or_else(|| Endpoint {
                host: r.registry().to_string(),
                scheme: Scheme::Https,
                is_mirror: false,
                is_peer: false,
            });
        let (secret, source) = self.credential(r.registry(), creds, true);
        let up = Upstream {
            client: self.client(&ep, secret.as_ref()),
            reference: Self::reference_at(r, &ep, None),
            source,
            host: ep.host,
        };
        let auth = auth_of(secret.as_ref());
        up.client
            .auth(&up.reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| up.err(e, what))?;
        Ok(up)
    }

    /// Upload the file at `path` as blob `d` of `r`'s repository, unless the registry has it.
    /// Returns whether bytes were sent.
    pub async fn push_blob_file(
        &self,
        r: &Reference,
        d: &Digest,
        path: &std::path::Path,
        creds: &OpCreds,
    ) -> Result<bool> {
        self.push_blob_unless_present(r, d, Upload::File(path), creds)
            .await
    }

    /// Upload `bytes` as blob `d` of `r`'s repository, unless the registry has it.
    pub async fn push_blob_bytes(
        &self,
        r: &Reference,
        d: &Digest,
        bytes: Vec<u8>,
        creds: &OpCreds,
    ) -> Result<bool> {
        self.push_blob_unless_present(r, d, Upload::Bytes(bytes), creds)
            .await
    }

    async fn push_blob_unless_present(
        &self,
        r: &Reference,
        d: &Digest,
        body: Upload<'_>,
        creds: &OpCreds,
    ) -> Result<bool> {
        let what = format!("blob {d}");
        let up = self.push_target(r, creds, &what).await?;
        let err = |e| up.err(e, &what);
        if up
            .client
            .blob_exists(&up.reference, d.as_str())
            .await
            .map_err(err)?
        {
            return Ok(false);
        }
        match body {
            Upload::Bytes(bytes) => up
                .client
                .push_blob(&up.reference, bytes, d.as_str())
                .await
                .map_err(err)?,
            Upload::File(path) => {
                let file =
                    tokio::fs::File::open(path)
                        .await
                        .map_err(|e| RegistryError::Unreachable {
                            registry: up.host.clone(),
                            reason: format!("reading {}: {e}", path.display()),
                        })?;
                let size = file.metadata().await.map(|m| m.len()).ok();
                let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
                    .map(|r| r.map_err(OciDistributionError::IoError));
                up.client
                    .push_blob_stream(&up.reference, stream, d.as_str(), size)
                    .await
                    .map_err(err)?
            }
        };
        Ok(true)
    }

    /// The artifacts whose `subject` is manifest `subject` of `r`'s repository, of
    /// `artifact_type`: the referrers API, or the tag schema (`sha256-<hex>`) on registries
    /// without it. At most [`MAX_REFERRERS`] are returned.
    pub async fn referrers(
        &self,
        r: &Reference,
        subject: &Digest,
        artifact_type: Option<&str>,
        creds: &OpCreds,
    ) -> Result<Vec<oci_client::manifest::ImageIndexEntry>> {
        let what = format!("referrers of {subject}");
        self.on_endpoints(r, creds, &what, |client, reference, secret, source, ep| {
            let what = what.clone();
            async move {
                let at = Reference::with_digest(
                    reference.registry().into(),
                    reference.repository().into(),
                    subject.to_string(),
                );
                let auth = auth_of(secret.as_ref());
                let err = |e| classify(e, &ep.host, at.repository(), &what, &source);
                // pull_referrers sends no probe of its own: anonymous, it needs no auth call.
                let index = self
                    .anonymous_first(
                        &ep,
                        secret.as_ref(),
                        |bare| {
                            let at = &at;
                            async move { bare.pull_referrers(at, artifact_type).await.map_err(err) }
                        },
                        || async {
                            client
                                .auth(&at, &auth, oci_client::RegistryOperation::Pull)
                                .await
                                .map_err(err)?;
                            client.pull_referrers(&at, artifact_type).await.map_err(err)
                        },
                    )
                    .await?;
                let mut found: Vec<_> = index
                    .manifests
                    .into_iter()
                    .filter(|m| {
                        artifact_type.is_none() || m.artifact_type.as_deref() == artifact_type
                    })
                    .collect();
                found.truncate(MAX_REFERRERS);
                Ok(found)
            }
        })
        .await
    }

    /// The tags of `r`'s repository, a page of at most `n` after `last` (the registry's
    /// order), bounded by [`MAX_TAGS`].
    pub async fn list_tags(
        &self,
        r: &Reference,
        n: Option<usize>,
        last: Option<&str>,
        creds: &OpCreds,
    ) -> Result<Vec<String>> {
        let what = format!("tags of {}", r.repository());
        self.on_endpoints(r, creds, &what, |client, reference, secret, source, ep| {
            let what = what.clone();
            async move {
                let auth = auth_of(secret.as_ref());
                let mut tags = client
                    .list_tags(&reference, &auth, n, last)
                    .await
                    .map_err(|e| classify(e, &ep.host, reference.repository(), &what, &source))?
                    .tags;
                tags.truncate(MAX_TAGS);
                Ok(tags)
            }
        })
        .await
    }

    /// Upload a manifest under `r`'s tag (or digest).
    pub async fn push_manifest(
        &self,
        r: &Reference,
        body: Vec<u8>,
        media_type: &str,
        creds: &OpCreds,
    ) -> Result<()> {
        let what = format!("manifest {r}");
        let up = self.push_target(r, creds, &what).await?;
        let content_type = http::HeaderValue::from_str(media_type).map_err(|_| {
            RegistryError::Oci(oci::OciError::UnsupportedMediaType(media_type.to_string()))
        })?;
        up.client
            .push_manifest_raw(&up.reference, body, content_type)
            .await
            .map_err(|e| up.err(e, &what))?;
        Ok(())
    }
}

impl Registry {
    /// A blob request; anonymous ones first go through the bare client (no `/v2/` probe) and
    /// fall back to the token flow when the endpoint challenges them.
    #[allow(clippy::too_many_arguments)]
    async fn blob_request(
        &self,
        client: &oci_client::Client,
        reference: &Reference,
        d: &Digest,
        offset: u64,
        len: Option<u64>,
        secret: Option<&Secret>,
        source: &Source,
        ep: &Endpoint,
        what: &str,
    ) -> Result<BlobBody> {
        self.anonymous_first(
            ep,
            secret,
            |bare| async move {
                open_blob(
                    &bare, reference, d, offset, len, None, source, ep, what, false,
                )
                .await
            },
            || async move {
                open_blob(
                    client, reference, d, offset, len, secret, source, ep, what, true,
                )
                .await
            },
        )
        .await
    }

    /// GET a manifest with a plain HTTP client: oci-client probes `/v2/` before every
    /// manifest request of a client without a token (a registry without auth never gives
    /// one), which costs a round trip per manifest. Only for anonymous requests to endpoints
    /// that have not challenged one (see `anonymous_first`): a 401 or 403 here hands over to
    /// the token flow. The body is bounded by `MAX_MANIFEST_BYTES`; its digest is checked by
    /// the caller.
    async fn bare_manifest(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        source: &Source,
        what: &str,
    ) -> Result<Bytes> {
        let http = self.http_client(ep)?;
        let scheme = match ep.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let at = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = format!(
            "{scheme}://{}/v2/{}/manifests/{at}",
            reference.resolve_registry(),
            reference.repository()
        );
        let unreachable = |e: reqwest::Error| RegistryError::Unreachable {
            registry: ep.host.clone(),
            reason: format!("{what}: {}", reach_reason(&e)),
        };
        let resp = http
            .get(&url)
            .header(reqwest::header::ACCEPT, oci::MANIFEST_ACCEPT.join(", "))
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: ep.host.clone(),
                repository: reference.repository().into(),
                status: if status == reqwest::StatusCode::FORBIDDEN {
                    "403 denied"
                } else {
                    "401 unauthorized"
                },
                tried: source.to_string(),
            });
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                registry: ep.host.clone(),
                what: what.into(),
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Server {
                registry: ep.host.clone(),
                reason: format!("{what}: {status}"),
            });
        }
        let too_large = |size: u64| RegistryError::TooLarge {
            registry: ep.host.clone(),
            what: what.into(),
            size,
            limit: oci::MAX_MANIFEST_BYTES as u64,
        };
        if let Some(n) = resp.content_length()
            && n > oci::MAX_MANIFEST_BYTES as u64
        {
            return Err(too_large(n));
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(unreachable)?;
            if body.len() + chunk.len() > oci::MAX_MANIFEST_BYTES {
                return Err(too_large((body.len() + chunk.len()) as u64));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }

    /// The plain HTTP client of an endpoint: the same TLS settings, timeouts and user agent
    /// as its oci-client.
    fn http_client(&self, ep: &Endpoint) -> Result<reqwest::Client> {
        let key = (ep.host.clone(), ep.scheme, ep.is_peer);
        let mut all = self.http.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = all.get(&key) {
            return Ok(c.clone());
        }
        let b = reqwest::Client::builder()
            .connect_timeout(if ep.is_peer {
                self.opts.connect_timeout.min(PEER_CONNECT_TIMEOUT)
            } else {
                self.opts.connect_timeout
            })
            .read_timeout(self.opts.read_timeout)
            .user_agent(if ep.is_peer {
                PEER_USER_AGENT
            } else {
                concat!("lazypull/", env!("CARGO_PKG_VERSION"))
            });
        let unreachable = |reason: String| RegistryError::Unreachable {
            registry: ep.host.clone(),
            reason,
        };
        let b = match self.host_config(&ep.host) {
            Some(cfg) => cfg.tls.apply(b).map_err(|e| unreachable(e.to_string()))?,
            None => b,
        };
        let c = b.build().map_err(|e| RegistryError::Unreachable {
            registry: ep.host.clone(),
            reason: format!("HTTP client: {e}"),
        })?;
        all.insert(key, c.clone());
        Ok(c)
    }

    /// An anonymous request to an endpoint that has not challenged one goes through the bare
    /// client (`bare`: no stored auth, so no `/v2/` probe before it); otherwise, or when the
    /// endpoint answers 401 (remembered), `authed` runs the token flow.
    async fn anonymous_first<T, B, BFut, A, AFut>(
        &self,
        ep: &Endpoint,
        secret: Option<&Secret>,
        bare: B,
        authed: A,
    ) -> Result<T>
    where
        B: FnOnce(oci_client::Client) -> BFut,
        BFut: Future<Output = Result<T>>,
        A: FnOnce() -> AFut,
        AFut: Future<Output = Result<T>>,
    {
        let key = (ep.host.clone(), ep.scheme);
        let challenged = self
            .needs_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        if secret.is_none() && !challenged {
            match bare(self.client_keyed(ep, BARE)).await {
                Err(RegistryError::Unauthorized { .. }) => {
                    tracing::debug!(registry = %ep.host, "anonymous request challenged; using the token flow");
                    self.needs_token
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key);
                }
                other => return other,
            }
        }
        authed().await
    }
}

#[allow(clippy::too_many_arguments)]
async fn open_blob(
    client: &oci_client::Client,
    reference: &Reference,
    d: &Digest,
    offset: u64,
    len: Option<u64>,
    secret: Option<&Secret>,
    source: &Source,
    ep: &Endpoint,
    what: &str,
    store_auth: bool,
) -> Result<BlobBody> {
    let auth = auth_of(secret);
    if store_auth {
        client
            .store_auth_if_needed(reference.resolve_registry(), &auth)
            .await;
    }
    let desc = oci_client::manifest::OciDescriptor {
        digest: d.to_string(),
        ..Default::default()
    };
    let resp = client
        .pull_blob_stream_partial(reference, &desc, offset, len)
        .await
        .map_err(|e| classify(e, &ep.host, reference.repository(), what, source))?;
    Ok(match resp {
        oci_client::client::BlobResponse::Partial(s) => BlobBody {
            len: s.content_length,
            stream: s.stream,
            early: false,
        },
        oci_client::client::BlobResponse::Full(s) => BlobBody {
            len: s.content_length.map(|n| n.saturating_sub(offset)),
            stream: skip_prefix(s.stream, offset),
            early: false,
        },
    })
}

/// A HEAD of a blob (see `Registry::touch_blob`).
#[allow(clippy::too_many_arguments)]
async fn head_blob(
    client: &oci_client::Client,
    reference: &Reference,
    d: &Digest,
    secret: Option<&Secret>,
    source: &Source,
    ep: &Endpoint,
    what: &str,
    store_auth: bool,
) -> Result<()> {
    if store_auth {
        client
            .store_auth_if_needed(reference.resolve_registry(), &auth_of(secret))
            .await;
    }
    match client.blob_exists(reference, d.as_str()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(RegistryError::NotFound {
            registry: ep.host.clone(),
            what: what.into(),
        }),
        // A refused HEAD comes back as a bare HTTP error: named as a refusal, so that
        // `anonymous_first` moves on to the token flow.
        Err(OciDistributionError::RequestError(e))
            if matches!(
                e.status(),
                Some(reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN)
            ) =>
        {
            Err(RegistryError::Unauthorized {
                registry: ep.host.clone(),
                repository: reference.repository().into(),
                status: if e.status() == Some(reqwest::StatusCode::FORBIDDEN) {
                    "403 denied"
                } else {
                    "401 unauthorized"
                },
                tried: source.to_string(),
            })
        }
        Err(e) => Err(classify(e, &ep.host, reference.repository(), what, source)),
    }
}

/// Turn oci-client's errors into ours: who refused, what is missing, what is transient.
fn classify(
    e: OciDistributionError,
    registry: &str,
    repository: &str,
    what: &str,
    source: &Source,
) -> RegistryError {
    use oci_client::errors::OciErrorCode as C;
    let registry = registry.to_string();
    match e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => RegistryError::Unauthorized {
            registry,
            repository: repository.into(),
            status: "401 unauthorized",
            tried: source.to_string(),
        },
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound {
            registry,
            what: what.into(),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&C> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| matches!(c, C::Unauthorized)) {
                RegistryError::Unauthorized {
                    registry,
                    repository: repository.into(),
                    status: "401 unauthorized",
                    tried: source.to_string(),
                }
            } else if codes.iter().any(|c| matches!(c, C::Denied)) {
                RegistryError::Unauthorized {
                    registry,
                    repository: repository.into(),
                    status: "403 denied",
                    tried: source.to_string(),
                }
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    C::ManifestUnknown
                        | C::BlobUnknown
                        | C::NameUnknown
                        | C::NotFound
                        | C::ManifestBlobUnknown
                )
            }) {
                RegistryError::NotFound {
                    registry,
                    what: what.into(),
                }
            } else if codes.iter().any(|c| matches!(c, C::Toomanyrequests)) {
                RegistryError::Server {
                    registry,
                    reason: envelope.to_string(),
                }
            } else {
                RegistryError::Oci(oci::OciError::Malformed {
                    what: "registry response",
                    reason: envelope.to_string(),
                })
            }
        }
        OciDistributionError::ServerError { code, message, .. } => match code {
            401 => RegistryError::Unauthorized {
                registry,
                repository: repository.into(),
                status: "401 unauthorized",
                tried: source.to_string(),
            },
            403 => RegistryError::Unauthorized {
                registry,
                repository: repository.into(),
                status: "403 forbidden",
                tried: source.to_string(),
            },
            404 => RegistryError::NotFound {
                registry,
                what: what.into(),
            },
            c if c >= 500 || c == 429 || c == 408 => RegistryError::Server {
                registry,
                reason: format!(
                    "HTTP {c}: {}",
                    message.chars().take(200).collect::<String>()
                ),
            },
            c => RegistryError::Oci(oci::OciError::Malformed {
                what: "registry response",
                reason: format!(
                    "HTTP {c}: {}",
                    message.chars().take(200).collect::<String>()
                ),
            }),
        },
        OciDistributionError::RequestError(e) => RegistryError::Unreachable {
            registry,
            reason: reach_reason(&e),
        },
        OciDistributionError::IoError(e) => RegistryError::Unreachable {
            registry,
            reason: e.to_string(),
        },
        OciDistributionError::DigestError(e) => RegistryError::Oci(oci::OciError::Malformed {
            what: "digest",
            reason: e.to_string(),
        }),
        other => RegistryError::Oci(oci::OciError::Malformed {
            what: "registry response",
            reason: other.to_string(),
        }),
    }
}

/// Why a request did not reach the registry, with a hint when the TLS handshake was refused
/// for want of a (good) client certificate.
fn reach_reason(e: &dyn std::error::Error) -> String {
    let mut s = error_chain(e);
    if [
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "certificate required",
    ]
    .iter()
    .any(|a| s.contains(a))
    {
        s.push_str(
            " (the registry refused this client's certificate or wants one: \
             registries[].tls.cert and .key)",
        );
    }
    s
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What an upload sends: bytes in memory, or a file streamed from disk.
enum Upload<'a> {
    Bytes(Vec<u8>),
    File(&'a std::path::Path),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn skip_prefix_positions_a_full_body() {
        let chunks: Vec<std::io::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"defg")),
            Ok(Bytes::from_static(b"hij")),
        ];
        for (skip, want) in [
            (0, "abcdefghij"),
            (3, "defghij"),
            (5, "fghij"),
            (10, ""),
            (12, ""),
        ] {
            let s = skip_prefix(
                futures_util::stream::iter(
                    chunks
                        .iter()
                        .map(|c| Ok(c.as_ref().unwrap().clone()))
                        .collect::<Vec<_>>(),
                )
                .boxed(),
                skip,
            );
            let got: Vec<Bytes> = s.map(|c| c.unwrap()).collect().await;
            assert_eq!(got.concat(), want.as_bytes(), "skip {skip}");
        }
    }

    #[test]
    fn endpoints_and_schemes() {
        let reg = Registry::new(Options {
            hosts: vec![HostConfig {
                name: "docker.io".into(),
                mirrors: vec!["http://127.0.0.1:5000".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let eps = reg.endpoints("docker.io");
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps[0],
            Endpoint {
                host: "127.0.0.1:5000".into(),
                scheme: Scheme::Http,
                is_mirror: true,
                is_peer: false,
            }
        );
        assert_eq!(
            eps[1],
            Endpoint {
                host: "index.docker.io".into(),
                scheme: Scheme::Https,
                is_mirror: false,
                is_peer: false,
            }
        );
        // Peers come first, for content by digest of registries a path can name.
        reg.set_peers(&["http://10.0.0.9:5000".into(), "bad/url/".into()]);
        let eps = reg.endpoints_for("docker.io", true);
        assert_eq!(eps.len(), 3);
        assert!(eps[0].is_peer && eps[0].host == "10.0.0.9:5000");
        assert_eq!(reg.endpoints_for("docker.io", false).len(), 2);
        assert_eq!(reg.endpoints_for("plainhost", true).len(), 1);
        let r: Reference = "docker.io/library/busybox:1".parse().unwrap();
        let at = Registry::reference_at(&r, &eps[0], Some("sha256:00"));
        assert_eq!(at.repository(), "docker.io/library/busybox");
        assert_eq!(reg.endpoints("localhost:5000")[0].scheme, Scheme::Http);
        assert_eq!(reg.endpoints("quay.io")[0].scheme, Scheme::Https);
        assert!(parse_endpoint("http://h/path").is_err());
        assert_eq!(
            parse_endpoint("mirror.local").unwrap(),
            (Scheme::Https, "mirror.local".into())
        );
    }

    #[test]
    fn credential_priority_and_mirror_isolation() {
        let flag = Secret::from_creds("flag:x").unwrap();
        let cfg = Secret::from_creds("cfg:x").unwrap();
        let req = Secret::from_creds("req:x").unwrap();
        let reg = Registry::new(Options {
            hosts: vec![HostConfig {
                name: "r.io".into(),
                auth: Some(cfg.clone()),
                ..Default::default()
            }],
            default_secret: Some(flag.clone()),
            docker_config: Some("/nonexistent".into()),
            ..Default::default()
        });
        let creds = OpCreds {
            request: Some(req.clone()),
            persisted: None,
        };
        assert_eq!(
            reg.credential("r.io", &creds, true),
            (Some(req), Source::Request)
        );
        assert_eq!(
            reg.credential("r.io", &OpCreds::default(), true),
            (Some(cfg), Source::ConfigFile)
        );
        assert_eq!(
            reg.credential("other.io", &OpCreds::default(), true),
            (Some(flag), Source::Flag)
        );
        assert_eq!(
            reg.credential("mirror:1", &creds, false),
            (None, Source::Anonymous)
        );
    }
}
