//! The store: a SQLite catalogue plus content-addressed files under one root (docs/architecture.md, "Store").
//!
//! Layout: `catalogue.db`, `blobs/sha256/<hex>` (complete, verified), `partial/sha256/<hex>`
//! (a sparse file of a layer being fetched) with `<hex>.map` (the byte ranges it holds), `lock`.

mod catalogue;
pub mod form;
pub mod gc;
pub mod inventory;
pub mod partial;
pub mod ranges;
pub mod snapshots;

pub use catalogue::{
    Catalogue, FetchedBy, ImageRecord, LayerRecord, LayerState, NameKind, NewImage, NewLayer,
    RegTag, now,
};
pub use form::{Form, Mode, TocFormat};
pub use partial::{PartialBlob, Partials};

/// The store as the daemon's services share it: its files and its catalogue (handed to each
/// service by the daemon's core, `daemon::Core`).
#[derive(Clone)]
pub struct Store {
    pub layout: Layout,
    pub db: std::sync::Arc<std::sync::Mutex<Catalogue>>,
}

use crate::oci::Digest;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("catalogue: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("digest mismatch for {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("store at {0} is locked by another process (is `lazypull serve` running?)")]
    Locked(PathBuf),
    #[error("catalogue schema version {found} is newer than this binary understands ({supported})")]
    Schema { found: i64, supported: i64 },
    #[error("catalogue holds a malformed value: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Lock a mutex, ignoring poisoning: what these mutexes guard (the catalogue, whose changes are
/// transactions; caches and waiter tables) stays consistent when a holder panics.
pub fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// ENOSPC or EDQUOT: retrying will not help until space is freed.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32)
}

impl StoreError {
    /// A file write, or a catalogue write (SQLite's "database or disk is full"), that failed
    /// for lack of space.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => is_disk_full(source),
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            _ => false,
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Paths of the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("catalogue.db")
    }
    pub fn blob(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }
    pub fn partial(&self, d: &Digest) -> PathBuf {
        self.root.join("partial/sha256").join(d.hex())
    }
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }
    /// The file cache: contents of regular files of complete layers, by content digest.
    pub fn files_dir(&self) -> PathBuf {
        self.root.join("files/sha256")
    }
    pub fn file(&self, d: &Digest) -> PathBuf {
        self.files_dir().join(d.hex())
    }
    pub fn partial_dir(&self) -> PathBuf {
        self.root.join("partial/sha256")
    }
    /// The snapshotter's directories: `snapshots/<id>/{fs,work}`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    /// Learned start-up prefetch lists, by image manifest digest (`crate::learned`).
    pub fn learned_dir(&self) -> PathBuf {
        self.root.join("learned/sha256")
    }
    pub fn learned(&self, manifest: &Digest) -> PathBuf {
        self.learned_dir().join(format!("{}.json", manifest.hex()))
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// Create the directory tree (root-only permissions: the catalogue may hold credentials).
    pub fn create(&self) -> Result<()> {
        for dir in [
            self.root.clone(),
            self.blobs_dir(),
            self.partial_dir(),
            self.files_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.root))?;
        Ok(())
    }

    /// Write a small blob (manifest, config) after verifying its digest: temp file, fsync, rename.
    pub fn put_blob(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let actual = Digest::of(bytes);
        if &actual != d {
            return Err(StoreError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        let path = self.blob(d);
        if path.exists() {
            return Ok(());
        }
        let tmp = self
            .blobs_dir()
            .join(format!(".tmp-{}-{}", d.hex(), std::process::id()));
        let res = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(&self.blobs_dir())
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(io_err(&path))
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.blob(d);
        fs::read(&path).map_err(io_err(&path))
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob(d).exists()
    }
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// An exclusive advisory lock on the store, held for the life of the value.
/// `lazypull serve` and offline commands that write (prefetch, prune) take it.
pub struct StoreLock {
    _guard: nix::fcntl::Flock<File>,
}

impl StoreLock {
    pub fn try_acquire(layout: &Layout) -> Result<Self> {
        let path = layout.lock();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(guard) => Ok(StoreLock { _guard: guard }),
            Err(_) => Err(StoreError::Locked(layout.root.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_recognised_from_files_and_from_the_catalogue() {
        let io = |c: nix::errno::Errno| StoreError::Io {
            path: "x".into(),
            source: std::io::Error::from_raw_os_error(c as i32),
        };
        assert!(io(nix::errno::Errno::ENOSPC).is_disk_full());
        assert!(io(nix::errno::Errno::EDQUOT).is_disk_full());
        assert!(!io(nix::errno::Errno::EIO).is_disk_full());
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(StoreError::Db(full).is_disk_full());
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(!StoreError::Db(busy).is_disk_full());
    }
}
