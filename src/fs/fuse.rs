//! The daemon's FUSE filesystem (the only file that knows fuser): one read-only mount with a
//! directory per eStargz layer, named by the layer digest's hex. A layer directory appears when
//! first looked up (its verified TOC is loaded from the store) and is then served from the
//! in-memory tree. File reads never block the session: they run as tokio tasks on the
//! [`Reader`], which takes verified chunks from memory, the local blob or partial file, or the
//! registry, and only then reply.

use super::handover::{self, Paths};
use super::layers::LayerTable;
use super::reader::{LazyLayer, Reader};
use super::tree::{NodeKind, ROOT};
use crate::store::{Catalogue, Layout};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr,
    Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Layer content is immutable: long TTLs are safe and spare round trips (overlayfs looks up
/// every name in every lower layer).
const TTL: Duration = Duration::from_secs(3600);
/// Layer directories get inode numbers `(index + 1) << 32 | local inode`. The index is the
/// order in which layers were first looked up on this mount; it is persisted (one hex per line,
/// `handover::Paths::layers`) so that a daemon resuming the mount after a restart gives every
/// layer the inode numbers the kernel already caches.
const LAYER_SHIFT: u32 = 32;
/// Read-only files have nothing to flush: no FLUSH round trip at every close(2), and no close
/// (nor an exec of a process holding the file) that waits while the daemon restarts.
const NOFLUSH: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

pub struct LayerFs {
    rt: tokio::runtime::Handle,
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    reader: Arc<Reader>,
    table: Arc<LayerTable>,
    started: SystemTime,
    /// Asked for by the configuration; `passthrough_on` once the kernel agreed at init.
    passthrough_wanted: bool,
    passthrough_on: Arc<std::sync::atomic::AtomicBool>,
    handles: Mutex<Handles>,
    recorder: Arc<super::record::Recorder>,
    /// Layers with an index below this were served by a previous daemon of this mount: their
    /// inodes may have page-cache opens this process never saw (see `Handles::cached_io`), so
    /// their cached files are read by pread, never passed through.
    adopted: std::sync::atomic::AtomicUsize,
}

/// Open files served from the file cache: by passthrough (one backing id per inode, shared by
/// its open handles, closed with the last one) or by pread from the cached file. After a
/// restart the kernel still holds handles of the previous process: unknown ones are read
/// through the chunk reader, and `files` keeps the inode so a reused number is never taken for
/// another file.
#[derive(Default)]
struct Handles {
    next: u64,
    files: HashMap<u64, (u64, Arc<std::fs::File>)>,
    backing: HashMap<u64, Arc<BackingId>>,
    by_inode: HashMap<u64, std::sync::Weak<BackingId>>,
    /// Open handles per inode that the kernel serves through its page cache (chunk reader or
    /// pread). The kernel refuses a passthrough open of an inode with such opens (EIO), e.g.
    /// the busybox binary a shell runs from before its layer was unpacked, exec'd again after.
    cached_io: HashMap<u64, usize>,
    /// Where backing ids are recorded for the next daemon (a mount that can be handed over).
    log: Option<handover::BackingLog>,
    /// Backing ids a previous daemon of this connection left open, per inode: the kernel may
    /// still tie the inode to that backing file (a container holds it open), so every
    /// passthrough open of it must use the same id. Kept open until the connection ends.
    adopted_ids: std::collections::BTreeMap<u64, u32>,
    adopted_backing: HashMap<u64, Arc<BackingId>>,
}

use crate::store::locked as lock;

/// Handle numbers start from the clock (µs since the epoch, shifted), so a restarted daemon
/// does not hand out the numbers its predecessor's open files still carry.
fn first_handle() -> u64 {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    (us << 8).max(1)
}

/// Answer an open with handle `fh` passed through to backing `id`, which the handle table
/// keeps. The reply goes out under the lock and our reference is dropped first: a RELEASE of
/// this handle (a reader may close it at once) must find the table's reference the last one,
/// so that the id closes in `release`, after its close is recorded for the next daemon.
fn opened_passthrough(
    mut h: std::sync::MutexGuard<'_, Handles>,
    fh: u64,
    id: Arc<BackingId>,
    reply: ReplyOpen,
) {
    h.backing.insert(fh, Arc::clone(&id));
    reply.opened_passthrough(FileHandle(fh), NOFLUSH, &id);
    drop(id);
    drop(h);
}

fn split(ino: u64) -> Option<(usize, u64)> {
    let layer = ino >> LAYER_SHIFT;
    (layer > 0).then(|| ((layer - 1) as usize, ino & ((1 << LAYER_SHIFT) - 1)))
}

fn join(layer: usize, local: u64) -> u64 {
    ((layer as u64 + 1) << LAYER_SHIFT) | local
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::Reg => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Char => FileType::CharDevice,
        NodeKind::Block => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

impl LayerFs {
    pub fn new(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        reader: Arc<Reader>,
        table: Arc<LayerTable>,
        passthrough: bool,
        recorder: Arc<super::record::Recorder>,
    ) -> Self {
        LayerFs {
            rt: tokio::runtime::Handle::current(),
            layout,
            db,
            reader,
            table,
            started: SystemTime::now(),
            passthrough_wanted: passthrough,
            passthrough_on: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            handles: Mutex::new(Handles {
                next: first_handle(),
                ..Default::default()
            }),
            recorder,
            adopted: std::sync::atomic::AtomicUsize::new(0),
        }
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
    /// stream stops making progress for `fuse.read_timeout`). Ok for layers that do not stream.
    fn settle(
        &self,
        layer: &LazyLayer,
        cond: impl Fn(&super::stream::State) -> bool,
    ) -> Result<(), Errno> {
        let Some(stream) = &layer.stream else {
            return Ok(());
        };
        stream.wait(self.reader.timeout(), cond).map_err(|e| {
            tracing::warn!(layer = %layer.digest, error = %e, "a lookup in a layer streaming in failed");
            Errno::EIO
        })
    }

    /// A directory's attributes in a streaming layer are final (its opaque marker has passed).
    fn dir_settled(&self, layer: &LazyLayer, local: u64) -> Result<(), Errno> {
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

    /// Record the backing ids given out from now on (a fresh mount that can be handed over).
    pub fn persist_backing(&self, log: handover::BackingLog) {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).log = Some(log);
    }

    /// Continue a mount a previous daemon served: its layer indexes, its passthrough setting
    /// (the kernel negotiated it once, at INIT), `file` to append new indexes to, and the
    /// backing ids it left open with their log.
    pub fn adopt(
        &self,
        names: Vec<String>,
        file: std::fs::File,
        passthrough: bool,
        backing: Option<(handover::BackingLog, std::collections::BTreeMap<u64, u32>)>,
    ) {
        let passthrough = passthrough && backing.is_some();
        if let Some((log, ids)) = backing {
            let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            h.log = Some(log);
            h.adopted_ids = ids;
        }
        self.adopted
            .store(names.len(), std::sync::atomic::Ordering::Relaxed);
        self.table.adopt(names, file);
        // Only where the kernel agreed at INIT, and only if this run's configuration wants it.
        self.passthrough_on.store(
            passthrough && self.passthrough_wanted,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Whether the kernel agreed to passthrough (known once the session is initialised).
    pub fn passthrough_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.passthrough_on)
    }

    fn root_attr(&self) -> FileAttr {
        let n = self.table.count() as u32;
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2 + n,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, layer: usize, local: u64) -> Option<FileAttr> {
        let l = self.table.get(layer)?;
        let view = l.view();
        let n = view.tree().get(local)?;
        let t = UNIX_EPOCH + Duration::from_secs(n.mtime.max(0) as u64);
        Some(FileAttr {
            ino: INodeNo(join(layer, local)),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: file_type(n.kind),
            perm: (n.perm & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: nix::sys::stat::makedev(n.rdev.0 as u64, n.rdev.1 as u64) as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    fn attr_of(&self, ino: u64) -> Option<FileAttr> {
        if ino == ROOT {
            return Some(self.root_attr());
        }
        let (layer, local) = split(ino)?;
        self.attr(layer, local)
    }
}

impl fuser::Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        if parent.0 == ROOT {
            return match self.table.by_name(name).and_then(|i| self.attr(i, ROOT)) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let Some((layer, local)) = split(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(l) = self.table.get(layer) else {
            return reply.error(Errno::ENOENT);
        };
        let found = l.view().tree().lookup(local, name).map(|n| n.ino);
        let found = match found {
            None if l.stream.is_some() => {
                // Streaming in: the name may still come (see stream.rs).
                let Some(dir) = self.stream_dir(&l, local) else {
                    return reply.error(Errno::ENOENT);
                };
                let started = std::time::Instant::now();
                if let Err(e) = self.settle(&l, |st| {
                    st.tree.lookup(local, name).is_some() || st.missing_is_final(&dir, name)
                }) {
                    return reply.error(e);
                }
                tracing::debug!(layer = %l.digest, dir, name, waited_ms = started.elapsed().as_millis() as u64,
                    "lookup in a layer streaming in");
                l.view().tree().lookup(local, name).map(|n| n.ino)
            }
            f => f,
        };
        match found.and_then(|n| self.attr(layer, n)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            // Negative entries are cached too: layers never change.
            None => {
                let mut a = self.root_attr();
                a.ino = INodeNo(0);
                reply.entry(&TTL, &a, Generation(0))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let node = split(ino.0).and_then(|(l, n)| {
            self.table
                .get(l)
                .and_then(|l| l.view().tree().get(n).map(|n| n.link.clone()))
        });
        match node {
            Some(target) if !target.is_empty() => reply.data(target.as_bytes()),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.attr_of(ino.0) {
            Some(a) if a.kind == FileType::RegularFile => {}
            Some(_) => return reply.error(Errno::EINVAL),
            None => return reply.error(Errno::ENOENT),
        }
        if self.recorder.is_active()
            && let Some((l, n)) = split(ino.0)
            && let Some(layer) = self.table.get(l)
        {
            let view = layer.view();
            if let Some(entry) = view.tree().get(n).and_then(|node| node.entry)
                && let Some(e) = view.entries().get(entry)
            {
                self.recorder.opened(layer.digest.hex(), &e.path);
            }
        }
        let cached =
            split(ino.0).and_then(|(l, n)| self.table.get(l).and_then(|l| self.cached_file(&l, n)));
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = cached else {
            // Not in the file cache: reads go through the chunk reader.
            *h.cached_io.entry(ino.0).or_default() += 1;
            drop(h);
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | NOFLUSH);
        };
        let fh = h.next;
        h.next += 1;
        let passthrough = self
            .passthrough_on
            .load(std::sync::atomic::Ordering::Relaxed);
        if passthrough && let Some(&raw) = h.adopted_ids.get(&ino.0) {
            tracing::debug!(
                ino = ino.0,
                backing = raw,
                "open by passthrough with a previous run's backing id"
            );
            // Opened by passthrough under a previous daemon: the same backing id, or EIO.
            let id = match h.adopted_backing.get(&ino.0) {
                Some(id) => Arc::clone(id),
                None => {
                    // SAFETY: `raw` was registered on this connection by a previous daemon and
                    // never closed (the log records a close before it happens); this process
                    // keeps it open until the connection ends (`adopted_backing`).
                    let id = Arc::new(unsafe { reply.wrap_backing(raw) });
                    h.adopted_backing.insert(ino.0, Arc::clone(&id));
                    id
                }
            };
            return opened_passthrough(h, fh, id, reply);
        }
        if passthrough
            && !h.cached_io.contains_key(&ino.0)
            && split(ino.0)
                .is_some_and(|(l, _)| l >= self.adopted.load(std::sync::atomic::Ordering::Relaxed))
        {
            // One backing id per inode, shared by its open handles.
            let existing = h.by_inode.get(&ino.0).and_then(std::sync::Weak::upgrade);
            let id = match existing {
                Some(id) => Ok(id),
                None => reply.open_backing(&file).map(Arc::new).inspect(|id| {
                    tracing::debug!(ino = ino.0, backing = id.id(), "backing id registered");
                    if let Some(log) = h.log.as_mut()
                        && let Err(e) = log.opened(ino.0, id.id())
                    {
                        tracing::warn!(error = %e, "cannot record a passthrough backing id; the next daemon may fail opens of this file while it stays open");
                    }
                }),
            };
            match id {
                Ok(id) => {
                    h.by_inode.insert(ino.0, Arc::downgrade(&id));
                    return opened_passthrough(h, fh, id, reply);
                }
                Err(e) => {
                    // E.g. ELOOP: the store is on a stacked filesystem. Serve by pread instead.
                    tracing::warn!(error = %e, "FUSE passthrough refused by the kernel; serving cached files by read instead");
                    self.passthrough_on
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        h.files.insert(fh, (ino.0, Arc::new(file)));
        *h.cached_io.entry(ino.0).or_default() += 1;
        drop(h);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE | NOFLUSH)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if h.files.get(&fh.0).is_some_and(|(i, _)| *i == ino.0) {
            h.files.remove(&fh.0);
        }
        let backing = h.backing.remove(&fh.0);
        let was_cached = backing.is_none();
        if let Some(id) = &backing
            && Arc::strong_count(id) == 1
            && let Some(log) = h.log.as_mut()
        {
            // The last handle: the id is closed when `backing` drops, recorded just before.
            tracing::debug!(ino = ino.0, backing = id.id(), "backing id closed");
            if let Err(e) = log.closing(ino.0, id.id()) {
                tracing::warn!(error = %e, "cannot record a closed passthrough backing id");
            }
        }
        drop(backing);
        if was_cached && let Some(n) = h.cached_io.get_mut(&ino.0) {
            *n -= 1;
            if *n == 0 {
                h.cached_io.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        if !self.passthrough_wanted {
            return Ok(());
        }
        // Depth 1: backing files on a real filesystem, and the mount can still be a lower
        // layer of overlayfs (docs/dev/fuser-0.18.md §5).
        let on = config
            .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
            .is_ok()
            && config.set_max_stack_depth(1).is_ok();
        if on {
            tracing::info!(
                "FUSE passthrough on: open files of cached layers are read by the kernel directly"
            );
        } else {
            tracing::info!(
                "the kernel offers no FUSE passthrough; cached files are served by read"
            );
        }
        self.passthrough_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let cached = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .files
            .get(&fh.0)
            .filter(|(i, _)| *i == ino.0)
            .map(|(_, f)| Arc::clone(f));
        if let Some(file) = cached {
            // A local file: pread off the session thread like every other read.
            self.rt.spawn_blocking(move || {
                let mut buf = vec![0u8; size as usize];
                let mut got = 0;
                while got < buf.len() {
                    match file.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return reply.error(Errno::from(e)),
                    }
                }
                reply.data(&buf[..got])
            });
            return;
        }
        let Some((layer_idx, local)) = split(ino.0) else {
            return reply.error(Errno::EISDIR);
        };
        let Some(layer) = self.table.get(layer_idx) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(entry_idx) = layer.view().tree().get(local).and_then(|n| n.entry) else {
            // Empty files have no content entry.
            return reply.data(&[]);
        };
        let reader = Arc::clone(&self.reader);
        self.rt.spawn(async move {
            match reader.read(&layer, entry_idx, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(err) => {
                    let path = layer.view().entries().get(entry_idx).map(|e| e.path.clone()).unwrap_or_default();
                    tracing::error!(layer = %layer.digest, file = path, offset, error = %err, "read failed");
                    reply.error(Errno::from_i32(err.errno()))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Files opened before FOPEN_NOFLUSH (or by kernels without it): ENOSYS makes the
        // kernel stop sending FLUSH for good.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(u64, FileType, String)> = vec![];
        if ino.0 == ROOT {
            // Every layer with a verified TOC, loaded on the way.
            let names: Vec<String> = lock(&self.db)
                .list_images()
                .map(|imgs| {
                    imgs.into_iter()
                        .flat_map(|i| i.layers)
                        .filter(|l| l.toc_entries.is_some() || l.index_digest.is_some())
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
                    entries.push((join(i, ROOT), FileType::Directory, hex));
                }
            }
        } else {
            let Some((layer, local)) = split(ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            let Some(l) = self.table.get(layer) else {
                return reply.error(Errno::ENOENT);
            };
            // A listing is complete once the stream has left the directory (the first call
            // only: the kernel reads on from an offset).
            if offset == 0
                && let Some(dir) = self.stream_dir(&l, local)
                && let Err(e) = self.settle(&l, |st| st.left(&dir))
            {
                return reply.error(e);
            }
            let view = l.view();
            let Some(node) = view.tree().get(local) else {
                return reply.error(Errno::ENOENT);
            };
            if node.kind != NodeKind::Dir {
                return reply.error(Errno::ENOTDIR);
            }
            for (name, &child) in &node.children {
                if let Some(c) = view.tree().get(child) {
                    entries.push((join(layer, child), file_type(c.kind), name.clone()));
                }
            }
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let layer = split(ino.0).and_then(|(l, n)| Some((self.table.get(l)?, n)));
        if let Some((l, n)) = &layer
            && let Err(e) = self.dir_settled(l, *n)
        {
            return reply.error(e);
        }
        let value = layer.and_then(|(l, n)| {
            let view = l.view();
            let node = view.tree().get(n)?;
            node.xattrs
                .iter()
                .find(|(k, _)| OsStr::new(k) == name)
                .map(|(_, v)| v.clone())
        });
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if (size as usize) < v.len() => reply.error(Errno::ERANGE),
            Some(v) => reply.data(&v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut names = vec![];
        if let Some((l, n)) = split(ino.0)
            && let Some(l) = self.table.get(l)
        {
            if let Err(e) = self.dir_settled(&l, n) {
                return reply.error(e);
            }
            let view = l.view();
            let Some(node) = view.tree().get(n) else {
                return reply.error(Errno::ENOENT);
            };
            for (k, _) in &node.xattrs {
                names.extend_from_slice(k.as_bytes());
                names.push(0);
            }
        }
        if size == 0 {
            reply.size(names.len() as u32)
        } else if (size as usize) < names.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&names)
        }
    }
}

/// A mounted layer filesystem; unmounts on `unmount_within` (or drop), unless running
/// containers use it and a holder keeps it for the next daemon (module `handover`).
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: std::path::PathBuf,
    /// Set when a holder process keeps the connection for the next daemon.
    handover: Option<Paths>,
    handover_broken: Arc<std::sync::atomic::AtomicBool>,
    /// Whether this process resumed a mount (its fuser session did not mount it).
    pub resumed: bool,
}

/// Why a mount a holder keeps cannot be resumed, if it cannot.
fn unresumable(
    held: &handover::Held,
    fd: &std::os::fd::OwnedFd,
    mountpoint: &std::path::Path,
) -> Option<String> {
    use std::os::fd::AsFd;
    if held.mountpoint != mountpoint {
        return Some(format!("it is mounted at {}", held.mountpoint.display()));
    }
    if !handover::connection_alive(fd.as_fd()) {
        return Some("its connection has ended".into());
    }
    if handover::mount_dev(mountpoint).as_deref() != Some(held.dev.as_str()) {
        return Some("it is no longer at the mountpoint".into());
    }
    None
}

impl Mount {
    /// Mount at `mountpoint` (created if missing), or with `handover`, resume the mount a
    /// previous daemon left to a holder process: running containers then keep their layers.
    /// Our own mounts left there by a crashed daemon without a holder are detached first: a
    /// stat cannot tell them dead, the kernel may answer from its cache. The caller holds the
    /// store lock, so no live daemon of this store uses the mountpoint.
    pub fn start(
        mut fs: LayerFs,
        mountpoint: &std::path::Path,
        threads: usize,
        handover: bool,
    ) -> std::io::Result<Mount> {
        let paths = Paths::for_mountpoint(mountpoint);
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("lazypull".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
        ];
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(threads);
        // Cloned descriptors die with this process, and the kernel fails the requests read on
        // them (ECONNABORTED). On the one shared descriptor the holder keeps, requests in flight
        // at a restart stay queued and are sent again to the next daemon.
        cfg.clone_fd = !handover;
        let broken = Arc::clone(&fs.table.handover_broken);
        if handover {
            match handover::take(&paths.socket) {
                Ok(Some((fd, held))) => {
                    let layers = std::fs::read_to_string(&paths.layers)
                        .ok()
                        .and_then(|t| handover::parse_layer_list(&t));
                    let why = unresumable(&held, &fd, mountpoint).or_else(|| {
                        layers.is_none().then(|| {
                            format!("its layer list {} is unreadable", paths.layers.display())
                        })
                    });
                    match (why, layers) {
                        (None, Some(names)) => {
                            return Self::resume(fs, fd, held, names, &paths, cfg, broken);
                        }
                        (why, _) => {
                            tracing::warn!(mountpoint = %mountpoint.display(), reason = why.unwrap_or_default(),
                                "cannot resume the layer filesystem a previous run left; mounting afresh (containers still on the old one lose their lazy layers)");
                            handover::release(&paths.socket);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(socket = %paths.socket.display(), error = %e, "the fuse holder did not answer; mounting afresh");
                    handover::release(&paths.socket);
                }
            }
        }
        for _ in 0..16 {
            if handover::mount_dev(mountpoint).is_none() {
                break;
            }
            tracing::warn!(mountpoint = %mountpoint.display(), "detaching a layer filesystem left by a previous run");
            if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
                return Err(std::io::Error::other(format!(
                    "cannot detach the stale mount at {}: {e}",
                    mountpoint.display()
                )));
            }
        }
        std::fs::create_dir_all(mountpoint)?;
        let list = if handover {
            match std::fs::File::create(&paths.layers) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(path = %paths.layers.display(), error = %e,
                        "cannot write the layer list; running containers will not survive a restart");
                    None
                }
            }
        } else {
            None
        };
        let handover = list.is_some();
        if let Some(f) = list {
            fs.table.persist(f);
            match handover::BackingLog::create(&paths.backing) {
                Ok(log) => fs.persist_backing(log),
                Err(e) => {
                    // Without it, a restart could not reopen files a container holds by
                    // passthrough: serve cached files by read instead.
                    tracing::warn!(path = %paths.backing.display(), error = %e,
                        "cannot write the backing id log; FUSE passthrough off");
                    fs.passthrough_wanted = false;
                }
            }
        }
        let passthrough = fs.passthrough_flag();
        let session = fuser::Session::new(fs, mountpoint, &cfg)?;
        let mut held_by = None;
        if handover {
            use std::os::fd::AsFd;
            let held = handover::mount_dev(mountpoint).map(|dev| handover::Held {
                mountpoint: mountpoint.to_path_buf(),
                dev,
                proto: session.proto_version().unwrap_or((7, 31)),
                passthrough: passthrough.load(std::sync::atomic::Ordering::Relaxed),
            });
            let spawned = match held {
                Some(h) => handover::spawn_holder(&paths.socket, session.as_fd(), &h),
                None => Err(handover::HandoverError::Protocol(
                    "the new mount is not in mountinfo".into(),
                )),
            };
            match spawned {
                Ok(()) => {
                    tracing::info!(socket = %paths.socket.display(), "a fuse holder keeps the connection: running containers survive restarts");
                    held_by = Some(paths);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the fuse holder; running containers will not survive a restart")
                }
            }
        }
        Ok(Mount {
            session: Some(session.spawn()?),
            mountpoint: mountpoint.to_path_buf(),
            handover: held_by,
            handover_broken: broken,
            resumed: false,
        })
    }

    fn resume(
        fs: LayerFs,
        fd: std::os::fd::OwnedFd,
        held: handover::Held,
        names: Vec<String>,
        paths: &Paths,
        cfg: fuser::Config,
        broken: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<Mount> {
        use std::os::fd::AsFd;
        let list = std::fs::OpenOptions::new()
            .append(true)
            .open(&paths.layers)?;
        let backing = match handover::BackingLog::resume(&paths.backing) {
            Ok(b) => {
                if !b.1.is_empty() {
                    tracing::info!(
                        inodes = b.1.len(),
                        "files open by passthrough under the previous run keep their backing files"
                    );
                }
                Some(b)
            }
            Err(e) => {
                tracing::warn!(path = %paths.backing.display(), error = %e,
                    "cannot read the backing id log; FUSE passthrough off for this run");
                None
            }
        };
        let n = names.len();
        fs.adopt(names, list, held.passthrough, backing);
        let acl = cfg.acl;
        let session = fuser::Session::from_fd_initialized(fs, fd, acl, cfg, held.proto);
        match handover::resend(session.as_fd()) {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e,
                "the kernel cannot resend requests a previous run read but did not answer (Linux < 6.9); those reads may hang"),
        }
        tracing::info!(mountpoint = %held.mountpoint.display(), layers = n, passthrough = held.passthrough,
            "resumed the layer filesystem a previous run left: running containers keep their lazy layers");
        Ok(Mount {
            session: Some(session.spawn()?),
            mountpoint: held.mountpoint,
            handover: Some(paths.clone()),
            handover_broken: broken,
            resumed: true,
        })
    }

    /// Stop serving. Without running containers on it, the filesystem is unmounted (and the
    /// holder, if any, released). With running containers and a holder, it stays mounted for
    /// the next daemon: their reads wait until it resumes. With running containers and no
    /// holder, they are served for at most `grace`; when this process exits the kernel aborts
    /// the connection and they get ENOTCONN (README, "Restarts").
    ///
    /// `users` counts what the caller knows stands on the mount (containers' snapshots on lazy
    /// layers). It matters because a busy umount is no sign of them: overlayfs holds private
    /// clones of its lower mounts, so our mount unmounts fine under running containers, and only
    /// the connection stays alive for them. Overlays in our namespace over the mountpoint
    /// (`lazypull mount`) are counted here.
    pub fn unmount_within(mut self, grace: std::time::Duration, users: usize) {
        self.stop(grace, users);
    }

    fn stop(&mut self, grace: std::time::Duration, users: usize) {
        let Some(session) = self.session.take() else {
            return;
        };
        if let Some(paths) = self.handover.take() {
            let broken = self
                .handover_broken
                .load(std::sync::atomic::Ordering::Relaxed);
            let users = users + handover::overlays_over(&self.mountpoint);
            let unmounted = match (broken, users) {
                (true, _) => Err("its layer list could not be recorded".to_string()),
                (false, 0) => {
                    match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
                        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(true),
                        Err(nix::errno::Errno::EBUSY) => Ok(false),
                        Err(e) => Err(e.to_string()),
                    }
                }
                (false, _) => Ok(false),
            };
            match unmounted {
                Ok(false) => {
                    tracing::info!(mountpoint = %self.mountpoint.display(), holder = %paths.socket.display(), users,
                        "the layer filesystem is in use (running containers on lazy layers): left mounted for the next start, \
                         which resumes it; their reads wait until then");
                    // Keep the session's threads and descriptors as they are until the process
                    // exits: dropping it would try to unmount.
                    std::mem::forget(session);
                    return;
                }
                Ok(true) => {
                    handover::release(&paths.socket);
                    let _ = std::fs::remove_file(&paths.layers);
                    let _ = std::fs::remove_file(&paths.backing);
                    // The session ends when the kernel ends the connection, at once unless
                    // something we could not see still uses it.
                    match within(grace, move || session.join()) {
                        Some(_) => {
                            tracing::info!(mountpoint = %self.mountpoint.display(), "layer filesystem unmounted")
                        }
                        None => {
                            tracing::warn!(mountpoint = %self.mountpoint.display(), grace = ?grace,
                            "unmounted, but something still uses the layer filesystem; it loses it when this process exits")
                        }
                    }
                    return;
                }
                Err(why) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), reason = why,
                        "cannot leave the layer filesystem to the next start");
                    handover::release(&paths.socket);
                    let _ = std::fs::remove_file(&paths.layers);
                    let _ = std::fs::remove_file(&paths.backing);
                }
            }
        }
        match within(grace, move || session.umount_and_join()) {
            Some(Ok(())) => {
                tracing::info!(mountpoint = %self.mountpoint.display(), "layer filesystem unmounted")
            }
            Some(Err(e)) => {
                // EINVAL: already unmounted from outside. EBUSY: still in use: detach it, the
                // kernel finishes once the last user goes.
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount; detaching");
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
            None => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), grace = ?grace,
                    "the layer filesystem is still in use (running containers on lazy layers): \
                     detached; they lose it when this process exits");
            }
        }
    }
}

/// Run `f` on a thread and wait at most `grace` for its result (None past it; the thread is
/// left to finish on its own).
fn within<T: Send + 'static>(
    grace: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(grace).ok()
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(10), 0);
    }
}
