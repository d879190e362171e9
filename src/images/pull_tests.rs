//! The pull against an in-memory registry (`registry::seam::fake`): what gets registered, the
//! platform's manifest out of an index, refusals that leave nothing behind, a stalled registry,
//! and a full pull's fill; without a network.

use super::*;
use crate::config::Config;
use crate::fetch::{FillerOptions, UnpackPolicy};
use crate::registry::seam::fake::{FakeBlobs, Fault};
use tokio_util::sync::CancellationToken;

const REPO: &str = "registry.test/repo";
const GZ_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

struct Fixture {
    _dir: tempfile::TempDir,
    images: Images,
    fake: Arc<FakeBlobs>,
    db: Arc<Mutex<Catalogue>>,
    layout: Layout,
}

fn fixture(fill: bool, pull_timeout: Duration) -> Fixture {
    fixture_with(fill, pull_timeout, false)
}

fn fixture_with(fill: bool, pull_timeout: Duration, index_lookup: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.create().unwrap();
    let db = Arc::new(Mutex::new(Catalogue::open(&layout.db()).unwrap()));
    let fake = Arc::new(FakeBlobs::default());
    let early = crate::registry::early::EarlyBlobs::new(fake.clone());
    let filler = Filler::new(
        layout.clone(),
        crate::store::Partials::new(layout.clone()),
        Arc::clone(&db),
        crate::access::Access::new(early.clone(), Default::default()),
        FillerOptions {
            max_parallel: 2,
            fill_enabled: fill,
            unpack: UnpackPolicy {
                plain: false,
                estargz: false,
            },
            index_span: 0,
        },
        CancellationToken::new(),
    );
    let images = Images::new(
        layout.clone(),
        Arc::clone(&db),
        Registry::new(Config::default().registry_options(None)),
        fake.clone(),
        early,
        filler,
        ImagesOptions {
            persist_credentials: false,
            pull_timeout,
            index_lookup,
        },
    );
    Fixture {
        _dir: dir,
        images,
        fake,
        db,
        layout,
    }
}

/// A one-layer image in the fake: (layer digest, config digest, manifest bytes). `diff_ids`
/// extra diff IDs make the config disagree with the manifest.
fn image(f: &Fixture, file: &[u8], extra_diff_ids: usize) -> (Digest, Digest, Vec<u8>) {
    let (tar, gz) = crate::layer::tar::test_util::files_tar_gz(&[("f.txt", file)]);
    let diff_id = Digest::of(&tar).to_string();
    let diff_ids: Vec<String> = std::iter::repeat_n(diff_id, 1 + extra_diff_ids).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let (size, config_size) = (gz.len(), config.len());
    let layer = f.fake.add(gz);
    let config_digest = f.fake.add(config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config_size},
        "layers": [{"mediaType": GZ_LAYER, "digest": layer.to_string(), "size": size}],
    }))
    .unwrap();
    (layer, config_digest, manifest)
}

