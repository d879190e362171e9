//! An inode tree for one layer, built from its TOC entries, in the form overlayfs expects of a
//! lower layer: whiteouts (`.wh.NAME`) become character devices 0/0 named NAME, opaque markers
//! (`.wh..wh..opq`) become `trusted.overlay.opaque=y` on their directory, hardlinks share an
//! inode, missing parent directories are implied, later entries replace earlier ones (tar
//! semantics), and eStargz landmark files are hidden. Pure: no I/O.

use crate::layer::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
use crate::layer::index::{Entry, Kind};
use std::collections::BTreeMap;

pub const ROOT: u64 = 1;
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    Reg,
    Symlink,
    Char,
    Block,
    Fifo,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub kind: NodeKind,
    /// Permission bits (and setuid/setgid/sticky), without the file type.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub rdev: (u32, u32),
    pub link: String,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub nlink: u32,
    /// Index of the entry holding a regular file's content.
    pub entry: Option<usize>,
    /// Directory children by name.
    pub children: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("{path:?}: {reason}")]
    Conflict { path: String, reason: String },
}

#[derive(Debug, Default)]
pub struct Tree {
    nodes: Vec<Node>,
}

fn mtime_of(s: Option<&str>) -> i64 {
    s.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp())
        .unwrap_or(0)
}

fn dir_node(ino: u64, parent: u64) -> Node {
    Node {
        ino,
        parent,
        kind: NodeKind::Dir,
        perm: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 0,
        rdev: (0, 0),
        link: String::new(),
        xattrs: vec![],
        nlink: 2,
        entry: None,
        children: BTreeMap::new(),
    }
}

