//! Configuration: defaults < YAML file (`--config`) < flags, validated once at start-up.

use crate::images::PullMode;
use crate::registry::auth::Secret;
use crate::registry::{self, HostConfig, Scheme};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub root: PathBuf,
    pub log: LogConfig,
    pub cri: CriConfig,
    pub fetch: FetchConfig,
    pub gc: GcConfig,
    pub fuse: FuseConfig,
    pub metrics: MetricsConfig,
    pub health: HealthConfig,
    pub mirror: MirrorConfig,
    pub reg: RegConfig,
    pub peers: PeersConfig,
    pub snapshotter: SnapshotterConfig,
    pub containerd: ContainerdConfig,
    /// docker config.json to read credentials from ("" = $DOCKER_CONFIG or ~/.docker).
    pub docker_config: Option<PathBuf>,
    pub registries: Vec<RegistryEntry>,
    /// Registries `GET /images` lists (credentials and TLS from `registries:`).
    pub catalog: Vec<CatalogEntry>,
    /// Image ids (short or full) `GET /images` leaves out of the node's list.
    pub images_to_ignore: Vec<String>,
    /// How long `GET /images` waits for each source.
    #[serde(with = "humantime_serde_compat")]
    pub catalog_timeout: Duration,
    /// An image list (one reference per line) the daemon pulls whole in the background at
    /// start: ship the node, let it fill, then disconnect it.
    pub preload_images: Option<PathBuf>,
}

/// The containerd snapshotter (proxy plugin) the daemon also serves.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    pub enabled: bool,
    /// Unix socket containerd's `[proxy_plugins.lazypull] address` points at (mode 0600).
    pub socket: PathBuf,
    /// How long a Prepare for a lazily servable layer waits for its TOC before containerd is
    /// told to download the layer instead.
    #[serde(with = "humantime_serde_compat")]
    pub remote_wait: Duration,
    /// A layer without TOC (plain gzip/zstd) is fetched once, by lazypull's filler, and served
    /// from its file cache once unpacked: a Prepare waits that long for it (containerd then
    /// downloads nothing). Past it, or with 0, or with the filler off, containerd downloads the
    /// layer itself (and the filler fetches it again).
    #[serde(with = "humantime_serde_compat")]
    pub plain_wait: Duration,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            enabled: true,
            socket: PathBuf::from("/run/lazypull/snapshotter.sock"),
            remote_wait: Duration::from_secs(30),
            plain_wait: Duration::from_secs(600),
        }
    }
}

/// Registering CRI pulls in containerd, for when lazypull is the node's CRI image endpoint
/// and containerd its runtime (off unless `address` is set).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdConfig {
    /// containerd's socket, e.g. /run/containerd/containerd.sock.
    pub address: Option<PathBuf>,
    /// The namespace containerd's CRI plugin uses.
    pub namespace: String,
    /// The name of lazypull's proxy plugin in containerd's config (`[proxy_plugins.NAME]`).
    pub snapshotter: String,
    /// How long a CRI pull waits for its layers to be mountable before it is registered
    /// (eStargz layers: the TOC; others are fetched and unpacked whole first).
    #[serde(with = "humantime_serde_compat")]
    pub layer_timeout: Duration,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            address: None,
            namespace: "k8s.io".into(),
            snapshotter: "lazypull".into(),
            layer_timeout: Duration::from_secs(600),
        }
    }
}

/// The opt-in Prometheus endpoint.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `HOST:PORT` to serve `GET /metrics` on; empty = off.
    pub listen: String,
}

/// The health port for probes (`GET /healthz`, `GET /readyz`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `HOST:PORT` to serve the probes on; empty = off.
    pub listen: String,
}

/// One registry `GET /images` lists.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// `http(s)://host[:port]`.
    pub url: String,
    /// `distribution` (`_catalog` and `tags/list`) or `harbor` (its v2.0 API).
    #[serde(default)]
    pub kind: crate::listing::Kind,
    /// The name shown for it [default: its host].
    #[serde(default)]
    pub name: Option<String>,
    /// Items asked per page.
    #[serde(default = "default_page_size")]
    pub page_size: usize,
}

fn default_page_size() -> usize {
    100
}

impl CatalogEntry {
    /// Its host[:port], the key of its `registries:` entry.
    pub fn host(&self) -> &str {
        let rest = self
            .url
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or(&self.url);
        rest.split('/').next().unwrap_or(rest)
    }
}