fn recorded_images(f: &Fixture) -> usize {
    lock(&f.db).list_images().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_pull_registers_the_image_from_its_manifest_and_config_alone() {
    let f = fixture(false, Duration::from_secs(10));
    let (layer, config, manifest) = image(&f, b"hello\n", 0);
    let manifest_digest = f.fake.add_manifest(Some("1"), manifest);
    let out = f
        .images
        .pull(&format!("{REPO}:1"), None, PullMode::Lazy)
        .await
        .unwrap();
    assert_eq!(out.id, config.to_string());
    assert!(!out.already_local);
    let img = f.images.resolve(&format!("{REPO}:1")).unwrap().unwrap();
    assert_eq!(img.manifest_digest, manifest_digest.to_string());
    assert_eq!(img.layers.len(), 1);
    assert_eq!(img.layers[0].digest, layer.to_string());
    // By digest too, and the manifest and config are kept.
    let by_digest = format!("{REPO}@{manifest_digest}");
    assert_eq!(f.images.resolve(&by_digest).unwrap().unwrap().id, out.id);
    assert!(f.layout.has_blob(&manifest_digest) && f.layout.has_blob(&config));
    // Nothing of the layer was fetched: the filler is off, the layer is read on demand.
    assert!(f.fake.requests().iter().all(|(d, _, _)| d != &layer));
    // A pull by the digest we hold needs no registry at all (the registry would fail it).
    f.fake.inject(Fault::Error);
    let again = f
        .images
        .pull(&by_digest, None, PullMode::Lazy)
        .await
        .unwrap();
    assert_eq!(again.id, out.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_pulls_the_manifest_of_this_platform() {
    let f = fixture(false, Duration::from_secs(10));
    let (_, _, other) = image(&f, b"another platform\n", 0);
    let (_, config, ours) = image(&f, b"this platform\n", 0);
    let (other_d, ours_d) = (
        f.fake.add_manifest(None, other.clone()),
        f.fake.add_manifest(None, ours.clone()),
    );
    let host = crate::oci::host_platform();
    let foreign = if host.architecture == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": MANIFEST, "digest": other_d.to_string(), "size": other.len(),
             "platform": {"architecture": foreign, "os": "linux"}},
            {"mediaType": MANIFEST, "digest": ours_d.to_string(), "size": ours.len(),
             "platform": {"architecture": host.architecture, "os": host.os}},
        ],
    }))
    .unwrap();
    let index_d = f.fake.add_manifest(Some("multi"), index);
    let out = f
        .images
        .pull(&format!("{REPO}:multi"), None, PullMode::Lazy)
        .await
        .unwrap();
    assert_eq!(out.id, config.to_string());
    let img = f.images.resolve(&format!("{REPO}:multi")).unwrap().unwrap();
    assert_eq!(img.manifest_digest, ours_d.to_string());
    assert_eq!(img.index_digest.as_deref(), Some(index_d.as_str()));
    assert!(f.layout.has_blob(&index_d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_disagrees_or_arrives_wrong_is_refused_and_nothing_is_recorded() {
    let f = fixture(false, Duration::from_secs(10));
    // Two diff IDs for one layer.
    let (_, _, manifest) = image(&f, b"one\n", 1);
    f.fake.add_manifest(Some("bad"), manifest);
    let e = f
        .images
        .pull(&format!("{REPO}:bad"), None, PullMode::Lazy)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("diff"), "{e}");
    assert_eq!(recorded_images(&f), 0);
    // The config's bytes come back wrong: caught by its digest.
    let (_, _, manifest) = image(&f, b"two\n", 0);
    f.fake.add_manifest(Some("good"), manifest);
    f.fake.inject(Fault::Delay(Duration::ZERO)); // the manifest arrives as it should
    f.fake.inject(Fault::Corrupt); // the config does not
    let e = f
        .images
        .pull(&format!("{REPO}:good"), None, PullMode::Lazy)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert_eq!(recorded_images(&f), 0);
    // A manifest that is not there.
    let e = f
        .images
        .pull(&format!("{REPO}:missing"), None, PullMode::Lazy)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    // And the good one once the registry behaves.
    f.images
        .pull(&format!("{REPO}:good"), None, PullMode::Lazy)
        .await
        .unwrap();
    assert_eq!(recorded_images(&f), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_registry_fails_a_lazy_pull_within_its_timeout() {
    let f = fixture(false, Duration::from_millis(300));
    let (_, _, manifest) = image(&f, b"x\n", 0);
    f.fake.add_manifest(Some("1"), manifest);
    f.fake.inject(Fault::Stall);
    let started = std::time::Instant::now();
    let e = f
        .images
        .pull(&format!("{REPO}:1"), None, PullMode::Lazy)
        .await
        .unwrap_err();
    assert!(matches!(e, ImagesError::Timeout { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(recorded_images(&f), 0);
    // The next pull goes through: the stalled one left no lock behind.
    f.images
        .pull(&format!("{REPO}:1"), None, PullMode::Lazy)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pull_returns_once_every_layer_is_here_and_verified() {
    let f = fixture(true, Duration::from_secs(10));
    let (layer, _, manifest) = image(&f, &crate::registry::seam::fake::noise(300_000, 3), 0);
    f.fake.add_manifest(Some("1"), manifest);
    f.images
        .pull(&format!("{REPO}:1"), None, PullMode::Full)
        .await
        .unwrap();
    assert!(f.layout.has_blob(&layer));
    let img = f.images.resolve(&format!("{REPO}:1")).unwrap().unwrap();
    assert!(img.complete(), "{img:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_takes_the_shared_index_its_learned_list_names_by_digest() {
    // The registry client of the fixture reaches no registry: a referrers lookup would fail,
    // so an index taken shows it was taken by the digest the list names.
    let f = fixture_with(false, Duration::from_secs(10), true);
    let text = |len: usize, seed: u32| -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                b"abcdefgh ijklmn\n"[(x >> 16) as usize % 16]
            })
            .collect()
    };
    let (a, b) = (text(3 << 20, 1), text(4000, 2));
    let (tar, gz) = crate::layer::tar::test_util::files_tar_gz(&[("a", &a), ("b", &b)]);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(&tar).to_string()]},
    }))
    .unwrap();
    let config_digest = f.fake.add(config.clone());
    let layer = f.fake.add(gz.clone());
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": GZ_LAYER, "digest": layer.to_string(), "size": gz.len()}],
    }))
    .unwrap();
    let manifest_digest = f.fake.add_manifest(Some("1"), manifest);
    // Another node pushed the index and wrote where b lies through it into its list.
    let other = tempfile::tempdir().unwrap();
    let shared = crate::index_share::test_bundle(other.path(), &gz, &manifest_digest, &["b"]);
    let list = shared.learned.clone().unwrap();
    let named = list.index.clone().unwrap();
    assert!(list.ranges.contains_key(layer.as_str()));
    let bundle = f.fake.add(shared.bundle.clone());
    assert_eq!(bundle.to_string(), named.bundle);
    let windows = f.fake.add(shared.windows.clone());
    assert_eq!(Some(windows.to_string()), named.windows);
    crate::learned::save(&f.layout, &list).unwrap();
    f.images
        .pull(&format!("{REPO}:1"), None, PullMode::Lazy)
        .await
        .unwrap();
    let rec = lock(&f.db).layer(layer.as_str()).unwrap().unwrap();
    assert!(
        rec.mountable(),
        "the layer is read lazily through the index: {rec:?}"
    );
    assert!(
        f.fake
            .requests()
            .contains(&(bundle.clone(), 0, shared.bundle.len() as u64))
    );
    // A list naming a bundle whose bytes do not match is not taken: the lookup goes on (and
    // here fails), and the layer is not made lazy by it.
    let g = fixture_with(false, Duration::from_secs(10), true);
    let manifest2 = g
        .fake
        .add_manifest(Some("1"), f.layout.read_blob(&manifest_digest).unwrap());
    g.fake.add(config);
    g.fake.add(gz);
    g.fake.add_as(&bundle, b"not the bundle".to_vec());
    crate::learned::save(&g.layout, &list).unwrap();
    assert_eq!(manifest2, manifest_digest);
    g.images
        .pull(&format!("{REPO}:1"), None, PullMode::Lazy)
        .await
        .unwrap();
    let rec = lock(&g.db).layer(layer.as_str()).unwrap().unwrap();
    assert!(!rec.mountable(), "{rec:?}");
}
