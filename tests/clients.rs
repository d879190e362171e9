//! gRPC clients of other stacks against a running `lazypull serve`: grpc-go dialling the socket
//! path as kubelet and crictl did before kubernetes/kubernetes#123463 (its `:authority` is the
//! path), and gRPC C-core through Python's grpcio with the authority set to the path, empty,
//! percent-encoded, or left at its default. Each runs the same ImageService and snapshotter
//! calls as lazypull's own (tonic) client and must get the same answers (vendor/h2/PATCHED.md).

mod common;

use common::*;
use lazypull::rpc::containerd::services::snapshots::v1 as snap;
use lazypull::rpc::cri;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// How to start a foreign client on a socket.
type Client = Box<dyn Fn(&Path) -> Command>;

/// One RPC of the transcript, typed for lazypull's own client and serialized for the others.
#[derive(Clone)]
enum Call {
    Pull(Box<cri::PullImageRequest>),
    Status(cri::ImageStatusRequest),
    List(cri::ListImagesRequest),
    FsInfo(cri::ImageFsInfoRequest),
    Remove(cri::RemoveImageRequest),
    Prepare(snap::PrepareSnapshotRequest),
    Stat(snap::StatSnapshotRequest),
    ListSnapshots(snap::ListSnapshotsRequest),
    Mounts(snap::MountsRequest),
    RemoveSnapshot(snap::RemoveSnapshotRequest),
}

/// An answer as the test compares it: the responses' Debug forms with times and per-run names
/// normalised, or the status code and message.
#[derive(Debug, PartialEq)]
enum Answer {
    Ok(Vec<String>),
    Err(i32, String),
}

impl Call {
    fn on_snapshotter(&self) -> bool {
        matches!(
            self,
            Call::Prepare(_)
                | Call::Stat(_)
                | Call::ListSnapshots(_)
                | Call::Mounts(_)
                | Call::RemoveSnapshot(_)
        )
    }

    fn method(&self) -> &'static str {
        match self {
            Call::Pull(_) => "/runtime.v1.ImageService/PullImage",
            Call::Status(_) => "/runtime.v1.ImageService/ImageStatus",
            Call::List(_) => "/runtime.v1.ImageService/ListImages",
            Call::FsInfo(_) => "/runtime.v1.ImageService/ImageFsInfo",
            Call::Remove(_) => "/runtime.v1.ImageService/RemoveImage",
            Call::Prepare(_) => "/containerd.services.snapshots.v1.Snapshots/Prepare",
            Call::Stat(_) => "/containerd.services.snapshots.v1.Snapshots/Stat",
            Call::ListSnapshots(_) => "/containerd.services.snapshots.v1.Snapshots/List",
            Call::Mounts(_) => "/containerd.services.snapshots.v1.Snapshots/Mounts",
            Call::RemoveSnapshot(_) => "/containerd.services.snapshots.v1.Snapshots/Remove",
        }
    }

    fn request(&self) -> Vec<u8> {
        match self {
            Call::Pull(r) => r.encode_to_vec(),
            Call::Status(r) => r.encode_to_vec(),
            Call::List(r) => r.encode_to_vec(),
            Call::FsInfo(r) => r.encode_to_vec(),
            Call::Remove(r) => r.encode_to_vec(),
            Call::Prepare(r) => r.encode_to_vec(),
            Call::Stat(r) => r.encode_to_vec(),
            Call::ListSnapshots(r) => r.encode_to_vec(),
            Call::Mounts(r) => r.encode_to_vec(),
            Call::RemoveSnapshot(r) => r.encode_to_vec(),
        }
    }

    /// A serialized response, decoded as this call's response type and shown with Debug.
    fn decode(&self, b: &[u8]) -> String {
        fn d<M: Message + Default + std::fmt::Debug>(b: &[u8]) -> String {
            format!("{:?}", M::decode(b).expect("a well-formed response"))
        }
        match self {
            Call::Pull(_) => d::<cri::PullImageResponse>(b),
            Call::Status(_) => d::<cri::ImageStatusResponse>(b),
            Call::List(_) => d::<cri::ListImagesResponse>(b),
            Call::FsInfo(_) => d::<cri::ImageFsInfoResponse>(b),
            Call::Remove(_) => d::<cri::RemoveImageResponse>(b),
            Call::Prepare(_) => d::<snap::PrepareSnapshotResponse>(b),
            Call::Stat(_) => d::<snap::StatSnapshotResponse>(b),
            Call::ListSnapshots(_) => d::<snap::ListSnapshotsResponse>(b),
            Call::Mounts(_) => d::<snap::MountsResponse>(b),
            Call::RemoveSnapshot(_) => d::<()>(b),
        }
    }
}

