//! Snapshot metadata of the containerd snapshotter, in the catalogue: one row per snapshot
//! (active, view or committed), its parent, labels, times, usage and, for a remote snapshot,
//! the lazily served layer whose FUSE directory is its content. Every change is one statement
//! or one transaction, so the table is consistent after a crash at any point.

use super::catalogue::Catalogue;
use super::{Result, StoreError};
use rusqlite::{OptionalExtension, Transaction, params};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    Active,
    View,
    Committed,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Active => "active",
            SnapshotKind::View => "view",
            SnapshotKind::Committed => "committed",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(SnapshotKind::Active),
            "view" => Ok(SnapshotKind::View),
            "committed" => Ok(SnapshotKind::Committed),
            other => Err(StoreError::Corrupt(format!("snapshot kind {other:?}"))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotRecord {
    pub id: i64,
    pub name: String,
    /// The parent's name ("" for none).
    pub parent: String,
    pub kind: SnapshotKind,
    pub labels: BTreeMap<String, String>,
    pub created_ns: i64,
    pub updated_ns: i64,
    /// Digest of the lazily served layer that is this (committed) snapshot's content.
    pub remote_layer: Option<String>,
    pub size: u64,
    pub inodes: u64,
}

/// A snapshot to create.
pub struct NewSnapshot<'a> {
    pub name: &'a str,
    pub parent: Option<&'a SnapshotRecord>,
    pub kind: SnapshotKind,
    pub labels: &'a BTreeMap<String, String>,
    pub remote_layer: Option<&'a str>,
}

const COLUMNS: &str = "s.id, s.name, COALESCE(p.name, ''), s.kind, s.labels, s.created_ns, s.updated_ns, s.remote_layer, s.size, s.inodes";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(SnapshotRecord, String, String)> {
    Ok((
        SnapshotRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            parent: r.get(2)?,
            kind: SnapshotKind::Active,
            labels: BTreeMap::new(),
            created_ns: r.get(5)?,
            updated_ns: r.get(6)?,
            remote_layer: r.get(7)?,
            size: r.get::<_, i64>(8)? as u64,
            inodes: r.get::<_, i64>(9)? as u64,
        },
        r.get(3)?,
        r.get(4)?,
    ))
}

fn finish((mut rec, kind, labels): (SnapshotRecord, String, String)) -> Result<SnapshotRecord> {
    rec.kind = SnapshotKind::parse(&kind)?;
    rec.labels = serde_json::from_str(&labels)
        .map_err(|e| StoreError::Corrupt(format!("labels of snapshot {}: {e}", rec.name)))?;
    Ok(rec)
}

