//! The background filler: completes every layer of every image in the store.
//!
//! One fill per layer digest at a time (single flight: a layer shared by many images, or asked
//! for by racing pulls, is fetched once). The fill shares the layer's partial file with on-demand
//! reads: it hashes the ranges already present and fetches only the gaps (HTTP Range), so bytes
//! read on demand and progress before a crash are not fetched again. It verifies the blob digest
//! and the uncompressed diff_id, and only then renames the file into `blobs/`.
//!
//! The filler never competes with a container for the link: it fetches in bounded range
//! requests when no foreground request runs, and stops a running one when one begins
//! ([`schedule`]).

pub mod verify;

use crate::oci::{Compression, Digest, Reference};
use crate::registry::{OpCreds, RegistryError};
use crate::store::partial::WriteError;
use crate::store::{
    Catalogue, FetchedBy, LayerRecord, LayerState, Layout, PartialBlob, Partials, StoreError,
};
use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::fs;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use verify::Verifier;

/// Progress is recorded (fdatasync + range map + catalogue update, a few ms) every quarter of a
/// second of fetching, and at least every 64 MiB: a daemon in a crash loop that lives half a
/// second still keeps what it fetched (at 1 s / 8 MiB, twenty lives of 0.3 to 0.9 s kept nothing
/// of a 32 MiB layer at 100 Mbit/s: tests/faults.rs).
const CHECKPOINT_BYTES: u64 = 64 << 20;
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// Network reads are batched into blocks this big before hashing and writing off the runtime.
const BLOCK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer {digest}: {reason}")]
    Verify { digest: Digest, reason: String },
    #[error("layer {0} is not in the catalogue")]
    Unknown(String),
    #[error("fill of {0} cancelled")]
    Cancelled(String),
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl FillError {
    fn retryable(&self) -> bool {
        match self {
            FillError::Registry(e) => e.is_transient(),
            FillError::Io { source, .. } => !crate::store::is_disk_full(source),
            _ => false,
        }
    }
    pub fn is_disk_full(&self) -> bool {
        match self {
            FillError::Io { source, .. } => crate::store::is_disk_full(source),
            FillError::Store(e) => e.is_disk_full(),
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FillStatus {
    Running,
    Done,
    /// Why, and whether for want of disk space (the pull then reports ResourceExhausted).
    Failed {
        reason: String,
        disk_full: bool,
    },
    Cancelled,
    /// Filling is turned off (`--no-fill`): the layer is read on demand only.
    OnDemand,
}

/// Why a layer's TOC could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TocFetchError {
    /// The TOC (or the footer pointing at it) is unusable: the layer is fetched whole and
    /// verified instead. Recorded in the catalogue; never tried again for this layer.
    #[error("{0}")]
    Refused(String),
    /// The registry (or the local store) failed now: nothing is recorded, and the next pull,
    /// mount or fill attempt fetches the TOC again.
    #[error("{0}")]
    Unavailable(String),
}

impl From<crate::layer::estargz::TocError> for TocFetchError {
    fn from(e: crate::layer::estargz::TocError) -> Self {
        TocFetchError::Refused(e.to_string())
    }
}

impl From<RegistryError> for TocFetchError {
    /// Range requests carry no digest to mismatch: every registry failure here is about the
    /// registry or the network, not about the layer (a 404 or 401 may be cured by another pull
    /// with other credentials or another source), so none of them condemns the TOC.
    fn from(e: RegistryError) -> Self {
        TocFetchError::Unavailable(e.to_string())
    }
}

impl From<StoreError> for TocFetchError {
    fn from(e: StoreError) -> Self {
        TocFetchError::Unavailable(e.to_string())
    }
}

impl From<tokio::task::JoinError> for TocFetchError {
    fn from(e: tokio::task::JoinError) -> Self {
        TocFetchError::Unavailable(format!("TOC check task: {e}"))
    }
}

/// What a verified TOC tells the catalogue.
struct Toc {
    entries: u64,
    /// Where the TOC starts (the end of the file payload).
    toc_offset: u64,
    /// Entries before the prefetch landmark, if the TOC has one.
    landmark: Option<u64>,
}

/// A fill that ran out of disk space is tried again at most this many times, this long after,
/// and only if the layer fits then (see `Filler::fits`).
const DISK_FULL_RETRIES: u32 = 2;
const DISK_FULL_PAUSE: Duration = Duration::from_millis(500);

struct Inflight {
    rx: watch::Receiver<FillStatus>,
    cancel: CancellationToken,
}

/// Counters exported by the metrics endpoint.
#[derive(Default)]
pub struct Stats {
    pub bytes_fetched: Counter,
    pub blob_requests: Counter,
    pub layers_completed: Counter,
    pub layers_failed: Counter,
}

pub struct Filler {
    layout: Layout,
    partials: Arc<Partials>,
    db: Arc<Mutex<Catalogue>>,
    /// Every blob request goes through it: TOCs as metadata, the fill as fill.
    access: Arc<crate::access::Access>,
    inflight: Mutex<HashMap<String, Inflight>>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    pub stats: Stats,
    /// Attempts per fill for transient errors (each resumes where the last stopped).
    attempts: u32,
    /// When false, only TOCs are fetched; content comes on demand (`--no-fill`).
    pub fill_enabled: bool,
    /// Which complete layers are unpacked into the file cache.
    pub unpack: UnpackPolicy,
    /// Layers without TOC served by the FUSE mount while their fill unpacks them.
    streams: Arc<crate::fs::stream::Streams>,
    /// Bytes of tar stream between gzip index checkpoints (0: no index).
    index_span: u64,
    /// Fills fetching now, by layer digest: what the pull-through registry follows.
    running: Mutex<HashMap<String, Following>>,
    /// The last TOC fetch of a layer that failed for a transient reason, and when (cleared
    /// when a fetch succeeds): the snapshotter answers at once instead of waiting it out.
    toc_unavailable: Mutex<HashMap<String, (Instant, String)>>,
    /// Changes when a TOC fetch ends (fetched, refused or unavailable): the snapshotter
    /// waits on it instead of polling the catalogue.
    toc_events: watch::Sender<()>,
}

/// A fill fetching a layer now, as another reader of the blob follows it: its partial file,
/// the blob's size, and a channel that changes with each write (closed when this attempt ends).
#[derive(Clone)]
pub struct Following {
    pub blob: Arc<PartialBlob>,
    pub size: u64,
    pub progress: watch::Receiver<()>,
}

/// Removes a fill attempt from `Filler::running` when it ends, however it ends.
struct Running<'a> {
    filler: &'a Filler,
    digest: &'a str,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.filler.running).remove(self.digest);
    }
}

