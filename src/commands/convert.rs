//! `lazypull convert SRC DST`: convert an image to eStargz or zstd:chunked and push it.
//!
//! SRC and DST are registry references or OCI image layouts (`oci:DIR[:TAG]`). Every layer is
//! fetched (verified against its digest), decompressed (verified against the config's diff
//! ID), rewritten by [`crate::convert`] and pushed with a new config and manifest. The files to
//! prefetch come from `--prefetch-files` or from `--record -- CMD`, which runs CMD chrooted in
//! a lazy mount of SRC and keeps the files the daemon's FUSE layer saw opened.

use crate::cli::ConvertArgs;
use crate::config::Config;
use crate::convert::{self, ConvertedLayer, LayerOptions};
use crate::oci::{self, Digest, Platform, Reference};
use crate::registry::{OpCreds, Registry, auth::Secret};
use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Where an image is.
#[derive(Clone, Debug)]
pub enum Location {
    Layout { dir: PathBuf, tag: Option<String> },
    Remote(Reference),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Layout { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                match tag {
                    Some(t) => write!(f, ":{t}"),
                    None => Ok(()),
                }
            }
            Location::Remote(r) => write!(f, "{r}"),
        }
    }
}

/// `oci:DIR[:TAG]` or a registry reference.
pub fn parse_location(s: &str) -> anyhow::Result<Location> {
    if let Some(rest) = s.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
            _ => (rest, None),
        };
        if dir.is_empty() {
            bail!("{s:?}: want oci:DIR[:TAG]");
        }
        return Ok(Location::Layout {
            dir: PathBuf::from(dir),
            tag,
        });
    }
    Ok(Location::Remote(
        oci::parse_reference(s).map_err(|e| anyhow::anyhow!("{s:?}: {e}"))?,
    ))
}

/// A source image: its manifest's parts, and where its layers come from.
pub struct SourceImage {
    pub manifest_annotations: Option<Value>,
    pub config: Vec<u8>,
    pub layers: Vec<oci::Layer>,
    pub diff_ids: Vec<Digest>,
}

fn parse_platform(s: &str) -> anyhow::Result<Platform> {
    let mut it = s.split('/');
    let (Some(os), Some(arch)) = (it.next(), it.next()) else {
        bail!("--platform {s:?}: want OS/ARCH[/VARIANT]");
    };
    Ok(Platform {
        os: os.to_string(),
        architecture: arch.to_string(),
        variant: it.next().map(str::to_string),
    })
}

fn layout_blob(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs/sha256").join(d.hex())
}

