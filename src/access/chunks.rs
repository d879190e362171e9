//! Verified chunks: the in-memory cache of decoded chunks and single flight.
//!
//! A chunk (a TOC piece of a file, or a piece decoded from a gzip checkpoint) is, for a reader
//! that wants it, in one of three places: in memory (an LRU of decoded chunks, keyed by chunk
//! digest, so identical chunks of different layers share an entry), being loaded by someone
//! else (the reader waits for that load: one load per chunk however many want it), or nowhere,
//! in which case the reader claims it and must load it. A load that failed is remembered for
//! a moment, so that the kernel's immediate retry of a failed read fails at once instead of
//! waiting a whole timeout again.

use super::Class;
use super::reader::ReadError;
use crate::layer::index::Chunk;
use crate::oci::Digest;
use crate::store::locked as lock;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A chunk whose load failed fails again at once for this long. When a read fails (EIO after
/// `fuse.read_timeout`, a registry that stalled), the kernel asks again for the same pages
/// right away: without this it waited a second full timeout (md5sum of a file on a stalled
/// registry failed after 120 s with the default 60 s). Short, so that reads work again as soon
/// as the registry is back.
const FAILURE_MEMORY: Duration = Duration::from_millis(500);

pub type ChunkData = Arc<Vec<u8>>;
pub type ChunkResult = Result<ChunkData, ReadError>;
pub type Waiter = watch::Receiver<Option<ChunkResult>>;

/// A chunk a reader promised to load; waiters hold the matching receiver. Dropping a claim
/// unanswered lets its waiters see [`ReadError::Abandoned`]; answer it with
/// [`Chunks::finish`].
pub struct Claim {
    key: String,
    pub chunk: Chunk,
    /// Where its bytes lie in the blob (from its checkpoint on, through a gzip index).
    pub span: (u64, u64),
    tx: watch::Sender<Option<ChunkResult>>,
    /// Keep the decoded bytes in memory (not for prefetch: those are only stored on disk).
    keep: bool,
    /// Who wants it: a read (with its read-ahead and neighbours), a guess, start-up prefetch.
    pub class: Class,
}

impl Claim {
    /// A claim outside any cache (for tests of how claims are grouped).
    #[cfg(test)]
    pub fn detached(chunk: Chunk, span: (u64, u64), class: Class) -> Self {
        Claim {
            key: format!("{span:?}"),
            chunk,
            span,
            tx: watch::channel(None).0,
            keep: false,
            class,
        }
    }
}

pub enum Slot {
    Ready(ChunkData),
    Wait(Waiter),
    /// Its load failed just now (see `FAILURE_MEMORY`).
    Failed(ReadError),
}

/// Counters of the chunk layer (exported through the read path's metrics).
#[derive(Clone, Default)]
pub struct ChunkStats {
    pub cache_hits: Counter,
    /// Chunk loads that failed.
    pub errors: Counter,
}

/// The chunks in memory and in flight.
pub struct Chunks {
    lru: Mutex<(lru::LruCache<String, ChunkData>, usize)>,
    /// Bytes of decoded chunks kept in memory at most.
    budget: usize,
    inflight: Mutex<HashMap<String, Waiter>>,
    /// Chunks whose last load failed: when, and why.
    failed: Mutex<HashMap<String, (Instant, ReadError)>>,
    stats: ChunkStats,
}

/// The cache key of chunk `c` of `layer`.
fn key_of(layer: &Digest, c: &Chunk) -> String {
    // Chunks are verified against their digest, so the digest is a safe key across layers.
    c.digest
        .as_ref()
        .map(|d| d.to_string())
        .unwrap_or_else(|| format!("{layer}@{}+{}", c.offset, c.inner_offset))
}

impl Chunks {
    pub fn new(budget: usize, stats: ChunkStats) -> Self {
        Chunks {
            lru: Mutex::new((lru::LruCache::unbounded(), 0)),
            budget,
            inflight: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            stats,
        }
    }

    fn cache_get(&self, k: &str) -> Option<ChunkData> {
        lock(&self.lru).0.get(k).cloned()
    }

    fn cache_put(&self, k: String, v: ChunkData) {
        let mut g = lock(&self.lru);
        let (lru, bytes) = &mut *g;
        *bytes += v.len();
        if let Some(old) = lru.put(k, v) {
            *bytes -= old.len();
        }
        while *bytes > self.budget {
            match lru.pop_lru() {
                Some((_, old)) => *bytes -= old.len(),
                None => break,
            }
        }
    }

    /// Chunk `c` of `layer` (its bytes at `span` of the blob): its data if in memory, or a
    /// receiver for it; claims it (adds to `claims`) when nobody is loading it yet.
    pub fn slot(
        &self,
        layer: &Digest,
        c: &Chunk,
        span: (u64, u64),
        keep: bool,
        class: Class,
        claims: &mut Vec<Claim>,
    ) -> Slot {
        let key = key_of(layer, c);
        let mut inflight = lock(&self.inflight);
        if let Some(rx) = inflight.get(&key) {
            return Slot::Wait(rx.clone());
        }
        // Under the inflight lock: a finishing load puts into the cache before it leaves
        // `inflight`, so a chunk is either in one of them or not loaded at all.
        if let Some(d) = self.cache_get(&key) {
            self.stats.cache_hits.inc();
            return Slot::Ready(d);
        }
        if let Some((at, why)) = lock(&self.failed).get(&key)
            && at.elapsed() < FAILURE_MEMORY
        {
            return Slot::Failed(why.clone());
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key.clone(), rx.clone());
        claims.push(Claim {
            key,
            chunk: c.clone(),
            span,
            tx,
            keep,
            class,
        });
        Slot::Wait(rx)
    }

    /// A receiver for chunk `c` of `layer` if a load of it is running; claims nothing.
    pub fn loading(&self, layer: &Digest, c: &Chunk) -> Option<Waiter> {
        lock(&self.inflight).get(&key_of(layer, c)).cloned()
    }

    /// Answer a claim: its waiters get `result`; the data is kept in memory if the claim
    /// asked so, a failure is remembered for `FAILURE_MEMORY`.
    pub fn finish(&self, claim: Claim, result: ChunkResult) {
        if let (Ok(d), true) = (&result, claim.keep) {
            self.cache_put(claim.key.clone(), Arc::clone(d));
        }
        {
            let mut failed = lock(&self.failed);
            match &result {
                Ok(_) => {
                    failed.remove(&claim.key);
                }
                Err(why) => {
                    self.stats.errors.inc();
                    failed.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
                    failed.insert(claim.key.clone(), (Instant::now(), why.clone()));
                }
            }
        }
        let _ = claim.tx.send(Some(result));
        lock(&self.inflight).remove(&claim.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, digest: Option<&[u8]>) -> Chunk {
        Chunk {
            offset,
            inner_offset: 0,
            file_offset: 0,
            size: 9,
            digest: digest.map(Digest::of),
            codec: crate::layer::index::Codec::GzipMember,
        }
    }

    fn layer() -> Digest {
        Digest::of(b"layer")
    }

    #[tokio::test]
    async fn one_load_per_chunk_whoever_asks_and_the_answer_reaches_every_waiter() {
        let chunks = Chunks::new(1 << 20, ChunkStats::default());
        let c = chunk(10, None);
        let mut claims = vec![];
        let first = chunks.slot(&layer(), &c, (10, 20), true, Class::OnDemand, &mut claims);
        let second = chunks.slot(&layer(), &c, (10, 20), true, Class::Prefetch, &mut claims);
        assert_eq!(
            claims.len(),
            1,
            "the second asker waits for the first's load"
        );
        let (Slot::Wait(mut a), Slot::Wait(mut b)) = (first, second) else {
            panic!("both wait")
        };
        chunks.finish(claims.pop().unwrap(), Ok(Arc::new(b"data".to_vec())));
        for rx in [&mut a, &mut b] {
            let v = rx.wait_for(|v| v.is_some()).await.unwrap();
            assert_eq!(v.as_ref().unwrap().as_ref().unwrap().as_slice(), b"data");
        }
        // Kept in memory now: no claim.
        let again = chunks.slot(&layer(), &c, (10, 20), true, Class::OnDemand, &mut claims);
        assert!(matches!(again, Slot::Ready(_)) && claims.is_empty());
    }

    #[test]
    fn a_failure_is_answered_at_once_for_a_moment_and_identical_chunks_share_an_entry() {
        let stats = ChunkStats::default();
        let chunks = Chunks::new(1 << 20, stats.clone());
        // Two layers, the same chunk digest: one entry.
        let (c1, c2) = (chunk(0, Some(b"chunk")), chunk(500, Some(b"chunk")));
        let other = Digest::of(b"other layer");
        let mut claims = vec![];
        chunks.slot(&layer(), &c1, (0, 9), true, Class::OnDemand, &mut claims);
        chunks.finish(
            claims.pop().unwrap(),
            Err(ReadError::Registry("boom".into())),
        );
        assert_eq!(stats.errors.get(), 1);
        let s = chunks.slot(&other, &c2, (500, 509), true, Class::OnDemand, &mut claims);
        assert!(matches!(s, Slot::Failed(ReadError::Registry(_))) && claims.is_empty());
        // Not kept (prefetch) and not failed: claimed again next time.
        let c3 = chunk(100, None);
        chunks.slot(
            &layer(),
            &c3,
            (100, 109),
            false,
            Class::Prefetch,
            &mut claims,
        );
        chunks.finish(claims.pop().unwrap(), Ok(Arc::new(vec![1])));
        chunks.slot(
            &layer(),
            &c3,
            (100, 109),
            false,
            Class::Prefetch,
            &mut claims,
        );
        assert_eq!(claims.len(), 1);
        assert_eq!(stats.cache_hits.get(), 0);
    }

    #[test]
    fn memory_stays_within_the_budget() {
        let chunks = Chunks::new(100, ChunkStats::default());
        let mut claims = vec![];
        for i in 0..5u64 {
            chunks.slot(
                &layer(),
                &chunk(i, None),
                (i, i + 1),
                true,
                Class::OnDemand,
                &mut claims,
            );
            chunks.finish(claims.pop().unwrap(), Ok(Arc::new(vec![0; 40])));
        }
        assert!(lock(&chunks.lru).1 <= 100);
        // The latest are kept, the oldest went.
        let s = chunks.slot(
            &layer(),
            &chunk(4, None),
            (4, 5),
            true,
            Class::OnDemand,
            &mut claims,
        );
        assert!(matches!(s, Slot::Ready(_)));
        let s = chunks.slot(
            &layer(),
            &chunk(0, None),
            (0, 1),
            true,
            Class::OnDemand,
            &mut claims,
        );
        assert!(matches!(s, Slot::Wait(_)));
    }
}