/// Ends a layer's stream as failed if the fill that unpacks it stops before it is complete.
struct StreamEnd(Option<Arc<crate::fs::stream::LayerStream>>);

impl StreamEnd {
    /// Record in the catalogue whether the layer's entries came in walk order (so far).
    fn record_order(&self, db: &Mutex<Catalogue>, digest: &str) {
        if let Some(s) = &self.0 {
            let ordered = s.read().ordered();
            if let Err(e) = lock(db).set_walk_order(digest, ordered) {
                tracing::warn!(layer = %digest, error = %e, "cannot record the layer's entry order");
            }
        }
    }

    fn done(mut self, result: Result<(), String>) {
        if let Some(s) = self.0.take() {
            s.finish(result);
        }
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.finish(Err("the fill stopped".into()));
        }
    }
}

/// Which complete layers get their files unpacked into `files/sha256` (docs/architecture.md, "Store").
#[derive(Clone, Copy, Debug, Default)]
pub struct UnpackPolicy {
    /// Layers without a TOC: the only way to mount them.
    pub plain: bool,
    /// eStargz layers: lets FUSE pass their files through to the kernel.
    pub estargz: bool,
}

impl UnpackPolicy {
    pub fn wants(&self, layer: &LayerRecord) -> bool {
        !layer.unpacked
            && if layer.has_toc() {
                self.estargz
            } else {
                self.plain
            }
    }
}

use crate::store::locked as lock;

/// Hash `blob` from its start, in order, as its ranges become present; `progress` changes
/// whenever the fill wrote more, and is dropped once it has written everything.
async fn verify_in_order(
    blob: Arc<PartialBlob>,
    size: u64,
    mut v: Verifier,
    mut progress: watch::Receiver<()>,
    digest: Digest,
) -> Result<Verifier, FillError> {
    let mut pos = 0u64;
    while pos < size {
        let Some(end) = blob.covered_until(pos) else {
            if progress.changed().await.is_err() && blob.covered_until(pos).is_none() {
                return Err(FillError::Verify {
                    digest,
                    reason: format!("bytes from {pos} never arrived"),
                });
            }
            continue;
        };
        let (b, d2) = (Arc::clone(&blob), digest.clone());
        v = tokio::task::spawn_blocking(move || -> Result<Verifier, FillError> {
            let mut buf = vec![0u8; BLOCK];
            let mut at = pos;
            while at < end {
                let n = BLOCK.min((end - at) as usize);
                b.read_at(&mut buf[..n], at).map_err(io_err(b.path()))?;
                v.update(&buf[..n]).map_err(|e| verify_err(&d2, e))?;
                at += n as u64;
            }
            Ok(v)
        })
        .await
        .map_err(join_err(blob.path()))??;
        pos = end;
    }
    Ok(v)
}

/// A partial blob read from its start, in order, waiting for its ranges to arrive (blocking:
/// for a `spawn_blocking` thread). Fails when `progress` ends with the next byte missing (the
/// fill stopped).
struct InOrder {
    blob: Arc<PartialBlob>,
    pos: u64,
    size: u64,
    progress: watch::Receiver<()>,
    rt: tokio::runtime::Handle,
}

impl std::io::Read for InOrder {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(end) = self.blob.covered_until(self.pos) {
                let n = buf.len().min((end.min(self.size) - self.pos) as usize);
                self.blob.read_at(&mut buf[..n], self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            // A change sent after the check above is not lost: `changed` reports every send
            // since this receiver last looked.
            let ended = self.rt.block_on(self.progress.changed()).is_err();
            if ended && self.blob.covered_until(self.pos).is_none() {
                return Err(std::io::Error::other(format!(
                    "the fill stopped before byte {}",
                    self.pos
                )));
            }
        }
    }
}

/// Unpack a layer's tar from `r` into the file cache; plain layers (no TOC: `plain` names the
/// blob and its size) also get their file index, stored as a blob. A plain gzip layer's index
/// also records decoder checkpoints every `span` bytes (layer/gzindex.rs), so that the layer can
/// be read lazily later with range requests. Blocking.
fn unpack_stream(
    r: impl std::io::Read + Send + 'static,
    compression: Compression,
    layout: &Layout,
    plain: Option<(Digest, u64)>,
    span: u64,
    stream: Option<Arc<crate::fs::stream::LayerStream>>,
) -> Result<(crate::layer::tar::Unpacked, Option<Digest>), String> {
    use crate::layer::gzindex::{IndexingReader, ZstdIndexingReader};
    use crate::layer::tar as ltar;
    let (mut recording, mut consumed) = (None, None);
    let tar: Box<dyn std::io::Read + Send> = match (&plain, compression) {
        (Some(_), Compression::Gzip) if span > 0 => {
            let (r, rec) = IndexingReader::new(std::io::BufReader::with_capacity(1 << 20, r), span)
                .map_err(|e| e.to_string())?;
            (recording, consumed) = (Some(rec), Some(r.consumed()));
            Box::new(r)
        }
        (Some(_), Compression::Zstd) if span > 0 => {
            let (r, rec) =
                ZstdIndexingReader::new(std::io::BufReader::with_capacity(1 << 20, r), span);
            (recording, consumed) = (Some(rec), Some(r.consumed()));
            Box::new(r)
        }
        _ => ltar::decoder(compression, r).map_err(|e| e.to_string())?,
    };
    let limits = ltar::Limits::default();
    let u = match stream {
        Some(s) => ltar::unpack_tracked(
            tar,
            &layout.files_dir(),
            &limits,
            &mut crate::fs::stream::Announcer(Arc::clone(&s)),
            consumed.as_deref(),
        )
        .inspect_err(|e| {
            // Readers waiting for the rest of the layer fail now, not when the fill ends.
            s.finish(Err(e.to_string()))
        }),
        None => ltar::unpack_tracked(
            tar,
            &layout.files_dir(),
            &limits,
            &mut ltar::Nobody,
            consumed.as_deref(),
        ),
    }
    .map_err(|e| e.to_string())?;
    let Some((layer, blob_size)) = plain else {
        return Ok((u, None));
    };
    let mut no_random_access = None;
    let ra = recording.and_then(|rec| {
        let rec = std::mem::take(&mut *rec.lock().unwrap_or_else(|p| p.into_inner()));
        let zstd = rec.points.first().is_some_and(|p| p.zstd);
        let why = if !rec.complete {
            Some("the stream did not end".to_string())
        } else if zstd && rec.points.len() < 2 {
            Some(format!(
                "one zstd frame (or none starting {} KiB after another): it can only be read from its start",
                span >> 10
            ))
        } else if rec.points.is_empty() {
            Some("no checkpoints".to_string())
        } else {
            rec.unusable.clone()
        };
        if let Some(why) = why {
            tracing::info!(layer = %layer, reason = %why, "no random-access index for this layer: it streams in on every node");
            no_random_access = Some(why);
            return None;
        }
        Some(ltar::RandomAccess {
            layer: layer.clone(),
            blob_size,
            size: rec.size,
            points: rec.points,
            positions: u.positions.clone(),
            windows: None,
        })
    });
    let json = ltar::encode_index_full(&u.entries, ra.as_ref(), no_random_access.as_deref());
    let d = Digest::of(&json);
    layout.put_blob(&d, &json).map_err(|e| e.to_string())?;
    if let Some(ra) = &ra {
        tracing::info!(layer = %layer, checkpoints = ra.points.len(), index_bytes = json.len(), "random-access index built");
    }
    Ok((u, Some(d)))
}

