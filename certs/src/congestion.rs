//! The federation's congestion controller (issue 18): BBR's model — the window is what the
//! path delivered per unit of time, times its minimum RTT, times a gain — measured properly.
//!
//! quinn-proto 0.11's BBR (a port of quiche's BBRv1, marked experimental) estimates the
//! bottleneck bandwidth from pairs of consecutive events: min(rate between the last two sends,
//! rate between the last two acks). Acks arrive in bursts (one ack frame covers many packets, a
//! relay or NIC delivers them back to back), so the ack-to-ack rate of a burst is far above the
//! link's, and the max filter keeps the highest sample. Traced through `bench_transfer --wan
//! --trace-cc` (20 ms, 200 Mbit/s per site): its estimate settled at ~400 Mbit/s, twice the link,
//! its window at 2–3 MB (the path holds 0.5 MB plus a 0.5 MB queue), and 38–49 % of the
//! datagrams it offered were dropped at the bottleneck. On some connections its window also
//! stuck far below the path for a whole transfer (see [`RateWindow`]).
//!
//! [`DeliveryRate`] measures what BBR's model is defined over (draft-cheng-iccrg-delivery-rate-
//! estimation, Linux's tcp_rate.c): for each acked packet, the bytes delivered since that packet
//! was sent, over the longer of its send interval and its ack interval, and never over less than
//! the minimum RTT. A burst of acks then yields the rate at which the bytes actually left the
//! bottleneck. [`RateWindow`] sets the window from it alone.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The window as a multiple of the estimated bandwidth-delay product. BBR's cwnd gain is 2;
/// quinn paces at 1.25 × window / smoothed RTT, so the window alone sets the rate, and 2 × BDP
/// keeps the path full (and lets the estimate grow ×2 per round trip in startup) while the
/// bottleneck queue holds at most one BDP.
pub const WINDOW_GAIN: f64 = 2.0;

/// The bandwidth estimate is the largest delivery-rate sample of the last this many round trips
/// (BBR's max filter). Counted in round trips of delivered data, not in time, so an idle pause
/// between two transfers (a round's training) does not age it.
const BW_WINDOW_ROUNDS: u64 = 10;

/// Send-time snapshots kept for unacked transmits; older ones (lost, or acked out of order) are
/// dropped first. ~3 s of transmits at 10 Gbit/s in 64 KB GSO batches.
const MAX_SNAPSHOTS: usize = 1 << 16;

/// The connection's delivery state when a transmit left, to be compared when it is acked.
#[derive(Clone, Copy, Debug)]
struct SendSnapshot {
    sent: Instant,
    /// Bytes acked in all when it was sent.
    delivered: u64,
    /// When that count last grew (or the first send).
    delivered_time: Instant,
    /// The send time of the most recently sent packet acked by then.
    first_sent_time: Instant,
}

/// Delivery-rate samples and their windowed maximum, in bytes per second.
#[derive(Clone, Debug, Default)]
pub struct DeliveryRate {
    delivered: u64,
    delivered_time: Option<Instant>,
    first_sent_time: Option<Instant>,
    snapshots: VecDeque<SendSnapshot>,
    /// Round trips counted so far: one ends when a packet sent after it began is acked.
    round: u64,
    /// `delivered` when the current round trip began.
    round_start_delivered: u64,
    /// (round, rate), rates strictly decreasing from the front: the front is the window's max.
    max_filter: VecDeque<(u64, u64)>,
}

