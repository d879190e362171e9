//! Layer readers (pure, fuzzable): formats that allow reading a layer without fetching it whole
//! (`estargz`), and the unpacker that serves complete layers from the file cache (`tar`).

pub mod estargz;
pub mod tar;
