//! Fetching ahead of the TOC (docs/architecture.md, "Learned start-up prefetch"): byte ranges
//! of a blob asked for before anything that will read them can (the layer's TOC is not in
//! yet), held in memory and handed to the reads that want them.
//!
//! A cold start spends about 200 ms between containerd's first Prepare and the first read of
//! the container (its manifest and config fetched again by lazypull, the TOC fetched and
//! parsed, containerd's own work), with the link nearly idle. When an earlier start of the
//! image taught lazypull which byte ranges of the layer it reads (a learned list keeps them),
//! those ranges, and the TOC's own tail, are fetched at once, as the Prepare arrives. The reads
//! that come later (the TOC fetch, the start-up prefetch, a container's reads) go through
//! [`EarlyBlobs`] as their [`BlobSource`]: a request that starts inside a range fetched (or
//! being fetched) early is answered from it, the part beyond the range from the registry.
//!
//! Nothing here is trusted: the bytes are what the registry sent for those offsets, and every
//! reader verifies what it uses as it does for the registry's own answers (the TOC against
//! its digest, each chunk against its digest). Ranges are kept for [`KEEP`] and at most
//! [`MAX_HELD`] bytes in all; an early fetch that fails or stalls leaves its readers to fetch
//! the rest themselves.

use super::seam::BlobSource;
use super::{BlobBody, OpCreds, Result};
use crate::oci::{Digest, Reference};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// How long fetched ranges are kept for the reads that want them.
pub const KEEP: Duration = Duration::from_secs(60);
/// Bytes held (or being fetched) in all, over every blob.
pub const MAX_HELD: u64 = 64 << 20;
/// An early fetch that receives nothing for this long is given up (its readers fetch).
const STALL: Duration = Duration::from_secs(10);
/// Bytes asked for and not yet received, in KiB (as the start-up prefetch's window).
const WINDOW_KIB: u32 = 1024;
/// Requests at once.
const REQUESTS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// Bytes received so far (from the range's start).
    Have(u64),
    /// The fetch ended after this many bytes without the rest (failed or stalled).
    Failed(u64),
}

struct Early {
    start: u64,
    end: u64,
    created: Instant,
    buf: Mutex<Vec<u8>>,
    progress: watch::Sender<Progress>,
}

