//! Making images pulled through lazypull's CRI endpoint known to containerd, so that
//! containerd's CRI runtime (kubelet `--image-service-endpoint` pointing at lazypull) can create
//! containers from them. The recipe, with references into containerd 1.6's sources, is in
//! `docs/dev/containerd-images.md`; in short, in containerd's namespace (`k8s.io`), under a
//! lease:
//!
//! 1. the config, manifest and index go into containerd's content store, labelled with the
//!    garbage-collection edges containerd's own pull sets (index → manifest → config → top
//!    snapshot);
//! 2. the snapshot chain is built bottom-up through containerd's Snapshots API with the CRI layer
//!    labels, so each Prepare reaches lazypull's snapshotter, which answers with a remote snapshot
//!    (`AlreadyExists`): no layer is downloaded by containerd;
//! 3. image records (id, tag, repo@digest) labelled `io.cri-containerd.image=managed` are created;
//!    CRI's image store picks them up from containerd's events, and we wait until it has.
//!
//! Removal deletes the records (the last one with a synchronous GC), and containerd's GC
//! removes content and snapshots, calling our snapshotter's `Remove`.

use crate::oci::Digest;
use crate::rpc::containerd::services::content::v1 as content;
use crate::rpc::containerd::services::images::v1 as images;
use crate::rpc::containerd::services::leases::v1 as leases;
use crate::rpc::containerd::services::snapshots::v1 as snapshots;
use crate::rpc::containerd::types::Descriptor;
use crate::rpc::cri;
use crate::store::{ImageRecord, LayerRecord, LayerState, Layout, StoreError};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// The label CRI puts on the image records it manages.
pub const LABEL_CRI_MANAGED: &str = "io.cri-containerd.image";
const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const LABEL_CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const LABEL_CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
const LABEL_CRI_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// containerd's bound on one label (key + value), `metadata/validate.go`.
const MAX_LABEL: usize = 4096;
/// How long a call that reaches our snapshotter through containerd retries Unavailable.
const REDIAL_WAIT: Duration = Duration::from_secs(15);
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("containerd at {address} ({op}): {status}")]
    Rpc {
        address: String,
        op: &'static str,
        status: tonic::Status,
    },
    #[error(
        "layer {layer} cannot be served lazily, so containerd could not use it without downloading it: {reason}"
    )]
    Layer { layer: String, reason: String },
    #[error("layer {layer} was not ready for containerd within {timeout:?}")]
    LayerTimeout { layer: String, timeout: Duration },
    #[error(
        "containerd's snapshotter {snapshotter:?} did not take layer {layer} as a remote snapshot; is its proxy plugin this daemon's snapshotter socket?"
    )]
    NotRemote { snapshotter: String, layer: String },
    #[error(
        "containerd's CRI plugin did not list image {id} under {missing:?} within {timeout:?} (it lists it as {listed:?}); the records are written, so a retried pull only waits again"
    )]
    CriTimeout {
        id: String,
        missing: Vec<String>,
        listed: Vec<String>,
        timeout: Duration,
    },
    #[error("image {0} is malformed in the store: {1}")]
    Malformed(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T> = std::result::Result<T, ContainerdError>;

#[derive(Clone, Debug)]
pub struct ContainerdOptions {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// The namespace CRI uses (`k8s.io`).
    pub namespace: String,
    /// The name of lazypull's proxy snapshotter in containerd's config.
    pub snapshotter: String,
    /// How long a pull waits for its layers to become mountable (eStargz TOCs; layers without
    /// one are fetched and unpacked whole first).
    pub layer_timeout: Duration,
    /// How long to wait for containerd's CRI plugin to list the image.
    pub cri_timeout: Duration,
}

/// What is registered for one image: derived from the catalogue and the stored blobs.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// `sha256:<config>`: the image id, also a record name.
    pub id: String,
    /// Record names: the id, then every name lazypull reports for the image (its CRI
    /// RepoTags, then RepoDigests), the pull's own tag and `repo@<target digest>` first.
    pub names: Vec<String>,
    /// The reference CRI labels carry (`cri.image-ref`).
    pub reference: String,
    /// What the records point at: the index if the image was pulled through one, else the manifest.
    pub target: Descriptor,
    /// Blobs to write, bottom-up (config, manifest, index), with their labels.
    pub blobs: Vec<Blob>,
    pub manifest_digest: String,
    /// Layer digest and chain id, bottom-up.
    pub layers: Vec<(String, String)>,
}

