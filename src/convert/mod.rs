//! Layer conversion for `lazypull convert`: rewrite a layer tar as eStargz or zstd:chunked.
//!
//! Both formats are the same tar stream, compressed so that every regular file's payload (and
//! every `chunk_size` piece of a large one) starts a new gzip member or zstd frame, plus a table
//! of contents that says where each file and chunk is and what its digests are:
//!
//! - eStargz: the TOC (`stargz.index.json`) is a tar entry in its own gzip member after the
//!   files, found through a 51-byte footer; the layer annotation
//!   `containerd.io/snapshot/stargz/toc.digest` is the sha256 of the TOC JSON.
//! - zstd:chunked: the tar ends as usual; the zstd-compressed TOC follows in a skippable frame
//!   (ordinary decoders skip it), then the 48-byte footer frame; the annotations
//!   `*.zstd-chunked.manifest-checksum`/`-position` give the digest and place of the
//!   compressed TOC.
//!
//! Files to prefetch are moved to the front of the tar (with their parent directories and
//! hardlink targets, so the tar still extracts correctly), followed by `.prefetch.landmark`;
//! readers fetch everything before the landmark first. eStargz layers without such files start
//! with `.no.prefetch.landmark`, as ctr-remote writes them.
//!
//! The work is blocking: the layer is compressed in `jobs` contiguous parts in parallel (gzip
//! members and zstd frames concatenate), while another thread hashes the uncompressed stream
//! for the diff ID.

use crate::layer::estargz::{self};
use crate::layer::index::{Entry, Kind};
use crate::layer::tar::{Limits as TarLimits, UnpackError, entry_meta};
use crate::layer::zstd_chunked;
use crate::oci::Digest;
use base64::Engine;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// ctr-remote's default chunk size.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// The content of a landmark file (as the eStargz reference writer makes it).
const LANDMARK_CONTENT: u8 = 0x0f;
const BLOCK: u64 = 512;
/// zstd skippable frame magic, as c/storage writes it.
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// Magic of the zstd:chunked footer (the flavour Debian's skopeo and ctr-remote read).
const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";

pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// gzip, readable by any runtime; lazily by lazypull and stargz-snapshotter.
    Estargz,
    /// zstd, readable by runtimes with zstd support; lazily by lazypull.
    ZstdChunked,
}

