//! The SQLite catalogue: images, their names, layers and fill progress, persisted credentials.
//! One writer (the daemon or an offline command holding the store lock); readers may be other
//! processes (`lazypull list`/`status` read while the daemon runs: WAL mode).

use super::{Result, StoreError};
use crate::oci::Digest;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const SCHEMA_VERSION: i64 = 7;

/// Columns of a layer row, in the order `layer_from_row` reads them.
const LAYER_COLUMNS: &str = "l.digest, l.media_type, l.size, l.diff_id, l.source, l.state, l.filled, l.error, l.toc_digest, l.toc_entries, l.toc_error, l.toc_offset, l.ondemand, l.unpacked, l.index_digest, l.toc_position, l.prefetched, l.fill_fetched, l.read_waits, l.read_wait_ms, l.landmark_files, l.walk_order";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,                 -- config digest: the CRI image id
    manifest_digest TEXT NOT NULL,
    index_digest TEXT,                   -- when pulled through a multi-platform index
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    user TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,                -- registry/repository the layers are fetched from
    pulled_at INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY,               -- repo:tag or repo@digest
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest'))
);
CREATE INDEX IF NOT EXISTS image_names_by_image ON image_names(image_id);
CREATE TABLE IF NOT EXISTS layers (
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    diff_id TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'complete', 'failed')),
    filled INTEGER NOT NULL DEFAULT 0,   -- bytes durable in partial/ (recorded in its .map)
    error TEXT,
    completed_at INTEGER,
    toc_digest TEXT,                     -- eStargz: digest of the TOC JSON (layer annotation)
    toc_entries INTEGER,                 -- set once the TOC was fetched, verified and stored
    toc_error TEXT,                      -- why the TOC was refused (the layer is then fetched whole)
    toc_offset INTEGER,                  -- where the TOC member starts in the blob
    ondemand INTEGER NOT NULL DEFAULT 0, -- bytes fetched on demand by reads (not by the filler)
    unpacked INTEGER NOT NULL DEFAULT 0, -- files of the complete layer are in files/sha256
    index_digest TEXT,                   -- layers without TOC: JSON file index (a blob)
    toc_position TEXT,                   -- zstd:chunked: offset:length:uncompressed:1 of the TOC
    prefetched INTEGER NOT NULL DEFAULT 0,   -- bytes fetched by start-up prefetch (landmark, learned)
    fill_fetched INTEGER NOT NULL DEFAULT 0, -- bytes fetched by the filler
    read_waits INTEGER NOT NULL DEFAULT 0,   -- reads that waited for the network
    read_wait_ms INTEGER NOT NULL DEFAULT 0, -- their total wait
    landmark_files INTEGER,                  -- TOC entries before the prefetch landmark, if any
    walk_order INTEGER,                      -- layers without TOC served while streaming: 1 if its entries came in walk order
    index_bundle TEXT                        -- index_digest taken from a shared bundle: the bundle (JSON: learned::SharedIndex)
);
CREATE TABLE IF NOT EXISTS image_layers (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    digest TEXT NOT NULL REFERENCES layers(digest),
    PRIMARY KEY (image_id, idx)
);
CREATE INDEX IF NOT EXISTS image_layers_by_digest ON image_layers(digest);
CREATE TABLE IF NOT EXISTS snapshots (   -- containerd snapshots (the snapshotter service)
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- names the directory snapshots/<id>
    name TEXT NOT NULL UNIQUE,           -- the key of an active/view snapshot, the name of a committed one
    parent_id INTEGER REFERENCES snapshots(id),
    kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    labels TEXT NOT NULL DEFAULT '{}',   -- JSON object
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    remote_layer TEXT,                   -- a lazily served layer: its FUSE directory is the content
    size INTEGER NOT NULL DEFAULT 0,     -- usage of a committed snapshot (its own files only)
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_by_layer ON snapshots(remote_layer);
CREATE TABLE IF NOT EXISTS credentials (
    registry TEXT PRIMARY KEY,
    secret TEXT NOT NULL                 -- JSON; the database file is root-only (0600)
);
CREATE TABLE IF NOT EXISTS mirror_tags (  -- the pull-through registry: tags it answered
    name TEXT PRIMARY KEY,               -- upstream/repository:tag
    digest TEXT NOT NULL,                -- the manifest or index it named then
    fetched_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mirror_referrers ( -- the pull-through registry: referrers answered
    name TEXT PRIMARY KEY,               -- upstream/repository@subject-digest
    digest TEXT NOT NULL,                -- the referrers index (a blob) the upstream gave then
    fetched_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reg_tags (    -- the VM disk image registry (/reg): one row per tag
    repo TEXT NOT NULL,
    image TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,                -- the disk (a blob)
    size INTEGER NOT NULL,
    meta_digest TEXT NOT NULL,           -- its metadata JSON (a blob)
    created INTEGER NOT NULL,
    PRIMARY KEY (repo, image, tag)
);
CREATE TABLE IF NOT EXISTS mirror_blobs ( -- manifests and blobs it stored (kept by GC)
    digest TEXT PRIMARY KEY,
    fetched_at INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL
);
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    Tag,
    Digest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    Pending,
    Complete,
    Failed,
}

impl LayerState {
    fn as_str(self) -> &'static str {
        match self {
            LayerState::Pending => "pending",
            LayerState::Complete => "complete",
            LayerState::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(LayerState::Pending),
            "complete" => Ok(LayerState::Complete),
            "failed" => Ok(LayerState::Failed),
            other => Err(StoreError::Corrupt(format!("layer state {other:?}"))),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub diff_id: String,
    pub source: String,
    pub state: LayerState,
    pub filled: u64,
    pub error: Option<String>,
    /// eStargz TOC digest (from the layer annotation), when the layer declares one.
    pub toc_digest: Option<String>,
    /// Entries of the verified TOC, once fetched and stored under `blobs/` by its digest.
    pub toc_entries: Option<u64>,
    /// Why the TOC was refused (the layer is then only usable once fetched whole).
    pub toc_error: Option<String>,
    /// Where the TOC member starts in the blob (the end of the payload).
    pub toc_offset: Option<u64>,
    /// Bytes fetched on demand by reads (the filler fetches the rest).
    pub ondemand: u64,
    /// The complete layer's files are in the file cache (`files/sha256/<content digest>`).
    pub unpacked: bool,
    /// Layers without a TOC: digest of the file index written when they were unpacked.
    pub index_digest: Option<String>,
    /// zstd:chunked: where the compressed TOC is (`toc_digest` is then its checksum).
    pub toc_position: Option<String>,
    /// Bytes fetched by start-up prefetch (the TOC's landmark or a learned list).
    pub prefetched: u64,
    /// Bytes fetched by the filler.
    pub fill_fetched: u64,
    /// Reads that waited for the network, and their total wait.
    pub read_waits: u64,
    pub read_wait_ms: u64,
    /// TOC entries before the prefetch landmark, when the TOC has one.
    pub landmark_files: Option<u64>,
    /// A layer without TOC served while it streamed in: whether its entries came in walk
    /// order (missing names answered early) so far, or not (they waited for the end).
    pub walk_order: Option<bool>,
}

/// Who fetched bytes of a layer (per-layer counters in the catalogue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchedBy {
    /// A read that needed them (with its read-ahead and neighbours).
    OnDemand,
    /// Start-up prefetch: the TOC's landmark or a learned list.
    Prefetch,
    /// The background filler.
    Fill,
}

impl LayerRecord {
    // How the layer can be read (its TOC and index columns): `form.rs`.

    /// A pending gzip layer of 10 bytes with nothing fetched (for tests).
    #[cfg(test)]
    pub fn for_test(digest: &str, diff_id: &str) -> LayerRecord {
        LayerRecord {
            digest: digest.into(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            size: 10,
            diff_id: diff_id.into(),
            source: "r.example/app".into(),
            state: LayerState::Pending,
            filled: 0,
            error: None,
            toc_digest: None,
            toc_entries: None,
            toc_error: None,
            toc_offset: None,
            ondemand: 0,
            unpacked: false,
            index_digest: None,
            toc_position: None,
            prefetched: 0,
            fill_fetched: 0,
            read_waits: 0,
            read_wait_ms: 0,
            landmark_files: None,
            walk_order: None,
        }
    }

    pub fn digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
    /// Bytes present locally: everything when complete, the durable ranges otherwise.
    pub fn local_bytes(&self) -> u64 {
        if self.state == LayerState::Complete {
            self.size
        } else {
            self.filled.min(self.size)
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageRecord {
    pub id: String,
    pub manifest_digest: String,
    pub index_digest: Option<String>,
    pub media_type: String,
    pub size: u64,
    pub user: String,
    pub source: String,
    pub pulled_at: i64,
    pub last_used_at: i64,
    pub tags: Vec<String>,
    pub digests: Vec<String>,
    pub layers: Vec<LayerRecord>,
}

impl ImageRecord {
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
    pub fn local_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.local_bytes()).sum()
    }
    pub fn complete(&self) -> bool {
        self.layers.iter().all(|l| l.state == LayerState::Complete)
    }
    /// Fill progress in percent (an image without layers is complete).
    pub fn fill_percent(&self) -> f64 {
        let total = self.layer_bytes();
        if total == 0 {
            100.0
        } else {
            self.local_bytes() as f64 * 100.0 / total as f64
        }
    }
}

pub struct NewLayer<'a> {
    pub digest: &'a Digest,
    pub media_type: &'a str,
    pub size: u64,
    pub diff_id: &'a Digest,
    pub toc_digest: Option<Digest>,
    /// zstd:chunked TOC position (with `toc_digest` its checksum).
    pub toc_position: Option<String>,
}

/// A tag of the VM disk image registry (`/reg`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegTag {
    pub repo: String,
    pub image: String,
    pub tag: String,
    pub digest: String,
    pub size: u64,
    pub meta_digest: String,
    pub created: i64,
}

impl RegTag {
    fn from_row(r: &rusqlite::Row) -> rusqlite::Result<Self> {
        Ok(RegTag {
            repo: r.get(0)?,
            image: r.get(1)?,
            tag: r.get(2)?,
            digest: r.get(3)?,
            size: r.get::<_, i64>(4)? as u64,
            meta_digest: r.get(5)?,
            created: r.get(6)?,
        })
    }
}

/// What a pull records.
pub struct NewImage<'a> {
    pub id: &'a Digest,
    pub manifest_digest: &'a Digest,
    pub index_digest: Option<&'a Digest>,
    pub media_type: &'a str,
    pub size: u64,
    pub user: &'a str,
    pub source: &'a str,
    /// (digest, media type, size, diff_id)
    pub layers: Vec<NewLayer<'a>>,
    pub names: Vec<(String, NameKind)>,
}

pub struct Catalogue {
    pub(super) conn: Connection,
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Catalogue {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::Schema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        // Version 1 → 2: TOC columns on layers; 2 → 3: on-demand byte count.
        for (col, ty) in [
            ("toc_digest", "TEXT"),
            ("toc_entries", "INTEGER"),
            ("toc_error", "TEXT"),
            ("toc_offset", "INTEGER"),
            ("ondemand", "INTEGER NOT NULL DEFAULT 0"),
            ("unpacked", "INTEGER NOT NULL DEFAULT 0"),
            ("index_digest", "TEXT"),
            ("toc_position", "TEXT"),
            ("prefetched", "INTEGER NOT NULL DEFAULT 0"),
            ("fill_fetched", "INTEGER NOT NULL DEFAULT 0"),
            ("read_waits", "INTEGER NOT NULL DEFAULT 0"),
            ("read_wait_ms", "INTEGER NOT NULL DEFAULT 0"),
            ("landmark_files", "INTEGER"),
            ("walk_order", "INTEGER"),
            ("index_bundle", "TEXT"),
        ] {
            let has: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('layers') WHERE name = ?1)",
                [col],
                |r| r.get(0),
            )?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE layers ADD COLUMN {col} {ty}"))?;
            }
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        // The catalogue may hold registry credentials: root-only.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        Ok(Catalogue { conn })
    }

    /// Read-only access for `list`/`status` while another process owns the store.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(Catalogue { conn })
    }

    /// Record a pulled image in one transaction. Tags move to this image if they pointed elsewhere.
    pub fn insert_image(&mut self, img: &NewImage) -> Result<()> {
        let tx = self.conn.transaction()?;
        let t = now();
        tx.execute(
            "INSERT INTO images (id, manifest_digest, index_digest, media_type, size, user, source, pulled_at, last_used_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
             ON CONFLICT(id) DO UPDATE SET manifest_digest = excluded.manifest_digest,
                index_digest = COALESCE(excluded.index_digest, images.index_digest),
                pulled_at = excluded.pulled_at",
            params![
                img.id.as_str(),
                img.manifest_digest.as_str(),
                img.index_digest.map(|d| d.as_str()),
                img.media_type,
                img.size as i64,
                img.user,
                img.source,
                t
            ],
        )?;
        // The same config can come with another manifest (recompressed layers): the latest pull
        // defines the image's layers.
        tx.execute(
            "DELETE FROM image_layers WHERE image_id = ?1",
            [img.id.as_str()],
        )?;
        for (idx, l) in img.layers.iter().enumerate() {
            tx.execute(
                "INSERT INTO layers (digest, media_type, size, diff_id, source, state, toc_digest, toc_position) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)
                 ON CONFLICT(digest) DO UPDATE SET state = CASE WHEN layers.state = 'failed' THEN 'pending' ELSE layers.state END,
                    source = excluded.source, error = NULL, toc_digest = COALESCE(layers.toc_digest, excluded.toc_digest),
                    toc_position = COALESCE(layers.toc_position, excluded.toc_position)",
                params![l.digest.as_str(), l.media_type, l.size as i64, l.diff_id.as_str(), img.source, l.toc_digest.as_ref().map(|d| d.as_str()), l.toc_position],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO image_layers (image_id, idx, digest) VALUES (?1, ?2, ?3)",
                params![img.id.as_str(), idx as i64, l.digest.as_str()],
            )?;
        }
        for (name, kind) in &img.names {
            let kind = match kind {
                NameKind::Tag => "tag",
                NameKind::Digest => "digest",
            };
            tx.execute(
                "INSERT INTO image_names (name, image_id, kind) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id",
                params![name, img.id.as_str(), kind],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn layers_of(&self, image_id: &str) -> Result<Vec<LayerRecord>> {
        let mut st = self.conn.prepare_cached(
            &format!("SELECT {LAYER_COLUMNS}
             FROM image_layers il JOIN layers l ON l.digest = il.digest WHERE il.image_id = ?1 ORDER BY il.idx"),
        )?;
        let rows = st.query_map([image_id], layer_from_row)?;
        rows.map(|r| r.map_err(StoreError::from).and_then(|x| x))
            .collect()
    }

    fn image_from_id(&self, id: &str) -> Result<Option<ImageRecord>> {
        let row = self
            .conn
            .query_row(
                "SELECT id, manifest_digest, index_digest, media_type, size, user, source, pulled_at, last_used_at
                 FROM images WHERE id = ?1",
                [id],
                |r| {
                    Ok(ImageRecord {
                        id: r.get(0)?,
                        manifest_digest: r.get(1)?,
                        index_digest: r.get(2)?,
                        media_type: r.get(3)?,
                        size: r.get::<_, i64>(4)? as u64,
                        user: r.get(5)?,
                        source: r.get(6)?,
                        pulled_at: r.get(7)?,
                        last_used_at: r.get(8)?,
                        tags: vec![],
                        digests: vec![],
                        layers: vec![],
                    })
                },
            )
            .optional()?;
        let Some(mut img) = row else { return Ok(None) };
        let mut st = self.conn.prepare_cached(
            "SELECT name, kind FROM image_names WHERE image_id = ?1 ORDER BY name",
        )?;
        let names = st.query_map([id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        for n in names {
            let (name, kind) = n?;
            if kind == "tag" {
                img.tags.push(name)
            } else {
                img.digests.push(name)
            }
        }
        img.layers = self.layers_of(id)?;
        Ok(Some(img))
    }

    pub fn image(&self, id: &str) -> Result<Option<ImageRecord>> {
        self.image_from_id(id)
    }

    pub fn image_by_name(&self, name: &str) -> Result<Option<ImageRecord>> {
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT image_id FROM image_names WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        match id {
            Some(id) => self.image_from_id(&id),
            None => Ok(None),
        }
    }

    /// Ids starting with `prefix` (a truncated id, with or without `sha256:`), at most `limit`.
    pub fn ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>> {
        let full = if prefix.starts_with("sha256:") {
            prefix.to_string()
        } else {
            format!("sha256:{prefix}")
        };
        // Prefix match without LIKE wildcards: the prefix is validated hex by the caller.
        let mut st = self.conn.prepare_cached(
            "SELECT id FROM images WHERE substr(id, 1, length(?1)) = ?1 LIMIT ?2",
        )?;
        let rows = st.query_map(params![full, limit as i64], |r| r.get(0))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }

    pub fn list_images(&self) -> Result<Vec<ImageRecord>> {
        let ids: Vec<String> = {
            let mut st = self
                .conn
                .prepare("SELECT id FROM images ORDER BY pulled_at, id")?;
            st.query_map([], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(img) = self.image_from_id(&id)? {
                out.push(img);
            }
        }
        Ok(out)
    }

    /// Remove one name. Returns true when it was the image's last tag and the image went with it.
    pub fn untag(&mut self, name: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let id: Option<String> = tx
            .query_row(
                "SELECT image_id FROM image_names WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else { return Ok(false) };
        tx.execute("DELETE FROM image_names WHERE name = ?1", [name])?;
        let tags_left: i64 = tx.query_row(
            "SELECT count(*) FROM image_names WHERE image_id = ?1 AND kind = 'tag'",
            [&id],
            |r| r.get(0),
        )?;
        let removed = tags_left == 0;
        if removed {
            tx.execute("DELETE FROM images WHERE id = ?1", [&id])?;
        }
        tx.commit()?;
        Ok(removed)
    }

    /// Remove an image with all its names. Returns whether it existed.
    pub fn remove_image(&mut self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM images WHERE id = ?1", [id])?
            > 0)
    }

    pub fn touch(&self, id: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE images SET last_used_at = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        Ok(())
    }

    pub fn layer(&self, digest: &str) -> Result<Option<LayerRecord>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {LAYER_COLUMNS} FROM layers l WHERE l.digest = ?1"
        ))?;
        st.query_row([digest], layer_from_row)
            .optional()?
            .transpose()
    }

    /// Layers still to fill and referenced by some image (with `unpack`, also complete layers
    /// not yet unpacked).
    pub fn layers_to_work_on(&self, unpack: bool) -> Result<Vec<LayerRecord>> {
        let mut st = self.conn.prepare(
            &format!("SELECT {LAYER_COLUMNS} FROM layers l
             WHERE (l.state = 'pending' OR (?1 AND l.state = 'complete' AND l.unpacked = 0)) AND EXISTS (SELECT 1 FROM image_layers il WHERE il.digest = l.digest)"),
        )?;
        let rows = st.query_map([unpack], layer_from_row)?;
        rows.map(|r| r.map_err(StoreError::from).and_then(|x| x))
            .collect()
    }

    /// The complete layer's files are in the file cache; `index` for layers without a TOC.
    pub fn set_unpacked(&self, digest: &str, index: Option<&str>) -> Result<()> {
        self.conn.execute(
            // A bundle names the layer's index only while it is that index.
            "UPDATE layers SET unpacked = 1, index_digest = ?2,
                 index_bundle = CASE WHEN index_digest IS ?2 THEN index_bundle END
             WHERE digest = ?1",
            params![digest, index],
        )?;
        Ok(())
    }

    /// Record a random-access index another node shared for a layer not unpacked here (an
    /// unpack records its own index with `set_unpacked`). Whether it was recorded.
    pub fn set_shared_index(&self, digest: &str, index: &str, bundle: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE layers SET index_digest = ?2, index_bundle = ?3 WHERE digest = ?1 AND unpacked = 0",
            params![digest, index, bundle],
        )?;
        Ok(n > 0)
    }

    /// The shared bundle a layer's index was taken from (as [`Catalogue::set_shared_index`]
    /// recorded it), if it was.
    pub fn index_bundle(&self, digest: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT index_bundle FROM layers WHERE digest = ?1 AND index_digest IS NOT NULL",
                params![digest],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    /// Forget a layer's index taken from another node (it gave wrong bytes): the layer is
    /// fetched whole and served as it streams in. Whether there was one.
    pub fn drop_shared_index(&self, digest: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE layers SET index_digest = NULL, index_bundle = NULL WHERE digest = ?1 AND unpacked = 0 AND index_digest IS NOT NULL",
            params![digest],
        )?;
        Ok(n > 0)
    }

    /// Whether a layer streaming in came in walk order (see `fs::stream`).
    pub fn set_walk_order(&self, digest: &str, ordered: bool) -> Result<()> {
        self.conn.execute(
            "UPDATE layers SET walk_order = ?2 WHERE digest = ?1",
            params![digest, ordered as i64],
        )?;
        Ok(())
    }

    /// Count bytes fetched for the layer.
    pub fn add_fetched(&self, digest: &str, by: FetchedBy, bytes: u64) -> Result<()> {
        let sql = match by {
            FetchedBy::OnDemand => "UPDATE layers SET ondemand = ondemand + ?2 WHERE digest = ?1",
            FetchedBy::Prefetch => {
                "UPDATE layers SET prefetched = prefetched + ?2 WHERE digest = ?1"
            }
            FetchedBy::Fill => {
                "UPDATE layers SET fill_fetched = fill_fetched + ?2 WHERE digest = ?1"
            }
        };
        self.conn
            .prepare_cached(sql)?
            .execute(params![digest, bytes as i64])?;
        Ok(())
    }

    /// Count reads of the layer that waited for the network, `ms` in all.
    pub fn add_read_waits(&self, digest: &str, reads: u64, ms: u64) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE layers SET read_waits = read_waits + ?2, read_wait_ms = read_wait_ms + ?3 WHERE digest = ?1",
            )?
            .execute(params![digest, reads as i64, ms as i64])?;
        Ok(())
    }

    pub fn set_filled(&self, digest: &str, filled: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE layers SET filled = ?2 WHERE digest = ?1",
            params![digest, filled as i64],
        )?;
        Ok(())
    }

    pub fn set_layer_state(
        &self,
        digest: &str,
        state: LayerState,
        error: Option<&str>,
    ) -> Result<()> {
        let completed = (state == LayerState::Complete).then(now);
        let filled_reset = state == LayerState::Failed;
        self.conn.execute(
            "UPDATE layers SET state = ?2, error = ?3, completed_at = ?4,
                filled = CASE WHEN ?5 THEN 0 ELSE filled END WHERE digest = ?1",
            params![digest, state.as_str(), error, completed, filled_reset],
        )?;
        Ok(())
    }

    /// Whether any image or snapshot still references this layer.
    pub fn layer_referenced(&self, digest: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM image_layers WHERE digest = ?1) OR EXISTS (SELECT 1 FROM snapshots WHERE remote_layer = ?1)",
            [digest],
            |r| r.get(0),
        )?)
    }

    /// Delete layer rows no image and no snapshot references; returns their digests (the caller removes files).
    pub fn drop_unreferenced_layers(&mut self) -> Result<Vec<String>> {
        let tx = self.conn.transaction()?;
        let gone: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT digest FROM layers l WHERE NOT EXISTS (SELECT 1 FROM image_layers il WHERE il.digest = l.digest) \
                 AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.remote_layer = l.digest)",
            )?;
            st.query_map([], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        for d in &gone {
            tx.execute("DELETE FROM layers WHERE digest = ?1", [d])?;
        }
        tx.commit()?;
        Ok(gone)
    }

    /// Every digest some image still needs: manifests, indexes, configs and layers.
    pub fn referenced_digests(&self) -> Result<BTreeSet<String>> {
        let mut set = BTreeSet::new();
        let mut st = self
            .conn
            .prepare("SELECT id, manifest_digest, index_digest FROM images")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        for r in rows {
            let (a, b, c) = r?;
            set.insert(a);
            set.insert(b);
            set.extend(c);
        }
        let mut st = self.conn.prepare(
            "SELECT digest, CASE WHEN toc_entries IS NOT NULL THEN toc_digest END, index_digest FROM layers",
        )?;
        for d in st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })? {
            let (layer, toc, index) = d?;
            set.insert(layer);
            set.extend(toc);
            set.extend(index);
        }
        let mut st = self.conn.prepare("SELECT digest FROM mirror_blobs")?;
        for d in st.query_map([], |r| r.get::<_, String>(0))? {
            set.insert(d?);
        }
        let mut st = self
            .conn
            .prepare("SELECT digest, meta_digest FROM reg_tags")?;
        for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (disk, meta) = r?;
            set.insert(disk);
            set.insert(meta);
        }
        Ok(set)
    }

    /// Record (or replace, atomically) a disk image tag of the VM disk registry.
    pub fn put_reg_tag(&self, t: &RegTag) -> Result<()> {
        self.conn.execute(
            "INSERT INTO reg_tags (repo, image, tag, digest, size, meta_digest, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(repo, image, tag) DO UPDATE SET digest = ?4, size = ?5,
                meta_digest = ?6, created = ?7",
            params![
                t.repo,
                t.image,
                t.tag,
                t.digest,
                t.size as i64,
                t.meta_digest,
                t.created
            ],
        )?;
        Ok(())
    }

    pub fn reg_tag(&self, repo: &str, image: &str, tag: &str) -> Result<Option<RegTag>> {
        let mut st = self.conn.prepare(
            "SELECT repo, image, tag, digest, size, meta_digest, created FROM reg_tags
             WHERE repo = ?1 AND image = ?2 AND tag = ?3",
        )?;
        let mut rows = st.query_map(params![repo, image, tag], RegTag::from_row)?;
        Ok(rows.next().transpose()?)
    }

    /// Tags of the VM disk registry: all, of one repository, or of one image (sorted).
    pub fn reg_tags(&self, repo: Option<&str>, image: Option<&str>) -> Result<Vec<RegTag>> {
        let mut st = self.conn.prepare(
            "SELECT repo, image, tag, digest, size, meta_digest, created FROM reg_tags
             WHERE (?1 IS NULL OR repo = ?1) AND (?2 IS NULL OR image = ?2)
             ORDER BY repo, image, tag",
        )?;
        let rows = st.query_map(params![repo, image], RegTag::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Remove a tag; whether it existed.
    pub fn delete_reg_tag(&self, repo: &str, image: &str, tag: &str) -> Result<bool> {
        Ok(self.conn.execute(
            "DELETE FROM reg_tags WHERE repo = ?1 AND image = ?2 AND tag = ?3",
            params![repo, image, tag],
        )? > 0)
    }

    /// The pull-through registry stored `digest` (a manifest or a blob): GC keeps it.
    pub fn add_mirror_blob(&self, digest: &str) -> Result<()> {
        let t = now();
        self.conn.execute(
            "INSERT INTO mirror_blobs (digest, fetched_at, accessed_at) VALUES (?1, ?2, ?2)
             ON CONFLICT(digest) DO UPDATE SET accessed_at = ?2",
            params![digest, t],
        )?;
        Ok(())
    }

    /// Every manifest and blob the pull-through registry stored: (digest, fetched, accessed).
    pub fn mirror_blob_rows(&self) -> Result<Vec<(String, i64, i64)>> {
        let mut st = self
            .conn
            .prepare("SELECT digest, fetched_at, accessed_at FROM mirror_blobs ORDER BY digest")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every tag the pull-through registry answered: (name, digest).
    pub fn mirror_tag_rows(&self) -> Result<Vec<(String, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT name, digest FROM mirror_tags ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Record that the pull-through registry served these digests at `t`.
    pub fn touch_mirror_blobs(&mut self, digests: &[String], t: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare(
                "UPDATE mirror_blobs SET accessed_at = max(accessed_at, ?2) WHERE digest = ?1",
            )?;
            for d in digests {
                st.execute(params![d, t])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget what the pull-through registry stored (one transaction): the tags naming
    /// `untag` digests, and the `blobs` rows with the referrers lists among them. GC then
    /// removes the files nothing else references. Returns (tags, blobs) forgotten.
    pub fn forget_mirror(&mut self, untag: &[String], blobs: &[String]) -> Result<(usize, usize)> {
        let tx = self.conn.transaction()?;
        let (mut tags, mut rows) = (0, 0);
        for d in untag {
            tags += tx.execute("DELETE FROM mirror_tags WHERE digest = ?1", [d])?;
        }
        for d in blobs {
            rows += tx.execute("DELETE FROM mirror_blobs WHERE digest = ?1", [d])?;
            tx.execute("DELETE FROM mirror_referrers WHERE digest = ?1", [d])?;
        }
        tx.commit()?;
        Ok((tags, rows))
    }

    /// The pull-through registry answered `name` (`upstream/repo:tag`) with `digest`.
    pub fn set_mirror_tag(&self, name: &str, digest: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO mirror_tags (name, digest, fetched_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET digest = ?2, fetched_at = ?3",
            params![name, digest, now()],
        )?;
        Ok(())
    }

    /// What the pull-through registry last answered for `name`, else what a pull of that name
    /// recorded (an image pulled through CRI is served by tag too).
    pub fn mirror_tag(&self, name: &str) -> Result<Option<String>> {
        let mut st = self
            .conn
            .prepare("SELECT digest FROM mirror_tags WHERE name = ?1")?;
        if let Some(d) = st
            .query_map(params![name], |r| r.get::<_, String>(0))?
            .next()
        {
            return Ok(Some(d?));
        }
        Ok(self
            .image_by_name(name)?
            .map(|i| i.index_digest.unwrap_or(i.manifest_digest)))
    }

    /// A cheap query, for readiness probes: fails when the database cannot be read.
    pub fn integrity_probe(&self) -> Result<()> {
        self.conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })?;
        Ok(())
    }

    /// Record the referrers index the upstream gave for `name` (`upstream/repo@subject`).
    pub fn set_mirror_referrers(&self, name: &str, digest: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO mirror_referrers (name, digest, fetched_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET digest = ?2, fetched_at = ?3",
            params![name, digest, now()],
        )?;
        Ok(())
    }

    /// The referrers index last recorded for `name`.
    pub fn mirror_referrers(&self, name: &str) -> Result<Option<String>> {
        let mut st = self
            .conn
            .prepare("SELECT digest FROM mirror_referrers WHERE name = ?1")?;
        let mut rows = st.query_map(params![name], |r| r.get(0))?;
        Ok(rows.next().transpose()?)
    }

    /// The digest the pull-through registry last answered for `name` and when the upstream
    /// last confirmed it (Unix seconds).
    pub fn mirror_tag_checked(&self, name: &str) -> Result<Option<(String, i64)>> {
        let mut st = self
            .conn
            .prepare("SELECT digest, fetched_at FROM mirror_tags WHERE name = ?1")?;
        let mut rows = st.query_map(params![name], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.next().transpose()?)
    }

    /// The tags of `repo` (`upstream/repository`) this node knows, sorted.
    pub fn mirror_tags_of(&self, repo: &str) -> Result<Vec<String>> {
        let prefix = format!("{repo}:");
        let mut tags = BTreeSet::new();
        for sql in [
            "SELECT name FROM mirror_tags WHERE substr(name, 1, length(?1)) = ?1",
            "SELECT name FROM image_names WHERE kind = 'tag' AND substr(name, 1, length(?1)) = ?1",
        ] {
            let mut st = self.conn.prepare(sql)?;
            for n in st.query_map(params![prefix], |r| r.get::<_, String>(0))? {
                let n = n?;
                if let Some(t) = n.strip_prefix(&prefix)
                    && !t.contains('/')
                {
                    tags.insert(t.to_string());
                }
            }
        }
        Ok(tags.into_iter().collect())
    }

    /// The verified TOC: its entries, where it starts, and the entries before its prefetch
    /// landmark if it has one.
    pub fn set_toc(
        &self,
        digest: &str,
        entries: u64,
        toc_offset: u64,
        landmark: Option<u64>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE layers SET toc_entries = ?2, toc_offset = ?3, toc_error = NULL, landmark_files = ?4 WHERE digest = ?1",
            params![digest, entries as i64, toc_offset as i64, landmark.map(|n| n as i64)],
        )?;
        Ok(())
    }

    pub fn set_toc_error(&self, digest: &str, error: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE layers SET toc_error = ?2 WHERE digest = ?1",
            params![digest, error],
        )?;
        Ok(())
    }

    pub fn put_credential(&self, registry: &str, secret_json: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO credentials (registry, secret) VALUES (?1, ?2) ON CONFLICT(registry) DO UPDATE SET secret = excluded.secret",
            params![registry, secret_json],
        )?;
        Ok(())
    }

    pub fn credential(&self, registry: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT secret FROM credentials WHERE registry = ?1",
                [registry],
                |r| r.get(0),
            )
            .optional()?)
    }
}

