//! `lazypull learned IMAGE [--json] [--forget]`: the learned start-up prefetch list of an
//! image (see `crate::learned`): the files in the order a start read them, with their size and
//! the compressed bytes a prefetch fetches for them (from the layers' TOCs in the store).

use super::{human_bytes, short_id};
use crate::cli::LearnedArgs;
use crate::config::Config;
use crate::layer::index::{LayerIndex, Spans};
use crate::oci::Digest;
use crate::store::{LayerRecord, Layout};
use std::collections::HashMap;

/// A layer's TOC from the store, with its spans and a path index.
struct Indexed {
    toc: LayerIndex,
    spans: Spans,
    by_path: HashMap<String, usize>,
}

fn indexed(layout: &Layout, l: &LayerRecord) -> Option<Indexed> {
    let crate::store::Form::Toc {
        digest,
        offset: Some(offset),
        position,
        ..
    } = l.form()
    else {
        return None;
    };
    let toc_digest = Digest::parse(digest).ok()?;
    let json = layout.read_blob(&toc_digest).ok()?;
    let toc = crate::layer::parse_stored_toc(&json, &toc_digest, position, l.size, offset).ok()?;
    let spans = Spans::new(&toc);
    let by_path = toc
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    Some(Indexed {
        toc,
        spans,
        by_path,
    })
}

pub async fn run(
    cfg: &Config,
    args: &LearnedArgs,
    secret: Option<crate::registry::auth::Secret>,
) -> anyhow::Result<()> {
    let layout = Layout::new(&cfg.root);
    let image = super::stored_image(cfg, &args.image)?;
    let manifest = Digest::parse(&image.manifest_digest)?;
    if args.forget {
        let had = crate::learned::forget(&layout, &manifest)?;
        println!(
            "{}",
            if had {
                "learned list removed: the next start through the snapshotter is recorded again"
            } else {
                "no learned list for this image"
            }
        );
        return Ok(());
    }
    let Some(list) = crate::learned::load(&layout, &manifest)? else {
        if args.push {
            anyhow::bail!(
                "no learned list for {} to push: run the image once through the snapshotter first",
                args.image
            );
        }
        if args.json {
            println!("null");
        } else {
            println!(
                "no learned list for {} (its next start through the snapshotter is recorded, unless a layer has a prefetch landmark)",
                args.image
            );
        }
        return Ok(());
    };
    if args.push {
        let registry = crate::registry::Registry::new(cfg.registry_options(secret));
        let artifact = crate::learned::push(
            &registry,
            &layout,
            &image,
            &list,
            &crate::registry::OpCreds::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("pushing the learned list of {}: {e}", args.image))?;
        println!(
            "pushed the learned list of {} ({} files) to {} as {artifact} (subject {manifest})",
            args.image,
            list.files.len(),
            image.source
        );
        return Ok(());
    }
    let mut tocs: HashMap<&str, Option<Indexed>> = HashMap::new();
    let mut rows = vec![];
    let (mut size, mut compressed, mut missing) = (0u64, 0u64, 0usize);
    for f in &list.files {
        let layer = image.layers.iter().find(|l| l.digest == f.layer);
        let idx = layer.and_then(|l| {
            tocs.entry(l.digest.as_str())
                .or_insert_with(|| indexed(&layout, l))
                .as_ref()
        });
        let found = idx.and_then(|x| {
            let e = x.toc.entries.get(*x.by_path.get(&f.path)?)?;
            let c: u64 = e
                .chunks
                .iter()
                .map(|c| {
                    let (a, b) = x.spans.span(c);
                    b - a
                })
                .sum();
            Some((e.size, c))
        });
        match found {
            Some((s, c)) => {
                size += s;
                compressed += c;
            }
            None => missing += 1,
        }
        rows.push((f, found));
    }
    // Per layer: the ranges fetched ahead of its TOC or index at a cold start, their bytes,
    // and the ranges of checkpoint windows among them.
    let ahead: serde_json::Map<String, serde_json::Value> = list
        .ranges
        .iter()
        .map(|(layer, r)| {
            let bytes: u64 = r.spans.iter().map(|[s, e]| e - s).sum::<u64>()
                + r.windows
                    .iter()
                    .flat_map(|w| &w.spans)
                    .map(|[s, e, _]| e - s)
                    .sum::<u64>();
            let windows = r.windows.as_ref().map_or(0, |w| w.spans.len());
            (
                layer.clone(),
                serde_json::json!({ "ranges": r.spans.len(), "window_ranges": windows, "bytes": bytes }),
            )
        })
        .collect();
    if args.json {
        let files: Vec<_> = rows
            .iter()
            .map(|(f, found)| {
                serde_json::json!({
                    "layer": f.layer, "path": f.path,
                    "size": found.map(|x| x.0), "compressed": found.map(|x| x.1),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "image": list.image, "recorded_at": list.recorded_at, "files": files,
                "size": size, "compressed": compressed, "not_found": missing, "ahead": ahead,
                "index": list.index,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:>5}  {:<12}  {:>10}  {:>10}  PATH",
        "ORDER", "LAYER", "SIZE", "COMPRESSED"
    );
    for (i, (f, found)) in rows.iter().enumerate() {
        let (s, c) = match found {
            Some((s, c)) => (human_bytes(*s), human_bytes(*c)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:>5}  {:<12}  {s:>10}  {c:>10}  {}",
            i + 1,
            short_id(&f.layer),
            f.path
        );
    }
    println!(
        "{} files, {} ({} compressed: what a cold start prefetches){}",
        list.files.len(),
        human_bytes(size),
        human_bytes(compressed),
        if missing > 0 {
            format!("; {missing} not found in the image's TOCs (skipped)")
        } else {
            String::new()
        }
    );
    for (layer, a) in &ahead {
        println!(
            "layer {}: {} range(s){} fetched ahead of its TOC or index at a cold start ({})",
            short_id(layer),
            a["ranges"],
            match a["window_ranges"].as_u64() {
                Some(n) if n > 0 => format!(" and {n} of checkpoint windows"),
                _ => String::new(),
            },
            human_bytes(a["bytes"].as_u64().unwrap_or(0))
        );
    }
    if let Some(index) = &list.index {
        println!(
            "the ranges go through the shared index {} ({}): a cold start with this list fetches it first and takes it by digest",
            short_id(&index.bundle),
            human_bytes(index.bundle_size)
        );
    }
    Ok(())
}