impl Early {
    fn buf(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A [`BlobSource`] in front of another that answers reads from ranges fetched ahead.
pub struct EarlyBlobs {
    inner: Arc<dyn BlobSource>,
    ranges: Mutex<HashMap<Digest, Vec<Arc<Early>>>>,
    /// The node's access gate over `inner`: an early fetch is start-up prefetch, which the
    /// filler yields to, counted with the node's other requests.
    access: std::sync::OnceLock<Arc<crate::access::Access>>,
}

impl EarlyBlobs {
    pub fn new(inner: Arc<dyn BlobSource>) -> Arc<Self> {
        Arc::new(EarlyBlobs {
            inner,
            ranges: Mutex::default(),
            access: std::sync::OnceLock::new(),
        })
    }

    /// Send early fetches through the node's access gate (`access`, over this source:
    /// [`Access::over`](crate::access::Access::over) with `inner`), as start-up prefetch.
    pub fn route_through(&self, access: &crate::access::Access) {
        let _ = self.access.set(access.over(Arc::clone(&self.inner)));
    }

    fn ranges(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Vec<Arc<Early>>>> {
        self.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop ranges older than [`KEEP`].
    fn expire(map: &mut HashMap<Digest, Vec<Arc<Early>>>) {
        map.retain(|_, v| {
            v.retain(|e| e.created.elapsed() < KEEP);
            !v.is_empty()
        });
    }

    /// Fetch `spans` of blob `d` now, in this order, a window of bytes at a time; spans that
    /// overlap a range of `d` already held or being fetched are skipped, and spans beyond
    /// [`MAX_HELD`] are left to the readers. Returns the bytes asked for.
    pub fn fetch(
        self: &Arc<Self>,
        r: Reference,
        d: Digest,
        spans: &[(u64, u64)],
        creds: OpCreds,
    ) -> u64 {
        let items: Vec<(Digest, u64, u64)> =
            spans.iter().map(|&(s, e)| (d.clone(), s, e)).collect();
        self.fetch_in_order(r, &items, creds)
    }

    /// [`EarlyBlobs::fetch`] of ranges of several blobs of one repository (`r`), in this
    /// order through one window: a layer's ranges and the checkpoint windows that decode
    /// them, each window right before the range that needs it.
    pub fn fetch_in_order(
        self: &Arc<Self>,
        r: Reference,
        items: &[(Digest, u64, u64)],
        creds: OpCreds,
    ) -> u64 {
        let mut new: Vec<(Digest, Arc<Early>)> = vec![];
        {
            let mut map = self.ranges();
            Self::expire(&mut map);
            let mut held: u64 = map.values().flatten().map(|e| e.end - e.start).sum();
            for (d, start, end) in items {
                let (start, end) = (*start, *end);
                let overlaps = |e: &Arc<Early>| e.start < end && start < e.end;
                if start >= end
                    || held + (end - start) > MAX_HELD
                    || map.get(d).is_some_and(|have| have.iter().any(overlaps))
                    || new.iter().any(|(nd, e)| nd == d && overlaps(e))
                {
                    continue;
                }
                held += end - start;
                new.push((
                    d.clone(),
                    Arc::new(Early {
                        start,
                        end,
                        created: Instant::now(),
                        buf: Mutex::new(Vec::new()),
                        progress: watch::Sender::new(Progress::Have(0)),
                    }),
                ));
            }
            if new.is_empty() {
                return 0;
            }
            for (d, e) in &new {
                map.entry(d.clone()).or_default().push(Arc::clone(e));
            }
        }
        let bytes = new.iter().map(|(_, e)| e.end - e.start).sum();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(REQUESTS));
            let window = Arc::new(Semaphore::new(WINDOW_KIB as usize));
            for (d, e) in new {
                // A range longer than half the window takes half (see the start-up prefetch).
                let kib = ((e.end - e.start).div_ceil(1024) as u32).clamp(1, WINDOW_KIB / 2);
                // Closed never: the semaphores are ours.
                let (Ok(permit), Ok(credit)) = (
                    Arc::clone(&permits).acquire_owned().await,
                    Arc::clone(&window).acquire_many_owned(kib).await,
                ) else {
                    return;
                };
                let (this, r, creds) = (Arc::clone(&this), r.clone(), creds.clone());
                tokio::spawn(async move {
                    this.fetch_one(&r, &d, &e, &creds, credit).await;
                    drop(permit);
                });
            }
        });
        bytes
    }

    async fn fetch_one(
        &self,
        r: &Reference,
        d: &Digest,
        e: &Early,
        creds: &OpCreds,
        mut credit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let started = Instant::now();
        let len = e.end - e.start;
        let result: std::result::Result<(), String> = async {
            // Held until the stream ends: the class's hold on the link.
            let mut held = None;
            let mut stream = match self.access.get() {
                Some(a) => {
                    let mut body = a
                        .open(
                            crate::access::Class::Prefetch,
                            r,
                            d,
                            e.start,
                            Some(len),
                            creds,
                        )
                        .await
                        .map_err(|x| x.to_string())?;
                    let stream =
                        std::mem::replace(&mut body.stream, futures_util::stream::empty().boxed());
                    held = Some(body);
                    stream
                }
                None => {
                    self.inner
                        .open_blob(r, d, e.start, Some(len), creds)
                        .await
                        .map_err(|x| x.to_string())?
                        .stream
                }
            };
            let mut have = 0u64;
            while have < len {
                let next = tokio::time::timeout(STALL, stream.next())
                    .await
                    .map_err(|_| format!("no byte for {STALL:?}"))?;
                let bytes = match next {
                    Some(b) => b.map_err(|x| x.to_string())?,
                    None => return Err(format!("the registry sent {have} of {len} bytes")),
                };
                let take = (len - have).min(bytes.len() as u64) as usize;
                e.buf().extend_from_slice(&bytes[..take]);
                have += take as u64;
                e.progress.send_replace(Progress::Have(have));
                let to_come = (len - have).div_ceil(1024) as usize;
                if credit.num_permits() > to_come {
                    drop(credit.split(credit.num_permits() - to_come));
                }
            }
            drop(held);
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::debug!(layer = %d, start = e.start, len, elapsed_ms = started.elapsed().as_millis() as u64, "early range fetched")
            }
            Err(why) => {
                let have = e.buf().len() as u64;
                e.progress.send_replace(Progress::Failed(have));
                tracing::debug!(layer = %d, start = e.start, len, have, %why, "early range fetch ended short; its readers fetch the rest");
            }
        }
    }

