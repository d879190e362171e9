//! Composition root: builds the store, registry client, filler and image service, and serves
//! them. `Core` is also what offline commands (`prefetch`, `prune`) use when no daemon runs.

mod control;
pub mod peers;

use crate::config::Config;
use crate::cri::CriImages;
use crate::fetch::Filler;
use crate::images::Images;
use crate::registry::{Registry, auth::Secret};
use crate::rpc::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use crate::rpc::control::control_server::ControlServer;
use crate::rpc::cri::image_service_server::ImageServiceServer;
use crate::store::{Catalogue, Layout, StoreLock};
use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The daemon's core: the store, the registry client and the filler, and the services built on
/// them. Each service is handed the parts it uses from here.
pub struct Core {
    pub store: crate::store::Store,
    pub registry: Arc<Registry>,
    pub filler: Arc<Filler>,
    pub images: Arc<Images>,
    /// The registry's blob bodies as the read path and the filler see them: with the ranges
    /// fetched ahead of a layer's TOC (see `registry::early`).
    pub early: Arc<crate::registry::early::EarlyBlobs>,
    pub shutdown: CancellationToken,
    _lock: StoreLock,
}

impl Core {
    /// Open the store for writing (takes the store lock; fails if another process holds it).
    pub fn open(
        cfg: &Config,
        default_secret: Option<Secret>,
    ) -> Result<Core, crate::store::StoreError> {
        let layout = Layout::new(&cfg.root);
        layout.create()?;
        let lock = StoreLock::try_acquire(&layout)?;
        let db = Arc::new(Mutex::new(Catalogue::open(&layout.db())?));
        let registry = Registry::new(cfg.registry_options(default_secret));
        registry.set_peers(&peers::static_peers(&cfg.peers, own_mirror_port(cfg)));
        let shutdown = CancellationToken::new();
        let early = crate::registry::early::EarlyBlobs::new(registry.clone());
        // Every blob body request of the node goes through one gate, with its class.
        let access = crate::access::Access::new(early.clone(), cfg.fetch.fill.policy());
        early.route_through(&access);
        let filler = Filler::new(
            layout.clone(),
            crate::store::Partials::new(layout.clone()),
            Arc::clone(&db),
            Arc::clone(&access),
            crate::fetch::FillerOptions {
                max_parallel: cfg.fetch.max_parallel,
                fill_enabled: cfg.fetch.fill.enabled,
                unpack: crate::fetch::UnpackPolicy {
                    plain: cfg.fuse.enabled,
                    estargz: cfg.fuse.enabled && cfg.fuse.passthrough,
                },
                index_span: cfg.fetch.index_span_kib.saturating_mul(1024),
            },
            shutdown.clone(),
        );
        let store = crate::store::Store {
            layout: layout.clone(),
            db: Arc::clone(&db),
        };
        let images = Arc::new(Images::new(
            layout,
            db,
            Arc::clone(&registry),
            registry.clone(),
            early.clone(),
            Arc::clone(&filler),
            crate::images::ImagesOptions {
                persist_credentials: cfg.cri.persist_credentials,
                pull_timeout: cfg.cri.pull_timeout,
                index_lookup: cfg.fetch.index == crate::config::IndexMode::Auto,
            },
        ));
        Ok(Core {
            store,
            registry,
            filler,
            images,
            early,
            shutdown,
            _lock: lock,
        })
    }
}

/// Before start-up: create the CRI socket's directory and refuse if a live daemon answers there.
fn check_socket(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use by a running service", path.display());
    }
    Ok(())
}

/// Once everything else is up (a client that can connect finds the layer filesystem mounted):
/// replace a stale socket file, bind, and make it root-only (0600).
fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    check_socket(path)?;
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Pull `refs` whole, one after another, logging each; stops with `stop`.
async fn preload_images(images: Arc<Images>, refs: Vec<String>, stop: CancellationToken) {
    let started = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    for r in &refs {
        let t = Instant::now();
        let pulled = tokio::select! {
            p = images.pull(r, None, crate::images::PullMode::Full) => p,
            _ = stop.cancelled() => return,
        };
        match pulled {
            Ok(o) => {
                ok += 1;
                tracing::info!(image = %r, id = %o.id, already_local = o.already_local, elapsed_ms = t.elapsed().as_millis() as u64, "preloaded");
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(image = %r, error = %e, "preloading failed");
            }
        }
    }
    tracing::info!(
        images = ok,
        failed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "preload done"
    );
}

