//! Sharing the random-access indexes of an image's plain gzip layers (layer/gzindex.rs, built
//! by the node that first decompressed them) through the image's registry, so that every other
//! node reads those layers lazily, like eStargz, without converting the image.
//!
//! One artifact per image (crate::artifact: OCI 1.1 `subject` = the image manifest, referrers
//! API or the `sha256-<hex>` tag fallback) with two blobs: a bundle of the layers' file indexes
//! without their checkpoint windows, which a node fetches whole when it pulls the image, and the
//! windows, one after another, which it reads by range, only those its reads start from. What
//! comes back is untrusted: each index is parsed and validated (checkpoints ordered and inside
//! the layer, windows inside the windows blob of this artifact, positions inside the stream,
//! piece digests present), must name a layer of this image with that layer's size, and is used
//! only for layers not unpacked here; every window is verified against its digest before use,
//! and every chunk read through the index against its piece digest before a reader sees it.

use crate::layer::tar::{self as ltar, Limits};
use crate::oci::Digest;
use crate::registry::{OpCreds, Registry};
use crate::store::{Catalogue, ImageRecord, Layout};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Mutex;

/// The artifact type of an index bundle.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazypull.gzip-index.v1+json";
/// The media type of its first blob: the bundle JSON, zstd-compressed (the file table is
/// repetitive). Every node fetches it before its first read, so it holds no windows.
pub const BLOB_TYPE: &str = "application/vnd.lazypull.gzip-index.v1+json+zstd";
/// The media type of its second blob: the checkpoint windows (each zstd-compressed, one after
/// another). A node fetches by range only the windows its reads start from; each is verified
/// against the digest its index gives. 90% of a bundle that held them was windows (3.9 of
/// 4.3 MB for the python image's layer) that few reads need.
pub const WINDOWS_TYPE: &str = "application/vnd.lazypull.gzip-index.windows.v1";
/// Upper bound on a bundle fetched from a registry, compressed and decompressed (an index
/// without its windows is about 1% of its layer).
pub const MAX_BUNDLE_BYTES: usize = 256 << 20;
/// zstd level for the bundle: near the best ratio on this kind of data, a second or two of CPU
/// at `index push`.
const BUNDLE_LEVEL: i32 = 15;

#[derive(Serialize, Deserialize)]
struct Bundle<'a> {
    /// 1: windows inline in each index; 2: windows in the artifact's second blob.
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
    let crate::store::Form::FileIndex { digest, .. } = layer.form() else {
        return None;
    };
    let d = Digest::parse(digest).ok()?;
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

/// What [`push`] publishes for an image.
pub struct Shareable {
    /// The bundle blob (zstd-compressed JSON).
    pub bundle: Vec<u8>,
    /// The windows blob (empty when no checkpoint has a window: zstd frame starts).
    pub windows: Vec<u8>,
    /// Layers with an index.
    pub layers: usize,
    /// Checkpoints added before the files of the image's learned start ([`hot_points`]).
    pub added: usize,
    /// The image's learned list (if it has one) with where its files lie through these
    /// indexes, for other nodes to fetch ahead of them (`crate::learned`, ranges).
    pub learned: Option<crate::learned::LearnedList>,
}

