//! The pull-through registry: the OCI distribution **pull** API (`/v2/`) served from the
//! node's store. What the store has (pulled lazily or fully, or fetched through here before)
//! is served from it; the rest is fetched from the upstream the request names, verified, stored
//! and streamed to the client as it arrives. Tags are asked upstream at each request and
//! answered from the store when the upstream is unreachable (or always, `air_gapped`).

use super::route::{self, Ref, Route, RouteError};
use super::{Body, empty, full, status};
use crate::fetch::{Filler, Following};
use crate::oci::{self, Digest};
use crate::registry::{OpCreds, Registry, RegistryError};
use crate::store::Catalogue;
use crate::store::{Layout, StoreError, locked as lock};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::{Method, Response, StatusCode, header};
use oci_client::manifest::{ImageIndexEntry, OciImageIndex};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sha2::Digest as _;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{0}: a pull-through registry serves pulls only")]
    Unsupported(String),
    #[error(
        "no upstream registry for {0}: name one with the ns query parameter or as the first path component, or set mirror.default_upstream"
    )]
    NoUpstream(String),
    #[error("manifest {0} is not in the store (air-gapped)")]
    ManifestUnknown(String),
    #[error("blob {0} is not in the store (air-gapped)")]
    BlobUnknown(String),
    #[error("range {range:?} is not satisfiable: the blob has {size} bytes")]
    RangeNotSatisfiable { range: String, size: u64 },
    #[error("upstream: {source}")]
    Upstream {
        source: RegistryError,
        /// A manifest (not a blob) was asked for: a 404 is MANIFEST_UNKNOWN.
        manifest: bool,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The error of a fetch this request joined.
    #[error("{0}")]
    Shared(Arc<MirrorError>),
}

type Result<T> = std::result::Result<T, MirrorError>;

/// Settings of the pull-through registry (`mirror.*`).
#[derive(Clone, Debug, Default)]
pub struct MirrorOptions {
    pub default_upstream: String,
    pub air_gapped: bool,
    /// A tag answered less than this long ago is answered from the store.
    pub tag_ttl: std::time::Duration,
    /// `latest` is asked upstream at every request.
    pub always_pull_latest: bool,
    /// At most this many blobs are fetched from upstreams at once (more wait their turn).
    pub max_upstream_fetches: usize,
}

/// A request's kind and answer, as the metrics label them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: String,
    pub status: String,
}

/// Where served bytes came from, as the metrics label them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// The mirror's counters (exported by the metrics endpoint).
#[derive(Default)]
pub struct MirrorStats {
    /// Requests by kind (`base`, `manifest`, `blob`, `tags`, `referrers`, `push`, `invalid`)
    /// and status code.
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes sent, by where they came from: `store` (complete blobs and manifests),
    /// `in_flight` (a fetch of this mirror or the node's fill, followed as it arrives),
    /// `partial` (a range of a partial file), `upstream` (ranges passed through).
    pub bytes: Family<SourceLabels, Counter>,
    /// Blobs fetched from an upstream.
    pub upstream_fetches: Counter,
    /// Blob requests answered without an upstream fetch of their own: from the store, by
    /// joining a running fetch, or by following the node's fill.
    pub upstream_fetches_saved: Counter,
}

impl MirrorStats {
    fn bytes_from(&self, source: &str) -> Counter {
        self.bytes
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .clone()
    }
}

/// A streamed body that adds the bytes it sends to `counter`.
fn counted_body(
    counter: Counter,
    s: impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> Body {
    super::stream(s.inspect(move |r| {
        if let Ok(b) = r {
            counter.inc_by(b.len() as u64);
        }
    }))
}

pub struct Mirror {
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    registry: Arc<Registry>,
    opts: MirrorOptions,
    /// Blobs being fetched from upstream, by digest: one fetch however many clients.
    flights: Mutex<std::collections::HashMap<Digest, Arc<Flight>>>,
    /// The node's filler: a blob it is fetching is followed, not fetched again.
    filler: Option<Arc<Filler>>,
    /// The node's access gate over `registry` (with a filler): upstream fetches are
    /// `Class::Relay` requests on the node's link, which the filler yields to.
    access: Option<Arc<crate::access::Access>>,
    /// Turns of upstream blob fetches (`max_upstream_fetches`).
    upstream_permits: Arc<tokio::sync::Semaphore>,
    pub stats: MirrorStats,
    /// Digests served since the last [`Mirror::flush_access`]: last-access times for pruning,
    /// written in batches (a row update per request would cost more than the request).
    accessed: Mutex<std::collections::HashSet<String>>,
}

/// How long a client following the node's filler waits for a byte before its response is cut:
/// the filler gives the link to a starting container and retries a failed request, so it may
/// pause for a while, but never indefinitely.
const FILL_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// An upstream repository a request goes to.
struct Upstream {
    host: String,
    repo: String,
    creds: OpCreds,
    /// Answer from the store only: the mirror is air-gapped, or the client is a lazypull peer
    /// (which goes upstream itself when no peer has the content).
    store_only: bool,
}

/// Who asks: the `ns` parameter of the request, and whether it comes from a lazypull peer.
#[derive(Clone, Copy)]
struct Origin<'a> {
    ns: Option<&'a str>,
    peer: bool,
}

