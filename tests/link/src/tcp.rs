//! A TCP relay on loopback with, per direction, one-way delay (and jitter, kept in order), a
//! bandwidth cap and scheduled cuts, for the TLS-over-TCP fallback transport.
//!
//! What a byte-stream relay cannot emulate: **packet loss**. The relay terminates TCP on both
//! sides (client ↔ relay, relay ↔ server), so every segment lost would be retransmitted below
//! it by the kernel; there are no packets here to drop, only bytes to delay. A lossy link's
//! effect on TCP (its congestion window halving on every loss) is therefore not reproduced, and
//! neither is the endpoints' own congestion control over the emulated round trip: each TCP
//! connection runs over loopback, and the relay's byte queue (at most [`LinkSpec::queue_bytes`],
//! at least 256 KiB, then it stops reading and TCP's flow control holds the sender back) sets
//! the pace at the bottleneck rate. Delay, rate and cuts are reproduced: every chunk the relay
//! reads leaves the bottleneck after the ones ahead of it at the link rate, arrives one delay
//! later, and waits for the end of a cut that covers its departure (a cut holds bytes, it cannot
//! drop them: TCP would resend them once the link is back; a cut without end holds them for
//! good, and the connection goes silent, as behind a dead link). [`TcpRelay::reset`] breaks
//! the connections relayed now, as a middlebox that drops its state (a NAT or firewall reboot):
//! both ends see their connection end, and new ones are relayed as before.
//!
//! Deterministic per seed: the jitter of each chunk is drawn from a seeded ChaCha8 per
//! direction and connection; chunk boundaries come from the sockets, so exact times are not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::LinkSpec;

/// Largest chunk read at once.
const CHUNK: usize = 64 << 10;
/// Smallest relay buffer per direction.
const MIN_QUEUE: usize = 256 << 10;

/// Bytes delivered so far, per direction, over all connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpLinkStats {
    pub up_bytes: u64,
    pub down_bytes: u64,
}

/// A TCP relay: clients connect to [`TcpRelay::addr`], each connection is relayed to `server`
/// through the `up` (client → server) and `down` (server → client) links.
pub struct TcpRelay {
    addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    /// Bumped by [`TcpRelay::reset`]: every connection relayed before is dropped.
    resets: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl TcpRelay {
    /// Starts the relay (inside a tokio runtime). Refuses a link with loss (see the module docs).
    pub async fn start(server: SocketAddr, up: LinkSpec, down: LinkSpec, seed: u64) -> std::io::Result<TcpRelay> {
        for spec in [&up, &down] {
            if spec.loss > 0.0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a TCP relay cannot emulate packet loss (the kernel retransmits below it)",
                ));
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up_bytes, down_bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up_bytes.clone(), down_bytes.clone());
        let start = Instant::now();
        let (resets, _) = watch::channel(0);
        let reset = resets.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(server).await else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                // Each connection and direction its own stream of draws.
                let base = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(n * 2);
                let (ru, rd) = (reset.subscribe(), reset.subscribe());
                tokio::spawn(until_reset(ru, pump(cr, sw, up.clone(), base, start, u.clone())));
                tokio::spawn(until_reset(rd, pump(sr, cw, down.clone(), base + 1, start, d.clone())));
                n += 1;
            }
        });
        Ok(TcpRelay { addr, up: up_bytes, down: down_bytes, resets, task })
    }

    /// Breaks every connection relayed now (both sockets of each are closed, with whatever the
    /// relay held for them); later connections are relayed as before.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> TcpLinkStats {
        TcpLinkStats { up_bytes: self.up.load(Ordering::Relaxed), down_bytes: self.down.load(Ordering::Relaxed) }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When a chunk of `len` bytes read at `now` is delivered (`None`: never, a cut without end),
/// given when the bottleneck is free and the last delivery (the link stays in order).
struct Schedule {
    spec: LinkSpec,
    start: Instant,
    rng: ChaCha8Rng,
    free: Instant,
    last: Instant,
}

