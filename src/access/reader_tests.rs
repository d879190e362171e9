//! The read path against an in-memory registry (`registry::seam::fake`): single flight,
//! verification, faults, and the read-ahead guesses (directories, ELF dependencies), without
//! a network, FUSE or a kernel.

use super::*;
use crate::layer::estargz::tests::{build, read as read_toc};
use crate::registry::seam::fake::{FakeBlobs, Fault, noise};

const SOURCE: &str = "registry.test/repo";

struct Fixture {
    _dir: tempfile::TempDir,
    reader: Arc<Reader>,
    fake: Arc<FakeBlobs>,
    layer: Arc<LazyLayer>,
}

/// An eStargz layer served by a fake registry and mounted lazily: a store in a temp dir, a
/// reader over the fake, and the loaded layer (shared with the namespace's tests).
pub(crate) struct Served {
    pub dir: tempfile::TempDir,
    pub layout: Layout,
    pub db: Arc<Mutex<Catalogue>>,
    pub fake: Arc<FakeBlobs>,
    pub reader: Arc<Reader>,
    pub layer: Arc<LazyLayer>,
}

/// Serve `blob` (eStargz, its TOC digest `toc_digest`) from a fake registry.
pub(crate) fn served(blob: Vec<u8>, toc_digest: &Digest, opts: ReadOptions) -> Served {
    let toc = read_toc(&blob, toc_digest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.create().unwrap();
    let db = Arc::new(Mutex::new(
        Catalogue::open(&dir.path().join("catalogue.db")).unwrap(),
    ));
    let fake = Arc::new(FakeBlobs::default());
    let size = blob.len() as u64;
    let digest = fake.add(blob);
    let partials = Partials::new(layout.clone());
    partials.open(&digest, size, 0).unwrap();
    let access = crate::access::Access::new(fake.clone(), Default::default());
    let reader = Reader::new(layout.clone(), Arc::clone(&db), access, partials, opts);
    let tree = Tree::from_entries(&toc.entries).unwrap();
    let layer = Arc::new(LazyLayer::new(digest, SOURCE.into(), size, toc, tree));
    Served {
        dir,
        layout,
        db,
        fake,
        reader,
        layer,
    }
}

impl Fixture {
    /// A layer of `files` (name, content, mode) served by a fake registry, mounted lazily.
    fn new(files: &[(&str, Vec<u8>, u32)], opts: ReadOptions) -> Fixture {
        let named: Vec<(&str, &[u8])> = files.iter().map(|(n, c, _)| (*n, &c[..])).collect();
        let (blob, toc_digest) = build(&named, |toc| {
            for e in toc["entries"].as_array_mut().unwrap() {
                let name = e["name"].as_str().unwrap().to_string();
                let mode = files.iter().find(|f| f.0 == name).unwrap().2;
                e["mode"] = mode.into();
            }
        });
        let s = served(blob, &toc_digest, opts);
        Fixture {
            _dir: s.dir,
            reader: s.reader,
            fake: s.fake,
            layer: s.layer,
        }
    }

    fn entry(&self, path: &str) -> usize {
        self.layer
            .toc
            .entries
            .iter()
            .position(|e| e.path == path)
            .unwrap()
    }

    /// The compressed span of `path`'s (one) chunk.
    fn span(&self, path: &str) -> (u64, u64) {
        let e = &self.layer.toc.entries[self.entry(path)];
        self.layer.spans.span(&e.chunks[0])
    }

    async fn read(&self, path: &str) -> Result<Vec<u8>, ReadError> {
        let e = self.entry(path);
        let size = self.layer.toc.entries[e].size as u32;
        self.reader.read(&self.layer, e, 0, size).await
    }

    /// Wait (bounded) until reading `paths` sends no request: they are local. Panics if they
    /// never are.
    async fn wait_local(&self, paths: &[&str]) {
        for _ in 0..500 {
            let n = self.fake.requests().len();
            for p in paths {
                self.read(p).await.unwrap();
            }
            if self.fake.requests().len() == n {
                return;
            }
        }
        panic!("{paths:?} never became local");
    }

    /// Wait (bounded) until a request has touched `path`'s bytes.
    async fn wait_requested(&self, path: &str) -> bool {
        let (s, e) = self.span(path);
        for _ in 0..500 {
            if self.fake.requests_touching(s, e) > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

fn opts() -> ReadOptions {
    ReadOptions {
        timeout: Duration::from_secs(10),
        cache_bytes: 64 << 20,
        read_ahead: 1 << 20,
        neighbours: 0,
        dir_read_ahead: 0,
        region_read_ahead: 0,
        elf_read_ahead: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_fetched_verified_and_then_served_locally() {
    let f = Fixture::new(
        &[
            ("a.txt", noise(5000, 1), 0o644),
            ("b.txt", noise(7000, 2), 0o644),
        ],
        opts(),
    );
    assert_eq!(f.read("a.txt").await.unwrap(), noise(5000, 1));
    let (s, e) = f.span("a.txt");
    assert_eq!(f.fake.requests_touching(s, e), 1);
    assert_eq!(f.read("a.txt").await.unwrap(), noise(5000, 1));
    assert_eq!(f.fake.requests().len(), 1, "the second read is local");
    assert_eq!(f.read("b.txt").await.unwrap(), noise(7000, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_one_chunk_send_one_request() {
    let f = Arc::new(Fixture::new(&[("a", noise(100_000, 3), 0o644)], opts()));
    f.fake.inject(Fault::Delay(Duration::from_millis(100)));
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move { f.read("a").await })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap().unwrap(), noise(100_000, 3));
    }
    assert_eq!(f.fake.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_bytes_are_never_served_and_a_later_read_recovers() {
    for fault in [Fault::Corrupt, Fault::Truncate(1000), Fault::Error] {
        let f = Fixture::new(&[("a", noise(50_000, 4), 0o644)], opts());
        f.fake.inject(fault.clone());
        let e = f.read("a").await.unwrap_err();
        assert_eq!(e.errno(), nix::libc::EIO, "{fault:?}: {e}");
        // A failed load is remembered briefly (the kernel retries at once); then a read
        // goes to the registry again, and works.
        let mut ok = None;
        for _ in 0..100 {
            match f.read("a").await {
                Ok(d) => {
                    ok = Some(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert_eq!(ok.as_deref(), Some(&noise(50_000, 4)[..]), "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_registry_fails_the_read_within_its_timeout() {
    let mut o = opts();
    o.timeout = Duration::from_millis(300);
    let f = Fixture::new(&[("a", noise(50_000, 5), 0o644)], o);
    f.fake.inject(Fault::Stall);
    let started = Instant::now();
    let e = f.read("a").await.unwrap_err();
    assert!(matches!(e, ReadError::Timeout(_)), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directorys_second_miss_fetches_its_other_files() {
    let mut o = opts();
    o.dir_read_ahead = 1 << 20;
    let f = Fixture::new(
        &[
            ("pkg/a", noise(20_000, 6), 0o644),
            ("other/big", noise(300_000, 7), 0o644),
            ("pkg/b", noise(20_000, 8), 0o644),
            ("pkg/c", noise(20_000, 9), 0o644),
            ("pkg/d", noise(20_000, 10), 0o644),
        ],
        o,
    );
    f.read("pkg/c").await.unwrap();
    assert_eq!(f.fake.requests().len(), 1, "one miss: no guess yet");
    f.read("pkg/a").await.unwrap();
    for p in ["pkg/b", "pkg/d"] {
        assert!(f.wait_requested(p).await, "{p} read ahead");
    }
    let (s, e) = f.span("other/big");
    assert_eq!(f.fake.requests_touching(s, e), 0, "another directory");
    // Once the read-ahead is in, the directory's files are local.
    f.wait_local(&["pkg/b", "pkg/d"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_of_three_files_of_a_kind_close_together_fetch_the_others_of_that_kind_around() {
    let mut o = opts();
    o.region_read_ahead = 16 << 20;
    let f = Fixture::new(
        &[
            ("lib/a/x.pyc", noise(20_000, 21), 0o644),
            ("lib/a/x.py", noise(20_000, 22), 0o644),
            ("lib/b/y.pyc", noise(20_000, 23), 0o644),
            ("lib/c/z.pyc", noise(20_000, 24), 0o644),
            ("lib/d/w.pyc", noise(20_000, 25), 0o644),
            ("bin/tool", noise(20_000, 26), 0o755),
            ("lib/e/v.pyc", noise(20_000, 27), 0o644),
            ("other/u.pyc", noise(20_000, 28), 0o644),
        ],
        o,
    );
    // Files without a kind (no extension) do not count.
    f.read("bin/tool").await.unwrap();
    f.read("lib/a/x.pyc").await.unwrap();
    f.read("lib/c/z.pyc").await.unwrap();
    assert_eq!(f.fake.requests().len(), 3, "two of a kind: no guess yet");
    f.read("lib/e/v.pyc").await.unwrap();
    for p in ["lib/b/y.pyc", "lib/d/w.pyc"] {
        assert!(f.wait_requested(p).await, "{p} read ahead");
    }
    for p in ["lib/a/x.py", "other/u.pyc"] {
        let (s, e) = f.span(p);
        assert_eq!(
            f.fake.requests_touching(s, e),
            0,
            "{p}: another kind, or outside the misses' directory"
        );
    }
    // Once in, those files are local.
    f.wait_local(&["lib/b/y.pyc", "lib/d/w.pyc"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guided_layer_gets_no_directory_guesses() {
    let mut o = opts();
    o.dir_read_ahead = 1 << 20;
    let f = Fixture::new(
        &[
            ("pkg/a", noise(20_000, 11), 0o644),
            ("pkg/b", noise(20_000, 12), 0o644),
            ("pkg/c", noise(20_000, 13), 0o644),
        ],
        o,
    );
    f.layer.guide();
    f.read("pkg/a").await.unwrap();
    f.read("pkg/c").await.unwrap();
    // Give a wrongly spawned read-ahead every chance to show up: a read that waits for a
    // delayed answer takes longer than the read-ahead's start.
    f.fake.inject(Fault::Delay(Duration::from_millis(200)));
    f.read("pkg/b").await.unwrap();
    let (s, e) = f.span("pkg/b");
    assert_eq!(
        f.fake.requests_touching(s, e),
        1,
        "only the read's own request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executables_first_read_fetches_its_interpreter_and_libraries() {
    // This test binary is a dynamically linked ELF file that needs libc: its first MiB holds
    // the headers and the names.
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let prog = exe[..exe.len().min(1 << 20)].to_vec();
    let deps = crate::access::elf::deps(&prog).unwrap();
    let interp = deps.interp.clone().unwrap();
    let mut o = opts();
    o.elf_read_ahead = true;
    let files = vec![
        ("usr/bin/prog", prog.clone(), 0o755),
        ("data/unrelated", noise(50_000, 14), 0o644),
        ("lib/x86_64-linux-gnu/libc.so.6", noise(40_000, 15), 0o755),
        (interp.trim_start_matches('/'), noise(30_000, 16), 0o755),
    ];
    let f = Fixture::new(&files, o);
    // The loader reads the first page.
    let e = f.entry("usr/bin/prog");
    f.reader.read(&f.layer, e, 0, 4096).await.unwrap();
    assert!(
        f.wait_requested("lib/x86_64-linux-gnu/libc.so.6").await,
        "libc read ahead ({deps:?})"
    );
    assert!(
        f.wait_requested(interp.trim_start_matches('/')).await,
        "{interp}"
    );
    let (s, e) = f.span("data/unrelated");
    assert_eq!(f.fake.requests_touching(s, e), 0);
    // Off: nothing but the read itself.
    let f = Fixture::new(&files, opts());
    let e = f.entry("usr/bin/prog");
    f.reader.read(&f.layer, e, 0, 4096).await.unwrap();
    f.fake.inject(Fault::Delay(Duration::from_millis(200)));
    f.read("data/unrelated").await.unwrap();
    let (s, e) = f.span("lib/x86_64-linux-gnu/libc.so.6");
    assert_eq!(f.fake.requests_touching(s, e), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_interpreters_first_read_fetches_its_start_files_after_itself() {
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let prog = exe[..exe.len().min(1 << 20)].to_vec();
    let mut o = opts();
    o.elf_read_ahead = true;
    let start = [
        "usr/lib/locale/C.utf8/LC_CTYPE",
        "etc/localtime",
        "usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
        "usr/lib/python3.11/encodings/__pycache__/utf_8.cpython-311.pyc",
        "usr/lib/python3.11/__pycache__/sitecustomize.cpython-311.pyc",
    ];
    let mut files = vec![
        ("usr/bin/python3.11", prog.clone(), 0o755),
        (
            "usr/lib/python3.11/__pycache__/json.cpython-311.pyc",
            noise(20_000, 20),
            0o644,
        ),
    ];
    for (i, p) in start.iter().enumerate() {
        files.push((p, noise(10_000 + i * 1000, 21 + i as u64), 0o644));
    }
    let f = Fixture::new(&files, o);
    let e = f.entry("usr/bin/python3.11");
    f.reader.read(&f.layer, e, 0, 4096).await.unwrap();
    for p in start {
        assert!(f.wait_requested(p).await, "{p} read ahead");
    }
    // After the interpreter's own bytes, not beside them.
    let (s, _) = f.span("usr/bin/python3.11");
    let first = f
        .fake
        .requests()
        .iter()
        .position(|r| r.1 <= s && s < r.2)
        .unwrap();
    let (ls, le) = f.span(start[0]);
    let locale = f
        .fake
        .requests()
        .iter()
        .position(|r| r.1 < le && ls < r.2)
        .unwrap();
    assert!(first < locale);
    // Not what the start does not read.
    let (s, e) = f.span("usr/lib/python3.11/__pycache__/json.cpython-311.pyc");
    assert_eq!(f.fake.requests_touching(s, e), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_every_container_start_reads_is_fetched_at_mount() {
    let files = [
        ("etc/passwd", noise(2000, 30), 0o644),
        ("etc/group", noise(1000, 31), 0o644),
        ("etc/ld.so.cache", noise(20_000, 32), 0o644),
        ("etc/other", noise(20_000, 33), 0o644),
    ];
    // Off with ELF read-ahead.
    let f = Fixture::new(&files, opts());
    assert_eq!(f.reader.start_files(&f.layer), 0);
    let mut o = opts();
    o.elf_read_ahead = true;
    let f = Fixture::new(&files, o);
    assert_eq!(f.reader.start_files(&f.layer), 3);
    for p in ["etc/passwd", "etc/group", "etc/ld.so.cache"] {
        assert!(f.wait_requested(p).await, "{p}");
    }
    f.wait_local(&["etc/passwd", "etc/group"]).await;
    let (s, e) = f.span("etc/other");
    assert_eq!(f.fake.requests_touching(s, e), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executables_libraries_are_fetched_while_its_first_chunk_still_arrives() {
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let prog = exe[..exe.len().min(1 << 20)].to_vec();
    let mut o = opts();
    o.elf_read_ahead = true;
    let f = Arc::new(Fixture::new(
        &[
            ("usr/bin/prog", prog, 0o755),
            ("lib/x86_64-linux-gnu/libc.so.6", noise(40_000, 15), 0o755),
        ],
        o,
    ));
    // All of the executable's chunk but its gzip trailer arrives, then nothing more: the
    // read cannot be served (its chunk is not verified), the libraries are asked for anyway.
    let (s, e) = f.span("usr/bin/prog");
    f.fake.inject(Fault::StallAfter((e - s - 8) as usize));
    let read = {
        let f = Arc::clone(&f);
        tokio::spawn(async move {
            let e = f.entry("usr/bin/prog");
            f.reader.read(&f.layer, e, 0, 4096).await
        })
    };
    assert!(
        f.wait_requested("lib/x86_64-linux-gnu/libc.so.6").await,
        "libc asked for while the executable's chunk is still arriving"
    );
    assert!(!read.is_finished(), "the unverified chunk served nothing");
    read.abort();
}

/// Text-like bytes (deflate ends blocks often, so a gzip index has checkpoints with windows).
fn text(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            b"abcdefgh ijklmn\n"[(x >> 16) as usize % 16]
        })
        .collect()
}

/// A plain gzip layer of `files` read through a shared gzip index (checkpoints every 64 KiB,
/// windows kept apart in their own blob), served by a fake registry.
fn gzip_indexed(files: &[(String, Vec<u8>)], opts: ReadOptions) -> Fixture {
    use crate::layer::tar as ltar;
    let named: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
    let (_, gz) = ltar::test_util::files_tar_gz(&named);
    let dir = tempfile::tempdir().unwrap();
    let (entries, mut ra) = ltar::test_util::index_of(&gz, 64 << 10, &dir.path().join("files"));
    let mut windows = vec![];
    ra.split_windows(&mut windows);
    let entries = ra.lazy_entries(&entries);
    let layout = Layout::new(dir.path());
    layout.create().unwrap();
    let db = Arc::new(Mutex::new(
        Catalogue::open(&dir.path().join("catalogue.db")).unwrap(),
    ));
    let fake = Arc::new(FakeBlobs::default());
    let size = gz.len() as u64;
    let digest = fake.add(gz);
    let windows = (fake.add(windows.clone()), windows.len() as u64);
    let partials = Partials::new(layout.clone());
    partials.open(&digest, size, 0).unwrap();
    let access = crate::access::Access::new(fake.clone(), Default::default());
    let reader = Reader::new(layout, db, access, partials, opts);
    let tree = Tree::from_entries(&entries).unwrap();
    let toc = LayerIndex {
        digest: Digest::of(b"index"),
        toc_offset: size,
        entries,
        prefetch_landmark: None,
    };
    let layer = LazyLayer::new(digest, SOURCE.into(), size, toc, tree).with_windows(Some(windows));
    Fixture {
        _dir: dir,
        reader,
        fake,
        layer: Arc::new(layer),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_bytes_behind_a_missing_window_decode_from_an_earlier_checkpoint() {
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| (format!("f{i:02}"), text(30_000, i)))
        .collect();
    let f = gzip_indexed(
        &files,
        ReadOptions {
            neighbours: 1 << 20,
            ..opts()
        },
    );
    // The later files start at checkpoints of their own, with windows kept apart.
    let last = &f.layer.toc.entries[f.entry("f11")].chunks[0];
    assert!(last.resume().unwrap().window_ref.is_some());
    // The first read brings its neighbours' bytes (decoded from the layer's start: no window).
    assert_eq!(f.read("f00").await.unwrap(), files[0].1);
    let (start, end) = (f.span("f00").0, f.span("f11").1);
    let partial = f.reader.partials.get(&f.layer.digest).unwrap();
    for _ in 0..500 {
        if partial.contains(start, end) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        partial.contains(start, end),
        "the neighbours came with the first read"
    );
    let before = f.fake.requests().len();
    assert_eq!(before, 1);
    // Their own checkpoints' windows are not here, but the bytes from the layer's start are:
    // decoded from there, with no request.
    for (name, body) in files.iter().rev() {
        assert_eq!(&f.read(name).await.unwrap(), body, "{name}");
    }
    assert_eq!(f.fake.requests().len(), before, "no window fetched");
}

/// Eight text files, each after a file of noise (`n00`, `t00`, ...): through a gzip index,
/// each text file starts at a checkpoint of its own, with a window.
fn noise_then_text() -> Vec<(String, Vec<u8>)> {
    (0..8)
        .flat_map(|i| {
            [
                (format!("n{i:02}"), noise(100_000, i as u64 + 1)),
                (format!("t{i:02}"), text(40_000, i + 100)),
            ]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_without_a_list_gets_all_its_windows_in_one_request() {
    let files = noise_then_text();
    let f = gzip_indexed(
        &files,
        ReadOptions {
            neighbours: 0,
            ..opts()
        },
    );
    let windows_blob = f.layer.windows.clone().unwrap().0;
    let n = f.reader.fetch_all_windows(&f.layer);
    assert!(n >= 4, "{n} windows");
    // Asked again (another container of the image): nothing more.
    f.reader.fetch_all_windows(&f.layer);
    let of_windows = || {
        f.fake
            .requests()
            .iter()
            .filter(|(d, _, _)| *d == windows_blob)
            .count()
    };
    // Reads from checkpoints of their own decode with them: no further window request.
    for (name, body) in files.iter().rev() {
        assert_eq!(&f.read(name).await.unwrap(), body, "{name}");
    }
    assert_eq!(of_windows(), 1, "{:?}", f.fake.requests());
    // A layer a list guides gets its windows with its ranges instead.
    let g = gzip_indexed(&files, opts());
    g.layer.guide();
    assert_eq!(g.reader.fetch_all_windows(&g.layer), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_through_a_gzip_index_decodes_with_windows_kept_apart() {
    // Text files a start reads, each after a file of noise it does not, listed last first.
    let files = noise_then_text();
    let f = gzip_indexed(&files, opts());
    let windows_blob = f.layer.windows.clone().unwrap().0;
    let list: Vec<usize> = (1..8).rev().map(|i| f.entry(&format!("t{i:02}"))).collect();
    assert!(f.reader.prefetch(&f.layer, list.clone(), Class::Prefetch) > 0);
    // Each arrives, and reads back verified, with no further request.
    let partial = f.reader.partials.get(&f.layer.digest).unwrap();
    for &e in &list {
        let name = f.layer.toc.entries[e].path.clone();
        let (s, end) = f.span(&name);
        for _ in 0..500 {
            if partial.contains(s, end) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(partial.contains(s, end), "{name} prefetched");
    }
    let requests = f.fake.requests().len();
    for &e in &list {
        let name = f.layer.toc.entries[e].path.clone();
        let body = &files.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(&f.read(&name).await.unwrap(), body, "{name}");
    }
    assert_eq!(f.fake.requests().len(), requests);
    assert!(
        f.fake
            .requests()
            .iter()
            .filter(|(d, _, _)| *d == windows_blob)
            .count()
            <= 1,
        "one decoder ran through the list's runs, from one window: {:?}",
        f.fake.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetched_files_last_piece_comes_in_a_request_of_its_own() {
    // A file of four 1 MiB pieces through a gzip index, listed for prefetch: its last piece
    // (an ELF file's data segment, read right after its headers) is not at the end of one
    // request for the whole file.
    let files = vec![
        ("usr/bin/big".to_string(), noise((3 << 20) + 200_000, 7)),
        ("usr/bin/small".to_string(), text(1000, 8)),
    ];
    let f = gzip_indexed(&files, opts());
    let e = f.entry("usr/bin/big");
    let chunks = f.layer.toc.entries[e].chunks.clone();
    assert_eq!(chunks.len(), 4);
    let spans: Vec<(u64, u64)> = chunks.iter().map(|c| f.layer.spans.span(c)).collect();
    let n = f.reader.prefetch(&f.layer, [e], Class::Prefetch);
    assert!(n >= 4, "{n} claimed");
    let partial = f.reader.partials.get(&f.layer.digest).unwrap();
    for _ in 0..500 {
        if spans.iter().all(|&(s, end)| partial.contains(s, end)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let layer: Vec<(u64, u64)> = f
        .fake
        .requests()
        .iter()
        .filter(|(d, _, _)| *d == f.layer.digest)
        .map(|&(_, s, end)| (s, end))
        .collect();
    assert!(
        layer
            .iter()
            .any(|&(s, end)| s == spans[3].0 && end >= spans[3].1),
        "the last piece from its own checkpoint: {layer:?}, pieces at {spans:?}"
    );
    assert!(
        layer
            .iter()
            .any(|&(s, end)| s == spans[0].0 && end >= spans[2].1 && end < spans[3].1),
        "the others in one request: {layer:?}, pieces at {spans:?}"
    );
    assert_eq!(f.read("usr/bin/big").await.unwrap(), files[0].1);
}

#[test]
fn region_read_ahead_takes_files_of_the_misses_kind_under_their_common_directory() {
    assert_eq!(
        common_dir(
            [
                "usr/lib/python3.11/encodings/__pycache__/__init__.pyc",
                "usr/lib/python3.11/encodings/__pycache__/utf_8.pyc",
                "usr/lib/python3.11/__pycache__/site.pyc",
            ]
            .into_iter()
        ),
        "usr/lib/python3.11/"
    );
    assert_eq!(common_dir(["a/b/c", "a/bc/d"].into_iter()), "a/");
    assert_eq!(common_dir(["top", "a/b"].into_iter()), "");
    assert_eq!(common_dir(["a/b/c"].into_iter()), "a/b/");
    assert_eq!(file_kind("x/y.pyc"), file_kind("z.pyc"));
    assert!(file_kind("x/y.pyc").is_some());
    assert_ne!(file_kind("x/y.pyc"), file_kind("x/y.py"));
    assert_eq!(file_kind("bin/ls"), None);
    assert_eq!(file_kind("usr/lib/libc.so.6"), None);
    assert_eq!(file_kind("etc/dot."), None);
    assert!(file_kind("usr/lib/libz.so").is_some());
}
