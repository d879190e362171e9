//! The layer index: what every lazily readable layer format gives the read path, whatever the
//! format. Files and their metadata (`Entry`), each regular file's payload as chunks
//! (`Chunk`: where its bytes lie in the blob, its digest, and how to decode them, `Codec`),
//! and the landmark of start-up prefetch. Built by each format's parser: eStargz TOCs
//! (`estargz.rs`), zstd:chunked TOCs (`zstd_chunked.rs`), and the file index with decoder
//! checkpoints of a plain gzip or zstd layer (`tar.rs` with `gzindex.rs`). Decoding a chunk
//! (and verifying it against its digest) is here too, one function for every codec.
//!
//! Pure and bounded: the parsers validate what they put in.

use crate::oci::Digest;
use std::io::Read;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

const KIND_NAMES: [(Kind, &str); 7] = [
    (Kind::Dir, "dir"),
    (Kind::Reg, "reg"),
    (Kind::Symlink, "symlink"),
    (Kind::Hardlink, "hardlink"),
    (Kind::Char, "char"),
    (Kind::Block, "block"),
    (Kind::Fifo, "fifo"),
];

impl Kind {
    /// The TOC's `type` name (also used by the file index of unpacked layers).
    pub fn name(self) -> &'static str {
        KIND_NAMES
            .iter()
            .find(|(k, _)| *k == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        KIND_NAMES.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
    }
}

/// One piece of a regular file's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Where decoding the chunk starts in the blob: its gzip member (eStargz), its first zstd
    /// frame (zstd:chunked), its checkpoint (a plain layer's index).
    pub offset: u64,
    /// Bytes of decoded output from there to the chunk's first byte.
    pub inner_offset: u64,
    /// Offset of this chunk within the file.
    pub file_offset: u64,
    pub size: u64,
    pub digest: Option<Digest>,
    /// How its bytes are decoded.
    pub codec: Codec,
}

/// How a chunk's compressed bytes are decoded: the one place a layer index keeps its format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Codec {
    /// eStargz: a gzip member starting at the chunk's `offset`; it ends no later than the next
    /// chunk's member or the TOC ([`Spans`]).
    GzipMember,
    /// zstd:chunked: the zstd frame(s) `[offset, end)`.
    ZstdFrames { end: u64 },
    /// A plain gzip or zstd layer read through its index: decoding resumes at this checkpoint
    /// (a deflate block boundary with its window, or a zstd frame start; its `start()` is
    /// the chunk's `offset`); `[offset, end)` holds the chunk.
    Checkpoint {
        point: Arc<super::gzindex::Point>,
        end: u64,
    },
}

impl Chunk {
    /// The checkpoint decoding resumes at, for a chunk read through a plain layer's index.
    pub fn resume(&self) -> Option<&Arc<super::gzindex::Point>> {
        match &self.codec {
            Codec::Checkpoint { point, .. } => Some(point),
            _ => None,
        }
    }

    /// Where the chunk's compressed bytes end, when the index says (zstd frames,
    /// checkpoints); an eStargz member's end comes from [`Spans`].
    pub fn end(&self) -> Option<u64> {
        match &self.codec {
            Codec::GzipMember => None,
            Codec::ZstdFrames { end } | Codec::Checkpoint { end, .. } => Some(*end),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Clean relative path (`a/b/c`; the root is "").
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Option<String>,
    /// Symlink target (verbatim) or hardlink target (clean path).
    pub link: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub digest: Option<Digest>,
    pub chunks: Vec<Chunk>,
}

/// A layer's index: a decoded, verified and validated TOC, or a plain layer's file index
/// with its checkpoints.
#[derive(Clone, Debug)]
pub struct LayerIndex {
    pub digest: Digest,
    pub toc_offset: u64,
    pub entries: Vec<Entry>,
    /// Index of the prefetch landmark entry, when present: files before it are prefetched first.
    pub prefetch_landmark: Option<usize>,
}

impl LayerIndex {
    pub fn regular_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::Reg)
            .map(|e| e.size)
            .sum()
    }
}

