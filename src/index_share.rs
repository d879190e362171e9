//! Sharing the random-access indexes of an image's plain gzip layers (layer/gzindex.rs, built
//! by the node that first decompressed them) through the image's registry, so that every other
//! node reads those layers lazily, like eStargz, without converting the image.
//!
//! One artifact per image (crate::artifact: OCI 1.1 `subject` = the image manifest, referrers
//! API or the `sha256-<hex>` tag fallback) whose blob is a bundle of the layers' file indexes,
//! each kept byte for byte so its digest is the same on every node. What comes back is
//! untrusted: each index is parsed and validated (checkpoints ordered and inside the layer,
//! positions inside the stream, piece digests present), must name a layer of this image with
//! that layer's size, and is used only for layers not unpacked here; every chunk read through
//! it is verified against its piece digest before a reader sees it.

use crate::layer::tar::{self as ltar, Limits};
use crate::oci::Digest;
use crate::registry::{OpCreds, Registry};
use crate::store::{Catalogue, ImageRecord, Layout};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Mutex;

/// The artifact type (and blob media type) of an index bundle.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazypull.gzip-index.v1+json";
/// Upper bound on a bundle fetched from a registry (an index is about 4% of its layer).
pub const MAX_BUNDLE_BYTES: usize = 256 << 20;

#[derive(Serialize, Deserialize)]
struct Bundle<'a> {
    version: u32,
    /// The image manifest the indexes are of.
    subject: String,
    #[serde(borrow)]
    indexes: Vec<&'a RawValue>,
}

/// A layer's random-access index in the store: (its digest, the index bytes, checkpoints).
pub fn layer_index(
    layout: &Layout,
    layer: &crate::store::LayerRecord,
) -> Option<(Digest, Vec<u8>, usize)> {
    let d = Digest::parse(layer.index_digest.as_deref()?).ok()?;
    let bytes = layout.read_blob(&d).ok()?;
    let (_, ra) = ltar::decode_index_with(&bytes, &Limits::default()).ok()?;
    let ra = ra?;
    (ra.layer.as_str() == layer.digest).then_some((d, bytes, ra.points.len()))
}

/// The bundle of the image's layer indexes, and how many it holds (None: no layer has one).
pub fn bundle(layout: &Layout, image: &ImageRecord) -> Result<Option<(Vec<u8>, usize)>, String> {
    let found: Vec<Vec<u8>> = image
        .layers
        .iter()
        .filter_map(|l| layer_index(layout, l).map(|(_, b, _)| b))
        .collect();
    if found.is_empty() {
        return Ok(None);
    }
    let raws = found
        .iter()
        .map(|b| {
            std::str::from_utf8(b)
                .map_err(|e| e.to_string())
                .and_then(|s| RawValue::from_string(s.to_string()).map_err(|e| e.to_string()))
        })
        .collect::<Result<Vec<Box<RawValue>>, String>>()?;
    let bundle = Bundle {
        version: 1,
        subject: image.manifest_digest.clone(),
        indexes: raws.iter().map(|r| r.as_ref()).collect(),
    };
    let bytes = serde_json::to_vec(&bundle).map_err(|e| e.to_string())?;
    Ok(Some((bytes, found.len())))
}

/// Publish the image's layer indexes next to it in its registry: (artifact digest, indexes).
pub async fn push(
    registry: &Registry,
    layout: &Layout,
    image: &ImageRecord,
    creds: &OpCreds,
) -> Result<(Digest, usize), String> {
    let Some((bytes, n)) = bundle(layout, image)? else {
        return Err("no layer of this image has a random-access index (plain gzip layers get one when the filler decompresses them)".into());
    };
    let (repo, subject) = crate::learned::subject_of(layout, image)?;
    let d = crate::artifact::attach(
        registry,
        &repo,
        &subject,
        ARTIFACT_TYPE,
        ARTIFACT_TYPE,
        bytes,
        creds,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((d, n))
}

/// Take the indexes of a bundle for `image`: each validated, naming a layer of the image with
/// its size; stored and recorded for layers not unpacked here. How many were taken.
pub fn take_bundle(
    layout: &Layout,
    db: &Mutex<Catalogue>,
    image: &ImageRecord,
    bytes: &[u8],
) -> Result<usize, String> {
    let bundle: Bundle = serde_json::from_slice(bytes).map_err(|e| format!("not a bundle: {e}"))?;
    if bundle.version != 1 {
        return Err(format!("bundle version {}", bundle.version));
    }
    if bundle.subject != image.manifest_digest {
        return Err(format!(
            "the bundle is of {}, not of {}",
            bundle.subject, image.manifest_digest
        ));
    }
    let mut taken = 0;
    for raw in bundle.indexes {
        let index = raw.get().as_bytes();
        let (_, ra) = match ltar::decode_index_with(index, &Limits::default()) {
            Ok((_, Some(ra))) => ((), ra),
            Ok((_, None)) => {
                tracing::warn!(image = %image.id, "a shared index without random access: ignored");
                continue;
            }
            Err(e) => {
                tracing::warn!(image = %image.id, error = %e, "a shared index is invalid: ignored");
                continue;
            }
        };
        let Some(layer) = image.layers.iter().find(|l| l.digest == ra.layer.as_str()) else {
            tracing::warn!(image = %image.id, layer = %ra.layer, "a shared index names a layer the image does not have: ignored");
            continue;
        };
        if layer.size != ra.blob_size {
            tracing::warn!(layer = %layer.digest, size = layer.size, index_says = ra.blob_size, "a shared index gives the wrong layer size: ignored");
            continue;
        }
        if layer.unpacked || layer.index_digest.is_some() || layer.toc_entries.is_some() {
            continue;
        }
        let d = Digest::of(index);
        layout.put_blob(&d, index).map_err(|e| e.to_string())?;
        let db = db.lock().unwrap_or_else(|p| p.into_inner());
        if db
            .set_shared_index(&layer.digest, d.as_str())
            .map_err(|e| e.to_string())?
        {
            tracing::info!(layer = %layer.digest, index = %d, checkpoints = ra.points.len(), "random-access index from the registry: the layer is read lazily");
            taken += 1;
        }
    }
    Ok(taken)
}

/// Look for an index bundle another node shared for the image and take it.
pub async fn fetch_shared(
    registry: &Registry,
    layout: &Layout,
    db: &Mutex<Catalogue>,
    image: &ImageRecord,
    creds: &OpCreds,
) -> Result<usize, String> {
    let (repo, subject) = crate::learned::subject_of(layout, image)?;
    let Some((artifact, bytes)) = crate::artifact::fetch_newest(
        registry,
        &repo,
        &subject.digest,
        ARTIFACT_TYPE,
        ARTIFACT_TYPE,
        MAX_BUNDLE_BYTES,
        creds,
    )
    .await
    .map_err(|e| e.to_string())?
    else {
        return Ok(0);
    };
    take_bundle(layout, db, image, &bytes).map_err(|e| format!("the shared index {artifact}: {e}"))
}
