//! Reading files of lazily mounted layers: the path from a FUSE read to verified bytes.
//!
//! A read needs the chunks (TOC pieces of a file) overlapping it, plus read-ahead: the file's
//! following chunks up to `read_ahead` bytes. Each chunk comes, in order of preference, from
//! the in-memory cache of decoded chunks (keyed by chunk digest, so identical chunks of different
//! layers share an entry), from the layer's local bytes (the complete blob, or ranges of its
//! partial file), or from the registry. Chunks missing locally are grouped by position in the
//! blob and fetched with one range request per group of neighbours; each chunk is decoded and
//! verified against its `chunkDigest` as soon as its bytes have arrived, then written to the
//! partial file (so the filler and later reads, even after a restart, do not fetch it again) and
//! handed to every reader waiting for it (single flight). The reader replies as soon as the
//! chunks it needs are in, while read-ahead chunks of the same request keep arriving.

use super::chunks::{ChunkData, ChunkStats, Chunks, Claim, Slot, Waiter};
use super::range::{self, RangeFetch};
use super::{Access, Class};
use crate::fetch::source_reference;
use crate::fs::stream::LayerStream;
use crate::fs::tree::Tree;
use crate::layer::gzindex::SpanDecoder;
use crate::layer::index::{Chunk, Codec, LayerIndex, Spans};
use crate::oci::Digest;
use crate::registry::OpCreds;
use crate::store::{Catalogue, FetchedBy, Layout, PartialBlob, Partials};
use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Missing chunks closer than this are fetched in one request (the bytes between are cheaper
/// than a round trip: 64 KiB is 5 ms at 100 Mbit/s).
const COALESCE_GAP: u64 = 64 << 10;
/// Upper bound of one coalesced request.
const MAX_RUN: u64 = 16 << 20;
/// Start-up prefetch walks its list in order, in batches of about this many compressed bytes
/// (each batch's chunks coalesced into runs)...
const PREFETCH_BATCH: u64 = 2 << 20;
/// ...with at most this many range requests at once, so that a container's own reads still
/// find the link (they are as urgent: both are foreground)...
const PREFETCH_REQUESTS: usize = 32;
/// Region read-ahead (`Order::Gentle`): at most this many requests at once, of batches about
/// this big: beside a start's own reads, whose requests queue behind every byte in flight at
/// the bottleneck.
const GENTLE_REQUESTS: usize = 2;
const GENTLE_BATCH: u64 = 256 << 10;
/// ...and at most this many KiB asked for and not received yet (a flow-control window, freed
/// as the bytes arrive). A start needs the list's files in its order: with all requests at
/// once, the link is shared among them and the first file needed (python's 2 MB binary)
/// arrived 470 ms after the prefetch began; with the window, 355 ms: the requests first in the list
/// have the link, and the next one is sent while the last window of the previous is still
/// arriving, so the link stays busy (the window is above a bandwidth-delay product: 250 KB at
/// 100 Mbit/s and 20 ms).
const PREFETCH_WINDOW_KIB: u32 = 1024;
/// Prefetched chunks closer than this share a request. With the window above, requests are
/// pipelined, so a separate request costs no idle round trip, while the bytes between two
/// chunks are carried for nothing: the gap is small (16 KiB is 1.3 ms at 100 Mbit/s). With
/// 128 KiB the imports' prefetch carried 11.1 MB for 9.0 MB of files; with 16 KiB, 9.6 MB.
const PREFETCH_GAP: u64 = 16 << 10;
/// After this many misses of a layer in a row, each starting where the previous fetch ended,
/// its reader is scanning the layer (`tar -c`, a checksum of everything): see [`Scan`].
const SCAN_STREAK: u32 = 8;
/// Neighbours fetched with each miss of a scanning reader.
const SCAN_NEIGHBOURS: u64 = 4 << 20;
/// ELF read-ahead fetches a file (the executable itself, or a library) only up to this many
/// compressed bytes: the loader maps big files but touches only part of them.
const ELF_READ_AHEAD_MAX: u64 = 8 << 20;
/// An executable's first chunk still arriving is looked at (`Reader::elf_peek`) each time
/// this many more compressed bytes are in, at most `ELF_PEEKS` times, decoding at most
/// `ELF_PEEK_MAX` bytes (the scanned segment is at most 1 MiB).
const ELF_PEEK_STEP: u64 = 128 << 10;
const ELF_PEEKS: u64 = 8;
const ELF_PEEK_MAX: usize = (1 << 20) + (64 << 10);

/// A chunk read through a gzip index whose checkpoint window is not in memory, and whose
/// bytes are local from an earlier checkpoint on (one that needs no fetch), is decoded from
/// there when it lies at most this many uncompressed bytes after it: inflating 4 MiB takes
/// about 10 ms, a window fetch is a round trip, or many behind a busy link.
const REANCHOR_MAX: u64 = 4 << 20;
/// Checkpoint windows kept in memory (each at most 64 KiB compressed, typically 10 KiB).
// 4096 is not zero: the unwrap is evaluated, and cannot fail, at compile time.
const WINDOWS_KEPT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(4096).unwrap();

/// How a layer's on-demand fetches follow each other. A reader that walks the layer in blob
/// order wants bandwidth, not latency: its fetches are not foreground requests (the filler,
/// which fetches in the same order, keeps the link, and the reader mostly finds its bytes
/// already local) and take bigger neighbour windows. A container's start jumps around the
/// layer and stays foreground.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// End of the last fetch.
    end: u64,
    /// Fetches in a row that started where the one before ended.
    streak: u32,
}

impl Scan {
    /// Record a fetch of `[start, end)`.
    pub fn fetched(&mut self, start: u64, end: u64) {
        if self.end > 0 && start >= self.end && start <= self.end + COALESCE_GAP {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak = 0;
        }
        self.end = end;
    }

    pub fn scanning(&self) -> bool {
        self.streak >= SCAN_STREAK
    }
}

/// A layer mounted lazily: its verified TOC, the tree built from it, and where its bytes live.
pub struct LazyLayer {
    pub digest: Digest,
    /// `registry/repository` the layer is fetched from.
    pub source: String,
    pub size: u64,
    pub toc: LayerIndex,
    pub spans: Spans,
    pub tree: Tree,
    /// The complete blob, opened once it exists.
    blob: OnceLock<Arc<File>>,
    /// Every chunk by where its bytes end in the blob: (end, entry index, chunk index).
    by_end: Vec<(u64, u32, u32)>,
    scan: Mutex<Scan>,
    /// Recent misses and what was read ahead around them (`region.rs`).
    regions: Mutex<super::region::Regions>,
    /// Files by directory, for directory read-ahead.
    siblings: super::siblings::Siblings,
    /// Files whose ELF dependencies were looked at (entry indices).
    elf_seen: Mutex<std::collections::HashSet<u32>>,
    /// A start-up prefetch (landmark or learned list) says what to fetch: no directory
    /// read-ahead beside it (measured: it only competed with the list for the link).
    guided: std::sync::atomic::AtomicBool,
    /// A layer without TOC served while it streams in: its tree and entries grow there
    /// (`toc` and `tree` stay empty).
    pub stream: Option<Arc<LayerStream>>,
    /// Read through a shared gzip index whose checkpoint windows are kept apart: the blob
    /// holding them (digest, size), in the layer's repository.
    pub windows: Option<(Digest, u64)>,
    /// Read through a gzip index: the checkpoints its chunks resume at, by uncompressed
    /// offset (see [`Reader::reanchor`]).
    points: Vec<Arc<crate::layer::gzindex::Point>>,
}

/// A layer's tree and entries as they are now (fixed, or a streaming layer's so far).
pub enum View<'a> {
    Fixed(&'a Tree, &'a [crate::layer::index::Entry]),
    Stream(std::sync::RwLockReadGuard<'a, crate::fs::stream::State>),
}

impl View<'_> {
    pub fn tree(&self) -> &Tree {
        match self {
            View::Fixed(t, _) => t,
            View::Stream(s) => &s.tree,
        }
    }

    pub fn entries(&self) -> &[crate::layer::index::Entry] {
        match self {
            View::Fixed(_, e) => e,
            View::Stream(s) => &s.entries,
        }
    }
}

impl LazyLayer {
    /// A layer without TOC, served as its entries arrive (and from the file cache after).
    pub fn streaming(digest: Digest, source: String, size: u64, stream: Arc<LayerStream>) -> Self {
        let toc = LayerIndex {
            digest: digest.clone(),
            toc_offset: 0,
            entries: vec![],
            prefetch_landmark: None,
        };
        let mut l = LazyLayer::new(digest, source, size, toc, Tree::new());
        l.stream = Some(stream);
        l
    }

    /// The layer read through an index whose windows are kept in `windows` (digest, size).
    pub fn with_windows(mut self, windows: Option<(Digest, u64)>) -> Self {
        self.windows = windows;
        self
    }

    /// A start-up prefetch list guides this layer's reads (see `guided`).
    pub fn guide(&self) {
        self.guided
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn view(&self) -> View<'_> {
        match &self.stream {
            Some(s) => View::Stream(s.read()),
            None => View::Fixed(&self.tree, &self.toc.entries),
        }
    }

    /// Open the local copy of a file's content `d`: the file cache, or the temp file a
    /// streaming layer wrote it to (moved into the cache when the layer completes, hence the
    /// second look).
    pub fn open_local(&self, layout: &Layout, d: &Digest) -> std::io::Result<File> {
        let cached = layout.file(d);
        match File::open(&cached) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => return r,
        }
        if let Some(tmp) = self.stream.as_ref().and_then(|s| s.temp_file(d)) {
            match File::open(&tmp) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => return r,
            }
        }
        File::open(&cached)
    }

    /// Compressed bytes of entry `e`'s chunks (from their checkpoints, through a gzip index).
    fn compressed_len(&self, e: &crate::layer::index::Entry) -> u64 {
        e.chunks
            .iter()
            .map(|c| {
                let (s, end) = self.spans.span(c);
                end - s
            })
            .sum()
    }

    /// The entry and chunk index of the chunk whose span ends at `end`.
    fn chunk_ending_at(&self, end: u64) -> Option<(usize, usize)> {
        let at = self.by_end.partition_point(|&(e, _, _)| e < end);
        let &(e, entry, chunk) = self.by_end.get(at)?;
        (e == end).then_some((entry as usize, chunk as usize))
    }

    /// The files of kind `kind` under directory `dir` with chunks in `parts` of the blob,
    /// nearest to `from` first.
    fn files_in(&self, parts: &[(u64, u64)], from: u64, dir: &str, kind: u64) -> Vec<usize> {
        let mut found: Vec<(u64, u32)> = vec![];
        for &(a, b) in parts {
            let at = self.by_end.partition_point(|&(end, _, _)| end <= a);
            for &(end, e, _) in self.by_end[at..].iter().take_while(|(end, ..)| *end <= b) {
                let Some(entry) = self.toc.entries.get(e as usize) else {
                    continue;
                };
                if entry.path.starts_with(dir) && file_kind(&entry.path) == Some(kind) {
                    found.push((end.abs_diff(from), e));
                }
            }
        }
        found.sort_unstable();
        let mut seen = std::collections::HashSet::new();
        found
            .into_iter()
            .filter(|&(_, e)| seen.insert(e))
            .map(|(_, e)| e as usize)
            .collect()
    }

    pub fn new(digest: Digest, source: String, size: u64, toc: LayerIndex, tree: Tree) -> Self {
        let spans = Spans::new(&toc);
        let mut by_end: Vec<(u64, u32, u32)> = toc
            .entries
            .iter()
            .enumerate()
            .flat_map(|(e, entry)| {
                let spans = &spans;
                entry
                    .chunks
                    .iter()
                    .enumerate()
                    .map(move |(c, ch)| (spans.span(ch).1, e as u32, c as u32))
            })
            .collect();
        by_end.sort_unstable();
        let siblings = super::siblings::Siblings::new(&toc.entries, &spans);
        let mut points: Vec<_> = toc
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().filter_map(|c| c.resume().cloned()))
            .filter(|p| !p.zstd)
            .collect();
        points.sort_unstable_by_key(|p| p.out);
        points.dedup_by_key(|p| p.out);
        LazyLayer {
            points,
            siblings,
            elf_seen: Mutex::new(std::collections::HashSet::new()),
            guided: std::sync::atomic::AtomicBool::new(false),
            digest,
            source,
            size,
            toc,
            spans,
            tree,
            blob: OnceLock::new(),
            by_end,
            scan: Mutex::new(Scan::default()),
            regions: Mutex::default(),
            stream: None,
            windows: None,
        }
    }
}

