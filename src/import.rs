//! Images from archives, without a registry (`lazypull load`): `docker save` tarballs (the
//! classic form with `manifest.json` and `<id>/layer.tar`, and docker 25's OCI layout inside),
//! OCI image layout archives (`skopeo copy … oci-archive:FILE`) and OCI layout directories
//! (read as a tar stream of the directory).
//!
//! The archive is read once, in order, as a stream, so it can come through a pipe or the
//! daemon's socket: every regular file is staged in the store while its sha256 is computed,
//! and the documents that say what the images are (`index.json`, `manifest.json`) are read at
//! the end, whatever their place in the archive. A file under `blobs/sha256/` must hash to its
//! name. What the images are made of is then checked by [`crate::images::Images::load`] before
//! anything is stored as complete: each layer against its digest and its config's diff_id.

use crate::oci::{self, Digest, Document};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

/// Entries one archive may hold (a docker save of a 500-layer image has about 1 500).
pub const MAX_ENTRIES: usize = 100_000;
/// Images one archive may name.
pub const MAX_IMAGES: usize = 1000;
const MAX_PATH: usize = 4096;
/// Symlinks followed when resolving one path (docker save links identical layers).
const MAX_LINK_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a readable tar archive: {0}")]
    Tar(std::io::Error),
    #[error("archive entry {path:?}: {reason}")]
    Entry { path: String, reason: String },
    #[error("archive entry {path} holds {actual}, not the digest its name says")]
    WrongDigest { path: String, actual: Digest },
    #[error("more than {MAX_ENTRIES} entries: refused")]
    TooManyEntries,
    #[error(
        "the archive holds no image: neither an OCI layout's index.json nor docker save's manifest.json"
    )]
    NoImages,
    #[error("the archive holds no image tagged {0:?}")]
    NoSuchTag(String),
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    #[error("the archive lacks {what} {digest}")]
    Missing { what: &'static str, digest: String },
    #[error(
        "image {manifest} of the archive has no name: give one with --name REF (or tag it when saving)"
    )]
    Unnamed { manifest: String },
    #[error("--name names one image, but the archive holds {0}: select one with oci:DIR:TAG")]
    NameForMany(usize),
    #[error("layer {digest}: {reason}")]
    Layer { digest: String, reason: String },
    #[error(transparent)]
    Oci(#[from] oci::OciError),
}

type Result<T> = std::result::Result<T, ImportError>;

fn malformed(what: impl Into<String>, reason: impl ToString) -> ImportError {
    ImportError::Malformed {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// A regular file of the archive, staged in the store.
#[derive(Debug, Clone)]
pub struct Staged {
    pub digest: Digest,
    pub size: u64,
    pub path: PathBuf,
}

/// What one archive held, staged next to the store's blobs (the staging directory goes when
/// this value does; published blobs have been renamed out of it).
pub struct Archive {
    _dir: tempfile::TempDir,
    files: HashMap<String, Staged>,
    by_digest: HashMap<Digest, String>,
    /// Symlinks and hard links: path → target path, both relative to the archive's root.
    links: HashMap<String, String>,
    /// Bytes of regular files read.
    pub bytes: u64,
}

/// `p` as a clean relative path ("a/b"), or `None` if it is absolute or climbs out.
fn clean(p: &Path) -> Option<String> {
    let mut parts: Vec<&str> = vec![];
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// A symlink's target, as a path from the archive's root (relative targets resolve against the
/// link's directory; absolute ones against the root).
fn link_target(link: &str, target: &Path) -> Option<String> {
    if target.is_absolute() {
        return clean(target.strip_prefix("/").ok()?);
    }
    let parent = Path::new(link).parent().unwrap_or(Path::new(""));
    clean(&parent.join(target))
}

/// The archive's bytes as a tar stream: gzip and zstd compressed archives (`docker save |
/// gzip`) are decompressed on the way.
pub fn decompressed(r: impl Read + Send + 'static) -> Result<Box<dyn Read + Send>> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let head = r.fill_buf().map_err(ImportError::Tar)?;
    Ok(match head {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(r)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(ImportError::Tar)?)
        }
        _ => Box::new(r),
    })
}

/// Whether `head` (the first bytes of a file) starts a tar archive or a gzip/zstd stream,
/// rather than a text list of image references.
pub fn looks_like_archive(head: &[u8]) -> bool {
    head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || head.get(257..262) == Some(b"ustar")
}

/// Stage `r` as a file in `dir`, hashing it on the way.
fn stage(dir: &Path, n: usize, r: &mut impl Read) -> std::io::Result<Staged> {
    let path = dir.join(n.to_string());
    let mut f = std::fs::File::create(&path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..k]);
        f.write_all(&buf[..k])?;
        size += k as u64;
    }
    Ok(Staged {
        digest: Digest::from_sha256(&h.finalize()),
        size,
        path,
    })
}

