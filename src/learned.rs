//! Learned start-up prefetch. Most eStargz images carry no prefetch landmark, so nothing says
//! which files a container's start reads. lazypull learns it: the first time containerd
//! prepares an image's layers as remote snapshots and no layer has a landmark, a recording
//! session (`fs::record`) notes every regular file first opened in those layers, in order,
//! until opens go quiet (`fetch.learn.quiet`), the window ends (`fetch.learn.window`) or the
//! list is full (`fetch.learn.max_files`). The list is kept in the store per image manifest
//! digest (`learned/sha256/<hex>.json`, kept across prunes of the image). At every later
//! remote preparation of that image (a cold start: after a prune, or on a node provisioned
//! from the same store) each layer is loaded at once and its listed files are prefetched in
//! that order, beside the container's own reads (see `LayerTable::start_prefetch`).
//!
//! Lists are untrusted input (the store may be copied between nodes, and later shared through
//! the registry): bounded and validated when read; files the image lacks are skipped.

use crate::config::LearnConfig;
use crate::fs::record::Recorder;
use crate::oci::Digest;
use crate::store::{Catalogue, ImageRecord, Layout, locked as lock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Files one list holds at most.
pub const MAX_FILES: usize = 10_000;
/// Longest path in a list.
const MAX_PATH: usize = 4096;
/// Largest list file read.
const MAX_LIST_BYTES: u64 = 16 << 20;
const VERSION: u32 = 1;
/// A recording that saw no open at all for this long is dropped (the image was prepared but
/// no container started).
const GIVE_UP: Duration = Duration::from_secs(600);
/// How often a recording is looked at.
const POLL: Duration = Duration::from_millis(100);
/// Lists looked through for a layer's ranges when its image is not in the catalogue.
const MAX_LISTS_SCANNED: usize = 1024;
/// Looking for a shared list in the registry gives up after this (the start goes on without).
const REMOTE_WAIT: Duration = Duration::from_secs(5);

/// The files an image's start read, first opens first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedList {
    pub version: u32,
    /// The image's manifest digest.
    pub image: String,
    /// When it was recorded (seconds since the epoch).
    pub recorded_at: i64,
    pub files: Vec<LearnedFile>,
    /// Per layer digest, the byte ranges of the blob that hold the listed files: fetched as
    /// soon as containerd prepares the layer, before its TOC is in (`registry::early`). Lists
    /// recorded before there were ranges have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ranges: BTreeMap<String, LayerRanges>,
    /// The shared random-access index of the image's plain layers that `ranges` go through
    /// (written by `lazypull index push`): a pull takes it by digest, fetched ahead with the
    /// ranges, without looking it up through the referrers API first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<SharedIndex>,
}

/// An image's shared index bundle and its windows blob, as `lazypull index push` published
/// them (`crate::index_share`): digests and sizes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedIndex {
    pub bundle: String,
    pub bundle_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<String>,
    #[serde(default)]
    pub windows_size: u64,
}

impl SharedIndex {
    /// The bundle `bundle` (its compressed bytes, as published) with its windows blob
    /// (digest, size).
    pub fn of(bundle: &[u8], windows: Option<(&Digest, u64)>) -> Self {
        SharedIndex {
            bundle: Digest::of(bundle).to_string(),
            bundle_size: bundle.len() as u64,
            windows: windows.map(|(d, _)| d.to_string()),
            windows_size: windows.map_or(0, |(_, n)| n),
        }
    }

    /// The bundle's digest, the windows blob's (digest, size); `None` if a digest is bad.
    pub fn parts(&self) -> Option<(Digest, Option<(Digest, u64)>)> {
        let bundle = Digest::parse(&self.bundle).ok()?;
        let windows = match &self.windows {
            Some(w) => Some((Digest::parse(w).ok()?, self.windows_size)),
            None => None,
        };
        Some((bundle, windows))
    }
}

/// Where a layer's listed files lie in its blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRanges {
    /// The blob's size.
    pub size: u64,
    /// An eStargz layer: its TOC is read from the blob's tail ([`crate::fetch::toc_tail`]),
    /// which is fetched first.
    #[serde(default)]
    pub toc_tail: bool,
    /// `[start, end)` byte ranges, in the order the start needs them.
    pub spans: Vec<[u64; 2]>,
    /// A plain layer read through a shared gzip index whose checkpoint windows are kept
    /// apart: the windows that decode `spans`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<WindowRanges>,
}

/// Where the checkpoint windows that decode a layer's listed ranges lie in the windows blob of
/// the layer's shared index (same repository).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowRanges {
    /// The windows blob's digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// `[start, end, before]`: bytes `[start, end)` of the windows blob, fetched right before
    /// the layer's range `spans[before]`, the first that needs them.
    pub spans: Vec<[u64; 3]>,
}

impl LayerRanges {
    /// What to fetch ahead of layer `layer`'s TOC, in order: the TOC's tail, then the spans,
    /// each after the windows that decode it.
    pub fn fetch_order(&self, layer: &Digest) -> Vec<(Digest, u64, u64)> {
        let tail = (self.toc_tail && self.size >= crate::layer::estargz::FOOTER_SIZE)
            .then(|| crate::fetch::toc_tail(self.size))
            .map(|(at, len)| (layer.clone(), at, at + len));
        let windows = self
            .windows
            .as_ref()
            .and_then(|w| Some((Digest::parse(&w.digest).ok()?, &w.spans)));
        let mut out: Vec<(Digest, u64, u64)> = tail.into_iter().collect();
        for (i, [s, e]) in self.spans.iter().enumerate() {
            if let Some((d, spans)) = &windows {
                out.extend(
                    spans
                        .iter()
                        .filter(|[_, _, before]| *before == i as u64)
                        .map(|[ws, we, _]| (d.clone(), *ws, *we)),
                );
            }
            out.push((layer.clone(), *s, *e));
        }
        out
    }
}