/// Counters and the fetch latency histogram, exported by the metrics endpoint.
pub struct ReadStats {
    pub reads: Counter,
    pub cache_hits: Counter,
    pub local_chunks: Counter,
    pub fetched_chunks: Counter,
    pub requests: Counter,
    pub bytes_fetched: Counter,
    pub errors: Counter,
    /// Seconds from sending an on-demand range request to its last chunk verified.
    pub fetch_seconds: Histogram,
    /// Seconds reads that needed chunks not in memory waited for them.
    pub wait_seconds: Histogram,
    /// Bytes received for start-up prefetch (`bytes_fetched` counts on-demand ones).
    pub prefetch_bytes: Counter,
    /// Range requests of start-up prefetch (`requests` counts on-demand ones).
    pub prefetch_requests: Counter,
}

impl Default for ReadStats {
    fn default() -> Self {
        ReadStats {
            reads: Counter::default(),
            cache_hits: Counter::default(),
            local_chunks: Counter::default(),
            fetched_chunks: Counter::default(),
            requests: Counter::default(),
            bytes_fetched: Counter::default(),
            errors: Counter::default(),
            // 1 ms .. ~33 s
            fetch_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            wait_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            prefetch_bytes: Counter::default(),
            prefetch_requests: Counter::default(),
        }
    }
}

/// Why a read, or the load of a chunk, failed. Cloned to every reader waiting for the chunk;
/// the FUSE adapter answers [`ReadError::errno`].
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadError {
    /// No answer from the registry within `fuse.read_timeout`.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The registry failed, refused or cut the response.
    #[error("{0}")]
    Registry(String),
    /// Bytes that do not decode or verify against the chunk's digest.
    #[error("{0}")]
    Corrupt(String),
    /// Local bytes (the blob, the partial file, a cached file) could not be read.
    #[error("{what}: {error}")]
    Local {
        what: String,
        error: String,
        /// The OS error, when there is one.
        errno: i32,
    },
    /// The load failed a moment ago and is not retried yet (`chunks.rs`: `FAILURE_MEMORY`).
    #[error("{0} (a moment ago; not retried yet)")]
    Recent(Box<ReadError>),
    /// The loading task ended without an answer.
    #[error("chunk load abandoned")]
    Abandoned,
    /// The inode's TOC entry is missing.
    #[error("no such TOC entry")]
    NoEntry,
    /// A chunk decoded from its checkpoint needs the window kept apart, not fetched (the
    /// fetch expected to decode it on from an earlier chunk): fetched, then decoded again.
    #[error("checkpoint window not fetched")]
    NoWindow,
}

impl ReadError {
    fn local(what: impl std::fmt::Display, e: &std::io::Error) -> Self {
        ReadError::Local {
            what: what.to_string(),
            error: e.to_string(),
            errno: e.raw_os_error().unwrap_or(0),
        }
    }

    /// The errno a FUSE read answers: EIO for a registry that failed, stalled or sent bad
    /// bytes (the reader sees an I/O error, as with a failing disk), the OS error of a local
    /// failure (but a backing file that is gone is an I/O error too, not "no such file").
    pub fn errno(&self) -> i32 {
        match self {
            ReadError::Recent(e) => e.errno(),
            ReadError::Local { errno, .. } if *errno > 0 && *errno != nix::libc::ENOENT => *errno,
            ReadError::NoEntry => nix::libc::ENOENT,
            _ => nix::libc::EIO,
        }
    }
}

/// Where a layer's bytes can be read locally.
#[derive(Clone)]
enum Local {
    Blob(Arc<File>),
    Partial(Arc<PartialBlob>),
    Nothing,
}

impl Local {
    /// Whether the blob's bytes `[start, end)` are here.
    fn covers(&self, start: u64, end: u64) -> bool {
        match self {
            Local::Blob(_) => true,
            Local::Partial(p) => p.contains(start, end),
            Local::Nothing => false,
        }
    }
}

pub struct Reader {
    layout: Layout,
    db: Arc<Mutex<Catalogue>>,
    /// Every range request goes through it, with its class.
    access: Arc<Access>,
    partials: Arc<Partials>,
    timeout: Duration,
    read_ahead: u64,
    neighbours: u64,
    dir_read_ahead: u64,
    region_read_ahead: u64,
    elf_read_ahead: bool,
    chunks: Chunks,
    /// Checkpoint windows fetched from shared indexes' windows blobs, by digest (a cell each:
    /// one fetch however many reads start from the checkpoint at once).
    windows: Mutex<lru::LruCache<[u8; 32], WindowFetch>>,
    /// Turns of the region read-ahead's requests, shared by all layers (`Order::Gentle`).
    gentle: tokio::sync::Semaphore,
    pub stats: ReadStats,
}

use crate::store::locked as lock;

/// A checkpoint window being fetched, or fetched (verified), shared by all who need it.
type WindowFetch = futures_util::future::Shared<
    futures_util::future::BoxFuture<'static, Result<ChunkData, ReadError>>,
>;

/// Windows closer than this in the windows blob are fetched in one request (a window is
/// 5–30 KB: a few unneeded ones cost less than a request). Fetching all of a learned list's
/// windows ahead in a few requests was tried: 105 requests became 72, but the first files'
/// windows then shared the link with all the others and arrived 300 ms late (`ls -R` with
/// the list: 0.57 s became 0.72 s); windows are fetched with the run that needs them.
const WINDOW_GAP: u64 = 32 << 10;
/// Upper bound of one request for windows.
const WINDOW_GROUP_MAX: u64 = 1 << 20;
/// A windows blob at most this big is fetched whole when its layer is mounted without a
/// learned list ([`Reader::fetch_all_windows`]): one request of [`WINDOW_GROUP_MAX`] at most.
const WINDOWS_AHEAD_MAX: u64 = WINDOW_GROUP_MAX;

/// The window a chunk's decoding starts from, when it is kept apart from the index.
fn window_ref(c: &Chunk) -> Option<crate::layer::gzindex::WindowRef> {
    c.resume().and_then(|p| p.window_ref)
}

/// Tuning of the read path (from `fuse.*` and `fetch.*`).
#[derive(Clone, Copy, Debug)]
pub struct ReadOptions {
    /// A read needing the network fails after this long.
    pub timeout: Duration,
    /// Memory for decoded chunks.
    pub cache_bytes: usize,
    /// The file's next chunks fetched with a miss.
    pub read_ahead: u64,
    /// Bytes of the following files fetched with a miss.
    pub neighbours: u64,
    /// A directory's files fetched whole on its second miss, if they total at most this
    /// (compressed; 0: off).
    pub dir_read_ahead: u64,
    /// Bytes around misses close together fetched in the background, per layer in all
    /// (`region.rs`; 0: off).
    pub region_read_ahead: u64,
    /// ELF read-ahead: an executable's interpreter and libraries fetched with its first read.
    pub elf_read_ahead: bool,
}

impl Reader {
    pub fn new(
        layout: Layout,
        db: Arc<Mutex<Catalogue>>,
        access: Arc<Access>,
        partials: Arc<Partials>,
        opts: ReadOptions,
    ) -> Arc<Self> {
        let ReadOptions {
            timeout,
            cache_bytes,
            read_ahead,
            neighbours,
            dir_read_ahead,
            region_read_ahead,
            elf_read_ahead,
        } = opts;
        let stats = ReadStats::default();
        let chunk_stats = ChunkStats {
            cache_hits: stats.cache_hits.clone(),
            errors: stats.errors.clone(),
        };
        Arc::new(Reader {
            neighbours,
            dir_read_ahead,
            region_read_ahead,
            elf_read_ahead,
            layout,
            db,
            access,
            partials,
            timeout,
            read_ahead,
            chunks: Chunks::new(cache_bytes, chunk_stats),
            windows: Mutex::new(lru::LruCache::new(WINDOWS_KEPT)),
            gentle: tokio::sync::Semaphore::new(GENTLE_REQUESTS),
            stats,
        })
    }

    /// How long a read waits for the registry (`fuse.read_timeout`); also how long a lookup in
    /// a streaming layer waits without a new entry arriving.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Chunk `c` of `layer` from memory, or a receiver for it (see [`Chunks::slot`]).
    fn slot(
        &self,
        layer: &LazyLayer,
        c: &Chunk,
        keep: bool,
        class: Class,
        claims: &mut Vec<Claim>,
    ) -> Slot {
        self.chunks
            .slot(&layer.digest, c, layer.spans.span(c), keep, class, claims)
    }

    fn finish(&self, claim: Claim, result: Result<ChunkData, ReadError>) {
        self.chunks.finish(claim, result)
    }

    /// The registry reference of `digest` in the layer's repository, and the credentials for it.
    fn reference_of(
        &self,
        layer: &LazyLayer,
        digest: &Digest,
    ) -> Result<(crate::oci::Reference, OpCreds), ReadError> {
        // The catalogue's source, which a pull of the layer from another registry updates
        // while this layer is mounted; the one it was mounted with otherwise.
        let source = lock(&self.db)
            .layer(layer.digest.as_str())
            .ok()
            .flatten()
            .map(|l| l.source)
            .unwrap_or_else(|| layer.source.clone());
        let reference = source_reference(&source, digest)
            .ok_or_else(|| ReadError::Registry(format!("bad layer source {source:?}")))?;
        let creds = OpCreds {
            request: None,
            persisted: crate::fetch::persisted_secret(&self.db, reference.registry()),
        };
        Ok((reference, creds))
    }

    /// A window kept apart, if it is in memory.
    fn cached_window(&self, r: &crate::layer::gzindex::WindowRef) -> Option<ChunkData> {
        lock(&self.windows)
            .peek(&r.sha256)
            .and_then(|f| f.peek().and_then(|got| got.as_ref().ok().cloned()))
    }

