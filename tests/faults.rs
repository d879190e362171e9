//! Faults: corrupted bodies, registry outages and daemon crashes during fills.

mod common;

use common::*;
use std::time::{Duration, Instant};

macro_rules! need_tools {
    () => {
        if !require_tools() {
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_layer_is_never_stored() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    // Flip one byte 200 KB into each connection's response stream: inside the layer bodies.
    let proxy = Netem::start(&reg.host(), &["--tamper-after", "200000"]);
    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    let name = format!("{}/big:latest", proxy.host());
    pull(&mut c, &name)
        .await
        .expect("manifest and config are intact, so the lazy pull succeeds");
    let big = layer_digests(&reg, "big")[1].clone();
    wait_until(
        "the corrupted layer to fail",
        Duration::from_secs(90),
        || layer_local(&d, &big).1 == "failed",
    );
    let (_, _, err) = layer_local(&d, &big);
    let err = err.unwrap_or_default();
    assert!(
        err.contains("digest") || err.contains("decompress") || err.contains("diff_id"),
        "verification error: {err}"
    );
    assert!(
        !d.store()
            .join("blobs/sha256")
            .join(big.trim_start_matches("sha256:"))
            .exists(),
        "corrupt blob stored under its final name"
    );
    // A full pull retries the layer. Whatever the proxy does to the retry, the outcome is either
    // an error or a blob that verifies: never corrupt bytes under the final name.
    let full = c
        .pull_image(lazypull::rpc::cri::PullImageRequest {
            image: Some(lazypull::rpc::cri::ImageSpec {
                image: name.clone(),
                annotations: [("lazypull.io/pull-mode".to_string(), "full".to_string())].into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await;
    let blob = d
        .store()
        .join("blobs/sha256")
        .join(big.trim_start_matches("sha256:"));
    match full {
        Ok(_) => assert_eq!(sha256_file(&blob), big, "a stored layer always verifies"),
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(!blob.exists());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_killed_mid_fill_resumes_with_range() {
    need_tools!();
    let mut reg = Registry::with_fixtures(None);
    let proxy = Netem::start(&reg.host(), &["--mbit", "40"]);
    let d = Daemon::start(&[]);
    let mut c = d.client().await;
    pull(&mut c, &format!("{}/big:latest", proxy.host()))
        .await
        .unwrap();
    let big = layer_digests(&reg, "big")[1].clone();
    wait_until(
        "8 MiB of the layer to be durable",
        Duration::from_secs(60),
        || layer_local(&d, &big).0 >= 8 << 20,
    );
    reg.stop();
    std::thread::sleep(Duration::from_millis(1500));
    reg.restart();
    d.wait_complete(Duration::from_secs(120));
    assert_eq!(sha256_file(&d.blob(&big)), big, "resumed blob verifies");
    let log = std::fs::read_to_string(reg.log()).unwrap();
    let gets: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("127.0.0.1 ") && l.contains(&format!("/v2/big/blobs/{big} ")))
        .collect();
    assert!(
        gets.iter().any(|l| l.contains("\" 206 ")),
        "the resumed fill used a range request: {gets:#?}"
    );
    assert!(d.log_text().contains("resuming fill"), "{}", d.log_text());
}

/// `big:latest` pulled lazily by a daemon (filler on) through a link of `mbit`: the fixture
/// registry, the link, the daemon and the name pulled.
async fn big_pulled_through(mbit: u32) -> (Registry, Netem, Daemon, String) {
    let reg = Registry::with_fixtures(None);
    let proxy = Netem::start(&reg.host(), &["--mbit", &mbit.to_string()]);
    let d = Daemon::start(&[]);
    let name = format!("{}/big:latest", proxy.host());
    {
        let mut c = d.client().await;
        pull(&mut c, &name).await.unwrap();
    }
    (reg, proxy, d, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sigkill_mid_fill_resumes_after_restart() {
    need_tools!();
    let (reg, _proxy, mut d, name) = big_pulled_through(40).await;
    let big = layer_digests(&reg, "big")[1].clone();
    wait_until(
        "8 MiB of the layer to be durable",
        Duration::from_secs(60),
        || layer_local(&d, &big).0 >= 8 << 20,
    );
    d.kill9();
    let (kept, state, _) = layer_local(&d, &big);
    assert!(
        kept >= 8 << 20 && state == "pending",
        "progress survives SIGKILL: {kept} {state}"
    );
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    d.restart_with(&["--metrics-listen", &metrics_addr]);
    d.wait_complete(Duration::from_secs(120));
    let blob = d
        .store()
        .join("blobs/sha256")
        .join(big.trim_start_matches("sha256:"));
    assert_eq!(sha256_file(&blob), big);
    assert!(d.log_text().contains("resuming fill"), "{}", d.log_text());
    let mut c = d.client().await;
    assert_eq!(
        status(&mut c, &name).await.expect("image kept").repo_tags,
        vec![name]
    );
    // After the restart the filler fetched only what was not durable: no full refetch.
    let size = layer_sizes(&reg, "big")[1].1;
    let after = metric(&metrics(&metrics_addr), "lazypull_fill_bytes_total") as u64;
    assert!(
        after <= size - kept,
        "{after} bytes fetched after the restart, {kept} of {size} were kept"
    );
}

/// A daemon in a crash loop (kill -9 every 0.3 to 0.9 s, twenty times) still makes progress
/// with every life, and the layer completes and verifies once it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_again_and_again_keeps_its_fill_progress() {
    need_tools!();
    let (reg, _proxy, mut d, _) = big_pulled_through(100).await;
    let (big, size) = layer_sizes(&reg, "big")[1].clone();
    let mut kept = vec![];
    for i in 0..20u64 {
        std::thread::sleep(Duration::from_millis(300 + (i * 37) % 600));
        d.kill9();
        let (filled, state, _) = layer_local(&d, &big);
        kept.push(filled);
        if state == "complete" {
            break;
        }
        d.restart();
    }
    eprintln!("durable bytes after each kill -9: {kept:?} of {size}");
    let lives = kept.len() as u64;
    assert!(
        kept.last().copied().unwrap_or(0) >= (size / 2).min(lives * (1 << 20)),
        "a crash loop of {lives} lives kept {kept:?} of {size}"
    );
    assert!(
        kept.windows(2).all(|w| w[1] >= w[0]),
        "progress never goes back: {kept:?}"
    );
    if d.pid() == 0 {
        d.restart();
    }
    d.wait_complete(Duration::from_secs(120));
    assert_eq!(sha256_file(&d.blob(&big)), big);
}

/// A registry that stalls (connections open, no bytes: SIGSTOP) fails a read of a file not
/// yet local with EIO within `fuse.read_timeout` in all, although the kernel asks twice; reads
/// work again within a second of the registry coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_registry_fails_reads_within_the_read_timeout() {
    need_tools!();
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse missing");
        return;
    }
    let reg = Registry::with_fixtures(None);
    let h = reg.host();
    let dir = tempfile::tempdir().unwrap();
    lazypull_convert(&reg, "big:latest", "big:esgz", &[]);
    let cfg = dir.path().join("config.yaml");
    // A request that gets no bytes for 2 s fails (fetch.read_timeout), within the 3 s a read
    // may take in all.
    std::fs::write(
        &cfg,
        "fuse: {read_timeout: 3s}\nfetch: {read_timeout: 2s, retries: 0}\n",
    )
    .unwrap();
    let d = Daemon::start(&["--no-fill", "--config", cfg.to_str().unwrap()]);
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{h}/big:esgz")).await.unwrap();
    }
    let layer = raw_manifest(&reg, "big:esgz")["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until("the TOC", Duration::from_secs(30), || {
        d.status_json()["images"][0]["layers"][1]["toc_entries"].is_u64()
    });
    let file = d
        .fuse_mountpoint()
        .unwrap()
        .join(layer.trim_start_matches("sha256:"))
        .join("big/big.bin");
    let md5 = || {
        std::process::Command::new("md5sum")
            .arg(&file)
            .output()
            .unwrap()
    };
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &reg.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal("-STOP");
    let t = Instant::now();
    let out = md5();
    let failed_in = t.elapsed();
    signal("-CONT");
    assert!(!out.status.success(), "read on a stalled registry");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        failed_in < Duration::from_millis(3500),
        "EIO after {failed_in:?}; fuse.read_timeout is 3 s"
    );
    // Reads work again as soon as the registry answers: the first bytes of the file within
    // a bound far above the product's 500 ms failure memory (a loaded machine must not fail
    // this), then the whole file.
    let head = || {
        std::process::Command::new("head")
            .args(["-c", "65536"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let t = Instant::now();
    let mut last = head();
    while !last.status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "reads do not work again: {}",
            String::from_utf8_lossy(&last.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
        last = head();
    }
    let back_in = t.elapsed();
    assert_eq!(last.stdout.len(), 65536);
    let whole = md5();
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    eprintln!(
        "stalled registry: EIO after {failed_in:?}; reads work again {back_in:?} after it came back"
    );
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fails_the_pull_and_leaves_no_partial_blob() {
    need_tools!();
    if !is_root() {
        eprintln!("SKIP: mounting a small tmpfs needs root");
        return;
    }
    let reg = Registry::with_fixtures(None);
    let small = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(small.path())
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(small.path().to_path_buf());
    let root = small.path().join("store");
    let sock = small.path().join("cri.sock");
    let child = std::process::Command::new(bin())
        .arg("--root")
        .arg(&root)
        .arg("--socket")
        .arg(&sock)
        .args([
            "serve",
            "--pull-mode",
            "full",
            "--no-fuse",
            "--no-snapshotter",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    wait_until("socket", Duration::from_secs(10), || sock.exists());
    let mut c = lazypull::rpc::cri::image_service_client::ImageServiceClient::new(
        lazypull::rpc::connect_unix(&sock).await.unwrap(),
    );
    let t = Instant::now();
    let e = pull(&mut c, &format!("{}/big:latest", reg.host()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "disk full is not retried for long: {:?}",
        t.elapsed()
    );
    let big = layer_digests(&reg, "big")[1].clone();
    let hex = big.trim_start_matches("sha256:");
    assert!(
        !root.join("blobs/sha256").join(hex).exists(),
        "no partial blob under a final name"
    );
    assert!(
        !root.join("partial/sha256").join(hex).exists(),
        "partial file removed to give space back"
    );
    // The smaller layer that fitted completes (its fill may still be running when the big
    // layer's failure ends the pull) and verifies.
    let base = layer_digests(&reg, "big")[0].clone();
    let base_blob = root
        .join("blobs/sha256")
        .join(base.trim_start_matches("sha256:"));
    wait_until("the small layer", Duration::from_secs(30), || {
        base_blob.exists()
    });
    assert_eq!(sha256_file(&base_blob), base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_registry_fails_within_the_pull_timeout() {
    need_tools!();
    // Accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("127.0.0.1:{}", hole.local_addr().unwrap().port());
    let d = Daemon::start(&["--pull-timeout", "2s"]);
    let mut c = d.client().await;
    let t = Instant::now();
    let e = pull(&mut c, &format!("{host}/app:1")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains(&host) && e.message().contains("2s"),
        "{}",
        e.message()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_gc_removes_orphans_and_keeps_referenced_blobs() {
    need_tools!();
    let reg = Registry::with_fixtures(None);
    let mut d = Daemon::start(&["--gc-interval", "1s"]);
    {
        let mut c = d.client().await;
        pull(&mut c, &format!("{}/busybox:latest", reg.host()))
            .await
            .unwrap();
    }
    d.wait_complete(Duration::from_secs(30));
    // Orphans, as a crash or a killed prune could leave them.
    let blobs = d.store().join("blobs/sha256");
    let partial = d.store().join("partial/sha256");
    let orphan = blobs.join("ab".repeat(32));
    let orphan_partial = partial.join("cd".repeat(32));
    let young_tmp = blobs.join(".tmp-in-progress");
    std::fs::write(&orphan, b"nobody needs me").unwrap();
    std::fs::write(&orphan_partial, b"half").unwrap();
    std::fs::write(&young_tmp, b"a write in progress").unwrap();
    let kept: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| *p != orphan && *p != young_tmp)
        .collect();
    // The sweep deletes first and logs its summary after, so wait for both.
    wait_until("the periodic gc", Duration::from_secs(10), || {
        !orphan.exists() && !orphan_partial.exists() && d.log_text().contains("garbage collected")
    });
    assert!(
        young_tmp.exists(),
        "a young temp file of a write in progress is kept"
    );
    for p in &kept {
        assert!(p.exists(), "referenced blob {} kept", p.display());
    }
    // Cleanly restartable afterwards, image intact.
    d.terminate();
    d.restart();
    let mut c = d.client().await;
    assert!(
        status(&mut c, &format!("{}/busybox:latest", reg.host()))
            .await
            .is_some()
    );
}
