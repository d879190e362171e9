//! Pull: register an image as soon as its manifest and config are verified, start its layers'
//! TOC fetches and fills (docs/architecture.md, "A pull").

use super::*;

/// How long a pull looks for a shared index before it goes on without one.
const INDEX_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections opened to the registry after a pull for a lazy start, for its parallel
/// requests (a start's prefetch and reads run up to about this many at once).
const WARM_CONNECTIONS: usize = 12;

/// A zstd:chunked layer's TOC checksum and position (a malformed pair is logged, and the layer
/// is then fetched whole like any zstd layer).
fn zstd_toc(l: &oci::Layer) -> Option<(Digest, crate::layer::zstd_chunked::Position)> {
    match crate::layer::zstd_chunked::from_annotations(&l.annotations)? {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(layer = %l.digest, error = %e, "zstd:chunked annotations refused; the layer is fetched whole");
            None
        }
    }
}

/// A plain gzip or zstd layer that a shared random-access index would make lazy.
fn wants_index(l: &crate::store::LayerRecord) -> bool {
    use crate::oci::Compression;
    matches!(l.form(), crate::store::Form::Plain)
        && !l.unpacked
        && Compression::from_media_type(&l.media_type)
            .is_ok_and(|c| matches!(c, Compression::Gzip | Compression::Zstd))
}

