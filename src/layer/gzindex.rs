//! Random access into plain gzip layers (zran's method): while a layer is decompressed the first
//! time, the decoder's state is recorded at deflate block boundaries every `span` bytes of
//! output: where the next block starts in the blob (a byte offset plus the bits of the previous
//! byte it begins with) and the last 32 KiB of output, the window later back-references may
//! reach into. Decoding can then resume at any checkpoint from a range request: a raw inflater
//! primed with those bits and given the window as its dictionary continues exactly where the
//! first decoder was.
//!
//! zlib itself does the inflating (the pure-Rust zlib-rs, through its C API in `libz-rs-sys`):
//! flate2 does not expose the block-boundary stops (`Z_BLOCK`), `inflatePrime` or a raw
//! dictionary, which this needs. The unsafe calls are confined to [`Inflater`].
//!
//! Windows are stored zstd-compressed (32 KiB of text or code shrinks to a few KiB). Everything
//! read back from an index is untrusted: checkpoints must be ordered and inside the blob, a
//! window decompresses to at most 32 KiB, and the bytes decoded from a checkpoint are verified
//! by the caller against the chunk digests of the file table.

use libz_rs_sys as z;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The deflate window: how far back a match may reach.
pub const WINDOW: usize = 32 * 1024;
/// Compressed bytes past what the first decoder had consumed when it returned some output
/// that decoding the same output again may need (zstd reports a frame's last block decoded
/// one byte before its end).
pub const END_SLACK: u64 = 16;
/// Default uncompressed distance between checkpoints.
pub const DEFAULT_SPAN: u64 = 1 << 20;
/// Regular files are verified in pieces of this many bytes (a digest each in the file table).
pub const CHUNK: u64 = 1 << 20;
/// Upper bound on checkpoints in one index (a 1 TiB layer at the smallest span).
pub const MAX_POINTS: usize = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GzIndexError {
    #[error("zlib: {0}")]
    Zlib(String),
    #[error("the compressed bytes end before {0} bytes were decoded")]
    Truncated(u64),
    #[error("checkpoint window: {0}")]
    Window(String),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("a piece at {skip} is behind the span decoder, at {at}, or its input starts after it")]
    Behind { skip: u64, at: u64 },
}

/// One place decoding can resume.
#[derive(Clone, PartialEq, Eq)]
pub struct Point {
    /// Uncompressed offset.
    pub out: u64,
    /// Offset in the blob of the first whole byte after the checkpoint.
    pub inp: u64,
    /// Bits of the byte before `inp` that belong to the next block (0–7).
    pub bits: u8,
    /// The last (up to) 32 KiB of output before `out`, zstd-compressed.
    pub window: Vec<u8>,
    /// A zstd frame start (a plain zstd layer of many frames): decoding starts afresh there,
    /// with no bits and no window.
    pub zstd: bool,
    /// The window kept apart from the index (`window` is then empty): a shared index keeps its
    /// windows in a blob of their own, fetched by range when a read needs one.
    pub window_ref: Option<WindowRef>,
}

/// Where a checkpoint's zstd-compressed window lies in the windows blob of a shared index, and
/// its digest (verified before the window is used).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WindowRef {
    pub offset: u64,
    pub len: u32,
    pub sha256: [u8; 32],
}

impl WindowRef {
    /// Whether `bytes` are this window.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        use sha2::Digest as _;
        bytes.len() == self.len as usize && sha2::Sha256::digest(bytes)[..] == self.sha256[..]
    }
}

impl std::fmt::Debug for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Point")
            .field("out", &self.out)
            .field("inp", &self.inp)
            .field("bits", &self.bits)
            .field("window_bytes", &self.window.len())
            .field("zstd", &self.zstd)
            .field("window_ref", &self.window_ref)
            .finish()
    }
}

impl Point {
    /// Where in the blob decoding from this point starts (the partial byte included).
    pub fn start(&self) -> u64 {
        self.inp - u64::from(self.bits > 0)
    }

    /// The window, decompressed and bounded: the index's own, or `fetched` (the bytes of
    /// [`Point::window_ref`], verified against it).
    pub fn window(&self, fetched: Option<&[u8]>) -> Result<Vec<u8>, GzIndexError> {
        let compressed = match (&self.window_ref, fetched) {
            (None, _) => &self.window[..],
            (Some(r), Some(bytes)) if r.matches(bytes) => bytes,
            (Some(_), Some(_)) => {
                return Err(GzIndexError::Window(
                    "the fetched window does not match its digest".into(),
                ));
            }
            (Some(_), None) => {
                return Err(GzIndexError::Window("kept apart and not fetched".into()));
            }
        };
        if compressed.is_empty() {
            return Ok(vec![]);
        }
        let w = zstd::bulk::decompress(compressed, WINDOW)
            .map_err(|e| GzIndexError::Window(e.to_string()))?;
        if self.out >= WINDOW as u64 && w.len() != WINDOW {
            return Err(GzIndexError::Window(format!(
                "{} bytes, expected {WINDOW}",
                w.len()
            )));
        }
        Ok(w)
    }
}

/// What an [`IndexingReader`] recorded; complete once the reader returned end of stream.
#[derive(Debug, Default)]
pub struct Recording {
    pub points: Vec<Point>,
    /// Uncompressed bytes so far.
    pub size: u64,
    /// Compressed bytes consumed so far.
    pub compressed: u64,
    /// The whole stream was decoded (every member's CRC checked).
    pub complete: bool,
    /// Why the checkpoints cannot be used (a second gzip member: resuming inside it would need
    /// its own header state, which this index does not record).
    pub unusable: Option<String>,
}

impl Recording {
    /// A checkpoint at `size` bytes of output, `compressed` bytes of input.
    fn add(&mut self, point: Point, size: u64, compressed: u64) {
        if self.unusable.is_none() && self.points.len() < MAX_POINTS {
            self.points.push(point);
        }
        self.size = size;
        self.compressed = compressed;
    }

    /// The end of the stream.
    fn finish(&mut self, size: u64, compressed: u64) {
        self.size = size;
        self.compressed = compressed;
        self.complete = true;
    }
}

/// A zlib inflate stream. Every unsafe call of this module is here: the `z_stream` is boxed so
/// its address never changes (zlib's state points back to it), its buffer pointers are set from
/// live slices right before each call and cleared right after, and it is ended exactly once, on
/// drop.
struct Inflater {
    strm: Box<z::z_stream>,
}

