//! The VM disk image registry (`/reg`, prefix `reg.prefix`), on the store: disks and their
//! metadata are blobs (content-addressed, so two tags of one disk share one file), tags are
//! catalogue rows (`reg_tags`), and GC removes a disk no tag references.
//!
//! - `GET /reg`, `/reg/{repo}`, `/reg/{repo}/{image}`: repositories, images, tags (JSON arrays);
//! - `GET|HEAD /reg/{repo}/{image}/{tag}`: the disk, with `Content-Length`, `Accept-Ranges`,
//!   `ETag` and single `Range`s (qemu's curl driver reads it lazily);
//! - `GET /reg/{repo}/{image}/{tag}/meta`: its metadata JSON;
//! - `POST /reg/{repo}/{image}/{tag}`: multipart `meta` (JSON) and `img` (the file), optional
//!   `digest`; streamed to disk and hashed on the way, bounded by `reg.max_upload`;
//! - `DELETE /reg/{repo}/{image}/{tag}`: the tag goes; an image or repository without tags is
//!   no longer listed.

use super::{Body, empty, full};
use crate::images::Images;
use crate::oci::Digest;
use crate::store::{RegTag, locked as lock};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::{Method, Response, StatusCode, header};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Metadata JSON of one disk, at most.
pub const MAX_META: usize = 1 << 20;
/// A name segment (repository, image, tag), at most.
const MAX_SEGMENT: usize = 255;
/// The part of a disk response read before the response starts (sent with its head; see
/// `Reg::disk`).
const FIRST_PIECE: u64 = 5 << 19;
/// An upload that sends nothing for this long is dropped (and leaves nothing behind).
const UPLOAD_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RegError {
    #[error("invalid name {0:?}: letters, digits, '.', '_', '-', '+'; not '.' or '..'")]
    BadName(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("bad upload: {0}")]
    BadUpload(String),
    #[error("the disk is larger than the limit of {limit} bytes (reg.max_upload)")]
    TooLarge { limit: u64 },
    #[error("the uploaded disk is {actual}, not the digest given ({expected})")]
    DigestMismatch { expected: String, actual: String },
    #[error("range {range} outside the disk's {size} bytes")]
    RangeNotSatisfiable { range: String, size: u64 },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    #[error(transparent)]
    Images(#[from] crate::images::ImagesError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, RegError>;

/// One decoded, validated path segment.
fn segment(raw: &str) -> Result<String> {
    let s = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| RegError::BadName(raw.chars().take(80).collect()))?
        .to_string();
    let ok = !s.is_empty()
        && s.len() <= MAX_SEGMENT
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
    if ok {
        Ok(s)
    } else {
        Err(RegError::BadName(s.chars().take(80).collect()))
    }
}

/// What a request under the prefix names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Root,
    Repo(String),
    Image(String, String),
    Tag(String, String, String),
    Meta(String, String, String),
}

/// `rest`: the path after `/{prefix}` (empty, or starting with '/').
fn target(rest: &str) -> Result<Target> {
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(Target::Root);
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let seg = |i: usize| segment(parts[i]);
    Ok(match parts.len() {
        1 => Target::Repo(seg(0)?),
        2 => Target::Image(seg(0)?, seg(1)?),
        3 => Target::Tag(seg(0)?, seg(1)?, seg(2)?),
        4 if parts[3] == "meta" => Target::Meta(seg(0)?, seg(1)?, seg(2)?),
        _ => return Err(RegError::NotFound(format!("/{rest}"))),
    })
}

pub struct Reg {
    store: crate::store::Store,
    /// Removal and GC of the store's content.
    images: Arc<Images>,
    prefix: String,
    max_upload: u64,
}

fn json(v: &impl serde::Serialize, status: StatusCode, head: bool) -> Response<Body> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let len = body.len();
    let mut r = Response::new(if head { empty() } else { full(body) });
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    r
}

impl Reg {
    pub fn new(
        store: crate::store::Store,
        images: Arc<Images>,
        prefix: &str,
        max_upload: u64,
    ) -> Arc<Self> {
        Arc::new(Reg {
            store,
            images,
            prefix: format!("/{}", prefix.trim_matches('/')),
            max_upload,
        })
    }

