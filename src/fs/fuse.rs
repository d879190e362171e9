//! The daemon's FUSE filesystem (the only file that knows fuser): one read-only mount with a
//! directory per eStargz layer, named by the layer digest's hex. A layer directory appears when
//! first looked up (its verified TOC is loaded from the store) and is then served from the
//! in-memory tree. File reads never block the session: they run as tokio tasks on the
//! [`Reader`], which takes verified chunks from memory, the local blob or partial file, or the
//! registry, and only then reply.

use super::reader::{LazyLayer, Reader};
use super::tree::{NodeKind, ROOT, Tree};
use crate::layer::estargz;
use crate::oci::Digest;
use crate::store::{Catalogue, LayerRecord, Layout};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr,
    Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Layer content is immutable: long TTLs are safe and spare round trips (overlayfs looks up
/// every name in every lower layer).
const TTL: Duration = Duration::from_secs(3600);
/// Layer directories get inode numbers `(index + 1) << 32 | local inode`.
const LAYER_SHIFT: u32 = 32;

#[derive(Default)]
struct Layers {
    by_hex: HashMap<String, usize>,
    list: Vec<Arc<LazyLayer>>,
}

pub struct LayerFs {
    rt: tokio::runtime::Handle,
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    reader: Arc<Reader>,
    layers: RwLock<Layers>,
    started: SystemTime,
    /// Asked for by the configuration; `passthrough_on` once the kernel agreed at init.
    passthrough_wanted: bool,
    passthrough_on: std::sync::atomic::AtomicBool,
    handles: Mutex<Handles>,
    recorder: Arc<super::record::Recorder>,
}

/// Open files served from the file cache: by passthrough (one backing id per inode, shared by
/// its open handles, closed with the last one) or by pread from the cached file.
#[derive(Default)]
struct Handles {
    next: u64,
    files: HashMap<u64, Arc<std::fs::File>>,
    backing: HashMap<u64, Arc<BackingId>>,
    by_inode: HashMap<u64, std::sync::Weak<BackingId>>,
}

use crate::store::locked as lock;

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
        passthrough: bool,
        recorder: Arc<super::record::Recorder>,
    ) -> Self {
        LayerFs {
            rt: tokio::runtime::Handle::current(),
            layout,
            db,
            reader,
            layers: RwLock::new(Layers::default()),
            started: SystemTime::now(),
            passthrough_wanted: passthrough,
            passthrough_on: std::sync::atomic::AtomicBool::new(false),
            handles: Mutex::new(Handles {
                next: 1,
                ..Default::default()
            }),
            recorder,
        }
    }

    /// The file cache's copy of a regular file, if there is one of the right size (named by
    /// its content digest, so it holds exactly the bytes the TOC or index promises).
    fn cached_file(&self, layer: &LazyLayer, local: u64) -> Option<std::fs::File> {
        let node = layer.tree.get(local)?;
        let entry = layer.toc.entries.get(node.entry?)?;
        let f = std::fs::File::open(self.layout.file(entry.digest.as_ref()?)).ok()?;
        (f.metadata().ok()?.len() == entry.size).then_some(f)
    }

    fn layer(&self, idx: usize) -> Option<Arc<LazyLayer>> {
        self.layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .get(idx)
            .cloned()
    }

    /// Find or load the layer directory `name` (a digest's hex).
    fn layer_by_name(&self, name: &str) -> Option<usize> {
        if let Some(&i) = self
            .layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_hex
            .get(name)
        {
            return Some(i);
        }
        let digest = Digest::parse(&format!("sha256:{name}")).ok()?;
        let rec = lock(&self.db).layer(digest.as_str()).ok().flatten()?;
        let loaded = match self.load(&rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(layer = %digest, error = %e, "cannot mount layer lazily");
                return None;
            }
        };
        let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&i) = layers.by_hex.get(name) {
            return Some(i);
        }
        let i = layers.list.len();
        let loaded = Arc::new(loaded);
        layers.list.push(Arc::clone(&loaded));
        layers.by_hex.insert(name.to_string(), i);
        drop(layers);
        tracing::info!(layer = %digest, "layer mounted");
        let reader = Arc::clone(&self.reader);
        // Files a converter marked as needed at start-up come first (in the background).
        self.rt
            .spawn(async move { reader.prefetch_landmark(&loaded) });
        Some(i)
    }

    fn load(&self, rec: &LayerRecord) -> Result<LazyLayer, String> {
        if rec.toc_entries.is_none()
            && rec.unpacked
            && let Some(index) = rec.index_digest.as_deref()
        {
            // A layer without TOC, complete and unpacked: served from the file cache.
            let index = Digest::parse(index).map_err(|e| e.to_string())?;
            let json = self.layout.read_blob(&index).map_err(|e| e.to_string())?;
            let entries =
                crate::layer::tar::decode_index(&json, &crate::layer::tar::Limits::default())
                    .map_err(|e| e.to_string())?;
            let tree = Tree::from_entries(&entries).map_err(|e| e.to_string())?;
            let toc = estargz::Toc {
                digest: index,
                toc_offset: 0,
                entries,
                prefetch_landmark: None,
            };
            return Ok(LazyLayer::new(
                rec.digest().map_err(|e| e.to_string())?,
                rec.source.clone(),
                rec.size,
                toc,
                tree,
            ));
        }
        let (Some(_), Some(toc_offset), Some(toc_digest)) =
            (rec.toc_entries, rec.toc_offset, rec.toc_digest.as_deref())
        else {
            return Err("no verified TOC (not an eStargz layer, or not fetched yet) and not unpacked (a plain layer not fetched yet)".into());
        };
        let toc_digest = Digest::parse(toc_digest).map_err(|e| e.to_string())?;
        let json = self
            .layout
            .read_blob(&toc_digest)
            .map_err(|e| e.to_string())?;
        let toc = crate::layer::parse_stored_toc(
            &json,
            &toc_digest,
            rec.toc_position.as_deref(),
            rec.size,
            toc_offset,
        )?;
        let tree = Tree::from_entries(&toc.entries).map_err(|e| e.to_string())?;
        Ok(LazyLayer::new(
            rec.digest().map_err(|e| e.to_string())?,
            rec.source.clone(),
            rec.size,
            toc,
            tree,
        ))
    }

    fn root_attr(&self) -> FileAttr {
        let n = self
            .layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .len() as u32;
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
        let l = self.layer(layer)?;
        let n = l.tree.get(local)?;
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
            return match self.layer_by_name(name).and_then(|i| self.attr(i, ROOT)) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let Some((layer, local)) = split(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(l) = self.layer(layer) else {
            return reply.error(Errno::ENOENT);
        };
        match l
            .tree
            .lookup(local, name)
            .and_then(|n| self.attr(layer, n.ino))
        {
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
            self.layer(l)
                .and_then(|l| l.tree.get(n).map(|n| n.link.clone()))
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
            && let Some(layer) = self.layer(l)
            && let Some(entry) = layer.tree.get(n).and_then(|node| node.entry)
            && let Some(e) = layer.toc.entries.get(entry)
        {
            self.recorder.opened(layer.digest.hex(), &e.path);
        }
        let cached =
            split(ino.0).and_then(|(l, n)| self.layer(l).and_then(|l| self.cached_file(&l, n)));
        let Some(file) = cached else {
            // Not in the file cache: reads go through the chunk reader.
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        };
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let fh = h.next;
        h.next += 1;
        if self
            .passthrough_on
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // One backing id per inode, shared by its open handles.
            let existing = h.by_inode.get(&ino.0).and_then(std::sync::Weak::upgrade);
            let id = match existing {
                Some(id) => Ok(id),
                None => reply.open_backing(&file).map(Arc::new),
            };
            match id {
                Ok(id) => {
                    h.by_inode.insert(ino.0, Arc::downgrade(&id));
                    h.backing.insert(fh, Arc::clone(&id));
                    drop(h);
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                }
                Err(e) => {
                    // E.g. ELOOP: the store is on a stacked filesystem. Serve by pread instead.
                    tracing::warn!(error = %e, "FUSE passthrough refused by the kernel; serving cached files by read instead");
                    self.passthrough_on
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        h.files.insert(fh, Arc::new(file));
        drop(h);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        h.files.remove(&fh.0);
        h.backing.remove(&fh.0);
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
            .cloned();
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
        let Some(layer) = self.layer(layer_idx) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(entry_idx) = layer.tree.get(local).and_then(|n| n.entry) else {
            // Empty files have no content entry.
            return reply.data(&[]);
        };
        let reader = Arc::clone(&self.reader);
        self.rt.spawn(async move {
            match reader.read(&layer, entry_idx, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(err) => {
                    let path = layer.toc.entries.get(entry_idx).map(|e| e.path.as_str()).unwrap_or("?");
                    tracing::error!(layer = %layer.digest, file = path, offset, error = %err, "read failed");
                    reply.error(Errno::EIO)
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
        reply.ok();
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
                    && let Some(i) = self.layer_by_name(&hex)
                {
                    entries.push((join(i, ROOT), FileType::Directory, hex));
                }
            }
        } else {
            let Some((layer, local)) = split(ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            let Some(l) = self.layer(layer) else {
                return reply.error(Errno::ENOENT);
            };
            let Some(node) = l.tree.get(local) else {
                return reply.error(Errno::ENOENT);
            };
            if node.kind != NodeKind::Dir {
                return reply.error(Errno::ENOTDIR);
            }
            for (name, &child) in &node.children {
                if let Some(c) = l.tree.get(child) {
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
        let value = split(ino.0).and_then(|(l, n)| {
            let l = self.layer(l)?;
            let node = l.tree.get(n)?;
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
            && let Some(l) = self.layer(l)
            && let Some(node) = l.tree.get(n)
        {
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

/// Whether `/proc/self/mountinfo` shows a lazypull FUSE mount at `path`.
fn is_our_mount(path: &std::path::Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut halves = l.splitn(2, " - ");
            let (left, right) = (
                halves.next().unwrap_or_default(),
                halves.next().unwrap_or_default(),
            );
            let mut r = right.split(' ');
            let (fstype, source) = (r.next().unwrap_or_default(), r.next().unwrap_or_default());
            left.split(' ').nth(4) == Some(want.as_str())
                && fstype.starts_with("fuse")
                && source == "lazypull"
        })
}

/// A mounted layer filesystem; unmounts on `unmount` (or drop).
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: std::path::PathBuf,
}

impl Mount {
    /// Mount at `mountpoint` (created if missing). Our own mounts left there by a crashed daemon
    /// are detached first: a stat cannot tell them dead, the kernel may answer from its cache.
    /// The caller holds the store lock, so no live daemon of this store uses the mountpoint.
    pub fn start(
        fs: LayerFs,
        mountpoint: &std::path::Path,
        threads: usize,
    ) -> std::io::Result<Mount> {
        for _ in 0..16 {
            if !is_our_mount(mountpoint) {
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
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("lazypull".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
        ];
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(threads);
        cfg.clone_fd = true;
        let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
        Ok(Mount {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// Unmount, and serve the users that still hold the (then detached) filesystem for at most
    /// `grace`: overlay mounts of running containers keep the FUSE connection alive after the
    /// unmount, and the session only ends when the last of them goes. Past `grace` the process
    /// moves on; when it exits, the kernel aborts the connection and those containers get
    /// ENOTCONN for what they had not read (README, "Restarts").
    pub fn unmount_within(mut self, grace: std::time::Duration) {
        self.stop(grace);
    }

    fn stop(&mut self, grace: std::time::Duration) {
        let Some(session) = self.session.take() else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let unmounting = std::thread::spawn(move || {
            let _ = tx.send(session.umount_and_join());
        });
        match rx.recv_timeout(grace) {
            Ok(Ok(())) => {
                let _ = unmounting.join();
                tracing::info!(mountpoint = %self.mountpoint.display(), "layer filesystem unmounted")
            }
            Ok(Err(e)) => {
                let _ = unmounting.join();
                // EINVAL: already unmounted from outside. EBUSY: still in use: detach it, the
                // kernel finishes once the last user goes.
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount; detaching");
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
            Err(_) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), grace = ?grace,
                    "the layer filesystem is still in use (running containers on lazy layers): \
                     detached; they lose it when this process exits");
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(10));
    }
}