// The stream owns its state exclusively and holds no pointers between calls.
unsafe impl Send for Inflater {}

fn zerr(what: &str, code: i32) -> GzIndexError {
    GzIndexError::Zlib(format!("{what} returned {code}"))
}

impl Inflater {
    /// `window_bits`: 31 for a gzip stream, -15 for raw deflate.
    fn new(window_bits: i32) -> Result<Self, GzIndexError> {
        let mut strm: Box<z::z_stream> = Box::default();
        // SAFETY: `strm` is a default-initialised z_stream at a stable heap address; the version
        // string and struct size are the library's own.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if ret != z::Z_OK {
            return Err(zerr("inflateInit2", ret));
        }
        Ok(Inflater { strm })
    }

    /// Inflate from `input` into `output`: (bytes consumed, bytes produced, zlib's code).
    fn run(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> (usize, usize, i32) {
        // zlib counts in u32: larger slices are handed over in parts by the callers' loops.
        let (ilen, olen) = (
            input.len().min(u32::MAX as usize),
            output.len().min(u32::MAX as usize),
        );
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = ilen as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = olen as u32;
        // SAFETY: the stream was initialised by `new`; next_in/next_out point into `input` and
        // `output`, which outlive the call, with lengths no larger than theirs.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = ilen - self.strm.avail_in as usize;
        let produced = olen - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        (consumed, produced, ret)
    }

    fn data_type(&self) -> i32 {
        self.strm.data_type
    }

    fn prime(&mut self, bits: u8, value: u8) -> Result<(), GzIndexError> {
        // SAFETY: initialised stream; prime only updates its bit buffer.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, i32::from(bits), i32::from(value)) };
        if ret != z::Z_OK {
            return Err(zerr("inflatePrime", ret));
        }
        Ok(())
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), GzIndexError> {
        // SAFETY: initialised stream; `dict` is a live slice of at most WINDOW bytes.
        let ret =
            unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) };
        if ret != z::Z_OK {
            return Err(zerr("inflateSetDictionary", ret));
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), GzIndexError> {
        // SAFETY: initialised stream.
        let ret = unsafe { z::inflateReset(&mut *self.strm) };
        if ret != z::Z_OK {
            return Err(zerr("inflateReset", ret));
        }
        Ok(())
    }

    fn message(&self, code: i32) -> String {
        if self.strm.msg.is_null() {
            return format!("zlib error {code}");
        }
        // SAFETY: zlib sets `msg` to a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, ended only here.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

/// A gzip decoder (multi-member, like flate2's `MultiGzDecoder`) that records checkpoints every
/// `span` bytes of output into a shared [`Recording`].
pub struct IndexingReader<R> {
    inner: R,
    inf: Inflater,
    input: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
    /// The last WINDOW bytes of output, circular (`total_out % WINDOW` is the next write).
    ring: Vec<u8>,
    total_in: u64,
    total_out: u64,
    last: Option<u64>,
    span: u64,
    member_ended: bool,
    done: bool,
    rec: Arc<Mutex<Recording>>,
    consumed: Arc<AtomicU64>,
    /// Uncompressed offsets (sorted) that want a checkpoint right before them: the last block
    /// boundary at or before each gets one ([`IndexingReader::with_targets`]).
    targets: Vec<u64>,
    next_target: usize,
    /// The last block boundary passed without a checkpoint, with its window (kept only when
    /// there are targets): a target found in the block after it makes it one.
    prev: Option<(Point, Vec<u8>)>,
}

impl<R: Read> IndexingReader<R> {
    pub fn new(inner: R, span: u64) -> Result<(Self, Arc<Mutex<Recording>>), GzIndexError> {
        let rec = Arc::new(Mutex::new(Recording::default()));
        Ok((
            IndexingReader {
                inner,
                inf: Inflater::new(31)?,
                input: vec![0; 256 << 10],
                pos: 0,
                len: 0,
                eof: false,
                ring: vec![0; WINDOW],
                total_in: 0,
                total_out: 0,
                last: None,
                span: span.max(WINDOW as u64),
                member_ended: false,
                done: false,
                rec: Arc::clone(&rec),
                consumed: Arc::default(),
                targets: vec![],
                next_target: 0,
                prev: None,
            },
            rec,
        ))
    }

    /// Also a checkpoint at the last block boundary at or before each of `targets`
    /// (uncompressed offsets; a file that a start reads, say): a read there then decodes at
    /// most one deflate block (typically 30–150 KiB) before its first byte, not up to a span.
    pub fn with_targets(mut self, mut targets: Vec<u64>) -> Self {
        targets.sort_unstable();
        targets.dedup();
        self.targets = targets;
        self
    }

    fn remember(&mut self, out: &[u8]) {
        let tail = &out[out.len().saturating_sub(WINDOW)..];
        let mut at = ((self.total_out + (out.len() - tail.len()) as u64) % WINDOW as u64) as usize;
        let mut rest = tail;
        while !rest.is_empty() {
            let n = rest.len().min(WINDOW - at);
            self.ring[at..at + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            at = (at + n) % WINDOW;
        }
    }

    fn window(&self) -> Vec<u8> {
        if self.total_out < WINDOW as u64 {
            return self.ring[..self.total_out as usize].to_vec();
        }
        let at = (self.total_out % WINDOW as u64) as usize;
        let mut w = Vec::with_capacity(WINDOW);
        w.extend_from_slice(&self.ring[at..]);
        w.extend_from_slice(&self.ring[..at]);
        w
    }

    fn record(&self, f: impl FnOnce(&mut Recording)) {
        f(&mut self.rec.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The compressed bytes read so far, updated as the reader returns data: when a reader of
    /// it has the output up to some point, the blob bytes before this count produced it.
    pub fn consumed(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.consumed)
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<R: Read> Read for IndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.done {
            return Ok(0);
        }
        loop {
            if self.pos == self.len && !self.eof {
                self.len = self.inner.read(&mut self.input)?;
                self.pos = 0;
                self.eof = self.len == 0;
            }
            if self.member_ended {
                if self.pos < self.len {
                    // Another member follows.
                    self.inf.reset().map_err(invalid)?;
                    self.member_ended = false;
                    self.record(|r| {
                        r.unusable
                            .get_or_insert_with(|| "more than one gzip member".into());
                    });
                } else if self.eof {
                    self.done = true;
                    let (size, compressed) = (self.total_out, self.total_in);
                    self.record(|r| r.finish(size, compressed));
                    return Ok(0);
                } else {
                    continue;
                }
            }
            if self.pos == self.len && self.eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the gzip stream ends early",
                ));
            }
            let (c, p, ret) = self
                .inf
                .run(&self.input[self.pos..self.len], buf, z::Z_BLOCK);
            self.pos += c;
            self.total_in += c as u64;
            self.consumed.store(self.total_in, Ordering::Relaxed);
            self.remember(&buf[..p]);
            self.total_out += p as u64;
            match ret {
                z::Z_OK | z::Z_BUF_ERROR => {}
                z::Z_STREAM_END => self.member_ended = true,
                code => return Err(invalid(self.inf.message(code))),
            }
            let dt = self.inf.data_type();
            let at_boundary = dt & 128 != 0 && dt & 64 == 0 && !self.member_ended;
            // The stream's end closes its last block too (targets in it want the boundary
            // before it).
            if at_boundary || ret == z::Z_STREAM_END {
                let out = self.total_out;
                let (size, compressed) = (self.total_out, self.total_in);
                // Targets in the block just decoded want the boundary before it; one right
                // here wants this one.
                let (mut want_prev, mut want_here) = (false, false);
                while let Some(&t) = self.targets.get(self.next_target) {
                    if t > out {
                        break;
                    }
                    if t == out {
                        want_here = true;
                    } else {
                        want_prev = true;
                    }
                    self.next_target += 1;
                }
                if want_prev && let Some((mut point, window)) = self.prev.take() {
                    point.window = zstd::bulk::compress(&window, 3)?;
                    self.last = Some(point.out);
                    self.record(|r| r.add(point, size, compressed));
                }
                let point = Point {
                    out,
                    inp: self.total_in,
                    bits: (dt & 7) as u8,
                    window: vec![],
                    zstd: false,
                    window_ref: None,
                };
                if !at_boundary {
                    self.prev = None;
                } else if want_here || self.last.is_none_or(|l| out - l >= self.span) {
                    self.last = Some(out);
                    self.prev = None;
                    let point = Point {
                        window: if out == 0 {
                            vec![]
                        } else {
                            zstd::bulk::compress(&self.window(), 3)?
                        },
                        ..point
                    };
                    self.record(|r| r.add(point, size, compressed));
                } else if self.next_target < self.targets.len() {
                    self.prev = Some((point, self.window()));
                }
            }
            if p > 0 {
                return Ok(p);
            }
        }
    }
}

