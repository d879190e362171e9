//! Lazy mounts end to end: the daemon's FUSE layer filesystem over eStargz layers converted by
//! Debian's ctr-remote, stacked with overlayfs by `lazypull mount`, used with chroot.

mod common;

use common::*;
use std::process::Command;

fn mounted(dir: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap_or("?")))
}

/// A registry with the fixtures and `big:esgz` (ctr-remote's conversion of `big`); None when
/// the tools, containerd or /dev/fuse are missing (the test then skips, having said why).
fn big_esgz_registry() -> Option<Registry> {
    if !require_tools() || !Containerd::available() {
        return None;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse missing");
        return None;
    }
    let reg = Registry::with_fixtures(None);
    let ctd = Containerd::start(&[reg.host()]);
    ctr_remote_convert(&reg, &ctd, "big:latest", "big:esgz").then_some(reg)
}

/// The layers of `repo_tag` as their digests' hex (their directories on the FUSE mount).
fn layer_hexes(reg: &Registry, repo_tag: &str) -> Vec<String> {
    raw_manifest(reg, repo_tag)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect()
}

/// Wait for the TOC of big.bin's layer, which is fetched right after a lazy pull returns.
fn wait_big_toc(d: &Daemon) {
    let started = std::time::Instant::now();
    while d.status_json()["images"][0]["layers"][1]["toc_entries"].is_null() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "no TOC:\n{}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroot_into_a_lazily_mounted_estargz_image() {
    if !require_tools() || !Containerd::available() {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse missing");
        return;
    }
    let reg = Registry::with_fixtures(None);
    let ctd = Containerd::start(&[reg.host()]);
    if !ctr_remote_convert(&reg, &ctd, "multilayer:latest", "multilayer:esgz")
        || !ctr_remote_convert(&reg, &ctd, "big:latest", "big:esgz")
    {
        return;
    }
    drop(ctd);
    let work = tempfile::tempdir().unwrap();
    let fs = work.path().join("fs");
    let d = Daemon::start(&["--no-fill", "--fuse-mountpoint", fs.to_str().unwrap()]);
    let mut c = d.client().await;
    let h = reg.host();

    // Correctness: multilayer, with a whiteout in its top layer.
    let name = format!("{h}/multilayer:esgz");
    pull(&mut c, &name).await.expect("lazy pull");
    let root = work.path().join("root");
    mount_image(&d, &name, &root, &[]);
    assert!(mounted(&root));
    let (stdout, rest) = chroot_multilayer(&root, "busybox grep ^app: /etc/passwd");
    let mut lines = rest.iter().map(String::as_str);
    let sum = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let toc_random = {
        let s = d.status_json();
        let layer = &s["images"][0]["layers"][1];
        let toc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                d.store().join("blobs/sha256").join(
                    layer["toc_digest"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches("sha256:"),
                ),
            )
            .unwrap(),
        )
        .unwrap();
        toc["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "data/random.bin")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        format!("sha256:{sum}"),
        toc_random,
        "random.bin reads back verified"
    );
    assert!(
        lines.next().unwrap_or_default().starts_with("app:x:1234:"),
        "{stdout}"
    );
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!mounted(&root));

    // Laziness: a small file of a 32 MiB image costs a small fraction of the blob.
    let name = format!("{h}/big:esgz");
    pull(&mut c, &name).await.expect("lazy pull");
    mount_image(
        &d,
        &name,
        &root,
        &["--upper", work.path().join("upper").to_str().unwrap()],
    );
    let run = Command::new("chroot")
        .arg(&root)
        .args([
            "/bin/sh",
            "-c",
            "busybox wc -c /etc/passwd; ls -l /big; echo changed > /tmp/new",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("big.bin"));
    assert!(
        work.path().join("upper/tmp/new").exists(),
        "writes go to the upper dir"
    );
    let manifest = raw_manifest(&reg, "big:esgz");
    let big_layer = &manifest["layers"][1];
    let (digest, size) = (
        big_layer["digest"].as_str().unwrap(),
        big_layer["size"].as_u64().unwrap(),
    );
    let (bytes, requests, full) = served(&reg, "big", digest);
    eprintln!("big layer: {size} bytes, served {bytes} bytes in {requests} requests");
    assert!(!full, "no full-blob GET with --no-fill");
    assert!(
        bytes * 100 < size,
        "served {bytes} of {size} bytes: less than 1%"
    );
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());
    // A plain gzip image cannot be read lazily and the filler is off: the mount says why.
    pull(&mut c, &format!("{h}/busybox:latest")).await.unwrap();
    let out = d.cli(&[
        "mount",
        "--timeout",
        "2s",
        "--fuse-mountpoint",
        fs.to_str().unwrap(),
        &format!("{h}/busybox:latest"),
        root.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not fetched whole"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut d = d;
    assert!(d.terminate().success());
    assert!(!mounted(&fs), "FUSE unmounted on shutdown");
}

/// (relative path, kind, mode, uid, gid, size, content digest or link target) of every entry.
fn snapshot(root: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                lazypull::oci::Digest::of(&std::fs::read(&p).unwrap()).to_string()
            } else if ft.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                format!("special rdev={}", m.rdev())
            };
            out.push(format!(
                "{rel} mode={:o} uid={} gid={} size={} {what}",
                m.mode(),
                m.uid(),
                m.gid(),
                if ft.is_dir() { 0 } else { m.size() }
            ));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_tree_equals_umoci_unpack_and_survives_registry_loss_and_kill9() {
    if !require_tools() || !Containerd::available() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let mut reg = Registry::with_fixtures(None);
    let ctd = Containerd::start(&[reg.host()]);
    if !ctr_remote_convert(&reg, &ctd, "multilayer:latest", "multilayer:esgz") {
        return;
    }
    drop(ctd);
    let work = tempfile::tempdir().unwrap();
    let h = reg.host();
    let name = format!("{h}/multilayer:esgz");
    // The reference tree: umoci unpack of the same image (an independent implementation).
    let bundle = umoci_unpack(&name, work.path());
    // eStargz's own files (the TOC and the landmark) are tar entries to umoci; lazy mounts hide them.
    let want = without_estargz_files(snapshot(&bundle.join("rootfs")));

    let mut d = Daemon::start(&[]);
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.expect("lazy pull");
    }
    let root = work.path().join("root");
    let mount = |d: &Daemon| mount_image(d, &name, &root, &[]);
    mount(&d);
    let got = snapshot(&root);
    assert_eq!(got, want, "lazily mounted tree equals umoci unpack");

    // Concurrent readers of the same file all get the verified bytes.
    let file = root.join("data/random.bin");
    let expected = lazypull::oci::Digest::of(&std::fs::read(&file).unwrap());
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let f = file.clone();
            std::thread::spawn(move || lazypull::oci::Digest::of(&std::fs::read(f).unwrap()))
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), expected);
    }
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());

    // Registry gone after the fill completed: every file still readable.
    d.wait_complete(std::time::Duration::from_secs(60));
    reg.stop();
    mount(&d);
    assert_eq!(snapshot(&root), want, "air-gapped reads after the fill");
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());

    // kill -9: the dead FUSE mount is replaced at restart and the image mounts again.
    d.kill9();
    d.restart();
    mount(&d);
    assert_eq!(snapshot(&root), want, "after kill -9 and restart");
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());
}

