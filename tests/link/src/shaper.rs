//! One direction of an emulated link, as a pure function of arrival times: what happens to each
//! datagram (delivered when, or dropped why). No sockets or clocks here, so the emulation itself
//! is tested exactly and deterministically; [`crate::Relay`] feeds it real datagrams.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The largest UDP payload of a 1500-byte Ethernet MTU over IPv4 (1500 − 20 − 8): what crosses
/// the Internet. Larger datagrams are dropped, as a router would, so that QUIC's path-MTU
/// discovery finds a WAN's datagram size and not loopback's 64 KiB.
pub const WAN_MTU: usize = 1472;

/// A window during which everything sent in that direction is dropped (a cable pulled, a
/// firewall state expired). Times are from the relay's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub start: Duration,
    /// `None`: the link never comes back.
    pub len: Option<Duration>,
}

impl Cut {
    fn covers(&self, t: Duration) -> bool {
        t >= self.start && self.len.is_none_or(|len| t < self.start + len)
    }
}

/// One direction of a link.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Each datagram's delay varies uniformly in `delay ± jitter` (never below zero). The link
    /// stays FIFO: a datagram is never delivered before the one sent ahead of it, as on a
    /// single path (netem's jitter reorders, which real paths rarely do at this scale).
    pub jitter: Duration,
    /// Probability that a datagram is lost on the wire (after it used its share of the link).
    pub loss: f64,
    /// Bottleneck rate in bits per second (UDP payload bits); `None`: unlimited.
    pub rate_bps: Option<u64>,
    /// Drop-tail queue ahead of the bottleneck, in bytes: a datagram that would find more than
    /// this many bytes waiting is dropped. Only meaningful with `rate_bps`.
    pub queue_bytes: usize,
    /// Largest datagram carried (larger ones are dropped).
    pub mtu: usize,
    /// Scheduled cuts.
    pub cuts: Vec<Cut>,
}

impl LinkSpec {
    /// A perfect link: no delay, loss or rate limit, any datagram size.
    pub fn ideal() -> LinkSpec {
        LinkSpec {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_bytes: usize::MAX,
            mtu: usize::MAX,
            cuts: Vec::new(),
        }
    }

    /// One direction of a symmetric WAN path of round-trip time `rtt`, random loss `loss` and
    /// bottleneck `mbit_s`, with a WAN MTU and a drop-tail queue of one bandwidth-delay product
    /// (the classic router buffer sizing; at least 32 datagrams so slow links still absorb a burst).
    pub fn wan(rtt: Duration, loss: f64, mbit_s: f64) -> LinkSpec {
        let rate_bps = (mbit_s * 1e6) as u64;
        let bdp = (rate_bps as f64 / 8.0 * rtt.as_secs_f64()) as usize;
        LinkSpec {
            delay: rtt / 2,
            loss,
            rate_bps: Some(rate_bps),
            queue_bytes: bdp.max(32 * WAN_MTU),
            mtu: WAN_MTU,
            ..LinkSpec::ideal()
        }
    }

    /// Seconds the bottleneck takes to serialize `len` bytes (zero without a rate limit).
    fn serialization(&self, len: usize) -> Duration {
        self.rate_bps.map_or(Duration::ZERO, |r| Duration::from_secs_f64(len as f64 * 8.0 / r as f64))
    }
}

/// Why a datagram did not arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    Mtu,
    Cut,
    Queue,
    Loss,
}

/// What happened to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    DeliverAt(Instant),
    Dropped(Drop),
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    pub datagrams: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    pub dropped_mtu: u64,
    pub dropped_cut: u64,
    pub dropped_queue: u64,
    pub dropped_loss: u64,
}

/// The state of one direction: when the bottleneck is next free, the last delivery time (to
/// keep FIFO order) and the seeded random source of loss and jitter.
pub struct Shaper {
    spec: LinkSpec,
    start: Instant,
    rng: ChaCha8Rng,
    busy_until: Instant,
    last_delivery: Instant,
    extra_cuts: Vec<Cut>,
    stats: DirectionStats,
}

impl Shaper {
    pub fn new(spec: LinkSpec, seed: u64, start: Instant) -> Shaper {
        Shaper {
            spec,
            start,
            rng: ChaCha8Rng::seed_from_u64(seed),
            busy_until: start,
            last_delivery: start,
            extra_cuts: Vec::new(),
            stats: DirectionStats::default(),
        }
    }

