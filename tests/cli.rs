//! The CLI as a user runs it: prefetch (offline and through the daemon), list, status, prune,
//! config validation, JSON logs.

mod common;

use common::*;
use std::process::Command;

macro_rules! need_tools {
    () => {
        if !require_tools() {
            return;
        }
    };
}

fn run(root: &std::path::Path, socket: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("--root")
        .arg(root)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run lazypull");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn offline_prefetch_list_status_prune() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let dir = tempfile::tempdir().unwrap();
    let (root, sock) = (dir.path().join("store"), dir.path().join("none.sock"));
    let h = reg.host();
    let list_file = dir.path().join("images.txt");
    std::fs::write(
        &list_file,
        format!("# images to warm\n{h}/shared-a:latest\n\n{h}/shared-b   # second\n"),
    )
    .unwrap();
    let (ok, _, err) = run(
        &root,
        &sock,
        &[
            "prefetch",
            "--quiet",
            &format!("{h}/multilayer"),
            "--file",
            list_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "prefetch: {err}");
    // Everything is local and complete: the registry can go away.
    drop(reg);
    let (ok, out, _) = run(&root, &sock, &["list", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3, "{v:#}");
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|i| i["complete"] == true && i["fill_percent"] == 100.0)
    );
    let (_, out, _) = run(&root, &sock, &["list", "*shared*"]);
    assert_eq!(out.lines().count(), 3, "header + 2 shared images:\n{out}");
    let (ok, out, _) = run(&root, &sock, &["status", &format!("{h}/multilayer")]);
    assert!(
        ok && out.contains("complete") && out.contains("gzip"),
        "{out}"
    );
    let (ok, _, err) = run(&root, &sock, &["status", "no/such:image"]);
    assert!(!ok && err.contains("no image"), "{err}");

    // prune needs a filter; dry run changes nothing; a real prune frees the blobs.
    let (ok, _, err) = run(&root, &sock, &["prune"]);
    assert!(!ok && err.contains("refusing"), "{err}");
    let (ok, out, _) = run(&root, &sock, &["prune", "*shared-a*", "--dry-run"]);
    assert!(
        ok && out.contains("would remove") && out.contains("shared-a"),
        "{out}"
    );
    let blobs = || {
        std::fs::read_dir(root.join("blobs/sha256"))
            .unwrap()
            .count()
    };
    let before = blobs();
    let (ok, out, err) = run(&root, &sock, &["prune", "*shared-a*"]);
    assert!(ok, "{err}");
    assert!(out.contains("removed 1 image"), "{out}");
    assert!(blobs() < before, "prune freed blobs");
    let (_, out, _) = run(&root, &sock, &["prune", "--unused-for", "1h"]);
    assert!(
        out.contains("0 image(s)"),
        "nothing idle for an hour: {out}"
    );
    let (ok, out, _) = run(&root, &sock, &["prune", "--before", "2999-01-01", "--json"]);
    assert!(ok && out.contains("shared-b"), "{out}");
    let (_, out, _) = run(&root, &sock, &["list", "--json"]);
    assert_eq!(out.trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_and_prune_through_the_daemon() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let d = Daemon::start(&[]);
    let h = reg.host();
    let out = d.cli(&["prefetch", "--quiet", &format!("{h}/big")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon did the pull (it holds the store lock) and it is complete on return.
    assert!(d.log_text().contains("image pulled"));
    let s = d.status_json();
    assert_eq!(s["daemon_running"], true);
    assert!(
        s["images"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] == "complete")
    );
    let out = d.cli(&["pull", &format!("{h}/busybox")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sha256:"));
    let out = d.cli(&["prune", "*big*"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = d.client().await;
    assert!(status(&mut c, &format!("{h}/big")).await.is_none());
    assert!(status(&mut c, &format!("{h}/busybox")).await.is_some());
    let out = d.cli(&["pull", "bad ref"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
}

#[test]
fn config_errors_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "root: /tmp/x\nfetch: {max_parallel: 0}\n").unwrap();
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fetch.max_parallel"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&cfg, "root: /tmp/x\nfetch: {paralel: 3}\n").unwrap();
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap(), "list"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin())
        .args(["serve", "--pull-timeout", "soon"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pull-timeout"));
    let out = Command::new(bin())
        .args(["serve", "--mirror", "nomirror"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("REGISTRY=MIRROR"));

    // JSON logs from a daemon start and SIGTERM.
    let root = dir.path().join("store");
    let sock = dir.path().join("s.sock");
    let child = Command::new(bin())
        .arg("--root")
        .arg(&root)
        .arg("--socket")
        .arg(&sock)
        .args(["--log-format", "json", "serve", "--snapshotter-socket"])
        .arg(dir.path().join("snap.sock"))
        .arg("--fuse-mountpoint")
        .arg(dir.path().join("fs"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A second daemon on the same store is refused with a clear message.
    let out = Command::new(bin())
        .arg("--root")
        .arg(&root)
        .arg("--socket")
        .arg(dir.path().join("t.sock"))
        .args(["serve", "--no-snapshotter"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600,
        "socket is root-only"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let serving = text
        .lines()
        .find(|l| l.contains("serving"))
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(serving)
        .unwrap_or_else(|e| panic!("json log line {serving:?}: {e}\n{text}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every line is JSON:\n{text}"
    );
}

/// `lazypull convert` between OCI layouts with a prefetch list: the listed file, after its
/// parent directory, opens the layer, then the landmark; bad input gets clear errors.
#[test]
fn convert_between_layouts_with_a_prefetch_list_and_bad_input() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let dir = tempfile::tempdir().unwrap();
    let (root, sock) = (dir.path().join("store"), dir.path().join("none.sock"));
    let src = dir.path().join("src");
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{}/multilayer:latest", reg.host()))
        .arg(format!("oci:{}:ref", src.display()))
        .status()
        .unwrap();
    assert!(st.success());
    drop(reg);
    let list = dir.path().join("prefetch.txt");
    std::fs::write(
        &list,
        "# what the app reads first\n/data/random.bin\n/not/there\n",
    )
    .unwrap();
    let dst = dir.path().join("dst");
    let (ok, out, err) = run(
        &root,
        &sock,
        &[
            "convert",
            "--prefetch-files",
            list.to_str().unwrap(),
            &format!("oci:{}:ref", src.display()),
            &format!("oci:{}:esgz", dst.display()),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("2 to prefetch"), "{out}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "esgz"
    );
    let blob = |d: &str| {
        std::fs::read(
            dst.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let mut firsts = vec![];
    for (i, l) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let bytes = blob(l["digest"].as_str().unwrap());
        assert_eq!(lazypull::oci::Digest::of(&bytes).as_str(), l["digest"]);
        let mut tar = vec![];
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&bytes[..]), &mut tar)
            .unwrap();
        assert_eq!(
            lazypull::oci::Digest::of(&tar).as_str(),
            config["rootfs"]["diff_ids"][i],
            "diff ID of layer {i}"
        );
        let names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        firsts.push(names[..names.len().min(3)].join(" "));
    }
    assert!(
        firsts.contains(&"data/ data/random.bin .prefetch.landmark".to_string()),
        "{firsts:?}"
    );
    assert!(
        firsts
            .iter()
            .any(|f| f.starts_with(".no.prefetch.landmark")),
        "{firsts:?}"
    );

    // Bad input: each refused with a message that says what to do.
    let s = format!("oci:{}:ref", src.display());
    let o = format!("oci:{}:x", dir.path().join("o").display());
    for (args, want) in [
        (
            vec!["convert", "--chunk-size", "1", &s, &o],
            "--chunk-size 1",
        ),
        (
            vec!["convert", "oci:/nonexistent/x", &o],
            "is not an OCI image layout",
        ),
        (vec!["convert", &s.replace(":ref", ":nope"), &o], "no image"),
        (vec!["convert", "--record", &s, &o, "--", "true"], "push"),
    ] {
        let (ok, _, err) = run(&root, &sock, &args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    // A layer blob that does not match its digest is refused.
    let m: serde_json::Value = {
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("index.json")).unwrap()).unwrap();
        let d = idx["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        serde_json::from_slice(&std::fs::read(src.join("blobs/sha256").join(d)).unwrap()).unwrap()
    };
    let victim = src.join("blobs/sha256").join(
        m["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let (ok, _, err) = run(&root, &sock, &["convert", &s, &o]);
    assert!(!ok && err.contains("does not match its digest"), "{err}");
}

/// `scripts/install` (what `make install` and `scripts/setup` run) into a staging directory:
/// binary, config, unit and doc where a user looks for them, idempotent, the user's config
/// edits kept; and the make targets call the scripts the README names.
#[test]
fn install_into_a_destdir_and_make_targets() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    let install = || {
        run_ok(
            Command::new(repo_root().join("scripts/install"))
                .args(["--binary", bin(), "--prefix", "/opt/lp", "--destdir"])
                .arg(&dest),
        )
    };
    let changed = install();
    for f in [
        "/opt/lp/bin/lazypull",
        "/etc/lazypull/config.yaml",
        "/etc/systemd/system/lazypull.service",
    ] {
        assert!(changed.lines().any(|l| l == f), "{f} installed: {changed}");
    }
    let staged = |p: &str| dest.join(p.trim_start_matches('/'));
    let unit = std::fs::read_to_string(staged("/etc/systemd/system/lazypull.service")).unwrap();
    assert!(
        unit.contains(
            "\nExecStart=/opt/lp/bin/lazypull --config /etc/lazypull/config.yaml serve\n"
        ),
        "{unit}"
    );
    assert!(unit.contains("KillMode=process"), "{unit}");
    assert!(staged("/opt/lp/share/doc/lazypull/README.md").exists());
    // The installed binary runs and accepts the installed config.
    let conf = staged("/etc/lazypull/config.yaml");
    run_ok(
        Command::new(staged("/opt/lp/bin/lazypull"))
            .arg("--config")
            .arg(&conf)
            .arg("--root")
            .arg(dir.path().join("store"))
            .args(["list", "--json"]),
    );
    // Again: nothing changes, and a user's edit of the config is kept.
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("# edited by the user\n");
    std::fs::write(&conf, &text).unwrap();
    assert_eq!(install(), "", "a second install changes nothing");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);

    // The make targets are the scripts (make itself is run by .ci/run: release build, install).
    if Command::new("make").arg("--version").output().is_err() {
        eprintln!("SKIP (make targets): make is not installed (scripts/install-deps installs it)");
        return;
    }
    let dry = |args: &[&str]| {
        let out = Command::new("make")
            .arg("-n")
            .args(args)
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(dry(&["test"]).contains("scripts/test"));
    assert!(dry(&["build"]).contains("cargo build --release"));
    assert!(
        dry(&[]).contains("cargo build --release"),
        "make = make build"
    );
    assert!(dry(&["fmt"]).contains("cargo fmt"));
    assert!(dry(&["clean"]).contains("cargo clean"));
    let i = dry(&["install", "DESTDIR=/tmp/stage", "PREFIX=/opt/lp"]);
    assert!(
        i.contains(
            "scripts/install --binary target/release/lazypull --prefix /opt/lp --destdir /tmp/stage"
        ),
        "{i}"
    );
}
