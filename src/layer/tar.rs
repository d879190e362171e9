//! Unpacking a verified layer into the store's file cache, and the file index of layers that
//! have no TOC.
//!
//! A complete layer's regular files are written to `files/sha256/<content digest>` (one copy per
//! distinct content across all layers). They serve plain gzip/zstd/tar layers, which cannot be
//! read in place, and FUSE passthrough for complete layers of any format. A file appears under
//! its final name only after its data is durable (`syncfs` before the renames), and the name is
//! the digest of the bytes actually written, so a name always matches its content.
//!
//! For layers without a TOC, the tar's entries (paths, kinds, modes, owners, times, links,
//! devices, xattrs, content digests) are kept as a small JSON index, stored as a blob under its
//! own digest, so a restart rebuilds the layer directory without reading the tar again.

use super::estargz::clean_path;
use super::gzindex::{self, CHUNK, Point};
use super::index::{Chunk, Codec, Entry, Kind};
use crate::oci::{Compression, Digest};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer tar: {0}")]
    Tar(String),
    #[error("layer tar entry {path:?}: {reason}")]
    Entry { path: String, reason: String },
    #[error("file cache i/o at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("file index: {0}")]
    Index(String),
}

static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Caps on what a layer may hold (a hostile tar must not exhaust memory).
pub struct Limits {
    pub max_entries: usize,
    pub max_path: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_path: 4096,
        }
    }
}

/// A decompressing reader over a layer blob.
pub fn decoder(
    c: Compression,
    blob: impl Read + Send + 'static,
) -> io::Result<Box<dyn Read + Send>> {
    let r = io::BufReader::with_capacity(1 << 20, blob);
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    })
}

