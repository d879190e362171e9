//! The image service core shared by every front door (CRI, CLI): pull (register the image as soon
//! as manifest and config are verified, then fill layers in the background), resolve names,
//! remove/untag, garbage-collect.

use crate::fetch::{FillStatus, Filler};
use crate::oci::{self, Digest, Document, Reference};
use crate::registry::auth::Secret;
use crate::registry::{OpCreds, Registry, RegistryError};
use crate::store::{Catalogue, ImageRecord, Layout, NameKind, NewImage, NewLayer, StoreError};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image id prefix {0:?} matches more than one image")]
    Ambiguous(String),
    #[error("pull of {reference} did not finish within {timeout:?}")]
    Timeout {
        reference: String,
        timeout: Duration,
    },
    #[error("layer {layer} of {reference} could not be filled: {reason}")]
    Fill {
        reference: String,
        layer: String,
        reason: String,
        /// The store ran out of space (or quota).
        disk_full: bool,
    },
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Import(#[from] crate::import::ImportError),
}

pub type Result<T> = std::result::Result<T, ImagesError>;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PullMode {
    /// Return once manifest and config are verified; layers fill in the background.
    Lazy,
    /// Return once every layer is fetched and verified.
    Full,
}

#[derive(Debug, Clone)]
pub struct PullOutcome {
    pub id: String,
    /// True when nothing had to be fetched (the image was already local).
    pub already_local: bool,
}

/// What [`Images::load`] registered: one image of the archive.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub id: String,
    pub names: Vec<String>,
    pub layers: usize,
    /// Bytes of the image (manifest, config, layers).
    pub size: u64,
    /// True when the store held the image already (the names are added).
    pub already_local: bool,
}

/// Which images of an archive [`Images::load`] takes, and under what name.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Only the image the archive tags so (an OCI layout's `ref.name`, a docker save's
    /// repository tag).
    pub tag: Option<String>,
    /// The name to register the (only) image under, instead of the archive's.
    pub name: Option<String>,
}

/// Check each layer the store lacks against its digest and diff_id, then move it from the
/// archive's staging directory into the store under its final name.
fn publish_layers(
    archive: &crate::import::Archive,
    layout: &Layout,
    layers: &[oci::Layer],
    diff_ids: &[Digest],
) -> std::result::Result<(), crate::import::ImportError> {
    use crate::import::ImportError;
    use std::io::Read;
    let layer_err = |d: &Digest, reason: String| ImportError::Layer {
        digest: d.to_string(),
        reason,
    };
    for (l, diff_id) in layers.iter().zip(diff_ids) {
        if layout.has_blob(&l.digest) {
            continue;
        }
        let staged = archive
            .blob(&l.digest)
            .ok_or_else(|| ImportError::Missing {
                what: "layer",
                digest: l.digest.to_string(),
            })?;
        if staged.size != l.size {
            return Err(layer_err(
                &l.digest,
                format!("{} bytes, the manifest says {}", staged.size, l.size),
            ));
        }
        let io = |source| ImportError::Io {
            path: format!("layer {}", l.digest),
            source,
        };
        let mut v = crate::fetch::verify::Verifier::new(l.compression)
            .map_err(|e| layer_err(&l.digest, e.to_string()))?;
        let mut f = std::fs::File::open(&staged.path).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n])
                .map_err(|e| layer_err(&l.digest, e.to_string()))?;
        }
        let (blob, diff) = v
            .finish()
            .map_err(|e| layer_err(&l.digest, e.to_string()))?;
        if blob != l.digest {
            return Err(layer_err(
                &l.digest,
                format!("the archive's file is {blob}"),
            ));
        }
        if &diff != diff_id {
            return Err(layer_err(
                &l.digest,
                format!("uncompressed digest {diff} does not match the config's diff_id {diff_id}"),
            ));
        }
        std::fs::rename(&staged.path, layout.blob(&l.digest)).map_err(io)?;
    }
    crate::store::sync_dir(&layout.blobs_dir()).map_err(|source| ImportError::Io {
        path: layout.blobs_dir().display().to_string(),
        source,
    })
}