fn layer_from_row(r: &rusqlite::Row) -> rusqlite::Result<Result<LayerRecord>> {
    let state: String = r.get(5)?;
    Ok(LayerState::parse(&state).map(|state| LayerRecord {
        digest: r.get(0).unwrap_or_default(),
        media_type: r.get(1).unwrap_or_default(),
        size: r.get::<_, i64>(2).unwrap_or_default() as u64,
        diff_id: r.get(3).unwrap_or_default(),
        source: r.get(4).unwrap_or_default(),
        state,
        filled: r.get::<_, i64>(6).unwrap_or_default() as u64,
        error: r.get(7).unwrap_or_default(),
        toc_digest: r.get(8).unwrap_or_default(),
        toc_entries: r
            .get::<_, Option<i64>>(9)
            .unwrap_or_default()
            .map(|n| n.max(0) as u64),
        toc_error: r.get(10).unwrap_or_default(),
        toc_offset: r
            .get::<_, Option<i64>>(11)
            .unwrap_or_default()
            .map(|n| n.max(0) as u64),
        ondemand: r.get::<_, i64>(12).unwrap_or_default().max(0) as u64,
        unpacked: r.get::<_, i64>(13).unwrap_or_default() != 0,
        index_digest: r.get(14).unwrap_or_default(),
        toc_position: r.get(15).unwrap_or_default(),
        prefetched: r.get::<_, i64>(16).unwrap_or_default().max(0) as u64,
        fill_fetched: r.get::<_, i64>(17).unwrap_or_default().max(0) as u64,
        read_waits: r.get::<_, i64>(18).unwrap_or_default().max(0) as u64,
        read_wait_ms: r.get::<_, i64>(19).unwrap_or_default().max(0) as u64,
        landmark_files: r
            .get::<_, Option<i64>>(20)
            .unwrap_or_default()
            .map(|n| n.max(0) as u64),
        walk_order: r
            .get::<_, Option<i64>>(21)
            .unwrap_or_default()
            .map(|n| n != 0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn add(cat: &mut Catalogue, id: &Digest, layers: &[Digest], names: Vec<(String, NameKind)>) {
        let m = d('f');
        cat.insert_image(&NewImage {
            id,
            manifest_digest: &m,
            index_digest: None,
            media_type: "m",
            size: 10,
            user: "",
            source: "r/x",
            layers: layers
                .iter()
                .map(|l| NewLayer {
                    digest: l,
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
                    size: 5,
                    diff_id: l,
                    toc_digest: None,
                    toc_position: None,
                })
                .collect(),
            names,
        })
        .unwrap();
    }

    #[test]
    fn names_untag_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalogue::open(&dir.path().join("c.db")).unwrap();
        let (a, b, shared, only_a) = (d('a'), d('b'), d('1'), d('2'));
        add(
            &mut cat,
            &a,
            &[shared.clone(), only_a.clone()],
            vec![
                ("r/x:1".into(), NameKind::Tag),
                ("r/x:2".into(), NameKind::Tag),
            ],
        );
        add(
            &mut cat,
            &b,
            std::slice::from_ref(&shared),
            vec![("r/y:1".into(), NameKind::Tag)],
        );
        assert_eq!(cat.list_images().unwrap().len(), 2);
        assert_eq!(cat.image_by_name("r/x:2").unwrap().unwrap().id, a.as_str());
        assert_eq!(cat.ids_with_prefix("aaaa", 2).unwrap(), vec![a.to_string()]);
        // Untag one of two tags: image stays.
        assert!(!cat.untag("r/x:1").unwrap());
        assert!(cat.image(a.as_str()).unwrap().is_some());
        // Last tag: image goes, its exclusive layer becomes unreferenced, the shared one does not.
        assert!(cat.untag("r/x:2").unwrap());
        assert!(cat.image(a.as_str()).unwrap().is_none());
        assert!(cat.layer_referenced(shared.as_str()).unwrap());
        assert_eq!(
            cat.drop_unreferenced_layers().unwrap(),
            vec![only_a.to_string()]
        );
        // Re-pulling an id with fewer layers leaves no stale rows.
        add(&mut cat, &b, &[], vec![]);
        assert!(cat.image(b.as_str()).unwrap().unwrap().layers.is_empty());
        add(&mut cat, &b, std::slice::from_ref(&shared), vec![]);
        // A tag moves to a newer image.
        add(&mut cat, &a, &[], vec![("r/y:1".into(), NameKind::Tag)]);
        assert_eq!(cat.image_by_name("r/y:1").unwrap().unwrap().id, a.as_str());
        assert!(cat.image(b.as_str()).unwrap().unwrap().tags.is_empty());
    }

    #[test]
    fn fill_progress_and_states() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalogue::open(&dir.path().join("c.db")).unwrap();
        let (a, l) = (d('a'), d('1'));
        add(&mut cat, &a, std::slice::from_ref(&l), vec![]);
        assert_eq!(cat.layers_to_work_on(false).unwrap().len(), 1);
        cat.set_filled(l.as_str(), 3).unwrap();
        assert_eq!(cat.image(a.as_str()).unwrap().unwrap().local_bytes(), 3);
        cat.set_layer_state(l.as_str(), LayerState::Complete, None)
            .unwrap();
        let img = cat.image(a.as_str()).unwrap().unwrap();
        assert!(img.complete());
        assert_eq!(img.fill_percent(), 100.0);
        assert!(cat.layers_to_work_on(false).unwrap().is_empty());
        // A failed layer is retried on the next pull that needs it.
        cat.set_layer_state(l.as_str(), LayerState::Failed, Some("boom"))
            .unwrap();
        add(&mut cat, &a, std::slice::from_ref(&l), vec![]);
        assert_eq!(
            cat.layer(l.as_str()).unwrap().unwrap().state,
            LayerState::Pending
        );
    }
}