/// Decode `len` bytes starting `skip` bytes after checkpoint `point`, from `compressed`: the
/// blob's bytes from `point.start()` on (enough of them to reach the end). `window`: the
/// point's window when it is kept apart ([`Point::window_ref`]).
pub fn decode_at(
    compressed: &[u8],
    point: &Point,
    window: Option<&[u8]>,
    skip: u64,
    len: u64,
) -> Result<Vec<u8>, GzIndexError> {
    if point.zstd {
        return decode_zstd_at(compressed, skip, len);
    }
    SpanDecoder::new(point, window)?.read(compressed, skip, len)
}

/// A deflate decoder resumed at a checkpoint and left where its last piece ended: the pieces
/// read in order after it, in its span or the spans that follow, are decoded in one pass
/// instead of each from its own checkpoint (a span holds many small files; decoding each from
/// the checkpoint made reading a directory quadratic in the span, and every checkpoint passed
/// needed its window).
pub struct SpanDecoder {
    inf: Inflater,
    /// The checkpoint's [`Point::start`] in the blob.
    start: u64,
    /// The checkpoint's uncompressed offset ([`Point::out`]).
    base: u64,
    /// Bits of the partial first byte still to prime, before any other input.
    prime: u8,
    /// Compressed bytes consumed, from [`Point::start`] on.
    consumed: u64,
    /// Uncompressed bytes produced since the checkpoint.
    out: u64,
}

impl SpanDecoder {
    /// A decoder at deflate checkpoint `point` (not a zstd frame start), with its window when
    /// kept apart.
    pub fn new(point: &Point, window: Option<&[u8]>) -> Result<Self, GzIndexError> {
        if point.zstd {
            return Err(GzIndexError::Window(
                "a zstd frame start has no deflate state".into(),
            ));
        }
        let window = point.window(window)?;
        let mut inf = Inflater::new(-15)?;
        // Raw deflate takes the dictionary at any time; priming only sets the bit buffer.
        if !window.is_empty() {
            inf.set_dictionary(&window)?;
        }
        Ok(SpanDecoder {
            inf,
            start: point.start(),
            base: point.out,
            prime: point.bits,
            consumed: 0,
            out: 0,
        })
    }

    /// The uncompressed offset this decoder is at (where its last piece ended).
    pub fn at(&self) -> u64 {
        self.base + self.out
    }

    /// Where in the blob its next input byte is.
    pub fn input_at(&self) -> u64 {
        self.start + self.consumed
    }

    /// Whether it can go on to the piece at uncompressed offset `pos` given the blob's bytes
    /// from `input_at` on: the piece is ahead and the input reaches back to the decoder.
    pub fn can_reach(&self, pos: u64, input_at: u64) -> bool {
        pos >= self.at() && input_at <= self.input_at()
    }

    /// Decode `len` bytes at `skip` bytes after the checkpoint (at or past where the last
    /// piece ended), from `compressed`: the blob's bytes from [`Point::start`] on, at least
    /// as many as the last call had. An error leaves the decoder unusable.
    pub fn read(
        &mut self,
        compressed: &[u8],
        skip: u64,
        len: u64,
    ) -> Result<Vec<u8>, GzIndexError> {
        self.read_at(compressed, self.start, self.base + skip, len)
    }

