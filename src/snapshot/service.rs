//! gRPC adapter: `containerd.services.snapshots.v1.Snapshots` over [`Snapshotter`]. Requests
//! are bounded by the server's message size; errors become status codes in `rpc::status`.

use super::{MountSpec, Snapshotter, filter::Filter};
use crate::rpc::containerd::services::snapshots::v1 as pb;
use crate::rpc::containerd::types::Mount;
use crate::rpc::status::snapshot_status;
use crate::store::snapshots::{SnapshotKind, SnapshotRecord};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct SnapshotService {
    pub snapshotter: Arc<Snapshotter>,
}

fn mounts(m: Vec<MountSpec>) -> Vec<Mount> {
    m.into_iter()
        .map(|m| Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn info(s: SnapshotRecord) -> pb::Info {
    pb::Info {
        name: s.name,
        parent: s.parent,
        kind: match s.kind {
            SnapshotKind::Active => pb::Kind::Active,
            SnapshotKind::View => pb::Kind::View,
            SnapshotKind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created_ns)),
        updated_at: Some(timestamp(s.updated_ns)),
        labels: s.labels.into_iter().collect(),
    }
}

fn labels(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

/// Blocking work (directory walks, removals, catalogue writes) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, super::SnapshotError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("snapshotter task failed: {e}")))?
        .map_err(snapshot_status)
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let m = self
            .snapshotter
            .prepare(SnapshotKind::Active, &r.key, &r.parent, labels(r.labels))
            .await
            .map_err(snapshot_status)?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let m = self
            .snapshotter
            .prepare(SnapshotKind::View, &r.key, &r.parent, labels(r.labels))
            .await
            .map_err(snapshot_status)?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = request.into_inner().key;
        let s = Arc::clone(&self.snapshotter);
        let m = blocking(move || s.mounts(&key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let s = Arc::clone(&self.snapshotter);
        blocking(move || s.commit(&r.name, &r.key, labels(r.labels))).await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        let s = Arc::clone(&self.snapshotter);
        blocking(move || s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let s = Arc::clone(&self.snapshotter);
        let rec = blocking(move || s.stat(&key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(rec)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(i) = r.info else {
            return Err(Status::invalid_argument("update without info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = Arc::clone(&self.snapshotter);
        let rec = blocking(move || s.update(&i.name, labels(i.labels), &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(rec)),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        if r.filters.len() > 64 {
            return Err(Status::invalid_argument("more than 64 filters"));
        }
        let filters = r
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let s = Arc::clone(&self.snapshotter);
        let all = blocking(move || s.list(&filters)).await?;
        // containerd's own services send 100 infos per message.
        let batches: Vec<_> = all
            .chunks(100)
            .map(|c| {
                Ok(pb::ListSnapshotsResponse {
                    info: c.iter().cloned().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = request.into_inner().key;
        let s = Arc::clone(&self.snapshotter);
        let (size, inodes) = blocking(move || s.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: size as i64,
            inodes: inodes as i64,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let s = Arc::clone(&self.snapshotter);
        blocking(move || s.cleanup().map(|_| ())).await?;
        Ok(Response::new(()))
    }
}