fn rfc3339(secs: u64) -> Option<String> {
    chrono::DateTime::from_timestamp(secs.min(i64::MAX as u64) as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The metadata of one tar entry (no content digest; `size` is 0 until the caller reads the
/// content): the path cleaned and checked, the kind, mode, owner, time, link, device and
/// xattrs. `None` for records that carry no file (PAX headers). `seen` holds the paths of
/// earlier entries: a hardlink must name one of them.
pub fn entry_meta<R: Read>(
    e: &mut tar::Entry<'_, R>,
    seen: &HashSet<String>,
    limits: &Limits,
) -> Result<Option<Entry>, UnpackError> {
    let raw_path = e.path_bytes().into_owned();
    let raw = String::from_utf8_lossy(&raw_path).into_owned();
    let bad = |reason: String| UnpackError::Entry {
        path: raw.clone(),
        reason,
    };
    if raw.len() > limits.max_path {
        return Err(bad("path too long".into()));
    }
    let path = clean_path(&raw).map_err(&bad)?;
    let h = e.header();
    let et = h.entry_type();
    let kind = match et {
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::Reg,
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Link => Kind::Hardlink,
        tar::EntryType::Char => Kind::Char,
        tar::EntryType::Block => Kind::Block,
        tar::EntryType::Fifo => Kind::Fifo,
        // Metadata records the tar crate has already applied, or nothing to show.
        tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => return Ok(None),
        other => return Err(bad(format!("unsupported entry type {other:?}"))),
    };
    let mode = h.mode().map_err(|x| bad(x.to_string()))?;
    let uid = h.uid().map_err(|x| bad(x.to_string()))?;
    let gid = h.gid().map_err(|x| bad(x.to_string()))?;
    let mtime = h.mtime().ok().and_then(rfc3339);
    let (dev_major, dev_minor) = match kind {
        Kind::Char | Kind::Block => (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        ),
        _ => (0, 0),
    };
    let link = match kind {
        Kind::Symlink => e
            .link_name_bytes()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or_else(|| bad("symlink without a target".into()))?,
        Kind::Hardlink => {
            let t = e
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| bad("hardlink without a target".into()))?;
            let t = clean_path(&t).map_err(&bad)?;
            if !seen.contains(&t) {
                return Err(bad(format!(
                    "hardlink to {t:?}, which is not an earlier entry"
                )));
            }
            t
        }
        _ => String::new(),
    };
    let mut xattrs = vec![];
    if let Ok(Some(exts)) = e.pax_extensions() {
        for ext in exts.flatten() {
            if let Ok(k) = ext.key()
                && let Some(name) = k.strip_prefix("SCHILY.xattr.")
            {
                xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(Some(Entry {
        path,
        kind,
        size: 0,
        mode,
        uid: uid.min(u32::MAX as u64) as u32,
        gid: gid.min(u32::MAX as u64) as u32,
        mtime,
        link,
        dev_major,
        dev_minor,
        xattrs,
        digest: None,
        chunks: vec![],
    }))
}

/// Result of an unpack: the layer's entries and what was written.
pub struct Unpacked {
    pub entries: Vec<Entry>,
    /// Per entry: where a regular file's content lies in the uncompressed tar stream.
    pub positions: Vec<Option<FilePos>>,
    pub files_written: u64,
    pub bytes_written: u64,
}

/// Where a regular file's content lies in its layer's uncompressed tar stream, and the digests
/// of its [`CHUNK`]-sized pieces when it has more than one (one piece: the file's digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePos {
    pub offset: u64,
    pub chunks: Vec<Digest>,
    /// Per piece, how many compressed bytes the first decompression had consumed when the
    /// piece was complete: a read of the piece needs no blob bytes past it (empty: unknown).
    pub ends: Vec<u64>,
}

/// Told of each entry as an unpack completes it (a layer served while it streams in).
pub trait Observer {
    /// Entry number `idx` is complete (a regular file's `digest` and `size` set). `tmp` holds a
    /// regular file's content until the unpack moves it into the file cache at its end (None:
    /// the cache has it already, or an earlier entry of this layer holds the same content).
    /// Returns where the content already is if an earlier attempt of this unpack kept it
    /// (identical, by digest): that file is moved into the cache instead, `tmp` is removed.
    fn entry(&mut self, idx: usize, entry: &Entry, tmp: Option<&Path>) -> Option<PathBuf>;
    /// Whether the temp file `tmp` must stay when the unpack fails (someone still reads it).
    fn keeps(&self, tmp: &Path) -> bool;
}

/// An observer that wants nothing.
pub struct Nobody;

impl Observer for Nobody {
    fn entry(&mut self, _: usize, _: &Entry, _: Option<&Path>) -> Option<PathBuf> {
        None
    }
    fn keeps(&self, _: &Path) -> bool {
        false
    }
}

/// Read a layer tar, store every regular file's content under `files_dir/<hex>` and return the
/// entries. Blocking. Paths are cleaned and `..` refused; hardlinks must name an earlier entry.
pub fn unpack(tar: impl Read, files_dir: &Path, limits: &Limits) -> Result<Unpacked, UnpackError> {
    unpack_observed(tar, files_dir, limits, &mut Nobody)
}

/// [`unpack`], telling `observer` of each entry as it is complete.
pub fn unpack_observed(
    tar: impl Read,
    files_dir: &Path,
    limits: &Limits,
    observer: &mut dyn Observer,
) -> Result<Unpacked, UnpackError> {
    unpack_tracked(tar, files_dir, limits, observer, None)
}

/// [`unpack_observed`]; `consumed` counts the compressed bytes the decoder under `tar` has
/// read (gzindex's readers), noted at the end of each file piece in [`FilePos::ends`].
pub fn unpack_tracked(
    tar: impl Read,
    files_dir: &Path,
    limits: &Limits,
    observer: &mut dyn Observer,
    consumed: Option<&std::sync::atomic::AtomicU64>,
) -> Result<Unpacked, UnpackError> {
    let consumed_now = || consumed.map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnpackError::Io { path, source }
    };
    fs::create_dir_all(files_dir).map_err(io_err(files_dir))?;
    let mut archive = tar::Archive::new(tar);
    let mut entries = vec![];
    let mut positions = vec![];
    let mut seen: HashSet<String> = HashSet::new();
    // Temp files to rename once their data is durable.
    let mut pending: Vec<(PathBuf, PathBuf)> = vec![];
    let mut pending_names: HashSet<String> = HashSet::new();
    let (mut files_written, mut bytes_written) = (0u64, 0u64);
    let cleanup = |pending: &[(PathBuf, PathBuf)], observer: &dyn Observer| {
        for (tmp, _) in pending {
            if !observer.keeps(tmp) {
                let _ = fs::remove_file(tmp);
            }
        }
    };
    let iter = archive
        .entries()
        .map_err(|e| UnpackError::Tar(e.to_string()))?;
    let result = (|| {
        for item in iter {
            let mut e = item.map_err(|e| UnpackError::Tar(e.to_string()))?;
            if entries.len() >= limits.max_entries {
                return Err(UnpackError::Tar(format!(
                    "more than {} entries",
                    limits.max_entries
                )));
            }
            let Some(mut entry) = entry_meta(&mut e, &seen, limits)? else {
                continue;
            };
            let path = entry.path.clone();
            let kind = entry.kind;
            let bad = |reason: String| UnpackError::Entry {
                path: path.clone(),
                reason,
            };
            let (mut size, mut digest, mut position) = (0, None, None);
            if kind == Kind::Reg {
                let offset = e.raw_file_position();
                // Unique across concurrent unpacks in this process and across processes.
                let tmp = files_dir.join(format!(
                    ".tmp-{}-{}",
                    std::process::id(),
                    TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .open(&tmp)
                    .map_err(io_err(&tmp))?;
                let mut hash = Sha256::new();
                // The digests of the file's CHUNK-sized pieces (random access through a gzip
                // index verifies piece by piece).
                let (mut piece, mut pieces, mut ends) = (Sha256::new(), vec![], vec![]);
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = e.read(&mut buf).map_err(|x| bad(x.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        let room = (CHUNK - size % CHUNK) as usize;
                        let k = room.min(rest.len());
                        piece.update(&rest[..k]);
                        size += k as u64;
                        rest = &rest[k..];
                        if size % CHUNK == 0 {
                            pieces
                                .push(Digest::from_sha256(&std::mem::take(&mut piece).finalize()));
                            ends.extend(consumed_now());
                        }
                    }
                    out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                }
                if size % CHUNK != 0 || size == 0 {
                    pieces.push(Digest::from_sha256(&piece.finalize()));
                    ends.extend(consumed_now());
                }
                if pieces.len() < 2 {
                    pieces.clear();
                }
                position = Some(FilePos {
                    offset,
                    chunks: pieces,
                    ends,
                });
                let d = Digest::from_sha256(&hash.finalize());
                let dest = files_dir.join(d.hex());
                entry.size = size;
                entry.digest = Some(d.clone());
                if dest.exists() || !pending_names.insert(d.hex().to_string()) {
                    let _ = fs::remove_file(&tmp);
                    observer.entry(entries.len(), &entry, None);
                } else {
                    let kept = observer.entry(entries.len(), &entry, Some(&tmp));
                    let from = match kept {
                        Some(old) if old != tmp => {
                            let _ = fs::remove_file(&tmp);
                            old
                        }
                        _ => tmp,
                    };
                    pending.push((from, dest));
                    files_written += 1;
                    bytes_written += size;
                }
                digest = Some(d);
            } else {
                entry.size = 0;
                entry.digest = None;
                observer.entry(entries.len(), &entry, None);
            }
            entry.size = size;
            entry.digest = digest;
            seen.insert(path.clone());
            entries.push(entry);
            positions.push(position);
        }
        // Data first, names second: a crash leaves temp files (GC removes them), never a
        // file under its digest with missing bytes.
        let dir = File::open(files_dir).map_err(io_err(files_dir))?;
        nix::unistd::syncfs(&dir).map_err(|e| UnpackError::Io {
            path: files_dir.to_path_buf(),
            source: io::Error::from(e),
        })?;
        for (tmp, dest) in &pending {
            fs::rename(tmp, dest).map_err(io_err(dest))?;
        }
        dir.sync_all().map_err(io_err(files_dir))?;
        Ok(())
    })();
    // The tar ends at its end-of-archive blocks; what follows (padding, the gzip trailer) is
    // read too, so that a decoder checks its trailer and an index recorder sees the end.
    let result = result.and_then(|()| {
        io::copy(&mut archive.into_inner(), &mut io::sink())
            .map(drop)
            .map_err(|e| UnpackError::Tar(format!("after the end of the archive: {e}")))
    });
    if let Err(e) = result {
        cleanup(&pending, observer);
        return Err(e);
    }
    Ok(Unpacked {
        entries,
        positions,
        files_written,
        bytes_written,
    })
}

#[derive(Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    entries: Vec<IndexEntry>,
    /// Version 2: random access into the gzip layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gzip: Option<GzipSection>,
    /// Why a compressed layer has no random access (`status` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    no_random_access: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct GzipSection {
    /// The layer blob this index is of.
    layer: String,
    blob_size: u64,
    /// Uncompressed size of the tar stream.
    size: u64,
    /// Size of the pieces whose digests `chunks` lists.
    chunk: u64,
    /// `zstd`: the checkpoints are zstd frame starts (absent: deflate checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    codec: Option<String>,
    /// The blob holding the windows kept apart (a shared index): its digest and size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    windows: Option<(String, u64)>,
    points: Vec<PointJson>,
}

#[derive(Serialize, Deserialize)]
struct PointJson {
    out: u64,
    #[serde(rename = "in")]
    inp: u64,
    bits: u8,
    /// base64 of the zstd-compressed window.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    window: String,
    /// The window kept apart: offset and length in the windows blob, and its sha256 (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w: Option<(u64, u32, String)>,
}

/// What a gzip index adds to the file index: the decoder checkpoints, and where each regular
/// file's content lies in the uncompressed stream (`positions`, by entry).
#[derive(Clone, Debug)]
pub struct RandomAccess {
    pub layer: Digest,
    pub blob_size: u64,
    pub size: u64,
    pub points: Vec<Point>,
    pub positions: Vec<Option<FilePos>>,
    /// The blob holding the windows of points with a [`Point::window_ref`] (digest, size).
    pub windows: Option<(Digest, u64)>,
}

impl RandomAccess {
    /// Move the windows kept inline into `blob` (appended; each point then refers to its
    /// window there): a shared index keeps them apart, so that a node fetches only the windows
    /// its reads start from. The caller sets [`RandomAccess::windows`] once `blob` is whole.
    pub fn split_windows(&mut self, blob: &mut Vec<u8>) {
        use sha2::Digest as _;
        for p in &mut self.points {
            if p.window.is_empty() {
                continue;
            }
            let window = std::mem::take(&mut p.window);
            p.window_ref = Some(gzindex::WindowRef {
                offset: blob.len() as u64,
                len: window.len() as u32,
                sha256: sha2::Sha256::digest(&window).into(),
            });
            blob.extend_from_slice(&window);
        }
    }

    /// Whether some point's window is kept apart (fetched from the registry when needed).
    pub fn windows_apart(&self) -> bool {
        self.points.iter().any(|p| p.window_ref.is_some())
    }

    /// The entries with chunks that decode from the nearest checkpoint: a layer mounted from
    /// this index is read lazily, like an eStargz layer.
    pub fn lazy_entries(&self, entries: &[Entry]) -> Vec<Entry> {
        let points: Vec<std::sync::Arc<Point>> = self
            .points
            .iter()
            .cloned()
            .map(std::sync::Arc::new)
            .collect();
        entries
            .iter()
            .zip(&self.positions)
            .map(|(e, pos)| {
                let mut e = e.clone();
                let (Some(pos), Some(file_digest)) = (pos, &e.digest) else {
                    return e;
                };
                let n = e.size.div_ceil(CHUNK);
                for k in 0..n {
                    let file_offset = k * CHUNK;
                    let size = CHUNK.min(e.size - file_offset);
                    let at = pos.offset + file_offset;
                    // Validated: the first checkpoint is at 0, so one lies before any offset.
                    let Some(i) = gzindex::point_before(&self.points, at) else {
                        continue;
                    };
                    let p = &points[i];
                    e.chunks.push(Chunk {
                        offset: p.start(),
                        inner_offset: at - p.out,
                        file_offset,
                        size,
                        digest: Some(pos.chunks.get(k as usize).unwrap_or(file_digest).clone()),
                        // Where the first decoder was when the piece was complete (it had read
                        // no further), else the next checkpoint.
                        codec: Codec::Checkpoint {
                            point: std::sync::Arc::clone(p),
                            end: pos
                                .ends
                                .get(k as usize)
                                .map(|&e| (e + gzindex::END_SLACK).max(p.inp + 1))
                                .unwrap_or(u64::MAX)
                                .min(gzindex::end_after(&self.points, at + size, self.blob_size)),
                        },
                    });
                }
                e
            })
            .collect()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_no_dev(d: &(u32, u32)) -> bool {
    *d == (0, 0)
}

#[derive(Serialize, Deserialize)]
struct IndexEntry {
    path: String,
    kind: String,
    // Defaults are left out (an index is shared between nodes: its size counts).
    #[serde(default, skip_serializing_if = "is_zero")]
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    #[serde(default)]
    mtime: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    link: String,
    #[serde(default, skip_serializing_if = "is_no_dev")]
    dev: (u32, u32),
    /// name → base64 value
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    xattrs: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    /// Version 2: where the content lies in the uncompressed stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    /// Version 2: digests of the content's pieces, when there is more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chunks: Vec<String>,
    /// Version 2: per piece, the blob offset decoding it needs to reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ends: Vec<u64>,
}

/// Why an index's layer has no random access, as its unpack recorded it.
pub fn index_note(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Note {
        no_random_access: Option<String>,
    }
    serde_json::from_slice::<Note>(bytes)
        .ok()?
        .no_random_access
        .map(|s| s.chars().take(200).collect())
}

/// The JSON index of a layer's entries.
pub fn encode_index(entries: &[Entry]) -> Vec<u8> {
    encode_index_with(entries, None)
}

/// The JSON index of a layer's entries, with random access into its gzip stream when given.
pub fn encode_index_with(entries: &[Entry], ra: Option<&RandomAccess>) -> Vec<u8> {
    encode_index_full(entries, ra, None)
}

/// [`encode_index_with`], and without random access, why not.
pub fn encode_index_full(
    entries: &[Entry],
    ra: Option<&RandomAccess>,
    no_random_access: Option<&str>,
) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let pos = |i: usize| ra.and_then(|r| r.positions.get(i)).and_then(|p| p.as_ref());
    let file = IndexFile {
        version: if ra.is_some() { 2 } else { 1 },
        no_random_access: no_random_access.map(str::to_string),
        gzip: ra.map(|r| GzipSection {
            layer: r.layer.to_string(),
            blob_size: r.blob_size,
            size: r.size,
            chunk: CHUNK,
            codec: r
                .points
                .first()
                .is_some_and(|p| p.zstd)
                .then(|| "zstd".into()),
            windows: r.windows.as_ref().map(|(d, n)| (d.to_string(), *n)),
            points: r
                .points
                .iter()
                .map(|p| PointJson {
                    out: p.out,
                    inp: p.inp,
                    bits: p.bits,
                    window: b64.encode(&p.window),
                    w: p.window_ref
                        .map(|r| (r.offset, r.len, hex::encode(r.sha256))),
                })
                .collect(),
        }),
        entries: entries
            .iter()
            .enumerate()
            .map(|(i, e)| IndexEntry {
                offset: pos(i).map(|p| p.offset),
                ends: pos(i).map(|p| p.ends.clone()).unwrap_or_default(),
                chunks: pos(i)
                    .map(|p| p.chunks.iter().map(|d| d.to_string()).collect())
                    .unwrap_or_default(),
                path: e.path.clone(),
                kind: e.kind.name().into(),
                size: e.size,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime.clone(),
                link: e.link.clone(),
                dev: (e.dev_major, e.dev_minor),
                xattrs: e
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k.clone(), b64.encode(v)))
                    .collect(),
                digest: e.digest.as_ref().map(|d| d.to_string()),
            })
            .collect(),
    };
    // Serialising plain owned data to a Vec cannot fail.
    serde_json::to_vec(&file).unwrap_or_default()
}

/// Parse and validate an index written by [`encode_index`].
pub fn decode_index(bytes: &[u8], limits: &Limits) -> Result<Vec<Entry>, UnpackError> {
    decode_index_with(bytes, limits).map(|(entries, _)| entries)
}

/// An index as [`decode_index_with`] gives it.
pub type DecodedIndex = (Vec<Entry>, Option<RandomAccess>);

/// Indexes decoded (default limits) and waiting for their layer's mount, by the digest of
/// their bytes (a few MB each for a layer of thousands of files).
static DECODED: super::Kept<Digest, DecodedIndex> = super::Kept::new(DECODED_KEPT);
/// Decoded indexes kept.
const DECODED_KEPT: usize = 2;

/// Keep index `d`, decoded by [`decode_index_with`] with the default [`Limits`], for the next
/// [`take_decoded`] of it: a shared index is decoded when a pull takes it and again when its
/// layer is mounted, right after, on a cold start's critical path (40–45 ms of the python
/// image's 6.8 MB index on a busy 2-core machine).
pub fn keep_decoded(d: Digest, decoded: DecodedIndex) {
    DECODED.keep(d, decoded);
}

/// Index `d` as [`keep_decoded`] kept it (taken: the next call decodes again), if it is kept.
pub fn take_decoded(d: &Digest) -> Option<DecodedIndex> {
    DECODED.take(d)
}

/// Parse and validate an index written by [`encode_index_with`]: the entries, and random
/// access into the gzip layer when the index has it. An index is untrusted (it may come from a
/// registry): checkpoints must be ordered and inside the layer, every position inside the
/// stream, piece digests as many as the pieces.
pub fn decode_index_with(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(Vec<Entry>, Option<RandomAccess>), UnpackError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let file: IndexFile =
        serde_json::from_slice(bytes).map_err(|e| UnpackError::Index(e.to_string()))?;
    if file.version != 1 && file.version != 2 {
        return Err(UnpackError::Index(format!("version {}", file.version)));
    }
    if file.entries.len() > limits.max_entries {
        return Err(UnpackError::Index("too many entries".into()));
    }
    let mut ra = match &file.gzip {
        None => None,
        Some(g) => {
            let bad = |r: String| UnpackError::Index(format!("gzip index: {r}"));
            if g.chunk != CHUNK {
                return Err(bad(format!("piece size {} (expected {CHUNK})", g.chunk)));
            }
            let zstd = match g.codec.as_deref() {
                None => false,
                Some("zstd") => true,
                Some(other) => return Err(bad(format!("codec {other:?}"))),
            };
            let windows = match &g.windows {
                None => None,
                Some((d, n)) => Some((
                    Digest::parse(d).map_err(|e| bad(format!("windows blob: {e}")))?,
                    *n,
                )),
            };
            let mut points = Vec::with_capacity(g.points.len().min(gzindex::MAX_POINTS));
            for p in &g.points {
                let window_ref = match &p.w {
                    None => None,
                    Some((offset, len, sha)) => {
                        let mut sha256 = [0u8; 32];
                        hex::decode_to_slice(sha, &mut sha256)
                            .map_err(|e| bad(format!("window digest: {e}")))?;
                        Some(gzindex::WindowRef {
                            offset: *offset,
                            len: *len,
                            sha256,
                        })
                    }
                };
                points.push(Point {
                    out: p.out,
                    inp: p.inp,
                    bits: p.bits,
                    window: b64.decode(&p.window).map_err(|e| bad(e.to_string()))?,
                    zstd,
                    window_ref,
                });
            }
            gzindex::validate(&points, g.blob_size, g.size, windows.as_ref().map(|w| w.1))
                .map_err(bad)?;
            if points.is_empty() {
                return Err(bad("no checkpoints".into()));
            }
            Some(RandomAccess {
                layer: Digest::parse(&g.layer).map_err(|e| bad(e.to_string()))?,
                blob_size: g.blob_size,
                size: g.size,
                points,
                positions: Vec::with_capacity(file.entries.len()),
                windows,
            })
        }
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(file.entries.len());
    for e in file.entries {
        let bad = |r: String| UnpackError::Index(format!("{:?}: {r}", e.path));
        let path = clean_path(&e.path).map_err(&bad)?;
        let kind = Kind::from_name(&e.kind).ok_or_else(|| bad(format!("kind {:?}", e.kind)))?;
        if kind == Kind::Hardlink && !seen.contains(&clean_path(&e.link).map_err(&bad)?) {
            return Err(bad("hardlink to a later entry".into()));
        }
        let digest = match (&e.digest, kind) {
            (Some(d), Kind::Reg) => Some(Digest::parse(d).map_err(|x| bad(x.to_string()))?),
            (None, Kind::Reg) => return Err(bad("regular file without a digest".into())),
            _ => None,
        };
        let mut xattrs = vec![];
        for (k, v) in &e.xattrs {
            xattrs.push((k.clone(), b64.decode(v).map_err(|x| bad(x.to_string()))?));
        }
        if let Some(ra) = ra.as_mut() {
            let position = match (e.offset, kind) {
                (Some(offset), Kind::Reg) => {
                    if offset.checked_add(e.size).is_none_or(|end| end > ra.size) {
                        return Err(bad("content past the end of the stream".into()));
                    }
                    let pieces = e.size.div_ceil(CHUNK);
                    if !e.chunks.is_empty() && e.chunks.len() as u64 != pieces {
                        return Err(bad(format!(
                            "{} piece digests for {pieces} pieces",
                            e.chunks.len()
                        )));
                    }
                    if e.chunks.is_empty() && pieces > 1 {
                        return Err(bad("no piece digests".into()));
                    }
                    let chunks = e
                        .chunks
                        .iter()
                        .map(|d| Digest::parse(d).map_err(|x| bad(x.to_string())))
                        .collect::<Result<Vec<_>, _>>()?;
                    if !e.ends.is_empty()
                        && (e.ends.len() as u64 != pieces.max(1)
                            || e.ends.iter().any(|&x| x > ra.blob_size)
                            || e.ends.windows(2).any(|w| w[0] > w[1]))
                    {
                        return Err(bad("piece ends out of place".into()));
                    }
                    Some(FilePos {
                        offset,
                        chunks,
                        ends: e.ends.clone(),
                    })
                }
                (None, Kind::Reg) => return Err(bad("regular file without a position".into())),
                _ => None,
            };
            ra.positions.push(position);
        }
        seen.insert(path.clone());
        out.push(Entry {
            path,
            kind,
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            link: e.link,
            dev_major: e.dev.0,
            dev_minor: e.dev.1,
            xattrs,
            digest,
            chunks: vec![],
        });
    }
    Ok((out, ra))
}

/// Test helpers other modules' tests share.
#[cfg(test)]
pub mod test_util {
    use std::io::Write as _;

    /// A tar of regular files (in this order; mode 0644, owned by root, mtime 1) and its
    /// gzip (fast level: deflate ends blocks often, so a gzip index gets checkpoints).
    pub fn files_tar_gz(files: &[(&str, &[u8])]) -> (Vec<u8>, Vec<u8>) {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1);
            h.set_cksum();
            b.append_data(&mut h, name, *body).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        (tar, e.finish().unwrap())
    }

    /// The gzip layer `gz` unpacked into `dir` while its index is recorded (a checkpoint every
    /// `span` bytes): its entries and random-access index, as its first node has them.
    pub fn index_of(
        gz: &[u8],
        span: u64,
        dir: &std::path::Path,
    ) -> (Vec<super::Entry>, super::RandomAccess) {
        let (reader, rec) = super::gzindex::IndexingReader::new(gz, span).unwrap();
        let u = super::unpack(reader, dir, &super::Limits::default()).unwrap();
        let rec = std::mem::take(&mut *rec.lock().unwrap());
        let ra = super::RandomAccess {
            layer: crate::oci::Digest::of(gz),
            blob_size: gz.len() as u64,
            size: rec.size,
            points: rec.points,
            positions: u.positions,
            windows: None,
        };
        (u.entries, ra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o640);
        h.set_uid(7);
        h.set_gid(8);
        h.set_mtime(1_704_067_200);
        h
    }

    #[test]
    fn a_decoded_index_is_taken_once_and_only_the_newest_are_kept() {
        // Digests no other test keeps (the cache is the process's).
        let d = |i: u8| Digest::of(&[b'k', b'e', b'p', b't', i]);
        let dir = tempfile::tempdir().unwrap();
        let (_, gz) = test_util::files_tar_gz(&[("f", b"x")]);
        let (one, _) = test_util::index_of(&gz, 1 << 20, dir.path());
        let decoded =
            |n: usize| -> DecodedIndex { (one.iter().cycle().take(n).cloned().collect(), None) };
        keep_decoded(d(1), decoded(1));
        assert_eq!(take_decoded(&d(1)).unwrap().0.len(), 1);
        assert!(take_decoded(&d(1)).is_none(), "taken once");
        for i in 2..=(2 + DECODED_KEPT as u8) {
            keep_decoded(d(i), decoded(i as usize));
        }
        assert!(take_decoded(&d(2)).is_none(), "the oldest is dropped");
        let newest = 2 + DECODED_KEPT as u8;
        assert_eq!(take_decoded(&d(newest)).unwrap().0.len(), newest as usize);
    }

    #[test]
    fn unpacks_files_once_and_round_trips_the_index() {
        let data = tar_of(|b| {
            b.append_data(&mut header(tar::EntryType::Directory, 0), "etc/", &[][..])
                .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 5),
                "etc/a",
                &b"hello"[..],
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 5),
                "./etc/b",
                &b"hello"[..],
            )
            .unwrap();
            let mut l = header(tar::EntryType::Link, 0);
            b.append_link(&mut l, "etc/c", "etc/a").unwrap();
            let mut s = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut s, "etc/s", "../x").unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        let u = unpack(&data[..], &files, &Limits::default()).unwrap();
        assert_eq!(u.files_written, 1, "identical contents stored once");
        let d = Digest::of(b"hello");
        assert_eq!(fs::read(files.join(d.hex())).unwrap(), b"hello");
        assert_eq!(u.entries[1].digest.as_ref(), Some(&d));
        assert_eq!(u.entries[2].path, "etc/b");
        assert_eq!(u.entries[3].kind, Kind::Hardlink);
        assert_eq!(u.entries[3].link, "etc/a");
        assert_eq!(
            u.entries[4].link, "../x",
            "symlink targets are kept verbatim"
        );
        assert_eq!(u.entries[1].mtime.as_deref(), Some("2024-01-01T00:00:00Z"));
        let back = decode_index(&encode_index(&u.entries), &Limits::default()).unwrap();
        assert_eq!(back, u.entries);
        // Again: nothing new is written.
        assert_eq!(
            unpack(&data[..], &files, &Limits::default())
                .unwrap()
                .files_written,
            0
        );
        assert_eq!(
            fs::read_dir(&files).unwrap().count(),
            1,
            "no temp files left"
        );
    }

    /// Text-like bytes that deflate well, with long-distance repeats.
    fn text(n: usize, seed: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let mut x = seed;
        while out.len() < n {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(format!("{} {}\n", x % 5000, x % 91).as_bytes());
        }
        out.truncate(n);
        out
    }

    #[test]
    fn a_gzip_index_reads_every_file_back_from_checkpoints_and_refuses_tampering() {
        let big = text(5 << 20, 7);
        let small = text(3000, 9);
        let data = tar_of(|b| {
            b.append_data(&mut header(tar::EntryType::Directory, 0), "d/", &[][..])
                .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 3000),
                "d/small",
                &small[..],
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, big.len() as u64),
                "d/big",
                &big[..],
            )
            .unwrap();
            b.append_data(&mut header(tar::EntryType::Regular, 5), "z", &b"last\n"[..])
                .unwrap();
        });
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let gz = e.finish().unwrap();
        let layer = Digest::of(&gz);
        let files = tempfile::tempdir().unwrap();
        let (reader, rec) = gzindex::IndexingReader::new(&gz[..], 256 << 10).unwrap();
        let consumed = reader.consumed();
        let u = unpack_tracked(
            reader,
            files.path(),
            &Limits::default(),
            &mut Nobody,
            Some(&consumed),
        )
        .unwrap();
        let rec = std::mem::take(&mut *rec.lock().unwrap());
        assert!(rec.complete && rec.unusable.is_none());
        // Piece ends: one per piece, in order, inside the blob.
        for p in u.positions.iter().flatten() {
            assert!(!p.ends.is_empty() && p.ends.windows(2).all(|w| w[0] <= w[1]));
            assert!(p.ends.iter().all(|&e| e <= gz.len() as u64));
        }
        let ra = RandomAccess {
            layer: layer.clone(),
            blob_size: gz.len() as u64,
            size: rec.size,
            points: rec.points,
            positions: u.positions.clone(),
            windows: None,
        };
        let json = encode_index_with(&u.entries, Some(&ra));
        let (entries, back) = decode_index_with(&json, &Limits::default()).unwrap();
        let back = back.expect("random access");
        assert_eq!(entries, u.entries);
        assert_eq!(
            (back.layer.clone(), back.positions.clone()),
            (layer, u.positions.clone())
        );
        // The old reader still reads the entries.
        assert_eq!(decode_index(&json, &Limits::default()).unwrap(), u.entries);
        let lazy = back.lazy_entries(&entries);
        let spans = crate::layer::index::Spans::default();
        let fetch =
            |s: u64, e: u64| -> Result<Vec<u8>, String> { Ok(gz[s as usize..e as usize].to_vec()) };
        let by = |p: &str| lazy.iter().find(|e| e.path == p).unwrap();
        assert_eq!(by("d/big").chunks.len(), 5);
        // A read of the small file stops where its content ended, before the next checkpoint.
        let c = &by("d/small").chunks[0];
        assert!(
            c.end().unwrap()
                < gzindex::end_after(&back.points, c.inner_offset + 3000, gz.len() as u64),
            "{c:?}"
        );
        for (path, want) in [
            ("d/small", &small[..]),
            ("d/big", &big[..]),
            ("z", &b"last\n"[..]),
        ] {
            let got = crate::layer::index::read_file(&spans, by(path), 0, u64::MAX, fetch).unwrap();
            assert_eq!(got, want, "{path}");
        }
        // A piece in the middle, across a chunk boundary.
        let got =
            crate::layer::index::read_file(&spans, by("d/big"), (1 << 20) - 10, 20, fetch).unwrap();
        assert_eq!(got, big[(1 << 20) - 10..(1 << 20) + 10]);
        // Wrong bytes from the registry are caught by the piece digests.
        let mut bad = gz.clone();
        let c = &by("d/big").chunks[2];
        bad[(c.offset + (c.end().unwrap() - c.offset) / 2) as usize] ^= 0x10;
        let r = crate::layer::index::read_file(&spans, by("d/big"), 2 << 20, 100, |s, e| {
            Ok(bad[s as usize..e as usize].to_vec())
        });
        assert!(r.is_err(), "{r:?}");
        // Hostile indexes are refused.
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["entries"][2]["offset"] = serde_json::json!(u64::MAX - 10);
        assert!(decode_index_with(&serde_json::to_vec(&v).unwrap(), &Limits::default()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["entries"][2]["chunks"] = serde_json::json!([]);
        assert!(decode_index_with(&serde_json::to_vec(&v).unwrap(), &Limits::default()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["gzip"]["points"][1]["in"] = serde_json::json!(gz.len() + 5);
        assert!(decode_index_with(&serde_json::to_vec(&v).unwrap(), &Limits::default()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["gzip"]["points"][2]["out"] = serde_json::json!(1);
        assert!(decode_index_with(&serde_json::to_vec(&v).unwrap(), &Limits::default()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["entries"][2]["ends"] = serde_json::json!([gz.len() + 1, 0, 0, 0, 0]);
        assert!(decode_index_with(&serde_json::to_vec(&v).unwrap(), &Limits::default()).is_err());
    }

    #[test]
    fn refuses_escapes_and_forward_hardlinks() {
        let dir = tempfile::tempdir().unwrap();
        // The tar crate refuses to write `..` paths: patch the name bytes by hand.
        let mut evil = tar_of(|b| {
            b.append_data(
                &mut header(tar::EntryType::Regular, 1),
                "xx/evil",
                &b"x"[..],
            )
            .unwrap();
        });
        evil[..7].copy_from_slice(b"../evil");
        let mut h = tar::Header::from_byte_slice(&evil[..512]).clone();
        h.set_cksum();
        evil[..512].copy_from_slice(h.as_bytes());
        assert!(matches!(
            unpack(&evil[..], dir.path(), &Limits::default()),
            Err(UnpackError::Entry { .. })
        ));
        let fwd = tar_of(|b| {
            let mut l = header(tar::EntryType::Link, 0);
            b.append_link(&mut l, "a", "b").unwrap();
        });
        assert!(unpack(&fwd[..], dir.path(), &Limits::default()).is_err());
        assert!(
            fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp")),
            "failed unpacks leave no temp files"
        );
    }
}
