//! The eStargz TOC path on arbitrary input: the TOC member (gzip + tar) and, separately, TOC
//! JSON validated against a blob of arbitrary size (the digest is the input's own, so the
//! parser, not the digest check, sees every input).
#![no_main]
use lazypull::layer::estargz::{self, Limits};
use lazypull::oci::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_toc_compressed: 1 << 20,
        max_toc_json: 4 << 20,
        max_entries: 10_000,
    };
    let _ = estargz::toc_json_from_member(data, &limits);
    if data.len() < 16 {
        return;
    }
    let (sizes, json) = data.split_at(16);
    let blob = u64::from_le_bytes(sizes[..8].try_into().unwrap_or_default());
    let toc_offset = u64::from_le_bytes(sizes[8..].try_into().unwrap_or_default());
    if let Ok(toc) = estargz::parse_toc(json, &Digest::of(json), blob, toc_offset, &limits) {
        // A TOC that parsed is internally consistent: every chunk's compressed span is
        // non-empty and lies in the layer's data, before the TOC, inside the blob.
        let spans = lazypull::layer::index::Spans::new(&toc);
        assert!(toc.toc_offset < blob);
        for e in &toc.entries {
            for c in &e.chunks {
                let (s, end) = spans.span(c);
                assert!(
                    s < end && end <= toc.toc_offset,
                    "{s}..{end} {}",
                    toc.toc_offset
                );
            }
        }
    }
});
