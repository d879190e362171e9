//! Partial layer files (docs/architecture.md, "Store"): `partial/sha256/<hex>`, a sparse file the size of the
//! blob, and `partial/sha256/<hex>.map`, the persisted set of byte ranges it holds.
//!
//! Both writers of a layer share one [`PartialBlob`]: FUSE reads write the spans they fetched on
//! demand (each chunk verified against its digest first), the filler writes what is still
//! missing. A write only fills bytes not yet present, so bytes once written never change; the
//! filler compares the bytes it streams over present ranges with the file. A range is recorded in
//! the map only after the data is durable (`fdatasync`, then the map replaced by rename), so
//! after a crash the map may miss recent writes (they are fetched again) but never claims bytes
//! that are not on disk. The filler hashes the whole file before renaming it into `blobs/`.

use super::ranges::RangeSet;
use super::{Layout, Result, io_err};
use crate::oci::Digest;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The file holds different bytes where the registry's stream overlaps data already present.
#[derive(Debug, thiserror::Error)]
#[error("bytes {offset}+{len} from the registry differ from those already stored")]
pub struct Mismatch {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct State {
    present: RangeSet,
    /// Bytes written since the last flush.
    dirty: bool,
    /// The blob was verified and published (or discarded): no more writes.
    sealed: bool,
    flush_scheduled: bool,
}

pub struct PartialBlob {
    pub digest: Digest,
    pub size: u64,
    path: PathBuf,
    map_path: PathBuf,
    file: File,
    state: Mutex<State>,
    /// Serialises flushes (fsync + map rename) without holding `state` across the fsync.
    flushing: Mutex<()>,
}

impl PartialBlob {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn contains(&self, start: u64, end: u64) -> bool {
        self.state().present.contains(start, end)
    }

    pub fn covered_until(&self, pos: u64) -> Option<u64> {
        self.state().present.covered_until(pos)
    }

    pub fn next_start(&self, pos: u64) -> Option<u64> {
        self.state().present.next_start(pos)
    }

    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.state().present.gaps(start, end)
    }

    /// Bytes present (written; durable or about to be).
    pub fn present_bytes(&self) -> u64 {
        self.state().present.total()
    }

    /// Read `buf.len()` bytes at `offset`; the caller checks the range is present.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Write the parts of `data` (at `offset`) not present yet; returns the bytes written.
    /// Bytes already present are left alone (they were verified when written).
    pub fn write_missing(&self, offset: u64, data: &[u8]) -> std::io::Result<u64> {
        self.write(offset, data, false).map_err(|e| match e {
            WriteError::Io(e) => e,
            WriteError::Mismatch(m) => std::io::Error::other(m),
        })
    }

    /// Like [`write_missing`](Self::write_missing), and the parts already present must equal
    /// `data` (the filler hashes what it streams: the file must hold exactly that).
    pub fn write_checked(&self, offset: u64, data: &[u8]) -> std::result::Result<u64, WriteError> {
        self.write(offset, data, true)
    }

    fn write(&self, offset: u64, data: &[u8], check: bool) -> std::result::Result<u64, WriteError> {
        let end = offset + data.len() as u64;
        if end > self.size {
            return Err(std::io::Error::other(format!(
                "write {offset}..{end} beyond the blob's {} bytes",
                self.size
            ))
            .into());
        }
        let mut st = self.state();
        if st.sealed {
            return Ok(0);
        }
        let gaps = st.present.gaps(offset, end);
        if check {
            let mut pos = offset;
            for &(gs, ge) in gaps.iter().chain(std::iter::once(&(end, end))) {
                if pos < gs {
                    let mut have = vec![0u8; (gs - pos) as usize];
                    self.file.read_exact_at(&mut have, pos)?;
                    let want = &data[(pos - offset) as usize..(gs - offset) as usize];
                    if have != want {
                        return Err(Mismatch {
                            offset: pos,
                            len: gs - pos,
                        }
                        .into());
                    }
                }
                pos = ge;
            }
        }
        let mut written = 0;
        for (gs, ge) in gaps {
            self.file
                .write_all_at(&data[(gs - offset) as usize..(ge - offset) as usize], gs)?;
            st.present.insert(gs, ge);
            written += ge - gs;
        }
        if written > 0 {
            st.dirty = true;
        }
        Ok(written)
    }

    /// Whether the caller should schedule a flush (true once until the flush runs).
    pub fn want_flush(&self) -> bool {
        let mut st = self.state();
        if st.dirty && !st.flush_scheduled && !st.sealed {
            st.flush_scheduled = true;
            return true;
        }
        false
    }

    /// Make written bytes durable, then record them in the map. Returns the bytes recorded.
    pub fn flush(&self) -> Result<u64> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = {
            let mut st = self.state();
            st.flush_scheduled = false;
            if !st.dirty || st.sealed {
                return Ok(st.present.total());
            }
            st.dirty = false;
            st.present.clone()
        };
        let res = (|| {
            self.file.sync_data()?;
            let tmp = self.map_path.with_extension("map.tmp");
            fs::write(&tmp, snapshot.encode())?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &self.map_path)
        })();
        if let Err(e) = res {
            self.state().dirty = true;
            return Err(io_err(&self.map_path)(e));
        }
        Ok(snapshot.total())
    }

    /// fsync the data and metadata of the file (before it is renamed into `blobs/`).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    /// No more writes: the blob was published or discarded.
    fn seal(&self) {
        self.state().sealed = true;
    }
}