    /// Windows kept apart (`refs`), each from memory, from a fetch already running, or
    /// fetched now: by range from the layer's windows blob, those close to each other in it
    /// in one request, each verified against its digest. The fetches run whether or not the
    /// returned futures are awaited.
    fn fetch_windows(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        refs: impl IntoIterator<Item = crate::layer::gzindex::WindowRef>,
        class: Class,
    ) -> Vec<([u8; 32], WindowFetch)> {
        let mut refs: Vec<_> = refs.into_iter().collect();
        refs.sort_unstable_by_key(|r| r.offset);
        refs.dedup();
        let mut map = lock(&self.windows);
        let mut out = Vec::with_capacity(refs.len());
        let mut missing: Vec<crate::layer::gzindex::WindowRef> = vec![];
        for r in refs {
            match map.get(&r.sha256) {
                // A failed fetch is tried again.
                Some(f) if !matches!(f.peek(), Some(Err(_))) => out.push((r.sha256, f.clone())),
                _ => missing.push(r),
            }
        }
        for group in window_groups(missing) {
            let (start, end) = (
                group[0].offset,
                group
                    .iter()
                    .map(|r| r.offset + u64::from(r.len))
                    .max()
                    .unwrap_or(0),
            );
            let (this, layer2) = (Arc::clone(self), Arc::clone(layer));
            let bytes: futures_util::future::Shared<
                futures_util::future::BoxFuture<'static, Result<ChunkData, ReadError>>,
            > = async move { this.window_bytes(&layer2, start, end, class).await }
                .boxed()
                .shared();
            tokio::spawn(bytes.clone());
            for r in group {
                let (bytes, this, layer2) = (bytes.clone(), Arc::clone(self), Arc::clone(layer));
                let f: WindowFetch = async move {
                    let all = bytes.await?;
                    let at = (r.offset - start) as usize;
                    let w = all.get(at..at + r.len as usize).unwrap_or_default();
                    if !r.matches(w) {
                        return Err(this.refuse_index(
                            &layer2,
                            format_args!("the checkpoint window at {} of the layer's windows blob does not match its digest", r.offset),
                        ));
                    }
                    Ok(Arc::new(w.to_vec()))
                }
                .boxed()
                .shared();
                map.put(r.sha256, f.clone());
                out.push((r.sha256, f));
            }
        }
        out
    }

    /// All checkpoint windows of a layer read through a shared gzip index, in one request in
    /// the background, when its windows blob is small: since windows are shared with the bytes
    /// no read uses zeroed (`index_share::sparse_windows`) the python image's are 384–583 KiB
    /// for 247–335 checkpoints (1.5–1.8 KB each, 3.7–4.8 MiB before), so a start without a
    /// learned list, which fetched a window beside each miss's range (a second request, often
    /// the last to arrive), gets them all for about 40 ms of the link, before its first reads
    /// (the mount comes about 20–35 ms before containerd's active snapshot). Reads that need a
    /// window meanwhile wait for this fetch. Not for a layer a list guides (its windows come
    /// ahead with its ranges) nor a blob over [`WINDOWS_AHEAD_MAX`]. Returns the windows asked.
    pub fn fetch_all_windows(self: &Arc<Self>, layer: &Arc<LazyLayer>) -> usize {
        let Some((_, size)) = layer.windows else {
            return 0;
        };
        if size > WINDOWS_AHEAD_MAX
            || layer.blob.get().is_some()
            || layer.guided.load(std::sync::atomic::Ordering::Relaxed)
        {
            return 0;
        }
        let refs: Vec<_> = layer.points.iter().filter_map(|p| p.window_ref).collect();
        let n = refs.len();
        let _ = self.fetch_windows(layer, refs, Class::Prefetch);
        tracing::debug!(layer = %layer.digest, windows = n, bytes = size, "fetching all checkpoint windows ahead");
        n
    }

    /// Bytes `[start, end)` of the layer's windows blob (a read waits for them: the class
    /// holds the link; a window sent behind the filler's bulk once waited 254 ms in the
    /// bottleneck's queue).
    async fn window_bytes(
        &self,
        layer: &LazyLayer,
        start: u64,
        end: u64,
        class: Class,
    ) -> Result<ChunkData, ReadError> {
        let Some((blob, _)) = &layer.windows else {
            return Err(ReadError::Corrupt(
                "a checkpoint window kept apart, but no windows blob".into(),
            ));
        };
        let started = Instant::now();
        let got = tokio::time::timeout(self.timeout, async {
            let (reference, creds) = self.reference_of(layer, blob)?;
            self.stats.requests.inc();
            let got = self
                .access
                .fetch(class, &reference, blob, start, end - start, &creds)
                .await
                .map_err(|e| ReadError::Registry(e.to_string()))?;
            self.stats.bytes_fetched.inc_by(got.len() as u64);
            Ok(got)
        })
        .await
        .unwrap_or(Err(ReadError::Timeout(self.timeout)));
        if let Err(e) = &got {
            tracing::error!(layer = %layer.digest, start, len = end - start, error = %e, "cannot fetch checkpoint windows");
        }
        tracing::debug!(layer = %layer.digest, at = start, len = end - start, elapsed_ms = started.elapsed().as_millis() as u64, "checkpoint window fetched");
        Ok(Arc::new(got?))
    }

    /// The windows (kept apart, not in memory) that decoding `claims` needs, fetched at once
    /// (as requests of the class of the claims that need them).
    async fn windows_for(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        claims: impl Iterator<Item = (&Chunk, Class)>,
    ) -> Result<HashMap<[u8; 32], ChunkData>, ReadError> {
        let mut class = Class::Prefetch;
        let need: Vec<_> = claims
            .filter_map(|(c, k)| {
                if k != Class::Prefetch {
                    class = Class::OnDemand;
                }
                window_ref(c)
            })
            .collect();
        let fetches = self.fetch_windows(layer, need, class);
        let got = futures_util::future::try_join_all(
            fetches
                .into_iter()
                .map(|(k, f)| async move { f.await.map(|w| (k, w)) }),
        )
        .await?;
        Ok(got.into_iter().collect())
    }

    /// Decode and verify a chunk from `compressed`, the blob's bytes from `input_at` through
    /// the chunk's end, going on with `decoder` when it can, else from the chunk's checkpoint
    /// with its window (when kept apart: [`ReadError::NoWindow`] if not fetched).
    fn decode(
        &self,
        layer: &LazyLayer,
        chunk: &Chunk,
        compressed: &[u8],
        input_at: u64,
        windows: &HashMap<[u8; 32], ChunkData>,
        decoder: &mut Option<SpanDecoder>,
    ) -> Result<Vec<u8>, ReadError> {
        let window = window_ref(chunk).map(|r| {
            windows
                .get(&r.sha256)
                .cloned()
                .or_else(|| self.cached_window(&r))
        });
        if matches!(window, Some(None)) && !crate::layer::index::continues(decoder, chunk, input_at)
        {
            *decoder = None;
            return Err(ReadError::NoWindow);
        }
        let window = window.flatten();
        crate::layer::index::decode_chunk_resumed(
            compressed,
            input_at,
            chunk,
            window.as_deref().map(|w| &w[..]),
            decoder,
        )
        .map_err(|e| self.corrupt(layer, chunk, e))
    }

