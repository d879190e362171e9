//! `lazypull convert --record -- CMD`: run CMD chrooted in a lazy mount of the source image and
//! return the files the daemon's FUSE layer saw it open, per layer.

use crate::cli::MountArgs;
use crate::config::Config;
use crate::oci::{Digest, Reference};
use crate::rpc::control::{
    StartRecordingRequest, StopRecordingRequest, control_client::ControlClient,
};
use crate::rpc::cri::{self, image_service_client::ImageServiceClient};
use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Mounts made for the command, undone in reverse order on drop.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            if let Err(e) = nix::mount::umount2(m, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %m.display(), error = %e, "cannot unmount");
            }
        }
    }
}

fn bind(src: &Path, dst: &Path, mounts: &mut Mounts) -> anyhow::Result<()> {
    nix::mount::mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {} at {}", src.display(), dst.display()))?;
    mounts.0.push(dst.to_path_buf());
    Ok(())
}

/// Pull `image` through the daemon, mount it with a scratch upper dir, run `cmd` in it under
/// a recording, and return the opened files per layer digest, first opens first.
pub async fn record(
    cfg: &Config,
    image: &Reference,
    cmd: &[String],
    timeout: &str,
    fuse_mountpoint: Option<PathBuf>,
) -> anyhow::Result<Vec<(Digest, Vec<String>)>> {
    if cmd.is_empty() {
        bail!(
            "--record needs a command after `--`, e.g. --record -- /usr/bin/python3 -c 'import json'"
        );
    }
    let timeout = humantime::parse_duration(timeout)
        .with_context(|| format!("--record-timeout {timeout:?}"))?;
    let channel = crate::rpc::connect_unix(&cfg.cri.socket).await.with_context(|| {
        format!(
            "--record needs the daemon: cannot reach it at {} (is `lazypull serve` running? --socket?)",
            cfg.cri.socket.display()
        )
    })?;
    let name = image.to_string();
    ImageServiceClient::new(channel.clone())
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("pulling {name} to record: {}", s.message()))?;

    let scratch = tempfile::Builder::new()
        .prefix("lazypull-record-")
        .tempdir()
        .context("creating a scratch directory")?;
    let root = scratch.path().join("root");
    let upper = scratch.path().join("upper");
    super::mount::mount(
        cfg,
        &MountArgs {
            image: name.clone(),
            dir: root.clone(),
            upper: Some(upper),
            work: None,
            fuse_mountpoint,
            timeout: "10m".into(),
        },
    )
    .await?;
    let mut mounts = Mounts(vec![root.clone()]);
    // What most programs expect to find: /proc, /dev, and the host's resolver config.
    for (what, dir) in [("proc", "proc"), ("dev", "dev")] {
        let target = root.join(dir);
        if std::fs::create_dir_all(&target).is_err() {
            continue;
        }
        if what == "proc" {
            nix::mount::mount(
                Some("proc"),
                &target,
                Some("proc"),
                MsFlags::empty(),
                None::<&str>,
            )
            .context("mounting /proc in the image")?;
            mounts.0.push(target);
        } else {
            bind(Path::new("/dev"), &target, &mut mounts)?;
        }
    }

    let db = super::open_read_only(cfg)?.context("the store is empty")?;
    let img = crate::images::resolve_in(&db, &name)?
        .with_context(|| format!("{name} is not in the store after its pull"))?;
    drop(db);
    let layers: Vec<String> = img.layers.iter().map(|l| l.digest.to_string()).collect();
    let mut control = ControlClient::new(channel);
    let id = control
        .start_recording(StartRecordingRequest {
            layer_digests: layers,
        })
        .await
        .map_err(|s| anyhow::anyhow!("starting the recording: {}", s.message()))?
        .into_inner()
        .id;

    println!("recording: chroot {} {}", root.display(), cmd.join(" "));
    let mut child = tokio::process::Command::new("chroot")
        .arg(&root)
        .args(cmd)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("running chroot")?;
    let outcome = tokio::time::timeout(timeout, child.wait()).await;
    match outcome {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => {
            eprintln!("recording: the command ended with {status}; keeping what it opened")
        }
        Ok(Err(e)) => eprintln!("recording: waiting for the command: {e}"),
        Err(_) => {
            eprintln!("recording: the command ran for {timeout:?} (--record-timeout); stopping it");
            let _ = child.kill().await;
        }
    }
    let files = control
        .stop_recording(StopRecordingRequest { id })
        .await
        .map_err(|s| anyhow::anyhow!("stopping the recording: {}", s.message()))?
        .into_inner()
        .files;
    drop(mounts);

    let mut per: Vec<(Digest, Vec<String>)> = vec![];
    let mut index: HashMap<Digest, usize> = HashMap::new();
    for f in files {
        let d = Digest::parse(&f.layer_digest)?;
        let i = *index.entry(d.clone()).or_insert_with(|| {
            per.push((d, vec![]));
            per.len() - 1
        });
        per[i].1.push(f.path);
    }
    Ok(per)
}