/// How many of an eStargz layer's last bytes the first TOC request asks for. The footer says
/// where the TOC starts only once it is in; asking for the footer alone costs a second round
/// trip for every layer. A TOC takes about 50 compressed bytes per file, so a layer of
/// `size` bytes whose files average more than ~13 KB compressed has a TOC under `size / 256`
/// (the python image's 122 MB layer: a 0.4 MB TOC, in one 476 KiB request). The guess is at
/// most 512 KiB: in the worst case (a few large files, a tiny TOC) it carries about one
/// bandwidth-delay product too much on a 100 Mbit/s, 20 ms link, the round trip it saves;
/// the bytes are kept in the partial file for the fill. A short guess costs what reading the
/// footer first did: a second request for the rest.
fn toc_tail_guess(size: u64) -> u64 {
    (size / 256).clamp(64 << 10, 512 << 10).min(size)
}

/// The range `(offset, len)` of an eStargz layer of `size` bytes that the first TOC request
/// asks for (the footer and, most often, the whole TOC). The caller checked
/// `size >= FOOTER_SIZE`.
pub fn toc_tail(size: u64) -> (u64, u64) {
    let len = toc_tail_guess(size)
        .max(crate::layer::estargz::FOOTER_SIZE)
        .min(size);
    (size - len, len)
}

/// The TOC member `[toc_offset, end)` from the bytes fetched: `head` (from `toc_offset` up to
/// the tail, empty when the tail holds it all) and `tail` (the layer's last bytes, from
/// `tail_at`). The caller checked `toc_offset < end <= tail_at + tail.len()` and fetched
/// `head` as `[toc_offset, tail_at)` when `toc_offset < tail_at`.
fn toc_member(head: &[u8], tail: &[u8], tail_at: u64, toc_offset: u64, end: u64) -> Vec<u8> {
    let from = toc_offset.saturating_sub(tail_at) as usize;
    let to = ((end - tail_at) as usize).min(tail.len());
    let mut member = Vec::with_capacity(head.len() + to.saturating_sub(from));
    member.extend_from_slice(head);
    member.extend_from_slice(tail.get(from..to).unwrap_or_default());
    member
}

fn verify_err(digest: &Digest, e: impl std::fmt::Display) -> FillError {
    FillError::Verify {
        digest: digest.clone(),
        reason: e.to_string(),
    }
}

/// A blocking task that panicked or was cancelled, reported against the file it worked on.
fn join_err(path: &std::path::Path) -> impl FnOnce(tokio::task::JoinError) -> FillError + '_ {
    move |e| FillError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e),
    }
}

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FillError + '_ {
    move |source| FillError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Credentials persisted for `registry` from an earlier CRI pull (for refetches).
pub fn persisted_secret(
    db: &Mutex<Catalogue>,
    registry: &str,
) -> Option<crate::registry::auth::Secret> {
    lock(db)
        .credential(registry)
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok())
}

/// A layer's `source` column is `registry/repository`.
pub fn source_reference(source: &str, digest: &Digest) -> Option<Reference> {
    let (registry, repo) = source.split_once('/')?;
    Some(Reference::with_digest(
        registry.to_string(),
        repo.to_string(),
        digest.to_string(),
    ))
}

/// How the filler works: parallel fills, whether it fills at all, what it unpacks.
#[derive(Clone, Copy, Debug)]
pub struct FillerOptions {
    pub max_parallel: usize,
    pub fill_enabled: bool,
    pub unpack: UnpackPolicy,
    /// Bytes of tar stream between gzip index checkpoints (0: no index).
    pub index_span: u64,
}

