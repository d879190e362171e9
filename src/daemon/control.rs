//! lazypull's own gRPC API (`lazypull.v1.Control`), on the CRI socket: open-file recording for
//! `lazypull convert --record`, and `lazypull load` of archives while the daemon runs.

use crate::cri::containerd::Containerd;
use crate::fs::record::Recorder;
use crate::images::{Images, LoadOptions};
use crate::oci::Digest;
use crate::rpc::control::{
    LoadRequest, LoadResponse, LoadedImage, OpenedFile, StartRecordingRequest,
    StartRecordingResponse, StopRecordingRequest, StopRecordingResponse, control_server::Control,
};
use crate::rpc::status::to_status;
use futures_util::StreamExt;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// Layers one recording may watch.
const MAX_LAYERS: usize = 1000;

pub struct ControlService {
    /// None when the layer filesystem is not mounted.
    pub recorder: Option<Arc<Recorder>>,
    pub images: Arc<Images>,
    pub store: crate::store::Store,
    /// Layers are filled (`fetch.fill.enabled`).
    pub fill_enabled: bool,
    /// Where loaded images are also registered, as CRI pulls are.
    pub containerd: Option<Arc<Containerd>>,
}

impl ControlService {
    fn recorder(&self) -> Result<&Recorder, Status> {
        self.recorder.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "the daemon's layer filesystem is not mounted (FUSE off or unavailable): nothing to record",
            )
        })
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn load(
        &self,
        req: Request<Streaming<LoadRequest>>,
    ) -> Result<Response<LoadResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty load stream"))?;
        let opts = first.options.unwrap_or_default();
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let opts = LoadOptions {
            tag: nonempty(opts.tag),
            name: nonempty(opts.name),
        };
        // The archive's bytes, in order, as a blocking reader for the archive parser (it runs
        // on a blocking thread). A broken client stream is an I/O error there.
        let first_data = futures_util::stream::iter([Ok(bytes::Bytes::from(first.data))]);
        let rest = stream.map(|m| {
            m.map(|m| bytes::Bytes::from(m.data))
                .map_err(|s| std::io::Error::other(format!("the client's stream: {}", s.message())))
        });
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
            first_data.chain(rest),
        ));
        tracing::info!(tag = ?opts.tag, name = ?opts.name, "loading an archive from a client");
        let loaded = self
            .images
            .load(Box::new(reader), opts)
            .await
            .map_err(to_status)?;
        if let Some(ctd) = &self.containerd {
            for l in &loaded {
                for n in &l.names {
                    crate::cri::register_in_containerd(
                        &self.store,
                        self.fill_enabled,
                        &self.images,
                        ctd,
                        n,
                        &l.id,
                    )
                    .await?;
                }
            }
        }
        Ok(Response::new(LoadResponse {
            images: loaded
                .into_iter()
                .map(|l| LoadedImage {
                    id: l.id,
                    names: l.names,
                    layers: l.layers as u32,
                    size: l.size,
                    already_local: l.already_local,
                })
                .collect(),
        }))
    }

    async fn start_recording(
        &self,
        req: Request<StartRecordingRequest>,
    ) -> Result<Response<StartRecordingResponse>, Status> {
        let recorder = self.recorder()?;
        let layers = req.into_inner().layer_digests;
        if layers.is_empty() || layers.len() > MAX_LAYERS {
            return Err(Status::invalid_argument(format!(
                "give 1 to {MAX_LAYERS} layer digests, not {}",
                layers.len()
            )));
        }
        let mut hexes = vec![];
        for l in &layers {
            let d = Digest::parse(l)
                .map_err(|e| Status::invalid_argument(format!("layer digest {l:?}: {e}")))?;
            hexes.push(d.hex().to_string());
        }
        let id = recorder.start(hexes);
        tracing::info!(
            session = id,
            layers = layers.len(),
            "recording opened files"
        );
        Ok(Response::new(StartRecordingResponse { id }))
    }

    async fn stop_recording(
        &self,
        req: Request<StopRecordingRequest>,
    ) -> Result<Response<StopRecordingResponse>, Status> {
        let id = req.into_inner().id;
        let files = self
            .recorder()?
            .stop(id)
            .ok_or_else(|| Status::not_found(format!("no recording {id}")))?;
        tracing::info!(session = id, files = files.len(), "recording stopped");
        Ok(Response::new(StopRecordingResponse {
            files: files
                .into_iter()
                .map(|(hex, path)| OpenedFile {
                    layer_digest: format!("sha256:{hex}"),
                    path,
                })
                .collect(),
        }))
    }
}
