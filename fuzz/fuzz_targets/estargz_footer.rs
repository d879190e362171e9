//! The eStargz footer parser on arbitrary blob tails: an offset or an error, never a panic.
#![no_main]
use lazypull::layer::estargz;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|tail: &[u8]| {
    let _ = estargz::parse_footer(tail);
    let _ = estargz::footer_size(tail);
});