/// The bundle of the image's layer indexes with their windows apart (None: no layer has an
/// index). An image whose index came from the registry is not published again from here.
pub fn bundle(layout: &Layout, image: &ImageRecord) -> Result<Option<Shareable>, String> {
    let mut windows = vec![];
    let mut parts = vec![];
    let mut added_total = 0;
    let learned = Digest::parse(&image.manifest_digest)
        .ok()
        .and_then(|m| crate::learned::load(layout, &m).ok().flatten());
    for l in &image.layers {
        let Some((_, bytes, _)) = layer_index(layout, l) else {
            continue;
        };
        let (entries, ra) =
            ltar::decode_index_with(&bytes, &Limits::default()).map_err(|e| e.to_string())?;
        let Some(mut ra) = ra else { continue };
        if ra.windows_apart() {
            return Err(format!(
                "the index of layer {} came from the registry (another node shared it): it is published already",
                l.digest
            ));
        }
        if let Some(list) = &learned {
            let paths = list.paths_of(&l.digest);
            match hot_points(layout, &mut ra, &entries, &paths) {
                Ok(0) => {}
                Ok(added) => {
                    added_total += added;
                    tracing::info!(layer = %l.digest, added, files = paths.len(), "index: checkpoints added before the files the image's learned start reads")
                }
                Err(e) => {
                    tracing::warn!(layer = %l.digest, error = %e, "cannot add checkpoints before the files of the learned start; the index is shared without them")
                }
            }
        }
        match sparse_windows(layout, &mut ra) {
            Ok((whole, sparse)) => {
                tracing::info!(layer = %l.digest, whole, sparse, "index: checkpoint windows with the bytes no read uses zeroed")
            }
            Err(e) => {
                tracing::info!(layer = %l.digest, error = %e, "checkpoint windows shared whole")
            }
        }
        ra.split_windows(&mut windows);
        parts.push((entries, ra));
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let at = (!windows.is_empty()).then(|| (Digest::of(&windows), windows.len() as u64));
    let mut learned = learned;
    let mut ranged = false;
    let encoded: Vec<Vec<u8>> = parts
        .into_iter()
        .map(|(entries, mut ra)| {
            ra.windows = at.clone().filter(|_| ra.windows_apart());
            if let Some(list) = learned.as_mut() {
                // Where the listed files lie through this index, as another node reads them.
                let paths = list.paths_of(ra.layer.as_str());
                let lazy = ra.lazy_entries(&entries);
                let mut chunks = crate::learned::listed_chunks(&lazy, &paths);
                chunks.retain(|c| c.end().is_some());
                if !chunks.is_empty() {
                    let ranges = crate::learned::ranges_of(
                        ra.blob_size,
                        false,
                        &chunks,
                        |c| (c.offset, c.end().unwrap_or(c.offset)),
                        ra.windows.as_ref(),
                    );
                    list.ranges.insert(ra.layer.to_string(), ranges);
                    ranged = true;
                }
            }
            ltar::encode_index_with(&entries, Some(&ra))
        })
        .collect();
    let raws = encoded
        .iter()
        .map(|b| {
            std::str::from_utf8(b)
                .map_err(|e| e.to_string())
                .and_then(|s| RawValue::from_string(s.to_string()).map_err(|e| e.to_string()))
        })
        .collect::<Result<Vec<Box<RawValue>>, String>>()?;
    let bundle = Bundle {
        version: 2,
        subject: image.manifest_digest.clone(),
        indexes: raws.iter().map(|r| r.as_ref()).collect(),
    };
    let bytes = serde_json::to_vec(&bundle).map_err(|e| e.to_string())?;
    let bytes = zstd::bulk::compress(&bytes, BUNDLE_LEVEL).map_err(|e| e.to_string())?;
    if let Some(list) = learned.as_mut().filter(|_| ranged) {
        list.index = Some(crate::learned::SharedIndex::of(
            &bytes,
            at.as_ref().map(|(d, n)| (d, *n)),
        ));
    }
    Ok(Some(Shareable {
        bundle: bytes,
        windows,
        layers: encoded.len(),
        added: added_total,
        learned,
    }))
}

/// Add to `ra` (a layer's own index, its blob complete here) a checkpoint at the last deflate
/// block boundary before each 1 MiB piece of the files `paths` (the files a start of the image
/// read here, from its learned list): another node's reads of them then decode at most one
/// block (typically 30–150 KiB) before their first byte instead of up to a span, like the
/// per-file members of eStargz. The layer is decompressed once more for this (about a second
/// per 100 MB). Returns how many checkpoints were added.
pub fn hot_points(
    layout: &Layout,
    ra: &mut ltar::RandomAccess,
    entries: &[crate::layer::index::Entry],
    paths: &[String],
) -> Result<usize, String> {
    use crate::layer::gzindex::{CHUNK, IndexingReader};
    if paths.is_empty() || ra.points.iter().any(|p| p.zstd) {
        return Ok(0);
    }
    let wanted: std::collections::HashSet<&str> = paths.iter().map(|p| p.as_str()).collect();
    let targets: Vec<u64> = entries
        .iter()
        .zip(&ra.positions)
        .filter(|(e, _)| wanted.contains(e.path.as_str()))
        .filter_map(|(e, pos)| pos.as_ref().map(|p| (e.size, p.offset)))
        .flat_map(|(size, at)| (0..size.div_ceil(CHUNK).max(1)).map(move |k| at + k * CHUNK))
        .collect();
    if targets.is_empty() {
        return Ok(0);
    }
    let blob = std::fs::File::open(layout.blob(&ra.layer))
        .map_err(|e| format!("the layer's blob is not here ({e})"))?;
    let (reader, rec) =
        IndexingReader::new(std::io::BufReader::with_capacity(1 << 20, blob), u64::MAX)
            .map_err(|e| e.to_string())?;
    let mut reader = reader.with_targets(targets);
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| e.to_string())?;
    drop(reader);
    let rec = std::mem::take(&mut *rec.lock().unwrap_or_else(|p| p.into_inner()));
    if !rec.complete || rec.unusable.is_some() || rec.size != ra.size {
        return Err("the blob does not decompress as its index says".into());
    }
    let before = ra.points.len();
    let mut points = std::mem::take(&mut ra.points);
    points.extend(rec.points);
    points.sort_by_key(|p| p.out);
    points.dedup_by_key(|p| p.out);
    ra.points = points;
    Ok(ra.points.len() - before)
}