    /// Read `[offset, offset + size)` of the TOC entry `entry_idx` (a regular file).
    pub async fn read(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        entry_idx: usize,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, ReadError> {
        self.stats.reads.inc();
        let (local, entry_size) = {
            let view = layer.view();
            let entry = view.entries().get(entry_idx).ok_or(ReadError::NoEntry)?;
            (
                entry.chunks.is_empty().then(|| entry.digest.clone()),
                entry.size,
            )
        };
        let end = offset.saturating_add(size as u64).min(entry_size);
        if offset >= end {
            return Ok(vec![]);
        }
        if let Some(d) = local {
            // A layer without TOC: its files exist only in the file cache (or, streaming, in
            // the temp files they arrived in).
            let d = d.ok_or(ReadError::NoEntry)?;
            let len = (end - offset) as usize;
            let (layer, layout) = (Arc::clone(layer), self.layout.clone());
            return tokio::task::spawn_blocking(move || {
                let what = || format!("the cached file {d}");
                let f = layer
                    .open_local(&layout, &d)
                    .map_err(|e| ReadError::local(what(), &e))?;
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, offset)
                    .map_err(|e| ReadError::local(what(), &e))?;
                Ok(buf)
            })
            .await
            .unwrap_or(Err(ReadError::Abandoned));
        }
        let entry = layer.toc.entries.get(entry_idx).ok_or(ReadError::NoEntry)?;
        let mut claims = vec![];
        let mut slots = vec![];
        let mut last = None;
        for (i, c) in entry.chunks.iter().enumerate() {
            if c.file_offset < end && c.file_offset + c.size > offset {
                slots.push((c, self.slot(layer, c, true, Class::OnDemand, &mut claims)));
                last = Some(i);
            }
        }
        // Read-ahead: the file's next chunks, loaded by the same requests, not waited for.
        if let Some(last) = last {
            let mut budget = self.read_ahead;
            for c in &entry.chunks[last + 1..] {
                if c.size > budget {
                    break;
                }
                budget -= c.size;
                let _ = self.slot(layer, c, true, Class::OnDemand, &mut claims);
            }
        }
        // Neighbours: chunks of the files that follow in the blob (often the same directory, read
        // next), when this read goes to the registry anyway. Stored on disk, not kept in memory.
        let neighbours = if lock(&layer.scan).scanning() {
            self.neighbours.max(SCAN_NEIGHBOURS)
        } else {
            self.neighbours
        };
        let partial = self.partials.get(&layer.digest);
        // Only after chunks that must come from the registry: a read of chunks already local
        // (a prefetch or an earlier read stored them) fetches nothing.
        let remote = claims
            .iter()
            .filter(|c| {
                !partial
                    .as_ref()
                    .is_some_and(|p| p.contains(c.span.0, c.span.1))
            })
            .map(|c| c.span);
        let remote_span = remote
            .clone()
            .map(|s| s.0)
            .min()
            .zip(remote.map(|s| s.1).max());
        if neighbours > 0
            && layer.blob.get().is_none()
            && let Some((first, anchor)) = remote_span
        {
            // By where each chunk's bytes end: through a gzip index, the files that follow in
            // the same checkpoint span start where the read starts (at the checkpoint), and
            // come with a few more bytes of the same request.
            let from = layer.by_end.partition_point(|&(end, _, _)| end <= anchor);
            for &(end, e, c) in &layer.by_end[from..] {
                if end > anchor + neighbours {
                    break;
                }
                let Some(chunk) = layer
                    .toc
                    .entries
                    .get(e as usize)
                    .and_then(|e| e.chunks.get(c as usize))
                else {
                    continue;
                };
                let (s, end) = layer.spans.span(chunk);
                // A piece decoded from a checkpoint before the read's own bytes would widen
                // the request backwards.
                if s < first || partial.as_ref().is_some_and(|p| p.contains(s, end)) {
                    continue;
                }
                let _ = self.slot(layer, chunk, false, Class::OnDemand, &mut claims);
            }
        }
        if !claims.is_empty() {
            self.load(layer, claims, Order::Blob);
        }
        // Directory read-ahead (`siblings.rs`), once this read's own chunks are in (its
        // request goes first on the link), paced like region read-ahead.
        if remote_span.is_some()
            && layer.blob.get().is_none()
            && !layer.guided.load(std::sync::atomic::Ordering::Relaxed)
            && let Some(files) = layer.siblings.miss(entry_idx, self.dir_read_ahead)
        {
            let waits: Vec<Waiter> = slots
                .iter()
                .filter_map(|(_, s)| match s {
                    Slot::Wait(rx) => Some(rx.clone()),
                    _ => None,
                })
                .collect();
            let (this, layer) = (Arc::clone(self), Arc::clone(layer));
            tokio::spawn(async move {
                for mut rx in waits {
                    let _ = rx.wait_for(|v| v.is_some()).await;
                }
                this.read_ahead_gently(layer, files, "directory", entry_idx)
                    .await;
            });
        }
        // Region read-ahead (`region.rs`): misses of several files close together in the
        // blob: the bytes around them, in the background, after this read's own request.
        if let Some((first, anchor)) = remote_span
            && layer.blob.get().is_none()
            && !layer.guided.load(std::sync::atomic::Ordering::Relaxed)
            && let Some(kind) = file_kind(&entry.path)
        {
            let (parts, hot) = lock(&layer.regions).miss(
                Instant::now(),
                entry_idx,
                kind,
                first,
                anchor,
                self.region_read_ahead,
            );
            if !parts.is_empty() {
                let dir = common_dir(
                    hot.iter()
                        .filter_map(|&e| layer.toc.entries.get(e))
                        .map(|e| e.path.as_str()),
                );
                let files = layer.files_in(&parts, first, dir, kind);
                tracing::debug!(layer = %layer.digest, entry = entry_idx, ?parts, "region read-ahead");
                tokio::spawn(Arc::clone(self).read_ahead_gently(
                    Arc::clone(layer),
                    files,
                    "region",
                    entry_idx,
                ));
            }
        }
        if let Some(why) = slots.iter().find_map(|(_, s)| match s {
            Slot::Failed(why) => Some(why.clone()),
            _ => None,
        }) {
            return Err(ReadError::Recent(Box::new(why)));
        }
        let waiting = slots.iter().any(|(_, s)| matches!(s, Slot::Wait(_)));
        let started = Instant::now();
        let wait =
            async {
                let mut out = Vec::with_capacity((end - offset) as usize);
                // The file's first chunk, when this read has it (ELF read-ahead looks at it).
                let mut first = None;
                for (c, slot) in slots {
                    let data = match slot {
                        Slot::Ready(d) => d,
                        Slot::Failed(why) => return Err(why),
                        Slot::Wait(mut rx) => {
                            let v = rx
                                .wait_for(|v| v.is_some())
                                .await
                                .map_err(|_| ReadError::Abandoned)?;
                            match v.as_ref() {
                                Some(Ok(d)) => Arc::clone(d),
                                Some(Err(e)) => return Err(e.clone()),
                                None => return Err(ReadError::Abandoned),
                            }
                        }
                    };
                    let from = (offset.max(c.file_offset) - c.file_offset) as usize;
                    let to = (end.min(c.file_offset + c.size) - c.file_offset) as usize;
                    out.extend_from_slice(data.get(from..to).ok_or_else(|| {
                        ReadError::Corrupt("chunk shorter than its TOC size".into())
                    })?);
                    if c.file_offset == 0 {
                        first = Some(data);
                    }
                }
                Ok((out, first))
            };
        let result = tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| ReadError::Timeout(self.timeout))?;
        if waiting {
            let waited = started.elapsed();
            tracing::debug!(layer = %layer.digest, file = %entry.path, offset, waited_ms = waited.as_millis() as u64, "read waited");
            self.stats.wait_seconds.observe(waited.as_secs_f64());
            if let Err(e) =
                lock(&self.db).add_read_waits(layer.digest.as_str(), 1, waited.as_millis() as u64)
            {
                tracing::debug!(layer = %layer.digest, error = %e, "cannot count a read's wait");
            }
        }
        let (out, first) = result?;
        if let Some(first) = first {
            self.elf_read_ahead(layer, entry_idx, first);
        }
        Ok(out)
    }

    /// ELF read-ahead (`elf.rs`): the first read of an executable or a library, once its
    /// first chunk is here, fetches in the background what the dynamic loader opens next: the
    /// interpreter, the libraries it names (looked up in this layer, in the loader's usual
    /// directories) and the file's own other chunks, each at most `ELF_READ_AHEAD_MAX`
    /// compressed bytes. Off when a start-up prefetch guides the layer or the layer is
    /// scanned; once per file per mounted layer.
    fn elf_read_ahead(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        entry_idx: usize,
        first: ChunkData,
    ) {
        if !self.elf_wanted(layer, entry_idx) || !lock(&layer.elf_seen).insert(entry_idx as u32) {
            return;
        }
        let (this, layer) = (Arc::clone(self), Arc::clone(layer));
        tokio::spawn(async move {
            if let Some(deps) = super::elf::deps(&first) {
                this.elf_fetch(&layer, entry_idx, deps, false);
            }
        });
    }

    /// Whether entry `entry_idx` may get ELF read-ahead (not whether it had it).
    fn elf_wanted(&self, layer: &LazyLayer, entry_idx: usize) -> bool {
        self.elf_read_ahead
            && layer.blob.get().is_none()
            && !layer.guided.load(std::sync::atomic::Ordering::Relaxed)
            && !lock(&layer.scan).scanning()
            && layer
                .toc
                .entries
                .get(entry_idx)
                .is_some_and(|e| e.mode & 0o111 != 0 || e.path.contains(".so"))
    }

    /// ELF read-ahead from the first decoded bytes of a file's first chunk while its response
    /// is still arriving (`bytes`, not verified: they only choose what to fetch). A big
    /// executable's first chunk (python3.11's: 2 MB compressed, 170 ms of a 100 Mbit/s link)
    /// names its libraries in its first few hundred KB: they are fetched beside the rest of
    /// it instead of after it. Returns whether this file needs no more looking at (done here,
    /// or not wanted); `false` while `bytes` fall short of what the names need.
    fn elf_peek(self: &Arc<Self>, layer: &Arc<LazyLayer>, entry_idx: usize, bytes: &[u8]) -> bool {
        if !self.elf_wanted(layer, entry_idx) || lock(&layer.elf_seen).contains(&(entry_idx as u32))
        {
            return true;
        }
        let Some(deps) = super::elf::deps_complete(bytes) else {
            return false;
        };
        if lock(&layer.elf_seen).insert(entry_idx as u32) {
            self.elf_fetch(layer, entry_idx, deps, true);
        }
        true
    }

    /// The fetch of ELF read-ahead: what `deps` names, found in the layer, with the file's
    /// own other chunks.
    fn elf_fetch(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        entry_idx: usize,
        deps: super::elf::Deps,
        early: bool,
    ) {
        let tree = &layer.tree;
        let entry_at = |path: &str| tree.resolve_following(path).and_then(|n| n.entry);
        let mut files = vec![entry_idx];
        let found = deps.interp.as_deref().and_then(entry_at).into_iter().chain(
            deps.libs.iter().filter_map(|lib| {
                super::elf::LIBRARY_DIRS
                    .iter()
                    .find_map(|d| entry_at(&format!("{d}/{lib}")))
            }),
        );
        for e in found {
            if !files.contains(&e) {
                files.push(e);
            }
        }
        // An interpreter's own start files (`start.rs`), read before its program's first:
        // once the executable itself is in (they shared the link with its last chunks, which
        // its start needs first: python3.11's data segment waited 55-200 ms more).
        let start: Vec<usize> = super::start::python_start(&layer.toc.entries[entry_idx].path)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| entry_at(p))
            .filter(|e| !files.contains(e))
            .collect();
        files.retain(|&e| {
            layer
                .toc
                .entries
                .get(e)
                .is_some_and(|entry| layer.compressed_len(entry) <= ELF_READ_AHEAD_MAX)
        });
        let n = self.prefetch(layer, files.iter().copied(), Class::Neighbour);
        tracing::debug!(layer = %layer.digest, file = %layer.toc.entries[entry_idx].path, libs = ?deps.libs, start = start.len(), files = files.len(), chunks = n, early, "ELF read-ahead");
        if !start.is_empty() {
            // The loads of the executable's chunks running now (this read-ahead's, a read's);
            // waiting claims nothing.
            let loading: Vec<Waiter> = layer.toc.entries[entry_idx]
                .chunks
                .iter()
                .filter_map(|c| self.chunks.loading(&layer.digest, c))
                .collect();
            let (this, layer, timeout) = (Arc::clone(self), Arc::clone(layer), self.timeout);
            tokio::spawn(async move {
                for mut rx in loading {
                    let _ = tokio::time::timeout(timeout, rx.wait_for(|v| v.is_some())).await;
                }
                let n = this.prefetch(&layer, start.iter().copied(), Class::Neighbour);
                tracing::debug!(layer = %layer.digest, file = %layer.toc.entries[entry_idx].path, files = start.len(), chunks = n, "interpreter start files");
            });
        }
    }

    /// The first chunk of a file that may be ELF in `run`, to look at while it arrives
    /// (`elf_peek`): its entry and span.
    fn elf_peek_target(
        &self,
        layer: &LazyLayer,
        run: &[Claim],
    ) -> Option<(usize, u64, u64, Chunk)> {
        if !self.elf_read_ahead {
            return None;
        }
        run.iter().find_map(|c| {
            if c.chunk.file_offset != 0 || c.chunk.resume().is_some() {
                return None;
            }
            let (e, ci) = layer.chunk_ending_at(c.span.1)?;
            (ci == 0 && self.elf_wanted(layer, e) && !lock(&layer.elf_seen).contains(&(e as u32)))
                .then(|| (e, c.span.0, c.span.1, c.chunk.clone()))
        })
    }

    /// Fetch what the container runtime reads of every image before the process starts
    /// (`start::CONTAINER_START`) in the background, when the layer has it. For a layer
    /// without a learned list: its first misses, one round trip each, otherwise. Part of ELF
    /// read-ahead (what a program's start reads before its own work), off with it.
    pub fn start_files(self: &Arc<Self>, layer: &Arc<LazyLayer>) -> usize {
        if !self.elf_read_ahead || layer.blob.get().is_some() {
            return 0;
        }
        let files: Vec<usize> = super::start::CONTAINER_START
            .iter()
            .filter_map(|p| layer.tree.resolve_following(p).and_then(|n| n.entry))
            .collect();
        self.prefetch(layer, files, Class::Neighbour)
    }

    /// Fetch the files before the layer's `.prefetch.landmark` into the partial file, in the
    /// background (one request per group of neighbouring chunks).
    pub fn prefetch_landmark(self: &Arc<Self>, layer: &Arc<LazyLayer>) -> usize {
        let Some(landmark) = layer.toc.prefetch_landmark else {
            return 0;
        };
        layer.guide();
        let n = self.prefetch(
            layer,
            0..landmark.min(layer.toc.entries.len()),
            Class::Prefetch,
        );
        if n > 0 {
            tracing::info!(layer = %layer.digest, chunks = n, "prefetching files before the landmark");
        }
        n
    }

    /// Fetch the chunks of TOC entries `entries` (in that order: the order a start reads them)
    /// into the partial file, in the background: batches of neighbouring chunks, a few
    /// requests at a time. Chunks already local or being loaded are skipped. Returns the
    /// number of chunks claimed.
    pub fn prefetch(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        entries: impl IntoIterator<Item = usize>,
        class: Class,
    ) -> usize {
        let claims = self.claim_files(layer, entries, class);
        let n = claims.len();
        if n > 0 {
            self.load(layer, claims, Order::List);
        }
        n
    }

    /// Claims of the chunks of `entries` that are neither local nor claimed already.
    fn claim_files(
        &self,
        layer: &Arc<LazyLayer>,
        entries: impl IntoIterator<Item = usize>,
        class: Class,
    ) -> Vec<Claim> {
        let partial = self.partials.get(&layer.digest);
        let mut claims = vec![];
        for i in entries {
            let Some(e) = layer.toc.entries.get(i) else {
                continue;
            };
            // A file's last quarter of chunks right after its first: a dynamic loader reads
            // an ELF file's headers, then its data segment at the end (relocations write all
            // over it), then its code. python3.11's data segment is its last 1.4 of 6.8 MB:
            // through a gzip index (1 MiB pieces) its last pieces waited 394 ms at the end of
            // one 2.9 MB request of the learned list. `in_list_order` keeps them a request of
            // their own.
            let n = e.chunks.len();
            let tail = if n > 2 { n.div_ceil(4) } else { 0 };
            let order: Vec<usize> = (0..n.min(1))
                .chain(n - tail..n)
                .chain(1.min(n)..n - tail)
                .collect();
            for c in order.into_iter().filter_map(|k| e.chunks.get(k)) {
                let (s, end) = layer.spans.span(c);
                if layer.blob.get().is_some()
                    || partial.as_ref().is_some_and(|p| p.contains(s, end))
                {
                    continue;
                }
                let _ = self.slot(layer, c, false, class, &mut claims);
            }
        }
        claims
    }

    /// Directory and region read-ahead of `files` (in the order given): a batch of about
    /// `GENTLE_BATCH` bytes at a time, at most `GENTLE_REQUESTS` requests of all layers at
    /// once. A batch's chunks are claimed only once its request can go: a read of a chunk not
    /// claimed yet fetches it at once itself, instead of waiting behind the guess's queue.
    /// A directory's read-ahead fetched with the start-up prefetch's window (1 MiB in flight,
    /// up to 32 requests) filled the bottleneck's queue ahead of the reads that followed: on a
    /// second node through a gzip index with the start's checkpoints the imports took
    /// 2.83-2.87 s, paced 2.44-2.65 s (eStargz: unchanged, 2.1-2.2 s).
    /// `what` and `entry` (the miss that set it off) are for the log.
    async fn read_ahead_gently(
        self: Arc<Self>,
        layer: Arc<LazyLayer>,
        files: Vec<usize>,
        what: &'static str,
        entry: usize,
    ) {
        tracing::debug!(layer = %layer.digest, entry, files = files.len(), "{what} read-ahead");
        let mut claimed = 0;
        let mut batch = vec![];
        let mut bytes = 0;
        let mut files = files.into_iter().peekable();
        while let Some(f) = files.next() {
            if let Some(e) = layer.toc.entries.get(f) {
                bytes += layer.compressed_len(e);
                batch.push(f);
            }
            if bytes < GENTLE_BATCH && files.peek().is_some() {
                continue;
            }
            // Closed never: the semaphore is ours.
            let Ok(_turn) = self.gentle.acquire().await else {
                break;
            };
            if layer.blob.get().is_some() {
                break;
            }
            let claims = self.claim_files(&layer, batch.drain(..), Class::Neighbour);
            bytes = 0;
            claimed += claims.len();
            if !claims.is_empty() {
                Arc::clone(&self)
                    .load_now(Arc::clone(&layer), claims, Order::Gentle)
                    .await;
            }
        }
        tracing::debug!(layer = %layer.digest, entry, chunks = claimed, "{what} read-ahead done");
    }

    /// Load claimed chunks in the background: local ones first, the rest from the registry.
    fn load(self: &Arc<Self>, layer: &Arc<LazyLayer>, claims: Vec<Claim>, order: Order) {
        tokio::spawn(Arc::clone(self).load_now(Arc::clone(layer), claims, order));
    }

    /// [`Reader::load`], done when the requests of `Order::Gentle` are (the others are
    /// spawned).
    async fn load_now(self: Arc<Self>, layer: Arc<LazyLayer>, claims: Vec<Claim>, order: Order) {
        let this = self;
        let (this2, layer2) = (Arc::clone(&this), Arc::clone(&layer));
        let split = tokio::task::spawn_blocking(move || {
            let local = this2.local(&layer2);
            let mut remote = vec![];
            let mut need_window = vec![];
            let mut decoder = None;
            for claim in claims {
                let mut chunk = std::borrow::Cow::Borrowed(&claim.chunk);
                // Local bytes whose checkpoint window is kept apart and not here yet:
                // decoded from an earlier checkpoint when the bytes from there are local
                // too, else once the window is fetched.
                if window_ref(&claim.chunk).is_some_and(|r| this2.cached_window(&r).is_none())
                    && local.covers(claim.span.0, claim.span.1)
                {
                    match this2.reanchor(&layer2, &claim.chunk, |s, e| local.covers(s, e)) {
                        Some(c) => chunk = std::borrow::Cow::Owned(c),
                        None => {
                            need_window.push(claim);
                            continue;
                        }
                    }
                }
                let span = (chunk.offset.min(claim.span.0), claim.span.1);
                let loaded = this2.load_local(&layer2, &local, &chunk, span, &mut decoder);
                drop(chunk);
                match loaded {
                    // The earlier checkpoint's window left memory meanwhile.
                    Some(Err(ReadError::NoWindow)) => need_window.push(claim),
                    Some(Ok(d)) => {
                        this2.stats.local_chunks.inc();
                        this2.finish(claim, Ok(Arc::new(d)));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(layer = %layer2.digest, error = %e, "local chunk unusable; fetching it again");
                        remote.push(claim);
                    }
                    None => remote.push(claim),
                }
            }
            (remote, need_window, local)
        })
        .await;
        let Ok((remote, need_window, local)) = split else {
            return; // the blocking task panicked: its claims were dropped, waiters see an error
        };
        if !need_window.is_empty() {
            let (this, layer, local) = (Arc::clone(&this), Arc::clone(&layer), local.clone());
            tokio::spawn(async move { this.load_with_windows(&layer, local, need_window).await });
        }
        let partial = match local {
            Local::Partial(p) => Some(p),
            _ => None,
        };
        match order {
            Order::Blob => {
                for run in coalesce(remote, COALESCE_GAP) {
                    let (this, layer, partial) =
                        (Arc::clone(&this), Arc::clone(&layer), partial.clone());
                    tokio::spawn(async move { this.fetch_run(&layer, partial, run, None).await });
                }
            }
            Order::Gentle => {
                let runs = coalesce(remote, COALESCE_GAP)
                    .into_iter()
                    .map(|run| this.fetch_run(&layer, partial.clone(), run, None));
                futures_util::future::join_all(runs).await;
            }
            Order::List => {
                let permits = Arc::new(tokio::sync::Semaphore::new(PREFETCH_REQUESTS));
                let window = Arc::new(tokio::sync::Semaphore::new(PREFETCH_WINDOW_KIB as usize));
                let runs: Vec<Vec<Vec<Claim>>> = batches(remote, PREFETCH_BATCH)
                    .into_iter()
                    .map(|batch| in_list_order(batch, PREFETCH_GAP))
                    .collect();
                for batch in runs {
                    for run in batch {
                        let len = run.iter().map(|c| c.span.1).max().unwrap_or(0) - run[0].span.0;
                        // A run longer than half the window takes half: one that had to
                        // wait for the whole window waited for every straggler before it
                        // (libcrypto's 2 MB sat 95 ms behind a 12 KB request that lost
                        // packets in the bottleneck's queue, with the link idle).
                        let kib = (len.div_ceil(1024) as u32).clamp(1, PREFETCH_WINDOW_KIB / 2);
                        // Closed never: the semaphores are ours.
                        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                            return;
                        };
                        let Ok(credit) = Arc::clone(&window).acquire_many_owned(kib).await else {
                            return;
                        };
                        let (this, layer, partial) =
                            (Arc::clone(&this), Arc::clone(&layer), partial.clone());
                        tokio::spawn(async move {
                            this.fetch_run(&layer, partial, run, Some(credit)).await;
                            drop(permit);
                        });
                    }
                }
            }
        }
    }

    /// Decode chunks whose bytes are local once their windows (kept apart) are fetched.
    async fn load_with_windows(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        local: Local,
        claims: Vec<Claim>,
    ) {
        let windows = match self
            .windows_for(layer, claims.iter().map(|c| (&c.chunk, c.class)))
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(layer = %layer.digest, error = %e, "cannot fetch a checkpoint window");
                for claim in claims {
                    self.finish(claim, Err(e.clone()));
                }
                return;
            }
        };
        let (this, layer2, partial) = (
            Arc::clone(self),
            Arc::clone(layer),
            match &local {
                Local::Partial(p) => Some(Arc::clone(p)),
                _ => None,
            },
        );
        let remote = tokio::task::spawn_blocking(move || {
            let mut remote = vec![];
            let mut decoder = None;
            for claim in claims {
                let (s, e) = claim.span;
                let mut buf = vec![0u8; (e - s) as usize];
                let read = match &local {
                    Local::Blob(f) => f.read_exact_at(&mut buf, s),
                    Local::Partial(p) => p.read_at(&mut buf, s),
                    Local::Nothing => {
                        remote.push(claim);
                        continue;
                    }
                };
                let result = read
                    .map_err(|e| ReadError::local(format_args!("reading layer {}", layer2.digest), &e))
                    .and_then(|()| {
                        this.decode(&layer2, &claim.chunk, &buf, s, &windows, &mut decoder)
                    });
                match result {
                    Ok(d) => {
                        this.stats.local_chunks.inc();
                        this.finish(claim, Ok(Arc::new(d)));
                    }
                    Err(e) => {
                        tracing::warn!(layer = %layer2.digest, error = %e, "local chunk unusable; fetching it again");
                        remote.push(claim);
                    }
                }
            }
            remote
        })
        .await;
        let Ok(remote) = remote else { return };
        for run in coalesce(remote, COALESCE_GAP) {
            let (this, layer, partial) = (Arc::clone(self), Arc::clone(layer), partial.clone());
            tokio::spawn(async move { this.fetch_run(&layer, partial, run, None).await });
        }
    }

    /// Where the layer's bytes are locally (blocking: may open files).
    fn local(&self, layer: &LazyLayer) -> Local {
        if let Some(f) = layer.blob.get() {
            return Local::Blob(Arc::clone(f));
        }
        if let Ok(f) = File::open(self.layout.blob(&layer.digest)) {
            return Local::Blob(Arc::clone(layer.blob.get_or_init(|| Arc::new(f))));
        }
        if let Some(p) = self.partials.get(&layer.digest) {
            return Local::Partial(p);
        }
        let legacy = lock(&self.db)
            .layer(layer.digest.as_str())
            .ok()
            .flatten()
            .map(|r| r.filled)
            .unwrap_or(0);
        match self.partials.open(&layer.digest, layer.size, legacy) {
            Ok(p) => Local::Partial(p),
            Err(e) => {
                tracing::warn!(layer = %layer.digest, error = %e, "cannot open the partial file; reads are not cached on disk");
                Local::Nothing
            }
        }
    }

    /// A chunk whose bytes fail to decode or to verify. Through a gzip index taken from
    /// another node, the index is wrong or stale (the blob's bytes are the registry's): it is
    /// dropped, so that the fill streams the layer in and later mounts read what it unpacks.
    fn corrupt(
        &self,
        layer: &LazyLayer,
        chunk: &crate::layer::index::Chunk,
        e: impl std::fmt::Display,
    ) -> ReadError {
        if chunk.resume().is_some() {
            return self.refuse_index(layer, e);
        }
        ReadError::Corrupt(e.to_string())
    }

    /// Bytes read through the layer's gzip index are wrong: a shared index is dropped.
    fn refuse_index(&self, layer: &LazyLayer, e: impl std::fmt::Display) -> ReadError {
        let dropped = lock(&self.db).drop_shared_index(layer.digest.as_str());
        if matches!(dropped, Ok(true)) {
            tracing::error!(layer = %layer.digest, error = %e,
                "a read through the layer's shared gzip index gave wrong bytes: the index is refused; the layer is streamed in instead");
        }
        ReadError::Corrupt(e.to_string())
    }

    /// Decode a chunk from the local bytes `span` (the blob's bytes from the chunk's start
    /// through its end): `None` when they are not there.
    fn load_local(
        &self,
        layer: &LazyLayer,
        local: &Local,
        chunk: &Chunk,
        span: (u64, u64),
        decoder: &mut Option<SpanDecoder>,
    ) -> Option<Result<Vec<u8>, ReadError>> {
        let (s, e) = span;
        let mut buf = vec![0u8; (e - s) as usize];
        let read = match local {
            Local::Blob(f) => f.read_exact_at(&mut buf, s),
            Local::Partial(p) if p.contains(s, e) => p.read_at(&mut buf, s),
            _ => return None,
        };
        Some(
            read.map_err(|e| ReadError::local(format_args!("reading layer {}", layer.digest), &e))
                .and_then(|()| self.decode(layer, chunk, &buf, s, &HashMap::new(), decoder)),
        )
    }

    /// `chunk` (read through a gzip index, its checkpoint's window kept apart and not in
    /// memory) decoded from an earlier checkpoint instead: the nearest one whose window needs
    /// no fetch (in memory, or none: the layer's start), at most [`REANCHOR_MAX`] before the
    /// chunk, when `covers` says the blob's bytes from there to the chunk's own start are
    /// here. A checkpoint whose window some read fetched is usually just before: the files
    /// after it came with that read's bytes, and the window of their own checkpoint would
    /// cost a round trip.
    fn reanchor(
        &self,
        layer: &LazyLayer,
        chunk: &Chunk,
        covers: impl Fn(u64, u64) -> bool,
    ) -> Option<Chunk> {
        let p = chunk.resume().filter(|p| !p.zstd)?;
        let pos = p.out + chunk.inner_offset;
        let before = layer.points.partition_point(|q| q.out < p.out);
        for q in layer.points[..before].iter().rev() {
            if pos - q.out > REANCHOR_MAX || !covers(q.start(), chunk.offset) {
                return None;
            }
            if q.window_ref
                .is_none_or(|r| self.cached_window(&r).is_some())
            {
                return Some(Chunk {
                    offset: q.start(),
                    inner_offset: pos - q.out,
                    codec: Codec::Checkpoint {
                        point: Arc::clone(q),
                        end: chunk.end()?,
                    },
                    ..chunk.clone()
                });
            }
        }
        None
    }

    /// Decode, verify, store and hand out fetched chunks: `fetched` is the blob from `start`
    /// on, through every claim's end. Returns the bytes stored (by who wanted them), the
    /// decoder where the last chunk left it, `fetched` back, and the claims that need a
    /// checkpoint window not fetched yet (answered by the caller).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn decode_fetched(
        &self,
        layer: &LazyLayer,
        partial: Option<&PartialBlob>,
        claims: Vec<Claim>,
        fetched: Vec<u8>,
        start: u64,
        windows: &HashMap<[u8; 32], ChunkData>,
        mut decoder: Option<SpanDecoder>,
    ) -> ([u64; 2], Option<SpanDecoder>, Vec<u8>, Vec<Claim>) {
        let mut stored = [0u64; 2];
        let mut missing = vec![];
        for claim in claims {
            let (s, e) = (
                (claim.span.0 - start) as usize,
                (claim.span.1 - start) as usize,
            );
            match self.decode(
                layer,
                &claim.chunk,
                &fetched[..e],
                start,
                windows,
                &mut decoder,
            ) {
                Ok(data) => {
                    if let Some(p) = partial {
                        match p.write_missing(claim.span.0, &fetched[s..e]) {
                            Ok(n) => {
                                stored
                                    [(claim.class.fetched_by() == FetchedBy::Prefetch) as usize] +=
                                    n
                            }
                            Err(e) => {
                                tracing::warn!(layer = %p.digest, error = %e, "cannot store a fetched chunk")
                            }
                        }
                    }
                    self.stats.fetched_chunks.inc();
                    self.finish(claim, Ok(Arc::new(data)));
                }
                Err(ReadError::NoWindow) => missing.push(claim),
                Err(e) => self.finish(claim, Err(e)),
            }
        }
        (stored, decoder, fetched, missing)
    }

    /// One range request for a group of neighbouring chunks; each chunk is decoded, verified,
    /// stored and handed out as soon as its bytes are in.
    /// A prefetch's `credit` (KiB of its window) is given back as the bytes arrive.
    async fn fetch_run(
        self: &Arc<Self>,
        layer: &Arc<LazyLayer>,
        partial: Option<Arc<PartialBlob>>,
        mut run: Vec<Claim>,
        mut credit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let (start, end) = (
            run[0].span.0,
            run.iter().map(|c| c.span.1).max().unwrap_or(0),
        );
        let started = Instant::now();
        // For the log: the file of the run's first chunk.
        let first_file = layer
            .chunk_ending_at(run[0].span.1)
            .and_then(|(e, _)| layer.toc.entries.get(e))
            .map(|e| e.path.clone())
            .unwrap_or_default();
        // Bytes stored, by who wanted them.
        let mut stored = [0u64; 2];
        let class = run_class(&run, || {
            let mut scan = lock(&layer.scan);
            scan.fetched(start, end);
            scan.scanning()
        });
        let prefetch = class.fetched_by() == FetchedBy::Prefetch;
        // Windows kept apart that decoding the run needs (where a decoder starts: the chunks
        // after it are decoded on from there): fetched beside the run's own bytes.
        let starts: Vec<Chunk> = decoder_starts(run.iter().map(|c| &c.chunk))
            .filter(|c| window_ref(c).is_some_and(|r| self.cached_window(&r).is_none()))
            .cloned()
            .collect();
        let mut windows_task = (!starts.is_empty()).then(|| {
            let (this, layer) = (Arc::clone(self), Arc::clone(layer));
            tokio::spawn(async move {
                this.windows_for(&layer, starts.iter().map(|c| (c, class)))
                    .await
            })
        });
        let mut windows = Arc::new(HashMap::new());
        // Left after the last chunk decoded: the run's next chunk of the same checkpoint span
        // continues from there.
        let mut decoder: Option<SpanDecoder> = None;
        let mut fetch: Option<RangeFetch> = None;
        // ELF read-ahead from the first chunk of an executable while it arrives.
        let mut peek = self.elf_peek_target(layer, &run);
        let mut peeks = 0;
        let result = tokio::time::timeout(self.timeout, async {
            let (reference, creds) = self.reference_of(layer, &layer.digest)?;
            if prefetch {
                self.stats.prefetch_requests.inc();
            } else {
                self.stats.requests.inc();
            }
            let range = RangeFetch::open(
                &self.access,
                class,
                &reference,
                &layer.digest,
                &creds,
                partial.as_deref(),
                start,
                end,
                MAX_RUN,
            )
            .await
            .map_err(|e| ReadError::Registry(e.to_string()))?;
            let range = fetch.insert(range);
            while !run.is_empty() {
                let want = range
                    .more()
                    .await
                    .map_err(|e| ReadError::Registry(e.to_string()))?;
                if let Some(c) = credit.as_mut() {
                    // Keep only as much of the window as is still to come.
                    let to_come = (range.end - range.have()).div_ceil(1024) as usize;
                    if c.num_permits() > to_come {
                        drop(c.split(c.num_permits() - to_come));
                    }
                }
                if prefetch {
                    self.stats.prefetch_bytes.inc_by(want);
                } else {
                    self.stats.bytes_fetched.inc_by(want);
                }
                // Chunks whose bytes are all in (spans are sorted, so are their ends).
                let have = range.have();
                if let Some((e, s, end, chunk)) = &peek
                    && have < *end
                    && have >= s + ELF_PEEK_STEP * (peeks + 1)
                {
                    peeks += 1;
                    let bytes = range
                        .buf
                        .get((s - start) as usize..(have - start) as usize)
                        .and_then(|b| crate::layer::index::peek_chunk(b, chunk, ELF_PEEK_MAX));
                    if bytes.is_some_and(|b| self.elf_peek(layer, *e, &b)) || peeks >= ELF_PEEKS {
                        peek = None;
                    }
                }
                let ready = run.iter().take_while(|c| c.span.1 <= have).count();
                if ready == 0 {
                    continue;
                }
                if let Some(task) = windows_task.take() {
                    windows = Arc::new(task.await.map_err(|_| ReadError::Abandoned)??);
                }
                let done: Vec<Claim> = run.drain(..ready).collect();
                let (this, layer2, partial2, windows2) = (
                    Arc::clone(self),
                    Arc::clone(layer),
                    partial.clone(),
                    Arc::clone(&windows),
                );
                let (dec, fetched) = (decoder.take(), std::mem::take(&mut range.buf));
                let (mut n, mut dec, fetched, missing) = tokio::task::spawn_blocking(move || {
                    this.decode_fetched(
                        &layer2,
                        partial2.as_deref(),
                        done,
                        fetched,
                        start,
                        &windows2,
                        dec,
                    )
                })
                .await
                .map_err(|_| ReadError::Abandoned)?;
                range.buf = fetched;
                if !missing.is_empty() {
                    // A chunk behind the decoder: its own window, then decoded from it.
                    let more = self
                        .windows_for(layer, missing.iter().map(|c| (&c.chunk, c.class)))
                        .await?;
                    let mut all = (*windows).clone();
                    all.extend(more);
                    windows = Arc::new(all);
                    let (this, layer2, partial2, windows2) = (
                        Arc::clone(self),
                        Arc::clone(layer),
                        partial.clone(),
                        Arc::clone(&windows),
                    );
                    let fetched = std::mem::take(&mut range.buf);
                    let again;
                    (again, dec, range.buf, _) = tokio::task::spawn_blocking(move || {
                        this.decode_fetched(
                            &layer2,
                            partial2.as_deref(),
                            missing,
                            fetched,
                            start,
                            &windows2,
                            None,
                        )
                    })
                    .await
                    .map_err(|_| ReadError::Abandoned)?;
                    n[0] += again[0];
                    n[1] += again[1];
                }
                decoder = dec;
                stored[0] += n[0];
                stored[1] += n[1];
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(ReadError::Timeout(self.timeout)));
        // The bytes between the chunks came too (neighbours closer than a round trip share a
        // request): keep them, so that the filler does not fetch them again. They are checked
        // like every byte of the partial file: each chunk against its digest when read, the
        // whole blob when the fill completes.
        let buf = fetch.map(RangeFetch::into_buf);
        if let Some(buf) = buf
            && let Some(p) = partial.clone()
            && result.is_ok()
        {
            match tokio::task::spawn_blocking(move || range::write_back(&p, start, &buf)).await {
                Ok(Ok(n)) => stored[prefetch as usize] += n,
                Ok(Err(e)) => {
                    tracing::warn!(layer = %layer.digest, error = %e, "cannot store the bytes between fetched chunks")
                }
                Err(_) => {}
            }
        }
        tracing::debug!(layer = %layer.digest, start, len = end - start, prefetch, ?class, elapsed_ms = started.elapsed().as_millis() as u64, file = %first_file, "range fetch");
        self.stats
            .fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::error!(layer = %layer.digest, start, len = end - start, error = %e, "on-demand fetch failed");
        }
        for claim in run {
            self.finish(
                claim,
                Err(result
                    .clone()
                    .err()
                    .unwrap_or_else(|| ReadError::Registry("chunk not in the response".into()))),
            );
        }
        range::stored(
            &self.db,
            &layer.digest,
            partial,
            &[
                (FetchedBy::OnDemand, stored[0]),
                (FetchedBy::Prefetch, stored[1]),
            ],
        );
    }
}

