//! The pull-through registry (`mirror.listen`) with the clients users run: skopeo copies an
//! image through it (default upstream), curl reads what the spec says (ranges, HEAD, tags,
//! errors, `ns`, in-path upstreams), each blob comes from the upstream once, and with the
//! upstream gone the mirror still serves what it stored.

mod common;

use common::*;
use std::process::Command;

/// `curl -s -i [args] URL`: the status code, the headers (lower-cased names) and the body.
fn curl(args: &[&str], url: &str) -> (u16, String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "60"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let body = raw.get(split + 4..).unwrap_or_default().to_vec();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, body)
}

/// The registry, skopeo and curl are installed (else the test says why it skips).
fn tools() -> bool {
    if !require_tools() {
        return false;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIP: curl not installed");
        return false;
    }
    true
}

fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn skopeo_copy(from: &str, to: &std::path::Path) -> std::process::Output {
    Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--retry-times", "0"])
        .arg(from)
        .arg(format!("oci:{}:latest", to.display()))
        .output()
        .expect("skopeo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_curl_pull_through_the_mirror_and_it_serves_the_store_offline() {
    if !tools() {
        return;
    }
    let mut reg = Registry::empty(None);
    let big = noise(3 << 20, 5);
    push_layers(
        &reg,
        "mir",
        &[
            tar_of(&[("a/", vec![]), ("a/hello.txt", b"hello\n".to_vec())]),
            tar_of(&[("b/", vec![]), ("b/big.bin", big)]),
        ],
    )
    .await;
    let layers = layer_sizes(&reg, "mir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Tags asked upstream at every request (`tag_ttl` 0): the offline part below then shows
    // the store answering for an upstream that is gone.
    let d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--mirror-default-upstream",
        &reg.host(),
        "--mirror-tag-ttl",
        "0s",
    ]);
    let base = format!("http://{listen}");

    // The API version check.
    let (code, head, _) = curl(&[], &format!("{base}/v2/"));
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("docker-distribution-api-version: registry/2.0"),
        "{head}"
    );

    // skopeo, through the default upstream: every blob fetched once from the upstream.
    let out_dir = tempfile::tempdir().unwrap();
    let out = skopeo_copy(
        &format!("docker://{listen}/mir:latest"),
        &out_dir.path().join("a"),
    );
    assert!(
        out.status.success(),
        "skopeo copy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    for (digest, size) in &layers {
        assert!(d.blob(digest).exists(), "{digest} stored");
        let (bytes, requests, _) = served(&reg, "mir", digest);
        assert_eq!((bytes, requests), (*size, 1), "{digest} fetched once");
    }
    // Again: all from the store.
    let out = skopeo_copy(
        &format!("docker://{listen}/mir:latest"),
        &out_dir.path().join("b"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (digest, _) in &layers {
        assert_eq!(
            served(&reg, "mir", digest).1,
            1,
            "{digest} not fetched again"
        );
    }

    // curl: the in-path upstream form, HEAD, ranges, tags, ns, errors.
    let (big_digest, big_size) = layers[1].clone();
    let blob_url = format!("{base}/v2/{}/mir/blobs/{big_digest}", reg.host());
    let (code, head, body) = curl(&["-I"], &blob_url);
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains(&format!("content-length: {big_size}")),
        "{head}"
    );
    assert!(head.contains("accept-ranges: bytes"), "{head}");
    assert!(body.is_empty());
    let (code, head, body) = curl(&["-H", "Range: bytes=10-19"], &blob_url);
    assert_eq!(code, 206, "{head}");
    assert!(
        head.contains(&format!("content-range: bytes 10-19/{big_size}")),
        "{head}"
    );
    let whole = std::fs::read(d.blob(&big_digest)).unwrap();
    assert_eq!(body, whole[10..20]);
    let (code, head, _) = curl(&["-H", &format!("Range: bytes={big_size}-")], &blob_url);
    assert_eq!(code, 416, "{head}");

    let (code, head, body) = curl(&[], &format!("{base}/v2/mir/tags/list"));
    assert_eq!(code, 200, "{head}");
    let tags: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["latest"]), "{tags}");

    let (code, head, _) = curl(
        &["-I"],
        &format!("{base}/v2/mir/manifests/latest?ns={}", reg.host()),
    );
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains(&format!("oci-namespace: {}", reg.host())),
        "{head}"
    );
    assert!(head.contains("docker-content-digest: sha256:"), "{head}");

    let (code, _, body) = curl(&[], &format!("{base}/v2/mir/manifests/nosuchtag"));
    assert_eq!(
        (code, error_code(&body).as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    let (code, _, body) = curl(
        &[],
        &format!("{base}/v2/mir/blobs/sha256:{}", "0".repeat(64)),
    );
    assert_eq!((code, error_code(&body).as_str()), (404, "BLOB_UNKNOWN"));
    let (code, _, body) = curl(&[], &format!("{base}/v2/%2e%2e/x/manifests/latest"));
    assert_eq!((code, error_code(&body).as_str()), (400, "NAME_INVALID"));
    let (code, _, body) = curl(&["-X", "POST"], &format!("{base}/v2/mir/blobs/uploads/"));
    assert_eq!((code, error_code(&body).as_str()), (405, "UNSUPPORTED"));
    let (code, _, body) = curl(
        &["-X", "PUT", "--data", "{}"],
        &format!("{base}/v2/mir/manifests/latest"),
    );
    assert_eq!((code, error_code(&body).as_str()), (405, "UNSUPPORTED"));

    // The upstream goes away: tags and blobs are served from the store.
    reg.stop();
    let out = skopeo_copy(
        &format!("docker://{listen}/mir:latest"),
        &out_dir.path().join("c"),
    );
    assert!(
        out.status.success(),
        "offline copy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    assert!(d.log_text().contains("serving the tag as the store has it"));
    // What it never had fails at once, with the reason.
    let (code, _, body) = curl(&[], &format!("{base}/v2/mir/manifests/other"));
    assert_eq!(code, 502, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("unreachable"));
}

/// `mirror.air_gapped`: nothing goes upstream; what the store has (here: an image pulled
/// through CRI) is served by tag and digest; the rest is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_air_gapped_mirror_serves_pulled_images_and_never_goes_upstream() {
    if !tools() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "gap", "a/x.txt", b"x\n".to_vec()).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(&["--mirror-listen", &listen, "--mirror-air-gapped"]);
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/gap:latest", reg.host()))
            .await
            .expect("pull");
    }
    d.wait_complete(std::time::Duration::from_secs(60));
    let gets = reg.all_blob_gets();
    let out_dir = tempfile::tempdir().unwrap();
    let out = skopeo_copy(
        &format!("docker://{listen}/gap:latest"),
        &out_dir.path().join("a"),
    );
    // No default upstream and no host in the path: the name resolves to nothing.
    assert!(!out.status.success());
    let base = format!("http://{listen}");
    let (code, head, body) = curl(
        &[],
        &format!("{base}/v2/{}/gap/manifests/latest", reg.host()),
    );
    assert_eq!(code, 200, "{head}\n{}", String::from_utf8_lossy(&body));
    let digest = head
        .lines()
        .find_map(|l| l.strip_prefix("docker-content-digest: "))
        .unwrap()
        .trim()
        .to_string();
    let (code, _, _) = curl(
        &[],
        &format!("{base}/v2/{}/gap/manifests/{digest}", reg.host()),
    );
    assert_eq!(code, 200);
    let (code, _, body) = curl(&[], &format!("{base}/v2/{}/gap/manifests/v2", reg.host()));
    assert_eq!(
        (code, error_code(&body).as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    for (l, _) in layer_sizes(&reg, "gap") {
        let (code, _, _) = curl(&["-I"], &format!("{base}/v2/{}/gap/blobs/{l}", reg.host()));
        assert_eq!(code, 200, "{l}");
    }
    assert_eq!(reg.all_blob_gets(), gets, "nothing fetched upstream");
}

/// Twenty clients ask for the same uncached blob at once, behind a slow upstream link: the
/// upstream sends it once, every client gets the right bytes, and every client received its
/// first bytes before any finished (they follow the one fetch as it arrives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cold_clients_share_one_upstream_fetch() {
    if !tools() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "many", "d/big.bin", noise(16 << 20, 21)).await;
    let (digest, size) = layer_sizes(&reg, "many")[0].clone();
    // About 2 s to send the blob.
    let proxy = Netem::start(&reg.host(), &["--mbit", "64"]);
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--mirror-default-upstream",
        &proxy.host(),
        "--metrics-listen",
        &metrics_addr,
    ]);
    let out = tempfile::tempdir().unwrap();
    let url = format!("http://{listen}/v2/many/blobs/{digest}");
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let (url, file) = (url.clone(), out.path().join(format!("c{i}")));
            std::thread::spawn(move || {
                let o = Command::new("curl")
                    .args(["-s", "-f", "--max-time", "120", "-o"])
                    .arg(&file)
                    .args(["-w", "%{time_starttransfer} %{time_total}"])
                    .arg(&url)
                    .output()
                    .expect("curl");
                let t = String::from_utf8_lossy(&o.stdout).to_string();
                let mut f = t
                    .split_whitespace()
                    .map(|x| x.parse::<f64>().unwrap_or(f64::MAX));
                (
                    o.status.success(),
                    f.next().unwrap_or(f64::MAX),
                    f.next().unwrap_or(0.0),
                    file,
                )
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let want = std::fs::read(d.blob(&digest)).expect("stored");
    assert_eq!(want.len() as u64, size);
    for (ok, _, _, file) in &results {
        assert!(ok, "a client failed\n{}", d.log_text());
        assert!(
            std::fs::read(file).unwrap() == want,
            "{} differs",
            file.display()
        );
    }
    let (bytes, requests, _) = served(&reg, "many", &digest);
    assert_eq!((bytes, requests), (size, 1), "one upstream fetch");
    // The metrics say the same: one fetch, 19 saved, the bytes sent as they arrived or from
    // the store (a client that came late), and 20 blob requests answered 200.
    let m = metrics(&metrics_addr);
    let value = |name: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
    };
    assert_eq!(value("lazypull_mirror_upstream_fetches_total "), 1, "{m}");
    assert_eq!(
        value("lazypull_mirror_upstream_fetches_saved_total "),
        19,
        "{m}"
    );
    assert_eq!(
        value("lazypull_mirror_requests_total{kind=\"blob\",status=\"200\"} "),
        20,
        "{m}"
    );
    let sent: u64 = ["in_flight", "store"]
        .iter()
        .map(|s| {
            m.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!("lazypull_mirror_bytes_total{{source=\"{s}\"}} "))?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(sent, 20 * size, "{m}");
    let first_done = results.iter().map(|r| r.2).fold(f64::MAX, f64::min);
    let last_start = results.iter().map(|r| r.1).fold(0.0, f64::max);
    eprintln!("20 clients: last first byte at {last_start:.2} s, first done at {first_done:.2} s");
    assert!(
        last_start < first_done,
        "every client had bytes before any was done ({last_start} vs {first_done})"
    );

    // An upstream that sends wrong bytes (one flipped by a proxy named with `ns`): the
    // clients' responses are cut short, nothing is stored.
    push_one_file(&reg, "bad", "e/x.bin", noise(1 << 20, 22)).await;
    let (bad, _) = layer_sizes(&reg, "bad")[0].clone();
    let tamper = Netem::start(&reg.host(), &["--tamper-after", "4096"]);
    let url = format!("http://{listen}/v2/bad/blobs/{bad}?ns={}", tamper.host());
    let o = Command::new("curl")
        .args(["-s", "-f", "--max-time", "60", "-o"])
        .arg(out.path().join("bad"))
        .arg(&url)
        .output()
        .expect("curl");
    assert!(!o.status.success(), "a corrupted blob was served whole");
    assert!(!d.blob(&bad).exists(), "a corrupted blob was stored");
    wait_until(
        "the mismatch logged",
        std::time::Duration::from_secs(30),
        || d.log_text().contains("digest mismatch"),
    );
}

/// containerd 1.6 pulls through the mirror as a registry mirror (`hosts.toml` with the mirror
/// as a pull/resolve host, which makes containerd add `?ns=<registry>`): the upstream sends
/// each blob once, and the mirror echoes the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_mirror_with_hosts_toml() {
    if !tools() || !Containerd::available() {
        return;
    }
    let reg = Registry::empty(None);
    push_layers(
        &reg,
        "ctd",
        &[
            tar_of(&[("a/", vec![]), ("a/one.txt", b"one\n".to_vec())]),
            tar_of(&[("b/", vec![]), ("b/two.bin", noise(1 << 20, 9))]),
        ],
    )
    .await;
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&["--mirror-listen", &listen]);
    let ctd = Containerd::start(&[]);
    let hosts = tempfile::tempdir().unwrap();
    let dir = hosts.path().join(reg.host());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{listen}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.host()
        ),
    )
    .unwrap();
    let image = format!("{}/ctd:latest", reg.host());
    let hosts_dir = hosts.path().display().to_string();
    ctd.ctr(&["images", "pull", "--hosts-dir", &hosts_dir, &image]);
    for (digest, size) in layer_sizes(&reg, "ctd") {
        assert_eq!(served(&reg, "ctd", &digest).0, size, "{digest} once");
        assert!(d.blob(&digest).exists(), "{digest} stored by the mirror");
    }
    let (code, head, _) = curl(
        &["-I"],
        &format!(
            "http://{listen}/v2/ctd/manifests/latest?ns={}",
            reg.host().replace(':', "%3A")
        ),
    );
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains(&format!("oci-namespace: {}", reg.host())),
        "{head}"
    );
    // A second containerd (a second node) pulls the same image: nothing goes upstream.
    let gets = reg.all_blob_gets();
    let other = Containerd::start(&[]);
    other.ctr(&["images", "pull", "--hosts-dir", &hosts_dir, &image]);
    assert_eq!(
        reg.all_blob_gets(),
        gets,
        "the second node's pull came from the mirror"
    );
    // kubelet's way: a CRI PullImage to containerd, whose CRI plugin reads the hosts.toml in
    // its `registry.config_path`.
    let third = Containerd::start(&[]);
    let cri_hosts = third.dir.path().join("certs.d").join(reg.host());
    std::fs::create_dir_all(&cri_hosts).unwrap();
    std::fs::copy(dir.join("hosts.toml"), cri_hosts.join("hosts.toml")).unwrap();
    let mut c = third.images().await;
    pull(&mut c, &image)
        .await
        .expect("CRI pull through containerd and the mirror");
    assert_eq!(
        reg.all_blob_gets(),
        gets,
        "containerd's CRI pull came from the mirror"
    );
}