    /// Adds a cut at run time (e.g. "cut now for 10 s", when a test sees a transfer at 90 %).
    pub fn add_cut(&mut self, cut: Cut) {
        self.extra_cuts.push(cut);
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn stats(&self) -> DirectionStats {
        self.stats
    }

    /// The fate of a `len`-byte datagram arriving at `now` (times must not go backwards).
    pub fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        self.stats.datagrams += 1;
        let verdict = self.fate(now, len);
        match verdict {
            Verdict::DeliverAt(_) => {
                self.stats.delivered += 1;
                self.stats.delivered_bytes += len as u64;
            }
            Verdict::Dropped(Drop::Mtu) => self.stats.dropped_mtu += 1,
            Verdict::Dropped(Drop::Cut) => self.stats.dropped_cut += 1,
            Verdict::Dropped(Drop::Queue) => self.stats.dropped_queue += 1,
            Verdict::Dropped(Drop::Loss) => self.stats.dropped_loss += 1,
        }
        verdict
    }

    fn fate(&mut self, now: Instant, len: usize) -> Verdict {
        if len > self.spec.mtu {
            return Verdict::Dropped(Drop::Mtu);
        }
        let t = now.saturating_duration_since(self.start);
        if self.spec.cuts.iter().chain(&self.extra_cuts).any(|c| c.covers(t)) {
            return Verdict::Dropped(Drop::Cut);
        }
        // Both random draws happen for every datagram that reaches the queue, whatever the
        // outcome, so the drop pattern depends only on the seed and the datagram's index.
        let lost = self.rng.gen_bool(self.spec.loss.clamp(0.0, 1.0));
        let jitter_frac = self.rng.gen_range(-1.0..=1.0);
        let Some(departure) = self.enqueue(now, len) else {
            return Verdict::Dropped(Drop::Queue);
        };
        if lost {
            return Verdict::Dropped(Drop::Loss);
        }
        let delay = self.spec.delay.as_secs_f64() + self.spec.jitter.as_secs_f64() * jitter_frac;
        let at = (departure + Duration::from_secs_f64(delay.max(0.0))).max(self.last_delivery);
        self.last_delivery = at;
        Verdict::DeliverAt(at)
    }