/// The class of a range request for `run`: start-up prefetch when all its chunks are (a read
/// may join a prefetch's run), a guess when all are guesses or prefetch, else on-demand, or a
/// scan when the layer's reader walks it in order (`scanning`, asked only then: it records
/// the fetch).
fn run_class(run: &[Claim], scanning: impl FnOnce() -> bool) -> Class {
    if run.iter().all(|c| c.class == Class::Prefetch) {
        Class::Prefetch
    } else if run
        .iter()
        .all(|c| matches!(c.class, Class::Prefetch | Class::Neighbour))
    {
        Class::Neighbour
    } else if scanning() {
        Class::Scan
    } else {
        Class::OnDemand
    }
}

/// A file's kind for region read-ahead: a hash of its name's extension (a start reading
/// compiled modules reads more compiled modules, not the sources beside them). None for a
/// name without one, or with a version number for one (`libc.so.6`): executables,
/// configuration and libraries are the ELF read-ahead's, and their misses say nothing about
/// their neighbours (measured: `ls -R /usr` read ahead 2 MB of files without extension).
fn file_kind(path: &str) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = name.rsplit_once('.').map(|(_, e)| e)?;
    if ext.is_empty() || ext.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ext.hash(&mut h);
    Some(h.finish())
}

/// The deepest directory holding all of `paths`, with its trailing `/` ("" for the root).
fn common_dir<'a>(paths: impl Iterator<Item = &'a str>) -> &'a str {
    let mut common: Option<&str> = None;
    for p in paths {
        let dir = p.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let dir = &p[..dir.len() + usize::from(!dir.is_empty())];
        common = Some(match common {
            None => dir,
            Some(c) => {
                // The longest prefix of both that ends at a `/`.
                let same = c
                    .bytes()
                    .zip(dir.bytes())
                    .take_while(|(a, b)| a == b)
                    .count();
                let cut = c[..same].rfind('/').map(|i| i + 1).unwrap_or(0);
                &c[..cut]
            }
        });
    }
    common.unwrap_or("")
}

