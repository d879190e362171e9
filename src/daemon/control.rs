//! lazypull's own gRPC API (`lazypull.v1.Control`), on the CRI socket: open-file recording for
//! `lazypull convert --record`.

use crate::fs::record::Recorder;
use crate::oci::Digest;
use crate::rpc::control::{
    OpenedFile, StartRecordingRequest, StartRecordingResponse, StopRecordingRequest,
    StopRecordingResponse, control_server::Control,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Layers one recording may watch.
const MAX_LAYERS: usize = 1000;

pub struct ControlService {
    /// None when the layer filesystem is not mounted.
    pub recorder: Option<Arc<Recorder>>,
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
