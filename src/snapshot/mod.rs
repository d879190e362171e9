//! The containerd snapshotter (`containerd.services.snapshots.v1`, served as a proxy plugin):
//! an overlayfs snapshotter whose committed snapshots may be *remote*, i.e. the lazily served
//! directory of a layer on the daemon's FUSE mount. See docs/dev/snapshotter.md for the
//! protocol as containerd 1.6 drives it.
//!
//! - Metadata lives in the catalogue (`store::snapshots`); directories under
//!   `<root>/snapshots/<id>/{fs,work}` (the upper and work dirs of overlayfs).
//! - Remote flow: a `Prepare` whose labels name a target (`containerd.io/snapshot.ref`) and a
//!   layer (CRI's `containerd.io/snapshot/cri.*` labels or ctr-remote's
//!   `containerd.io/snapshot/remote/stargz.*`) that can be served lazily creates the committed
//!   snapshot `target` backed by that layer's FUSE directory and answers AlreadyExists, so
//!   containerd skips the download. Otherwise it is an ordinary snapshot into which containerd
//!   applies the layer.

pub mod filter;
pub mod service;

use crate::images::{Images, PullMode};
use crate::oci::{self, Digest};
use crate::store::snapshots::{NewSnapshot, SnapshotKind, SnapshotRecord};
use crate::store::{Catalogue, Layout, StoreError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const LABEL_REF: &str = "containerd.io/snapshot.ref";
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// containerd's limit for one label (key + value).
const MAX_LABEL: usize = 4096;
const MAX_LABELS: usize = 512;
const MAX_KEY: usize = 4096;
/// overlayfs mount options must fit in a page.
/// mount(2) takes at most a page of mount data.
const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, SnapshotError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A mount as containerd's `types.Mount` carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Why a layer is not served lazily (logged; containerd then downloads and applies it).
#[derive(Debug, thiserror::Error)]
enum NotLazy {
    #[error("catalogue: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("its TOC was refused: {0}")]
    TocRefused(String),
    #[error("its TOC could not be fetched: {0}")]
    TocUnavailable(String),
    #[error("its TOC was not fetched within {0:?}")]
    TocTimeout(Duration),
    #[error("it has no TOC ({0}) and is not fetched yet")]
    NoTocNotFetched(String),
    #[error("it has no TOC and its fetch failed: {0}")]
    NoTocFetchFailed(String),
    #[error("it has no TOC and was not fetched and unpacked within {0:?} (snapshotter.plain_wait)")]
    NoTocTimeout(Duration),
    #[error("pulling the image: {0}")]
    Pull(Box<crate::images::ImagesError>),
    #[error("pulling the image timed out after {0:?}")]
    PullTimeout(Duration),
    #[error("the image does not contain the layer")]
    NotInImage,
}

/// Where a remote snapshot's layer comes from, as the labels say.
#[derive(Debug, PartialEq, Eq)]
pub struct RemoteRequest {
    pub target: String,
    pub image_ref: String,
    pub layer: Digest,
}

/// The remote-snapshot labels of a Prepare: `None` when the request is an ordinary one (no
/// target, or no layer labels); an error when they are there but malformed.
pub fn remote_request(labels: &BTreeMap<String, String>) -> Result<Option<RemoteRequest>> {
    let Some(target) = labels.get(LABEL_REF) else {
        return Ok(None);
    };
    let pair = [
        (LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST),
        (LABEL_STARGZ_REF, LABEL_STARGZ_DIGEST),
    ]
    .into_iter()
    .find_map(|(r, d)| Some((labels.get(r)?, labels.get(d)?)));
    let Some((image_ref, digest)) = pair else {
        return Ok(None);
    };
    let bad = |m: String| SnapshotError::InvalidArgument(m);
    if target.is_empty() {
        return Err(bad(format!("label {LABEL_REF} is empty")));
    }
    let layer =
        Digest::parse(digest).map_err(|e| bad(format!("layer digest label {digest:?}: {e}")))?;
    oci::parse_reference(image_ref)
        .map_err(|e| bad(format!("image reference label {image_ref:?}: {e}")))?;
    Ok(Some(RemoteRequest {
        target: target.clone(),
        image_ref: image_ref.clone(),
        layer,
    }))
}

/// Bound what a request may store.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(SnapshotError::InvalidArgument(format!(
            "{} labels, more than {MAX_LABELS}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() + v.len() > MAX_LABEL {
            return Err(SnapshotError::InvalidArgument(format!(
                "label {:?}: key must be non-empty and key + value at most {MAX_LABEL} bytes",
                k.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

fn check_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY || key.contains('\0') {
        return Err(SnapshotError::InvalidArgument(format!(
            "{what} must be 1 to {MAX_KEY} bytes without NUL"
        )));
    }
    Ok(())
}

/// The mounts of a snapshot: `own` is its directory (`fs` and `work` inside), `lowers` the
/// content directories of its ancestors, nearest first (containerd's overlay layout).
pub fn build_mounts(kind: SnapshotKind, own: &Path, lowers: &[PathBuf]) -> Result<Vec<MountSpec>> {
    let bind = |src: &Path, rw: bool| MountSpec {
        kind: "bind".into(),
        source: src.display().to_string(),
        options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
    };
    let lowerdir = || {
        let joined = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        format!("lowerdir={joined}")
    };
    let mounts = match (kind, lowers.len()) {
        (SnapshotKind::Active, 0) => vec![bind(&own.join("fs"), true)],
        (SnapshotKind::Active, _) => vec![MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", own.join("work").display()),
                format!("upperdir={}", own.join("fs").display()),
                lowerdir(),
            ],
        }],
        (SnapshotKind::View, 0) => vec![bind(&own.join("fs"), false)],
        (SnapshotKind::View, 1) => vec![bind(&lowers[0], false)],
        (SnapshotKind::View, _) => vec![MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![lowerdir()],
        }],
        (SnapshotKind::Committed, _) => {
            return Err(SnapshotError::FailedPrecondition(
                "a committed snapshot has no mounts (not active or view)".into(),
            ));
        }
    };
    if let Some(m) = mounts.iter().find(|m| m.kind == "overlay") {
        let len = mount_data_len(&m.options);
        if len > PAGE_SIZE {
            return Err(SnapshotError::FailedPrecondition(format!(
                "{} layers need {len} bytes of overlayfs mount options even with relative lower \
                 directories, more than the kernel's {PAGE_SIZE}: an image this deep cannot be mounted (flatten it)",
                lowers.len()
            )));
        }
    }
    Ok(mounts)
}

