//! What the store holds, as the admin API lists and prunes it: the manifests the pull-through
//! registry stored (with their tags and what they reference), the node's images, and every
//! blob with the number of manifests that reference it.
//!
//! Pruning removes *mirror* images only (a tagged or unreferenced manifest with what it
//! references): the node's images are removed through CRI or `lazypull prune`. A blob goes
//! only when no remaining image (mirror or node) references it; the catalogue rows are
//! forgotten in one transaction and GC then deletes the files nothing references (it also
//! keeps what snapshots and running fills use).

use super::{Catalogue, Layout, Result};
use std::collections::{BTreeMap, BTreeSet};

/// One manifest (or index, or artifact manifest) in the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Manifest {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Tags and digest names (`host/repo:tag`, `host/repo@sha256:…`).
    pub names: Vec<String>,
    /// The blobs and manifests it references (config, layers, an index's manifests).
    pub refs: Vec<String>,
    /// When it was stored (Unix seconds).
    pub created: i64,
    /// When it was last served or used.
    pub accessed: i64,
    /// A node image (pulled through CRI, loaded), not a mirror-only manifest.
    pub node: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    /// Manifests that reference it.
    pub refs: usize,
    /// Stored by the pull-through registry (else only by node pulls).
    pub mirror: bool,
}

/// An image as listed: a root manifest (tagged, or referenced by no other manifest) and the
/// blobs it needs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Image {
    pub digest: String,
    pub names: Vec<String>,
    pub media_type: String,
    /// Bytes of everything it references (each blob once), itself included.
    pub size: u64,
    pub created: i64,
    pub accessed: i64,
    pub node: bool,
    pub blobs: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Inventory {
    pub manifests: BTreeMap<String, Manifest>,
    /// Every blob of the store with its size (manifests included), and the mirror's rows.
    sizes: BTreeMap<String, u64>,
    mirror_rows: BTreeMap<String, (i64, i64)>,
}

/// The digests a manifest-like JSON document references, or `None` if it is not one.
fn references(bytes: &[u8]) -> Option<(String, Vec<String>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v.get("schemaVersion")? != 2 {
        return None;
    }
    let mut refs = vec![];
    if let Some(d) = v["config"]["digest"].as_str() {
        refs.push(d.to_string());
    }
    for key in ["layers", "manifests", "blobs"] {
        for e in v[key].as_array().into_iter().flatten() {
            if let Some(d) = e["digest"].as_str() {
                refs.push(d.to_string());
            }
        }
    }
    if refs.is_empty() && v.get("manifests").is_none() {
        return None;
    }
    Some((crate::http::mirror::media_type_of(bytes), refs))
}

