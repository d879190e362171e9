//! Foreground first, through a real bottleneck (scripts/bottleneck: the registry in a network
//! namespace behind a veth pair shaped with tbf, one FIFO queue, real TCP, plus a delay-only
//! proxy). A bulk download keeps such a queue full; on-demand reads of a starting container
//! must not wait behind the background filler's.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A registry behind a bottleneck, torn down on drop.
struct Bottleneck {
    dir: tempfile::TempDir,
    addr: String,
}

impl Bottleneck {
    fn start(storage: &Path, mbit: u32, queue_ms: u32) -> Option<Bottleneck> {
        let dir = tempfile::tempdir().unwrap();
        let netem = PathBuf::from(env!("CARGO_BIN_EXE_lazypull-netem"));
        let out = Command::new(repo_root().join("scripts/bottleneck"))
            .args(["--start", "--dir"])
            .arg(dir.path())
            .arg("--storage")
            .arg(storage)
            .args(["--mbit", &mbit.to_string(), "--rtt-ms", "20"])
            .args(["--queue-ms", &queue_ms.to_string()])
            .env("NETEM", netem)
            .output()
            .expect("scripts/bottleneck");
        if !out.status.success() {
            eprintln!(
                "SKIP: cannot build the bottleneck (network namespaces, tc): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Bottleneck { dir, addr })
    }

    /// Wait until the link has carried nothing for a while (an aborted download drains).
    fn wait_idle(&self) {
        let st = Command::new(repo_root().join("scripts/bottleneck"))
            .args(["--wait-idle", "--quiet-ms", "300", "--dir"])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "the link did not go idle");
    }
}

impl Drop for Bottleneck {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/bottleneck"))
            .args(["--stop", "--dir"])
            .arg(self.dir.path())
            .status();
    }
}

/// Wall time of `reads` 4 KiB reads, one after another, each of a chunk never read before.
fn timed_reads(file: &Path, offsets: &[u64]) -> Duration {
    let f = std::fs::File::open(file).expect("open on the lazy mount");
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    for &o in offsets {
        f.read_exact_at(&mut buf, o)
            .unwrap_or_else(|e| panic!("read at {o}: {e}"));
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_reads_are_not_slowed_by_the_filler() {
    if !require_tools() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    // big (busybox + 32 MiB of random bytes) as eStargz with 64 KiB chunks: each read below
    // costs one small range request.
    lazypull_convert(&reg, "big:latest", "big:small", &["--chunk-size", "65536"]);
    // 10 Mbit/s with a queue of 100 ms: a bulk flow adds ~100 ms to every request behind it.
    let Some(link) = Bottleneck::start(reg.dir.path(), 10, 100) else {
        return;
    };
    let manifest = raw_manifest(&reg, "big:small");
    let big_layer = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let small = ["--read-ahead-kib", "0", "--read-ahead-neighbours-kib", "0"];

    let run = |fill: bool, first: u64| {
        let mut args = small.to_vec();
        if !fill {
            args.push("--no-fill");
        }
        link.wait_idle();
        let d = Daemon::start(&args);
        let name = format!("{}/big:small", link.addr);
        let rt = tokio::runtime::Handle::current();
        let id = tokio::task::block_in_place(|| {
            rt.block_on(async {
                let mut c = d.client().await;
                pull(&mut c, &name).await
            })
        })
        .expect("lazy pull through the bottleneck");
        assert!(id.starts_with("sha256:"));
        wait_until("the TOC", Duration::from_secs(60), || {
            d.status_json()["images"][0]["layers"][1]["toc_entries"].is_u64()
        });
        if fill {
            // The filler is downloading the 32 MiB layer: the queue is full.
            wait_until("the fill to be under way", Duration::from_secs(60), || {
                layer_local(&d, &big_layer).0 > 0
            });
        }
        let file = d
            .fuse_mountpoint()
            .unwrap()
            .join(big_layer.trim_start_matches("sha256:"))
            .join("big/big.bin");
        // 16 reads 1 MiB apart, starting at `first`: each a chunk of its own.
        let offsets: Vec<u64> = (0..16).map(|i| first + (i << 20) + 4096).collect();
        let took = timed_reads(&file, &offsets);
        drop(d);
        took
    };
    let off = run(false, 0);
    let on = run(true, 16 << 20);
    eprintln!(
        "16 on-demand reads through 10 Mbit/s: {off:?} with the filler off, {on:?} with it on"
    );
    assert!(
        on.as_secs_f64() <= off.as_secs_f64() * 1.5 + 0.2,
        "on-demand reads with the filler on took {on:?}, {off:?} with it off"
    );
}