/// The open partial blobs of a store, so that readers and the filler share one per layer.
/// An entry stays until its blob is published or discarded (one fd per incomplete layer).
pub struct Partials {
    layout: Layout,
    open: Mutex<HashMap<String, Arc<PartialBlob>>>,
}

impl Partials {
    pub fn new(layout: Layout) -> Arc<Self> {
        Arc::new(Partials {
            layout,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn map_path(layout: &Layout, d: &Digest) -> PathBuf {
        layout.partial_dir().join(format!("{}.map", d.hex()))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PartialBlob>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The partial blob of `d` if some reader or the filler has it open.
    pub fn get(&self, d: &Digest) -> Option<Arc<PartialBlob>> {
        self.table().get(d.as_str()).cloned()
    }

    /// Open (creating a sparse file of `size` bytes) the partial blob of `d`. `legacy_prefix`
    /// is the durable prefix an older store recorded in the catalogue when there is no map.
    /// Blocking (file i/o): call from a blocking context.
    pub fn open(&self, d: &Digest, size: u64, legacy_prefix: u64) -> Result<Arc<PartialBlob>> {
        let mut table = self.table();
        if let Some(p) = table.get(d.as_str()) {
            return Ok(Arc::clone(p));
        }
        let path = self.layout.partial(d);
        let map_path = Self::map_path(&self.layout, d);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        let present = match fs::read(&map_path) {
            Ok(bytes) => match RangeSet::decode(&bytes, size) {
                Ok(set) if set.runs().all(|(_, e)| e <= len) => set,
                Ok(_) => {
                    tracing::warn!(layer = %d, "range map reaches beyond the partial file; starting over");
                    RangeSet::new()
                }
                Err(e) => {
                    tracing::warn!(layer = %d, error = %e, "unreadable range map; starting over");
                    RangeSet::new()
                }
            },
            Err(_) => {
                let mut set = RangeSet::new();
                set.insert(0, legacy_prefix.min(len).min(size));
                set
            }
        };
        if len != size {
            file.set_len(size).map_err(io_err(&path))?;
        }
        let blob = Arc::new(PartialBlob {
            digest: d.clone(),
            size,
            path,
            map_path,
            file,
            state: Mutex::new(State {
                present,
                dirty: false,
                sealed: false,
                flush_scheduled: false,
            }),
            flushing: Mutex::new(()),
        });
        table.insert(d.to_string(), Arc::clone(&blob));
        Ok(blob)
    }

    /// The blob was verified and moved into `blobs/`: stop writes, forget the map.
    pub fn published(&self, blob: &PartialBlob) {
        blob.seal();
        self.table().remove(blob.digest.as_str());
        let _ = fs::remove_file(&blob.map_path);
    }

    /// Throw away a partial blob (it failed verification, or the disk is full).
    pub fn discard(&self, d: &Digest) {
        let mut table = self.table();
        if let Some(p) = table.remove(d.as_str()) {
            p.seal();
        }
        let _ = fs::remove_file(self.layout.partial(d));
        let _ = fs::remove_file(Self::map_path(&self.layout, d));
    }

    /// Flush every open partial blob (at shutdown).
    pub fn flush_all(&self) {
        let open: Vec<Arc<PartialBlob>> = self.table().values().cloned().collect();
        for p in open {
            if let Err(e) = p.flush() {
                tracing::warn!(layer = %p.digest, error = %e, "cannot record fetched ranges");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_fill_gaps_only_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let d = Digest::of(b"x");
        let parts = Partials::new(layout.clone());
        let p = parts.open(&d, 100, 0).unwrap();
        assert_eq!(p.write_missing(10, &[1; 10]).unwrap(), 10);
        // Overlapping write: only the new bytes land, the old ones are kept.
        assert_eq!(p.write_missing(15, &[2; 10]).unwrap(), 5);
        let mut buf = [0u8; 15];
        p.read_at(&mut buf, 10).unwrap();
        assert_eq!(buf, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        // The filler's checked write refuses a stream that disagrees with stored bytes.
        assert!(matches!(
            p.write_checked(5, &[9; 10]),
            Err(WriteError::Mismatch(_))
        ));
        assert_eq!(
            p.write_checked(5, &[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]).unwrap(),
            5
        );
        assert!(p.want_flush());
        assert!(!p.want_flush(), "one flush scheduled at a time");
        assert_eq!(p.flush().unwrap(), 20);
        // Unflushed writes are not recorded: after a "crash" only flushed ranges come back.
        p.write_missing(50, &[3; 5]).unwrap();
        drop(p);
        drop(parts);
        let parts = Partials::new(layout.clone());
        let p = parts.open(&d, 100, 0).unwrap();
        assert!(p.contains(5, 25));
        assert!(!p.contains(50, 55));
        assert_eq!(std::fs::metadata(p.path()).unwrap().len(), 100);
        parts.published(&p);
        assert_eq!(p.write_missing(60, &[1]).unwrap(), 0, "sealed");
        assert!(!Partials::map_path(&layout, &d).exists());
    }

    #[test]
    fn a_legacy_prefix_becomes_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let d = Digest::of(b"y");
        std::fs::write(layout.partial(&d), [7u8; 30]).unwrap();
        let p = Partials::new(layout).open(&d, 100, 40).unwrap();
        assert!(
            p.contains(0, 30) && !p.contains(0, 31),
            "bounded by the file's length"
        );
    }
}