/// What a removal by name does: untag only (the image keeps other tags), or remove the image.
#[derive(Debug, Clone)]
pub struct Removal {
    pub image: ImageRecord,
    pub untag_only: Option<String>,
}

impl Removal {
    /// The names that go: the tag, or every name of the image (its id included).
    pub fn names(&self) -> Vec<String> {
        match &self.untag_only {
            Some(t) => vec![t.clone()],
            None => std::iter::once(self.image.id.clone())
                .chain(self.image.tags.iter().cloned())
                .chain(self.image.digests.iter().cloned())
                .collect(),
        }
    }
}

pub use crate::store::gc::GcReport;

pub struct Images {
    pub layout: Layout,
    pub db: Arc<Mutex<Catalogue>>,
    pub registry: Arc<Registry>,
    /// Starts the TOC fetches of a pull's eStargz layers beside its config fetch.
    early: Arc<crate::registry::early::EarlyBlobs>,
    pub filler: Arc<Filler>,
    pub persist_credentials: bool,
    pub pull_timeout: Duration,
    /// `fetch.index: auto`: pulls look for shared random-access indexes of plain layers.
    index_lookup: bool,
    /// Pulls of one name run one at a time (the second finds the first's result locally).
    pull_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls hold it shared; GC holds it exclusively, so it never sees a half-recorded image.
    gc_lock: tokio::sync::RwLock<()>,
}

/// A zstd:chunked layer's TOC checksum and position (a malformed pair is logged, and the layer
/// is then fetched whole like any zstd layer).
fn zstd_toc(l: &oci::Layer) -> Option<(Digest, crate::layer::zstd_chunked::Position)> {
    match crate::layer::zstd_chunked::from_annotations(&l.annotations)? {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(layer = %l.digest, error = %e, "zstd:chunked annotations refused; the layer is fetched whole");
            None
        }
    }
}

use crate::store::locked as lock;

/// How long a pull looks for a shared index before it goes on without one.
const INDEX_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain gzip or zstd layer that a shared random-access index would make lazy.
fn wants_index(l: &crate::store::LayerRecord) -> bool {
    use crate::oci::Compression;
    l.toc_digest.is_none()
        && !l.unpacked
        && l.index_digest.is_none()
        && Compression::from_media_type(&l.media_type)
            .is_ok_and(|c| matches!(c, Compression::Gzip | Compression::Zstd))
}

fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How the image service behaves (from the configuration).
pub struct ImagesOptions {
    /// `cri.persist_credentials`: a pull's credentials are kept for its lazy reads and fill.
    pub persist_credentials: bool,
    /// `cri.pull_timeout`: a lazy pull (manifest and config) gives up after this.
    pub pull_timeout: Duration,
    /// `fetch.index: auto`: pulls look for shared random-access indexes of plain layers.
    pub index_lookup: bool,
}

impl Images {
    pub fn new(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        registry: Arc<Registry>,
        early: Arc<crate::registry::early::EarlyBlobs>,
        filler: Arc<Filler>,
        opts: ImagesOptions,
    ) -> Self {
        Images {
            index_lookup: opts.index_lookup,
            layout,
            db,
            registry,
            early,
            filler,
            persist_credentials: opts.persist_credentials,
            pull_timeout: opts.pull_timeout,
            pull_locks: Mutex::new(HashMap::new()),
            gc_lock: tokio::sync::RwLock::new(()),
        }
    }

    fn op_creds(&self, registry: &str, request: Option<Secret>) -> OpCreds {
        OpCreds {
            request,
            persisted: crate::fetch::persisted_secret(&self.db, registry),
        }
    }