impl DeliveryRate {
    /// A transmit (one or more datagrams) left at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        if self.snapshots.back().is_some_and(|s| s.sent == now) {
            return; // the same poll: the same delivery state
        }
        if self.snapshots.len() == MAX_SNAPSHOTS {
            self.snapshots.pop_front();
        }
        self.snapshots.push_back(SendSnapshot {
            sent: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_sent_time: self.first_sent_time.unwrap_or(now),
        });
    }

    /// `bytes` of a packet sent at `sent` were acked at `now`. Returns the rate sample it gave,
    /// if any (none for a packet whose snapshot is gone, or an interval under `min_rtt`).
    pub fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        min_rtt: Duration,
    ) -> Option<u64> {
        self.delivered += bytes;
        self.delivered_time = Some(now);
        // Transmits older than this one that are still unacked were lost or are reordered:
        // either way their samples would be stale.
        while self.snapshots.front().is_some_and(|s| s.sent < sent) {
            self.snapshots.pop_front();
        }
        let snapshot = *self.snapshots.front().filter(|s| s.sent == sent)?;
        self.first_sent_time = Some(snapshot.sent);
        if snapshot.delivered >= self.round_start_delivered {
            self.round += 1;
            self.round_start_delivered = self.delivered;
        }
        let send_elapsed = snapshot.sent.saturating_duration_since(snapshot.first_sent_time);
        let ack_elapsed = now.saturating_duration_since(snapshot.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        if interval.is_zero() || interval < min_rtt {
            return None; // too short to tell a rate from a burst
        }
        let rate = ((self.delivered - snapshot.delivered) as f64 / interval.as_secs_f64()) as u64;
        // An app-limited sample only tells that the path carries at least this much.
        if !app_limited || rate > self.max() {
            self.record(rate);
        }
        Some(rate)
    }

    fn record(&mut self, rate: u64) {
        while self.max_filter.back().is_some_and(|&(_, r)| r <= rate) {
            self.max_filter.pop_back();
        }
        self.max_filter.push_back((self.round, rate));
        while self.max_filter.front().is_some_and(|&(round, _)| self.round - round >= BW_WINDOW_ROUNDS) {
            self.max_filter.pop_front();
        }
    }

    /// Drops every rate sample (the path stopped delivering: its old rate says nothing now).
    pub fn forget_estimate(&mut self) {
        self.max_filter.clear();
    }

    /// The estimated bottleneck bandwidth (bytes/s), 0 before the first sample.
    pub fn max(&self) -> u64 {
        self.max_filter.front().map_or(0, |&(_, r)| r)
    }
}

/// BBR's model without quinn's BBR state machine: the window is [`WINDOW_GAIN`] × the
/// delivery-rate estimate × the minimum RTT, never below [`INITIAL_WINDOW_PACKETS`] datagrams.
///
/// Why not quinn's BBR with a cap: traced, its window also sticks at a fraction of the path for
/// whole transfers (one site of three, on 1 of 6 quiet runs at 20 ms: 290 kB for 5 s with no
/// loss, against a 1 MB path plus queue, so that site got 0.50 of its link), a state of its
/// recovery/probing machine that the cap cannot lift. Here there is no such state: startup is
/// the gain itself (a window of twice what was delivered per round trip doubles the rate each
/// round trip until the path is full), random loss does not shrink the window (the estimate
/// counts only what arrived, so a lossy link keeps its rate, as BBR), and a path that stops
/// delivering (persistent congestion: every packet of an RTO period lost) forgets its estimate.
#[derive(Clone, Debug)]
pub struct RateWindow {
    rate: DeliveryRate,
    min_rtt: Option<Duration>,
    /// The path's datagram size: the window always holds [`MIN_WINDOW_DATAGRAMS`] of them (on
    /// loopback they grow to 64 KB, larger than the initial window).
    mtu: u16,
}

/// The window before the first round trip, and its floor: 32 datagrams of QUIC's minimum size
/// (quinn's NewReno starts at 10, its BBR at 200).
pub const INITIAL_WINDOW_PACKETS: u64 = 32;

/// The window never holds fewer full-size datagrams than this (quinn's minimum window is 2).
pub const MIN_WINDOW_DATAGRAMS: u64 = 4;

const MIN_DATAGRAM: u64 = 1_200;

impl RateWindow {
    fn new(mtu: u16) -> RateWindow {
        RateWindow { rate: DeliveryRate::default(), min_rtt: None, mtu }
    }

    /// The smallest window: the initial one, or four datagrams where they are larger.
    fn floor(&self) -> u64 {
        (INITIAL_WINDOW_PACKETS * MIN_DATAGRAM).max(MIN_WINDOW_DATAGRAMS * u64::from(self.mtu))
    }

    /// The window for an estimated bandwidth (bytes/s) and minimum RTT.
    pub fn window_for(&self, bandwidth: u64, min_rtt: Duration) -> u64 {
        let bdp = bandwidth as f64 * min_rtt.as_secs_f64();
        ((WINDOW_GAIN * bdp) as u64).max(self.floor())
    }
}

