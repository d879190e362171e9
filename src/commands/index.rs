//! `lazypull index show|push IMAGE`: the random-access indexes of an image's plain gzip layers
//! (see `crate::index_share`).

use super::human_bytes;
use crate::cli::{IndexAction, IndexArgs};
use crate::config::Config;
use crate::store::Layout;

pub async fn run(
    cfg: &Config,
    args: &IndexArgs,
    secret: Option<crate::registry::auth::Secret>,
) -> anyhow::Result<()> {
    let layout = Layout::new(&cfg.root);
    let image = super::stored_image(cfg, &args.image)?;
    match args.action {
        IndexAction::Push => {
            let registry = crate::registry::Registry::new(cfg.registry_options(secret));
            let pushed = crate::index_share::push(
                &registry,
                &layout,
                &image,
                &crate::registry::OpCreds::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("pushing the index of {}: {e}", args.image))?;
            println!(
                "pushed the random-access index of {} layer(s) of {} to {} as {} (subject {}): {} fetched by every pull that takes it, {} of checkpoint windows fetched by range where reads start",
                pushed.layers,
                args.image,
                image.source,
                pushed.artifact,
                image.manifest_digest,
                human_bytes(pushed.bundle_bytes),
                human_bytes(pushed.windows_bytes),
            );
            let added = pushed.added;
            if added > 0 {
                println!(
                    "with {added} checkpoint(s) right before the files its learned start read (lazypull learned {})",
                    args.image
                );
            }
            if pushed.ranged > 0 {
                println!(
                    "the learned list of {} now holds where its files lie through this index in {} layer(s): a node with the list fetches them ahead of the index (share it with lazypull learned push {})",
                    args.image, pushed.ranged, args.image
                );
            }
        }
        IndexAction::Show => {
            let rows: Vec<serde_json::Value> = image
                .layers
                .iter()
                .map(|l| {
                    let found = crate::index_share::layer_index(&layout, l);
                    let mode = if l.has_toc() {
                        "toc"
                    } else if found.is_some() && !l.unpacked {
                        "indexed (shared)"
                    } else if found.is_some() {
                        "indexed"
                    } else {
                        "none"
                    };
                    serde_json::json!({
                        "layer": l.digest,
                        "format": l.format(),
                        "size": l.size,
                        "index": found.as_ref().map(|(d, _, _)| d.to_string()),
                        "index_bytes": found.as_ref().map(|(_, b, _)| b.len()),
                        "checkpoints": found.as_ref().map(|(_, _, n)| n),
                        "mode": mode,
                    })
                })
                .collect();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            for r in &rows {
                let short = r["layer"].as_str().unwrap_or_default();
                let short = &short[..short.len().min(19)];
                match r["index"].as_str() {
                    Some(_) => println!(
                        "{short}  {:<12} {:>9}  {}: {} checkpoints, index {}",
                        r["format"].as_str().unwrap_or_default(),
                        human_bytes(r["size"].as_u64().unwrap_or_default()),
                        r["mode"].as_str().unwrap_or_default(),
                        r["checkpoints"],
                        human_bytes(r["index_bytes"].as_u64().unwrap_or_default()),
                    ),
                    None => println!(
                        "{short}  {:<12} {:>9}  {}",
                        r["format"].as_str().unwrap_or_default(),
                        human_bytes(r["size"].as_u64().unwrap_or_default()),
                        match r["mode"].as_str() {
                            Some("toc") => "lazy through its TOC (no index needed)",
                            _ =>
                                "no random-access index (not a gzip layer, or not decompressed here yet)",
                        }
                    ),
                }
            }
        }
    }
    Ok(())
}