fn read_layout_blob(dir: &Path, d: &Digest, limit: usize) -> anyhow::Result<Vec<u8>> {
    let path = layout_blob(dir, d);
    let len = std::fs::metadata(&path)
        .with_context(|| format!("{d} is not in the layout {}", dir.display()))?
        .len();
    if len > limit as u64 {
        bail!(
            "{} is {len} bytes, over the limit of {limit}",
            path.display()
        );
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if Digest::of(&bytes) != *d {
        bail!("{} does not match its digest", path.display());
    }
    Ok(bytes)
}

/// The manifest of `loc` (an index resolved to `platform`) and its config.
async fn read_source(
    loc: &Location,
    registry: &Registry,
    creds: &OpCreds,
    platform: &Platform,
) -> anyhow::Result<SourceImage> {
    let (mut bytes, mut media_type) = match loc {
        Location::Layout { dir, tag } => {
            let index: Value = serde_json::from_slice(
                &std::fs::read(dir.join("index.json"))
                    .with_context(|| format!("{} is not an OCI image layout", dir.display()))?,
            )
            .context("index.json")?;
            let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
            let pick = match tag {
                Some(t) => manifests
                    .iter()
                    .find(|m| m["annotations"][REF_NAME_ANNOTATION].as_str() == Some(t)),
                None if manifests.len() == 1 => manifests.first(),
                None => bail!(
                    "{} holds {} images: name one as oci:DIR:TAG",
                    dir.display(),
                    manifests.len()
                ),
            };
            let desc = pick.with_context(|| format!("no image {loc} in the layout"))?;
            let d = Digest::parse(desc["digest"].as_str().unwrap_or_default())?;
            (
                read_layout_blob(dir, &d, oci::MAX_MANIFEST_BYTES)?,
                desc["mediaType"].as_str().map(str::to_string),
            )
        }
        Location::Remote(r) => {
            let (b, _) = registry.fetch_manifest(r, None, creds).await?;
            (b.to_vec(), None)
        }
    };
    let manifest = loop {
        match oci::parse_document(&bytes, media_type.as_deref())? {
            oci::Document::Manifest(m) => break m,
            oci::Document::Index(entries) => {
                let d = oci::select_platform(&entries, platform)?;
                let digest = Digest::parse(&d.digest)?;
                media_type = Some(d.media_type.clone());
                bytes = match loc {
                    Location::Layout { dir, .. } => {
                        read_layout_blob(dir, &digest, oci::MAX_MANIFEST_BYTES)?
                    }
                    Location::Remote(r) => registry
                        .fetch_manifest(r, Some(&digest), creds)
                        .await?
                        .0
                        .to_vec(),
                };
            }
        }
    };
    let raw: Value = serde_json::from_slice(&bytes)?;
    let config_digest = Digest::parse(&manifest.config.digest)?;
    let config = match loc {
        Location::Layout { dir, .. } => {
            read_layout_blob(dir, &config_digest, oci::MAX_MANIFEST_BYTES)?
        }
        Location::Remote(r) => {
            registry
                .fetch_small_blob(r, &config_digest, oci::MAX_MANIFEST_BYTES, creds)
                .await?
        }
    };
    let parsed = oci::parse_config(&config, manifest.layers.len())?;
    Ok(SourceImage {
        manifest_annotations: raw.get("annotations").cloned(),
        config,
        layers: manifest.layers,
        diff_ids: parsed.diff_ids,
    })
}

/// Make the layer blob available as a local file, verified against its digest.
async fn fetch_layer(
    loc: &Location,
    registry: &Registry,
    creds: &OpCreds,
    layer: &oci::Layer,
    work: &Path,
) -> anyhow::Result<PathBuf> {
    match loc {
        Location::Layout { dir, .. } => {
            let path = layout_blob(dir, &layer.digest);
            let p = path.clone();
            let d = layer.digest.clone();
            let actual = tokio::task::spawn_blocking(move || -> anyhow::Result<Digest> {
                let mut f =
                    std::fs::File::open(&p).with_context(|| format!("{d} is not in the layout"))?;
                let mut h = crate::fetch::verify::HashWriter::default();
                std::io::copy(&mut f, &mut h)?;
                Ok(h.digest())
            })
            .await??;
            if actual != layer.digest {
                bail!(
                    "{} does not match its digest {}",
                    path.display(),
                    layer.digest
                );
            }
            Ok(path)
        }
        Location::Remote(r) => {
            let path = work.join(format!("src-{}", layer.digest.hex()));
            let body = registry.open_blob(r, &layer.digest, 0, None, creds).await?;
            let mut stream = body.stream;
            let mut out = tokio::fs::File::create(&path)
                .await
                .with_context(|| format!("creating {}", path.display()))?;
            let mut h = crate::fetch::verify::HashWriter::default();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.with_context(|| format!("fetching {}", layer.digest))?;
                std::io::Write::write_all(&mut h, &chunk)?;
                if h.bytes > layer.size {
                    bail!(
                        "{} is longer than the {} bytes its descriptor says",
                        layer.digest,
                        layer.size
                    );
                }
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            if h.digest() != layer.digest {
                bail!(
                    "{} does not match its digest (got {})",
                    layer.digest,
                    h.digest()
                );
            }
            Ok(path)
        }
    }
}

/// Write `bytes` or the file `from` into the layout as a blob (atomically).
fn put_layout_blob(dir: &Path, d: &Digest, from: Result<&Path, &[u8]>) -> anyhow::Result<()> {
    let dest = layout_blob(dir, d);
    if dest.exists() {
        return Ok(());
    }
    let tmp = dest.with_extension("tmp");
    match from {
        Ok(p) => {
            std::fs::copy(p, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
        }
        Err(b) => std::fs::write(&tmp, b).with_context(|| format!("writing {}", tmp.display()))?,
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}

/// Add (or replace) `tag` in the layout's index.
fn tag_layout(dir: &Path, tag: &str, manifest: &Digest, size: usize) -> anyhow::Result<()> {
    let path = dir.join("index.json");
    let mut index: Value = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).context("index.json")?,
        Err(_) => json!({"schemaVersion": 2, "mediaType": oci::MT_OCI_INDEX, "manifests": []}),
    };
    let mut manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION].as_str() != Some(tag));
    manifests.push(json!({
        "mediaType": oci::MT_OCI_MANIFEST,
        "digest": manifest.to_string(),
        "size": size,
        "annotations": {REF_NAME_ANNOTATION: tag},
    }));
    index["manifests"] = Value::Array(manifests);
    let tmp = dir.join("index.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&index)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Paths from a prefetch list: one per line, `#` comments, absolute or relative to the root.
pub fn parse_prefetch_list(text: &str) -> anyhow::Result<Vec<String>> {
    let mut out = vec![];
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let p = crate::layer::estargz::clean_path(line)
            .map_err(|e| anyhow::anyhow!("prefetch list: {line:?}: {e}"))?;
        if !p.is_empty() && !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

pub async fn run(cfg: &Config, args: &ConvertArgs, secret: Option<Secret>) -> anyhow::Result<()> {
    let started = Instant::now();
    if !(4096..=1 << 30).contains(&args.chunk_size) {
        bail!(
            "--chunk-size {}: give 4096 to {} bytes",
            args.chunk_size,
            1u64 << 30
        );
    }
    let src = parse_location(&args.source)?;
    let dst = parse_location(&args.dest)?;
    let platform = match &args.platform {
        Some(p) => parse_platform(p)?,
        None => oci::host_platform(),
    };
    let registry = Registry::new(cfg.registry_options(secret));
    let creds = OpCreds::default();

    // Which files go first, per source layer digest (None: the same list for every layer).
    let mut per_layer: HashMap<Digest, Vec<String>> = HashMap::new();
    let mut common = vec![];
    if let Some(f) = &args.prefetch_files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        common = parse_prefetch_list(&text)?;
        println!("prefetch list: {} paths from {}", common.len(), f.display());
    }
    if args.record {
        let Location::Remote(r) = &src else {
            bail!(
                "--record mounts the source image through the daemon, which pulls from registries: push {src} first, or pass --prefetch-files"
            );
        };
        let recorded = super::record::record(
            cfg,
            r,
            &args.cmd,
            &args.record_timeout,
            args.fuse_mountpoint.clone(),
        )
        .await?;
        let total: usize = recorded.iter().map(|(_, v)| v.len()).sum();
        println!("recorded {total} files opened by {:?}", args.cmd.join(" "));
        if let Some(out) = &args.record_out {
            let mut text = String::new();
            for (_, paths) in &recorded {
                for p in paths {
                    text.push('/');
                    text.push_str(p);
                    text.push('\n');
                }
            }
            std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        }
        per_layer = recorded.into_iter().collect();
    }

    let image = read_source(&src, &registry, &creds, &platform).await?;
    let work_parent = args
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&work_parent)
        .with_context(|| format!("creating {}", work_parent.display()))?;
    let work = tempfile::Builder::new()
        .prefix("lazypull-convert-")
        .tempdir_in(&work_parent)
        .with_context(|| format!("creating a work directory in {}", work_parent.display()))?;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let level = args.compression_level.unwrap_or(match args.format {
        convert::Format::Estargz => 6,
        convert::Format::ZstdChunked => 3,
    });
    let mut converted: Vec<(ConvertedLayer, PathBuf)> = vec![];
    let n = image.layers.len();
    for (i, layer) in image.layers.iter().enumerate() {
        let t0 = Instant::now();
        let blob = fetch_layer(&src, &registry, &creds, layer, work.path()).await?;
        let tar = work.path().join(format!("layer-{i}.tar"));
        let out = work.path().join(format!("out-{i}"));
        let opts = LayerOptions {
            format: args.format,
            chunk_size: args.chunk_size,
            level,
            prefetch: per_layer
                .get(&layer.digest)
                .cloned()
                .unwrap_or_else(|| common.clone()),
            jobs,
        };
        let (compression, want_diff) = (layer.compression, image.diff_ids[i].clone());
        let (tar2, out2) = (tar.clone(), out.clone());
        let c = tokio::task::spawn_blocking(move || -> anyhow::Result<ConvertedLayer> {
            let (_, diff) = convert::decompress_to(&blob, compression, &tar2)?;
            if diff != want_diff {
                bail!("layer {i} decompresses to {diff}, but the config says {want_diff}");
            }
            Ok(convert::convert_layer(&tar2, &out2, &opts)?)
        })
        .await??;
        let _ = std::fs::remove_file(&tar);
        if matches!(src, Location::Remote(_)) {
            let _ = std::fs::remove_file(work.path().join(format!("src-{}", layer.digest.hex())));
        }
        println!(
            "layer {}/{n} {} {} ({}) -> {} {} ({} entries, {} to prefetch) in {:.1?}",
            i + 1,
            super::short_id(layer.digest.as_str()),
            super::human_bytes(layer.size),
            layer.compression.name(),
            super::short_id(c.digest.as_str()),
            super::human_bytes(c.size),
            c.entries,
            c.prefetched,
            t0.elapsed()
        );
        converted.push((c, out));
    }

    // The config with the new diff IDs; the manifest with the new layers.
    let mut config: Value = serde_json::from_slice(&image.config).context("image config")?;
    config["rootfs"]["diff_ids"] = Value::Array(
        converted
            .iter()
            .map(|(c, _)| Value::String(c.diff_id.to_string()))
            .collect(),
    );
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = Digest::of(&config_bytes);
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_OCI_MANIFEST,
        "config": {
            "mediaType": oci::MT_OCI_CONFIG,
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": converted.iter().map(|(c, _)| json!({
            "mediaType": c.media_type,
            "digest": c.digest.to_string(),
            "size": c.size,
            "annotations": c.annotations,
        })).collect::<Vec<_>>(),
    });
    if let Some(a) = &image.manifest_annotations {
        manifest["annotations"] = a.clone();
    }
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = Digest::of(&manifest_bytes);

    match &dst {
        Location::Layout { dir, tag } => {
            std::fs::create_dir_all(dir.join("blobs/sha256"))
                .with_context(|| format!("creating {}", dir.display()))?;
            let marker = dir.join("oci-layout");
            if !marker.exists() {
                std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            }
            for (c, path) in &converted {
                put_layout_blob(dir, &c.digest, Ok(path))?;
            }
            put_layout_blob(dir, &config_digest, Err(&config_bytes))?;
            put_layout_blob(dir, &manifest_digest, Err(&manifest_bytes))?;
            tag_layout(
                dir,
                tag.as_deref().unwrap_or("latest"),
                &manifest_digest,
                manifest_bytes.len(),
            )?;
        }
        Location::Remote(r) => {
            let mut sent = 0u64;
            for (c, path) in &converted {
                if registry.push_blob_file(r, &c.digest, path, &creds).await? {
                    sent += c.size;
                }
            }
            let cfg_path = work.path().join("config.json");
            std::fs::write(&cfg_path, &config_bytes)?;
            registry
                .push_blob_file(r, &config_digest, &cfg_path, &creds)
                .await?;
            registry
                .push_manifest(r, manifest_bytes.clone(), oci::MT_OCI_MANIFEST, &creds)
                .await?;
            println!("pushed {} of layers", super::human_bytes(sent));
        }
    }
    println!(
        "converted {src} to {} as {} ({manifest_digest}) in {:.1?}",
        dst,
        match args.format {
            convert::Format::Estargz => "eStargz",
            convert::Format::ZstdChunked => "zstd:chunked",
        },
        started.elapsed()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_lists() {
        match parse_location("oci:/tmp/x:v1").unwrap() {
            Location::Layout { dir, tag } => {
                assert_eq!(dir, PathBuf::from("/tmp/x"));
                assert_eq!(tag.as_deref(), Some("v1"));
            }
            _ => panic!(),
        }
        match parse_location("oci:rel/dir").unwrap() {
            Location::Layout { tag, .. } => assert_eq!(tag, None),
            _ => panic!(),
        }
        assert!(matches!(
            parse_location("127.0.0.1:5000/a:b").unwrap(),
            Location::Remote(_)
        ));
        assert!(parse_location("oci:").is_err());
        assert_eq!(
            parse_prefetch_list("/usr/bin/python3\n# c\n usr/lib/x.so \n/usr/bin/python3\n")
                .unwrap(),
            vec!["usr/bin/python3", "usr/lib/x.so"]
        );
        assert!(parse_prefetch_list("../etc/passwd").is_err());
    }
}
