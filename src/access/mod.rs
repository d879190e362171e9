//! The read-access core: the node's only way to the bodies of layer blobs (and of the blobs
//! kept beside them: shared gzip indexes' checkpoint windows).
//!
//! Every body request (a read's range, its read-ahead and neighbours, a directory's or an
//! executable's guessed files, start-up prefetch, a TOC, a checkpoint window, a scanning
//! reader's range, the filler's bounded requests) is made through [`Access::open`] with its
//! [`Class`]. The class decides who gets the link ([`schedule`]: the filler yields to the
//! requests a process or a starting container waits for, and takes the whole link back when
//! they leave it idle) and where its bytes are counted (`lazypull_link_requests{class}`,
//! `lazypull_link_bytes{class}`; per layer in the catalogue).
//!
//! The parts, from the link up:
//! - [`schedule`]: the link's state and the filler's policy (a pure function of it);
//! - this module: [`Access`], the request gate over the registry seam
//!   (`registry::seam::BlobSource`: the registry client, or a fake in unit tests);
//! - [`range`]: bytes `[a, b)` of a layer, from its partial file's prefix and the registry,
//!   and written back to the partial file (durable within a second);
//! - [`chunks`]: verified chunks, the in-memory cache of decoded chunks and single flight (one
//!   load per chunk however many readers want it; a failure remembered briefly);
//! - [`reader`]: the read path (what a FUSE read needs, its read-ahead and neighbours,
//!   start-up prefetch in list order, decoding through a gzip index), with its two guesses
//!   [`siblings`] and [`elf`].
//!
//! See docs/architecture.md ("A lazy read", "Foreground first").

pub mod chunks;
pub mod elf;
pub mod range;
pub mod reader;
pub mod region;
pub mod schedule;
pub mod siblings;
pub mod start;

pub use schedule::{Class, FillPolicy, Link};

use crate::oci::{Digest, Reference};
use crate::registry::{OpCreds, RegistryError, seam::BlobSource};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::Arc;

/// The label of the per-class link metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: Class,
}

/// Requests and bytes on the link, by class (exported as metrics).
#[derive(Default)]
pub struct AccessStats {
    pub requests: Family<ClassLabels, Counter>,
    /// Bytes received (all of a response's bytes, also those a caller did not keep).
    pub bytes: Family<ClassLabels, Counter>,
}

impl AccessStats {
    pub fn requests_of(&self, class: Class) -> u64 {
        self.requests.get_or_create(&ClassLabels { class }).get()
    }

    pub fn bytes_of(&self, class: Class) -> u64 {
        self.bytes.get_or_create(&ClassLabels { class }).get()
    }
}

/// The gate every blob body request of the daemon goes through.
pub struct Access {
    source: Arc<dyn BlobSource>,
    link: Arc<Link>,
    pub stats: Arc<AccessStats>,
}

/// A response body being received. While it lives, its request holds its class's place on
/// the link (see [`Class::holds_link`]).
pub struct Body {
    pub stream: BoxStream<'static, std::io::Result<bytes::Bytes>>,
    /// The body's length as the registry announced it.
    pub len: Option<u64>,
    link: Arc<Link>,
    /// Foreground requests begun before this one (a fill request is preempted by the next).
    begun: u64,
    class: Class,
    _turn: Option<schedule::Foreground>,
}

impl Body {
    /// A body fetched outside any gate (a pull-through registry without a filler: no link to
    /// share).
    pub fn unscheduled(body: crate::registry::BlobBody) -> Self {
        Body {
            stream: body.stream,
            len: body.len,
            link: Link::new(FillPolicy::default()),
            begun: 0,
            class: Class::Relay,
            _turn: None,
        }
    }

    /// Resolves when this fill request must give the link up: a request the filler yields to
    /// has begun since it was sent. Never, for the other classes.
    pub fn preempted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (link, begun, fill) = (
            Arc::clone(&self.link),
            self.begun,
            self.class == Class::Fill,
        );
        async move {
            if fill {
                link.preempted(begun).await
            } else {
                std::future::pending().await
            }
        }
    }
}