impl Plan {
    /// The names CRI shows as RepoTags (`repo:tag`) and RepoDigests (`repo@digest`).
    fn cri_names(&self) -> (Vec<&str>, Vec<&str>) {
        self.names
            .iter()
            .filter(|n| **n != self.id)
            .map(String::as_str)
            .partition(|n| !n.contains('@'))
    }
}

/// The names of `plan` that containerd's CRI does not list yet, given its `repo_tags` and
/// `repo_digests` for the image.
fn missing_names(plan: &Plan, repo_tags: &[String], repo_digests: &[String]) -> Vec<String> {
    let (tags, digests) = plan.cri_names();
    let absent = |names: Vec<&str>, listed: &[String]| {
        names
            .into_iter()
            .filter(|n| !listed.iter().any(|l| l == n))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut missing = absent(tags, repo_tags);
    missing.extend(absent(digests, repo_digests));
    missing
}

#[derive(Debug, PartialEq)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
    pub labels: HashMap<String, String>,
}

/// `ChainID` of OCI image-spec (config.md "Layer ChainID"): the first diff id, then
/// `sha256(parent + " " + diff_id)`.
pub fn chain_ids<'a>(diff_ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for d in diff_ids {
        let next = match out.last() {
            None => d.to_string(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// CRI's `cri.image-layers` label: this layer and those above it, cut to fit one label.
fn image_layers_label(layers: &[String]) -> String {
    let mut out = String::new();
    for l in layers {
        let extra = l.len() + usize::from(!out.is_empty());
        if LABEL_CRI_LAYERS.len() + out.len() + extra > MAX_LABEL {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(l);
    }
    out
}

/// Build the plan for `img`, pulled as `tag` (a normalised `repo:tag`, if pulled by tag).
pub fn plan(
    img: &ImageRecord,
    layout: &Layout,
    tag: Option<&str>,
    snapshotter: &str,
) -> Result<Plan> {
    let bad = |why: String| ContainerdError::Malformed(img.id.clone(), why);
    let read = |d: &str| -> Result<Vec<u8>> {
        let d = Digest::parse(d).map_err(|e| bad(e.to_string()))?;
        Ok(layout.read_blob(&d)?)
    };
    let config = read(&img.id)?;
    let manifest = read(&img.manifest_digest)?;
    let layer_digests: Vec<String> = img.layers.iter().map(|l| l.digest.clone()).collect();
    let chains = chain_ids(img.layers.iter().map(|l| l.diff_id.as_str()));
    let top = chains.last().cloned();

    let mut config_labels = HashMap::new();
    if let Some(top) = &top {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
            top.clone(),
        );
    }
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        img.id.clone(),
    )]);
    for (i, l) in layer_digests.iter().enumerate() {
        manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.clone());
    }
    let target_manifest = Descriptor {
        media_type: img.media_type.clone(),
        digest: img.manifest_digest.clone(),
        size: manifest.len() as i64,
        annotations: HashMap::new(),
    };
    let mut blobs = vec![
        Blob {
            digest: img.id.clone(),
            bytes: config,
            labels: config_labels,
        },
        Blob {
            digest: img.manifest_digest.clone(),
            bytes: manifest,
            labels: manifest_labels,
        },
    ];
    let target = match &img.index_digest {
        None => target_manifest,
        Some(index_digest) => {
            let bytes = read(index_digest)?;
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Index {
                media_type: Option<String>,
                #[serde(default)]
                manifests: Vec<Entry>,
            }
            #[derive(serde::Deserialize)]
            struct Entry {
                digest: String,
            }
            let index: Index =
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("index: {e}")))?;
            let labels = index
                .manifests
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    (
                        format!("containerd.io/gc.ref.content.m.{i}"),
                        m.digest.clone(),
                    )
                })
                .collect();
            let t = Descriptor {
                media_type: index.media_type.unwrap_or_else(|| OCI_INDEX.to_string()),
                digest: index_digest.clone(),
                size: bytes.len() as i64,
                annotations: HashMap::new(),
            };
            blobs.push(Blob {
                digest: index_digest.clone(),
                bytes,
                labels,
            });
            t
        }
    };
    let repo_digest = format!("{}@{}", img.source, target.digest);
    let mut names = vec![img.id.clone()];
    for n in tag
        .map(str::to_string)
        .into_iter()
        .chain(img.tags.iter().cloned())
        .chain([repo_digest.clone()])
        .chain(img.digests.iter().cloned())
    {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    Ok(Plan {
        id: img.id.clone(),
        names,
        reference: tag.map(str::to_string).unwrap_or(repo_digest),
        target,
        blobs,
        manifest_digest: img.manifest_digest.clone(),
        layers: layer_digests.into_iter().zip(chains).collect(),
    })
}

