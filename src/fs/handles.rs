//! Open files of the FUSE mount and how each is served, without a kernel: the chunk reader
//! (files not in the file cache), pread from the cached file, or FUSE passthrough (the kernel
//! reads the cached file itself through a backing id).
//!
//! The rules, each learnt from a kernel that said no:
//! - One backing id per inode, shared by its open handles and closed with the last one.
//! - The kernel refuses (EIO) a passthrough open of an inode it already serves through its
//!   page cache (an open by the chunk reader or by pread, e.g. the busybox binary a shell runs
//!   from before its layer was unpacked, exec'd again after): such inodes stay on pread.
//! - After a restart the kernel still holds the previous daemon's handles: layers it served
//!   (index below `adopted`) may have page-cache opens this process never saw, so they are
//!   never passed through; and an inode the previous daemon passed through must keep the same
//!   backing id (`adopted_ids`) or its opens fail.
//!
//! `fuse.rs` asks [`Handles::plan`], does what it says with the kernel (registering a backing
//! id, answering the open), and reports back.

use super::handover::BackingLog;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

/// A kernel backing id (fuser's `BackingId`; closed when dropped). A trait so the policy runs
/// in tests without a kernel.
pub trait Backing {
    fn id(&self) -> u32;
}

/// How to answer an open of a cached file (files not in the cache always go to the chunk
/// reader: [`Handles::open_uncached`]).
pub enum Plan<B> {
    /// Serve by pread under handle `fh`: then [`Handles::serve_by_pread`].
    Pread { fh: u64 },
    /// Pass through with this backing id under `fh`: then [`Handles::passed_through`].
    Share { fh: u64, id: Arc<B> },
    /// Pass through with the id `raw` a previous daemon registered on this connection: wrap it
    /// (`reply.wrap_backing`), then [`Handles::adopted_wrapped`] and [`Handles::passed_through`].
    Wrap { fh: u64, raw: u32 },
    /// Register a backing id for the file: then [`Handles::registered`] and
    /// [`Handles::passed_through`], or if the kernel refuses, [`Handles::serve_by_pread`].
    Register { fh: u64 },
}

pub struct Handles<B> {
    next: u64,
    /// Files served by pread: handle → (inode, file).
    files: HashMap<u64, (u64, Arc<std::fs::File>)>,
    /// Handles passed through, with their backing id.
    backing: HashMap<u64, Arc<B>>,
    by_inode: HashMap<u64, Weak<B>>,
    /// Open handles per inode that the kernel serves through its page cache.
    cached_io: HashMap<u64, usize>,
    /// Where backing ids are recorded for the next daemon (a mount that can be handed over).
    pub(super) log: Option<BackingLog>,
    /// Backing ids a previous daemon of this connection left open, per inode. Kept open
    /// (`adopted_backing`) until the connection ends.
    pub(super) adopted_ids: BTreeMap<u64, u32>,
    adopted_backing: HashMap<u64, Arc<B>>,
}

impl<B> Default for Handles<B> {
    fn default() -> Self {
        Handles {
            next: first_handle(),
            files: HashMap::new(),
            backing: HashMap::new(),
            by_inode: HashMap::new(),
            cached_io: HashMap::new(),
            log: None,
            adopted_ids: BTreeMap::new(),
            adopted_backing: HashMap::new(),
        }
    }
}

/// Handle numbers start from the clock (µs since the epoch, shifted), so a restarted daemon
/// does not hand out the numbers its predecessor's open files still carry.
fn first_handle() -> u64 {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    (us << 8).max(1)
}

impl<B: Backing> Handles<B> {
    /// An open of `ino`, not in the file cache: read through the chunk reader (handle 0, the
    /// kernel's page cache).
    pub fn open_uncached(&mut self, ino: u64) {
        *self.cached_io.entry(ino).or_default() += 1;
    }

