//! Integration-test harness: real `docker-registry` processes on free ports with temp storage,
//! fixture images built locally (scripts/make-fixtures.sh), and `lazypull serve` on temp paths.
//! Everything started here is torn down on drop.
#![allow(dead_code)]

use lazypull::rpc::cri::{self, image_service_client::ImageServiceClient};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Skip (with the reason printed) when the system tools the harness needs are missing.
pub fn require_tools() -> bool {
    for t in ["docker-registry", "skopeo", "umoci", "jq", "openssl"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            eprintln!("SKIP: {t} not installed (run .ci/run or scripts/install-deps)");
            return false;
        }
    }
    true
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_http(port: u16, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("registry on port {port} did not come up within {timeout:?}");
}

/// Releases the hold of [`Netem::held`].
pub struct Gate {
    _dir: tempfile::TempDir,
    file: PathBuf,
}

impl Gate {
    pub fn release(&self) {
        std::fs::write(&self.file, b"").expect("release the proxy's hold");
    }
}

pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    /// The registry's process (tests stop it with SIGSTOP to make it stall).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }
    /// Requests the registry logged for `GET /v2/<repo>/blobs/<digest>` (access log lines).
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("127.0.0.1 ") && l.contains(&needle))
            .count()
    }
    /// All blob GETs for any digest in `repo`.
    pub fn all_blob_gets(&self) -> usize {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.starts_with("127.0.0.1 ") && l.contains("/blobs/sha256:") && l.contains("\"GET ")
            })
            .count()
    }

    /// Start a registry whose storage is a copy of the fixture seed (all fixture images present).
    pub fn with_fixtures(htpasswd: Option<&Path>) -> Registry {
        let seed = seed_storage();
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("cp")
            .arg("-al")
            .arg(seed.join("docker"))
            .arg(dir.path())
            .status()
            .expect("cp");
        assert!(st.success(), "copying the seed registry storage failed");
        Self::start_in(dir, htpasswd)
    }

    pub fn empty(htpasswd: Option<&Path>) -> Registry {
        Self::start_in(tempfile::tempdir().expect("tempdir"), htpasswd)
    }

    /// An empty registry that accepts only bearer tokens from `issuer`.
    pub fn with_token_auth(issuer: &TokenIssuer) -> Registry {
        let auth = format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            issuer.port,
            TokenIssuer::SERVICE,
            TokenIssuer::ISSUER,
            issuer.cert.display()
        );
        Self::start_with_auth(tempfile::tempdir().expect("tempdir"), auth)
    }

    /// An empty registry serving HTTPS with the given certificate.
    pub fn with_tls(cert: &Path, key: &Path) -> Registry {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
        Self::start_with_auth(tempfile::tempdir().expect("tempdir"), tls)
    }

    /// An empty registry serving HTTPS that accepts only clients with a certificate `ca`
    /// signed (mTLS).
    pub fn with_mtls(cert: &Path, key: &Path, ca: &Path) -> Registry {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n    clientcas:\n      - {}\n",
            cert.display(),
            key.display(),
            ca.display()
        );
        Self::start_with_auth(tempfile::tempdir().expect("tempdir"), tls)
    }

    fn start_in(dir: tempfile::TempDir, htpasswd: Option<&Path>) -> Registry {
        let auth = match htpasswd {
            Some(p) => format!(
                "auth:\n  htpasswd:\n    realm: lazypull-test\n    path: {}\n",
                p.display()
            ),
            None => String::new(),
        };
        Self::start_with_auth(dir, auth)
    }

    fn start_with_auth(dir: tempfile::TempDir, auth: String) -> Registry {
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        wait_http(port, Duration::from_secs(20));
        Registry { port, dir, child }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Restart on the same port and storage (after `stop`).
    pub fn restart(&mut self) {
        let cfg = self.dir.path().join("config.yml");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log())
            .expect("log");
        self.child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("restart docker-registry");
        wait_http(self.port, Duration::from_secs(20));
    }

    /// Copy an image inside this registry (e.g. to `library/busybox` for short-name tests).
    pub fn copy(&self, from: &str, to: &str) {
        let h = self.host();
        skopeo_copy(
            &format!("{h}/{from}"),
            &format!("{h}/{to}"),
            &["--all", "--preserve-digests"],
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Build the fixture images once (per checkout and script version) into a registry storage dir.
fn seed_storage() -> PathBuf {
    static SEED: OnceLock<PathBuf> = OnceLock::new();
    SEED.get_or_init(|| {
        let script = repo_root().join("scripts/make-fixtures.sh");
        let text = std::fs::read(&script).expect("read make-fixtures.sh");
        let stamp = format!(
            "{:x}",
            text.iter()
                .fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64)
                    .wrapping_mul(0x100000001b3))
        );
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fixture-seed-{stamp}"));
        let done = base.join("done");
        if done.exists() {
            return base;
        }
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("seed dir");
        let storage = tempfile::tempdir_in(&base).expect("tmp");
        let reg = Registry::start_in(storage, None);
        let out = Command::new("bash")
            .arg(&script)
            .args(["--registry", &reg.host(), "--big-mib", "32"])
            .output()
            .expect("run make-fixtures.sh");
        assert!(
            out.status.success(),
            "make-fixtures.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut reg = reg;
        reg.stop();
        std::fs::rename(reg.dir.path().join("docker"), base.join("docker")).expect("keep seed");
        std::fs::write(&done, b"ok").expect("marker");
        base
    })
    .clone()
}

pub struct Daemon {
    pub root: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lazypull")
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let root = tempfile::tempdir().expect("tempdir");
        let socket = root.path().join("cri.sock");
        let log = root.path().join("daemon.log");
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut d = Daemon {
            socket,
            log,
            child: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            root,
            env,
        };
        d.spawn();
        d
    }

    pub fn store(&self) -> PathBuf {
        self.root.path().join("store")
    }

    /// Where the store keeps the complete blob `digest` (`sha256:…`).
    pub fn blob(&self, digest: &str) -> PathBuf {
        self.store()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// The snapshotter socket the harness gives the daemon (unless the test chose one).
    pub fn snapshotter_socket(&self) -> PathBuf {
        match self.args.iter().position(|a| a == "--snapshotter-socket") {
            Some(i) => PathBuf::from(&self.args[i + 1]),
            None => self.root.path().join("snapshotter.sock"),
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(bin())
            .arg("--root")
            .arg(self.store())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--log-level")
            .arg("debug")
            .arg("serve")
            .args(&self.args)
            .args(
                if self
                    .args
                    .iter()
                    .any(|a| a == "--fuse-mountpoint" || a == "--no-fuse")
                {
                    vec![]
                } else {
                    vec![
                        "--fuse-mountpoint".to_string(),
                        self.root.path().join("fs").display().to_string(),
                    ]
                },
            )
            .args(
                if self
                    .args
                    .iter()
                    .any(|a| a == "--snapshotter-socket" || a == "--no-snapshotter")
                {
                    vec![]
                } else {
                    vec![
                        "--snapshotter-socket".to_string(),
                        self.snapshotter_socket().display().to_string(),
                    ]
                },
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start lazypull serve");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("lazypull serve exited with {st}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "lazypull serve did not listen within 20s:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe_kill(c.id() as i32, 15);
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!(
                    "daemon did not stop within 30s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the daemon to exit by itself (e.g. after an admin stop).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                panic!(
                    "daemon did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }

    /// Restart with other `serve` arguments (same store, socket and log).
    pub fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    pub async fn client(&self) -> ImageServiceClient<tonic::transport::Channel> {
        ImageServiceClient::new(
            lazypull::rpc::connect_unix(&self.socket)
                .await
                .expect("connect to daemon"),
        )
    }

    /// Run a CLI subcommand against this daemon's store and socket.
    /// `lazypull ARGS...` against this daemon, asserting success; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "lazypull {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .arg("--root")
            .arg(self.store())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run lazypull")
    }

    /// `lazypull status --json` parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Wait until every layer of every image is complete.
    pub fn wait_complete(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let s = self.status_json();
            let images = s["images"].as_array().cloned().unwrap_or_default();
            let all = images.iter().all(|i| {
                i["layers"]
                    .as_array()
                    // `mode` is complete once a plain layer is also unpacked and its index
                    // stored, which happens after its blob is (`state`).
                    .is_some_and(|ls| {
                        ls.iter()
                            .all(|l| l["state"] == "complete" && l["mode"] == "complete")
                    })
            });
            if all && !images.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "fills not complete after {timeout:?}: {s:#}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Daemon {
    /// The daemon's FUSE mountpoint (the harness default, or the one given).
    pub fn fuse_mountpoint(&self) -> Option<PathBuf> {
        if self.args.iter().any(|a| a == "--no-fuse") {
            return None;
        }
        let given = self
            .args
            .iter()
            .position(|a| a == "--fuse-mountpoint")
            .and_then(|i| self.args.get(i + 1));
        Some(
            given
                .map(PathBuf::from)
                .unwrap_or_else(|| self.root.path().join("fs")),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed daemon leaves its FUSE mount to its fuse holder: detach it (by syscall, as
        // umount(8) may stat it first and wait for a daemon that is gone). The holder sees the
        // mount go and exits, which ends the connection and fails any read still waiting.
        if let Some(mp) = self.fuse_mountpoint() {
            let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

pub async fn pull(
    c: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
) -> Result<String, tonic::Status> {
    c.pull_image(cri::PullImageRequest {
        image: spec(image),
        auth: None,
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

/// PullImage with a username and password in the request's AuthConfig.
pub async fn pull_as(
    c: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
    username: &str,
    password: &str,
) -> Result<String, tonic::Status> {
    c.pull_image(cri::PullImageRequest {
        image: spec(image),
        auth: Some(cri::AuthConfig {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        }),
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

pub async fn status(
    c: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
) -> Option<cri::Image> {
    c.image_status(cri::ImageStatusRequest {
        image: spec(image),
        verbose: false,
    })
    .await
    .expect("ImageStatus")
    .into_inner()
    .image
}

pub async fn remove(
    c: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
) -> Result<(), tonic::Status> {
    c.remove_image(cri::RemoveImageRequest { image: spec(image) })
        .await
        .map(|_| ())
}

pub async fn list(c: &mut ImageServiceClient<tonic::transport::Channel>) -> Vec<cri::Image> {
    c.list_images(cri::ListImagesRequest { filter: None })
        .await
        .expect("ListImages")
        .into_inner()
        .images
}

/// The manifest of `repo:latest` as the registry serves it (via skopeo).
fn manifest_of(reg: &Registry, repo: &str) -> serde_json::Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{}/{repo}:latest", reg.host()))
        .output()
        .expect("skopeo inspect");
    serde_json::from_slice(&out.stdout).expect("manifest json")
}

/// Layer digests of `repo:latest`, in order.
pub fn layer_digests(reg: &Registry, repo: &str) -> Vec<String> {
    manifest_of(reg, repo)["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Layer digests and sizes of `repo:latest`, in order.
pub fn layer_sizes(reg: &Registry, repo: &str) -> Vec<(String, u64)> {
    manifest_of(reg, repo)["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap_or_default().to_string(),
                l["size"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Bytes of blob `digest` the registry sent, in as many range requests as it took (the filler
/// fetches in bounded requests): "fetched once" means this equals the blob's size.
pub fn bytes_served(reg: &Registry, repo: &str, digest: &str) -> u64 {
    served(reg, repo, digest).0
}

pub fn config_digest(reg: &Registry, repo: &str) -> String {
    manifest_of(reg, repo)["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string()
}

/// `skopeo copy` between two registry references (`HOST/REPO:TAG`), TLS verification off.
pub fn skopeo_copy(src: &str, dst: &str, extra: &[&str]) {
    let st = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .args(extra)
        .arg(format!("docker://{src}"))
        .arg(format!("docker://{dst}"))
        .status()
        .expect("skopeo");
    assert!(st.success(), "skopeo copy {src} -> {dst}");
}

/// The project's network-emulation proxy in front of a registry.
pub struct Netem {
    pub port: u16,
    child: Child,
}

impl Netem {
    /// A proxy at `mbit` that holds each connection's download after `budget` bytes until
    /// the returned gate is released: a test then knows a long download cannot have finished,
    /// however loaded the machine.
    pub fn held(upstream: &str, mbit: u32, budget: u64) -> (Netem, Gate) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("release");
        let (mbit, budget, until) = (
            mbit.to_string(),
            budget.to_string(),
            file.display().to_string(),
        );
        let proxy = Netem::start(
            upstream,
            &[
                "--mbit",
                &mbit,
                "--hold-after",
                &budget,
                "--hold-until",
                &until,
            ],
        );
        (proxy, Gate { _dir: dir, file })
    }

    pub fn start(upstream: &str, args: &[&str]) -> Netem {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_lazypull-netem"))
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lazypull-netem");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("netem banner");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("netem port");
        Netem { port, child }
    }
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes of `layer` held locally, from `lazypull status --json`.
pub fn layer_local(d: &Daemon, layer: &str) -> (u64, String, Option<String>) {
    let s = d.status_json();
    for i in s["images"].as_array().cloned().unwrap_or_default() {
        for l in i["layers"].as_array().cloned().unwrap_or_default() {
            if l["digest"] == layer {
                return (
                    l["filled"].as_u64().unwrap_or(0),
                    l["state"].as_str().unwrap_or("").to_string(),
                    l["error"].as_str().map(str::to_string),
                );
            }
        }
    }
    (0, String::new(), None)
}

pub fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    format!(
        "sha256:{}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
    )
}

/// containerd (Debian's 1.6) on a temp root with its CRI plugin, for comparing CRI answers.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

impl Containerd {
    pub fn available() -> bool {
        let ok = Command::new("sh")
            .arg("-c")
            .arg("command -v containerd")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIP: containerd not installed (apt-get install containerd)");
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        if !root {
            eprintln!("SKIP: containerd tests need root");
        }
        ok && root
    }

    /// Start containerd trusting the given plain-HTTP registries.
    pub fn start(http_registries: &[String]) -> Containerd {
        Self::start_with(http_registries, "", "")
    }

    /// Containerd with lazypull as its proxy snapshotter `lazypull` (and its CRI plugin set to
    /// use it, with the layer labels on).
    pub fn start_with_snapshotter(http_registries: &[String], socket: &Path) -> Containerd {
        Self::start_with_snapshotter_and_sandbox(http_registries, socket, "")
    }

    /// Like [`Containerd::start_with_snapshotter`], with the CRI plugin's pod sandbox image
    /// (`sandbox_image`; "" keeps containerd's default).
    pub fn start_with_snapshotter_and_sandbox(
        http_registries: &[String],
        socket: &Path,
        sandbox_image: &str,
    ) -> Containerd {
        // Test machines may be containers themselves, without CAP_SYS_RESOURCE: the sandbox's
        // default oom_score_adj (-998) would be refused.
        let mut cri_keys = "  restrict_oom_score_adj = true\n".to_string();
        if !sandbox_image.is_empty() {
            cri_keys.push_str(&format!("  sandbox_image = \"{sandbox_image}\"\n"));
        }
        Self::start_with(
            http_registries,
            &cri_keys,
            &format!(
                "    snapshotter = \"lazypull\"\n    disable_snapshot_annotations = false\n[proxy_plugins]\n  [proxy_plugins.lazypull]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                socket.display()
            ),
        )
    }

    /// `ctr ARGS...` against this containerd, asserting success; returns stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_output(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until containerd reaches the `lazypull` proxy snapshotter again (after a restart
    /// of the daemon: containerd redials with a backoff, and fails requests meanwhile). Only a
    /// request that reaches the plugin tells: `snapshots ls` is answered from containerd's
    /// metadata. A probe snapshot is prepared and removed.
    pub fn wait_snapshotter(&self, timeout: Duration) {
        let start = Instant::now();
        for n in 0.. {
            let key = format!("lazypull-probe-{n}");
            let out = self.ctr_output(&["snapshots", "--snapshotter", "lazypull", "prepare", &key]);
            if out.status.success() {
                self.ctr(&["snapshots", "--snapshotter", "lazypull", "rm", &key]);
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "containerd did not reach the snapshotter within {timeout:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ctr-remote images rpull --plain-http --snapshotter lazypull IMAGE`: layers as remote
    /// snapshots of lazypull's snapshotter.
    pub fn rpull_lazy(&self, image: &str) -> String {
        ctr_remote(
            self,
            &[
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "lazypull",
                image,
            ],
        )
    }

    /// `ctr run --rm --snapshotter lazypull IMAGE NAME CMD...`: its output.
    pub fn run_lazy(&self, image: &str, name: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "lazypull", image, name];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    pub fn ctr_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("ctr")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `cri_keys` go into the CRI plugin's table; `extra` is appended inside its `containerd`
    /// table, so it may set keys there and then open new tables.
    fn start_with(http_registries: &[String], cri_keys: &str, extra: &str) -> Containerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        for r in http_registries {
            let d = p.join("certs.d").join(r);
            std::fs::create_dir_all(&d).expect("certs.d");
            std::fs::write(d.join("hosts.toml"), format!("server = \"http://{r}\"\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n")).expect("hosts.toml");
        }
        let socket = p.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{1}\"\n[plugins.\"io.containerd.grpc.v1.cri\"]\n{3}  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{0}/certs.d\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n{2}",
            p.display(),
            socket.display(),
            extra,
            cri_keys
        );
        std::fs::write(p.join("config.toml"), config).expect("config");
        let log = std::fs::File::create(p.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(p.join("config.toml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Containerd { dir, socket, child }
    }

    pub async fn images(&self) -> ImageServiceClient<tonic::transport::Channel> {
        let start = Instant::now();
        loop {
            match lazypull::rpc::connect_unix(&self.socket).await {
                Ok(ch) => return ImageServiceClient::new(ch),
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "connect containerd: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Unmount anything containerd left under its temp state.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.path().display()
            ))
            .status();
    }
}

/// A bearer-token issuer for docker-registry's token auth: checks Basic credentials and mints
/// RS256 JWTs (x5c header; the self-signed cert is the registry's root bundle), signed with the
/// openssl CLI. Counts token requests.
pub struct TokenIssuer {
    pub port: u16,
    pub cert: PathBuf,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl TokenIssuer {
    pub const SERVICE: &'static str = "lazypull-test";
    pub const ISSUER: &'static str = "lazypull-test-issuer";

    pub fn start(user: &str, password: &str) -> TokenIssuer {
        use base64::Engine as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=lazypull-test-issuer",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl req");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("openssl x509")
            .stdout;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let (counter, key2) = (requests.clone(), key.clone());
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = Self::answer(&mut stream, &expected, &key2, &x5c);
            }
        });
        TokenIssuer {
            port,
            cert,
            requests,
            _dir: dir,
        }
    }

    fn answer(
        stream: &mut std::net::TcpStream,
        expected: &str,
        key: &Path,
        x5c: &str,
    ) -> std::io::Result<()> {
        use base64::Engine as _;
        use std::io::{BufRead, Write};
        let mut reader = std::io::BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut authorized = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("authorization")
            {
                authorized = v.trim() == expected;
            }
        }
        if !authorized {
            return stream.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        // scope=repository:NAME:pull
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let scope = path
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("scope="))
            .unwrap_or_default()
            .replace("%3A", ":")
            .replace("%2F", "/");
        let repo = scope
            .strip_prefix("repository:")
            .and_then(|s| s.rsplit_once(':'))
            .map(|(r, _)| r.to_string())
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
        let claims = serde_json::json!({
            "iss": Self::ISSUER, "sub": "alice", "aud": Self::SERVICE, "exp": now + 600, "nbf": now - 60, "iat": now,
            "jti": format!("{now}-{}", std::process::id()),
            "access": [{"type": "repository", "name": repo, "actions": ["pull", "push"]}],
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(signing_input.as_bytes())?;
        let sig = child.wait_with_output()?.stdout;
        let token = format!("{signing_input}.{}", b64(&sig));
        let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 600})
            .to_string();
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// Push an image built here: one layer made of `tar` in the given compression ("gzip", "zstd",
/// "none"), a config labelled `label` (so ids differ). Returns the config digest.
pub async fn push_built_image(
    reg: &Registry,
    repo: &str,
    tar: &[u8],
    compression: &str,
    label: &str,
) -> String {
    push_built_image_claiming(reg, repo, tar, tar, compression, label).await
}

/// Push `repo:latest` made of these uncompressed layer tars (gzip each, bottom first).
/// Returns the config digest.
pub async fn push_layers(reg: &Registry, repo: &str, tars: &[Vec<u8>]) -> String {
    let refs: Vec<&[u8]> = tars.iter().map(Vec::as_slice).collect();
    push_image(reg, repo, &refs, &refs, "gzip", repo).await
}

/// Push `repo:latest` of one layer tar compressed as `compression` (`gzip`, `zstd`,
/// `zstd-frames`: a zstd frame per MiB, or anything else: uncompressed).
pub async fn push_layer_as(reg: &Registry, repo: &str, tar: &[u8], compression: &str) -> String {
    push_image(reg, repo, &[tar], &[tar], compression, repo).await
}

/// Like [`push_built_image`], but the config's diff_id is that of `claimed` (to test that a
/// layer whose content does not match its diff_id is refused).
pub async fn push_built_image_claiming(
    reg: &Registry,
    repo: &str,
    tar: &[u8],
    claimed: &[u8],
    compression: &str,
    label: &str,
) -> String {
    push_image(reg, repo, &[tar], &[claimed], compression, label).await
}

async fn push_image(
    reg: &Registry,
    repo: &str,
    tars: &[&[u8]],
    claimed: &[&[u8]],
    compression: &str,
    label: &str,
) -> String {
    use sha2::Digest as _;
    use std::io::Write;
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    let compress = |tar: &[u8]| match compression {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("gzip");
            (
                e.finish().expect("gzip"),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        "zstd" => (
            zstd::encode_all(tar, 3).expect("zstd"),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        // One zstd frame per MiB of tar, concatenated (what pzstd writes).
        "zstd-frames" => (
            tar.chunks(1 << 20)
                .flat_map(|c| zstd::encode_all(c, 3).expect("zstd"))
                .collect(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        _ => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
    };
    let layers: Vec<(Vec<u8>, &str)> = tars.iter().map(|t| compress(t)).collect();
    let diff_ids: Vec<String> = claimed.iter().map(|c| digest(c)).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": {"lazypull.test": label}, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes();
    let descriptors: Vec<serde_json::Value> = layers
        .iter()
        .map(|(l, mt)| serde_json::json!({"mediaType": mt, "digest": digest(l), "size": l.len()}))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": descriptors,
    })
    .to_string()
    .into_bytes();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let r: oci_client::Reference = format!("{}/{repo}:latest", reg.host())
        .parse()
        .expect("reference");
    client
        .store_auth_if_needed(
            r.resolve_registry(),
            &oci_client::secrets::RegistryAuth::Anonymous,
        )
        .await;
    for (layer, _) in &layers {
        client
            .push_blob(&r, layer.clone(), &digest(layer))
            .await
            .expect("push layer");
    }
    client
        .push_blob(&r, config.clone(), &digest(&config))
        .await
        .expect("push config");
    client
        .push_manifest_raw(
            &r,
            manifest,
            "application/vnd.oci.image.manifest.v1+json"
                .parse()
                .expect("header"),
        )
        .await
        .expect("push manifest");
    digest(&config)
}

/// The uncompressed tar of `repo`'s first layer (downloaded from the registry).
pub fn first_layer_tar(reg: &Registry, repo: &str) -> Vec<u8> {
    use std::io::Read;
    let l = &layer_digests(reg, repo)[0];
    let out = Command::new("curl")
        .args(["-sf"])
        .arg(format!("http://{}/v2/{repo}/blobs/{l}", reg.host()))
        .output()
        .expect("curl");
    assert!(out.status.success(), "download layer");
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&out.stdout[..])
        .read_to_end(&mut tar)
        .expect("gunzip");
    tar
}

/// A minimal registry front that requires basic auth, proxies manifests and configs to a real
/// registry, and answers layer GETs with a 307 redirect to a second host (127.0.0.2, another
/// "storage backend") which records whether credentials reached it.
pub struct RedirectingRegistry {
    pub port: u16,
    pub storage_port: u16,
    pub storage_saw_auth: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub storage_requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn read_request(stream: &mut std::net::TcpStream) -> Option<(String, Vec<(String, String)>)> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = vec![];
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some((path, headers))
}

fn respond(
    stream: &mut std::net::TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) {
    use std::io::Write;
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn fetch(url: &str, accept: Option<&str>) -> (Vec<u8>, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "-D", "/dev/stderr"]);
    if let Some(a) = accept {
        cmd.args(["-H", &format!("Accept: {a}")]);
    }
    let out = cmd.arg(url).output().expect("curl");
    let ct = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (out.stdout, ct)
}

impl RedirectingRegistry {
    pub fn start(upstream: String, user: &str, password: &str) -> RedirectingRegistry {
        use base64::Engine as _;
        use std::sync::atomic::Ordering;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let front = TcpListener::bind("127.0.0.1:0").expect("bind");
        let storage = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        let (port, storage_port) = (
            front.local_addr().expect("addr").port(),
            storage.local_addr().expect("addr").port(),
        );
        let saw_auth = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let up = upstream.clone();
        std::thread::spawn(move || {
            for s in front.incoming() {
                let Ok(mut s) = s else { continue };
                let Some((path, headers)) = read_request(&mut s) else {
                    continue;
                };
                let authed = headers
                    .iter()
                    .any(|(k, v)| k == "authorization" && *v == expected);
                if !authed {
                    respond(
                        &mut s,
                        "401 Unauthorized",
                        &[("WWW-Authenticate", "Basic realm=\"redirect-test\"".into())],
                        b"",
                    );
                    continue;
                }
                if path == "/v2/" {
                    respond(&mut s, "200 OK", &[], b"{}");
                } else if path.contains("/manifests/") {
                    let accept = headers
                        .iter()
                        .filter(|(k, _)| k == "accept")
                        .map(|(_, v)| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ");
                    let (body, ct) = fetch(&format!("http://{up}{path}"), Some(&accept));
                    respond(&mut s, "200 OK", &[("Content-Type", ct)], &body);
                } else if path.contains("/blobs/") {
                    let loc = format!("http://127.0.0.2:{storage_port}{path}");
                    respond(&mut s, "307 Temporary Redirect", &[("Location", loc)], b"");
                } else {
                    respond(&mut s, "404 Not Found", &[], b"");
                }
            }
        });
        let (sa, rq) = (saw_auth.clone(), requests.clone());
        std::thread::spawn(move || {
            for s in storage.incoming() {
                let Ok(mut s) = s else { continue };
                let Some((path, headers)) = read_request(&mut s) else {
                    continue;
                };
                rq.fetch_add(1, Ordering::SeqCst);
                if headers.iter().any(|(k, _)| k == "authorization") {
                    sa.fetch_add(1, Ordering::SeqCst);
                }
                let (body, _) = fetch(&format!("http://{upstream}{path}"), None);
                respond(
                    &mut s,
                    "200 OK",
                    &[("Content-Type", "application/octet-stream".into())],
                    &body,
                );
            }
        });
        RedirectingRegistry {
            port,
            storage_port,
            storage_saw_auth: saw_auth,
            storage_requests: requests,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Convert `REG/src` to eStargz with Debian's `ctr-remote` (an independent implementation)
/// through `ctd`, and push it as `REG/dst`. False (with the reason printed) when unavailable.
pub fn ctr_remote_convert(reg: &Registry, ctd: &Containerd, src: &str, dst: &str) -> bool {
    ctr_remote_convert_with(reg, ctd, src, dst, &[])
}

/// Like [`ctr_remote_convert`], with extra `convert` flags (e.g. `--estargz-record-in FILE`).
pub fn ctr_remote_convert_with(
    reg: &Registry,
    ctd: &Containerd,
    src: &str,
    dst: &str,
    extra: &[&str],
) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg("command -v ctr-remote")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: ctr-remote not installed (apt-get install stargz-snapshotter)");
        return false;
    }
    let (h, sock) = (reg.host(), ctd.socket.to_string_lossy().to_string());
    let steps: [Vec<String>; 3] = [
        vec![
            "images".into(),
            "pull".into(),
            "--plain-http".into(),
            format!("{h}/{src}"),
        ],
        vec![
            "images".into(),
            "convert".into(),
            "--estargz".into(),
            "--oci".into(),
        ]
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .chain([format!("{h}/{src}"), format!("{h}/{dst}")])
        .collect(),
        vec![
            "images".into(),
            "push".into(),
            "--plain-http".into(),
            format!("{h}/{dst}"),
        ],
    ];
    for (n, args) in steps.iter().enumerate() {
        // The push reads the converted blobs back from containerd's content store, and on a
        // loaded machine containerd has answered it "unexpected EOF" (in two clean-clone CI runs,
        // once under stress-registration): a fixture's setup, not what a test checks, so the
        // push is tried again.
        let attempts = if n == 2 { 3 } else { 1 };
        for attempt in 1..=attempts {
            let out = Command::new("ctr-remote")
                .args(["-a", &sock])
                .args(args)
                .output()
                .expect("ctr-remote");
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(attempt < attempts, "ctr-remote {args:?}: {err}");
            eprintln!("ctr-remote {args:?} failed (attempt {attempt}), again: {err}");
        }
    }
    true
}

/// The raw manifest of `repo:tag`.
pub fn raw_manifest(reg: &Registry, repo_tag: &str) -> serde_json::Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{}/{repo_tag}", reg.host()))
        .output()
        .expect("skopeo inspect");
    serde_json::from_slice(&out.stdout).expect("manifest json")
}

/// Bytes the registry sent for GETs of one blob (access log: `"GET ..." STATUS BYTES`), and
/// whether any was a full (200) answer.
pub fn served(reg: &Registry, repo: &str, digest: &str) -> (u64, usize, bool) {
    let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
    let log = std::fs::read_to_string(reg.log()).unwrap_or_default();
    let (mut bytes, mut n, mut full) = (0, 0, false);
    for l in log
        .lines()
        .filter(|l| l.starts_with("127.0.0.1 ") && l.contains(&needle))
    {
        let after = l.split("HTTP/1.1\" ").nth(1).unwrap_or_default();
        let mut f = after.split_whitespace();
        let status = f.next().unwrap_or_default();
        bytes += f.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
        n += 1;
        full |= status == "200";
    }
    (bytes, n, full)
}

/// `ctr-remote -a SOCKET ARGS...`, asserting success (with containerd's log on failure);
/// returns stdout.
pub fn ctr_remote(ctd: &Containerd, args: &[&str]) -> String {
    let out = Command::new("ctr-remote")
        .arg("-a")
        .arg(&ctd.socket)
        .args(args)
        .output()
        .expect("ctr-remote");
    assert!(
        out.status.success(),
        "ctr-remote {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Push the Debian bookworm + python3 image to `reg` as `py:gzip` and `py:esgz` (eStargz by
/// ctr-remote) with scripts/make-python-image.sh (debootstrap, cached across runs in
/// /var/tmp/lazypull-python). False (with the reason printed) when it cannot be built here.
pub fn python_image(reg: &Registry) -> bool {
    let have = |tool: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for tool in ["debootstrap", "ctr-remote", "umoci"] {
        if !have(tool) {
            eprintln!("SKIP: {tool} not installed (scripts/install-deps installs it)");
            return false;
        }
    }
    let out = Command::new(repo_root().join("scripts/make-python-image.sh"))
        .args(["--registry", &reg.host()])
        .output()
        .expect("scripts/make-python-image.sh");
    assert!(
        out.status.success(),
        "make-python-image.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// `GET /metrics` from a daemon's Prometheus endpoint (`--metrics-listen ADDR`).
pub fn metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of metric `name` (without labels) in `metrics` text.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in\n{metrics}"))
}

/// Poll `f` every 50 ms until it holds; fail after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `cmd` and return its stdout; fail the test with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lazypull convert HOST/from HOST/to EXTRA...` in `reg`, with a throwaway store.
pub fn lazypull_convert(reg: &Registry, from: &str, to: &str, extra: &[&str]) {
    let store = tempfile::tempdir().expect("tempdir");
    let h = reg.host();
    run_ok(
        Command::new(bin())
            .arg("--root")
            .arg(store.path())
            .arg("convert")
            .args(extra)
            .args([format!("{h}/{from}"), format!("{h}/{to}")]),
    );
}

/// A tar of `(path, content)` entries in the order given; a path ending in `/` is a directory,
/// content starting with `->` a symlink, an ELF file executable.
pub fn tar_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        if let Some(dir) = path.strip_suffix('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, dir, std::io::empty()).unwrap();
        } else if let Some(target) = content.strip_prefix(b"->") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, path, std::str::from_utf8(target).unwrap())
                .unwrap();
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            // Executables (ELF) runnable.
            h.set_mode(if content.starts_with(b"\x7fELF") {
                0o755
            } else {
                0o644
            });
            h.set_size(content.len() as u64);
            b.append_data(&mut h, path, content.as_slice()).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// Incompressible bytes (xorshift), the same for a seed.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A throw-away CA (`ca.pem`), a server certificate for 127.0.0.1 (`cert.pem`, `key.pem`) and a
/// client certificate (`client.pem`, `client.key`) it signed, made with openssl in `dir`.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub fn make_certs(dir: &Path) -> Certs {
    let script = format!(
        "set -e; cd {d}; openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=lazypull-test-ca -keyout ca.key -out ca.pem; \
         openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr; \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext; \
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out cert.pem; \
         openssl req -newkey rsa:2048 -nodes -subj /CN=lazypull-test-client -keyout client.key -out client.csr; \
         printf 'basicConstraints=CA:FALSE\\nextendedKeyUsage=clientAuth\\n' > cext; \
         openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile cext -out client.pem",
        d = dir.display()
    );
    let st = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stderr(Stdio::null())
        .status()
        .expect("sh");
    assert!(st.success(), "make the CA and certificates");
    Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// Push `repo:latest`: one layer holding the file `path` (in its one directory).
pub async fn push_one_file(reg: &Registry, repo: &str, path: &str, content: Vec<u8>) {
    let dir = format!("{}/", path.split('/').next().unwrap_or_default());
    push_layers(
        reg,
        repo,
        &[tar_of(&[(dir.as_str(), vec![]), (path, content)])],
    )
    .await;
}
