//! Errors become gRPC status codes here and nowhere else.

use crate::cri::containerd::ContainerdError;
use crate::images::ImagesError;
use crate::oci::OciError;
use crate::registry::RegistryError;
use crate::snapshot::SnapshotError;
use tonic::{Code, Status};

pub fn code_of(e: &ImagesError) -> Code {
    match e {
        ImagesError::Oci(OciError::BadReference { .. } | OciError::BadDigest(_)) => {
            Code::InvalidArgument
        }
        ImagesError::Oci(OciError::NoPlatform { .. }) => Code::NotFound,
        ImagesError::Oci(OciError::UnsupportedMediaType(_)) => Code::Unimplemented,
        ImagesError::Oci(_) => Code::FailedPrecondition,
        ImagesError::Ambiguous(_) => Code::InvalidArgument,
        ImagesError::Registry(r) => match r {
            RegistryError::Unauthorized { .. } => Code::PermissionDenied,
            RegistryError::NotFound { .. } => Code::NotFound,
            RegistryError::Unreachable { .. }
            | RegistryError::Server { .. }
            | RegistryError::Truncated { .. } => Code::Unavailable,
            RegistryError::TooLarge { .. } | RegistryError::Oci(_) => Code::FailedPrecondition,
            RegistryError::DigestMismatch { .. } => Code::DataLoss,
        },
        ImagesError::Store(s) if s.is_disk_full() => Code::ResourceExhausted,
        ImagesError::Store(_) => Code::Internal,
        ImagesError::Timeout { .. } => Code::DeadlineExceeded,
        ImagesError::Fill {
            disk_full: true, ..
        } => Code::ResourceExhausted,
        ImagesError::Fill { .. } => Code::Unavailable,
        ImagesError::ShuttingDown => Code::Unavailable,
        ImagesError::Import(crate::import::ImportError::Io { source, .. })
            if crate::store::is_disk_full(source) =>
        {
            Code::ResourceExhausted
        }
        ImagesError::Import(crate::import::ImportError::Io { .. }) => Code::Internal,
        ImagesError::Import(_) => Code::InvalidArgument,
    }
}

pub fn to_status(e: ImagesError) -> Status {
    Status::new(code_of(&e), e.to_string())
}

/// Snapshotter errors, with the codes containerd's `errdefs.FromGRPC` understands.
pub fn snapshot_code(e: &SnapshotError) -> Code {
    match e {
        SnapshotError::NotFound(_) => Code::NotFound,
        SnapshotError::AlreadyExists(_) => Code::AlreadyExists,
        SnapshotError::FailedPrecondition(_) => Code::FailedPrecondition,
        SnapshotError::InvalidArgument(_) => Code::InvalidArgument,
        SnapshotError::Unavailable(_) => Code::Unavailable,
        SnapshotError::Store(s) if s.is_disk_full() => Code::ResourceExhausted,
        SnapshotError::Io { source, .. } if crate::store::is_disk_full(source) => {
            Code::ResourceExhausted
        }
        SnapshotError::Store(_) | SnapshotError::Io { .. } => Code::Internal,
    }
}

pub fn snapshot_status(e: SnapshotError) -> Status {
    Status::new(snapshot_code(&e), e.to_string())
}

/// Registering an image in containerd (CRI PullImage/RemoveImage with `--containerd-address`).
pub fn containerd_code(e: &ContainerdError) -> Code {
    match e {
        ContainerdError::Rpc { status, .. } => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                Code::Unavailable
            }
            // Our requests are well-formed: containerd refusing one means its configuration
            // (e.g. no snapshotter of that name) does not fit ours.
            Code::InvalidArgument | Code::NotFound => Code::FailedPrecondition,
            c => c,
        },
        ContainerdError::Layer { .. } | ContainerdError::NotRemote { .. } => {
            Code::FailedPrecondition
        }
        ContainerdError::LayerTimeout { .. } | ContainerdError::CriTimeout { .. } => {
            Code::DeadlineExceeded
        }
        ContainerdError::Store(s) if s.is_disk_full() => Code::ResourceExhausted,
        ContainerdError::Malformed(..) | ContainerdError::Store(_) => Code::Internal,
    }
}

pub fn containerd_status(e: ContainerdError) -> Status {
    Status::new(containerd_code(&e), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let bad = ImagesError::Oci(OciError::BadReference {
            reference: "X".into(),
            reason: "r".into(),
        });
        assert_eq!(code_of(&bad), Code::InvalidArgument);
        let auth = ImagesError::Registry(RegistryError::Unauthorized {
            registry: "r".into(),
            repository: "x".into(),
            status: "401",
            tried: "anonymous".into(),
        });
        assert_eq!(code_of(&auth), Code::PermissionDenied);
        assert!(to_status(auth).message().contains("anonymous"));
        // Disk full is a typed fact of the fill, not a phrase in its message.
        let fill = |disk_full: bool, reason: &str| ImagesError::Fill {
            reference: "r".into(),
            layer: "l".into(),
            reason: reason.into(),
            disk_full,
        };
        assert_eq!(
            code_of(&fill(true, "i/o on x: os error 28")),
            Code::ResourceExhausted
        );
        assert_eq!(
            code_of(&fill(false, "registry said: No space left in its bucket")),
            Code::Unavailable
        );
    }
}