    /// Decode `len` bytes at uncompressed offset `pos` (at or past [`SpanDecoder::at`]), from
    /// `input`: the blob's bytes from `input_at` (at or before [`SpanDecoder::input_at`]) on,
    /// enough of them to reach the piece's end. An error leaves the decoder unusable.
    pub fn read_at(
        &mut self,
        input: &[u8],
        input_at: u64,
        pos: u64,
        len: u64,
    ) -> Result<Vec<u8>, GzIndexError> {
        let want = pos.saturating_sub(self.base) + len;
        let truncated = || GzIndexError::Truncated(want);
        if pos < self.at() || input_at > self.input_at() {
            return Err(GzIndexError::Behind {
                skip: pos,
                at: self.at(),
            });
        }
        let from = usize::try_from(self.input_at() - input_at).map_err(|_| truncated())?;
        let mut input = input.get(from..).ok_or_else(truncated)?;
        if self.prime > 0 {
            let (&b, rest) = input.split_first().ok_or_else(truncated)?;
            self.inf.prime(self.prime, b >> (8 - self.prime))?;
            self.prime = 0;
            self.consumed += 1;
            input = rest;
        }
        let skip = pos - self.at();
        let inf = &mut self.inf;
        let (consumed, produced) = (&mut self.consumed, &mut self.out);
        skip_then_take(skip, len, want, |dst| {
            let (c, p, ret) = inf.run(input, dst, z::Z_NO_FLUSH);
            input = &input[c..];
            *consumed += c as u64;
            *produced += p as u64;
            let step = match ret {
                z::Z_OK => Step::Going,
                // The deflate stream ended, or no progress is possible with the bytes given.
                z::Z_STREAM_END => Step::Ended,
                z::Z_BUF_ERROR if c == 0 && p == 0 => Step::Ended,
                z::Z_BUF_ERROR => Step::Going,
                code => return Err(GzIndexError::Zlib(inf.message(code))),
            };
            Ok((p, step))
        })
    }
}

/// How a decoder's step left it.
enum Step {
    Going,
    /// Its stream ended, or it cannot go on with the input it has.
    Ended,
}

/// Drive a decoder: discard the first `skip` bytes of its output, return the next `len`.
/// `step` decodes into the buffer it is given: (bytes produced, state). A decoder that ends
/// before that is an error (the input is truncated, `want` bytes were needed from its start).
fn skip_then_take(
    skip: u64,
    len: u64,
    want: u64,
    mut step: impl FnMut(&mut [u8]) -> Result<(usize, Step), GzIndexError>,
) -> Result<Vec<u8>, GzIndexError> {
    let mut scratch = vec![0u8; (64 << 10).min(skip.max(1)) as usize];
    let mut skipped = 0u64;
    let mut out = vec![0u8; len.min(1 << 30) as usize];
    let mut filled = 0usize;
    while skipped < skip || filled < out.len() {
        let dst: &mut [u8] = if skipped < skip {
            let n = (skip - skipped).min(scratch.len() as u64) as usize;
            &mut scratch[..n]
        } else {
            &mut out[filled..]
        };
        let (p, state) = step(dst)?;
        if skipped < skip {
            skipped += p as u64;
        } else {
            filled += p;
        }
        let more = skipped < skip || filled < out.len();
        if more && matches!(state, Step::Ended) {
            return Err(GzIndexError::Truncated(want));
        }
    }
    Ok(out)
}

/// [`decode_at`] for a zstd frame start: the frames from there on decoded as one stream. The
/// decoder is driven directly: at the end of the input it is still asked to flush the output
/// it holds (zstd's `Read` adapter reports an incomplete frame first).
fn decode_zstd_at(compressed: &[u8], skip: u64, len: u64) -> Result<Vec<u8>, GzIndexError> {
    use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer, get_error_name};
    let mut dctx = DCtx::create();
    let mut input = InBuffer::around(compressed);
    skip_then_take(skip, len, skip + len, |dst| {
        let before = input.pos();
        let mut output = OutBuffer::around(dst);
        dctx.decompress_stream(&mut output, &mut input)
            .map_err(|code| GzIndexError::Zstd(get_error_name(code).to_string()))?;
        let p = output.pos();
        Ok((
            p,
            if p == 0 && input.pos() == before {
                Step::Ended
            } else {
                Step::Going
            },
        ))
    })
}

/// A zstd decoder that records a checkpoint at a frame start every `span` bytes of output (or
/// more, where frames are longer) into a shared [`Recording`]. A layer of one frame gets one
/// checkpoint, at its start: no random access.
pub struct ZstdIndexingReader<R> {
    inner: R,
    dctx: zstd::zstd_safe::DCtx<'static>,
    input: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
    total_in: u64,
    total_out: u64,
    last: Option<u64>,
    span: u64,
    /// Between two frames (or before the first).
    between: bool,
    done: bool,
    rec: Arc<Mutex<Recording>>,
    consumed: Arc<AtomicU64>,
}

impl<R: Read> ZstdIndexingReader<R> {
    pub fn new(inner: R, span: u64) -> (Self, Arc<Mutex<Recording>>) {
        let rec = Arc::new(Mutex::new(Recording::default()));
        (
            ZstdIndexingReader {
                inner,
                dctx: zstd::zstd_safe::DCtx::create(),
                input: vec![0; 256 << 10],
                pos: 0,
                len: 0,
                eof: false,
                total_in: 0,
                total_out: 0,
                last: None,
                span: span.max(WINDOW as u64),
                between: true,
                done: false,
                rec: Arc::clone(&rec),
                consumed: Arc::default(),
            },
            rec,
        )
    }

    fn record(&self, f: impl FnOnce(&mut Recording)) {
        f(&mut self.rec.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The compressed bytes read so far, updated as the reader returns data: when a reader of
    /// it has the output up to some point, the blob bytes before this count produced it.
    pub fn consumed(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.consumed)
    }
}

impl<R: Read> Read for ZstdIndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use zstd::zstd_safe::{InBuffer, OutBuffer};
        if buf.is_empty() || self.done {
            return Ok(0);
        }
        loop {
            if self.pos == self.len && !self.eof {
                self.len = self.inner.read(&mut self.input)?;
                self.pos = 0;
                self.eof = self.len == 0;
            }
            if self.between {
                if self.pos == self.len && self.eof {
                    self.done = true;
                    let (size, compressed) = (self.total_out, self.total_in);
                    self.record(|r| r.finish(size, compressed));
                    return Ok(0);
                }
                if self.pos == self.len {
                    continue;
                }
                // A frame starts here.
                self.between = false;
                if self.last.is_none_or(|l| self.total_out - l >= self.span) {
                    self.last = Some(self.total_out);
                    let point = Point {
                        out: self.total_out,
                        inp: self.total_in,
                        bits: 0,
                        window: vec![],
                        zstd: true,
                        window_ref: None,
                    };
                    let (size, compressed) = (self.total_out, self.total_in);
                    self.record(|r| r.add(point, size, compressed));
                }
            }
            if self.pos == self.len && self.eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the zstd stream ends inside a frame",
                ));
            }
            let mut input = InBuffer::around(&self.input[self.pos..self.len]);
            let mut output = OutBuffer::around(&mut *buf);
            let hint = self
                .dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| invalid(zstd::zstd_safe::get_error_name(code)))?;
            let (c, p) = (input.pos(), output.pos());
            self.pos += c;
            self.total_in += c as u64;
            self.consumed.store(self.total_in, Ordering::Relaxed);
            self.total_out += p as u64;
            // 0: the frame is decoded and flushed.
            self.between = hint == 0;
            if p > 0 {
                return Ok(p);
            }
        }
    }
}

