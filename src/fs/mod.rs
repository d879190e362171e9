//! The layer filesystem: a pure inode tree built from a layer's entries (`tree.rs`); the FUSE
//! adapter that serves it comes next.

pub mod fuse;
pub mod tree;