impl Schedule {
    fn deliver_at(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let serialization =
            self.spec.rate_bps.map_or(Duration::ZERO, |r| Duration::from_secs_f64(len as f64 * 8.0 / r as f64));
        let mut depart = now.max(self.free);
        // A cut covering the departure holds the chunk until the link is back.
        while let Some(cut) = self.spec.cuts.iter().find(|c| {
            let t = depart.saturating_duration_since(self.start);
            t >= c.start && c.len.is_none_or(|l| t < c.start + l)
        }) {
            depart = self.start + cut.start + cut.len?;
        }
        depart += serialization;
        self.free = depart;
        let jitter = if self.spec.jitter.is_zero() {
            0.0
        } else {
            self.rng.gen_range(-1.0..=1.0) * self.spec.jitter.as_secs_f64()
        };
        let delay = Duration::from_secs_f64((self.spec.delay.as_secs_f64() + jitter).max(0.0));
        let at = (depart + delay).max(self.last);
        self.last = at;
        Some(at)
    }
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `pump` until the relay is reset; dropping it closes its sockets.
async fn until_reset(mut reset: watch::Receiver<u64>, pump: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = pump => {}
        _ = reset.changed() => {}
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    spec: LinkSpec,
    seed: u64,
    start: Instant,
    delivered: Arc<AtomicU64>,
) {
    let queue = Arc::new(Semaphore::new(spec.queue_bytes.clamp(MIN_QUEUE, 64 << 20)));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, OwnedSemaphorePermit)>();
    // Aborted with the pump (a reset): what the link held for the connection is lost with it.
    let mut writer = AbortOnDrop(tokio::spawn(async move {
        while let Some((at, bytes, _permit)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
            delivered.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    }));
    let now = Instant::now();
    let mut schedule = Schedule { spec, start, rng: ChaCha8Rng::seed_from_u64(seed), free: now, last: now };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(permit) = queue.clone().acquire_many_owned(n as u32).await else { break };
        let Some(at) = schedule.deliver_at(Instant::now(), n) else {
            // Cut for good: hold everything, forever (the connection goes silent).
            std::future::pending::<()>().await;
            return;
        };
        if tx.send((at, buf[..n].to_vec(), permit)).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = (&mut writer.0).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cut;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    fn link(delay_ms: u64, mbit: Option<f64>) -> LinkSpec {
        LinkSpec {
            delay: Duration::from_millis(delay_ms),
            rate_bps: mbit.map(|m| (m * 1e6) as u64),
            queue_bytes: 1 << 20,
            ..LinkSpec::ideal()
        }
    }

    #[tokio::test]
    async fn delay_rate_and_content_hold() {
        let relay = TcpRelay::start(echo_server().await, link(20, Some(40.0)), link(20, None), 1).await.unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        // A round trip of one byte: two one-way delays.
        let t = Instant::now();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(80), "{rtt:?}");
        // 5 MB up at 40 Mbit/s takes 1 s (plus the delays); what comes back is what was sent.
        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.into_split();
        let t = Instant::now();
        let send = tokio::spawn(async move {
            w.write_all(&payload).await.unwrap();
            payload
        });
        let mut back = vec![0u8; 5_000_000];
        r.read_exact(&mut back).await.unwrap();
        let took = t.elapsed().as_secs_f64();
        assert_eq!(back, send.await.unwrap());
        assert!((0.95..1.3).contains(&took), "5 MB at 40 Mbit/s took {took:.3} s");
        assert_eq!(relay.stats().up_bytes, 5_000_001);
    }

    #[tokio::test]
    async fn a_cut_holds_bytes_until_the_link_is_back_and_loss_is_refused() {
        let mut up = link(5, None);
        up.cuts = vec![Cut { start: Duration::ZERO, len: Some(Duration::from_millis(300)) }];
        let relay = TcpRelay::start(echo_server().await, up, link(5, None), 2).await.unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        let t = Instant::now();
        s.write_all(b"held").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"held");
        assert!(t.elapsed() >= Duration::from_millis(290), "{:?}", t.elapsed());
        let lossy = LinkSpec { loss: 0.01, ..LinkSpec::ideal() };
        assert!(TcpRelay::start(relay.addr(), lossy.clone(), lossy, 0).await.is_err());
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let spec = LinkSpec { jitter: Duration::from_millis(5), ..link(20, Some(100.0)) };
        let t0 = Instant::now();
        let times = |seed| {
            let mut s =
                Schedule { spec: spec.clone(), start: t0, rng: ChaCha8Rng::seed_from_u64(seed), free: t0, last: t0 };
            (0..50).map(|i| s.deliver_at(t0 + Duration::from_millis(i), 1500).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(times(3), times(3));
        assert_ne!(times(3), times(4));
        // In order, and never earlier than the delay minus the jitter.
        let t = times(3);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        assert!(t[0] >= t0 + Duration::from_millis(15));
    }
}
