//! The filler against an in-memory registry (`registry::seam::fake`): bounded requests, every
//! byte fetched once, answers that are cut or wrong, without a network.

use super::*;
use crate::registry::seam::fake::{FakeBlobs, Fault, noise};
use crate::store::{NameKind, NewImage, NewLayer};
use std::io::Write;

struct Fixture {
    _dir: tempfile::TempDir,
    filler: Arc<Filler>,
    fake: Arc<FakeBlobs>,
    db: Arc<Mutex<Catalogue>>,
    layout: Layout,
    blob: Vec<u8>,
    digest: Digest,
}

impl Fixture {
    /// A plain gzip layer of about `len` bytes, filled in requests of `request_bytes`.
    fn new(len: usize, request_bytes: u64) -> Fixture {
        let mut t = tar::Builder::new(Vec::new());
        let content = noise(len, 1);
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, "data", &content[..]).unwrap();
        let tar_bytes = t.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_bytes).unwrap();
        let blob = gz.finish().unwrap();
        Fixture::with_layer(blob, None, true, request_bytes)
    }

    /// An eStargz layer of two files, with the filler off (only its TOC is fetched).
    fn estargz_on_demand() -> Fixture {
        let (a, b) = (noise(50_000, 2), noise(70_000, 3));
        let (blob, toc) =
            crate::layer::estargz::tests::build(&[("a", &a[..]), ("dir/b", &b[..])], |_| {});
        Fixture::with_layer(blob, Some(toc), false, 1 << 20)
    }

    fn with_layer(
        blob: Vec<u8>,
        toc_digest: Option<Digest>,
        fill_enabled: bool,
        request_bytes: u64,
    ) -> Fixture {
        let mut tar_bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(&blob[..]),
            &mut tar_bytes,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let fake = Arc::new(FakeBlobs::default());
        let digest = fake.add(blob.clone());
        let diff_id = Digest::of(&tar_bytes);
        let mut cat = Catalogue::open(&dir.path().join("catalogue.db")).unwrap();
        let (id, manifest) = (Digest::of(b"config"), Digest::of(b"manifest"));
        cat.insert_image(&NewImage {
            id: &id,
            manifest_digest: &manifest,
            index_digest: None,
            media_type: "application/vnd.oci.image.manifest.v1+json",
            size: 1,
            user: "",
            source: "registry.test/repo",
            layers: vec![NewLayer {
                digest: &digest,
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
                size: blob.len() as u64,
                diff_id: &diff_id,
                toc_digest,
                toc_position: None,
            }],
            names: vec![("registry.test/repo:1".into(), NameKind::Tag)],
        })
        .unwrap();
        let db = Arc::new(Mutex::new(cat));
        let filler = Filler::new(
            layout.clone(),
            Partials::new(layout.clone()),
            Arc::clone(&db),
            crate::access::Access::new(
                fake.clone(),
                crate::access::FillPolicy {
                    request_bytes,
                    yield_for: Duration::from_millis(1),
                },
            ),
            FillerOptions {
                max_parallel: 2,
                fill_enabled,
                unpack: UnpackPolicy {
                    plain: false,
                    estargz: false,
                },
                index_span: 0,
            },
            CancellationToken::new(),
        );
        Fixture {
            _dir: dir,
            filler,
            fake,
            db,
            layout,
            blob,
            digest,
        }
    }

    async fn fill(&self) -> FillStatus {
        let rec = lock(&self.db).layer(self.digest.as_str()).unwrap().unwrap();
        let rx = self.filler.ensure(&rec, OpCreds::default());
        tokio::time::timeout(Duration::from_secs(60), Filler::wait(rx))
            .await
            .expect("the fill ends")
    }

    /// Bytes the fake registry sent, all requests together.
    fn requested(&self) -> u64 {
        self.fake.requests().iter().map(|(_, s, e)| e - s).sum()
    }

    /// The stored blob is the layer, byte for byte (never a wrong one).
    fn stored_is_right(&self) -> bool {
        !self.layout.has_blob(&self.digest)
            || self.layout.read_blob(&self.digest).unwrap() == self.blob
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_fetches_each_byte_once_in_bounded_requests_and_verifies_it() {
    // Requests are bounded in whole blocks of 1 MiB.
    let f = Fixture::new(3_500_000, 1 << 20);
    assert!(matches!(f.fill().await, FillStatus::Done));
    assert!(f.layout.has_blob(&f.digest) && f.stored_is_right());
    let reqs = f.fake.requests();
    assert!(reqs.len() >= 4, "{reqs:?}");
    assert!(reqs.iter().all(|(_, s, e)| e - s <= 1 << 20), "{reqs:?}");
    assert_eq!(f.requested(), f.blob.len() as u64, "each byte once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_answer_resumes_where_it_stopped() {
    let f = Fixture::new(300_000, 1 << 20);
    f.fake.inject(Fault::Truncate(100_000));
    assert!(matches!(f.fill().await, FillStatus::Done));
    assert!(f.stored_is_right());
    // The next request starts where the first was cut, not at 0.
    let reqs = f.fake.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].1, 100_000, "{reqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_are_never_stored_as_the_layer() {
    let f = Fixture::new(200_000, 1 << 20);
    f.fake.inject(Fault::Corrupt);
    let status = f.fill().await;
    assert!(f.stored_is_right(), "{status:?}");
    let rec = lock(&f.db).layer(f.digest.as_str()).unwrap().unwrap();
    assert_eq!(
        rec.state == LayerState::Complete,
        matches!(status, FillStatus::Done),
        "{status:?} {rec:?}"
    );
    if !matches!(status, FillStatus::Done) {
        // The registry behaves again: the next fill completes.
        assert!(matches!(f.fill().await, FillStatus::Done));
        assert!(f.stored_is_right());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toc_that_cannot_be_fetched_now_is_fetched_again_at_the_next_attempt() {
    let f = Fixture::estargz_on_demand();
    let t0 = Instant::now();
    f.fake.inject(Fault::Error);
    assert_eq!(f.fill().await, FillStatus::OnDemand);
    let rec = lock(&f.db).layer(f.digest.as_str()).unwrap().unwrap();
    // Not condemned: the layer stays lazy, and the snapshotter learns why it has to wait.
    assert!(
        rec.toc_error.is_none() && rec.toc_entries.is_none(),
        "{rec:?}"
    );
    let why = f.filler.toc_unavailable_since(f.digest.as_str(), t0);
    assert!(
        why.as_deref().is_some_and(|w| w.contains("unreachable")),
        "{why:?}"
    );
    // The registry is back: the next pull's attempt fetches it.
    assert_eq!(f.fill().await, FillStatus::OnDemand);
    let rec = lock(&f.db).layer(f.digest.as_str()).unwrap().unwrap();
    assert_eq!(rec.toc_entries, Some(2), "{rec:?}");
    assert!(rec.toc_error.is_none() && rec.mountable(), "{rec:?}");
    assert_eq!(f.filler.toc_unavailable_since(f.digest.as_str(), t0), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toc_with_wrong_bytes_is_refused_for_good() {
    let f = Fixture::estargz_on_demand();
    f.fake.inject(Fault::Corrupt);
    assert_eq!(f.fill().await, FillStatus::OnDemand);
    let rec = lock(&f.db).layer(f.digest.as_str()).unwrap().unwrap();
    assert!(
        rec.toc_error
            .as_deref()
            .is_some_and(|e| e.contains("footer")),
        "{rec:?}"
    );
    assert!(!rec.mountable());
    // Recorded: no later attempt asks the registry for it again.
    let asked = f.fake.requests().len();
    assert_eq!(f.fill().await, FillStatus::OnDemand);
    assert_eq!(f.fake.requests().len(), asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toc_comes_with_its_footer_in_one_request_and_a_long_one_in_two() {
    // Small: the footer and the TOC are in the layer's last 64 KiB.
    let f = Fixture::estargz_on_demand();
    assert_eq!(f.fill().await, FillStatus::OnDemand);
    let rec = lock(&f.db).layer(f.digest.as_str()).unwrap().unwrap();
    assert_eq!(rec.toc_entries, Some(2), "{rec:?}");
    let size = f.blob.len() as u64;
    assert_eq!(
        f.fake
            .requests()
            .iter()
            .map(|(_, s, e)| (*s, *e))
            .collect::<Vec<_>>(),
        [(size - (64 << 10), size)]
    );
    // Many files: a TOC longer than the guess, whose start comes in a second request.
    let names: Vec<String> = (0..6000)
        .map(|i| format!("d{}/file-{i:05}", i % 97))
        .collect();
    let contents: Vec<Vec<u8>> = (0..6000).map(|i| noise(8, i as u64)).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&contents)
        .map(|(n, c)| (n.as_str(), &c[..]))
        .collect();
    let (blob, toc) = crate::layer::estargz::tests::build(&files, |_| {});
    let f = Fixture::with_layer(blob, Some(toc), false, 1 << 20);
    assert_eq!(f.fill().await, FillStatus::OnDemand);
    let rec = lock(&f.db).layer(f.digest.as_str()).unwrap().unwrap();
    assert!(rec.mountable(), "{rec:?}");
    assert!(rec.toc_entries.unwrap_or(0) >= 6000, "{rec:?}");
    let size = f.blob.len() as u64;
    let reqs: Vec<(u64, u64)> = f.fake.requests().iter().map(|(_, s, e)| (*s, *e)).collect();
    let tail_at = size - toc_tail_guess(size);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0], (tail_at, size));
    assert!(reqs[1].0 < tail_at && reqs[1].1 == tail_at, "{reqs:?}");
}
