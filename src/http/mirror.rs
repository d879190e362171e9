//! The pull-through registry: the OCI distribution **pull** API (`/v2/`) served from the
//! node's store. What the store has (pulled lazily or fully, or fetched through here before)
//! is served from it; the rest is fetched from the upstream the request names, verified, stored
//! and streamed to the client as it arrives. Tags are asked upstream at each request and
//! answered from the store when the upstream is unreachable (or always, `air_gapped`).

use super::route::{self, Ref, Route, RouteError};
use super::{Body, empty, full, status};
use crate::oci::{self, Digest};
use crate::registry::{OpCreds, Registry, RegistryError};
use crate::store::Catalogue;
use crate::store::{Layout, StoreError, locked as lock};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::{Method, Response, StatusCode, header};
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
}

type Result<T> = std::result::Result<T, MirrorError>;

/// Settings of the pull-through registry (`mirror.*`).
#[derive(Clone, Debug, Default)]
pub struct MirrorOptions {
    pub default_upstream: String,
    pub air_gapped: bool,
}

pub struct Mirror {
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    registry: Arc<Registry>,
    opts: MirrorOptions,
}

/// An upstream repository a request goes to.
struct Upstream {
    host: String,
    repo: String,
    creds: OpCreds,
}

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
    ) -> Arc<Self> {
        Arc::new(Mirror {
            layout,
            db,
            registry,
            opts,
        })
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
        let mut resp = match self
            .answer(
                &method,
                &path,
                query.as_deref(),
                ns.as_deref(),
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
        resp
    }

    async fn answer(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        ns: Option<&str>,
        range: Option<&str>,
    ) -> Result<Response<Body>> {
        let route = route::parse(path)?;
        if route == Route::Upload {
            return Err(MirrorError::Unsupported("pushing a blob".into()));
        }
        let head = *method == Method::HEAD;
        if !head && *method != Method::GET {
            return Err(MirrorError::Unsupported(format!("{method} {path}")));
        }
        match route {
            Route::Base => Ok(json_response(b"{}".to_vec(), head)),
            Route::Upload => Err(MirrorError::Unsupported("pushing a blob".into())),
            Route::Manifest { name, reference } => {
                let up = self.upstream(&name, ns)?;
                self.manifest(&up, reference, head).await
            }
            Route::Blob { name, digest } => {
                let up = self.upstream(&name, ns)?;
                self.blob(&up, &digest, range, head).await
            }
            Route::Tags { name } => {
                let up = self.upstream(&name, ns)?;
                self.tags(&name, &up, query, head).await
            }
            // No referrers API here: the spec's answer is 404, and clients then read the
            // referrers tag (`sha256-<hex>`), which is served like any tag.
            Route::Referrers { .. } => Err(RouteError::NotFound(path.into()).into()),
        }
    }

    fn upstream(&self, name: &str, ns: Option<&str>) -> Result<Upstream> {
        let (host, mut repo) = route::upstream(name, ns, &self.opts.default_upstream)
            .ok_or_else(|| MirrorError::NoUpstream(name.into()))?;
        if host == "docker.io" && !repo.contains('/') {
            repo = format!("library/{repo}");
        }
        let creds = OpCreds {
            request: None,
            persisted: crate::fetch::persisted_secret(&self.db, &host),
        };
        Ok(Upstream { host, repo, creds })
    }

    async fn manifest(&self, up: &Upstream, reference: Ref, head: bool) -> Result<Response<Body>> {
        let (bytes, digest) = match reference {
            Ref::Digest(d) => {
                if !self.layout.has_blob(&d) {
                    if self.opts.air_gapped {
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

    /// A manifest by tag: asked upstream (the tag may have moved), else the store's answer
    /// when the upstream cannot be reached or the mirror is air-gapped.
    async fn tagged_manifest(&self, up: &Upstream, tag: &str) -> Result<(Vec<u8>, Digest)> {
        let name = up.name(tag);
        if !self.opts.air_gapped {
            match self
                .registry
                .fetch_manifest(&up.tagged(tag), None, &up.creds)
                .await
            {
                Ok((bytes, d)) => {
                    self.keep_manifest(&d, &bytes)?;
                    lock(&self.db).set_mirror_tag(&name, d.as_str())?;
                    return Ok((bytes.to_vec(), d));
                }
                Err(e) if e.is_transient() => {
                    if let Some(found) = self.cached_tag(&name)? {
                        tracing::warn!(name, error = %e, "upstream unreachable: serving the tag as the store has it");
                        return Ok(found);
                    }
                    return Err(upstream_err(true)(e));
                }
                Err(e) => return Err(upstream_err(true)(e)),
            }
        }
        self.cached_tag(&name)?
            .ok_or(MirrorError::ManifestUnknown(name))
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

    /// Store a manifest fetched from upstream (its digest already verified), once it parses
    /// as a manifest or an index.
    fn keep_manifest(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        oci::parse_document(bytes, None).map_err(|e| MirrorError::Upstream {
            source: RegistryError::Oci(e),
            manifest: true,
        })?;
        if !self.layout.has_blob(d) {
            self.layout.put_blob(d, bytes)?;
        }
        lock(&self.db).add_mirror_blob(d.as_str())?;
        Ok(())
    }

    async fn blob(
        &self,
        up: &Upstream,
        d: &Digest,
        range: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>> {
        let path = self.layout.blob(d);
        match tokio::fs::File::open(&path).await {
            Ok(f) => return self.local_blob(f, d, range, head).await,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if self.opts.air_gapped {
            return Err(MirrorError::BlobUnknown(d.to_string()));
        }
        let requested = range.and_then(|r| parse_range(r, u64::MAX));
        if let Some(ByteRange::Some(start, end)) = requested {
            // A range of a blob the store lacks: passed through, not stored (its bytes cannot
            // be verified on their own).
            let len = (end != u64::MAX).then(|| end - start);
            let body = self
                .registry
                .open_blob(&up.at(d), d, start, len, &up.creds)
                .await
                .map_err(upstream_err(false))?;
            let mut r = Response::new(if head {
                empty()
            } else {
                super::stream(body.stream)
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
        let body = self
            .registry
            .open_blob(&up.at(d), d, 0, None, &up.creds)
            .await
            .map_err(upstream_err(false))?;
        let mut r = if head {
            Response::new(empty())
        } else {
            let tee = Tee::start(
                self.layout.clone(),
                Arc::clone(&self.db),
                d.clone(),
                body.stream,
            )
            .await?;
            Response::new(super::stream(tee))
        };
        if let Some(n) = body.len {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
        }
        blob_headers(r.headers_mut(), d);
        Ok(r)
    }

    async fn local_blob(
        &self,
        mut f: tokio::fs::File,
        d: &Digest,
        range: Option<&str>,
        head: bool,
    ) -> Result<Response<Body>> {
        let size = f.metadata().await?.len();
        let (status, start, end) = match range.and_then(|r| parse_range(r, size)) {
            None => (StatusCode::OK, 0, size),
            Some(ByteRange::Some(s, e)) => (StatusCode::PARTIAL_CONTENT, s, e.min(size)),
            Some(ByteRange::Unsatisfiable) => {
                return Err(MirrorError::RangeNotSatisfiable {
                    range: range.unwrap_or_default().chars().take(100).collect(),
                    size,
                });
            }
        };
        let body = if head {
            empty()
        } else {
            f.seek(std::io::SeekFrom::Start(start)).await?;
            super::stream(tokio_util::io::ReaderStream::with_capacity(
                f.take(end - start),
                256 << 10,
            ))
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from(end - start),
        );
        if status == StatusCode::PARTIAL_CONTENT {
            h.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {start}-{}/{size}", end.max(start + 1) - 1)),
            );
        }
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
        let tags = if self.opts.air_gapped {
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

/// A blob fetched from upstream for a client: each chunk is hashed and written to a temp file
/// of the store as it passes; the last chunk is held back until the digest is checked, so a
/// client never gets a complete body of wrong bytes (it gets an aborted response instead), and
/// the blob is stored only when it verifies.
struct Tee {
    upstream: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
    file: tokio::fs::File,
    tmp: Option<tempfile::NamedTempFile>,
    hasher: sha2::Sha256,
    pending: Option<Bytes>,
    digest: Digest,
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    done: bool,
}

impl Tee {
    async fn start(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        digest: Digest,
        upstream: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
    ) -> Result<impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(layout.blobs_dir())?;
        let file = tokio::fs::File::from_std(tmp.reopen()?);
        let tee = Tee {
            upstream,
            file,
            tmp: Some(tmp),
            hasher: sha2::Sha256::new(),
            pending: None,
            digest,
            layout,
            db,
            done: false,
        };
        Ok(futures_util::stream::unfold(tee, |mut t| async move {
            let item = t.next().await?;
            Some((item, t))
        }))
    }

    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            match self.upstream.next().await {
                Some(Ok(chunk)) => {
                    self.hasher.update(&chunk);
                    if let Err(e) = self.file.write_all(&chunk).await {
                        self.done = true;
                        tracing::warn!(blob = %self.digest, error = %e, "mirror: cannot store a blob it streams; the response is aborted");
                        return Some(Err(e));
                    }
                    if let Some(out) = self.pending.replace(chunk) {
                        return Some(Ok(out));
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    tracing::warn!(blob = %self.digest, error = %e, "mirror: upstream failed mid-blob; the response is aborted");
                    return Some(Err(e));
                }
                None => {
                    self.done = true;
                    return match self.finish().await {
                        Ok(()) => self.pending.take().map(Ok),
                        Err(e) => Some(Err(e)),
                    };
                }
            }
        }
    }

    /// Check the digest; store the blob under its name.
    async fn finish(&mut self) -> std::io::Result<()> {
        let got = Digest::from_sha256(&std::mem::take(&mut self.hasher).finalize());
        if got != self.digest {
            tracing::warn!(expected = %self.digest, got = %got, "mirror: upstream blob does not match its digest; not stored, the response is aborted");
            return Err(std::io::Error::other(format!(
                "digest mismatch: expected {}, got {got}",
                self.digest
            )));
        }
        self.file.sync_all().await?;
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        let (dest, dir) = (self.layout.blob(&self.digest), self.layout.blobs_dir());
        tokio::task::spawn_blocking(move || {
            tmp.persist(&dest).map_err(|e| e.error)?;
            crate::store::sync_dir(&dir)
        })
        .await
        .map_err(std::io::Error::other)??;
        if let Err(e) = lock(&self.db).add_mirror_blob(self.digest.as_str()) {
            tracing::warn!(blob = %self.digest, error = %e, "mirror: cannot record a stored blob");
        }
        tracing::debug!(blob = %self.digest, "mirror: blob fetched from upstream and stored");
        Ok(())
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
