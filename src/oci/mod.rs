//! Pure OCI logic: digests, references, manifests, platform selection, image configs.
//! No I/O here; everything is unit-tested inline.

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fmt;

pub use oci_client::Reference;

/// Largest manifest, index or image config we accept (they are JSON documents of a few KiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Largest number of layers in one image (the kernel's overlayfs cannot stack many more anyway).
pub const MAX_LAYERS: usize = 500;
/// Largest number of entries in an index.
pub const MAX_INDEX_ENTRIES: usize = 1000;
/// Largest single layer we accept (1 TiB): anything beyond is a hostile manifest.
pub const MAX_LAYER_BYTES: u64 = 1 << 40;

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Media types we ask the registry for, best first.
pub const MANIFEST_ACCEPT: &[&str] = &[
    MT_OCI_INDEX,
    MT_DOCKER_LIST,
    MT_OCI_MANIFEST,
    MT_DOCKER_MANIFEST,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OciError {
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex>")]
    BadDigest(String),
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("no manifest for platform {platform} in index (available: {available})")]
    NoPlatform { platform: String, available: String },
    #[error("config has {diff_ids} rootfs.diff_ids but the manifest has {layers} layers")]
    LayerCountMismatch { diff_ids: usize, layers: usize },
}

/// A validated `sha256:<hex>` digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| OciError::BadDigest(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(OciError::BadDigest(s.to_string()));
        }
        Ok(Digest(s.to_string()))
    }
    pub fn of(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }
    pub fn from_sha256(hash: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The hex part, used as a file name.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Compile the reference grammar now. oci-spec builds its reference regex (Unicode classes,
/// bounded repetitions) at the first parse of the process: about 50 ms of CPU, which fell on
/// the first remote Prepare of a cold start (measured with strace between containerd's request
/// and the first registry request). The daemon calls this at start, off the request path.
pub fn warm_up() {
    let _ = parse_reference("localhost/warm-up:latest");
}

/// Parse and normalise an image reference: `busybox` becomes `docker.io/library/busybox:latest`.
pub fn parse_reference(s: &str) -> Result<Reference, OciError> {
    let bad = |reason: String| OciError::BadReference {
        reference: s.to_string(),
        reason,
    };
    if s.is_empty() {
        return Err(bad("empty reference".into()));
    }
    if s.len() > 1024 {
        return Err(bad("longer than 1024 bytes".into()));
    }
    let r: Reference = s
        .parse()
        .map_err(|e: oci_client::ParseError| bad(e.to_string()))?;
    if r.repository().bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("repository name must be lowercase".into()));
    }
    if let Some(d) = r.digest() {
        Digest::parse(d).map_err(|e| bad(e.to_string()))?;
    }
    Ok(r)
}

/// `registry/repository` of a reference, the name RepoTags and RepoDigests are built on.
pub fn repo_name(r: &Reference) -> String {
    format!("{}/{}", r.registry(), r.repository())
}

/// The tag name stored for a reference (`repo:tag`), if it names a tag and no digest.
/// A reference with both a tag and a digest is a pull by digest: it adds no tag.
pub fn tag_name(r: &Reference) -> Option<String> {
    match (r.tag(), r.digest()) {
        (Some(t), None) => Some(format!("{}:{}", repo_name(r), t)),
        _ => None,
    }
}

pub fn digest_name(repo: &str, d: &Digest) -> String {
    format!("{repo}@{d}")
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The platform of this node in OCI terms.
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "arm" => "arm",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    };
    let variant = match arch {
        "arm64" => Some("v8".to_string()),
        _ => None,
    };
    Platform {
        architecture: arch.to_string(),
        os: "linux".to_string(),
        variant,
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A layer as the store sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub compression: Compression,
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_media_type(mt: &str) -> Result<Self, OciError> {
        match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
            other => Err(OciError::UnsupportedMediaType(other.to_string())),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// A parsed, validated image manifest.
#[derive(Clone, Debug)]
pub struct ImageManifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Layer>,
}

impl ImageManifest {
    pub fn total_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum::<u64>() + self.config.size.max(0) as u64
    }
}

/// What a manifest endpoint returned.
#[derive(Debug)]
pub enum Document {
    Index(Vec<Descriptor>),
    Manifest(ImageManifest),
}

fn malformed(what: &'static str, reason: impl Into<String>) -> OciError {
    OciError::Malformed {
        what,
        reason: reason.into(),
    }
}