/// Bytes read on demand are kept in the layer's partial file and its range map: they survive a
/// clean restart and kill -9 (once flushed), are served with the registry down, and the filler
/// later fetches only what is still missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_ranges_persist_across_restarts_and_the_fill_skips_them() {
    let Some(mut reg) = big_esgz_registry() else {
        return;
    };
    let name = format!("{}/big:esgz", reg.host());
    let manifest = raw_manifest(&reg, "big:esgz");
    let layer = &manifest["layers"][1];
    let (digest, size) = (
        layer["digest"].as_str().unwrap().to_string(),
        layer["size"].as_u64().unwrap(),
    );
    let hex = digest.trim_start_matches("sha256:").to_string();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::start(&["--no-fill", "--metrics-listen", &metrics_addr]);
    let fs = d.fuse_mountpoint().unwrap();
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.expect("lazy pull");
    }
    wait_big_toc(&d);
    let file = fs.join(&hex).join("big/big.bin");
    let read = |off: u64, len: usize| -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&file)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off)?;
        Ok(buf)
    };
    let first = read(0, 1 << 20).expect("lazy read");
    let (after_first, _, _) = served(&reg, "big", &digest);
    assert!(
        after_first < size / 4,
        "one MiB read fetched {after_first} of {size} bytes"
    );
    // The Prometheus endpoint counts the on-demand fetch. The duration is observed when the
    // whole range request ends, which may be just after the reader got its chunk: poll briefly.
    let value_in = metric;
    let started = std::time::Instant::now();
    let m = loop {
        let m = metrics(&metrics_addr);
        if value_in(&m, "lazypull_ondemand_fetch_seconds_count") >= 1.0
            || started.elapsed() > std::time::Duration::from_secs(10)
        {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let value = |name: &str| value_in(&m, name);
    assert!(value("lazypull_ondemand_requests_total") >= 1.0, "{m}");
    assert!(
        value("lazypull_ondemand_bytes_total") >= (1 << 20) as f64,
        "{m}"
    );
    assert!(value("lazypull_ondemand_fetch_seconds_count") >= 1.0, "{m}");
    // Every request went through the access gate, counted by class: the read's range, and
    // before it the layer's footer and TOC.
    assert!(
        value("lazypull_link_bytes_total{class=\"on_demand\"}") >= (1 << 20) as f64,
        "{m}"
    );
    assert!(
        value("lazypull_link_requests_total{class=\"metadata\"}") >= 1.0,
        "{m}"
    );
    assert!(value("lazypull_images") == 1.0, "{m}");
    // A clean stop records the ranges; with the registry down they are read back locally.
    assert!(d.terminate().success());
    reg.stop();
    d.restart_with(&["--no-fill"]);
    assert_eq!(
        read(0, 1 << 20).expect("read after restart, registry down"),
        first
    );
    // A region never read cannot be served with the registry down: EIO, not a hang.
    let mut d = d;
    {
        let started = std::time::Instant::now();
        assert!(
            read(size / 2, 4096).is_err(),
            "unfetched bytes with no registry"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(70));
    }
    // kill -9 after the flush delay: ranges read before are kept too.
    reg.restart();
    let middle = read(8 << 20, 1 << 20).expect("read another MiB");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    d.kill9();
    reg.stop();
    d.restart_with(&["--no-fill"]);
    assert_eq!(read(8 << 20, 1 << 20).expect("read after kill -9"), middle);
    assert_eq!(read(0, 1 << 20).unwrap(), first);
    let s = d.status_json();
    let l = &s["images"][0]["layers"][1];
    assert!(
        l["ondemand"].as_u64().unwrap() >= 2 << 20,
        "status counts on-demand bytes: {l}"
    );
    // The fill completes the layer fetching only the gaps: in total the registry sent each
    // byte of the blob about once.
    d.kill9();
    reg.restart();
    let before_fill = served(&reg, "big", &digest).0;
    d.restart_with(&[]);
    d.wait_complete(std::time::Duration::from_secs(120));
    let (total, requests, _) = served(&reg, "big", &digest);
    eprintln!(
        "layer {size} bytes; on demand {before_fill}, fill {} in {requests} requests in all",
        total - before_fill
    );
    assert!(
        total - before_fill < size - (2 << 20),
        "the fill skipped the bytes read on demand ({} of {size})",
        total - before_fill
    );
    assert!(
        total < size + size / 20,
        "about one copy of the blob: {total} of {size}"
    );
    assert_eq!(
        sha256_file(&d.store().join("blobs/sha256").join(&hex)),
        digest,
        "the completed blob verifies"
    );
    assert!(
        !d.store()
            .join("partial/sha256")
            .join(format!("{hex}.map"))
            .exists(),
        "the range map goes with the partial file"
    );
}

/// Files open on the lazy mount, as a running container's are, keep working across daemon
/// restarts: a SIGTERM while the mount is in use leaves it to the fuse holder and the next
/// daemon resumes it; a read issued while no daemon runs waits and then completes; after kill -9
/// the requests in flight are sent again to the next daemon. Once unused, a stop unmounts it and
/// the holder goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_files_keep_their_lazy_layers_across_daemon_restarts() {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};
    let Some(reg) = big_esgz_registry() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let want = std::fs::read(
        umoci_unpack(&format!("{}/big:latest", reg.host()), work.path()).join("rootfs/big/big.bin"),
    )
    .unwrap();
    let hexes = layer_hexes(&reg, "big:esgz");
    let hex = |i: usize| hexes[i].clone();
    let mut d = Daemon::start(&["--no-fill"]);
    let fs = d.fuse_mountpoint().unwrap();
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/big:esgz", reg.host()))
            .await
            .expect("lazy pull");
    }
    wait_big_toc(&d);
    let f = std::sync::Arc::new(std::fs::File::open(fs.join(hex(1)).join("big/big.bin")).unwrap());
    let want = std::sync::Arc::new(want);
    let check = |f: &std::fs::File, off: usize, len: usize| {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64)
            .unwrap_or_else(|e| panic!("read {len} at {off}: {e}"));
        assert!(buf == want[off..off + len], "bytes at {off} differ");
    };
    check(&f, 0, 64 << 10);

    // SIGTERM with the file open: the mount stays, the holder keeps it.
    let t = Instant::now();
    assert!(d.terminate().success());
    let stop = t.elapsed();
    assert!(mounted(&fs), "the mount in use is left for the next daemon");
    assert!(
        d.log_text().contains("left mounted for the next start"),
        "{}",
        d.log_text()
    );
    // A read of bytes never fetched, while no daemon runs: it waits.
    let (f2, w2) = (std::sync::Arc::clone(&f), std::sync::Arc::clone(&want));
    let waiting = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        f2.read_exact_at(&mut buf, 8 << 20)
            .map(|_| buf == w2[8 << 20..(8 << 20) + (256 << 10)])
    });
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !waiting.is_finished(),
        "a read with no daemon waits for the next one"
    );
    let t = Instant::now();
    d.restart_with(&["--no-fill"]);
    while !waiting.is_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the waiting read never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let resumed_in = t.elapsed();
    assert!(
        waiting.join().unwrap().expect("the waiting read"),
        "its bytes are right"
    );
    assert!(
        d.log_text().contains("resumed the layer filesystem"),
        "{}",
        d.log_text()
    );
    // The open file at new offsets, a new path in the same layer, and a layer first looked up
    // after the restart (its inode numbers must not clash with those the kernel holds).
    check(&f, 20 << 20, 64 << 10);
    let busybox = std::fs::metadata(fs.join(hex(0)).join("bin/busybox")).expect("another layer");
    assert!(busybox.len() > 100_000);
    assert!(
        std::fs::read_dir(fs.join(hex(1)).join("big"))
            .unwrap()
            .count()
            == 1
    );

    // kill -9 with reads in flight: they are sent again to the next daemon.
    let (f3, w3) = (std::sync::Arc::clone(&f), std::sync::Arc::clone(&want));
    let inflight = std::thread::spawn(move || {
        let off = 24 << 20;
        let mut buf = vec![0u8; 4 << 20];
        f3.read_exact_at(&mut buf, off as u64)
            .map(|_| buf == w3[off..off + (4 << 20)])
    });
    std::thread::sleep(Duration::from_millis(30));
    d.kill9();
    d.restart_with(&["--no-fill"]);
    let t = Instant::now();
    while !inflight.is_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a read in flight at kill -9 never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        inflight.join().unwrap().expect("the read across kill -9"),
        "its bytes are right"
    );
    check(&f, 0, 1 << 20);
    eprintln!(
        "restart: stop {stop:?}; a read waiting for the daemon completed {resumed_in:?} after the restart began"
    );

    // Unused, a stop unmounts, and the holder exits.
    drop(f);
    assert!(d.terminate().success());
    assert!(!mounted(&fs), "unmounted once nothing uses it");
    let sock = fs.with_file_name(format!(
        "{}.holder.sock",
        fs.file_name().unwrap().to_string_lossy()
    ));
    let t = Instant::now();
    while sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the holder outlived the mount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file the kernel reads by passthrough (its layer filled and unpacked) while a container
