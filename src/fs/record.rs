//! Recording which files are opened through the layer filesystem (for `lazypull convert
//! --record`): a session names the layers it watches and gets every (layer, path) first
//! opened while it runs, in order.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Sessions kept at once: an abandoned one (its client died) is dropped when a new one would
/// go over.
const MAX_SESSIONS: usize = 16;
/// Files one session keeps (more are not recorded).
const MAX_FILES: usize = 1_000_000;

#[derive(Default)]
pub struct Recorder {
    /// Sessions running: `opened` takes no lock while there are none.
    active: AtomicUsize,
    /// Filesystem answers waiting for a layer to stream in (see [`Recorder::waiting`]).
    waiting: AtomicUsize,
    inner: Mutex<Inner>,
}

/// A filesystem answer waiting for a layer's bytes; the recordings' quiet time starts again
/// when it ends.
pub struct Waiting<'a>(&'a Recorder);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        for s in self.0.lock().sessions.values_mut() {
            if s.last.is_some() {
                s.last = Some(now);
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    next: u64,
    sessions: HashMap<u64, Session>,
}

struct Session {
    /// Layer digests' hex.
    layers: HashSet<String>,
    seen: HashSet<(String, String)>,
    files: Vec<(String, String)>,
    /// When the last new file was recorded.
    last: Option<Instant>,
    /// Files kept at most.
    max: usize,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a session watching the layers (digest hex); returns its id.
    pub fn start(&self, layers: impl IntoIterator<Item = String>) -> u64 {
        self.start_bounded(layers, MAX_FILES)
    }

    /// Start a session that keeps at most `max` files.
    pub fn start_bounded(&self, layers: impl IntoIterator<Item = String>, max: usize) -> u64 {
        let mut g = self.lock();
        if g.sessions.len() >= MAX_SESSIONS
            && let Some(&oldest) = g.sessions.keys().min()
        {
            tracing::warn!(
                session = oldest,
                "dropping the oldest open-recording session"
            );
            g.sessions.remove(&oldest);
        }
        g.next += 1;
        let id = g.next;
        g.sessions.insert(
            id,
            Session {
                layers: layers.into_iter().collect(),
                seen: HashSet::new(),
                files: vec![],
                last: None,
                max: max.min(MAX_FILES),
            },
        );
        self.active.store(g.sessions.len(), Ordering::Relaxed);
        id
    }

    /// End a session: the (layer hex, path) pairs it saw, first opens first.
    pub fn stop(&self, id: u64) -> Option<Vec<(String, String)>> {
        let mut g = self.lock();
        let s = g.sessions.remove(&id);
        self.active.store(g.sessions.len(), Ordering::Relaxed);
        s.map(|s| s.files)
    }

    /// A running session's files so far, when the last was recorded (now, while an answer
    /// waits for a layer: see [`Recorder::waiting`]), and whether it is full.
    pub fn progress(&self, id: u64) -> Option<(usize, Option<Instant>, bool)> {
        let g = self.lock();
        let s = g.sessions.get(&id)?;
        let last = match s.last {
            Some(_) if self.waiting.load(Ordering::Relaxed) > 0 => Some(Instant::now()),
            last => last,
        };
        Some((s.files.len(), last, s.files.len() >= s.max))
    }

    /// Mark a filesystem answer as waiting for a layer to stream in until the guard drops: a
    /// start blocked on the layer's bytes (a first node's start waits for its files to arrive,
    /// seconds apart) is not quiet, so its recording does not end after the first few files.
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    /// Is any session running (cheap; callers skip the path lookup when not)?
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    /// A file of layer `layer` (hex) was opened.
    pub fn opened(&self, layer: &str, path: &str) {
        if !self.is_active() {
            return;
        }
        let mut g = self.lock();
        for s in g.sessions.values_mut() {
            if s.files.len() < s.max
                && s.layers.contains(layer)
                && s.seen.insert((layer.to_string(), path.to_string()))
            {
                s.files.push((layer.to_string(), path.to_string()));
                s.last = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_see_their_layers_once_in_order() {
        let r = Recorder::default();
        r.opened("a", "ignored");
        let one = r.start(["a".to_string()]);
        let two = r.start(["a".to_string(), "b".to_string()]);
        for (l, p) in [("a", "x"), ("b", "y"), ("a", "x"), ("a", "z")] {
            r.opened(l, p);
        }
        let pairs = |v: Vec<(String, String)>| {
            v.into_iter()
                .map(|(l, p)| format!("{l}:{p}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(r.progress(one).map(|p| (p.0, p.2)), Some((2, false)));
        assert_eq!(pairs(r.stop(one).unwrap()), ["a:x", "a:z"]);
        assert!(r.progress(one).is_none());
        assert!(r.is_active());
        assert_eq!(pairs(r.stop(two).unwrap()), ["a:x", "b:y", "a:z"]);
        assert!(!r.is_active());
        assert!(r.stop(one).is_none());
    }

    #[test]
    fn a_session_is_not_quiet_while_an_answer_waits_for_its_layer() {
        let r = Recorder::default();
        let id = r.start(["a".to_string()]);
        r.opened("a", "x");
        let opened = r.progress(id).unwrap().1.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            let _w = r.waiting();
            std::thread::sleep(std::time::Duration::from_millis(20));
            // Waiting: the last activity is now.
            assert!(r.progress(id).unwrap().1.unwrap().elapsed() < opened.elapsed());
        }
        // The wait ended just now: the quiet time starts from there.
        let after = r.progress(id).unwrap().1.unwrap();
        assert!(after > opened + std::time::Duration::from_millis(30));
        assert_eq!(r.progress(id).unwrap().0, 1);
    }

    #[test]
    fn a_bounded_session_is_full_at_its_bound() {
        let r = Recorder::default();
        let id = r.start_bounded(["a".to_string()], 2);
        assert_eq!(
            r.progress(id).map(|p| (p.0, p.1.is_some())),
            Some((0, false))
        );
        for p in ["x", "y", "z"] {
            r.opened("a", p);
        }
        let (n, last, full) = r.progress(id).unwrap();
        assert_eq!((n, last.is_some(), full), (2, true, true));
        assert_eq!(r.stop(id).unwrap().len(), 2);
    }
}
