//! The OCI distribution API's paths, parsed (pure): which endpoint a request is for, the
//! repository name it names, and which upstream registry that name goes to.
//!
//! Written by hand: the distribution spec's path grammar (a repository name of several
//! slash-separated components, then `manifests/<reference>`, `blobs/<digest>`, `tags/list` or
//! `referrers/<digest>`) cannot be routed by a path-pattern router, whose wildcards only end a
//! path.

use crate::oci::Digest;

/// Longest repository name accepted (the spec bounds a name with its host to 255).
pub const MAX_NAME: usize = 255;

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    Tag(String),
    Digest(Digest),
}

/// What a `/v2/...` path asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest {
        name: String,
        reference: Ref,
    },
    Blob {
        name: String,
        digest: Digest,
    },
    Tags {
        name: String,
    },
    Referrers {
        name: String,
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/...`: pushing, which a pull-through registry does not do.
    Upload,
}

/// Why a path is refused (the spec's error codes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("not an endpoint of the OCI distribution API: {0}")]
    NotFound(String),
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    #[error("invalid tag {0:?}")]
    TagInvalid(String),
    #[error("invalid digest {0:?} (sha256 only)")]
    DigestInvalid(String),
}

/// Parse a request path (already without its query).
pub fn parse(path: &str) -> Result<Route, RouteError> {
    let not_found = || RouteError::NotFound(path.chars().take(200).collect());
    let rest = path.strip_prefix("/v2").ok_or_else(not_found)?;
    if rest.is_empty() || rest == "/" {
        return Ok(Route::Base);
    }
    let rest = rest.strip_prefix('/').ok_or_else(not_found)?;
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Ok(Route::Upload);
    }
    if let Some(i) = segs.iter().rposition(|s| *s == "uploads")
        && i > 1
        && segs[i - 1] == "blobs"
    {
        return Ok(Route::Upload);
    }
    if n < 3 {
        return Err(not_found());
    }
    let name = || name_of(&segs[..n - 2]);
    let digest = |s: &str| Digest::parse(s).map_err(|_| RouteError::DigestInvalid(s.into()));
    match (segs[n - 2], segs[n - 1]) {
        ("tags", "list") => Ok(Route::Tags { name: name()? }),
        ("manifests", r) => {
            let reference = if r.contains(':') {
                Ref::Digest(digest(r)?)
            } else if valid_tag(r) {
                Ref::Tag(r.to_string())
            } else {
                return Err(RouteError::TagInvalid(r.chars().take(200).collect()));
            };
            Ok(Route::Manifest {
                name: name()?,
                reference,
            })
        }
        ("blobs", d) => Ok(Route::Blob {
            name: name()?,
            digest: digest(d)?,
        }),
        ("referrers", d) => Ok(Route::Referrers {
            name: name()?,
            digest: digest(d)?,
        }),
        _ => Err(not_found()),
    }
}

/// A tag as the spec allows: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}` (case kept: tags are
/// case-sensitive).
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Does this first path component name a registry host (`registry.k8s.io`, `host:5000`,
/// `localhost`) rather than a repository component?
pub fn is_host(c: &str) -> bool {
    c.contains('.') || c.contains(':') || c == "localhost"
}

fn name_of(segs: &[&str]) -> Result<String, RouteError> {
    let name = segs.join("/");
    let bad = || RouteError::NameInvalid(name.chars().take(200).collect());
    if segs.is_empty() || name.len() > MAX_NAME {
        return Err(bad());
    }
    for (i, s) in segs.iter().enumerate() {
        let ok = if i == 0 && segs.len() > 1 && is_host(s) {
            valid_host(s)
        } else {
            valid_component(s)
        };
        if !ok {
            return Err(bad());
        }
    }
    Ok(name)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__` or a run of `-`, between alphanumerics.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A registry host with an optional port: DNS labels or an IPv4 address, no path tricks.
fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit())) {
        return false;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

/// Where a request for repository `name` goes: the registry host and the repository there.
/// In order: the `ns` query parameter containerd adds to mirrored requests, a registry host
/// as the first path component, then `default` (empty: none).
pub fn upstream(name: &str, ns: Option<&str>, default: &str) -> Option<(String, String)> {
    if let Some(ns) = ns.filter(|n| !n.is_empty()) {
        return Some((ns.to_string(), name.to_string()));
    }
    if let Some((first, rest)) = name.split_once('/')
        && is_host(first)
    {
        return Some((first.to_string(), rest.to_string()));
    }
    (!default.is_empty()).then(|| (default.to_string(), name.to_string()))
}

/// The `ns` parameter of a query string (percent-decoded: containerd sends
/// `ns=host%3Aport`), if valid as a registry host.
pub fn ns_param(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
        .filter(|v| valid_host(v))
}

/// The `artifactType` filter of a referrers query (a media type: at most 255 bytes of
/// printable ASCII without spaces, else ignored).
pub fn artifact_type_param(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty() && v.len() <= 255 && v.bytes().all(|b| b.is_ascii_graphic()))
}

/// `n` and `last` of a `tags/list` query.
pub fn page_params(query: Option<&str>) -> (Option<usize>, Option<String>) {
    let mut n = None;
    let mut last = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "n" => n = v.parse().ok(),
            "last" if valid_tag(&v) => last = Some(v.into_owned()),
            _ => {}
        }
    }
    (n, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn paths_of_the_pull_api_parse() {
        assert_eq!(parse("/v2/"), Ok(Route::Base));
        assert_eq!(parse("/v2"), Ok(Route::Base));
        assert_eq!(
            parse("/v2/library/busybox/manifests/1.36"),
            Ok(Route::Manifest {
                name: "library/busybox".into(),
                reference: Ref::Tag("1.36".into())
            })
        );
        assert_eq!(
            parse(&format!("/v2/registry.k8s.io/pause/manifests/{D}")),
            Ok(Route::Manifest {
                name: "registry.k8s.io/pause".into(),
                reference: Ref::Digest(Digest::parse(D).unwrap())
            })
        );
        assert_eq!(
            parse(&format!("/v2/localhost:5000/a/b/blobs/{D}")),
            Ok(Route::Blob {
                name: "localhost:5000/a/b".into(),
                digest: Digest::parse(D).unwrap()
            })
        );
        assert_eq!(
            parse("/v2/a/tags/list"),
            Ok(Route::Tags { name: "a".into() })
        );
        assert_eq!(
            parse(&format!("/v2/a/referrers/{D}")),
            Ok(Route::Referrers {
                name: "a".into(),
                digest: Digest::parse(D).unwrap()
            })
        );
        assert_eq!(parse("/v2/a/blobs/uploads/"), Ok(Route::Upload));
        assert_eq!(parse("/v2/a/blobs/uploads/123-abc"), Ok(Route::Upload));
        // Tags keep their case.
        assert_eq!(
            parse("/v2/a/manifests/V1.0_RC"),
            Ok(Route::Manifest {
                name: "a".into(),
                reference: Ref::Tag("V1.0_RC".into())
            })
        );
    }

    #[test]
    fn bad_paths_are_refused_with_the_right_code() {
        assert!(matches!(parse("/v1/x"), Err(RouteError::NotFound(_))));
        assert!(matches!(
            parse("/v2/a/whatever/x"),
            Err(RouteError::NotFound(_))
        ));
        assert!(matches!(
            parse("/v2/manifests/x"),
            Err(RouteError::NotFound(_))
        ));
        for bad in [
            "/v2/../etc/manifests/x",
            "/v2/a/../b/manifests/x",
            "/v2/%2e%2e/manifests/x",
            "/v2/A/manifests/x",
            "/v2/a//b/manifests/x",
            "/v2/a-/manifests/x",
            "/v2/a___b/manifests/x",
            "/v2/a\0/manifests/x",
            "/v2/ho_st:5000/a/manifests/x",
        ] {
            assert!(
                matches!(parse(bad), Err(RouteError::NameInvalid(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
        let long = format!("/v2/{}/manifests/x", "a".repeat(MAX_NAME + 1));
        assert!(matches!(parse(&long), Err(RouteError::NameInvalid(_))));
        assert!(matches!(
            parse("/v2/a/manifests/-x"),
            Err(RouteError::TagInvalid(_))
        ));
        assert!(matches!(
            parse(&format!("/v2/a/manifests/{}", "t".repeat(129))),
            Err(RouteError::TagInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/blobs/sha512:00"),
            Err(RouteError::DigestInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/manifests/sha256:zz"),
            Err(RouteError::DigestInvalid(_))
        ));
    }

    #[test]
    fn components_follow_the_spec_grammar() {
        for ok in ["a", "a0", "a.b", "a_b", "a__b", "a-b", "a---b", "0"] {
            assert!(valid_component(ok), "{ok}");
        }
        for bad in [
            "", "-a", "a-", ".a", "a.", "a..b", "a___b", "a._b", "aB", "a b",
        ] {
            assert!(!valid_component(bad), "{bad}");
        }
    }

    #[test]
    fn the_upstream_comes_from_ns_then_the_path_then_the_default() {
        assert_eq!(
            upstream("library/busybox", Some("docker.io"), "quay.io"),
            Some(("docker.io".into(), "library/busybox".into()))
        );
        assert_eq!(
            upstream("registry.k8s.io/pause", None, "docker.io"),
            Some(("registry.k8s.io".into(), "pause".into()))
        );
        assert_eq!(
            upstream("127.0.0.1:5000/a/b", None, ""),
            Some(("127.0.0.1:5000".into(), "a/b".into()))
        );
        assert_eq!(
            upstream("library/busybox", None, "docker.io"),
            Some(("docker.io".into(), "library/busybox".into()))
        );
        assert_eq!(upstream("library/busybox", None, ""), None);
        assert_eq!(ns_param(Some("ns=docker.io")), Some("docker.io".into()));
        assert_eq!(
            ns_param(Some("ns=127.0.0.1%3A5000")),
            Some("127.0.0.1:5000".into())
        );
        assert_eq!(
            ns_param(Some("n=3&ns=localhost:5000")),
            Some("localhost:5000".into())
        );
        assert_eq!(ns_param(Some("ns=../x")), None);
        assert_eq!(ns_param(None), None);
        assert_eq!(
            page_params(Some("n=10&last=v1")),
            (Some(10), Some("v1".into()))
        );
        assert_eq!(page_params(Some("n=x&last=..")), (None, None));
    }
}
