//! Command-line interface (clap). Every config key has a flag; flags win over the config file.

use crate::config::LogFormat;
use crate::images::PullMode;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "lazypull",
    version,
    about = "Lazy-loading container image service: a CRI image service whose pulls return as soon as \
             the manifest and config are verified, while a background filler completes every layer \
             into a verified, deduplicated store.",
    after_help = "Configuration: defaults < --config FILE (YAML) < flags. See README.md for every key."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// YAML configuration file.
    #[arg(long, global = true, env = "LAZYPULL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store directory [default: /var/lib/lazypull].
    #[arg(long, global = true, env = "LAZYPULL_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// CRI image service socket: where `serve` listens and the other commands find the daemon
    /// [default: /var/run/cri-image.sock].
    #[arg(long, global = true, env = "LAZYPULL_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Log level or filter (error, warn, info, debug, trace, or e.g. `lazypull=debug`).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Also append logs to this file.
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: CRI ImageService on a unix socket, background filler, periodic GC.
    Serve(Box<ServeArgs>),
    /// Pull images fully into the store (through the daemon when it runs, else offline), with a
    /// progress bar per layer. Afterwards the images work with the network gone.
    Prefetch(PrefetchArgs),
    /// Load images into the store without a registry, with progress: `docker save` tarballs and
    /// OCI archives (FILE, `-` for stdin; gzip or zstd compressed too), OCI layout directories
    /// (oci:DIR[:TAG]), or a text file listing image references (pulled whole, as prefetch
    /// --file does). Through the daemon when it runs. Ship the files, then disconnect: the
    /// images run and the mirror serves them with no upstream.
    Load(LoadArgs),
    /// Pull one image through the running daemon's CRI socket (like `crictl pull`): returns as
    /// soon as the image is registered, unless --full.
    Pull(PullArgs),
    /// Stack an image's lazily loaded layers with overlayfs at DIR (the daemon's FUSE mount must
    /// be up): `chroot DIR ...` then reads files on demand. eStargz layers only, for now.
    Mount(MountArgs),
    /// Undo `lazypull mount`.
    Umount(UmountArgs),
    /// Convert an image to eStargz or zstd:chunked (lazily pullable) and push it. SRC and DST
    /// are registry references or OCI image layouts (oci:DIR[:TAG]).
    Convert(ConvertArgs),
    /// List images in the store with size, fill progress, pull and last-use times.
    List(ListArgs),
    /// Remove images (by pattern, age or idleness) and garbage-collect their blobs.
    Prune(PruneArgs),
    /// Show per-image and per-layer fill progress.
    Status(StatusArgs),
    /// Show, --push or --forget an image's learned start-up prefetch list: the files its first
    /// start through the snapshotter read, in order, prefetched at its next cold start.
    Learned(LearnedArgs),
    /// Show (`index show IMAGE`) or publish (`index push IMAGE`) the random-access indexes of an
    /// image's plain gzip layers: decoder checkpoints and file positions recorded when the
    /// filler decompressed them. Other nodes pulling the image find the published index
    /// (`fetch.index: auto`) and read those layers lazily, like eStargz.
    Index(IndexArgs),
    /// Ask a running daemon's admin API (mirror.admin_listen): list its images, manifests and
    /// blobs, prune the mirror's images, stop it.
    Admin(AdminArgs),
    /// List the images on a running daemon's node and in its `catalog:` registries (its
    /// `GET /images`), as a table, or JSON.
    Images(ImagesArgs),
    /// Print the version.
    Version,
    /// Internal: keep the daemon's FUSE connection open across its restarts (started by
    /// `serve`; see README, "Restarts").
    #[command(hide = true)]
    FuseHolder(FuseHolderArgs),
}

#[derive(Args, Debug)]
pub struct FuseHolderArgs {
    /// Unix socket to serve the descriptor on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
}