/// The chunks of the files `paths` of a layer whose entries are `entries`, in the order of
/// `paths` (paths the layer lacks are skipped).
pub fn listed_chunks<'a>(
    entries: &'a [crate::layer::index::Entry],
    paths: &[String],
) -> Vec<&'a crate::layer::index::Chunk> {
    let by_path: std::collections::HashMap<&str, &crate::layer::index::Entry> =
        entries.iter().map(|e| (e.path.as_str(), e)).collect();
    paths
        .iter()
        .filter_map(|p| by_path.get(p.as_str()))
        .flat_map(|e| e.chunks.iter())
        .collect()
}

/// Where the chunks of a layer's listed files lie (`chunks`, in list order; `span`: a chunk's
/// compressed bytes, from where its decoding starts): the ranges, neighbours merged as the
/// start-up prefetch merges them, so that its requests start inside them; and for a layer
/// read through checkpoints whose windows are kept apart in blob `windows` (digest, size),
/// the windows that decode them.
pub fn ranges_of(
    size: u64,
    toc_tail: bool,
    chunks: &[&crate::layer::index::Chunk],
    span: impl Fn(&crate::layer::index::Chunk) -> (u64, u64),
    windows: Option<&(Digest, u64)>,
) -> LayerRanges {
    let spans = crate::access::reader::prefetch_runs(chunks.iter().map(|c| span(c)).collect());
    let windows = windows.map(|(blob, len)| WindowRanges {
        digest: blob.to_string(),
        size: *len,
        spans: crate::access::reader::prefetch_windows(
            &spans,
            chunks
                .iter()
                .filter_map(|c| Some((span(c), c.resume()?.window_ref?))),
        ),
    });
    LayerRanges {
        size,
        toc_tail,
        spans: spans.into_iter().map(|(s, e)| [s, e]).collect(),
        windows,
    }
}

/// A regular file of a layer: the layer's digest and the file's path in the layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedFile {
    pub layer: String,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LearnedError {
    #[error("learned list {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("learned list {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

impl LearnedList {
    /// Parse and validate a list that claims to belong to image `manifest`.
    pub fn decode(bytes: &[u8], manifest: &Digest) -> Result<Self, String> {
        let list: LearnedList = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if list.version != VERSION {
            return Err(format!(
                "version {} (this lazypull reads {VERSION})",
                list.version
            ));
        }
        if list.image != manifest.as_str() {
            return Err(format!(
                "it is the list of {}, not of {manifest}",
                list.image
            ));
        }
        if list.files.len() > MAX_FILES {
            return Err(format!("{} files, more than {MAX_FILES}", list.files.len()));
        }
        for f in &list.files {
            Digest::parse(&f.layer).map_err(|e| format!("layer {:?}: {e}", f.layer))?;
            let bad = f.path.is_empty()
                || f.path.len() > MAX_PATH
                || f.path.contains('\0')
                || f.path.starts_with('/')
                || f.path.split('/').any(|c| c == "..");
            if bad {
                return Err(format!("bad path {:?}", f.path));
            }
        }
        for (layer, r) in &list.ranges {
            Digest::parse(layer).map_err(|e| format!("ranges of layer {layer:?}: {e}"))?;
            if r.spans.len() > MAX_FILES {
                return Err(format!("{} ranges in layer {layer}", r.spans.len()));
            }
            if let Some([s, e]) = r.spans.iter().find(|[s, e]| s >= e || *e > r.size) {
                return Err(format!(
                    "range [{s}, {e}) of layer {layer} is empty or past its {} bytes",
                    r.size
                ));
            }
            if let Some(w) = &r.windows {
                Digest::parse(&w.digest).map_err(|e| format!("windows of layer {layer:?}: {e}"))?;
                if w.spans.len() > MAX_FILES {
                    return Err(format!("{} window ranges in layer {layer}", w.spans.len()));
                }
                let bad = |[s, e, before]: &&[u64; 3]| {
                    s >= e || *e > w.size || *before >= r.spans.len() as u64
                };
                if let Some([s, e, before]) = w.spans.iter().find(bad) {
                    return Err(format!(
                        "window range [{s}, {e}) before range {before} of layer {layer} is empty, past the windows' {} bytes or before no range",
                        w.size
                    ));
                }
            }
        }
        if let Some(index) = &list.index {
            if index.parts().is_none() {
                return Err(format!("bad digest in its shared index {index:?}"));
            }
            if index.bundle_size == 0
                || index.bundle_size > crate::index_share::MAX_BUNDLE_BYTES as u64
            {
                return Err(format!(
                    "its shared index bundle of {} bytes",
                    index.bundle_size
                ));
            }
        }
        Ok(list)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The listed paths of layer `layer`, in order.
    pub fn paths_of(&self, layer: &str) -> Vec<String> {
        self.files
            .iter()
            .filter(|f| f.layer == layer)
            .map(|f| f.path.clone())
            .collect()
    }

    /// Listed files per layer digest.
    pub fn per_layer(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for f in &self.files {
            *m.entry(f.layer.clone()).or_default() += 1;
        }
        m
    }
}

/// The list of image `manifest` in the store, if there is one.
pub fn load(layout: &Layout, manifest: &Digest) -> Result<Option<LearnedList>, LearnedError> {
    let path = layout.learned(manifest);
    let io = |source| LearnedError::Io {
        path: path.clone(),
        source,
    };
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = vec![];
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_LIST_BYTES + 1), &mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_LIST_BYTES {
        return Err(LearnedError::Invalid {
            path,
            reason: format!("larger than {MAX_LIST_BYTES} bytes"),
        });
    }
    LearnedList::decode(&bytes, manifest)
        .map(Some)
        .map_err(|reason| LearnedError::Invalid { path, reason })
}

/// Store a list (temp file, fsync, rename: a crash leaves the old list or the new one).
pub fn save(layout: &Layout, list: &LearnedList) -> Result<PathBuf, LearnedError> {
    let manifest = Digest::parse(&list.image).map_err(|e| LearnedError::Invalid {
        path: layout.learned_dir(),
        reason: e.to_string(),
    })?;
    let dir = layout.learned_dir();
    let path = layout.learned(&manifest);
    let tmp = dir.join(format!(".tmp-{}-{}", manifest.hex(), std::process::id()));
    let res = (|| {
        std::fs::create_dir_all(&dir)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&list.encode())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        crate::store::sync_dir(&dir)
    })();
    if let Err(source) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(LearnedError::Io { path, source });
    }
    Ok(path)
}

