//! `lazypull prune [PATTERN] [--before DATE] [--unused-for DURATION] [--dry-run]`

use super::{Target, display_name, filter_images, human_bytes, open_target, short_id};
use crate::cli::PruneArgs;
use crate::config::Config;
use crate::rpc::cri;
use anyhow::Context;

fn parse_date(s: &str) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp());
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .with_context(|| format!("--before {s:?}: expected YYYY-MM-DD or RFC 3339"))?;
    let t = d.and_hms_opt(0, 0, 0).context("midnight exists")?;
    t.and_local_timezone(chrono::Local)
        .earliest()
        .map(|t| t.timestamp())
        .context("local midnight")
}

pub async fn run(cfg: &Config, args: &PruneArgs) -> anyhow::Result<()> {
    if args.pattern.is_none() && args.before.is_none() && args.unused_for.is_none() && !args.all {
        anyhow::bail!(
            "refusing to prune every image: give a PATTERN, --before, --unused-for, or --all"
        );
    }
    let before = args.before.as_deref().map(parse_date).transpose()?;
    let unused_since = match &args.unused_for {
        Some(d) => Some(
            chrono::Utc::now().timestamp()
                - humantime::parse_duration(d)
                    .with_context(|| format!("--unused-for {d:?}"))?
                    .as_secs() as i64,
        ),
        None => None,
    };
    let all = match super::open_read_only(cfg)? {
        Some(db) => db.list_images()?,
        None => vec![],
    };
    let selected: Vec<_> = filter_images(all, args.pattern.as_deref())?
        .into_iter()
        .filter(|i| before.is_none_or(|b| i.pulled_at < b))
        .filter(|i| unused_since.is_none_or(|u| i.last_used_at < u))
        .collect();
    let total: u64 = selected.iter().map(|i| i.size).sum();
    if args.json {
        let rows: Vec<_> = selected
            .iter()
            .map(|i| serde_json::json!({"id": i.id, "name": display_name(i), "size": i.size}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"dry_run": args.dry_run, "images": rows})
        );
    } else {
        for i in &selected {
            println!(
                "{} {}  {}  {}",
                if args.dry_run {
                    "would remove"
                } else {
                    "removing"
                },
                short_id(&i.id),
                display_name(i),
                human_bytes(i.size)
            );
        }
    }
    if args.dry_run || selected.is_empty() {
        if !args.json {
            println!(
                "{} image(s), {} {}",
                selected.len(),
                human_bytes(total),
                if args.dry_run {
                    "(dry run: nothing removed)"
                } else {
                    ""
                }
            );
        }
        return Ok(());
    }
    match open_target(cfg, None).await? {
        Target::Offline(core) => {
            for i in &selected {
                core.store
                    .db
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove_image(&i.id)?;
            }
            let report = core.images.gc().await?;
            if !args.json {
                println!(
                    "removed {} image(s); freed {} in {} file(s)",
                    selected.len(),
                    human_bytes(report.bytes_freed),
                    report.files_removed
                );
            }
        }
        Target::Daemon(mut client) => {
            for i in &selected {
                client
                    .remove_image(cri::RemoveImageRequest {
                        image: Some(cri::ImageSpec {
                            image: i.id.clone(),
                            ..Default::default()
                        }),
                    })
                    .await
                    .with_context(|| format!("removing {}", i.id))?;
            }
            if !args.json {
                println!(
                    "removed {} image(s) through the daemon (about {})",
                    selected.len(),
                    human_bytes(total)
                );
            }
        }
    }
    Ok(())
}