/// The VM disk image registry (`/{prefix}`), served on `mirror.listen`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegConfig {
    pub enabled: bool,
    /// The path prefix (`--repo-prefix`).
    pub prefix: String,
    /// The largest disk an upload may send, in bytes.
    pub max_upload: u64,
}

impl Default for RegConfig {
    fn default() -> Self {
        RegConfig {
            enabled: true,
            prefix: "reg".into(),
            max_upload: 64 << 30,
        }
    }
}

/// Other lazypull nodes whose mirrors (`mirror.listen`) are asked first for content by digest
/// (manifests, configs, layers and their ranges), for every upstream; they answer from their
/// store only, and the upstream is asked when none has it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    /// Mirror URLs of the peers (`http://10.0.0.2:5000`).
    pub urls: Vec<String>,
    /// One DNS name whose addresses are all the peers, with their mirror port
    /// (`lazypull-peers.kube-system.svc:5000`: a Kubernetes headless Service); this node's
    /// own address is left out.
    pub dns: String,
    /// `http` or `https` for the peers found through `dns`.
    pub scheme: crate::registry::Scheme,
    /// How often `dns` is resolved again.
    #[serde(with = "humantime_serde_compat")]
    pub refresh: Duration,
}

impl Default for PeersConfig {
    fn default() -> Self {
        PeersConfig {
            urls: vec![],
            dns: String::new(),
            scheme: crate::registry::Scheme::Http,
            refresh: Duration::from_secs(30),
        }
    }
}

/// The pull-through registry (OCI distribution pull API) served from the store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// `HOST:PORT` to serve `/v2/` on; empty = off.
    pub listen: String,
    /// The upstream registry of requests that name none (no `ns` query parameter, no
    /// registry host as the first path segment), e.g. `docker.io`; empty = such requests fail.
    pub default_upstream: String,
    /// Never contact an upstream: answer from the store only.
    pub air_gapped: bool,
    /// A tag the mirror answered less than this long ago is answered from the store; after it,
    /// the upstream is asked whether it moved (a HEAD, compared with the stored digest).
    /// 0 = ask at every request.
    #[serde(with = "humantime_serde_compat")]
    pub tag_ttl: Duration,
    /// `latest` is asked upstream at every request, whatever `tag_ttl` says.
    pub always_pull_latest: bool,
    /// At most this many blobs are fetched from upstreams at once; clients of the others wait
    /// for a turn (each blob is still fetched once, however many clients ask).
    pub max_upstream_fetches: usize,
    /// Serve HTTPS (and optionally require client certificates) instead of plain HTTP; the
    /// admin API too.
    pub tls: Option<MirrorTls>,
    /// `HOST:PORT` of the admin API (`/cmd/...`: list, prune, stop); empty = off. A loopback
    /// address, unless `admin_token_file` is set or `tls.client_auth` is `verify`.
    pub admin_listen: String,
    /// A file holding the token admin requests must send (`Authorization: Bearer TOKEN`).
    pub admin_token_file: Option<PathBuf>,
    /// Background pruning of what the mirror stored.
    pub prune: MirrorPrune,
    /// How long a client may take to send a request head (slow clients hold a connection).
    #[serde(with = "humantime_serde_compat")]
    pub read_header_timeout: Duration,
}

/// `mirror.prune`: remove mirror images (a tagged or unreferenced manifest and what only it
/// references) that were not served for `duration` (`type: accessed`) or were stored longer
/// ago than that (`created`), every `frequency`, at most `count` per run (-1: no limit).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorPrune {
    pub enabled: bool,
    #[serde(rename = "type")]
    pub kind: PruneKind,
    #[serde(with = "humantime_serde_compat")]
    pub duration: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub frequency: Duration,
    pub count: i64,
    /// Log what a run would remove, remove nothing.
    pub dry_run: bool,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PruneKind {
    Accessed,
    Created,
}

impl Default for MirrorPrune {
    fn default() -> Self {
        MirrorPrune {
            enabled: false,
            kind: PruneKind::Accessed,
            duration: Duration::from_secs(30 * 86400),
            frequency: Duration::from_secs(86400),
            count: -1,
            dry_run: false,
        }
    }
}

