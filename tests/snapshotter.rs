//! The containerd snapshotter: the snapshots API on its own (semantics, error codes, crash
//! consistency, cleanup), then driven by a real containerd 1.6 through its proxy plugin.

mod common;

use common::*;
use lazypull::rpc::containerd::services::snapshots::v1 as pb;
use lazypull::rpc::cri;
use lazypull::rpc::cri::runtime_service_client::RuntimeServiceClient;
use pb::snapshots_client::SnapshotsClient;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

type Client = SnapshotsClient<tonic::transport::Channel>;

async fn snapshots(d: &Daemon) -> Client {
    SnapshotsClient::new(
        lazypull::rpc::connect_unix(&d.snapshotter_socket())
            .await
            .expect("snapshotter socket"),
    )
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn prepare(
    c: &mut Client,
    key: &str,
    parent: &str,
    l: HashMap<String, String>,
) -> Result<Vec<lazypull::rpc::containerd::types::Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "lazypull".into(),
        key: key.into(),
        parent: parent.into(),
        labels: l,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

async fn stat(c: &mut Client, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: "lazypull".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.expect("info"))
}

async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "lazypull".into(),
        name: name.into(),
        key: key.into(),
        labels: labels(&[("x", "y")]),
    })
    .await
    .map(|_| ())
}

