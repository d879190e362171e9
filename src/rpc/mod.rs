//! Generated gRPC code and the one place errors become gRPC status codes.

pub mod status;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

/// containerd's snapshots API (served as a proxy snapshotter plugin), nested as the generated
/// code expects.
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
    }
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod control {
    tonic::include_proto!("lazypull.v1");
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
}
