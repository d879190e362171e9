//! The zstd:chunked TOC path on arbitrary input: the position annotation, then a TOC frame
//! checked against its own checksum, decompressed (bounded) and validated against a blob of
//! arbitrary size. Input layout: `POSITION\nMODE BLOB_SIZE(8) FRAME`; MODE odd compresses FRAME
//! first, so the JSON validation sees arbitrary text rather than only invalid zstd.
#![no_main]
use lazypull::layer::estargz::{self, Limits};
use lazypull::layer::zstd_chunked::{self, Position};
use lazypull::oci::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (position, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let parsed = std::str::from_utf8(position)
        .ok()
        .and_then(|s| Position::parse(s).ok());
    if let Some(p) = &parsed {
        // What every caller relies on.
        assert!(p.offset.checked_add(p.length).is_some());
    }
    if rest.len() < 9 {
        return;
    }
    let mode = rest[0];
    let blob = u64::from_le_bytes(rest[1..9].try_into().unwrap_or_default());
    let raw = &rest[9..];
    let compressed;
    let (frame, uncompressed) = if mode % 2 == 1 {
        compressed = match zstd::bulk::compress(raw, 1) {
            Ok(c) => c,
            Err(_) => return,
        };
        (&compressed[..], raw.len() as u64)
    } else {
        (raw, u64::from(mode) << 12)
    };
    let pos = parsed.unwrap_or(Position {
        offset: 8,
        length: frame.len().max(1) as u64,
        uncompressed,
    });
    let limits = Limits {
        max_toc_compressed: 1 << 20,
        max_toc_json: 4 << 20,
        max_entries: 10_000,
    };
    if let Ok(toc) = zstd_chunked::parse_toc(frame, &Digest::of(frame), &pos, blob, &limits) {
        // Every chunk's compressed span is non-empty and lies before the TOC, inside the blob.
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
