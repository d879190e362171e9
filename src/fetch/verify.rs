//! Streaming verification of a layer blob: sha256 of the compressed bytes and, through a
//! push-style decompressor, sha256 of the uncompressed tar (the config's `rootfs.diff_ids`).

use crate::oci::{Compression, Digest};
use sha2::{Digest as _, Sha256};
use std::io::{self, Write};

pub struct HashWriter {
    hash: Sha256,
    pub bytes: u64,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hash.update(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Default for HashWriter {
    fn default() -> Self {
        HashWriter {
            hash: Sha256::new(),
            bytes: 0,
        }
    }
}

impl HashWriter {
    /// The digest of what was written so far.
    pub fn digest(&self) -> Digest {
        Digest::from_sha256(&self.hash.clone().finalize())
    }
}

fn hw() -> HashWriter {
    HashWriter::default()
}

enum Diff {
    Plain(HashWriter),
    Gzip(Box<flate2::write::MultiGzDecoder<HashWriter>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, HashWriter>>),
}

pub struct Verifier {
    blob: Sha256,
    diff: Diff,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("layer does not decompress as {compression}: {source}")]
    Decode {
        compression: &'static str,
        source: io::Error,
    },
}

impl Verifier {
    pub fn new(c: Compression) -> Result<Self, VerifyError> {
        let diff = match c {
            Compression::None => Diff::Plain(hw()),
            Compression::Gzip => Diff::Gzip(Box::new(flate2::write::MultiGzDecoder::new(hw()))),
            Compression::Zstd => Diff::Zstd(Box::new(
                zstd::stream::write::Decoder::new(hw()).map_err(|source| VerifyError::Decode {
                    compression: "zstd",
                    source,
                })?,
            )),
        };
        Ok(Verifier {
            blob: Sha256::new(),
            diff,
        })
    }

    pub fn update(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        self.blob.update(data);
        let (r, compression) = match &mut self.diff {
            Diff::Plain(w) => (w.write_all(data), "tar"),
            Diff::Gzip(w) => (w.write_all(data), "gzip"),
            Diff::Zstd(w) => (w.write_all(data), "zstd"),
        };
        r.map_err(|source| VerifyError::Decode {
            compression,
            source,
        })
    }

    /// (digest of the blob, digest of the uncompressed content)
    pub fn finish(self) -> Result<(Digest, Digest), VerifyError> {
        let blob = Digest::from_sha256(&self.blob.finalize());
        let w = match self.diff {
            Diff::Plain(w) => w,
            Diff::Gzip(w) => w.finish().map_err(|source| VerifyError::Decode {
                compression: "gzip",
                source,
            })?,
            Diff::Zstd(mut w) => {
                w.flush().map_err(|source| VerifyError::Decode {
                    compression: "zstd",
                    source,
                })?;
                w.into_inner()
            }
        };
        Ok((blob, Digest::from_sha256(&w.hash.finalize())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_and_zstd_diff_ids() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let diff = Digest::of(&data);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 3).unwrap();
        for (c, blob) in [
            (Compression::Gzip, gz),
            (Compression::Zstd, zs),
            (Compression::None, data.clone()),
        ] {
            let mut v = Verifier::new(c).unwrap();
            for piece in blob.chunks(1000) {
                v.update(piece).unwrap();
            }
            let (b, d) = v.finish().unwrap();
            assert_eq!(b, Digest::of(&blob));
            assert_eq!(d, diff, "{c:?}");
        }
        let mut v = Verifier::new(Compression::Gzip).unwrap();
        assert!(v.update(b"definitely not gzip").is_err() || v.finish().is_err());
    }
}