/// Compressed bytes after a checkpoint that always hold the first [`WINDOW`] bytes of output
/// (deflate's worst case, stored blocks, adds 5 bytes per 64 KiB).
pub const SPARSE_INPUT: u64 = 96 << 10;

/// `window` (checkpoint `point`'s, decompressed) with the bytes that no decoding from `point`
/// reads set to zero, so that it compresses to a fraction (a shared index keeps its windows in
/// a blob that nodes fetch by range: a miss's request, a list's bytes ahead). Only the first
/// [`WINDOW`] bytes of output can reach back into the window (deflate's distances are at most
/// that), and LZ77 copies do not depend on what they copy, so four decodes of them find
/// every window byte they copy: with the window all zeros and all ones, output bytes that
/// differ are copies; with windows holding the high and the low byte of each position, those
/// bytes name where they were copied from. The result is checked: decoding with it gives the
/// same output as with `window`. `compressed`: the blob's bytes from [`Point::start`] on, at
/// least [`SPARSE_INPUT`] of them unless the blob ends first. `None` when it cannot be made
/// (a zstd point, a window of more than [`WINDOW`] bytes, the stream ending within
/// [`WINDOW`] bytes of output): the window is then shared whole.
pub fn sparse_window(compressed: &[u8], point: &Point, window: &[u8]) -> Option<Vec<u8>> {
    if point.zstd || window.is_empty() || window.len() > WINDOW {
        return None;
    }
    let mut bare = point.clone();
    bare.window = vec![];
    bare.window_ref = None;
    let decode = |w: &[u8]| -> Option<Vec<u8>> {
        let mut d = SpanDecoder::new(&bare, None).ok()?;
        d.inf.set_dictionary(w).ok()?;
        d.read(compressed, 0, WINDOW as u64).ok()
    };
    let real = decode(window)?;
    let zeros = decode(&vec![0; window.len()])?;
    let ones = decode(&vec![0xff; window.len()])?;
    let high: Vec<u8> = (0..window.len()).map(|i| (i >> 8) as u8).collect();
    let low: Vec<u8> = (0..window.len()).map(|i| i as u8).collect();
    let (high, low) = (decode(&high)?, decode(&low)?);
    let mut sparse = vec![0u8; window.len()];
    for p in 0..real.len() {
        if zeros[p] != ones[p] {
            let from = (usize::from(high[p]) << 8) | usize::from(low[p]);
            *sparse.get_mut(from)? = *window.get(from)?;
        }
    }
    (decode(&sparse)? == real).then_some(sparse)
}

/// The index of the last checkpoint at or before uncompressed offset `at` (`points` sorted).
pub fn point_before(points: &[Point], at: u64) -> Option<usize> {
    points.partition_point(|p| p.out <= at).checked_sub(1)
}

/// Where in the blob decoding that reaches uncompressed offset `end` may stop: just past the
/// first checkpoint at or after it (the byte holding its partial bits included), or the end of
/// the blob.
pub fn end_after(points: &[Point], end: u64, blob_size: u64) -> u64 {
    let i = points.partition_point(|p| p.out < end);
    points
        .get(i)
        .map(|p| (p.inp + 1).min(blob_size))
        .unwrap_or(blob_size)
}

