//! `bench_transfer --trace-cc`: the coordinator side's congestion controller wrapped so that each
//! connection's window, pacing rate, app-limited acks and losses are sampled every 100 ms and
//! printed after the run (for the first-site slow-download fault of issue 18).

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub t_ms: u64,
    pub window: u64,
    pub pacing_bps: Option<u64>,
    pub acked: u64,
    pub acked_app_limited: u64,
    pub lost: u64,
    pub min_rtt_ms: f64,
    pub srtt_ms: f64,
}

#[derive(Default)]
pub struct Trace {
    pub samples: Vec<Sample>,
    pending: Sample,
    last: Option<Instant>,
}

pub struct Traced {
    inner: Box<dyn Controller>,
    trace: Arc<Mutex<Trace>>,
    start: Instant,
}

impl Controller for Traced {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number)
    }
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        let mut t = self.trace.lock().unwrap();
        t.pending.acked += bytes;
        if app_limited {
            t.pending.acked_app_limited += bytes;
        }
        t.pending.min_rtt_ms = rtt.min().as_secs_f64() * 1e3;
        t.pending.srtt_ms = rtt.get().as_secs_f64() * 1e3;
        drop(t);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }
    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest);
        let mut t = self.trace.lock().unwrap();
        if t.last.is_none_or(|l| now.duration_since(l) >= Duration::from_millis(100)) {
            let metrics: ControllerMetrics = self.inner.metrics();
            let mut sample = std::mem::take(&mut t.pending);
            sample.t_ms = now.duration_since(self.start).as_millis() as u64;
            sample.window = metrics.congestion_window;
            sample.pacing_bps = metrics.pacing_rate;
            t.samples.push(sample);
            t.last = Some(now);
        }
    }
    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        self.trace.lock().unwrap().pending.lost += lost_bytes;
        self.inner.on_congestion_event(now, sent, persistent, lost_bytes)
    }
    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu)
    }
    fn window(&self) -> u64 {
        self.inner.window()
    }
    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }
    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Traced { inner: self.inner.clone_box(), trace: self.trace.clone(), start: self.start })
    }
    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Wraps `inner`'s controllers; keeps every connection's trace in build order.
pub struct TracedFactory {
    pub inner: Arc<dyn ControllerFactory + Send + Sync>,
    pub traces: Mutex<Vec<Arc<Mutex<Trace>>>>,
    pub start: Instant,
}

impl ControllerFactory for TracedFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let trace = Arc::new(Mutex::new(Trace::default()));
        self.traces.lock().unwrap().push(trace.clone());
        Box::new(Traced { inner: self.inner.clone().build(now, current_mtu), trace, start: self.start })
    }
}

/// One line per 100 ms sample of each traced connection.
pub fn print(factory: &TracedFactory) {
    for (i, trace) in factory.traces.lock().unwrap().iter().enumerate() {
        for s in &trace.lock().unwrap().samples {
            eprintln!(
                "cc conn{i} t={}ms window={} pacing_Mbit={:?} acked={} app_limited={} lost={} min_rtt={:.1} srtt={:.1}",
                s.t_ms,
                s.window,
                s.pacing_bps.map(|b| b / 1_000_000),
                s.acked,
                s.acked_app_limited,
                s.lost,
                s.min_rtt_ms,
                s.srtt_ms
            );
        }
    }
}
