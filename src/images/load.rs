//! Load: register the images of an archive (`lazypull load`) without a registry.

use super::*;

/// Check each layer the store lacks against its digest and diff_id, then move it from the
/// archive's staging directory into the store under its final name.
fn publish_layers(
    archive: &crate::import::Archive,
    layout: &Layout,
    layers: &[oci::Layer],
    diff_ids: &[Digest],
) -> std::result::Result<(), crate::import::ImportError> {
    use crate::import::ImportError;
    use std::io::Read;
    let layer_err = |d: &Digest, reason: String| ImportError::Layer {
        digest: d.to_string(),
        reason,
    };
    for (l, diff_id) in layers.iter().zip(diff_ids) {
        if layout.has_blob(&l.digest) {
            continue;
        }
        let staged = archive
            .blob(&l.digest)
            .ok_or_else(|| ImportError::Missing {
                what: "layer",
                digest: l.digest.to_string(),
            })?;
        if staged.size != l.size {
            return Err(layer_err(
                &l.digest,
                format!("{} bytes, the manifest says {}", staged.size, l.size),
            ));
        }
        let io = |source| ImportError::Io {
            path: format!("layer {}", l.digest),
            source,
        };
        let mut v = crate::fetch::verify::Verifier::new(l.compression)
            .map_err(|e| layer_err(&l.digest, e.to_string()))?;
        let mut f = std::fs::File::open(&staged.path).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n])
                .map_err(|e| layer_err(&l.digest, e.to_string()))?;
        }
        let (blob, diff) = v
            .finish()
            .map_err(|e| layer_err(&l.digest, e.to_string()))?;
        if blob != l.digest {
            return Err(layer_err(
                &l.digest,
                format!("the archive's file is {blob}"),
            ));
        }
        if &diff != diff_id {
            return Err(layer_err(
                &l.digest,
                format!("uncompressed digest {diff} does not match the config's diff_id {diff_id}"),
            ));
        }
        std::fs::rename(&staged.path, layout.blob(&l.digest)).map_err(io)?;
    }
    crate::store::sync_dir(&layout.blobs_dir()).map_err(|source| ImportError::Io {
        path: layout.blobs_dir().display().to_string(),
        source,
    })
}

impl Images {
    /// Register the images of an archive (`docker save`, an OCI layout as a tar stream; gzip or
    /// zstd compressed) without a registry: every layer is checked against its digest and
    /// diff_id, stored complete, and plain layers are unpacked, as after a full pull.
    pub async fn load(
        &self,
        r: Box<dyn std::io::Read + Send>,
        opts: LoadOptions,
    ) -> Result<Vec<Loaded>> {
        let staging = self.layout.blobs_dir();
        let archive = tokio::task::spawn_blocking(move || {
            crate::import::Archive::read(crate::import::decompressed(r)?, &staging)
        })
        .await
        .map_err(|_| ImagesError::ShuttingDown)??;
        let found = archive.images(opts.tag.as_deref(), opts.name.as_deref())?;
        tracing::info!(images = found.len(), bytes = archive.bytes, "archive read");
        let archive = Arc::new(archive);
        let mut out = vec![];
        for f in found {
            out.push(self.load_one(&archive, f).await?);
        }
        Ok(out)
    }

    async fn load_one(
        &self,
        archive: &Arc<crate::import::Archive>,
        f: crate::import::FoundImage,
    ) -> Result<Loaded> {
        let manifest = f.parsed()?;
        let (config_digest, config_bytes) = archive.config(&f)?;
        let config = oci::parse_config(&config_bytes, manifest.layers.len())?;
        let refs = f
            .names
            .iter()
            .map(|n| oci::parse_reference(n))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let Some(first) = refs.first() else {
            return Err(crate::import::ImportError::Unnamed {
                manifest: f.manifest_digest.to_string(),
            }
            .into());
        };
        let repo = oci::repo_name(first);
        let _gc = self.gc_lock.read().await;
        let (a, layout, layers, diffs) = (
            Arc::clone(archive),
            self.layout.clone(),
            manifest.layers.clone(),
            config.diff_ids.clone(),
        );
        tokio::task::spawn_blocking(move || publish_layers(&a, &layout, &layers, &diffs))
            .await
            .map_err(|_| ImagesError::ShuttingDown)??;
        if let Some((d, bytes)) = &f.index {
            self.layout.put_blob(d, bytes)?;
        }
        self.layout.put_blob(&f.manifest_digest, &f.manifest)?;
        self.layout.put_blob(&config_digest, &config_bytes)?;
        let repo_digest = f.index.as_ref().map_or(&f.manifest_digest, |(d, _)| d);
        let mut names = vec![];
        for r in &refs {
            let digest_name = (
                oci::digest_name(&oci::repo_name(r), repo_digest),
                NameKind::Digest,
            );
            if !names.contains(&digest_name) {
                names.push(digest_name);
            }
            if let Some(t) = oci::tag_name(r) {
                names.push((t, NameKind::Tag));
            }
        }
        let already_local = lock(&self.db)
            .image(config_digest.as_str())?
            .is_some_and(|i| i.complete());
        {
            let mut db = lock(&self.db);
            db.insert_image(&NewImage {
                id: &config_digest,
                manifest_digest: &f.manifest_digest,
                index_digest: f.index.as_ref().map(|(d, _)| d),
                media_type: &manifest.media_type,
                size: manifest.total_size() + f.manifest.len() as u64,
                user: &config.user,
                source: &repo,
                layers: manifest
                    .layers
                    .iter()
                    .zip(&config.diff_ids)
                    .map(|(l, diff)| NewLayer {
                        digest: &l.digest,
                        media_type: l.media_type.as_str(),
                        size: l.size,
                        diff_id: diff,
                        toc_digest: None,
                        toc_position: None,
                    })
                    .collect(),
                names,
            })?;
            for l in &manifest.layers {
                db.set_filled(l.digest.as_str(), l.size)?;
                db.set_layer_state(l.digest.as_str(), crate::store::LayerState::Complete, None)?;
            }
        }
        drop(_gc);
        let img = lock(&self.db)
            .image(config_digest.as_str())?
            .ok_or(ImagesError::ShuttingDown)?;
        // Unpacks the plain layers into the file cache (mountable), as a full pull does.
        self.start_fills(&img, None, PullMode::Full, &f.names[0])
            .await?;
        tracing::info!(image = %img.id, names = ?f.names, layers = img.layers.len(), already_local, "image loaded from an archive");
        Ok(Loaded {
            id: img.id.clone(),
            names: f.names.clone(),
            layers: img.layers.len(),
            size: img.size,
            already_local,
        })
    }
}
