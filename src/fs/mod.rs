//! The layer filesystem: a pure inode tree built from a layer's entries (`tree.rs`), the read
//! path from a file range to verified bytes (`reader.rs`), and the FUSE adapter (`fuse.rs`, the
//! only file that knows fuser).

pub mod elf;
pub mod fuse;
pub mod handover;
pub mod layers;
pub mod reader;
pub mod record;
pub mod siblings;
pub mod stream;
pub mod tree;