    /// Pull `reference`. Returns the image id (config digest).
    pub async fn pull(
        &self,
        reference: &str,
        request_creds: Option<Secret>,
        mode: PullMode,
    ) -> Result<PullOutcome> {
        let r = oci::parse_reference(reference)?;
        let started = Instant::now();
        let fut = self.pull_inner(&r, request_creds, mode);
        let result = match mode {
            // A full pull is bounded by the fill, which has its own retry budget.
            PullMode::Full => fut.await,
            PullMode::Lazy => tokio::time::timeout(self.pull_timeout, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(ImagesError::Timeout {
                        reference: r.to_string(),
                        timeout: self.pull_timeout,
                    })
                }),
        };
        self.release_pull_slot(&r.to_string());
        let out = result?;
        tracing::info!(image = %r, id = %out.id, ?mode, already_local = out.already_local,
            elapsed_ms = started.elapsed().as_millis() as u64, "image pulled");
        Ok(out)
    }

    /// Forget the per-name lock once no pull of that name holds or waits for it.
    fn release_pull_slot(&self, key: &str) {
        let mut locks = self.pull_locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.get(key).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(key);
        }
    }

    async fn pull_inner(
        &self,
        r: &Reference,
        request_creds: Option<Secret>,
        mode: PullMode,
    ) -> Result<PullOutcome> {
        let key = r.to_string();
        let name_lock = {
            let mut locks = self.pull_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let _one = name_lock.lock().await;
        let _gc = self.gc_lock.read().await;
        let repo = oci::repo_name(r);

        // Check local before pulling: a digest reference we hold needs no network at all.
        if let Some(d) = r.digest() {
            let existing =
                lock(&self.db).image_by_name(&oci::digest_name(&repo, &Digest::parse(d)?))?;
            if let Some(img) = existing {
                self.start_fills(&img, request_creds.clone(), mode, &key)
                    .await?;
                return Ok(PullOutcome {
                    id: img.id,
                    already_local: true,
                });
            }
        }
        let creds = self.op_creds(r.registry(), request_creds.clone());
        let (top_bytes, top_digest) = self.registry.fetch_manifest(r, None, &creds).await?;
        let (index_digest, manifest_bytes, manifest_digest, manifest) =
            match oci::parse_document(&top_bytes, None)? {
                Document::Manifest(m) => (None, top_bytes, top_digest, m),
                Document::Index(entries) => {
                    let entry = oci::select_platform(&entries, &oci::host_platform())?;
                    let d = Digest::parse(&entry.digest)?;
                    let (bytes, got) = self.registry.fetch_manifest(r, Some(&d), &creds).await?;
                    match oci::parse_document(&bytes, Some(&entry.media_type))? {
                        Document::Manifest(m) => {
                            self.layout.put_blob(&top_digest, &top_bytes)?;
                            (Some(top_digest), bytes, got, m)
                        }
                        Document::Index(_) => {
                            return Err(oci::OciError::Malformed {
                                what: "index",
                                reason: "nested index".into(),
                            }
                            .into());
                        }
                    }
                }
            };
        if mode != PullMode::Full {
            self.toc_tails_ahead(&repo, &manifest, &creds);
        }
        let config_digest = Digest::parse(&manifest.config.digest)?;
        let config = async {
            if self.layout.has_blob(&config_digest) {
                Ok::<_, ImagesError>(self.layout.read_blob(&config_digest)?)
            } else {
                Ok(self
                    .registry
                    .fetch_small_blob(r, &config_digest, oci::MAX_MANIFEST_BYTES, &creds)
                    .await?)
            }
        };
        // The shared index of plain layers is looked for beside the config fetch: the lookup
        // is several round trips (referrers, tag fallback, artifact manifest, bundle) that the
        // pull would otherwise add after it.
        let wants_lookup = self.index_lookup
            && mode != PullMode::Full
            && manifest.layers.iter().any(|l| self.may_want_index(l));
        let lookup = async {
            let at = crate::fetch::source_reference(&repo, &manifest_digest)?;
            if !wants_lookup {
                return None;
            }
            let started = std::time::Instant::now();
            let found = tokio::time::timeout(
                INDEX_LOOKUP_TIMEOUT,
                crate::index_share::find_shared(&self.registry, &at, &manifest_digest, &creds),
            )
            .await;
            Some((found, started))
        };
        let (config_bytes, found) = tokio::join!(config, lookup);
        let config_bytes = config_bytes?;
        let config = oci::parse_config(&config_bytes, manifest.layers.len())?;
        self.layout.put_blob(&manifest_digest, &manifest_bytes)?;
        self.layout.put_blob(&config_digest, &config_bytes)?;

        let repo_digest = index_digest.as_ref().unwrap_or(&manifest_digest);
        let mut names = vec![(oci::digest_name(&repo, repo_digest), NameKind::Digest)];
        if let Some(t) = oci::tag_name(r) {
            names.push((t, NameKind::Tag));
        }
        let layers: Vec<_> = manifest
            .layers
            .iter()
            .zip(&config.diff_ids)
            .map(|(l, diff)| NewLayer {
                digest: &l.digest,
                media_type: l.media_type.as_str(),
                size: l.size,
                diff_id: diff,
                // A malformed annotation only means the layer cannot be lazy.
                toc_digest: zstd_toc(l).map(|(d, _)| d).or_else(|| {
                    l.annotations
                        .get(crate::layer::estargz::TOC_DIGEST_ANNOTATION)
                        .and_then(|d| Digest::parse(d).ok())
                }),
                toc_position: zstd_toc(l).map(|(_, p)| p.encode()),
            })
            .collect();
        let already_local = lock(&self.db)
            .image(config_digest.as_str())?
            .is_some_and(|i| i.complete());
        lock(&self.db).insert_image(&NewImage {
            id: &config_digest,
            manifest_digest: &manifest_digest,
            index_digest: index_digest.as_ref(),
            media_type: &manifest.media_type,
            size: manifest.total_size() + manifest_bytes.len() as u64,
            user: &config.user,
            source: &repo,
            layers,
            names,
        })?;
        if self.persist_credentials
            && let Some(secret) = &request_creds
            && let Ok(json) = serde_json::to_string(secret)
        {
            lock(&self.db).put_credential(r.registry(), &json)?;
        }
        let mut img = lock(&self.db)
            .image(config_digest.as_str())?
            .ok_or(ImagesError::ShuttingDown)?;
        if let Some((found, started)) = found
            && img.layers.iter().any(wants_index)
        {
            img = self.take_index(img, found, started)?;
        }
        self.start_fills(&img, request_creds, mode, &key).await?;
        Ok(PullOutcome {
            id: config_digest.to_string(),
            already_local,
        })
    }

    /// Start fetching the TOC tails of the manifest's eStargz layers now, beside the config
    /// fetch, rather than after it: the filler's TOC fetch, which needs the layer recorded
    /// first, then finds the bytes arriving or in (`registry::early`). Saves a round trip
    /// of every cold start. Layers whose TOC is here already are left alone.
    fn toc_tails_ahead(&self, repo: &str, manifest: &oci::ImageManifest, creds: &OpCreds) {
        use crate::layer::estargz::{FOOTER_SIZE, TOC_DIGEST_ANNOTATION};
        for l in &manifest.layers {
            if l.size < FOOTER_SIZE
                || zstd_toc(l).is_some()
                || !l.annotations.contains_key(TOC_DIGEST_ANNOTATION)
            {
                continue;
            }
            let digest = l.digest.clone();
            let known = lock(&self.db)
                .layer(digest.as_str())
                .ok()
                .flatten()
                .is_some_and(|r| r.mountable() || r.toc_error.is_some());
            let Some(reference) = crate::fetch::source_reference(repo, &digest) else {
                continue;
            };
            if !known {
                let (at, len) = crate::fetch::toc_tail(l.size);
                self.early
                    .fetch(reference, digest, &[(at, at + len)], creds.clone());
            }
        }
    }

    /// Register the images of an archive (`docker save`, an OCI layout as a tar stream; gzip or
    /// zstd compressed) without a registry: every layer is checked against its digest and
    /// diff_id, stored complete, and plain layers are unpacked, as after a full pull.
    pub async fn load(
        &self,
        r: Box<dyn std::io::Read + Send>,
        opts: LoadOptions,
    ) -> Result<Vec<Loaded>> {
        let staging = self.layout.blobs_dir();
        let archive = tokio::task::spawn_blocking(move || {
            crate::import::Archive::read(crate::import::decompressed(r)?, &staging)
        })
        .await
        .map_err(|_| ImagesError::ShuttingDown)??;
        let found = archive.images(opts.tag.as_deref(), opts.name.as_deref())?;
        tracing::info!(images = found.len(), bytes = archive.bytes, "archive read");
        let archive = Arc::new(archive);
        let mut out = vec![];
        for f in found {
            out.push(self.load_one(&archive, f).await?);
        }
        Ok(out)
    }

    async fn load_one(
        &self,
        archive: &Arc<crate::import::Archive>,
        f: crate::import::FoundImage,
    ) -> Result<Loaded> {
        let manifest = f.parsed()?;
        let (config_digest, config_bytes) = archive.config(&f)?;
        let config = oci::parse_config(&config_bytes, manifest.layers.len())?;
        let refs = f
            .names
            .iter()
            .map(|n| oci::parse_reference(n))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let Some(first) = refs.first() else {
            return Err(crate::import::ImportError::Unnamed {
                manifest: f.manifest_digest.to_string(),
            }
            .into());
        };
        let repo = oci::repo_name(first);
        let _gc = self.gc_lock.read().await;
        let (a, layout, layers, diffs) = (
            Arc::clone(archive),
            self.layout.clone(),
            manifest.layers.clone(),
            config.diff_ids.clone(),
        );
        tokio::task::spawn_blocking(move || publish_layers(&a, &layout, &layers, &diffs))
            .await
            .map_err(|_| ImagesError::ShuttingDown)??;
        if let Some((d, bytes)) = &f.index {
            self.layout.put_blob(d, bytes)?;
        }
        self.layout.put_blob(&f.manifest_digest, &f.manifest)?;
        self.layout.put_blob(&config_digest, &config_bytes)?;
        let repo_digest = f.index.as_ref().map_or(&f.manifest_digest, |(d, _)| d);
        let mut names = vec![];
        for r in &refs {
            let digest_name = (
                oci::digest_name(&oci::repo_name(r), repo_digest),
                NameKind::Digest,
            );
            if !names.contains(&digest_name) {
                names.push(digest_name);
            }
            if let Some(t) = oci::tag_name(r) {
                names.push((t, NameKind::Tag));
            }
        }
        let already_local = lock(&self.db)
            .image(config_digest.as_str())?
            .is_some_and(|i| i.complete());
        {
            let mut db = lock(&self.db);
            db.insert_image(&NewImage {
                id: &config_digest,
                manifest_digest: &f.manifest_digest,
                index_digest: f.index.as_ref().map(|(d, _)| d),
                media_type: &manifest.media_type,
                size: manifest.total_size() + f.manifest.len() as u64,
                user: &config.user,
                source: &repo,
                layers: manifest
                    .layers
                    .iter()
                    .zip(&config.diff_ids)
                    .map(|(l, diff)| NewLayer {
                        digest: &l.digest,
                        media_type: l.media_type.as_str(),
                        size: l.size,
                        diff_id: diff,
                        toc_digest: None,
                        toc_position: None,
                    })
                    .collect(),
                names,
            })?;
            for l in &manifest.layers {
                db.set_filled(l.digest.as_str(), l.size)?;
                db.set_layer_state(l.digest.as_str(), crate::store::LayerState::Complete, None)?;
            }
        }
        drop(_gc);
        let img = lock(&self.db)
            .image(config_digest.as_str())?
            .ok_or(ImagesError::ShuttingDown)?;
        // Unpacks the plain layers into the file cache (mountable), as a full pull does.
        self.start_fills(&img, None, PullMode::Full, &f.names[0])
            .await?;
        tracing::info!(image = %img.id, names = ?f.names, layers = img.layers.len(), already_local, "image loaded from an archive");
        Ok(Loaded {
            id: img.id.clone(),
            names: f.names.clone(),
            layers: img.layers.len(),
            size: img.size,
            already_local,
        })
    }

    /// Whether a manifest layer may want a shared random-access index: plain gzip or zstd
    /// (no TOC annotation), and not already unpacked or indexed here.
    fn may_want_index(&self, l: &oci::Layer) -> bool {
        use crate::oci::Compression;
        zstd_toc(l).is_none()
            && !l
                .annotations
                .contains_key(crate::layer::estargz::TOC_DIGEST_ANNOTATION)
            && matches!(l.compression, Compression::Gzip | Compression::Zstd)
            && lock(&self.db)
                .layer(l.digest.as_str())
                .ok()
                .flatten()
                .is_none_or(|rec| wants_index(&rec))
    }

    /// Take the random-access index of the image's plain gzip layers another node shared
    /// (`fetch.index: auto`), as the lookup beside the config fetch found it (bounded in time:
    /// without it the layers stream in as usual). The image as recorded after.
    fn take_index(
        &self,
        img: ImageRecord,
        found: std::result::Result<
            std::result::Result<Option<crate::artifact::Fetched>, String>,
            tokio::time::error::Elapsed,
        >,
        started: std::time::Instant,
    ) -> Result<ImageRecord> {
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let taken = found.map(|f| {
            f.and_then(|f| match f {
                None => Ok(0),
                Some(f) => crate::index_share::take_found(&self.layout, &self.db, &img, &f),
            })
        });
        match taken {
            Ok(Ok(0)) => {
                tracing::debug!(image = %img.id, elapsed_ms, "no shared random-access index for the image's plain layers")
            }
            Ok(Ok(n)) => {
                tracing::info!(image = %img.id, layers = n, elapsed_ms, "shared random-access index found: plain gzip layers are read lazily")
            }
            Ok(Err(e)) => {
                tracing::warn!(image = %img.id, error = %e, "looking for a shared random-access index failed; its plain layers stream in")
            }
            Err(_) => {
                tracing::warn!(image = %img.id, timeout = ?INDEX_LOOKUP_TIMEOUT, "looking for a shared random-access index timed out; its plain layers stream in")
            }
        }
        lock(&self.db)
            .image(&img.id)?
            .ok_or(ImagesError::ShuttingDown)
    }

    /// Start (or join) the fills of an image's layers; in full mode, wait for all of them.
    async fn start_fills(
        &self,
        img: &ImageRecord,
        request_creds: Option<Secret>,
        mode: PullMode,
        reference: &str,
    ) -> Result<()> {
        let registry = img.source.split('/').next().unwrap_or_default().to_string();
        let creds = self.op_creds(&registry, request_creds);
        let waits: Vec<_> = img
            .layers
            .iter()
            .map(|l| (l.digest.clone(), self.filler.ensure(l, creds.clone())))
            .collect();
        if mode == PullMode::Full {
            for (layer, rx) in waits {
                match Filler::wait(rx).await {
                    FillStatus::Done => {}
                    FillStatus::OnDemand => {
                        let reason = "filling is turned off (--no-fill)".to_string();
                        return Err(ImagesError::Fill {
                            reference: reference.into(),
                            layer,
                            reason,
                            disk_full: false,
                        });
                    }
                    FillStatus::Cancelled => return Err(ImagesError::ShuttingDown),
                    FillStatus::Failed { reason, disk_full } => {
                        return Err(ImagesError::Fill {
                            reference: reference.into(),
                            layer,
                            reason,
                            disk_full,
                        });
                    }
                    FillStatus::Running => {
                        let reason = "fill did not finish".to_string();
                        return Err(ImagesError::Fill {
                            reference: reference.into(),
                            layer,
                            reason,
                            disk_full: false,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Resume the fills of every incomplete layer (at start-up). Never waits on the network.
    pub fn resume_fills(&self) -> Result<usize> {
        let pending: Vec<_> = lock(&self.db)
            .layers_to_work_on(true)?
            .into_iter()
            .filter(|l| {
                l.state != crate::store::LayerState::Complete || self.filler.unpack.wants(l)
            })
            .collect();
        for l in &pending {
            let registry = l.source.split('/').next().unwrap_or_default().to_string();
            let _ = self.filler.ensure(l, self.op_creds(&registry, None));
        }
        Ok(pending.len())
    }

    /// Find an image by full id, unique id prefix, `name@digest`, or (normalised) tag.
    pub fn resolve(&self, name: &str) -> Result<Option<ImageRecord>> {
        resolve_in(&lock(&self.db), name)
    }

    pub fn touch(&self, id: &str) {
        if let Err(e) = lock(&self.db).touch(id) {
            tracing::warn!(image = id, error = %e, "cannot record last use");
        }
    }

    /// What removing `name` would do: `None` if no image has that name.
    pub fn removal(&self, name: &str) -> Result<Option<Removal>> {
        let Some(image) = self.resolve(name)? else {
            return Ok(None);
        };
        let bare = name.strip_prefix("sha256:").unwrap_or(name);
        let tag = (!is_hex(bare))
            .then(|| {
                oci::parse_reference(name)
                    .ok()
                    .and_then(|r| oci::tag_name(&r))
            })
            .flatten();
        let untag_only = tag.filter(|t| image.tags.contains(t) && image.tags.len() > 1);
        Ok(Some(Removal { image, untag_only }))
    }

    /// Remove by tag (untag; the image goes with its last tag) or by id/digest (the image with
    /// all its names). Absent images are not an error. Returns whether an image was removed.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let Some(Removal {
            image: img,
            untag_only,
        }) = self.removal(name)?
        else {
            return Ok(false);
        };
        let removed = match untag_only {
            Some(tag) => lock(&self.db).untag(&tag)?,
            None => lock(&self.db).remove_image(&img.id)?,
        };
        if removed {
            tracing::info!(image = %img.id, name, "image removed");
            for l in &img.layers {
                if !lock(&self.db).layer_referenced(&l.digest)? {
                    self.filler.cancel(&l.digest);
                }
            }
            self.gc().await?;
        } else {
            tracing::info!(image = %img.id, name, "tag removed; image kept for its other tags");
        }
        Ok(removed)
    }

    /// Hold off GC (shared, like a pull) while a blob is published and its reference recorded.
    pub async fn gc_shared(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gc_lock.read().await
    }

    /// Delete everything no image references: layer rows, blobs, partial files, stale temp files.
    pub async fn gc(&self) -> Result<GcReport> {
        let _gc = self.gc_lock.write().await;
        let referenced = {
            let mut db = lock(&self.db);
            for d in db.drop_unreferenced_layers()? {
                self.filler.cancel(&d);
                if let Ok(d) = crate::oci::Digest::parse(&d) {
                    self.filler.partials().discard(&d);
                }
            }
            db.referenced_digests()?
        };
        let mut report = GcReport::default();
        crate::store::gc::sweep_blobs(&self.layout, &referenced, &mut report)?;
        let unpacked: Vec<crate::store::LayerRecord> = lock(&self.db)
            .list_images()?
            .into_iter()
            .flat_map(|i| i.layers)
            .filter(|l| l.unpacked)
            .collect();
        let keep = crate::store::gc::referenced_files(&self.layout, &unpacked)?;
        crate::store::gc::sweep_file_cache(&self.layout, &keep, &mut report);
        if report.files_removed > 0 {
            tracing::info!(
                files = report.files_removed,
                bytes = report.bytes_freed,
                "garbage collected"
            );
        }
        Ok(report)
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        Ok(lock(&self.db).list_images()?)
    }
}

/// Bytes and inodes used under `root` (allocated blocks: sparse files count what they hold).
pub fn disk_usage(root: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// Find an image by full id, unique id prefix, `name@digest`, or (normalised) tag.
pub fn resolve_in(db: &Catalogue, name: &str) -> Result<Option<ImageRecord>> {
    let name = name.trim();
    if name.is_empty() {
        return Ok(None);
    }
    let bare = name.strip_prefix("sha256:").unwrap_or(name);
    if is_hex(bare) {
        if bare.len() == 64 {
            if let Some(img) = db.image(&format!("sha256:{bare}"))? {
                return Ok(Some(img));
            }
        } else {
            let ids = db.ids_with_prefix(bare, 2)?;
            match ids.len() {
                1 => return Ok(db.image(&ids[0])?),
                0 => {}
                _ => return Err(ImagesError::Ambiguous(name.to_string())),
            }
        }
        if name.starts_with("sha256:") {
            return Ok(None);
        }
    }
    let r = oci::parse_reference(name)?;
    let repo = oci::repo_name(&r);
    if let Some(d) = r.digest() {
        let d = Digest::parse(d)?;
        if let Some(img) = db.image_by_name(&oci::digest_name(&repo, &d))? {
            return Ok(Some(img));
        }
        // A platform manifest digest of an image pulled through an index.
        return Ok(db
            .list_images()?
            .into_iter()
            .find(|i| i.manifest_digest == d.as_str() && i.source == repo));
    }
    match oci::tag_name(&r) {
        Some(t) => Ok(db.image_by_name(&t)?),
        None => Ok(None),
    }
}