/// Compressed spans of the layer's payload: where each gzip member holding chunk data ends.
/// A member ends no later than the next chunk member (or the TOC); reading from a chunk's offset
/// to that end is enough to decode it (a gzip decoder stops at the end of its member).
#[derive(Clone, Debug, Default)]
pub struct Spans {
    starts: Vec<u64>,
    toc_offset: u64,
}

impl Spans {
    pub fn new(toc: &LayerIndex) -> Self {
        let mut starts: Vec<u64> = toc
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| c.offset))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        Spans {
            starts,
            toc_offset: toc.toc_offset,
        }
    }

    /// The compressed byte range `[start, end)` to fetch for a chunk.
    pub fn span(&self, chunk: &Chunk) -> (u64, u64) {
        if let Some(end) = chunk.end() {
            return (chunk.offset, end);
        }
        let next = match self.starts.binary_search(&chunk.offset) {
            Ok(i) => self.starts.get(i + 1),
            Err(i) => self.starts.get(i),
        };
        (
            chunk.offset,
            next.copied()
                .unwrap_or(self.toc_offset)
                .min(self.toc_offset),
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk at {offset}: {reason}")]
    Decode { offset: u64, reason: String },
    #[error("chunk at {offset}: digest mismatch (expected {expected}, got {actual})")]
    Digest {
        offset: u64,
        expected: Digest,
        actual: Digest,
    },
    #[error("fetching bytes {start}..{end}: {reason}")]
    Fetch {
        start: u64,
        end: u64,
        reason: String,
    },
}

/// Decode one chunk from its member's compressed bytes and verify it before returning it.
pub fn decode_chunk(compressed: &[u8], chunk: &Chunk) -> Result<Vec<u8>, ChunkError> {
    decode_chunk_with(compressed, chunk, None)
}

/// [`decode_chunk`] for a chunk read through a gzip index whose checkpoint window is kept
/// apart: `window` is that window's bytes (verified against its digest here).
pub fn decode_chunk_with(
    compressed: &[u8],
    chunk: &Chunk,
    window: Option<&[u8]>,
) -> Result<Vec<u8>, ChunkError> {
    decode_chunk_resumed(compressed, chunk.offset, chunk, window, &mut None)
}

/// Whether `decoder` can go on to `chunk` given the blob's bytes from `input_at` on (else
/// the chunk is decoded from its own checkpoint, whose window it then needs).
pub fn continues(
    decoder: &Option<super::gzindex::SpanDecoder>,
    chunk: &Chunk,
    input_at: u64,
) -> bool {
    match (decoder, chunk.resume()) {
        (Some(d), Some(p)) if !p.zstd => d.can_reach(p.out + chunk.inner_offset, input_at),
        _ => false,
    }
}

/// [`decode_chunk_with`], going on with `decoder` when the chunk lies ahead of it (chunks read
/// in order from a run of the blob are decoded in one pass, across checkpoints); `decoder` is
/// left after this chunk, or emptied. `compressed` is the blob from `input_at` on, through
/// the chunk's end; from the chunk's own offset when the decoder is not used.
pub fn decode_chunk_resumed(
    compressed: &[u8],
    input_at: u64,
    chunk: &Chunk,
    window: Option<&[u8]>,
    decoder: &mut Option<super::gzindex::SpanDecoder>,
) -> Result<Vec<u8>, ChunkError> {
    let err = |reason: String| ChunkError::Decode {
        offset: chunk.offset,
        reason,
    };
    let own = || {
        usize::try_from(chunk.offset.saturating_sub(input_at))
            .ok()
            .and_then(|from| compressed.get(from..))
            .filter(|_| input_at <= chunk.offset)
            .ok_or_else(|| err(format!("given the blob from {input_at}, after the chunk")))
    };
    if let Some(point) = chunk.resume() {
        if point.zstd {
            let out =
                super::gzindex::decode_at(own()?, point, window, chunk.inner_offset, chunk.size)
                    .map_err(|e| err(e.to_string()))?;
            return verify_chunk(out, chunk);
        }
        let pos = point.out + chunk.inner_offset;
        let go_on = continues(decoder, chunk, input_at);
        let resumed = decoder.take().filter(|_| go_on).and_then(|mut d| {
            // Short of input (another chunk's bytes reached further): decoded from the
            // checkpoint instead.
            let out = d.read_at(compressed, input_at, pos, chunk.size).ok()?;
            Some((d, out))
        });
        let (d, out) = match resumed {
            Some(r) => r,
            None => {
                let mut d = super::gzindex::SpanDecoder::new(point, window)
                    .map_err(|e| err(e.to_string()))?;
                let out = d
                    .read(own()?, chunk.inner_offset, chunk.size)
                    .map_err(|e| err(e.to_string()))?;
                (d, out)
            }
        };
        let out = verify_chunk(out, chunk)?;
        *decoder = Some(d);
        return Ok(out);
    }
    let mut dec = member_decoder(own()?, chunk).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::with_capacity(chunk.size.min(64 << 20) as usize);
    (&mut dec)
        .take(chunk.size)
        .read_to_end(&mut out)
        .map_err(|e| err(e.to_string()))?;
    if out.len() as u64 != chunk.size {
        return Err(err(format!(
            "member holds {} bytes, chunk needs {}",
            out.len(),
            chunk.size
        )));
    }
    verify_chunk(out, chunk)
}

/// A decoder of a gzip member's or zstd frames' chunk from its bytes `compressed`, past the
/// chunk's `inner_offset` (what the member holds before the chunk's bytes).
fn member_decoder<'a>(compressed: &'a [u8], chunk: &Chunk) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut dec: Box<dyn Read + 'a> = if matches!(chunk.codec, Codec::ZstdFrames { .. }) {
        Box::new(zstd::stream::read::Decoder::with_buffer(compressed)?)
    } else {
        Box::new(flate2::read::GzDecoder::new(compressed))
    };
    if chunk.inner_offset > 0 {
        let skipped = std::io::copy(
            &mut (&mut dec).take(chunk.inner_offset),
            &mut std::io::sink(),
        )?;
        if skipped < chunk.inner_offset {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "member ends before the chunk",
            ));
        }
    }
    Ok(dec)
}

