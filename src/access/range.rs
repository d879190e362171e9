//! Bytes `[a, b)` of a layer's blob, as they arrive: from the layer's partial file where it
//! already holds the range's start, then from the registry through [`Access`] (one request of
//! the range's class); and what arrived, written back to the partial file so that no byte is
//! fetched twice (the filler skips what is present, a restart keeps what was synced).
//!
//! A range's bytes are not verified here: the chunk layer checks every chunk against its
//! digest as it decodes it, and the filler checks the whole blob's digest when it completes.

use super::{Access, Body, Class};
use crate::oci::{Digest, Reference};
use crate::registry::{OpCreds, RegistryError};
use crate::store::{Catalogue, FetchedBy, PartialBlob, locked as lock};
use futures_util::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long fetched ranges may sit in the page cache before being recorded as durable.
const FLUSH_DELAY: Duration = Duration::from_secs(1);

/// Why a range could not be received whole.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The response failed or ended before the range's end.
    #[error("registry sent {got} of {expected} bytes at {at}{}", .error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Short {
        at: u64,
        got: u64,
        expected: u64,
        error: Option<std::io::Error>,
    },
}

/// A range of a layer's blob being received.
pub struct RangeFetch {
    /// The range: `[start, end)` of the blob.
    pub start: u64,
    pub end: u64,
    /// The range's bytes received so far, from `start` (a caller may take it to decode, and
    /// must put it back as it was).
    pub buf: Vec<u8>,
    /// Where the registry's part of the range begins (before: read from the partial file).
    from: u64,
    body: Body,
}

impl RangeFetch {
    /// Begin receiving `[start, end)` of `layer`: the bytes `partial` holds at the range's
    /// start are read from it (a read through a gzip index starts at a checkpoint an earlier
    /// read of the same span fetched from), the rest is requested in one request of `class`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        access: &Access,
        class: Class,
        reference: &Reference,
        layer: &Digest,
        creds: &OpCreds,
        partial: Option<&PartialBlob>,
        start: u64,
        end: u64,
        max_buffer: u64,
    ) -> Result<Self, RangeError> {
        let mut buf: Vec<u8> = Vec::with_capacity((end - start).min(max_buffer) as usize);
        let mut from = start;
        if let Some(p) = partial
            && let Some(have) = p.covered_until(start)
            && have > start
            && have < end
        {
            buf.resize((have - start) as usize, 0);
            match p.read_at(&mut buf, start) {
                Ok(()) => from = have,
                Err(e) => {
                    tracing::warn!(%layer, error = %e, "cannot read the partial file; fetching the whole range");
                    buf.clear();
                }
            }
        }
        let body = access
            .open(class, reference, layer, from, Some(end - from), creds)
            .await?;
        Ok(RangeFetch {
            start,
            end,
            buf,
            from,
            body,
        })
    }

    /// Where the range's bytes received so far end in the blob.
    pub fn have(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Receive the next bytes into `buf`; returns how many came from the registry (a
    /// registry that ignores `Range` and sends on is cut at the range's end).
    pub async fn more(&mut self) -> Result<u64, RangeError> {
        let short = |this: &Self, error| RangeError::Short {
            at: this.from,
            got: this.have() - this.from,
            expected: this.end - this.from,
            error,
        };
        let Some(bytes) = self.body.stream.next().await else {
            return Err(short(self, None));
        };
        let bytes = bytes.map_err(|e| short(self, Some(e)))?;
        let want = ((self.end - self.have()) as usize).min(bytes.len());
        self.buf.extend_from_slice(&bytes[..want]);
        Ok(want as u64)
    }

    /// The bytes received, from `start`; the request ends (its hold on the link with it).
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }

    /// Whether the whole range is in.
    pub fn complete(&self) -> bool {
        self.have() >= self.end
    }
}

/// Write the bytes of `buf` (the blob's from `start`) that the partial file lacks; returns how
/// many were new. Blocking.
pub fn write_back(partial: &PartialBlob, start: u64, buf: &[u8]) -> std::io::Result<u64> {
    partial.write_missing(start, buf)
}

/// Count a layer's bytes stored, by who wanted them, in the catalogue, and make the partial
/// file's new bytes durable and recorded within [`FLUSH_DELAY`] (one flush for the writes of
/// that second).
pub fn stored(
    db: &Arc<Mutex<Catalogue>>,
    layer: &Digest,
    partial: Option<Arc<PartialBlob>>,
    bytes: &[(FetchedBy, u64)],
) {
    let mut any = false;
    for &(by, n) in bytes {
        if n == 0 {
            continue;
        }
        any = true;
        if let Err(e) = lock(db).add_fetched(layer.as_str(), by, n) {
            tracing::warn!(%layer, error = %e, "cannot count fetched bytes");
        }
    }
    if !any {
        return;
    }
    if let Some(p) = partial
        && p.want_flush()
    {
        let db = Arc::clone(db);
        tokio::spawn(async move {
            tokio::time::sleep(FLUSH_DELAY).await;
            let digest = p.digest.to_string();
            match tokio::task::spawn_blocking(move || p.flush()).await {
                Ok(Ok(recorded)) => {
                    let _ = lock(&db).set_filled(&digest, recorded);
                }
                Ok(Err(e)) => {
                    tracing::warn!(layer = %digest, error = %e, "cannot record fetched ranges")
                }
                Err(_) => {}
            }
        });
    }
}