/// A client asks the mirror for a layer the node's own filler is fetching (a CRI pull of the
/// image, its download held by the proxy half way): the mirror does not fetch it again but
/// follows the fill, sending the bytes already there at once and the rest as they arrive (the
/// last byte once the blob is verified), and a range already in the partial file is answered
/// from it. The registry sends the layer once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_being_filled_is_served_from_the_fill() {
    if !tools() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "filling", "f/big.bin", noise(12 << 20, 31)).await;
    let (digest, size) = layer_sizes(&reg, "filling")[0].clone();
    let budget = 3u64 << 20;
    let (proxy, gate) = Netem::held(&reg.host(), 200, budget);
    let listen = format!("127.0.0.1:{}", free_port());
    // The mirror's own upstream is the registry itself: a second fetch would show in its log.
    let d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--mirror-default-upstream",
        &reg.host(),
    ]);
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/filling:latest", proxy.host()))
            .await
            .expect("pull");
    }
    wait_until(
        "the fill running",
        std::time::Duration::from_secs(60),
        || d.log_text().contains("fill running"),
    );
    let url = format!("http://{listen}/v2/filling/blobs/{digest}");

    // The whole blob: the client gets what is there while the fill is held.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("blob");
    let client = {
        let (url, file) = (url.clone(), file.clone());
        std::thread::spawn(move || {
            Command::new("curl")
                .args(["-s", "-f", "--max-time", "120", "-o"])
                .arg(&file)
                .arg(&url)
                .status()
                .expect("curl")
                .success()
        })
    };
    wait_until(
        "the client has bytes of the held fill",
        std::time::Duration::from_secs(60),
        || std::fs::metadata(&file).is_ok_and(|m| m.len() >= 1 << 20),
    );
    let (_, state, _) = layer_local(&d, &digest);
    assert_ne!(
        state, "complete",
        "the fill is held, yet the layer is complete"
    );
    assert!(std::fs::metadata(&file).unwrap().len() < size);
    assert!(d.log_text().contains("following the node's own fill"));

    // A range the partial file holds: 206 from it, with the blob's size.
    let (code, head, body) = curl(&["-r", "1000-1999"], &url);
    assert_eq!(code, 206, "{head}\n{}", d.log_text());
    assert!(
        head.contains(&format!("content-range: bytes 1000-1999/{size}")),
        "{head}"
    );
    let range_body = body;
    gate.release();
    assert!(
        client.join().unwrap(),
        "the client failed\n{}",
        d.log_text()
    );
    let want = std::fs::read(d.blob(&digest)).expect("stored");
    assert_eq!(want.len() as u64, size);
    assert!(
        std::fs::read(&file).unwrap() == want,
        "the client's bytes differ"
    );
    assert!(range_body == want[1000..2000], "the range's bytes differ");
    assert_eq!(
        served(&reg, "filling", &digest).1,
        1,
        "the registry sent the layer once (the fill's request)"
    );
    assert_eq!(
        curl(&["-I"], &url).0,
        200,
        "the stored blob is served afterwards"
    );
}