/// Check checkpoints read from an untrusted index: ordered, inside the blob and the stream,
/// windows kept apart inside the windows blob of `windows_size` bytes (None: there is none).
pub fn validate(
    points: &[Point],
    blob_size: u64,
    size: u64,
    windows_size: Option<u64>,
) -> Result<(), String> {
    if points.len() > MAX_POINTS {
        return Err(format!(
            "{} checkpoints (at most {MAX_POINTS})",
            points.len()
        ));
    }
    let Some(first) = points.first() else {
        return Ok(());
    };
    if first.out != 0 {
        return Err("the first checkpoint is not at the start of the stream".into());
    }
    for (i, p) in points.iter().enumerate() {
        if p.bits > 7 {
            return Err(format!("checkpoint {i}: {} bits", p.bits));
        }
        if p.zstd != first.zstd {
            return Err(format!("checkpoint {i}: gzip and zstd checkpoints mixed"));
        }
        if p.zstd && (p.bits != 0 || !p.window.is_empty()) {
            return Err(format!(
                "checkpoint {i}: a zstd frame start with bits or a window"
            ));
        }
        if (p.inp == 0 && !p.zstd) || p.inp > blob_size || p.out > size {
            return Err(format!("checkpoint {i} lies outside the layer"));
        }
        if p.window.len() > 2 * WINDOW {
            return Err(format!(
                "checkpoint {i}: window of {} bytes",
                p.window.len()
            ));
        }
        if let Some(r) = &p.window_ref {
            if p.zstd || !p.window.is_empty() || p.out == 0 {
                return Err(format!(
                    "checkpoint {i}: a window kept apart where none or one inline is expected"
                ));
            }
            let Some(limit) = windows_size else {
                return Err(format!(
                    "checkpoint {i}: its window is kept apart but the index names no windows blob"
                ));
            };
            if r.len as usize > 2 * WINDOW
                || r.len == 0
                || r.offset.checked_add(r.len.into()).is_none_or(|e| e > limit)
            {
                return Err(format!(
                    "checkpoint {i}: window of {} bytes at {} is outside the windows blob",
                    r.len, r.offset
                ));
            }
        }
        if i > 0 && (p.out <= points[i - 1].out || p.inp <= points[i - 1].inp) {
            return Err(format!("checkpoint {i} is out of order"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Text-like data with long-distance repeats (so windows matter) and some noise.
    fn sample(n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let mut x: u32 = 12345;
        while out.len() < n {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if x.is_multiple_of(7) && out.len() > 1000 {
                let from = (x as usize / 7) % (out.len() - 500);
                let piece = out[from..from + 200].to_vec();
                out.extend_from_slice(&piece);
            } else {
                out.extend_from_slice(format!("line {} value {}\n", x % 1000, x % 37).as_bytes());
            }
        }
        out.truncate(n);
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn index(gz: &[u8], span: u64) -> (Vec<u8>, Recording) {
        let (mut r, rec) = IndexingReader::new(gz, span).unwrap();
        let mut out = vec![];
        // Small reads, to cross block boundaries inside reads as well as between them.
        let mut buf = vec![0u8; 7777];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        drop(r);
        let rec = Arc::try_unwrap(rec).unwrap().into_inner().unwrap();
        (out, rec)
    }

    #[test]
    fn a_sparse_window_decodes_as_the_whole_one_and_compresses_smaller() {
        let data = sample(3 << 20);
        let gz = gzip(&data);
        let (_, rec) = index(&gz, 256 << 10);
        let (mut whole, mut sparse_total, mut made) = (0, 0, 0);
        for p in rec.points.iter().filter(|p| !p.window.is_empty()) {
            let window = p.window(None).unwrap();
            let start = p.start() as usize;
            let end = (start + SPARSE_INPUT as usize).min(gz.len());
            let Some(sparse) = sparse_window(&gz[start..end], p, &window) else {
                // Only a point within a window's length of the end may have none.
                assert!(data.len() as u64 - p.out < WINDOW as u64, "{p:?}");
                continue;
            };
            made += 1;
            assert_eq!(sparse.len(), window.len());
            assert!(
                sparse.iter().zip(&window).all(|(&s, &w)| s == 0 || s == w),
                "only zeroed"
            );
            let mut q = p.clone();
            q.window = zstd::bulk::compress(&sparse, 3).unwrap();
            whole += p.window.len();
            sparse_total += q.window.len();
            // A long read from the point, and one starting past the window's reach, decode
            // the same with it.
            let len = (data.len() as u64 - p.out).min(300_000);
            let got = decode_at(&gz[start..], &q, None, 0, len).unwrap();
            assert_eq!(&got[..], &data[p.out as usize..(p.out + len) as usize]);
            if len > 70_000 {
                let got = decode_at(&gz[start..], &q, None, 60_000, 10_000).unwrap();
                let at = p.out as usize + 60_000;
                assert_eq!(&got[..], &data[at..at + 10_000]);
            }
            // A wrong byte where a copy reads is caught: the check decodes with the result.
            if let Some(i) = sparse.iter().position(|&b| b != 0) {
                let mut bad = window.clone();
                bad[i] ^= 0xff;
                let mut r = p.clone();
                r.window = zstd::bulk::compress(&bad, 3).unwrap();
                let got = decode_at(&gz[start..], &r, None, 0, WINDOW as u64).unwrap();
                assert_ne!(&got[..], &data[p.out as usize..p.out as usize + WINDOW]);
            }
        }
        assert!(made >= 5, "{made} sparse windows");
        assert!(
            sparse_total < whole,
            "sparse windows {sparse_total} bytes, whole {whole}"
        );
        eprintln!("windows: {whole} bytes whole, {sparse_total} sparse ({made} points)");
        // Not for a zstd point, nor a window longer than deflate's.
        let p = rec.points.iter().find(|p| !p.window.is_empty()).unwrap();
        let mut z = p.clone();
        z.zstd = true;
        assert_eq!(sparse_window(&gz, &z, &[1; 10]), None);
        assert_eq!(sparse_window(&gz, p, &vec![1; WINDOW + 1]), None);
    }

    #[test]
    fn targets_get_the_last_block_boundary_before_them() {
        let data = sample(3 << 20);
        let gz = gzip(&data);
        // Every block boundary (span 1), and the spaced checkpoints alone.
        let (_, every) = index(&gz, 1);
        let (_, spaced) = index(&gz, 1 << 20);
        let targets = vec![0, 5, 400_000, 1_234_567, every.points[7].out, 2_999_999];
        let (mut r, rec) = IndexingReader::new(&gz[..], 1 << 20).unwrap();
        r = r.with_targets(targets.clone());
        let mut out = vec![];
        r.read_to_end(&mut out).unwrap();
        drop(r);
        let rec = Arc::try_unwrap(rec).unwrap().into_inner().unwrap();
        assert_eq!(out, data);
        validate(&rec.points, gz.len() as u64, rec.size, None).unwrap();
        assert!(rec.points.len() < spaced.points.len() + targets.len());
        for t in targets {
            let want = &every.points[point_before(&every.points, t).unwrap()];
            let got = &rec.points[point_before(&rec.points, t).unwrap()];
            assert_eq!(
                (got.out, got.inp, got.bits),
                (want.out, want.inp, want.bits),
                "{t}"
            );
            // It decodes: the target's bytes from there.
            let end = end_after(&rec.points, t + 1000, gz.len() as u64);
            let back = decode_at(
                &gz[got.start() as usize..end as usize],
                got,
                None,
                t - got.out,
                1000,
            )
            .unwrap();
            assert_eq!(back, data[t as usize..t as usize + 1000], "{t}");
        }
    }

    #[test]
    fn decodes_like_flate2_and_resumes_at_every_checkpoint() {
        let data = sample(3 << 20);
        let gz = gzip(&data);
        let (out, rec) = index(&gz, 256 << 10);
        assert_eq!(out, data);
        assert!(rec.complete);
        assert_eq!(rec.unusable, None);
        assert_eq!(
            (rec.size, rec.compressed),
            (data.len() as u64, gz.len() as u64)
        );
        assert!(rec.points.len() >= 8, "{} points", rec.points.len());
        validate(&rec.points, gz.len() as u64, rec.size, None).unwrap();
        for (i, p) in rec.points.iter().enumerate() {
            let want = 100_000.min(data.len() as u64 - p.out - 5000);
            let end = end_after(&rec.points, p.out + 5000 + want, gz.len() as u64);
            let got =
                decode_at(&gz[p.start() as usize..end as usize], p, None, 5000, want).unwrap();
            assert_eq!(
                got,
                data[(p.out + 5000) as usize..(p.out + 5000 + want) as usize],
                "point {i}"
            );
        }
        // Any offset: from the checkpoint before it, to just past the one after its end.
        for at in [0u64, 1, 700_001, 2_999_999] {
            let i = point_before(&rec.points, at).unwrap();
            let p = &rec.points[i];
            let len = 1000.min(data.len() as u64 - at);
            let end = end_after(&rec.points, at + len, gz.len() as u64);
            let got = decode_at(
                &gz[p.start() as usize..end as usize],
                p,
                None,
                at - p.out,
                len,
            )
            .unwrap();
            assert_eq!(got, data[at as usize..(at + len) as usize]);
        }
    }

    #[test]
    fn a_span_decoder_reads_the_pieces_of_a_span_in_one_pass() {
        let data = sample(2 << 20);
        let gz = gzip(&data);
        let (_, rec) = index(&gz, 512 << 10);
        // A checkpoint inside a byte, past the first, so that priming and the window are used.
        let (i, p) = rec
            .points
            .iter()
            .enumerate()
            .find(|(_, p)| p.out > 0 && p.bits > 0)
            .or_else(|| rec.points.iter().enumerate().find(|(_, p)| p.out > 0))
            .unwrap();
        let span_end = rec.points.get(i + 1).map_or(data.len() as u64, |n| n.out) - p.out;
        let mut d = SpanDecoder::new(p, None).unwrap();
        assert_eq!((d.at(), d.input_at()), (p.out, p.start()));
        // Pieces in order, each handed the bytes up to just past it (as a fetch delivers them).
        let mut at = 0u64;
        for (gap, len) in [
            (0u64, 700u64),
            (10, 5000),
            (40_000, 1),
            (0, 20_000),
            (3, 60_000),
        ] {
            let skip = at + gap;
            assert!(d.can_reach(p.out + skip, p.start()));
            let end = end_after(&rec.points, p.out + skip + len, gz.len() as u64);
            let got = d
                .read(&gz[p.start() as usize..end as usize], skip, len)
                .unwrap();
            let from = (p.out + skip) as usize;
            assert_eq!(got, data[from..from + len as usize], "piece at {skip}");
            at = skip + len;
        }
        assert!(at < span_end);
        // Behind the decoder: refused (the caller starts again from the checkpoint).
        assert!(!d.can_reach(p.out, p.start()));
        assert_eq!(
            d.read(&gz[p.start() as usize..], 0, 10),
            Err(GzIndexError::Behind {
                skip: p.out,
                at: p.out + at
            })
        );
        // On past the next checkpoints, given the blob from any byte before the decoder.
        let far = data.len() as u64 - 1000;
        let from = d.input_at() - 7;
        assert!(d.can_reach(far, from));
        assert!(!d.can_reach(far, d.input_at() + 1));
        let got = d.read_at(&gz[from as usize..], from, far, 1000).unwrap();
        assert_eq!(got, data[far as usize..]);
        // Too few bytes for the next piece: an error, not wrong bytes.
        let mut d = SpanDecoder::new(p, None).unwrap();
        assert!(matches!(
            d.read(
                &gz[p.start() as usize..p.start() as usize + 100],
                0,
                100_000
            ),
            Err(GzIndexError::Truncated(_))
        ));
    }

    #[test]
    fn too_few_bytes_or_a_wrong_window_fail() {
        let data = sample(1 << 20);
        let gz = gzip(&data);
        let (_, rec) = index(&gz, 64 << 10);
        let p = &rec.points[3];
        let short = &gz[p.start() as usize..p.start() as usize + 100];
        assert!(matches!(
            decode_at(short, p, None, 0, 500_000),
            Err(GzIndexError::Truncated(_))
        ));
        let mut bad = p.clone();
        bad.window = zstd::bulk::compress(&[b'x'; WINDOW], 3).unwrap();
        let end = end_after(&rec.points, p.out + 100_000, gz.len() as u64);
        let got = decode_at(
            &gz[p.start() as usize..end as usize],
            &bad,
            None,
            0,
            100_000,
        );
        assert_ne!(
            got.ok(),
            Some(data[p.out as usize..p.out as usize + 100_000].to_vec())
        );
        bad.window = b"not zstd".to_vec();
        assert!(matches!(
            decode_at(&gz[p.start() as usize..end as usize], &bad, None, 0, 10),
            Err(GzIndexError::Window(_))
        ));
    }

    #[test]
    fn a_second_member_makes_the_checkpoints_unusable_but_still_decodes() {
        let (a, b) = (sample(300_000), sample(200_000));
        let mut gz = gzip(&a);
        gz.extend_from_slice(&gzip(&b));
        let (out, rec) = index(&gz, 64 << 10);
        assert_eq!(out, [a, b].concat());
        assert!(rec.complete);
        assert!(rec.unusable.is_some());
    }

    #[test]
    fn truncated_or_corrupt_streams_are_errors() {
        let gz = gzip(&sample(200_000));
        let (mut r, _) = IndexingReader::new(&gz[..gz.len() - 20], 64 << 10).unwrap();
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
        let mut bad = gz.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        let (mut r, _) = IndexingReader::new(&bad[..], 64 << 10).unwrap();
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
    }

    #[test]
    fn hostile_checkpoints_are_refused() {
        let p = |out, inp, bits| Point {
            out,
            inp,
            bits,
            window: vec![],
            zstd: false,
            window_ref: None,
        };
        assert!(validate(&[p(0, 10, 0), p(100, 20, 3)], 1000, 1000, None).is_ok());
        assert!(validate(&[p(5, 10, 0)], 1000, 1000, None).is_err());
        assert!(validate(&[p(0, 10, 0), p(100, 20, 9)], 1000, 1000, None).is_err());
        assert!(validate(&[p(0, 10, 0), p(100, 2000, 0)], 1000, 1000, None).is_err());
        assert!(validate(&[p(0, 10, 0), p(100, 5, 0)], 1000, 1000, None).is_err());
        assert!(validate(&[p(0, 10, 0), p(0, 20, 0)], 1000, 1000, None).is_err());
        assert!(validate(&[p(0, 10, 0), p(5000, 20, 0)], 1000, 1000, None).is_err());
        // Windows kept apart: inside the windows blob, never at the start nor beside an inline
        // one, and only when the index names a windows blob.
        let apart = |offset, len| {
            let mut q = p(100, 20, 3);
            q.window_ref = Some(WindowRef {
                offset,
                len,
                sha256: [0; 32],
            });
            q
        };
        assert!(validate(&[p(0, 10, 0), apart(0, 500)], 1000, 1000, Some(500)).is_ok());
        assert!(validate(&[p(0, 10, 0), apart(0, 500)], 1000, 1000, None).is_err());
        assert!(validate(&[p(0, 10, 0), apart(1, 500)], 1000, 1000, Some(500)).is_err());
        assert!(validate(&[p(0, 10, 0), apart(u64::MAX, 5)], 1000, 1000, Some(500)).is_err());
        assert!(validate(&[p(0, 10, 0), apart(0, 0)], 1000, 1000, Some(500)).is_err());
        let mut both = apart(0, 500);
        both.window = vec![1];
        assert!(validate(&[p(0, 10, 0), both], 1000, 1000, Some(500)).is_err());
        let mut first = apart(0, 500);
        first.out = 0;
        assert!(validate(&[first], 1000, 1000, Some(500)).is_err());
        // A fetched window is used only if it matches its digest.
        let w = zstd::bulk::compress(&[b'x'; WINDOW], 3).unwrap();
        let mut q = p(WINDOW as u64, 20, 3);
        q.window_ref = Some(WindowRef {
            offset: 0,
            len: w.len() as u32,
            sha256: <sha2::Sha256 as sha2::Digest>::digest(&w).into(),
        });
        assert_eq!(q.window(Some(&w)).unwrap(), vec![b'x'; WINDOW]);
        assert!(q.window(None).is_err());
        let mut other = w.clone();
        other[w.len() - 1] ^= 1;
        assert!(q.window(Some(&other)).is_err());
    }

    /// zstd frames of `frame` bytes each, concatenated (what pzstd writes).
    fn zstd_frames(data: &[u8], frame: usize) -> Vec<u8> {
        data.chunks(frame)
            .flat_map(|c| zstd::bulk::compress(c, 3).unwrap())
            .collect()
    }

    fn zstd_index(z: &[u8], span: u64) -> (Vec<u8>, Recording) {
        let (mut r, rec) = ZstdIndexingReader::new(z, span);
        let mut out = vec![];
        let mut buf = vec![0u8; 7777];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, std::mem::take(&mut *rec.lock().unwrap()))
    }

    #[test]
    fn zstd_frame_starts_are_checkpoints_and_decode_on_their_own() {
        let data = sample(3 << 20);
        let z = zstd_frames(&data, 256 << 10);
        let (out, rec) = zstd_index(&z, 512 << 10);
        assert_eq!(out, data);
        assert!(rec.complete);
        assert_eq!(
            (rec.size, rec.compressed),
            (data.len() as u64, z.len() as u64)
        );
        // Every other frame start (512 KiB apart), the first at 0.
        assert_eq!(rec.points.len(), 6, "{:?}", rec.points);
        assert!(
            rec.points
                .iter()
                .all(|p| p.zstd && p.bits == 0 && p.window.is_empty())
        );
        assert_eq!((rec.points[0].out, rec.points[0].inp), (0, 0));
        validate(&rec.points, z.len() as u64, rec.size, None).unwrap();
        for p in &rec.points {
            let (at, len) = (p.out + 1000, 700_000u64.min(rec.size - p.out - 1000));
            let end = end_after(&rec.points, at + len, z.len() as u64);
            let got = decode_at(&z[p.start() as usize..end as usize], p, None, 1000, len).unwrap();
            assert_eq!(got, data[at as usize..(at + len) as usize]);
        }
        // Too few bytes: truncated, not wrong bytes.
        let p = &rec.points[1];
        assert!(matches!(
            decode_at(
                &z[p.start() as usize..p.start() as usize + 1000],
                p,
                None,
                0,
                300_000
            ),
            Err(GzIndexError::Truncated(_))
        ));
        // Mixed kinds and zstd points with a window are refused.
        let mut mixed = rec.points.clone();
        mixed[1].zstd = false;
        assert!(validate(&mixed, z.len() as u64, rec.size, None).is_err());
        let mut windowed = rec.points.clone();
        windowed[2].window = vec![1];
        assert!(validate(&windowed, z.len() as u64, rec.size, None).is_err());
    }

    #[test]
    fn one_zstd_frame_has_only_its_start() {
        let data = sample(2 << 20);
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let (out, rec) = zstd_index(&z, 256 << 10);
        assert_eq!(out, data);
        assert!(rec.complete);
        assert_eq!(rec.points.len(), 1);
        // A stream cut inside its frame is an error, not a short success.
        let (mut r, _) = ZstdIndexingReader::new(&z[..z.len() / 2], 256 << 10);
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
    }

    #[test]
    fn consumed_plus_slack_is_enough_to_decode_what_was_read() {
        let data = sample(3 << 20);
        for (z, gz) in [(zstd_frames(&data, 1 << 20), false), (gzip(&data), true)] {
            let (mut r, rec, consumed): (Box<dyn Read>, _, _) = if gz {
                let (r, rec) = IndexingReader::new(&z[..], 256 << 10).unwrap();
                let c = r.consumed();
                (Box::new(r), rec, c)
            } else {
                let (r, rec) = ZstdIndexingReader::new(&z[..], 1 << 20);
                let c = r.consumed();
                (Box::new(r), rec, c)
            };
            // (output so far, compressed bytes consumed then), after every read.
            let (mut marks, mut got, mut buf) = (vec![], 0u64, vec![0u8; 5000]);
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got += n as u64;
                marks.push((got, consumed.load(Ordering::Relaxed)));
            }
            let points = std::mem::take(&mut *rec.lock().unwrap()).points;
            for (out, inp) in marks {
                let inp = (inp + END_SLACK).min(z.len() as u64);
                let p = &points[point_before(&points, out - 1).unwrap()];
                let r = decode_at(
                    &z[p.start() as usize..inp as usize],
                    p,
                    None,
                    out - 1 - p.out,
                    1,
                );
                assert_eq!(
                    r,
                    Ok(vec![data[out as usize - 1]]),
                    "gzip {gz}: out {out} inp {inp}"
                );
            }
        }
    }
}
