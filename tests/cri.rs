//! CRI ImageService behaviour against a real registry and a real `lazypull serve`.

mod common;

use common::*;
use lazypull::rpc::cri;
use std::time::{Duration, Instant};
use tonic::Code;

macro_rules! need_tools {
    () => {
        if !require_tools() {
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_pull_registers_image_then_fills_layers() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let probes = |reg: &Registry| {
        std::fs::read_to_string(reg.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /v2/ HTTP"))
            .count()
    };
    // What the test's own tools ask the registry (skopeo probes `/v2/`) is asked first.
    let expected_id = config_digest(&reg, "multilayer");
    let sizes = layer_sizes(&reg, "multilayer");
    let probes_before = probes(&reg);
    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    let name = format!("{}/multilayer:latest", reg.host());
    let t = Instant::now();
    let id = pull(&mut c, &name).await.expect("pull");
    eprintln!("PullImage (lazy) took {:?}", t.elapsed());
    assert_eq!(id, expected_id, "image id is the config digest");
    // Registered immediately, before any layer needs to be local.
    let img = status(&mut c, &name)
        .await
        .expect("image visible right after pull");
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, vec![name.clone()]);
    assert_eq!(img.repo_digests.len(), 1);
    assert!(img.repo_digests[0].starts_with(&format!("{}/multilayer@sha256:", reg.host())));
    assert!(img.size > 3_000_000, "size counts layers: {}", img.size);
    assert!(
        img.uid.is_none() && img.username.is_empty(),
        "no User in config"
    );
    d.wait_complete(Duration::from_secs(60));
    for (l, size) in sizes {
        let f = d
            .store()
            .join("blobs/sha256")
            .join(l.trim_start_matches("sha256:"));
        assert!(f.exists(), "layer {l} stored under its digest");
        assert_eq!(
            bytes_served(&reg, "multilayer", &l),
            size,
            "layer {l} fetched once"
        );
    }
    // An anonymous pull of a registry without auth sends no `/v2/` probe (oci-client would
    // send one before every manifest request: a round trip each).
    assert_eq!(
        probes(&reg),
        probes_before,
        "no /v2/ probes for an anonymous pull"
    );
    // Verbose status carries the config and fill state.
    let v = c
        .image_status(cri::ImageStatusRequest {
            image: spec(&name),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&v.info["info"]).unwrap();
    assert_eq!(info["complete"], true);
    assert_eq!(
        info["imageSpec"]["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_naming_semantics() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    reg.copy("busybox:latest", "library/busybox:latest");
    reg.copy("busybox:latest", "library/busybox:v2");
    let mirror = format!("docker.io=http://{}", reg.host());
    let d = Daemon::start(&["--mirror", &mirror]);
    let mut c = d.client().await;

    // Short names are normalised and fetched through the configured mirror.
    // (A dead mirror in front of a reachable upstream is covered below.)
    let id = pull(&mut c, "busybox")
        .await
        .expect("pull busybox via mirror");
    let img = status(&mut c, "docker.io/library/busybox:latest")
        .await
        .expect("normalised name");
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, vec!["docker.io/library/busybox:latest"]);
    assert!(img.repo_digests[0].starts_with("docker.io/library/busybox@sha256:"));
    // Lookups by full id, by truncated id (with and without sha256:), by digest reference.
    let hex = id.trim_start_matches("sha256:");
    for q in [
        id.clone(),
        hex.to_string(),
        hex[..12].to_string(),
        format!("sha256:{}", &hex[..12]),
        img.repo_digests[0].clone(),
    ] {
        assert_eq!(
            status(&mut c, &q).await.map(|i| i.id),
            Some(id.clone()),
            "lookup {q}"
        );
    }
    // Pull by digest adds no tag; pulling the same digest again answers locally. (The filler
    // finishes first: its own layer GETs are not the pull's.)
    let by_digest = img.repo_digests[0].clone();
    d.wait_complete(Duration::from_secs(60));
    let gets_before = reg.all_blob_gets();
    assert_eq!(pull(&mut c, &by_digest).await.unwrap(), id);
    assert_eq!(
        reg.all_blob_gets(),
        gets_before,
        "a held digest needs no network"
    );
    assert_eq!(status(&mut c, &id).await.unwrap().repo_tags.len(), 1);
    // A second tag for the same image.
    assert_eq!(pull(&mut c, "busybox:v2").await.unwrap(), id);
    let img = status(&mut c, &id).await.unwrap();
    assert_eq!(
        img.repo_tags,
        vec![
            "docker.io/library/busybox:latest",
            "docker.io/library/busybox:v2"
        ]
    );
    // Removing one of two tags only untags.
    remove(&mut c, "busybox:v2").await.unwrap();
    let img = status(&mut c, &id).await.expect("still there");
    assert_eq!(img.repo_tags, vec!["docker.io/library/busybox:latest"]);
    // Absent image: empty ImageStatus response, idempotent RemoveImage.
    assert!(
        status(&mut c, "docker.io/library/nothing:here")
            .await
            .is_none()
    );
    remove(&mut c, "docker.io/library/nothing:here")
        .await
        .expect("remove absent is ok");
    // Bad input.
    let e = pull(&mut c, "UPPER/Case:x").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("UPPER/Case"), "{}", e.message());
    let e = c
        .pull_image(cri::PullImageRequest {
            image: None,
            auth: None,
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = pull(&mut c, &format!("{}/does-not-exist:1", reg.host()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Removing the last tag removes the image and garbage-collects its blobs.
    d.wait_complete(Duration::from_secs(30));
    remove(&mut c, "busybox").await.unwrap();
    assert!(status(&mut c, &id).await.is_none());
    assert!(list(&mut c).await.is_empty());
    let left: Vec<_> = std::fs::read_dir(d.store().join("blobs/sha256"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "blobs left after removal: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_multiarch_and_shared_layers() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    let h = reg.host();
    pull(&mut c, &format!("{h}/user-numeric")).await.unwrap();
    pull(&mut c, &format!("{h}/user-named")).await.unwrap();
    let n = status(&mut c, &format!("{h}/user-numeric")).await.unwrap();
    assert_eq!(n.uid.map(|u| u.value), Some(1234));
    assert!(n.username.is_empty());
    let u = status(&mut c, &format!("{h}/user-named")).await.unwrap();
    assert!(u.uid.is_none());
    assert_eq!(u.username, "app");

    // Multi-arch index: resolved to this node's platform (amd64 = the busybox image).
    let id = pull(&mut c, &format!("{h}/multiarch:latest"))
        .await
        .unwrap();
    assert_eq!(id, config_digest(&reg, "busybox"));
    let img = status(&mut c, &id).await.unwrap();
    assert!(
        img.repo_digests
            .iter()
            .any(|d| d.starts_with(&format!("{h}/multiarch@"))),
        "{img:?}"
    );

    // Two images sharing a layer: stored and fetched once.
    pull(&mut c, &format!("{h}/shared-a")).await.unwrap();
    pull(&mut c, &format!("{h}/shared-b")).await.unwrap();
    d.wait_complete(Duration::from_secs(60));
    let base = &layer_digests(&reg, "shared-a")[0];
    let total: usize = [
        "shared-a",
        "shared-b",
        "user-numeric",
        "user-named",
        "multiarch",
    ]
    .iter()
    .map(|r| reg.blob_gets(r, base))
    .sum();
    let gets: Vec<String> = std::fs::read_to_string(reg.log())
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("127.0.0.1 ") && l.contains("\"GET ") && l.contains(base.as_str())
        })
        .map(str::to_string)
        .collect();
    assert_eq!(
        total, 1,
        "shared base layer fetched once across all images: {gets:#?}"
    );
    let imgs = list(&mut c).await;
    assert_eq!(imgs.len(), 5, "{imgs:?}");
    // Removing one sharer keeps the shared blob for the other.
    remove(&mut c, &format!("{h}/shared-a")).await.unwrap();
    assert!(
        d.store()
            .join("blobs/sha256")
            .join(base.trim_start_matches("sha256:"))
            .exists()
    );
    let fs = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(fs.image_filesystems[0].used_bytes.as_ref().unwrap().value > 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_pulls_fetch_each_blob_once() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let d = Daemon::start(&["--pull-mode", "full"]);
    let name = format!("{}/big:latest", reg.host());
    let mut tasks = vec![];
    for _ in 0..20 {
        let mut c = d.client().await;
        let name = name.clone();
        tasks.push(tokio::spawn(async move { pull(&mut c, &name).await }));
    }
    let mut ids = vec![];
    for t in tasks {
        ids.push(t.await.unwrap().expect("pull"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    for (l, size) in layer_sizes(&reg, "big") {
        assert_eq!(
            bytes_served(&reg, "big", &l),
            size,
            "layer {l} fetched exactly once"
        );
    }
    assert_eq!(
        reg.blob_gets("big", &config_digest(&reg, "big")),
        1,
        "config fetched once"
    );
    // Full mode: complete on return.
    let s = d.status_json();
    assert!(
        s["images"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] == "complete"),
        "{s:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry_and_credential_sources() {
    need_tools!();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", "alice", "s3cret"])
        .output()
        .expect("htpasswd (apache2-utils)");
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let open = Registry::with_fixtures(None);
    let reg = Registry::empty(Some(&htpasswd));
    // Put busybox into the auth registry.
    skopeo_copy(
        &format!("{}/busybox:latest", open.host()),
        &format!("{}/private/busybox:latest", reg.host()),
        &["--dest-creds", "alice:s3cret"],
    );
    let name = format!("{}/private/busybox:latest", reg.host());

    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    let e = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(&reg.host()) && e.message().contains("anonymous"),
        "names registry and source: {}",
        e.message()
    );
    let e = pull_as(&mut c, &name, "alice", "wrong").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("AuthConfig"), "{}", e.message());
    let id = pull_as(&mut c, &name, "alice", "s3cret")
        .await
        .expect("pull with AuthConfig");
    d.wait_complete(Duration::from_secs(30));
    assert!(!d.log_text().contains("s3cret"), "credentials never logged");
    drop(d);

    // --creds on the daemon, and docker config.json.
    let d = Daemon::start(&["--creds", "alice:s3cret"]);
    let mut c = d.client().await;
    assert_eq!(pull(&mut c, &name).await.expect("pull with --creds"), id);
    drop(d);
    let cfg = dir.path().join("docker.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--docker-config", cfg.to_str().unwrap()]);
    let mut c = d.client().await;
    assert_eq!(
        pull(&mut c, &name).await.expect("pull with docker config"),
        id
    );
    assert!(!d.log_text().contains("s3cret"));
    drop(d);
    // A docker credential helper named in credHelpers, found on PATH ($DOCKER_CONFIG this time).
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let helper = bin_dir.join("docker-credential-lazytest");
    std::fs::write(&helper, "#!/bin/sh\nread server\n[ \"$1\" = get ] || exit 1\nprintf '{\"ServerURL\":\"%s\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}' \"$server\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let docker_dir = dir.path().join("docker");
    std::fs::create_dir_all(&docker_dir).unwrap();
    std::fs::write(
        docker_dir.join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"lazytest"}}}}"#, reg.host()),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let d = Daemon::start_with_env(
        &[],
        &[
            ("DOCKER_CONFIG", docker_dir.to_str().unwrap()),
            ("PATH", &path),
        ],
    );
    let mut c = d.client().await;
    assert_eq!(
        pull(&mut c, &name)
            .await
            .expect("pull with a credential helper"),
        id
    );
    assert!(!d.log_text().contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_images_and_sigterm_is_clean() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let mut d = Daemon::start(&[]);
    let name = format!("{}/multilayer:latest", reg.host());
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.unwrap();
    }
    d.wait_complete(Duration::from_secs(60));
    let st = d.terminate();
    assert!(
        st.success(),
        "clean exit on SIGTERM: {st}\n{}",
        d.log_text()
    );
    assert!(!d.socket.exists(), "socket removed on shutdown");
    // Restart with the registry gone: start-up needs no network and the image is still there.
    let mut reg = reg;
    reg.stop();
    d.restart();
    let mut c = d.client().await;
    let img = status(&mut c, &name).await.expect("image survives restart");
    assert_eq!(img.repo_tags, vec![name.clone()]);
    // Pulling by digest needs no network either.
    assert!(pull(&mut c, &img.repo_digests[0]).await.is_ok());
    // The registry being down makes a tag pull fail quickly with Unavailable.
    let t = Instant::now();
    let e = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_registry() {
    need_tools!();
    let issuer = TokenIssuer::start("alice", "s3cret");
    let open = Registry::with_fixtures(None);
    let reg = Registry::with_token_auth(&issuer);
    skopeo_copy(
        &format!("{}/multilayer:latest", open.host()),
        &format!("{}/team/app:1", reg.host()),
        &["--dest-creds", "alice:s3cret"],
    );
    let name = format!("{}/team/app:1", reg.host());
    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    let e = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let before = issuer.requests.load(std::sync::atomic::Ordering::SeqCst);
    let id = pull_as(&mut c, &name, "alice", "s3cret")
        .await
        .expect("pull with a bearer token");
    assert_eq!(id, config_digest(&open, "multilayer"));
    d.wait_complete(Duration::from_secs(60));
    let tokens = issuer.requests.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        (1..=3).contains(&tokens),
        "tokens are cached, not fetched per request: {tokens}"
    );
    assert!(!d.log_text().contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_and_uncompressed_layers_verify_against_diff_ids() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let tar = first_layer_tar(&reg, "busybox");
    let mut ids = vec![];
    for comp in ["zstd", "none", "gzip"] {
        ids.push(push_built_image(&reg, &format!("built-{comp}"), &tar, comp, comp).await);
    }
    // A layer whose content does not match the config's diff_id is refused.
    push_built_image_claiming(
        &reg,
        "built-evil",
        &tar[..tar.len() - 1024],
        &tar,
        "zstd",
        "evil",
    )
    .await;
    let d = Daemon::start(&["--pull-mode", "full"]);
    let mut c = d.client().await;
    let h = reg.host();
    for (comp, want) in ["zstd", "none", "gzip"].iter().zip(&ids) {
        let id = pull(&mut c, &format!("{h}/built-{comp}:latest"))
            .await
            .unwrap_or_else(|e| panic!("{comp}: {e:?}"));
        assert_eq!(&id, want);
    }
    let s = d.status_json();
    let media: Vec<String> = s["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| {
            i["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["media_type"].as_str().unwrap().to_string())
        })
        .collect();
    assert!(
        media.iter().any(|m| m.ends_with("+zstd")) && media.iter().any(|m| m.ends_with(".tar")),
        "{media:?}"
    );
    // The layer's blob digest is right (it is what the manifest names) but its content is not
    // what the config declares.
    let e = pull(&mut c, &format!("{h}/built-evil:latest"))
        .await
        .unwrap_err();
    assert!(e.message().contains("diff_id"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_registry_with_custom_ca() {
    need_tools!();
    let dir = tempfile::tempdir().unwrap();
    let Certs { ca, cert, key, .. } = make_certs(dir.path());
    let open = Registry::with_fixtures(None);
    let tls = Registry::with_tls(&cert, &key);
    skopeo_copy(
        &format!("{}/busybox:latest", open.host()),
        &format!("{}/busybox:latest", tls.host()),
        &[],
    );
    let name = format!("{}/busybox:latest", tls.host());
    // Without the CA (and HTTPS forced): refused, clearly.
    let cfg = dir.path().join("lazypull.yaml");
    std::fs::write(
        &cfg,
        format!("registries:\n  - name: {}\n    scheme: https\n", tls.host()),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let mut c = d.client().await;
    let e = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().to_lowercase().contains("certificate") || e.message().contains("UnknownIssuer"),
        "{}",
        e.message()
    );
    drop(d);
    // With the CA configured: works.
    std::fs::write(
        &cfg,
        format!(
            "registries:\n  - name: {}\n    scheme: https\n    tls: {{ca: {}}}\n",
            tls.host(),
            ca.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap(), "--pull-mode", "full"]);
    let mut c = d.client().await;
    assert_eq!(
        pull(&mut c, &name).await.expect("pull over https"),
        config_digest(&open, "busybox")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_requiring_a_client_certificate() {
    need_tools!();
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let open = Registry::with_fixtures(None);
    let mtls = Registry::with_mtls(&certs.cert, &certs.key, &certs.ca);
    // skopeo presents the client certificate from a cert dir (client.cert + client.key).
    let cert_dir = dir.path().join("skopeo-certs");
    std::fs::create_dir(&cert_dir).unwrap();
    std::fs::copy(&certs.ca, cert_dir.join("ca.crt")).unwrap();
    std::fs::copy(&certs.client_cert, cert_dir.join("client.cert")).unwrap();
    std::fs::copy(&certs.client_key, cert_dir.join("client.key")).unwrap();
    skopeo_copy(
        &format!("{}/multilayer:latest", open.host()),
        &format!("{}/multilayer:latest", mtls.host()),
        &["--dest-cert-dir", cert_dir.to_str().unwrap()],
    );
    let name = format!("{}/multilayer:latest", mtls.host());
    let cfg = dir.path().join("lazypull.yaml");
    let entry = |tls: &str| {
        format!(
            "registries:\n  - name: {}\n    scheme: https\n    tls: {{{tls}}}\n",
            mtls.host()
        )
    };
    // The CA alone: the registry refuses the handshake, and the error says so.
    std::fs::write(&cfg, entry(&format!("ca: {}", certs.ca.display()))).unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let mut c = d.client().await;
    let e = pull(&mut c, &name).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("registries[].tls.cert"),
        "{}",
        e.message()
    );
    drop(d);
    // A certificate without its key is a configuration error at start.
    std::fs::write(
        &cfg,
        entry(&format!(
            "ca: {}, cert: {}",
            certs.ca.display(),
            certs.client_cert.display()
        )),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["--config", cfg.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("tls.cert and tls.key"), "{err}");
    // With the client certificate: a lazy pull, and the filler completes every layer.
    std::fs::write(
        &cfg,
        entry(&format!(
            "ca: {}, cert: {}, key: {}",
            certs.ca.display(),
            certs.client_cert.display(),
            certs.client_key.display()
        )),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let mut c = d.client().await;
    assert_eq!(
        pull(&mut c, &name).await.expect("pull over mTLS"),
        config_digest(&open, "multilayer")
    );
    d.wait_complete(Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_not_forwarded_on_redirect_to_another_host() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let front = RedirectingRegistry::start(reg.host(), "alice", "s3cret");
    let d = Daemon::start(&["--pull-mode", "full", "--creds", "alice:s3cret"]);
    let mut c = d.client().await;
    let id = pull(&mut c, &format!("{}/multilayer:latest", front.host()))
        .await
        .expect("pull through redirects");
    assert_eq!(id, config_digest(&reg, "multilayer"));
    let n = front
        .storage_requests
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        n >= 4,
        "config and three layers came from the storage host: {n}"
    );
    assert_eq!(
        front
            .storage_saw_auth
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no credentials sent to another host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_mirror_falls_back_to_upstream_quickly() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let dead = free_port();
    let mirror = format!("{}=http://127.0.0.1:{dead}", reg.host());
    let d = Daemon::start(&["--mirror", &mirror, "--pull-mode", "full"]);
    let mut c = d.client().await;
    let t = Instant::now();
    let id = pull(&mut c, &format!("{}/multilayer:latest", reg.host()))
        .await
        .expect("upstream after the mirror fails");
    assert_eq!(id, config_digest(&reg, "multilayer"));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a dead mirror costs little: {:?}",
        t.elapsed()
    );
    assert!(
        d.log_text().contains("mirror failed"),
        "the fallback is logged"
    );
}