impl Images {
    /// Pull `reference`. Returns the image id (config digest).
    pub async fn pull(
        &self,
        reference: &str,
        request_creds: Option<Secret>,
        mode: PullMode,
    ) -> Result<PullOutcome> {
        let r = oci::parse_reference(reference)?;
        let started = Instant::now();
        let fut = self.pull_inner(&r, request_creds, mode);
        let result = match mode {
            // A full pull is bounded by the fill, which has its own retry budget.
            PullMode::Full => fut.await,
            PullMode::Lazy => tokio::time::timeout(self.pull_timeout, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(ImagesError::Timeout {
                        reference: r.to_string(),
                        timeout: self.pull_timeout,
                    })
                }),
        };
        self.release_pull_slot(&r.to_string());
        let out = result?;
        tracing::info!(image = %r, id = %out.id, ?mode, already_local = out.already_local,
            elapsed_ms = started.elapsed().as_millis() as u64, "image pulled");
        Ok(out)
    }

    /// Forget the per-name lock once no pull of that name holds or waits for it.
    fn release_pull_slot(&self, key: &str) {
        let mut locks = self.pull_locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.get(key).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(key);
        }
    }

    async fn pull_inner(
        &self,
        r: &Reference,
        request_creds: Option<Secret>,
        mode: PullMode,
    ) -> Result<PullOutcome> {
        let key = r.to_string();
        let name_lock = {
            let mut locks = self.pull_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let _one = name_lock.lock().await;
        let _gc = self.gc_lock.read().await;
        let repo = oci::repo_name(r);

        // Check local before pulling: a digest reference we hold needs no network at all.
        if let Some(d) = r.digest() {
            let existing =
                lock(&self.db).image_by_name(&oci::digest_name(&repo, &Digest::parse(d)?))?;
            if let Some(img) = existing {
                self.start_fills(&img, request_creds.clone(), mode, &key)
                    .await?;
                return Ok(PullOutcome {
                    id: img.id,
                    already_local: true,
                });
            }
        }
        let creds = self.op_creds(r.registry(), request_creds.clone());
        let (top_bytes, top_digest) = self.manifests.fetch_manifest(r, None, &creds).await?;
        let (index_digest, manifest_bytes, manifest_digest, manifest) =
            match oci::parse_document(&top_bytes, None)? {
                Document::Manifest(m) => (None, top_bytes, top_digest, m),
                Document::Index(entries) => {
                    let entry = oci::select_platform(&entries, &oci::host_platform())?;
                    let d = Digest::parse(&entry.digest)?;
                    let (bytes, got) = self.manifests.fetch_manifest(r, Some(&d), &creds).await?;
                    match oci::parse_document(&bytes, Some(&entry.media_type))? {
                        Document::Manifest(m) => {
                            self.layout.put_blob(&top_digest, &top_bytes)?;
                            (Some(top_digest), bytes, got, m)
                        }
                        Document::Index(_) => {
                            return Err(oci::OciError::Malformed {
                                what: "index",
                                reason: "nested index".into(),
                            }
                            .into());
                        }
                    }
                }
            };
        if mode != PullMode::Full {
            self.toc_tails_ahead(&repo, &manifest, &creds);
        }
        let config_digest = Digest::parse(&manifest.config.digest)?;
        let config = async {
            if self.layout.has_blob(&config_digest) {
                Ok::<_, ImagesError>(self.layout.read_blob(&config_digest)?)
            } else {
                Ok(self
                    .manifests
                    .fetch_small_blob(r, &config_digest, oci::MAX_MANIFEST_BYTES, &creds)
                    .await?)
            }
        };
        // The shared index of plain layers is looked for beside the config fetch: the lookup
        // is several round trips (referrers, tag fallback, artifact manifest, bundle) that the
        // pull would otherwise add after it.
        let wants_lookup = self.index_lookup
            && mode != PullMode::Full
            && manifest.layers.iter().any(|l| self.may_want_index(l));
        let lookup = async {
            let at = crate::fetch::source_reference(&repo, &manifest_digest)?;
            if !wants_lookup {
                return None;
            }
            let started = std::time::Instant::now();
            let found = tokio::time::timeout(INDEX_LOOKUP_TIMEOUT, async {
                // The image's learned list names the index its ranges go through: taken by
                // digest (fetched ahead with them, see `crate::learned`), not looked up.
                if let Some(named) = self.named_index(&at, &manifest_digest, &creds).await {
                    return Ok(Some(named));
                }
                crate::index_share::find_shared(&self.registry, &at, &manifest_digest, &creds).await
            })
            .await;
            Some((found, started))
        };
        // Plain layers that a shared index may make lazy: connections for the start's
        // parallel requests are opened now, while the link is idle (a new connection during
        // the start costs a round trip, or a second when its SYN is lost in the bottleneck's
        // full queue: a start's window fetch once took 1031 ms). Not for a layer already here.
        if wants_lookup
            && let Some(l) = manifest.layers.iter().find(|l| {
                self.may_want_index(l)
                    && lock(&self.db)
                        .layer(l.digest.as_str())
                        .ok()
                        .flatten()
                        .is_none_or(|rec| rec.state != crate::store::LayerState::Complete)
            })
            && let Some(at) = crate::fetch::source_reference(&repo, &l.digest)
        {
            let (access, d, creds) = (
                Arc::clone(self.filler.access()),
                l.digest.clone(),
                creds.clone(),
            );
            tokio::spawn(async move {
                let ok = access.warm(&at, &d, &creds, WARM_CONNECTIONS).await;
                tracing::debug!(registry = %at.registry(), connections = ok, "connections opened ahead of a lazy start");
            });
        }
        let (config_bytes, found) = tokio::join!(config, lookup);
        let config_bytes = config_bytes?;
        let config = oci::parse_config(&config_bytes, manifest.layers.len())?;
        self.layout.put_blob(&manifest_digest, &manifest_bytes)?;
        self.layout.put_blob(&config_digest, &config_bytes)?;

        let repo_digest = index_digest.as_ref().unwrap_or(&manifest_digest);
        let mut names = vec![(oci::digest_name(&repo, repo_digest), NameKind::Digest)];
        if let Some(t) = oci::tag_name(r) {
            names.push((t, NameKind::Tag));
        }
        let layers: Vec<_> = manifest
            .layers
            .iter()
            .zip(&config.diff_ids)
            .map(|(l, diff)| NewLayer {
                digest: &l.digest,
                media_type: l.media_type.as_str(),
                size: l.size,
                diff_id: diff,
                // A malformed annotation only means the layer cannot be lazy.
                toc_digest: zstd_toc(l).map(|(d, _)| d).or_else(|| {
                    l.annotations
                        .get(crate::layer::estargz::TOC_DIGEST_ANNOTATION)
                        .and_then(|d| Digest::parse(d).ok())
                }),
                toc_position: zstd_toc(l).map(|(_, p)| p.encode()),
            })
            .collect();
        let already_local = lock(&self.db)
            .image(config_digest.as_str())?
            .is_some_and(|i| i.complete());
        lock(&self.db).insert_image(&NewImage {
            id: &config_digest,
            manifest_digest: &manifest_digest,
            index_digest: index_digest.as_ref(),
            media_type: &manifest.media_type,
            size: manifest.total_size() + manifest_bytes.len() as u64,
            user: &config.user,
            source: &repo,
            layers,
            names,
        })?;
        if self.persist_credentials
            && let Some(secret) = &request_creds
            && let Ok(json) = serde_json::to_string(secret)
        {
            lock(&self.db).put_credential(r.registry(), &json)?;
        }
        let mut img = lock(&self.db)
            .image(config_digest.as_str())?
            .ok_or(ImagesError::ShuttingDown)?;
        if let Some((found, started)) = found
            && img.layers.iter().any(wants_index)
        {
            img = self.take_index(img, found, started)?;
        }
        self.start_fills(&img, request_creds, mode, &key).await?;
        Ok(PullOutcome {
            id: config_digest.to_string(),
            already_local,
        })
    }

    /// Start fetching the TOC tails of the manifest's eStargz layers now, beside the config
    /// fetch, rather than after it: the filler's TOC fetch, which needs the layer recorded
    /// first, then finds the bytes arriving or in (`registry::early`). Saves a round trip
    /// of every cold start. Layers whose TOC is here already are left alone.
    fn toc_tails_ahead(&self, repo: &str, manifest: &oci::ImageManifest, creds: &OpCreds) {
        use crate::layer::estargz::{FOOTER_SIZE, TOC_DIGEST_ANNOTATION};
        for l in &manifest.layers {
            // zstd:chunked annotations (checked, and any refusal logged, by `zstd_toc` at
            // the layer's record) put the TOC elsewhere.
            if l.size < FOOTER_SIZE
                || !l.annotations.contains_key(TOC_DIGEST_ANNOTATION)
                || crate::layer::zstd_chunked::from_annotations(&l.annotations).is_some()
            {
                continue;
            }
            let known = lock(&self.db)
                .layer(l.digest.as_str())
                .ok()
                .flatten()
                .is_some_and(|r| {
                    r.mountable() || matches!(r.form(), crate::store::Form::TocRefused { .. })
                });
            if known {
                continue;
            }
            if let Some(reference) = crate::fetch::source_reference(repo, &l.digest) {
                let (at, len) = crate::fetch::toc_tail(l.size);
                self.early.fetch(
                    reference,
                    l.digest.clone(),
                    &[(at, at + len)],
                    creds.clone(),
                );
            }
        }
    }

    /// Whether a manifest layer may want a shared random-access index: plain gzip or zstd
    /// (no TOC annotation), and not already unpacked or indexed here.
    fn may_want_index(&self, l: &oci::Layer) -> bool {
        use crate::oci::Compression;
        zstd_toc(l).is_none()
            && !l
                .annotations
                .contains_key(crate::layer::estargz::TOC_DIGEST_ANNOTATION)
            && matches!(l.compression, Compression::Gzip | Compression::Zstd)
            && lock(&self.db)
                .layer(l.digest.as_str())
                .ok()
                .flatten()
                .is_none_or(|rec| wants_index(&rec))
    }

    /// The shared index bundle that the image's learned list names (the one its ranges go
    /// through), fetched by digest (from the bytes fetched ahead when they are held) and
    /// checked against it; `None` when the list names none or it cannot be had, and the
    /// index is looked up in the registry instead. Taking it validates it as any other.
    async fn named_index(
        &self,
        at: &crate::oci::Reference,
        manifest: &Digest,
        creds: &crate::registry::OpCreds,
    ) -> Option<crate::artifact::Fetched> {
        use crate::registry::seam::BlobSource as _;
        let list = crate::learned::load(&self.layout, manifest)
            .ok()
            .flatten()?;
        let index = list.index.as_ref()?;
        let (bundle, windows) = index.parts()?;
        let got = self
            .early
            .fetch_range(at, &bundle, 0, index.bundle_size, creds)
            .await;
        match got {
            Ok(blob) if Digest::of(&blob) == bundle => {
                tracing::debug!(image = %manifest, bundle = %bundle, "the shared index the learned list names, taken by digest");
                Some(crate::artifact::Fetched {
                    digest: bundle,
                    blob,
                    others: windows
                        .map(|(digest, size)| crate::artifact::Descriptor {
                            media_type: crate::index_share::WINDOWS_TYPE.into(),
                            digest,
                            size,
                        })
                        .into_iter()
                        .collect(),
                })
            }
            Ok(_) => {
                tracing::warn!(image = %manifest, bundle = %bundle, "the shared index the learned list names does not match its digest; looking it up");
                None
            }
            Err(e) => {
                tracing::info!(image = %manifest, bundle = %bundle, error = %e, "cannot fetch the shared index the learned list names; looking it up");
                None
            }
        }
    }

    /// Take the random-access index of the image's plain gzip layers another node shared
    /// (`fetch.index: auto`), as the lookup beside the config fetch found it (bounded in time:
    /// without it the layers stream in as usual). The image as recorded after.
    fn take_index(
        &self,
        img: ImageRecord,
        found: std::result::Result<
            std::result::Result<Option<crate::artifact::Fetched>, String>,
            tokio::time::error::Elapsed,
        >,
        started: std::time::Instant,
    ) -> Result<ImageRecord> {
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let taken = found.map(|f| {
            f.and_then(|f| match f {
                None => Ok(0),
                Some(f) => crate::index_share::take_found(&self.layout, &self.db, &img, &f),
            })
        });
        match taken {
            Ok(Ok(0)) => {
                tracing::debug!(image = %img.id, elapsed_ms, "no shared random-access index for the image's plain layers")
            }
            Ok(Ok(n)) => {
                tracing::info!(image = %img.id, layers = n, elapsed_ms, "shared random-access index found: plain gzip layers are read lazily")
            }
            Ok(Err(e)) => {
                tracing::warn!(image = %img.id, error = %e, "looking for a shared random-access index failed; its plain layers stream in")
            }
            Err(_) => {
                tracing::warn!(image = %img.id, timeout = ?INDEX_LOOKUP_TIMEOUT, "looking for a shared random-access index timed out; its plain layers stream in")
            }
        }
        lock(&self.db)
            .image(&img.id)?
            .ok_or(ImagesError::ShuttingDown)
    }

    /// Start (or join) the fills of an image's layers; in full mode, wait for all of them.
    pub(super) async fn start_fills(
        &self,
        img: &ImageRecord,
        request_creds: Option<Secret>,
        mode: PullMode,
        reference: &str,
    ) -> Result<()> {
        let registry = img.source.split('/').next().unwrap_or_default().to_string();
        let creds = self.op_creds(&registry, request_creds);
        // A container is about to start on layers it reads lazily: their first requests go
        // first, the fills after (none of the layers streams in: that is a fill).
        let pending = img
            .layers
            .iter()
            .filter(|l| l.state != crate::store::LayerState::Complete);
        if mode != PullMode::Full
            && pending.clone().next().is_some()
            && pending.clone().all(|l| l.read_lazily())
        {
            self.filler.link().hold_off();
        }
        let waits: Vec<_> = img
            .layers
            .iter()
            .map(|l| (l.digest.clone(), self.filler.ensure(l, creds.clone())))
            .collect();
        if mode == PullMode::Full {
            for (layer, rx) in waits {
                match Filler::wait(rx).await {
                    FillStatus::Done => {}
                    FillStatus::OnDemand => {
                        let reason = "filling is turned off (--no-fill)".to_string();
                        return Err(ImagesError::Fill {
                            reference: reference.into(),
                            layer,
                            reason,
                            disk_full: false,
                        });
                    }
                    FillStatus::Cancelled => return Err(ImagesError::ShuttingDown),
                    FillStatus::Failed { reason, disk_full } => {
                        return Err(ImagesError::Fill {
                            reference: reference.into(),
                            layer,
                            reason,
                            disk_full,
                        });
                    }
                    FillStatus::Running => {
                        let reason = "fill did not finish".to_string();
                        return Err(ImagesError::Fill {
                            reference: reference.into(),
                            layer,
                            reason,
                            disk_full: false,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Resume the fills of every incomplete layer (at start-up). Never waits on the network.
    pub fn resume_fills(&self) -> Result<usize> {
        let pending: Vec<_> = lock(&self.db)
            .layers_to_work_on(true)?
            .into_iter()
            .filter(|l| {
                l.state != crate::store::LayerState::Complete || self.filler.unpack.wants(l)
            })
            .collect();
        for l in &pending {
            let registry = l.source.split('/').next().unwrap_or_default().to_string();
            let _ = self.filler.ensure(l, self.op_creds(&registry, None));
        }
        Ok(pending.len())
    }
}

#[cfg(test)]
#[path = "pull_tests.rs"]
mod tests;