fn check_size(what: &'static str, size: usize, limit: usize) -> Result<(), OciError> {
    if size > limit {
        return Err(OciError::TooLarge {
            what,
            size: size as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

/// Parse a manifest or index; `header_type` is the Content-Type the registry sent, used when the
/// document itself has no `mediaType`.
pub fn parse_document(bytes: &[u8], header_type: Option<&str>) -> Result<Document, OciError> {
    check_size("manifest", bytes.len(), MAX_MANIFEST_BYTES)?;
    let raw: RawDocument =
        serde_json::from_slice(bytes).map_err(|e| malformed("manifest", e.to_string()))?;
    if raw.schema_version != Some(2) {
        return Err(malformed(
            "manifest",
            format!("schemaVersion {:?}, expected 2", raw.schema_version),
        ));
    }
    let media_type = raw
        .media_type
        .clone()
        .or_else(|| header_type.map(str::to_string))
        .unwrap_or_else(|| {
            if raw.manifests.is_some() {
                MT_OCI_INDEX
            } else {
                MT_OCI_MANIFEST
            }
            .to_string()
        });
    match media_type.as_str() {
        MT_OCI_INDEX | MT_DOCKER_LIST => {
            let manifests = raw
                .manifests
                .ok_or_else(|| malformed("index", "no manifests"))?;
            check_size("index entry count", manifests.len(), MAX_INDEX_ENTRIES)?;
            for m in &manifests {
                Digest::parse(&m.digest)?;
            }
            Ok(Document::Index(manifests))
        }
        MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or_else(|| malformed("manifest", "no config"))?;
            Digest::parse(&config.digest)?;
            if config.size < 0 || config.size as usize > MAX_MANIFEST_BYTES {
                return Err(OciError::TooLarge {
                    what: "image config",
                    size: config.size.max(0) as u64,
                    limit: MAX_MANIFEST_BYTES as u64,
                });
            }
            let raw_layers = raw.layers.unwrap_or_default();
            check_size("layer count", raw_layers.len(), MAX_LAYERS)?;
            let mut layers = Vec::with_capacity(raw_layers.len());
            for l in raw_layers {
                let digest = Digest::parse(&l.digest)?;
                if l.size < 0 || l.size as u64 > MAX_LAYER_BYTES {
                    return Err(OciError::TooLarge {
                        what: "layer",
                        size: l.size.max(0) as u64,
                        limit: MAX_LAYER_BYTES,
                    });
                }
                let compression = Compression::from_media_type(&l.media_type)?;
                layers.push(Layer {
                    digest,
                    size: l.size as u64,
                    media_type: l.media_type,
                    compression,
                    annotations: l.annotations.unwrap_or_default(),
                });
            }
            Ok(Document::Manifest(ImageManifest {
                media_type,
                config,
                layers,
            }))
        }
        other => Err(OciError::UnsupportedMediaType(other.to_string())),
    }
}

/// Pick the manifest for `want` from an index: exact os/arch, variant preferred when given.
pub fn select_platform<'a>(
    entries: &'a [Descriptor],
    want: &Platform,
) -> Result<&'a Descriptor, OciError> {
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
                && matches!(
                    d.media_type.as_str(),
                    MT_OCI_MANIFEST | MT_DOCKER_MANIFEST | ""
                )
        })
        .collect();
    let exact = candidates
        .iter()
        .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_ref()) == want.variant.as_ref());
    exact
        .or(candidates.first())
        .copied()
        .ok_or_else(|| OciError::NoPlatform {
            platform: want.to_string(),
            available: entries
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The parts of an image config the service needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub user: String,
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    config: Option<RawRunConfig>,
    rootfs: Option<RawRootfs>,
}
#[derive(Deserialize)]
struct RawRunConfig {
    #[serde(rename = "User", default)]
    user: Option<String>,
}
#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

pub fn parse_config(bytes: &[u8], layer_count: usize) -> Result<ImageConfig, OciError> {
    check_size("image config", bytes.len(), MAX_MANIFEST_BYTES)?;
    let raw: RawConfig =
        serde_json::from_slice(bytes).map_err(|e| malformed("image config", e.to_string()))?;
    let rootfs = raw
        .rootfs
        .ok_or_else(|| malformed("image config", "no rootfs"))?;
    let diff_ids = rootfs
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    if diff_ids.len() != layer_count {
        return Err(OciError::LayerCountMismatch {
            diff_ids: diff_ids.len(),
            layers: layer_count,
        });
    }
    Ok(ImageConfig {
        user: raw.config.and_then(|c| c.user).unwrap_or_default(),
        diff_ids,
    })
}

/// CRI's view of the config `User`: a numeric uid, or a user name, or neither.
/// `user:group` forms use the user part.
pub fn split_user(user: &str) -> (Option<i64>, String) {
    if user.is_empty() {
        return (None, String::new());
    }
    let u = user.split(':').next().unwrap_or_default();
    match u.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, u.to_string()),
    }
}