/// Zero the bytes of `ra`'s checkpoint windows that no decoding from their checkpoint reads
/// (`gzindex::sparse_window`, checked), from the layer's blob in the store: the windows blob
/// other nodes fetch by range shrinks (a miss's window request, a learned list's windows ahead)
/// and means the same. Returns the windows' compressed bytes before and after; a window that
/// cannot be made sparse stays whole.
pub fn sparse_windows(layout: &Layout, ra: &mut ltar::RandomAccess) -> Result<(u64, u64), String> {
    use crate::layer::gzindex::{SPARSE_INPUT, sparse_window};
    use std::os::unix::fs::FileExt as _;
    let blob = std::fs::File::open(layout.blob(&ra.layer))
        .map_err(|e| format!("the layer's blob is not here ({e})"))?;
    let size = blob.metadata().map_err(|e| e.to_string())?.len();
    if size != ra.blob_size {
        return Err(format!(
            "the blob is {size} bytes, its index says {}",
            ra.blob_size
        ));
    }
    let (mut whole, mut sparse) = (0u64, 0u64);
    let mut input = vec![];
    for p in &mut ra.points {
        if p.window.is_empty() || p.zstd {
            continue;
        }
        whole += p.window.len() as u64;
        let start = p.start();
        input.resize(SPARSE_INPUT.min(size.saturating_sub(start)) as usize, 0);
        blob.read_exact_at(&mut input, start)
            .map_err(|e| e.to_string())?;
        let made = p
            .window(None)
            .ok()
            .and_then(|w| sparse_window(&input, p, &w))
            .and_then(|w| zstd::bulk::compress(&w, 3).ok())
            .filter(|z| z.len() < p.window.len());
        if let Some(z) = made {
            p.window = z;
        }
        sparse += p.window.len() as u64;
    }
    Ok((whole, sparse))
}

/// What [`push`] published.
#[derive(Debug)]
pub struct Pushed {
    /// The artifact's manifest digest.
    pub artifact: Digest,
    /// Layer indexes in it.
    pub layers: usize,
    /// Checkpoints added before the files of the image's learned start.
    pub added: usize,
    /// Layers whose ranges the image's learned list now holds through the pushed indexes.
    pub ranged: usize,
    /// Bytes of the bundle blob (what every pull with `fetch.index: auto` fetches) and of the
    /// windows blob (fetched by range, a window at a time, only where reads start).
    pub bundle_bytes: u64,
    pub windows_bytes: u64,
}

