//! The layer filesystem's answers, without a kernel: inode numbers, lookups (waiting, in a layer
//! still streaming in, until a name is certain), attributes, listings, links, extended
//! attributes and what an open reads from. Every answer is a typed result; `fuse.rs` only
//! translates them into fuser replies, so all of this runs in unit tests.
//!
//! Inodes: the root is 1; layer directories and their files get `(index + 1) << 32 | local
//! inode`, where the index is the order in which layers were first looked up on this mount
//! (`LayerTable`, persisted so that a daemon resuming the mount numbers them the same).

use super::layers::LayerTable;
use super::tree::{NodeKind, ROOT};
use crate::access::reader::LazyLayer;
use crate::store::{Catalogue, Layout, locked as lock};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LAYER_SHIFT: u32 = 32;

/// The layer index and local inode of `ino` (None for the root).
pub fn split(ino: u64) -> Option<(usize, u64)> {
    let layer = ino >> LAYER_SHIFT;
    (layer > 0).then(|| ((layer - 1) as usize, ino & ((1 << LAYER_SHIFT) - 1)))
}

pub fn join(layer: usize, local: u64) -> u64 {
    ((layer as u64 + 1) << LAYER_SHIFT) | local
}

/// Why the filesystem refuses an operation; `errno` is the one place that picks the number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a regular file or symbolic link")]
    Invalid,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("no such extended attribute")]
    NoAttr,
    #[error("the caller's buffer is too small")]
    Range,
    /// A layer streaming in failed, or made no progress for `fuse.read_timeout`: the answer
    /// cannot be known (an I/O error, as for a failing disk).
    #[error("the layer's stream failed or stalled")]
    Stream,
}

impl FsError {
    pub fn errno(self) -> i32 {
        use nix::libc;
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::Invalid => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Stream => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// A node's attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub kind: NodeKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number (major, minor) of character and block devices.
    pub rdev: (u32, u32),
    pub mtime: SystemTime,
}

/// One directory entry of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: String,
}

/// What an open of a regular file reads from.
pub enum OpenTarget {
    /// Not in the file cache: the chunk reader (lazily, from the registry if need be).
    Chunks,
    /// The file cache's copy, of the right size.
    Cached(std::fs::File),
}

/// The mount's namespace: the root, a directory per layer, and each layer's tree.
pub struct Namespace {
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    pub(super) table: Arc<LayerTable>,
    started: SystemTime,
    /// How long a lookup in a layer streaming in waits for the stream to move on.
    stall: Duration,
    recorder: Arc<super::record::Recorder>,
}

impl Namespace {
    pub fn new(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        table: Arc<LayerTable>,
        stall: Duration,
        recorder: Arc<super::record::Recorder>,
    ) -> Namespace {
        Namespace {
            layout,
            db,
            table,
            started: SystemTime::now(),
            stall,
            recorder,
        }
    }

    fn layer(&self, ino: u64) -> Result<(usize, Arc<LazyLayer>, u64)> {
        let (idx, local) = split(ino).ok_or(FsError::NotFound)?;
        let layer = self.table.get(idx).ok_or(FsError::NotFound)?;
        Ok((idx, layer, local))
    }

