//! Layers without a TOC (plain gzip, zstd or uncompressed tars) served while they stream in.
//!
//! The filler fetches such a layer once and unpacks it as its bytes arrive
//! (`fetch::Filler::fill_once`). Each entry is announced here as soon as it is complete: a
//! regular file once all of its content is in a temp file of the file cache. The FUSE mount
//! serves the growing tree at once, so a container starts as soon as the files it needs have
//! arrived, not when the whole layer has.
//!
//! A name that is not there yet may still come. It is certain to be missing only once the
//! stream has passed where the name would be. Builders write entries in one of two orders:
//! - *walk order* (a tree walk: Go's `filepath.Walk` in docker and buildkit, `tar
//!   --sort=name`): a directory, then its contents, the names of a directory in byte order;
//!   paths compare component by component ([`walk_cmp`]);
//! - *path order* (umoci, which sorts the paths it writes): whole paths in byte order, so
//!   `etc/python3.11/x` comes before `etc/python3/y` (`.` < `/`).
//!
//! While every entry so far came in one of these orders, a lookup of a missing name is answered
//! as soon as the stream has passed the place of the name (and of its whiteout, and of anything
//! below it); once both orders broke, it waits for the end of the stream. A directory's listing
//! waits until the stream has left the directory, its opaque marker until the stream has passed
//! where the marker would be.
//!
//! Bytes are served before the blob's digest is checked at its end (the checksums of gzip and
//! zstd frames catch corruption on the way; containerd's own unpack works the same way). If
//! the digest does not match, the layer fails: reads of it answer EIO and nothing is recorded as
//! unpacked.