impl Filler {
    pub fn new(
        layout: Layout,
        partials: Arc<Partials>,
        db: Arc<Mutex<Catalogue>>,
        access: Arc<crate::access::Access>,
        opts: FillerOptions,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let FillerOptions {
            max_parallel,
            fill_enabled,
            unpack,
            index_span,
        } = opts;
        Arc::new(Filler {
            layout,
            partials,
            db,
            access,
            inflight: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(max_parallel.max(1))),
            shutdown,
            stats: Stats::default(),
            attempts: 5,
            fill_enabled,
            unpack,
            streams: Arc::default(),
            index_span,
            running: Mutex::default(),
            toc_unavailable: Mutex::default(),
            toc_events: watch::Sender::new(()),
        })
    }

    /// Changes each time a TOC fetch ends, however it ended (its outcome is in the catalogue
    /// or in [`Filler::toc_unavailable_since`] by then). Subscribe before looking at the
    /// state, then wait for a change.
    pub fn toc_events(&self) -> watch::Receiver<()> {
        self.toc_events.subscribe()
    }

    /// Layers without TOC streaming in (the FUSE mount serves them as they arrive).
    pub fn streams(&self) -> &Arc<crate::fs::stream::Streams> {
        &self.streams
    }

    /// The access gate the filler shares with on-demand reads (they report to its link, the
    /// filler yields to them).
    pub fn access(&self) -> &Arc<crate::access::Access> {
        &self.access
    }

    /// The link the filler shares with on-demand reads.
    pub fn link(&self) -> &Arc<crate::access::schedule::Link> {
        self.access.link()
    }

    /// Make sure `layer` is being filled; returns a receiver that reports its end.
    pub fn ensure(
        self: &Arc<Self>,
        layer: &LayerRecord,
        creds: OpCreds,
    ) -> watch::Receiver<FillStatus> {
        if layer.state == LayerState::Complete
            && !self.unpack.wants(layer)
            && let Ok(d) = layer.digest()
            && self.layout.has_blob(&d)
        {
            let (_tx, rx) = watch::channel(FillStatus::Done);
            return rx;
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = inflight.get(&layer.digest) {
            return f.rx.clone();
        }
        let (tx, rx) = watch::channel(FillStatus::Running);
        let cancel = self.shutdown.child_token();
        inflight.insert(
            layer.digest.clone(),
            Inflight {
                rx: rx.clone(),
                cancel: cancel.clone(),
            },
        );
        drop(inflight);
        let this = Arc::clone(self);
        let digest = layer.digest.clone();
        tokio::spawn(async move {
            let status = this.run(&digest, creds, cancel).await;
            this.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest);
            let _ = tx.send(status);
        });
        rx
    }

    /// Stop filling a layer (its image was removed); progress so far stays on disk until GC.
    pub fn cancel(&self, digest: &str) {
        if let Some(f) = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            f.cancel.cancel();
        }
    }

    /// The fill fetching layer `digest` now, if one is (not one waiting for its turn).
    pub fn following(&self, digest: &str) -> Option<Following> {
        lock(&self.running).get(digest).cloned()
    }

    /// Whether a fill of `digest` is running or waiting for its turn.
    pub fn is_filling(&self, digest: &str) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(digest)
    }

    /// The partial files shared with on-demand reads.
    pub fn partials(&self) -> &Arc<Partials> {
        &self.partials
    }

    pub fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Wait for a fill to end.
    pub async fn wait(mut rx: watch::Receiver<FillStatus>) -> FillStatus {
        loop {
            let s = rx.borrow().clone();
            if s != FillStatus::Running {
                return s;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    }

    async fn run(
        self: &Arc<Self>,
        digest: &str,
        creds: OpCreds,
        cancel: CancellationToken,
    ) -> FillStatus {
        let _permit = tokio::select! {
            p = Arc::clone(&self.permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return FillStatus::Cancelled },
            _ = cancel.cancelled() => return FillStatus::Cancelled,
        };
        if !self.fill_enabled {
            let layer = lock(&self.db)
                .layer(digest)
                .ok()
                .flatten()
                .filter(Self::needs_toc);
            if let Some(layer) = layer {
                tokio::select! {
                    _ = self.fetch_toc(&layer, &creds) => {}
                    _ = cancel.cancelled() => return FillStatus::Cancelled,
                }
            }
            return FillStatus::OnDemand;
        }
        let mut attempt = 0;
        let mut disk_full_retries = 0;
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                r = self.fill_once(digest, &creds) => r,
                _ = cancel.cancelled() => Err(FillError::Cancelled(digest.to_string())),
            };
            match result {
                Ok(()) => {
                    self.stats.layers_completed.inc();
                    tracing::info!(
                        layer = digest,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "layer complete"
                    );
                    let layer = lock(&self.db).layer(digest).ok().flatten();
                    if let Some(layer) = layer.filter(|l| self.unpack.wants(l)) {
                        tokio::select! {
                            _ = self.unpack_layer(&layer) => {}
                            _ = cancel.cancelled() => return FillStatus::Cancelled,
                        }
                    }
                    return FillStatus::Done;
                }
                Err(FillError::Cancelled(_)) => {
                    tracing::info!(layer = digest, "fill stopped; progress kept");
                    return FillStatus::Cancelled;
                }
                Err(e) if e.retryable() && attempt + 1 < self.attempts => {
                    attempt += 1;
                    let delay = Duration::from_millis(500) * 2u32.pow(attempt.min(6));
                    tracing::warn!(layer = digest, error = %e, attempt, "fill interrupted; resuming in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return FillStatus::Cancelled,
                    }
                }
                Err(e) => {
                    if e.is_disk_full()
                        && let Ok(d) = Digest::parse(digest)
                    {
                        // Give the space back; the fill starts over once there is room.
                        self.partials.discard(&d);
                        // Fills running beside this one may have taken the space and given it
                        // back by now (a big layer that can never fit): a layer that fits
                        // then is fetched again at once, rather than failing with it.
                        if disk_full_retries < DISK_FULL_RETRIES {
                            disk_full_retries += 1;
                            tokio::select! {
                                _ = tokio::time::sleep(DISK_FULL_PAUSE) => {}
                                _ = cancel.cancelled() => return FillStatus::Cancelled,
                            }
                            if self.fits(digest) {
                                tracing::warn!(layer = digest, error = %e, "disk full, but there is room for the layer now: fetching it again");
                                continue;
                            }
                        }
                    }
                    let msg = e.to_string();
                    tracing::error!(layer = digest, error = %msg, "fill failed");
                    self.stats.layers_failed.inc();
                    // Transient failures keep their progress and stay pending (retried at the next
                    // start or pull); verification failures start again from zero.
                    let state = if e.retryable() {
                        LayerState::Pending
                    } else {
                        LayerState::Failed
                    };
                    if let Err(e) = lock(&self.db).set_layer_state(digest, state, Some(&msg)) {
                        tracing::error!(layer = digest, error = %e, "cannot record fill failure");
                    }
                    return FillStatus::Failed {
                        reason: msg,
                        disk_full: e.is_disk_full(),
                    };
                }
            }
        }
    }

    /// Whether the store's filesystem has room for all of the layer now (with 1 MiB to spare).
    fn fits(&self, digest: &str) -> bool {
        let Some(size) = lock(&self.db).layer(digest).ok().flatten().map(|l| l.size) else {
            return false;
        };
        nix::sys::statvfs::statvfs(&self.layout.root).is_ok_and(|st| {
            st.blocks_available().saturating_mul(st.fragment_size()) >= size.saturating_add(1 << 20)
        })
    }

    /// An eStargz layer whose TOC was neither fetched nor refused yet.
    fn needs_toc(layer: &LayerRecord) -> bool {
        matches!(layer.form(), crate::store::Form::TocPending { .. })
    }

    /// The operation's credentials, completed with those persisted for the registry.
    fn creds_for(&self, reference: &Reference, creds: &OpCreds) -> OpCreds {
        OpCreds {
            request: creds.request.clone(),
            persisted: creds
                .persisted
                .clone()
                .or_else(|| persisted_secret(&self.db, reference.registry())),
        }
    }

    /// Why the last TOC fetch of `digest` failed transiently, if it failed at or after `since`
    /// and no fetch has succeeded since.
    pub fn toc_unavailable_since(&self, digest: &str, since: Instant) -> Option<String> {
        lock(&self.toc_unavailable)
            .get(digest)
            .filter(|(at, _)| *at >= since)
            .map(|(_, why)| why.clone())
    }

    /// Whether a fill or TOC fetch of `digest` is running or queued now.
    pub fn is_working_on(&self, digest: &str) -> bool {
        lock(&self.inflight).contains_key(digest)
    }

    /// eStargz: fetch the footer and the TOC (two range requests), verify the TOC against the
    /// layer's annotation, validate it and store it under its digest. A refused TOC is recorded
    /// with the reason; the layer is then only fetched whole (which the fill does anyway). A
    /// transient failure records nothing in the catalogue: the next attempt fetches it again.
    async fn fetch_toc(&self, layer: &LayerRecord, creds: &OpCreds) {
        // A mount waits for the TOC: its requests are `Class::Metadata`, which the filler
        // yields to while they run (no start is reading yet).
        let fetched = self.try_fetch_toc(layer, creds).await;
        if fetched.is_ok() {
            lock(&self.toc_unavailable).remove(&layer.digest);
        }
        match fetched {
            Ok(Toc {
                entries,
                toc_offset,
                landmark,
            }) => {
                tracing::info!(layer = %layer.digest, entries, landmark, format = if layer.toc_position.is_some() { "zstd:chunked" } else { "estargz" }, "TOC fetched and verified");
                if let Err(e) = lock(&self.db).set_toc(&layer.digest, entries, toc_offset, landmark)
                {
                    tracing::error!(layer = %layer.digest, error = %e, "cannot record the TOC");
                }
            }
            Err(TocFetchError::Unavailable(reason)) => {
                tracing::warn!(layer = %layer.digest, %reason, "cannot fetch the TOC now; the next pull, mount or fill attempt tries again");
                lock(&self.toc_unavailable).insert(layer.digest.clone(), (Instant::now(), reason));
            }
            Err(TocFetchError::Refused(reason)) => {
                tracing::warn!(layer = %layer.digest, %reason, "layer refused for lazy access; it is fetched whole and verified instead");
                if let Err(e) = lock(&self.db).set_toc_error(&layer.digest, &reason) {
                    tracing::error!(layer = %layer.digest, error = %e, "cannot record the TOC error");
                }
            }
        }
        self.toc_events.send_replace(());
    }

    async fn try_fetch_toc(
        &self,
        layer: &LayerRecord,
        creds: &OpCreds,
    ) -> Result<Toc, TocFetchError> {
        use crate::layer::estargz::{self, FOOTER_SIZE, Limits};
        let refused = |e: &dyn std::fmt::Display| TocFetchError::Refused(e.to_string());
        let digest = layer.digest().map_err(|e| refused(&e))?;
        let toc_digest = Digest::parse(layer.toc_digest.as_deref().unwrap_or_default())
            .map_err(|e| refused(&e))?;
        let reference = source_reference(&layer.source, &digest)
            .ok_or_else(|| TocFetchError::Refused(format!("bad source {:?}", layer.source)))?;
        let creds = self.creds_for(&reference, creds);
        if let Some(position) = &layer.toc_position {
            return self
                .fetch_zstd_toc(layer, &digest, &toc_digest, position, &reference, &creds)
                .await;
        }
        if layer.size < FOOTER_SIZE {
            return Err(TocFetchError::Refused(format!(
                "layer of {} bytes cannot hold an eStargz footer",
                layer.size
            )));
        }
        let limits = Limits::default();
        // The footer and, most often, the whole TOC in one request (see `toc_tail_guess`).
        let (tail_at, tail_len) = toc_tail(layer.size);
        self.stats.blob_requests.inc();
        let tail = self
            .access
            .fetch(
                crate::access::Class::Metadata,
                &reference,
                &digest,
                tail_at,
                tail_len,
                &creds,
            )
            .await?;
        let toc_offset = estargz::parse_footer(&tail)?;
        let end = layer.size - estargz::footer_size(&tail);
        if toc_offset >= end {
            return Err(TocFetchError::Refused(format!(
                "TOC offset {toc_offset} beyond the data ({end} bytes)"
            )));
        }
        if end - toc_offset > limits.max_toc_compressed {
            return Err(estargz::TocError::TooLarge {
                size: end - toc_offset,
                limit: limits.max_toc_compressed,
            }
            .into());
        }
        // The part of the TOC before the tail, if the guess was short.
        let head = if toc_offset < tail_at {
            self.stats.blob_requests.inc();
            self.access
                .fetch(
                    crate::access::Class::Metadata,
                    &reference,
                    &digest,
                    toc_offset,
                    tail_at - toc_offset,
                    &creds,
                )
                .await?
        } else {
            vec![]
        };
        let member = toc_member(&head, &tail, tail_at, toc_offset, end);
        let size = layer.size;
        let td = toc_digest.clone();
        // The JSON is stored (hashed, written, synced) while it is parsed: both are on a cold
        // start's critical path (on the python image's TOC, 6–15 ms and 18–30 ms).
        let json = tokio::task::spawn_blocking(move || {
            estargz::toc_json_from_member(&member, &limits).map(Arc::new)
        })
        .await??;
        let (layout, j, d) = (self.layout.clone(), Arc::clone(&json), toc_digest.clone());
        let stored = tokio::task::spawn_blocking(move || layout.put_blob(&d, &j));
        let parsed = tokio::task::spawn_blocking(move || {
            estargz::parse_toc(&json, &td, size, toc_offset, &limits)
        });
        let (stored, parsed) = tokio::join!(stored, parsed);
        let toc = parsed??;
        stored??;
        let (entries, landmark) = (
            toc.entries.len() as u64,
            toc.prefetch_landmark.map(|n| n as u64),
        );
        crate::layer::keep_parsed_toc(&toc_digest, None, size, toc_offset, toc);
        let mut pieces = vec![(tail_at, Arc::new(tail))];
        if !head.is_empty() {
            pieces.push((toc_offset, Arc::new(head)));
        }
        self.keep_in_partial(layer, &digest, pieces).await;
        Ok(Toc {
            entries,
            toc_offset,
            landmark,
        })
    }

    /// The footer and TOC are part of the blob: keep them in the partial file so the fill does
    /// not fetch them again (the blob digest check at the end covers them like every byte).
    async fn keep_in_partial(
        &self,
        layer: &LayerRecord,
        digest: &Digest,
        pieces: Vec<(u64, Arc<Vec<u8>>)>,
    ) {
        let (partials, filled, d, size) = (
            Arc::clone(&self.partials),
            layer.filled,
            digest.clone(),
            layer.size,
        );
        let stored = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            let p = partials.open(&d, size, filled)?;
            for (at, bytes) in pieces {
                p.write_missing(at, &bytes)
                    .map_err(|e| crate::store::io_err(p.path())(e))?;
            }
            p.flush()
        })
        .await;
        if let Ok(Err(e)) = stored {
            tracing::warn!(layer = %layer.digest, error = %e, "cannot keep the TOC bytes in the partial file");
        }
    }

    /// zstd:chunked: the annotations locate the compressed TOC: one range request, verified
    /// against the checksum before it is decompressed.
    async fn fetch_zstd_toc(
        &self,
        layer: &LayerRecord,
        digest: &Digest,
        checksum: &Digest,
        position: &str,
        reference: &Reference,
        creds: &OpCreds,
    ) -> Result<Toc, TocFetchError> {
        use crate::layer::{estargz::Limits, zstd_chunked};
        let pos = zstd_chunked::Position::parse(position)?;
        let limits = Limits::default();
        if pos.length > limits.max_toc_compressed {
            return Err(TocFetchError::Refused(format!(
                "TOC of {} bytes compressed is over the {} byte limit",
                pos.length, limits.max_toc_compressed
            )));
        }
        if pos.offset + pos.length > layer.size {
            return Err(TocFetchError::Refused(format!(
                "TOC at {}+{} beyond the blob ({} bytes)",
                pos.offset, pos.length, layer.size
            )));
        }
        self.stats.blob_requests.inc();
        let compressed = self
            .access
            .fetch(
                crate::access::Class::Metadata,
                reference,
                digest,
                pos.offset,
                pos.length,
                creds,
            )
            .await?;
        let compressed = Arc::new(compressed);
        let (c2, ck, size) = (Arc::clone(&compressed), checksum.clone(), layer.size);
        let toc = tokio::task::spawn_blocking(move || {
            zstd_chunked::parse_toc(&c2, &ck, &pos, size, &limits)
        })
        .await??;
        self.layout.put_blob(checksum, &compressed)?;
        let (entries, landmark) = (
            toc.entries.len() as u64,
            toc.prefetch_landmark.map(|n| n as u64),
        );
        crate::layer::keep_parsed_toc(checksum, Some(position), size, pos.data_end(), toc);
        self.keep_in_partial(layer, digest, vec![(pos.offset, compressed)])
            .await;
        Ok(Toc {
            entries,
            toc_offset: pos.data_end(),
            landmark,
        })
    }

    async fn fill_once(&self, digest_str: &str, creds: &OpCreds) -> Result<(), FillError> {
        let layer = lock(&self.db)
            .layer(digest_str)?
            .ok_or_else(|| FillError::Unknown(digest_str.to_string()))?;
        let digest = layer.digest()?;
        let final_path = self.layout.blob(&digest);
        if final_path.exists() {
            lock(&self.db).set_layer_state(digest_str, LayerState::Complete, None)?;
            return Ok(());
        }
        if Self::needs_toc(&layer) {
            self.fetch_toc(&layer, creds).await;
        }
        let compression =
            Compression::from_media_type(&layer.media_type).map_err(|e| verify_err(&digest, e))?;
        let diff_id = Digest::parse(&layer.diff_id).map_err(|e| verify_err(&digest, e))?;
        let reference =
            source_reference(&layer.source, &digest).ok_or_else(|| FillError::Verify {
                digest: digest.clone(),
                reason: format!("bad source {:?}", layer.source),
            })?;

        // Open the shared partial file. A failed verification starts again from nothing.
        if layer.state == LayerState::Failed {
            self.partials.discard(&digest);
        }
        let partials = Arc::clone(&self.partials);
        let (d2, size, legacy) = (digest.clone(), layer.size, layer.filled);
        let path = self.layout.partial(&digest);
        let blob = tokio::task::spawn_blocking(move || partials.open(&d2, size, legacy))
            .await
            .map_err(join_err(&path))??;
        let have = blob.present_bytes();
        if have > 0 {
            tracing::info!(layer = %digest, present = have, size = layer.size, "resuming fill; present ranges are hashed, not fetched");
        }

        // Verification walks the file in order as ranges become present (the fetch below, or
        // on-demand reads); the fetch walks the gaps. They run side by side, so a resumed fill
        // fetches at once instead of after re-hashing everything it already has.
        let verifier = Verifier::new(compression).map_err(|e| verify_err(&digest, e))?;
        let (progress, progress_rx) = watch::channel(());
        lock(&self.running).insert(
            digest_str.to_string(),
            Following {
                blob: Arc::clone(&blob),
                size: layer.size,
                progress: progress.subscribe(),
            },
        );
        let _running = Running {
            filler: self,
            digest: digest_str,
        };
        tracing::debug!(layer = %digest, "fill running");
        let verifying = tokio::spawn(verify_in_order(
            Arc::clone(&blob),
            layer.size,
            verifier,
            progress_rx,
            digest.clone(),
        ));
        // Abort the verification if the fetch fails (or this future is dropped).
        let verifying = tokio_util::task::AbortOnDropHandle::new(verifying);
        // Layers whose files go to the file cache are unpacked the same way, as their bytes
        // arrive, so that they are mountable (plain layers) or passed through (eStargz) as
        // soon as the blob is verified, not after a second pass over it. Its result is used
        // only once the blob digest checks out; if it fails, the unpack runs after the fill.
        // The record as it is now: the TOC may have been fetched above.
        let now = lock(&self.db)
            .layer(digest_str)?
            .unwrap_or_else(|| layer.clone());
        // A plain layer is served by the FUSE mount as its entries arrive (fs/stream.rs).
        let stream = StreamEnd(
            (self.unpack.wants(&now) && !now.has_toc()).then(|| self.streams.begin(&digest)),
        );
        stream.record_order(&self.db, digest_str);
        let unpacking = self.unpack.wants(&now).then(|| {
            let (blob, rx, layout) = (Arc::clone(&blob), progress.subscribe(), self.layout.clone());
            let (size, plain) = (
                now.size,
                (!now.has_toc()).then(|| (digest.clone(), now.size)),
            );
            let span = self.index_span;
            let rt = tokio::runtime::Handle::current();
            let announce = stream.0.clone();
            tokio::task::spawn_blocking(move || {
                unpack_stream(
                    InOrder {
                        blob,
                        pos: 0,
                        size,
                        progress: rx,
                        rt,
                    },
                    compression,
                    &layout,
                    plain,
                    span,
                    announce,
                )
            })
        });
        let mut pos = 0u64;
        let mut last_checkpoint = (0u64, Instant::now());
        let mut fetched_since = 0u64;
        // Bytes fetched since the catalogue's count was last updated (at checkpoints).
        let mut unrecorded = 0u64;
        while pos < layer.size {
            if let Some(end) = blob.covered_until(pos) {
                pos = end;
                continue;
            }
            // One bounded request at a time, sent when no foreground request runs, stopped when
            // one begins (what arrived is kept): see access/schedule.rs.
            self.access.fill_turn().await;
            if blob.covered_until(pos).is_some() {
                continue; // on-demand reads fetched it while we waited
            }
            let gap_end = blob.next_start(pos).unwrap_or(layer.size).min(layer.size);
            let req_end = gap_end
                .min(pos.saturating_add(self.link().policy().request_bytes.max(BLOCK as u64)));
            let creds = self.creds_for(&reference, creds);
            self.stats.blob_requests.inc();
            let body = self
                .access
                .open(
                    crate::access::Class::Fill,
                    &reference,
                    &digest,
                    pos,
                    Some(req_end - pos),
                    &creds,
                )
                .await?;
            let preempt = body.preempted();
            let mut stream = body.stream;
            let mut block: Vec<u8> = Vec::with_capacity(BLOCK);
            let start = pos;
            let mut received = 0u64;
            tokio::pin!(preempt);
            let mut preempted = false;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = &mut preempt, if !preempted => {
                        preempted = true;
                        None
                    }
                    n = stream.next() => n,
                };
                let end = next.is_none() || start + received >= req_end;
                if let Some(chunk) = next {
                    let chunk = chunk.map_err(|e| RegistryError::Unreachable {
                        registry: reference.registry().into(),
                        reason: e.to_string(),
                    })?;
                    // A registry ignoring Range sends on to the blob's end: keep only the gap.
                    let want = ((req_end - start - received) as usize).min(chunk.len());
                    self.stats.bytes_fetched.inc_by(want as u64);
                    block.extend_from_slice(&chunk[..want]);
                    received += want as u64;
                }
                let end = end || start + received >= req_end;
                if block.len() >= BLOCK || (end && !block.is_empty()) {
                    let data = std::mem::replace(&mut block, Vec::with_capacity(BLOCK));
                    let n = data.len() as u64;
                    let b = Arc::clone(&blob);
                    let d2 = digest.clone();
                    let at = pos;
                    tokio::task::spawn_blocking(move || -> Result<(), FillError> {
                        b.write_checked(at, &data).map(|_| ()).map_err(|e| match e {
                            WriteError::Io(e) => io_err(b.path())(e),
                            WriteError::Mismatch(m) => verify_err(&d2, m),
                        })
                    })
                    .await
                    .map_err(join_err(&path))??;
                    progress.send_replace(());
                    pos += n;
                    fetched_since += n;
                    unrecorded += n;
                    if fetched_since - last_checkpoint.0 >= CHECKPOINT_BYTES
                        || last_checkpoint.1.elapsed() >= CHECKPOINT_INTERVAL
                    {
                        self.checkpoint(&blob, digest_str, &mut unrecorded).await?;
                        last_checkpoint = (fetched_since, Instant::now());
                    }
                }
                if end {
                    break;
                }
            }
            drop(stream);
            if preempted {
                // What arrived is kept: make it durable before waiting for the link again.
                self.checkpoint(&blob, digest_str, &mut unrecorded).await?;
                last_checkpoint = (fetched_since, Instant::now());
                self.link().stats.fill_preemptions.inc();
                tracing::debug!(layer = %digest, at = pos, "fill request stopped: a foreground request began");
                continue;
            }
            if pos < req_end {
                self.checkpoint(&blob, digest_str, &mut unrecorded).await?;
                return Err(RegistryError::Truncated {
                    registry: reference.registry().into(),
                    what: format!("layer {digest}"),
                    got: pos,
                    expected: req_end,
                }
                .into());
            }
        }
        // Every byte is present: the verification finishes over what is left.
        drop(progress);
        self.count_fill(digest_str, &mut unrecorded);
        let verifier = verifying.await.map_err(join_err(&path))??;
        // Verify, then publish under the final name.
        let layout = self.layout.clone();
        let d2 = digest.clone();
        let b = Arc::clone(&blob);
        let verdict =
            tokio::task::spawn_blocking(move || -> Result<Result<(), String>, FillError> {
                let (blob_digest, diff) = match verifier.finish() {
                    Ok(x) => x,
                    Err(e) => return Ok(Err(e.to_string())),
                };
                if blob_digest != d2 {
                    return Ok(Err(format!("blob digest mismatch: got {blob_digest}")));
                }
                if diff != diff_id {
                    return Ok(Err(format!(
                        "uncompressed digest {diff} does not match the config's diff_id {diff_id}"
                    )));
                }
                b.sync().map_err(io_err(b.path()))?;
                let dest = layout.blob(&d2);
                fs::rename(b.path(), &dest).map_err(io_err(&dest))?;
                crate::store::sync_dir(&layout.blobs_dir()).map_err(io_err(&dest))?;
                Ok(Ok(()))
            })
            .await
            .map_err(join_err(&path))??;
        if let Err(reason) = verdict {
            self.partials.discard(&digest);
            lock(&self.db).set_filled(digest_str, 0)?;
            return Err(FillError::Verify { digest, reason });
        }
        self.partials.published(&blob);
        {
            let db = lock(&self.db);
            db.set_filled(digest_str, layer.size)?;
            db.set_layer_state(digest_str, LayerState::Complete, None)?;
        }
        if let Some(task) = unpacking {
            let result = task.await;
            stream.record_order(&self.db, digest_str);
            match result {
                Ok(Ok((u, index))) => {
                    let idx = index.as_ref().map(|d| d.to_string());
                    match lock(&self.db).set_unpacked(digest_str, idx.as_deref()) {
                        Ok(()) => {
                            tracing::info!(layer = %digest, entries = u.entries.len(), new_files = u.files_written,
                            new_bytes = u.bytes_written, "layer unpacked into the file cache while it arrived");
                            stream.done(Ok(()));
                            self.streams.remove(digest.hex());
                        }
                        Err(e) => {
                            tracing::error!(layer = %digest, error = %e, "cannot record the unpack");
                            stream.done(Err(format!("cannot record the unpack: {e}")));
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(layer = %digest, error = %e, "unpacking while the layer arrived failed; unpacking it again from the blob");
                    stream.done(Err(e));
                }
                Err(e) => stream.done(Err(e.to_string())),
            }
        }
        Ok(())
    }

    /// Unpack a complete layer's files into the file cache; layers without a TOC also get their
    /// file index. A failure is logged: the layer stays complete, mounts of plain layers wait.
    async fn unpack_layer(&self, layer: &LayerRecord) {
        use crate::layer::tar as ltar;
        let started = Instant::now();
        let (layout, rec, span) = (self.layout.clone(), layer.clone(), self.index_span);
        let res = tokio::task::spawn_blocking(
            move || -> Result<(ltar::Unpacked, Option<Digest>), String> {
                let digest = rec.digest().map_err(|e| e.to_string())?;
                let compression =
                    Compression::from_media_type(&rec.media_type).map_err(|e| e.to_string())?;
                let path = layout.blob(&digest);
                let blob = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let plain = (!rec.has_toc()).then(|| (digest.clone(), rec.size));
                unpack_stream(blob, compression, &layout, plain, span, None)
            },
        )
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match res {
            Ok((u, index)) => {
                let idx = index.as_ref().map(|d| d.to_string());
                if let Err(e) = lock(&self.db).set_unpacked(&layer.digest, idx.as_deref()) {
                    tracing::error!(layer = %layer.digest, error = %e, "cannot record the unpack");
                    return;
                }
                tracing::info!(layer = %layer.digest, entries = u.entries.len(), new_files = u.files_written,
                    new_bytes = u.bytes_written, elapsed_ms = started.elapsed().as_millis() as u64, "layer unpacked into the file cache");
                // New mounts use the index from now on.
                self.streams
                    .remove(layer.digest.trim_start_matches("sha256:"));
            }
            Err(e) => {
                tracing::error!(layer = %layer.digest, error = %e, "cannot unpack the layer; plain layers cannot be mounted until it succeeds")
            }
        }
    }

    /// Make the bytes written so far durable and record them (map, then catalogue).
    /// Make the present ranges durable, and count the bytes the fill fetched since the last
    /// checkpoint (`unrecorded`, zeroed).
    async fn checkpoint(
        &self,
        blob: &Arc<PartialBlob>,
        digest: &str,
        unrecorded: &mut u64,
    ) -> Result<(), FillError> {
        let b = Arc::clone(blob);
        let recorded = tokio::task::spawn_blocking(move || b.flush())
            .await
            .map_err(join_err(blob.path()))??;
        lock(&self.db).set_filled(digest, recorded)?;
        self.count_fill(digest, unrecorded);
        Ok(())
    }

    /// Add `bytes` (zeroed) to the layer's count of bytes fetched by the filler.
    fn count_fill(&self, digest: &str, bytes: &mut u64) {
        if *bytes == 0 {
            return;
        }
        if let Err(e) = lock(&self.db).add_fetched(digest, FetchedBy::Fill, *bytes) {
            tracing::warn!(layer = %digest, error = %e, "cannot count the bytes the fill fetched");
        }
        *bytes = 0;
    }
}

