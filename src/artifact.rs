//! Artifacts attached to an image in its registry (OCI 1.1 `subject` + referrers): how
//! lazypull shares what one node learned about an image with every other node (the learned
//! start-up prefetch list, and the gzip index of unconverted layers). One artifact is an image
//! manifest with an `artifactType`, the empty config and its blobs: the first is fetched with
//! the manifest, the others are left to the caller (the gzip index keeps its checkpoint windows
//! in a second blob that nodes read by range). Registries without the referrers API (Debian's
//! docker-registry) get the spec's fallback: an image index tagged `sha256-<subject hex>`
//! listing the artifacts.
//!
//! What comes back from a registry is untrusted: the manifest is verified against the digest the
//! referrers list gives, must name the subject and the artifact type asked for, and its first
//! blob must be of the expected media type within a size bound; that blob is verified against
//! its digest. The caller validates the content.

use crate::oci::{self, Digest, Reference};
use crate::registry::{OpCreds, Registry, RegistryError};
use serde_json::json;

/// The OCI empty descriptor's content (`{}`) and digest.
const EMPTY: &[u8] = b"{}";
const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const CREATED: &str = "org.opencontainers.image.created";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("artifact {digest}: {reason}")]
    Invalid { digest: Digest, reason: String },
}

/// The image an artifact is attached to.
#[derive(Clone, Debug)]
pub struct Subject {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// A blob of an artifact other than its first, as its manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// What [`fetch_newest`] found: the artifact manifest's digest, its first blob (verified), and
/// the descriptors of its other blobs.
#[derive(Debug)]
pub struct Fetched {
    pub digest: Digest,
    pub blob: Vec<u8>,
    pub others: Vec<Descriptor>,
}

/// At most this many blobs in an artifact.
const MAX_BLOBS: usize = 4;

/// Attach `blobs` (media type, bytes; at least one) to `subject` in `repo`'s registry as an
/// artifact of `artifact_type`. Returns the artifact manifest's digest.
pub async fn attach(
    registry: &Registry,
    repo: &Reference,
    subject: &Subject,
    artifact_type: &str,
    blobs: Vec<(&str, Vec<u8>)>,
    creds: &OpCreds,
) -> Result<Digest, ArtifactError> {
    let empty = Digest::of(EMPTY);
    registry
        .push_blob_bytes(repo, &empty, EMPTY.to_vec(), creds)
        .await?;
    let mut layers = vec![];
    for (media_type, blob) in blobs {
        let blob_digest = Digest::of(&blob);
        let blob_size = blob.len();
        registry
            .push_blob_bytes(repo, &blob_digest, blob, creds)
            .await?;
        layers.push(
            json!({ "mediaType": media_type, "digest": blob_digest.as_str(), "size": blob_size }),
        );
    }
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": { "mediaType": MT_EMPTY, "digest": empty.as_str(), "size": EMPTY.len(), "data": "e30=" },
        "layers": layers,
        "subject": { "mediaType": subject.media_type, "digest": subject.digest.as_str(), "size": subject.size },
        "annotations": { CREATED: created },
    });
    // Serialising a JSON value cannot fail.
    let body = serde_json::to_vec(&manifest).unwrap_or_default();
    let digest = Digest::of(&body);
    let size = body.len();
    let at = Reference::with_digest(
        repo.registry().into(),
        repo.repository().into(),
        digest.to_string(),
    );
    registry
        .push_manifest(&at, body, oci::MT_OCI_MANIFEST, creds)
        .await?;
    // A registry with the referrers API lists it now; otherwise keep the fallback tag's index.
    let listed = registry
        .referrers(repo, &subject.digest, Some(artifact_type), creds)
        .await?
        .iter()
        .any(|m| m.digest == digest.as_str());
    if !listed {
        let tag = Reference::with_tag(
            repo.registry().into(),
            repo.repository().into(),
            subject.digest.as_str().replace(':', "-"),
        );
        let mut index = match registry.fetch_manifest(&tag, None, creds).await {
            Ok((bytes, _)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .filter(|v| v["manifests"].is_array())
                .unwrap_or_else(empty_index),
            Err(RegistryError::NotFound { .. }) => empty_index(),
            Err(e) => return Err(e.into()),
        };
        if let Some(list) = index["manifests"].as_array_mut() {
            list.retain(|m| m["digest"] != digest.as_str());
            list.push(json!({
                "mediaType": oci::MT_OCI_MANIFEST,
                "digest": digest.as_str(),
                "size": size,
                "artifactType": artifact_type,
                "annotations": { CREATED: created },
            }));
        }
        let body = serde_json::to_vec(&index).unwrap_or_default();
        registry
            .push_manifest(&tag, body, oci::MT_OCI_INDEX, creds)
            .await?;
    }
    Ok(digest)
}

