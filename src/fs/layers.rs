//! The layer table of the FUSE mount: which layer has which index (the high half of its inode
//! numbers), loading a layer's verified TOC (or file index) from the store when first used, and
//! starting its start-up prefetch. Shared between the FUSE callbacks (`fuse.rs`) and the
//! start-up service (`crate::learned`), which loads layers while containerd is still preparing
//! the others.

use super::tree::Tree;
use crate::access::reader::{LazyLayer, Reader};
use crate::layer::estargz;
use crate::oci::Digest;
use crate::store::{Catalogue, LayerRecord, Layout, locked as lock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Why a layer cannot be mounted lazily (logged; the layer is then not in the mount).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("bad digest in the catalogue: {0}")]
    Record(#[from] crate::oci::OciError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("file index: {0}")]
    Index(#[from] crate::layer::tar::UnpackError),
    #[error("the index {0} gives no random access to this layer")]
    NoRandomAccess(Digest),
    #[error(transparent)]
    Toc(#[from] estargz::TocError),
    #[error("file tree: {0}")]
    Tree(#[from] super::tree::TreeError),
    #[error(
        "no verified TOC (not an eStargz layer, or not fetched yet) and not unpacked (a plain layer not fetched yet)"
    )]
    NotReady,
}

#[derive(Default)]
struct Layers {
    by_hex: HashMap<String, usize>,
    /// Digest hex per index; `loaded` is filled on first use (a resumed mount knows the names
    /// before it has loaded anything).
    names: Vec<String>,
    loaded: Vec<Option<Arc<LazyLayer>>>,
    /// Where new indexes are appended, when the mount can be handed over.
    persist: Option<std::fs::File>,
}

pub struct LayerTable {
    rt: tokio::runtime::Handle,
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    reader: Arc<Reader>,
    /// Layers without TOC streaming in (served before they are complete).
    streams: Arc<super::stream::Streams>,
    layers: RwLock<Layers>,
    /// Set when the layer list could not be persisted: the mount must not be handed over.
    pub(super) handover_broken: Arc<AtomicBool>,
}

impl LayerTable {
    pub fn new(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        reader: Arc<Reader>,
        streams: Arc<super::stream::Streams>,
    ) -> Arc<Self> {
        Arc::new(LayerTable {
            rt: tokio::runtime::Handle::current(),
            layout,
            db,
            reader,
            streams,
            layers: RwLock::new(Layers::default()),
            handover_broken: Arc::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Layers> {
        self.layers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Layers> {
        self.layers.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Layers with an index (loaded or not).
    pub fn count(&self) -> usize {
        self.read().names.len()
    }

    /// The layer with index `idx`, loaded now if a resumed mount only knew its name.
    pub fn get(&self, idx: usize) -> Option<Arc<LazyLayer>> {
        let name = {
            let layers = self.read();
            if let Some(Some(l)) = layers.loaded.get(idx) {
                return Some(Arc::clone(l));
            }
            layers.names.get(idx)?.clone()
        };
        let loaded = Arc::new(self.load_hex(&name)?);
        let mut layers = self.write();
        let slot = layers.loaded.get_mut(idx)?;
        if let Some(l) = slot {
            return Some(Arc::clone(l));
        }
        *slot = Some(Arc::clone(&loaded));
        drop(layers);
        self.mounted(&loaded);
        Some(loaded)
    }

    /// Find or load the layer directory `name` (a digest's hex): its index.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        let known = self.read().by_hex.get(name).copied();
        if let Some(i) = known {
            return self.get(i).map(|_| i);
        }
        let loaded = Arc::new(self.load_hex(name)?);
        let mut layers = self.write();
        if let Some(&i) = layers.by_hex.get(name) {
            return Some(i);
        }
        let i = layers.names.len();
        // Recorded before any inode number of it reaches the kernel. If it cannot be, a
        // resumed mount would misnumber layers: the list is removed, and the next daemon
        // mounts afresh instead of resuming.
        if let Some(f) = layers.persist.as_mut()
            && let Err(e) = std::io::Write::write_all(f, format!("{name}\n").as_bytes())
        {
            tracing::error!(error = %e, "cannot record the layer list; the mount will not be handed over at restart");
            layers.persist = None;
            self.handover_broken.store(true, Ordering::Relaxed);
        }
        layers.names.push(name.to_string());
        layers.loaded.push(Some(Arc::clone(&loaded)));
        layers.by_hex.insert(name.to_string(), i);
        drop(layers);
        self.mounted(&loaded);
        Some(i)
    }

    /// A layer built in memory, under `name` (tests of the namespace without a store).
    #[cfg(test)]
    pub(crate) fn insert_loaded(&self, name: &str, layer: Arc<LazyLayer>) -> usize {
        let mut layers = self.write();
        let i = layers.names.len();
        layers.names.push(name.to_string());
        layers.loaded.push(Some(layer));
        layers.by_hex.insert(name.to_string(), i);
        i
    }

    /// Persist new layer indexes to `file` from now on (a fresh mount that can be handed over).
    pub fn persist(&self, file: std::fs::File) {
        self.write().persist = Some(file);
    }

    /// Continue the layer list of a mount a previous daemon served, appending to `file`.
    pub fn adopt(&self, names: Vec<String>, file: std::fs::File) {
        let mut layers = self.write();
        layers.by_hex = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        layers.loaded = vec![None; names.len()];
        layers.names = names;
        layers.persist = Some(file);
    }

    /// Start-up prefetch of layer `hex` (blocking: may load the layer): load it now, so the
    /// TOC is parsed while containerd prepares the other layers, then fetch its landmark files
    /// and the regular files `paths` in that order (a learned list). Paths the layer lacks are
    /// skipped. Returns the chunks claimed, or `None` when the layer cannot be mounted.
    pub fn start_prefetch(&self, hex: &str, paths: &[String]) -> Option<usize> {
        let idx = self.by_name(hex)?;
        let layer = self.get(idx)?;
        let _rt = self.rt.enter();
        let mut n = self.reader.prefetch_landmark(&layer);
        if paths.is_empty() {
            // No list to say which windows a start needs: all of them, when they are few; and
            // what every start reads first.
            self.reader.fetch_all_windows(&layer);
            n += self.reader.start_files(&layer);
        } else {
            layer.guide();
            let by_path: HashMap<&str, usize> = layer
                .toc
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.chunks.is_empty())
                .map(|(i, e)| (e.path.as_str(), i))
                .collect();
            let entries: Vec<usize> = paths
                .iter()
                .filter_map(|p| by_path.get(p.as_str()).copied())
                .collect();
            let missing = paths.len() - entries.len();
            if missing > 0 {
                tracing::debug!(layer = %layer.digest, missing, "learned files not in the layer (or not regular files with content)");
            }
            let claimed = self.reader.prefetch(
                &layer,
                entries.iter().copied(),
                crate::access::Class::Prefetch,
            );
            tracing::info!(layer = %layer.digest, files = entries.len(), chunks = claimed, "prefetching the files a previous start read");
            n += claimed;
        }
        Some(n)
    }

    /// Where the regular files `paths` of layer `hex` lie in its blob, for a learned list:
    /// the blob's size, whether its TOC is an eStargz tail, and the byte ranges in the order
    /// the files come in `paths` (neighbouring chunks merged as the start-up prefetch merges
    /// them, so that its requests fall inside these ranges); through a shared gzip index, the
    /// ranges run from the checkpoints the files decode from, with the windows blob's ranges
    /// those need. `None` for a layer read neither through a TOC nor through checkpoints
    /// (streaming, or complete and unpacked here without them).
    pub fn learned_spans(
        &self,
        hex: &str,
        paths: &[String],
    ) -> Option<crate::learned::LayerRanges> {
        let layer = self.get(self.by_name(hex)?)?;
        let rec = lock(&self.db).layer(layer.digest.as_str()).ok().flatten()?;
        if layer.stream.is_some() {
            return None;
        }
        let chunks = crate::learned::listed_chunks(&layer.toc.entries, paths);
        // A plain layer's chunks all decode from checkpoints, or it has none to fetch from.
        let checkpoints = !rec.has_toc();
        if checkpoints && (chunks.is_empty() || !chunks.iter().all(|c| c.resume().is_some())) {
            return None;
        }
        let toc_tail = matches!(
            rec.form(),
            crate::store::Form::Toc {
                format: crate::store::TocFormat::Estargz,
                ..
            }
        );
        let windows = layer.windows.as_ref().filter(|_| checkpoints);
        Some(crate::learned::ranges_of(
            layer.size,
            toc_tail,
            &chunks,
            |c| layer.spans.span(c),
            windows,
        ))
    }

    fn load_hex(&self, name: &str) -> Option<LazyLayer> {
        let digest = Digest::parse(&format!("sha256:{name}")).ok()?;
        let rec = lock(&self.db).layer(digest.as_str()).ok().flatten()?;
        match self.load(&rec) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(layer = %digest, error = %e, "cannot mount layer lazily");
                None
            }
        }
    }

    fn mounted(&self, layer: &Arc<LazyLayer>) {
        tracing::info!(layer = %layer.digest, "layer mounted");
        let reader = Arc::clone(&self.reader);
        let layer = Arc::clone(layer);
        // Files a converter marked as needed at start-up come first (in the background).
        self.rt
            .spawn(async move { reader.prefetch_landmark(&layer) });
    }

    fn load(&self, rec: &LayerRecord) -> Result<LazyLayer, LoadError> {
        let digest = rec.digest()?;
        if let crate::store::Form::FileIndex { digest: index, .. } = rec.form() {
            // A layer without TOC with a file index: complete and unpacked here (served from
            // the file cache), or a plain gzip layer whose index has decoder checkpoints (built
            // here, or pushed by another node): read lazily from the nearest checkpoint, like
            // an eStargz layer. With both, files missing from the cache (wiped, or another
            // layer's GC) are read through the checkpoints too.
            let index = Digest::parse(index)?;
            let (entries, ra) = match crate::layer::tar::take_decoded(&index) {
                Some(decoded) => decoded,
                None => {
                    let json = self.layout.read_blob(&index)?;
                    crate::layer::tar::decode_index_with(
                        &json,
                        &crate::layer::tar::Limits::default(),
                    )?
                }
            };
            let ra = ra.filter(|ra| ra.layer == digest && ra.blob_size == rec.size);
            let (entries, toc_offset, windows) = match ra {
                Some(ra) => {
                    if !rec.unpacked {
                        tracing::info!(layer = %rec.digest, index = %index, checkpoints = ra.points.len(), windows_apart = ra.windows_apart(), "serving the layer lazily through its gzip index");
                    }
                    (ra.lazy_entries(&entries), rec.size, ra.windows.clone())
                }
                None if rec.unpacked => (entries, 0, None),
                None => return Err(LoadError::NoRandomAccess(index)),
            };
            let tree = Tree::from_entries(&entries)?;
            let toc = crate::layer::index::LayerIndex {
                digest: index,
                toc_offset,
                entries,
                prefetch_landmark: None,
            };
            return Ok(
                LazyLayer::new(digest, rec.source.clone(), rec.size, toc, tree)
                    .with_windows(windows),
            );
        }
        if !rec.has_toc()
            && let Some(stream) = self.streams.serving(digest.hex())
        {
            // A layer without TOC streaming in: served as its entries arrive.
            tracing::info!(layer = %rec.digest, "serving the layer while it streams in");
            return Ok(LazyLayer::streaming(
                digest,
                rec.source.clone(),
                rec.size,
                stream,
            ));
        }
        let crate::store::Form::Toc {
            digest: toc_digest,
            offset: Some(toc_offset),
            position,
            ..
        } = rec.form()
        else {
            return Err(LoadError::NotReady);
        };
        let toc_digest = Digest::parse(toc_digest)?;
        let toc = crate::layer::mount_toc(
            || self.layout.read_blob(&toc_digest).map_err(LoadError::from),
            &toc_digest,
            position,
            rec.size,
            toc_offset,
        )?;
        let tree = Tree::from_entries(&toc.entries)?;
        Ok(LazyLayer::new(
            digest,
            rec.source.clone(),
            rec.size,
            toc,
            tree,
        ))
    }
}