/// How loaded chunks are requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// All at once, by position in the blob (a read: everything it needs now).
    Blob,
    /// In the order given, in batches, a few requests at a time (start-up prefetch).
    List,
    /// All at once, by position in the blob, done when they are (a batch of the region
    /// read-ahead, which paces its batches: `Reader::read_ahead_gently`).
    Gentle,
}

/// The chunks, of `chunks` decoded in this order from one contiguous run of the blob, that
/// start a decoder at their own checkpoint (and need its window): the first, and any behind
/// the chunk before it. The others are decoded on from the chunk before.
fn decoder_starts<'a>(chunks: impl Iterator<Item = &'a Chunk>) -> impl Iterator<Item = &'a Chunk> {
    let mut at: Option<u64> = None;
    chunks.filter(move |c| {
        let Some(p) = c.resume().filter(|p| !p.zstd) else {
            return true;
        };
        let pos = p.out + c.inner_offset;
        let fresh = at.is_none_or(|a| pos < a);
        at = Some(pos + c.size);
        fresh
    })
}

/// Windows (sorted by offset in the windows blob) in groups fetched with one request each:
/// at most [`WINDOW_GAP`] apart, at most [`WINDOW_GROUP_MAX`] long.
fn window_groups(
    refs: Vec<crate::layer::gzindex::WindowRef>,
) -> Vec<Vec<crate::layer::gzindex::WindowRef>> {
    window_groups_by(refs, |r| r)
}