/// An image list: one reference per line, `#` comments and blank lines ignored; `-` is stdin.
pub fn read_image_list(path: &std::path::Path) -> std::io::Result<Vec<String>> {
    use std::io::BufRead;
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(path)?))
    };
    let mut out = vec![];
    for line in reader.lines() {
        let line = line?;
        let line = line.split('#').next().unwrap_or_default().trim();
        if !line.is_empty() {
            out.push(line.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn digest_validation() {
        assert!(Digest::parse(D1).is_ok());
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&D1.to_uppercase()).is_err());
        assert!(Digest::parse("md5:1111").is_err());
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn reference_normalisation() {
        let r = parse_reference("busybox").unwrap();
        assert_eq!(repo_name(&r), "docker.io/library/busybox");
        assert_eq!(tag_name(&r).unwrap(), "docker.io/library/busybox:latest");
        let r = parse_reference("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(tag_name(&r).unwrap(), "127.0.0.1:5000/a/b:v1");
        let r = parse_reference(&format!("quay.io/x/y:t@{D1}")).unwrap();
        assert_eq!(tag_name(&r), None, "pull by digest adds no tag");
        assert!(parse_reference("UPPER/case").is_err());
        assert!(parse_reference("").is_err());
        assert!(parse_reference("a@sha256:12").is_err());
    }

    fn manifest_json(layers: usize) -> String {
        let ls: Vec<String> = (0..layers)
            .map(|_| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":10}}"#))
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{MT_OCI_MANIFEST}","config":{{"mediaType":"{MT_OCI_CONFIG}","digest":"{D1}","size":5}},"layers":[{}]}}"#,
            ls.join(",")
        )
    }

    #[test]
    fn parses_manifest_and_limits() {
        match parse_document(manifest_json(2).as_bytes(), None).unwrap() {
            Document::Manifest(m) => {
                assert_eq!(m.layers.len(), 2);
                assert_eq!(m.layers[0].compression, Compression::Gzip);
                assert_eq!(m.total_size(), 25);
            }
            _ => panic!("expected manifest"),
        }
        assert!(matches!(
            parse_document(manifest_json(MAX_LAYERS + 1).as_bytes(), None),
            Err(OciError::TooLarge { .. })
        ));
        assert!(parse_document(b"{not json", None).is_err());
        assert!(parse_document(br#"{"schemaVersion":1}"#, None).is_err());
        let bad_mt = manifest_json(1).replace("tar+gzip", "tar+lz4");
        assert!(matches!(
            parse_document(bad_mt.as_bytes(), None),
            Err(OciError::UnsupportedMediaType(_))
        ));
        let huge = manifest_json(1).replace("\"size\":10", "\"size\":99999999999999999");
        assert!(matches!(
            parse_document(huge.as_bytes(), None),
            Err(OciError::TooLarge { .. })
        ));
    }

    #[test]
    fn selects_platform() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MT_OCI_INDEX}","manifests":[
            {{"mediaType":"{MT_OCI_MANIFEST}","digest":"{D1}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{MT_OCI_MANIFEST}","digest":"{D2}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Document::Index(entries) = parse_document(idx.as_bytes(), None).unwrap() else {
            panic!()
        };
        let amd = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(select_platform(&entries, &amd).unwrap().digest, D2);
        let arm = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(select_platform(&entries, &arm).unwrap().digest, D1);
        let s390 = Platform {
            architecture: "s390x".into(),
            os: "linux".into(),
            variant: None,
        };
        let err = select_platform(&entries, &s390).unwrap_err().to_string();
        assert!(err.contains("linux/amd64"), "{err}");
    }

    #[test]
    fn config_user_and_diff_ids() {
        let cfg = format!(
            r#"{{"config":{{"User":"1234:5"}},"rootfs":{{"type":"layers","diff_ids":["{D1}"]}}}}"#
        );
        let c = parse_config(cfg.as_bytes(), 1).unwrap();
        assert_eq!(split_user(&c.user), (Some(1234), String::new()));
        assert_eq!(split_user("app"), (None, "app".to_string()));
        assert_eq!(split_user(""), (None, String::new()));
        assert!(matches!(
            parse_config(cfg.as_bytes(), 2),
            Err(OciError::LayerCountMismatch { .. })
        ));
    }
}
