//! `lazypull status [IMAGE] [--json]`: per-image and per-layer progress: format, bytes local
//! (filled or read on demand), bytes fetched on demand, by start-up prefetch and by the
//! filler, how long reads waited, what tells a start which files to prefetch (a landmark, a
//! learned list, or nothing yet), complete, files unpacked.

use super::{display_name, human_bytes, open_read_only, short_id};
use crate::cli::StatusArgs;
use crate::config::Config;
use crate::learned::StartPrefetch;
use crate::store::{LayerRecord, Layout, StoreLock};

/// How a layer is served now.
struct Served {
    mode: String,
    /// Where its random-access index came from: `built here` by this node's unpack, `the
    /// registry` when another node pushed it.
    index: Option<&'static str>,
    /// Why its unpack recorded no random access (one zstd frame, several gzip members).
    no_random_access: Option<String>,
}

/// [`Served`] for `l`, reading its file index (if any) once.
fn served(layout: &Layout, l: &LayerRecord) -> Served {
    let index = match l.form() {
        crate::store::Form::FileIndex { digest, .. } => Some(digest),
        _ => None,
    };
    let bytes = index
        .and_then(|d| crate::oci::Digest::parse(d).ok())
        .and_then(|d| layout.read_blob(&d).ok());
    let random_access = bytes
        .as_deref()
        .is_some_and(|b| crate::index_share::checkpoints(b, l).is_some());
    let index = random_access.then_some(if l.unpacked {
        "built here"
    } else {
        "the registry"
    });
    Served {
        mode: l.mode(random_access).to_string(),
        index,
        no_random_access: bytes.as_deref().and_then(crate::layer::tar::index_note),
    }
}

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
    let prefetch: Vec<StartPrefetch> = images
        .iter()
        .map(|i| StartPrefetch::of(&layout, i))
        .collect();
    if args.json {
        let images: Vec<serde_json::Value> = images
            .iter()
            .zip(&prefetch)
            .map(|(i, p)| {
                let mut v = serde_json::to_value(i)?;
                v["start_prefetch"] = serde_json::to_value(p)?;
                for (k, l) in i.layers.iter().enumerate() {
                    let s = served(&layout, l);
                    v["layers"][k]["mode"] = s.mode.into();
                    v["layers"][k]["index_source"] = s.index.into();
                    v["layers"][k]["no_random_access"] = s.no_random_access.into();
                }
                Ok(v)
            })
            .collect::<Result<_, serde_json::Error>>()?;
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
    for (i, start) in images.iter().zip(&prefetch) {
        println!(
            "\n{}  id {}  {} of {} local ({:.1}%){}",
            display_name(i),
            short_id(&i.id),
            human_bytes(i.local_bytes()),
            human_bytes(i.layer_bytes()),
            i.fill_percent(),
            if i.complete() { ", complete" } else { "" }
        );
        println!(
            "  start prefetch: {}",
            match start {
                StartPrefetch::Landmark { layers } => format!(
                    "prefetch landmark ({} files before it)",
                    layers.values().sum::<u64>()
                ),
                StartPrefetch::Learned {
                    files, recorded_at, ..
                } => format!(
                    "learned list of {files} files, recorded {}",
                    chrono::DateTime::from_timestamp(*recorded_at, 0)
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_default()
                ),
                StartPrefetch::Refused { reason } => format!("none ({reason})"),
                StartPrefetch::None => {
                    "none yet (the next start through the snapshotter is recorded)".into()
                }
            }
        );
        for l in &i.layers {
            let fmt = match l.form() {
                crate::store::Form::Toc {
                    format, entries, ..
                } => format!("{} ({entries} TOC entries)", format.name()),
                crate::store::Form::TocRefused { .. } => format!("{} (TOC refused)", l.format()),
                _ => l.format().to_string(),
            };
            let s = served(&layout, l);
            let mut notes = vec![s.mode];
            if let Some(why) = s.no_random_access {
                notes.push(format!("no random access: {why}"));
            }
            if let Some(from) = s.index {
                notes.push(format!("index from {from}"));
            }
            for (n, by) in [
                (l.ondemand, "on demand"),
                (l.prefetched, "by prefetch"),
                (l.fill_fetched, "by the filler"),
            ] {
                if n > 0 {
                    notes.push(format!("{} {by}", human_bytes(n)));
                }
            }
            if l.read_waits > 0 {
                notes.push(format!(
                    "{} reads waited {:.2} s",
                    l.read_waits,
                    l.read_wait_ms as f64 / 1000.0
                ));
            }
            match start {
                StartPrefetch::Landmark { layers } => {
                    if let Some(n) = layers.get(&l.digest) {
                        notes.push(format!("landmark: {n} files"));
                    }
                }
                StartPrefetch::Learned { layers, .. } => {
                    if let Some(n) = layers.get(&l.digest) {
                        notes.push(format!("learned: {n} files"));
                    }
                }
                _ => {}
            }
            match (l.walk_order, l.unpacked) {
                (Some(true), false) => notes.push(
                    "files served as they arrive; entries in order: missing names answered early".into(),
                ),
                (Some(false), false) => notes.push(
                    "files served as they arrive; entries out of order: missing names wait for the end".into(),
                ),
                _ => {}
            }
            if l.unpacked {
                notes.push(match l.walk_order {
                    Some(false) => "files cached (streamed out of order)".to_string(),
                    _ => "files cached".to_string(),
                });
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
