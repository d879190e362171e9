//! Who gets the node's link to its registries: on-demand reads first, the background filler
//! when they leave it idle.
//!
//! A real access link has one queue. A bulk download keeps it full, so every short request of a
//! starting container waits behind it and gets a fraction of the bandwidth: with the filler
//! downloading at full speed, a container's start took 1.4 to 1.6 times as long through a
//! 100 Mbit/s bottleneck. So the filler fetches in bounded range requests, asks for its turn
//! before each one, and gives the link up at once when a foreground request (an on-demand read,
//! the prefetch of the files a start needs, a TOC a mount waits for) begins: its running request
//! is aborted, the bytes it already received are kept, and it resumes where it stopped once no
//! foreground request has run for `yield_for`. Alone on the link it takes the whole link back.
//!
//! [`FillPolicy`] is the decision, a pure function of the link's state; [`Link`] is the shared
//! state the reader and the filler report to and wait on.

use std::sync::Arc;
use std::time::Duration;
// tokio's clock: the same as std's, except that tests can pause it.
use tokio::sync::watch;
use tokio::time::Instant;

/// Why bytes of a blob are requested. The class decides who has the link (a request of a
/// class that [`Class::holds_link`] keeps the filler off it while it runs) and which counters
/// its bytes go to (`lazypull_link_*{class}`, and the catalogue's on-demand / prefetch / fill
/// bytes per layer).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Class {
    /// A read some process waits for, with the chunks fetched beside it by the same request
    /// (the file's read-ahead, the following files' neighbours).
    OnDemand,
    /// A guess made after a miss, in its own requests: a directory's other files
    /// (`siblings.rs`), an executable's interpreter and libraries (`elf.rs`).
    Neighbour,
    /// Start-up prefetch: the files before a TOC's landmark, a learned list's files, the
    /// ranges fetched ahead of a layer's TOC.
    Prefetch,
    /// What a mount waits for once: a layer's footer and TOC, a checkpoint window of a
    /// shared gzip index.
    Metadata,
    /// A reader walking the layer in blob order (`tar -c`, a checksum of everything): it
    /// wants bandwidth, not latency, and shares the link with the filler, which fetches in
    /// the same order.
    Scan,
    /// The background filler: whatever is left, when the link is free.
    Fill,
    /// The pull-through registry fetching for a client or a peer node that waits for it (a
    /// blob the store lacks, or a range of one).
    Relay,
}

impl prometheus_client::encoding::EncodeLabelValue for Class {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.name())
    }
}

impl Class {
    /// The class's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Class::OnDemand => "on_demand",
            Class::Neighbour => "neighbour",
            Class::Prefetch => "prefetch",
            Class::Metadata => "metadata",
            Class::Scan => "scan",
            Class::Fill => "fill",
            Class::Relay => "relay",
        }
    }

    /// Whether the filler stays off the link while such a request runs.
    pub fn holds_link(self) -> bool {
        !matches!(self, Class::Scan | Class::Fill)
    }

    /// Whether the filler also waits `yield_for` after such a request ends: a start's reads
    /// come in bursts with short pauses between them; a TOC or a relayed blob is fetched once.
    pub fn quiet_after(self) -> bool {
        matches!(self, Class::OnDemand | Class::Neighbour | Class::Prefetch)
    }

    /// The catalogue's account of a layer's bytes fetched in this class (a relay's bytes are
    /// not this node's layers': they are never counted per layer).
    pub fn fetched_by(self) -> crate::store::FetchedBy {
        use crate::store::FetchedBy;
        match self {
            Class::OnDemand | Class::Scan | Class::Metadata | Class::Relay => FetchedBy::OnDemand,
            Class::Neighbour | Class::Prefetch => FetchedBy::Prefetch,
            Class::Fill => FetchedBy::Fill,
        }
    }

    pub const ALL: [Class; 7] = [
        Class::OnDemand,
        Class::Neighbour,
        Class::Prefetch,
        Class::Metadata,
        Class::Scan,
        Class::Fill,
        Class::Relay,
    ];
}

/// The filler's manners (config `fetch.fill`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FillPolicy {
    /// Longest single fill request in bytes; the filler asks for its turn again after each.
    pub request_bytes: u64,
    /// How long the link must have carried no foreground request before the filler starts or
    /// resumes (a starting container reads in bursts with short pauses between them).
    pub yield_for: Duration,
}

impl Default for FillPolicy {
    fn default() -> Self {
        FillPolicy {
            request_bytes: 32 << 20,
            yield_for: Duration::from_millis(500),
        }
    }
}

