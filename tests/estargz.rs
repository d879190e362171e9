//! eStargz layers converted by Debian's `ctr-remote` (an independent implementation): lazypull
//! finds the TOC with one range request (two for a TOC longer than the guess), verifies it against the layer annotation, and agrees
//! with the layer's tar about what it contains.

mod common;

use common::*;
use lazypull::fs::tree::{NodeKind, Tree};
use lazypull::layer::estargz;
use lazypull::oci::Digest;
use std::time::Duration;

/// Parse a stored TOC with our reader and build the layer's inode tree.
fn tree_of(toc_path: &std::path::Path, toc_digest: &str, blob: &std::path::Path) -> Tree {
    let json = std::fs::read(toc_path).unwrap();
    let blob_bytes = std::fs::read(blob).unwrap();
    let off = estargz::parse_footer(&blob_bytes).unwrap();
    let toc = estargz::parse_toc(
        &json,
        &Digest::parse(toc_digest).unwrap(),
        blob_bytes.len() as u64,
        off,
        &estargz::Limits::default(),
    )
    .expect("our reader accepts ctr-remote's TOC");
    // Every regular file reads back, chunk by chunk, to the digest the TOC records.
    let spans = lazypull::layer::index::Spans::new(&toc);
    for e in toc
        .entries
        .iter()
        .filter(|e| e.kind == lazypull::layer::index::Kind::Reg && e.size > 0)
    {
        let data = lazypull::layer::index::read_file(&spans, e, 0, e.size, |s, end| {
            Ok(blob_bytes[s as usize..end as usize].to_vec())
        })
        .unwrap_or_else(|err| panic!("{}: {err}", e.path));
        assert_eq!(Some(Digest::of(&data)), e.digest, "{}", e.path);
    }
    Tree::from_entries(&toc.entries).expect("tree")
}

fn tar_names(blob: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(blob)
        .output()
        .expect("tar");
    assert!(out.status.success());
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != "stargz.index.json")
        .collect();
    v.sort();
    v.dedup();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_tocs_written_by_ctr_remote() {
    if !require_tools() || !Containerd::available() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    let ctd = Containerd::start(&[reg.host()]);
    if !ctr_remote_convert(&reg, &ctd, "multilayer:latest", "multilayer:esgz") {
        return;
    }
    let manifest = raw_manifest(&reg, "multilayer:esgz");
    let layers: Vec<(String, String)> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                    .as_str()
                    .expect("toc annotation")
                    .to_string(),
            )
        })
        .collect();
    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    pull(&mut c, &format!("{}/multilayer:esgz", reg.host()))
        .await
        .expect("pull estargz image");
    let mut trees = vec![];
    d.wait_complete(Duration::from_secs(60));
    let s = d.status_json();
    let st_layers = s["images"][0]["layers"].as_array().unwrap().clone();
    assert_eq!(st_layers.len(), layers.len());
    for (l, (digest, toc)) in st_layers.iter().zip(&layers) {
        assert_eq!(l["digest"], digest.as_str());
        assert!(l["toc_error"].is_null(), "TOC refused: {l}");
        let n = l["toc_entries"].as_u64().expect("TOC entries recorded");
        // The footer and the TOC in one range request for the layer's last 64 KiB (small
        // layers: the whole layer, which leaves nothing for the fill to fetch), then the fill.
        let size = l["size"].as_u64().expect("layer size in status");
        let gets = reg.blob_gets("multilayer", digest);
        let want = if size <= 64 << 10 { 1 } else { 2 };
        assert_eq!(
            gets, want,
            "footer + TOC, then fill, for {digest} ({size} bytes)"
        );
        // The stored TOC is the one the annotation names, and lists what the tar holds.
        let toc_path = d
            .store()
            .join("blobs/sha256")
            .join(toc.trim_start_matches("sha256:"));
        assert_eq!(sha256_file(&toc_path), *toc, "TOC stored under its digest");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&toc_path).unwrap()).unwrap();
        let mut names: Vec<String> = json["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] != "chunk")
            .map(|e| {
                e["name"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("./")
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(
            n as usize,
            json["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["type"] != "chunk")
                .count()
        );
        let blob = d
            .store()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        assert_eq!(names, tar_names(&blob), "TOC and tar agree for {digest}");
        trees.push(tree_of(&toc_path, toc, &blob));
    }
    // What overlayfs will see of each layer.
    let sh = trees[0]
        .resolve("bin/sh")
        .expect("bin/sh in the base layer");
    assert_eq!(sh.kind, NodeKind::Symlink);
    assert_eq!(sh.link, "busybox");
    assert_eq!(
        trees[0].resolve("home/app").map(|n| (n.uid, n.gid)),
        Some((1234, 1234))
    );
    let wh = trees[2]
        .resolve("data/small.txt")
        .expect("whiteout in the third layer");
    assert_eq!((wh.kind, wh.rdev), (NodeKind::Char, (0, 0)));
    assert_eq!(
        trees[2].resolve("data/layer3.txt").map(|n| n.size),
        Some(19)
    );
    assert_eq!(
        trees[1].resolve("data/random.bin").map(|n| n.size),
        Some(2 << 20)
    );
    let out = d.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("estargz ("),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toc_that_does_not_match_its_annotation_is_refused_and_the_layer_still_fills() {
    if !require_tools() || !Containerd::available() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    let ctd = Containerd::start(&[reg.host()]);
    if !ctr_remote_convert(&reg, &ctd, "busybox:latest", "busybox:esgz") {
        return;
    }
    // Same layers, but the manifest claims another TOC digest.
    let mut manifest = raw_manifest(&reg, "busybox:esgz");
    let wrong = format!("sha256:{}", "0".repeat(64));
    manifest["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] =
        wrong.clone().into();
    let body = serde_json::to_vec(&manifest).unwrap();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let r: oci_client::Reference = format!("{}/busybox:bad-toc", reg.host()).parse().unwrap();
    client
        .store_auth_if_needed(
            r.resolve_registry(),
            &oci_client::secrets::RegistryAuth::Anonymous,
        )
        .await;
    client
        .push_manifest_raw(
            &r,
            body,
            "application/vnd.oci.image.manifest.v1+json"
                .parse()
                .unwrap(),
        )
        .await
        .expect("push manifest");

    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    pull(&mut c, &format!("{}/busybox:bad-toc", reg.host()))
        .await
        .expect("pull");
    d.wait_complete(Duration::from_secs(60));
    let s = d.status_json();
    let l = &s["images"][0]["layers"][0];
    assert!(l["toc_entries"].is_null(), "{l}");
    assert!(
        l["toc_error"]
            .as_str()
            .unwrap_or_default()
            .contains("digest mismatch"),
        "{l}"
    );
    assert_eq!(
        l["state"], "complete",
        "falls back to a full, verified fetch"
    );
    assert!(d.log_text().contains("layer refused for lazy access"));
    assert!(!d.store().join("blobs/sha256").join("0".repeat(64)).exists());
}