/// The size of the mount data containerd passes to mount(2) for these overlay options: when
/// they come near a page, containerd (`mount/mount_linux.go`, `compactLowerdirOption`) mounts
/// from the lower directories' common parent with relative lower paths. Every snapshot's
/// content is `<root>/snapshots/<id>/fs` (for a lazy layer a symlink into the FUSE mount), so
/// a lower layer costs `<id>/fs:`, a few bytes, and the kernel's 500-layer limit comes first.
pub fn mount_data_len(options: &[String]) -> usize {
    let size = |opts: &[String]| opts.iter().map(|o| o.len() + 1).sum::<usize>();
    let full = size(options);
    if full < PAGE_SIZE - 512 {
        return full;
    }
    let Some(lower) = options.iter().find_map(|o| o.strip_prefix("lowerdir=")) else {
        return full;
    };
    let dirs: Vec<&str> = lower.split(':').collect();
    if dirs.len() < 2 {
        return full;
    }
    // containerd: the longest common string prefix, then its parent directory.
    let mut common = dirs[0];
    for d in &dirs[1..] {
        let n = common
            .bytes()
            .zip(d.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        common = &common[..n];
    }
    let parent = match common.rfind('/') {
        Some(0) | None => return full,
        Some(i) => &common[..i],
    };
    let relative: usize = dirs.iter().map(|d| d.len() - parent.len() - 1 + 1).sum();
    full - lower.len() + relative.saturating_sub(1)
}

pub struct SnapshotterOptions {
    /// The daemon's FUSE mount (None: no remote snapshots, everything is applied locally).
    pub fuse_root: Option<PathBuf>,
    /// How long a remote Prepare waits for a layer's TOC before falling back to a download.
    pub remote_wait: Duration,
    /// How long a remote Prepare waits for the filler to fetch and unpack a layer without TOC
    /// (None: the filler is off, containerd downloads such layers).
    pub plain_wait: Option<Duration>,
    /// Start-up prefetch (landmark, learned lists) begins when a layer is prepared remotely.
    pub learner: Option<Arc<crate::learned::Learner>>,
}

pub struct Snapshotter {
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    /// Pulls an image whose layer containerd prepares before lazypull knows it.
    images: Arc<Images>,
    /// Whose TOC fetches a remote Prepare waits for.
    filler: Arc<crate::fetch::Filler>,
    opts: SnapshotterOptions,
}

use crate::store::locked as lock;

impl Snapshotter {
    pub fn new(
        store: crate::store::Store,
        images: Arc<Images>,
        filler: Arc<crate::fetch::Filler>,
        opts: SnapshotterOptions,
    ) -> Result<Arc<Snapshotter>> {
        let crate::store::Store { layout, db } = store;
        let dir = layout.snapshots_dir();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Arc::new(Snapshotter {
            layout,
            db,
            images,
            filler,
            opts,
        }))
    }

    fn dir(&self, id: i64) -> PathBuf {
        self.layout.snapshots_dir().join(id.to_string())
    }

    /// A remote snapshot's `<id>/fs`: a symlink to its layer's directory on the FUSE mount, so
    /// that every snapshot's content has the same short form of path (see [`mount_data_len`]).
    fn link_remote(&self, id: i64, layer: &str) -> Result<()> {
        let Some(root) = &self.opts.fuse_root else {
            return Err(SnapshotError::Unavailable(
                "the layer filesystem is not mounted".into(),
            ));
        };
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let link = dir.join("fs");
        let target = root.join(layer.trim_start_matches("sha256:"));
        match std::os::unix::fs::symlink(&target, &link) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io(&link)(e)),
            _ => Ok(()),
        }
    }

    /// The directory holding a committed snapshot's content.
    fn content_dir(&self, s: &SnapshotRecord) -> Result<PathBuf> {
        let dir = self.dir(s.id).join("fs");
        let Some(layer) = &s.remote_layer else {
            return Ok(dir);
        };
        if self.opts.fuse_root.is_none() {
            return Err(SnapshotError::Unavailable(format!(
                "snapshot {} is served lazily but the layer filesystem is not mounted",
                s.name
            )));
        }
        // Snapshots made before the link existed get it now.
        if std::fs::symlink_metadata(&dir).is_err() {
            self.link_remote(s.id, layer)?;
        }
        // The layer must be servable now (the FUSE mount up, its TOC known).
        std::fs::metadata(&dir).map_err(|e| {
            SnapshotError::Unavailable(format!(
                "layer {layer} of snapshot {} is unavailable at {}: {e}",
                s.name,
                dir.display()
            ))
        })?;
        Ok(dir)
    }

    pub fn stat(&self, key: &str) -> Result<SnapshotRecord> {
        lock(&self.db)
            .snapshot(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.into()))
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>> {
        let (s, ancestors) = {
            let db = lock(&self.db);
            let s = db
                .snapshot(key)?
                .ok_or_else(|| SnapshotError::NotFound(key.into()))?;
            let a = db.snapshot_ancestors(&s)?;
            (s, a)
        };
        let lowers = ancestors
            .iter()
            .map(|a| self.content_dir(a))
            .collect::<Result<Vec<_>>>()?;
        build_mounts(s.kind, &self.dir(s.id), &lowers)
    }

    /// Prepare (kind Active) or View: a new snapshot on top of `parent`.
    pub async fn prepare(
        &self,
        kind: SnapshotKind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<MountSpec>> {
        check_key("key", key)?;
        check_labels(&labels)?;
        let parent_rec = self.parent(key, parent)?;
        if kind == SnapshotKind::Active
            && let Some(req) = remote_request(&labels)?
            && self.try_remote(&req, parent_rec.as_ref(), &labels).await?
        {
            return Err(SnapshotError::AlreadyExists(format!(
                "target snapshot {:?}",
                req.target
            )));
        }
        let rec = {
            let mut db = lock(&self.db);
            if db.snapshot(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {key:?}")));
            }
            db.insert_snapshot(
                &NewSnapshot {
                    name: key,
                    parent: parent_rec.as_ref(),
                    kind,
                    labels: &labels,
                    remote_layer: None,
                },
                |id| self.make_dirs(id),
            )?
        };
        tracing::debug!(
            key,
            parent,
            kind = kind.as_str(),
            id = rec.id,
            "snapshot prepared"
        );
        self.mounts(&rec.name)
    }

    fn parent(&self, key: &str, parent: &str) -> Result<Option<SnapshotRecord>> {
        let db = lock(&self.db);
        if db.snapshot(key)?.is_some() {
            return Err(SnapshotError::AlreadyExists(format!("snapshot {key:?}")));
        }
        if parent.is_empty() {
            return Ok(None);
        }
        let p = db
            .snapshot(parent)?
            .ok_or_else(|| SnapshotError::NotFound(format!("parent {parent:?}")))?;
        if p.kind != SnapshotKind::Committed {
            return Err(SnapshotError::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        Ok(Some(p))
    }

    fn make_dirs(&self, id: i64) -> Result<()> {
        let dir = self.dir(id);
        // A directory left by a crash between mkdir and the catalogue commit.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        for d in [dir.join("fs"), dir.join("work")] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        // The root of the container's filesystem: 0755 like overlay's.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("fs"), std::fs::Permissions::from_mode(0o755))
            .map_err(io(&dir))?;
        Ok(())
    }

    /// The remote flow: true when `req.target` now exists as a committed snapshot served
    /// lazily (the caller answers AlreadyExists); false to fall back to a local snapshot.
    async fn try_remote(
        &self,
        req: &RemoteRequest,
        parent: Option<&SnapshotRecord>,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool> {
        if self.opts.fuse_root.is_none() {
            return Ok(false);
        }
        if let Some(existing) = lock(&self.db).snapshot(&req.target)? {
            // Already there (another namespace, or a retry): containerd finds it by List.
            return Ok(existing.kind == SnapshotKind::Committed);
        }
        let started = Instant::now();
        if let Some(l) = &self.opts.learner {
            l.fetch_ahead(&req.image_ref, &req.layer);
        }
        match self.layer_ready(req).await {
            Ok(()) => {}
            Err(why) => {
                tracing::info!(layer = %req.layer, image = %req.image_ref, reason = %why,
                    "layer not served lazily; containerd downloads and applies it");
                return Ok(false);
            }
        }
        let mut labels = labels.clone();
        labels.insert(LABEL_REMOTE.into(), "remote snapshot".into());
        let mut db = lock(&self.db);
        if db.snapshot(&req.target)?.is_some() {
            return Ok(true);
        }
        db.insert_snapshot::<SnapshotError>(
            &NewSnapshot {
                name: &req.target,
                parent,
                kind: SnapshotKind::Committed,
                labels: &labels,
                remote_layer: Some(req.layer.as_str()),
            },
            |id| self.link_remote(id, req.layer.as_str()),
        )?;
        drop(db);
        tracing::info!(layer = %req.layer, image = %req.image_ref, target = %req.target,
            elapsed_ms = started.elapsed().as_millis() as u64, "remote snapshot: layer served lazily");
        if let Some(l) = &self.opts.learner {
            l.layer_prepared(&req.image_ref, &req.layer);
        }
        Ok(true)
    }

    /// Wait until the layer can be served by the FUSE mount: its TOC verified (lazy), or its
    /// files unpacked (a complete plain layer). Pulls the image (manifest and config) first if
    /// the daemon does not know the layer. Err: why it cannot be served lazily.
    async fn layer_ready(&self, req: &RemoteRequest) -> std::result::Result<(), NotLazy> {
        let started = Instant::now();
        let deadline = started + self.opts.remote_wait;
        let mut pulled = false;
        let mut plain_logged = false;
        loop {
            // Subscribed before the state is read: a TOC fetch that ends after this is seen.
            let mut toc_events = self.filler.toc_events();
            let layer = lock(&self.db).layer(req.layer.as_str())?;
            match layer {
                Some(l) if l.mountable() => {
                    // Known from another registry or repository, and still needing the network:
                    // pull this image too (manifest and config), which points the layer at it.
                    // The old source may be gone; this one was just used by containerd.
                    let here = crate::oci::parse_reference(&req.image_ref)
                        .map(|r| crate::oci::repo_name(&r))
                        .ok();
                    if !pulled
                        && l.state != crate::store::LayerState::Complete
                        && here.is_some_and(|h| h != l.source)
                    {
                        match self.pull_until(&req.image_ref, deadline).await {
                            Ok(()) => {
                                tracing::info!(layer = %req.layer, old = %l.source, image = %req.image_ref,
                                "layer now fetched from the image containerd pulled")
                            }
                            Err(e) => {
                                tracing::warn!(layer = %req.layer, error = %e,
                                "the layer keeps its previous source")
                            }
                        }
                    }
                    return Ok(());
                }
                Some(l) if matches!(l.form(), crate::store::Form::TocRefused { .. }) => {
                    return Err(NotLazy::TocRefused(l.toc_error.unwrap_or_default()));
                }
                Some(l)
                    if matches!(
                        l.form(),
                        crate::store::Form::Plain | crate::store::Form::FileIndex { .. }
                    ) =>
                {
                    // Fetched once, by the filler (one stream, verified, unpacked into the
                    // file cache), rather than by containerd and then again by the filler.
                    let Some(wait) = self.opts.plain_wait.filter(|w| !w.is_zero()) else {
                        return Err(NotLazy::NoTocNotFetched(l.media_type));
                    };
                    if l.state == crate::store::LayerState::Failed {
                        return Err(NotLazy::NoTocFetchFailed(l.error.unwrap_or_default()));
                    }
                    if started.elapsed() >= wait {
                        return Err(NotLazy::NoTocTimeout(wait));
                    }
                    if !plain_logged {
                        plain_logged = true;
                        tracing::info!(layer = %req.layer, media_type = %l.media_type, filled = l.filled, size = l.size,
                            "layer without TOC: lazypull fetches it once and serves its files as they arrive; containerd downloads nothing");
                    }
                    // Served as it streams in, once its fill has begun unpacking it.
                    if self.filler.streams().serving(req.layer.hex()).is_some() {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Some(_) => {
                    // Its TOC is still to come.
                    let filler = &self.filler;
                    if let Some(why) = filler.toc_unavailable_since(req.layer.as_str(), started) {
                        return Err(NotLazy::TocUnavailable(why));
                    }
                    if !pulled && !filler.is_working_on(req.layer.as_str()) {
                        // Nothing fetches it (an earlier attempt failed for a transient
                        // reason): pulling the image again starts that.
                        pulled = true;
                        self.pull_until(&req.image_ref, deadline).await?;
                        continue;
                    }
                }
                None if !pulled => {
                    pulled = true;
                    self.pull_until(&req.image_ref, deadline).await?;
                    if let Some(l) = &self.opts.learner {
                        l.image_pulled(&req.image_ref, &req.layer);
                    }
                    continue;
                }
                None => return Err(NotLazy::NotInImage),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NotLazy::TocTimeout(self.opts.remote_wait));
            }
            // Woken when a TOC fetch ends (polling every 20 ms made each Prepare wait 10 ms
            // on average after its TOC was in); the timeout catches other changes (a fill
            // that completes the layer).
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_millis(100)),
                toc_events.changed(),
            )
            .await;
        }
    }

    /// Pull `image_ref` (manifest and config: lazy) by `deadline`.
    async fn pull_until(
        &self,
        image_ref: &str,
        deadline: Instant,
    ) -> std::result::Result<(), NotLazy> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.images.pull(image_ref, None, PullMode::Lazy)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(NotLazy::Pull(Box::new(e))),
            Err(_) => Err(NotLazy::PullTimeout(wait)),
        }
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        check_key("name", name)?;
        check_labels(&labels)?;
        let s = self.stat(key)?;
        if s.kind != SnapshotKind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key:?} is {}, not active",
                s.kind.as_str()
            )));
        }
        // Usage is taken before the rename: the directory does not change any more.
        let usage = crate::images::disk_usage(&self.dir(s.id).join("fs"));
        let mut db = lock(&self.db);
        if db.snapshot(name)?.is_some() {
            return Err(SnapshotError::AlreadyExists(format!("snapshot {name:?}")));
        }
        // Re-read under the lock: a concurrent Remove or Commit of the same key.
        match db.snapshot(key)? {
            Some(now) if now.id == s.id && now.kind == SnapshotKind::Active => {}
            _ => return Err(SnapshotError::NotFound(key.into())),
        }
        db.commit_snapshot(s.id, name, &labels, usage)?;
        tracing::debug!(key, name, "snapshot committed");
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let s = self.stat(key)?;
        if !lock(&self.db).delete_snapshot(s.id)? {
            return Err(SnapshotError::FailedPrecondition(format!(
                "cannot remove snapshot {key:?}: it has children"
            )));
        }
        // The row is gone first: a crash leaves at worst an orphan directory for Cleanup.
        // (A remote snapshot's directory holds only the symlink, which is not followed.)
        let dir = self.dir(s.id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a snapshot directory; Cleanup retries");
        }
        tracing::debug!(key, "snapshot removed");
        Ok(())
    }

    /// Only labels can change. `paths`: `labels` (replace all) or `labels.KEY` (set or, with an
    /// empty value, delete one); none = replace all.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotRecord> {
        check_labels(&labels)?;
        let mut db = lock(&self.db);
        let mut s = db
            .snapshot(name)?
            .ok_or_else(|| SnapshotError::NotFound(name.into()))?;
        let mut new = s.labels.clone();
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            new = labels.clone();
        }
        for p in paths {
            if p == "labels" {
                continue;
            }
            let Some(k) = p.strip_prefix("labels.") else {
                return Err(SnapshotError::InvalidArgument(format!(
                    "cannot update field {p:?} of snapshot {name:?}: only labels are mutable"
                )));
            };
            match labels.get(k) {
                Some(v) if !v.is_empty() => {
                    new.insert(k.to_string(), v.clone());
                }
                _ => {
                    new.remove(k);
                }
            }
        }
        new.retain(|_, v| !v.is_empty());
        check_labels(&new)?;
        s.updated_ns = db.update_snapshot_labels(s.id, &new)?;
        s.labels = new;
        Ok(s)
    }

    /// Bytes and inodes of the snapshot's own files (0 for a remote snapshot).
    pub fn usage(&self, key: &str) -> Result<(u64, u64)> {
        let s = self.stat(key)?;
        Ok(match (&s.remote_layer, s.kind) {
            (Some(_), _) => (0, 0),
            (None, SnapshotKind::Committed) => (s.size, s.inodes),
            (None, _) => crate::images::disk_usage(&self.dir(s.id).join("fs")),
        })
    }

    pub fn list(&self, filters: &[filter::Filter]) -> Result<Vec<SnapshotRecord>> {
        let all = lock(&self.db).snapshots()?;
        Ok(all
            .into_iter()
            .filter(|s| {
                filter::any_matches(
                    filters,
                    &filter::Fields {
                        name: &s.name,
                        parent: &s.parent,
                        kind: s.kind.as_str(),
                        labels: &s.labels,
                    },
                )
            })
            .collect())
    }

    /// Remove directories no snapshot owns (left by a crash or a failed removal). Returns how
    /// many were removed.
    pub fn cleanup(&self) -> Result<usize> {
        let root = self.layout.snapshots_dir();
        let mut trash = vec![];
        {
            // Under the lock: a Prepare in flight holds it between mkdir and its commit.
            let db = lock(&self.db);
            let ids = db.snapshot_ids()?;
            for e in std::fs::read_dir(&root).map_err(io(&root))?.flatten() {
                let name = e.file_name();
                let owned = name
                    .to_str()
                    .and_then(|n| n.parse::<i64>().ok())
                    .is_some_and(|id| ids.contains(&id));
                if owned {
                    continue;
                }
                // Out of the way first, so the slow removal below can run without the lock.
                let to = root.join(format!(".trash-{}", name.to_string_lossy()));
                let is_trash = name.to_string_lossy().starts_with(".trash-");
                if !is_trash && std::fs::rename(e.path(), &to).is_ok() {
                    trash.push(to);
                } else {
                    trash.push(e.path());
                }
            }
        }
        let mut n = 0;
        for t in trash {
            match std::fs::remove_dir_all(&t).or_else(|_| std::fs::remove_file(&t)) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(path = %t.display(), error = %e, "cleanup: cannot remove")
                }
            }
        }
        if n > 0 {
            tracing::info!(removed = n, "snapshot cleanup removed orphan directories");
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn remote_labels() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(remote_request(&l(&[])).unwrap(), None);
        assert_eq!(
            remote_request(&l(&[(LABEL_REF, "sha256:x")])).unwrap(),
            None,
            "no layer labels: an ordinary unpack"
        );
        let cri = remote_request(&l(&[
            (LABEL_REF, "sha256:chain"),
            (LABEL_CRI_IMAGE_REF, "127.0.0.1:5000/a:b"),
            (LABEL_CRI_LAYER_DIGEST, &d),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cri.target, "sha256:chain");
        assert_eq!(cri.layer.as_str(), d);
        let stargz = remote_request(&l(&[
            (LABEL_REF, "sha256:chain"),
            (LABEL_STARGZ_REF, "127.0.0.1:5000/a:b"),
            (LABEL_STARGZ_DIGEST, &d),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(stargz.image_ref, "127.0.0.1:5000/a:b");
        for bad in [
            l(&[
                (LABEL_REF, "c"),
                (LABEL_CRI_IMAGE_REF, "x"),
                (LABEL_CRI_LAYER_DIGEST, "sha256:zz"),
            ]),
            l(&[
                (LABEL_REF, "c"),
                (LABEL_CRI_IMAGE_REF, "UPPER:bad ref"),
                (LABEL_CRI_LAYER_DIGEST, &d),
            ]),
            l(&[
                (LABEL_REF, ""),
                (LABEL_CRI_IMAGE_REF, "a/b"),
                (LABEL_CRI_LAYER_DIGEST, &d),
            ]),
        ] {
            assert!(
                matches!(remote_request(&bad), Err(SnapshotError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(check_labels(&l(&[("k", &"v".repeat(5000))])).is_err());
        assert!(check_labels(&l(&[("", "v")])).is_err());
    }

    #[test]
    fn mounts_follow_containerd_overlay() {
        let own = Path::new("/s/7");
        let lowers = [PathBuf::from("/f/a"), PathBuf::from("/s/3/fs")];
        let m = build_mounts(SnapshotKind::Active, own, &[]).unwrap();
        assert_eq!(m[0].kind, "bind");
        assert_eq!(m[0].source, "/s/7/fs");
        assert_eq!(m[0].options, ["rw", "rbind"]);
        let m = build_mounts(SnapshotKind::Active, own, &lowers).unwrap();
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "workdir=/s/7/work",
                "upperdir=/s/7/fs",
                "lowerdir=/f/a:/s/3/fs"
            ]
        );
        let m = build_mounts(SnapshotKind::View, own, &lowers[..1]).unwrap();
        assert_eq!(
            (m[0].source.as_str(), &m[0].options[..]),
            ("/f/a", &["ro".to_string(), "rbind".to_string()][..])
        );
        let m = build_mounts(SnapshotKind::View, own, &lowers).unwrap();
        assert_eq!(m[0].options, ["lowerdir=/f/a:/s/3/fs"]);
        assert!(build_mounts(SnapshotKind::Committed, own, &lowers).is_err());
        // Deep images: containerd mounts with relative lower paths (from their common parent),
        // so 400 layers of `<root>/snapshots/<id>/fs` fit; 1000 would not.
        let deep = |n: usize| -> Vec<PathBuf> {
            (0..n)
                .map(|i| PathBuf::from(format!("/var/lib/lazypull/snapshots/{}/fs", 1000 + i)))
                .collect()
        };
        let m = build_mounts(SnapshotKind::Active, own, &deep(400)).unwrap();
        let full: usize = m[0].options.iter().map(|o| o.len() + 1).sum();
        assert!(full > PAGE_SIZE);
        assert!(mount_data_len(&m[0].options) <= PAGE_SIZE);
        assert!(matches!(
            build_mounts(SnapshotKind::Active, own, &deep(1000)),
            Err(SnapshotError::FailedPrecondition(_))
        ));
    }

    /// The compacted size is what containerd's compactLowerdirOption produces.
    #[test]
    fn mount_data_len_mirrors_containerd() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let short = o(&["index=off", "lowerdir=/a/1/fs:/a/2/fs"]);
        assert_eq!(
            mount_data_len(&short),
            10 + 25,
            "short options are not compacted"
        );
        // 250 lowers under /x/snapshots: relative `<id>/fs`, joined by ':'.
        let dirs: Vec<String> = (100..350).map(|i| format!("/x/snapshots/{i}/fs")).collect();
        let long = vec![
            "workdir=/w".to_string(),
            format!("lowerdir={}", dirs.join(":")),
        ];
        let relative: Vec<String> = (100..350).map(|i| format!("{i}/fs")).collect();
        let want = "workdir=/w".len() + 1 + "lowerdir=".len() + relative.join(":").len() + 1;
        let full: usize = long.iter().map(|s| s.len() + 1).sum();
        assert!(full >= PAGE_SIZE - 512);
        assert_eq!(mount_data_len(&long), want);
        // No common parent below the root: nothing to compact.
        let dirs: Vec<String> = (0..300)
            .map(|i| format!("/{i}/fs/{}", "x".repeat(10)))
            .collect();
        let spread = vec![format!("lowerdir={}", dirs.join(":"))];
        assert_eq!(mount_data_len(&spread), spread[0].len() + 1);
    }
}