/// The digest a blob path of an OCI layout names (`blobs/sha256/<hex>`), if it is one.
fn named_digest(path: &str) -> Option<std::result::Result<Digest, ()>> {
    let rest = path.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    Some(Digest::parse(&format!("{alg}:{hex}")).map_err(|_| ()))
}

impl Archive {
    /// Read a tar stream to its end, staging its regular files in a new directory under
    /// `staging_parent` (on the store's filesystem, so that blobs are published by rename).
    pub fn read(r: impl Read, staging_parent: &Path) -> Result<Archive> {
        let dir = tempfile::Builder::new()
            .prefix(".tmp-import-")
            .tempdir_in(staging_parent)
            .map_err(|source| ImportError::Io {
                path: staging_parent.display().to_string(),
                source,
            })?;
        let mut a = Archive {
            files: HashMap::new(),
            by_digest: HashMap::new(),
            links: HashMap::new(),
            bytes: 0,
            _dir: dir,
        };
        let mut tar = tar::Archive::new(r);
        for (n, entry) in tar.entries().map_err(ImportError::Tar)?.enumerate() {
            if n >= MAX_ENTRIES {
                return Err(ImportError::TooManyEntries);
            }
            let mut entry = entry.map_err(ImportError::Tar)?;
            let raw = entry.path().map_err(ImportError::Tar)?.into_owned();
            let shown = raw.display().to_string();
            if shown.len() > MAX_PATH {
                return Err(ImportError::Entry {
                    path: shown.chars().take(80).collect(),
                    reason: "path too long".into(),
                });
            }
            let bad = |reason: &str| ImportError::Entry {
                path: shown.clone(),
                reason: reason.into(),
            };
            let kind = entry.header().entry_type();
            if kind.is_dir() || kind.is_pax_global_extensions() {
                continue;
            }
            // Entries that climb out of the archive are refused, as tar would.
            if raw.is_absolute() || raw.components().any(|c| c == Component::ParentDir) {
                return Err(bad("absolute or climbs out of the archive"));
            }
            let Some(path) = clean(&raw) else { continue };
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(ImportError::Tar)?
                    .ok_or_else(|| bad("a link without a target"))?
                    .into_owned();
                let target = if kind.is_symlink() {
                    link_target(&path, &target)
                } else {
                    clean(&target)
                }
                .ok_or_else(|| bad("link target outside the archive"))?;
                a.links.insert(path, target);
                continue;
            }
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                continue;
            }
            let staged = stage(a._dir.path(), n, &mut entry).map_err(|source| ImportError::Io {
                path: format!("staging {shown}"),
                source,
            })?;
            match named_digest(&path) {
                Some(Ok(d)) if d != staged.digest => {
                    return Err(ImportError::WrongDigest {
                        path,
                        actual: staged.digest,
                    });
                }
                Some(Err(())) => return Err(bad("a blob name that is not a sha256 digest")),
                _ => {}
            }
            a.bytes += staged.size;
            a.by_digest
                .entry(staged.digest.clone())
                .or_insert_with(|| path.clone());
            a.files.insert(path, staged);
        }
        Ok(a)
    }

    /// The staged file at `path`, following links.
    pub fn file(&self, path: &str) -> Option<&Staged> {
        let mut p = clean(Path::new(path))?;
        for _ in 0..MAX_LINK_DEPTH {
            if let Some(s) = self.files.get(&p) {
                return Some(s);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }

    /// A staged file with these contents.
    pub fn blob(&self, d: &Digest) -> Option<&Staged> {
        self.files.get(self.by_digest.get(d)?)
    }

    /// A small document (index, manifest, config) by path, bounded like a registry's.
    fn small(&self, s: &Staged, what: &str) -> Result<Vec<u8>> {
        if s.size > oci::MAX_MANIFEST_BYTES as u64 {
            return Err(malformed(
                what,
                format!("{} bytes, more than {}", s.size, oci::MAX_MANIFEST_BYTES),
            ));
        }
        std::fs::read(&s.path).map_err(|source| ImportError::Io {
            path: what.to_string(),
            source,
        })
    }

    fn small_blob(&self, d: &Digest, what: &'static str) -> Result<Vec<u8>> {
        let s = self.blob(d).ok_or_else(|| ImportError::Missing {
            what,
            digest: d.to_string(),
        })?;
        self.small(s, what)
    }

    /// The images the archive holds. `tag` selects one (an OCI layout's `ref.name`, or a
    /// docker save's repository tag); `name` names the (only) image, replacing its names.
    pub fn images(&self, tag: Option<&str>, name: Option<&str>) -> Result<Vec<FoundImage>> {
        let docker = match self.file("manifest.json") {
            Some(s) => Some(parse_docker_manifest(&self.small(s, "manifest.json")?)?),
            None => None,
        };
        let mut found = match self.file("index.json") {
            Some(s) => self.oci_images(&self.small(s, "index.json")?, docker.as_deref())?,
            None => match &docker {
                Some(entries) => self.docker_images(entries)?,
                None => return Err(ImportError::NoImages),
            },
        };
        if let Some(t) = tag {
            found.retain(|f| f.tags.iter().any(|x| x == t) || f.names.iter().any(|n| n == t));
            if found.is_empty() {
                return Err(ImportError::NoSuchTag(t.to_string()));
            }
        }
        if found.is_empty() {
            return Err(ImportError::NoImages);
        }
        if found.len() > MAX_IMAGES {
            return Err(malformed(
                "the archive",
                format!("{} images, more than {MAX_IMAGES}", found.len()),
            ));
        }
        if let Some(n) = name {
            if found.len() > 1 {
                return Err(ImportError::NameForMany(found.len()));
            }
            let r = oci::parse_reference(n)?;
            found[0].names = vec![r.to_string()];
        }
        for f in &found {
            if f.names.is_empty() {
                return Err(ImportError::Unnamed {
                    manifest: f.manifest_digest.to_string(),
                });
            }
        }
        Ok(found)
    }

    /// Images of an OCI layout: `index.json`'s entries, named by their annotations (or by
    /// the docker save `manifest.json` beside it, docker 25's form).
    fn oci_images(&self, index: &[u8], docker: Option<&[DockerEntry]>) -> Result<Vec<FoundImage>> {
        let entries = match oci::parse_document(index, Some(oci::MT_OCI_INDEX))? {
            Document::Index(e) => e,
            Document::Manifest(_) => return Err(malformed("index.json", "not an image index")),
        };
        let mut found: Vec<FoundImage> = vec![];
        for e in &entries {
            let ann = e.annotations.clone().unwrap_or_default();
            let ref_name = ann.get("org.opencontainers.image.ref.name");
            let mut names = vec![];
            let mut tags = vec![];
            if let Some(full) = ann.get("io.containerd.image.name") {
                names.push(oci::parse_reference(full)?.to_string());
            }
            if let Some(r) = ref_name {
                tags.push(r.clone());
                // A full reference (skopeo's oci-archive:FILE:busybox:latest) names the image;
                // a bare tag (`latest`) needs a repository from elsewhere.
                if (r.contains('/') || r.contains(':'))
                    && let Ok(parsed) = oci::parse_reference(r)
                {
                    names.push(parsed.to_string());
                }
            }
            let d = Digest::parse(&e.digest)?;
            let top = self.small_blob(&d, "manifest")?;
            let mut image = match oci::parse_document(&top, Some(&e.media_type))? {
                Document::Manifest(_) => FoundImage::new(None, d, top),
                Document::Index(platforms) => {
                    let want = oci::host_platform();
                    // Only the platforms whose manifest the archive holds (skopeo copies one
                    // unless --all).
                    let held: Vec<_> = platforms
                        .iter()
                        .filter(|p| {
                            Digest::parse(&p.digest).is_ok_and(|pd| self.blob(&pd).is_some())
                        })
                        .cloned()
                        .collect();
                    let entry =
                        oci::select_platform(&held, &want).map_err(|_| ImportError::Missing {
                            what: "the manifest for this node's platform in index",
                            digest: d.to_string(),
                        })?;
                    let md = Digest::parse(&entry.digest)?;
                    let bytes = self.small_blob(&md, "manifest")?;
                    match oci::parse_document(&bytes, Some(&entry.media_type))? {
                        Document::Manifest(_) => FoundImage::new(Some((d, top)), md, bytes),
                        Document::Index(_) => return Err(malformed("index", "nested index")),
                    }
                }
            };
            image.names = names;
            image.tags = tags;
            // Several index entries may name the same image (two tags): one image, both names.
            match found
                .iter_mut()
                .find(|f| f.manifest_digest == image.manifest_digest)
            {
                Some(f) => {
                    f.names.extend(image.names);
                    f.tags.extend(image.tags);
                }
                None => found.push(image),
            }
        }
        for f in &mut found {
            if let Some(entries) = docker {
                let config = f.config_digest()?;
                for de in entries {
                    if self.file(&de.config).is_some_and(|s| s.digest == config) {
                        for t in de.repo_tags.iter().flatten() {
                            f.names.push(oci::parse_reference(t)?.to_string());
                            f.tags.push(t.clone());
                        }
                    }
                }
            }
            f.names.sort();
            f.names.dedup();
        }
        Ok(found)
    }

    /// Images of a classic docker save: for each `manifest.json` entry, a docker v2 manifest
    /// made from its config and layer files (the layers as saved: uncompressed tars, or gzip).
    fn docker_images(&self, entries: &[DockerEntry]) -> Result<Vec<FoundImage>> {
        let mut found = vec![];
        for de in entries {
            let config = self
                .file(&de.config)
                .ok_or_else(|| malformed("manifest.json", format!("no file {:?}", de.config)))?;
            let mut layers = vec![];
            for l in &de.layers {
                let s = self
                    .file(l)
                    .ok_or_else(|| malformed("manifest.json", format!("no file {l:?}")))?;
                let mut head = [0u8; 4];
                let n = std::fs::File::open(&s.path)
                    .and_then(|mut f| f.read(&mut head))
                    .map_err(|source| ImportError::Io {
                        path: l.clone(),
                        source,
                    })?;
                let media_type = match &head[..n] {
                    [0x1f, 0x8b, ..] => "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.docker.image.rootfs.diff.tar.zstd",
                    _ => "application/vnd.docker.image.rootfs.diff.tar",
                };
                layers.push(serde_json::json!({
                    "mediaType": media_type, "size": s.size, "digest": s.digest.as_str(),
                }));
            }
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": oci::MT_DOCKER_MANIFEST,
                "config": {
                    "mediaType": oci::MT_DOCKER_CONFIG,
                    "size": config.size,
                    "digest": config.digest.as_str(),
                },
                "layers": layers,
            }))
            .map_err(|e| malformed("manifest.json", e))?;
            let mut image = FoundImage::new(None, Digest::of(&manifest), manifest);
            for t in de.repo_tags.iter().flatten() {
                image.names.push(oci::parse_reference(t)?.to_string());
                image.tags.push(t.clone());
            }
            found.push(image);
        }
        Ok(found)
    }
}

