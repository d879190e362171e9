//! What a layer's record says about how it can be read: the one place that decodes the
//! record's optional TOC and index columns (`toc_digest`, `toc_entries`, `toc_error`,
//! `toc_offset`, `toc_position`, `index_digest`) into a [`Form`], and, with the layer's
//! state, into the [`Mode`] that `lazypull status` shows.

use super::{LayerRecord, LayerState};

/// A layer's table of contents format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TocFormat {
    /// eStargz: a gzip layer with a JSON TOC near its end, found from a footer.
    Estargz,
    /// zstd:chunked: a zstd layer whose compressed TOC's position is in a layer annotation.
    ZstdChunked,
}

impl TocFormat {
    pub fn name(self) -> &'static str {
        match self {
            TocFormat::Estargz => "estargz",
            TocFormat::ZstdChunked => "zstd:chunked",
        }
    }
}

/// How a layer can be read, as its record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form<'a> {
    /// A verified TOC is in the store (`blobs/` under `digest`): read lazily, chunk by chunk.
    Toc {
        format: TocFormat,
        digest: &'a str,
        /// Its entries.
        entries: u64,
        /// Where the TOC starts in the blob (the end of the payload).
        offset: Option<u64>,
        /// zstd:chunked: where the compressed TOC is.
        position: Option<&'a str>,
    },
    /// The layer declares a TOC, not fetched yet.
    TocPending { format: TocFormat },
    /// The layer's TOC was refused (why): it is used only once fetched whole.
    TocRefused { reason: &'a str },
    /// No TOC, a file index in the store: written here when the layer was unpacked
    /// (`built_here`), or taken from another node (a random-access index with checkpoints).
    FileIndex { digest: &'a str, built_here: bool },
    /// No TOC, no index: the layer streams in, or is fetched whole.
    Plain,
}

/// How a layer is served now, for people (`lazypull status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Complete: every byte local (its files in the file cache, or its TOC over the blob).
    Complete,
    /// Read lazily through its TOC.
    LazyToc(TocFormat),
    /// A plain layer read lazily through a random-access index: gzip checkpoints, or zstd
    /// frame starts.
    LazyIndex {
        zstd: bool,
    },
    /// A plain layer served as it streams in.
    Streaming,
    Failed,
    /// Not mountable yet: a plain layer is fetched whole first.
    NotYet,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Complete => f.write_str("complete"),
            Mode::LazyToc(t) => write!(f, "lazy: {} TOC", t.name()),
            Mode::LazyIndex { zstd: true } => f.write_str("lazy: zstd frame index"),
            Mode::LazyIndex { zstd: false } => f.write_str("lazy: gzip index"),
            Mode::Streaming => f.write_str("streaming"),
            Mode::Failed => f.write_str("failed"),
            Mode::NotYet => f.write_str("not mountable yet (fetched whole first)"),
        }
    }
}

