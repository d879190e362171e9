//! The opt-in Prometheus endpoint (`metrics.listen`, `--metrics-listen`): `GET /metrics` in the
//! text exposition format (prometheus-client), served with hyper. Counters live where the work
//! happens (the reader's and the filler's stats); a scrape registers clones of them (they share
//! their value) plus gauges read at that moment, so nothing is sampled in the background.

use crate::access::reader::ReadStats;
use crate::fetch::Filler;
use crate::store::LayerRecord;
use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

/// What a scrape reports.
pub struct Sources {
    pub filler: Arc<Filler>,
    pub reader: Option<Arc<crate::access::reader::Reader>>,
    pub images: Arc<crate::images::Images>,
    pub mirror: Option<Arc<crate::http::mirror::Mirror>>,
}

fn reader_metrics(reg: &mut Registry, s: &ReadStats) {
    reg.register(
        "lazypull_fuse_reads",
        "File reads served by the lazy layer filesystem (chunk path)",
        s.reads.clone(),
    );
    reg.register(
        "lazypull_chunk_cache_hits",
        "Chunks found decoded in memory",
        s.cache_hits.clone(),
    );
    reg.register(
        "lazypull_chunks_local",
        "Chunks decoded from the local blob or partial file",
        s.local_chunks.clone(),
    );
    reg.register(
        "lazypull_chunks_fetched",
        "Chunks fetched on demand from the registry and verified",
        s.fetched_chunks.clone(),
    );
    reg.register(
        "lazypull_ondemand_requests",
        "Range requests sent for on-demand reads (each may carry several chunks)",
        s.requests.clone(),
    );
    reg.register(
        "lazypull_ondemand_bytes",
        "Bytes received for on-demand reads",
        s.bytes_fetched.clone(),
    );
    reg.register(
        "lazypull_chunk_errors",
        "Chunks that could not be loaded (fetch, decode or digest errors)",
        s.errors.clone(),
    );
    reg.register(
        "lazypull_read_wait_seconds",
        "How long reads that needed the network waited for their bytes",
        s.wait_seconds.clone(),
    );
    reg.register(
        "lazypull_prefetch_requests",
        "Range requests sent for start-up prefetch (landmark or learned list)",
        s.prefetch_requests.clone(),
    );
    reg.register(
        "lazypull_prefetch_bytes",
        "Bytes received for start-up prefetch (landmark or learned list)",
        s.prefetch_bytes.clone(),
    );
    reg.register(
        "lazypull_ondemand_fetch_seconds",
        "Duration of on-demand range requests, until their last chunk was verified",
        s.fetch_seconds.clone(),
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchedLabels {
    layer: String,
    by: &'static str,
}

/// Per layer (each once, however many images share it), from the catalogue: bytes fetched on
/// demand, by start-up prefetch and by the filler; reads that waited and how long.
fn layer_metrics<'a>(reg: &mut Registry, layers: impl Iterator<Item = &'a LayerRecord>) {
    let fetched = Family::<FetchedLabels, Gauge>::default();
    let waits = Family::<LayerLabels, Gauge>::default();
    let wait_seconds = Family::<LayerLabels, Gauge<f64, AtomicU64>>::default();
    let mut seen = std::collections::HashSet::new();
    for l in layers {
        if !seen.insert(l.digest.as_str()) {
            continue;
        }
        for (by, n) in [
            ("on_demand", l.ondemand),
            ("prefetch", l.prefetched),
            ("fill", l.fill_fetched),
        ] {
            fetched
                .get_or_create(&FetchedLabels {
                    layer: l.digest.clone(),
                    by,
                })
                .set(n as i64);
        }
        let label = LayerLabels {
            layer: l.digest.clone(),
        };
        waits.get_or_create(&label).set(l.read_waits as i64);
        wait_seconds
            .get_or_create(&label)
            .set(l.read_wait_ms as f64 / 1000.0);
    }
    reg.register(
        "lazypull_layer_fetched_bytes",
        "Bytes of each layer fetched from the registry, by who fetched them (persisted)",
        fetched,
    );
    reg.register(
        "lazypull_layer_read_waits",
        "Reads of each layer that waited for the network (persisted)",
        waits,
    );
    reg.register(
        "lazypull_layer_read_wait_seconds",
        "Total time reads of each layer waited for the network (persisted)",
        wait_seconds,
    );
}

/// The current metrics in the text format.
pub fn render(src: &Sources) -> String {
    let mut reg = Registry::default();
    if let Some(r) = &src.reader {
        reader_metrics(&mut reg, &r.stats);
    }
    let f = &src.filler.stats;
    reg.register(
        "lazypull_fill_bytes",
        "Bytes the background filler received",
        f.bytes_fetched.clone(),
    );
    reg.register(
        "lazypull_fill_requests",
        "Blob requests of the filler (TOC footer and TOC included)",
        f.blob_requests.clone(),
    );
    reg.register(
        "lazypull_layers_completed",
        "Layers filled and verified",
        f.layers_completed.clone(),
    );
    reg.register(
        "lazypull_layers_failed",
        "Fills that failed for good",
        f.layers_failed.clone(),
    );
    let access = &src.filler.access().stats;
    reg.register(
        "lazypull_link_requests",
        "Blob body requests of the node, by class (on_demand, neighbour, prefetch, metadata, scan, fill)",
        access.requests.clone(),
    );
    reg.register(
        "lazypull_link_bytes",
        "Bytes of blob bodies received by the node, by class",
        access.bytes.clone(),
    );
    let link = &src.filler.link().stats;
    reg.register(
        "lazypull_foreground_requests",
        "Range requests the filler yields the link to (on-demand reads, prefetch, TOCs)",
        link.foreground_requests.clone(),
    );
    reg.register(
        "lazypull_fill_preemptions",
        "Fill requests stopped because a foreground request began",
        link.fill_preemptions.clone(),
    );
    reg.register(
        "lazypull_fill_wait_seconds",
        "Time fill requests waited for the link",
        link.fill_wait_seconds.clone(),
    );
    reg.register(
        "lazypull_fills_in_flight",
        "Layers being filled now",
        ConstGauge::new(src.filler.in_flight() as i64),
    );
    if let Ok(images) = src.images.list() {
        let layers: Vec<_> = images.iter().flat_map(|i| i.layers.iter()).collect();
        reg.register(
            "lazypull_images",
            "Images in the store",
            ConstGauge::new(images.len() as i64),
        );
        let (size, local, ondemand) = layers.iter().fold((0, 0, 0), |(s, l, o), x| {
            (s + x.size, l + x.local_bytes(), o + x.ondemand)
        });
        reg.register(
            "lazypull_layer_bytes",
            "Compressed size of the layers of all images (shared layers counted per image)",
            ConstGauge::new(size as i64),
        );
        reg.register(
            "lazypull_layer_local_bytes",
            "Bytes of those layers present locally",
            ConstGauge::new(local as i64),
        );
        reg.register(
            "lazypull_layer_ondemand_bytes",
            "Bytes of those layers that reads fetched on demand (persisted)",
            ConstGauge::new(ondemand as i64),
        );
    }
    if let Some(m) = &src.mirror {
        reg.register(
            "lazypull_mirror_requests",
            "Pull-through registry requests by kind and status code",
            m.stats.requests.clone(),
        );
        reg.register(
            "lazypull_mirror_bytes",
            "Body bytes the pull-through registry sent, by source (store, in_flight, partial, upstream)",
            m.stats.bytes.clone(),
        );
        reg.register(
            "lazypull_mirror_upstream_fetches",
            "Blobs the pull-through registry fetched from an upstream",
            m.stats.upstream_fetches.clone(),
        );
        reg.register(
            "lazypull_mirror_upstream_fetches_saved",
            "Blob requests answered without an upstream fetch of their own (store, joined fetch, followed fill)",
            m.stats.upstream_fetches_saved.clone(),
        );
    }
    if let Ok(images) = src.images.list() {
        layer_metrics(&mut reg, images.iter().flat_map(|i| i.layers.iter()));
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Serve `GET /metrics` on `listener` until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, src: Arc<Sources>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let src = Arc::clone(&src);
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let src = Arc::clone(&src);
                    async move {
                        if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                            let body = tokio::task::spawn_blocking(move || render(&src))
                                .await
                                .unwrap_or_default();
                            hyper::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(body)))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"only GET /metrics here\n")))
                        }
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}