    /// An open of `ino`, whose cached copy exists. `passthrough`: the kernel agreed to it and it
    /// still works; `adopted_layer`: the inode's layer was served by a previous daemon.
    pub fn plan(&mut self, ino: u64, passthrough: bool, adopted_layer: bool) -> Plan<B> {
        let fh = self.next;
        self.next += 1;
        if passthrough && let Some(&raw) = self.adopted_ids.get(&ino) {
            // Opened by passthrough under a previous daemon: the same backing id, or EIO.
            return match self.adopted_backing.get(&ino) {
                Some(id) => Plan::Share {
                    fh,
                    id: Arc::clone(id),
                },
                None => Plan::Wrap { fh, raw },
            };
        }
        if passthrough && !self.cached_io.contains_key(&ino) && !adopted_layer {
            return match self.by_inode.get(&ino).and_then(Weak::upgrade) {
                Some(id) => Plan::Share { fh, id },
                None => Plan::Register { fh },
            };
        }
        Plan::Pread { fh }
    }

    /// A previous daemon's id, wrapped: kept until the connection ends.
    pub fn adopted_wrapped(&mut self, ino: u64, id: &Arc<B>) {
        self.adopted_backing.insert(ino, Arc::clone(id));
    }

    /// A new backing id for `ino`: shared by its next opens, recorded for the next daemon.
    pub fn registered(&mut self, ino: u64, id: &Arc<B>) {
        tracing::debug!(ino, backing = id.id(), "backing id registered");
        if let Some(log) = self.log.as_mut()
            && let Err(e) = log.opened(ino, id.id())
        {
            tracing::warn!(error = %e, "cannot record a passthrough backing id; the next daemon may fail opens of this file while it stays open");
        }
        self.by_inode.insert(ino, Arc::downgrade(id));
    }

    /// Handle `fh` is answered with passthrough on `id`. The caller replies while it holds
    /// this table (and drops its own reference first): a RELEASE of the handle must find the
    /// table's reference the last one, so that the id closes in `release`, after its close
    /// is recorded for the next daemon.
    pub fn passed_through(&mut self, fh: u64, id: Arc<B>) {
        self.backing.insert(fh, id);
    }

    /// Handle `fh` of `ino` is served by pread from `file`.
    pub fn serve_by_pread(&mut self, fh: u64, ino: u64, file: std::fs::File) {
        self.files.insert(fh, (ino, Arc::new(file)));
        *self.cached_io.entry(ino).or_default() += 1;
    }

    /// The file a read of handle `fh` of `ino` preads from, if it is served so.
    pub fn pread_file(&self, fh: u64, ino: u64) -> Option<Arc<std::fs::File>> {
        self.files
            .get(&fh)
            .filter(|(i, _)| *i == ino)
            .map(|(_, f)| Arc::clone(f))
    }

