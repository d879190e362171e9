//! The VM disk image registry (`/reg`) with the clients its users run: curl for every endpoint
//! and error, and qemu-img reading a qcow2 disk over http:// (qemu's curl driver) byte for byte.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// `curl -s [args] URL`: status code and body.
fn curl(args: &[&str], url: &str) -> (u16, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "--max-time", "60", "-o", "/dev/stdout"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let mut raw = out.stdout;
    // Interim `100 Continue` heads (curl sends `Expect: 100-continue` with big bodies).
    while raw.starts_with(b"HTTP/1.1 100") {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .unwrap_or(raw.len());
        raw.drain(..end);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, raw[split..].to_vec(), head)
}

/// `base` ends with the registry's prefix (`http://HOST:PORT/reg`).
fn upload(base: &str, path: &str, meta: &str, img: &Path, extra: &[&str]) -> (u16, String) {
    let meta_arg = format!("meta={meta}");
    let img_arg = format!("img=@{}", img.display());
    let mut args = vec!["-X", "POST", "-F", &meta_arg, "-F", &img_arg];
    args.extend_from_slice(extra);
    let (code, body, _) = curl(&args, &format!("{base}/{path}"));
    (code, String::from_utf8_lossy(&body).to_string())
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_default()
}

fn tools() -> bool {
    if !require_tools() {
        return false;
    }
    for t in ["curl", "qemu-img"] {
        if Command::new(t).arg("--version").output().is_err() {
            eprintln!("SKIP: {t} not installed (scripts/install-deps)");
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_images_upload_list_serve_ranges_to_qemu_and_delete() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A qcow2 disk with data in it (raw noise converted), 8 MiB virtual.
    std::fs::write(w.join("disk.raw"), noise(8 << 20, 3)).unwrap();
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(w.join("disk.raw"))
        .arg(w.join("disk.qcow2"))
        .status()
        .unwrap();
    assert!(st.success());
    let disk = std::fs::read(w.join("disk.qcow2")).unwrap();
    let digest = sha256_file(&w.join("disk.qcow2"));

    let listen = format!("127.0.0.1:{}", free_port());
    // The seed's flags, as its users pass them.
    let d = Daemon::start(&[
        "--listener-addr",
        &listen,
        "--read-header-timeout-secs",
        "5",
    ]);
    let base = format!("http://{listen}");
    let reg = format!("{base}/reg");
    let meta = r#"{"os": "debian", "arch": "amd64"}"#;
    let (code, body) = upload(&reg, "vms/debian/12", meta, &w.join("disk.qcow2"), &[]);
    assert_eq!(code, 201, "{body}");
    assert_eq!(json(body.as_bytes())["digest"], digest.as_str());
    // A second tag of the same disk shares its blob; the right digest field is accepted.
    let digest_arg = format!("digest={digest}");
    let (code, body) = upload(
        &reg,
        "vms/debian/latest",
        meta,
        &w.join("disk.qcow2"),
        &["-F", &digest_arg],
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = upload(&reg, "vms/alpine/3", "{}", &w.join("disk.raw"), &[]);
    assert_eq!(code, 201, "{body}");

    // Lists.
    let (code, body, _) = curl(&[], &format!("{base}/reg"));
    assert_eq!((code, json(&body)), (200, serde_json::json!(["vms"])));
    let (_, body, _) = curl(&[], &format!("{base}/reg/vms"));
    assert_eq!(json(&body), serde_json::json!(["alpine", "debian"]));
    let (_, body, _) = curl(&[], &format!("{base}/reg/vms/debian"));
    assert_eq!(json(&body), serde_json::json!(["12", "latest"]));
    let (_, body, _) = curl(&[], &format!("{base}/reg/vms/debian/12/meta"));
    assert_eq!(json(&body)["os"], "debian");

    // The disk: whole, HEAD, a range, an unsatisfiable one.
    let url = format!("{base}/reg/vms/debian/12");
    let (code, body, head) = curl(&[], &url);
    assert_eq!(code, 200);
    assert!(body == disk, "the whole disk, byte for byte");
    assert!(head.contains("accept-ranges: bytes"), "{head}");
    assert!(head.contains(&format!("etag: \"{digest}\"")), "{head}");
    // (curl -I prints the head as its output too.)
    let (code, body, head) = curl(&["-I"], &url);
    assert_eq!(code, 200);
    assert!(body.len() < 1000, "no body for HEAD");
    assert!(
        head.contains(&format!("content-length: {}", disk.len())),
        "{head}"
    );
    let (code, body, head) = curl(&["-r", "100-199"], &url);
    assert_eq!(code, 206);
    assert_eq!(body, disk[100..200]);
    assert!(
        head.contains(&format!("content-range: bytes 100-199/{}", disk.len())),
        "{head}"
    );
    let (code, _, _) = curl(&["-r", &format!("{}-", disk.len() + 10)], &url);
    assert_eq!(code, 416);

    // qemu-img reads it over http:// lazily (its curl driver uses ranges) and converts it
    // back to the very same raw bytes. Bounded in time: qemu 7.2's curl driver can hang with
    // parallel requests against any server (docker-registry too), so the conversion runs one
    // request at a time (`-m 1`).
    let out = Command::new("timeout")
        .args(["120", "qemu-img", "info", "--output=json"])
        .arg(&url)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img info: {out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "{info:#}");
    assert_eq!(info["virtual-size"], 8 << 20);
    let out = Command::new("timeout")
        .args([
            "120", "qemu-img", "convert", "-m", "1", "-f", "qcow2", "-O", "raw",
        ])
        .arg(format!(
            "json:{{\"file.driver\":\"http\",\"file.url\":\"{url}\"}}"
        ))
        .arg(w.join("back.raw"))
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    assert!(
        std::fs::read(w.join("back.raw")).unwrap() == std::fs::read(w.join("disk.raw")).unwrap(),
        "qemu-img convert over http gives the original bytes"
    );

    // Bad input: names, a wrong digest, an oversized disk, no multipart, a missing tag.
    for bad in ["vms/..%2f/x", "vms/%2e%2e/x", "vms/a%2Fb/x", "vms/a%00/x"] {
        let (code, body) = upload(&reg, bad, meta, &w.join("disk.raw"), &[]);
        assert_eq!(code, 400, "{bad}: {body}");
    }
    let wrong = format!("digest=sha256:{}", "0".repeat(64));
    let (code, body) = upload(&reg, "vms/x/1", meta, &w.join("disk.raw"), &["-F", &wrong]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not the digest given"), "{body}");
    let (code, body) = upload(&reg, "vms/x/1", "not json", &w.join("disk.raw"), &[]);
    assert_eq!(code, 400, "{body}");
    let (code, _, _) = curl(
        &["-X", "POST", "--data", "x"],
        &format!("{base}/reg/vms/x/1"),
    );
    assert_eq!(code, 400);
    let (code, _, _) = curl(&[], &format!("{base}/reg/vms/x/1"));
    assert_eq!(code, 404);
    let (code, _, _) = curl(&[], &format!("{base}/reg/nope"));
    assert_eq!(code, 404);
    let leftovers: Vec<_> = std::fs::read_dir(d.store().join("blobs/sha256"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "refused uploads leave nothing: {leftovers:?}"
    );

    // Delete: the first tag goes, the disk stays for the second; the last tag takes it along.
    let (code, _, _) = curl(&["-X", "DELETE"], &format!("{base}/reg/vms/debian/12"));
    assert_eq!(code, 200);
    assert!(d.blob(&digest).exists(), "still tagged latest");
    let (_, body, _) = curl(&[], &format!("{base}/reg/vms/debian"));
    assert_eq!(json(&body), serde_json::json!(["latest"]));
    let (code, _, _) = curl(&["-X", "DELETE"], &format!("{base}/reg/vms/debian/latest"));
    assert_eq!(code, 200);
    assert!(!d.blob(&digest).exists(), "the disk went with its last tag");
    let (_, body, _) = curl(&[], &format!("{base}/reg/vms"));
    assert_eq!(json(&body), serde_json::json!(["alpine"]));
    let (code, _, _) = curl(&["-X", "DELETE"], &format!("{base}/reg/vms/debian/latest"));
    assert_eq!(code, 404);
}

/// An upload over `reg.max_upload` is refused with 413 and leaves nothing behind; one cut off
/// mid-body too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_broken_uploads_leave_nothing() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("big.raw"), noise(2 << 20, 5)).unwrap();
    std::fs::write(w.join("config.yaml"), "reg:\n  max_upload: 1048576\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    // The seed's flags: another prefix, and the store given as --data-root.
    let data_root = w.join("data");
    let _daemon = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--config",
        w.join("config.yaml").to_str().unwrap(),
        "--repo-prefix",
        "disks",
        "--data-root",
        data_root.to_str().unwrap(),
    ]);
    let base = format!("http://{listen}/disks");
    let (code, body) = upload(&base, "r/i/t", "{}", &w.join("big.raw"), &[]);
    assert_eq!(code, 413, "{body}");
    // A client that sends half a body and goes away.
    let mut s = std::net::TcpStream::connect(&listen).unwrap();
    use std::io::Write;
    let boundary = "XyZ";
    let head = format!(
        "POST /disks/r/i/t HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 10000000\r\n\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"meta\"\r\n\r\n{{}}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"img\"; filename=\"d\"\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![7u8; 100_000]).unwrap();
    drop(s);
    let tmp = || {
        std::fs::read_dir(data_root.join("blobs/sha256"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .count()
    };
    wait_until(
        "the broken upload's temp file goes",
        std::time::Duration::from_secs(20),
        || tmp() == 0,
    );
    let (code, _, _) = curl(&[], &format!("{base}/r"));
    assert_eq!(code, 404, "no tag from refused uploads");
    let (code, _, _) = curl(&[], &format!("http://{listen}/reg"));
    assert_ne!(code, 200, "the prefix is disks now");
    assert!(
        data_root.join("catalogue.db").exists(),
        "the store is --data-root"
    );

    // Two uploads of the same tag at once: the tag ends with one of them whole (its disk with
    // its own metadata), never a mix.
    for round in 0..3 {
        let disks: Vec<_> = (0..2)
            .map(|n| {
                let p = w.join(format!("c{round}-{n}.raw"));
                std::fs::write(&p, noise(512 << 10, 100 + round * 2 + n)).unwrap();
                (p.clone(), sha256_file(&p))
            })
            .collect();
        std::thread::scope(|s| {
            for (n, (p, _)) in disks.iter().enumerate() {
                let base = base.clone();
                s.spawn(move || {
                    let (code, body) = upload(&base, "c/i/t", &format!(r#"{{"n": {n}}}"#), p, &[]);
                    assert_eq!(code, 201, "{body}");
                });
            }
        });
        let (_, meta, _) = curl(&[], &format!("{base}/c/i/t/meta"));
        let n = json(&meta)["n"].as_u64().expect("meta n") as usize;
        let (_, disk, _) = curl(&[], &format!("{base}/c/i/t"));
        let got = format!("sha256:{}", {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(&disk))
        });
        assert_eq!(
            got, disks[n].1,
            "round {round}: the disk of the upload whose metadata won"
        );
    }
}