fn labels_json(labels: &BTreeMap<String, String>) -> String {
    // A map of strings always serialises.
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

fn now_ns() -> i64 {
    chrono::Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or_else(|| chrono::Utc::now().timestamp() * 1_000_000_000)
}

/// How many active snapshots and views stand on a lazily served layer (their own chain has a
/// `remote_layer`): containers whose root filesystems need the FUSE mount.
pub fn on_remote_layers(all: &[SnapshotRecord]) -> usize {
    let by_name: std::collections::HashMap<&str, &SnapshotRecord> =
        all.iter().map(|r| (r.name.as_str(), r)).collect();
    all.iter()
        .filter(|r| r.kind != SnapshotKind::Committed)
        .filter(|r| {
            let mut cur = by_name.get(r.parent.as_str());
            // Bounded: a chain cannot be longer than the table.
            for _ in 0..all.len() {
                match cur {
                    Some(p) if p.remote_layer.is_some() => return true,
                    Some(p) => cur = by_name.get(p.parent.as_str()),
                    None => return false,
                }
            }
            false
        })
        .count()
}

impl Catalogue {
    pub fn snapshot(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id WHERE s.name = ?1"),
                [name],
                from_row,
            )
            .optional()?
            .map(finish)
            .transpose()
    }

    /// Every snapshot, ordered by id (parents before children).
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.id"
        ))?;
        let rows = st.query_map([], from_row)?;
        rows.map(|r| finish(r?)).collect()
    }

    /// The chain of ancestors of a snapshot, nearest first.
    pub fn snapshot_ancestors(&self, rec: &SnapshotRecord) -> Result<Vec<SnapshotRecord>> {
        let mut out: Vec<SnapshotRecord> = vec![];
        let mut parent = rec.parent.clone();
        while !parent.is_empty() {
            let p = self.snapshot(&parent)?.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "snapshot {} has a missing parent {parent}",
                    rec.name
                ))
            })?;
            // Parent links come from ids assigned in increasing order, so a cycle is corruption.
            if out.len() > 10_000 {
                return Err(StoreError::Corrupt(format!(
                    "snapshot {}: parent chain too long",
                    rec.name
                )));
            }
            parent = p.parent.clone();
            out.push(p);
        }
        Ok(out)
    }

    /// Insert a snapshot and run `prepare_dir(id)` (which creates its directory) inside the
    /// same transaction: if it fails the row is not kept; if the process dies before the
    /// commit, the directory is an orphan that Cleanup removes.
    pub fn insert_snapshot<E: From<StoreError>>(
        &mut self,
        new: &NewSnapshot<'_>,
        prepare_dir: impl FnOnce(i64) -> std::result::Result<(), E>,
    ) -> std::result::Result<SnapshotRecord, E> {
        let tx = self.conn.transaction().map_err(StoreError::from)?;
        let t = now_ns();
        tx.execute(
            "INSERT INTO snapshots (name, parent_id, kind, labels, created_ns, updated_ns, remote_layer) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
            params![
                new.name,
                new.parent.map(|p| p.id),
                new.kind.as_str(),
                labels_json(new.labels),
                t,
                new.remote_layer
            ],
        )
        .map_err(StoreError::from)?;
        let id = tx.last_insert_rowid();
        prepare_dir(id)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(SnapshotRecord {
            id,
            name: new.name.to_string(),
            parent: new.parent.map(|p| p.name.clone()).unwrap_or_default(),
            kind: new.kind,
            labels: new.labels.clone(),
            created_ns: t,
            updated_ns: t,
            remote_layer: new.remote_layer.map(str::to_string),
            size: 0,
            inodes: 0,
        })
    }

    /// Turn an active snapshot into a committed one under a new name (same id and directory).
    pub fn commit_snapshot(
        &mut self,
        id: i64,
        name: &str,
        labels: &BTreeMap<String, String>,
        usage: (u64, u64),
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE snapshots SET name = ?2, kind = 'committed', labels = ?3, updated_ns = ?4, size = ?5, inodes = ?6 WHERE id = ?1",
            params![id, name, labels_json(labels), now_ns(), usage.0 as i64, usage.1 as i64],
        )?;
        Ok(())
    }

    pub fn update_snapshot_labels(
        &mut self,
        id: i64,
        labels: &BTreeMap<String, String>,
    ) -> Result<i64> {
        let t = now_ns();
        self.conn.execute(
            "UPDATE snapshots SET labels = ?2, updated_ns = ?3 WHERE id = ?1",
            params![id, labels_json(labels), t],
        )?;
        Ok(t)
    }

    /// Delete a snapshot row unless it has children (then `Ok(false)`).
    pub fn delete_snapshot(&mut self, id: i64) -> Result<bool> {
        let tx: Transaction<'_> = self.conn.transaction()?;
        let children: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM snapshots WHERE parent_id = ?1)",
            [id],
            |r| r.get(0),
        )?;
        if children {
            return Ok(false);
        }
        tx.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(true)
    }

    /// Ids of every snapshot (for Cleanup's sweep of orphan directories).
    pub fn snapshot_ids(&self) -> Result<std::collections::BTreeSet<i64>> {
        let mut st = self.conn.prepare("SELECT id FROM snapshots")?;
        let ids = st.query_map([], |r| r.get(0))?;
        Ok(ids.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn containers_on_remote_layers_are_counted() {
        let rec = |name: &str, parent: &str, kind, remote: bool| SnapshotRecord {
            id: 0,
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: BTreeMap::new(),
            created_ns: 0,
            updated_ns: 0,
            remote_layer: remote.then(|| "sha256:aa".to_string()),
            size: 0,
            inodes: 0,
        };
        use SnapshotKind::*;
        let all = vec![
            rec("lazy-base", "", Committed, true),
            rec("lazy-top", "lazy-base", Committed, false),
            rec("plain", "", Committed, false),
            rec("c1", "lazy-top", Active, false),
            rec("v1", "lazy-base", View, false),
            rec("c2", "plain", Active, false),
            rec("c3", "", Active, false),
            rec("dangling", "gone", Active, false),
        ];
        assert_eq!(on_remote_layers(&all), 2, "c1 (through lazy-top) and v1");
        assert_eq!(on_remote_layers(&all[2..]), 0);
    }

    #[test]
    fn chain_commit_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalogue::open(&dir.path().join("c.db")).unwrap();
        let none = BTreeMap::new();
        let base = cat
            .insert_snapshot::<StoreError>(
                &NewSnapshot {
                    name: "k1",
                    parent: None,
                    kind: SnapshotKind::Active,
                    labels: &none,
                    remote_layer: None,
                },
                |_| Ok(()),
            )
            .unwrap();
        cat.commit_snapshot(base.id, "c1", &labels(&[("a", "b")]), (10, 2))
            .unwrap();
        assert!(cat.snapshot("k1").unwrap().is_none());
        let c1 = cat.snapshot("c1").unwrap().unwrap();
        assert_eq!(c1.kind, SnapshotKind::Committed);
        assert_eq!((c1.size, c1.inodes), (10, 2));
        assert_eq!(c1.labels, labels(&[("a", "b")]));
        let child = cat
            .insert_snapshot::<StoreError>(
                &NewSnapshot {
                    name: "k2",
                    parent: Some(&c1),
                    kind: SnapshotKind::View,
                    labels: &none,
                    remote_layer: Some("sha256:ab"),
                },
                |_| Ok(()),
            )
            .unwrap();
        assert_eq!(child.parent, "c1");
        assert_eq!(cat.snapshot("k2").unwrap().unwrap(), child);
        assert_eq!(cat.snapshot_ancestors(&child).unwrap(), vec![c1.clone()]);
        assert!(!cat.delete_snapshot(c1.id).unwrap(), "has a child");
        assert!(cat.delete_snapshot(child.id).unwrap());
        assert!(cat.delete_snapshot(c1.id).unwrap());
        assert!(cat.snapshots().unwrap().is_empty());
        // A failing directory step leaves no row; a duplicate name is refused.
        let r = cat.insert_snapshot::<StoreError>(
            &NewSnapshot {
                name: "k3",
                parent: None,
                kind: SnapshotKind::Active,
                labels: &none,
                remote_layer: None,
            },
            |_| Err(StoreError::Corrupt("mkdir".into())),
        );
        assert!(r.is_err());
        assert!(cat.snapshot("k3").unwrap().is_none());
        let new = NewSnapshot {
            name: "k4",
            parent: None,
            kind: SnapshotKind::Active,
            labels: &none,
            remote_layer: None,
        };
        cat.insert_snapshot::<StoreError>(&new, |_| Ok(())).unwrap();
        assert!(cat.insert_snapshot::<StoreError>(&new, |_| Ok(())).is_err());
    }
}
