//! eStargz: a gzip layer that is also a valid tar.gz, with each file's payload in its own gzip
//! member(s) and a table of contents (`stargz.index.json`, in a tar, in a gzip member) near the
//! end, located by a 51-byte footer. The layer annotation
//! `containerd.io/snapshot/stargz/toc.digest` is the sha256 of the TOC JSON.
//!
//! Everything here is pure: parse the footer, decode and verify the TOC, validate every entry
//! (paths, links, chunk ranges) against the blob it describes. Untrusted input throughout.

use super::index::{Chunk, Codec, Entry, Kind, LayerIndex};
use crate::oci::Digest;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::io::Read;

/// Layer annotation carrying the digest of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation carrying the uncompressed size.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// The eStargz footer: an empty gzip member whose extra field holds the TOC offset.
pub const FOOTER_SIZE: u64 = 51;
/// The footer of the older stargz format (no `SG` subfield header).
pub const LEGACY_FOOTER_SIZE: u64 = 47;
pub const TOC_NAME: &str = "stargz.index.json";
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// Bounds on what a TOC may make us hold in memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_toc_compressed: u64,
    pub max_toc_json: u64,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_toc_compressed: 64 << 20,
            max_toc_json: 256 << 20,
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TocError {
    #[error("footer: {0}")]
    Footer(String),
    #[error("TOC is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("TOC has {count} entries, over the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("TOC member: {0}")]
    Member(String),
    #[error("TOC JSON: {0}")]
    Json(String),
    #[error("TOC digest mismatch: annotation says {expected}, TOC is {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("TOC entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    /// A zstd:chunked layer's TOC annotations (checksum and `offset:length:uncompressed:type`).
    #[error("manifest position {0}")]
    Position(String),
}

fn footer_err(m: impl Into<String>) -> TocError {
    TocError::Footer(m.into())
}

/// Parse the footer from the last bytes of a blob (`tail` holds at least the last 51 bytes, or
/// the whole blob when smaller). Returns the TOC offset.
pub fn parse_footer(tail: &[u8]) -> Result<u64, TocError> {
    let parse_hex = |b: &[u8]| -> Result<u64, TocError> {
        let s = std::str::from_utf8(b).map_err(|_| footer_err("offset is not ASCII"))?;
        u64::from_str_radix(s, 16).map_err(|_| footer_err(format!("offset {s:?} is not hex")))
    };
    if tail.len() >= FOOTER_SIZE as usize {
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        // gzip magic, deflate, FEXTRA, XLEN = 26, subfield 'S''G' of length 22.
        if f[..4] == [0x1f, 0x8b, 0x08, 0x04]
            && f[10..12] == [26, 0]
            && &f[12..14] == b"SG"
            && f[14..16] == [22, 0]
        {
            if &f[32..38] != b"STARGZ" {
                return Err(footer_err("missing STARGZ magic"));
            }
            return parse_hex(&f[16..32]);
        }
    }
    if tail.len() >= LEGACY_FOOTER_SIZE as usize {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if f[..4] == [0x1f, 0x8b, 0x08, 0x04] && f[10..12] == [22, 0] && &f[28..34] == b"STARGZ" {
            return parse_hex(&f[12..28]);
        }
    }
    Err(footer_err("not an eStargz footer"))
}

/// The size of the footer that ends `tail` (51, or 47 for legacy stargz).
pub fn footer_size(tail: &[u8]) -> u64 {
    if tail.len() >= FOOTER_SIZE as usize {
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        if &f[12..14] == b"SG" {
            return FOOTER_SIZE;
        }
    }
    LEGACY_FOOTER_SIZE
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RawEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub modtime: Option<String>,
    #[serde(default)]
    pub link_name: String,
    #[serde(default)]
    pub mode: i64,
    #[serde(default)]
    pub uid: i64,
    #[serde(default)]
    pub gid: i64,
    #[serde(default)]
    pub user_name: String,
    #[serde(default)]
    pub group_name: String,
    #[serde(default)]
    pub dev_major: i64,
    #[serde(default)]
    pub dev_minor: i64,
    #[serde(default)]
    pub xattrs: HashMap<String, String>,
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub offset: i64,
    #[serde(default)]
    pub chunk_offset: i64,
    #[serde(default)]
    pub chunk_size: i64,
    #[serde(default)]
    pub chunk_digest: String,
    #[serde(default)]
    pub inner_offset: i64,
    /// zstd:chunked: end of the file's last payload frame.
    #[serde(default)]
    pub end_offset: i64,
}

