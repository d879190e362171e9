//! zstd:chunked layers (docs/dev/zstd-chunked.md): a zstd layer whose files start new frames,
//! with a TOC (the eStargz JSON dialect plus `endOffset`) in a skippable frame near the end.
//!
//! The layer descriptor's annotations locate the TOC (`manifest-position`: offset, compressed
//! length, uncompressed length, type 1) and authenticate it (`manifest-checksum`: sha256 of the
//! compressed TOC bytes). Both the current `io.github.containers.*` keys and the legacy
//! `io.containers.*` keys (all Debian bookworm's skopeo/buildah write) are accepted. The footer
//! is never trusted: the annotations are covered by the manifest digest.

use super::estargz::{self, Limits, TocError};
use super::index::LayerIndex;
use crate::oci::Digest;
use std::collections::HashMap;
use std::io::Read;

pub const FLAVOURS: [(&str, &str); 2] = [
    (
        "io.github.containers.zstd-chunked.manifest-checksum",
        "io.github.containers.zstd-chunked.manifest-position",
    ),
    (
        "io.containers.zstd-chunked.manifest-checksum",
        "io.containers.zstd-chunked.manifest-position",
    ),
];
/// Skippable frame header in front of the compressed TOC (magic + size).
const SKIPPABLE_HEADER: u64 = 8;

/// Where the compressed TOC is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub length: u64,
    pub uncompressed: u64,
}

impl Position {
    /// `offset:length:uncompressed:type` (type must be 1).
    pub fn parse(s: &str) -> Result<Position, TocError> {
        let f: Vec<&str> = s.split(':').collect();
        let [offset, length, uncompressed, kind] = f.as_slice() else {
            return Err(TocError::Position(format!(
                "{s:?}: want offset:length:uncompressed:type"
            )));
        };
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| TocError::Position(format!("{s:?}: {v:?} is not a number")))
        };
        if num(kind)? != 1 {
            return Err(TocError::Position(format!(
                "{s:?}: unsupported TOC type {kind}"
            )));
        }
        let p = Position {
            offset: num(offset)?,
            length: num(length)?,
            uncompressed: num(uncompressed)?,
        };
        if p.offset < SKIPPABLE_HEADER || p.length == 0 {
            return Err(TocError::Position(format!("{s:?}: empty or misplaced")));
        }
        // Callers compute `offset + length`; found by the fuzz target.
        if p.offset.checked_add(p.length).is_none() {
            return Err(TocError::Position(format!("{s:?}: ends past 2^64")));
        }
        Ok(p)
    }

    pub fn encode(&self) -> String {
        format!("{}:{}:{}:1", self.offset, self.length, self.uncompressed)
    }

    /// Where the layer's data ends (the TOC's skippable frame starts).
    pub fn data_end(&self) -> u64 {
        self.offset - SKIPPABLE_HEADER
    }
}

/// The TOC checksum and position from a layer's annotations, if it is zstd:chunked.
pub fn from_annotations(
    a: &HashMap<String, String>,
) -> Option<Result<(Digest, Position), TocError>> {
    FLAVOURS.iter().find_map(|(ck, pos)| {
        let (c, p) = (a.get(*ck)?, a.get(*pos)?);
        Some(
            Digest::parse(c)
                .map_err(|e| TocError::Position(format!("checksum {c:?}: {e}")))
                .and_then(|d| Ok((d, Position::parse(p)?))),
        )
    })
}

