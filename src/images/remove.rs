//! Removal of names and images, and garbage collection of what no image references (the
//! sweeps themselves are `store::gc`).

use super::*;

impl Images {
    /// What removing `name` would do: `None` if no image has that name.
    pub fn removal(&self, name: &str) -> Result<Option<Removal>> {
        let Some(image) = self.resolve(name)? else {
            return Ok(None);
        };
        let bare = name.strip_prefix("sha256:").unwrap_or(name);
        let tag = (!is_hex(bare))
            .then(|| {
                oci::parse_reference(name)
                    .ok()
                    .and_then(|r| oci::tag_name(&r))
            })
            .flatten();
        let untag_only = tag.filter(|t| image.tags.contains(t) && image.tags.len() > 1);
        Ok(Some(Removal { image, untag_only }))
    }

    /// Remove by tag (untag; the image goes with its last tag) or by id/digest (the image with
    /// all its names). Absent images are not an error. Returns whether an image was removed.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let Some(Removal {
            image: img,
            untag_only,
        }) = self.removal(name)?
        else {
            return Ok(false);
        };
        let removed = match untag_only {
            Some(tag) => lock(&self.db).untag(&tag)?,
            None => lock(&self.db).remove_image(&img.id)?,
        };
        if removed {
            tracing::info!(image = %img.id, name, "image removed");
            for l in &img.layers {
                if !lock(&self.db).layer_referenced(&l.digest)? {
                    self.filler.cancel(&l.digest);
                }
            }
            self.gc().await?;
        } else {
            tracing::info!(image = %img.id, name, "tag removed; image kept for its other tags");
        }
        Ok(removed)
    }

    /// Hold off GC (shared, like a pull) while a blob is published and its reference recorded.
    pub async fn gc_shared(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gc_lock.read().await
    }

    /// Delete everything no image references: layer rows, blobs, partial files, stale temp files.
    pub async fn gc(&self) -> Result<GcReport> {
        let _gc = self.gc_lock.write().await;
        let referenced = {
            let mut db = lock(&self.db);
            for d in db.drop_unreferenced_layers()? {
                self.filler.cancel(&d);
                if let Ok(d) = crate::oci::Digest::parse(&d) {
                    self.filler.partials().discard(&d);
                }
            }
            db.referenced_digests()?
        };
        let mut report = GcReport::default();
        crate::store::gc::sweep_blobs(&self.layout, &referenced, &mut report)?;
        let unpacked: Vec<crate::store::LayerRecord> = lock(&self.db)
            .list_images()?
            .into_iter()
            .flat_map(|i| i.layers)
            .filter(|l| l.unpacked)
            .collect();
        let keep = crate::store::gc::referenced_files(&self.layout, &unpacked)?;
        crate::store::gc::sweep_file_cache(&self.layout, &keep, &mut report);
        if report.files_removed > 0 {
            tracing::info!(
                files = report.files_removed,
                bytes = report.bytes_freed,
                "garbage collected"
            );
        }
        Ok(report)
    }
}
