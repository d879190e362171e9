//! The namespace's answers without a kernel: a layer built in memory (eStargz), and one
//! streaming in whose stream failed.

use super::*;
use crate::access::reader::ReadOptions;
use crate::access::reader::seam_tests::served;
use crate::layer::estargz::tests::build;

struct Fixture {
    _dir: tempfile::TempDir,
    ns: Namespace,
    table: Arc<LayerTable>,
    layer: Arc<LazyLayer>,
    recorder: Arc<crate::fs::record::Recorder>,
}

const HEX: &str = "ab";

impl Fixture {
    /// A layer with `bin/sh`, an empty file, a directory, a symbolic link and an xattr.
    fn new() -> Fixture {
        let (blob, toc_digest) = build(&[("bin/sh", b"#!shell"), ("etc/empty", b"")], |toc| {
            let entries = toc["entries"].as_array_mut().unwrap();
            entries.push(
                serde_json::json!({"name": "etc/dir/", "type": "dir", "mode": 493,
                "xattrs": {"user.k": "dmFsdWU="}}),
            );
            entries.push(
                serde_json::json!({"name": "etc/link", "type": "symlink", "linkName": "../bin/sh"}),
            );
        });
        let opts = ReadOptions {
            timeout: Duration::from_secs(1),
            cache_bytes: 1 << 20,
            read_ahead: 0,
            neighbours: 0,
            dir_read_ahead: 0,
            region_read_ahead: 0,
            elf_read_ahead: false,
        };
        let s = served(blob, &toc_digest, opts);
        let (dir, layout, db, layer) = (s.dir, s.layout, s.db, s.layer);
        let table = LayerTable::new(layout.clone(), Arc::clone(&db), s.reader, Arc::default());
        table.insert_loaded(HEX, Arc::clone(&layer));
        let recorder = Arc::new(crate::fs::record::Recorder::default());
        let ns = Namespace::new(
            layout,
            db,
            Arc::clone(&table),
            Duration::from_millis(200),
            Arc::clone(&recorder),
        );
        Fixture {
            _dir: dir,
            ns,
            table,
            layer,
            recorder,
        }
    }

    /// The attributes of `path` in the layer, walking from its directory.
    fn walk(&self, path: &str) -> Result<Option<Attr>> {
        let mut at = self.ns.lookup(ROOT, HEX)?.unwrap();
        for name in path.split('/') {
            match self.ns.lookup(at.ino, name)? {
                Some(a) => at = a,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }
}

#[tokio::test]
async fn lookups_attributes_and_negative_answers() {
    let f = Fixture::new();
    let sh = f.walk("bin/sh").unwrap().unwrap();
    assert_eq!((sh.kind, sh.size, sh.perm), (NodeKind::Reg, 7, 0o644));
    assert_eq!(split(sh.ino).map(|(l, _)| l), Some(0));
    assert_eq!(f.ns.getattr(sh.ino).unwrap(), sh);
    // Inside a layer, a missing name is a (cacheable) negative answer ...
    assert_eq!(f.walk("bin/nope").unwrap(), None);
    // ... but at the root, a layer that is not mountable is an error, never cached.
    assert_eq!(f.ns.lookup(ROOT, "cd").unwrap_err(), FsError::NotFound);
    assert_eq!(f.ns.getattr(join(7, ROOT)).unwrap_err(), FsError::NotFound);
    let root = f.ns.getattr(ROOT).unwrap();
    assert_eq!((root.kind, root.nlink), (NodeKind::Dir, 3));
}

#[tokio::test]
async fn links_listings_and_extended_attributes() {
    let f = Fixture::new();
    let link = f.walk("etc/link").unwrap().unwrap();
    assert_eq!(f.ns.readlink(link.ino).unwrap(), "../bin/sh");
    let sh = f.walk("bin/sh").unwrap().unwrap();
    assert_eq!(f.ns.readlink(sh.ino).unwrap_err(), FsError::Invalid);
    let etc = f.walk("etc").unwrap().unwrap();
    let names: Vec<_> =
        f.ns.readdir(etc.ino, 0)
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.kind))
            .collect();
    assert_eq!(
        names,
        vec![
            ("dir".to_string(), NodeKind::Dir),
            ("empty".to_string(), NodeKind::Reg),
            ("link".to_string(), NodeKind::Symlink)
        ]
    );
    assert_eq!(f.ns.readdir(sh.ino, 0).unwrap_err(), FsError::NotDir);
    let dir = f.walk("etc/dir").unwrap().unwrap();
    assert_eq!(f.ns.getxattr(dir.ino, b"user.k").unwrap(), b"value");
    assert_eq!(
        f.ns.getxattr(dir.ino, b"user.z").unwrap_err(),
        FsError::NoAttr
    );
    assert_eq!(f.ns.listxattr(dir.ino).unwrap(), b"user.k\0");
    assert_eq!(f.ns.listxattr(ROOT).unwrap(), b"");
    assert_eq!(FsError::NoAttr.errno(), nix::libc::ENODATA);
}

#[tokio::test]
async fn opens_are_read_only_and_recorded() {
    let f = Fixture::new();
    // The recorder names layers by their digest (the table's name is the test's own).
    let hex = f.layer.digest.hex().to_string();
    let session = f.recorder.start([hex.clone()]);
    let sh = f.walk("bin/sh").unwrap().unwrap();
    assert_eq!(f.ns.open(sh.ino, true).err(), Some(FsError::ReadOnly));
    let etc = f.walk("etc").unwrap().unwrap();
    assert_eq!(f.ns.open(etc.ino, false).err(), Some(FsError::Invalid));
    assert!(matches!(f.ns.open(sh.ino, false), Ok(OpenTarget::Chunks)));
    let (layer, entry) = f.ns.content(sh.ino).unwrap().unwrap();
    assert!(Arc::ptr_eq(&layer, &f.layer));
    assert_eq!(layer.toc.entries[entry].path, "bin/sh");
    assert_eq!(f.ns.content(ROOT).err(), Some(FsError::IsDir));
    let files = f.recorder.stop(session).unwrap();
    assert_eq!(files, vec![(hex, "bin/sh".to_string())]);
}

#[tokio::test]
async fn a_lookup_in_a_layer_whose_stream_failed_is_an_io_error() {
    let f = Fixture::new();
    let digest = crate::oci::Digest::of(b"streaming");
    let streams = crate::fs::stream::Streams::default();
    let stream = streams.begin(&digest);
    let layer = Arc::new(LazyLayer::streaming(
        digest,
        "r/x".into(),
        1,
        Arc::clone(&stream),
    ));
    let idx = f.table.insert_loaded("cd", layer);
    stream.finish(Err("the registry went away".into()));
    let err = f.ns.lookup(join(idx, ROOT), "usr").unwrap_err();
    assert_eq!((err, err.errno()), (FsError::Stream, nix::libc::EIO));
}
