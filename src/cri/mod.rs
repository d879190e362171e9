//! CRI `runtime.v1.ImageService`: a thin adapter over [`Images`], which also registers pulled
//! images in containerd when configured to (see [`containerd`]).

pub mod containerd;

use crate::images::{Images, PullMode, disk_usage};
use crate::oci::{self, Digest};
use crate::registry::auth::Secret;
use crate::rpc::cri::{self, image_service_server::ImageService};
use crate::rpc::status::{containerd_status, to_status};
use crate::store::ImageRecord;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Per-request pull mode: `lazy` or `full` (image spec annotation).
pub const PULL_MODE_ANNOTATION: &str = "lazypull.io/pull-mode";

pub struct CriImages {
    store: crate::store::Store,
    /// Layers are filled (`fetch.fill.enabled`): a registration in containerd waits for them.
    fill_enabled: bool,
    images: Arc<Images>,
    default_mode: PullMode,
    /// Where pulls are also registered (`--containerd-address`), if anywhere.
    containerd: Option<Arc<containerd::Containerd>>,
}

impl CriImages {
    pub fn new(
        store: crate::store::Store,
        fill_enabled: bool,
        images: Arc<Images>,
        default_mode: PullMode,
        containerd: Option<Arc<containerd::Containerd>>,
    ) -> Self {
        CriImages {
            store,
            fill_enabled,
            images,
            default_mode,
            containerd,
        }
    }

    /// Make the image `id`, just pulled as `name`, usable by containerd's CRI runtime.
    async fn register(
        &self,
        ctd: &containerd::Containerd,
        name: &str,
        id: &str,
    ) -> Result<(), Status> {
        register_in_containerd(&self.store, self.fill_enabled, &self.images, ctd, name, id).await
    }
}

/// Make the image `id`, just pulled or loaded as `name`, usable by containerd's CRI runtime
/// (when layers are filled, `fill_enabled`, once they are).
pub async fn register_in_containerd(
    store: &crate::store::Store,
    fill_enabled: bool,
    images: &Images,
    ctd: &containerd::Containerd,
    name: &str,
    id: &str,
) -> Result<(), Status> {
    let img = images
        .resolve(id)
        .map_err(to_status)?
        .ok_or_else(|| Status::aborted(format!("image {id} was removed while it was pulled")))?;
    let tag = oci::parse_reference(name)
        .ok()
        .and_then(|r| oci::tag_name(&r));
    let plan = containerd::plan(
        &img,
        &store.layout,
        tag.as_deref(),
        &ctd.options().snapshotter,
    )
    .map_err(containerd_status)?;
    ctd.wait_layers(&img, fill_enabled, |d| {
        crate::store::locked(&store.db).layer(d)
    })
    .await
    .map_err(containerd_status)?;
    ctd.register(&plan).await.map_err(containerd_status)
}

fn secret_from(auth: &cri::AuthConfig) -> Result<Option<Secret>, Status> {
    if !auth.registry_token.is_empty() {
        return Ok(Some(Secret::Bearer {
            token: auth.registry_token.clone(),
        }));
    }
    if !auth.username.is_empty() {
        return Ok(Some(Secret::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if !auth.auth.is_empty() {
        return Secret::from_auth(&auth.auth)
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string()));
    }
    if !auth.identity_token.is_empty() {
        return Err(Status::invalid_argument(
            "identity tokens (OAuth refresh tokens) are not supported; pass username/password or a registry token",
        ));
    }
    Ok(None)
}

fn image_ref_of(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec {
        Some(s) if !s.image.trim().is_empty() => Ok(s.image.trim()),
        _ => Err(Status::invalid_argument(
            "image spec with a non-empty image reference is required",
        )),
    }
}

pub fn to_cri_image(img: &ImageRecord) -> cri::Image {
    let (uid, username) = oci::split_user(&img.user);
    cri::Image {
        id: img.id.clone(),
        repo_tags: img.tags.clone(),
        repo_digests: img.digests.clone(),
        size: img.size,
        uid: uid.map(|value| cri::Int64Value { value }),
        username,
        spec: Some(cri::ImageSpec {
            image: img.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

#[tonic::async_trait]
impl ImageService for CriImages {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match filter {
            Some(name) => self
                .images
                .resolve(&name)
                .map_err(to_status)?
                .into_iter()
                .collect(),
            None => self.images.list().map_err(to_status)?,
        };
        Ok(Response::new(cri::ListImagesResponse {
            images: images.iter().map(to_cri_image).collect(),
        }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let name = image_ref_of(req.image.as_ref())?;
        let Some(img) = self.images.resolve(name).map_err(to_status)? else {
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        self.images.touch(&img.id);
        let mut info = HashMap::new();
        if req.verbose {
            let config: serde_json::Value = Digest::parse(&img.id)
                .ok()
                .and_then(|d| self.store.layout.read_blob(&d).ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null);
            let v = serde_json::json!({
                "id": img.id,
                "manifestDigest": img.manifest_digest,
                "indexDigest": img.index_digest,
                "source": img.source,
                "fillPercent": img.fill_percent(),
                "complete": img.complete(),
                "layers": img.layers,
                "imageSpec": config,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(to_cri_image(&img)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let name = image_ref_of(req.image.as_ref())?;
        let secret = match &req.auth {
            Some(a) => secret_from(a)?,
            None => None,
        };
        let mode = match req
            .image
            .as_ref()
            .and_then(|s| s.annotations.get(PULL_MODE_ANNOTATION))
            .map(String::as_str)
        {
            None => self.default_mode,
            Some("lazy") => PullMode::Lazy,
            Some("full") => PullMode::Full,
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "annotation {PULL_MODE_ANNOTATION}={other:?}: expected lazy or full"
                )));
            }
        };
        let out = self
            .images
            .pull(name, secret, mode)
            .await
            .map_err(to_status)?;
        if let Some(ctd) = &self.containerd {
            self.register(ctd, name, &out.id).await?;
        }
        Ok(Response::new(cri::PullImageResponse { image_ref: out.id }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let req = req.into_inner();
        let name = image_ref_of(req.image.as_ref())?;
        // containerd first: if it cannot be reached, nothing is removed and a retry still knows
        // which names to delete there.
        if let Some(ctd) = &self.containerd
            && let Some(removal) = self.images.removal(name).map_err(to_status)?
        {
            ctd.remove(&removal.names())
                .await
                .map_err(containerd_status)?;
        }
        self.images.remove(name).await.map_err(to_status)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let root = self.store.layout.root.clone();
        let (used, inodes) = tokio::task::spawn_blocking(move || disk_usage(&root))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let usage = cri::FilesystemUsage {
            timestamp: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.store.layout.root.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: used }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![usage],
            container_filesystems: vec![],
        }))
    }
}
