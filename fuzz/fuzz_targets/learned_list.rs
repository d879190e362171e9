//! Learned start-up prefetch lists (from the store or shared through a registry) on arbitrary
//! bytes: a validated list or an error, never a panic; a list that decodes encodes back to the
//! same list.
#![no_main]
use lazypull::learned::LearnedList;
use lazypull::oci::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let image = Digest::parse(&format!("sha256:{}", "e".repeat(64))).expect("a valid digest");
    if let Ok(list) = LearnedList::decode(bytes, &image) {
        assert!(list.files.len() <= lazypull::learned::MAX_FILES);
        let again = LearnedList::decode(&list.encode(), &image).expect("round trip");
        assert_eq!(again, list);
    }
});
