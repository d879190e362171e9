//! `lazypull status [IMAGE] [--json]`: per-image and per-layer progress: format, bytes local
//! (filled or read on demand), bytes read on demand, complete, files unpacked.

use super::{display_name, human_bytes, open_read_only, short_id};
use crate::cli::StatusArgs;
use crate::config::Config;
use crate::store::{Layout, StoreLock};

pub fn run(cfg: &Config, args: &StatusArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&cfg.root);
    let daemon_running = layout.lock().exists() && StoreLock::try_acquire(&layout).is_err();
    let images = match open_read_only(cfg)? {
        Some(db) => match &args.image {
            Some(name) => crate::images::resolve_in(&db, name)?
                .map(|i| vec![i])
                .ok_or_else(|| {
                    anyhow::anyhow!("no image {name:?} in the store {}", cfg.root.display())
                })?,
            None => db.list_images()?,
        },
        None => vec![],
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "daemon_running": daemon_running, "images": images })
            )?
        );
        return Ok(());
    }
    println!(
        "store {} ({}), {} image(s)",
        cfg.root.display(),
        if daemon_running {
            "daemon running"
        } else {
            "no daemon"
        },
        images.len()
    );
    for i in &images {
        println!(
            "\n{}  id {}  {} of {} local ({:.1}%){}",
            display_name(i),
            short_id(&i.id),
            human_bytes(i.local_bytes()),
            human_bytes(i.layer_bytes()),
            i.fill_percent(),
            if i.complete() { ", complete" } else { "" }
        );
        for l in &i.layers {
            let fmt = match (l.toc_entries, &l.toc_error) {
                (Some(n), _) => format!("estargz ({n} TOC entries)"),
                (None, Some(_)) => format!("{} (TOC refused)", l.format()),
                _ => l.format().to_string(),
            };
            let mut notes = vec![];
            if l.ondemand > 0 {
                notes.push(format!("{} on demand", human_bytes(l.ondemand)));
            }
            if l.unpacked {
                notes.push("files cached".to_string());
            }
            println!(
                "  {}  {:<28} {:>10} / {:>10}  {:?}{}{}",
                short_id(&l.digest),
                fmt,
                human_bytes(l.local_bytes()),
                human_bytes(l.size),
                l.state,
                if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join(", "))
                },
                l.error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