/// Tag freshness: within `mirror.tag_ttl` a tag is answered from the store even after it moved
/// upstream (no upstream request), `latest` is asked every time with `always_pull_latest`, and
/// with a TTL of 0 every request asks the upstream with a HEAD, which serves the stored
/// manifest while the digest is unchanged and fetches the new one when the tag moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_revalidated_after_the_tag_ttl() {
    if !tools() {
        return;
    }
    let reg = Registry::empty(None);
    let h = reg.host();
    let push = |n: u64| {
        let reg = &reg;
        async move {
            push_layers(
                reg,
                "ttl",
                &[tar_of(&[
                    ("t/", vec![]),
                    ("t/x.txt", format!("{n}\n").into_bytes()),
                ])],
            )
            .await;
            common::skopeo_copy(
                &format!("{}/ttl:latest", reg.host()),
                &format!("{}/ttl:v1", reg.host()),
                &[],
            );
            digest_of_tag(reg, "v1")
        }
    };
    let manifest_requests = |method: &str, tag: &str| {
        let needle = format!("\"{method} /v2/ttl/manifests/{tag} ");
        std::fs::read_to_string(reg.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    };
    let get = |listen: &str, tag: &str| {
        let (code, head, body) = curl(&[], &format!("http://{listen}/v2/ttl/manifests/{tag}"));
        assert_eq!(code, 200, "{head}\n{}", String::from_utf8_lossy(&body));
        head.lines()
            .find_map(|l| l.strip_prefix("docker-content-digest: "))
            .unwrap()
            .trim()
            .to_string()
    };
    let a = push(1).await;

    let cached = format!("127.0.0.1:{}", free_port());
    let _x = Daemon::start(&[
        "--mirror-listen",
        &cached,
        "--mirror-default-upstream",
        &h,
        "--mirror-tag-ttl",
        "1h",
        "--mirror-always-pull-latest",
    ]);
    assert_eq!(get(&cached, "v1"), a);
    assert_eq!(get(&cached, "latest"), a);
    let b = push(2).await;
    assert_ne!(a, b);
    let before = manifest_requests("GET", "v1") + manifest_requests("HEAD", "v1");
    assert_eq!(
        get(&cached, "v1"),
        a,
        "within the TTL the tag is the stored one"
    );
    assert_eq!(get(&cached, "latest"), b, "latest is asked every time");
    assert_eq!(
        manifest_requests("GET", "v1") + manifest_requests("HEAD", "v1"),
        before,
        "no upstream request for a tag within its TTL"
    );

    let every = format!("127.0.0.1:{}", free_port());
    let _y = Daemon::start(&[
        "--mirror-listen",
        &every,
        "--mirror-default-upstream",
        &h,
        "--mirror-tag-ttl",
        "0s",
    ]);
    assert_eq!(get(&every, "v1"), b);
    let (gets, heads) = (
        manifest_requests("GET", "v1"),
        manifest_requests("HEAD", "v1"),
    );
    assert_eq!(get(&every, "v1"), b);
    wait_until(
        "the HEAD logged",
        std::time::Duration::from_secs(10),
        || manifest_requests("HEAD", "v1") > heads,
    );
    assert_eq!(manifest_requests("GET", "v1"), gets, "unchanged: HEAD only");
    let c = push(3).await;
    assert_eq!(get(&every, "v1"), c, "a moved tag is fetched again");
}

