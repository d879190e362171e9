//! Generated gRPC code and the one place errors become gRPC status codes.

pub mod status;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

/// containerd's APIs: snapshots (served as a proxy snapshotter plugin); content, images and
/// leases (called to register images in containerd). Nested as the generated code expects.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
    }
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod control {
    tonic::include_proto!("lazypull.v1");
}

/// Serve gRPC `routes` on a bound unix socket until `stop` is cancelled (running requests are
/// then drained by the caller's deadline). Every gRPC server of lazypull goes through here.
///
/// Requests are accepted whatever their HTTP/2 `:authority` says: clients that dial a socket
/// path send that path there (kubelet and crictl before kubernetes#123463, grpc-java,
/// grpcurl), some send it empty or percent-encoded. The HTTP/2 crate refused those; its
/// vendored copy does not (vendor/h2/PATCHED.md, tested by tests/clients.rs).
pub async fn serve_unix(
    routes: tonic::service::Routes,
    listener: tokio::net::UnixListener,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop.cancelled_owned(),
        )
        .await
}

/// A gRPC channel over a unix socket (for the CLI talking to the daemon, and tests).
pub async fn connect_unix(
    path: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by the API but unused: the connector below dials the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::containerd::services::snapshots::v1 as snap;
    use prost::Message;

    /// The vendored snapshots API keeps containerd's field numbers (gogo options removed only).
    #[test]
    fn snapshots_wire_format() {
        let req = snap::PrepareSnapshotRequest {
            snapshotter: "lazypull".into(),
            key: "k".into(),
            parent: "p".into(),
            labels: Default::default(),
        };
        let bytes = req.encode_to_vec();
        assert_eq!(
            bytes,
            [&[0x0a, 8][..], b"lazypull", &[0x12, 1, b'k', 0x1a, 1, b'p']].concat()
        );
        assert_eq!(snap::Kind::Committed as i32, 3);
        let m = super::containerd::types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["lowerdir=/a:/b".into()],
        };
        assert_eq!(
            super::containerd::types::Mount::decode(&m.encode_to_vec()[..]).unwrap(),
            m
        );
    }

    /// The vendored content, images and leases APIs keep containerd's field numbers.
    #[test]
    fn content_images_leases_wire_format() {
        use super::containerd::services::{content::v1 as content, images::v1 as images};
        let w = content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            r#ref: "r".into(),
            total: 3,
            expected: "sha256:x".into(),
            offset: 0,
            data: vec![],
            labels: Default::default(),
        };
        // action=1 (varint 2), ref=2, total=3, expected=4.
        assert_eq!(
            w.encode_to_vec(),
            [&[0x08, 2, 0x12, 1, b'r', 0x18, 3, 0x22, 8][..], b"sha256:x"].concat()
        );
        let img = images::Image {
            name: "n".into(),
            labels: Default::default(),
            target: Some(super::containerd::types::Descriptor {
                media_type: "m".into(),
                digest: "d".into(),
                size: 1,
                annotations: Default::default(),
            }),
            created_at: None,
            updated_at: None,
        };
        // name=1, target=3 {media_type=1, digest=2, size=3}.
        assert_eq!(
            img.encode_to_vec(),
            [
                0x0a, 1, b'n', 0x1a, 8, 0x0a, 1, b'm', 0x12, 1, b'd', 0x18, 1
            ]
        );
        let lease = super::containerd::services::leases::v1::CreateRequest {
            id: "l".into(),
            labels: Default::default(),
        };
        assert_eq!(lease.encode_to_vec(), [0x0a, 1, b'l']);
    }
}