pub async fn serve(cfg: Config, default_secret: Option<Secret>) -> anyhow::Result<()> {
    // One-time initialisations the first request would otherwise pay for.
    tokio::task::spawn_blocking(crate::oci::warm_up);
    // A bad preload list stops the start, before anything is set up.
    let preload = match &cfg.preload_images {
        Some(f) => {
            let refs = crate::oci::read_image_list(f)
                .with_context(|| format!("preload_images {}", f.display()))?;
            for r in &refs {
                crate::oci::parse_reference(r)
                    .map_err(|e| anyhow::anyhow!("preload_images {}: {e}", f.display()))?;
            }
            tracing::info!(list = %f.display(), images = refs.len(), "preloading images in the background");
            Some(refs)
        }
        None => None,
    };
    let core = Core::open(&cfg, default_secret).context("opening the store")?;
    let images = Arc::clone(&core.images);
    check_socket(&cfg.cri.socket)?;
    if cfg.snapshotter.enabled {
        check_socket(&cfg.snapshotter.socket)?;
    }
    // Start-up never waits on the network: fills resume in the background.
    if cfg.fetch.fill.enabled {
        let n = images.resume_fills()?;
        if n > 0 {
            tracing::info!(layers = n, "resuming unfinished fills");
        }
    }
    let gc_task = (!cfg.gc.interval.is_zero()).then(|| {
        let images = Arc::clone(&images);
        let token = core.shutdown.clone();
        let every = cfg.gc.interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = images.gc().await {
                            tracing::warn!(error = %e, "periodic gc failed");
                        }
                    }
                    _ = token.cancelled() => break,
                }
            }
        })
    });

    // The lazy layer filesystem. Without FUSE the daemon still serves CRI and fills layers.
    let mut fuse_reader = None;
    let mut fuse_recorder = None;
    let mut fuse_table = None;
    let recorder = Arc::new(crate::fs::record::Recorder::default());
    let fuse = if cfg.fuse.enabled {
        let reader = crate::access::reader::Reader::new(
            core.store.layout.clone(),
            Arc::clone(&core.store.db),
            Arc::clone(core.filler.access()),
            Arc::clone(core.filler.partials()),
            crate::access::reader::ReadOptions {
                timeout: cfg.fuse.read_timeout,
                cache_bytes: cfg.fuse.chunk_cache_mib << 20,
                read_ahead: cfg.fetch.read_ahead_kib << 10,
                neighbours: cfg.fetch.read_ahead_neighbours_kib << 10,
                dir_read_ahead: cfg.fetch.read_ahead_dir_kib << 10,
                region_read_ahead: cfg.fetch.read_ahead_region_kib << 10,
                elf_read_ahead: cfg.fetch.read_ahead_elf,
            },
        );
        fuse_reader = Some(Arc::clone(&reader));
        let table = crate::fs::layers::LayerTable::new(
            core.store.layout.clone(),
            Arc::clone(&core.store.db),
            Arc::clone(&reader),
            Arc::clone(core.filler.streams()),
        );
        fuse_table = Some(Arc::clone(&table));
        let fs = crate::fs::fuse::LayerFs::new(
            core.store.layout.clone(),
            Arc::clone(&core.store.db),
            reader,
            table,
            cfg.fuse.passthrough,
            Arc::clone(&recorder),
        );
        match crate::fs::mount::Mount::start(
            fs,
            &cfg.fuse.mountpoint,
            cfg.fuse.threads,
            cfg.fuse.handover,
        ) {
            Ok(m) => {
                fuse_recorder = Some(Arc::clone(&recorder));
                if !m.resumed {
                    tracing::info!(mountpoint = %cfg.fuse.mountpoint.display(), "layer filesystem mounted");
                }
                Some(m)
            }
            Err(e) => {
                tracing::warn!(mountpoint = %cfg.fuse.mountpoint.display(), error = %e,
                    "cannot mount the layer filesystem (is /dev/fuse available?); lazy mounts are off");
                None
            }
        }
    } else {
        None
    };
    // The pull-through registry, on the same store (served below, once the metrics know it).
    let (mirror, mirror_listener) = if cfg.mirror.listen.is_empty() {
        (None, None)
    } else {
        let listener = tokio::net::TcpListener::bind(&cfg.mirror.listen)
            .await
            .with_context(|| format!("binding the pull-through registry {}", cfg.mirror.listen))?;
        let tls = crate::http::mirror_tls(&cfg).context("mirror.tls")?;
        tracing::info!(listen = %cfg.mirror.listen, tls = tls.is_some(), client_auth = ?cfg.mirror.tls.as_ref().map(|t| t.client_auth), default_upstream = %cfg.mirror.default_upstream, air_gapped = cfg.mirror.air_gapped, "serving the pull-through registry (OCI pull API at /v2/)");
        let mirror = crate::http::mirror::Mirror::new(
            core.store.layout.clone(),
            Arc::clone(&core.store.db),
            Arc::clone(&core.registry),
            crate::http::mirror::MirrorOptions {
                default_upstream: cfg.mirror.default_upstream.clone(),
                air_gapped: cfg.mirror.air_gapped,
                tag_ttl: cfg.mirror.tag_ttl,
                always_pull_latest: cfg.mirror.always_pull_latest,
                max_upstream_fetches: cfg.mirror.max_upstream_fetches,
            },
            Some(Arc::clone(&core.filler)),
        );
        (Some(mirror), Some((listener, tls)))
    };
    let metrics_stop = CancellationToken::new();
    // The health port: live from here on, ready once every server listens.
    let health = crate::http::health::Health::new(Arc::clone(&core.store.db));
    let health_task = if cfg.health.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&cfg.health.listen)
            .await
            .with_context(|| format!("binding the health port {}", cfg.health.listen))?;
        tracing::info!(listen = %cfg.health.listen, "serving health probes at /healthz and /readyz");
        let h = Arc::clone(&health);
        let handler = Arc::new(move |req| Arc::clone(&h).handle(req));
        Some(tokio::spawn(crate::http::serve(
            listener,
            "health",
            None,
            crate::http::HEADER_TIMEOUT,
            handler,
            metrics_stop.clone(),
        )))
    };
    let metrics_task = if cfg.metrics.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&cfg.metrics.listen)
            .await
            .with_context(|| format!("binding the metrics endpoint {}", cfg.metrics.listen))?;
        tracing::info!(listen = %cfg.metrics.listen, "serving Prometheus metrics at /metrics");
        let src = Arc::new(crate::metrics::Sources {
            filler: Arc::clone(&core.filler),
            reader: fuse_reader.clone(),
            images: Arc::clone(&images),
            mirror: mirror.clone(),
        });
        Some(tokio::spawn(crate::metrics::serve(
            listener,
            src,
            metrics_stop.clone(),
        )))
    };
    let containerd = cfg.containerd.address.as_ref().map(|address| {
        tracing::info!(address = %address.display(), namespace = %cfg.containerd.namespace,
            snapshotter = %cfg.containerd.snapshotter, "CRI pulls are also registered in containerd");
        Arc::new(crate::cri::containerd::Containerd::new(
            crate::cri::containerd::ContainerdOptions {
                address: address.clone(),
                namespace: cfg.containerd.namespace.clone(),
                snapshotter: cfg.containerd.snapshotter.clone(),
                layer_timeout: cfg.containerd.layer_timeout,
                cri_timeout: Duration::from_secs(30),
            },
        ))
    });
    // `GET /images`, on the mirror's listener.
    let listing = Arc::new(crate::http::images::ImagesListing::new(
        Arc::clone(&images),
        containerd.clone(),
        &cfg,
    ));
    // The pull-through registry, on the same store.
    let mirror_task = match (&mirror, mirror_listener) {
        (Some(mirror), Some((listener, tls))) => {
            let mirror = Arc::clone(mirror);
            // The VM disk registry shares the listener, under its prefix.
            let reg = cfg.reg.enabled.then(|| {
                tracing::info!(prefix = %cfg.reg.prefix, max_upload = cfg.reg.max_upload, "serving the VM disk image registry");
                crate::http::reg::Reg::new(
                    core.store.clone(),
                    Arc::clone(&images),
                    &cfg.reg.prefix,
                    cfg.reg.max_upload,
                )
            });
            let listing = Arc::clone(&listing);
            let handler = Arc::new(move |req: hyper::Request<hyper::body::Incoming>| {
                let (mirror, reg, listing) =
                    (Arc::clone(&mirror), reg.clone(), Arc::clone(&listing));
                async move {
                    match reg {
                        Some(reg) if reg.owns(req.uri().path()) => reg.handle(req).await,
                        _ if listing.owns(req.uri().path()) => listing.handle(req).await,
                        _ => mirror.handle(req).await,
                    }
                }
            });
            Some(tokio::spawn(crate::http::serve(
                listener,
                "mirror",
                tls,
                cfg.mirror.read_header_timeout,
                handler,
                metrics_stop.clone(),
            )))
        }
        _ => None,
    };
    let stop = CancellationToken::new();
    let peers_task = (!cfg.peers.dns.is_empty()).then(|| {
        tokio::spawn(peers::keep_fresh(
            Arc::clone(&core.registry),
            cfg.peers.clone(),
            own_mirror_port(&cfg),
            stop.clone(),
        ))
    });
    if !cfg.peers.urls.is_empty() {
        tracing::info!(peers = ?core.registry.peers(), "peers: asked first for content by digest");
    }
    // The admin API and the background prune of the mirror's images; `/cmd/stop` ends the
    // daemon as SIGTERM does.
    let admin_stop = CancellationToken::new();
    let admin_token = match &cfg.mirror.admin_token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("mirror.admin_token_file {}", f.display()))?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                anyhow::bail!(
                    "mirror.admin_token_file {}: the token must be at least 16 characters",
                    f.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    let admin = crate::http::admin::Admin::new(
        core.store.clone(),
        Arc::clone(&images),
        mirror.clone(),
        admin_token,
        admin_stop.clone(),
    );
    let admin_task = if cfg.mirror.admin_listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&cfg.mirror.admin_listen)
            .await
            .with_context(|| format!("binding the admin API {}", cfg.mirror.admin_listen))?;
        let tls = crate::http::mirror_tls(&cfg).context("mirror.tls")?;
        tracing::info!(listen = %cfg.mirror.admin_listen, tls = tls.is_some(),
            token = cfg.mirror.admin_token_file.is_some(), "serving the admin API at /cmd/");
        let a = Arc::clone(&admin);
        let handler = Arc::new(move |req| Arc::clone(&a).handle(req));
        Some(tokio::spawn(crate::http::serve(
            listener,
            "admin",
            tls,
            crate::http::HEADER_TIMEOUT,
            handler,
            metrics_stop.clone(),
        )))
    };
    let prune_task = cfg.mirror.prune.enabled.then(|| {
        tracing::info!(every = ?cfg.mirror.prune.frequency, kind = ?cfg.mirror.prune.kind,
            older_than = ?cfg.mirror.prune.duration, dry_run = cfg.mirror.prune.dry_run,
            "mirror images are pruned in the background");
        tokio::spawn(crate::http::admin::prune_periodically(
            Arc::clone(&admin),
            cfg.mirror.prune.clone(),
            stop.clone(),
        ))
    });
    // The mirror's last-access times are written in batches.
    let access_task = mirror.clone().map(|m| {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => m.flush_access(),
                    _ = stop.cancelled() => { m.flush_access(); return; }
                }
            }
        })
    });
    // The containerd snapshotter: remote snapshots need the FUSE mount.
    let snapshot_task = if cfg.snapshotter.enabled {
        let snapshotter = crate::snapshot::Snapshotter::new(
            core.store.clone(),
            Arc::clone(&images),
            Arc::clone(&core.filler),
            crate::snapshot::SnapshotterOptions {
                fuse_root: fuse.as_ref().map(|_| cfg.fuse.mountpoint.clone()),
                remote_wait: cfg.snapshotter.remote_wait,
                plain_wait: cfg.fetch.fill.enabled.then_some(cfg.snapshotter.plain_wait),
                learner: fuse.as_ref().and(fuse_table.clone()).map(|table| {
                    crate::learned::Learner::new(
                        core.store.layout.clone(),
                        Arc::clone(&core.store.db),
                        Some(Arc::clone(&core.registry)),
                        Arc::clone(&core.early),
                        Arc::clone(&recorder),
                        table as Arc<dyn crate::learned::Prefetch>,
                        cfg.fetch.learn.clone(),
                    )
                }),
            },
        )
        .context("starting the snapshotter")?;
        let listener = bind_socket(&cfg.snapshotter.socket)?;
        tracing::info!(socket = %cfg.snapshotter.socket.display(), lazy = fuse.is_some(),
            "serving the containerd snapshotter (proxy plugin)");
        Some(tokio::spawn(crate::rpc::serve_unix(
            tonic::service::Routes::new(
                SnapshotsServer::new(crate::snapshot::service::SnapshotService { snapshotter })
                    .max_decoding_message_size(4 << 20),
            ),
            listener,
            stop.clone(),
        )))
    } else {
        None
    };
    let listener = bind_socket(&cfg.cri.socket)?;
    let svc = CriImages::new(
        core.store.clone(),
        cfg.fetch.fill.enabled,
        Arc::clone(&images),
        cfg.cri.pull_mode,
        containerd.clone(),
    );
    tracing::info!(socket = %cfg.cri.socket.display(), root = %cfg.root.display(), pull_mode = ?cfg.cri.pull_mode,
        version = env!("CARGO_PKG_VERSION"), "lazypull serving CRI ImageService");

    let server = crate::rpc::serve_unix(
        tonic::service::Routes::new(
            ImageServiceServer::new(svc).max_decoding_message_size(4 << 20),
        )
        .add_service(
            ControlServer::new(control::ControlService {
                recorder: fuse_recorder,
                images: Arc::clone(&images),
                store: core.store.clone(),
                fill_enabled: cfg.fetch.fill.enabled,
                containerd,
            })
            // Load streams archives in messages of up to 1 MiB of data.
            .max_decoding_message_size(2 << 20),
        ),
        listener,
        stop.clone(),
    );
    tokio::pin!(server);
    let preload_task =
        preload.map(|refs| tokio::spawn(preload_images(Arc::clone(&images), refs, stop.clone())));
    health.set(crate::http::health::Phase::Serving);
    let sig = tokio::select! {
        r = &mut server => { r.context("gRPC server failed")?; "server exit" }
        s = signal() => s,
        _ = admin_stop.cancelled() => "admin /cmd/stop",
    };
    tracing::info!(signal = sig, grace = ?cfg.cri.shutdown_grace, "shutting down: no new requests, draining running ones");
    health.set(crate::http::health::Phase::Stopping);
    stop.cancel();
    if let Some(t) = preload_task {
        t.abort();
    }
    if tokio::time::timeout(cfg.cri.shutdown_grace, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("running requests did not finish within the grace period; dropping them");
    }
    if let Some(t) = snapshot_task {
        match tokio::time::timeout(cfg.cri.shutdown_grace, t).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "snapshotter server failed"),
            Err(_) => tracing::warn!("snapshotter requests did not finish within the grace period"),
            _ => {}
        }
        let _ = std::fs::remove_file(&cfg.snapshotter.socket);
    }
    // Stop fills: progress up to the last checkpoint is durable and resumes at the next start.
    core.shutdown.cancel();
    if let Some(m) = fuse {
        // Containers on lazy layers: the mount is left to the next start (see Mount::stop).
        let users = crate::store::locked(&core.store.db)
            .snapshots()
            .map(|all| crate::store::snapshots::on_remote_layers(&all))
            .unwrap_or(0);
        m.unmount_within(cfg.cri.shutdown_grace, users);
    }
    // Record the ranges reads fetched since the last flush, so a restart reuses them.
    core.filler.partials().flush_all();
    if let Some(t) = gc_task {
        let _ = t.await;
    }
    metrics_stop.cancel();
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Some(t) = mirror_task {
        let _ = t.await;
    }
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    for t in [prune_task, access_task, peers_task].into_iter().flatten() {
        let _ = t.await;
    }
    if let Some(t) = health_task {
        let _ = t.await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while core.filler.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&cfg.cri.socket);
    drop(core);
    tracing::info!("stopped");
    Ok(())
}

/// The port of this node's mirror, which its peer list leaves out.
fn own_mirror_port(cfg: &Config) -> Option<u16> {
    cfg.mirror
        .listen
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.port())
}