/// [`window_groups`] of items that each name a window (`window`).
fn window_groups_by<T>(
    items: Vec<T>,
    window: impl Fn(&T) -> &crate::layer::gzindex::WindowRef,
) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = vec![];
    for item in items {
        let r = window(&item);
        if let Some(g) = groups.last_mut() {
            let (first, end) = (
                window(&g[0]).offset,
                g.iter()
                    .map(|w| window(w).offset + u64::from(window(w).len))
                    .max()
                    .unwrap_or(0),
            );
            if r.offset <= end + WINDOW_GAP
                && r.offset + u64::from(r.len) - first <= WINDOW_GROUP_MAX
            {
                g.push(item);
                continue;
            }
        }
        groups.push(vec![item]);
    }
    groups
}

/// The windows blob's ranges that decoding a learned list's chunks needs, to fetch them ahead
/// with the list's ranges: `needs` holds each chunk's span in the blob and its window (kept
/// apart), `runs` the list's ranges as [`prefetch_runs`] made them. Returns `[start, end,
/// before]`: windows grouped as a read groups them, each group with the index in `runs` of the
/// first range that needs one of its windows, in that order.
pub fn prefetch_windows(
    runs: &[(u64, u64)],
    needs: impl IntoIterator<Item = ((u64, u64), crate::layer::gzindex::WindowRef)>,
) -> Vec<[u64; 3]> {
    let mut first: HashMap<u64, (crate::layer::gzindex::WindowRef, usize)> = HashMap::new();
    for ((start, _), w) in needs {
        let Some(run) = runs.iter().position(|&(s, e)| s <= start && start < e) else {
            continue;
        };
        first
            .entry(w.offset)
            .and_modify(|(_, r)| *r = (*r).min(run))
            .or_insert((w, run));
    }
    let mut windows: Vec<_> = first.into_values().collect();
    windows.sort_unstable_by_key(|(w, _)| w.offset);
    let mut out: Vec<[u64; 3]> = window_groups_by(windows, |(w, _)| w)
        .into_iter()
        .map(|g| {
            let start = g[0].0.offset;
            let end = g
                .iter()
                .map(|(w, _)| w.offset + u64::from(w.len))
                .max()
                .unwrap_or(start);
            let before = g.iter().map(|(_, r)| *r).min().unwrap_or(0);
            [start, end, before as u64]
        })
        .collect();
    out.sort_unstable_by_key(|[s, _, before]| (*before, *s));
    out
}

/// Group claims into runs of chunks at most `gap` apart, one range request each (sorted by
/// position).
fn coalesce(claims: Vec<Claim>, gap: u64) -> Vec<Vec<Claim>> {
    coalesce_apart(claims, gap, |_, _| false)
}

/// [`coalesce`], except that a claim for which `apart(last claim of the run, claim)` holds
/// starts a run of its own.
fn coalesce_apart(
    mut claims: Vec<Claim>,
    gap: u64,
    apart: impl Fn(&Claim, &Claim) -> bool,
) -> Vec<Vec<Claim>> {
    claims.sort_by_key(|c| c.span);
    let mut runs: Vec<Vec<Claim>> = vec![];
    for claim in claims {
        match runs.last_mut() {
            Some(run)
                if claim.span.0 <= run[run.len() - 1].span.1 + gap
                    && claim.span.1 - run[0].span.0 <= MAX_RUN
                    && !apart(&run[run.len() - 1], &claim) =>
            {
                run.push(claim)
            }
            _ => runs.push(vec![claim]),
        }
    }
    runs
}

/// Coalesce `claims` (in list order) into runs like [`coalesce`], and order the runs by the
/// first place in the list of any of their chunks: the files needed first are asked for first.
/// A chunk listed before the chunk of the same file just before it in the blob (a file's last
/// chunk, listed right after its first by `claim_files`) is a run of its own, so that it does
/// not arrive after all the chunks between.
fn in_list_order(claims: Vec<Claim>, gap: u64) -> Vec<Vec<Claim>> {
    let place: HashMap<(u64, u64), usize> = claims
        .iter()
        .enumerate()
        .rev()
        .map(|(i, c)| (c.span, i))
        .collect();
    let listed_before = |prev: &Claim, c: &Claim| {
        c.chunk.file_offset > 0
            && c.chunk.file_offset == prev.chunk.file_offset + prev.chunk.size
            && place.get(&c.span) < place.get(&prev.span)
    };
    let mut runs = coalesce_apart(claims, gap, listed_before);
    runs.sort_by_key(|run| {
        run.iter()
            .filter_map(|c| place.get(&c.span))
            .min()
            .copied()
            .unwrap_or(usize::MAX)
    });
    runs
}

/// The byte ranges the start-up prefetch of chunks at `spans` (in list order) asks for, at
/// most: neighbours merged as [`in_list_order`] merges them, over the whole list (a batch's
/// runs then each lie inside one of these), ordered by their first place in the list.
pub fn prefetch_runs(spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut place: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, s) in spans.iter().enumerate() {
        place.entry(*s).or_insert(i);
    }
    let mut sorted = spans;
    sorted.sort_unstable();
    sorted.dedup();
    // (start, end, first place)
    let mut runs: Vec<(u64, u64, usize)> = vec![];
    for s in sorted {
        let at = place.get(&s).copied().unwrap_or(usize::MAX);
        match runs.last_mut() {
            Some(r) if s.0 <= r.1 + PREFETCH_GAP && s.1.max(r.1) - r.0 <= MAX_RUN => {
                r.1 = r.1.max(s.1);
                r.2 = r.2.min(at);
            }
            _ => runs.push((s.0, s.1, at)),
        }
    }
    runs.sort_by_key(|r| r.2);
    runs.into_iter().map(|(s, e, _)| (s, e)).collect()
}

/// Split claims, in their order, into batches of about `bytes` compressed bytes each. Claims
/// whose spans overlap go in one batch, at the place of the first of them: through a gzip
/// index, the files after one checkpoint all decode from it, and each batch apart would fetch
/// the bytes from the checkpoint again (a directory's read-ahead once asked for the same
/// 280 KB three times, at once).
fn batches(claims: Vec<Claim>, bytes: u64) -> Vec<Vec<Claim>> {
    let mut out: Vec<Vec<Claim>> = vec![];
    let mut size = 0;
    for group in overlapping(claims) {
        let start = group.iter().map(|c| c.span.0).min().unwrap_or(0);
        let end = group.iter().map(|c| c.span.1).max().unwrap_or(0);
        match out.last_mut() {
            Some(b) if size < bytes => b.extend(group),
            _ => {
                size = 0;
                out.push(group);
            }
        }
        size += end - start;
    }
    out
}

/// `claims` gathered into groups of overlapping spans (each group in list order), the groups
/// ordered by the list place of their first claim.
fn overlapping(claims: Vec<Claim>) -> Vec<Vec<Claim>> {
    let mut by_start: Vec<usize> = (0..claims.len()).collect();
    by_start.sort_by_key(|&i| claims[i].span);
    let mut group_of = vec![0usize; claims.len()];
    let (mut groups, mut end) = (0usize, 0u64);
    for (n, &i) in by_start.iter().enumerate() {
        let (s, e) = claims[i].span;
        if n > 0 && s < end {
            end = end.max(e);
        } else {
            groups += 1;
            end = e;
        }
        group_of[i] = groups - 1;
    }
    // Groups numbered by their first claim in list order.
    let mut renumber = vec![usize::MAX; groups];
    let mut next = 0;
    for &g in &group_of {
        if renumber[g] == usize::MAX {
            renumber[g] = next;
            next += 1;
        }
    }
    let mut out: Vec<Vec<Claim>> = (0..groups).map(|_| vec![]).collect();
    for (claim, g) in claims.into_iter().zip(group_of) {
        out[renumber[g]].push(claim);
    }
    out
}