async fn remove(c: &mut Client, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "lazypull".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

async fn list(c: &mut Client, filters: &[&str]) -> Result<Vec<pb::Info>, tonic::Status> {
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "lazypull".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = vec![];
    while let Some(m) = s.message().await? {
        out.extend(m.info);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

async fn cleanup(c: &mut Client) {
    c.cleanup(pb::CleanupRequest {
        snapshotter: "lazypull".into(),
    })
    .await
    .expect("cleanup");
}

fn names(infos: &[pb::Info]) -> Vec<&str> {
    infos.iter().map(|i| i.name.as_str()).collect()
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

/// Every method, its error codes, labels, filters, usage; the metadata survives kill -9;
/// Cleanup removes orphan directories and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_api_semantics_persistence_and_cleanup() {
    let mut d = Daemon::start(&["--no-fill", "--no-fuse"]);
    let sock = d.snapshotter_socket();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut c = snapshots(&d).await;

    // A first active snapshot: a writable bind mount of an empty directory.
    let m = prepare(&mut c, "a", "", labels(&[])).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].r#type.as_str(), &m[0].options[..]),
        ("bind", &["rw".to_string(), "rbind".to_string()][..])
    );
    let a_fs = PathBuf::from(&m[0].source);
    std::fs::write(a_fs.join("hello"), b"hello from a").unwrap();
    assert_eq!(
        code(prepare(&mut c, "a", "", labels(&[])).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(prepare(&mut c, "b", "nope", labels(&[])).await),
        Code::NotFound
    );
    assert_eq!(
        code(prepare(&mut c, "b", "a", labels(&[])).await),
        Code::InvalidArgument,
        "an active parent"
    );
    assert_eq!(
        code(prepare(&mut c, "", "", labels(&[])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(prepare(&mut c, "big", "", labels(&[("k", &"v".repeat(5000))])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            prepare(
                &mut c,
                "bad-remote",
                "",
                labels(&[
                    ("containerd.io/snapshot.ref", "sha256:chain"),
                    ("containerd.io/snapshot/cri.image-ref", "127.0.0.1:1/x:y"),
                    ("containerd.io/snapshot/cri.layer-digest", "sha256:nothex"),
                ])
            )
            .await
        ),
        Code::InvalidArgument,
        "malformed remote labels"
    );
    let mounts = |c: &mut Client, key: &str| {
        let mut c = c.clone();
        let key = key.to_string();
        async move {
            c.mounts(pb::MountsRequest {
                snapshotter: "lazypull".into(),
                key,
            })
            .await
            .map(|r| r.into_inner().mounts)
        }
    };
    assert_eq!(mounts(&mut c, "a").await.unwrap(), m);
    assert_eq!(code(mounts(&mut c, "zz").await), Code::NotFound);

    // Commit: the key becomes the name; usage counts its own files.
    commit(&mut c, "c1", "a").await.unwrap();
    assert_eq!(code(stat(&mut c, "a").await), Code::NotFound);
    assert_eq!(code(commit(&mut c, "c2", "a").await), Code::NotFound);
    let c1 = stat(&mut c, "c1").await.unwrap();
    assert_eq!(c1.kind, pb::Kind::Committed as i32);
    assert_eq!(c1.labels, labels(&[("x", "y")]));
    assert!(c1.created_at.is_some() && c1.updated_at.is_some());
    assert_eq!(code(mounts(&mut c, "c1").await), Code::FailedPrecondition);
    let u = c
        .usage(pb::UsageRequest {
            snapshotter: "lazypull".into(),
            key: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.size > 0 && u.inodes >= 1, "{u:?}");

    // Children: an overlay over the committed one, and a read-only view.
    let b = prepare(&mut c, "b", "c1", labels(&[])).await.unwrap();
    assert_eq!(b[0].r#type, "overlay");
    assert!(
        b[0].options
            .contains(&format!("lowerdir={}", a_fs.display())),
        "{:?}",
        b[0].options
    );
    let v = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "lazypull".into(),
            key: "v".into(),
            parent: "c1".into(),
            labels: labels(&[]),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        (v[0].r#type.as_str(), v[0].source.as_str()),
        ("bind", a_fs.to_str().unwrap())
    );
    assert!(v[0].options.contains(&"ro".to_string()));
    // The overlay really mounts and shows the parent's file.
    let mnt = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &b[0].options.join(",")])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(st.success());
    let seen = std::fs::read(mnt.path().join("hello"));
    std::fs::write(mnt.path().join("new"), b"x").unwrap();
    let _ = std::process::Command::new("umount")
        .arg(mnt.path())
        .status();
    assert_eq!(seen.unwrap(), b"hello from a");
    assert_eq!(code(commit(&mut c, "c1", "b").await), Code::AlreadyExists);
    assert_eq!(
        code(commit(&mut c, "cv", "v").await),
        Code::FailedPrecondition
    );
    assert_eq!(code(remove(&mut c, "c1").await), Code::FailedPrecondition);
    assert_eq!(code(remove(&mut c, "nope").await), Code::NotFound);

    // Update: only labels; one key, or all.
    let update = |c: &mut Client, name: &str, l: HashMap<String, String>, paths: &[&str]| {
        let mut c = c.clone();
        let req = pb::UpdateSnapshotRequest {
            snapshotter: "lazypull".into(),
            info: Some(pb::Info {
                name: name.into(),
                labels: l,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        };
        async move { c.update(req).await.map(|r| r.into_inner().info.unwrap()) }
    };
    let i = update(
        &mut c,
        "c1",
        labels(&[("z", "w")]),
        &["labels.z", "labels.x"],
    )
    .await
    .unwrap();
    assert_eq!(i.labels, labels(&[("z", "w")]), "x deleted, z set");
    assert_eq!(
        code(update(&mut c, "c1", labels(&[]), &["name"]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(update(&mut c, "nope", labels(&[]), &[]).await),
        Code::NotFound
    );

    // List with containerd's filters (any filter may match; selectors in one must all).
    assert_eq!(names(&list(&mut c, &[]).await.unwrap()), ["b", "c1", "v"]);
    assert_eq!(
        names(&list(&mut c, &["kind==committed"]).await.unwrap()),
        ["c1"]
    );
    assert_eq!(
        names(
            &list(&mut c, &[r#"labels."z"==w"#, "name==v"])
                .await
                .unwrap()
        ),
        ["c1", "v"]
    );
    assert_eq!(
        names(&list(&mut c, &["parent==c1,kind==active"]).await.unwrap()),
        ["b"]
    );
    assert_eq!(code(list(&mut c, &["name=="]).await), Code::InvalidArgument);

    // kill -9: the same snapshots afterwards.
    let before = list(&mut c, &[]).await.unwrap();
    d.kill9();
    d.restart();
    let mut c = snapshots(&d).await;
    assert_eq!(list(&mut c, &[]).await.unwrap(), before);

    // Cleanup removes what no snapshot owns (as left by a crash), nothing else.
    let dir = d.store().join("snapshots");
    std::fs::create_dir_all(dir.join("999/fs")).unwrap();
    std::fs::create_dir_all(dir.join("junk")).unwrap();
    cleanup(&mut c).await;
    assert!(!dir.join("999").exists() && !dir.join("junk").exists());
    assert!(a_fs.join("hello").exists());
    for k in ["v", "b", "c1"] {
        remove(&mut c, k).await.unwrap();
    }
    cleanup(&mut c).await;
    assert!(list(&mut c, &[]).await.unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "no directories left"
    );
}

/// The layers (digest, size) of a manifest in the registry, and their total size.
fn layers_of(reg: &Registry, repo_tag: &str) -> (Vec<(String, u64)>, u64) {
    let layers: Vec<(String, u64)> = raw_manifest(reg, repo_tag)["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let total = layers.iter().map(|l| l.1).sum();
    (layers, total)
}

/// Wait (30 s at most) until containerd's GC has removed every snapshot through us.
async fn wait_no_snapshots(c: &mut Client, ctd: &Containerd) {
    let started = std::time::Instant::now();
    loop {
        let left = list(c, &[]).await.unwrap();
        if left.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "snapshots left: {:?}\n{}",
            names(&left),
            ctd.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Mounts under `dir` according to /proc/mounts.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

/// containerd 1.6 with lazypull as its proxy snapshotter: `ctr-remote images rpull` of an
/// eStargz image creates remote snapshots (the registry sends a small part of the image), `ctr
/// run` runs a container on them; a plain image falls back to containerd applying the layers
/// into our snapshots; lazypull killed and restarted keeps everything; removing the images
/// leaves no snapshots and no mounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runs_containers_on_lazy_snapshots() {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    {
        let ctd = Containerd::start(&[reg.host()]);
        if !ctr_remote_convert(&reg, &ctd, "big:latest", "big:esgz") {
            return;
        }
    }
    let mut d = Daemon::start(&["--no-fill"]);
    let ctd = Containerd::start_with_snapshotter(&[reg.host()], &d.snapshotter_socket());
    let big = format!("{}/big:esgz", reg.host());
    let (layers, image_size) = layers_of(&reg, "big:esgz");

    ctd.rpull_lazy(&big);
    let out = ctd.run_lazy(
        &big,
        "lazy1",
        &[
            "/bin/sh",
            "-c",
            "echo hello from a lazy container; head -c 4096 /big/big.bin | wc -c",
        ],
    );
    assert!(
        out.contains("hello from a lazy container") && out.contains("4096"),
        "{out}"
    );
    let sent = bytes_sent(&reg, "big", &layers);
    eprintln!("registry sent {sent} of {image_size} layer bytes for pull + run");
    assert!(
        sent < image_size / 4,
        "lazy: the registry sent {sent} of {image_size} layer bytes"
    );
    // Our side: one committed remote snapshot per layer, served from the FUSE mount.
    let mut c = snapshots(&d).await;
    let remote = remote_snapshots(&mut c).await;
    assert_eq!(remote.len(), layers.len(), "{remote:?}");
    // containerd sees them through its metadata.
    let ls = ctd.ctr(&["snapshots", "--snapshotter", "lazypull", "ls"]);
    assert_eq!(
        ls.lines().filter(|l| l.contains("Committed")).count(),
        layers.len(),
        "{ls}"
    );

    // A plain gzip image (no TOC, no remote labels from plain ctr): containerd applies it.
    let plain = format!("{}/busybox:latest", reg.host());
    ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazypull",
        &plain,
    ]);
    let out = ctd.run_lazy(&plain, "plain1", &["/bin/sh", "-c", "echo plain ok"]);
    assert!(out.contains("plain ok"), "{out}");

    // A container running across the restart: it has read a little, then waits for /go.
    ctd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "lazypull",
        &big,
        "long",
        "/bin/sh",
        "-c",
        "head -c 4096 /big/big.bin >/dev/null; while [ ! -e /go ]; do sleep 0.1; done; \
         tail -c 1000000 /big/big.bin | wc -c > /result; sleep 600",
    ]);

    // A clean restart (SIGTERM) with it running: the mount is left to the next daemon, which
    // resumes it; the container's own process reads bytes never fetched before.
    assert!(d.terminate().success());
    assert!(
        d.log_text().contains("left mounted for the next start"),
        "{}",
        d.log_text()
    );
    d.restart();
    let out = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "check1",
        "long",
        "/bin/sh",
        "-c",
        "touch /go; while [ ! -s /result ]; do sleep 0.1; done; cat /result",
    ]);
    assert_eq!(out.trim(), "1000000", "the running container after SIGTERM");

    // lazypull killed and restarted: the same snapshots, and containers still run.
    let mut c = snapshots(&d).await;
    let before = list(&mut c, &[]).await.unwrap();
    d.kill9();
    d.restart();
    let mut c = snapshots(&d).await;
    assert_eq!(list(&mut c, &[]).await.unwrap(), before);
    // containerd redials a proxy plugin with a backoff of at most 3 s.
    let started = std::time::Instant::now();
    ctd.wait_snapshotter(Duration::from_secs(15));
    eprintln!(
        "containerd reconnected {:?} after the restart",
        started.elapsed()
    );
    let out = ctd.run_lazy(
        &big,
        "lazy2",
        &["/bin/sh", "-c", "tail -c 100 /big/big.bin | wc -c"],
    );
    assert!(out.contains("100"), "{out}");
    // The running container kept its lazy layers across kill -9 too: an exec into it (its
    // /bin/sh comes from a lazy layer) reads another region never fetched before.
    let out = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "check2",
        "long",
        "/bin/sh",
        "-c",
        "dd if=/big/big.bin bs=65536 skip=200 count=16 2>/dev/null | wc -c",
    ]);
    assert_eq!(out.trim(), "1048576", "the running container after kill -9");
    ctd.ctr(&["task", "kill", "-s", "KILL", "long"]);
    let started = std::time::Instant::now();
    while !ctd.ctr_output(&["task", "rm", "long"]).status.success() {
        assert!(started.elapsed() < Duration::from_secs(15), "task rm long");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctd.ctr(&["containers", "rm", "long"]);

    // Removing the images: containerd's GC removes every snapshot through us; no mounts left.
    ctd.ctr(&["images", "rm", "--sync", &big, &plain]);
    assert_all_gone(&mut c, &ctd, &d).await;
}

/// containerd's CRI plugin on `snapshotter = "lazypull"` with snapshot annotations on: a pod
/// (host network, sandbox image from the local registry) whose container image is eStargz
/// starts on lazily loaded layers, through the CRI RuntimeService, as kubelet drives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pods_start_on_lazy_layers() {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    {
        let ctd = Containerd::start(&[reg.host()]);
        if !ctr_remote_convert(&reg, &ctd, "big:latest", "big:esgz") {
            return;
        }
    }
    let d = Daemon::start(&["--no-fill"]);
    let h = reg.host();
    let ctd = Containerd::start_with_snapshotter_and_sandbox(
        std::slice::from_ref(&h),
        &d.snapshotter_socket(),
        &format!("{h}/pause:latest"),
    );
    let big = format!("{h}/big:esgz");
    let (layers, image_size) = layers_of(&reg, "big:esgz");
    let mut images = ctd.images().await;
    let ch = lazypull::rpc::connect_unix(&ctd.socket).await.unwrap();
    let mut rt = RuntimeServiceClient::new(ch);

    let started = std::time::Instant::now();
    pull(&mut images, &big)
        .await
        .expect("CRI pull through containerd");
    let pulled = started.elapsed();
    let (pod, log) = run_in_pod(
        &mut rt,
        &ctd,
        &big,
        "echo hello from a lazy pod; head -c 4096 /big/big.bin | wc -c",
    )
    .await;
    let ran = started.elapsed();
    assert!(
        log.contains("hello from a lazy pod") && log.contains(" 4096"),
        "{log}"
    );
    let sent = bytes_sent(&reg, "big", &layers);
    eprintln!(
        "CRI pull {pulled:?}, pod + container done {ran:?}; registry sent {sent} of {image_size} layer bytes"
    );
    assert!(sent < image_size / 4, "lazy: {sent} of {image_size}");
    let mut c = snapshots(&d).await;
    let remote = remote_snapshots(&mut c).await;
    assert_eq!(remote.len(), layers.len(), "{remote:?}");
    assert!(
        remote.iter().all(|i| i
            .labels
            .contains_key("containerd.io/snapshot/cri.layer-digest")),
        "CRI labels: {remote:?}"
    );

    // Tear down as kubelet would; removing the images leaves no snapshots and no mounts.
    remove_pod(&mut rt, pod).await;
    for image in [big.clone(), format!("{h}/pause:latest")] {
        common::remove(&mut images, &image).await.unwrap();
    }
    assert_all_gone(&mut c, &ctd, &d).await;
}

/// Run `cmd` (through /bin/sh) in a new pod on containerd's CRI, as kubelet would: host
/// network, the harness's pause image. Returns the pod id and the container's log once it
/// exited 0.
async fn run_in_pod(
    rt: &mut RuntimeServiceClient<tonic::transport::Channel>,
    ctd: &Containerd,
    image: &str,
    cmd: &str,
) -> (String, String) {
    static PODS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PODS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let logs = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("lazy-{n}"),
            uid: format!("lazy-uid-{n}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // Host network: the node's hostname (runc cannot set one without a UTS namespace).
        log_directory: logs.path().display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log_text()))
        .into_inner()
        .pod_sandbox_id;
    let container = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                command: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
                log_path: "app.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctd.log_text()))
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: container.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", ctd.log_text()));
    loop {
        let st = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: container.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if st.state == cri::ContainerState::ContainerExited as i32 {
            assert_eq!(st.exit_code, 0, "{st:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "container did not exit: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(logs.path().join("app.log")).unwrap();
    (pod, log)
}

/// lazypull as the node's CRI image endpoint, containerd as the runtime (kubelet
/// `--image-service-endpoint`): a PullImage on lazypull makes the image known to containerd's
/// CRI plugin in k8s.io, backed by lazypull's snapshots, so CreateContainer on containerd finds
/// it without containerd downloading a layer; RemoveImage on lazypull removes it there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_image_endpoint_registers_images_in_containerd() {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    {
        let ctd = Containerd::start(&[reg.host()]);
        if !ctr_remote_convert(&reg, &ctd, "big:latest", "big:esgz") {
            return;
        }
    }
    let h = reg.host();
    // containerd first (its proxy plugin dials lazily), so lazypull can be given its socket.
    let socks = tempfile::tempdir().unwrap();
    let snap_sock = socks.path().join("snapshotter.sock");
    let ctd = Containerd::start_with_snapshotter_and_sandbox(
        std::slice::from_ref(&h),
        &snap_sock,
        &format!("{h}/pause:latest"),
    );
    let snap_arg = snap_sock.display().to_string();
    let ctd_arg = ctd.socket.display().to_string();
    // A call to the plugin before lazypull listens puts containerd's connection into gRPC's
    // redial backoff (as after a node reboot or a lazypull restart): the pull right after the
    // start below must ride it out, not fail with "connection refused".
    let early = ctd.ctr_output(&["snapshots", "--snapshotter", "lazypull", "prepare", "early"]);
    assert!(
        !early.status.success(),
        "nothing listens on the snapshotter socket yet"
    );
    let mut d = Daemon::start(&[
        "--no-fill",
        "--snapshotter-socket",
        &snap_arg,
        "--containerd-address",
        &ctd_arg,
    ]);
    let big = format!("{h}/big:esgz");
    let (layers, image_size) = layers_of(&reg, "big:esgz");
    let mut lp = d.client().await;
    let mut ctd_images = ctd.images().await;
    let mut rt = RuntimeServiceClient::new(lazypull::rpc::connect_unix(&ctd.socket).await.unwrap());

    let started = std::time::Instant::now();
    let id = pull(&mut lp, &big)
        .await
        .unwrap_or_else(|e| panic!("PullImage on lazypull: {e}\n{}", d.log_text()));
    let pulled = started.elapsed();
    // containerd's CRI plugin lists it as soon as PullImage returned, under all its names.
    let img = status(&mut ctd_images, &id)
        .await
        .unwrap_or_else(|| panic!("containerd's CRI does not know {id}\n{}", ctd.log_text()));
    assert_eq!(img.id, id);
    assert!(img.repo_tags.contains(&big), "{img:?}");
    assert!(
        img.repo_digests
            .iter()
            .any(|d| d.starts_with(&format!("{h}/big@sha256:"))),
        "{img:?}"
    );
    let records = ctd.ctr(&["-n", "k8s.io", "images", "ls"]);
    assert!(records.contains(&big) && records.contains(&id), "{records}");
    // Registering again (a second pull) is idempotent.
    assert_eq!(pull(&mut lp, &big).await.unwrap(), id);
    // The same image under a second tag: as soon as PullImage returns, containerd's CRI lists
    // every name lazypull does; untagging takes the tag away from both at once.
    reg.copy("big:esgz", "big:v2");
    let v2 = format!("{h}/big:v2");
    assert_eq!(pull(&mut lp, &v2).await.unwrap(), id);
    let names = |i: &cri::Image| {
        let mut v = [i.repo_tags.clone(), i.repo_digests.clone()].concat();
        v.sort();
        v
    };
    let ours = status(&mut lp, &id).await.unwrap();
    assert_eq!(ours.repo_tags.len(), 2, "{ours:?}");
    assert_eq!(
        names(&status(&mut ctd_images, &id).await.unwrap()),
        names(&ours)
    );
    common::remove(&mut lp, &v2).await.unwrap();
    let ours = status(&mut lp, &id).await.unwrap();
    assert_eq!(ours.repo_tags, std::slice::from_ref(&big));
    assert_eq!(
        names(&status(&mut ctd_images, &id).await.unwrap()),
        names(&ours)
    );

    let (pod, log) = run_in_pod(
        &mut rt,
        &ctd,
        &id,
        "echo hello from the image endpoint; head -c 4096 /big/big.bin | wc -c",
    )
    .await;
    let ran = started.elapsed();
    assert!(
        log.contains("hello from the image endpoint") && log.contains(" 4096"),
        "{log}"
    );
    let sent = bytes_sent(&reg, "big", &layers);
    eprintln!(
        "PullImage on lazypull (registered in containerd) {pulled:?}, pod + container done {ran:?}; registry sent {sent} of {image_size} layer bytes"
    );
    assert!(sent < image_size / 4, "lazy: {sent} of {image_size}");
    let mut c = snapshots(&d).await;
    let remote = remote_snapshots(&mut c).await;
    assert_eq!(remote.len(), layers.len(), "{remote:?}");

    // A layer that cannot be served lazily (no TOC) while filling is off: a clear refusal.
    let busybox = format!("{h}/busybox:latest");
    let err = pull(&mut lp, &busybox).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--no-fill"), "{err:?}");

    // RemoveImage on lazypull removes the records in containerd (and its GC the snapshots,
    // once the pod that used them is gone).
    remove_pod(&mut rt, pod).await;
    common::remove(&mut lp, &big).await.unwrap();
    assert!(status(&mut lp, &id).await.is_none());
    assert!(
        status(&mut ctd_images, &id).await.is_none(),
        "{}",
        ctd.log_text()
    );
    let records = ctd.ctr(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(!records.contains("big"), "{records}");
    assert!(
        list(&mut c, &[r#"labels."containerd.io/snapshot/remote""#])
            .await
            .unwrap()
            .is_empty()
    );

    // With filling on, layers without a TOC are fetched and unpacked first, then registered.
    d.terminate();
    d.restart_with(&[
        "--snapshotter-socket",
        &snap_arg,
        "--containerd-address",
        &ctd_arg,
    ]);
    let mut lp = d.client().await;
    let bid = pull(&mut lp, &busybox)
        .await
        .unwrap_or_else(|e| panic!("PullImage of a plain image: {e}\n{}", d.log_text()));
    let (pod, log) = run_in_pod(&mut rt, &ctd, &busybox, "echo plain layers work too").await;
    assert!(log.contains("plain layers work too"), "{log}");
    remove_pod(&mut rt, pod).await;
    common::remove(&mut lp, &bid).await.unwrap();
    common::remove(&mut ctd_images, &format!("{h}/pause:latest"))
        .await
        .unwrap();
    let mut c = snapshots(&d).await;
    assert_all_gone(&mut c, &ctd, &d).await;
}

/// The Debian bookworm + python3 image (eStargz by ctr-remote, one 120 MB layer) runs on lazy
/// layers through containerd both ways: `ctr-remote images rpull` + `ctr run`, and as a pod on
/// containerd's CRI after a PullImage on lazypull (the image endpoint), with the registry
/// sending a small part of the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_image_runs_on_lazy_layers_through_containerd() {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    if !python_image(&reg) {
        return;
    }
    let h = reg.host();
    let socks = tempfile::tempdir().unwrap();
    let snap_sock = socks.path().join("snapshotter.sock");
    let ctd = Containerd::start_with_snapshotter_and_sandbox(
        std::slice::from_ref(&h),
        &snap_sock,
        &format!("{h}/pause:latest"),
    );
    let snap_arg = snap_sock.display().to_string();
    let ctd_arg = ctd.socket.display().to_string();
    let d = Daemon::start(&[
        "--no-fill",
        "--snapshotter-socket",
        &snap_arg,
        "--containerd-address",
        &ctd_arg,
    ]);
    let py = format!("{h}/py:esgz");
    let (layers, image_size) = layers_of(&reg, "py:esgz");

    let started = std::time::Instant::now();
    ctd.rpull_lazy(&py);
    let out = ctd.run_lazy(
        &py,
        "py1",
        &[
            "python3",
            "-c",
            "import json, sqlite3; print(json.dumps({'lazy': bool(sqlite3.sqlite_version)}))",
        ],
    );
    let ran = started.elapsed();
    assert!(out.contains(r#"{"lazy": true}"#), "{out}");
    let sent = bytes_sent(&reg, "py", &layers);
    eprintln!(
        "python image: rpull + ctr run {ran:?}; registry sent {sent} of {image_size} layer bytes"
    );
    assert!(sent < image_size / 4, "lazy: {sent} of {image_size}");

    // The same image through lazypull's CRI endpoint, run as a pod by containerd's CRI.
    let mut lp = d.client().await;
    let mut rt = RuntimeServiceClient::new(lazypull::rpc::connect_unix(&ctd.socket).await.unwrap());
    let id = pull(&mut lp, &py)
        .await
        .unwrap_or_else(|e| panic!("PullImage on lazypull: {e}\n{}", d.log_text()));
    let (pod, log) = run_in_pod(
        &mut rt,
        &ctd,
        &id,
        "python3 -c 'import decimal; print(sum(range(10)), decimal.Decimal(1) / 4)'",
    )
    .await;
    assert!(log.contains("45 0.25"), "{log}");

    remove_pod(&mut rt, pod).await;
    common::remove(&mut lp, &py).await.unwrap();
    ctd.ctr(&["images", "rm", "--sync", &py]);
    let mut ctd_images = ctd.images().await;
    common::remove(&mut ctd_images, &format!("{h}/pause:latest"))
        .await
        .unwrap();
    let mut c = snapshots(&d).await;
    assert_all_gone(&mut c, &ctd, &d).await;
}

/// An uncompressed tar holding one file, `layers/<name>` (with its directory).
fn one_file_tar(name: &str, body: &[u8]) -> Vec<u8> {
    let header = |kind, mode, size| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut dir, "layers/", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644, body.len() as u64);
    b.append_data(&mut h, format!("layers/{name}"), body)
        .unwrap();
    b.into_inner().unwrap()
}

/// An image deeper than one page of absolute overlay lower paths: 150 lazy layers. Every
/// snapshot's content is `<root>/snapshots/<id>/fs` (a symlink into the FUSE mount for lazy
/// layers), so containerd mounts it with relative lower paths and the container runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_images_mount_past_a_page_of_lower_paths() {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return;
    }
    const DEPTH: usize = 150;
    let reg = Registry::with_fixtures(None);
    let mut tars = vec![first_layer_tar(&reg, "busybox")];
    tars.extend(
        (1..DEPTH).map(|i| one_file_tar(&format!("{i:03}"), format!("layer {i}\n").as_bytes())),
    );
    push_layers(&reg, "deep", &tars).await;
    let d = Daemon::start(&["--no-fill"]);
    let h = reg.host();
    let (plain, esgz) = (format!("{h}/deep:latest"), format!("{h}/deep:esgz"));
    let out = d.cli(&["convert", &plain, &esgz]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ctd = Containerd::start_with_snapshotter(std::slice::from_ref(&h), &d.snapshotter_socket());
    ctd.rpull_lazy(&esgz);
    let mut c = snapshots(&d).await;
    let remote = remote_snapshots(&mut c).await;
    assert_eq!(remote.len(), DEPTH, "every layer is lazy");
    let out = ctd.run_lazy(
        &esgz,
        "deep1",
        &["/bin/sh", "-c", "ls /layers | wc -l; cat /layers/149"],
    );
    assert!(
        out.contains(&format!("{}", DEPTH - 1)) && out.contains("layer 149"),
        "{out}"
    );
    // The absolute form would not have fitted in a page.
    let lower_bytes = DEPTH
        * d.store()
            .join("snapshots/100/fs:")
            .display()
            .to_string()
            .len();
    assert!(lower_bytes > 4096, "{lower_bytes}");
    ctd.ctr(&["images", "rm", "--sync", &esgz]);
    assert_all_gone(&mut c, &ctd, &d).await;
}

/// Stop and remove a pod (containerd's CRI), as kubelet does.
async fn remove_pod(rt: &mut RuntimeServiceClient<tonic::transport::Channel>, pod: String) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

/// The snapshots served lazily (labelled by the remote flow).
async fn remote_snapshots(c: &mut Client) -> Vec<pb::Info> {
    list(c, &[r#"labels."containerd.io/snapshot/remote""#])
        .await
        .unwrap()
}

/// Once containerd let go of everything: no snapshots (containerd's GC removed them through
/// us), and after Cleanup no snapshot directories and no mounts under the store.
async fn assert_all_gone(c: &mut Client, ctd: &Containerd, d: &Daemon) {
    wait_no_snapshots(c, ctd).await;
    cleanup(c).await;
    let snaps = d.store().join("snapshots");
    assert!(
        mounts_under(&snaps).is_empty(),
        "{:?}",
        mounts_under(&snaps)
    );
    let left: Vec<_> = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "snapshot directories left: {left:?}");
}

/// Layer bytes the registry sent for `repo`'s layers so far (its access log).
fn bytes_sent(reg: &Registry, repo: &str, layers: &[(String, u64)]) -> u64 {
    layers.iter().map(|(dg, _)| served(reg, repo, dg).0).sum()
}

/// Learned start-up prefetch: the first start of an image without a prefetch landmark is
/// recorded (which files, in which order); after the image was removed and the daemon
/// restarted, the next cold start prefetches that list and its own reads go to the registry
/// less often. A list naming files the image lacks does no harm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_start_is_prefetched_at_the_next_cold_start() {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    if !python_image(&reg) {
        return;
    }
    let h = reg.host();
    let socks = tempfile::tempdir().unwrap();
    let snap_sock = socks.path().join("snapshotter.sock");
    let ctd = Containerd::start_with_snapshotter(std::slice::from_ref(&h), &snap_sock);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let snap_arg = snap_sock.display().to_string();
    // Without the read-ahead guesses (directories, regions, ELF libraries; tested in the
    // reader's unit tests): every prefetched byte here is the learned list's.
    let mut d = Daemon::start(&[
        "--no-fill",
        "--snapshotter-socket",
        &snap_arg,
        "--metrics-listen",
        &metrics_addr,
        "--read-ahead-dir-kib",
        "0",
        "--read-ahead-region-kib",
        "0",
        "--no-read-ahead-elf",
    ]);
    let py = format!("{h}/py:esgz");
    let script = "import json, decimal, sqlite3; print('started', decimal.Decimal(1) / 8)";
    let run = |name: &str| {
        let out = ctd.run_lazy(&py, name, &["python3", "-c", script]);
        assert!(out.contains("started 0.125"), "{out}");
    };
    let start = |name: &str| {
        ctd.rpull_lazy(&py);
        run(name);
    };
    let image = |d: &Daemon| d.status_json()["images"][0].clone();

    // First start: nothing known, so it is recorded.
    start("learn1");
    wait_until("the learned list", Duration::from_secs(60), || {
        image(&d)["start_prefetch"]["kind"] == "learned"
    });
    let img = image(&d);
    let files = img["start_prefetch"]["files"].as_u64().unwrap();
    assert!(files > 20, "{img:#}");
    let manifest = img["manifest_digest"].as_str().unwrap().to_string();
    let list_path = d
        .store()
        .join("learned/sha256")
        .join(format!("{}.json", manifest.trim_start_matches("sha256:")));
    let list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&list_path).unwrap()).unwrap();
    let paths: Vec<&str> = list["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        paths
            .iter()
            .any(|p| p.contains("json/__pycache__/__init__"))
            && paths.iter().any(|p| p.contains("_decimal.cpython")),
        "{paths:?}"
    );
    let m = metrics(&metrics_addr);
    let first_requests = metric(&m, "lazypull_ondemand_requests_total");
    assert_eq!(metric(&m, "lazypull_prefetch_bytes_total"), 0.0, "{m}");
    let text = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("start prefetch: learned list of"), "{text}");
    // `lazypull learned` prices the list from the TOC in the store.
    let out = d.cli(&["learned", &py, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["files"].as_array().unwrap().len() as u64,
        files,
        "{shown:#}"
    );
    assert_eq!(shown["not_found"], 0, "{shown:#}");
    assert!(shown["compressed"].as_u64().unwrap() > 100_000, "{shown:#}");

    // A list that also names files the image lacks, and a layer it does not have.
    let mut list = list;
    let first_layer = list["files"][0]["layer"].clone();
    let files_mut = list["files"].as_array_mut().unwrap();
    files_mut.insert(
        0,
        serde_json::json!({"layer": first_layer, "path": "no/such/file.py"}),
    );
    files_mut.push(serde_json::json!({"layer": format!("sha256:{}", "0".repeat(64)), "path": "x"}));
    std::fs::write(&list_path, serde_json::to_vec(&list).unwrap()).unwrap();
    // Shared through the registry (Debian's docker-registry has no referrers API: the tag
    // fallback), then gone from this store: the next start finds it like another node would.
    let out = d.cli(&["learned", &py, "--push"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fallback = raw_manifest(&reg, &format!("py:{}", manifest.replace(':', "-")));
    assert_eq!(
        fallback["manifests"][0]["artifactType"], "application/vnd.lazypull.learned.v1+json",
        "{fallback:#}"
    );
    // The image goes (containerd's and ours: its fetched bytes with it), the daemon restarts.
    ctd.ctr(&["images", "rm", "--sync", &py]);
    let mut c = snapshots(&d).await;
    wait_no_snapshots(&mut c, &ctd).await;
    let mut lp = d.client().await;
    assert!(common::remove(&mut lp, &py).await.is_ok());
    assert!(
        d.status_json()["images"].as_array().unwrap().is_empty(),
        "{}",
        d.status_json()
    );
    std::fs::remove_file(&list_path).unwrap();
    assert!(d.terminate().success());
    d.restart();
    ctd.wait_snapshotter(Duration::from_secs(20));

    // Second cold start: the list is prefetched beside the start's own reads.
    let (layers, _) = layers_of(&reg, "py:esgz");
    let sent_before = bytes_sent(&reg, "py", &layers);
    ctd.rpull_lazy(&py);
    // The prefetch has claimed the listed chunks before the container reads (so that no read
    // fetches a chunk lying between the chunks of a prefetch request, which would send those
    // bytes twice and blur the count below).
    wait_until("the prefetch", Duration::from_secs(30), || {
        d.log_text()
            .contains("prefetching the files a previous start read")
    });
    run("learn2");
    // The bytes the registry sent are kept (chunks and the bytes between coalesced ones), so
    // that the filler does not fetch them again (1% spare: the footer may be read twice).
    // Dropping the bytes between chunks lost 6.8% here.
    let sent = bytes_sent(&reg, "py", &layers) - sent_before;
    let kept = || -> u64 {
        image(&d)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["filled"].as_u64().unwrap())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while kept() < sent - sent / 100 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "second start: the registry sent {sent} bytes of the layer, {} kept",
        kept()
    );
    assert!(
        kept() >= sent - sent / 100,
        "sent {sent}, kept {}: fetched bytes were dropped",
        kept()
    );
    let m = metrics(&metrics_addr);
    let second_requests = metric(&m, "lazypull_ondemand_requests_total");
    let prefetched = metric(&m, "lazypull_prefetch_bytes_total");
    eprintln!(
        "on-demand requests: first start {first_requests}, second {second_requests} \
         ({prefetched} bytes prefetched from the learned list)"
    );
    assert!(prefetched > 0.0, "{}", d.log_text());
    assert!(
        metric(&m, "lazypull_link_bytes_total{class=\"prefetch\"}") >= prefetched,
        "the learned list's requests are of class prefetch on the link: {m}"
    );
    assert!(
        second_requests < first_requests,
        "first {first_requests}, second {second_requests}"
    );
    let img = image(&d);
    let by_prefetch: u64 = img["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["prefetched"].as_u64().unwrap())
        .sum();
    assert!(by_prefetch > 0, "{img:#}");
    let log = d.log_text();
    assert!(
        log.contains("using the learned list another node shared"),
        "{log}"
    );
    // Looked for as soon as the image was pulled, beside the TOC: its ranges were fetched
    // ahead of the TOC too.
    assert!(log.contains("ahead of the layer's TOC"), "{log}");
    assert!(
        log.contains("prefetching the files a previous start read"),
        "{log}"
    );
    assert!(list_path.exists(), "the shared list is kept in the store");

    // Third cold start, the list in the store: it knows where its files lie in the layer, so
    // those ranges and the TOC's tail are fetched as the Prepare arrives, before the TOC is
    // in, and answer the TOC's request and the prefetch: nothing is fetched twice.
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&list_path).unwrap()).unwrap();
    assert!(
        saved["ranges"].as_object().is_some_and(|r| !r.is_empty()),
        "{saved}"
    );
    ctd.ctr(&["images", "rm", "--sync", &py]);
    let mut c = snapshots(&d).await;
    wait_no_snapshots(&mut c, &ctd).await;
    let mut lp = d.client().await;
    assert!(common::remove(&mut lp, &py).await.is_ok());
    assert!(d.terminate().success());
    d.restart();
    ctd.wait_snapshotter(Duration::from_secs(20));
    let sent_before = bytes_sent(&reg, "py", &layers);
    ctd.rpull_lazy(&py);
    wait_until(
        "the fetch ahead of the TOC",
        Duration::from_secs(30),
        || d.log_text().matches("ahead of the layer's TOC").count() >= 2,
    );
    wait_until("the prefetch", Duration::from_secs(30), || {
        d.log_text()
            .matches("prefetching the files a previous start read")
            .count()
            >= 2
    });
    run("learn3");
    let sent3 = bytes_sent(&reg, "py", &layers) - sent_before;
    eprintln!(
        "third start (fetched ahead of the TOC): the registry sent {sent3} bytes of the layer"
    );
    assert!(
        sent3 <= sent + sent / 50,
        "fetched ahead: {sent3} bytes sent, against {sent} without"
    );
    // Forgotten: the image is back to recording its next start.
    let out = d.cli(&["learned", &py, "--forget"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!list_path.exists());
    assert_eq!(image(&d)["start_prefetch"]["kind"], "none");
    ctd.ctr(&["images", "rm", "--sync", &py]);
    assert_all_gone(&mut c, &ctd, &d).await;
}

/// A plain gzip image through the remote flow (ctr-remote passes the layer labels for every
/// layer): lazypull's filler fetches each layer once, containerd downloads nothing and runs the
/// container on the layer served from lazypull's file cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layers_are_fetched_once_through_the_remote_flow() {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    let d = Daemon::start(&[]);
    let ctd = Containerd::start_with_snapshotter(&[reg.host()], &d.snapshotter_socket());
    let img = format!("{}/busybox:latest", reg.host());
    let (layers, _) = layers_of(&reg, "busybox:latest");
    ctd.rpull_lazy(&img);
    let out = ctd.run_lazy(&img, "plain-once", &["/bin/sh", "-c", "echo fetched once"]);
    assert!(out.contains("fetched once"), "{out}");
    for (digest, size) in &layers {
        let (bytes, requests, _) = served(&reg, "busybox", digest);
        assert_eq!(
            bytes, *size,
            "layer {digest} ({size} bytes): the registry sent {bytes} bytes in {requests} requests"
        );
    }
    let mut c = snapshots(&d).await;
    assert_eq!(remote_snapshots(&mut c).await.len(), layers.len());
    let log = d.log_text();
    assert!(log.contains("lazypull fetches it once"), "{log}");
    // Its files went to the file cache as the bytes arrived: no second pass over the blob.
    assert!(
        log.contains("layer unpacked into the file cache while it arrived"),
        "{log}"
    );
    ctd.ctr(&["images", "rm", "--sync", &img]);
    assert_all_gone(&mut c, &ctd, &d).await;
}

/// A plain gzip image runs through the remote flow before its layer has arrived: the
/// container reads a file at the start of the layer while the rest (24 MiB behind a 16 Mbit/s
/// link, held by the proxy until the container has run) still streams in, and the layer is
/// fetched once.
/// What the containerd tests on plain images need (the tools, containerd, FUSE) and
/// busybox-static's binary to run in them; None (the test is skipped, saying why) otherwise.
fn containerd_and_busybox() -> Option<Vec<u8>> {
    if !require_tools() || !Containerd::available() || !Path::new("/dev/fuse").exists() {
        return None;
    }
    let busybox = std::fs::read("/bin/busybox").ok();
    if busybox.is_none() {
        eprintln!("skipped: /bin/busybox (busybox-static) is missing");
    }
    busybox
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_image_runs_while_its_layer_streams_in() {
    let Some(busybox) = containerd_and_busybox() else {
        return;
    };
    let reg = Registry::empty(None);
    let tar = tar_of(&[
        ("a/", vec![]),
        ("a/first.txt", b"first\n".to_vec()),
        ("bin/", vec![]),
        ("bin/busybox", busybox),
        ("z/", vec![]),
        ("z/big.bin", noise(24 << 20, 7)),
    ]);
    push_layers(&reg, "streamrun", &[tar]).await;
    let layer = layer_digests(&reg, "streamrun")[0].clone();
    // The proxy lets the first 8 MiB through (the manifest, config, `a/`, `bin/busybox` and
    // the start of `z/big.bin`) and holds the rest until the container has run: the layer
    // cannot be complete by then, however slow the machine.
    let (proxy, gate) = Netem::held(&reg.host(), 16, 8 << 20);
    let d = Daemon::start(&[]);
    let ctd = Containerd::start_with_snapshotter(&[proxy.host()], &d.snapshotter_socket());
    let img = format!("{}/streamrun:latest", proxy.host());
    ctd.rpull_lazy(&img);
    let out = ctd.run_lazy(&img, "streaming", &["/bin/busybox", "cat", "/a/first.txt"]);
    assert!(out.contains("first"), "{out}");
    let (filled, state, _) = layer_local(&d, &layer);
    assert_ne!(
        state,
        "complete",
        "the container ran before its layer was complete ({filled} bytes there)\n{}",
        d.log_text()
    );
    gate.release();
    d.wait_complete(Duration::from_secs(120));
    let out = ctd.run_lazy(&img, "streamed", &["/bin/busybox", "ls", "/z"]);
    assert!(out.contains("big.bin"), "{out}");
    let (bytes, requests, _) = served(&reg, "streamrun", &layer);
    let size = layer_sizes(&reg, "streamrun")[0].1;
    assert_eq!(bytes, size, "fetched once ({requests} requests)");
    let s = d.status_json();
    assert_eq!(s["images"][0]["layers"][0]["walk_order"], true, "{s:#}");
    ctd.ctr(&["images", "rm", "--sync", &img]);
}

/// The first node of a plain gzip image learns its whole start although the start waits
/// seconds for its files to stream in (a lookup waiting for the stream keeps the recording
/// open), and `index push` then adds checkpoints before the files that start read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_start_is_learned_whole_and_its_files_get_checkpoints() {
    let Some(busybox) = containerd_and_busybox() else {
        return;
    };
    let reg = Registry::empty(None);
    let tar = tar_of(&[
        ("a/", vec![]),
        ("a/first.txt", b"first\n".to_vec()),
        ("bin/", vec![]),
        ("bin/busybox", busybox),
        ("zz/", vec![]),
        ("zz/big.bin", noise(16 << 20, 5)),
        ("zzz/", vec![]),
        ("zzz/late.txt", b"late\n".to_vec()),
    ]);
    push_layers(&reg, "learnstream", &[tar]).await;
    // 16 MiB of noise at 16 Mbit/s: zzz/late.txt arrives at least 8 s after a/first.txt, far
    // past the recording's 2 s of quiet. The names runc looks up at the root (proc, dev, ...)
    // sort before zz/, so the start begins, and opens its first files, long before that.
    let proxy = Netem::start(&reg.host(), &["--mbit", "16"]);
    let d = Daemon::start(&[]);
    let ctd = Containerd::start_with_snapshotter(&[proxy.host()], &d.snapshotter_socket());
    let img = format!("{}/learnstream:latest", proxy.host());
    ctd.rpull_lazy(&img);
    let out = ctd.run_lazy(
        &img,
        "learns",
        &["/bin/busybox", "cat", "/a/first.txt", "/zzz/late.txt"],
    );
    assert!(out.contains("first") && out.contains("late"), "{out}");
    let paths = || -> Vec<String> {
        let out = d.cli(&["learned", &img, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["files"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|f| f["path"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until("the learned list", Duration::from_secs(60), || {
        !paths().is_empty()
    });
    let learned = paths();
    assert!(
        learned.iter().any(|p| p == "zzz/late.txt"),
        "the list holds the file that arrived seconds later: {learned:?}\n{}",
        d.log_text()
    );
    d.wait_complete(Duration::from_secs(120));
    wait_until("layer unpacked", Duration::from_secs(120), || {
        d.status_json()["images"][0]["layers"][0]["unpacked"] == true
    });
    let out = d.cli(&["index", "push", &img]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "index push: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("checkpoint(s) right before"), "{text}");
    // The list now says where its files lie through the pushed index (and its windows), so
    // that a node with it fetches them ahead of the index.
    assert!(text.contains("now holds where its files lie"), "{text}");
    let out = d.cli(&["learned", &img, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ahead = &v["ahead"][layer_digests(&reg, "learnstream")[0].as_str()];
    assert!(
        ahead["ranges"].as_u64() > Some(0) && ahead["window_ranges"].as_u64() > Some(0),
        "{v}"
    );
    ctd.ctr(&["images", "rm", "--sync", &img]);
}

/// A plain gzip image whose gzip index another node pushed (`lazypull index push`) runs through
/// containerd's remote flow with random access: the container reads a file behind 24 MiB of
/// the layer long before the stream could reach it (16 Mbit/s), and with the filler on the
/// node fetches the layer once more or less what stopped fill requests lose (reads' ranges,
/// then the fill's gaps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_image_with_a_shared_index_runs_lazily_through_containerd() {
    let Some(busybox) = containerd_and_busybox() else {
        return;
    };
    let reg = Registry::empty(None);
    let tar = tar_of(&[
        ("bin/", vec![]),
        ("bin/busybox", busybox),
        ("m/", vec![]),
        ("m/big.bin", noise(24 << 20, 11)),
        ("z/", vec![]),
        ("z/last.txt", b"last of the layer\n".to_vec()),
    ]);
    push_layers(&reg, "idxrun", &[tar]).await;
    let layer = layer_digests(&reg, "idxrun")[0].clone();
    let size = layer_sizes(&reg, "idxrun")[0].1;
    // The first node: pulls, fills (building the index) and pushes the index.
    let a = Daemon::start(&[]);
    let direct = format!("{}/idxrun:latest", reg.host());
    {
        let mut c = a.client().await;
        pull(&mut c, &direct).await.expect("pull on the first node");
    }
    wait_until("layer unpacked", Duration::from_secs(120), || {
        a.status_json()["images"][0]["layers"][0]["unpacked"] == true
    });
    let out = a.cli(&["index", "push", &direct]);
    assert!(
        out.status.success(),
        "index push: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log_text()
    );
    drop(a);
    let (first, _, _) = served(&reg, "idxrun", &layer);
    assert_eq!(first, size);

    // The second node, behind a 16 Mbit/s link: 24 MiB take about 12 s to stream, and the
    // proxy holds each connection after 8 MiB until the container has run (the reads need far
    // less; the fill's requests stop there), so the layer cannot be complete before then.
    let (proxy, gate) = Netem::held(&reg.host(), 16, 8 << 20);
    let d = Daemon::start(&[]);
    let ctd = Containerd::start_with_snapshotter(&[proxy.host()], &d.snapshotter_socket());
    let img = format!("{}/idxrun:latest", proxy.host());
    ctd.rpull_lazy(&img);
    let out = ctd.run_lazy(&img, "indexed", &["/bin/busybox", "cat", "/z/last.txt"]);
    assert!(out.contains("last of the layer"), "{out}");
    let (filled, state, _) = layer_local(&d, &layer);
    assert_ne!(
        state,
        "complete",
        "the container ran before its layer was complete ({filled} bytes there)\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("shared random-access index found"), "{log}");
    assert!(
        log.contains("serving the layer lazily through its gzip index"),
        "{log}"
    );
    // The second node learned its start, through the shared index: its list names the bundle
    // its ranges go through.
    let learned = || -> serde_json::Value {
        let out = d.cli(&["learned", &img, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    wait_until("the learned list", Duration::from_secs(60), || {
        learned()["files"].as_array().is_some_and(|f| !f.is_empty())
    });
    let list = learned();
    let bundle = list["index"]["bundle"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        bundle.starts_with("sha256:") && list["ahead"][layer.as_str()]["ranges"].as_u64() > Some(0),
        "{list}"
    );
    let manifest = list["image"].as_str().unwrap_or_default().to_string();
    gate.release();
    d.wait_complete(Duration::from_secs(120));
    let (bytes, requests, full) = served(&reg, "idxrun", &layer);
    let second = bytes - first;
    eprintln!("the second node fetched {second} of {size} bytes ({requests} requests in all)");
    assert!(!full || requests == 1, "no full GET on the second node");
    // Not exactly once: a fill request stopped for a read (foreground first) loses the bytes
    // in flight, which behind the pacing proxy are what the loopback sockets buffer (about
    // 4 MB here; a real link holds about a bandwidth-delay product).
    assert!(
        second >= size && second < size + size / 2,
        "the second node fetched the layer about once: {second} of {size} bytes\n{}",
        d.log_text()
    );
    ctd.ctr(&["images", "rm", "--sync", &img]);
    drop(ctd);

    // A third node, provisioned with that list: it fetches the bundle ahead with the ranges
    // and takes the index by digest, with no lookup in the registry.
    let hex = manifest.trim_start_matches("sha256:");
    let list_file = std::fs::read(d.store().join("learned/sha256").join(format!("{hex}.json")))
        .expect("the second node's learned list");
    drop(d);
    let e = Daemon::start(&[]);
    std::fs::create_dir_all(e.store().join("learned/sha256")).unwrap();
    std::fs::write(
        e.store().join("learned/sha256").join(format!("{hex}.json")),
        list_file,
    )
    .unwrap();
    let ctd = Containerd::start_with_snapshotter(&[reg.host()], &e.snapshotter_socket());
    let img = format!("{}/idxrun:latest", reg.host());
    ctd.rpull_lazy(&img);
    let out = ctd.run_lazy(&img, "named", &["/bin/busybox", "cat", "/z/last.txt"]);
    assert!(out.contains("last of the layer"), "{out}");
    let log = e.log_text();
    assert!(
        log.contains("the shared index the learned list names, taken by digest")
            && log.contains("shared random-access index found"),
        "{log}"
    );
    ctd.ctr(&["images", "rm", "--sync", &img]);
}