/// The digest `ttl:TAG` has in the registry now.
fn digest_of_tag(reg: &Registry, tag: &str) -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{}/ttl:{tag}", reg.host()))
        .output()
        .expect("skopeo");
    assert!(out.status.success());
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(&out.stdout)))
}

/// The referrers API through the mirror: the upstream (Debian's docker-registry, which has no
/// referrers API: the mirror reads its referrers tag) holds the gzip index a node pushed for
/// an image; the mirror lists it as an image index, applies the `artifactType` filter (and
/// says so), and keeps answering from the store once the upstream is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_listed_filtered_and_kept_offline() {
    if !tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let mut reg = Registry::empty(None);
    push_one_file(&reg, "refd", "r/big.bin", noise(3 << 20, 41)).await;
    let name = format!("{}/refd:latest", reg.host());
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--mirror-default-upstream",
        &reg.host(),
    ]);
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.expect("pull");
    }
    d.wait_complete(std::time::Duration::from_secs(120));
    wait_until("layer unpacked", std::time::Duration::from_secs(60), || {
        d.status_json()["images"][0]["layers"][0]["unpacked"] == true
    });
    let pushed = d.cli_ok(&["index", "push", &name]);
    assert!(
        pushed.contains("pushed the random-access index"),
        "{pushed}"
    );

    let base = format!("http://{listen}/v2/refd");
    let (code, head, _) = curl(&["-I"], &format!("{base}/manifests/latest"));
    assert_eq!(code, 200, "{head}");
    let subject = head
        .lines()
        .find_map(|l| l.strip_prefix("docker-content-digest: "))
        .unwrap()
        .trim()
        .to_string();
    let index_type = "application/vnd.lazypull.gzip-index.v1+json";
    let list = |query: &str| {
        let (code, head, body) = curl(&[], &format!("{base}/referrers/{subject}{query}"));
        assert_eq!(
            code,
            200,
            "{head}\n{}\n{}",
            String::from_utf8_lossy(&body),
            d.log_text()
        );
        assert!(
            head.contains("content-type: application/vnd.oci.image.index.v1+json"),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).expect("an index");
        assert_eq!(v["schemaVersion"], 2);
        (head, v["manifests"].as_array().cloned().unwrap_or_default())
    };
    let (head, all) = list("");
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["artifactType"], index_type);
    assert!(!head.contains("oci-filters-applied"), "{head}");
    let (head, same) = list("?artifactType=application%2Fvnd.lazypull.gzip-index.v1%2Bjson");
    assert_eq!(same.len(), 1);
    assert!(head.contains("oci-filters-applied: artifacttype"), "{head}");
    let (_, none) = list("?artifactType=application%2Fvnd.example.other");
    assert!(none.is_empty(), "{none:?}");
    // The artifact itself comes through the mirror like any manifest.
    let artifact = all[0]["digest"].as_str().unwrap();
    assert_eq!(
        curl(&["-I"], &format!("{base}/manifests/{artifact}")).0,
        200
    );

    reg.stop();
    let (_, kept) = list("");
    assert_eq!(kept, all, "offline: the list the store kept");
    assert!(d.log_text().contains("serving the referrers the store has"));
}