/// Remove the list of image `manifest`; whether there was one.
pub fn forget(layout: &Layout, manifest: &Digest) -> Result<bool, LearnedError> {
    let path = layout.learned(manifest);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(LearnedError::Io { path, source }),
    }
}

/// What tells a start of `image` which files to fetch first, for `lazypull status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StartPrefetch {
    /// A converter's landmark in the TOC of these layers (digest → files before it).
    Landmark {
        layers: BTreeMap<String, u64>,
    },
    /// A list learned from an earlier start.
    Learned {
        files: usize,
        recorded_at: i64,
        layers: BTreeMap<String, usize>,
    },
    /// The learned list is unusable.
    Refused {
        reason: String,
    },
    None,
}

impl StartPrefetch {
    pub fn of(layout: &Layout, image: &ImageRecord) -> StartPrefetch {
        let landmarks: BTreeMap<String, u64> = image
            .layers
            .iter()
            .filter_map(|l| Some((l.digest.clone(), l.landmark_files?)))
            .collect();
        if !landmarks.is_empty() {
            return StartPrefetch::Landmark { layers: landmarks };
        }
        let Ok(manifest) = Digest::parse(&image.manifest_digest) else {
            return StartPrefetch::None;
        };
        match load(layout, &manifest) {
            Ok(Some(list)) => StartPrefetch::Learned {
                files: list.files.len(),
                recorded_at: list.recorded_at,
                layers: list.per_layer(),
            },
            Ok(None) => StartPrefetch::None,
            Err(e) => StartPrefetch::Refused {
                reason: e.to_string(),
            },
        }
    }
}

/// The artifact type (and blob media type) of a learned list shared through the registry.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazypull.learned.v1+json";

/// Where the image's artifacts go (its repository) and what they attach to (its manifest).
pub(crate) fn subject_of(
    layout: &Layout,
    image: &ImageRecord,
) -> Result<(crate::oci::Reference, crate::artifact::Subject), String> {
    let digest = Digest::parse(&image.manifest_digest).map_err(|e| e.to_string())?;
    let repo = crate::fetch::source_reference(&image.source, &digest)
        .ok_or_else(|| format!("bad image source {:?}", image.source))?;
    let size = layout
        .read_blob(&digest)
        .map_err(|e| format!("the image manifest: {e}"))?
        .len() as u64;
    Ok((
        repo,
        crate::artifact::Subject {
            media_type: image.media_type.clone(),
            digest,
            size,
        },
    ))
}

/// Publish the image's list next to it in its registry; the artifact manifest's digest.
pub async fn push(
    registry: &crate::registry::Registry,
    layout: &Layout,
    image: &ImageRecord,
    list: &LearnedList,
    creds: &crate::registry::OpCreds,
) -> Result<Digest, String> {
    let (repo, subject) = subject_of(layout, image)?;
    crate::artifact::attach(
        registry,
        &repo,
        &subject,
        ARTIFACT_TYPE,
        vec![(ARTIFACT_TYPE, list.encode())],
        creds,
    )
    .await
    .map_err(|e| e.to_string())
}

/// The newest list another node published for the image, verified and validated; kept in the
/// store when found.
pub async fn fetch_shared(
    registry: &crate::registry::Registry,
    layout: &Layout,
    image: &ImageRecord,
    creds: &crate::registry::OpCreds,
) -> Result<Option<LearnedList>, String> {
    let (repo, subject) = subject_of(layout, image)?;
    let Some(crate::artifact::Fetched {
        digest: artifact,
        blob: bytes,
        ..
    }) = crate::artifact::fetch_newest(
        registry,
        &repo,
        &subject.digest,
        ARTIFACT_TYPE,
        ARTIFACT_TYPE,
        MAX_LIST_BYTES as usize,
        creds,
    )
    .await
    .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let list = LearnedList::decode(&bytes, &subject.digest)
        .map_err(|e| format!("the shared list {artifact}: {e}"))?;
    save(layout, &list).map_err(|e| e.to_string())?;
    Ok(Some(list))
}

/// The shared index bundle the ranges of `list` go through: the one this node took the
/// indexes of the list's layers from (a node with the list takes it by digest, fetched ahead
/// with the ranges, instead of looking it up). `None` when no ranged layer was read through a
/// shared index.
fn bundle_named(db: &Catalogue, list: &LearnedList) -> Option<SharedIndex> {
    list.ranges.keys().find_map(|layer| {
        let json = db.index_bundle(layer).ok().flatten()?;
        serde_json::from_str::<SharedIndex>(&json)
            .ok()
            .filter(|b| b.parts().is_some())
    })
}

/// Where start-up prefetch of a layer runs: the FUSE mount's layer table.
pub trait Prefetch: Send + Sync {
    /// Load layer `hex` now and prefetch its landmark files and then `paths`, in order.
    /// `None` when the layer cannot be mounted.
    fn start(&self, hex: &str, paths: &[String]) -> Option<usize>;

    /// Where the files `paths` of layer `hex` lie in its blob (a layer read through its TOC;
    /// `None` for others).
    fn ranges(&self, hex: &str, paths: &[String]) -> Option<LayerRanges>;
}

