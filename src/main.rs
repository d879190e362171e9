//! lazypull: lazy-loading container image service. Thin entry point: parse, configure, dispatch.

use anyhow::Context;
use clap::Parser;
use lazypull::cli::{Cli, Command, RegistryArgs};
use lazypull::config::Config;
use lazypull::registry::Scheme;
use lazypull::registry::auth::Secret;
use lazypull::{commands, daemon, telemetry};

fn duration(flag: &str, v: &str) -> anyhow::Result<std::time::Duration> {
    humantime::parse_duration(v)
        .with_context(|| format!("{flag} {v:?}: expected a duration like 30s, 5m, 1h"))
}

/// Apply registry flags to the config; returns the `--creds`/`--auth` secret.
fn apply_registry_args(cfg: &mut Config, a: &RegistryArgs) -> anyhow::Result<Option<Secret>> {
    if let Some(p) = &a.docker_config {
        cfg.docker_config = Some(p.clone());
    }
    for host in &a.insecure_registry {
        cfg.registry_entry(host).scheme = Some(Scheme::Http);
    }
    for m in &a.mirror {
        let (reg, url) = m
            .split_once('=')
            .with_context(|| format!("--mirror {m:?}: expected REGISTRY=MIRROR_URL"))?;
        cfg.registry_entry(reg).mirrors.push(url.to_string());
    }
    let secret = match (&a.creds, &a.auth) {
        (Some(c), _) => Some(Secret::from_creds(c).context("--creds")?),
        (None, Some(b)) => Some(Secret::from_auth(b).context("--auth")?),
        (None, None) => None,
    };
    Ok(secret)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    let mut cfg = Config::load(g.config.as_deref())?;
    if let Some(r) = &g.root {
        cfg.root = std::path::absolute(r).with_context(|| format!("--root {}", r.display()))?;
    }
    if let Some(s) = &g.socket {
        cfg.cri.socket =
            std::path::absolute(s).with_context(|| format!("--socket {}", s.display()))?;
    }
    let serving = matches!(cli.command, Command::Serve(_));
    if let Some(l) = &g.log_level {
        cfg.log.level = l.clone();
    } else if !serving && g.config.is_none() {
        // Client commands talk through their output; keep logs to warnings unless asked.
        cfg.log.level = "warn".into();
    }
    if let Some(f) = &g.log_file {
        cfg.log.file = Some(f.clone());
    }
    if let Some(f) = g.log_format {
        cfg.log.format = f;
    }
    let mut secret = None;
    match &cli.command {
        Command::Serve(a) => {
            secret = apply_registry_args(&mut cfg, &a.registry)?;
            if let Some(m) = a.pull_mode {
                cfg.cri.pull_mode = m;
            }
            if let Some(t) = &a.pull_timeout {
                cfg.cri.pull_timeout = duration("--pull-timeout", t)?;
            }
            if let Some(n) = a.max_parallel {
                cfg.fetch.max_parallel = n;
            }
            if let Some(t) = &a.gc_interval {
                cfg.gc.interval = duration("--gc-interval", t)?;
            }
            if let Some(t) = &a.shutdown_grace {
                cfg.cri.shutdown_grace = duration("--shutdown-grace", t)?;
            }
            if let Some(f) = &a.preload_images {
                cfg.preload_images = Some(f.clone());
            }
            if a.no_persist_credentials {
                cfg.cri.persist_credentials = false;
            }
            if a.no_fill {
                cfg.fetch.fill.enabled = false;
            }
            if let Some(m) = a.fill_request_mib {
                cfg.fetch.fill.request_mib = m;
            }
            if let Some(t) = &a.fill_yield_for {
                cfg.fetch.fill.yield_for = duration("--fill-yield-for", t)?;
            }
            if let Some(m) = &a.fuse_mountpoint {
                cfg.fuse.mountpoint = std::path::absolute(m)
                    .with_context(|| format!("--fuse-mountpoint {}", m.display()))?;
            }
            if a.no_fuse {
                cfg.fuse.enabled = false;
            }
            if let Some(k) = a.read_ahead_kib {
                cfg.fetch.read_ahead_kib = k;
            }
            if let Some(k) = a.read_ahead_neighbours_kib {
                cfg.fetch.read_ahead_neighbours_kib = k;
            }
            if let Some(k) = a.read_ahead_dir_kib {
                cfg.fetch.read_ahead_dir_kib = k;
            }
            if let Some(k) = a.read_ahead_region_kib {
                cfg.fetch.read_ahead_region_kib = k;
            }
            if a.no_read_ahead_elf {
                cfg.fetch.read_ahead_elf = false;
            }
            if let Some(l) = &a.mirror_listen {
                cfg.mirror.listen = l.clone();
            }
            if let Some(r) = &a.data_root {
                cfg.root = std::path::absolute(r)
                    .with_context(|| format!("--data-root {}", r.display()))?;
            }
            if let Some(t) = a.read_header_timeout_secs {
                cfg.mirror.read_header_timeout = std::time::Duration::from_secs(t);
            }
            if let Some(p) = &a.repo_prefix {
                cfg.reg.prefix = p.clone();
            }
            if let Some(u) = &a.mirror_default_upstream {
                cfg.mirror.default_upstream = u.clone();
            }
            if a.mirror_air_gapped {
                cfg.mirror.air_gapped = true;
            }
            if let Some(t) = a.mirror_tag_ttl {
                cfg.mirror.tag_ttl = t;
            }
            if let (Some(cert), Some(key)) = (&a.mirror_tls_cert, &a.mirror_tls_key) {
                cfg.mirror.tls = Some(lazypull::config::MirrorTls {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_auth: if a.mirror_tls_client_ca.is_some() {
                        lazypull::http::tls::ClientAuth::Verify
                    } else {
                        lazypull::http::tls::ClientAuth::None
                    },
                    client_ca: a.mirror_tls_client_ca.clone(),
                });
            }
            if a.mirror_always_pull_latest {
                cfg.mirror.always_pull_latest = true;
            }
            if !a.peers.is_empty() {
                cfg.peers.urls = a.peers.clone();
            }
            if let Some(d) = &a.peers_dns {
                cfg.peers.dns = d.clone();
            }
            if let Some(l) = &a.mirror_admin_listen {
                cfg.mirror.admin_listen = l.clone();
            }
            if let Some(f) = &a.mirror_admin_token_file {
                cfg.mirror.admin_token_file = Some(f.clone());
            }
            if let Some(l) = &a.health_listen {
                cfg.health.listen = l.clone();
            }
            if let Some(l) = &a.metrics_listen {
                cfg.metrics.listen = l.clone();
            }
            if let Some(p) = &a.snapshotter_socket {
                cfg.snapshotter.socket = std::path::absolute(p)
                    .with_context(|| format!("--snapshotter-socket {}", p.display()))?;
            }
            if a.no_snapshotter {
                cfg.snapshotter.enabled = false;
            }
            if let Some(p) = &a.containerd_address {
                cfg.containerd.address = Some(
                    std::path::absolute(p)
                        .with_context(|| format!("--containerd-address {}", p.display()))?,
                );
            }
        }
        Command::Prefetch(a) => secret = apply_registry_args(&mut cfg, &a.registry)?,
        Command::Load(a) => secret = apply_registry_args(&mut cfg, &a.registry)?,
        Command::Convert(a) => secret = apply_registry_args(&mut cfg, &a.registry)?,
        Command::Learned(a) => secret = apply_registry_args(&mut cfg, &a.registry)?,
        Command::Index(a) => secret = apply_registry_args(&mut cfg, &a.registry)?,
        _ => {}
    }
    cfg.validate()?;
    telemetry::init(&cfg.log.level, cfg.log.format, cfg.log.file.as_deref())?;
    match &cli.command {
        Command::Serve(_) => daemon::serve(cfg, secret).await,
        Command::Prefetch(a) => commands::prefetch::run(&cfg, a, secret).await,
        Command::Load(a) => commands::load::run(&cfg, a, secret).await,
        Command::Pull(a) => commands::pull::run(&cfg, a).await,
        Command::Admin(a) => commands::admin::run(&cfg, a).await,
        Command::Images(a) => commands::admin::images(&cfg, a).await,
        Command::Mount(a) => commands::mount::mount(&cfg, a).await,
        Command::Umount(a) => commands::mount::umount(a),
        Command::Convert(a) => commands::convert::run(&cfg, a, secret).await,
        Command::List(a) => commands::list::run(&cfg, a),
        Command::Prune(a) => commands::prune::run(&cfg, a).await,
        Command::Status(a) => commands::status::run(&cfg, a),
        Command::Learned(a) => commands::learned::run(&cfg, a, secret).await,
        Command::Index(a) => commands::index::run(&cfg, a, secret).await,
        Command::FuseHolder(a) => {
            let socket = a.socket.clone();
            tokio::task::spawn_blocking(move || lazypull::fs::handover::run_holder(&socket))
                .await
                .context("fuse holder")??;
            Ok(())
        }
        Command::Version => {
            println!("lazypull {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lazypull")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
