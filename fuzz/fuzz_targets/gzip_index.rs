//! Random-access indexes of plain gzip layers (from the store or shared through a registry) on
//! arbitrary bytes: validated entries and checkpoints or an error, never a panic; an index that
//! decodes encodes to bytes that decode to the same index; resuming at a decoded checkpoint on
//! arbitrary compressed bytes is an error or bounded output, never a panic.
#![no_main]
use lazypull::layer::gzindex;
use lazypull::layer::tar::{Limits, decode_index_with, encode_index_with};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let limits = Limits::default();
    let Ok((entries, ra)) = decode_index_with(bytes, &limits) else {
        return;
    };
    let once = encode_index_with(&entries, ra.as_ref());
    let (entries2, ra2) = decode_index_with(&once, &limits).expect("round trip");
    assert_eq!(encode_index_with(&entries2, ra2.as_ref()), once);
    if let Some(ra) = ra {
        for p in ra.points.iter().take(4) {
            let tail = &bytes[bytes.len().saturating_sub(4096)..];
            if let Ok(out) = gzindex::decode_at(tail, p, None, 0, 1000) {
                assert!(out.len() <= 1000);
            }
        }
    }
});