#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Credentials USER:PASSWORD for registries without more specific ones.
    #[arg(long, value_name = "USER:PASSWORD")]
    pub creds: Option<String>,
    /// Credentials as base64(USER:PASSWORD), as in docker's config.json.
    #[arg(long, value_name = "BASE64", conflicts_with = "creds")]
    pub auth: Option<String>,
    /// docker config.json to read credentials from [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Talk plain HTTP to this registry (host[:port]); repeatable. Loopback registries default to HTTP.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// Try MIRROR before REGISTRY, e.g. docker.io=http://127.0.0.1:5000; repeatable.
    #[arg(long, value_name = "REGISTRY=MIRROR")]
    pub mirror: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Default pull mode: `lazy` returns once manifest and config are verified; `full` waits for
    /// every layer. Per request: image annotation `lazypull.io/pull-mode`.
    #[arg(long, value_enum)]
    pub pull_mode: Option<PullMode>,
    /// Fail a PullImage whose manifest/config cannot be fetched within this time (e.g. 30s).
    #[arg(long, value_name = "DURATION")]
    pub pull_timeout: Option<String>,
    /// Layers filled in parallel.
    #[arg(long, value_name = "N")]
    pub max_parallel: Option<usize>,
    /// Period of the background garbage collection (e.g. 1h; 0 turns it off).
    #[arg(long, value_name = "DURATION")]
    pub gc_interval: Option<String>,
    /// Do not fill layers in the background: fetch eStargz TOCs at pull time and layer content
    /// only when read through the lazy mount.
    #[arg(long)]
    pub no_fill: bool,
    /// Longest single request of the background filler, in MiB; it asks for the link again
    /// after each [default: fetch.fill.request_mib, 32].
    #[arg(long, value_name = "MIB")]
    pub fill_request_mib: Option<u64>,
    /// The filler starts or resumes only after the link has carried no on-demand read (or
    /// prefetch, or TOC) for this long, e.g. 500ms; such a read stops a running fill request at
    /// once [default: fetch.fill.yield_for, 500ms].
    #[arg(long, value_name = "DURATION")]
    pub fill_yield_for: Option<String>,
    /// Where the daemon mounts its FUSE layer filesystem (a directory per layer digest)
    /// [default: /run/lazypull/fs].
    #[arg(long, value_name = "DIR")]
    pub fuse_mountpoint: Option<std::path::PathBuf>,
    /// Do not mount the FUSE layer filesystem.
    #[arg(long)]
    pub no_fuse: bool,
    /// On-demand reads also fetch the file's next chunks, up to this many KiB
    /// [default: fetch.read_ahead_kib, 1024].
    #[arg(long, value_name = "KIB")]
    pub read_ahead_kib: Option<u64>,
    /// On-demand reads also fetch the files that follow in the layer, up to this many KiB
    /// (0 = off) [default: fetch.read_ahead_neighbours_kib, 256].
    #[arg(long, value_name = "KIB")]
    pub read_ahead_neighbours_kib: Option<u64>,
    /// Once reads of two files of a directory have gone to the registry, fetch its other
    /// files in the background if they total at most this many KiB compressed (0 = off)
    /// [default: fetch.read_ahead_dir_kib, 4096].
    #[arg(long, value_name = "KIB")]
    pub read_ahead_dir_kib: Option<u64>,
    /// Once reads of three different files close together in a layer (within 4 MiB) have
    /// gone to the registry within 3 s, fetch the bytes around them in the background; at
    /// most this many KiB compressed per layer in all (0 = off)
    /// [default: fetch.read_ahead_region_kib, 16384].
    #[arg(long, value_name = "KIB")]
    pub read_ahead_region_kib: Option<u64>,
    /// Do not fetch an executable's interpreter and libraries with its first read
    /// [default: fetch.read_ahead_elf, true].
    #[arg(long)]
    pub no_read_ahead_elf: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. 127.0.0.1:9101
    /// [default: metrics.listen, off].
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Serve the health probes (`GET /healthz` liveness, `GET /readyz` readiness) on this
    /// address, e.g. 0.0.0.0:8080 [default: health.listen, off].
    #[arg(long, value_name = "HOST:PORT")]
    pub health_listen: Option<String>,
    /// Serve the pull-through registry (OCI pull API, `/v2/`) and the VM disk registry
    /// (`/reg`) on this address, e.g. 0.0.0.0:5000 [default: mirror.listen, off].
    #[arg(long, visible_alias = "listener-addr", value_name = "HOST:PORT")]
    pub mirror_listen: Option<String>,
    /// The store (an alias of the global --root, as the VM disk registry's users pass it).
    #[arg(long, value_name = "DIR")]
    pub data_root: Option<PathBuf>,
    /// Seconds a client may take to send a request head on the mirror listener [default:
    /// mirror.read_header_timeout, 30s].
    #[arg(long, value_name = "SECS")]
    pub read_header_timeout_secs: Option<u64>,
    /// The VM disk registry's path prefix [default: reg.prefix, reg].
    #[arg(long, value_name = "PREFIX")]
    pub repo_prefix: Option<String>,
    /// Upstream registry of mirror requests that name none [default: mirror.default_upstream].
    #[arg(long, value_name = "HOST")]
    pub mirror_default_upstream: Option<String>,
    /// The mirror never contacts an upstream: it serves what the store has [default:
    /// mirror.air_gapped, false].
    #[arg(long)]
    pub mirror_air_gapped: bool,
    /// How long a tag the mirror answered is served from the store before the upstream is
    /// asked whether it moved, e.g. 5m, 0s = every request [default: mirror.tag_ttl, 5m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub mirror_tag_ttl: Option<std::time::Duration>,
    /// Serve the mirror over HTTPS with this certificate chain (PEM; with --mirror-tls-key)
    /// [default: mirror.tls.cert, plain HTTP].
    #[arg(long, value_name = "FILE", requires = "mirror_tls_key")]
    pub mirror_tls_cert: Option<PathBuf>,
    /// The private key of --mirror-tls-cert (PEM) [default: mirror.tls.key].
    #[arg(long, value_name = "FILE", requires = "mirror_tls_cert")]
    pub mirror_tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM) on the mirror (mTLS)
    /// [default: mirror.tls.client_auth none].
    #[arg(long, value_name = "FILE", requires = "mirror_tls_cert")]
    pub mirror_tls_client_ca: Option<PathBuf>,
    /// Ask the upstream for `latest` at every request [default: mirror.always_pull_latest].
    #[arg(long)]
    pub mirror_always_pull_latest: bool,
    /// A peer lazypull node's mirror URL (http://10.0.0.2:5000), asked first for content by
    /// digest; repeatable [default: peers.urls].
    #[arg(long = "peer", value_name = "URL")]
    pub peers: Vec<String>,
    /// A DNS name resolving to every peer, with their mirror port (a headless Service,
    /// lazypull-peers.kube-system.svc:5000) [default: peers.dns].
    #[arg(long, value_name = "NAME:PORT")]
    pub peers_dns: Option<String>,
    /// Serve the admin API (`/cmd/image/list`, `/cmd/prune`, ...) on this address, e.g.
    /// 127.0.0.1:5001 [default: mirror.admin_listen, off].
    #[arg(long, value_name = "HOST:PORT")]
    pub mirror_admin_listen: Option<String>,
    /// Admin requests must send `Authorization: Bearer <the file's token>` [default:
    /// mirror.admin_token_file].
    #[arg(long, value_name = "FILE")]
    pub mirror_admin_token_file: Option<PathBuf>,
    /// Do not keep credentials received through CRI for later refetches.
    #[arg(long)]
    pub no_persist_credentials: bool,
    /// Pull the images listed in FILE (one reference per line, # comments) whole, in the
    /// background, at start [default: preload_images].
    #[arg(long, value_name = "FILE")]
    pub preload_images: Option<PathBuf>,
    /// Time running RPCs get to finish after SIGTERM/SIGINT.
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Serve containerd's snapshots API (proxy plugin `lazypull`) on this socket
    /// [default: snapshotter.socket, /run/lazypull/snapshotter.sock].
    #[arg(long, value_name = "PATH")]
    pub snapshotter_socket: Option<std::path::PathBuf>,
    /// Do not serve the containerd snapshotter.
    #[arg(long)]
    pub no_snapshotter: bool,
    /// Also make every CRI pull known to the containerd at this socket (namespace k8s.io,
    /// snapshots through this daemon's snapshotter), for kubelet's
    /// --image-service-endpoint=lazypull with containerd as the runtime; RemoveImage removes it
    /// there too [default: containerd.address, off].
    #[arg(long, value_name = "PATH")]
    pub containerd_address: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct PrefetchArgs {
    /// Image references (e.g. docker.io/library/busybox:latest, 127.0.0.1:5000/app@sha256:...).
    pub images: Vec<String>,
    /// Read image references from FILE, one per line (# comments allowed); `-` is stdin.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// No progress bars (log lines only).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// What to load: FILE (a docker save tarball, an OCI archive, or a list of image
    /// references), `-` (an archive on stdin), or oci:DIR[:TAG] (an OCI image layout).
    #[arg(required = true)]
    pub sources: Vec<String>,
    /// Register the image under this reference instead of the archive's names (the source
    /// must hold one image, or select one with --tag).
    #[arg(long, value_name = "REF")]
    pub name: Option<String>,
    /// Only the image the archive tags TAG (an OCI layout's ref.name like `latest`, or a
    /// docker save tag like `busybox:latest`).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// The daemon's HTTP listener [default: http://mirror.listen].
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub verb: AdminVerb,
    /// The admin API's base URL [default: http://mirror.admin_listen, https with mirror.tls].
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// File with the bearer token [default: mirror.admin_token_file].
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an HTTPS admin API.
    #[arg(long, global = true, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// JSON instead of aligned text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum AdminVerb {
    /// Images: tagged or unreferenced manifests with what they reference, node and mirror.
    Images {
        /// Only names matching one of these comma-separated regular expressions.
        #[arg(long, value_name = "RE[,RE]")]
        pattern: Option<String>,
        /// Only images referencing a blob whose digest contains this.
        #[arg(long, value_name = "SUBSTR")]
        digest: Option<String>,
        /// At most N.
        #[arg(long, value_name = "N")]
        count: Option<i64>,
    },
    /// Every manifest and index in the store.
    Manifests {
        #[arg(long, value_name = "RE[,RE]")]
        pattern: Option<String>,
        #[arg(long, value_name = "N")]
        count: Option<i64>,
    },
    /// Every blob with the number of manifests referencing it.
    Blobs {
        #[arg(long, value_name = "SUBSTR")]
        substr: Option<String>,
        #[arg(long, value_name = "N")]
        count: Option<i64>,
    },
    /// Remove mirror images (not the node's: `lazypull prune` removes those) and collect their
    /// blobs.
    Prune {
        /// What selects: not served for --dur, stored before --dur, or names matching --expr.
        #[arg(long = "type", value_enum)]
        kind: AdminPruneType,
        /// e.g. 30d, 12h, 15m.
        #[arg(long, value_name = "DURATION")]
        dur: Option<String>,
        /// Comma-separated regular expressions over names.
        #[arg(long, value_name = "RE[,RE]")]
        expr: Option<String>,
        /// At most N images (-1: no limit).
        #[arg(long, value_name = "N", default_value_t = 5)]
        count: i64,
        /// Show what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop the daemon gracefully (as SIGTERM).
    Stop,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AdminPruneType {
    Accessed,
    Created,
    Pattern,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference.
    pub image: String,
    /// Wait until every layer is fetched and verified.
    #[arg(long)]
    pub full: bool,
    /// Credentials USER:PASSWORD, sent as the CRI AuthConfig.
    #[arg(long, value_name = "USER:PASSWORD")]
    pub creds: Option<String>,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Image reference or id (pulled already).
    pub image: String,
    /// Where to mount the image's root filesystem.
    pub dir: PathBuf,
    /// Writable upper directory (changes go there); without it the mount is read-only.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// overlayfs work directory, on the same filesystem as --upper [default: UPPER.work].
    #[arg(long, value_name = "DIR", requires = "upper")]
    pub work: Option<PathBuf>,
    /// The daemon's FUSE mount [default: fuse.mountpoint, /run/lazypull/fs].
    #[arg(long, value_name = "DIR")]
    pub fuse_mountpoint: Option<PathBuf>,
    /// How long to wait after a pull for the layers to be mountable: eStargz layers need their
    /// TOC, other layers must be fetched whole first (e.g. 60s, 10m).
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub timeout: String,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    /// A directory mounted by `lazypull mount`.
    pub dir: PathBuf,
    /// Detach even if busy (the kernel finishes when the last user goes).
    #[arg(long)]
    pub lazy: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only images with a name (tag or digest reference) or id matching this glob, e.g. '*busybox*'.
    pub pattern: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only images with a name or id matching this glob.
    pub pattern: Option<String>,
    /// Only images pulled before this date (YYYY-MM-DD or RFC 3339).
    #[arg(long, value_name = "DATE")]
    pub before: Option<String>,
    /// Only images not used (pulled or inspected) for this long, e.g. 30d, 12h.
    #[arg(long, value_name = "DURATION")]
    pub unused_for: Option<String>,
    /// Allow pruning with no filter at all (removes every image).
    #[arg(long)]
    pub all: bool,
    /// Show what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LearnedArgs {
    /// The image (tag, digest reference or id).
    pub image: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Remove the list: the image's next start is recorded again.
    #[arg(long, conflicts_with_all = ["json", "push"])]
    pub forget: bool,
    /// Publish the list next to the image in its registry (an OCI artifact whose subject is
    /// the image manifest; referrers API or the `sha256-<hex>` tag fallback): other nodes
    /// prefetch it at their first start (`fetch.learn.remote`).
    #[arg(long, conflicts_with = "json")]
    pub push: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    lazypull index show 127.0.0.1:5000/app:1\n  \
    lazypull index push 127.0.0.1:5000/app:1")]
pub struct IndexArgs {
    #[arg(value_enum)]
    pub action: IndexAction,
    /// The image (tag, digest reference or id).
    pub image: String,
    /// Machine-readable output (show).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IndexAction {
    /// Per layer: whether it has a random-access index, its checkpoints and size.
    Show,
    /// Publish the indexes next to the image in its registry (an OCI artifact whose subject is
    /// the image manifest; referrers API or the `sha256-<hex>` tag fallback).
    Push,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only this image (tag, digest reference or id).
    pub image: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    lazypull convert 127.0.0.1:5000/app:1 127.0.0.1:5000/app:1-esgz\n  \
    lazypull convert --format zstd-chunked oci:/tmp/layout:app 127.0.0.1:5000/app:1-zc\n  \
    lazypull convert --prefetch-files list.txt SRC DST\n  \
    lazypull convert --record SRC DST -- /usr/bin/python3 -c 'import json'   (needs `lazypull serve`)")]
pub struct ConvertArgs {
    /// Source image: a registry reference, or oci:DIR[:TAG] for an OCI image layout.
    pub source: String,
    /// Destination: a registry reference, or oci:DIR[:TAG] (created if missing).
    pub dest: String,
    /// Layer format to write.
    #[arg(long, value_enum, default_value = "estargz")]
    pub format: crate::convert::Format,
    /// Split files larger than this many bytes into separately fetchable chunks.
    #[arg(long, value_name = "BYTES", default_value_t = crate::convert::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Compression level: gzip 1-9 [default: 6], zstd 1-22 [default: 3].
    #[arg(long, value_name = "N")]
    pub compression_level: Option<u32>,
    /// Files to put first in every layer and fetch first at mount, one path per line.
    #[arg(long, value_name = "FILE", conflicts_with = "record")]
    pub prefetch_files: Option<PathBuf>,
    /// Run the command after `--` chrooted in a lazy mount of SRC (through the running daemon)
    /// and prefetch the files it opens.
    #[arg(long, requires = "cmd")]
    pub record: bool,
    /// Stop the recorded command after this long (what it opened until then is kept).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub record_timeout: String,
    /// The daemon's FUSE mount, for --record [default: fuse.mountpoint, /run/lazypull/fs].
    #[arg(long, value_name = "DIR", requires = "record")]
    pub fuse_mountpoint: Option<PathBuf>,
    /// Also write the recorded paths to FILE (usable as --prefetch-files).
    #[arg(long, value_name = "FILE", requires = "record")]
    pub record_out: Option<PathBuf>,
    /// Platform to pick from a multi-platform SRC, OS/ARCH[/VARIANT] [default: this host's].
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
    /// Threads compressing each layer [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Where to keep temporary files (uncompressed layers) [default: /var/tmp].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The command to record (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}