/// Publish the image's layer indexes next to it in its registry.
pub async fn push(
    registry: &Registry,
    layout: &Layout,
    image: &ImageRecord,
    creds: &OpCreds,
) -> Result<Pushed, String> {
    let Some(shared) = bundle(layout, image)? else {
        return Err("no layer of this image has a random-access index (plain gzip layers get one when the filler decompresses them)".into());
    };
    let (repo, subject) = crate::learned::subject_of(layout, image)?;
    let (bundle_bytes, windows_bytes) = (shared.bundle.len() as u64, shared.windows.len() as u64);
    let mut blobs = vec![(BLOB_TYPE, shared.bundle)];
    if !shared.windows.is_empty() {
        blobs.push((WINDOWS_TYPE, shared.windows));
    }
    let d = crate::artifact::attach(registry, &repo, &subject, ARTIFACT_TYPE, blobs, creds)
        .await
        .map_err(|e| e.to_string())?;
    // Published: the learned list now says where its files lie through these indexes (kept
    // for `lazypull learned push`, and for nodes provisioned from this store).
    let mut ranged = 0;
    if let Some(list) = &shared.learned {
        ranged = list
            .ranges
            .keys()
            .filter(|l| image.layers.iter().any(|x| &x.digest == *l && !x.has_toc()))
            .count();
        if ranged > 0 {
            crate::learned::save(layout, list).map_err(|e| e.to_string())?;
        }
    }
    Ok(Pushed {
        artifact: d,
        layers: shared.layers,
        added: shared.added,
        ranged,
        bundle_bytes,
        windows_bytes,
    })
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
/// its size, and windows kept apart only in `windows` (the artifact's windows blob: digest and
/// size); stored and recorded for layers not unpacked here. How many were taken.
pub fn take_bundle(
    layout: &Layout,
    db: &Mutex<Catalogue>,
    image: &ImageRecord,
    compressed: &[u8],
    windows: Option<(&Digest, u64)>,
) -> Result<usize, String> {
    let bytes = decompress_bounded(compressed)?;
    let bundle: Bundle =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a bundle: {e}"))?;
    if bundle.version != 1 && bundle.version != 2 {
        return Err(format!("bundle version {}", bundle.version));
    }
    if bundle.subject != image.manifest_digest {
        return Err(format!(
            "the bundle is of {}, not of {}",
            bundle.subject, image.manifest_digest
        ));
    }
    // Recorded with each layer taken: a list learned here names the bundle its ranges go
    // through (`crate::learned`), so that a node with the list takes it by digest.
    let named = serde_json::to_string(&crate::learned::SharedIndex::of(compressed, windows))
        .map_err(|e| e.to_string())?;
    let mut taken = 0;
    for raw in bundle.indexes {
        let index = raw.get().as_bytes();
        let (entries, ra) = match ltar::decode_index_with(index, &Limits::default()) {
            Ok((entries, Some(ra))) => (entries, ra),
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
        if ra.windows_apart() && ra.windows.as_ref().map(|(d, n)| (d, *n)) != windows {
            tracing::warn!(layer = %layer.digest, "a shared index names a windows blob its artifact does not hold: ignored");
            continue;
        }
        if layer.unpacked || layer.mountable() {
            continue;
        }
        let d = Digest::of(index);
        layout.put_blob(&d, index).map_err(|e| e.to_string())?;
        let db = db.lock().unwrap_or_else(|p| p.into_inner());
        if db
            .set_shared_index(&layer.digest, d.as_str(), &named)
            .map_err(|e| e.to_string())?
        {
            tracing::info!(layer = %layer.digest, index = %d, checkpoints = ra.points.len(), windows_apart = ra.windows_apart(), "random-access index from the registry: the layer is read lazily");
            // Its mount follows at once: it takes the index decoded.
            ltar::keep_decoded(d, (entries, Some(ra)));
            taken += 1;
        }
    }
    Ok(taken)
}

/// Look for an index bundle another node shared for the image whose manifest is `subject` in
/// `repo`'s registry: the newest, verified against its digests, not yet taken. It needs no
/// catalogue record, so a pull runs it beside the config fetch.
pub async fn find_shared(
    registry: &Registry,
    repo: &crate::oci::Reference,
    subject: &Digest,
    creds: &OpCreds,
) -> Result<Option<crate::artifact::Fetched>, String> {
    crate::artifact::fetch_newest(
        registry,
        repo,
        subject,
        ARTIFACT_TYPE,
        BLOB_TYPE,
        MAX_BUNDLE_BYTES,
        creds,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Take what [`find_shared`] found for `image`. How many layer indexes were taken.
pub fn take_found(
    layout: &Layout,
    db: &Mutex<Catalogue>,
    image: &ImageRecord,
    found: &crate::artifact::Fetched,
) -> Result<usize, String> {
    let windows = found
        .others
        .iter()
        .find(|d| d.media_type == WINDOWS_TYPE)
        .map(|d| (&d.digest, d.size));
    take_bundle(layout, db, image, &found.blob, windows)
        .map_err(|e| format!("the shared index {}: {e}", found.digest))
}

/// A shared index for tests elsewhere: what [`bundle`] publishes for the image whose manifest
/// is `manifest` and whose one layer is `gz` (indexed here, every 256 KiB), with a learned list
/// of `paths` (then holding the ranges and the index).
#[cfg(test)]
pub fn test_bundle(
    dir: &std::path::Path,
    gz: &[u8],
    manifest: &Digest,
    paths: &[&str],
) -> Shareable {
    let (entries, ra) = ltar::test_util::index_of(gz, 256 << 10, &dir.join("files"));
    let index = ltar::encode_index_with(&entries, Some(&ra));
    let layer = Digest::of(gz);
    let (layout, db) = test_store(&dir.join("store"), &layer, gz.len() as u64, manifest);
    let d = Digest::of(&index);
    layout.put_blob(&d, &index).unwrap();
    db.lock()
        .unwrap()
        .set_unpacked(layer.as_str(), Some(d.as_str()))
        .unwrap();
    let list = crate::learned::LearnedList {
        version: 1,
        image: manifest.to_string(),
        recorded_at: 1,
        files: paths
            .iter()
            .map(|p| crate::learned::LearnedFile {
                layer: layer.to_string(),
                path: p.to_string(),
            })
            .collect(),
        ranges: Default::default(),
        index: None,
    };
    crate::learned::save(&layout, &list).unwrap();
    let image = db.lock().unwrap().list_images().unwrap().remove(0);
    bundle(&layout, &image).unwrap().unwrap()
}

/// A store in `dir` holding one image (manifest `manifest`) of one plain gzip layer.
#[cfg(test)]
pub fn test_store(
    dir: &std::path::Path,
    layer: &Digest,
    size: u64,
    manifest: &Digest,
) -> (Layout, Mutex<Catalogue>) {
    use crate::store::{NameKind, NewImage, NewLayer};
    let layout = Layout::new(dir);
    layout.create().unwrap();
    let mut db = Catalogue::open(&layout.db()).unwrap();
    db.insert_image(&NewImage {
        id: &Digest::of(b"config"),
        manifest_digest: manifest,
        index_digest: None,
        media_type: "application/vnd.oci.image.manifest.v1+json",
        size: 1,
        user: "",
        source: "r.example/img",
        layers: vec![NewLayer {
            digest: layer,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            size,
            diff_id: layer,
            toc_digest: None,
            toc_position: None,
        }],
        names: vec![("r.example/img:1".into(), NameKind::Tag)],
    })
    .unwrap();
    (layout, Mutex::new(db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::gzindex::IndexingReader;

    /// A gzip layer of a few MiB and its index (version 2, with checkpoints).
    fn indexed_layer(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
        // Text-like: deflate ends blocks often, so there are checkpoints with windows.
        let text = |len: usize| -> Vec<u8> {
            let mut x = 12345u32;
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    b"abcdefgh ijklmn\n"[(x >> 16) as usize % 16]
                })
                .collect()
        };
        let (a, b, c) = (text(3000), text(3 << 20), text(10));
        let (_, gz) = ltar::test_util::files_tar_gz(&[("a", &a), ("b", &b), ("c", &c)]);
        let (entries, ra) = ltar::test_util::index_of(&gz, 256 << 10, &dir.join("files"));
        let index = ltar::encode_index_with(&entries, Some(&ra));
        (gz, index)
    }

    #[test]
    fn the_files_of_a_learned_start_get_checkpoints_right_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let (gz, index) = indexed_layer(dir.path());
        let (entries, ra) = ltar::decode_index_with(&index, &Limits::default()).unwrap();
        let before = ra.unwrap();
        let mut ra = before.clone();
        let layout = Layout::new(dir.path().join("s"));
        layout.create().unwrap();
        let paths = vec!["c".to_string(), "b".to_string()];
        // Without the blob here, nothing is added.
        assert!(hot_points(&layout, &mut ra, &entries, &paths).is_err());
        layout.put_blob(&Digest::of(&gz), &gz).unwrap();
        let added = hot_points(&layout, &mut ra, &entries, &paths).unwrap();
        // b's 3 pieces and c (b's first piece starts right at the layer's first checkpoint).
        assert!((3..=4).contains(&added), "{added}");
        assert_eq!(ra.points.len(), before.points.len() + added);
        crate::layer::gzindex::validate(&ra.points, gz.len() as u64, ra.size, None).unwrap();
        // c's checkpoint is the last block boundary before it (every boundary: span 1).
        let (r, every) = IndexingReader::new(&gz[..], 1).unwrap();
        std::io::copy(&mut { r }, &mut std::io::sink()).unwrap();
        let every = std::mem::take(&mut *every.lock().unwrap()).points;
        let c = entries.iter().position(|e| e.path == "c").unwrap();
        let at = ra.positions[c].as_ref().unwrap().offset;
        let near = |points: &[crate::layer::gzindex::Point]| {
            points[crate::layer::gzindex::point_before(points, at).unwrap()].out
        };
        assert_eq!(near(&ra.points), near(&every));
        assert!(near(&before.points) < near(&ra.points));
        // The files read the same through either index, and c's read starts nearer.
        let spans = crate::layer::index::Spans::default();
        let fetch =
            |s: u64, e: u64| -> Result<Vec<u8>, String> { Ok(gz[s as usize..e as usize].to_vec()) };
        let (old, new) = (before.lazy_entries(&entries), ra.lazy_entries(&entries));
        for i in 0..entries.len() {
            let a = crate::layer::index::read_file(&spans, &old[i], 0, u64::MAX, fetch).unwrap();
            let b = crate::layer::index::read_file(&spans, &new[i], 0, u64::MAX, fetch).unwrap();
            assert_eq!(a, b, "{}", entries[i].path);
        }
        assert!(new[c].chunks[0].offset > old[c].chunks[0].offset);
    }

    /// A store holding one image whose one layer is `digest` of `size` bytes.
    fn store(dir: &std::path::Path, digest: &Digest, size: u64) -> (Layout, Mutex<Catalogue>) {
        test_store(dir, digest, size, &Digest::of(b"manifest"))
    }

    /// A store in `dir` whose image's one layer, `gz`, is unpacked with its index `index`.
    fn indexed_store(dir: &std::path::Path, gz: &[u8], index: &[u8]) -> (Layout, Mutex<Catalogue>) {
        let layer = Digest::of(gz);
        let (layout, db) = store(dir, &layer, gz.len() as u64);
        let d = Digest::of(index);
        layout.put_blob(&d, index).unwrap();
        db.lock()
            .unwrap()
            .set_unpacked(layer.as_str(), Some(d.as_str()))
            .unwrap();
        (layout, db)
    }

    fn image(db: &Mutex<Catalogue>) -> ImageRecord {
        db.lock().unwrap().list_images().unwrap().remove(0)
    }

    #[test]
    fn a_push_tells_the_learned_list_where_its_files_lie_through_the_shared_index() {
        let dir = tempfile::tempdir().unwrap();
        let (gz, index) = indexed_layer(dir.path());
        let layer = Digest::of(&gz);
        let (layout, db) = indexed_store(&dir.path().join("a"), &gz, &index);
        // No list: nothing to tell.
        assert!(
            bundle(&layout, &image(&db))
                .unwrap()
                .unwrap()
                .learned
                .is_none()
        );
        let file = |path: &str| crate::learned::LearnedFile {
            layer: layer.to_string(),
            path: path.into(),
        };
        let list = crate::learned::LearnedList {
            version: 1,
            image: image(&db).manifest_digest,
            recorded_at: 1,
            files: vec![file("c"), file("b"), file("not/there")],
            ranges: Default::default(),
            index: None,
        };
        crate::learned::save(&layout, &list).unwrap();
        let shared = bundle(&layout, &image(&db)).unwrap().unwrap();
        let told = shared.learned.unwrap();
        let ranges = &told.ranges[layer.as_str()];
        assert!(!ranges.toc_tail);
        assert_eq!(ranges.size, gz.len() as u64);
        let windows = ranges.windows.as_ref().unwrap();
        assert_eq!(windows.digest, Digest::of(&shared.windows).to_string());
        assert_eq!(windows.size, shared.windows.len() as u64);
        // As the other node reads the files: every chunk of c and b from a range fetched
        // ahead, its window from a window range fetched before that range.
        let bytes = decompress_bounded(&shared.bundle).unwrap();
        let bundled: Bundle = serde_json::from_slice(&bytes).unwrap();
        let (entries, ra) =
            ltar::decode_index_with(bundled.indexes[0].get().as_bytes(), &Limits::default())
                .unwrap();
        let lazy = ra.unwrap().lazy_entries(&entries);
        let order = ranges.fetch_order(&layer);
        let place = |d: &Digest, s: u64, e: u64| {
            order
                .iter()
                .position(|(x, a, b)| x == d && *a <= s && e <= *b)
        };
        let wd = Digest::of(&shared.windows);
        let mut chunks = 0;
        for e in lazy.iter().filter(|e| e.path == "b" || e.path == "c") {
            for c in &e.chunks {
                let at = place(&layer, c.offset, c.end().unwrap()).expect("a range holds it");
                if let Some(w) = c.resume().unwrap().window_ref {
                    let wat = place(&wd, w.offset, w.offset + u64::from(w.len))
                        .expect("a window range holds its window");
                    assert!(wat < at, "the window comes first");
                }
                chunks += 1;
            }
        }
        assert!(chunks >= 4, "{chunks}");
        // The list read back from its file is the same (a list with ranges through windows is
        // valid), and the files' order is kept.
        let manifest = Digest::parse(&told.image).unwrap();
        assert_eq!(
            crate::learned::LearnedList::decode(&told.encode(), &manifest).unwrap(),
            told
        );
        assert_eq!(told.files, list.files);
    }

    #[test]
    fn a_bundle_is_taken_for_its_image_and_refused_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let (gz, index) = indexed_layer(dir.path());
        let layer = Digest::of(&gz);
        // The first node: its layer has the index.
        let (a_layout, a_db) = indexed_store(&dir.path().join("a"), &gz, &index);
        // Without the layer's blob here, the windows are shared whole; with it, the bytes no
        // read uses are zeroed (every read below decodes through them).
        let whole = bundle(&a_layout, &image(&a_db)).unwrap().unwrap();
        a_layout.put_blob(&layer, &gz).unwrap();
        let shared = bundle(&a_layout, &image(&a_db)).unwrap().unwrap();
        assert!(
            shared.windows.len() < whole.windows.len(),
            "{} < {}",
            shared.windows.len(),
            whole.windows.len()
        );
        assert_eq!(shared.layers, 1);
        let bytes = shared.bundle;
        assert!(!shared.windows.is_empty());
        assert!(
            bytes.len() + shared.windows.len() < index.len(),
            "compressed"
        );
        let wd = Digest::of(&shared.windows);
        let w = Some((&wd, shared.windows.len() as u64));

        // Another node takes it, once, and only with the artifact's windows blob.
        let (b_layout, b_db) = store(&dir.path().join("b"), &layer, gz.len() as u64);
        assert_eq!(
            take_bundle(&b_layout, &b_db, &image(&b_db), &bytes, None),
            Ok(0)
        );
        let other = Digest::of(b"other windows");
        assert_eq!(
            take_bundle(
                &b_layout,
                &b_db,
                &image(&b_db),
                &bytes,
                Some((&other, shared.windows.len() as u64))
            ),
            Ok(0)
        );
        assert_eq!(
            take_bundle(&b_layout, &b_db, &image(&b_db), &bytes, w),
            Ok(1)
        );
        let rec = image(&b_db).layers.remove(0);
        let (_, taken, _) = layer_index(&b_layout, &rec).unwrap();
        // The layer records which bundle it came in (a list learned here names it).
        let named: crate::learned::SharedIndex = serde_json::from_str(
            &b_db
                .lock()
                .unwrap()
                .index_bundle(&rec.digest)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(named.bundle, Digest::of(&bytes).to_string());
        assert_eq!(named.bundle_size, bytes.len() as u64);
        assert_eq!(named.windows, Some(wd.to_string()));
        assert_eq!(named.windows_size, shared.windows.len() as u64);
        assert_eq!(
            take_bundle(&b_layout, &b_db, &image(&b_db), &bytes, w),
            Ok(0)
        );
        // Its windows are apart; each read decodes with the window sliced from the blob.
        let (entries, ra) = ltar::decode_index_with(&taken, &Limits::default()).unwrap();
        let ra = ra.unwrap();
        assert!(ra.windows_apart());
        assert_eq!(ra.windows, Some((wd.clone(), shared.windows.len() as u64)));
        let (_, original) = ltar::decode_index_with(&index, &Limits::default()).unwrap();
        let original = original.unwrap();
        let mut read = 0;
        for e in ra.lazy_entries(&entries) {
            for c in &e.chunks {
                let p = c.resume().unwrap();
                let window = p.window_ref.map(|r| {
                    &shared.windows[r.offset as usize..(r.offset + u64::from(r.len)) as usize]
                });
                let compressed = &gz[c.offset as usize..c.end().unwrap() as usize];
                crate::layer::index::decode_chunk_with(compressed, c, window).unwrap();
                if window.is_some() {
                    read += 1;
                    // Without the window, or with another one, it does not decode.
                    assert!(crate::layer::index::decode_chunk_with(compressed, c, None).is_err());
                    let i = original.points.iter().position(|o| o.out == p.out).unwrap();
                    let wrong = original.points[(i + 1) % original.points.len()]
                        .window
                        .clone();
                    assert!(
                        crate::layer::index::decode_chunk_with(compressed, c, Some(&wrong))
                            .is_err()
                    );
                }
            }
        }
        assert!(read > 0, "some read starts from a window");
        // The node that took it does not publish it again.
        assert!(bundle(&b_layout, &image(&b_db)).is_err());
        // Unpacked here with its own index, the layer no longer goes through the bundle; with
        // the same index, it still does.
        let db = b_db.lock().unwrap();
        db.set_unpacked(&rec.digest, rec.index_digest.as_deref())
            .unwrap();
        assert!(db.index_bundle(&rec.digest).unwrap().is_some());
        db.set_unpacked(&rec.digest, Some(&Digest::of(b"own").to_string()))
            .unwrap();
        assert_eq!(db.index_bundle(&rec.digest).unwrap(), None);
        drop(db);

        // A node whose layer has another size takes nothing.
        let (c_layout, c_db) = store(&dir.path().join("c"), &layer, gz.len() as u64 + 1);
        assert_eq!(
            take_bundle(&c_layout, &c_db, &image(&c_db), &bytes, w),
            Ok(0)
        );
        assert_eq!(image(&c_db).layers[0].index_digest, None);

        // Not zstd, not a bundle, another subject, an index edited: refused or ignored.
        let (e_layout, e_db) = store(&dir.path().join("e"), &layer, gz.len() as u64);
        let img = image(&e_db);
        assert!(take_bundle(&e_layout, &e_db, &img, b"{}", w).is_err());
        let z = |v: &[u8]| zstd::bulk::compress(v, 3).unwrap();
        assert!(take_bundle(&e_layout, &e_db, &img, &z(b"[1]"), w).is_err());
        let json = String::from_utf8(zstd::bulk::decompress(&bytes, 64 << 20).unwrap()).unwrap();
        let other = json.replace(&img.manifest_digest, &Digest::of(b"other").to_string());
        assert!(take_bundle(&e_layout, &e_db, &img, &z(other.as_bytes()), w).is_err());
        // A checkpoint past the end of the blob, a file past the end of the stream, a window
        // past the end of the windows blob.
        for (field, bad) in [
            ("\"in\":", "\"in\":99999999999"),
            ("\"offset\":", "\"offset\":99999999999"),
            ("\"w\":[", "\"w\":[99999999999"),
        ] {
            assert!(json.contains(field), "{field}");
            let edited = json.replacen(field, bad, 1);
            assert_eq!(
                take_bundle(&e_layout, &e_db, &img, &z(edited.as_bytes()), w),
                Ok(0),
                "{field}"
            );
        }
        assert_eq!(image(&e_db).layers[0].index_digest, None);
    }
}
