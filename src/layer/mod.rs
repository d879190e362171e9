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

/// Decoded metadata waiting for its layer's mount, by what its decoding depends on (the digest
/// of the bytes, and what they were checked against); the newest last, at most `max`. A cold
/// start decodes a layer's TOC or shared index when it fetches it (to verify it) and again when
/// it mounts the layer right after, on the start's critical path: the fetch keeps what it
/// decoded and the mount takes it. Content-addressed: whoever takes an item gets what decoding
/// those bytes gives.
pub struct Kept<K, V> {
    items: std::sync::Mutex<Vec<(K, V)>>,
    max: usize,
}

impl<K: PartialEq, V> Kept<K, V> {
    pub const fn new(max: usize) -> Self {
        Kept {
            items: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    /// Keep `v` decoded from `k` (replacing one kept for `k`; the oldest leaves when full).
    pub fn keep(&self, k: K, v: V) {
        let mut kept = self.items.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(x, _)| *x != k);
        kept.push((k, v));
        let over = kept.len().saturating_sub(self.max);
        kept.drain(..over);
    }

    /// What [`Kept::keep`] kept for `k` (taken: the next call finds nothing), if anything.
    pub fn take(&self, k: &K) -> Option<V> {
        let mut kept = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let at = kept.iter().position(|(x, _)| x == k)?;
        Some(kept.remove(at).1)
    }
}

/// What a parsed TOC depends on besides its bytes: the TOC's digest, the blob's size, the
/// TOC's offset (eStargz) or position (zstd:chunked).
type TocKey = (Digest, u64, u64, Option<String>);

fn toc_key(toc_digest: &Digest, position: Option<&str>, blob_size: u64, toc_offset: u64) -> TocKey {
    (
        toc_digest.clone(),
        blob_size,
        toc_offset,
        position.map(str::to_string),
    )
}

/// TOCs parsed when fetched, for their layer's mount (two: a few MB each for a layer of
/// thousands of files). Measured on the python image's eStargz TOC (8351 entries) on a busy
/// 2-core machine: the parse took 18–40 ms at the fetch and again at the mount.
static PARSED_TOCS: Kept<TocKey, index::LayerIndex> = Kept::new(2);

/// Keep `toc`, just parsed by [`parse_stored_toc`]'s rules from the TOC `toc_digest` names,
/// for the mount of its layer ([`mount_toc`]).
pub fn keep_parsed_toc(
    toc_digest: &Digest,
    position: Option<&str>,
    blob_size: u64,
    toc_offset: u64,
    toc: index::LayerIndex,
) {
    PARSED_TOCS.keep(toc_key(toc_digest, position, blob_size, toc_offset), toc);
}

/// The TOC of a layer being mounted: the one its fetch parsed ([`keep_parsed_toc`]) if it is
/// still kept, else the store's copy (`read`) parsed again.
pub fn mount_toc<E: From<estargz::TocError>>(
    read: impl FnOnce() -> Result<Vec<u8>, E>,
    toc_digest: &Digest,
    position: Option<&str>,
    blob_size: u64,
    toc_offset: u64,
) -> Result<index::LayerIndex, E> {
    if let Some(toc) = PARSED_TOCS.take(&toc_key(toc_digest, position, blob_size, toc_offset)) {
        return Ok(toc);
    }
    let json = read()?;
    Ok(parse_stored_toc(
        &json, toc_digest, position, blob_size, toc_offset,
    )?)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toc_parsed_at_its_fetch_is_taken_once_by_the_mount_and_only_for_the_same_layer() {
        let (blob, d) = estargz::tests::build(&[("a", b"hello"), ("b", b"world")], |_| {});
        let off = estargz::parse_footer(&blob).unwrap();
        let end = blob.len() - estargz::footer_size(&blob) as usize;
        let json =
            estargz::toc_json_from_member(&blob[off as usize..end], &estargz::Limits::default())
                .unwrap();
        let size = blob.len() as u64;
        let parsed = estargz::tests::read(&blob, &d).unwrap();
        keep_parsed_toc(&d, None, size, off, parsed);
        let unread = || -> Result<Vec<u8>, estargz::TocError> {
            panic!("the kept TOC is taken, not read from the store")
        };
        // Another blob size or offset is another layer: not this parse.
        let reads = std::cell::Cell::new(0);
        let read = || {
            reads.set(reads.get() + 1);
            Ok::<_, estargz::TocError>(json.clone())
        };
        let _ = mount_toc(read, &d, None, size + 1, off);
        let _ = mount_toc(read, &d, Some("1:2:3:1"), size, off);
        assert_eq!(reads.get(), 2, "another layer's mount parses its own");
        let toc = mount_toc(unread, &d, None, size, off).unwrap();
        assert_eq!(toc.entries.len(), 2);
        // Taken: the next mount reads and parses the store's copy.
        let again = mount_toc(read, &d, None, size, off).unwrap();
        assert_eq!(again.entries.len(), 2);
        assert_eq!(reads.get(), 3);
    }
}