impl Format {
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Estargz => MT_LAYER_GZIP,
            Format::ZstdChunked => MT_LAYER_ZSTD,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerOptions {
    pub format: Format,
    pub chunk_size: u64,
    /// gzip 0..=9 or zstd 1..=22.
    pub level: u32,
    /// Paths (clean, relative) to put first, in this order.
    pub prefetch: Vec<String>,
    /// Parts compressed in parallel.
    pub jobs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Tar(#[from] UnpackError),
    #[error("layer tar: {0}")]
    Malformed(String),
    #[error("i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the converted layer does not read back: {0}")]
    SelfCheck(String),
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct ConvertedLayer {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub media_type: &'static str,
    pub annotations: BTreeMap<String, String>,
    /// Tar entries written (landmark included).
    pub entries: usize,
    /// Entries moved before the landmark.
    pub prefetched: usize,
}

/// Where one tar entry's bytes are: `[start, data)` header record(s), `[data, data+size)`
/// the payload (regular files only), `[data+size, end)` padding.
#[derive(Clone, Debug)]
struct Segment {
    src: Src,
    start: u64,
    data: u64,
    size: u64,
    end: u64,
    entry: Entry,
    /// The name as the tar writes it (TOC `name`).
    name: String,
    uname: String,
    gname: String,
}

#[derive(Clone, Debug)]
enum Src {
    /// Bytes of the input tar.
    Tar,
    /// Bytes made here (landmarks).
    Made(std::sync::Arc<Vec<u8>>),
}

impl Segment {
    fn read(&self, tar: &File, off: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.src {
            Src::Tar => tar.read_exact_at(buf, off),
            Src::Made(bytes) => {
                let s = off as usize;
                buf.copy_from_slice(&bytes[s..s + buf.len()]);
                Ok(())
            }
        }
    }
}

/// Walk the input tar and note where every entry's header, payload and padding are.
fn scan(tar_path: &Path, tar: &File, limits: &TarLimits) -> Result<Vec<Segment>, ConvertError> {
    let len = tar.metadata().map_err(io_at(tar_path))?.len();
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, tar));
    let mut segs = vec![];
    let mut seen = HashSet::new();
    let mut start = 0u64;
    // Payloads are skipped by seeking: the scan reads headers only.
    let entries = archive
        .entries_with_seek()
        .map_err(|e| ConvertError::Malformed(e.to_string()))?;
    for item in entries {
        let mut e = item.map_err(|e| ConvertError::Malformed(e.to_string()))?;
        if segs.len() >= limits.max_entries {
            return Err(ConvertError::Malformed(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        if e.header().entry_type() == tar::EntryType::GNUSparse {
            return Err(ConvertError::Malformed(format!(
                "{}: GNU sparse files are not supported",
                String::from_utf8_lossy(&e.path_bytes())
            )));
        }
        let data = e.raw_file_position();
        let size = e.size();
        let end = data
            .checked_add(size.div_ceil(BLOCK) * BLOCK)
            .filter(|&end| end <= len && data >= start)
            .ok_or_else(|| ConvertError::Malformed("entry beyond the end of the tar".into()))?;
        let name = String::from_utf8(e.path_bytes().into_owned()).map_err(|b| {
            ConvertError::Malformed(format!(
                "{:?}: a name that is not UTF-8 cannot go in a TOC",
                String::from_utf8_lossy(b.as_bytes())
            ))
        })?;
        let (uname, gname) = (
            String::from_utf8_lossy(e.header().username_bytes().unwrap_or_default()).into_owned(),
            String::from_utf8_lossy(e.header().groupname_bytes().unwrap_or_default()).into_owned(),
        );
        if matches!(
            estargz::clean_path(&name).as_deref(),
            Ok(estargz::TOC_NAME | estargz::PREFETCH_LANDMARK | estargz::NO_PREFETCH_LANDMARK)
        ) {
            // The input is eStargz already: its TOC and landmark are made anew.
            start = end;
            continue;
        }
        let Some(mut entry) = entry_meta(&mut e, &seen, limits)? else {
            // A PAX global header: its bytes travel with the next entry's header.
            continue;
        };
        let reg = entry.kind == Kind::Reg;
        entry.size = if reg { size } else { 0 };
        seen.insert(entry.path.clone());
        segs.push(Segment {
            src: Src::Tar,
            start,
            // Anything a non-regular entry carries stays with its header.
            data: if reg { data } else { end },
            size: if reg { size } else { 0 },
            end,
            entry,
            name,
            uname,
            gname,
        });
        start = end;
    }
    Ok(segs)
}

/// A regular file made here (a landmark), as a segment.
fn made_file(name: &str, content: &[u8]) -> Segment {
    let mut h = tar::Header::new_ustar();
    // A short ASCII name always fits a ustar header.
    let _ = h.set_path(name);
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(content);
    let padded = (bytes.len() as u64).div_ceil(BLOCK) * BLOCK;
    bytes.resize(padded as usize, 0);
    Segment {
        src: Src::Made(std::sync::Arc::new(bytes)),
        start: 0,
        data: BLOCK,
        size: content.len() as u64,
        end: padded,
        entry: Entry {
            path: name.to_string(),
            kind: Kind::Reg,
            size: content.len() as u64,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: None,
            link: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: vec![],
            digest: None,
            chunks: vec![],
        },
        name: name.to_string(),
        uname: String::new(),
        gname: String::new(),
    }
}

/// The new entry order: the prefetch files first (each after its parent directories and, for
/// a hardlink, its target; every entry of a path moves, so a later duplicate still wins), then
/// the rest in their original order. Returns the order and how many entries moved.
fn order(segs: &[Segment], prefetch: &[String]) -> (Vec<usize>, usize) {
    let mut by_path: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in segs.iter().enumerate() {
        by_path.entry(s.entry.path.as_str()).or_default().push(i);
    }
    let mut moved = vec![false; segs.len()];
    let mut front = vec![];
    fn take(
        path: &str,
        segs: &[Segment],
        by_path: &HashMap<&str, Vec<usize>>,
        moved: &mut [bool],
        front: &mut Vec<usize>,
        depth: usize,
    ) {
        if depth > 64 {
            return;
        }
        let mut prefix = String::new();
        for part in path.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            let is_self = prefix.len() == path.len();
            for &i in by_path
                .get(prefix.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                if moved[i] {
                    continue;
                }
                if is_self && segs[i].entry.kind == Kind::Hardlink {
                    let target = segs[i].entry.link.clone();
                    take(&target, segs, by_path, moved, front, depth + 1);
                }
                moved[i] = true;
                front.push(i);
            }
        }
    }
    for p in prefetch {
        if by_path.contains_key(p.as_str()) {
            take(p, segs, &by_path, &mut moved, &mut front, 0);
        }
    }
    let n = front.len();
    front.extend((0..segs.len()).filter(|&i| !moved[i]));
    (front, n)
}

/// A writer that counts what passes through it.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Enc<W: Write> {
    Idle(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Broken,
}

/// A stream of gzip members or zstd frames: `begin` starts a new one (ending the current),
/// `end` closes the current one, `write` goes into the current one (starting one if needed).
struct Framed<W: Write> {
    enc: Enc<Counting<W>>,
    format: Format,
    level: u32,
}

impl<W: Write> Framed<W> {
    fn new(inner: W, format: Format, level: u32) -> Self {
        Framed {
            enc: Enc::Idle(Counting { inner, n: 0 }),
            format,
            level,
        }
    }

    /// Close the current member/frame; returns the compressed position after it.
    fn end(&mut self) -> io::Result<u64> {
        let w = match std::mem::replace(&mut self.enc, Enc::Broken) {
            Enc::Idle(w) => w,
            Enc::Gzip(g) => g.finish()?,
            Enc::Zstd(z) => z.finish()?,
            Enc::Broken => return Err(io::Error::other("compressor failed earlier")),
        };
        let n = w.n;
        self.enc = Enc::Idle(w);
        Ok(n)
    }

    /// Start a new member/frame; returns its compressed offset.
    fn begin(&mut self) -> io::Result<u64> {
        let at = self.end()?;
        let w = match std::mem::replace(&mut self.enc, Enc::Broken) {
            Enc::Idle(w) => w,
            _ => return Err(io::Error::other("compressor failed earlier")),
        };
        self.enc = match self.format {
            Format::Estargz => Enc::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(self.level.min(9)),
            )),
            Format::ZstdChunked => Enc::Zstd(zstd::stream::write::Encoder::new(
                w,
                self.level.clamp(1, 22) as i32,
            )?),
        };
        Ok(at)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if matches!(self.enc, Enc::Idle(_)) {
            self.begin()?;
        }
        match &mut self.enc {
            Enc::Gzip(g) => g.write_all(buf),
            Enc::Zstd(z) => z.write_all(buf),
            _ => Err(io::Error::other("compressor failed earlier")),
        }
    }

    fn into_inner(mut self) -> io::Result<W> {
        self.end()?;
        match self.enc {
            Enc::Idle(w) => Ok(w.inner),
            _ => Err(io::Error::other("compressor failed earlier")),
        }
    }
}

/// One TOC entry, in the JSON both formats use (field names of the eStargz reference TOC; the
/// zstd:chunked one adds `endOffset`). Zero and empty fields are left out.
#[derive(Serialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    modtime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    user_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    group_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct TocFile<'a> {
    version: u32,
    entries: &'a [TocEntry],
}