/// The transcript every client runs: a lazy pull, the reads of a kubelet's image manager, the
/// errors it must see, a removal; then a snapshot's life as containerd drives it.
fn calls(image: &str, missing: &str, key: &str) -> Vec<Call> {
    let spec = |i: &str| {
        Some(cri::ImageSpec {
            image: i.to_string(),
            ..Default::default()
        })
    };
    let sn = || "lazypull".to_string();
    vec![
        Call::Pull(Box::new(cri::PullImageRequest {
            image: spec(image),
            ..Default::default()
        })),
        Call::Status(cri::ImageStatusRequest {
            image: spec(image),
            verbose: false,
        }),
        Call::List(cri::ListImagesRequest { filter: None }),
        Call::FsInfo(cri::ImageFsInfoRequest {}),
        Call::Status(cri::ImageStatusRequest {
            image: spec("absent.example/nothing:here"),
            verbose: false,
        }),
        Call::Pull(Box::new(cri::PullImageRequest {
            image: spec(missing),
            ..Default::default()
        })),
        Call::Pull(Box::new(cri::PullImageRequest {
            image: spec("Not A Reference"),
            ..Default::default()
        })),
        Call::Prepare(snap::PrepareSnapshotRequest {
            snapshotter: sn(),
            key: key.to_string(),
            ..Default::default()
        }),
        Call::Stat(snap::StatSnapshotRequest {
            snapshotter: sn(),
            key: key.to_string(),
        }),
        Call::ListSnapshots(snap::ListSnapshotsRequest {
            snapshotter: sn(),
            filters: vec![],
        }),
        Call::Mounts(snap::MountsRequest {
            snapshotter: sn(),
            key: key.to_string(),
        }),
        Call::RemoveSnapshot(snap::RemoveSnapshotRequest {
            snapshotter: sn(),
            key: key.to_string(),
        }),
        Call::Stat(snap::StatSnapshotRequest {
            snapshotter: sn(),
            key: key.to_string(),
        }),
        Call::Remove(cri::RemoveImageRequest { image: spec(image) }),
        Call::Status(cri::ImageStatusRequest {
            image: spec(image),
            verbose: false,
        }),
        Call::List(cri::ListImagesRequest { filter: None }),
    ]
}

/// Times, the store's size (its SQLite files grow with every request) and the per-run snapshot
/// key and directory differ between runs; nothing else may.
fn normalise(s: &str, key: &str) -> String {
    let times = regex::Regex::new(r"(seconds|nanos|timestamp): \d+").unwrap();
    let used = regex::Regex::new(r"used_bytes: Some\(UInt64Value \{ value: [1-9]\d* \}\)").unwrap();
    let s = used.replace_all(s, "used_bytes: (more than 0)");
    let dirs = regex::Regex::new(r"snapshots/\d+").unwrap();
    let s = times.replace_all(&s, "$1: T");
    dirs.replace_all(&s, "snapshots/N").replace(key, "KEY")
}

