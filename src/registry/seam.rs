//! The seam in front of the registry: what the read path and the filler need from a registry
//! (`BlobSource::open_blob`: bytes `[offset, offset + len)` of a blob, streamed) and what a
//! pull needs (`ManifestSource`: manifests and configs), as traits, so that their logic runs
//! in unit tests against an in-memory fake that can also misbehave (`fake::FakeBlobs`: errors,
//! stalls, truncated or wrong bytes, delays), while the end-to-end tests keep the real registry
//! client.

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

    /// Whether the blob `d` exists, asked without a body (a HEAD): it opens or reuses a
    /// connection on the path the blob's reads take, so that connections are warm before a
    /// start needs them, and no byte of the blob is transferred.
    fn touch_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<()>>;
}

/// Manifests and small blobs (configs): what the image service's pull fetches before an image
/// is registered.
pub trait ManifestSource: Send + Sync {
    /// A manifest or index by the reference's tag or digest (or `digest`, when given): its
    /// bytes and their digest. A digest asked for is verified.
    fn fetch_manifest<'a>(
        &'a self,
        r: &'a Reference,
        digest: Option<&'a Digest>,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<(bytes::Bytes, Digest)>>;

    /// The blob `d` whole (a config), at most `limit` bytes, verified against `d`.
    fn fetch_small_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        limit: usize,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<Vec<u8>>>;
}

impl ManifestSource for Registry {
    fn fetch_manifest<'a>(
        &'a self,
        r: &'a Reference,
        digest: Option<&'a Digest>,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<(bytes::Bytes, Digest)>> {
        Box::pin(Registry::fetch_manifest(self, r, digest, creds))
    }

    fn fetch_small_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        limit: usize,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(Registry::fetch_small_blob(self, r, d, limit, creds))
    }
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

    fn touch_blob<'a>(
        &'a self,
        r: &'a Reference,
        d: &'a Digest,
        creds: &'a OpCreds,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(Registry::touch_blob(self, r, d, creds))
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
        /// This many bytes of the answer, then no byte more (the stream stays open).
        StallAfter(usize),
    }

    #[derive(Default)]
    pub struct FakeBlobs {
        blobs: Mutex<HashMap<Digest, Bytes>>,
        /// Manifests by tag and by digest.
        manifests: Mutex<HashMap<String, Bytes>>,
        faults: Mutex<VecDeque<Fault>>,
        /// Every request: (digest, offset, end).
        pub requests: Mutex<Vec<(Digest, u64, u64)>>,
        /// Every `touch_blob` (a HEAD: no bytes).
        pub touches: Mutex<Vec<Digest>>,
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

        /// A manifest (or index), found by its digest and by `tag` (when given).
        pub fn add_manifest(&self, tag: Option<&str>, data: Vec<u8>) -> Digest {
            let d = Digest::of(&data);
            let data = Bytes::from(data);
            let mut m = crate::store::locked(&self.manifests);
            if let Some(t) = tag {
                m.insert(t.to_string(), data.clone());
            }
            m.insert(d.to_string(), data);
            d
        }

        /// The next fault, if any, applied to a whole answer: `Err` for an error, `None`
        /// never answers (a stall), else the answer (cut or corrupted, or late).
        async fn whole(&self, r: &Reference, data: Bytes) -> Result<Option<Bytes>> {
            let fault = crate::store::locked(&self.faults).pop_front();
            Ok(match fault {
                Some(Fault::Error) => {
                    return Err(RegistryError::Unreachable {
                        registry: r.registry().to_string(),
                        reason: "injected".into(),
                    });
                }
                Some(Fault::Stall | Fault::StallAfter(_)) => None,
                Some(Fault::Truncate(n)) => Some(data.slice(..n.min(data.len()))),
                Some(Fault::Corrupt) => {
                    Some(Bytes::from(data.iter().map(|b| !b).collect::<Vec<u8>>()))
                }
                Some(Fault::Delay(t)) => {
                    tokio::time::sleep(t).await;
                    Some(data)
                }
                None => Some(data),
            })
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

    impl ManifestSource for FakeBlobs {
        fn fetch_manifest<'a>(
            &'a self,
            r: &'a Reference,
            digest: Option<&'a Digest>,
            _creds: &'a OpCreds,
        ) -> BoxFuture<'a, Result<(Bytes, Digest)>> {
            Box::pin(async move {
                let want = digest
                    .cloned()
                    .or_else(|| r.digest().and_then(|d| Digest::parse(d).ok()));
                let key = want
                    .as_ref()
                    .map(|d| d.to_string())
                    .or_else(|| r.tag().map(str::to_string))
                    .unwrap_or_else(|| "latest".into());
                let what = format!("manifest {key}");
                let data = crate::store::locked(&self.manifests)
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| RegistryError::NotFound {
                        registry: r.registry().to_string(),
                        what: what.clone(),
                    })?;
                let Some(data) = self.whole(r, data).await? else {
                    return std::future::pending().await;
                };
                let got = Digest::of(&data);
                if let Some(expected) = want
                    && expected != got
                {
                    return Err(RegistryError::DigestMismatch {
                        registry: r.registry().to_string(),
                        what,
                        expected,
                        actual: got,
                    });
                }
                Ok((data, got))
            })
        }

        fn fetch_small_blob<'a>(
            &'a self,
            r: &'a Reference,
            d: &'a Digest,
            limit: usize,
            _creds: &'a OpCreds,
        ) -> BoxFuture<'a, Result<Vec<u8>>> {
            Box::pin(async move {
                let what = format!("blob {d}");
                let data = crate::store::locked(&self.blobs)
                    .get(d)
                    .cloned()
                    .ok_or_else(|| RegistryError::NotFound {
                        registry: r.registry().to_string(),
                        what: what.clone(),
                    })?;
                if data.len() > limit {
                    return Err(RegistryError::TooLarge {
                        registry: r.registry().to_string(),
                        what,
                        size: data.len() as u64,
                        limit: limit as u64,
                    });
                }
                let Some(data) = self.whole(r, data).await? else {
                    return std::future::pending().await;
                };
                let got = Digest::of(&data);
                if &got != d {
                    return Err(RegistryError::DigestMismatch {
                        registry: r.registry().to_string(),
                        what,
                        expected: d.clone(),
                        actual: got,
                    });
                }
                Ok(data.to_vec())
            })
        }
    }

    impl BlobSource for FakeBlobs {
        fn touch_blob<'a>(
            &'a self,
            r: &'a Reference,
            d: &'a Digest,
            _creds: &'a OpCreds,
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                crate::store::locked(&self.touches).push(d.clone());
                if crate::store::locked(&self.blobs).contains_key(d) {
                    Ok(())
                } else {
                    Err(RegistryError::NotFound {
                        registry: r.registry().to_string(),
                        what: format!("blob {d}"),
                    })
                }
            })
        }

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
                            early: false,
                        });
                    }
                    Some(Fault::Truncate(n)) => body = body.slice(..n.min(body.len())),
                    Some(Fault::StallAfter(n)) => {
                        let first = body.slice(..n.min(body.len()));
                        return Ok(BlobBody {
                            stream: futures_util::stream::once(async move { Ok(first) })
                                .chain(futures_util::stream::pending())
                                .boxed(),
                            len: Some(body.len() as u64),
                            early: false,
                        });
                    }
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
                    early: false,
                })
            })
        }
    }
}