#[cfg(test)]
#[path = "reader_tests.rs"]
pub(crate) mod seam_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_errors_answer_eio_unless_local_with_an_os_error() {
        let eio = nix::libc::EIO;
        assert_eq!(ReadError::Timeout(Duration::from_secs(1)).errno(), eio);
        assert_eq!(ReadError::Registry("500".into()).errno(), eio);
        assert_eq!(ReadError::Corrupt("digest".into()).errno(), eio);
        assert_eq!(ReadError::Abandoned.errno(), eio);
        assert_eq!(ReadError::NoEntry.errno(), nix::libc::ENOENT);
        let denied = std::io::Error::from_raw_os_error(nix::libc::EACCES);
        assert_eq!(ReadError::local("f", &denied).errno(), nix::libc::EACCES);
        let gone = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        assert_eq!(ReadError::local("f", &gone).errno(), eio);
        let other = std::io::Error::other("no OS error");
        assert_eq!(ReadError::local("f", &other).errno(), eio);
        let recent = ReadError::Recent(Box::new(ReadError::Timeout(Duration::from_secs(60))));
        assert_eq!(recent.errno(), eio);
        assert!(
            recent.to_string().contains("timed out after 60s"),
            "{recent}"
        );
    }

    fn claim(start: u64, end: u64) -> Claim {
        Claim::detached(
            Chunk {
                offset: start,
                inner_offset: 0,
                file_offset: 0,
                size: end - start,
                digest: None,
                codec: Codec::GzipMember,
            },
            (start, end),
            Class::Prefetch,
        )
    }

    fn spans(groups: &[Vec<Claim>]) -> Vec<Vec<(u64, u64)>> {
        groups
            .iter()
            .map(|g| g.iter().map(|c| c.span).collect())
            .collect()
    }

    #[test]
    fn a_decoder_starts_at_the_first_chunk_of_a_run_and_at_any_behind_its_predecessor() {
        let point = |out| {
            Arc::new(crate::layer::gzindex::Point {
                out,
                inp: out / 2,
                bits: 0,
                window: vec![],
                zstd: false,
                window_ref: None,
            })
        };
        let chunk = |cp: u64, inner: u64, size: u64| Chunk {
            offset: cp / 2,
            inner_offset: inner,
            file_offset: 0,
            size,
            digest: None,
            codec: Codec::Checkpoint {
                point: point(cp),
                end: u64::MAX,
            },
        };
        // Checkpoints every 1000 bytes: chunks in order across them, then one behind.
        let run = [
            chunk(0, 100, 50),
            chunk(0, 150, 300),
            chunk(1000, 20, 10),
            chunk(2000, 0, 1),
            chunk(1000, 500, 10),
            chunk(1000, 600, 10),
        ];
        let starts: Vec<(u64, u64)> = decoder_starts(run.iter())
            .map(|c| (c.offset * 2, c.inner_offset))
            .collect();
        assert_eq!(starts, [(0, 100), (1000, 500)]);
        // Chunks without checkpoints (eStargz) each start their own decoder.
        let plain = Chunk {
            codec: Codec::GzipMember,
            ..chunk(0, 0, 1)
        };
        assert_eq!(decoder_starts([&plain, &plain].into_iter()).count(), 2);
    }

    #[test]
    fn claims_coalesce_by_gap_and_prefetch_batches_keep_list_order() {
        // Out of order; 10..20 and 25..30 are 5 apart, 1000..1010 far away.
        let c = || vec![claim(1000, 1010), claim(25, 30), claim(10, 20)];
        assert_eq!(
            spans(&coalesce(c(), 5)),
            [vec![(10, 20), (25, 30)], vec![(1000, 1010)]]
        );
        assert_eq!(
            spans(&coalesce(c(), 4)),
            [vec![(10, 20)], vec![(25, 30)], vec![(1000, 1010)]]
        );
        // A run never grows past MAX_RUN.
        let big = vec![claim(0, MAX_RUN - 10), claim(MAX_RUN - 5, MAX_RUN + 5)];
        assert_eq!(coalesce(big, 64).len(), 2);
        // Batches: list order, cut once a batch holds `bytes`.
        let b = batches(
            vec![
                claim(500, 560),
                claim(0, 50),
                claim(900, 910),
                claim(100, 200),
            ],
            100,
        );
        assert_eq!(
            spans(&b),
            [vec![(500, 560), (0, 50)], vec![(900, 910), (100, 200)]]
        );
        assert!(batches(vec![], 100).is_empty());
        // Overlapping spans (files decoded from one checkpoint) share a batch, at the place of
        // the first of them.
        let b = batches(
            vec![
                claim(0, 300),
                claim(1000, 1010),
                claim(0, 400),
                claim(200, 900),
                claim(900, 950),
            ],
            100,
        );
        assert_eq!(
            spans(&b),
            [
                vec![(0, 300), (0, 400), (200, 900)],
                vec![(1000, 1010), (900, 950)]
            ]
        );
        // In list order: runs sorted by the first place of any of their chunks in the list.
        let l = vec![
            claim(1000, 1010),
            claim(25, 30),
            claim(2000, 2010),
            claim(10, 20),
        ];
        assert_eq!(
            spans(&in_list_order(l, 5)),
            [
                vec![(1000, 1010)],
                vec![(10, 20), (25, 30)],
                vec![(2000, 2010)]
            ]
        );
    }

    #[test]
    fn a_files_last_chunk_listed_after_its_first_is_a_run_of_its_own() {
        let piece = |start: u64, end: u64, file_offset: u64| {
            let mut c = claim(start, end);
            c.chunk.file_offset = file_offset;
            c
        };
        // One file of four adjacent chunks as `claim_files` lists them (first, last, then
        // the middle), then the next file in the blob.
        let l = || {
            vec![
                piece(0, 100, 0),
                piece(300, 400, 300),
                piece(100, 200, 100),
                piece(200, 300, 200),
                piece(400, 450, 0),
            ]
        };
        assert_eq!(
            spans(&in_list_order(l(), 5)),
            [
                vec![(0, 100), (100, 200), (200, 300)],
                vec![(300, 400), (400, 450)]
            ]
        );
        // By position alone (a read's own chunks), one run.
        assert_eq!(coalesce(l(), 5).len(), 1);
        // Listed in file order: one run.
        let mut inorder = l();
        inorder.swap(1, 3);
        inorder.swap(1, 2);
        assert_eq!(in_list_order(inorder, 5).len(), 1);
    }

    #[test]
    fn prefetch_runs_hold_every_run_a_batch_would_ask_for_in_list_order() {
        let k = 1u64 << 10;
        // The list: a file at 1 MiB, then two neighbours at 0 (8 KiB apart), then one far off.
        let spans = vec![
            (1024 * k, 1100 * k),
            (0, 10 * k),
            (18 * k, 30 * k),
            (1100 * k + 100, 1101 * k),
            (5000 * k, 5001 * k),
            (0, 10 * k),
        ];
        assert_eq!(
            prefetch_runs(spans.clone()),
            [(1024 * k, 1101 * k), (0, 30 * k), (5000 * k, 5001 * k)]
        );
        // Every run the start-up prefetch makes of them lies inside one of these.
        let runs = prefetch_runs(spans.clone());
        for batch in batches(
            spans.iter().map(|s| claim(s.0, s.1)).collect(),
            PREFETCH_BATCH,
        ) {
            for run in in_list_order(batch, PREFETCH_GAP) {
                let (s, e) = (run[0].span.0, run.iter().map(|c| c.span.1).max().unwrap());
                assert!(runs.iter().any(|r| r.0 <= s && e <= r.1), "{s}..{e}");
            }
        }
    }

    #[test]
    fn a_lists_windows_are_fetched_ahead_grouped_before_the_first_range_that_needs_them() {
        let w = |offset: u64, len: u32| crate::layer::gzindex::WindowRef {
            offset,
            len,
            sha256: [offset as u8; 32],
        };
        // The list's ranges, in the order its files come (as `prefetch_runs` made them).
        let runs = [
            (5_000_000, 5_400_000),
            (100_000, 300_000),
            (9_000_000, 9_100_000),
        ];
        let needs = vec![
            // The first range: two chunks from one checkpoint (one window), and one from the
            // checkpoint next to it, whose window lies right after in the windows blob.
            ((5_000_000, 5_200_000), w(400_000, 10_000)),
            ((5_000_000, 5_300_000), w(400_000, 10_000)),
            ((5_300_000, 5_400_000), w(410_000, 12_000)),
            // The second: a window far from those.
            ((100_000, 300_000), w(0, 9_000)),
            // The third: a window next to the first group's, so in that group (it comes with
            // the first range, earlier than needed, in the same request).
            ((9_000_000, 9_100_000), w(422_000, 8_000)),
            // A chunk outside every range (not in the list's ranges): no window for it.
            ((20_000_000, 20_100_000), w(900_000, 8_000)),
        ];
        assert_eq!(
            prefetch_windows(&runs, needs),
            [[400_000, 430_000, 0], [0, 9_000, 1]]
        );
        assert!(prefetch_windows(&runs, vec![]).is_empty());
    }

    #[test]
    fn windows_close_in_their_blob_share_a_request() {
        let w = |offset: u64, len: u32| crate::layer::gzindex::WindowRef {
            offset,
            len,
            sha256: [offset as u8; 32],
        };
        let groups = window_groups(vec![
            w(0, 10_000),
            w(10_000, 20_000),
            // 32 KiB after the last one's end: still together.
            w(30_000 + WINDOW_GAP, 5_000),
            // Further: a request of its own.
            w(200_000, 10_000),
            // A group stops short of WINDOW_GROUP_MAX.
            w(210_000, 30_000),
            w(WINDOW_GROUP_MAX + 150_000, 30_000),
        ]);
        let offsets: Vec<Vec<u64>> = groups
            .iter()
            .map(|g| g.iter().map(|r| r.offset).collect())
            .collect();
        assert_eq!(
            offsets,
            [
                vec![0, 10_000, 30_000 + WINDOW_GAP],
                vec![200_000, 210_000],
                vec![WINDOW_GROUP_MAX + 150_000],
            ]
        );
    }

    #[test]
    fn a_reader_walking_the_layer_in_order_is_scanning() {
        let mut s = Scan::default();
        let mut at = 1000;
        for _ in 0..SCAN_STREAK {
            assert!(!s.scanning());
            s.fetched(at, at + 300_000);
            at += 300_000 + 10_000; // the next miss starts just past the last fetch
        }
        s.fetched(at, at + 300_000);
        assert!(s.scanning(), "{s:?}");
        // A jump elsewhere (a container's start) ends it.
        s.fetched(50, 100);
        assert!(!s.scanning());
        // Backwards or far ahead is no streak either.
        let mut s = Scan::default();
        for i in 0..20u64 {
            s.fetched(10_000_000 - i * 100_000, 10_000_000 - i * 100_000 + 50_000);
        }
        assert!(!s.scanning());
        let mut s = Scan::default();
        for i in 0..20u64 {
            s.fetched(i << 20, (i << 20) + 1000);
        }
        assert!(!s.scanning(), "gaps of a MiB are not a scan");
    }
}