    /// Whether `path` is under this registry's prefix.
    pub fn owns(&self, path: &str) -> bool {
        path == self.prefix
            || path
                .strip_prefix(&self.prefix)
                .is_some_and(|r| r.starts_with('/'))
    }

    pub async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(|r| r.chars().take(100).collect::<String>());
        let result = self.answer(req).await;
        match result {
            Ok(r) => {
                tracing::debug!(%method, %path, ?range, status = r.status().as_u16(), "reg request");
                r
            }
            Err(e) => {
                let status = super::status::reg(&e);
                if status.is_server_error() {
                    tracing::warn!(%method, %path, error = %e, "reg request failed");
                } else {
                    tracing::info!(%method, %path, status = status.as_u16(), error = %e, "reg request refused");
                }
                json(
                    &serde_json::json!({ "error": e.to_string() }),
                    status,
                    method == Method::HEAD,
                )
            }
        }
    }

    async fn answer(&self, req: hyper::Request<hyper::body::Incoming>) -> Result<Response<Body>> {
        let rest = req
            .uri()
            .path()
            .strip_prefix(&self.prefix)
            .unwrap_or_default()
            .to_string();
        let t = target(&rest)?;
        let method = req.method().clone();
        let head = method == Method::HEAD;
        let not_allowed = || {
            Err(RegError::MethodNotAllowed(format!(
                "{method} {}{rest}",
                self.prefix
            )))
        };
        let tags = |repo: Option<&str>, image: Option<&str>| -> Result<Vec<RegTag>> {
            Ok(lock(&self.store.db).reg_tags(repo, image)?)
        };
        match (t, &method) {
            (Target::Root, &Method::GET | &Method::HEAD) => {
                let mut repos: Vec<String> =
                    tags(None, None)?.into_iter().map(|t| t.repo).collect();
                repos.dedup();
                Ok(json(&repos, StatusCode::OK, head))
            }
            (Target::Repo(repo), &Method::GET | &Method::HEAD) => {
                let mut images: Vec<String> = tags(Some(&repo), None)?
                    .into_iter()
                    .map(|t| t.image)
                    .collect();
                images.dedup();
                if images.is_empty() {
                    return Err(RegError::NotFound(format!("repository {repo}")));
                }
                Ok(json(&images, StatusCode::OK, head))
            }
            (Target::Image(repo, image), &Method::GET | &Method::HEAD) => {
                let names: Vec<String> = tags(Some(&repo), Some(&image))?
                    .into_iter()
                    .map(|t| t.tag)
                    .collect();
                if names.is_empty() {
                    return Err(RegError::NotFound(format!("image {repo}/{image}")));
                }
                Ok(json(&names, StatusCode::OK, head))
            }
            (Target::Tag(r, i, t), &Method::GET | &Method::HEAD) => {
                let range = req
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                self.disk(&self.tag(&r, &i, &t)?, range.as_deref(), head)
                    .await
            }
            (Target::Meta(r, i, t), &Method::GET | &Method::HEAD) => {
                let tag = self.tag(&r, &i, &t)?;
                let d = Digest::parse(&tag.meta_digest)?;
                let meta = self.store.layout.read_blob(&d)?;
                let v: serde_json::Value = serde_json::from_slice(&meta).unwrap_or_default();
                Ok(json(&v, StatusCode::OK, head))
            }
            (Target::Tag(r, i, t), &Method::POST | &Method::PUT) => self.upload(req, r, i, t).await,
            (Target::Tag(r, i, t), &Method::DELETE) => {
                let removed = lock(&self.store.db).delete_reg_tag(&r, &i, &t)?;
                if !removed {
                    return Err(RegError::NotFound(format!("tag {r}/{i}/{t}")));
                }
                tracing::info!(repo = %r, image = %i, tag = %t, "reg: tag deleted");
                // The disk goes with its last tag (GC keeps what anything else references).
                self.images.gc().await?;
                Ok(json(
                    &serde_json::json!({ "deleted": format!("{r}/{i}/{t}") }),
                    StatusCode::OK,
                    false,
                ))
            }
            _ => not_allowed(),
        }
    }

    fn tag(&self, repo: &str, image: &str, tag: &str) -> Result<RegTag> {
        lock(&self.store.db)
            .reg_tag(repo, image, tag)?
            .ok_or_else(|| RegError::NotFound(format!("tag {repo}/{image}/{tag}")))
    }

    /// The disk of `tag`, whole or one range.
    async fn disk(&self, tag: &RegTag, range: Option<&str>, head: bool) -> Result<Response<Body>> {
        let d = Digest::parse(&tag.digest)?;
        let mut f = tokio::fs::File::open(self.store.layout.blob(&d)).await?;
        let size = f.metadata().await?.len();
        let Some((status, start, end)) = super::span(range, size) else {
            return Err(RegError::RangeNotSatisfiable {
                range: range.unwrap_or_default().chars().take(100).collect(),
                size,
            });
        };
        let body = if head {
            empty()
        } else {
            // The head goes out with the first piece of the body (2.5 MiB: a whole request of
            // qemu's curl driver, 2 MiB plus its 256 KiB read-ahead), in one write. qemu 7.2's
            // driver hangs now and then with parallel requests whose bodies arrive in pieces:
            // on an 8 MiB qcow2, `qemu-img convert` hung in 9 of 20 runs with the body streamed
            // in 256 KiB reads, 0 of 20 like this. (It also hangs against docker-registry, 2 of
            // 12 runs on a 64 MiB disk: the rest is qemu's.)
            f.seek(std::io::SeekFrom::Start(start)).await?;
            let first_len = (end - start).min(FIRST_PIECE);
            let mut first = vec![0u8; first_len as usize];
            f.read_exact(&mut first).await?;
            let rest = tokio_util::io::ReaderStream::with_capacity(
                f.take(end - start - first_len),
                256 << 10,
            );
            super::stream(futures_util::stream::iter([Ok(Bytes::from(first))]).chain(rest))
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(
            header::ACCEPT_RANGES,
            header::HeaderValue::from_static("bytes"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&format!("\"{}\"", tag.digest)) {
            h.insert(header::ETAG, v);
        }
        super::span_headers(h, status, start, end, size);
        Ok(r)
    }

    /// A multipart upload: `meta` (JSON), `img` (the disk, streamed into the store and hashed
    /// on the way), optional `digest`. Nothing is kept unless all of it is right; the tag then
    /// names the new disk and metadata in one row (a concurrent upload of the same tag is
    /// replaced whole, never mixed).
    async fn upload(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        repo: String,
        image: String,
        tag: String,
    ) -> Result<Response<Body>> {
        use http_body_util::BodyExt;
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let boundary = multer::parse_boundary(&ct).map_err(|_| {
            RegError::BadUpload(
                "expected multipart/form-data with fields meta (JSON) and img (the disk)".into(),
            )
        })?;
        let limits = multer::Constraints::new()
            .allowed_fields(vec!["meta", "img", "digest"])
            .size_limit(
                multer::SizeLimit::new()
                    .for_field("meta", MAX_META as u64)
                    .for_field("digest", 256)
                    .for_field("img", self.max_upload),
            );
        let body = req.into_body().into_data_stream();
        let mut parts = multer::Multipart::with_constraints(body, boundary, limits);
        let bad = |e: multer::Error| match e {
            multer::Error::FieldSizeExceeded { field_name, .. }
                if field_name.as_deref() == Some("img") =>
            {
                RegError::TooLarge {
                    limit: self.max_upload,
                }
            }
            other => RegError::BadUpload(other.to_string()),
        };
        let idle = |what: &str| {
            RegError::BadUpload(format!("nothing received for {UPLOAD_IDLE:?} ({what})"))
        };
        let blobs = self.store.layout.blobs_dir();
        let (mut meta, mut digest_given, mut disk) = (None, None, None);
        while let Some(mut field) = tokio::time::timeout(UPLOAD_IDLE, parts.next_field())
            .await
            .map_err(|_| idle("between fields"))?
            .map_err(bad)?
        {
            match field.name().unwrap_or_default() {
                "meta" => {
                    let b = field.bytes().await.map_err(bad)?;
                    serde_json::from_slice::<serde_json::Value>(&b)
                        .map_err(|e| RegError::BadUpload(format!("meta is not JSON: {e}")))?;
                    meta = Some(b);
                }
                "digest" => {
                    let b = field.bytes().await.map_err(bad)?;
                    let s = String::from_utf8_lossy(&b).trim().to_string();
                    Digest::parse(&s).map_err(|e| RegError::BadUpload(format!("digest: {e}")))?;
                    digest_given = Some(s);
                }
                "img" => {
                    let tmp = tempfile::Builder::new()
                        .prefix(".tmp-reg-")
                        .tempfile_in(&blobs)?;
                    let mut f = tokio::fs::File::from_std(tmp.reopen()?);
                    let mut h = Sha256::new();
                    let mut size = 0u64;
                    loop {
                        let chunk: Option<Bytes> = tokio::time::timeout(UPLOAD_IDLE, field.chunk())
                            .await
                            .map_err(|_| idle("in img"))?
                            .map_err(bad)?;
                        let Some(chunk) = chunk else { break };
                        h.update(&chunk);
                        f.write_all(&chunk).await?;
                        size += chunk.len() as u64;
                    }
                    f.sync_all().await?;
                    disk = Some((tmp, Digest::from_sha256(&h.finalize()), size));
                }
                _ => {}
            }
        }
        let meta = meta.ok_or_else(|| RegError::BadUpload("no meta field".into()))?;
        let (tmp, d, size) = disk.ok_or_else(|| RegError::BadUpload("no img field".into()))?;
        if let Some(want) = digest_given
            && want != d.as_str()
        {
            return Err(RegError::DigestMismatch {
                expected: want,
                actual: d.to_string(),
            });
        }
        let meta_digest = Digest::of(&meta);
        {
            // GC must not see the disk between its rename and the tag's row.
            let _gc = self.images.gc_shared().await;
            self.store.layout.put_blob(&meta_digest, &meta)?;
            let dest = self.store.layout.blob(&d);
            if dest.exists() {
                drop(tmp);
            } else {
                tmp.persist(&dest).map_err(|e| RegError::Io(e.error))?;
                crate::store::sync_dir(&blobs)?;
            }
            lock(&self.store.db).put_reg_tag(&RegTag {
                repo: repo.clone(),
                image: image.clone(),
                tag: tag.clone(),
                digest: d.to_string(),
                size,
                meta_digest: meta_digest.to_string(),
                created: crate::store::now(),
            })?;
        }
        tracing::info!(%repo, %image, %tag, digest = %d, size, "reg: disk image stored");
        Ok(json(
            &serde_json::json!({
                "repo": repo, "image": image, "tag": tag, "digest": d.as_str(), "size": size,
            }),
            StatusCode::CREATED,
            false,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_decoded_and_checked() {
        assert_eq!(target("").unwrap(), Target::Root);
        assert_eq!(target("/").unwrap(), Target::Root);
        assert_eq!(target("/r").unwrap(), Target::Repo("r".into()));
        assert_eq!(
            target("/r/i/v1.2/meta").unwrap(),
            Target::Meta("r".into(), "i".into(), "v1.2".into())
        );
        assert_eq!(
            target("/r/i/t/").unwrap(),
            Target::Tag("r".into(), "i".into(), "t".into())
        );
        for bad in [
            "/..",
            "/r/%2e%2e",
            "/r/a%2Fb",
            "/r/a%00",
            "/r//t",
            "/r/i/t/x",
            "/r/ a",
        ] {
            assert!(target(bad).is_err(), "{bad}");
        }
        assert!(matches!(target("/r/i/t/x"), Err(RegError::NotFound(_))));
        assert!(matches!(target("/r/%2e%2e"), Err(RegError::BadName(_))));
    }
}