/// keeps it open, e.g. the busybox a shell runs from, opens again after a restart (SIGTERM and
/// kill -9): `kubectl exec` of that shell must not get EIO. The kernel ties such an inode to the
/// backing file the first daemon registered and refuses any other open of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_open_by_passthrough_open_again_after_restarts() {
    use std::os::unix::fs::FileExt;
    let Some(reg) = big_esgz_registry() else {
        return;
    };
    let hexes = layer_hexes(&reg, "big:esgz");
    let hex = |i: usize| hexes[i].clone();
    let mut d = Daemon::start(&[]);
    let fs = d.fuse_mountpoint().unwrap();
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/big:esgz", reg.host()))
            .await
            .expect("lazy pull");
    }
    d.wait_complete(std::time::Duration::from_secs(120));
    let started = std::time::Instant::now();
    while d.status_json()["images"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["unpacked"] != true)
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "never unpacked"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        d.log_text().contains("FUSE passthrough on"),
        "{}",
        d.log_text()
    );
    let busybox = fs.join(hex(0)).join("bin/busybox");
    let big = fs.join(hex(1)).join("big/big.bin");
    let held = std::fs::File::open(&busybox).expect("open (passthrough)");
    let mut want = vec![0u8; 64 << 10];
    held.read_exact_at(&mut want, 4096).unwrap();
    for kill9 in [false, true] {
        if kill9 {
            d.kill9();
        } else {
            assert!(d.terminate().success());
        }
        assert!(mounted(&fs), "the mount in use is left for the next daemon");
        d.restart_with(&[]);
        let again = std::fs::File::open(&busybox).unwrap_or_else(|e| {
            panic!(
                "open again after {}: {e}\n{}",
                if kill9 { "kill -9" } else { "SIGTERM" },
                d.log_text()
            )
        });
        let mut got = vec![0u8; 64 << 10];
        again.read_exact_at(&mut got, 4096).expect("read it");
        assert!(got == want);
        held.read_exact_at(&mut got, 4096)
            .expect("the first open still reads");
        assert!(got == want);
        // A file of the same mount never opened before: served as before.
        let other = std::fs::File::open(&big).expect("another file");
        other.read_exact_at(&mut got, 1 << 20).expect("read it");
    }
    drop(held);
    assert!(d.terminate().success());
}

/// A mounted layer whose registry went away keeps working once the same image is pulled from
/// another registry: on-demand reads follow the catalogue's current source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_layer_follows_its_image_to_another_registry() {
    use std::os::unix::fs::FileExt;
    let Some(mut reg1) = big_esgz_registry() else {
        return;
    };
    let reg2 = Registry::with_fixtures(None);
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--preserve-digests"])
        .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{}/big:esgz", reg1.host()))
        .arg(format!("docker://{}/big:esgz", reg2.host()))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo copy");
    let manifest = raw_manifest(&reg1, "big:esgz");
    let digest = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let hex = digest.trim_start_matches("sha256:").to_string();
    let d = Daemon::start(&["--no-fill"]);
    let fs = d.fuse_mountpoint().unwrap();
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/big:esgz", reg1.host()))
            .await
            .expect("lazy pull from the first registry");
    }
    wait_big_toc(&d);
    let f = std::fs::File::open(fs.join(&hex).join("big/big.bin")).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    f.read_exact_at(&mut buf, 0)
        .expect("read from the first registry");
    reg1.stop();
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/big:esgz", reg2.host()))
            .await
            .expect("the same image from the second registry");
    }
    f.read_exact_at(&mut buf, 16 << 20)
        .expect("a read of the mounted layer after its first registry went away");
    assert!(
        served(&reg2, "big", &digest).0 > 0,
        "the bytes came from the second registry"
    );
}