use super::tree::{ROOT, Tree, TreeError};
use crate::layer::index::Entry;
use crate::oci::Digest;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The order a tree walk writes entries in: components compared one by one (byte order), a
/// directory before what it contains.
pub fn walk_cmp(a: &str, b: &str) -> Ordering {
    let parts = |p: &str| {
        let p = p.trim_matches('/');
        // The root ("" or ".") comes before everything.
        let p = if p == "." { "" } else { p };
        p.split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    parts(a).cmp(&parts(b))
}

/// `path` is `dir` or lies below it.
fn within(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Streaming,
    Done,
    /// This attempt failed; a retry of the fill may start over (restart).
    Failed(String),
}

/// What a layer has announced so far.
pub struct State {
    pub entries: Vec<Entry>,
    pub tree: Tree,
    /// Where the content of a regular file is until it is moved into the file cache, by content
    /// digest (hex).
    files: HashMap<String, PathBuf>,
    /// The path of the last new entry, and whether every entry so far came in walk order
    /// (`walk`) or path order (`sorted`).
    last: Option<String>,
    walk: bool,
    sorted: bool,
    pub end: End,
    /// Entries the current attempt has announced (a retry announces the first ones again).
    attempt: usize,
    /// A conflict in the tree (a file used as a directory, a hardlink to nothing): final.
    broken: Option<String>,
    last_change: Instant,
}

impl State {
    /// Whether every entry so far came in one of the orders the early answers rely on.
    pub fn ordered(&self) -> bool {
        self.walk || self.sorted
    }

    /// No regular file (or other leaf) named `path` can still arrive.
    fn passed_file(&self, path: &str) -> bool {
        self.end == End::Done
            || self.last.as_deref().is_some_and(|l| {
                (self.walk && walk_cmp(l, path) == Ordering::Greater)
                    || (self.sorted && l.as_bytes() > path.as_bytes())
            })
    }

    /// No entry named `path`, nor any below it, can still arrive.
    pub fn passed(&self, path: &str) -> bool {
        let below = format!("{path}/");
        self.end == End::Done
            || self.last.as_deref().is_some_and(|l| {
                (self.walk && walk_cmp(l, path) == Ordering::Greater)
                    || (self.sorted && l.as_bytes() > below.as_bytes())
            })
    }

    /// No entry can still arrive in the directory `dir` (its listing is complete).
    pub fn left(&self, dir: &str) -> bool {
        let below = format!("{dir}/");
        self.end == End::Done
            || (!dir.is_empty()
                && self.last.as_deref().is_some_and(|l| {
                    (self.walk && walk_cmp(l, dir) == Ordering::Greater && !within(l, dir))
                        || (self.sorted
                            && l.as_bytes() > below.as_bytes()
                            && !l.starts_with(&below))
                }))
    }

    /// Whether a lookup of `name` in the directory `dir` that finds nothing is final: neither
    /// the name, nor anything below it, nor its whiteout can still arrive.
    pub fn missing_is_final(&self, dir: &str, name: &str) -> bool {
        self.passed(&join(dir, name)) && self.passed_file(&join(dir, &format!(".wh.{name}")))
    }

    /// Whether a directory's attributes (its opaque marker) are final.
    pub fn dir_final(&self, dir: &str) -> bool {
        self.passed_file(&join(dir, ".wh..wh..opq"))
    }

    fn failure(&self) -> Option<String> {
        if let Some(b) = &self.broken {
            return Some(b.clone());
        }
        match &self.end {
            End::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }
}

/// Why a wait for a streaming layer ended without its condition.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaitError {
    #[error("the layer's stream failed: {0}")]
    Failed(String),
    #[error("no new entry of the layer within {0:?}")]
    Stalled(Duration),
}

/// One layer streaming in (and, once complete, served from the file cache).
pub struct LayerStream {
    pub digest: Digest,
    state: RwLock<State>,
    /// Bumped on every change; waiters sleep on it.
    changes: Mutex<u64>,
    changed: Condvar,
}

impl LayerStream {
    fn new(digest: Digest) -> Self {
        LayerStream {
            digest,
            state: RwLock::new(State {
                entries: vec![],
                tree: Tree::new(),
                files: HashMap::new(),
                last: None,
                walk: true,
                sorted: true,
                end: End::Streaming,
                attempt: 0,
                broken: None,
                last_change: Instant::now(),
            }),
            changes: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        let mut n = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        self.changed.notify_all();
    }

    /// A new attempt of the fill starts over from the layer's first byte: it announces the
    /// entries already known again (checked to be the same) before new ones.
    pub fn restart(&self) {
        let mut st = self.write();
        st.attempt = 0;
        if st.end != End::Done {
            st.end = End::Streaming;
        }
        st.last_change = Instant::now();
        drop(st);
        self.notify();
    }

    /// Entry `idx` is complete; a regular file's content is in `tmp` (or already in the file
    /// cache, or in an earlier entry's temp file: None). Returns the temp file an earlier
    /// attempt kept for the same content, to be used instead of `tmp`.
    pub fn announce(&self, idx: usize, entry: &Entry, tmp: Option<&Path>) -> Option<PathBuf> {
        let mut st = self.write();
        st.last_change = Instant::now();
        let mut kept = None;
        if idx < st.entries.len() {
            // Announced by an earlier attempt.
            let same = st.entries[idx].path == entry.path && st.entries[idx].digest == entry.digest;
            if !same {
                st.broken = Some(format!(
                    "a new attempt of the fill read entry {idx} as {:?}, the first as {:?}",
                    entry.path, st.entries[idx].path
                ));
            } else if let (Some(d), Some(t)) = (entry.digest.as_ref(), tmp) {
                match st.files.get(d.hex()) {
                    Some(old) if old.exists() => kept = Some(old.clone()),
                    _ => {
                        st.files.insert(d.hex().to_string(), t.to_path_buf());
                    }
                }
            }
        } else if idx == st.entries.len() && st.broken.is_none() {
            if let Some(last) = st.last.clone() {
                let was = st.ordered();
                st.walk &= walk_cmp(&last, &entry.path) == Ordering::Less;
                st.sorted &= last.as_bytes() < entry.path.as_bytes();
                if was && !st.ordered() {
                    tracing::info!(layer = %self.digest, after = last, entry = %entry.path,
                        "entries are neither in walk order nor in path order: lookups of missing names wait for the end of the layer");
                }
            }
            st.last = Some(entry.path.clone());
            if let Err(TreeError::Conflict { path, reason }) = st.tree.add(idx, entry) {
                st.broken = Some(format!("{path:?}: {reason}"));
            }
            if let (Some(d), Some(t)) = (entry.digest.as_ref(), tmp) {
                st.files
                    .entry(d.hex().to_string())
                    .or_insert_with(|| t.to_path_buf());
            }
            st.entries.push(entry.clone());
        } else {
            st.broken = Some(format!(
                "entry {idx} announced after {} entries",
                st.entries.len()
            ));
        }
        st.attempt = st.attempt.max(idx + 1);
        drop(st);
        self.notify();
        kept
    }

    /// The attempt ended: complete (every file moved into the file cache, the blob verified)
    /// or failed.
    pub fn finish(&self, result: Result<(), String>) {
        let mut st = self.write();
        st.end = match result {
            Ok(()) => {
                // Every file is in the file cache now.
                st.files.clear();
                End::Done
            }
            Err(e) => End::Failed(e),
        };
        st.last_change = Instant::now();
        drop(st);
        self.notify();
    }

    /// A temp file announced for a content digest (hex) that the stream still needs.
    pub fn keeps(&self, tmp: &Path) -> bool {
        self.read().files.values().any(|p| p == tmp)
    }

    /// Where the content with digest `d` is while it is not in the file cache yet.
    pub fn temp_file(&self, d: &Digest) -> Option<PathBuf> {
        self.read().files.get(d.hex()).cloned()
    }

    /// Wait until `cond` holds. Fails when the stream failed, or when no entry arrived for
    /// `stall` (a stream that moves on is waited for, however long the layer).
    pub fn wait(&self, stall: Duration, cond: impl Fn(&State) -> bool) -> Result<(), WaitError> {
        loop {
            let seen = *self.changes.lock().unwrap_or_else(|p| p.into_inner());
            let idle = {
                let st = self.read();
                if cond(&st) {
                    return Ok(());
                }
                if let Some(f) = st.failure() {
                    return Err(WaitError::Failed(f));
                }
                st.last_change.elapsed()
            };
            let Some(left) = stall.checked_sub(idle).filter(|d| !d.is_zero()) else {
                return Err(WaitError::Stalled(stall));
            };
            let guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
            if *guard == seen {
                let _ = self
                    .changed
                    .wait_timeout(guard, left)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Whether the stream ended well, or failed (None: still streaming).
    pub fn outcome(&self) -> Option<Result<(), String>> {
        let st = self.read();
        if let Some(f) = st.failure() {
            return Some(Err(f));
        }
        (st.end == End::Done).then_some(Ok(()))
    }

    /// The directory path of inode `ino` of the tree.
    pub fn path_of(&self, ino: u64) -> Option<String> {
        if ino == ROOT {
            return Some(String::new());
        }
        self.read().tree.path_of(ino)
    }
}

/// The layers streaming in, by digest hex. The filler adds them; the FUSE layer table finds
/// them when containerd mounts a layer that is not unpacked yet.
#[derive(Default)]
pub struct Streams {
    map: Mutex<HashMap<String, Arc<LayerStream>>>,
}

impl Streams {
    /// The stream of `digest` for a new attempt of its fill: the one a failed attempt left
    /// (restarted), or a new one.
    pub fn begin(&self, digest: &Digest) -> Arc<LayerStream> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(digest.hex()) {
            s.restart();
            return Arc::clone(s);
        }
        let s = Arc::new(LayerStream::new(digest.clone()));
        map.insert(digest.hex().to_string(), Arc::clone(&s));
        s
    }

    pub fn get(&self, hex: &str) -> Option<Arc<LayerStream>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hex)
            .cloned()
    }

    /// The stream of layer `hex` if it can be served now: begun, and its current attempt not
    /// failed.
    pub fn serving(&self, hex: &str) -> Option<Arc<LayerStream>> {
        self.get(hex)
            .filter(|s| !matches!(s.outcome(), Some(Err(_))))
    }

    /// Forget a stream that completed (the layer is served from its index from now on by
    /// new mounts; a mount that has it keeps its `Arc`) or that will not be retried.
    pub fn remove(&self, hex: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hex);
    }
}

/// Announces a streaming unpack's entries to its [`LayerStream`].
pub struct Announcer(pub Arc<LayerStream>);

impl crate::layer::tar::Observer for Announcer {
    fn entry(&mut self, idx: usize, entry: &Entry, tmp: Option<&Path>) -> Option<PathBuf> {
        self.0.announce(idx, entry, tmp)
    }

    fn keeps(&self, tmp: &Path) -> bool {
        self.0.keeps(tmp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::index::Kind;

    fn entry(path: &str, kind: Kind, digest: Option<&str>) -> Entry {
        Entry {
            path: path.into(),
            kind,
            size: if digest.is_some() { 3 } else { 0 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: None,
            link: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: vec![],
            digest: digest.map(|d| Digest::of(d.as_bytes())),
            chunks: vec![],
        }
    }

    #[test]
    fn walk_order_is_component_wise() {
        assert_eq!(walk_cmp("a/b", "a-c"), Ordering::Less, "a/ before a-c");
        assert_eq!(walk_cmp("a", "a/b"), Ordering::Less, "a directory first");
        assert_eq!(walk_cmp("", "a"), Ordering::Less);
        assert_eq!(walk_cmp("./", "a"), Ordering::Less);
        assert_eq!(
            walk_cmp("usr/lib/python3.11/x", "usr/lib/python311.zip"),
            Ordering::Less
        );
        assert!(within("a/b/c", "a/b") && within("a/b", "a/b") && !within("a/bc", "a/b"));
    }

    #[test]
    fn missing_names_are_final_once_passed_in_walk_order() {
        let s = LayerStream::new(Digest::of(b"layer"));
        s.announce(0, &entry("", Kind::Dir, None), None);
        s.announce(1, &entry("etc", Kind::Dir, None), None);
        s.announce(
            2,
            &entry("etc/hosts", Kind::Reg, Some("h")),
            Some(Path::new("/t/1")),
        );
        {
            let st = s.read();
            assert!(st.tree.resolve("etc/hosts").is_some());
            assert!(st.missing_is_final("etc", "group"), "group < hosts");
            assert!(
                !st.missing_is_final("etc", "passwd"),
                "passwd may still come"
            );
            assert!(!st.left("etc"), "still in etc");
            assert!(!st.left(""), "the root is left only at the end");
            assert!(
                st.dir_final("etc"),
                "the opaque marker would have come first"
            );
        }
        s.announce(3, &entry("usr", Kind::Dir, None), None);
        {
            let st = s.read();
            assert!(st.missing_is_final("etc", "passwd") && st.left("etc"));
            // "-x" < ".wh.-x": the whiteout of "-x" could still come after "-x".
            assert!(!st.missing_is_final("usr", "-x"));
        }
        assert_eq!(
            s.temp_file(&Digest::of(b"h")).as_deref(),
            Some(Path::new("/t/1"))
        );
        // Out of order: from now on only the end settles a missing name.
        s.announce(4, &entry("bin", Kind::Dir, None), None);
        let st = s.read();
        assert!(!st.ordered());
        assert!(!st.missing_is_final("etc", "zzz"));
        drop(st);
        s.finish(Ok(()));
        assert!(s.read().missing_is_final("etc", "zzz") && s.read().left(""));
        assert_eq!(s.outcome(), Some(Ok(())));
    }

    #[test]
    fn path_order_as_umoci_writes_it() {
        let s = LayerStream::new(Digest::of(b"layer"));
        let paths = [
            "",
            "etc",
            "etc/python3",
            "etc/python3.11",
            "etc/python3.11/site.py",
            "etc/python3/x",
        ];
        for (i, p) in paths.iter().enumerate() {
            s.announce(i, &entry(p, Kind::Dir, None), None);
        }
        let st = s.read();
        assert!(st.ordered() && !st.walk && st.sorted);
        assert!(!st.left("etc/python3"), "etc/python3/… may still come");
        assert!(st.missing_is_final("etc/python3", "a"));
        assert!(!st.missing_is_final("etc/python3", "y"));
        assert!(st.missing_is_final("etc", "python2"));
        assert!(
            st.missing_is_final("etc", "python3.2"),
            "between python3.11 and python3/"
        );
        assert!(!st.missing_is_final("etc", "zz"));
        drop(st);
        s.announce(6, &entry("etc/ssl", Kind::Dir, None), None);
        let st = s.read();
        assert!(st.left("etc/python3") && st.left("etc/python3.11"));
        assert!(!st.left("etc"));
    }

    #[test]
    fn a_retry_reannounces_and_reuses_kept_files() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::write(&old, b"abc").unwrap();
        let streams = Streams::default();
        let d = Digest::of(b"layer");
        let s = streams.begin(&d);
        s.announce(0, &entry("a", Kind::Reg, Some("a")), Some(&old));
        s.finish(Err("cut".into()));
        assert!(s.keeps(&old));
        assert_eq!(
            s.wait(Duration::from_secs(5), |st| st.tree.resolve("b").is_some()),
            Err(WaitError::Failed("cut".into()))
        );
        let again = streams.begin(&d);
        assert!(Arc::ptr_eq(&s, &again));
        let new = dir.path().join("new");
        assert_eq!(
            again.announce(0, &entry("a", Kind::Reg, Some("a")), Some(&new)),
            Some(old.clone()),
            "the kept file is used"
        );
        // A different entry at the same place breaks the layer for good.
        again.announce(0, &entry("z", Kind::Reg, Some("z")), None);
        assert!(matches!(again.outcome(), Some(Err(_))));
    }

    #[test]
    fn waits_end_when_an_entry_arrives_or_the_stream_stalls() {
        let s = Arc::new(LayerStream::new(Digest::of(b"layer")));
        let s2 = Arc::clone(&s);
        let t = std::thread::spawn(move || {
            s2.wait(Duration::from_secs(30), |st| st.tree.resolve("x").is_some())
        });
        s.announce(0, &entry("x", Kind::Dir, None), None);
        assert_eq!(t.join().unwrap(), Ok(()));
        let started = Instant::now();
        assert_eq!(
            s.wait(Duration::from_millis(50), |st| st
                .tree
                .resolve("y")
                .is_some()),
            Err(WaitError::Stalled(Duration::from_millis(50)))
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