/// The user agent lazypull sends to its peers: a request with it is answered from the store
/// only, and fails fast when the store lacks the content.
pub const PEER_USER_AGENT_PREFIX: &str = "lazypull-peer/";

impl Upstream {
    fn tagged(&self, tag: &str) -> oci_client::Reference {
        oci_client::Reference::with_tag(self.host.clone(), self.repo.clone(), tag.to_string())
    }
    fn at(&self, d: &Digest) -> oci_client::Reference {
        oci_client::Reference::with_digest(self.host.clone(), self.repo.clone(), d.to_string())
    }
    /// `host/repo:tag`: the name a pull of the same image records.
    fn name(&self, tag: &str) -> String {
        format!("{}/{}:{tag}", self.host, self.repo)
    }
}

fn upstream_err(manifest: bool) -> impl Fn(RegistryError) -> MirrorError {
    move |source| MirrorError::Upstream { source, manifest }
}

impl Mirror {
    pub fn new(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        registry: Arc<Registry>,
        opts: MirrorOptions,
        filler: Option<Arc<Filler>>,
    ) -> Arc<Self> {
        let access = filler
            .as_ref()
            .map(|f| f.access().over(Arc::clone(&registry) as _));
        Arc::new(Mirror {
            layout,
            db,
            registry,
            flights: Mutex::default(),
            filler,
            access,
            upstream_permits: Arc::new(tokio::sync::Semaphore::new(
                opts.max_upstream_fetches.max(1),
            )),
            stats: MirrorStats::default(),
            accessed: Mutex::default(),
            opts,
        })
    }

    /// Record the last-access time of what was served since the last call.
    pub fn flush_access(&self) {
        let served: Vec<String> = std::mem::take(&mut *lock(&self.accessed))
            .into_iter()
            .collect();
        if served.is_empty() {
            return;
        }
        if let Err(e) = lock(&self.db).touch_mirror_blobs(&served, crate::store::now()) {
            tracing::warn!(error = %e, "cannot record when the mirror served its blobs");
        }
    }