    pub fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT,
            size: 0,
            kind: NodeKind::Dir,
            perm: 0o755,
            nlink: 2 + self.table.count() as u32,
            uid: 0,
            gid: 0,
            rdev: (0, 0),
            mtime: self.started,
        }
    }

    fn attr_in(&self, idx: usize, layer: &LazyLayer, local: u64) -> Option<Attr> {
        let view = layer.view();
        let n = view.tree().get(local)?;
        Some(Attr {
            ino: join(idx, local),
            size: n.size,
            kind: n.kind,
            perm: (n.perm & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            mtime: UNIX_EPOCH + Duration::from_secs(n.mtime.max(0) as u64),
        })
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        if ino == ROOT {
            return Ok(self.root_attr());
        }
        let (idx, layer, local) = self.layer(ino)?;
        self.attr_in(idx, &layer, local).ok_or(FsError::NotFound)
    }

    /// `name` in directory `parent`: Ok(None) when it certainly does not exist inside a layer
    /// (a negative answer the kernel may cache: layers never change). In a layer streaming in,
    /// waits until the name has arrived or cannot come any more (see `stream.rs`). At the root,
    /// a layer not (yet) mountable is NotFound, never cached: it may become mountable.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Option<Attr>> {
        if parent == ROOT {
            let idx = self.table.by_name(name).ok_or(FsError::NotFound)?;
            let layer = self.table.get(idx).ok_or(FsError::NotFound)?;
            return self
                .attr_in(idx, &layer, ROOT)
                .map(Some)
                .ok_or(FsError::NotFound);
        }
        let (idx, layer, local) = self.layer(parent)?;
        let mut found = layer.view().tree().lookup(local, name).map(|n| n.ino);
        if found.is_none() && layer.stream.is_some() {
            // Streaming in: the name may still come.
            let dir = self.stream_dir(&layer, local).ok_or(FsError::NotFound)?;
            let started = std::time::Instant::now();
            self.settle(&layer, |st| {
                st.tree.lookup(local, name).is_some() || st.missing_is_final(&dir, name)
            })?;
            tracing::debug!(layer = %layer.digest, dir, name, waited_ms = started.elapsed().as_millis() as u64,
                "lookup in a layer streaming in");
            found = layer.view().tree().lookup(local, name).map(|n| n.ino);
        }
        Ok(found.and_then(|n| self.attr_in(idx, &layer, n)))
    }

    pub fn readlink(&self, ino: u64) -> Result<String> {
        let (_, layer, local) = self.layer(ino).map_err(|_| FsError::Invalid)?;
        match layer.view().tree().get(local).map(|n| n.link.clone()) {
            Some(target) if !target.is_empty() => Ok(target),
            _ => Err(FsError::Invalid),
        }
    }

    /// The listing of directory `ino`, in a stable order (`offset` is where the kernel reads
    /// on from: in a layer streaming in, the first call waits until the stream has left the
    /// directory, so the listing is complete).
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<Vec<DirEntry>> {
        let mut entries = vec![];
        if ino == ROOT {
            // Every layer with a verified TOC or an index, loaded on the way.
            let names: Vec<String> = lock(&self.db)
                .list_images()
                .map(|imgs| {
                    imgs.into_iter()
                        .flat_map(|i| i.layers)
                        .filter(|l| l.mountable())
                        .map(|l| l.digest)
                        .collect()
                })
                .unwrap_or_default();
            let mut seen = std::collections::BTreeSet::new();
            for d in names {
                let hex = d.trim_start_matches("sha256:").to_string();
                if seen.insert(hex.clone())
                    && let Some(i) = self.table.by_name(&hex)
                {
                    entries.push(DirEntry {
                        ino: join(i, ROOT),
                        kind: NodeKind::Dir,
                        name: hex,
                    });
                }
            }
            return Ok(entries);
        }
        let (idx, layer, local) = self.layer(ino)?;
        if offset == 0
            && let Some(dir) = self.stream_dir(&layer, local)
        {
            self.settle(&layer, |st| st.left(&dir))?;
        }
        let view = layer.view();
        let node = view.tree().get(local).ok_or(FsError::NotFound)?;
        if node.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        for (name, &child) in &node.children {
            if let Some(c) = view.tree().get(child) {
                entries.push(DirEntry {
                    ino: join(idx, child),
                    kind: c.kind,
                    name: name.clone(),
                });
            }
        }
        Ok(entries)
    }

    /// The value of extended attribute `name` of `ino`.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let Ok((_, layer, local)) = self.layer(ino) else {
            return Err(FsError::NoAttr);
        };
        self.dir_settled(&layer, local)?;
        let view = layer.view();
        let node = view.tree().get(local).ok_or(FsError::NoAttr)?;
        node.xattrs
            .iter()
            .find(|(k, _)| k.as_bytes() == name)
            .map(|(_, v)| v.clone())
            .ok_or(FsError::NoAttr)
    }

    /// The names of `ino`'s extended attributes, each followed by a NUL (listxattr(2)).
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let mut names = vec![];
        if let Ok((_, layer, local)) = self.layer(ino) {
            self.dir_settled(&layer, local)?;
            let view = layer.view();
            let node = view.tree().get(local).ok_or(FsError::NotFound)?;
            for (k, _) in &node.xattrs {
                names.extend_from_slice(k.as_bytes());
                names.push(0);
            }
        }
        Ok(names)
    }

    /// Open `ino` read-only (`write` for any other access mode): what its reads come from.
    /// Records the open for a running `convert --record` or start-up learning.
    pub fn open(&self, ino: u64, write: bool) -> Result<OpenTarget> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let attr = self.getattr(ino)?;
        if attr.kind != NodeKind::Reg {
            return Err(FsError::Invalid);
        }
        let (_, layer, local) = self.layer(ino)?;
        if self.recorder.is_active() {
            let view = layer.view();
            if let Some(entry) = view.tree().get(local).and_then(|node| node.entry)
                && let Some(e) = view.entries().get(entry)
            {
                self.recorder.opened(layer.digest.hex(), &e.path);
            }
        }
        Ok(match self.cached_file(&layer, local) {
            Some(f) => OpenTarget::Cached(f),
            None => OpenTarget::Chunks,
        })
    }

    /// The layer and content entry a chunk read of `ino` needs: Ok(None) for a file without
    /// content (empty).
    pub fn content(&self, ino: u64) -> Result<Option<(Arc<LazyLayer>, usize)>> {
        let (idx, local) = split(ino).ok_or(FsError::IsDir)?;
        let layer = self.table.get(idx).ok_or(FsError::NotFound)?;
        let entry = layer.view().tree().get(local).and_then(|n| n.entry);
        Ok(entry.map(|e| (layer, e)))
    }

    /// Whether `ino` belongs to a layer whose index is below `adopted` (served by a previous
    /// daemon of this mount).
    pub fn is_adopted(ino: u64, adopted: usize) -> bool {
        split(ino).is_some_and(|(l, _)| l < adopted)
    }

    /// The file cache's copy of a regular file, if there is one of the right size (named by
    /// its content digest, so it holds exactly the bytes the TOC or index promises).
    fn cached_file(&self, layer: &LazyLayer, local: u64) -> Option<std::fs::File> {
        let (digest, size) = {
            let view = layer.view();
            let node = view.tree().get(local)?;
            let entry = view.entries().get(node.entry?)?;
            (entry.digest.clone()?, entry.size)
        };
        let f = layer.open_local(&self.layout, &digest).ok()?;
        (f.metadata().ok()?.len() == size).then_some(f)
    }

    /// Wait, in a layer that is still streaming in, until `cond` holds (at most until the
    /// stream stops making progress for `stall`). Ok for layers that do not stream.
    fn settle(
        &self,
        layer: &LazyLayer,
        cond: impl Fn(&super::stream::State) -> bool,
    ) -> Result<()> {
        let Some(stream) = &layer.stream else {
            return Ok(());
        };
        let _waiting = self.recorder.is_active().then(|| self.recorder.waiting());
        stream.wait(self.stall, cond).map_err(|e| {
            tracing::warn!(layer = %layer.digest, error = %e, "a lookup in a layer streaming in failed");
            FsError::Stream
        })
    }

    /// A directory's attributes in a streaming layer are final (its opaque marker has passed).
    fn dir_settled(&self, layer: &LazyLayer, local: u64) -> Result<()> {
        let is_dir = layer
            .view()
            .tree()
            .get(local)
            .is_some_and(|n| n.kind == NodeKind::Dir);
        match self.stream_dir(layer, local) {
            Some(dir) if is_dir => self.settle(layer, |st| st.dir_final(&dir)),
            _ => Ok(()),
        }
    }

    /// The path of directory `local` in a streaming layer (None for other layers).
    fn stream_dir(&self, layer: &LazyLayer, local: u64) -> Option<String> {
        layer.stream.as_ref()?.path_of(local)
    }
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