impl Access {
    pub fn new(source: Arc<dyn BlobSource>, policy: FillPolicy) -> Arc<Self> {
        let stats = AccessStats::default();
        // Every class in the metrics from the start, at zero.
        for class in Class::ALL {
            let _ = stats.requests.get_or_create(&ClassLabels { class });
            let _ = stats.bytes.get_or_create(&ClassLabels { class });
        }
        Arc::new(Access {
            source,
            link: Link::new(policy),
            stats: Arc::new(stats),
        })
    }

    /// The same gate (the same link, the same counters) over another source: for a layer of
    /// the registry seam below this one that makes requests of its own (`registry::early`'s
    /// fetches ahead of a TOC).
    pub fn over(&self, source: Arc<dyn BlobSource>) -> Arc<Self> {
        Arc::new(Access {
            source,
            link: Arc::clone(&self.link),
            stats: Arc::clone(&self.stats),
        })
    }

    /// The link's state and the filler's policy.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Wait until the filler may send its next request (see [`Link::fill_turn`]); send it
    /// then with [`Access::open`] and [`Class::Fill`].
    pub async fn fill_turn(&self) {
        self.link.fill_turn().await
    }

    /// Bytes `[offset, offset + len)` (or to the end) of blob `d` in `r`'s repository, as a
    /// stream of `class`. The request holds the link as its class does from now until the
    /// body is dropped (also while it waits for the response's head).
    pub async fn open(
        &self,
        class: Class,
        r: &Reference,
        d: &Digest,
        offset: u64,
        len: Option<u64>,
        creds: &OpCreds,
    ) -> Result<Body, RegistryError> {
        let begun = self.link.begun();
        let turn = self.link.enter(class);
        let labels = ClassLabels { class };
        self.stats.requests.get_or_create(&labels).inc();
        let body = self.source.open_blob(r, d, offset, len, creds).await?;
        // Bytes fetched ahead were counted when they came.
        let stream = if body.early {
            body.stream
        } else {
            let bytes = self.stats.bytes.get_or_create(&labels).clone();
            body.stream
                .inspect(move |chunk| {
                    if let Ok(b) = chunk {
                        bytes.inc_by(b.len() as u64);
                    }
                })
                .boxed()
        };
        Ok(Body {
            stream,
            len: body.len,
            link: Arc::clone(&self.link),
            begun,
            class,
            _turn: turn,
        })
    }

    /// Open `n` connections to `r`'s registry ahead of a start (each with a HEAD of blob `d`,
    /// at once: no byte of the blob, which stays fetched exactly once per node), so that the start's parallel requests find them in
    /// the connection pool: a new connection costs a round trip before its request, and,
    /// through a busy bottleneck, a lost SYN costs a second (a start's window fetch once took
    /// 1031 ms). Failures only leave the pool as it was. Returns the requests that succeeded.
    pub async fn warm(&self, r: &Reference, d: &Digest, creds: &OpCreds, n: usize) -> usize {
        // Not through the link: a HEAD has no body to give priority to, and entering it as a
        // foreground class would cut a running fill's request short for nothing.
        let all =
            futures_util::future::join_all((0..n).map(|_| self.source.touch_blob(r, d, creds)))
                .await;
        let ok = all.iter().filter(|r| r.is_ok()).count();
        if let Some(Err(e)) = all.iter().find(|r| r.is_err()) {
            tracing::debug!(registry = %r.registry(), error = %e, ok, "warming connections");
        }
        ok
    }

    /// Bytes `[offset, offset + len)` of blob `d`, whole (a bounded read: a footer, a TOC, a
    /// checkpoint window).
    pub async fn fetch(
        &self,
        class: Class,
        r: &Reference,
        d: &Digest,
        offset: u64,
        len: u64,
        creds: &OpCreds,
    ) -> Result<Vec<u8>, RegistryError> {
        let _turn = self.link.enter(class);
        let labels = ClassLabels { class };
        self.stats.requests.get_or_create(&labels).inc();
        let got = self.source.fetch_range(r, d, offset, len, creds).await?;
        self.stats
            .bytes
            .get_or_create(&labels)
            .inc_by(got.len() as u64);
        Ok(got)
    }
}

#[cfg(test)]
mod tests;
