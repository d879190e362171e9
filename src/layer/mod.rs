//! Layer readers (pure, fuzzable): formats that allow reading a layer without fetching it whole.

pub mod estargz;