#[derive(Deserialize)]
struct RawToc {
    version: i64,
    entries: Vec<RawEntry>,
}

/// Clean an entry name: strip `./` and `/`, refuse `..`, empty components are dropped.
pub fn clean_path(name: &str) -> Result<String, String> {
    let mut parts = vec![];
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => return Err("path escapes the layer root (..)".into()),
            p if p.contains('\0') => return Err("NUL in path".into()),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Decompress the TOC member (`member` = bytes from the TOC offset up to the footer) and return
/// the JSON bytes of `stargz.index.json`, bounded by `limits`.
pub fn toc_json_from_member(member: &[u8], limits: &Limits) -> Result<Vec<u8>, TocError> {
    if member.len() as u64 > limits.max_toc_compressed {
        return Err(TocError::TooLarge {
            size: member.len() as u64,
            limit: limits.max_toc_compressed,
        });
    }
    let gz = flate2::read::GzDecoder::new(member);
    // Bound what the decoder may produce: the tar holds the JSON plus headers and padding.
    let bounded = gz.take(limits.max_toc_json + 4096);
    let mut archive = tar::Archive::new(bounded);
    let mut entries = archive
        .entries()
        .map_err(|e| TocError::Member(e.to_string()))?;
    let entry = entries
        .next()
        .ok_or_else(|| TocError::Member("empty TOC tar".into()))?;
    let mut entry = entry.map_err(|e| TocError::Member(e.to_string()))?;
    let path = entry
        .path()
        .map_err(|e| TocError::Member(e.to_string()))?
        .to_string_lossy()
        .to_string();
    if path != TOC_NAME {
        return Err(TocError::Member(format!(
            "first entry is {path:?}, expected {TOC_NAME}"
        )));
    }
    let size = entry
        .header()
        .size()
        .map_err(|e| TocError::Member(e.to_string()))?;
    if size > limits.max_toc_json {
        return Err(TocError::TooLarge {
            size,
            limit: limits.max_toc_json,
        });
    }
    let mut json = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| TocError::Member(e.to_string()))?;
    if json.len() as u64 != size {
        return Err(TocError::Member(format!(
            "TOC JSON truncated: {} of {size} bytes",
            json.len()
        )));
    }
    Ok(json)
}

fn entry_err(name: &str, reason: impl Into<String>) -> TocError {
    TocError::Entry {
        name: name.to_string(),
        reason: reason.into(),
    }
}

fn to_u32(name: &str, what: &str, v: i64) -> Result<u32, TocError> {
    u32::try_from(v).map_err(|_| entry_err(name, format!("{what} {v} out of range")))
}

fn opt_digest(name: &str, s: &str) -> Result<Option<Digest>, TocError> {
    if s.is_empty() {
        return Ok(None);
    }
    Digest::parse(s)
        .map(Some)
        .map_err(|e| entry_err(name, e.to_string()))
}

/// Verify the TOC JSON against the annotation digest, then parse and validate it against the
/// blob it describes (`blob_size`, `toc_offset`).
pub fn parse_toc(
    json: &[u8],
    expected: &Digest,
    blob_size: u64,
    toc_offset: u64,
    limits: &Limits,
) -> Result<LayerIndex, TocError> {
    let actual = Digest::of(json);
    if &actual != expected {
        return Err(TocError::DigestMismatch {
            expected: expected.clone(),
            actual,
        });
    }
    parse_entries(json, actual, blob_size, toc_offset, limits, false)
}