    /// Answer one request (never fails: errors become the spec's error responses).
    pub async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let ns = route::ns_param(query.as_deref());
        let peer = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ua| ua.starts_with(PEER_USER_AGENT_PREFIX));
        let route = route::parse(&path);
        let kind = match &route {
            Ok(Route::Base) => "base",
            Ok(Route::Manifest { .. }) => "manifest",
            Ok(Route::Blob { .. }) => "blob",
            Ok(Route::Tags { .. }) => "tags",
            Ok(Route::Referrers { .. }) => "referrers",
            Ok(Route::Upload) => "push",
            Err(_) => "invalid",
        };
        let mut resp = match self
            .answer(
                &method,
                route,
                &path,
                query.as_deref(),
                Origin {
                    ns: ns.as_deref(),
                    peer,
                },
                range.as_deref(),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let (code, _) = status::of(&e);
                if code.is_server_error() || code == StatusCode::BAD_GATEWAY {
                    tracing::warn!(%method, path, error = %e, "mirror request failed");
                } else {
                    tracing::debug!(%method, path, error = %e, "mirror request refused");
                }
                let body = if method == Method::HEAD {
                    empty()
                } else {
                    full(status::body(&e))
                };
                let mut r = Response::new(body);
                *r.status_mut() = code;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
        };
        let h = resp.headers_mut();
        h.insert(
            "docker-distribution-api-version",
            header::HeaderValue::from_static("registry/2.0"),
        );
        if let Some(ns) = ns.and_then(|n| header::HeaderValue::from_str(&n).ok()) {
            h.insert("oci-namespace", ns);
        }
        tracing::debug!(%method, path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "mirror request");
        self.stats
            .requests
            .get_or_create(&RequestLabels {
                kind: kind.to_string(),
                status: resp.status().as_u16().to_string(),
            })
            .inc();
        resp
    }

    async fn answer(
        self: &Arc<Self>,
        method: &Method,
        route: std::result::Result<Route, RouteError>,
        path: &str,
        query: Option<&str>,
        origin: Origin<'_>,
        range: Option<&str>,
    ) -> Result<Response<Body>> {
        let route = route?;
        let head = *method == Method::HEAD;
        if route == Route::Upload || (!head && *method != Method::GET) {
            return Err(MirrorError::Unsupported(format!("{method} {path}")));
        }
        let served = match route {
            Route::Manifest { name, reference } => {
                let up = self.upstream(&name, origin)?;
                self.manifest(&up, reference, head).await?
            }
            Route::Blob { name, digest } => {
                let up = self.upstream(&name, origin)?;
                self.blob(&up, &digest, range, head).await?
            }
            other => {
                return self
                    .answer_other(other, method, path, query, origin, head)
                    .await;
            }
        };
        if let Some(d) = served
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            lock(&self.accessed).insert(d.to_string());
        }
        Ok(served)
    }

    /// The routes that serve no stored content: the base, tags, referrers.
    async fn answer_other(
        self: &Arc<Self>,
        route: Route,
        method: &Method,
        path: &str,
        query: Option<&str>,
        origin: Origin<'_>,
        head: bool,
    ) -> Result<Response<Body>> {
        match route {
            Route::Base => Ok(json_response(b"{}".to_vec(), head)),
            Route::Upload | Route::Manifest { .. } | Route::Blob { .. } => {
                Err(MirrorError::Unsupported(format!("{method} {path}")))
            }
            Route::Tags { name } => {
                let up = self.upstream(&name, origin)?;
                self.tags(&name, &up, query, head).await
            }
            Route::Referrers { name, digest } => {
                let up = self.upstream(&name, origin)?;
                let filter = route::artifact_type_param(query);
                self.referrers(&up, &digest, filter.as_deref(), head).await
            }
        }
    }

    fn upstream(&self, name: &str, origin: Origin<'_>) -> Result<Upstream> {
        let (host, mut repo) = route::upstream(name, origin.ns, &self.opts.default_upstream)
            .ok_or_else(|| MirrorError::NoUpstream(name.into()))?;
        if host == "docker.io" && !repo.contains('/') {
            repo = format!("library/{repo}");
        }
        let creds = OpCreds {
            request: None,
            persisted: crate::fetch::persisted_secret(&self.db, &host),
        };
        Ok(Upstream {
            host,
            repo,
            creds,
            store_only: self.opts.air_gapped || origin.peer,
        })
    }

    async fn manifest(&self, up: &Upstream, reference: Ref, head: bool) -> Result<Response<Body>> {
        let (bytes, digest) = match reference {
            Ref::Digest(d) => {
                if !self.layout.has_blob(&d) {
                    if up.store_only {
                        return Err(MirrorError::ManifestUnknown(d.to_string()));
                    }
                    let (bytes, _) = self
                        .registry
                        .fetch_manifest(&up.at(&d), Some(&d), &up.creds)
                        .await
                        .map_err(upstream_err(true))?;
                    self.keep_manifest(&d, &bytes)?;
                }
                (self.layout.read_blob(&d)?, d)
            }
            Ref::Tag(tag) => self.tagged_manifest(up, &tag).await?,
        };
        if !head {
            self.stats.bytes_from("store").inc_by(bytes.len() as u64);
        }
        let mut r = Response::new(if head { empty() } else { full(bytes.clone()) });
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, header_value(&media_type_of(&bytes)));
        h.insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from(bytes.len()),
        );
        h.insert("docker-content-digest", header_value(digest.as_str()));
        h.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
        Ok(r)
    }

    /// A manifest by tag. Answered from the store when the upstream confirmed it less than
    /// `tag_ttl` ago (not `latest` with `always_pull_latest`); else the upstream is asked: a
    /// HEAD when the store has the tag (the stored manifest is served if the digest is the
    /// same), a GET otherwise. When the upstream cannot be reached, or the mirror is
    /// air-gapped, the store's answer.
    async fn tagged_manifest(&self, up: &Upstream, tag: &str) -> Result<(Vec<u8>, Digest)> {
        let name = up.name(tag);
        if up.store_only {
            return self
                .cached_tag(&name)?
                .ok_or(MirrorError::ManifestUnknown(name));
        }
        let checked = lock(&self.db).mirror_tag_checked(&name)?;
        let stored = match &checked {
            Some((d, _)) => self.cached_tag(&name)?.filter(|(_, got)| got.as_str() == d),
            None => None,
        };
        if let (Some(found), Some((_, at))) = (&stored, &checked) {
            let age = chrono::Utc::now().timestamp().saturating_sub(*at);
            let always = self.opts.always_pull_latest && tag == "latest";
            if !always && u64::try_from(age).is_ok_and(|a| a < self.opts.tag_ttl.as_secs()) {
                tracing::debug!(
                    name,
                    age_s = age,
                    "tag answered from the store (within mirror.tag_ttl)"
                );
                return Ok(found.clone());
            }
            match self
                .registry
                .manifest_digest(&up.tagged(tag), &up.creds)
                .await
            {
                Ok(d) if d == found.1 => {
                    lock(&self.db).set_mirror_tag(&name, d.as_str())?;
                    tracing::debug!(name, "tag revalidated: unchanged upstream");
                    return Ok(found.clone());
                }
                Ok(d) => tracing::info!(name, from = %found.1, to = %d, "tag moved upstream"),
                Err(e) if e.is_transient() => {
                    tracing::warn!(name, error = %e, "upstream unreachable: serving the tag as the store has it");
                    return Ok(found.clone());
                }
                Err(e) => return Err(upstream_err(true)(e)),
            }
        }
        match self
            .registry
            .fetch_manifest(&up.tagged(tag), None, &up.creds)
            .await
        {
            Ok((bytes, d)) => {
                self.keep_manifest(&d, &bytes)?;
                lock(&self.db).set_mirror_tag(&name, d.as_str())?;
                Ok((bytes.to_vec(), d))
            }
            Err(e) if e.is_transient() => {
                if let Some(found) = self.cached_tag(&name)? {
                    tracing::warn!(name, error = %e, "upstream unreachable: serving the tag as the store has it");
                    return Ok(found);
                }
                Err(upstream_err(true)(e))
            }
            Err(e) => Err(upstream_err(true)(e)),
        }
    }

    /// The referrers API: the artifacts whose subject is `subject`, as an image index, with
    /// the `artifactType` filter applied here. Asked upstream (its referrers API, or its
    /// referrers tag when it has none) and kept; when the upstream cannot be reached, or the
    /// mirror is air-gapped, the list the store kept (empty if none).
    async fn referrers(
        &self,
        up: &Upstream,
        subject: &Digest,
        filter: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>> {
        let name = format!("{}/{}@{subject}", up.host, up.repo);
        let kept = || -> Result<Option<Vec<ImageIndexEntry>>> {
            let Some(d) = lock(&self.db).mirror_referrers(&name)? else {
                return Ok(None);
            };
            let Ok(d) = Digest::parse(&d) else {
                return Ok(None);
            };
            if !self.layout.has_blob(&d) {
                return Ok(None);
            }
            let bytes = self.layout.read_blob(&d)?;
            Ok(serde_json::from_slice::<OciImageIndex>(&bytes)
                .ok()
                .map(|i| i.manifests))
        };
        let all = if up.store_only {
            kept()?.unwrap_or_default()
        } else {
            match self
                .registry
                .referrers(&up.at(subject), subject, None, &up.creds)
                .await
            {
                Ok(list) => {
                    let bytes = referrers_index(list.clone());
                    let d = Digest::of(&bytes);
                    if !self.layout.has_blob(&d) {
                        self.layout.put_blob(&d, &bytes)?;
                    }
                    let db = lock(&self.db);
                    db.add_mirror_blob(d.as_str())?;
                    db.set_mirror_referrers(&name, d.as_str())?;
                    list
                }
                Err(e) if e.is_transient() => match kept()? {
                    Some(list) => {
                        tracing::warn!(name, error = %e, "upstream unreachable: serving the referrers the store has");
                        list
                    }
                    None => return Err(upstream_err(false)(e)),
                },
                Err(e) => return Err(upstream_err(false)(e)),
            }
        };
        let chosen: Vec<_> = all
            .into_iter()
            .filter(|m| filter.is_none() || m.artifact_type.as_deref() == filter)
            .collect();
        let mut r = json_response(referrers_index(chosen), head);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(oci::MT_OCI_INDEX),
        );
        if filter.is_some() {
            h.insert(
                "oci-filters-applied",
                header::HeaderValue::from_static("artifactType"),
            );
        }
        Ok(r)
    }

    fn cached_tag(&self, name: &str) -> Result<Option<(Vec<u8>, Digest)>> {
        let Some(d) = lock(&self.db).mirror_tag(name)? else {
            return Ok(None);
        };
        let Ok(d) = Digest::parse(&d) else {
            return Ok(None);
        };
        if !self.layout.has_blob(&d) {
            return Ok(None);
        }
        Ok(Some((self.layout.read_blob(&d)?, d)))
    }

    /// Store a manifest fetched from upstream (its digest already verified, its size bounded
    /// by the registry client), once it parses as an image manifest or index, or at least as
    /// an OCI document of schema version 2 (artifact manifests: a mirror serves any content).
    fn keep_manifest(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        if let Err(e) = oci::parse_document(bytes, None) {
            let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
            let document = v["schemaVersion"] == 2
                && (v["layers"].is_array() || v["manifests"].is_array() || v["blobs"].is_array());
            if !document {
                return Err(MirrorError::Upstream {
                    source: RegistryError::Oci(e),
                    manifest: true,
                });
            }
        }
        if !self.layout.has_blob(d) {
            self.layout.put_blob(d, bytes)?;
        }
        lock(&self.db).add_mirror_blob(d.as_str())?;
        Ok(())
    }

    async fn blob(
        self: &Arc<Self>,
        up: &Upstream,
        d: &Digest,
        range: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>> {
        let path = self.layout.blob(d);
        match tokio::fs::File::open(&path).await {
            Ok(f) => {
                self.stats.upstream_fetches_saved.inc();
                return self.local_blob(f, d, range, head).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        // A layer the node is fetching: what it has is local, and the rest is on its way.
        if let Some(filler) = &self.filler {
            if let Some(r) = range
                && let Some(resp) = self.partial_range(filler, d, r, head).await?
            {
                return Ok(resp);
            }
            if range.is_none()
                && let Some(f) = filler.following(d.as_str())
            {
                tracing::debug!(blob = %d, "mirror: following the node's own fill of the blob");
                self.stats.upstream_fetches_saved.inc();
                return Ok(self.follow_fill(filler, d, f, head));
            }
        }
        if up.store_only {
            return Err(MirrorError::BlobUnknown(d.to_string()));
        }
        let requested = range.and_then(|r| parse_range(r, u64::MAX));
        if let Some(ByteRange::Some(start, end)) = requested {
            // A range of a blob the store lacks: passed through, not stored (its bytes cannot
            // be verified on their own).
            let len = (end != u64::MAX).then(|| end - start);
            let body = self
                .open_upstream(&up.at(d), d, start, len, &up.creds)
                .await
                .map_err(upstream_err(false))?;
            let mut r = Response::new(if head {
                empty()
            } else {
                counted_body(self.stats.bytes_from("upstream"), body.stream)
            });
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = r.headers_mut();
            if let Some(n) = body.len {
                h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
                h.insert(
                    header::CONTENT_RANGE,
                    header_value(&format!("bytes {start}-{}/*", start + n.max(1) - 1)),
                );
            }
            blob_headers(h, d);
            return Ok(r);
        }
        match self.flight(up, d)? {
            Some(f) => self.follow(f, d, head).await,
            None => {
                let file = tokio::fs::File::open(self.layout.blob(d)).await?;
                self.local_blob(file, d, range, head).await
            }
        }
    }

    /// A range of a layer whose partial file (of an on-demand read, a prefetch or the filler)
    /// holds all of it, served from there; `None` when it does not.
    async fn partial_range(
        &self,
        filler: &Filler,
        d: &Digest,
        range: &str,
        head: bool,
    ) -> Result<Option<Response<Body>>> {
        let Some(blob) = filler.partials().get(d) else {
            return Ok(None);
        };
        let Some(size) = lock(&self.db).layer(d.as_str())?.map(|l| l.size) else {
            return Ok(None);
        };
        let Some(ByteRange::Some(start, end)) = parse_range(range, size) else {
            return Ok(None);
        };
        let end = end.min(size);
        if !blob.contains(start, end) {
            return Ok(None);
        }
        let body = if head {
            empty()
        } else {
            let mut buf = vec![0u8; (end - start) as usize];
            let buf =
                tokio::task::spawn_blocking(move || blob.read_at(&mut buf, start).map(|_| buf))
                    .await
                    .map_err(std::io::Error::other)??;
            self.stats.bytes_from("partial").inc_by(buf.len() as u64);
            full(buf)
        };
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from(end - start),
        );
        h.insert(
            header::CONTENT_RANGE,
            header_value(&format!("bytes {start}-{}/{size}", end - 1)),
        );
        blob_headers(h, d);
        tracing::debug!(blob = %d, start, end, "mirror: range served from the partial file");
        Ok(Some(r))
    }

    /// The whole blob as the node's own fill brings it in: its partial file in order, the
    /// last byte only once the blob is verified and stored, across the fill's retries.
    fn follow_fill(
        &self,
        filler: &Arc<Filler>,
        d: &Digest,
        f: Following,
        head: bool,
    ) -> Response<Body> {
        let size = f.size;
        let mut r = if head {
            Response::new(empty())
        } else {
            let follower = FillFollower {
                filler: Arc::clone(filler),
                stored: self.layout.blob(d),
                stored_file: None,
                digest: d.clone(),
                f,
                pos: 0,
                size,
            };
            Response::new(counted_body(
                self.stats.bytes_from("in_flight"),
                futures_util::stream::unfold(follower, |mut fl| async move {
                    match fl.next_chunk().await {
                        Ok(None) => None,
                        Ok(Some(b)) => Some((Ok(b), fl)),
                        Err(e) => {
                            tracing::warn!(blob = %fl.digest, at = fl.pos, error = %e, "mirror: following the node's fill failed; the response is cut short");
                            fl.pos = u64::MAX;
                            Some((Err(e), fl))
                        }
                    }
                }),
            ))
        };
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(size));
        blob_headers(r.headers_mut(), d);
        r
    }

    async fn local_blob(
        &self,
        mut f: tokio::fs::File,
        d: &Digest,
        range: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>> {
        let size = f.metadata().await?.len();
        let Some((status, start, end)) = super::span(range, size) else {
            return Err(MirrorError::RangeNotSatisfiable {
                range: range.unwrap_or_default().chars().take(100).collect(),
                size,
            });
        };
        let body = if head {
            empty()
        } else {
            f.seek(std::io::SeekFrom::Start(start)).await?;
            counted_body(
                self.stats.bytes_from("store"),
                tokio_util::io::ReaderStream::with_capacity(f.take(end - start), 256 << 10),
            )
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        super::span_headers(h, status, start, end, size);
        blob_headers(h, d);
        Ok(r)
    }

    async fn tags(
        &self,
        name: &str,
        up: &Upstream,
        query: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>> {
        let (n, last) = route::page_params(query);
        let local = || -> Result<Vec<String>> {
            let all = lock(&self.db).mirror_tags_of(&format!("{}/{}", up.host, up.repo))?;
            Ok(page(all, n, last.as_deref()))
        };
        let tags = if up.store_only {
            local()?
        } else {
            let repo =
                oci_client::Reference::with_tag(up.host.clone(), up.repo.clone(), "latest".into());
            match self
                .registry
                .list_tags(&repo, n, last.as_deref(), &up.creds)
                .await
            {
                Ok(t) => t,
                Err(e) if e.is_transient() => {
                    tracing::warn!(name, error = %e, "upstream unreachable: listing the tags the store has");
                    local()?
                }
                Err(e) => return Err(upstream_err(true)(e)),
            }
        };
        let next = match (n, tags.last()) {
            (Some(n), Some(t)) if n > 0 && tags.len() >= n => Some(format!(
                "</v2/{name}/tags/list?n={n}&last={t}>; rel=\"next\""
            )),
            _ => None,
        };
        let body = serde_json::json!({ "name": name, "tags": tags }).to_string();
        let mut r = json_response(body.into_bytes(), head);
        if let Some(link) = next {
            r.headers_mut().insert(header::LINK, header_value(&link));
        }
        Ok(r)
    }
}

/// A page of sorted tags: after `last`, at most `n`.
fn page(all: Vec<String>, n: Option<usize>, last: Option<&str>) -> Vec<String> {
    all.into_iter()
        .filter(|t| last.is_none_or(|l| t.as_str() > l))
        .take(n.unwrap_or(usize::MAX))
        .collect()
}

/// An OCI image index listing `manifests` (the referrers API's answer).
fn referrers_index(manifests: Vec<ImageIndexEntry>) -> Vec<u8> {
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some(oci::MT_OCI_INDEX.to_string()),
        manifests,
        artifact_type: None,
        annotations: None,
    };
    // Serializing plain structs of strings and maps cannot fail.
    serde_json::to_vec(&index).unwrap_or_default()
}

fn json_response(body: Vec<u8>, head: bool) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(if head { empty() } else { full(body) });
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    r
}

fn blob_headers(h: &mut hyper::HeaderMap, d: &Digest) {
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert("docker-content-digest", header_value(d.as_str()));
    h.insert(header::ETAG, header_value(&format!("\"{d}\"")));
}

fn header_value(s: &str) -> header::HeaderValue {
    // Digests, media types and paths checked by the route parser: visible ASCII. Anything
    // else becomes an empty value rather than a panic.
    header::HeaderValue::from_str(s).unwrap_or_else(|_| header::HeaderValue::from_static(""))
}

/// The media type of a stored manifest: its own `mediaType`, else what its shape says (OCI
/// manifests and indexes may leave the field out).
pub fn media_type_of(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match v["mediaType"].as_str() {
        Some(t) if !t.is_empty() => t.to_string(),
        _ if v["manifests"].is_array() => oci::MT_OCI_INDEX.to_string(),
        _ => oci::MT_OCI_MANIFEST.to_string(),
    }
}

/// A `Range` header's meaning for a body of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `[start, end)` (`end` is `u64::MAX` for "to the end" when the size is unknown).
    Some(u64, u64),
    Unsatisfiable,
}