/// The transcript through lazypull's own client.
async fn own(d: &Daemon, calls: &[Call], key: &str) -> Vec<Answer> {
    let mut c = d.client().await;
    let mut s = snap::snapshots_client::SnapshotsClient::new(
        lazypull::rpc::connect_unix(&d.snapshotter_socket())
            .await
            .expect("snapshotter socket"),
    );
    let mut out = vec![];
    for call in calls {
        fn one<M: std::fmt::Debug>(r: Result<tonic::Response<M>, tonic::Status>) -> Answer {
            match r {
                Ok(m) => Answer::Ok(vec![format!("{:?}", m.into_inner())]),
                Err(s) => Answer::Err(s.code() as i32, s.message().to_string()),
            }
        }
        let a = match call.clone() {
            Call::Pull(r) => one(c.pull_image(*r).await),
            Call::Status(r) => one(c.image_status(r).await),
            Call::List(r) => one(c.list_images(r).await),
            Call::FsInfo(r) => one(c.image_fs_info(r).await),
            Call::Remove(r) => one(c.remove_image(r).await),
            Call::Prepare(r) => one(s.prepare(r).await),
            Call::Stat(r) => one(s.stat(r).await),
            Call::Mounts(r) => one(s.mounts(r).await),
            Call::RemoveSnapshot(r) => one(s.remove(r).await),
            Call::ListSnapshots(r) => match s.list(r).await {
                Ok(st) => {
                    let mut st = st.into_inner();
                    let mut all = vec![];
                    loop {
                        match st.message().await {
                            Ok(Some(m)) => all.push(format!("{m:?}")),
                            Ok(None) => break Answer::Ok(all),
                            Err(s) => break Answer::Err(s.code() as i32, s.message().to_string()),
                        }
                    }
                }
                Err(s) => Answer::Err(s.code() as i32, s.message().to_string()),
            },
        };
        out.push(a);
    }
    normalised(out, key)
}

fn normalised(answers: Vec<Answer>, key: &str) -> Vec<Answer> {
    answers
        .into_iter()
        .map(|a| match a {
            Answer::Ok(v) => Answer::Ok(v.iter().map(|s| normalise(s, key)).collect()),
            Answer::Err(c, m) => Answer::Err(c, normalise(&m, key)),
        })
        .collect()
}

/// The transcript through a foreign client program (the protocol in its header): the image
/// calls on one connection to the CRI socket, the snapshotter calls on another.
fn foreign(
    d: &Daemon,
    calls: &[Call],
    key: &str,
    client: &dyn Fn(&Path) -> Command,
) -> Vec<Answer> {
    let mut answers: Vec<Option<Answer>> = calls.iter().map(|_| None).collect();
    for snapshotter in [false, true] {
        let socket = if snapshotter {
            d.snapshotter_socket()
        } else {
            d.socket.clone()
        };
        let picked: Vec<usize> = (0..calls.len())
            .filter(|&i| calls[i].on_snapshotter() == snapshotter)
            .collect();
        let mut child = client(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the client");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            for &i in &picked {
                let c = &calls[i];
                let line = serde_json::json!({
                    "method": c.method(),
                    "request": hex::encode(c.request()),
                    "stream": matches!(c, Call::ListSnapshots(_)),
                });
                writeln!(stdin, "{line}").expect("write to the client");
            }
        }
        let out = child.wait_with_output().expect("client output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), picked.len(), "one answer per call: {stdout}");
        for (&i, line) in picked.iter().zip(lines) {
            let v: serde_json::Value = serde_json::from_str(line).expect("answer JSON");
            let a = if v["ok"].as_bool() == Some(true) {
                let responses = v["responses"].as_array().cloned().unwrap_or_default();
                Answer::Ok(
                    responses
                        .iter()
                        .map(|r| calls[i].decode(&hex::decode(r.as_str().unwrap()).unwrap()))
                        .collect(),
                )
            } else {
                Answer::Err(
                    v["code"].as_i64().expect("code") as i32,
                    v["message"].as_str().unwrap_or_default().to_string(),
                )
            };
            answers[i] = Some(a);
        }
    }
    normalised(answers.into_iter().map(Option::unwrap).collect(), key)
}

fn compare(name: &str, calls: &[Call], want: &[Answer], got: &[Answer]) {
    for ((c, w), g) in calls.iter().zip(want).zip(got) {
        assert_eq!(w, g, "{name}: {} answered differently", c.method());
    }
}

/// The first answers are the ones a kubelet needs: a pull that worked, the image found.
fn sanity(answers: &[Answer]) {
    assert!(
        matches!(&answers[0], Answer::Ok(v) if v[0].contains("sha256:")),
        "{:?}",
        answers[0]
    );
    assert!(
        matches!(&answers[1], Answer::Ok(v) if v[0].contains("repo_tags")),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(answers[5], Answer::Err(5, _)),
        "missing image: {:?}",
        answers[5]
    );
    assert!(
        matches!(answers[12], Answer::Err(5, _)),
        "removed snapshot: {:?}",
        answers[12]
    );
}

