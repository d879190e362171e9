//! The image service core shared by every front door (CRI, CLI): pull (`pull.rs`: register the
//! image as soon as manifest and config are verified, then fill layers in the background),
//! load archives (`load.rs`), resolve names (here), remove/untag and garbage-collect
//! (`remove.rs`; the sweeps are `store::gc`).

use crate::fetch::{FillStatus, Filler};
use crate::oci::{self, Digest, Document, Reference};
use crate::registry::auth::Secret;
use crate::registry::{OpCreds, Registry, RegistryError};
use crate::store::{Catalogue, ImageRecord, Layout, NameKind, NewImage, NewLayer, StoreError};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod load;
mod pull;
mod remove;

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
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    /// Referrers (shared indexes) and the registry's peers.
    registry: Arc<Registry>,
    /// Manifests and configs (the registry; a fake in unit tests).
    manifests: Arc<dyn crate::registry::seam::ManifestSource>,
    /// Starts the TOC fetches of a pull's eStargz layers beside its config fetch.
    early: Arc<crate::registry::early::EarlyBlobs>,
    filler: Arc<Filler>,
    persist_credentials: bool,
    pull_timeout: Duration,
    /// `fetch.index: auto`: pulls look for shared random-access indexes of plain layers.
    index_lookup: bool,
    /// Pulls of one name run one at a time (the second finds the first's result locally).
    pull_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls hold it shared; GC holds it exclusively, so it never sees a half-recorded image.
    gc_lock: tokio::sync::RwLock<()>,
}

use crate::store::locked as lock;

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
        manifests: Arc<dyn crate::registry::seam::ManifestSource>,
        early: Arc<crate::registry::early::EarlyBlobs>,
        filler: Arc<Filler>,
        opts: ImagesOptions,
    ) -> Self {
        Images {
            manifests,
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

    /// Find an image by full id, unique id prefix, `name@digest`, or (normalised) tag.
    pub fn resolve(&self, name: &str) -> Result<Option<ImageRecord>> {
        resolve_in(&lock(&self.db), name)
    }

    pub fn touch(&self, id: &str) {
        if let Err(e) = lock(&self.db).touch(id) {
            tracing::warn!(image = id, error = %e, "cannot record last use");
        }
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
