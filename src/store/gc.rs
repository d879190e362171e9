//! Garbage collection of the store's files (docs/architecture.md, "Store"): given what the
//! catalogue still references, remove the blobs, partial files, stale temp files and cached
//! file contents nothing names. The image service decides when (it holds the GC lock, drops
//! unreferenced layer rows and stops their fills first: `Images::gc`); this module only sweeps.

use super::{LayerRecord, Layout, Result, StoreError};
use crate::oci::Digest;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// Temp files and cached files younger than this may belong to a write in progress (an unpack
/// that has not recorded itself yet): they are kept.
pub const YOUNG: Duration = Duration::from_secs(3600);

/// What a sweep removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub files_removed: u64,
    pub bytes_freed: u64,
}

impl GcReport {
    fn removed(&mut self, size: u64) {
        self.files_removed += 1;
        self.bytes_freed += size;
    }
}

fn young(meta: &std::fs::Metadata) -> bool {
    meta.modified()
        .is_ok_and(|t| t.elapsed().unwrap_or_default() < YOUNG)
}

/// Remove what no digest of `referenced` (`sha256:<hex>`) names from `blobs/` and `partial/`:
/// blobs, partial files of layers no longer referenced or already complete (`<hex>`,
/// `<hex>.map`, `<hex>.map.tmp`), temp files older than [`YOUNG`], and staging directories a
/// crash interrupted.
pub fn sweep_blobs(
    layout: &Layout,
    referenced: &std::collections::BTreeSet<String>,
    report: &mut GcReport,
) -> Result<()> {
    for dir in [layout.blobs_dir(), layout.partial_dir()] {
        let entries = std::fs::read_dir(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let partial = dir == layout.partial_dir();
        for entry in entries.flatten() {
            let fname = entry.file_name().to_string_lossy().to_string();
            let keep = if fname.starts_with(".tmp-") {
                // A temp file of a write in progress in this process: kept while young.
                entry.metadata().is_ok_and(|m| young(&m))
            } else if partial {
                // Kept while the layer is referenced and not yet complete.
                let hex = fname.split('.').next().unwrap_or_default();
                referenced.contains(&format!("sha256:{hex}"))
                    && !layout.blobs_dir().join(hex).exists()
            } else {
                referenced.contains(&format!("sha256:{fname}"))
            };
            if !keep {
                remove(&entry.path(), report);
            }
        }
    }
    Ok(())
}

fn remove(path: &Path, report: &mut GcReport) {
    let meta = std::fs::symlink_metadata(path);
    let size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
    // A directory here is the staging area of a load a crash interrupted.
    let removed = if meta.is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Ok(()) => report.removed(size),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "gc cannot remove file"),
    }
}

/// Content digests (hex) of the files that the unpacked layers `layers` hold, from their TOC
/// or file index in the store.
pub fn referenced_files(layout: &Layout, layers: &[LayerRecord]) -> Result<HashSet<String>> {
    use crate::layer::tar;
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(e.to_string());
    let mut set = HashSet::new();
    for l in layers.iter().filter(|l| l.unpacked) {
        let entries = if let crate::store::Form::FileIndex { digest: index, .. } = l.form() {
            let d = Digest::parse(index).map_err(|e| corrupt(&e))?;
            tar::decode_index(&layout.read_blob(&d)?, &tar::Limits::default())
                .map_err(|e| corrupt(&e))?
        } else if let crate::store::Form::Toc {
            digest: td,
            offset: Some(off),
            position,
            ..
        } = l.form()
        {
            let d = Digest::parse(td).map_err(|e| corrupt(&e))?;
            crate::layer::parse_stored_toc(&layout.read_blob(&d)?, &d, position, l.size, off)
                .map_err(|e| corrupt(&e))?
                .entries
        } else {
            continue;
        };
        set.extend(
            entries
                .into_iter()
                .filter_map(|e| e.digest)
                .map(|d| d.hex().to_string()),
        );
    }
    Ok(set)
}

/// Remove cached file contents (`files/`) not in `keep` and older than [`YOUNG`].
pub fn sweep_file_cache(layout: &Layout, keep: &HashSet<String>, report: &mut GcReport) {
    let Ok(entries) = std::fs::read_dir(layout.files_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if keep.contains(&name) || entry.metadata().is_ok_and(|m| young(&m)) {
            continue;
        }
        remove(&entry.path(), report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn file(path: &Path, len: usize, old: bool) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![7u8; len]).unwrap();
        if old {
            let f = std::fs::File::options().write(true).open(path).unwrap();
            f.set_modified(SystemTime::now() - 2 * YOUNG).unwrap();
        }
    }

    #[test]
    fn sweeps_keep_what_is_referenced_or_young_and_remove_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let hex = |c: char| c.to_string().repeat(64);
        let (blobs, partial, files) =
            (layout.blobs_dir(), layout.partial_dir(), layout.files_dir());
        // Blobs: referenced a, orphan b, a young and an old temp file, a crashed load's staging.
        file(&blobs.join(hex('a')), 10, true);
        file(&blobs.join(hex('b')), 20, true);
        file(&blobs.join(".tmp-young"), 1, false);
        file(&blobs.join(".tmp-old"), 2, true);
        file(&blobs.join(".tmp-load-1").join("x"), 3, true);
        std::fs::File::open(blobs.join(".tmp-load-1"))
            .unwrap()
            .set_modified(SystemTime::now() - 2 * YOUNG)
            .unwrap();
        // Partial files: c referenced and still partial, a complete already, d orphan.
        for h in ['c', 'a', 'd'] {
            file(&partial.join(hex(h)), 5, true);
            file(&partial.join(format!("{}.map", hex(h))), 1, true);
        }
        // Cached files: one named by an unpacked layer (none here), one old, one young.
        file(&files.join(hex('e')), 4, true);
        file(&files.join(hex('f')), 4, false);
        let referenced: std::collections::BTreeSet<String> = [hex('a'), hex('c')]
            .iter()
            .map(|h| format!("sha256:{h}"))
            .collect();
        let mut report = GcReport::default();
        sweep_blobs(&layout, &referenced, &mut report).unwrap();
        sweep_file_cache(&layout, &HashSet::new(), &mut report);
        let left = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(left(&blobs), [".tmp-young".to_string(), hex('a')]);
        assert_eq!(left(&partial), [hex('c'), format!("{}.map", hex('c'))]);
        assert_eq!(left(&files), [hex('f')]);
        // b, the old temp file, the staging directory, a's and d's partial pairs, file e.
        assert_eq!(report.files_removed, 8);
        // Their bytes (the staging directory counts as its own entry's size).
        assert!(report.bytes_freed >= 20 + 2 + 2 * (5 + 1) + 4, "{report:?}");
    }
}