/// One entry of docker save's `manifest.json`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn parse_docker_manifest(bytes: &[u8]) -> Result<Vec<DockerEntry>> {
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(bytes).map_err(|e| malformed("manifest.json", e))?;
    if entries.len() > MAX_IMAGES {
        return Err(malformed(
            "manifest.json",
            format!("{} images, more than {MAX_IMAGES}", entries.len()),
        ));
    }
    for e in &entries {
        if e.layers.len() > oci::MAX_LAYERS {
            return Err(malformed(
                "manifest.json",
                format!("{} layers, more than {}", e.layers.len(), oci::MAX_LAYERS),
            ));
        }
    }
    Ok(entries)
}

/// One image of an archive: its documents (the index when the archive holds one for several
/// platforms), and its names.
#[derive(Debug, Clone)]
pub struct FoundImage {
    /// Full references (`docker.io/library/busybox:latest`).
    pub names: Vec<String>,
    /// What the archive calls it (`latest`, `busybox:latest`), for selection by tag.
    pub tags: Vec<String>,
    pub index: Option<(Digest, Vec<u8>)>,
    pub manifest_digest: Digest,
    pub manifest: Vec<u8>,
}

impl FoundImage {
    fn new(index: Option<(Digest, Vec<u8>)>, manifest_digest: Digest, manifest: Vec<u8>) -> Self {
        FoundImage {
            names: vec![],
            tags: vec![],
            index,
            manifest_digest,
            manifest,
        }
    }