fn toc_entry(s: &Segment) -> TocEntry {
    let e = &s.entry;
    let b64 = base64::engine::general_purpose::STANDARD;
    TocEntry {
        name: s.name.clone(),
        kind: e.kind.name(),
        size: e.size,
        modtime: e.mtime.clone().unwrap_or_default(),
        link_name: e.link.clone(),
        mode: e.mode as u64,
        uid: e.uid as u64,
        gid: e.gid as u64,
        user_name: s.uname.clone(),
        group_name: s.gname.clone(),
        dev_major: e.dev_major as u64,
        dev_minor: e.dev_minor as u64,
        xattrs: e
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), b64.encode(v)))
            .collect(),
        ..Default::default()
    }
}

/// Compress a run of entries into `out`; TOC entries get offsets relative to its start.
fn compress_part(
    segs: &[&Segment],
    tar: &File,
    out: impl Write,
    opts: &LayerOptions,
) -> io::Result<Vec<TocEntry>> {
    let mut w = Framed::new(out, opts.format, opts.level);
    let mut toc = vec![];
    let mut buf = vec![];
    for s in segs {
        buf.resize((s.data - s.start) as usize, 0);
        s.read(tar, s.start, &mut buf)?;
        w.write(&buf)?;
        let mut ent = toc_entry(s);
        if s.size == 0 {
            toc.push(ent);
        } else {
            let first = toc.len();
            let mut file_hash = Sha256::new();
            let mut done = 0u64;
            while done < s.size {
                let n = (s.size - done).min(opts.chunk_size.max(BLOCK));
                buf.resize(n as usize, 0);
                s.read(tar, s.data + done, &mut buf)?;
                let offset = w.begin()?;
                w.write(&buf)?;
                file_hash.update(&buf);
                if done > 0 {
                    ent = TocEntry {
                        name: s.name.clone(),
                        kind: "chunk",
                        ..Default::default()
                    };
                }
                ent.offset = offset;
                ent.chunk_offset = done;
                ent.chunk_digest = Digest::of(&buf).to_string();
                ent.chunk_size = match opts.format {
                    // The reference eStargz writer leaves the size off a short last chunk.
                    Format::Estargz if n < opts.chunk_size.max(BLOCK) => 0,
                    _ => n,
                };
                toc.push(ent.clone());
                done += n;
            }
            let end = w.end()?;
            let file = &mut toc[first];
            file.digest = Digest::from_sha256(&file_hash.finalize()).to_string();
            if opts.format == Format::ZstdChunked {
                file.end_offset = end;
                if done <= opts.chunk_size.max(BLOCK) {
                    // One chunk: c/storage writes no chunk fields (the file digest covers it).
                    file.chunk_size = 0;
                    file.chunk_digest.clear();
                }
            }
        }
        let pad = (s.end - s.data - s.size) as usize;
        if pad > 0 {
            buf.resize(pad, 0);
            s.read(tar, s.data + s.size, &mut buf)?;
            w.write(&buf)?;
        }
    }
    let mut out = w.into_inner()?;
    out.flush()?;
    Ok(toc)
}