/// `mirror.tls`: the server's certificate and key (PEM files), and client certificates.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `none` (default) or `verify`: only clients with a certificate `client_ca` signed.
    #[serde(default)]
    pub client_auth: crate::http::tls::ClientAuth,
    /// CA bundle (PEM) for client certificates; absent: the system's trust store.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            listen: String::new(),
            default_upstream: String::new(),
            air_gapped: false,
            tag_ttl: Duration::from_secs(300),
            always_pull_latest: false,
            max_upstream_fetches: 16,
            tls: None,
            admin_listen: String::new(),
            admin_token_file: None,
            prune: MirrorPrune::default(),
            read_header_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub file: Option<PathBuf>,
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether pulls look for random-access indexes other nodes shared (`lazypull index push`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IndexMode {
    /// Every pull of an image with plain gzip layers looks for one in the image's registry.
    Auto,
    /// Never.
    Off,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    pub socket: PathBuf,
    pub pull_mode: PullMode,
    #[serde(with = "humantime_serde_compat")]
    pub pull_timeout: Duration,
    /// Keep credentials a CRI pull supplied (root-only, in the catalogue) for later refetches.
    pub persist_credentials: bool,
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    pub max_parallel: usize,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub read_timeout: Duration,
    pub retries: u32,
    /// A read that must go to the registry also fetches the file's next chunks, up to this
    /// many KiB, in the same request (the reply does not wait for them).
    pub read_ahead_kib: u64,
    /// ... and the chunks of the files that follow in the blob, up to this many KiB past the
    /// end of the fetched span (files of a directory are neighbours in the tar).
    pub read_ahead_neighbours_kib: u64,
    /// Directory read-ahead: once reads of two files of one directory have gone to the
    /// registry, the directory's other files are fetched in the background, if they total at
    /// most this many KiB compressed (0 = off).
    pub read_ahead_dir_kib: u64,
    /// Region read-ahead: once reads of three different files within 4 MiB of each other in
    /// the blob have gone to the registry within 3 s, the bytes around them (1 MiB beyond
    /// the outermost) are fetched in the background; at most this many KiB compressed per
    /// mounted layer in all (0 = off).
    pub read_ahead_region_kib: u64,
    /// ELF read-ahead: the first read of an executable or library also fetches, in the
    /// background, its interpreter and the libraries it needs (found in the same layer).
    pub read_ahead_elf: bool,
    /// Plain gzip layers: while a layer is decompressed the first time, record a decoder
    /// checkpoint every this many KiB of its tar stream (a random-access index: the layer can
    /// then be read lazily with range requests). Smaller: less fetched per cold read, a larger
    /// index (about 16 KiB per checkpoint). 0: no index.
    pub index_span_kib: u64,
    /// `auto`: a pull of an image with plain gzip layers looks in its registry for the
    /// random-access index another node published (`lazypull index push`); with it, those
    /// layers are read lazily like eStargz. `off`: never looks.
    pub index: IndexMode,
    pub fill: FillConfig,
    pub learn: LearnConfig,
}

/// Learned start-up prefetch (`crate::learned`): the files the first start of an image read,
/// in order, prefetched at its next cold start.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnConfig {
    /// Record a start when the image has no list and no prefetch landmark; use lists.
    pub enabled: bool,
    /// A recording ends when no new file was opened for this long...
    #[serde(with = "humantime_serde_compat")]
    pub quiet: Duration,
    /// ...or this long after its first open...
    #[serde(with = "humantime_serde_compat")]
    pub window: Duration,
    /// ...or at this many files.
    pub max_files: usize,
    /// Without a list of its own, look for one another node shared in the image's registry
    /// (`lazypull learned IMAGE --push`).
    pub remote: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FillConfig {
    pub enabled: bool,
    /// Longest single fill request, in MiB: the filler asks for the link again after each.
    pub request_mib: u64,
    /// How long the link must carry no foreground request (on-demand read, prefetch, TOC)
    /// before the filler starts or resumes; a foreground request stops a running fill request.
    #[serde(with = "humantime_serde_compat")]
    pub yield_for: Duration,
}

impl FillConfig {
    pub fn policy(&self) -> crate::access::schedule::FillPolicy {
        crate::access::schedule::FillPolicy {
            request_bytes: self.request_mib << 20,
            yield_for: self.yield_for,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuseConfig {
    pub enabled: bool,
    /// The daemon's FUSE mount: one read-only directory per eStargz layer digest.
    pub mountpoint: PathBuf,
    /// FUSE session threads.
    pub threads: usize,
    /// A read that needs the network fails with EIO after this long.
    #[serde(with = "humantime_serde_compat")]
    pub read_timeout: Duration,
    /// Memory for decoded chunks, in MiB.
    pub chunk_cache_mib: usize,
    /// Unpack complete eStargz layers into the file cache and pass their open files through
    /// to the kernel (native read speed) where it supports FUSE passthrough.
    pub passthrough: bool,
    /// Keep the FUSE connection across daemon restarts (a `fuse-holder` process keeps its
    /// descriptor), so running containers keep reading their lazy layers.
    pub handover: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            enabled: true,
            mountpoint: PathBuf::from("/run/lazypull/fs"),
            threads: 4,
            read_timeout: Duration::from_secs(60),
            chunk_cache_mib: 64,
            passthrough: true,
            handover: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Period of the background garbage collection; 0 turns it off.
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub name: String,
    #[serde(default)]
    pub scheme: Option<Scheme>,
    #[serde(default)]
    pub mirrors: Vec<String>,
    #[serde(default)]
    pub auth: Option<AuthEntry>,
    #[serde(default)]
    pub tls: crate::registry::tls::ClientTls,
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthEntry {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// base64 of user:password, as in docker's config.json
    #[serde(default)]
    pub auth: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/lazypull"),
            log: LogConfig::default(),
            cri: CriConfig::default(),
            fetch: FetchConfig::default(),
            gc: GcConfig::default(),
            fuse: FuseConfig::default(),
            metrics: MetricsConfig::default(),
            health: HealthConfig::default(),
            mirror: MirrorConfig::default(),
            reg: RegConfig::default(),
            peers: PeersConfig::default(),
            snapshotter: SnapshotterConfig::default(),
            containerd: ContainerdConfig::default(),
            docker_config: None,
            preload_images: None,
            registries: vec![],
            catalog: vec![],
            images_to_ignore: vec![],
            catalog_timeout: Duration::from_secs(10),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            file: None,
            format: LogFormat::Text,
        }
    }
}
impl Default for CriConfig {
    fn default() -> Self {
        CriConfig {
            socket: PathBuf::from("/var/run/cri-image.sock"),
            pull_mode: PullMode::Lazy,
            pull_timeout: Duration::from_secs(60),
            persist_credentials: true,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_parallel: 4,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retries: 3,
            read_ahead_kib: 1024,
            read_ahead_neighbours_kib: 256,
            read_ahead_dir_kib: 4096,
            read_ahead_region_kib: 16384,
            read_ahead_elf: true,
            index_span_kib: 1024,
            index: IndexMode::Auto,
            fill: FillConfig::default(),
            learn: LearnConfig::default(),
        }
    }
}
impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig {
            enabled: true,
            quiet: Duration::from_secs(2),
            window: Duration::from_secs(30),
            max_files: 10_000,
            remote: true,
        }
    }
}
impl Default for FillConfig {
    fn default() -> Self {
        FillConfig {
            enabled: true,
            request_mib: 32,
            yield_for: Duration::from_millis(500),
        }
    }
}
impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval: Duration::from_secs(3600),
        }
    }
}

