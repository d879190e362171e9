//! `lazypull load SOURCE...`: images from docker save tarballs, OCI archives and layouts (no
//! registry), or from a list of references (pulled whole), into the store.

use super::{Target, human_bytes, open_target, short_id};
use crate::cli::{LoadArgs, PrefetchArgs};
use crate::config::Config;
use crate::images::{LoadOptions, Loaded};
use crate::registry::auth::Secret;
use crate::rpc::control::{LoadOptions as WireOptions, LoadRequest, control_client::ControlClient};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Archive bytes per message to the daemon (its limit is 2 MiB).
const CHUNK: usize = 1 << 20;

enum Source {
    /// A tar stream: a file, stdin, or an OCI layout directory read as one.
    Archive {
        what: String,
        size: Option<u64>,
        tag: Option<String>,
        open: Box<dyn FnOnce() -> anyhow::Result<Box<dyn Read + Send>>>,
    },
    /// A text file of image references.
    List(PathBuf),
}

/// Bytes under `dir` (for the progress bar of an OCI layout).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn classify(s: &str, tag: Option<&str>) -> anyhow::Result<Source> {
    let tag = tag.map(str::to_string);
    if s == "-" {
        return Ok(Source::Archive {
            what: "stdin".into(),
            size: None,
            tag,
            open: Box::new(|| Ok(Box::new(std::io::stdin()))),
        });
    }
    if s.starts_with("oci:") {
        let super::convert::Location::Layout { dir, tag: t } = super::convert::parse_location(s)?
        else {
            anyhow::bail!("{s:?}: want oci:DIR[:TAG]");
        };
        if !dir.join("index.json").is_file() {
            anyhow::bail!("{}: no index.json: not an OCI image layout", dir.display());
        }
        let what = dir.display().to_string();
        return Ok(Source::Archive {
            what,
            size: Some(dir_size(&dir)),
            tag: t.or(tag),
            open: Box::new(move || {
                Ok(Box::new(
                    crate::import::tar_dir(&dir).with_context(|| dir.display().to_string())?,
                ))
            }),
        });
    }
    let path = PathBuf::from(s);
    let mut f = std::fs::File::open(&path).with_context(|| format!("opening {s}"))?;
    if f.metadata().is_ok_and(|m| m.is_dir()) {
        anyhow::bail!("{s} is a directory: an OCI layout is given as oci:{s}");
    }
    let mut head = vec![0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    if !crate::import::looks_like_archive(&head[..n]) {
        return Ok(Source::List(path));
    }
    let size = f.metadata().ok().map(|m| m.len());
    Ok(Source::Archive {
        what: s.to_string(),
        size,
        tag,
        open: Box::new(move || {
            Ok(Box::new(
                std::fs::File::open(&path).with_context(|| path.display().to_string())?,
            ))
        }),
    })
}

/// A reader that moves a progress bar.
struct Counting<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

pub async fn run(cfg: &Config, args: &LoadArgs, secret: Option<Secret>) -> anyhow::Result<()> {
    let sources = args
        .sources
        .iter()
        .map(|s| classify(s, args.tag.as_deref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.name.is_some() && sources.len() > 1 {
        anyhow::bail!(
            "--name names the image of one source, not {}",
            sources.len()
        );
    }
    let mut lists = vec![];
    let mut archives = vec![];
    for s in sources {
        match s {
            Source::List(p) => lists.push(p),
            a @ Source::Archive { .. } => archives.push(a),
        }
    }
    for p in lists {
        // An image list is a prefetch of its references.
        super::prefetch::run(
            cfg,
            &PrefetchArgs {
                images: vec![],
                file: Some(p),
                registry: args.registry.clone(),
                quiet: args.quiet,
            },
            secret.clone(),
        )
        .await?;
    }
    if archives.is_empty() {
        return Ok(());
    }
    let target = open_target(cfg, secret).await?;
    for a in archives {
        let Source::Archive {
            what,
            size,
            tag,
            open,
        } = a
        else {
            continue;
        };
        let bar = if args.quiet {
            ProgressBar::hidden()
        } else {
            match size {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            }
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(what.clone());
        let reader = Counting {
            inner: open()?,
            bar: bar.clone(),
        };
        let opts = LoadOptions {
            tag,
            name: args.name.clone(),
        };
        let loaded = match &target {
            Target::Offline(core) => core
                .images
                .load(Box::new(reader), opts)
                .await
                .map_err(anyhow::Error::from),
            Target::Daemon(_) => through_daemon(cfg, reader, opts, &bar).await,
        };
        bar.finish_and_clear();
        let loaded = loaded.with_context(|| format!("loading {what}"))?;
        for l in loaded {
            println!(
                "loaded {} {} ({} layers, {}){}",
                short_id(&l.id),
                l.names.join(", "),
                l.layers,
                human_bytes(l.size),
                if l.already_local {
                    ", already in the store"
                } else {
                    ""
                }
            );
        }
    }
    if let Target::Offline(core) = target {
        core.shutdown.cancel();
    }
    Ok(())
}

/// Send the archive to the daemon in chunks; it reads, checks and registers as they come.
async fn through_daemon(
    cfg: &Config,
    mut reader: impl Read + Send + 'static,
    opts: LoadOptions,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<Loaded>> {
    let channel = crate::rpc::connect_unix(&cfg.cri.socket)
        .await
        .with_context(|| format!("connecting to the daemon at {}", cfg.cri.socket.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<LoadRequest>(4);
    let first = LoadRequest {
        options: Some(WireOptions {
            tag: opts.tag.unwrap_or_default(),
            name: opts.name.unwrap_or_default(),
        }),
        data: vec![],
    };
    tx.send(first).await.context("starting the load")?;
    let sender = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let msg = LoadRequest {
                options: None,
                data: buf[..n].to_vec(),
            };
            // The daemon stopped reading (it answered with an error): its answer says why.
            if tx.blocking_send(msg).is_err() {
                return Ok(());
            }
        }
    });
    let answer = ControlClient::new(channel)
        .load(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let sent = sender.await.context("reading the source")?;
    bar.set_message("done");
    let answer =
        answer.map_err(|s| anyhow::anyhow!("the daemon refused the archive: {}", s.message()))?;
    sent.context("reading the source")?;
    Ok(answer
        .into_inner()
        .images
        .into_iter()
        .map(|l| Loaded {
            id: l.id,
            names: l.names,
            layers: l.layers as usize,
            size: l.size,
            already_local: l.already_local,
        })
        .collect())
}
