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

/// The artifact type of an index bundle.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazypull.gzip-index.v1+json";
/// The media type of its one blob: the bundle JSON, zstd-compressed (the checkpoint windows are
/// base64 and the file table is repetitive: 7.3 MB of JSON for the python image's layer
/// become 4.2 MB; every node fetches it before its first read).
pub const BLOB_TYPE: &str = "application/vnd.lazypull.gzip-index.v1+json+zstd";
/// Upper bound on a bundle fetched from a registry, compressed and decompressed (an index is
/// about 6% of its layer).
pub const MAX_BUNDLE_BYTES: usize = 256 << 20;
/// zstd level for the bundle: near the best ratio on this kind of data, a second or two of CPU
/// at `index push`.
const BUNDLE_LEVEL: i32 = 15;

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
    let n = checkpoints(&bytes, layer)?;
    Some((d, bytes, n))
}

/// How many checkpoints the file index `bytes` gives `layer` (None: no random access to it).
pub fn checkpoints(bytes: &[u8], layer: &crate::store::LayerRecord) -> Option<usize> {
    let (_, ra) = ltar::decode_index_with(bytes, &Limits::default()).ok()?;
    let ra = ra?;
    (ra.layer.as_str() == layer.digest).then_some(ra.points.len())
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
    let bytes = zstd::bulk::compress(&bytes, BUNDLE_LEVEL).map_err(|e| e.to_string())?;
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
        BLOB_TYPE,
        bytes,
        creds,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((d, n))
}

/// A bundle blob decompressed, refusing more than [`MAX_BUNDLE_BYTES`] of output.
fn decompress_bounded(compressed: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut out = vec![];
    zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| e.to_string())?
        .take(MAX_BUNDLE_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("not a zstd bundle: {e}"))?;
    if out.len() > MAX_BUNDLE_BYTES {
        return Err(format!(
            "the bundle decompresses to over {MAX_BUNDLE_BYTES} bytes"
        ));
    }
    Ok(out)
}