impl Prefetch for crate::fs::layers::LayerTable {
    fn start(&self, hex: &str, paths: &[String]) -> Option<usize> {
        self.start_prefetch(hex, paths)
    }

    fn ranges(&self, hex: &str, paths: &[String]) -> Option<LayerRanges> {
        self.learned_spans(hex, paths)
    }
}

/// Learns and replays start-up reads (see the module documentation).
pub struct Learner {
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    /// Looks for lists other nodes shared (`fetch.learn.remote`).
    registry: Option<Arc<crate::registry::Registry>>,
    /// Fetches a layer's listed ranges ahead of its TOC.
    early: Arc<crate::registry::early::EarlyBlobs>,
    /// Images whose shared list was looked for (each once per run); the lock is held while
    /// one is looked for, so the other layers of that image wait for the answer.
    looked_up: Mutex<std::collections::HashMap<String, Arc<Mutex<bool>>>>,
    recorder: Arc<Recorder>,
    prefetch: Arc<dyn Prefetch>,
    opts: LearnConfig,
    rt: tokio::runtime::Handle,
    /// Images (manifest digests) being recorded now, and their recording sessions.
    learning: Mutex<std::collections::HashMap<String, u64>>,
}

impl Learner {
    pub fn new(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        registry: Option<Arc<crate::registry::Registry>>,
        early: Arc<crate::registry::early::EarlyBlobs>,
        recorder: Arc<Recorder>,
        prefetch: Arc<dyn Prefetch>,
        opts: LearnConfig,
    ) -> Arc<Self> {
        Arc::new(Learner {
            layout,
            db,
            registry: registry.filter(|_| opts.remote),
            early,
            looked_up: Mutex::default(),
            recorder,
            prefetch,
            opts,
            rt: tokio::runtime::Handle::current(),
            learning: Mutex::default(),
        })
    }

    /// containerd prepared layer `layer` of image `image_ref` as a remote snapshot (a cold
    /// start of the image is under way): start the layer's prefetch in the background, and
    /// record the start if nothing says what it reads.
    pub fn layer_prepared(self: &Arc<Self>, image_ref: &str, layer: &Digest) {
        let (this, image_ref, layer) = (Arc::clone(self), image_ref.to_string(), layer.clone());
        self.rt
            .spawn_blocking(move || this.prepared(&image_ref, &layer));
    }

    /// containerd asks for layer `layer` of image `image_ref` as a remote snapshot and its TOC
    /// is not here: when a learned list knows where the start's files lie in that layer, fetch
    /// those ranges (and the TOC's tail) now, while the image and the TOC are still being
    /// fetched, instead of once the layer is mounted (see `registry::early`).
    pub fn fetch_ahead(self: &Arc<Self>, image_ref: &str, layer: &Digest) {
        if !self.opts.enabled {
            return;
        }
        let (this, image_ref, layer) = (Arc::clone(self), image_ref.to_string(), layer.clone());
        self.rt.spawn_blocking(move || {
            if let Some(list) = this.list_with_ranges(&image_ref, &layer) {
                this.fetch_ranges(&image_ref, &layer, &list);
            }
        });
    }

    /// The snapshotter pulled image `image_ref` (manifest and config) for a Prepare of layer
    /// `layer`: with no list of its own, look for one another node shared now, beside the TOC
    /// fetch, rather than once the layer is served, and fetch its ranges of the layer ahead.
    /// The lookup is the one of [`Learner::layer_prepared`] (once per image and run): that
    /// finds the list in the store.
    pub fn image_pulled(self: &Arc<Self>, image_ref: &str, layer: &Digest) {
        if !self.opts.enabled || self.registry.is_none() {
            return;
        }
        let (this, image_ref, layer) = (Arc::clone(self), image_ref.to_string(), layer.clone());
        self.rt.spawn_blocking(move || {
            let Ok(Some(image)) = crate::images::resolve_in(&lock(&this.db), &image_ref) else {
                return;
            };
            if image.layers.iter().any(|l| l.landmark_files.is_some())
                || this.list_of(&image).is_some()
            {
                return;
            }
            if let Some(list) = this.shared_list_of(&image) {
                this.fetch_ranges(&image_ref, &layer, &list);
            }
        });
    }

    /// Fetch the ranges of `layer` that `list` holds, ahead of the layer's TOC.
    fn fetch_ranges(&self, image_ref: &str, layer: &Digest, list: &LearnedList) {
        let Some(ranges) = list.ranges.get(layer.as_str()) else {
            return;
        };
        let Ok(r) = crate::oci::parse_reference(image_ref) else {
            return;
        };
        let Some(reference) = crate::fetch::source_reference(&crate::oci::repo_name(&r), layer)
        else {
            return;
        };
        let creds = crate::registry::OpCreds {
            request: None,
            persisted: crate::fetch::persisted_secret(&self.db, reference.registry()),
        };
        let mut spans = ranges.fetch_order(layer);
        if let Some(index) = &list.index
            && let Some((bundle, _)) = index.parts()
        {
            // The index the ranges go through, first: the pull takes it by digest.
            spans.insert(0, (bundle, 0, index.bundle_size));
        }
        let _rt = self.rt.enter();
        let bytes = self.early.fetch_in_order(reference, &spans, creds);
        if bytes > 0 {
            tracing::info!(layer = %layer, image = %image_ref, list = %list.image, ranges = spans.len(), bytes,
                "fetching the ranges a previous start read, ahead of the layer's TOC");
        }
    }

