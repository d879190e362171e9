//! Layer readers (pure, fuzzable): the format-neutral layer index (`index`) and the formats
//! that build one so that a layer is read without fetching it whole (`estargz`,
//! `zstd_chunked`, and `tar` with `gzindex` for plain layers), and the unpacker that serves
//! complete layers from the file cache (`tar`).

pub mod estargz;
pub mod gzindex;
pub mod index;
pub mod tar;
pub mod zstd_chunked;

use crate::oci::Digest;

/// Parse a TOC kept in the store under `toc_digest`: eStargz JSON, or, when the layer has a
/// zstd:chunked `position`, the compressed TOC frame.
pub fn parse_stored_toc(
    bytes: &[u8],
    toc_digest: &Digest,
    position: Option<&str>,
    blob_size: u64,
    toc_offset: u64,
) -> Result<index::LayerIndex, estargz::TocError> {
    let limits = estargz::Limits::default();
    match position {
        Some(p) => {
            let pos = zstd_chunked::Position::parse(p)?;
            zstd_chunked::parse_toc(bytes, toc_digest, &pos, blob_size, &limits)
        }
        None => estargz::parse_toc(bytes, toc_digest, blob_size, toc_offset, &limits),
    }
}
