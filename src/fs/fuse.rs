//! The daemon's FUSE adapter (with `mount.rs`, the only files that know fuser): it asks the
//! kernel-free logic (`ops.rs` for the namespace, `handles.rs` for how an open is served) and
//! turns its typed answers into replies. One read-only mount with a directory per lazily
//! served layer, named by the layer digest's hex. File reads never block the session: they run
//! as tokio tasks on the [`Reader`], which takes verified chunks from memory, the local blob or
//! partial file, or the registry, and only then reply.

use super::handles::{Backing, Handles, Plan};
use super::handover;
use super::layers::LayerTable;
use super::ops::{Attr, FsError, Namespace, OpenTarget};
use super::tree::NodeKind;
use crate::access::reader::Reader;
use crate::store::{Catalogue, Layout};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr,
    Request,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Layer content is immutable: long TTLs are safe and spare round trips (overlayfs looks up
/// every name in every lower layer).
const TTL: Duration = Duration::from_secs(3600);
/// Read-only files have nothing to flush: no FLUSH round trip at every close(2), and no close
/// (nor an exec of a process holding the file) that waits while the daemon restarts.
const NOFLUSH: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

impl Backing for BackingId {
    fn id(&self) -> u32 {
        BackingId::id(self)
    }
}

pub struct LayerFs {
    rt: tokio::runtime::Handle,
    ns: Namespace,
    reader: Arc<Reader>,
    pub(super) table: Arc<LayerTable>,
    /// Asked for by the configuration; `passthrough_on` once the kernel agreed at init.
    pub(super) passthrough_wanted: bool,
    passthrough_on: Arc<AtomicBool>,
    handles: Mutex<Handles<BackingId>>,
    /// Layers with an index below this were served by a previous daemon of this mount: their
    /// inodes may have page-cache opens this process never saw, so their cached files are read
    /// by pread, never passed through (`handles.rs`).
    adopted: AtomicUsize,
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
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

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: nix::sys::stat::makedev(a.rdev.0 as u64, a.rdev.1 as u64) as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// Answer an open with handle `fh` passed through to backing `id`, which the handle table
/// keeps. The reply goes out under the lock and our reference is dropped first (see
/// `Handles::passed_through`).
fn opened_passthrough(
    mut h: std::sync::MutexGuard<'_, Handles<BackingId>>,
    fh: u64,
    id: Arc<BackingId>,
    reply: ReplyOpen,
) {
    h.passed_through(fh, Arc::clone(&id));
    reply.opened_passthrough(FileHandle(fh), NOFLUSH, &id);
    drop(id);
    drop(h);
}

/// Reply with `data` sized for a getxattr/listxattr buffer of `size` (0: the size only).
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32)
    } else if (size as usize) < data.len() {
        reply.error(errno(FsError::Range))
    } else {
        reply.data(data)
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
            ns: Namespace::new(layout, db, Arc::clone(&table), reader.timeout(), recorder),
            reader,
            table,
            passthrough_wanted: passthrough,
            passthrough_on: Arc::new(AtomicBool::new(false)),
            handles: Mutex::new(Handles::default()),
            adopted: AtomicUsize::new(0),
        }
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, Handles<BackingId>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the backing ids given out from now on (a fresh mount that can be handed over).
    pub fn persist_backing(&self, log: handover::BackingLog) {
        self.handles().log = Some(log);
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
            let mut h = self.handles();
            h.log = Some(log);
            h.adopted_ids = ids;
        }
        self.adopted.store(names.len(), Ordering::Relaxed);
        self.table.adopt(names, file);
        // Only where the kernel agreed at INIT, and only if this run's configuration wants it.
        self.passthrough_on
            .store(passthrough && self.passthrough_wanted, Ordering::Relaxed);
    }

    /// Whether the kernel agreed to passthrough (known once the session is initialised).
    pub fn passthrough_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.passthrough_on)
    }
}

impl fuser::Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.ns.lookup(parent.0, name) {
            Ok(Some(a)) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            // Negative entries are cached too (inode 0): layers never change.
            Ok(None) => {
                let mut a = file_attr(&self.ns.root_attr());
                a.ino = INodeNo(0);
                reply.entry(&TTL, &a, Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ns.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ns.readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != fuser::OpenAccMode::O_RDONLY;
        let file = match self.ns.open(ino.0, write) {
            Ok(OpenTarget::Cached(f)) => f,
            Ok(OpenTarget::Chunks) => {
                self.handles().open_uncached(ino.0);
                return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | NOFLUSH);
            }
            Err(e) => return reply.error(errno(e)),
        };
        let passthrough = self.passthrough_on.load(Ordering::Relaxed);
        let adopted_layer = Namespace::is_adopted(ino.0, self.adopted.load(Ordering::Relaxed));
        let mut h = self.handles();
        let fh = match h.plan(ino.0, passthrough, adopted_layer) {
            Plan::Share { fh, id } => return opened_passthrough(h, fh, id, reply),
            Plan::Wrap { fh, raw } => {
                tracing::debug!(
                    ino = ino.0,
                    backing = raw,
                    "open by passthrough with a previous run's backing id"
                );
                // SAFETY: `raw` was registered on this connection by a previous daemon and
                // never closed (the log records a close before it happens); this process keeps
                // it open until the connection ends (`Handles::adopted_wrapped`).
                let id = Arc::new(unsafe { reply.wrap_backing(raw) });
                h.adopted_wrapped(ino.0, &id);
                return opened_passthrough(h, fh, id, reply);
            }
            Plan::Register { fh } => match reply.open_backing(&file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    h.registered(ino.0, &id);
                    return opened_passthrough(h, fh, id, reply);
                }
                Err(e) => {
                    // E.g. ELOOP: the store is on a stacked filesystem. Serve by pread instead.
                    tracing::warn!(error = %e, "FUSE passthrough refused by the kernel; serving cached files by read instead");
                    self.passthrough_on.store(false, Ordering::Relaxed);
                    fh
                }
            },
            Plan::Pread { fh } => fh,
        };
        h.serve_by_pread(fh, ino.0, file);
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
        self.handles().release(ino.0, fh.0);
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
        let cached = self.handles().pread_file(fh.0, ino.0);
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
        let (layer, entry_idx) = match self.ns.content(ino.0) {
            Ok(Some(c)) => c,
            // Empty files have no content entry.
            Ok(None) => return reply.data(&[]),
            Err(e) => return reply.error(errno(e)),
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
        let entries = match self.ns.readdir(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, e) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, file_type(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.ns.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => reply_sized(reply, size, &v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.ns.listxattr(ino.0) {
            Ok(names) => reply_sized(reply, size, &names),
            Err(e) => reply.error(errno(e)),
        }
    }
}
