//! The layer filesystem: a pure inode tree built from a layer's entries (`tree.rs`), the
//! layer table (`layers.rs`; the read path from a file range to verified bytes is
//! `crate::access::reader`), the filesystem's answers without a
//! kernel (`ops.rs`), the FUSE adapter (`fuse.rs`, with `mount.rs` the only files that know
//! fuser) and the mount's lifecycle (`mount.rs`).

pub mod fuse;
pub mod handles;
pub mod handover;
pub mod layers;
pub mod mount;
pub mod ops;
pub mod record;
pub mod stream;
pub mod tree;