/// What the filler may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Fetch (one request of at most `request_bytes`).
    Go,
    /// Foreground requests are running: wait until they end.
    Busy,
    /// The link has been free of foreground requests only briefly: wait until then.
    Until(Instant),
}

/// The link as the policy sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Foreground requests running now.
    pub active: usize,
    /// Foreground requests begun so far (a fill request compares it to notice a new one).
    pub begun: u64,
    /// When the last foreground request ended.
    pub last_end: Option<Instant>,
}

impl FillPolicy {
    pub fn turn(&self, now: Instant, s: &LinkState) -> Turn {
        if s.active > 0 {
            return Turn::Busy;
        }
        match s.last_end {
            Some(t) if now < t + self.yield_for => Turn::Until(t + self.yield_for),
            _ => Turn::Go,
        }
    }

    /// Whether a fill request begun when `begun` foreground requests had begun must stop now.
    pub fn preempts(&self, begun_at_start: u64, s: &LinkState) -> bool {
        s.begun > begun_at_start
    }
}

/// Counters of the link, exported as metrics.
#[derive(Default)]
pub struct LinkStats {
    pub foreground_requests: prometheus_client::metrics::counter::Counter,
    /// Fill requests aborted because a foreground request began.
    pub fill_preemptions: prometheus_client::metrics::counter::Counter,
    /// Seconds fill requests waited for their turn.
    pub fill_wait_seconds:
        prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>,
}

/// The node's link, shared by the reader (foreground) and the filler.
pub struct Link {
    policy: FillPolicy,
    state: watch::Sender<LinkState>,
    pub stats: LinkStats,
}

/// A foreground request in progress: the filler stays off the link until it is dropped (and,
/// unless it is a one-off, for `yield_for` after).
pub struct Foreground {
    link: Arc<Link>,
    quiet_after: bool,
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let now = Instant::now();
        let quiet_after = self.quiet_after;
        self.link.state.send_modify(|s| {
            s.active = s.active.saturating_sub(1);
            if quiet_after {
                s.last_end = Some(now);
            }
        });
    }
}

impl Link {
    pub fn new(policy: FillPolicy) -> Arc<Self> {
        Arc::new(Link {
            policy,
            state: watch::Sender::new(LinkState::default()),
            stats: LinkStats::default(),
        })
    }

    pub fn policy(&self) -> FillPolicy {
        self.policy
    }

    /// A request of `class` begins: the guard, while it lives, keeps the filler off the link
    /// when the class [`Class::holds_link`].
    pub fn enter(self: &Arc<Self>, class: Class) -> Option<Foreground> {
        class.holds_link().then(|| self.begin(class.quiet_after()))
    }

    /// Mark a foreground request (a read of a running container) as running until the guard
    /// is dropped; the filler then waits `yield_for`, since more such reads usually follow.
    pub fn foreground(self: &Arc<Self>) -> Foreground {
        self.begin(true)
    }

    /// A one-off foreground request (a layer's TOC, fetched at pull time): the filler waits
    /// for it but not after it.
    pub fn one_off(self: &Arc<Self>) -> Foreground {
        self.begin(false)
    }

    fn begin(self: &Arc<Self>, quiet_after: bool) -> Foreground {
        self.stats.foreground_requests.inc();
        self.state.send_modify(|s| {
            s.active += 1;
            s.begun += 1;
        });
        Foreground {
            link: Arc::clone(self),
            quiet_after,
        }
    }

    /// A start is expected now (an image was just pulled to be read lazily): the filler waits
    /// `yield_for` from now, as after a read, so that its first bulk request is not on the
    /// link when the start's first requests come (it is preempted then, but what it already
    /// had in flight still fills the bottleneck's queue ahead of them).
    pub fn hold_off(&self) {
        let now = Instant::now();
        self.state.send_modify(|s| {
            s.last_end = Some(s.last_end.map_or(now, |t| t.max(now)));
        });
    }

    /// Foreground requests begun so far (pass it to [`Link::preempted`]).
    pub fn begun(&self) -> u64 {
        self.state.borrow().begun
    }

    /// Wait until the policy lets the filler send a request.
    pub async fn fill_turn(&self) {
        let mut rx = self.state.subscribe();
        let started = Instant::now();
        loop {
            let turn = self.policy.turn(Instant::now(), &rx.borrow_and_update());
            match turn {
                Turn::Go => break,
                Turn::Busy => {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                Turn::Until(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        r = rx.changed() => if r.is_err() { break },
                    }
                }
            }
        }
        let waited = started.elapsed().as_secs_f64();
        if waited > 0.0 {
            self.stats.fill_wait_seconds.inc_by(waited);
        }
    }