/// The health port answers the probes Kubernetes sends: liveness and readiness 200 once the
/// daemon serves (HEAD too), anything else 404 with what it does answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_answers_liveness_and_readiness() {
    if !tools() {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&["--health-listen", &listen]);
    let _ = d.client().await;
    let (code, _, body) = curl(&[], &format!("http://{listen}/healthz"));
    assert_eq!((code, body.as_slice()), (200, &b"ok\n"[..]));
    let (code, head, body) = curl(&[], &format!("http://{listen}/readyz"));
    assert_eq!(code, 200, "{head}\n{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"ready\n");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert_eq!(curl(&["-I"], &format!("http://{listen}/readyz")).0, 200);
    let (code, _, body) = curl(&[], &format!("http://{listen}/metrics"));
    assert_eq!(code, 404);
    assert!(String::from_utf8_lossy(&body).contains("/healthz"));
}

/// The mirror over TLS, then with client certificates (mTLS): curl and skopeo trust it with
/// the test's CA; without that CA, or without a client certificate when one is required, the
/// handshake fails and nothing is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_serves_https_and_mtls() {
    if !tools() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "sec", "s/x.txt", b"secure\n".to_vec()).await;
    let certs_dir = tempfile::tempdir().unwrap();
    let c = make_certs(certs_dir.path());
    let (cert, key, ca) = (
        c.cert.display().to_string(),
        c.key.display().to_string(),
        c.ca.display().to_string(),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("https://{listen}/v2/");
    {
        let d = Daemon::start(&[
            "--mirror-listen",
            &listen,
            "--mirror-default-upstream",
            &reg.host(),
            "--mirror-tls-cert",
            &cert,
            "--mirror-tls-key",
            &key,
        ]);
        assert_eq!(curl(&["--cacert", &ca], &base).0, 200, "{}", d.log_text());
        assert_eq!(curl(&[], &base).0, 0, "an unknown CA is refused by curl");
        assert_eq!(
            curl(&[], &format!("http://{listen}/v2/")).0,
            0,
            "no plain HTTP on a TLS port"
        );
        // skopeo trusts it through a certificate directory (ca.crt), as containerd's
        // hosts.toml `ca` would.
        let cert_dir = tempfile::tempdir().unwrap();
        std::fs::copy(&c.ca, cert_dir.path().join("ca.crt")).unwrap();
        let out_dir = tempfile::tempdir().unwrap();
        let out = Command::new("skopeo")
            .args(["copy", "--retry-times", "0", "--src-cert-dir"])
            .arg(cert_dir.path())
            .arg(format!("docker://{listen}/sec:latest"))
            .arg(format!("oci:{}:latest", out_dir.path().join("o").display()))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo over TLS: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log_text()
        );
    }
    let d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--mirror-default-upstream",
        &reg.host(),
        "--mirror-tls-cert",
        &cert,
        "--mirror-tls-key",
        &key,
        "--mirror-tls-client-ca",
        &ca,
    ]);
    let client = [
        "--cacert",
        &ca,
        "--cert",
        &c.client_cert.display().to_string(),
        "--key",
        &c.client_key.display().to_string(),
    ]
    .map(str::to_string);
    let client: Vec<&str> = client.iter().map(String::as_str).collect();
    assert_eq!(curl(&client, &base).0, 200, "{}", d.log_text());
    assert_eq!(
        curl(&["--cacert", &ca], &base).0,
        0,
        "no client certificate: no answer"
    );
    let (code, _, body) = curl(
        &client,
        &format!("https://{listen}/v2/sec/manifests/latest"),
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

/// Ship-then-disconnect: a node started with `--preload-images LIST` pulls the listed images
/// whole in the background; once that is done and the upstream is gone, an air-gapped mirror
/// on the node serves them to skopeo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preloaded_images_are_served_after_the_upstream_is_gone() {
    if !tools() {
        return;
    }
    let mut reg = Registry::empty(None);
    push_one_file(&reg, "pre", "p/x.bin", noise(1 << 20, 51)).await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        format!("# shipped with the node\n{}/pre:latest\n\n", reg.host()),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&[
        "--preload-images",
        list.to_str().unwrap(),
        "--mirror-listen",
        &listen,
        "--mirror-default-upstream",
        &reg.host(),
        "--mirror-air-gapped",
    ]);
    wait_until(
        "the preload done",
        std::time::Duration::from_secs(60),
        || d.log_text().contains("preload done"),
    );
    assert!(d.log_text().contains("preloaded"), "{}", d.log_text());
    for (l, _) in layer_sizes(&reg, "pre") {
        assert!(d.blob(&l).exists(), "layer {l} is local");
    }
    reg.stop();
    let out_dir = tempfile::tempdir().unwrap();
    let out = skopeo_copy(
        &format!("docker://{listen}/pre:latest"),
        &out_dir.path().join("o"),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
}

