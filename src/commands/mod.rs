//! One module per subcommand; `anyhow` lives here at the CLI edge.

pub mod admin;
pub mod convert;
pub mod index;
pub mod learned;
pub mod list;
pub mod load;
pub mod mount;
pub mod prefetch;
pub mod prune;
pub mod pull;
pub mod record;
pub mod status;

use crate::config::Config;
use crate::daemon::Core;
use crate::registry::auth::Secret;
use crate::rpc::cri::image_service_client::ImageServiceClient;
use crate::store::{Catalogue, ImageRecord, Layout, StoreError};
use anyhow::Context;

/// Where a writing command does its work.
pub enum Target {
    /// No daemon: the command owns the store.
    Offline(Core),
    /// The daemon holds the store: go through its CRI socket.
    Daemon(ImageServiceClient<tonic::transport::Channel>),
}

pub async fn open_target(cfg: &Config, default_secret: Option<Secret>) -> anyhow::Result<Target> {
    match Core::open(cfg, default_secret) {
        Ok(core) => Ok(Target::Offline(core)),
        Err(StoreError::Locked(_)) => {
            let channel = crate::rpc::connect_unix(&cfg.cri.socket).await.with_context(|| {
                format!(
                    "the store {} is locked by a running daemon, but its socket {} does not answer (pass --socket?)",
                    cfg.root.display(),
                    cfg.cri.socket.display()
                )
            })?;
            Ok(Target::Daemon(ImageServiceClient::new(channel)))
        }
        Err(e) => Err(e).context("opening the store"),
    }
}

/// Read-only catalogue for `list`/`status` (works while the daemon runs). `None`: empty store.
pub fn open_read_only(cfg: &Config) -> anyhow::Result<Option<Catalogue>> {
    let path = Layout::new(&cfg.root).db();
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(
        Catalogue::open_read_only(&path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

/// The image `name` (a reference or id) in the store, with clear errors when the store or the
/// image is not there.
pub fn stored_image(cfg: &Config, name: &str) -> anyhow::Result<ImageRecord> {
    let db = open_read_only(cfg)?
        .with_context(|| format!("the store {} is empty", cfg.root.display()))?;
    crate::images::resolve_in(&db, name)?
        .with_context(|| format!("no image {name:?} in the store {}", cfg.root.display()))
}

/// Images whose id or any name matches the glob `pattern` (all when `None`).
pub fn filter_images(
    images: Vec<ImageRecord>,
    pattern: Option<&str>,
) -> anyhow::Result<Vec<ImageRecord>> {
    let Some(p) = pattern else { return Ok(images) };
    let glob = glob::Pattern::new(p).with_context(|| format!("bad pattern {p:?}"))?;
    Ok(images
        .into_iter()
        .filter(|i| glob.matches(&i.id) || i.tags.iter().chain(&i.digests).any(|n| glob.matches(n)))
        .collect())
}

/// The name to show for an image: first tag, else first digest name, else the id.
pub fn display_name(i: &ImageRecord) -> String {
    i.tags
        .first()
        .or(i.digests.first())
        .cloned()
        .unwrap_or_else(|| i.id.clone())
}

pub fn short_id(id: &str) -> &str {
    let bare = id.strip_prefix("sha256:").unwrap_or(id);
    &bare[..bare.len().min(12)]
}

pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub fn human_time(ts: i64) -> String {
    chrono::DateTime::from_timestamp(ts, 0)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
    }
}