/// The eStargz footer: an empty gzip member whose extra field holds the TOC offset. Written by
/// hand because it must be exactly 51 bytes (readers take the blob's last 51): a stored empty
/// final block, as the reference writer's gzip makes it.
fn estargz_footer(toc_offset: u64) -> [u8; 51] {
    let mut f = [0u8; 51];
    f[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // Final stored block of length 0, then CRC32 and size of the empty content (all zero).
    f[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f
}

fn skippable(payload: &[u8]) -> Vec<u8> {
    let mut v = SKIPPABLE_MAGIC.to_vec();
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Hash the entries of the uncompressed stream the converted layer decompresses to (the caller
/// adds what follows them: the TOC entry or the end of the tar).
fn hash_entries(segs: &[&Segment], tar: &File) -> io::Result<(Sha256, u64)> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for s in segs {
        let mut off = s.start;
        while off < s.end {
            let k = (s.end - off).min(buf.len() as u64) as usize;
            s.read(tar, off, &mut buf[..k])?;
            h.update(&buf[..k]);
            off += k as u64;
            n += k as u64;
        }
    }
    Ok((h, n))
}

/// Convert the layer tar at `tar_path` into `out_path`.
pub fn convert_layer(
    tar_path: &Path,
    out_path: &Path,
    opts: &LayerOptions,
) -> Result<ConvertedLayer, ConvertError> {
    let tar = File::open(tar_path).map_err(io_at(tar_path))?;
    let mut segs = scan(tar_path, &tar, &TarLimits::default())?;
    let (ord, moved) = order(&segs, &opts.prefetch);
    let landmark = match (opts.format, moved) {
        (_, m) if m > 0 => Some(made_file(estargz::PREFETCH_LANDMARK, &[LANDMARK_CONTENT])),
        (Format::Estargz, _) => Some(made_file(
            estargz::NO_PREFETCH_LANDMARK,
            &[LANDMARK_CONTENT],
        )),
        (Format::ZstdChunked, _) => None,
    };
    let mut list: Vec<usize> = ord[..moved].to_vec();
    if let Some(l) = landmark {
        segs.push(l);
        list.push(segs.len() - 1);
    }
    list.extend_from_slice(&ord[moved..]);
    let ordered: Vec<&Segment> = list.iter().map(|&i| &segs[i]).collect();

    // Split into parts of about equal uncompressed size.
    let total: u64 = ordered.iter().map(|s| s.end - s.start).sum();
    let jobs = opts.jobs.max(1).min(ordered.len().max(1));
    let per = total.div_ceil(jobs as u64).max(1 << 20);
    let mut parts: Vec<&[&Segment]> = vec![];
    let (mut from, mut acc) = (0, 0u64);
    for (i, s) in ordered.iter().enumerate() {
        acc += s.end - s.start;
        if acc >= per && parts.len() + 1 < jobs {
            parts.push(&ordered[from..=i]);
            from = i + 1;
            acc = 0;
        }
    }
    parts.push(&ordered[from..]);

    let tmp = |i: usize| {
        let mut p = out_path.as_os_str().to_owned();
        p.push(format!(".part{i}"));
        PathBuf::from(p)
    };
    // The TOC tar entry (eStargz) or the tar's end (zstd:chunked) come after the parts; the
    // diff ID covers them, so they are known before hashing ends: hash in parallel up to the
    // parts' end, and finish below.
    let results = std::thread::scope(|scope| {
        // The diff ID's hash runs alongside the compression.
        let hasher = scope.spawn(|| hash_entries(&ordered, &tar));
        let workers: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let path = tmp(i);
                let tar = &tar;
                scope.spawn(move || -> Result<(Vec<TocEntry>, PathBuf), ConvertError> {
                    let f = File::create(&path).map_err(io_at(&path))?;
                    let toc =
                        compress_part(part, tar, BufWriter::new(f), opts).map_err(io_at(&path))?;
                    Ok((toc, path))
                })
            })
            .collect();
        let parts: Vec<_> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(ConvertError::Malformed("a worker panicked".into())))
            })
            .collect();
        let hashed = hasher
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the hasher panicked")));
        (parts, hashed)
    });
    let cleanup = || {
        for i in 0..parts.len() {
            let _ = std::fs::remove_file(tmp(i));
        }
    };
    let (part_results, hashed) = results;
    let mut toc = vec![];
    let mut part_files = vec![];
    for r in part_results {
        match r {
            Ok((t, p)) => {
                toc.push(t);
                part_files.push(p);
            }
            Err(e) => {
                cleanup();
                return Err(e);
            }
        }
    }
    let hashed = match hashed {
        Ok(h) => h,
        Err(e) => {
            cleanup();
            return Err(io_at(tar_path)(e));
        }
    };
    let r = assemble(out_path, &part_files, toc, hashed, opts);
    cleanup();
    let mut c = r?;
    c.entries = ordered.len();
    c.prefetched = moved;
    Ok(c)
}