    /// Resolves when a foreground request begins after `begun` had begun.
    pub async fn preempted(&self, begun: u64) {
        let mut rx = self.state.subscribe();
        let policy = self.policy;
        if rx.wait_for(|s| policy.preempts(begun, s)).await.is_err() {
            // The link is gone (never: `self` holds the sender); never preempt then.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FillPolicy {
        FillPolicy {
            request_bytes: 1 << 20,
            yield_for: Duration::from_millis(500),
        }
    }

    #[test]
    fn the_filler_goes_only_on_a_quiet_link() {
        let p = policy();
        let t0 = Instant::now();
        let idle = LinkState::default();
        assert_eq!(
            p.turn(t0, &idle),
            Turn::Go,
            "nothing ever ran: fill at once"
        );
        let busy = LinkState {
            active: 2,
            begun: 2,
            last_end: None,
        };
        assert_eq!(p.turn(t0, &busy), Turn::Busy);
        let just_ended = LinkState {
            active: 0,
            begun: 2,
            last_end: Some(t0),
        };
        assert_eq!(
            p.turn(t0 + Duration::from_millis(100), &just_ended),
            Turn::Until(t0 + Duration::from_millis(500)),
            "a start reads in bursts: wait out the pause"
        );
        assert_eq!(
            p.turn(t0 + Duration::from_millis(500), &just_ended),
            Turn::Go
        );
        // A request still running counts even if an earlier one ended long ago.
        let mixed = LinkState {
            active: 1,
            begun: 3,
            last_end: Some(t0),
        };
        assert_eq!(p.turn(t0 + Duration::from_secs(9), &mixed), Turn::Busy);
    }

    #[test]
    fn a_new_foreground_request_preempts_a_running_fill() {
        let p = policy();
        let s = LinkState {
            active: 0,
            begun: 5,
            last_end: None,
        };
        assert!(!p.preempts(5, &s));
        assert!(
            p.preempts(4, &s),
            "one began since the fill request started"
        );
    }

    #[test]
    fn what_each_class_does_with_the_link_and_where_its_bytes_count() {
        use crate::store::FetchedBy;
        let table: Vec<_> = Class::ALL
            .iter()
            .map(|c| (c.name(), c.holds_link(), c.quiet_after(), c.fetched_by()))
            .collect();
        assert_eq!(
            table,
            [
                ("on_demand", true, true, FetchedBy::OnDemand),
                ("neighbour", true, true, FetchedBy::Prefetch),
                ("prefetch", true, true, FetchedBy::Prefetch),
                ("metadata", true, false, FetchedBy::OnDemand),
                ("scan", false, false, FetchedBy::OnDemand),
                ("fill", false, false, FetchedBy::Fill),
                ("relay", true, false, FetchedBy::OnDemand),
            ]
        );
    }

    /// How long a fill request waits for its turn, from now.
    fn spawn_fill_turn(link: &Arc<Link>) -> tokio::task::JoinHandle<Duration> {
        let link = Arc::clone(link);
        tokio::spawn(async move {
            let t = Instant::now();
            link.fill_turn().await;
            t.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn fill_turn_waits_for_foreground_and_quiet() {
        let link = Link::new(policy());
        // Idle: at once.
        tokio::time::timeout(Duration::from_millis(1), link.fill_turn())
            .await
            .expect("an idle link is the filler's");
        let fg = link.foreground();
        let begun = link.begun() - 1;
        // The fill request that started before `fg` is preempted.
        tokio::time::timeout(Duration::from_millis(1), link.preempted(begun))
            .await
            .expect("preempted");
        let waiter = spawn_fill_turn(&link);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !waiter.is_finished(),
            "busy while the foreground request runs"
        );
        drop(fg);
        let waited = waiter.await.unwrap();
        assert!(
            waited >= Duration::from_millis(3500) && waited < Duration::from_millis(3600),
            "{waited:?}: 3 s busy, then the quiet period"
        );
        assert_eq!(link.stats.foreground_requests.get(), 1);
        // A one-off (a TOC at pull time) holds the filler while it runs, not after.
        let toc = link.one_off();
        let waiter = spawn_fill_turn(&link);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        drop(toc);
        assert!(waiter.await.unwrap() < Duration::from_millis(1100));
        // After a pull for a lazy start, the filler waits the quiet period.
        tokio::time::sleep(Duration::from_secs(5)).await;
        link.hold_off();
        let waiter = spawn_fill_turn(&link);
        assert!(waiter.await.unwrap() >= Duration::from_millis(500));
        // Nothing new began: a fill request is not preempted.
        let b = link.begun();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), link.preempted(b))
                .await
                .is_err()
        );
    }
}