    /// The held range of `d` that `offset` lies in, and the others held of `d` (a read that
    /// runs past the end of one goes on in the next, when that one starts where it ends).
    fn covering(&self, d: &Digest, offset: u64) -> Option<(Arc<Early>, Vec<Arc<Early>>)> {
        let mut map = self.ranges();
        Self::expire(&mut map);
        let held = map.get(d)?;
        let e = held.iter().find(|e| e.start <= offset && offset < e.end)?;
        Some((Arc::clone(e), held.clone()))
    }

    /// Bytes `[offset, offset + len)` of `d` when `offset` lies in a held range: from it as
    /// they arrive, and what lies beyond it (or what a failed fetch left) from the registry.
    fn answer(
        &self,
        r: &Reference,
        d: &Digest,
        offset: u64,
        len: u64,
        creds: &OpCreds,
    ) -> Option<BoxStream<'static, std::io::Result<Bytes>>> {
        let (e, others) = self.covering(d, offset)?;
        tracing::debug!(layer = %d, offset, len, from = e.start, "answered from an early fetch");
        let end = offset + len;
        let state = Answer {
            inner: Arc::clone(&self.inner),
            gate: self.access.get().cloned(),
            held: None,
            r: r.clone(),
            d: d.clone(),
            creds: creds.clone(),
            early: e,
            others,
            pos: offset,
            end,
            rest: None,
        };
        Some(futures_util::stream::unfold(state, Answer::next).boxed())
    }
}

/// The state of one answer: reading the held range, then the registry for the rest.
struct Answer {
    inner: Arc<dyn BlobSource>,
    /// The node's gate over `inner`: the rest is fetched through it (and counted there).
    gate: Option<Arc<crate::access::Access>>,
    /// The rest's request, holding the link while it is received.
    held: Option<crate::access::Body>,
    r: Reference,
    d: Digest,
    creds: OpCreds,
    early: Arc<Early>,
    /// The blob's other held ranges when the answer began: where the read goes on when it
    /// runs past `early`'s end.
    others: Vec<Arc<Early>>,
    pos: u64,
    end: u64,
    rest: Option<BoxStream<'static, std::io::Result<Bytes>>>,
}