/// Durations in the YAML file are humantime strings: `30s`, `1h`, `500ms`.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.root.as_os_str().is_empty() || !self.root.is_absolute() {
            return bad(format!("root {:?} must be an absolute path", self.root));
        }
        if !self.cri.socket.is_absolute() {
            return bad(format!(
                "cri.socket {:?} must be an absolute path",
                self.cri.socket
            ));
        }
        if !valid_log_filter(&self.log.level) {
            return bad(format!(
                "log.level {:?} is not a level (error, warn, info, debug, trace) or filter",
                self.log.level
            ));
        }
        if self.fetch.max_parallel == 0 || self.fetch.max_parallel > 256 {
            return bad(format!(
                "fetch.max_parallel {} must be within 1..=256",
                self.fetch.max_parallel
            ));
        }
        if !self.health.listen.is_empty()
            && self.health.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "health.listen {:?} must be HOST:PORT with an IP address, e.g. 0.0.0.0:8080",
                self.health.listen
            ));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "metrics.listen {:?} must be HOST:PORT with an IP address, e.g. 127.0.0.1:9101",
                self.metrics.listen
            ));
        }
        if !self.mirror.listen.is_empty()
            && self.mirror.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "mirror.listen {:?} must be HOST:PORT with an IP address, e.g. 0.0.0.0:5000",
                self.mirror.listen
            ));
        }
        if !self.mirror.admin_listen.is_empty() {
            let Ok(addr) = self.mirror.admin_listen.parse::<std::net::SocketAddr>() else {
                return bad(format!(
                    "mirror.admin_listen {:?} must be HOST:PORT with an IP address, e.g. 127.0.0.1:5001",
                    self.mirror.admin_listen
                ));
            };
            let verified = self
                .mirror
                .tls
                .as_ref()
                .is_some_and(|t| t.client_auth == crate::http::tls::ClientAuth::Verify);
            if !addr.ip().is_loopback() && self.mirror.admin_token_file.is_none() && !verified {
                return bad(format!(
                    "mirror.admin_listen {addr} is not a loopback address: set mirror.admin_token_file, or mirror.tls with client_auth: verify, so that only administrators can prune and stop"
                ));
            }
        }
        if self.mirror.prune.enabled
            && (self.mirror.prune.frequency < Duration::from_secs(60)
                || self.mirror.prune.duration.is_zero())
        {
            return bad(format!(
                "mirror.prune: frequency {:?} must be at least 1m and duration {:?} above zero",
                self.mirror.prune.frequency, self.mirror.prune.duration
            ));
        }
        for c in &self.catalog {
            if !(c.url.starts_with("http://") || c.url.starts_with("https://"))
                || c.host().is_empty()
            {
                return bad(format!(
                    "catalog: url {:?} must be http(s)://HOST[:PORT]",
                    c.url
                ));
            }
            if !(1..=1000).contains(&c.page_size) {
                return bad(format!(
                    "catalog: {}: page_size {} must be within 1..=1000",
                    c.url, c.page_size
                ));
            }
        }
        if self.catalog_timeout.is_zero() {
            return bad("catalog_timeout must be above zero".into());
        }
        for u in &self.peers.urls {
            if let Err(e) = crate::registry::parse_endpoint(u) {
                return bad(format!("peers.urls: {e}"));
            }
        }
        if !self.peers.dns.is_empty()
            && self
                .peers
                .dns
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return bad(format!(
                "peers.dns {:?} must be NAME:PORT (the peers' mirror port)",
                self.peers.dns
            ));
        }
        if self.peers.refresh < Duration::from_secs(1) {
            return bad(format!(
                "peers.refresh {:?} must be at least 1s",
                self.peers.refresh
            ));
        }
        if self.reg.prefix.trim_matches('/').is_empty()
            || !self
                .reg
                .prefix
                .trim_matches('/')
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            || self.reg.prefix.trim_matches('/') == "v2"
        {
            return bad(format!(
                "reg.prefix {:?} must be one path segment (letters, digits, '-', '_', '.'), not v2",
                self.reg.prefix
            ));
        }
        if self.mirror.read_header_timeout.is_zero() {
            return bad("mirror.read_header_timeout must be above zero".into());
        }
        if self.mirror.default_upstream.contains('/') {
            return bad(format!(
                "mirror.default_upstream {:?} must be a registry host (e.g. docker.io), without a scheme or path",
                self.mirror.default_upstream
            ));
        }
        if self.fetch.read_ahead_neighbours_kib > 64 << 10 {
            return bad(format!(
                "fetch.read_ahead_neighbours_kib {} must be at most 65536 (64 MiB)",
                self.fetch.read_ahead_neighbours_kib
            ));
        }
        if self.fetch.read_ahead_region_kib > 1 << 20 {
            return bad(format!(
                "fetch.read_ahead_region_kib {} must be at most 1048576 (1 GiB)",
                self.fetch.read_ahead_region_kib
            ));
        }
        if self.fetch.read_ahead_dir_kib > 64 << 10 {
            return bad(format!(
                "fetch.read_ahead_dir_kib {} must be at most 65536 (64 MiB)",
                self.fetch.read_ahead_dir_kib
            ));
        }
        if !(1..=1024).contains(&self.fetch.fill.request_mib) {
            return Err(ConfigError::Invalid(format!(
                "fetch.fill.request_mib {} must be between 1 and 1024",
                self.fetch.fill.request_mib
            )));
        }
        if !(1..=crate::learned::MAX_FILES).contains(&self.fetch.learn.max_files) {
            return Err(ConfigError::Invalid(format!(
                "fetch.learn.max_files {} must be between 1 and {}",
                self.fetch.learn.max_files,
                crate::learned::MAX_FILES
            )));
        }
        if self.fetch.learn.quiet.is_zero() || self.fetch.learn.window < self.fetch.learn.quiet {
            return Err(ConfigError::Invalid(format!(
                "fetch.learn.quiet {:?} must be above zero and at most fetch.learn.window {:?}",
                self.fetch.learn.quiet, self.fetch.learn.window
            )));
        }
        if self.fetch.fill.yield_for > Duration::from_secs(600) {
            return Err(ConfigError::Invalid(format!(
                "fetch.fill.yield_for {:?} must be at most 10m",
                self.fetch.fill.yield_for
            )));
        }
        if self.fetch.read_ahead_kib > 64 << 10 {
            return bad(format!(
                "fetch.read_ahead_kib {} must be at most 65536 (64 MiB)",
                self.fetch.read_ahead_kib
            ));
        }
        if self.cri.pull_mode == PullMode::Full && !self.fetch.fill.enabled {
            return bad(
                "cri.pull_mode full needs fetch.fill.enabled (--no-fill turns filling off)".into(),
            );
        }
        if self.snapshotter.enabled && !self.snapshotter.socket.is_absolute() {
            return bad(format!(
                "snapshotter.socket {:?} must be an absolute path",
                self.snapshotter.socket
            ));
        }
        if self.snapshotter.enabled && self.snapshotter.socket == self.cri.socket {
            return bad("snapshotter.socket and cri.socket must differ".into());
        }
        if let Some(a) = &self.containerd.address {
            if !a.is_absolute() {
                return bad(format!("containerd.address {a:?} must be an absolute path"));
            }
            if !self.snapshotter.enabled || !self.fuse.enabled {
                return bad("containerd.address (registering images in containerd) needs the snapshotter and the FUSE mount: containerd's snapshots of those images are lazypull's".into());
            }
            let name_ok = |s: &str| {
                !s.is_empty()
                    && s.len() <= 76
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            };
            if !name_ok(&self.containerd.namespace) || !name_ok(&self.containerd.snapshotter) {
                return bad(format!(
                    "containerd.namespace {:?} and containerd.snapshotter {:?} must be non-empty names of letters, digits, '.', '_' or '-'",
                    self.containerd.namespace, self.containerd.snapshotter
                ));
            }
            if self.containerd.layer_timeout.is_zero() {
                return bad("containerd.layer_timeout must be above 0".into());
            }
        }
        if !self.fuse.mountpoint.is_absolute() {
            return bad(format!(
                "fuse.mountpoint {:?} must be an absolute path",
                self.fuse.mountpoint
            ));
        }
        if self.fuse.threads == 0 || self.fuse.threads > 64 {
            return bad(format!(
                "fuse.threads {} must be within 1..=64",
                self.fuse.threads
            ));
        }
        if self.cri.pull_timeout.is_zero() {
            return bad("cri.pull_timeout must be above 0".into());
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.registries {
            if r.name.is_empty() || r.name.contains('/') || r.name.contains("://") {
                return bad(format!(
                    "registries: name {:?} must be a host[:port] like docker.io or 127.0.0.1:5000",
                    r.name
                ));
            }
            if !seen.insert(r.name.clone()) {
                return bad(format!("registries: {} is listed twice", r.name));
            }
            for m in &r.mirrors {
                registry::parse_endpoint(m)
                    .map_err(|e| ConfigError::Invalid(format!("registries: {}: {e}", r.name)))?;
            }
            if let Some(a) = &r.auth {
                self.secret_of(&r.name, a)?;
            }
            r.tls
                .check()
                .map_err(|e| ConfigError::Invalid(format!("registries: {}: {e}", r.name)))?;
        }
        Ok(())
    }

    fn secret_of(&self, name: &str, a: &AuthEntry) -> Result<Secret, ConfigError> {
        let err = |m: &str| ConfigError::Invalid(format!("registries: {name}: auth: {m}"));
        match (&a.user, &a.password, &a.auth, &a.token) {
            (Some(u), Some(p), None, None) if !u.is_empty() => Ok(Secret::Basic {
                username: u.clone(),
                password: p.clone(),
            }),
            (None, None, Some(b), None) => Secret::from_auth(b).map_err(|e| err(&e.to_string())),
            (None, None, None, Some(t)) if !t.is_empty() => Ok(Secret::Bearer { token: t.clone() }),
            _ => Err(err(
                "give either user+password, auth (base64 user:password) or token",
            )),
        }
    }

    /// Registry client options from this config (call after `validate`).
    pub fn registry_options(&self, default_secret: Option<Secret>) -> registry::Options {
        let hosts = self
            .registries
            .iter()
            .map(|r| HostConfig {
                name: r.name.clone(),
                scheme: r.scheme,
                mirrors: r.mirrors.clone(),
                auth: r
                    .auth
                    .as_ref()
                    .and_then(|a| self.secret_of(&r.name, a).ok()),
                tls: r.tls.clone(),
            })
            .collect();
        registry::Options {
            hosts,
            default_secret,
            docker_config: self
                .docker_config
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            connect_timeout: self.fetch.connect_timeout,
            read_timeout: self.fetch.read_timeout,
            retries: self.fetch.retries,
            ..Default::default()
        }
    }

    /// Add or update the entry for `name` (flags like `--insecure-registry` and `--mirror`).
    pub fn registry_entry(&mut self, name: &str) -> &mut RegistryEntry {
        if let Some(i) = self.registries.iter().position(|r| r.name == name) {
            return &mut self.registries[i];
        }
        self.registries.push(RegistryEntry {
            name: name.to_string(),
            ..Default::default()
        });
        let last = self.registries.len() - 1;
        &mut self.registries[last]
    }
}