/// Parse a single `bytes=` range (RFC 9110). `None`: no usable range (absent, malformed or
/// several ranges): the whole body is served.
pub fn parse_range(h: &str, size: u64) -> Option<ByteRange> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // The last `n` bytes.
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return Some(ByteRange::Unsatisfiable);
        }
        if size == u64::MAX {
            return None;
        }
        return Some(ByteRange::Some(size.saturating_sub(n), size));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        size
    } else {
        let last: u64 = b.parse().ok()?;
        if last < start {
            return None;
        }
        last.saturating_add(1).min(size)
    };
    if start >= size {
        return Some(ByteRange::Unsatisfiable);
    }
    Some(ByteRange::Some(start, end))
}

/// Where one upstream fetch of a blob stands; every client of the blob follows it.
#[derive(Clone, Debug)]
enum FlightState {
    /// The upstream request is being made.
    Opening,
    /// Bytes `[0, written)` are in the temp file; `len` as the upstream announced it.
    Streaming { len: Option<u64>, written: u64 },
    /// Verified and stored under its digest: `len` bytes.
    Done { len: u64 },
    /// The fetch failed; nothing was stored.
    Failed(Arc<MirrorError>),
}

/// One upstream fetch of a blob (single flight): a task writes it to a temp file of the store
/// and hashes it; any number of clients read that file as it grows. The last byte is handed
/// out only once the digest matched, so no client takes a wrong or cut blob for complete;
/// the fetch goes on to the end even when every client has gone, and stores the blob.
struct Flight {
    state: tokio::sync::watch::Sender<FlightState>,
    /// The temp file (each client opens its own descriptor: it stays valid across the rename
    /// into `blobs/`).
    path: std::path::PathBuf,
}