/// Concatenate the parts (shifting their TOC offsets), append TOC and footer, hash it all;
/// finish the diff ID from the entries' hash.
fn assemble(
    out_path: &Path,
    parts: &[PathBuf],
    toc_parts: Vec<Vec<TocEntry>>,
    (mut diff, entries_len): (Sha256, u64),
    opts: &LayerOptions,
) -> Result<ConvertedLayer, ConvertError> {
    let io_out = io_at(out_path);
    let out = File::create(out_path).map_err(&io_out)?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        hash: Sha256::new(),
        n: 0,
    };
    let mut toc = vec![];
    for (path, entries) in parts.iter().zip(toc_parts) {
        let base = out.n;
        for mut e in entries {
            if e.offset > 0 {
                e.offset += base;
            }
            if e.end_offset > 0 {
                e.end_offset += base;
            }
            toc.push(e);
        }
        let mut f = File::open(path).map_err(io_at(path))?;
        io::copy(&mut f, &mut out).map_err(io_at(path))?;
    }
    let json = serde_json::to_vec(&TocFile {
        version: 1,
        entries: &toc,
    })
    .map_err(|e| ConvertError::SelfCheck(e.to_string()))?;
    let mut annotations = BTreeMap::new();
    // What the uncompressed stream has after the entries.
    let trailer: Vec<u8> = match opts.format {
        Format::Estargz => {
            let mut h = tar::Header::new_ustar();
            let _ = h.set_path(estargz::TOC_NAME);
            h.set_size(json.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            let mut t = h.as_bytes().to_vec();
            t.extend_from_slice(&json);
            t.resize(((t.len() as u64).div_ceil(BLOCK) * BLOCK) as usize, 0);
            t.extend_from_slice(&[0u8; 1024]);
            let toc_offset = out.n;
            let mut gz = flate2::write::GzEncoder::new(
                &mut out,
                flate2::Compression::new(opts.level.min(9)),
            );
            gz.write_all(&t).map_err(&io_out)?;
            gz.finish().map_err(&io_out)?;
            out.write_all(&estargz_footer(toc_offset))
                .map_err(&io_out)?;
            annotations.insert(
                estargz::TOC_DIGEST_ANNOTATION.to_string(),
                Digest::of(&json).to_string(),
            );
            t
        }
        Format::ZstdChunked => {
            let end = vec![0u8; 1024];
            let mut z = Framed::new(&mut out, Format::ZstdChunked, opts.level);
            z.write(&end).map_err(&io_out)?;
            z.end().map_err(&io_out)?;
            drop(z);
            let compressed =
                zstd::bulk::compress(&json, opts.level.clamp(1, 22) as i32).map_err(&io_out)?;
            let offset = out.n + 8;
            out.write_all(&skippable(&compressed)).map_err(&io_out)?;
            let mut footer = vec![];
            for v in [offset, compressed.len() as u64, json.len() as u64, 1] {
                footer.extend_from_slice(&v.to_le_bytes());
            }
            footer.extend_from_slice(ZSTD_CHUNKED_MAGIC);
            out.write_all(&skippable(&footer)).map_err(&io_out)?;
            let pos = zstd_chunked::Position {
                offset,
                length: compressed.len() as u64,
                uncompressed: json.len() as u64,
            }
            .encode();
            let checksum = Digest::of(&compressed).to_string();
            for (ck, p) in zstd_chunked::FLAVOURS {
                annotations.insert(ck.to_string(), checksum.clone());
                annotations.insert(p.to_string(), pos.clone());
            }
            end
        }
    };
    out.flush().map_err(&io_out)?;
    let size = out.n;
    let digest = Digest::from_sha256(&out.hash.finalize());
    out.inner
        .into_inner()
        .map_err(|e| io_out(e.into_error()))?
        .sync_all()
        .map_err(&io_out)?;
    diff.update(&trailer);
    let (diff_id, uncompressed_size) = (
        Digest::from_sha256(&diff.finalize()),
        entries_len + trailer.len() as u64,
    );
    if opts.format == Format::Estargz {
        annotations.insert(
            estargz::UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
            uncompressed_size.to_string(),
        );
    }
    Ok(ConvertedLayer {
        digest,
        size,
        diff_id,
        uncompressed_size,
        media_type: opts.format.media_type(),
        annotations,
        entries: 0,
        prefetched: 0,
    })
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    n: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Read a layer blob's tar (decompressing gzip or zstd) into `dest`; returns its size and
/// digest (the diff ID).
pub fn decompress_to(
    blob: &Path,
    compression: crate::oci::Compression,
    dest: &Path,
) -> Result<(u64, Digest), ConvertError> {
    let f = File::open(blob).map_err(io_at(blob))?;
    let mut r = crate::layer::tar::decoder(compression, f).map_err(io_at(blob))?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, File::create(dest).map_err(io_at(dest))?),
        hash: Sha256::new(),
        n: 0,
    };
    io::copy(&mut r, &mut out).map_err(io_at(blob))?;
    out.flush().map_err(io_at(dest))?;
    Ok((out.n, Digest::from_sha256(&out.hash.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::index::{LayerIndex, Spans};
    use std::io::Read;

    fn big(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A tar with every kind of entry, a long name, xattrs, a hardlink and a duplicate path.
    fn sample_tar(dir: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
        let path = dir.join("in.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut files = vec![];
        let add = |b: &mut tar::Builder<File>, name: &str, kind: tar::EntryType, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o640
            });
            h.set_uid(1000);
            h.set_gid(100);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        add(&mut b, "./", tar::EntryType::Directory, b"");
        add(&mut b, "a/", tar::EntryType::Directory, b"");
        add(&mut b, "a/b/", tar::EntryType::Directory, b"");
        for (name, data) in [
            ("a/one", b"one\n".to_vec()),
            ("a/empty", vec![]),
            ("a/b/large", big(10_000)),
            ("a/b/exact", big(8192)),
            (
                &*format!("a/{}", "long".repeat(40)),
                b"long name\n".to_vec(),
            ),
            ("z", b"first z\n".to_vec()),
        ] {
            add(&mut b, name, tar::EntryType::Regular, &data);
            files.push((name.to_string(), data));
        }
        add(&mut b, "z", tar::EntryType::Regular, b"second z wins\n");
        files.retain(|(n, _)| n != "z");
        files.push(("z".into(), b"second z wins\n".to_vec()));
        for (kind, name, target) in [
            (tar::EntryType::Symlink, "a/link", "one"),
            (tar::EntryType::Link, "a/hard", "a/b/large"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            h.set_mode(0o777);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_link(&mut h, name, target).unwrap();
        }
        b.append_pax_extensions([("SCHILY.xattr.user.k", b"v\0x".as_slice())])
            .unwrap();
        add(&mut b, "a/x", tar::EntryType::Regular, b"with xattr");
        files.push(("a/x".into(), b"with xattr".to_vec()));
        add(&mut b, "a/.wh.gone", tar::EntryType::Regular, b"");
        b.finish().unwrap();
        (path, files)
    }

    fn opts(format: Format, prefetch: &[&str], jobs: usize) -> LayerOptions {
        LayerOptions {
            format,
            chunk_size: 4096,
            level: 3,
            prefetch: prefetch.iter().map(|s| s.to_string()).collect(),
            jobs,
        }
    }

    /// Parse the converted blob's TOC the way the daemon does.
    fn read_back(blob: &[u8], c: &ConvertedLayer, format: Format) -> LayerIndex {
        let limits = estargz::Limits::default();
        let a: HashMap<String, String> = c.annotations.clone().into_iter().collect();
        match format {
            Format::Estargz => {
                let off = estargz::parse_footer(blob).unwrap();
                let member = &blob[off as usize..blob.len() - 51];
                let json = estargz::toc_json_from_member(member, &limits).unwrap();
                let d = Digest::parse(&a[estargz::TOC_DIGEST_ANNOTATION]).unwrap();
                estargz::parse_toc(&json, &d, blob.len() as u64, off, &limits).unwrap()
            }
            Format::ZstdChunked => {
                let (d, pos) = zstd_chunked::from_annotations(&a).unwrap().unwrap();
                let frame = &blob[pos.offset as usize..(pos.offset + pos.length) as usize];
                zstd_chunked::parse_toc(frame, &d, &pos, blob.len() as u64, &limits).unwrap()
            }
        }
    }

    fn decompress(blob: &[u8], format: Format) -> Vec<u8> {
        let mut out = vec![];
        match format {
            Format::Estargz => flate2::read::MultiGzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap(),
            Format::ZstdChunked => zstd::stream::read::Decoder::new(blob)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap(),
        };
        out
    }

    fn check(format: Format, prefetch: &[&str], jobs: usize) -> (LayerIndex, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let (input, files) = sample_tar(dir.path());
        let out = dir.path().join("out");
        let c = convert_layer(&input, &out, &opts(format, prefetch, jobs)).unwrap();
        let blob = std::fs::read(&out).unwrap();
        assert_eq!(c.size, blob.len() as u64);
        assert_eq!(c.digest, Digest::of(&blob));
        let plain = decompress(&blob, format);
        assert_eq!(c.diff_id, Digest::of(&plain));
        assert_eq!(c.uncompressed_size, plain.len() as u64);
        // The decompressed stream is a tar with the same files (the last duplicate wins).
        let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
        let mut names = vec![];
        for e in tar::Archive::new(plain.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = vec![];
            e.read_to_end(&mut data).unwrap();
            names.push(name.clone());
            if e.header().entry_type() == tar::EntryType::Link {
                assert!(seen.contains_key("a/b/large"), "hardlink before its target");
            }
            seen.insert(name, data);
        }
        for (name, data) in &files {
            assert_eq!(&seen[name], data, "{name}");
        }
        // Every file reads back through the TOC, chunk by chunk, verified.
        let toc = read_back(&blob, &c, format);
        let spans = Spans::new(&toc);
        for (name, data) in &files {
            let e = toc.entries.iter().rev().find(|e| &e.path == name).unwrap();
            let got = crate::layer::index::read_file(&spans, e, 0, u64::MAX, |s, e| {
                Ok(blob[s as usize..e as usize].to_vec())
            })
            .unwrap();
            assert_eq!(&got, data, "{name}");
        }
        let x = toc.entries.iter().find(|e| e.path == "a/x").unwrap();
        assert_eq!(x.xattrs, vec![("user.k".to_string(), b"v\0x".to_vec())]);
        let large = toc.entries.iter().find(|e| e.path == "a/b/large").unwrap();
        assert_eq!(large.chunks.len(), 3);
        assert_eq!((large.uid, large.gid, large.mode), (1000, 100, 0o640));
        (toc, names)
    }

    #[test]
    fn estargz_round_trip_without_prefetch() {
        for jobs in [1, 3] {
            let (toc, names) = check(Format::Estargz, &[], jobs);
            assert_eq!(names[0], estargz::NO_PREFETCH_LANDMARK);
            assert_eq!(names.last().unwrap(), estargz::TOC_NAME);
            assert_eq!(toc.prefetch_landmark, None);
        }
    }

    #[test]
    fn estargz_prefetch_moves_files_parents_and_link_targets_first() {
        let (toc, names) = check(Format::Estargz, &["a/hard", "a/one", "nope"], 2);
        let landmark = names
            .iter()
            .position(|n| n == estargz::PREFETCH_LANDMARK)
            .unwrap();
        assert_eq!(
            &names[..landmark],
            &["a/", "a/b/", "a/b/large", "a/hard", "a/one"]
        );
        assert!(toc.prefetch_landmark.is_some());
    }

    #[test]
    fn zstd_chunked_round_trip() {
        for jobs in [1, 2] {
            let (toc, names) = check(Format::ZstdChunked, &[], jobs);
            assert!(!names.iter().any(|n| n.contains("landmark")));
            assert_eq!(toc.prefetch_landmark, None);
        }
        let (toc, names) = check(Format::ZstdChunked, &["a/x"], 2);
        assert_eq!(names[2], estargz::PREFETCH_LANDMARK);
        assert!(toc.prefetch_landmark.is_some());
    }

    #[test]
    fn footer_is_an_empty_gzip_member() {
        let f = estargz_footer(0x1234);
        assert_eq!(estargz::parse_footer(&f).unwrap(), 0x1234);
        let mut out = vec![];
        flate2::read::GzDecoder::new(&f[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn bad_tars_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.tar");
        let mut b = tar::Builder::new(File::create(&p).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_link(&mut h, "a", "missing").unwrap();
        b.finish().unwrap();
        let e = convert_layer(&p, &dir.path().join("o"), &opts(Format::Estargz, &[], 1));
        assert!(e.unwrap_err().to_string().contains("not an earlier entry"));
        std::fs::write(&p, b"this is not a tar at all, not even close; ".repeat(20)).unwrap();
        assert!(convert_layer(&p, &dir.path().join("o"), &opts(Format::Estargz, &[], 1)).is_err());
    }
}