#[cfg(test)]
#[path = "filler_tests.rs"]
mod seam_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_toc_tail_guess_and_the_member_assembled_from_it() {
        assert_eq!(toc_tail_guess(100), 100);
        assert_eq!(toc_tail_guess(1 << 20), 64 << 10);
        assert_eq!(toc_tail_guess(122_000_000), 476_562);
        assert_eq!(toc_tail_guess(1 << 40), 512 << 10);
        // The tail holds it all: bytes [toc_offset, end) of a tail starting at 100.
        let tail: Vec<u8> = (100..200).map(|i| i as u8).collect();
        assert_eq!(
            toc_member(&[], &tail, 100, 120, 150),
            (120..150).map(|i| i as u8).collect::<Vec<_>>()
        );
        // The head came apart: [80, 100) then the tail up to the footer.
        let head: Vec<u8> = (80..100).map(|i| i as u8).collect();
        assert_eq!(
            toc_member(&head, &tail, 100, 80, 150),
            (80..150).map(|i| i as u8).collect::<Vec<_>>()
        );
    }

    fn read_in_order(
        blob: &Arc<PartialBlob>,
        size: u64,
        rx: watch::Receiver<()>,
    ) -> tokio::task::JoinHandle<std::io::Result<Vec<u8>>> {
        let (blob, rt) = (Arc::clone(blob), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || {
            let mut r = InOrder {
                blob,
                pos: 0,
                size,
                progress: rx,
                rt,
            };
            let mut out = vec![];
            r.read_to_end(&mut out).map(|_| out)
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_order_reads_wait_for_ranges_and_fail_when_the_fill_stops() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let partials = Partials::new(layout.clone());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let size = data.len() as u64;
        let blob = partials.open(&Digest::of(&data), size, 0).unwrap();
        let (tx, rx) = watch::channel(());
        let reader = read_in_order(&blob, size, rx);
        // The second half arrives first: the reader cannot pass byte 0 yet.
        blob.write_missing(100_000, &data[100_000..]).unwrap();
        tx.send_replace(());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!reader.is_finished());
        blob.write_missing(0, &data[..100_000]).unwrap();
        tx.send_replace(());
        drop(tx);
        assert_eq!(reader.await.unwrap().unwrap(), data);

        // A fill that stops halfway: the reader fails instead of waiting for ever.
        let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        let blob = partials.open(&Digest::of(&other), size, 0).unwrap();
        let (tx, rx) = watch::channel(());
        let reader = read_in_order(&blob, size, rx);
        blob.write_missing(0, &other[..50_000]).unwrap();
        tx.send_replace(());
        drop(tx);
        let err = reader.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("50000"), "{err}");
    }
}