    /// Puts the datagram in the bottleneck's drop-tail queue: the instant its last bit leaves,
    /// or `None` (a queue drop) if the bytes already waiting leave no room for it.
    fn enqueue(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let Some(rate) = self.spec.rate_bps else { return Some(now) };
        let backlog_s = self.busy_until.saturating_duration_since(now).as_secs_f64();
        let queued = (backlog_s * rate as f64 / 8.0) as usize;
        if queued + len > self.spec.queue_bytes {
            return None;
        }
        self.busy_until = self.busy_until.max(now) + self.spec.serialization(len);
        Some(self.busy_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Delivery instants (or drops) of `n` datagrams of `len` bytes arriving every `gap`.
    fn run(shaper: &mut Shaper, n: usize, len: usize, gap: Duration) -> Vec<Verdict> {
        let t0 = shaper.start();
        (0..n).map(|i| shaper.admit(t0 + gap * i as u32, len)).collect()
    }

    #[test]
    fn delay_and_jitter_stay_within_bounds_and_fifo() {
        let spec = LinkSpec { delay: ms(40), jitter: ms(5), ..LinkSpec::ideal() };
        let mut s = Shaper::new(spec, 1, Instant::now());
        let t0 = s.start();
        let verdicts = run(&mut s, 2000, 1200, ms(1));
        let mut last = t0;
        for (i, v) in verdicts.iter().enumerate() {
            let Verdict::DeliverAt(at) = *v else { panic!("datagram {i} dropped: {v:?}") };
            let sent = t0 + ms(i as u64);
            let delay = at - sent;
            // FIFO may hold a datagram back behind its predecessor, by at most 2 × jitter.
            assert!(delay >= ms(35) && delay <= ms(45) + ms(10), "datagram {i}: {delay:?}");
            assert!(at >= last, "reordered at {i}");
            last = at;
        }
        let no_jitter = LinkSpec { delay: ms(40), ..LinkSpec::ideal() };
        let mut s = Shaper::new(no_jitter, 1, t0);
        assert_eq!(s.admit(t0 + ms(3), 100), Verdict::DeliverAt(t0 + ms(43)));
    }

    #[test]
    fn loss_rate_is_within_binomial_bounds() {
        for (seed, p) in [(1, 0.005), (2, 0.02), (3, 0.2)] {
            let n = 100_000;
            let spec = LinkSpec { loss: p, ..LinkSpec::ideal() };
            let mut s = Shaper::new(spec, seed, Instant::now());
            run(&mut s, n, 1200, Duration::from_micros(10));
            let lost = s.stats().dropped_loss as f64;
            let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
            // 5 standard deviations: a false failure has probability < 1e-6.
            assert!(
                (lost - mean).abs() < 5.0 * sd,
                "seed {seed}, p {p}: {lost} lost of {n}, expected {mean} ± {sd:.1}"
            );
            assert_eq!(s.stats().delivered + s.stats().dropped_loss, n as u64);
        }
    }

    #[test]
    fn rate_cap_serializes_a_burst_and_the_queue_drops_its_tail() {
        // 1000 datagrams of 1250 bytes at once into 100 Mbit/s: the last leaves after 100 ms.
        let spec = LinkSpec { delay: ms(10), rate_bps: Some(100_000_000), ..LinkSpec::ideal() };
        let mut s = Shaper::new(spec.clone(), 1, Instant::now());
        let t0 = s.start();
        let verdicts = run(&mut s, 1000, 1250, Duration::ZERO);
        let Some(Verdict::DeliverAt(last)) = verdicts.last().copied() else { panic!("{:?}", verdicts.last()) };
        let took = (last - t0).as_secs_f64();
        assert!((took - 0.110).abs() < 1e-6, "{took}");

        // A 10-datagram queue: a burst of 100 keeps the first 10 and drops the rest.
        let mut s = Shaper::new(LinkSpec { queue_bytes: 12_500, ..spec.clone() }, 1, t0);
        run(&mut s, 100, 1250, Duration::ZERO);
        assert_eq!((s.stats().delivered, s.stats().dropped_queue), (10, 90));

        // Arrivals paced at the link rate never queue up.
        let mut s = Shaper::new(LinkSpec { queue_bytes: 2_500, ..spec }, 1, t0);
        run(&mut s, 1000, 1250, Duration::from_micros(100));
        assert_eq!(s.stats().dropped_queue, 0);
    }

    #[test]
    fn cuts_drop_everything_inside_their_window() {
        let cuts = vec![Cut { start: ms(1000), len: Some(ms(2000)) }, Cut { start: ms(5000), len: None }];
        let mut s = Shaper::new(LinkSpec { cuts, ..LinkSpec::ideal() }, 1, Instant::now());
        let verdicts = run(&mut s, 8000, 100, ms(1));
        for (i, v) in verdicts.iter().enumerate() {
            let cut = (1000..3000).contains(&i) || i >= 5000;
            assert_eq!(*v == Verdict::Dropped(Drop::Cut), cut, "datagram at {i} ms: {v:?}");
        }
        // A cut added at run time, and the MTU.
        let mut s = Shaper::new(LinkSpec { mtu: WAN_MTU, ..LinkSpec::ideal() }, 1, Instant::now());
        s.add_cut(Cut { start: ms(10), len: Some(ms(5)) });
        let t0 = s.start();
        assert_eq!(s.admit(t0 + ms(12), 100), Verdict::Dropped(Drop::Cut));
        assert_eq!(s.admit(t0 + ms(16), WAN_MTU + 1), Verdict::Dropped(Drop::Mtu));
        assert!(matches!(s.admit(t0 + ms(16), WAN_MTU), Verdict::DeliverAt(_)));
    }

    #[test]
    fn same_seed_same_drops_and_delays() {
        let spec = LinkSpec { loss: 0.1, jitter: ms(3), delay: ms(20), ..LinkSpec::ideal() };
        let t0 = Instant::now();
        let pattern = |seed| run(&mut Shaper::new(spec.clone(), seed, t0), 5000, 1200, ms(1));
        assert_eq!(pattern(42), pattern(42));
        assert_ne!(pattern(42), pattern(43));
    }
}
