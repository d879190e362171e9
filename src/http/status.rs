//! The one place the HTTP side's errors become statuses and the distribution spec's error JSON
//! (`{"errors": [{"code", "message", "detail"}]}`).

use super::mirror::MirrorError;
use super::route::RouteError;
use crate::registry::RegistryError;
use hyper::StatusCode;

/// The status and the spec's error code of `e`.
pub fn of(e: &MirrorError) -> (StatusCode, &'static str) {
    use MirrorError as M;
    match e {
        M::Route(RouteError::NotFound(_)) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        M::Route(RouteError::NameInvalid(_)) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
        M::Route(RouteError::TagInvalid(_)) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
        M::Route(RouteError::DigestInvalid(_)) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        M::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        M::NoUpstream(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        M::ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        M::BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        M::RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN"),
        M::Upstream { source, manifest } => match source {
            RegistryError::NotFound { .. } if *manifest => {
                (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
            }
            RegistryError::NotFound { .. } => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            RegistryError::Unauthorized { .. } => (StatusCode::FORBIDDEN, "DENIED"),
            RegistryError::Oci(_) => (StatusCode::BAD_GATEWAY, "MANIFEST_INVALID"),
            RegistryError::TooLarge { .. } => (StatusCode::BAD_GATEWAY, "SIZE_INVALID"),
            RegistryError::Unreachable { .. }
            | RegistryError::Server { .. }
            | RegistryError::DigestMismatch { .. }
            | RegistryError::Truncated { .. } => (StatusCode::BAD_GATEWAY, "UNKNOWN"),
        },
        M::Store(_) | M::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        M::Shared(e) => of(e),
    }
}

/// The status of an admin API error.
pub fn admin(e: &super::admin::AdminError) -> StatusCode {
    use super::admin::AdminError as A;
    match e {
        A::BadRequest(_) => StatusCode::BAD_REQUEST,
        A::Unauthorized => StatusCode::UNAUTHORIZED,
        A::NotFound(_) => StatusCode::NOT_FOUND,
        A::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        A::Store(s) if s.is_disk_full() => StatusCode::INSUFFICIENT_STORAGE,
        A::Store(_) | A::Images(_) => StatusCode::INTERNAL_SERVER_ERROR,
        A::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The status of a `/reg` error.
pub fn reg(e: &super::reg::RegError) -> StatusCode {
    use super::reg::RegError as R;
    match e {
        R::BadName(_) | R::BadUpload(_) | R::DigestMismatch { .. } => StatusCode::BAD_REQUEST,
        R::NotFound(_) => StatusCode::NOT_FOUND,
        R::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        R::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        R::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        R::Store(s) if s.is_disk_full() => StatusCode::INSUFFICIENT_STORAGE,
        R::Io(io) if crate::store::is_disk_full(io) => StatusCode::INSUFFICIENT_STORAGE,
        R::Store(_) | R::Oci(_) | R::Images(_) | R::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The error response's body.
pub fn body(e: &MirrorError) -> String {
    let (_, code) = of(e);
    serde_json::json!({ "errors": [{ "code": code, "message": e.to_string(), "detail": null }] })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_keep_their_meaning() {
        let nf = |manifest| MirrorError::Upstream {
            source: RegistryError::NotFound {
                registry: "r".into(),
                what: "x".into(),
            },
            manifest,
        };
        assert_eq!(of(&nf(true)), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
        assert_eq!(of(&nf(false)), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
        let down = MirrorError::Upstream {
            source: RegistryError::Unreachable {
                registry: "r".into(),
                reason: "refused".into(),
            },
            manifest: true,
        };
        assert_eq!(of(&down).0, StatusCode::BAD_GATEWAY);
        let b: serde_json::Value = serde_json::from_str(&body(&down)).unwrap();
        assert_eq!(b["errors"][0]["code"], "UNKNOWN");
        assert!(
            b["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("unreachable")
        );
        assert_eq!(
            of(&MirrorError::Unsupported("push".into())),
            (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
        );
    }
}