impl Mirror {
    /// The flight fetching `d`, joined or started; `None` when the blob is in the store now.
    fn flight(self: &Arc<Self>, up: &Upstream, d: &Digest) -> Result<Option<Arc<Flight>>> {
        let mut flights = lock(&self.flights);
        if let Some(f) = flights.get(d) {
            self.stats.upstream_fetches_saved.inc();
            return Ok(Some(Arc::clone(f)));
        }
        // A flight leaves the table only after its blob is in place: checked under the lock.
        if self.layout.has_blob(d) {
            self.stats.upstream_fetches_saved.inc();
            return Ok(None);
        }
        self.stats.upstream_fetches.inc();
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(self.layout.blobs_dir())?;
        let (state, _) = tokio::sync::watch::channel(FlightState::Opening);
        let flight = Arc::new(Flight {
            state,
            path: tmp.path().to_path_buf(),
        });
        flights.insert(d.clone(), Arc::clone(&flight));
        drop(flights);
        let (this, f, d, reference, creds) = (
            Arc::clone(self),
            Arc::clone(&flight),
            d.clone(),
            up.at(d),
            up.creds.clone(),
        );
        tokio::spawn(async move {
            // Its turn among the upstream fetches (the semaphore is never closed).
            let turn = Arc::clone(&this.upstream_permits)
                .acquire_owned()
                .await
                .ok();
            let result = this.fly(&f, &d, &reference, &creds, tmp).await;
            drop(turn);
            let end = match result {
                Ok(len) => FlightState::Done { len },
                Err(e) => {
                    tracing::warn!(blob = %d, error = %e, "mirror: fetching a blob from upstream failed; nothing stored");
                    FlightState::Failed(Arc::new(e))
                }
            };
            f.state.send_replace(end);
            lock(&this.flights).remove(&d);
        });
        Ok(Some(flight))
    }