/// A file opened while its layer was still lazy (the kernel caches its pages) stays readable,
/// and opens again after the layer is unpacked: the kernel refuses a passthrough open of an
/// inode that has page-cache opens, so those are served by pread (a shell exec'ing busybox
/// again, as `scripts/demo` does, hit EIO before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_open_before_its_layer_is_unpacked_opens_again_after() {
    use std::os::unix::fs::FileExt;
    let Some(reg) = big_esgz_registry() else {
        return;
    };
    let proxy = Netem::start(&reg.host(), &["--mbit", "100"]);
    let manifest = raw_manifest(&reg, "big:esgz");
    let hex = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let d = Daemon::start(&[]);
    let fs = d.fuse_mountpoint().unwrap();
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/big:esgz", proxy.host()))
            .await
            .expect("lazy pull");
    }
    wait_big_toc(&d);
    let path = fs.join(&hex).join("big/big.bin");
    let early = std::fs::File::open(&path).unwrap();
    let mut want = vec![0u8; 64 << 10];
    early.read_exact_at(&mut want, 1 << 20).expect("lazy read");
    assert!(
        d.status_json()["images"][0]["layers"][1]["unpacked"] != true,
        "the layer was still lazy at the first open"
    );
    d.wait_complete(std::time::Duration::from_secs(120));
    let started = std::time::Instant::now();
    while d.status_json()["images"][0]["layers"][1]["unpacked"] != true {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "never unpacked"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let again = std::fs::File::open(&path).expect("open after the unpack");
    let mut got = vec![0u8; 64 << 10];
    again
        .read_exact_at(&mut got, 1 << 20)
        .expect("read after the unpack, the first open still there");
    assert!(got == want);
}

/// Layers without a TOC (plain gzip) are fetched whole, unpacked into the file cache and
/// mounted from it; complete layers' files are passed through to the kernel; identical files
/// of different layers are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layers_mount_from_the_file_cache_with_passthrough() {
    if !require_tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    let work = tempfile::tempdir().unwrap();
    let d = Daemon::start(&[]);
    let name = format!("{}/multilayer:latest", reg.host());
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.expect("pull");
    }
    let root = work.path().join("root");
    mount_image(
        &d,
        &name,
        &root,
        &["--upper", work.path().join("upper").to_str().unwrap()],
    );
    chroot_multilayer(&root, "true");
    // The same tree as umoci unpack of the image.
    let bundle = umoci_unpack(&name, work.path());
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());
    mount_image(&d, &name, &root, &[]);
    assert_eq!(
        snapshot(&root),
        snapshot(&bundle.join("rootfs")),
        "mounted tree equals umoci unpack"
    );
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());
    let log = d.log_text();
    assert!(
        log.contains("FUSE passthrough on"),
        "passthrough negotiated:\n{log}"
    );
    assert!(
        !log.contains("passthrough refused"),
        "passthrough used:\n{log}"
    );
    // Each distinct content once in the file cache.
    let files = std::fs::read_dir(d.store().join("files/sha256"))
        .unwrap()
        .count();
    let s = d.status_json();
    assert!(
        s["images"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["unpacked"] == true),
        "{s:#}"
    );
    assert!(files > 0);
}