/// Python's grpcio from Debian (`/usr/bin/python3`, not a virtualenv's), or why not.
fn python_grpc() -> Result<PathBuf, String> {
    let py = PathBuf::from("/usr/bin/python3");
    let ok = Command::new(&py)
        .args(["-c", "import grpc"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(py)
    } else {
        Err("python3-grpcio is not installed (scripts/install-deps installs it)".into())
    }
}

/// The grpc-go client, built once from Debian's golang-google-grpc-dev sources (GOPATH mode,
/// offline), or why not.
fn go_client() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let gopath = Path::new("/usr/share/gocode");
            if !gopath.join("src/google.golang.org/grpc").is_dir() {
                return Err(
                    "golang-google-grpc-dev is not installed (scripts/install-deps installs it)"
                        .into(),
                );
            }
            let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let bin = tmp.join("grpc-go-client");
            let out = Command::new("go")
                .args(["build", "-o"])
                .arg(&bin)
                .arg(".")
                .current_dir(repo_root().join("tests/clients/grpc-go"))
                .env("GO111MODULE", "off")
                .env("GOPATH", gopath)
                .env("GOCACHE", tmp.join("gocache"))
                .env("GOFLAGS", "")
                .output()
                .map_err(|e| format!("go (golang-go) cannot run: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building the grpc-go client failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(bin)
        })
        .clone()
}

fn percent_encoded(p: &Path) -> String {
    p.display().to_string().replace('/', "%2F")
}

/// The same transcript through lazypull's client and through `clients`, each with its own
/// snapshot key; every answer equal.
async fn run_all(clients: &[(&str, Client)]) {
    let reg = Registry::with_fixtures(None);
    let d = Daemon::start(&["--no-fill"]);
    let image = format!("{}/busybox:latest", reg.host());
    let missing = format!("{}/not-there:latest", reg.host());
    let want = own(&d, &calls(&image, &missing, "own-key"), "own-key").await;
    sanity(&want);
    for (i, (name, client)) in clients.iter().enumerate() {
        let key = format!("foreign-key-{i}");
        let calls = calls(&image, &missing, &key);
        let got = foreign(&d, &calls, &key, client.as_ref());
        compare(name, &calls, &want, &got);
        eprintln!("{name}: {} answers as lazypull's own client's", got.len());
    }
    assert!(
        !d.log_text().contains('\x1b'),
        "no terminal colour codes in a log that is not a terminal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_dialling_the_socket_path_like_kubelet() {
    if !require_tools() {
        return;
    }
    let bin = match go_client() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let with = |authority: Option<String>| -> Client {
        let bin = bin.clone();
        Box::new(move |socket: &Path| {
            let mut c = Command::new(&bin);
            let a = authority
                .clone()
                .map(|a| a.replace("SOCKET", &percent_encoded(socket)));
            if let Some(a) = a {
                c.arg("-authority").arg(a);
            }
            c.arg(socket);
            c
        })
    };
    run_all(&[
        (
            "grpc-go, authority = socket path (kubelet < 1.30, crictl 1.26)",
            with(None),
        ),
        (
            "grpc-go, authority = percent-encoded path",
            with(Some("SOCKET".into())),
        ),
        (
            "grpc-go, authority = localhost",
            with(Some("localhost".into())),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_with_any_authority() {
    if !require_tools() {
        return;
    }
    let py = match python_grpc() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let script = repo_root().join("tests/clients/grpc_raw.py");
    let with = |authority: Option<&'static str>| -> Client {
        let (py, script) = (py.clone(), script.clone());
        Box::new(move |socket: &Path| {
            let mut c = Command::new(&py);
            c.arg(&script).arg(socket);
            match authority {
                Some("PATH") => c.arg(socket),
                Some("PERCENT") => c.arg(percent_encoded(socket)),
                Some(a) => c.arg(a),
                None => &mut c,
            };
            c
        })
    };
    run_all(&[
        ("grpcio, authority = socket path", with(Some("PATH"))),
        ("grpcio, authority empty", with(Some(""))),
        (
            "grpcio, authority = percent-encoded path",
            with(Some("PERCENT")),
        ),
        ("grpcio, default authority (localhost)", with(None)),
    ])
    .await;
}