impl Tree {
    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        ino.checked_sub(1)
            .and_then(|i| self.nodes.get_mut(i as usize))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        self.get(parent)
            .and_then(|p| p.children.get(name))
            .and_then(|&i| self.get(i))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Resolve a slash-separated path from the root (for tests and tools).
    pub fn resolve(&self, path: &str) -> Option<&Node> {
        let mut cur = self.get(ROOT)?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            cur = self.lookup(cur.ino, part)?;
        }
        Some(cur)
    }

    /// Resolve a path from the root as a process in the image would, following symlinks in
    /// any component (absolute targets from this tree's root, relative ones from their
    /// directory; `..` stops at the root), at most 40 of them (Linux's limit). `None` when a
    /// component is missing in this tree (it may be in another layer).
    pub fn resolve_following(&self, path: &str) -> Option<&Node> {
        let mut todo: Vec<String> = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .rev()
            .map(str::to_string)
            .collect();
        let mut cur = self.get(ROOT)?;
        let mut hops = 0;
        while let Some(part) = todo.pop() {
            if part == ".." {
                cur = self.get(cur.parent).unwrap_or(cur);
                continue;
            }
            let next = self.lookup(cur.ino, &part)?;
            if next.kind != NodeKind::Symlink {
                cur = next;
                continue;
            }
            hops += 1;
            if hops > 40 || next.link.len() > 4096 {
                return None;
            }
            if next.link.starts_with('/') {
                cur = self.get(ROOT)?;
            }
            todo.extend(
                next.link
                    .split('/')
                    .filter(|p| !p.is_empty() && *p != ".")
                    .rev()
                    .map(str::to_string),
            );
        }
        Some(cur)
    }

    fn push(&mut self, mut n: Node) -> u64 {
        n.ino = self.nodes.len() as u64 + 1;
        let ino = n.ino;
        self.nodes.push(n);
        ino
    }

    /// The directory at `parts`, creating implied directories on the way.
    fn ensure_dir(&mut self, parts: &[&str]) -> Result<u64, TreeError> {
        let mut cur = ROOT;
        for (i, part) in parts.iter().enumerate() {
            let existing = self.get(cur).and_then(|n| n.children.get(*part).copied());
            cur = match existing {
                Some(ino) => {
                    if self.get(ino).map(|n| n.kind) != Some(NodeKind::Dir) {
                        return Err(TreeError::Conflict {
                            path: parts[..=i].join("/"),
                            reason: "a parent is not a directory".into(),
                        });
                    }
                    ino
                }
                None => {
                    let ino = self.push(dir_node(0, cur));
                    self.attach(cur, part, ino);
                    ino
                }
            };
        }
        Ok(cur)
    }

    fn attach(&mut self, parent: u64, name: &str, ino: u64) {
        let is_dir = self.get(ino).is_some_and(|n| n.kind == NodeKind::Dir);
        if let Some(p) = self.get_mut(parent) {
            p.children.insert(name.to_string(), ino);
            if is_dir {
                p.nlink += 1;
            }
        }
    }

    /// Remove `name` from `parent` (a later entry replaces it).
    fn detach(&mut self, parent: u64, name: &str) {
        let Some(ino) = self.get_mut(parent).and_then(|p| p.children.remove(name)) else {
            return;
        };
        let is_dir = match self.get_mut(ino) {
            Some(n) => {
                n.nlink = n.nlink.saturating_sub(1);
                n.kind == NodeKind::Dir
            }
            None => false,
        };
        if is_dir && let Some(p) = self.get_mut(parent) {
            p.nlink = p.nlink.saturating_sub(1);
        }
    }

    pub fn from_entries(entries: &[Entry]) -> Result<Tree, TreeError> {
        let mut t = Tree::new();
        for (idx, e) in entries.iter().enumerate() {
            t.add(idx, e)?;
        }
        Ok(t)
    }

    /// A tree with only its root: entries are added one by one (a layer streaming in). Inode
    /// numbers are given in the order nodes appear, so a tree built entry by entry numbers its
    /// nodes exactly as [`Tree::from_entries`] does over the same entries.
    pub fn new() -> Tree {
        let mut t = Tree::default();
        t.push(dir_node(0, ROOT));
        t
    }

    /// The slash-separated path of `ino` from the root (a directory, or a file's first name).
    pub fn path_of(&self, ino: u64) -> Option<String> {
        let mut parts = vec![];
        let mut cur = ino;
        while cur != ROOT {
            let node = self.get(cur)?;
            let parent = self.get(node.parent)?;
            let name = parent
                .children
                .iter()
                .find(|(_, i)| **i == cur)
                .map(|(n, _)| n.as_str())?;
            parts.push(name);
            cur = node.parent;
        }
        parts.reverse();
        Some(parts.join("/"))
    }

    /// Add entry `idx` of the layer (tar semantics: a later entry replaces an earlier one).
    pub fn add(&mut self, idx: usize, e: &Entry) -> Result<(), TreeError> {
        let t = self;
        if e.path.is_empty() {
            // Attributes of the root itself.
            if let Some(root) = t.get_mut(ROOT) {
                root.perm = e.mode & 0o7777;
                root.uid = e.uid;
                root.gid = e.gid;
                root.mtime = mtime_of(e.mtime.as_deref());
                root.xattrs = e.xattrs.clone();
            }
            return Ok(());
        }
        if e.path == PREFETCH_LANDMARK || e.path == NO_PREFETCH_LANDMARK {
            return Ok(());
        }
        let parts: Vec<&str> = e.path.split('/').collect();
        let (name, dirs) = parts.split_last().unwrap_or((&"", &[]));
        let parent = t.ensure_dir(dirs)?;
        if *name == OPAQUE_MARKER {
            if let Some(p) = t.get_mut(parent) {
                p.xattrs.retain(|(k, _)| k != OPAQUE_XATTR);
                p.xattrs.push((OPAQUE_XATTR.to_string(), b"y".to_vec()));
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            t.detach(parent, hidden);
            let mut n = dir_node(0, parent);
            n.kind = NodeKind::Char;
            n.perm = 0;
            n.nlink = 1;
            n.mtime = mtime_of(e.mtime.as_deref());
            let ino = t.push(n);
            t.attach(parent, hidden, ino);
            return Ok(());
        }
        if e.kind == Kind::Hardlink {
            let target = t
                .resolve(&e.link)
                .map(|n| n.ino)
                .ok_or_else(|| TreeError::Conflict {
                    path: e.path.clone(),
                    reason: format!("hardlink target {:?} missing", e.link),
                })?;
            t.detach(parent, name);
            if let Some(n) = t.get_mut(target) {
                n.nlink += 1;
            }
            t.attach(parent, name, target);
            return Ok(());
        }
        let kind = match e.kind {
            Kind::Dir => NodeKind::Dir,
            Kind::Reg => NodeKind::Reg,
            Kind::Symlink => NodeKind::Symlink,
            Kind::Char => NodeKind::Char,
            Kind::Block => NodeKind::Block,
            Kind::Fifo => NodeKind::Fifo,
            // Handled above; kept total without a panic.
            Kind::Hardlink => return Ok(()),
        };
        let existing = t.get(parent).and_then(|p| p.children.get(*name).copied());
        // A directory entry for an implied or earlier directory updates it in place.
        if kind == NodeKind::Dir
            && let Some(ino) = existing
            && t.get(ino).is_some_and(|n| n.kind == NodeKind::Dir)
        {
            if let Some(n) = t.get_mut(ino) {
                n.perm = e.mode & 0o7777;
                n.uid = e.uid;
                n.gid = e.gid;
                n.mtime = mtime_of(e.mtime.as_deref());
                n.xattrs = e.xattrs.clone();
            }
            return Ok(());
        }
        t.detach(parent, name);
        let mut n = dir_node(0, parent);
        n.kind = kind;
        n.perm = e.mode & 0o7777;
        n.uid = e.uid;
        n.gid = e.gid;
        n.mtime = mtime_of(e.mtime.as_deref());
        n.xattrs = e.xattrs.clone();
        n.nlink = if kind == NodeKind::Dir { 2 } else { 1 };
        match kind {
            NodeKind::Reg => {
                n.size = e.size;
                n.entry = Some(idx);
            }
            NodeKind::Symlink => {
                n.size = e.link.len() as u64;
                n.link = e.link.clone();
            }
            NodeKind::Char | NodeKind::Block => n.rdev = (e.dev_major, e.dev_minor),
            _ => {}
        }
        let ino = t.push(n);
        t.attach(parent, name, ino);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            size: 0,
            mode: if kind == Kind::Dir { 0o750 } else { 0o640 },
            uid: 7,
            gid: 8,
            mtime: Some("2024-01-01T00:00:00Z".into()),
            link: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: vec![],
            digest: None,
            chunks: vec![],
        }
    }

    #[test]
    fn paths_resolve_through_symlinks_like_a_loader_sees_them() {
        let sym = |path: &str, to: &str| {
            let mut e = entry(path, Kind::Symlink);
            e.link = to.into();
            e
        };
        let mut lib = entry("usr/lib/x86_64-linux-gnu/libz.so.1.2.13", Kind::Reg);
        lib.size = 5;
        let entries = vec![
            lib,
            sym("lib", "usr/lib"),
            sym("usr/lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.2.13"),
            sym(
                "usr/lib/x86_64-linux-gnu/abs",
                "/lib/x86_64-linux-gnu/libz.so.1",
            ),
            sym(
                "usr/lib/x86_64-linux-gnu/up",
                "../x86_64-linux-gnu/../../../../lib/x86_64-linux-gnu/libz.so.1",
            ),
            sym("loop", "loop"),
        ];
        let t = Tree::from_entries(&entries).unwrap();
        let real = t
            .resolve("usr/lib/x86_64-linux-gnu/libz.so.1.2.13")
            .unwrap()
            .ino;
        for p in [
            "lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/abs",
            "usr/lib/./x86_64-linux-gnu/up",
        ] {
            assert_eq!(t.resolve_following(p).map(|n| n.ino), Some(real), "{p}");
        }
        assert!(t.resolve_following("loop").is_none(), "a loop ends");
        assert!(
            t.resolve_following("lib/x86_64-linux-gnu/libc.so.6")
                .is_none()
        );
    }

    #[test]
    fn builds_overlay_lower_layer() {
        let mut link = entry("etc/hard", Kind::Hardlink);
        link.link = "etc/passwd".into();
        let mut sym = entry("bin/sh", Kind::Symlink);
        sym.link = "busybox".into();
        let mut file = entry("etc/passwd", Kind::Reg);
        file.size = 42;
        let entries = vec![
            file,
            link,
            sym,
            entry("etc", Kind::Dir),
            entry("data/.wh.old.txt", Kind::Reg),
            entry("opaque/.wh..wh..opq", Kind::Reg),
            entry(".prefetch.landmark", Kind::Reg),
        ];
        let t = Tree::from_entries(&entries).unwrap();
        let etc = t.resolve("etc").unwrap();
        assert_eq!(
            (etc.kind, etc.perm, etc.uid),
            (NodeKind::Dir, 0o750, 7),
            "explicit dir entry updates the implied one"
        );
        let passwd = t.resolve("etc/passwd").unwrap();
        assert_eq!((passwd.size, passwd.nlink, passwd.entry), (42, 2, Some(0)));
        assert_eq!(
            t.resolve("etc/hard").unwrap().ino,
            passwd.ino,
            "hardlink shares the inode"
        );
        assert_eq!(t.resolve("bin/sh").unwrap().link, "busybox");
        assert_eq!(t.resolve("bin").unwrap().perm, 0o755, "implied parent");
        let wh = t.resolve("data/old.txt").unwrap();
        assert_eq!(
            (wh.kind, wh.rdev),
            (NodeKind::Char, (0, 0)),
            "whiteout as char device 0/0"
        );
        assert!(t.resolve("data/.wh.old.txt").is_none());
        let op = t.resolve("opaque").unwrap();
        assert!(
            op.xattrs
                .contains(&(OPAQUE_XATTR.to_string(), b"y".to_vec()))
        );
        assert!(op.children.is_empty());
        assert!(
            t.resolve(".prefetch.landmark").is_none(),
            "landmarks hidden"
        );
        assert_eq!(
            t.get(ROOT).unwrap().nlink,
            2 + 4,
            "root links: . .. and 4 subdirs"
        );
        assert_eq!(t.resolve("etc").unwrap().mtime, 1704067200);
    }

    #[test]
    fn later_entries_replace_earlier_and_conflicts_are_errors() {
        let mut a = entry("f", Kind::Reg);
        a.size = 1;
        let mut b = entry("f", Kind::Reg);
        b.size = 2;
        let t = Tree::from_entries(&[a, b]).unwrap();
        assert_eq!(t.resolve("f").unwrap().size, 2);
        assert_eq!(t.get(ROOT).unwrap().children.len(), 1);
        // A file used as a directory.
        let err =
            Tree::from_entries(&[entry("f", Kind::Reg), entry("f/g", Kind::Reg)]).unwrap_err();
        assert!(matches!(err, TreeError::Conflict { .. }));
        let mut dangling = entry("h", Kind::Hardlink);
        dangling.link = "nowhere".into();
        assert!(Tree::from_entries(&[dangling]).is_err());
    }
}