    pub fn parsed(&self) -> Result<oci::ImageManifest> {
        match oci::parse_document(&self.manifest, None)? {
            Document::Manifest(m) => Ok(m),
            Document::Index(_) => Err(malformed("manifest", "an index where a manifest belongs")),
        }
    }

    fn config_digest(&self) -> Result<Digest> {
        Ok(Digest::parse(&self.parsed()?.config.digest)?)
    }
}

impl Archive {
    /// The image's config, from the archive.
    pub fn config(&self, img: &FoundImage) -> Result<(Digest, Vec<u8>)> {
        let d = img.config_digest()?;
        Ok((d.clone(), self.small_blob(&d, "config")?))
    }
}

/// A directory (an OCI layout) as a tar stream, written by a thread into a pipe.
pub fn tar_dir(dir: &Path) -> std::io::Result<impl Read + Send + 'static> {
    if !dir.join("index.json").is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: no index.json: not an OCI image layout", dir.display()),
        ));
    }
    let (r, w) = std::io::pipe()?;
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        // An error closes the pipe early: the reader then sees a truncated archive.
        if let Err(e) = b.append_dir_all(".", &dir).and_then(|()| b.finish()) {
            tracing::warn!(dir = %dir.display(), error = %e, "reading the OCI layout failed");
        }
    });
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        b.append_link(&mut h, path, target).unwrap();
    }

    fn layer_tar(file: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(vec![]);
        add(&mut b, file, data);
        b.into_inner().unwrap()
    }

    fn config(diff_ids: &[&Digest]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.as_str()).collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    /// A classic docker save with two images sharing one layer through a symlink.
    fn docker_save() -> Vec<u8> {
        let l = layer_tar("hello", b"hi");
        let ld = Digest::of(&l);
        let c = config(&[&ld]);
        let cd = Digest::of(&c);
        let mut b = tar::Builder::new(vec![]);
        add(&mut b, "aaa/layer.tar", &l);
        link(&mut b, "bbb/layer.tar", "../aaa/layer.tar");
        add(&mut b, &format!("{}.json", cd.hex()), &c);
        let manifest = serde_json::json!([
            {"Config": format!("{}.json", cd.hex()), "RepoTags": ["busybox:latest", "example.com/x/y:1"], "Layers": ["bbb/layer.tar"]},
        ]);
        add(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        b.into_inner().unwrap()
    }

    #[test]
    fn classic_docker_save_is_read_with_links_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::read(&docker_save()[..], dir.path()).unwrap();
        let found = a.images(None, None).unwrap();
        assert_eq!(found.len(), 1);
        let f = &found[0];
        assert_eq!(
            f.names,
            vec![
                "docker.io/library/busybox:latest".to_string(),
                "example.com/x/y:1".to_string()
            ]
        );
        let m = f.parsed().unwrap();
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].compression, oci::Compression::None);
        assert!(a.blob(&m.layers[0].digest).is_some());
        let (cd, c) = a.config(f).unwrap();
        assert_eq!(Digest::of(&c), cd);
        // Selection by the archive's own tag, and a name given by the user.
        assert_eq!(a.images(Some("busybox:latest"), None).unwrap().len(), 1);
        assert!(matches!(
            a.images(Some("nope"), None),
            Err(ImportError::NoSuchTag(_))
        ));
        let renamed = a.images(None, Some("reg.local/app:v2")).unwrap();
        assert_eq!(renamed[0].names, vec!["reg.local/app:v2".to_string()]);
    }

    fn oci_layout(ref_name: Option<&str>, lie: bool) -> Vec<u8> {
        let l = layer_tar("f", b"x");
        let ld = Digest::of(&l);
        let c = config(&[&ld]);
        let cd = Digest::of(&c);
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::MT_OCI_MANIFEST,
            "config": {"mediaType": oci::MT_OCI_CONFIG, "size": c.len(), "digest": cd.as_str()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": l.len(), "digest": ld.as_str()}],
        }))
        .unwrap();
        let md = Digest::of(&m);
        let mut entry = serde_json::json!({"mediaType": oci::MT_OCI_MANIFEST, "size": m.len(), "digest": md.as_str()});
        if let Some(r) = ref_name {
            entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": r});
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
        let mut b = tar::Builder::new(vec![]);
        add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add(&mut b, "index.json", &serde_json::to_vec(&index).unwrap());
        add(&mut b, &format!("blobs/sha256/{}", md.hex()), &m);
        add(&mut b, &format!("blobs/sha256/{}", cd.hex()), &c);
        let body: &[u8] = if lie { b"not the layer" } else { &l };
        add(&mut b, &format!("./blobs/sha256/{}", ld.hex()), body);
        b.into_inner().unwrap()
    }

    #[test]
    fn oci_layout_names_come_from_ref_name_or_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::read(&oci_layout(Some("quay.io/a/b:3"), false)[..], dir.path()).unwrap();
        let f = a.images(None, None).unwrap();
        assert_eq!(f[0].names, vec!["quay.io/a/b:3".to_string()]);
        // A bare tag names nothing by itself.
        let a = Archive::read(&oci_layout(Some("latest"), false)[..], dir.path()).unwrap();
        assert!(matches!(
            a.images(None, None),
            Err(ImportError::Unnamed { .. })
        ));
        let f = a.images(Some("latest"), Some("app")).unwrap();
        assert_eq!(f[0].names, vec!["docker.io/library/app:latest".to_string()]);
    }

    #[test]
    fn a_blob_that_is_not_its_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Archive::read(&oci_layout(Some("a/b:1"), true)[..], dir.path())
            .err()
            .unwrap();
        assert!(matches!(err, ImportError::WrongDigest { .. }), "{err}");
    }

    #[test]
    fn escaping_entries_and_non_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        let mut raw = vec![0u8; 1024 + 512];
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        raw[..512].copy_from_slice(h.as_bytes());
        let err = Archive::read(&raw[..], dir.path()).err().unwrap();
        assert!(matches!(err, ImportError::Entry { .. }), "{err}");
        assert!(!looks_like_archive(b"docker.io/library/busybox:latest\n"));
        assert!(looks_like_archive(&docker_save()));
        let empty = Archive::read(
            &tar::Builder::new(vec![]).into_inner().unwrap()[..],
            dir.path(),
        )
        .unwrap();
        assert!(matches!(
            empty.images(None, None),
            Err(ImportError::NoImages)
        ));
        // The staging directories went with their archives.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(empty);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn links_resolve_relative_and_absolute() {
        assert_eq!(
            link_target("b/layer.tar", Path::new("../a/layer.tar")).as_deref(),
            Some("a/layer.tar")
        );
        assert_eq!(
            link_target("b/layer.tar", Path::new("/a/x")).as_deref(),
            Some("a/x")
        );
        assert_eq!(link_target("b/l", Path::new("../../x")), None);
        assert_eq!(
            clean(Path::new("./blobs/sha256/ab")).as_deref(),
            Some("blobs/sha256/ab")
        );
    }
}