/// Whether lazypull's snapshotter can serve `l` without downloading it in containerd's place:
/// `Ok(true)` mountable now, `Ok(false)` not yet, `Err` never.
fn layer_state(l: &LayerRecord, fill_enabled: bool) -> std::result::Result<bool, String> {
    if l.mountable() {
        return Ok(true);
    }
    if l.state == LayerState::Failed {
        return Err(l.error.clone().unwrap_or_else(|| "its fill failed".into()));
    }
    if !fill_enabled && !l.toc_usable() {
        return Err(
            "it has no usable TOC and filling is turned off (--no-fill), so it is never fetched whole"
                .into(),
        );
    }
    Ok(false)
}

pub struct Containerd {
    channel: Channel,
    opts: ContainerdOptions,
    seq: AtomicU64,
}

impl Containerd {
    /// A client that dials containerd on first use (and again after containerd restarts).
    pub fn new(opts: ContainerdOptions) -> Containerd {
        let path = opts.address.clone();
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        Containerd {
            channel,
            opts,
            seq: AtomicU64::new(0),
        }
    }

    pub fn options(&self) -> &ContainerdOptions {
        &self.opts
    }

    fn err(&self, op: &'static str) -> impl FnOnce(tonic::Status) -> ContainerdError + '_ {
        move |status| ContainerdError::Rpc {
            address: self.opts.address.display().to_string(),
            op,
            status,
        }
    }

    /// A request in our namespace (and lease, while building).
    fn req<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(Duration::from_secs(60));
        // Namespaces and lease ids are ASCII we chose or validated, so these parses cannot
        // fail; a failure would only drop the header, which containerd then reports.
        if let Ok(v) = self.opts.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(l) = lease
            && let Ok(v) = l.parse()
        {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    fn unique(&self, what: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("lazypull-{what}-{}-{nanos}-{n}", std::process::id())
    }

    /// Wait until every layer of `img` can be served by our snapshotter (eStargz: TOC
    /// verified; others: fetched and unpacked). Reads the catalogue through `layer`.
    pub async fn wait_layers(
        &self,
        img: &ImageRecord,
        fill_enabled: bool,
        layer: impl Fn(&str) -> std::result::Result<Option<LayerRecord>, StoreError>,
    ) -> Result<()> {
        let deadline = Instant::now() + self.opts.layer_timeout;
        for l in &img.layers {
            loop {
                let rec = layer(&l.digest)?.ok_or_else(|| ContainerdError::Layer {
                    layer: l.digest.clone(),
                    reason: "it was removed while the image was being registered".into(),
                })?;
                match layer_state(&rec, fill_enabled) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(reason) => {
                        return Err(ContainerdError::Layer {
                            layer: l.digest.clone(),
                            reason,
                        });
                    }
                }
                if Instant::now() >= deadline {
                    return Err(ContainerdError::LayerTimeout {
                        layer: l.digest.clone(),
                        timeout: self.opts.layer_timeout,
                    });
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// Register `plan` in containerd. Idempotent: an image already there is brought up to date.
    pub async fn register(&self, plan: &Plan) -> Result<()> {
        let started = Instant::now();
        let mut leases = leases::leases_client::LeasesClient::new(self.channel.clone());
        let expire = (chrono::Utc::now() + chrono::Duration::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let lease = leases
            .create(self.req(
                leases::CreateRequest {
                    id: self.unique("lease"),
                    labels: HashMap::from([(LABEL_GC_EXPIRE.to_string(), expire)]),
                },
                None,
            ))
            .await
            .map_err(self.err("Leases.Create"))?
            .into_inner()
            .lease
            .map(|l| l.id)
            .unwrap_or_default();
        let result = self.register_leased(plan, &lease).await;
        // Without the lease, the GC edges written above keep everything alive; on failure,
        // deleting it lets containerd's GC take back what was half made.
        if let Err(e) = leases
            .delete(self.req(
                leases::DeleteRequest {
                    id: lease.clone(),
                    sync: false,
                },
                None,
            ))
            .await
        {
            tracing::warn!(lease, error = %e, "cannot delete containerd lease; it expires within an hour");
        }
        result?;
        self.wait_cri(plan).await?;
        tracing::info!(image = %plan.id, names = ?plan.names, namespace = %self.opts.namespace,
            elapsed_ms = started.elapsed().as_millis() as u64, "image registered in containerd");
        Ok(())
    }

    async fn register_leased(&self, plan: &Plan, lease: &str) -> Result<()> {
        for b in &plan.blobs {
            self.write_blob(b, lease).await?;
        }
        let all: Vec<String> = plan.layers.iter().map(|(l, _)| l.clone()).collect();
        let mut parent = String::new();
        for (i, (layer, chain)) in plan.layers.iter().enumerate() {
            self.snapshot(plan, lease, layer, chain, &parent, &all[i..])
                .await?;
            parent = chain.clone();
        }
        let mut imgs = images::images_client::ImagesClient::new(self.channel.clone());
        for name in &plan.names {
            let image = images::Image {
                name: name.clone(),
                labels: HashMap::from([(LABEL_CRI_MANAGED.to_string(), "managed".to_string())]),
                target: Some(plan.target.clone()),
                created_at: None,
                updated_at: None,
            };
            let created = imgs
                .create(self.req(
                    images::CreateImageRequest {
                        image: Some(image.clone()),
                    },
                    Some(lease),
                ))
                .await;
            match created {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => {
                    imgs.update(self.req(
                        images::UpdateImageRequest {
                            image: Some(image),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["target".into(), format!("labels.{LABEL_CRI_MANAGED}")],
                            }),
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(self.err("Images.Update"))?;
                }
                Err(s) => return Err(self.err("Images.Create")(s)),
            }
        }
        Ok(())
    }

    /// One blob, in one message (configs and manifests are bounded well below containerd's
    /// 16 MiB message limit); if containerd has it already, only its labels are merged.
    async fn write_blob(&self, b: &Blob, lease: &str) -> Result<()> {
        let mut client = content::content_client::ContentClient::new(self.channel.clone());
        let msg = content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            r#ref: self.unique("write"),
            total: b.bytes.len() as i64,
            expected: b.digest.clone(),
            offset: 0,
            data: b.bytes.clone(),
            labels: b.labels.clone(),
        };
        let outcome = match client
            .write(self.req(tokio_stream::iter([msg]), Some(lease)))
            .await
        {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                // One answer for the commit (and the same once more, deferred): drain them.
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(()),
                        Err(s) => break Err(s),
                    }
                }
            }
            Err(s) => Err(s),
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                if b.labels.is_empty() {
                    return Ok(());
                }
                let paths = b.labels.keys().map(|k| format!("labels.{k}")).collect();
                client
                    .update(self.req(
                        content::UpdateRequest {
                            info: Some(content::Info {
                                digest: b.digest.clone(),
                                labels: b.labels.clone(),
                                ..Default::default()
                            }),
                            update_mask: Some(prost_types::FieldMask { paths }),
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(self.err("Content.Update"))?;
                Ok(())
            }
            Err(s) => Err(self.err("Content.Write")(s)),
        }
    }

    /// Make `chain` exist in containerd's namespace as a snapshot of our snapshotter: taken
    /// from it (already there) or prepared with the CRI labels, which our snapshotter answers
    /// with a remote snapshot.
    async fn snapshot(
        &self,
        plan: &Plan,
        lease: &str,
        layer: &str,
        chain: &str,
        parent: &str,
        above: &[String],
    ) -> Result<()> {
        let sn = &self.opts.snapshotter;
        match self.stat_snapshot(chain, lease).await {
            Ok(_) => {
                // Existing snapshots are not leased by Prepare: lease it for the build.
                let mut leases = leases::leases_client::LeasesClient::new(self.channel.clone());
                leases
                    .add_resource(self.req(
                        leases::AddResourceRequest {
                            id: lease.to_string(),
                            resource: Some(leases::Resource {
                                id: chain.to_string(),
                                r#type: format!("snapshots/{sn}"),
                            }),
                        },
                        None,
                    ))
                    .await
                    .map_err(self.err("Leases.AddResource"))?;
                return Ok(());
            }
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(self.err("Snapshots.Stat")(s)),
        }
        let mut snaps = snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let key = format!("{} {chain}", self.unique("extract"));
        let labels = HashMap::from([
            (LABEL_SNAPSHOT_REF.to_string(), chain.to_string()),
            (LABEL_CRI_IMAGE_REF.to_string(), plan.reference.clone()),
            (LABEL_CRI_MANIFEST.to_string(), plan.manifest_digest.clone()),
            (LABEL_CRI_LAYER.to_string(), layer.to_string()),
            (LABEL_CRI_LAYERS.to_string(), image_layers_label(above)),
        ]);
        // containerd answers Stat of an unknown key from its own metadata, so the Prepare is
        // often the first call that must reach our socket: it rides out the redial backoff too.
        // A Prepare that did not reach us changed nothing, so sending it again is safe.
        let prepared = redial(|| {
            let mut snaps = snaps.clone();
            let req = self.req(
                snapshots::PrepareSnapshotRequest {
                    snapshotter: sn.clone(),
                    key: key.clone(),
                    parent: parent.to_string(),
                    labels: labels.clone(),
                },
                Some(lease),
            );
            async move { snaps.prepare(req).await }
        })
        .await;
        match prepared {
            Err(s) if s.code() == Code::AlreadyExists => {
                // As containerd's unpacker: the target may take a moment to be visible.
                for attempt in 0..3 {
                    match self.stat_snapshot(chain, lease).await {
                        Ok(_) => return Ok(()),
                        Err(s) if s.code() == Code::NotFound && attempt < 2 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(s) => return Err(self.err("Snapshots.Stat")(s)),
                    }
                }
                Ok(())
            }
            Ok(_) => {
                // An ordinary active snapshot: the layer would have to be applied from a blob
                // containerd does not have. Undo it.
                let _ = snaps
                    .remove(self.req(
                        snapshots::RemoveSnapshotRequest {
                            snapshotter: sn.clone(),
                            key,
                        },
                        Some(lease),
                    ))
                    .await;
                Err(ContainerdError::NotRemote {
                    snapshotter: sn.clone(),
                    layer: layer.to_string(),
                })
            }
            Err(s) => Err(self.err("Snapshots.Prepare")(s)),
        }
    }

    /// Stat through containerd, riding out the redial backoff (see [`redial`]).
    async fn stat_snapshot(
        &self,
        key: &str,
        lease: &str,
    ) -> std::result::Result<(), tonic::Status> {
        let snaps = snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        redial(|| {
            let mut snaps = snaps.clone();
            let req = self.req(
                snapshots::StatSnapshotRequest {
                    snapshotter: self.opts.snapshotter.clone(),
                    key: key.to_string(),
                },
                Some(lease),
            );
            async move { snaps.stat(req).await.map(|_| ()) }
        })
        .await
    }

    /// containerd's CRI plugin learns of new images from events, one event per record name,
    /// asynchronously: wait until it lists the image under every name of `plan`, so that a
    /// kubelet's ImageStatus or CreateContainer right after our PullImage sees what we report.
    /// Without a CRI plugin this only logs; past the timeout it is an error (the pull can be
    /// retried: registering is idempotent).
    async fn wait_cri(&self, plan: &Plan) -> Result<()> {
        let id = plan.id.as_str();
        let deadline = Instant::now() + self.opts.cri_timeout;
        let mut listed = vec![];
        loop {
            let missing = match self.cri_image(id).await {
                Ok(Some(img)) => {
                    listed = [img.repo_tags.as_slice(), &img.repo_digests].concat();
                    missing_names(plan, &img.repo_tags, &img.repo_digests)
                }
                Ok(None) => missing_names(plan, &[], &[]),
                Err(s) if s.code() == Code::Unimplemented => {
                    tracing::info!(image = id, error = %s, "containerd has no CRI plugin; not waiting for it");
                    return Ok(());
                }
                Err(s) => return Err(self.err("CRI ImageStatus")(s)),
            };
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ContainerdError::CriTimeout {
                    id: id.to_string(),
                    missing,
                    listed,
                    timeout: self.opts.cri_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Delete image records by name (absent ones are fine); the last delete waits for
    /// containerd's GC, which removes content and snapshots no longer used.
    pub async fn remove(&self, names: &[String]) -> Result<()> {
        let mut imgs = images::images_client::ImagesClient::new(self.channel.clone());
        for (i, name) in names.iter().enumerate() {
            let r = imgs
                .delete(self.req(
                    images::DeleteImageRequest {
                        name: name.clone(),
                        sync: i + 1 == names.len(),
                    },
                    None,
                ))
                .await;
            match r {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(self.err("Images.Delete")(s)),
            }
        }
        if !names.is_empty() {
            self.wait_cri_gone(names).await;
            tracing::info!(names = ?names, namespace = %self.opts.namespace, "image records removed from containerd");
        }
        Ok(())
    }

    /// Every image containerd's CRI plugin knows (in our namespace), as crictl lists them.
    pub async fn cri_images(&self) -> Result<Vec<cri::Image>> {
        let mut client = cri::image_service_client::ImageServiceClient::new(self.channel.clone());
        Ok(client
            .list_images(self.req(cri::ListImagesRequest { filter: None }, None))
            .await
            .map_err(self.err("ListImages"))?
            .into_inner()
            .images)
    }

    /// The image containerd's CRI plugin resolves `name` (an id, tag or digest) to, if any.
    async fn cri_image(
        &self,
        name: &str,
    ) -> std::result::Result<Option<cri::Image>, tonic::Status> {
        let mut client = cri::image_service_client::ImageServiceClient::new(self.channel.clone());
        let r = client
            .image_status(self.req(
                cri::ImageStatusRequest {
                    image: Some(cri::ImageSpec {
                        image: name.to_string(),
                        ..Default::default()
                    }),
                    verbose: false,
                },
                None,
            ))
            .await?;
        Ok(r.into_inner().image)
    }

    /// containerd's CRI plugin also forgets names from events: wait (at most `cri_timeout`)
    /// until its ImageStatus resolves none of `names`, so that a kubelet asking right after our
    /// RemoveImage sees what we report. Past the timeout this only logs: the records are gone.
    async fn wait_cri_gone(&self, names: &[String]) {
        let deadline = Instant::now() + self.opts.cri_timeout;
        let mut left: Vec<&String> = names.iter().collect();
        loop {
            let mut still = vec![];
            for name in left {
                match self.cri_image(name).await {
                    Ok(Some(_)) => still.push(name),
                    Ok(None) => {}
                    Err(s) => {
                        tracing::debug!(error = %s, "containerd's CRI plugin does not answer ImageStatus; not waiting for it");
                        return;
                    }
                }
            }
            if still.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(names = ?still, timeout = ?self.opts.cri_timeout,
                    "containerd's CRI plugin still lists removed image names");
                return;
            }
            left = still;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends a call that containerd forwards to our snapshotter socket, again and again while it
/// answers Unavailable, for up to [`REDIAL_WAIT`]: right after lazypull (re)starts,
/// containerd's connection to the socket is in gRPC's redial backoff (containerd caps it at a
/// few seconds for proxy plugins) and fails calls fast with "connection refused", which a pull
/// should ride out rather than fail.
async fn redial<T, F, Fut>(mut call: F) -> std::result::Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + REDIAL_WAIT;
    loop {
        match call().await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tracing::debug!(error = %s, "containerd cannot reach the snapshotter yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // Worked example: chain[1] = sha256("<chain0> <diff1>").
        let d0 = "sha256:aaaa";
        let d1 = "sha256:bbbb";
        let c = chain_ids([d0, d1]);
        assert_eq!(c[0], d0);
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
        assert_eq!(c[1], want);
        assert!(chain_ids([]).is_empty());
    }

    fn layer(digest: &str, diff_id: &str) -> LayerRecord {
        LayerRecord::for_test(digest, diff_id)
    }

    /// The plan mirrors what containerd's own CRI pull records: names, target (the index),
    /// GC edges index → manifest → config → top snapshot, CRI's chain of snapshots.
    #[test]
    fn plan_mirrors_a_cri_pull() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:d0","sha256:d1"]}}"#;
        let manifest = br#"{"schemaVersion":2}"#;
        let cd = Digest::of(config);
        let md = Digest::of(manifest);
        let other = format!("sha256:{}", "b".repeat(64));
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{other}"}},{{"digest":"{md}"}}]}}"#
        );
        let id = Digest::of(index.as_bytes());
        for (d, b) in [
            (&cd, &config[..]),
            (&md, &manifest[..]),
            (&id, index.as_bytes()),
        ] {
            layout.put_blob(d, b).unwrap();
        }
        let img = ImageRecord {
            id: cd.to_string(),
            manifest_digest: md.to_string(),
            index_digest: Some(id.to_string()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1,
            user: String::new(),
            source: "r.example/app".into(),
            pulled_at: 0,
            last_used_at: 0,
            tags: vec!["r.example/app:1".into()],
            digests: vec![format!("r.example/app@{id}")],
            layers: vec![
                layer("sha256:l0", "sha256:d0"),
                layer("sha256:l1", "sha256:d1"),
            ],
        };
        let p = plan(&img, &layout, Some("r.example/app:1"), "lazypull").unwrap();
        assert_eq!(
            p.names,
            [
                cd.to_string(),
                "r.example/app:1".into(),
                format!("r.example/app@{id}")
            ]
        );
        assert_eq!(p.reference, "r.example/app:1");
        assert_eq!(p.target.digest, id.as_str());
        assert_eq!(p.target.media_type, OCI_INDEX);
        assert_eq!(p.target.size, index.len() as i64);
        let chains = chain_ids(["sha256:d0", "sha256:d1"]);
        assert_eq!(
            p.layers,
            [
                ("sha256:l0".to_string(), chains[0].clone()),
                ("sha256:l1".to_string(), chains[1].clone())
            ]
        );
        let [c, m, i] = &p.blobs[..] else {
            panic!("{:?}", p.blobs)
        };
        assert_eq!(c.digest, cd.as_str());
        assert_eq!(
            c.labels["containerd.io/gc.ref.snapshot.lazypull"],
            chains[1]
        );
        assert_eq!(m.labels["containerd.io/gc.ref.content.config"], cd.as_str());
        assert_eq!(m.labels["containerd.io/gc.ref.content.l.1"], "sha256:l1");
        assert_eq!(i.labels["containerd.io/gc.ref.content.m.0"], other);
        assert_eq!(i.labels["containerd.io/gc.ref.content.m.1"], md.as_str());
        assert_eq!(i.bytes, index.as_bytes());

        // Pulled by digest, without an index: no tag, the manifest is the target.
        let img = ImageRecord {
            index_digest: None,
            ..img
        };
        let p = plan(
            &ImageRecord {
                tags: vec![],
                digests: vec![format!("r.example/app@{md}")],
                ..img.clone()
            },
            &layout,
            None,
            "lazypull",
        )
        .unwrap();
        assert_eq!(p.names, [cd.to_string(), format!("r.example/app@{md}")]);
        assert_eq!(p.reference, format!("r.example/app@{md}"));
        assert_eq!(p.target.digest, md.as_str());
        assert_eq!(p.blobs.len(), 2);

        // Known under other names too (pulled earlier by another tag, from a mirror): every
        // name lazypull reports is registered, and waited for.
        let img = ImageRecord {
            tags: vec!["r.example/app:1".into(), "r.example/app:old".into()],
            digests: vec![
                format!("mirror.example/app@{md}"),
                format!("r.example/app@{md}"),
            ],
            ..img
        };
        let p = plan(&img, &layout, Some("r.example/app:1"), "lazypull").unwrap();
        assert_eq!(
            p.names,
            [
                cd.to_string(),
                "r.example/app:1".into(),
                "r.example/app:old".into(),
                format!("r.example/app@{md}"),
                format!("mirror.example/app@{md}"),
            ]
        );
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // containerd's CRI learns names one event at a time: the tag alone is not enough.
        assert_eq!(
            missing_names(&p, &s(&["r.example/app:1", "r.example/app:old"]), &[]),
            [
                format!("r.example/app@{md}"),
                format!("mirror.example/app@{md}")
            ]
        );
        let all_digests = s(&[
            &format!("mirror.example/app@{md}"),
            &format!("r.example/app@{md}"),
        ]);
        assert_eq!(
            missing_names(&p, &s(&["r.example/app:1"]), &all_digests),
            ["r.example/app:old"]
        );
        assert!(
            missing_names(
                &p,
                &s(&["r.example/app:old", "r.example/app:1", "other:x"]),
                &all_digests
            )
            .is_empty()
        );
    }

    #[test]
    fn layers_are_mountable_or_refused_clearly() {
        let mut l = layer("sha256:l0", "sha256:d0");
        assert_eq!(layer_state(&l, true), Ok(false));
        assert!(layer_state(&l, false).unwrap_err().contains("--no-fill"));
        l.toc_digest = Some("sha256:t".into());
        assert_eq!(layer_state(&l, false), Ok(false), "its TOC is on its way");
        l.toc_entries = Some(3);
        assert_eq!(layer_state(&l, false), Ok(true));
        let mut l = layer("sha256:l0", "sha256:d0");
        l.state = LayerState::Failed;
        l.error = Some("gone".into());
        assert_eq!(layer_state(&l, true), Err("gone".into()));
    }

    #[test]
    fn image_layers_label_fits_one_label() {
        let l = format!("sha256:{}", "a".repeat(64));
        let many = vec![l.clone(); 100];
        let v = image_layers_label(&many);
        assert!(LABEL_CRI_LAYERS.len() + v.len() <= MAX_LABEL);
        assert!(v.split(',').all(|x| x == l));
        assert_eq!(image_layers_label(std::slice::from_ref(&l)), l);
    }

    #[tokio::test]
    async fn redial_rides_out_unavailable_and_nothing_else() {
        let calls = std::cell::Cell::new(0);
        let r = redial(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err(tonic::Status::unavailable("connection refused"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        calls.set(0);
        let r: std::result::Result<(), _> = redial(|| {
            calls.set(calls.get() + 1);
            async { Err(tonic::Status::not_found("no such snapshot")) }
        })
        .await;
        assert_eq!(r.unwrap_err().code(), Code::NotFound);
        assert_eq!(calls.get(), 1, "only Unavailable is sent again");
    }
}
