//! `lazypull mount IMAGE DIR [--upper U]` and `lazypull umount DIR`: overlayfs over the layer
//! directories the daemon serves from its FUSE mount.

use crate::cli::{MountArgs, UmountArgs};
use crate::config::Config;
use crate::store::ImageRecord;
use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags};
use std::time::{Duration, Instant};

/// The mount options of one overlay mount must fit in a page.
const MAX_OPTIONS: usize = 4095;

/// Wait until every layer of the image can be served: eStargz layers once their TOC is verified
/// (lazily), other layers once the daemon's fill has begun unpacking them (their files are
/// served as they arrive) or they are unpacked into the file cache.
async fn wait_for_layers(
    cfg: &Config,
    name: &str,
    timeout: Duration,
    fuse_root: &std::path::Path,
) -> anyhow::Result<ImageRecord> {
    let start = Instant::now();
    loop {
        let db = super::open_read_only(cfg)?.with_context(|| {
            format!(
                "the store {} is empty: pull {name} first",
                cfg.root.display()
            )
        })?;
        let img = crate::images::resolve_in(&db, name)?
            .with_context(|| format!("no image {name:?} in the store: pull it first"))?;
        let (mut tocs, mut whole) = (0, 0);
        for l in &img.layers {
            if l.mountable() {
                continue;
            }
            if l.state == crate::store::LayerState::Failed {
                bail!(
                    "layer {} failed to fetch: {}",
                    l.digest,
                    l.error.as_deref().unwrap_or("unknown error")
                );
            }
            if l.toc_usable() {
                tocs += 1;
            } else if std::fs::metadata(fuse_root.join(l.digest.trim_start_matches("sha256:")))
                .is_ok()
            {
                // The daemon serves it while it streams in.
                continue;
            } else {
                // No TOC (or a refused one): served once fetched whole and unpacked.
                whole += 1;
            }
        }
        if tocs + whole == 0 {
            return Ok(img);
        }
        if start.elapsed() > timeout {
            bail!(
                "{name}: {tocs} layer TOC(s) not fetched and {whole} non-lazy layer(s) not fetched whole within {timeout:?}: \
                 is `lazypull serve` running (with its filler on: not --no-fill) and the registry reachable?"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn mount(cfg: &Config, args: &MountArgs) -> anyhow::Result<()> {
    let timeout = humantime::parse_duration(&args.timeout)
        .with_context(|| format!("--timeout {:?}", args.timeout))?;
    let fuse_root = args
        .fuse_mountpoint
        .clone()
        .unwrap_or_else(|| cfg.fuse.mountpoint.clone());
    let img = wait_for_layers(cfg, &args.image, timeout, &fuse_root).await?;
    if img.layers.is_empty() {
        bail!("{} has no layers", args.image);
    }
    // Top layer first, as overlayfs wants them.
    let mut lowers = vec![];
    for l in img.layers.iter().rev() {
        let dir = fuse_root.join(l.digest.trim_start_matches("sha256:"));
        std::fs::metadata(&dir).with_context(|| {
            format!("layer directory {} is not there: is `lazypull serve` running with its FUSE mount at {}?", dir.display(), fuse_root.display())
        })?;
        lowers.push(dir.display().to_string());
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut options = format!("lowerdir={}", lowers.join(":"));
    if let Some(upper) = &args.upper {
        let work = args.work.clone().unwrap_or_else(|| {
            let mut w = upper.as_os_str().to_owned();
            w.push(".work");
            w.into()
        });
        for d in [upper, &work] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        options.push_str(&format!(
            ",upperdir={},workdir={}",
            upper.display(),
            work.display()
        ));
    } else if lowers.len() == 1 {
        // overlayfs wants two lower layers when there is no upper: bind the only one read-only.
        nix::mount::mount(
            Some(lowers[0].as_str()),
            &args.dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} at {}", lowers[0], args.dir.display()))?;
        nix::mount::mount(
            None::<&str>,
            &args.dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .context("making the bind mount read-only")?;
        println!(
            "mounted {} at {} (1 layer, read-only, lazy)",
            args.image,
            args.dir.display()
        );
        return Ok(());
    }
    if options.len() > MAX_OPTIONS {
        bail!(
            "{} layers need {} bytes of overlay options, over the kernel's {MAX_OPTIONS}: images this deep are not supported yet",
            lowers.len(),
            options.len()
        );
    }
    nix::mount::mount(
        Some("overlay"),
        &args.dir,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .with_context(|| {
        format!(
            "mounting overlay at {} ({} layers)",
            args.dir.display(),
            lowers.len()
        )
    })?;
    println!(
        "mounted {} at {} ({} layers, {}, lazy)",
        args.image,
        args.dir.display(),
        lowers.len(),
        if args.upper.is_some() {
            "writable"
        } else {
            "read-only"
        }
    );
    Ok(())
}

pub fn umount(args: &UmountArgs) -> anyhow::Result<()> {
    let flags = if args.lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match nix::mount::umount2(&args.dir, flags) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => bail!(
            "{} is busy (a process uses it); close it or pass --lazy",
            args.dir.display()
        ),
        Err(nix::errno::Errno::EINVAL) => bail!("{} is not a mount point", args.dir.display()),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", args.dir.display())),
    }
}