impl LayerRecord {
    /// The layer's form (see [`Form`]).
    pub fn form(&self) -> Form<'_> {
        let format = if self.toc_position.is_some() {
            TocFormat::ZstdChunked
        } else {
            TocFormat::Estargz
        };
        // A verified TOC first; else a file index (also on a layer whose TOC was refused or
        // not fetched when it was unpacked: its files are in the cache, or its checkpoints
        // make it lazy); else what the TOC's fetch came to.
        match (&self.toc_digest, self.toc_entries, &self.index_digest) {
            (Some(d), Some(entries), _) => Form::Toc {
                format,
                digest: d,
                entries,
                offset: self.toc_offset,
                position: self.toc_position.as_deref(),
            },
            (_, _, Some(d)) => Form::FileIndex {
                digest: d,
                built_here: self.unpacked,
            },
            (Some(_), None, None) => match &self.toc_error {
                Some(reason) => Form::TocRefused { reason },
                None => Form::TocPending { format },
            },
            (None, _, None) => Form::Plain,
        }
    }

    /// Whether a verified TOC is in the store.
    pub fn has_toc(&self) -> bool {
        matches!(self.form(), Form::Toc { .. })
    }

    /// Whether the layer declares a TOC that is not refused (fetched or not yet; whatever
    /// else its form is).
    pub fn toc_usable(&self) -> bool {
        self.toc_digest.is_some() && self.toc_error.is_none()
    }

    /// Whether the FUSE mount can serve the layer: its TOC verified (lazy), its files unpacked
    /// (a complete layer without a TOC), or a random-access index for it (a file index on a
    /// layer not unpacked here is always one: it came from another node).
    pub fn mountable(&self) -> bool {
        matches!(self.form(), Form::Toc { .. } | Form::FileIndex { .. })
    }

    /// Whether a container started on the layer now reads it lazily (not complete; its TOC
    /// fetched or to be fetched, or a random-access index taken from another node), rather
    /// than waiting for the layer to stream in or be fetched whole.
    pub fn read_lazily(&self) -> bool {
        self.state != LayerState::Complete
            && matches!(
                self.form(),
                Form::Toc { .. } | Form::TocPending { .. } | Form::FileIndex { .. }
            )
    }

    /// The layer's format for display: the TOC's once it is verified, else the compression.
    pub fn format(&self) -> &'static str {
        if let Form::Toc { format, .. } = self.form() {
            return format.name();
        }
        crate::oci::Compression::from_media_type(&self.media_type)
            .map(|c| c.name())
            .unwrap_or("?")
    }

    /// How the layer is served now. `random_access`: whether its file index (if any) has
    /// checkpoints (read from the index by the caller: the record does not say).
    pub fn mode(&self, random_access: bool) -> Mode {
        let form = self.form();
        let toc = matches!(form, Form::Toc { .. });
        if self.state == LayerState::Complete && (self.unpacked || toc) {
            return Mode::Complete;
        }
        match form {
            Form::Toc { format, .. } => Mode::LazyToc(format),
            Form::FileIndex { .. } if random_access => Mode::LazyIndex {
                zstd: self.format() == "zstd",
            },
            _ if self.walk_order.is_some() && !self.unpacked => Mode::Streaming,
            _ if self.state == LayerState::Failed => Mode::Failed,
            _ => Mode::NotYet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> LayerRecord {
        LayerRecord::for_test(&format!("sha256:{}", "a".repeat(64)), "")
    }

    #[test]
    fn each_combination_of_columns_is_one_form_and_one_mode() {
        let plain = layer();
        assert_eq!(plain.form(), Form::Plain);
        assert_eq!(plain.mode(false), Mode::NotYet);
        assert!(!plain.mountable() && !plain.toc_usable());
        assert_eq!(plain.format(), "gzip");

        let mut pending = layer();
        pending.toc_digest = Some("sha256:t".into());
        assert_eq!(
            pending.form(),
            Form::TocPending {
                format: TocFormat::Estargz
            }
        );
        assert!(pending.toc_usable() && !pending.mountable());

        let mut refused = pending.clone();
        refused.toc_error = Some("bad".into());
        assert_eq!(refused.form(), Form::TocRefused { reason: "bad" });
        assert!(!refused.toc_usable());

        let mut zstd = pending.clone();
        zstd.toc_position = Some("1:2:3:4".into());
        zstd.toc_entries = Some(7);
        zstd.toc_offset = Some(90);
        assert_eq!(
            zstd.form(),
            Form::Toc {
                format: TocFormat::ZstdChunked,
                digest: "sha256:t",
                entries: 7,
                offset: Some(90),
                position: Some("1:2:3:4"),
            }
        );
        assert!(zstd.mountable() && zstd.has_toc());
        assert_eq!(zstd.format(), "zstd:chunked");
        assert_eq!(zstd.mode(false).to_string(), "lazy: zstd:chunked TOC");
        zstd.state = LayerState::Complete;
        assert_eq!(zstd.mode(false), Mode::Complete);

        let mut shared = layer();
        shared.index_digest = Some("sha256:i".into());
        assert_eq!(
            shared.form(),
            Form::FileIndex {
                digest: "sha256:i",
                built_here: false
            }
        );
        assert!(shared.mountable());
        assert_eq!(shared.mode(true).to_string(), "lazy: gzip index");
        assert_eq!(
            shared.mode(false),
            Mode::NotYet,
            "an index without checkpoints"
        );

        let mut streaming = layer();
        streaming.walk_order = Some(true);
        assert_eq!(streaming.mode(false), Mode::Streaming);
        streaming.unpacked = true;
        streaming.state = LayerState::Complete;
        streaming.index_digest = Some("sha256:i".into());
        assert_eq!(
            streaming.form(),
            Form::FileIndex {
                digest: "sha256:i",
                built_here: true
            }
        );
        assert_eq!(streaming.mode(true), Mode::Complete);

        // A layer whose TOC was refused, then unpacked with a file index: served from it.
        let mut unpacked = refused.clone();
        unpacked.index_digest = Some("sha256:i".into());
        unpacked.unpacked = true;
        assert!(matches!(
            unpacked.form(),
            Form::FileIndex {
                built_here: true,
                ..
            }
        ));
        assert!(unpacked.mountable() && !unpacked.toc_usable());

        assert!(zstd.mode(false) == Mode::Complete && !zstd.read_lazily());
        assert!(pending.read_lazily() && shared.read_lazily());
        assert!(!plain.read_lazily() && !refused.read_lazily());

        let mut failed = layer();
        failed.state = LayerState::Failed;
        assert_eq!(failed.mode(false).to_string(), "failed");
    }
}
