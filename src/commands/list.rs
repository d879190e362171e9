//! `lazypull list [PATTERN] [--json]`

use super::{display_name, filter_images, human_bytes, human_time, open_read_only, short_id};
use crate::cli::ListArgs;
use crate::config::Config;

pub fn run(cfg: &Config, args: &ListArgs) -> anyhow::Result<()> {
    let images = match open_read_only(cfg)? {
        Some(db) => filter_images(db.list_images()?, args.pattern.as_deref())?,
        None => vec![],
    };
    if args.json {
        let rows: Vec<_> = images
            .iter()
            .map(|i| {
                serde_json::json!({
                    "id": i.id, "tags": i.tags, "digests": i.digests, "size": i.size,
                    "fill_percent": (i.fill_percent() * 10.0).round() / 10.0, "complete": i.complete(),
                    "pulled_at": i.pulled_at, "last_used_at": i.last_used_at,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<60} {:<12} {:>10} {:>6}  {:<19}  {:<19}",
        "IMAGE", "ID", "SIZE", "FILL", "PULLED", "LAST USED"
    );
    for i in &images {
        println!(
            "{:<60} {:<12} {:>10} {:>5.1}%  {:<19}  {:<19}",
            display_name(i),
            short_id(&i.id),
            human_bytes(i.size),
            i.fill_percent(),
            human_time(i.pulled_at),
            human_time(i.last_used_at)
        );
    }
    Ok(())
}