/// zstd:chunked images written by Debian's skopeo (an independent implementation, the legacy
/// `io.containers.*` flavour) mount lazily: the tree equals umoci's unpack of the original, and
/// a small file of a big layer costs a small fraction of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_chunked_images_from_skopeo_mount_lazily() {
    if !require_tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    let h = reg.host();
    let tmp = tempfile::tempdir().unwrap();
    for repo in ["multilayer", "big"] {
        // Through an uncompressed `dir:` copy, so skopeo recompresses every layer.
        let dir = tmp.path().join(repo);
        let st = Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false", "--dest-decompress"])
            .arg(format!("docker://{h}/{repo}:latest"))
            .arg(format!("dir:{}", dir.display()))
            .status()
            .unwrap();
        assert!(st.success());
        // skopeo's blob-info cache would map the layers back to the gzip blobs in this
        // registry and reuse them: give it an empty cache (a private tmpfs over its directory).
        let st = Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mkdir -p /var/lib/containers/cache && mount -t tmpfs none /var/lib/containers/cache && \
                 skopeo copy -q --dest-tls-verify=false --dest-compress-format zstd:chunked dir:{} docker://{h}/{repo}:zstdchunked",
                dir.display()
            ))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let manifest = raw_manifest(&reg, "big:zstdchunked");
    let big = &manifest["layers"][1];
    assert!(
        big["annotations"]["io.containers.zstd-chunked.manifest-checksum"].is_string(),
        "skopeo wrote zstd:chunked: {manifest:#}"
    );
    let work = tempfile::tempdir().unwrap();
    // The reference tree: umoci unpack of the original gzip image.
    let bundle = umoci_unpack(&format!("{h}/multilayer:latest"), work.path());

    let d = Daemon::start(&["--no-fill"]);
    let mut c = d.client().await;
    let root = work.path().join("root");
    let name = format!("{h}/multilayer:zstdchunked");
    pull(&mut c, &name).await.expect("lazy pull");
    mount_image(&d, &name, &root, &[]);
    assert_eq!(
        snapshot(&root),
        snapshot(&bundle.join("rootfs")),
        "zstd:chunked tree equals umoci unpack"
    );
    let s = d.status_json();
    assert!(
        s["images"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["toc_position"].is_string()),
        "{s:#}"
    );
    assert!(d.cli(&["umount", root.to_str().unwrap()]).status.success());

    let name = format!("{h}/big:zstdchunked");
    pull(&mut c, &name).await.expect("lazy pull");
    mount_image(&d, &name, &root, &[]);
    let run = Command::new("chroot")
        .arg(&root)
        .args(["/bin/sh", "-c", "busybox wc -c /etc/passwd; ls -l /big"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("big.bin"));
    let (digest, size) = (
        big["digest"].as_str().unwrap(),
        big["size"].as_u64().unwrap(),
    );
    let (bytes, requests, full) = served(&reg, "big", digest);
    eprintln!("zstd:chunked big layer: {size} bytes, served {bytes} in {requests} requests");
    assert!(!full && bytes * 100 < size, "served {bytes} of {size}");
    // Reading the big file verifies every chunk against its digest.
    let data = std::fs::read(root.join("big/big.bin")).unwrap();
    assert_eq!(data.len(), 32 << 20);
    assert!(d.cli(&["umount", root.to_str().unwrap()]).status.success());
    // With the filler on, the layers complete: blob digest and diff_id verify (the skippable
    // frames decode to nothing), and the files are unpacked.
    drop(c);
    let mut d = d;
    d.kill9();
    d.restart_with(&[]);
    d.wait_complete(std::time::Duration::from_secs(120));
    let started = std::time::Instant::now();
    loop {
        // Unpacking follows completion.
        let s = d.status_json();
        let all = s["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["layers"].as_array().unwrap())
            .all(|l| l["unpacked"] == true);
        if all {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{s:#}\n{}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The reference tree of an image in a registry: skopeo to an OCI layout, `umoci unpack`
/// (an independent implementation). Returns the bundle (its tree is `rootfs/`).
fn umoci_unpack(name: &str, work: &std::path::Path) -> std::path::PathBuf {
    let layout = work.join("layout");
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{name}"))
        .arg(format!("oci:{}:ref", layout.display()))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo copy {name}");
    let bundle = work.join("bundle");
    let st = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:ref", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    bundle
}

/// Run the multilayer fixture's checks by chroot in `root` (layer 3's file, the whiteout that
/// hides small.txt, random.bin's checksum), then `extra`. Returns stdout and the lines after
/// the `ls`, starting with the checksum line.
fn chroot_multilayer(root: &std::path::Path, extra: &str) -> (String, Vec<String>) {
    let run = Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-c"])
        .arg(format!(
            "cat /data/layer3.txt; ls /data; busybox sha256sum /data/random.bin; {extra}"
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "chroot: {}\n{stdout}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<String> = stdout.lines().map(String::from).collect();
    assert_eq!(
        lines.first().map(String::as_str),
        Some("hello from layer 3"),
        "{stdout}"
    );
    assert_eq!(
        lines.get(1).map(String::as_str),
        Some("layer3.txt"),
        "whiteout hides small.txt: {stdout}"
    );
    assert_eq!(
        lines.get(2).map(String::as_str),
        Some("random.bin"),
        "{stdout}"
    );
    let rest = lines[3..].to_vec();
    (stdout, rest)
}

/// Files a converter prioritised (before `.prefetch.landmark`) are fetched as soon as the layer
/// is mounted, before anything reads them: with the registry gone they are still readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_before_the_prefetch_landmark_are_fetched_at_mount() {
    if !require_tools() || !Containerd::available() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let mut reg = Registry::with_fixtures(None);
    let work = tempfile::tempdir().unwrap();
    // ctr-remote's record format: JSON entries with the paths a workload opened.
    let record = work.path().join("record.json");
    std::fs::write(&record, "{\"path\":\"data/random.bin\"}\n").unwrap();
    let ctd = Containerd::start(&[reg.host()]);
    if !ctr_remote_convert_with(
        &reg,
        &ctd,
        "multilayer:latest",
        "multilayer:prefetch",
        &["--estargz-record-in", record.to_str().unwrap()],
    ) {
        return;
    }
    drop(ctd);
    // The layer holding random.bin has a landmark after it: its bytes arrive unasked.
    let name = format!("{}/multilayer:prefetch", reg.host());
    random_bin_prefetched(&mut reg, &name, work.path(), 1 << 20).await;
}

/// Pull `name` with a daemon whose filler is off, mount it, wait until `min` bytes arrived by
/// the landmark prefetch, stop the registry and read `/data/random.bin` (2 MiB).
async fn random_bin_prefetched(reg: &mut Registry, name: &str, work: &std::path::Path, min: u64) {
    let d = Daemon::start(&["--no-fill"]);
    {
        let mut c = d.client().await;
        pull(&mut c, name).await.expect("lazy pull");
    }
    let root = work.join("root");
    mount_image(&d, name, &root, &[]);
    wait_prefetched(&d, min);
    assert!(
        d.log_text()
            .contains("prefetching files before the landmark")
    );
    reg.stop();
    let data = std::fs::read(root.join("data/random.bin"))
        .expect("prefetched file readable with the registry down");
    assert_eq!(data.len(), 2 << 20);
    assert!(d.cli(&["umount", root.to_str().unwrap()]).status.success());
}

/// `lazypull mount NAME ROOT [EXTRA...]` through the daemon's FUSE mount; a failure panics with
/// the command's stderr and the end of the daemon's log.
fn mount_image(d: &Daemon, name: &str, root: &std::path::Path, extra: &[&str]) {
    let fs = d.fuse_mountpoint().expect("the daemon has a FUSE mount");
    let mut args = vec![
        "mount",
        "--fuse-mountpoint",
        fs.to_str().unwrap(),
        name,
        root.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = d.cli(&args);
    let log = d.log_text();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    assert!(
        out.status.success(),
        "mount: {} {:?}\n{}",
        String::from_utf8_lossy(&out.stderr),
        out.status,
        tail.join("\n")
    );
}

/// `lazypull ARGS...` (through the daemon's config), asserting success; returns stdout.
fn lazypull_ok(d: &Daemon, args: &[&str]) -> String {
    d.cli_ok(args)
}

/// umoci's tree without eStargz's own files (tar entries to umoci, hidden by lazy mounts).
fn without_estargz_files(tree: Vec<String>) -> Vec<String> {
    tree.into_iter()
        .filter(|l| {
            !l.starts_with("stargz.index.json ")
                && !l.starts_with(".no.prefetch.landmark ")
                && !l.starts_with(".prefetch.landmark ")
        })
        .collect()
}

/// `lazypull convert` writes eStargz and zstd:chunked that Debian's ctr-remote reads (footer,
/// TOC digests) and containerd runs, and that lazypull mounts lazily with the same tree as
/// umoci's unpack of the original; lazypull also mounts ctr-remote's zstd:chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_images_read_by_ctr_remote_containerd_and_lazypull() {
    if !require_tools() || !Containerd::available() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    let work = tempfile::tempdir().unwrap();
    let h = reg.host();
    let bundle = umoci_unpack(&format!("{h}/multilayer:latest"), work.path());
    let want = without_estargz_files(snapshot(&bundle.join("rootfs")));
    let d = Daemon::start(&["--no-fill"]);

    // From the registry to eStargz, and from an OCI layout (umoci_unpack's) to zstd:chunked.
    let out = lazypull_ok(
        &d,
        &[
            "convert",
            &format!("{h}/multilayer:latest"),
            &format!("{h}/multilayer:lp-esgz"),
        ],
    );
    assert!(out.contains("as eStargz"), "{out}");
    let layout = format!("oci:{}:ref", work.path().join("layout").display());
    lazypull_ok(
        &d,
        &[
            "convert",
            "--format",
            "zstd-chunked",
            &layout,
            &format!("{h}/multilayer:lp-zc"),
        ],
    );

    let ctd = Containerd::start(std::slice::from_ref(&h));
    let esgz = raw_manifest(&reg, "multilayer:lp-esgz");
    ctr_remote(
        &ctd,
        &[
            "images",
            "pull",
            "--plain-http",
            &format!("{h}/multilayer:lp-esgz"),
        ],
    );
    for l in esgz["layers"].as_array().unwrap() {
        let got = ctr_remote(
            &ctd,
            &["images", "get-toc-digest", l["digest"].as_str().unwrap()],
        );
        assert_eq!(
            got.trim(),
            l["annotations"]["containerd.io/snapshot/stargz/toc.digest"],
            "ctr-remote reads our footer and TOC"
        );
    }
    let zc = raw_manifest(&reg, "multilayer:lp-zc");
    ctr_remote(
        &ctd,
        &[
            "images",
            "pull",
            "--plain-http",
            &format!("{h}/multilayer:lp-zc"),
        ],
    );
    let top = zc["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let toc = ctr_remote(
        &ctd,
        &[
            "images",
            "get-toc-digest",
            "--zstdchunked",
            "--dump-toc",
            &top,
        ],
    );
    assert!(toc.contains("data/layer3.txt"), "{toc}");
    // containerd unpacks both the ordinary way and runs a container on them.
    for (tag, id) in [("lp-esgz", "t1"), ("lp-zc", "t2")] {
        let run = |attempt: usize| {
            ctr_remote(
                &ctd,
                &[
                    "run",
                    "--rm",
                    &format!("{h}/multilayer:{tag}"),
                    &format!("{id}-{attempt}"),
                    "/bin/busybox",
                    "cat",
                    "/data/layer3.txt",
                ],
            )
        };
        // `ctr run` of containerd 1.6 now and then returns success with no output at all for
        // a process that exits at once (seen once in CI, under load): ask again then; a wrong
        // or empty file still fails, since the content is compared every time.
        let mut out = run(0);
        for attempt in 1..3 {
            if !out.is_empty() {
                break;
            }
            eprintln!("ctr run printed nothing for {tag}; running it again");
            out = run(attempt);
        }
        assert_eq!(out.trim(), "hello from layer 3", "{tag}");
    }
    // The other direction for zstd:chunked: ctr-remote's output, read by lazypull.
    ctr_remote(
        &ctd,
        &[
            "images",
            "pull",
            "--plain-http",
            &format!("{h}/multilayer:latest"),
        ],
    );
    ctr_remote(
        &ctd,
        &[
            "images",
            "convert",
            "--zstdchunked",
            "--oci",
            &format!("{h}/multilayer:latest"),
            &format!("{h}/multilayer:ctr-zc"),
        ],
    );
    ctr_remote(
        &ctd,
        &[
            "images",
            "push",
            "--plain-http",
            &format!("{h}/multilayer:ctr-zc"),
        ],
    );
    drop(ctd);

    let mut c = d.client().await;
    let root = work.path().join("root");
    for tag in ["lp-esgz", "lp-zc", "ctr-zc"] {
        let name = format!("{h}/multilayer:{tag}");
        pull(&mut c, &name).await.expect("lazy pull");
        let s = d.status_json();
        let img = s["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i.to_string().contains(tag))
            .unwrap()
            .clone();
        assert!(
            img["layers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["toc_digest"].is_string()),
            "{tag}: every layer is lazy: {img:#}"
        );
        mount_image(&d, &name, &root, &[]);
        assert_eq!(
            snapshot(&root),
            want,
            "{tag}: the lazily mounted tree equals umoci's"
        );
        chroot_multilayer(&root, "true");
        lazypull_ok(&d, &["umount", root.to_str().unwrap()]);
    }
}

/// `lazypull convert --record -- CMD` runs CMD in a lazy mount of the source, records the files
/// it opens through our FUSE layer and puts them before `.prefetch.landmark`; a lazy mount of
/// the result fetches them unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_record_prefetches_the_files_a_command_opens() {
    if !require_tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let mut reg = Registry::with_fixtures(None);
    let work = tempfile::tempdir().unwrap();
    let h = reg.host();
    let list = work.path().join("recorded.txt");
    {
        // The source is plain gzip: the mount waits for the filler to fetch it whole.
        let d = Daemon::start(&[]);
        let out = lazypull_ok(
            &d,
            &[
                "convert",
                "--record",
                "--record-out",
                list.to_str().unwrap(),
                "--fuse-mountpoint",
                d.fuse_mountpoint().unwrap().to_str().unwrap(),
                &format!("{h}/multilayer:latest"),
                &format!("{h}/multilayer:rec"),
                "--",
                "/bin/busybox",
                "sha256sum",
                "/data/random.bin",
            ],
        );
        assert!(out.contains("recorded"), "{out}");
    }
    let recorded = std::fs::read_to_string(&list).unwrap();
    let lines: Vec<&str> = recorded.lines().collect();
    assert!(lines.contains(&"/bin/busybox"), "{recorded}");
    assert!(lines.contains(&"/data/random.bin"), "{recorded}");
    assert!(!lines.contains(&"/data/layer3.txt"), "{recorded}");

    // The layer's last 64 KiB (the end of random.bin, the landmark) come with its TOC, in
    // the same request: the rest of the file is prefetched.
    random_bin_prefetched(
        &mut reg,
        &format!("{h}/multilayer:rec"),
        work.path(),
        (2 << 20) - (64 << 10),
    )
    .await;
}

/// Wait until some layer of the daemon's first image has `min` bytes fetched by start-up
/// prefetch (the landmark's files).
fn wait_prefetched(d: &Daemon, min: u64) {
    let started = std::time::Instant::now();
    loop {
        let s = d.status_json();
        let prefetched = s["images"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["prefetched"].as_u64().unwrap_or(0) >= min);
        if prefetched {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "nothing prefetched: {s:#}\n{}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A plain gzip layer (no TOC) is served while it streams in: a file at its start is read, a
/// name the stream has passed is missing and a directory it has left is listed, all before the
/// layer is complete; a file at its end is waited for. Nothing is fetched twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layers_are_served_while_they_stream_in() {
    if !require_tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::empty(None);
    let big = noise(24 << 20, 0x9e37_79b9_7f4a_7c15);
    let tar = tar_of(&[
        ("a/", vec![]),
        ("a/first.txt", b"first\n".to_vec()),
        ("a/link", b"->first.txt".to_vec()),
        ("b/", vec![]),
        ("b/big.bin", big.clone()),
        ("c/", vec![]),
        ("c/last.txt", b"last\n".to_vec()),
    ]);
    push_layers(&reg, "stream", &[tar]).await;
    let layer = layer_digests(&reg, "stream")[0].clone();
    // 24 MiB at 16 Mbit/s, and the proxy holds the stream after its first 4 MiB until the
    // checks below are done: the layer cannot be complete before then, however slow the machine.
    let (proxy, gate) = Netem::held(&reg.host(), 16, 4 << 20);
    let d = Daemon::start(&[]);
    let name = format!("{}/stream:latest", proxy.host());
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.expect("pull");
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    mount_image(&d, &name, &root, &[]);
    let read = |p: &str| {
        std::fs::read_to_string(root.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}\n{}", d.log_text()))
    };
    assert_eq!(read("a/first.txt"), "first\n");
    assert_eq!(read("a/link"), "first\n");
    let missing = std::fs::metadata(root.join("a/missing")).unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    let mut listed: Vec<String> = std::fs::read_dir(root.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, ["first.txt", "link"]);
    let (filled, state, _) = layer_local(&d, &layer);
    assert_ne!(
        state, "complete",
        "served before the layer was complete ({filled} bytes there)"
    );
    let l = &d.status_json()["images"][0]["layers"][0];
    assert_eq!(l["mode"], "streaming", "{l:#}");
    gate.release();
    // At the end of the stream: waited for.
    assert_eq!(
        std::fs::read_to_string(root.join("c/last.txt")).unwrap(),
        "last\n"
    );
    assert_eq!(sha256_file(&root.join("b/big.bin")), {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&big)))
    });
    d.wait_complete(std::time::Duration::from_secs(120));
    let missing = std::fs::metadata(root.join("c/missing")).unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    let out = d.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());
    let log = d.log_text();
    assert!(
        log.contains("serving the layer while it streams in"),
        "{log}"
    );
    assert!(!log.contains("neither in walk order"), "{log}");
    let (bytes, requests, _) = served(&reg, "stream", &layer);
    let size = layer_sizes(&reg, "stream")[0].1;
    assert_eq!(bytes, size, "fetched once ({requests} requests)");
}

/// Issue 14 items 3 and 4: the first node builds a random-access index of a plain gzip layer
/// while it unpacks it (decoder checkpoints and file digests), `lazypull index push` publishes
/// it as an OCI artifact whose subject is the image (the tag-schema fallback on Debian's
/// docker-registry, which has no referrers API), and a second node that pulls the image finds
/// it and reads files lazily with range requests from the nearest checkpoint, fetching a small
/// part of the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_gzip_index_makes_a_plain_layer_lazy_on_another_node() {
    shared_index_makes_a_plain_layer_lazy("gzip").await
}

/// The same with a plain zstd layer of many frames (pzstd's kind): its frame starts are the
/// checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_index_of_zstd_frames_makes_a_plain_layer_lazy_on_another_node() {
    shared_index_makes_a_plain_layer_lazy("zstd-frames").await
}

async fn shared_index_makes_a_plain_layer_lazy(compression: &str) {
    if !require_tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::empty(None);
    let text: Vec<u8> = (0..60_000)
        .flat_map(|i| format!("line {i} of a compressible text file\n").into_bytes())
        .collect();
    let (noise1, noise2) = (noise(6 << 20, 0x1234_5678), noise(6 << 20, 0x8765_4321));
    let tar = tar_of(&[
        ("a/", vec![]),
        ("a/first.txt", b"first\n".to_vec()),
        ("b/", vec![]),
        ("b/noise1.bin", noise1),
        ("c/", vec![]),
        ("c/text.txt", text.clone()),
        ("d/", vec![]),
        ("d/noise2.bin", noise2.clone()),
        ("e/", vec![]),
        ("e/last.txt", b"last\n".to_vec()),
    ]);
    push_layer_as(&reg, "plainidx", &tar, compression).await;
    let layer = layer_digests(&reg, "plainidx")[0].clone();
    let size = layer_sizes(&reg, "plainidx")[0].1;
    let name = format!("{}/plainidx:latest", reg.host());

    // Node A: pulls and fills; the unpack records the index.
    let a = Daemon::start(&[]);
    {
        let mut c = a.client().await;
        pull(&mut c, &name).await.expect("pull on node A");
    }
    a.wait_complete(std::time::Duration::from_secs(120));
    wait_until("layer unpacked", std::time::Duration::from_secs(60), || {
        a.status_json()["images"][0]["layers"][0]["unpacked"] == true
    });
    let shown: serde_json::Value =
        serde_json::from_str(&lazypull_ok(&a, &["index", "show", &name, "--json"])).unwrap();
    let checkpoints = shown[0]["checkpoints"].as_u64().unwrap_or(0);
    assert!(
        checkpoints >= 8,
        "checkpoints every MiB: {shown:#}\n{}",
        a.log_text()
    );
    assert_eq!(shown[0]["mode"], "indexed", "{shown:#}");
    let l = &a.status_json()["images"][0]["layers"][0];
    assert_eq!(
        (&l["mode"], &l["index_source"]),
        (&"complete".into(), &"built here".into()),
        "{l:#}"
    );
    let pushed = lazypull_ok(&a, &["index", "push", &name]);
    assert!(
        pushed.contains("pushed the random-access index of 1 layer"),
        "{pushed}"
    );
    let (fetched_by_a, _, _) = served(&reg, "plainidx", &layer);
    assert_eq!(fetched_by_a, size, "node A fetched the layer once");
    // Node A's caches wiped (the file cache and the layer blob; the catalogue and the index
    // kept): the layer mounts lazily again, through its index.
    let mut a = a;
    a.terminate();
    for e in std::fs::read_dir(a.store().join("files/sha256")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    std::fs::remove_file(a.blob(&layer)).unwrap();
    a.restart_with(&["--no-fill"]);
    let work_a = tempfile::tempdir().unwrap();
    let root_a = work_a.path().join("root");
    mount_image(&a, &name, &root_a, &[]);
    assert_eq!(
        std::fs::read(root_a.join("c/text.txt"))
            .unwrap_or_else(|e| panic!("c/text.txt: {e}\n{}", a.log_text())),
        text
    );
    let out = a.cli(&["umount", root_a.to_str().unwrap()]);
    assert!(out.status.success());
    let (after_wipe, _, _) = served(&reg, "plainidx", &layer);
    let fetched_by_a = after_wipe;
    assert!(
        after_wipe - size < size / 3,
        "a wiped node A fetched {} of {size} bytes again",
        after_wipe - size
    );
    drop(a);

    // Node B: no filler, so every byte it fetches is for a read.
    let b = Daemon::start(&["--no-fill"]);
    {
        let mut c = b.client().await;
        pull(&mut c, &name).await.expect("pull on node B");
    }
    let log = b.log_text();
    assert!(
        log.contains("shared random-access index found"),
        "node B found the index:\n{log}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&lazypull_ok(&b, &["index", "show", &name, "--json"])).unwrap();
    assert_eq!(shown[0]["mode"], "indexed (shared)", "{shown:#}");
    let l = &b.status_json()["images"][0]["layers"][0];
    let mode = if compression == "gzip" {
        "lazy: gzip index"
    } else {
        "lazy: zstd frame index"
    };
    assert_eq!(
        (&l["mode"], &l["index_source"]),
        (&mode.into(), &"the registry".into()),
        "{l:#}"
    );
    let shown = lazypull_ok(&b, &["status"]);
    assert!(
        shown.contains(&format!("{mode}, index from the registry")),
        "{shown}"
    );
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    mount_image(&b, &name, &root, &[]);
    let read = |p: &str| {
        std::fs::read(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}\n{}", b.log_text()))
    };
    assert_eq!(read("e/last.txt"), b"last\n");
    assert_eq!(read("c/text.txt"), text);
    assert_eq!(read("a/first.txt"), b"first\n");
    let missing = std::fs::metadata(root.join("c/missing")).unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    let (total, requests, full) = served(&reg, "plainidx", &layer);
    let fetched_by_b = total - fetched_by_a;
    eprintln!("node B fetched {fetched_by_b} of {size} bytes ({requests} requests in all)");
    assert!(!full, "node B sent no full-blob GET");
    assert!(
        fetched_by_b * 3 < size,
        "node B fetched {fetched_by_b} of {size} bytes ({requests} requests in all)"
    );
    // A read in the middle of a file spanning many checkpoints, checked against the original.
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(root.join("d/noise2.bin")).unwrap();
    f.seek(std::io::SeekFrom::Start(3 << 20)).unwrap();
    let mut got = vec![0u8; 300_000];
    f.read_exact(&mut got).unwrap();
    assert_eq!(got, noise2[3 << 20..(3 << 20) + 300_000]);
    drop(f);
    let log = b.log_text();
    assert!(
        log.contains("serving the layer lazily through its gzip index"),
        "{log}"
    );
    // gzip: the checkpoint windows are a blob of their own, read by range, only some of them.
    let index = b.status_json()["images"][0]["layers"][0]["index_digest"]
        .as_str()
        .unwrap()
        .to_string();
    let json = lazypull::store::Layout::new(b.store())
        .read_blob(&lazypull::oci::Digest::parse(&index).unwrap())
        .unwrap();
    let (_, ra) =
        lazypull::layer::tar::decode_index_with(&json, &lazypull::layer::tar::Limits::default())
            .unwrap();
    let ra = ra.unwrap();
    if compression == "gzip" {
        assert!(ra.windows_apart(), "windows kept apart");
        let (windows, windows_size) = ra.windows.clone().unwrap();
        let (got, n, full) = served(&reg, "plainidx", windows.as_str());
        eprintln!("node B fetched {got} of {windows_size} bytes of windows in {n} requests");
        assert!(
            !full && n > 0 && got < windows_size,
            "{got} of {windows_size} in {n}"
        );
    } else {
        assert!(!ra.windows_apart() && ra.windows.is_none());
    }
    let out = b.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());
}

/// A shared gzip index that passes every structural check but is wrong (a file's digest
/// edited): a read through it fails (EIO, nothing unverified reaches the reader), the error says
/// why, and the node drops the index (the layer is then fetched whole, as without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_shared_index_is_refused_at_the_first_read() {
    if !require_tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    use lazypull::oci::Digest;
    let reg = Registry::empty(None);
    let tar = tar_of(&[
        ("a/", vec![]),
        ("a/big.bin", noise(3 << 20, 5)),
        ("e/", vec![]),
        ("e/last.txt", b"last\n".to_vec()),
    ]);
    push_layers(&reg, "badidx", &[tar]).await;
    let layer = layer_digests(&reg, "badidx")[0].clone();
    let name = format!("{}/badidx:latest", reg.host());
    let mut a = Daemon::start(&[]);
    {
        let mut c = a.client().await;
        pull(&mut c, &name).await.expect("pull on node A");
    }
    wait_until("layer unpacked", std::time::Duration::from_secs(60), || {
        a.status_json()["images"][0]["layers"][0]["unpacked"] == true
    });
    let index = a.status_json()["images"][0]["layers"][0]["index_digest"]
        .as_str()
        .unwrap()
        .to_string();
    a.terminate();
    // The index with e/last.txt's digest replaced, under its new digest.
    let layout = lazypull::store::Layout::new(a.store());
    let json = layout.read_blob(&Digest::parse(&index).unwrap()).unwrap();
    let (good, bad) = (Digest::of(b"last\n"), Digest::of(b"LAST\n"));
    let json = String::from_utf8(json).unwrap();
    assert!(json.contains(good.as_str()));
    let json = json.replace(good.as_str(), bad.as_str());
    let edited = Digest::of(json.as_bytes());
    layout.put_blob(&edited, json.as_bytes()).unwrap();
    lazypull::store::Catalogue::open(&layout.db())
        .unwrap()
        .set_unpacked(&layer, Some(edited.as_str()))
        .unwrap();
    let pushed = lazypull_ok(&a, &["index", "push", &name]);
    assert!(pushed.contains("pushed"), "{pushed}");

    let b = Daemon::start(&["--no-fill"]);
    {
        let mut c = b.client().await;
        pull(&mut c, &name).await.expect("pull on node B");
    }
    assert!(b.log_text().contains("shared random-access index found"));
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    mount_image(&b, &name, &root, &[]);
    let err = std::fs::read(root.join("e/last.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    let log = b.log_text();
    assert!(
        log.contains("a read through the layer's shared gzip index gave wrong bytes"),
        "{log}"
    );
    let l = &b.status_json()["images"][0]["layers"][0];
    assert_eq!(l["index_digest"], serde_json::Value::Null, "{l:#}");
    let out = b.cli(&["umount", root.to_str().unwrap()]);
    assert!(out.status.success());
}

/// A plain zstd layer of one frame (what containerd and buildkit write) has no random access:
/// it streams in on every node, and `status` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_why_a_single_frame_zstd_layer_has_no_random_access() {
    if !require_tools() || !std::path::Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::empty(None);
    let tar = tar_of(&[("a/", vec![]), ("a/big.bin", noise(3 << 20, 9))]);
    push_layer_as(&reg, "onezstd", &tar, "zstd").await;
    let name = format!("{}/onezstd:latest", reg.host());
    let d = Daemon::start(&[]);
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.expect("pull");
    }
    wait_until("layer unpacked", std::time::Duration::from_secs(60), || {
        d.status_json()["images"][0]["layers"][0]["unpacked"] == true
    });
    let l = &d.status_json()["images"][0]["layers"][0];
    assert!(
        l["no_random_access"]
            .as_str()
            .is_some_and(|w| w.starts_with("one zstd frame")),
        "{l:#}"
    );
    let shown = lazypull_ok(&d, &["status"]);
    assert!(
        shown.contains("no random access: one zstd frame"),
        "{shown}"
    );
    let out = d.cli(&["index", "push", &name]);
    assert!(!out.status.success(), "nothing to push");
}