    /// The ranges of `layer` a learned list holds: the list of image `image_ref` if the
    /// catalogue knows it, else the newest list with ranges for that layer (the image was
    /// pruned, or the store was provisioned with its lists). Returns the list's image too.
    fn list_with_ranges(&self, image_ref: &str, layer: &Digest) -> Option<LearnedList> {
        let known = lock(&self.db)
            .layer(layer.as_str())
            .ok()
            .flatten()
            .is_some_and(|l| l.mountable() || l.state == crate::store::LayerState::Complete);
        if known {
            return None;
        }
        if let Ok(Some(image)) = crate::images::resolve_in(&lock(&self.db), image_ref)
            && let Some(list) = self.list_of(&image)
        {
            return list.ranges.contains_key(layer.as_str()).then_some(list);
        }
        let dir = std::fs::read_dir(self.layout.learned_dir()).ok()?;
        let mut best: Option<LearnedList> = None;
        for entry in dir.flatten().take(MAX_LISTS_SCANNED) {
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(manifest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            let Ok(Some(list)) = load(&self.layout, &manifest) else {
                continue;
            };
            if list.ranges.contains_key(layer.as_str())
                && best
                    .as_ref()
                    .is_none_or(|b| list.recorded_at > b.recorded_at)
            {
                best = Some(list);
            }
        }
        best
    }

    fn prepared(self: &Arc<Self>, image_ref: &str, layer: &Digest) {
        let image = match crate::images::resolve_in(&lock(&self.db), image_ref) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(image = %image_ref, error = %e, "cannot look the image up for start-up prefetch");
                None
            }
        };
        // A landmark says it all; with learning off, that is all there is.
        let Some(image) = image
            .filter(|i| self.opts.enabled && i.layers.iter().all(|l| l.landmark_files.is_none()))
        else {
            let _ = self.prefetch.start(layer.hex(), &[]);
            return;
        };
        if let Some(list) = self.list_of(&image) {
            let _ = self
                .prefetch
                .start(layer.hex(), &list.paths_of(layer.as_str()));
            return;
        }
        // Nothing known here: load the layer and record this start at once, then ask the
        // registry whether another node shared what the start reads.
        if self.prefetch.start(layer.hex(), &[]).is_none() {
            return;
        }
        self.learn(&image);
        if let Some(shared) = self.shared_list_of(&image) {
            self.stop_learning(&image);
            let _ = self
                .prefetch
                .start(layer.hex(), &shared.paths_of(layer.as_str()));
        }
    }

    /// Drop the recording of `image`'s start (a shared list arrived instead).
    fn stop_learning(&self, image: &ImageRecord) {
        if let Some(id) = lock(&self.learning).remove(&image.manifest_digest) {
            self.recorder.stop(id);
        }
    }

    fn list_of(&self, image: &ImageRecord) -> Option<LearnedList> {
        let manifest = Digest::parse(&image.manifest_digest).ok()?;
        match load(&self.layout, &manifest) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(image = %manifest, error = %e, "learned list ignored");
                None
            }
        }
    }

    /// The list another node shared for `image`, looked for once per image and run (blocking:
    /// the caller is a `spawn_blocking` thread).
    fn shared_list_of(&self, image: &ImageRecord) -> Option<LearnedList> {
        let registry = self.registry.as_ref()?;
        let once = Arc::clone(
            lock(&self.looked_up)
                .entry(image.manifest_digest.clone())
                .or_default(),
        );
        let mut done = lock(&once);
        if *done {
            // Another layer's preparation looked; what it found is in the store.
            drop(done);
            return self.list_of(image);
        }
        *done = true;
        let reference = crate::fetch::source_reference(
            &image.source,
            &Digest::parse(&image.manifest_digest).ok()?,
        )?;
        let creds = crate::registry::OpCreds {
            request: None,
            persisted: crate::fetch::persisted_secret(&self.db, reference.registry()),
        };
        let started = Instant::now();
        let found = self.rt.block_on(tokio::time::timeout(
            REMOTE_WAIT,
            fetch_shared(registry, &self.layout, image, &creds),
        ));
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match found {
            Ok(Ok(Some(list))) => {
                tracing::info!(image = %image.manifest_digest, files = list.files.len(), elapsed_ms, "using the learned list another node shared in the registry");
                Some(list)
            }
            Ok(Ok(None)) => {
                tracing::debug!(image = %image.manifest_digest, elapsed_ms, "no shared learned list in the registry");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(image = %image.manifest_digest, error = %e, "shared learned list ignored");
                None
            }
            Err(_) => {
                tracing::warn!(image = %image.manifest_digest, "looking for a shared learned list timed out");
                None
            }
        }
    }

    /// Record the start of `image` (once at a time per image).
    fn learn(self: &Arc<Self>, image: &ImageRecord) {
        let Ok(manifest) = Digest::parse(&image.manifest_digest) else {
            return;
        };
        let id = {
            let mut learning = lock(&self.learning);
            if learning.contains_key(manifest.as_str()) {
                return;
            }
            let layers = image
                .layers
                .iter()
                .map(|l| l.digest.trim_start_matches("sha256:").to_string());
            let id = self.recorder.start_bounded(layers, self.opts.max_files);
            learning.insert(manifest.to_string(), id);
            id
        };
        tracing::info!(image = %manifest, "recording which files its start reads (no prefetch landmark, no learned list)");
        let this = Arc::clone(self);
        self.rt.spawn(async move {
            let files = this.record(id).await;
            {
                let mut learning = lock(&this.learning);
                if learning.get(manifest.as_str()) == Some(&id) {
                    learning.remove(manifest.as_str());
                }
            }
            let Some(files) = files else {
                tracing::info!(image = %manifest, "recording ended without a file read (or a shared list replaced it): nothing learned");
                return;
            };
            let mut list = LearnedList {
                version: VERSION,
                image: manifest.to_string(),
                recorded_at: chrono::Utc::now().timestamp(),
                files: files
                    .into_iter()
                    .map(|(layer, path)| LearnedFile {
                        layer: format!("sha256:{layer}"),
                        path,
                    })
                    .collect(),
                ranges: BTreeMap::new(),
                index: None,
            };
            let n = list.files.len();
            let layout = this.layout.clone();
            let prefetch = Arc::clone(&this.prefetch);
            let db = Arc::clone(&this.db);
            match tokio::task::spawn_blocking(move || {
                for layer in list.per_layer().into_keys() {
                    let paths = list.paths_of(&layer);
                    if let Some(r) = prefetch.ranges(layer.trim_start_matches("sha256:"), &paths) {
                        list.ranges.insert(layer, r);
                    }
                }
                list.index = bundle_named(&lock(&db), &list);
                save(&layout, &list)
            })
            .await
            {
                Ok(Ok(path)) => {
                    tracing::info!(image = %manifest, files = n, path = %path.display(), "learned the files its start reads: the next cold start prefetches them")
                }
                Ok(Err(e)) => tracing::warn!(image = %manifest, error = %e, "cannot keep the learned list"),
                Err(_) => {}
            }
        });
    }

    /// Wait for recording `id` to end; its files, or `None` when nothing was opened.
    async fn record(&self, id: u64) -> Option<Vec<(String, String)>> {
        let started = Instant::now();
        let mut first: Option<Instant> = None;
        loop {
            tokio::time::sleep(POLL).await;
            let (n, last, full) = self.recorder.progress(id)?;
            if n > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            let done = full
                || last.is_some_and(|t| t.elapsed() >= self.opts.quiet)
                || first.is_some_and(|t| t.elapsed() >= self.opts.window);
            if done {
                break;
            }
            if n == 0 && started.elapsed() >= GIVE_UP {
                self.recorder.stop(id);
                return None;
            }
        }
        self.recorder.stop(id).filter(|f| !f.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NameKind, NewImage, NewLayer};
    use std::path::Path;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn list(files: &[(&str, &str)]) -> LearnedList {
        LearnedList {
            version: VERSION,
            image: d('e').to_string(),
            recorded_at: 1,
            ranges: BTreeMap::new(),
            index: None,
            files: files
                .iter()
                .map(|(l, p)| LearnedFile {
                    layer: l.to_string(),
                    path: p.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn lists_round_trip_and_bad_ones_are_refused() {
        let a = d('a').to_string();
        let good = list(&[(&a, "usr/bin/python3"), (&a, "etc/ld.so.cache")]);
        assert_eq!(LearnedList::decode(&good.encode(), &d('e')).unwrap(), good);
        assert_eq!(good.paths_of(&a), ["usr/bin/python3", "etc/ld.so.cache"]);
        assert!(good.paths_of(&d('b').to_string()).is_empty());
        // Another image's list, another version, bad layers or paths.
        assert!(LearnedList::decode(&good.encode(), &d('d')).is_err());
        let mut v2 = good.clone();
        v2.version = 2;
        assert!(LearnedList::decode(&v2.encode(), &d('e')).is_err());
        for (l, p) in [
            ("sha256:short", "x"),
            (a.as_str(), ""),
            (a.as_str(), "/abs"),
            (a.as_str(), "a/../../etc/shadow"),
            (a.as_str(), "nul\0"),
        ] {
            assert!(
                LearnedList::decode(&list(&[(l, p)]).encode(), &d('e')).is_err(),
                "{l} {p:?}"
            );
        }
        let long = "x".repeat(MAX_PATH + 1);
        assert!(LearnedList::decode(&list(&[(&a, &long)]).encode(), &d('e')).is_err());
        let many: Vec<(&str, &str)> = (0..=MAX_FILES).map(|_| (a.as_str(), "f")).collect();
        assert!(LearnedList::decode(&list(&many).encode(), &d('e')).is_err());
        assert!(LearnedList::decode(b"{\"version\":1", &d('e')).is_err());
    }

    #[test]
    fn saved_lists_load_and_oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert!(load(&layout, &d('e')).unwrap().is_none());
        let l = list(&[(&d('a').to_string(), "bin/sh")]);
        save(&layout, &l).unwrap();
        assert_eq!(load(&layout, &d('e')).unwrap(), Some(l));
        std::fs::write(
            layout.learned(&d('e')),
            vec![b' '; MAX_LIST_BYTES as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            load(&layout, &d('e')),
            Err(LearnedError::Invalid { .. })
        ));
        assert!(forget(&layout, &d('e')).unwrap());
        assert!(!forget(&layout, &d('e')).unwrap());
    }

    /// Records what start-up prefetch was asked for.
    #[derive(Default)]
    struct FakePrefetch {
        calls: Mutex<Vec<(String, Vec<String>)>>,
    }

    impl Prefetch for FakePrefetch {
        fn start(&self, hex: &str, paths: &[String]) -> Option<usize> {
            lock(&self.calls).push((hex.to_string(), paths.to_vec()));
            Some(paths.len())
        }

        /// Layer 'b' is read through a TOC: its n-th listed file lies at [100 n, 100 n + 50).
        fn ranges(&self, hex: &str, paths: &[String]) -> Option<LayerRanges> {
            (hex == d('b').hex()).then(|| LayerRanges {
                size: 100_000,
                toc_tail: true,
                spans: (0..paths.len() as u64)
                    .map(|i| [100 * i, 100 * i + 50])
                    .collect(),
                windows: None,
            })
        }
    }

    fn catalogue(dir: &Path, landmark: bool) -> Arc<Mutex<Catalogue>> {
        let mut db = Catalogue::open(&dir.join("catalogue.db")).unwrap();
        let (id, m, la, lb) = (d('f'), d('e'), d('a'), d('b'));
        db.insert_image(&NewImage {
            id: &id,
            manifest_digest: &m,
            index_digest: None,
            media_type: "application/vnd.oci.image.manifest.v1+json",
            size: 1,
            user: "",
            source: "r.example/img",
            layers: [&la, &lb]
                .into_iter()
                .map(|l| NewLayer {
                    digest: l,
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
                    size: 10,
                    diff_id: l,
                    toc_digest: None,
                    toc_position: None,
                })
                .collect(),
            names: vec![("r.example/img:1".into(), NameKind::Tag)],
        })
        .unwrap();
        if landmark {
            db.set_toc(la.as_str(), 3, 5, Some(1)).unwrap();
        }
        Arc::new(Mutex::new(db))
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn learner(dir: &Path, landmark: bool) -> (Arc<Learner>, Arc<Recorder>, Arc<FakePrefetch>) {
        let (l, recorder, fake, _) = learner_with_blobs(dir, landmark);
        (l, recorder, fake)
    }

    fn learner_with_blobs(
        dir: &Path,
        landmark: bool,
    ) -> (
        Arc<Learner>,
        Arc<Recorder>,
        Arc<FakePrefetch>,
        Arc<crate::registry::seam::fake::FakeBlobs>,
    ) {
        let recorder = Arc::new(Recorder::default());
        let fake = Arc::new(FakePrefetch::default());
        let blobs = Arc::new(crate::registry::seam::fake::FakeBlobs::default());
        let l = Learner::new(
            Layout::new(dir),
            catalogue(dir, landmark),
            None,
            crate::registry::early::EarlyBlobs::new(Arc::clone(&blobs) as _),
            Arc::clone(&recorder),
            Arc::clone(&fake) as Arc<dyn Prefetch>,
            LearnConfig {
                enabled: true,
                remote: false,
                quiet: Duration::from_millis(300),
                window: Duration::from_secs(10),
                max_files: 100,
            },
        );
        (l, recorder, fake, blobs)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_start_is_recorded_and_the_next_prefetches_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (l, recorder, fake) = learner(dir.path(), false);
        let (a, b) = (d('a'), d('b'));
        l.layer_prepared("r.example/img:1", &a);
        l.layer_prepared("r.example/img:1", &b);
        wait_for("recording", || recorder.is_active()).await;
        wait_for("both layers prepared", || lock(&fake.calls).len() == 2).await;
        // The container's start: opens in both layers, one of another layer not watched.
        recorder.opened(b.hex(), "usr/bin/python3");
        recorder.opened(a.hex(), "lib/libc.so.6");
        recorder.opened(&"c".repeat(64), "elsewhere");
        recorder.opened(b.hex(), "usr/lib/python3.11/os.py");
        // Quiet: the list is saved.
        wait_for("the list", || {
            load(&Layout::new(dir.path()), &d('e')).unwrap().is_some()
        })
        .await;
        let saved = load(&Layout::new(dir.path()), &d('e')).unwrap().unwrap();
        assert_eq!(
            saved.paths_of(b.as_str()),
            ["usr/bin/python3", "usr/lib/python3.11/os.py"]
        );
        assert_eq!(saved.paths_of(a.as_str()), ["lib/libc.so.6"]);
        assert_eq!(saved.files.len(), 3);
        wait_for("the recording to end", || !recorder.is_active()).await;
        // Nothing was prefetched from a list the first time; the next start gets it in order.
        assert!(lock(&fake.calls).iter().all(|(_, p)| p.is_empty()));
        lock(&fake.calls).clear();
        l.layer_prepared("r.example/img:1", &b);
        wait_for("prefetch", || lock(&fake.calls).len() == 1).await;
        assert_eq!(
            lock(&fake.calls)[0],
            (
                b.hex().to_string(),
                vec![
                    "usr/bin/python3".to_string(),
                    "usr/lib/python3.11/os.py".to_string()
                ]
            )
        );
        // No new recording while a list exists.
        assert!(!recorder.is_active());
        let status = StartPrefetch::of(
            &Layout::new(dir.path()),
            &crate::images::resolve_in(&lock(&l.db), "r.example/img:1")
                .unwrap()
                .unwrap(),
        );
        assert!(
            matches!(&status, StartPrefetch::Learned { files: 3, layers, .. } if layers.len() == 2),
            "{status:?}"
        );
    }

    #[test]
    fn through_a_gzip_index_each_range_is_fetched_ahead_after_the_windows_that_decode_it() {
        let (layer, windows) = (d('b'), d('c'));
        let ranges = LayerRanges {
            size: 1_000_000,
            toc_tail: false,
            spans: vec![[500_000, 600_000], [0, 100_000], [800_000, 900_000]],
            windows: Some(WindowRanges {
                digest: windows.to_string(),
                size: 50_000,
                spans: vec![[10_000, 30_000, 0], [0, 5_000, 1]],
            }),
        };
        assert_eq!(
            ranges.fetch_order(&layer),
            [
                (windows.clone(), 10_000, 30_000),
                (layer.clone(), 500_000, 600_000),
                (windows.clone(), 0, 5_000),
                (layer.clone(), 0, 100_000),
                (layer.clone(), 800_000, 900_000),
            ]
        );
        let mut l = list(&[(layer.as_str(), "usr/bin/python3")]);
        l.ranges.insert(layer.to_string(), ranges.clone());
        let manifest = Digest::parse(&l.image).unwrap();
        assert_eq!(LearnedList::decode(&l.encode(), &manifest).unwrap(), l);
        // Refused whole: a window range past the windows blob, or before no range.
        for bad in [[40_000, 50_001, 0], [0, 10, 3], [7, 7, 0]] {
            let mut worse = l.clone();
            let r = worse.ranges.get_mut(layer.as_str()).unwrap();
            r.windows.as_mut().unwrap().spans.push(bad);
            assert!(
                LearnedList::decode(&worse.encode(), &manifest).is_err(),
                "{bad:?}"
            );
        }
        // Lists written before windows were kept read as before.
        let old = br#"{"version":1,"image":"IMG","recorded_at":0,"files":[],"ranges":{"LAYER":{"size":10,"spans":[[0,5]]}}}"#;
        let old = String::from_utf8_lossy(old)
            .replace("IMG", manifest.as_str())
            .replace("LAYER", layer.as_str());
        let read = LearnedList::decode(old.as_bytes(), &manifest).unwrap();
        assert_eq!(read.ranges[layer.as_str()].windows, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_list_keeps_where_its_files_lie_and_the_next_start_fetches_them_ahead_of_the_toc() {
        let dir = tempfile::tempdir().unwrap();
        let (l, recorder, _fake, blobs) = learner_with_blobs(dir.path(), false);
        let (a, b) = (d('a'), d('b'));
        blobs.add_as(&b, crate::registry::seam::fake::noise(100_000, 1));
        // Nothing learned yet: nothing fetched ahead.
        l.fetch_ahead("r.example/img:1", &b);
        l.layer_prepared("r.example/img:1", &b);
        wait_for("recording", || recorder.is_active()).await;
        recorder.opened(b.hex(), "usr/bin/python3");
        recorder.opened(a.hex(), "lib/libc.so.6");
        recorder.opened(b.hex(), "usr/lib/python3.11/os.py");
        let layout = Layout::new(dir.path());
        wait_for("the list", || load(&layout, &d('e')).unwrap().is_some()).await;
        let saved = load(&layout, &d('e')).unwrap().unwrap();
        assert_eq!(
            saved.ranges.get(b.as_str()).map(|r| r.spans.clone()),
            Some(vec![[0, 50], [100, 150]])
        );
        assert!(!saved.ranges.contains_key(a.as_str()), "layer a has no TOC");
        assert!(blobs.requests().is_empty());
        // The next cold start: the TOC's tail first, then the files' ranges.
        let (tail_at, _) = crate::fetch::toc_tail(100_000);
        l.fetch_ahead("r.example/img:1", &b);
        wait_for("the early fetch", || blobs.requests().len() == 3).await;
        let mut asked = blobs.requests();
        asked.sort();
        assert_eq!(
            asked,
            [
                (b.clone(), 0, 50),
                (b.clone(), 100, 150),
                (b.clone(), tail_at, 100_000)
            ]
        );
        // Found by layer too, when the image is not in the catalogue (pruned, or a store
        // provisioned with the lists): a new learner over an empty catalogue.
        let dir2 = tempfile::tempdir().unwrap();
        let (l2, _, _, blobs2) = learner_with_blobs(dir2.path(), false);
        std::fs::create_dir_all(Layout::new(dir2.path()).learned_dir()).unwrap();
        std::fs::copy(
            layout.learned(&d('e')),
            Layout::new(dir2.path()).learned(&d('e')),
        )
        .unwrap();
        lock(&l2.db).remove_image(d('f').as_str()).unwrap();
        blobs2.add_as(&b, crate::registry::seam::fake::noise(100_000, 1));
        l2.fetch_ahead("r.example/other:2", &b);
        wait_for("the early fetch by layer", || blobs2.requests().len() == 3).await;
        // A list that places a range past the layer's end is refused whole.
        let mut bad = saved.clone();
        bad.ranges
            .get_mut(b.as_str())
            .unwrap()
            .spans
            .push([99_990, 100_001]);
        assert!(LearnedList::decode(&bad.encode(), &d('e')).is_err());
    }

    #[test]
    fn a_list_names_the_bundle_its_layers_indexes_were_taken_from() {
        let dir = tempfile::tempdir().unwrap();
        let db = catalogue(dir.path(), false);
        let (a, b) = (d('a'), d('b'));
        let ranges = LayerRanges {
            size: 100_000,
            toc_tail: false,
            spans: vec![[0, 50]],
            windows: None,
        };
        let mut l = list(&[(a.as_str(), "x"), (b.as_str(), "y")]);
        l.ranges.insert(b.to_string(), ranges);
        // No layer read through a shared index: no bundle named.
        assert_eq!(bundle_named(&lock(&db), &l), None);
        let shared = SharedIndex {
            bundle: d('c').to_string(),
            bundle_size: 400,
            windows: Some(d('9').to_string()),
            windows_size: 7,
        };
        let json = serde_json::to_string(&shared).unwrap();
        // Layer a took one, but the list has no ranges of it: not named.
        assert!(
            lock(&db)
                .set_shared_index(a.as_str(), d('1').as_str(), &json)
                .unwrap()
        );
        assert_eq!(bundle_named(&lock(&db), &l), None);
        assert!(
            lock(&db)
                .set_shared_index(b.as_str(), d('2').as_str(), &json)
                .unwrap()
        );
        assert_eq!(bundle_named(&lock(&db), &l), Some(shared));
        // A bad record names nothing.
        lock(&db)
            .set_shared_index(
                b.as_str(),
                d('2').as_str(),
                "{\"bundle\":\"x\",\"bundle_size\":1}",
            )
            .unwrap();
        assert_eq!(bundle_named(&lock(&db), &l), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn images_with_a_landmark_are_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (l, recorder, fake) = learner(dir.path(), true);
        l.layer_prepared("r.example/img:1", &d('a'));
        wait_for("prefetch", || lock(&fake.calls).len() == 1).await;
        assert!(!recorder.is_active());
        let image = crate::images::resolve_in(&lock(&l.db), "r.example/img:1")
            .unwrap()
            .unwrap();
        assert!(matches!(
            StartPrefetch::of(&Layout::new(dir.path()), &image),
            StartPrefetch::Landmark { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unusable_list_is_ignored_and_learned_again() {
        let dir = tempfile::tempdir().unwrap();
        let (l, recorder, fake) = learner(dir.path(), false);
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.learned_dir()).unwrap();
        std::fs::write(layout.learned(&d('e')), b"{not json").unwrap();
        l.layer_prepared("r.example/img:1", &d('a'));
        wait_for("recording", || recorder.is_active()).await;
        assert_eq!(lock(&fake.calls)[0].1, Vec::<String>::new());
        recorder.opened(d('a').hex(), "bin/sh");
        wait_for("the new list", || {
            load(&layout, &d('e')).is_ok_and(|l| l.is_some())
        })
        .await;
    }
}