/// Verify the compressed TOC against its checksum, decompress it (bounded) and parse it
/// against the blob it describes.
pub fn parse_toc(
    compressed: &[u8],
    checksum: &Digest,
    pos: &Position,
    blob_size: u64,
    limits: &Limits,
) -> Result<LayerIndex, TocError> {
    let actual = Digest::of(compressed);
    if &actual != checksum {
        return Err(TocError::DigestMismatch {
            expected: checksum.clone(),
            actual,
        });
    }
    if pos.offset + pos.length > blob_size {
        return Err(TocError::Json(format!(
            "TOC at {}+{} beyond the blob ({blob_size} bytes)",
            pos.offset, pos.length
        )));
    }
    let cap = pos.uncompressed.min(limits.max_toc_json);
    if pos.uncompressed > limits.max_toc_json {
        return Err(TocError::TooLarge {
            size: pos.uncompressed,
            limit: limits.max_toc_json,
        });
    }
    let mut json = Vec::with_capacity(cap as usize);
    zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(|e| TocError::Json(format!("TOC frame: {e}")))?
        .take(cap + 1)
        .read_to_end(&mut json)
        .map_err(|e| TocError::Json(format!("TOC frame: {e}")))?;
    if json.len() as u64 != pos.uncompressed {
        return Err(TocError::Json(format!(
            "TOC decompresses to {} bytes, the annotation says {}",
            json.len(),
            pos.uncompressed
        )));
    }
    estargz::parse_entries(
        &json,
        checksum.clone(),
        blob_size,
        pos.data_end(),
        limits,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_annotations() {
        assert_eq!(
            Position::parse("1059879:2390:8409:1").unwrap(),
            Position {
                offset: 1059879,
                length: 2390,
                uncompressed: 8409
            }
        );
        assert!(Position::parse("1:2:3:2").is_err(), "type 2");
        assert!(Position::parse("1:2:3").is_err());
        assert!(Position::parse("x:2:3:1").is_err());
        assert!(
            Position::parse("18446744073709551615:2:3:1").is_err(),
            "overflow"
        );
        let mut a = HashMap::new();
        assert!(from_annotations(&a).is_none());
        a.insert(
            FLAVOURS[1].0.to_string(),
            format!("sha256:{}", "a".repeat(64)),
        );
        assert!(from_annotations(&a).is_none(), "checksum without position");
        a.insert(FLAVOURS[1].1.to_string(), "100:20:50:1".into());
        let (_, p) = from_annotations(&a).unwrap().unwrap();
        assert_eq!(p.data_end(), 92);
    }

    #[test]
    fn toc_is_verified_decoded_and_chunks_get_frame_ends() {
        // Two files: "a" (one frame, 10..30) and "b" in two chunks (30..40, 40..55), TOC at 63.
        let json = serde_json::json!({"version": 1, "entries": [
            {"type": "dir", "name": "./", "mode": 493},
            {"type": "reg", "name": "a", "size": 5, "offset": 10, "endOffset": 30,
             "digest": format!("sha256:{}", "1".repeat(64))},
            {"type": "reg", "name": "b", "size": 8, "offset": 30, "endOffset": 55,
             "chunkSize": 3, "digest": format!("sha256:{}", "2".repeat(64)),
             "chunkDigest": format!("sha256:{}", "3".repeat(64))},
            {"type": "chunk", "name": "b", "offset": 40, "chunkOffset": 3, "chunkSize": 5,
             "chunkDigest": format!("sha256:{}", "4".repeat(64))}
        ]})
        .to_string();
        let compressed = zstd::encode_all(json.as_bytes(), 3).unwrap();
        let ck = Digest::of(&compressed);
        let pos = Position {
            offset: 71,
            length: compressed.len() as u64,
            uncompressed: json.len() as u64,
        };
        let size = 71 + compressed.len() as u64 + 48;
        let toc = parse_toc(&compressed, &ck, &pos, size, &Limits::default()).unwrap();
        let a = &toc.entries[1];
        assert_eq!((a.chunks[0].offset, a.chunks[0].end()), (10, Some(30)));
        assert_eq!(
            a.chunks[0].digest, a.digest,
            "single chunk: the file digest"
        );
        let b = &toc.entries[2];
        assert_eq!(
            b.chunks
                .iter()
                .map(|c| (c.offset, c.end()))
                .collect::<Vec<_>>(),
            vec![(30, Some(40)), (40, Some(55))]
        );
        // Tampered bytes, a lying length, a payload past the TOC: refused.
        let mut bad = compressed.clone();
        bad[5] ^= 1;
        assert!(matches!(
            parse_toc(&bad, &ck, &pos, size, &Limits::default()),
            Err(TocError::DigestMismatch { .. })
        ));
        let short = Position {
            uncompressed: 3,
            ..pos
        };
        assert!(parse_toc(&compressed, &ck, &short, size, &Limits::default()).is_err());
        let early = Position { offset: 40, ..pos };
        assert!(parse_toc(&compressed, &ck, &early, size, &Limits::default()).is_err());
    }
}
