//! `lazypull prefetch IMAGE... | --file LIST`: full pulls with a progress bar per layer.

use super::{Target, human_bytes, open_target, short_id};
use crate::cli::PrefetchArgs;
use crate::config::Config;
use crate::cri::PULL_MODE_ANNOTATION;
use crate::images::PullMode;
use crate::registry::auth::Secret;
use crate::rpc::cri;
use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub async fn run(cfg: &Config, args: &PrefetchArgs, secret: Option<Secret>) -> anyhow::Result<()> {
    let mut refs = args.images.clone();
    if let Some(f) = &args.file {
        refs.extend(
            crate::oci::read_image_list(f).with_context(|| format!("reading {}", f.display()))?,
        );
    }
    if refs.is_empty() {
        anyhow::bail!("nothing to prefetch: give IMAGE arguments or --file LIST");
    }
    for r in &refs {
        crate::oci::parse_reference(r).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let target = open_target(cfg, secret.clone()).await?;
    let via = match &target {
        Target::Offline(_) => "offline",
        Target::Daemon(_) => "through the daemon",
    };
    let multi = if args.quiet {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut failed = 0;
    for r in &refs {
        let started = Instant::now();
        let header = multi.add(ProgressBar::new_spinner());
        header.set_message(format!("{r} ({via})"));
        let pull = {
            let r = r.clone();
            match &target {
                Target::Offline(core) => {
                    let images = core.images.clone();
                    tokio::spawn(async move {
                        images
                            .pull(&r, None, PullMode::Full)
                            .await
                            .map(|o| o.id)
                            .map_err(|e| e.to_string())
                    })
                }
                Target::Daemon(client) => {
                    let mut client = client.clone();
                    let auth = secret.as_ref().map(|s| match s {
                        Secret::Basic { username, password } => cri::AuthConfig {
                            username: username.clone(),
                            password: password.clone(),
                            ..Default::default()
                        },
                        Secret::Bearer { token } => cri::AuthConfig {
                            registry_token: token.clone(),
                            ..Default::default()
                        },
                    });
                    tokio::spawn(async move {
                        let spec = cri::ImageSpec {
                            image: r,
                            annotations: HashMap::from([(
                                PULL_MODE_ANNOTATION.to_string(),
                                "full".to_string(),
                            )]),
                            ..Default::default()
                        };
                        client
                            .pull_image(cri::PullImageRequest {
                                image: Some(spec),
                                auth,
                                sandbox_config: None,
                            })
                            .await
                            .map(|r| r.into_inner().image_ref)
                            .map_err(|s| s.message().to_string())
                    })
                }
            }
        };
        let mut bars: HashMap<String, ProgressBar> = HashMap::new();
        let poll = |bars: &mut HashMap<String, ProgressBar>| {
            let Ok(Some(db)) = super::open_read_only(cfg) else {
                return;
            };
            let Ok(Some(img)) = crate::images::resolve_in(&db, r) else {
                return;
            };
            for l in &img.layers {
                let bar = bars.entry(l.digest.clone()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(l.size));
                    b.set_style(style.clone());
                    b.set_prefix(short_id(&l.digest).to_string());
                    b
                });
                bar.set_position(l.local_bytes());
                if l.state == crate::store::LayerState::Complete {
                    bar.finish_with_message("verified");
                }
            }
        };
        let result = loop {
            if pull.is_finished() {
                break pull.await.context("pull task")?;
            }
            poll(&mut bars);
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        poll(&mut bars);
        match result {
            Ok(id) => {
                header.finish_with_message(format!(
                    "{r}: {} complete in {:.1?}",
                    short_id(&id),
                    started.elapsed()
                ));
                tracing::info!(image = %r, id = %id, "prefetched");
            }
            Err(e) => {
                failed += 1;
                header.finish_with_message(format!("{r}: FAILED: {e}"));
                tracing::error!(image = %r, error = %e, "prefetch failed");
                eprintln!("error: {r}: {e}");
            }
        }
        let total: u64 = bars.values().map(|b| b.length().unwrap_or(0)).sum();
        if args.quiet {
            println!(
                "{r}: {} ({} layers, {})",
                if failed > 0 { "failed" } else { "ok" },
                bars.len(),
                human_bytes(total)
            );
        }
    }
    if let Target::Offline(core) = target {
        core.shutdown.cancel();
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} image(s) failed", refs.len());
    }
    Ok(())
}