/// The first decoded bytes of `chunk` that `compressed` gives (the chunk's bytes from its
/// offset on, perhaps only their beginning: a response still arriving), at most `max` of
/// them, **not verified**: for a guess of what to fetch next (an ELF file's libraries), never
/// for a reader. `None` for a chunk decoded from a checkpoint (its window may not be here)
/// or when nothing decodes yet.
pub fn peek_chunk(compressed: &[u8], chunk: &Chunk, max: usize) -> Option<Vec<u8>> {
    if chunk.resume().is_some() {
        return None;
    }
    let mut dec = member_decoder(compressed, chunk).ok()?;
    let want = usize::try_from(chunk.size).unwrap_or(usize::MAX).min(max);
    let mut out = vec![0u8; want];
    let mut n = 0;
    while n < want {
        match dec.read(&mut out[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    out.truncate(n);
    (n > 0).then_some(out)
}

fn verify_chunk(out: Vec<u8>, chunk: &Chunk) -> Result<Vec<u8>, ChunkError> {
    if let Some(expected) = &chunk.digest {
        let actual = Digest::of(&out);
        if &actual != expected {
            return Err(ChunkError::Digest {
                offset: chunk.offset,
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(out)
}

/// Read `[offset, offset+len)` of a regular file, fetching compressed spans with `fetch(start,
/// end)`; only the chunks the range touches are fetched, each verified before use.
pub fn read_file(
    spans: &Spans,
    entry: &Entry,
    offset: u64,
    len: u64,
    mut fetch: impl FnMut(u64, u64) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, ChunkError> {
    let end = offset.saturating_add(len).min(entry.size);
    let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
    for c in &entry.chunks {
        let (c_start, c_end) = (c.file_offset, c.file_offset + c.size);
        if c_end <= offset || c_start >= end {
            continue;
        }
        let (s, e) = spans.span(c);
        let compressed = fetch(s, e).map_err(|reason| ChunkError::Fetch {
            start: s,
            end: e,
            reason,
        })?;
        let data = decode_chunk(&compressed, c)?;
        let from = offset.max(c_start) - c_start;
        let to = end.min(c_end) - c_start;
        out.extend_from_slice(&data[from as usize..to as usize]);
    }
    Ok(out)
}