fn empty_index() -> serde_json::Value {
    json!({ "schemaVersion": 2, "mediaType": oci::MT_OCI_INDEX, "manifests": [] })
}

/// The newest artifact of `artifact_type` attached to `subject` in `repo`'s registry, if there
/// is one, with its first blob, which must be of `media_type` and at most `limit` bytes.
pub async fn fetch_newest(
    registry: &Registry,
    repo: &Reference,
    subject: &Digest,
    artifact_type: &str,
    media_type: &str,
    limit: usize,
    creds: &OpCreds,
) -> Result<Option<Fetched>, ArtifactError> {
    let mut found = registry
        .referrers(repo, subject, Some(artifact_type), creds)
        .await?;
    // Newest first by the creation annotation (RFC 3339 in UTC sorts as text).
    let created = |m: &oci_client::manifest::ImageIndexEntry| {
        m.annotations
            .as_ref()
            .and_then(|a| a.get(CREATED).cloned())
            .unwrap_or_default()
    };
    found.sort_by_key(|m| std::cmp::Reverse(created(m)));
    let Some(newest) = found.first() else {
        return Ok(None);
    };
    let digest = Digest::parse(&newest.digest).map_err(|e| ArtifactError::Invalid {
        digest: Digest::of(newest.digest.as_bytes()),
        reason: format!("bad digest in the referrers list: {e}"),
    })?;
    let (bytes, _) = registry.fetch_manifest(repo, Some(&digest), creds).await?;
    let invalid = |reason: String| ArtifactError::Invalid {
        digest: digest.clone(),
        reason,
    };
    let m: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    if m["artifactType"] != artifact_type {
        return Err(invalid(format!("artifactType {}", m["artifactType"])));
    }
    if m["subject"]["digest"] != subject.as_str() {
        return Err(invalid(format!(
            "its subject is {}, not {subject}",
            m["subject"]["digest"]
        )));
    }
    let layers = m["layers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let [layer, rest @ ..] = layers else {
        return Err(invalid("no blobs".into()));
    };
    if layers.len() > MAX_BLOBS {
        return Err(invalid(format!(
            "{} blobs, at most {MAX_BLOBS}",
            layers.len()
        )));
    }
    let mut others = vec![];
    for l in rest {
        others.push(Descriptor {
            media_type: l["mediaType"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(256)
                .collect(),
            digest: Digest::parse(l["digest"].as_str().unwrap_or_default())
                .map_err(|e| invalid(format!("blob digest: {e}")))?,
            size: l["size"]
                .as_u64()
                .ok_or_else(|| invalid("a blob without a size".into()))?,
        });
    }
    if layer["mediaType"] != media_type {
        return Err(invalid(format!("blob media type {}", layer["mediaType"])));
    }
    let size = layer["size"].as_u64().unwrap_or(u64::MAX);
    if size > limit as u64 {
        return Err(invalid(format!("blob of {size} bytes, over {limit}")));
    }
    let blob_digest = Digest::parse(layer["digest"].as_str().unwrap_or_default())
        .map_err(|e| invalid(format!("blob digest: {e}")))?;
    let blob = registry
        .fetch_small_blob(repo, &blob_digest, limit, creds)
        .await?;
    Ok(Some(Fetched {
        digest,
        blob,
        others,
    }))
}