impl Controller for RateWindow {
    fn on_sent(&mut self, now: Instant, _bytes: u64, _last_packet_number: u64) {
        self.rate.on_sent(now);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.min_rtt = Some(rtt.min());
        self.rate.on_ack(now, sent, bytes, app_limited, rtt.min());
    }

    fn on_congestion_event(&mut self, _now: Instant, _sent: Instant, is_persistent_congestion: bool, _lost_bytes: u64) {
        if is_persistent_congestion {
            self.rate.forget_estimate();
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
    }

    fn window(&self) -> u64 {
        match (self.rate.max(), self.min_rtt) {
            (bandwidth, Some(min_rtt)) if bandwidth > 0 => self.window_for(bandwidth, min_rtt),
            _ => self.floor(),
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.window();
        metrics.pacing_rate = Some(self.rate.max() * 8);
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.floor()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds a [`RateWindow`] per connection.
#[derive(Debug, Default)]
pub struct RateWindowConfig;

impl ControllerFactory for RateWindowConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(RateWindow::new(current_mtu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKET: u64 = 1_200;

    /// An ack-clocked sender that keeps `window` bytes in flight through a bottleneck of `link`
    /// bytes/s with a one-way delay of `rtt / 2` each way; the receiver acks every `ack_burst`
    /// packets at once (one ack frame for several packets). Returns the estimator after
    /// `duration`.
    fn simulate(link: u64, rtt: Duration, window: u64, ack_burst: usize, duration: Duration) -> DeliveryRate {
        let start = Instant::now();
        let mut rate = DeliveryRate::default();
        let per_packet = Duration::from_secs_f64(PACKET as f64 / link as f64);
        let mut outstanding: VecDeque<(Instant, Instant)> = VecDeque::new(); // (sent, arrival)
        let mut last_arrival = start;
        let mut send = |now: Instant, rate: &mut DeliveryRate, outstanding: &mut VecDeque<(Instant, Instant)>| {
            while outstanding.len() as u64 * PACKET < window {
                rate.on_sent(now);
                last_arrival = last_arrival.max(now + rtt / 2) + per_packet;
                outstanding.push_back((now, last_arrival));
            }
        };
        send(start, &mut rate, &mut outstanding);
        loop {
            let burst: Vec<_> = outstanding.drain(..ack_burst.min(outstanding.len())).collect();
            let ack_time = burst.last().unwrap().1 + rtt / 2;
            if ack_time > start + duration {
                return rate;
            }
            for (sent, _) in burst {
                rate.on_ack(ack_time, sent, PACKET, false, rtt);
            }
            send(ack_time, &mut rate, &mut outstanding);
        }
    }

    fn within(estimate: u64, link: u64, tolerance: f64) -> bool {
        (estimate as f64 / link as f64 - 1.0).abs() <= tolerance
    }

    #[test]
    fn a_full_path_measures_the_bottleneck_rate() {
        let link = 25_000_000; // 200 Mbit/s
        let rtt = Duration::from_millis(20);
        let rate = simulate(link, rtt, 2 * 500_000, 2, Duration::from_millis(400));
        assert!(within(rate.max(), link, 0.05), "estimate {} vs link {link}", rate.max());
    }

    #[test]
    fn ack_bursts_do_not_inflate_the_estimate() {
        // 32 packets per ack frame: the ack-to-ack rate within a burst is unbounded, and a
        // consecutive-events estimator (quinn's) would take it.
        let link = 12_500_000; // 100 Mbit/s
        let rate = simulate(link, Duration::from_millis(80), 2 * 1_000_000, 32, Duration::from_secs(1));
        assert!(within(rate.max(), link, 0.05), "estimate {} vs link {link}", rate.max());
    }

    #[test]
    fn a_window_below_the_path_measures_what_it_sends() {
        // Half a BDP in flight delivers half the link per round trip.
        let link = 25_000_000;
        let rtt = Duration::from_millis(20);
        let rate = simulate(link, rtt, 250_000, 2, Duration::from_millis(400));
        assert!(within(rate.max(), 12_500_000, 0.1), "estimate {}", rate.max());
    }

    #[test]
    fn app_limited_samples_only_raise_the_estimate() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        let mut rate = DeliveryRate::default();
        // 100 kB over 10 ms, not app-limited: 10 MB/s.
        rate.on_sent(t0);
        rate.on_ack(t0 + rtt, t0, 100_000, false, rtt);
        assert_eq!(rate.max(), 10_000_000);
        // An app-limited trickle below it leaves the estimate alone.
        let t1 = t0 + Duration::from_millis(20);
        rate.on_sent(t1);
        rate.on_ack(t1 + rtt, t1, 1_000, true, rtt);
        assert_eq!(rate.max(), 10_000_000);
    }

    /// One ack per transmit, each transmit sent after the previous ack: every ack ends a round.
    fn one_round(rate: &mut DeliveryRate, at: Instant, bytes: u64, rtt: Duration) {
        rate.on_sent(at);
        rate.on_ack(at + rtt, at, bytes, false, rtt);
    }

    #[test]
    fn the_estimate_forgets_samples_older_than_ten_round_trips_and_not_idle_time() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(20);
        let mut rate = DeliveryRate::default();
        one_round(&mut rate, t0, 200_000, rtt); // 10 MB/s
                                                // Ten seconds idle, then a slower path: the old maximum holds for nine more round trips.
        let mut t = t0 + Duration::from_secs(10);
        for _ in 0..(BW_WINDOW_ROUNDS - 1) {
            one_round(&mut rate, t, 20_000, rtt);
            t += rtt * 2;
        }
        assert_eq!(rate.max(), 10_000_000);
        one_round(&mut rate, t, 20_000, rtt);
        // 20 kB per transmit, one transmit every 40 ms.
        assert_eq!(rate.max(), 500_000);
    }

    #[test]
    fn lost_transmits_give_no_sample_and_are_dropped() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        let mut rate = DeliveryRate::default();
        for i in 0..5 {
            rate.on_sent(t0 + Duration::from_millis(i));
        }
        // The first four were lost: the fifth's ack drops their snapshots.
        let sample = rate.on_ack(t0 + Duration::from_millis(30), t0 + Duration::from_millis(4), 1_200, false, rtt);
        assert!(sample.is_some());
        assert_eq!(rate.snapshots.len(), 1);
        // An ack of a transmit whose snapshot is gone gives nothing.
        assert_eq!(rate.on_ack(t0 + Duration::from_millis(31), t0, 1_200, false, rtt), None);
    }

    #[test]
    fn the_window_is_twice_the_estimated_path_and_never_below_the_initial_window() {
        let rtt = Duration::from_millis(20);
        let mut controller = RateWindow::new(1_200);
        // 200 Mbit/s × 20 ms = 500 kB in flight fills the path: the window is twice that.
        assert_eq!(controller.window_for(25_000_000, rtt), 1_000_000);
        assert_eq!(controller.window_for(1_000, rtt), INITIAL_WINDOW_PACKETS * MIN_DATAGRAM);
        // Loopback's 64 KB datagrams: four of them fit whatever the estimate.
        controller.on_mtu_update(65_527);
        assert_eq!(controller.window(), 4 * 65_527);
        assert_eq!(controller.window_for(1_000, Duration::from_micros(50)), 4 * 65_527);
    }

    #[test]
    fn the_controller_opens_to_the_path_and_forgets_it_after_persistent_congestion() {
        let mut controller = RateWindow::new(1_200);
        controller.min_rtt = Some(Duration::from_millis(80));
        assert_eq!(controller.window(), INITIAL_WINDOW_PACKETS * MIN_DATAGRAM);
        controller.rate = simulate(12_500_000, Duration::from_millis(80), 2_000_000, 8, Duration::from_secs(1));
        let window = controller.window() as f64;
        assert!((window / 2_000_000.0 - 1.0).abs() < 0.05, "window {window}");
        let t = Instant::now();
        controller.on_congestion_event(t, t, false, 100_000);
        assert_eq!(controller.window() as f64, window, "random loss does not shrink the window");
        controller.on_congestion_event(t, t, true, 100_000);
        assert_eq!(controller.window(), INITIAL_WINDOW_PACKETS * MIN_DATAGRAM);
    }
}
