//! The seam in front of the registry for blob bodies: what the read path needs from a
//! registry (`open_blob`: bytes `[offset, offset + len)` of a blob, streamed), as a trait, so
//! that its logic runs in unit tests against an in-memory fake that can also misbehave
//! (`fake::FakeBlobs`: errors, stalls, truncated or wrong bytes, delays), while the end-to-end
//! tests keep the real registry client.

use super::{BlobBody, OpCreds, Registry, Result};
use crate::oci::{Digest, Reference};
use futures_util::future::BoxFuture;

/// Range reads of blobs.
pub trait BlobSource: Send + Sync {
    /// A stream of the blob `d`'s bytes from `offset` (`len` of them, or to its end).
    fn open_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        offset: u64,
        len: Option<u64>,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<BlobBody>>;

    /// Bytes `[offset, offset + len)` of the blob `d`, whole (a bounded read: TOCs, footers).
    fn fetch_range<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        offset: u64,
        len: u64,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<Vec<u8>>>;
}

/// A range's body read whole: exactly `len` bytes (bytes `[offset, offset + len)` of blob `d`,
/// for the errors), or an error.
pub async fn read_whole(
    mut stream: futures_util::stream::BoxStream<'_, std::io::Result<bytes::Bytes>>,
    r: &Reference,
    d: &Digest,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    use futures_util::StreamExt;
    let mut out = Vec::with_capacity(len.min(1 << 24) as usize);
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| super::RegistryError::Unreachable {
            registry: r.registry().to_string(),
            reason: e.to_string(),
        })?;
        out.extend_from_slice(&b);
    }
    if out.len() as u64 != len {
        return Err(super::RegistryError::Truncated {
            registry: r.registry().to_string(),
            what: format!("bytes {offset}+{len} of blob {d}"),
            got: out.len() as u64,
            expected: len,
        });
    }
    Ok(out)
}

impl BlobSource for Registry {
    fn fetch_range<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        offset: u64,
        len: u64,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(Registry::fetch_range(self, r, d, offset, len, creds))
    }

    fn open_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        offset: u64,
        len: Option<u64>,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<BlobBody>> {
        Box::pin(Registry::open_blob(self, r, d, offset, len, creds))
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory registry of blobs for unit tests, with faults to inject.

    use super::*;
    use crate::registry::RegistryError;
    use bytes::Bytes;
    use futures_util::StreamExt;
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;
    use std::time::Duration;

    /// What the next request gets instead of a well-behaved answer.
    #[derive(Clone, Debug)]
    pub enum Fault {
        /// The request fails (as an unreachable registry).
        Error,
        /// Headers come, then no byte ever.
        Stall,
        /// Only this many bytes, then the stream ends.
        Truncate(usize),
        /// Every byte of the answer flipped.
        Corrupt,
        /// The answer starts after this long.
        Delay(Duration),
    }

    #[derive(Default)]
    pub struct FakeBlobs {
        blobs: Mutex<HashMap<Digest, Bytes>>,
        faults: Mutex<VecDeque<Fault>>,
        /// Every request: (digest, offset, end).
        pub requests: Mutex<Vec<(Digest, u64, u64)>>,
    }

    impl FakeBlobs {
        pub fn add(&self, data: Vec<u8>) -> Digest {
            let d = Digest::of(&data);
            crate::store::locked(&self.blobs).insert(d.clone(), Bytes::from(data));
            d
        }

        /// A blob under a digest of the caller's choosing (its bytes are not checked).
        pub fn add_as(&self, d: &Digest, data: Vec<u8>) {
            crate::store::locked(&self.blobs).insert(d.clone(), Bytes::from(data));
        }

        /// The next requests misbehave, in this order.
        pub fn inject(&self, f: Fault) {
            crate::store::locked(&self.faults).push_back(f);
        }

        pub fn requests(&self) -> Vec<(Digest, u64, u64)> {
            crate::store::locked(&self.requests).clone()
        }

        /// Requests whose range overlaps `[start, end)`.
        pub fn requests_touching(&self, start: u64, end: u64) -> usize {
            self.requests()
                .iter()
                .filter(|(_, s, e)| *s < end && *e > start)
                .count()
        }
    }

    /// Bytes that do not compress (so that compressed spans have about their size), different
    /// for each seed.
    pub fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    impl BlobSource for FakeBlobs {
        fn fetch_range<'a>(
            &'a self,
            r: &'a Reference,
            d: &'a Digest,
            offset: u64,
            len: u64,
            creds: &'a OpCreds,
        ) -> BoxFuture<'a, Result<Vec<u8>>> {
            Box::pin(async move {
                let body = self.open_blob(r, d, offset, Some(len), creds).await?;
                super::read_whole(body.stream, r, d, offset, len).await
            })
        }

        fn open_blob<'a>(
            &'a self,
            r: &'a Reference,
            d: &'a Digest,
            offset: u64,
            len: Option<u64>,
            _creds: &'a OpCreds,
        ) -> BoxFuture<'a, Result<BlobBody>> {
            Box::pin(async move {
                let data = crate::store::locked(&self.blobs)
                    .get(d)
                    .cloned()
                    .ok_or_else(|| RegistryError::NotFound {
                        registry: r.registry().to_string(),
                        what: format!("blob {d}"),
                    })?;
                let start = (offset as usize).min(data.len());
                let end = len
                    .map(|l| (start + l as usize).min(data.len()))
                    .unwrap_or(data.len());
                crate::store::locked(&self.requests).push((d.clone(), start as u64, end as u64));
                let mut body = data.slice(start..end);
                let fault = crate::store::locked(&self.faults).pop_front();
                match fault {
                    Some(Fault::Error) => {
                        return Err(RegistryError::Unreachable {
                            registry: r.registry().to_string(),
                            reason: "injected".into(),
                        });
                    }
                    Some(Fault::Stall) => {
                        return Ok(BlobBody {
                            stream: futures_util::stream::pending().boxed(),
                            len: Some(body.len() as u64),
                        });
                    }
                    Some(Fault::Truncate(n)) => body = body.slice(..n.min(body.len())),
                    Some(Fault::Corrupt) => {
                        body = Bytes::from(body.iter().map(|b| !b).collect::<Vec<u8>>())
                    }
                    Some(Fault::Delay(t)) => tokio::time::sleep(t).await,
                    None => {}
                }
                let len = Some((end - start) as u64);
                // In pieces, as a network delivers them.
                let pieces: Vec<std::io::Result<Bytes>> = (0..body.len())
                    .step_by(16 << 10)
                    .map(|i| Ok(body.slice(i..(i + (16 << 10)).min(body.len()))))
                    .collect();
                Ok(BlobBody {
                    stream: futures_util::stream::iter(pieces).boxed(),
                    len,
                })
            })
        }
    }
}
