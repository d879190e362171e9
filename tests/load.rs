//! `lazypull load`: images from the archives real tools write (skopeo's docker-archive, which
//! is docker save's classic form, its oci-archive, and an OCI layout directory), with the
//! registry gone, offline and through the daemon; what was loaded runs from a mount and the
//! air-gapped mirror serves it to skopeo. A corrupted archive registers nothing.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn skopeo_to(from: &str, to: &str) {
    let out = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{from}"))
        .arg(to)
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `lazypull --root ROOT ARGS` with no daemon.
fn offline(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("--root")
        .arg(root)
        .arg("--socket")
        .arg(root.join("no-daemon.sock"))
        .args(args)
        .output()
        .expect("run lazypull")
}

fn stdout_ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names and layer modes of every image in `status --json`.
fn images(status: &serde_json::Value) -> Vec<(Vec<String>, Vec<String>)> {
    status["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let names = i["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            let modes = i["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["mode"].as_str().unwrap().to_string())
                .collect();
            (names, modes)
        })
        .collect()
}

#[test]
fn offline_load_of_docker_and_oci_archives_with_the_registry_gone() {
    if !require_tools() {
        return;
    }
    let mut reg = Registry::with_fixtures(None);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let src = format!("{}/multilayer:latest", reg.host());
    skopeo_to(
        &src,
        &format!("docker-archive:{}/dk.tar:busybox:1.36", w.display()),
    );
    skopeo_to(&src, &format!("oci:{}/layout:latest", w.display()));
    // containerd's export (an OCI archive naming the image with its annotations).
    let ctd = Containerd::available().then(|| {
        let c = Containerd::start(&[reg.host()]);
        c.ctr(&["images", "pull", "--plain-http", &src]);
        let out = w.join("ctr.tar");
        c.ctr(&["images", "export", out.to_str().unwrap(), &src]);
        c
    });
    reg.stop();

    // A corrupted layer: the archive reads, the layer's check fails, nothing is registered.
    let mut bad = std::fs::read(w.join("dk.tar")).unwrap();
    let at = bad
        .windows(8)
        .position(|x| x == b"busybox\0")
        .expect("a file name inside a layer");
    bad[at] = b'X';
    std::fs::write(w.join("bad.tar"), &bad).unwrap();
    let root = w.join("store");
    let out = offline(
        &root,
        &["load", "--quiet", w.join("bad.tar").to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("diff_id"), "{err}");
    let status = stdout_ok(offline(&root, &["status", "--json"]), "status");
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(images(&s).is_empty(), "{s:#}");

    // docker save's form, gzip-compressed on stdin; the OCI layout under a name given here.
    let gz = Command::new("gzip")
        .arg("-c")
        .arg(w.join("dk.tar"))
        .output()
        .unwrap()
        .stdout;
    std::fs::write(w.join("dk.tar.gz"), gz).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --root {} --socket {}/none.sock load --quiet - < {}/dk.tar.gz",
            bin(),
            root.display(),
            w.display(),
            w.display()
        ))
        .output()
        .unwrap();
    let said = stdout_ok(out, "load -");
    assert!(said.contains("docker.io/library/busybox:1.36"), "{said}");
    let layout = format!("oci:{}/layout:latest", w.display());
    let said = stdout_ok(
        offline(
            &root,
            &[
                "load",
                "--quiet",
                &layout,
                "--name",
                "example.com/tools/bb:2",
            ],
        ),
        "load oci:",
    );
    assert!(said.contains("example.com/tools/bb:2"), "{said}");
    // Loading the same archive again only says so.
    let said = stdout_ok(
        offline(
            &root,
            &["load", "--quiet", w.join("dk.tar").to_str().unwrap()],
        ),
        "load again",
    );
    assert!(said.contains("already in the store"), "{said}");

    if ctd.is_some() {
        let said = stdout_ok(
            offline(
                &root,
                &["load", "--quiet", w.join("ctr.tar").to_str().unwrap()],
            ),
            "load ctr export",
        );
        assert!(said.contains(&src), "{said}");
    }

    let status = stdout_ok(offline(&root, &["status", "--json"]), "status");
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    // All the archives hold the same config (the image id): one image, known by both names.
    let all = images(&s);
    assert_eq!(all.len(), 1, "{s:#}");
    for (names, modes) in &all {
        assert!(!modes.is_empty(), "{names:?}");
        assert!(
            modes.iter().all(|m| m == "complete"),
            "{names:?}: {modes:?}"
        );
    }
    let names: Vec<String> = all.iter().flat_map(|(n, _)| n.clone()).collect();
    assert!(
        names.contains(&"docker.io/library/busybox:1.36".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"example.com/tools/bb:2".to_string()),
        "{names:?}"
    );
    // Nothing staged is left behind.
    let staged: Vec<_> = std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    // A text file is an image list (pulled: here the registry is gone, so it fails clearly).
    std::fs::write(w.join("list.txt"), format!("{src}\n")).unwrap();
    let out = offline(
        &root,
        &["load", "--quiet", w.join("list.txt").to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("multilayer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Through the running daemon: skopeo's oci-archive is streamed over the socket, the image
/// runs from a mount, and the air-gapped mirror serves it to skopeo with no upstream at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_through_the_daemon_then_run_and_serve_it_air_gapped() {
    if !require_tools() {
        return;
    }
    let mut reg = Registry::with_fixtures(None);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    skopeo_to(
        &format!("{}/multilayer:latest", reg.host()),
        &format!("oci-archive:{}/img.tar:site.local/apps/tool:7", w.display()),
    );
    reg.stop();
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&["--mirror-listen", &listen, "--mirror-air-gapped"]);
    let said = d.cli_ok(&["load", "--quiet", w.join("img.tar").to_str().unwrap()]);
    assert!(said.contains("site.local/apps/tool:7"), "{said}");
    let mut c = d.client().await;
    let st = status(&mut c, "site.local/apps/tool:7").await;
    assert!(st.is_some(), "the CRI knows the loaded image");
    d.wait_complete(std::time::Duration::from_secs(60));

    if let Some(fs) = d
        .fuse_mountpoint()
        .filter(|_| Path::new("/dev/fuse").exists())
    {
        let root = w.join("root");
        d.cli_ok(&[
            "mount",
            "--fuse-mountpoint",
            fs.to_str().unwrap(),
            "site.local/apps/tool:7",
            root.to_str().unwrap(),
        ]);
        let out = Command::new("chroot")
            .arg(&root)
            .args(["/bin/busybox", "cat", "/etc/passwd"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("root"));
        d.cli_ok(&["umount", root.to_str().unwrap()]);
    } else {
        eprintln!("no FUSE here: the loaded image is not mounted");
    }

    let out = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{listen}/site.local/apps/tool:7"))
        .arg(format!("oci:{}/back:latest", w.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo through the air-gapped mirror: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    // A bad source is refused with a reason, and the daemon goes on.
    std::fs::write(w.join("junk.tar"), vec![0u8; 4096]).unwrap();
    let mut junk = tar::Builder::new(vec![]);
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_cksum();
    junk.append_data(&mut h, "hello.txt", &b"hi"[..]).unwrap();
    std::fs::write(w.join("junk.tar"), junk.into_inner().unwrap()).unwrap();
    let out = d.cli(&["load", "--quiet", w.join("junk.tar").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status(&mut c, "site.local/apps/tool:7").await.is_some());
}