/// The admin API: lists (text and JSON), a dry run, a prune by pattern that removes one mirror
/// image's files and keeps the other's and the node's, bad requests, the bearer token, and
/// `/cmd/stop`. A non-loopback admin address without a token is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_lists_prunes_and_stops() {
    if !tools() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "keep", "k/k.txt", b"keep me\n".to_vec()).await;
    push_one_file(&reg, "drop", "d/d.txt", b"drop me\n".to_vec()).await;
    push_one_file(&reg, "node", "n/n.txt", b"the node's\n".to_vec()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, "s3cret-admin-token-0123\n").unwrap();
    let mut d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--mirror-default-upstream",
        &reg.host(),
        "--mirror-admin-listen",
        &admin,
        "--mirror-admin-token-file",
        token_file.to_str().unwrap(),
    ]);
    for repo in ["keep", "drop"] {
        let out = skopeo_copy(
            &format!("docker://{listen}/{repo}:latest"),
            &work.path().join(repo),
        );
        assert!(out.status.success(), "{out:?}");
    }
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/node:latest", reg.host()))
            .await
            .expect("pull");
    }
    d.wait_complete(std::time::Duration::from_secs(60));
    let auth = "Authorization: Bearer s3cret-admin-token-0123";
    let cmd = format!("http://{admin}/cmd");

    let (code, _, body) = curl(&[], &format!("{cmd}/image/list"));
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    let (code, _, body) = curl(&["-H", auth], &format!("{cmd}/image/list"));
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(code, 200, "{text}");
    assert!(text.starts_with("NAME"), "{text}");
    for repo in ["keep", "drop", "node"] {
        assert!(
            text.contains(&format!("{}/{repo}:latest", reg.host())),
            "{text}"
        );
    }
    let (_, _, body) = curl(
        &["-H", auth],
        &format!("{cmd}/image/list?format=json&pattern=drop"),
    );
    let listed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed[0]["node"], false);
    let (drop_layer, _) = layer_sizes(&reg, "drop")[0].clone();
    let (keep_layer, _) = layer_sizes(&reg, "keep")[0].clone();
    let (node_layer, _) = layer_sizes(&reg, "node")[0].clone();
    let hex = drop_layer.trim_start_matches("sha256:");
    let (_, _, body) = curl(
        &["-H", auth],
        &format!("{cmd}/blob/list?format=json&substr={}", &hex[..16]),
    );
    let blobs: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(blobs[0]["refs"], 1, "{blobs:#}");
    assert_eq!(blobs[0]["mirror"], true, "{blobs:#}");
    let (code, _, body) = curl(&["-H", auth], &format!("{cmd}/manifest/list?pattern=keep"));
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("keep:latest"));

    // Bad requests say why.
    let (code, _, _) = curl(
        &["-H", auth],
        &format!("{cmd}/prune?type=pattern&expr=drop"),
    );
    assert_eq!(code, 405, "a GET does not prune");
    let (code, _, body) = curl(
        &["-H", auth, "-X", "DELETE"],
        &format!("{cmd}/prune?type=soon"),
    );
    assert_eq!(code, 400);
    assert!(String::from_utf8_lossy(&body).contains("accessed, created or pattern"));
    let (code, _, _) = curl(&["-H", auth], &format!("{cmd}/nothing"));
    assert_eq!(code, 404);

    // A dry run removes nothing; nothing was idle for an hour; the pattern removes `drop` only.
    let (code, _, body) = curl(
        &["-H", auth, "-X", "DELETE"],
        &format!("{cmd}/prune?type=pattern&expr=drop,node&dryRun=true"),
    );
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("would prune 1 image(s)"), "{text}");
    assert!(d.blob(&drop_layer).exists());
    let (_, _, body) = curl(
        &["-H", auth, "-X", "DELETE"],
        &format!("{cmd}/prune?type=accessed&dur=1h&count=-1"),
    );
    assert!(String::from_utf8_lossy(&body).contains("pruned 0 image(s)"));
    let (code, _, body) = curl(
        &["-H", auth, "-X", "POST"],
        &format!("{cmd}/prune?type=pattern&expr=drop,node&format=json"),
    );
    assert_eq!(code, 200);
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["images"].as_array().unwrap().len(), 1, "{report:#}");
    assert!(
        !d.blob(&drop_layer).exists(),
        "the pruned image's layer is gone"
    );
    assert!(d.blob(&keep_layer).exists());
    assert!(
        d.blob(&node_layer).exists(),
        "the node's image is not the mirror's to prune"
    );
    let (_, _, body) = curl(&["-H", auth], &format!("{cmd}/image/list"));
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(
        !text.contains("drop:latest") && text.contains("keep:latest"),
        "{text}"
    );

    // The same through the CLI.
    let server = format!("http://{admin}");
    let admin_cli = |args: &[&str]| {
        Command::new(bin())
            .args(["admin", "--server", &server, "--token-file"])
            .arg(&token_file)
            .args(args)
            .output()
            .unwrap()
    };
    let out = admin_cli(&["images", "--pattern", "keep"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains("keep:latest"),
        "{out:?}"
    );
    let out = admin_cli(&["prune", "--type", "created", "--dur", "1d", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("would prune 0 image(s)"),
        "{out:?}"
    );
    let out = admin_cli(&["prune", "--type", "accessed"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs dur"),
        "{out:?}"
    );
    let out = admin_cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    let st = d.wait_exit(std::time::Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    assert!(d.log_text().contains("admin /cmd/stop"));

    let out = Command::new(bin())
        .arg("--root")
        .arg(work.path().join("other"))
        .args(["serve", "--mirror-admin-listen", "0.0.0.0:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin_token_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Peers: node B lists node A's mirror as a peer. What A holds, B takes from A (the upstream
/// sends each blob once for the two nodes); what A lacks, A answers at once without going
/// upstream, and B fetches it itself; with A gone, B pulls from the upstream at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_pair_fetches_each_blob_from_outside_once() {
    if !tools() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "shared", "s/big.bin", noise(3 << 20, 7)).await;
    push_one_file(&reg, "only-b", "b/b.txt", b"b\n".to_vec()).await;
    push_one_file(&reg, "later", "l/l.txt", b"later\n".to_vec()).await;
    let a_listen = format!("127.0.0.1:{}", free_port());
    let mut a = Daemon::start(&["--mirror-listen", &a_listen]);
    let b = Daemon::start(&["--peer", &format!("http://{a_listen}")]);
    let image = |repo: &str| format!("{}/{repo}:latest", reg.host());
    {
        let mut c = a.client().await;
        pull(&mut c, &image("shared")).await.expect("pull on A");
    }
    a.wait_complete(std::time::Duration::from_secs(60));
    {
        let mut c = b.client().await;
        for repo in ["shared", "only-b"] {
            pull(&mut c, &image(repo)).await.expect("pull on B");
        }
    }
    b.wait_complete(std::time::Duration::from_secs(60));
    let config = |repo: &str| config_digest(&reg, repo);
    for repo in ["shared", "only-b"] {
        for (l, _) in layer_sizes(&reg, repo) {
            assert_eq!(reg.blob_gets(repo, &l), 1, "{repo} layer {l}");
            assert!(b.blob(&l).exists(), "B has {l}");
        }
        assert_eq!(reg.blob_gets(repo, &config(repo)), 1, "{repo} config");
    }
    // A answered B's request for what it lacks from its store only.
    let (only_b, _) = layer_sizes(&reg, "only-b")[0].clone();
    assert!(
        !a.blob(&only_b).exists(),
        "A did not go upstream for its peer"
    );

    // A third node finds A through one DNS name (as a headless Service's), and takes from it.
    let port = a_listen.rsplit_once(':').unwrap().1;
    let c_node = Daemon::start(&["--peers-dns", &format!("localhost:{port}")]);
    {
        let mut c = c_node.client().await;
        pull(&mut c, &image("shared")).await.expect("pull on C");
    }
    c_node.wait_complete(std::time::Duration::from_secs(60));
    for (l, _) in layer_sizes(&reg, "shared") {
        assert_eq!(reg.blob_gets("shared", &l), 1, "C took {l} from A");
    }
    assert!(
        c_node.log_text().contains(&a_listen),
        "C's log names its peer"
    );

    // A gone: B goes upstream at once (a refused connection fails over without retries).
    a.terminate();
    let started = std::time::Instant::now();
    {
        let mut c = b.client().await;
        pull(&mut c, &image("later"))
            .await
            .expect("pull on B, A gone");
    }
    b.wait_complete(std::time::Duration::from_secs(60));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let (later, _) = layer_sizes(&reg, "later")[0].clone();
    assert_eq!(reg.blob_gets("later", &later), 1);
}