impl Inventory {
    /// Read the catalogue (briefly locked), then the mirror's small blobs to tell manifests
    /// from the rest.
    pub fn load(db: &std::sync::Mutex<Catalogue>, layout: &Layout) -> Result<Inventory> {
        let (tags, rows, images) = {
            let db = super::locked(db);
            (
                db.mirror_tag_rows()?,
                db.mirror_blob_rows()?,
                db.list_images()?,
            )
        };
        let mut inv = Inventory::default();
        for e in std::fs::read_dir(layout.blobs_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            inv.sizes.insert(format!("sha256:{name}"), size);
        }
        let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, digest) in tags {
            names.entry(digest).or_default().push(name);
        }
        for (digest, fetched, accessed) in rows {
            inv.mirror_rows.insert(digest.clone(), (fetched, accessed));
            let Some(&size) = inv.sizes.get(&digest) else {
                continue;
            };
            if size > crate::oci::MAX_MANIFEST_BYTES as u64 {
                continue;
            }
            let Ok(d) = crate::oci::Digest::parse(&digest) else {
                continue;
            };
            let Ok(bytes) = layout.read_blob(&d) else {
                continue;
            };
            if let Some((media_type, refs)) = references(&bytes) {
                inv.manifests.insert(
                    digest.clone(),
                    Manifest {
                        names: names.remove(&digest).unwrap_or_default(),
                        digest,
                        media_type,
                        size,
                        refs,
                        created: fetched,
                        accessed,
                        node: false,
                    },
                );
            }
        }
        for img in images {
            let mut refs = vec![img.id.clone()];
            refs.extend(img.layers.iter().map(|l| l.digest.clone()));
            let size = |d: &str| inv.sizes.get(d).copied().unwrap_or(0);
            let mut node_names: Vec<String> =
                img.tags.iter().chain(&img.digests).cloned().collect();
            let m = Manifest {
                digest: img.manifest_digest.clone(),
                media_type: img.media_type.clone(),
                size: size(&img.manifest_digest),
                names: vec![],
                refs,
                created: img.pulled_at,
                accessed: img.last_used_at,
                node: true,
            };
            let top = match &img.index_digest {
                Some(index) => {
                    // The index is the image's top; its platform manifest hangs below it.
                    inv.manifests.insert(img.manifest_digest.clone(), m.clone());
                    Manifest {
                        digest: index.clone(),
                        media_type: crate::oci::MT_OCI_INDEX.to_string(),
                        size: size(index),
                        refs: vec![img.manifest_digest.clone()],
                        ..m
                    }
                }
                None => m,
            };
            let entry = inv.manifests.entry(top.digest.clone()).or_insert(top);
            entry.node = true;
            entry.names.append(&mut node_names);
        }
        for m in inv.manifests.values_mut() {
            m.names.sort();
            m.names.dedup();
        }
        Ok(inv)
    }

    /// Root manifests: named, or referenced by no other manifest.
    fn roots(&self) -> Vec<&Manifest> {
        let referenced: BTreeSet<&str> = self
            .manifests
            .values()
            .flat_map(|m| m.refs.iter().map(String::as_str))
            .collect();
        self.manifests
            .values()
            .filter(|m| !m.names.is_empty() || !referenced.contains(m.digest.as_str()))
            .collect()
    }

    /// `root` and everything below it.
    fn closure(&self, root: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![root.to_string()];
        while let Some(d) = todo.pop() {
            if !out.insert(d.clone()) {
                continue;
            }
            if let Some(m) = self.manifests.get(&d) {
                todo.extend(m.refs.iter().cloned());
            }
        }
        out
    }

    pub fn images(&self) -> Vec<Image> {
        self.roots()
            .into_iter()
            .map(|m| {
                let blobs: Vec<String> = self.closure(&m.digest).into_iter().collect();
                Image {
                    digest: m.digest.clone(),
                    names: m.names.clone(),
                    media_type: m.media_type.clone(),
                    size: blobs
                        .iter()
                        .map(|b| self.sizes.get(b).copied().unwrap_or(0))
                        .sum(),
                    created: m.created,
                    accessed: m.accessed,
                    node: m.node,
                    blobs,
                }
            })
            .collect()
    }

    /// Every blob of the store (and every blob a manifest names, even if absent) with the
    /// number of manifests referencing it.
    pub fn blobs(&self) -> Vec<Blob> {
        let mut refs: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.manifests.values() {
            for r in m.refs.iter().collect::<BTreeSet<_>>() {
                *refs.entry(r.as_str()).or_default() += 1;
            }
        }
        let all: BTreeSet<&str> = self
            .sizes
            .keys()
            .map(String::as_str)
            .chain(refs.keys().copied())
            .collect();
        all.into_iter()
            .map(|d| Blob {
                digest: d.to_string(),
                size: self.sizes.get(d).copied().unwrap_or(0),
                refs: refs.get(d).copied().unwrap_or(0),
                mirror: self.mirror_rows.contains_key(d),
            })
            .collect()
    }
}

/// What a prune selects by.
#[derive(Debug, Clone)]
pub enum PruneBy {
    /// Not served or used for this long.
    Accessed(std::time::Duration),
    /// Stored longer ago than this.
    Created(std::time::Duration),
    /// Any name matches one of these expressions.
    Pattern(Vec<regex::Regex>),
}

/// The mirror images a prune removes, oldest first (by the time it selects on), at most
/// `count`.
pub fn select(inv: &Inventory, by: &PruneBy, count: Option<usize>, now: i64) -> Vec<Image> {
    let older = |t: i64, d: &std::time::Duration| t < now - d.as_secs() as i64;
    let mut chosen: Vec<Image> = inv
        .images()
        .into_iter()
        .filter(|i| !i.node)
        .filter(|i| match by {
            PruneBy::Accessed(d) => older(i.accessed, d),
            PruneBy::Created(d) => older(i.created, d),
            PruneBy::Pattern(res) => i.names.iter().any(|n| res.iter().any(|r| r.is_match(n))),
        })
        .collect();
    chosen.sort_by_key(|i| match by {
        PruneBy::Created(_) => i.created,
        _ => i.accessed,
    });
    if let Some(n) = count {
        chosen.truncate(n);
    }
    chosen
}

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub images: Vec<Image>,
    /// Mirror blob rows forgotten (their files go at GC unless a node image needs them).
    pub blobs: usize,
    /// Mirror blobs no manifest references, older than the duration (accessed/created).
    pub orphans: usize,
}

