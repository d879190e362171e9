//! A set of byte ranges (`[start, end)`, disjoint, merged when they touch) and its on-disk form.
//!
//! This is the "bitmap" of docs/architecture.md ("Store") for a partial layer file: which bytes of the sparse file
//! hold data from the registry. An interval set is used instead of a fixed-granularity bitmap
//! because on-demand spans (gzip members of eStargz chunks) start and end anywhere; it is exact
//! and small (16 bytes per run). Hand-written because the operations needed (merge-insert, gaps
//! in a window, byte total) are a few lines over `BTreeMap` and no maintained crate offers both
//! them and a stable serialisation.

use std::collections::BTreeMap;
use std::ops::Bound;

/// Magic at the start of a `.map` file (version 1: little-endian u64 pairs).
const MAGIC: &[u8; 8] = b"LPMAP\x01\0\0";
/// A map longer than this is refused (a corrupt file, not one the store wrote: 1M runs).
const MAX_RUNS: u64 = 1 << 20;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end, disjoint and never touching.
    runs: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &e)| (s, e))
    }

    /// Add `[start, end)`, merging with runs it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // The run starting at or before `start` may reach into (or touch) the new one.
        if let Some((&ps, &pe)) = self.runs.range(..=start).next_back()
            && pe >= start
        {
            s = ps;
            e = e.max(pe);
        }
        // Absorb every run starting inside [s, e].
        let inside: Vec<(u64, u64)> = self
            .runs
            .range((Bound::Included(s), Bound::Included(e)))
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, b) in inside {
            self.runs.remove(&a);
            self.total -= b - a;
            e = e.max(b);
        }
        self.runs.insert(s, e);
        self.total += e - s;
    }

    /// Whether every byte of `[start, end)` is covered.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        matches!(self.runs.range(..=start).next_back(), Some((_, &e)) if e >= end)
    }

    /// The end of the run covering `pos`, if `pos` is covered.
    pub fn covered_until(&self, pos: u64) -> Option<u64> {
        match self.runs.range(..=pos).next_back() {
            Some((_, &e)) if e > pos => Some(e),
            _ => None,
        }
    }

    /// The start of the first run at or after `pos` (where a gap starting at `pos` ends).
    pub fn next_start(&self, pos: u64) -> Option<u64> {
        self.runs.range(pos..).next().map(|(&s, _)| s)
    }

    /// The parts of `[start, end)` not covered, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = vec![];
        let mut pos = start;
        while pos < end {
            if let Some(e) = self.covered_until(pos) {
                pos = e;
                continue;
            }
            let stop = self.next_start(pos).unwrap_or(end).min(end);
            out.push((pos, stop));
            pos = stop;
        }
        out
    }

    /// Bytes of `[start, end)` covered.
    pub fn covered_in(&self, start: u64, end: u64) -> u64 {
        let missing: u64 = self.gaps(start, end).iter().map(|(a, b)| b - a).sum();
        end.saturating_sub(start) - missing
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.runs.len() * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for (&s, &e) in &self.runs {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        out
    }

    /// Parse a map file; every run must lie within `limit` (the blob size).
    pub fn decode(bytes: &[u8], limit: u64) -> Result<RangeSet, String> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or("not a range map (bad magic)")?;
        let word = |b: &[u8], i: usize| -> Option<u64> {
            b.get(i * 8..i * 8 + 8)
                .and_then(|w| w.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let n = word(rest, 0).ok_or("truncated range map")?;
        if n > MAX_RUNS || rest.len() as u64 != 8 + n * 16 {
            return Err(format!(
                "range map claims {n} runs in {} bytes",
                bytes.len()
            ));
        }
        let mut set = RangeSet::new();
        for i in 0..n as usize {
            let (s, e) = (
                word(rest, 1 + 2 * i).ok_or("truncated range map")?,
                word(rest, 2 + 2 * i).ok_or("truncated range map")?,
            );
            if s >= e || e > limit {
                return Err(format!("range map run {s}..{e} is outside 0..{limit}"));
            }
            set.insert(s, e);
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merges_touching_and_overlapping_runs() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30);
        assert_eq!(r.runs().collect::<Vec<_>>(), vec![(10, 40)]);
        assert_eq!(r.total(), 30);
        r.insert(0, 5);
        r.insert(3, 12);
        assert_eq!(r.runs().collect::<Vec<_>>(), vec![(0, 40)]);
        assert!(r.contains(0, 40) && !r.contains(0, 41));
        assert_eq!(r.gaps(0, 50), vec![(40, 50)]);
    }

    #[test]
    fn decode_refuses_garbage() {
        assert!(RangeSet::decode(b"nope", 10).is_err());
        let mut r = RangeSet::new();
        r.insert(0, 100);
        let enc = r.encode();
        assert!(RangeSet::decode(&enc, 99).is_err(), "run beyond the blob");
        assert!(RangeSet::decode(&enc[..enc.len() - 1], 100).is_err());
        assert_eq!(RangeSet::decode(&enc, 100).unwrap(), r);
    }

    proptest! {
        /// The set agrees with a byte-per-bit model for insert, contains, gaps and totals, and
        /// survives an encode/decode round trip.
        #[test]
        fn agrees_with_a_bitmap(ops in proptest::collection::vec((0u64..200, 0u64..40), 0..40),
                                 q in (0u64..240, 0u64..240)) {
            let mut set = RangeSet::new();
            let mut bits = vec![false; 256];
            for (s, len) in ops {
                set.insert(s, s + len);
                for b in &mut bits[s as usize..(s + len) as usize] { *b = true; }
            }
            prop_assert_eq!(set.total(), bits.iter().filter(|b| **b).count() as u64);
            let (a, b) = (q.0.min(q.1), q.0.max(q.1));
            prop_assert_eq!(set.contains(a, b), bits[a as usize..b as usize].iter().all(|x| *x));
            let gaps = set.gaps(a, b);
            let mut model = vec![];
            let mut i = a;
            while i < b {
                if bits[i as usize] { i += 1; continue; }
                let s = i;
                while i < b && !bits[i as usize] { i += 1; }
                model.push((s, i));
            }
            prop_assert_eq!(gaps, model);
            // Runs are disjoint and never touch.
            let runs: Vec<_> = set.runs().collect();
            for w in runs.windows(2) { prop_assert!(w[0].1 < w[1].0); }
            prop_assert_eq!(RangeSet::decode(&set.encode(), 256).unwrap(), set);
        }
    }
}