    /// Bytes of an upstream blob, through the node's access gate when there is one: the
    /// request holds the link until the body is dropped.
    async fn open_upstream(
        &self,
        r: &oci_client::Reference,
        d: &Digest,
        offset: u64,
        len: Option<u64>,
        creds: &OpCreds,
    ) -> std::result::Result<crate::access::Body, RegistryError> {
        match &self.access {
            Some(a) => {
                a.open(crate::access::Class::Relay, r, d, offset, len, creds)
                    .await
            }
            None => Ok(crate::access::Body::unscheduled(
                self.registry.open_blob(r, d, offset, len, creds).await?,
            )),
        }
    }

    /// Fetch, hash and write the blob; store it when it verifies. Its length.
    async fn fly(
        &self,
        f: &Flight,
        d: &Digest,
        reference: &oci_client::Reference,
        creds: &OpCreds,
        tmp: tempfile::NamedTempFile,
    ) -> Result<u64> {
        let body = self
            .open_upstream(reference, d, 0, None, creds)
            .await
            .map_err(upstream_err(false))?;
        let len = body.len;
        f.state
            .send_replace(FlightState::Streaming { len, written: 0 });
        let mut file = tokio::fs::File::from_std(tmp.reopen()?);
        let mut hasher = sha2::Sha256::new();
        let mut written = 0u64;
        let mut stream = body.stream;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                upstream_err(false)(RegistryError::Unreachable {
                    registry: reference.registry().to_string(),
                    reason: format!("blob {d} cut at {written} bytes: {e}"),
                })
            })?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
            written += chunk.len() as u64;
            if len.is_some_and(|n| written > n) {
                break;
            }
            f.state
                .send_replace(FlightState::Streaming { len, written });
        }
        let got = Digest::from_sha256(&hasher.finalize());
        if got != *d || len.is_some_and(|n| n != written) {
            return Err(upstream_err(false)(RegistryError::DigestMismatch {
                registry: reference.registry().to_string(),
                what: format!("blob {d} ({written} bytes)"),
                expected: d.clone(),
                actual: got,
            }));
        }
        file.sync_all().await?;
        let (dest, dir) = (self.layout.blob(d), self.layout.blobs_dir());
        tokio::task::spawn_blocking(move || {
            tmp.persist(&dest).map_err(|e| e.error)?;
            crate::store::sync_dir(&dir)
        })
        .await
        .map_err(std::io::Error::other)??;
        lock(&self.db).add_mirror_blob(d.as_str())?;
        tracing::debug!(blob = %d, bytes = written, "mirror: blob fetched from upstream and stored");
        Ok(written)
    }

    /// A client's response following flight `f`: waits for the upstream's answer, then
    /// streams the temp file as it grows.
    async fn follow(&self, f: Arc<Flight>, d: &Digest, head: bool) -> Result<Response<Body>> {
        let mut rx = f.state.subscribe();
        let now = rx
            .wait_for(|s| !matches!(s, FlightState::Opening))
            .await
            .map_err(|_| std::io::Error::other("the fetch ended without an answer"))?
            .clone();
        let len = match now {
            FlightState::Failed(e) => return Err(MirrorError::Shared(e)),
            FlightState::Done { .. } => {
                // Stored already: serve it like any stored blob.
                let file = tokio::fs::File::open(self.layout.blob(d)).await?;
                return self.local_blob(file, d, None, head).await;
            }
            FlightState::Streaming { len, .. } => len,
            FlightState::Opening => None,
        };
        let mut r = if head {
            Response::new(empty())
        } else {
            // Renamed into the store meanwhile: the same bytes under its name.
            let file = match tokio::fs::File::open(&f.path).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tokio::fs::File::open(self.layout.blob(d)).await?
                }
                other => other?,
            };
            Response::new(counted_body(
                self.stats.bytes_from("in_flight"),
                futures_util::stream::unfold(
                    (file, 0u64, rx, vec![0u8; 256 << 10]),
                    |(mut file, mut pos, mut rx, mut buf)| async move {
                        loop {
                            let state = rx.borrow_and_update().clone();
                            let (ready, end) = match &state {
                                // The last byte waits for the digest.
                                FlightState::Streaming { written, .. } => {
                                    (written.saturating_sub(1), None)
                                }
                                FlightState::Done { len } => (*len, Some(*len)),
                                FlightState::Failed(e) => {
                                    let e = std::io::Error::other(e.to_string());
                                    return Some((Err(e), (file, u64::MAX, rx, buf)));
                                }
                                FlightState::Opening => (0, None),
                            };
                            if pos == u64::MAX || end.is_some_and(|e| pos >= e) {
                                return None;
                            }
                            if pos < ready {
                                let want = ((ready - pos) as usize).min(buf.len());
                                match file.read(&mut buf[..want]).await {
                                    Ok(0) => {}
                                    Ok(n) => {
                                        pos += n as u64;
                                        let out = Bytes::copy_from_slice(&buf[..n]);
                                        return Some((Ok(out), (file, pos, rx, buf)));
                                    }
                                    Err(e) => return Some((Err(e), (file, u64::MAX, rx, buf))),
                                }
                            }
                            if rx.changed().await.is_err() {
                                let e = std::io::Error::other("the upstream fetch was abandoned");
                                return Some((Err(e), (file, u64::MAX, rx, buf)));
                            }
                        }
                    },
                ),
            ))
        };
        if let Some(n) = len {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
        }
        blob_headers(r.headers_mut(), d);
        Ok(r)
    }
}