/// Take the indexes of a bundle for `image`: each validated, naming a layer of the image with
/// its size; stored and recorded for layers not unpacked here. How many were taken.
pub fn take_bundle(
    layout: &Layout,
    db: &Mutex<Catalogue>,
    image: &ImageRecord,
    compressed: &[u8],
) -> Result<usize, String> {
    let bytes = decompress_bounded(compressed)?;
    let bundle: Bundle =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a bundle: {e}"))?;
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
        BLOB_TYPE,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::gzindex::IndexingReader;
    use crate::store::{NameKind, NewImage, NewLayer};
    use std::io::Write as _;

    /// A gzip layer of a few MiB and its index (version 2, with checkpoints).
    fn indexed_layer(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
        let mut b = tar::Builder::new(Vec::new());
        for (name, len) in [("a", 3000usize), ("b", 3 << 20), ("c", 10)] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut h = tar::Header::new_ustar();
            h.set_size(len as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1);
            h.set_cksum();
            b.append_data(&mut h, name, &body[..]).unwrap();
        }
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&b.into_inner().unwrap()).unwrap();
        let gz = e.finish().unwrap();
        let (reader, rec) = IndexingReader::new(&gz[..], 256 << 10).unwrap();
        let u = ltar::unpack(reader, &dir.join("files"), &Limits::default()).unwrap();
        let rec = std::mem::take(&mut *rec.lock().unwrap());
        let ra = ltar::RandomAccess {
            layer: Digest::of(&gz),
            blob_size: gz.len() as u64,
            size: rec.size,
            points: rec.points,
            positions: u.positions.clone(),
        };
        (gz.clone(), ltar::encode_index_with(&u.entries, Some(&ra)))
    }

    /// A store holding one image whose one layer is `digest` of `size` bytes.
    fn store(dir: &std::path::Path, digest: &Digest, size: u64) -> (Layout, Mutex<Catalogue>) {
        let layout = Layout::new(dir);
        layout.create().unwrap();
        let mut db = Catalogue::open(&layout.db()).unwrap();
        let manifest = Digest::of(b"manifest");
        db.insert_image(&NewImage {
            id: &Digest::of(b"config"),
            manifest_digest: &manifest,
            index_digest: None,
            media_type: "application/vnd.oci.image.manifest.v1+json",
            size: 1,
            user: "",
            source: "r.example/img",
            layers: vec![NewLayer {
                digest,
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
                size,
                diff_id: digest,
                toc_digest: None,
                toc_position: None,
            }],
            names: vec![("r.example/img:1".into(), NameKind::Tag)],
        })
        .unwrap();
        (layout, Mutex::new(db))
    }

    fn image(db: &Mutex<Catalogue>) -> ImageRecord {
        db.lock().unwrap().list_images().unwrap().remove(0)
    }

    #[test]
    fn a_bundle_is_taken_for_its_image_and_refused_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let (gz, index) = indexed_layer(dir.path());
        let layer = Digest::of(&gz);
        // The first node: its layer has the index.
        let (a_layout, a_db) = store(&dir.path().join("a"), &layer, gz.len() as u64);
        let d = Digest::of(&index);
        a_layout.put_blob(&d, &index).unwrap();
        a_db.lock()
            .unwrap()
            .set_unpacked(layer.as_str(), Some(d.as_str()))
            .unwrap();
        let (bytes, n) = bundle(&a_layout, &image(&a_db)).unwrap().unwrap();
        assert_eq!(n, 1);
        assert!(bytes.len() < index.len(), "compressed");

        // Another node takes it, once.
        let (b_layout, b_db) = store(&dir.path().join("b"), &layer, gz.len() as u64);
        assert_eq!(take_bundle(&b_layout, &b_db, &image(&b_db), &bytes), Ok(1));
        let rec = image(&b_db).layers.remove(0);
        assert_eq!(rec.index_digest.as_deref(), Some(d.as_str()));
        assert!(layer_index(&b_layout, &rec).is_some());
        assert_eq!(take_bundle(&b_layout, &b_db, &image(&b_db), &bytes), Ok(0));

        // A node whose layer has another size takes nothing.
        let (c_layout, c_db) = store(&dir.path().join("c"), &layer, gz.len() as u64 + 1);
        assert_eq!(take_bundle(&c_layout, &c_db, &image(&c_db), &bytes), Ok(0));
        assert_eq!(image(&c_db).layers[0].index_digest, None);

        // Not zstd, not a bundle, another subject, an index edited: refused or ignored.
        let (e_layout, e_db) = store(&dir.path().join("e"), &layer, gz.len() as u64);
        let img = image(&e_db);
        assert!(take_bundle(&e_layout, &e_db, &img, b"{}").is_err());
        let z = |v: &[u8]| zstd::bulk::compress(v, 3).unwrap();
        assert!(take_bundle(&e_layout, &e_db, &img, &z(b"[1]")).is_err());
        let json = String::from_utf8(zstd::bulk::decompress(&bytes, 64 << 20).unwrap()).unwrap();
        let other = json.replace(&img.manifest_digest, &Digest::of(b"other").to_string());
        assert!(take_bundle(&e_layout, &e_db, &img, &z(other.as_bytes())).is_err());
        // A checkpoint past the end of the blob, a file past the end of the stream.
        for (field, bad) in [
            ("\"in\":", "\"in\":99999999999"),
            ("\"offset\":", "\"offset\":99999999999"),
        ] {
            assert!(json.contains(field), "{field}");
            let edited = json.replacen(field, bad, 1);
            assert_eq!(
                take_bundle(&e_layout, &e_db, &img, &z(edited.as_bytes())),
                Ok(0),
                "{field}"
            );
        }
        assert_eq!(image(&e_db).layers[0].index_digest, None);
    }
}