/// A level (`info`) or comma-separated `target=level` directives (`info,lazypull=debug`).
fn valid_log_filter(s: &str) -> bool {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let level_ok = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    !s.trim().is_empty()
        && s.split(',').all(|d| match d.trim().split_once('=') {
            Some((target, level)) => {
                !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_alphanumeric() || "_:-".contains(c))
                    && level_ok(level)
            }
            None => level_ok(d.trim()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let yaml = r#"
root: /tmp/lp
log: {level: debug, format: json}
cri: {socket: /tmp/lp.sock, pull_mode: full, pull_timeout: 5s}
fetch: {max_parallel: 2}
registries:
  - name: docker.io
    mirrors: [http://127.0.0.1:5000]
  - name: 127.0.0.1:5001
    scheme: http
    auth: {user: u, password: p}
"#;
        let c: Config = serde_yaml_ng::from_str(yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.cri.pull_mode, PullMode::Full);
        assert_eq!(c.cri.pull_timeout, Duration::from_secs(5));
        let opts = c.registry_options(None);
        assert_eq!(opts.hosts[1].auth, Some(Secret::from_creds("u:p").unwrap()));

        let unknown: Result<Config, _> = serde_yaml_ng::from_str("roots: /x");
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
        let mut bad = Config::default();
        bad.registries.push(RegistryEntry {
            name: "http://x".into(),
            ..Default::default()
        });
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("host[:port]")
        );
        let mut bad = Config::default();
        bad.fetch.max_parallel = 0;
        assert!(bad.validate().is_err());
        let mut bad = Config::default();
        bad.log.level = "loud!!".into();
        assert!(bad.validate().is_err());
        assert!(valid_log_filter("info,lazypull=debug"));
        assert!(!valid_log_filter("lazypull"));
    }

    #[test]
    fn containerd_registration_settings() {
        let c: Config = serde_yaml_ng::from_str(
            "containerd: {address: /run/containerd/containerd.sock, layer_timeout: 2m}",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.containerd.namespace, "k8s.io");
        assert_eq!(c.containerd.snapshotter, "lazypull");
        assert_eq!(c.containerd.layer_timeout, Duration::from_secs(120));
        assert!(
            Config::default().containerd.address.is_none(),
            "off by default"
        );
        let err = |f: &dyn Fn(&mut Config)| {
            let mut c = c.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|c| c.containerd.address = Some("rel.sock".into())).contains("absolute"));
        assert!(err(&|c| c.fuse.enabled = false).contains("FUSE"));
        assert!(err(&|c| c.snapshotter.enabled = false).contains("snapshotter"));
        assert!(err(&|c| c.containerd.namespace = "k8s io".into()).contains("namespace"));
        assert!(err(&|c| c.containerd.layer_timeout = Duration::ZERO).contains("layer_timeout"));
    }
}