/// While a zstd:chunked TOC is parsed: a chunk whose frames' end is not known yet (no
/// `endOffset`: found from the next chunk's start once all are read). Never left in a parsed
/// index (an end is always after its chunk's offset, so never 0).
const END_UNKNOWN: u64 = 0;

/// Parse and validate TOC JSON whose authenticity the caller checked (`digest` names it).
/// `zstd`: the zstd:chunked dialect (explicit `endOffset`, chunks decoded with zstd).
pub(crate) fn parse_entries(
    json: &[u8],
    actual: Digest,
    blob_size: u64,
    toc_offset: u64,
    limits: &Limits,
    zstd: bool,
) -> Result<LayerIndex, TocError> {
    if toc_offset >= blob_size {
        return Err(footer_err(format!(
            "TOC offset {toc_offset} beyond the blob ({blob_size} bytes)"
        )));
    }
    let raw: RawToc = serde_json::from_slice(json).map_err(|e| TocError::Json(e.to_string()))?;
    if raw.version != 1 {
        return Err(TocError::Json(format!(
            "unsupported TOC version {}",
            raw.version
        )));
    }
    if raw.entries.len() > limits.max_entries {
        return Err(TocError::TooManyEntries {
            count: raw.entries.len(),
            limit: limits.max_entries,
        });
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(raw.entries.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut prefetch_landmark = None;
    for r in raw.entries {
        let name = &r.name;
        let offset = u64::try_from(r.offset).map_err(|_| entry_err(name, "negative offset"))?;
        let chunk_offset =
            u64::try_from(r.chunk_offset).map_err(|_| entry_err(name, "negative chunkOffset"))?;
        let chunk_size =
            u64::try_from(r.chunk_size).map_err(|_| entry_err(name, "negative chunkSize"))?;
        let inner_offset =
            u64::try_from(r.inner_offset).map_err(|_| entry_err(name, "negative innerOffset"))?;
        if r.kind == "chunk" {
            // A continuation of the previous regular file.
            let prev = entries
                .last_mut()
                .filter(|e| e.kind == Kind::Reg)
                .ok_or_else(|| entry_err(name, "chunk without a preceding file"))?;
            let expected_start = prev
                .chunks
                .last()
                .map(|c| c.file_offset + c.size)
                .unwrap_or(0);
            if chunk_offset != expected_start {
                return Err(entry_err(
                    name,
                    format!("chunk at {chunk_offset}, expected {expected_start} (overlap or gap)"),
                ));
            }
            let size = if chunk_size == 0 {
                prev.size.saturating_sub(chunk_offset)
            } else {
                chunk_size
            };
            if chunk_offset + size > prev.size {
                return Err(entry_err(name, "chunk extends past the end of the file"));
            }
            if offset >= toc_offset || offset < prev.chunks.last().map(|c| c.offset).unwrap_or(0) {
                return Err(entry_err(
                    name,
                    format!("chunk offset {offset} out of order or beyond the TOC"),
                ));
            }
            // zstd:chunked: the previous chunk ends where this one starts; this one ends where
            // the file's payload ends (until a further chunk follows).
            let mut codec = if zstd {
                Codec::ZstdFrames { end: END_UNKNOWN }
            } else {
                Codec::GzipMember
            };
            if let Some(last) = prev.chunks.last_mut()
                && let Codec::ZstdFrames { end: file_end } = &mut last.codec
                && *file_end != END_UNKNOWN
            {
                if offset <= last.offset || offset >= *file_end {
                    return Err(entry_err(
                        name,
                        format!("chunk frame at {offset} outside the file's payload"),
                    ));
                }
                codec = Codec::ZstdFrames { end: *file_end };
                *file_end = offset;
            }
            prev.chunks.push(Chunk {
                offset,
                inner_offset,
                file_offset: chunk_offset,
                size,
                digest: opt_digest(name, &r.chunk_digest)?,
                codec,
            });
            continue;
        }
        let path = clean_path(name).map_err(|e| entry_err(name, e))?;
        let kind = Kind::from_name(&r.kind)
            .ok_or_else(|| entry_err(name, format!("unknown type {:?}", r.kind)))?;
        let size = u64::try_from(r.size).map_err(|_| entry_err(name, "negative size"))?;
        let mut link = String::new();
        match kind {
            Kind::Symlink => {
                if r.link_name.is_empty() {
                    return Err(entry_err(name, "symlink without a target"));
                }
                link = r.link_name.clone();
            }
            Kind::Hardlink => {
                let target = clean_path(&r.link_name)
                    .map_err(|e| entry_err(name, format!("hardlink target: {e}")))?;
                match index.get(&target).map(|&i| entries[i].kind) {
                    Some(Kind::Dir) => return Err(entry_err(name, "hardlink to a directory")),
                    Some(_) => link = target,
                    None => {
                        return Err(entry_err(
                            name,
                            format!("hardlink to {target:?}, not an earlier entry"),
                        ));
                    }
                }
            }
            _ => {}
        }
        let mut chunks = vec![];
        if kind == Kind::Reg && size > 0 {
            if offset >= toc_offset {
                return Err(entry_err(
                    name,
                    format!(
                        "payload offset {offset} outside the layer's data (TOC at {toc_offset})"
                    ),
                ));
            }
            if chunk_offset != 0 {
                return Err(entry_err(name, "first chunk does not start at 0"));
            }
            let first = if chunk_size == 0 { size } else { chunk_size };
            if first > size {
                return Err(entry_err(name, "chunk larger than the file"));
            }
            let codec = if zstd && r.end_offset != 0 {
                let end = u64::try_from(r.end_offset)
                    .map_err(|_| entry_err(name, "negative endOffset"))?;
                if end <= offset || end > toc_offset {
                    return Err(entry_err(
                        name,
                        format!(
                            "payload {offset}..{end} outside the layer's data (TOC at {toc_offset})"
                        ),
                    ));
                }
                Codec::ZstdFrames { end }
            } else if zstd {
                Codec::ZstdFrames { end: END_UNKNOWN }
            } else {
                Codec::GzipMember
            };
            chunks.push(Chunk {
                offset,
                inner_offset,
                file_offset: 0,
                size: first,
                digest: opt_digest(name, &r.chunk_digest)?,
                codec,
            });
        }
        let mut xattrs = Vec::with_capacity(r.xattrs.len());
        for (k, v) in &r.xattrs {
            use base64::Engine as _;
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| entry_err(name, format!("xattr {k}: not base64")))?;
            xattrs.push((k.clone(), value));
        }
        xattrs.sort();
        if path == PREFETCH_LANDMARK {
            prefetch_landmark = Some(entries.len());
        }
        // A later entry for the same path replaces the earlier one (tar semantics).
        index.insert(path.clone(), entries.len());
        entries.push(Entry {
            path,
            kind,
            size,
            mode: to_u32(name, "mode", r.mode)?,
            uid: to_u32(name, "uid", r.uid)?,
            gid: to_u32(name, "gid", r.gid)?,
            mtime: r.modtime,
            link,
            dev_major: to_u32(name, "devMajor", r.dev_major)?,
            dev_minor: to_u32(name, "devMinor", r.dev_minor)?,
            xattrs,
            digest: opt_digest(name, &r.digest)?,
            chunks,
        });
    }
    // zstd:chunked as stargz-snapshotter writes it has no `endOffset`: a chunk's frames end
    // where the next chunk's start (or the TOC). Decoding stops after the chunk's bytes, so any
    // tar header frames in between cost a few bytes of transfer, nothing else.
    if zstd {
        let mut starts: Vec<u64> = entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| c.offset))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        for c in entries.iter_mut().flat_map(|e| e.chunks.iter_mut()) {
            let offset = c.offset;
            if let Codec::ZstdFrames { end } = &mut c.codec
                && *end == END_UNKNOWN
            {
                let i = starts.partition_point(|&s| s <= offset);
                *end = starts.get(i).copied().unwrap_or(toc_offset);
            }
        }
    }
    // A file in one chunk: its digest is the chunk's (zstd:chunked writes no chunkDigest then).
    for e in &mut entries {
        if e.chunks.len() == 1 && e.chunks[0].digest.is_none() && e.chunks[0].size == e.size {
            e.chunks[0].digest = e.digest.clone();
        }
    }
    // Every regular file's chunks must cover it exactly.
    let mut seen_members = HashSet::new();
    for e in &entries {
        if e.kind == Kind::Reg && e.size > 0 {
            let covered = e.chunks.last().map(|c| c.file_offset + c.size).unwrap_or(0);
            if covered != e.size {
                return Err(entry_err(
                    &e.path,
                    format!("chunks cover {covered} of {} bytes", e.size),
                ));
            }
            seen_members.extend(e.chunks.iter().map(|c| c.offset));
        }
    }
    Ok(LayerIndex {
        digest: actual,
        toc_offset,
        entries,
        prefetch_landmark,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layer::index::{ChunkError, Spans, read_file};
    use std::io::Write;

    /// A minimal eStargz writer for tests: one gzip member per file, then the TOC member and
    /// the footer. `files`: (name, content). Returns (blob, toc digest).
    pub fn build(
        files: &[(&str, &[u8])],
        tamper: impl Fn(&mut serde_json::Value),
    ) -> (Vec<u8>, Digest) {
        let gz = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let mut blob = vec![];
        let mut entries = vec![];
        for (name, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            let mut t = tar::Builder::new(Vec::new());
            t.append_data(&mut h, name, *content).unwrap();
            let tar_bytes = t.into_inner().unwrap();
            // The header in one member, the payload (with its padding) in the next.
            blob.extend(gz(&tar_bytes[..512]));
            let offset = blob.len();
            blob.extend(gz(&tar_bytes[512..tar_bytes.len() - 1024]));
            entries.push(serde_json::json!({
                "name": name, "type": "reg", "size": content.len(), "mode": 420, "offset": offset,
                "digest": Digest::of(content).to_string(), "chunkDigest": Digest::of(content).to_string(),
            }));
        }
        let mut toc = serde_json::json!({"version": 1, "entries": entries});
        tamper(&mut toc);
        let json = serde_json::to_vec(&toc).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_cksum();
        let mut t = tar::Builder::new(Vec::new());
        t.append_data(&mut h, TOC_NAME, &json[..]).unwrap();
        let toc_offset = blob.len();
        blob.extend(gz(&t.into_inner().unwrap()));
        let mut footer = vec![
            0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        footer.extend(format!("{toc_offset:016x}STARGZ").as_bytes());
        footer.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(footer.len(), 51);
        blob.extend(footer);
        (blob, Digest::of(&json))
    }

    pub(crate) fn read(blob: &[u8], d: &Digest) -> Result<LayerIndex, TocError> {
        let off = parse_footer(blob)?;
        let end = blob.len() - footer_size(blob) as usize;
        let json = toc_json_from_member(&blob[off as usize..end], &Limits::default())?;
        parse_toc(&json, d, blob.len() as u64, off, &Limits::default())
    }

    #[test]
    fn reads_a_built_layer() {
        let (blob, d) = build(
            &[
                ("a/b.txt", b"hello"),
                ("./c", b"world!"),
                (".prefetch.landmark", b"\x0f"),
            ],
            |_| {},
        );
        let toc = read(&blob, &d).unwrap();
        assert_eq!(toc.entries.len(), 3);
        assert_eq!(toc.entries[0].path, "a/b.txt");
        assert_eq!(toc.entries[1].path, "c");
        assert_eq!(toc.entries[1].chunks[0].size, 6);
        assert_eq!(toc.prefetch_landmark, Some(2));
        assert_eq!(toc.regular_bytes(), 12);
        // The payload member at the chunk offset decompresses to a tar with the file's bytes.
        let off = toc.entries[1].chunks[0].offset as usize;
        let mut out = vec![];
        flate2::read::GzDecoder::new(&blob[off..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(&out[..6], b"world!");
    }

    #[test]
    fn refuses_bad_tocs() {
        let files: &[(&str, &[u8])] = &[("f", b"data")];
        let (blob, d) = build(files, |_| {});
        let wrong = Digest::of(b"other");
        assert!(matches!(
            read(&blob, &wrong),
            Err(TocError::DigestMismatch { .. })
        ));
        type Tamper = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Tamper)> = vec![
            (
                "..",
                Box::new(|t| t["entries"][0]["name"] = "../../etc/passwd".into()),
            ),
            (
                "outside",
                Box::new(|t| t["entries"][0]["offset"] = 1_000_000.into()),
            ),
            (
                "chunk larger",
                Box::new(|t| t["entries"][0]["chunkSize"] = 99.into()),
            ),
            (
                "hardlink",
                Box::new(|t| {
                    t["entries"].as_array_mut().unwrap().push(
                        serde_json::json!({"name": "h", "type": "hardlink", "linkName": "../x"}),
                    )
                }),
            ),
            (
                "dangling hardlink",
                Box::new(|t| {
                    t["entries"].as_array_mut().unwrap().push(
                        serde_json::json!({"name": "h", "type": "hardlink", "linkName": "nope"}),
                    )
                }),
            ),
            (
                "type",
                Box::new(|t| t["entries"][0]["type"] = "socket".into()),
            ),
            (
                "negative",
                Box::new(|t| t["entries"][0]["size"] = (-1).into()),
            ),
            ("version", Box::new(|t| t["version"] = 2.into())),
            (
                "gap",
                Box::new(|t| {
                    t["entries"].as_array_mut().unwrap().push(serde_json::json!({"name": "f", "type": "chunk", "offset": 1, "chunkOffset": 7}))
                }),
            ),
        ];
        for (what, f) in cases {
            let (blob, d) = build(files, f);
            assert!(read(&blob, &d).is_err(), "{what} accepted");
        }
        // Not a footer at all.
        assert!(parse_footer(b"definitely not an estargz footer, just some bytes here").is_err());
        assert!(parse_footer(&blob[..10]).is_err());
        // Oversized TOC member.
        let small = Limits {
            max_toc_compressed: 10,
            ..Limits::default()
        };
        let off = parse_footer(&blob).unwrap() as usize;
        assert!(matches!(
            toc_json_from_member(&blob[off..blob.len() - 51], &small),
            Err(TocError::TooLarge { .. })
        ));
        let _ = d;
    }

    #[test]
    fn reads_file_ranges_fetching_only_needed_chunks() {
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let (blob, d) = build(&[("small", b"tiny"), ("big", &big)], |_| {});
        let toc = read(&blob, &d).unwrap();
        let spans = Spans::new(&toc);
        let big_e = toc.entries.iter().find(|e| e.path == "big").unwrap();
        let mut fetched = vec![];
        let got = read_file(&spans, big_e, 100, 50, |s, e| {
            fetched.push((s, e));
            Ok(blob[s as usize..e as usize].to_vec())
        })
        .unwrap();
        assert_eq!(got, &big[100..150]);
        assert_eq!(fetched.len(), 1, "one member fetched");
        let (s, e) = fetched[0];
        assert!(
            e - s < blob.len() as u64 / 2,
            "only the file's member, not the layer"
        );
        // Past the end: clamped.
        let got = read_file(&spans, big_e, 4990, 100, |s, e| {
            Ok(blob[s as usize..e as usize].to_vec())
        })
        .unwrap();
        assert_eq!(got, &big[4990..]);
        // A corrupted member is refused (decode or digest error), never returned.
        let err = read_file(&spans, big_e, 0, 10, |s, e| {
            let mut v = blob[s as usize..e as usize].to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x55;
            Ok(v)
        });
        assert!(err.is_err());
        // A chunk digest that does not match is refused.
        let mut bad = big_e.clone();
        bad.chunks[0].digest = Some(Digest::of(b"nope"));
        assert!(matches!(
            read_file(&spans, &bad, 0, 10, |s, e| Ok(
                blob[s as usize..e as usize].to_vec()
            )),
            Err(ChunkError::Digest { .. })
        ));
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path("./a//b/").unwrap(), "a/b");
        assert_eq!(clean_path("/").unwrap(), "");
        assert!(clean_path("a/../../b").is_err());
    }
}

#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic the footer or member decoders.
        #[test]
        fn footer_and_member_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_footer(&bytes);
            let _ = footer_size(&bytes);
            let _ = toc_json_from_member(&bytes, &Limits::default());
        }

        /// Any mutation of a valid layer is either read consistently or refused: no panic, and
        /// every accepted chunk lies inside the data before the TOC.
        #[test]
        fn mutated_layers_are_refused_or_consistent(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let files: &[(&str, &[u8])] = &[("a/b", b"hello world"), ("c", b"x")];
            let (mut blob, d) = tests::build(files, |_| {});
            for (pos, val) in flips {
                let i = pos % blob.len();
                blob[i] ^= val | 1;
            }
            let Ok(off) = parse_footer(&blob) else { return Ok(()) };
            let end = blob.len() as u64 - footer_size(&blob);
            if off >= end {
                return Ok(());
            }
            let Ok(json) = toc_json_from_member(&blob[off as usize..end as usize], &Limits::default()) else { return Ok(()) };
            // Also try the JSON against its own digest, to exercise validation.
            for digest in [d.clone(), Digest::of(&json)] {
                if let Ok(toc) = parse_toc(&json, &digest, blob.len() as u64, off, &Limits::default()) {
                    for e in &toc.entries {
                        for c in &e.chunks {
                            prop_assert!(c.offset < off);
                            prop_assert!(c.file_offset + c.size <= e.size);
                        }
                    }
                }
            }
        }

        /// Random TOC entries: whatever is accepted has clean paths, in-range chunks that cover
        /// each file exactly, and hardlinks to earlier non-directory entries.
        #[test]
        fn random_tocs_uphold_invariants(entries in proptest::collection::vec(
            (
                prop_oneof![Just("a"), Just("a/b"), Just("./c/"), Just("../x"), Just("/abs"), Just("d/../../e"), Just("")],
                prop_oneof![Just("reg"), Just("dir"), Just("chunk"), Just("hardlink"), Just("symlink"), Just("bogus")],
                -2i64..40, 0i64..120, -1i64..30, 0i64..30,
                prop_oneof![Just(""), Just("a"), Just("../a"), Just("a/b")],
            ),
            0..12,
        )) {
            let toc_offset = 100u64;
            let json = serde_json::json!({"version": 1, "entries": entries.iter().map(|(n, k, size, off, coff, csize, link)| serde_json::json!({
                "name": n, "type": k, "size": size, "offset": off, "chunkOffset": coff, "chunkSize": csize, "linkName": link,
            })).collect::<Vec<_>>()});
            let bytes = serde_json::to_vec(&json).unwrap();
            if let Ok(toc) = parse_toc(&bytes, &Digest::of(&bytes), 200, toc_offset, &Limits::default()) {
                let mut seen = std::collections::HashMap::new();
                for e in &toc.entries {
                    prop_assert!(!e.path.split('/').any(|c| c == ".." || c == "."), "{}", e.path);
                    prop_assert!(!e.path.starts_with('/'));
                    if e.kind == Kind::Reg && e.size > 0 {
                        let mut at = 0;
                        for c in &e.chunks {
                            prop_assert_eq!(c.file_offset, at);
                            prop_assert!(c.offset < toc_offset);
                            at += c.size;
                        }
                        prop_assert_eq!(at, e.size);
                    }
                    if e.kind == Kind::Hardlink {
                        prop_assert!(seen.get(&e.link).is_some_and(|k| *k != Kind::Dir), "{:?}", e);
                    }
                    seen.insert(e.path.clone(), e.kind);
                }
            }
        }
    }
}