/// A client following the node's fill of a blob (see `Mirror::follow_fill`).
struct FillFollower {
    filler: Arc<Filler>,
    /// Where the verified blob is published.
    stored: std::path::PathBuf,
    /// The stored blob, opened once it exists (read in order from `pos`).
    stored_file: Option<tokio::fs::File>,
    digest: Digest,
    /// The fill attempt followed now.
    f: Following,
    pos: u64,
    size: u64,
}

/// At most this many bytes per chunk of a followed fill.
const FOLLOW_CHUNK: u64 = 256 << 10;

impl FillFollower {
    /// The next bytes, waiting for them as long as the fill makes progress; `None` at the end.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        let mut stalled_since = tokio::time::Instant::now();
        loop {
            // Verified and stored: the rest from there (the last byte only ever from there).
            if let Some(b) = self.read_stored().await? {
                return Ok(Some(b));
            }
            let ready = self
                .f
                .blob
                .covered_until(self.pos)
                .map_or(self.pos, |end| end.min(self.size - 1));
            if ready > self.pos {
                let n = (ready - self.pos).min(FOLLOW_CHUNK) as usize;
                let (blob, at) = (Arc::clone(&self.f.blob), self.pos);
                let buf = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    blob.read_at(&mut buf, at).map(|_| buf)
                })
                .await
                .map_err(std::io::Error::other)??;
                self.pos += n as u64;
                return Ok(Some(Bytes::from(buf)));
            }
            // Nothing new: wait for the fill to write, or for its next attempt.
            let wait = std::time::Duration::from_millis(200);
            match tokio::time::timeout(wait, self.f.progress.changed()).await {
                Ok(Ok(())) => stalled_since = tokio::time::Instant::now(),
                Ok(Err(_)) => {
                    // This attempt ended: verified (then stored), or failed and retried.
                    match self.filler.following(self.digest.as_str()) {
                        Some(next) if next.progress.has_changed().is_ok() => self.f = next,
                        _ => {
                            if !self.filler.is_filling(self.digest.as_str())
                                && !self.stored.exists()
                            {
                                return Err(std::io::Error::other(
                                    "the node's fill of the blob stopped before it was complete",
                                ));
                            }
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                Err(_) => {}
            }
            if stalled_since.elapsed() > FILL_STALL {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the node's fill of the blob made no progress for {FILL_STALL:?}"),
                ));
            }
        }
    }

    async fn read_stored(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.stored_file.is_none() {
            let mut f = match tokio::fs::File::open(&self.stored).await {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            f.seek(std::io::SeekFrom::Start(self.pos)).await?;
            self.stored_file = Some(f);
        }
        let Some(file) = self.stored_file.as_mut() else {
            return Ok(None);
        };
        let n = (self.size - self.pos).min(FOLLOW_CHUNK) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact(&mut buf).await?;
        self.pos += n as u64;
        Ok(Some(Bytes::from(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(ByteRange::Some(0, 10)));
        assert_eq!(
            parse_range("bytes=90-", 100),
            Some(ByteRange::Some(90, 100))
        );
        assert_eq!(
            parse_range("bytes=90-200", 100),
            Some(ByteRange::Some(90, 100))
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            Some(ByteRange::Some(90, 100))
        );
        assert_eq!(
            parse_range("bytes=-200", 100),
            Some(ByteRange::Some(0, 100))
        );
        assert_eq!(
            parse_range("bytes=100-", 100),
            Some(ByteRange::Unsatisfiable)
        );
        assert_eq!(parse_range("bytes=-0", 100), Some(ByteRange::Unsatisfiable));
        // Ignored: the whole body is served.
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=x-", 100), None);
        // Size unknown (a blob fetched through).
        assert_eq!(
            parse_range("bytes=10-", u64::MAX),
            Some(ByteRange::Some(10, u64::MAX))
        );
        assert_eq!(parse_range("bytes=-10", u64::MAX), None);
    }

    #[test]
    fn media_types_come_from_the_document() {
        assert_eq!(
            media_type_of(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            oci::MT_DOCKER_MANIFEST
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"manifests":[]}"#),
            oci::MT_OCI_INDEX
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"config":{},"layers":[]}"#),
            oci::MT_OCI_MANIFEST
        );
    }

    #[test]
    fn tag_pages_start_after_last() {
        let all: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(page(all.clone(), Some(2), None), ["a", "b"]);
        assert_eq!(page(all.clone(), Some(2), Some("b")), ["c", "d"]);
        assert_eq!(page(all, None, Some("d")), Vec::<String>::new());
    }
}