impl Answer {
    async fn next(mut self) -> Option<(std::io::Result<Bytes>, Answer)> {
        loop {
            if let Some(rest) = self.rest.as_mut() {
                let item = rest.next().await?;
                return Some((item, self));
            }
            if self.pos >= self.end {
                return None;
            }
            let mut rx = self.early.progress.subscribe();
            let progress = *rx.borrow_and_update();
            let (have, failed) = match progress {
                Progress::Have(h) => (self.early.start + h, false),
                Progress::Failed(h) => (self.early.start + h, true),
            };
            if self.pos < have {
                let upto = have.min(self.end);
                let bytes = {
                    let buf = self.early.buf();
                    let at = (self.pos - self.early.start) as usize;
                    Bytes::copy_from_slice(&buf[at..(upto - self.early.start) as usize])
                };
                self.pos = upto;
                return Some((Ok(bytes), self));
            }
            if !failed
                && self.pos >= self.early.end
                && let Some(next) = self
                    .others
                    .iter()
                    .find(|e| e.start <= self.pos && self.pos < e.end)
            {
                // Another range fetched ahead goes on from here.
                self.early = Arc::clone(next);
                continue;
            }
            if failed || self.pos >= self.early.end {
                // The rest from the registry.
                let (at, len) = (self.pos, self.end - self.pos);
                // What was not fetched ahead is a read's: counted as on-demand on the link.
                let body = match &self.gate {
                    Some(g) => g
                        .open(
                            crate::access::Class::OnDemand,
                            &self.r,
                            &self.d,
                            at,
                            Some(len),
                            &self.creds,
                        )
                        .await
                        .map(|mut b| {
                            let stream = std::mem::replace(
                                &mut b.stream,
                                futures_util::stream::empty().boxed(),
                            );
                            self.held = Some(b);
                            crate::registry::BlobBody {
                                stream,
                                len: Some(len),
                                early: false,
                            }
                        }),
                    None => {
                        self.inner
                            .open_blob(&self.r, &self.d, at, Some(len), &self.creds)
                            .await
                    }
                };
                match body {
                    Ok(b) => {
                        self.rest = Some(b.stream);
                        continue;
                    }
                    Err(e) => {
                        self.pos = self.end;
                        return Some((Err(std::io::Error::other(e.to_string())), self));
                    }
                }
            }
            // Closed never while `early` lives: the sender is in it.
            let _ = rx.changed().await;
        }
    }
}

impl BlobSource for EarlyBlobs {
    fn open_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        offset: u64,
        len: Option<u64>,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<BlobBody>> {
        Box::pin(async move {
            if let Some(len) = len
                && let Some(stream) = self.answer(r, d, offset, len, creds)
            {
                return Ok(BlobBody {
                    stream,
                    len: Some(len),
                    early: true,
                });
            }
            self.inner.open_blob(r, d, offset, len, creds).await
        })
    }

