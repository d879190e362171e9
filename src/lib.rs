//! lazypull: lazy-loading container image service (library; the `lazypull` binary is a thin CLI).
//! See docs/architecture.md for the architecture: layers of the code, the store, and how a
//! pull, a lazy read, start-up prefetch and a snapshot flow through the modules.

pub mod access;
pub mod artifact;
pub mod cli;
pub mod commands;
pub mod config;
pub mod convert;
pub mod cri;
pub mod daemon;
pub mod fetch;
pub mod fs;
pub mod http;
pub mod images;
pub mod import;
pub mod index_share;
pub mod layer;
pub mod learned;
pub mod listing;
pub mod metrics;
pub mod oci;
pub mod registry;
pub mod rpc;
pub mod snapshot;
pub mod store;
pub mod telemetry;