/// Forget `chosen` (and, for time-based prunes, unreferenced mirror blobs past the same
/// age): the catalogue rows only, in one transaction.
pub fn forget(
    db: &mut Catalogue,
    inv: &Inventory,
    chosen: Vec<Image>,
    by: &PruneBy,
    now: i64,
    dry_run: bool,
) -> Result<PruneReport> {
    let gone: BTreeSet<&str> = chosen.iter().map(|i| i.digest.as_str()).collect();
    let keep: BTreeSet<String> = inv
        .roots()
        .into_iter()
        .filter(|m| !gone.contains(m.digest.as_str()))
        .flat_map(|m| inv.closure(&m.digest))
        .collect();
    let mut rows: BTreeSet<String> = chosen
        .iter()
        .flat_map(|i| i.blobs.iter().cloned())
        .filter(|b| !keep.contains(b) && inv.mirror_rows.contains_key(b))
        .collect();
    let mut orphans = 0;
    let cutoff = match by {
        PruneBy::Accessed(d) | PruneBy::Created(d) => Some(now - d.as_secs() as i64),
        PruneBy::Pattern(_) => None,
    };
    if let Some(cutoff) = cutoff {
        let referenced: BTreeSet<String> = inv
            .roots()
            .into_iter()
            .flat_map(|m| inv.closure(&m.digest))
            .collect();
        for (d, (fetched, accessed)) in &inv.mirror_rows {
            let t = if matches!(by, PruneBy::Created(_)) {
                *fetched
            } else {
                *accessed
            };
            if !referenced.contains(d) && t < cutoff && rows.insert(d.clone()) {
                orphans += 1;
            }
        }
    }
    let untag: Vec<String> = gone.iter().map(|d| d.to_string()).collect();
    let rows: Vec<String> = rows.into_iter().collect();
    let blobs = if dry_run {
        rows.len()
    } else {
        db.forget_mirror(&untag, &rows)?;
        rows.len()
    };
    Ok(PruneReport {
        dry_run,
        images: chosen,
        blobs,
        orphans,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn m(digest: &str, names: &[&str], refs: &[&str], created: i64, accessed: i64) -> Manifest {
        Manifest {
            digest: digest.into(),
            media_type: "x".into(),
            size: 1,
            names: names.iter().map(|s| s.to_string()).collect(),
            refs: refs.iter().map(|s| s.to_string()).collect(),
            created,
            accessed,
            node: false,
        }
    }

    fn inv(ms: Vec<Manifest>) -> Inventory {
        let mut inv = Inventory::default();
        for x in ms {
            for d in x.refs.iter().chain([&x.digest]) {
                inv.sizes.insert(d.clone(), 10);
                inv.mirror_rows.insert(d.clone(), (x.created, x.accessed));
            }
            inv.manifests.insert(x.digest.clone(), x);
        }
        inv
    }

    #[test]
    fn roots_closures_and_refcounts() {
        let i = inv(vec![
            m("idx", &["r/a:1"], &["m1"], 0, 0),
            m("m1", &[], &["c", "l1", "shared"], 0, 0),
            m("m2", &["r/b:1"], &["c2", "shared"], 0, 0),
        ]);
        let images = i.images();
        let digests: Vec<&str> = images.iter().map(|x| x.digest.as_str()).collect();
        assert_eq!(digests, ["idx", "m2"]);
        assert_eq!(images[0].blobs, ["c", "idx", "l1", "m1", "shared"]);
        let shared = i
            .blobs()
            .into_iter()
            .find(|b| b.digest == "shared")
            .unwrap();
        assert_eq!(shared.refs, 2);
    }

    #[test]
    fn selection_by_age_pattern_and_count_spares_node_images() {
        let now = 1_000_000;
        let day = 86_400;
        let mut node = m(
            "n",
            &["node/img:1"],
            &["nl"],
            now - 90 * day,
            now - 90 * day,
        );
        node.node = true;
        let i = inv(vec![
            m("old", &["r/old:1"], &["a"], now - 40 * day, now - 35 * day),
            m(
                "older",
                &["r/older:1"],
                &["b"],
                now - 50 * day,
                now - 45 * day,
            ),
            m("new", &["r/new:1"], &["c"], now - 39 * day, now - day),
            node,
        ]);
        let pick = |by: &PruneBy, count| {
            select(&i, by, count, now)
                .into_iter()
                .map(|x| x.digest)
                .collect::<Vec<_>>()
        };
        let month = Duration::from_secs(30 * day as u64);
        assert_eq!(pick(&PruneBy::Accessed(month), None), ["older", "old"]);
        assert_eq!(pick(&PruneBy::Accessed(month), Some(1)), ["older"]);
        assert_eq!(
            pick(&PruneBy::Created(month), None),
            ["older", "old", "new"]
        );
        let re = |s: &str| regex::Regex::new(s).unwrap();
        assert_eq!(
            pick(&PruneBy::Pattern(vec![re("new"), re("^r/old:")]), None),
            ["old", "new"]
        );
        assert!(pick(&PruneBy::Pattern(vec![re("node")]), None).is_empty());
    }

    #[test]
    fn a_prune_keeps_what_remaining_images_share() {
        let i = inv(vec![
            m("m1", &["r/a:1"], &["c1", "shared"], 0, 0),
            m("m2", &["r/b:1"], &["c2", "shared"], 0, 100),
        ]);
        let chosen = select(&i, &PruneBy::Accessed(Duration::from_secs(50)), None, 100);
        assert_eq!(chosen.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let mut db = Catalogue::open(&dir.path().join("db")).unwrap();
        let r = forget(
            &mut db,
            &i,
            chosen,
            &PruneBy::Accessed(Duration::from_secs(50)),
            100,
            true,
        )
        .unwrap();
        // m1 and c1 go; `shared` stays for m2.
        assert_eq!(r.blobs, 2);
        assert_eq!(r.orphans, 0);
    }
}