    fn fetch_range<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        offset: u64,
        len: u64,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let Some(stream) = self.answer(r, d, offset, len, creds) else {
                return self.inner.fetch_range(r, d, offset, len, creds).await;
            };
            super::seam::read_whole(stream, r, d, offset, len).await
        })
    }

    fn touch_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.touch_blob(r, d, creds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::seam::fake::{FakeBlobs, Fault, noise};

    fn setup() -> (Arc<FakeBlobs>, Arc<EarlyBlobs>, Digest, Vec<u8>, Reference) {
        let fake = Arc::new(FakeBlobs::default());
        let data = noise(300 << 10, 7);
        let d = fake.add(data.clone());
        let early = EarlyBlobs::new(Arc::clone(&fake) as Arc<dyn BlobSource>);
        let r = crate::oci::parse_reference("r.example/img:1").unwrap();
        (fake, early, d, data, r)
    }

    async fn read(early: &EarlyBlobs, r: &Reference, d: &Digest, at: u64, len: u64) -> Vec<u8> {
        let body = early
            .open_blob(r, d, at, Some(len), &OpCreds::default())
            .await
            .unwrap();
        let mut out = vec![];
        let mut s = body.stream;
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn reads_inside_a_range_fetched_ahead_send_no_request_and_the_rest_is_fetched() {
        let (fake, early, d, data, r) = setup();
        let asked = early.fetch(
            r.clone(),
            d.clone(),
            &[(200 << 10, 300 << 10), (0, 50 << 10)],
            OpCreds::default(),
        );
        assert_eq!(asked, 150 << 10);
        // A second fetch of the same blob adds only what no range holds.
        let more = [(60, 70), (50 << 10, 51 << 10)];
        assert_eq!(
            early.fetch(r.clone(), d.clone(), &more, OpCreds::default()),
            1 << 10
        );
        // Inside a range (the TOC's tail, whole): no new request, whatever the timing.
        let tail = early
            .fetch_range(&r, &d, 250 << 10, 50 << 10, &OpCreds::default())
            .await
            .unwrap();
        assert_eq!(tail, data[250 << 10..]);
        assert_eq!(read(&early, &r, &d, 10, 1000).await, data[10..1010]);
        assert_eq!(
            read(&early, &r, &d, 50 << 10, 1 << 10).await,
            data[50 << 10..51 << 10]
        );
        assert_eq!(fake.requests().len(), 3);
        // Starting inside, ending past it: on through the next range held ([50, 51) KiB),
        // which starts where the first ends; the rest alone comes from the registry.
        assert_eq!(
            read(&early, &r, &d, 40 << 10, 20 << 10).await,
            data[40 << 10..60 << 10]
        );
        assert_eq!(fake.requests()[3], (d.clone(), 51 << 10, 60 << 10));
        // Starting outside: the registry, as before.
        assert_eq!(
            read(&early, &r, &d, 100 << 10, 10).await,
            data[100 << 10..(100 << 10) + 10]
        );
        assert_eq!(fake.requests().len(), 5);
    }

    #[tokio::test]
    async fn through_the_node_gate_each_byte_is_counted_once_under_the_class_that_fetched_it() {
        use crate::access::{Access, Class};
        let (fake, early, d, data, r) = setup();
        let access = Access::new(
            Arc::clone(&early) as Arc<dyn BlobSource>,
            Default::default(),
        );
        early.route_through(&access);
        let creds = OpCreds::default();
        early.fetch(r.clone(), d.clone(), &[(0, 50 << 10)], creds.clone());
        // A read inside the range fetched ahead, then one that goes past its end.
        for (at, len) in [(1000, 10_000), (40 << 10, 20 << 10)] {
            let mut body = access
                .open(Class::OnDemand, &r, &d, at, Some(len), &creds)
                .await
                .unwrap();
            let mut got = vec![];
            while let Some(b) = body.stream.next().await {
                got.extend_from_slice(&b.unwrap());
            }
            assert_eq!(got, data[at as usize..(at + len) as usize]);
        }
        assert_eq!(
            fake.requests().len(),
            2,
            "the early range, and the rest past it"
        );
        assert_eq!(access.stats.bytes_of(Class::Prefetch), 50 << 10);
        assert_eq!(
            access.stats.bytes_of(Class::OnDemand),
            10 << 10,
            "only the rest the reads fetched after the early range"
        );
        assert_eq!(access.stats.requests_of(Class::Prefetch), 1);
    }

    #[tokio::test]
    async fn a_failed_or_cut_early_fetch_leaves_its_readers_to_the_registry() {
        let (fake, early, d, data, r) = setup();
        fake.inject(Fault::Truncate(20 << 10));
        fake.inject(Fault::Error);
        early.fetch(
            r.clone(),
            d.clone(),
            &[(0, 100 << 10), (100 << 10, 200 << 10)],
            OpCreds::default(),
        );
        // The cut one: its first 20 KiB from it, the rest fetched; the failed one: all fetched.
        assert_eq!(read(&early, &r, &d, 0, 100 << 10).await, data[..100 << 10]);
        assert_eq!(
            read(&early, &r, &d, 150 << 10, 50 << 10).await,
            data[150 << 10..200 << 10]
        );
        let reqs = fake.requests();
        assert!(reqs.contains(&(d.clone(), 20 << 10, 100 << 10)), "{reqs:?}");
        assert!(
            reqs.contains(&(d.clone(), 150 << 10, 200 << 10)),
            "{reqs:?}"
        );
    }

    #[tokio::test]
    async fn what_is_held_is_bounded() {
        let (_fake, early, d, _data, r) = setup();
        let spans = [(0, MAX_HELD), (0, 10)];
        assert_eq!(early.fetch(r, d, &spans, OpCreds::default()), MAX_HELD);
    }
}