    /// The kernel closed handle `fh` of `ino` (0 for the chunk reader's). A backing id whose
    /// last handle this was closes here, after its close is recorded.
    pub fn release(&mut self, ino: u64, fh: u64) {
        if self.files.get(&fh).is_some_and(|(i, _)| *i == ino) {
            self.files.remove(&fh);
        }
        let backing = self.backing.remove(&fh);
        let was_cached = backing.is_none();
        if let Some(id) = &backing
            && Arc::strong_count(id) == 1
            && let Some(log) = self.log.as_mut()
        {
            tracing::debug!(ino, backing = id.id(), "backing id closed");
            if let Err(e) = log.closing(ino, id.id()) {
                tracing::warn!(error = %e, "cannot record a closed passthrough backing id");
            }
        }
        drop(backing);
        if was_cached && let Some(n) = self.cached_io.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                self.cached_io.remove(&ino);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A backing id that counts its closes.
    struct Fake(u32, Arc<AtomicUsize>);
    impl Backing for Fake {
        fn id(&self) -> u32 {
            self.0
        }
    }
    impl Drop for Fake {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn file() -> std::fs::File {
        tempfile::tempfile().unwrap()
    }

    /// Open `ino` by passthrough as `fuse.rs` does: the handle number.
    fn open(h: &mut Handles<Fake>, ino: u64, closed: &Arc<AtomicUsize>) -> (u64, &'static str) {
        match h.plan(ino, true, false) {
            Plan::Register { fh } => {
                let id = Arc::new(Fake(ino as u32, Arc::clone(closed)));
                h.registered(ino, &id);
                h.passed_through(fh, id);
                (fh, "register")
            }
            Plan::Share { fh, id } => {
                h.passed_through(fh, id);
                (fh, "share")
            }
            Plan::Wrap { fh, raw } => {
                let id = Arc::new(Fake(raw, Arc::clone(closed)));
                h.adopted_wrapped(ino, &id);
                h.passed_through(fh, id);
                (fh, "wrap")
            }
            Plan::Pread { fh } => {
                h.serve_by_pread(fh, ino, file());
                (fh, "pread")
            }
        }
    }

    #[test]
    fn one_backing_id_per_inode_closed_with_its_last_handle() {
        let closed = Arc::new(AtomicUsize::new(0));
        let mut h = Handles::default();
        let (a, how) = open(&mut h, 7, &closed);
        assert_eq!(how, "register");
        let (b, how) = open(&mut h, 7, &closed);
        assert_eq!(how, "share");
        assert_ne!(a, b);
        h.release(7, a);
        assert_eq!(closed.load(Ordering::SeqCst), 0, "still open by b");
        h.release(7, b);
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        // Opened again: a new id.
        let (c, how) = open(&mut h, 7, &closed);
        assert_eq!(how, "register");
        h.release(7, c);
        assert_eq!(closed.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_inode_the_page_cache_serves_is_not_passed_through_until_those_opens_close() {
        let closed = Arc::new(AtomicUsize::new(0));
        let mut h = Handles::default();
        // Opened before its layer was unpacked: the chunk reader (handle 0).
        h.open_uncached(9);
        let (fh, how) = open(&mut h, 9, &closed);
        assert_eq!(
            how, "pread",
            "the kernel would refuse a passthrough open (EIO)"
        );
        assert!(h.pread_file(fh, 9).is_some());
        assert!(h.pread_file(fh, 10).is_none(), "a handle of another inode");
        h.release(9, 0);
        assert_eq!(
            open(&mut h, 9, &closed).1,
            "pread",
            "the pread handle is open"
        );
        h.release(9, fh);
        h.release(9, fh + 1);
        assert_eq!(open(&mut h, 9, &closed).1, "register");
    }

    #[test]
    fn a_previous_daemons_layers_and_ids() {
        let closed = Arc::new(AtomicUsize::new(0));
        let mut h: Handles<Fake> = Handles::default();
        // A layer the previous daemon served: never passed through.
        assert!(matches!(h.plan(3, true, true), Plan::Pread { .. }));
        // Passthrough off: pread.
        assert!(matches!(h.plan(4, false, false), Plan::Pread { .. }));
        // An inode it passed through keeps its id, wrapped once and then shared.
        h.adopted_ids.insert(5, 42);
        let (a, how) = open(&mut h, 5, &closed);
        assert_eq!(how, "wrap");
        let (b, how) = open(&mut h, 5, &closed);
        assert_eq!(how, "share");
        h.release(5, a);
        h.release(5, b);
        assert_eq!(
            closed.load(Ordering::SeqCst),
            0,
            "kept until the connection ends"
        );
        let n = h.next;
        assert!(n > 1 << 40, "handle numbers start from the clock: {n}");
    }

    #[test]
    fn backing_ids_are_logged_for_the_next_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        let closed = Arc::new(AtomicUsize::new(0));
        let mut h = Handles {
            log: Some(BackingLog::create(&path).unwrap()),
            ..Default::default()
        };
        let (a, _) = open(&mut h, 11, &closed);
        let (_b, _) = open(&mut h, 12, &closed);
        h.release(11, a);
        let (_, open_ids) = BackingLog::resume(&path).unwrap();
        assert_eq!(open_ids.into_iter().collect::<Vec<_>>(), vec![(12, 12)]);
    }
}
