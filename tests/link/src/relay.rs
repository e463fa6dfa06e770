//! The UDP relay: a client sends to [`Relay::addr`] instead of the server; each datagram goes
//! through that direction's [`Shaper`] and is sent on at its delivery time. The server sees
//! the relay's own upstream socket as its peer.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::shaper::{Cut, DirectionStats, LinkSpec, Shaper, Verdict};

/// Socket buffers of the relay's sockets: large, so that the relay itself (a process beside
/// the sender and receiver on the same cores) does not add drops the emulated link did not make.
const RELAY_BUFFER_BYTES: usize = 8 << 20;

/// Largest datagram the relay reads (QUIC's maximum UDP payload fits).
const MAX_DATAGRAM: usize = 65_536;

/// Both directions' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Client → server.
    pub up: DirectionStats,
    /// Server → client.
    pub down: DirectionStats,
}

/// A running relay for one client (one site); dropping it stops it.
pub struct Relay {
    addr: SocketAddr,
    up: Arc<Mutex<Shaper>>,
    down: Arc<Mutex<Shaper>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on 127.0.0.1 towards `server`, shaping client → server with `up` and
    /// server → client with `down`; the two directions draw from seeds derived from `seed`.
    /// Call inside a tokio runtime.
    pub async fn start(server: SocketAddr, up: LinkSpec, down: LinkSpec, seed: u64) -> io::Result<Relay> {
        let front = Arc::new(bind("127.0.0.1:0".parse().unwrap())?);
        let back = Arc::new(bind(if server.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" }.parse().unwrap())?);
        let start = Instant::now();
        // Distinct, fixed streams per direction: one direction's traffic never shifts the
        // other's drop pattern.
        let up = Arc::new(Mutex::new(Shaper::new(up, seed.wrapping_mul(2), start)));
        let down = Arc::new(Mutex::new(Shaper::new(down, seed.wrapping_mul(2).wrapping_add(1), start)));
        // The client's address, learned from its first datagram (the relay serves one client).
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();

        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(shape(front.clone(), up.clone(), up_tx, Some(client.clone()))),
            tokio::spawn(deliver(back.clone(), up_rx, Target::Fixed(server))),
            tokio::spawn(shape(back, down.clone(), down_tx, None)),
            tokio::spawn(deliver(front.clone(), down_rx, Target::Client(client))),
        ];
        Ok(Relay { addr: front.local_addr()?, up, down, tasks })
    }

    /// Where the client should send (in place of the server's address).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats { up: self.up.lock().unwrap().stats(), down: self.down.lock().unwrap().stats() }
    }

    /// Cuts both directions from now on, for `len` (`None`: for good).
    pub fn cut_now(&self, len: Option<Duration>) {
        for shaper in [&self.up, &self.down] {
            let mut s = shaper.lock().unwrap();
            let cut = Cut { start: s.start().elapsed(), len };
            s.add_cut(cut);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A UDP socket on `addr` with [`RELAY_BUFFER_BYTES`] buffers (as much as the kernel grants).
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // A smaller buffer than asked only makes the relay drop under bursts; not fatal.
    let _ = socket.set_recv_buffer_size(RELAY_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(RELAY_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A datagram and when it leaves the far end of the link.
type Timed = (Instant, Vec<u8>);

/// Reads datagrams from `socket`, decides each one's fate and queues the survivors for delivery.
/// `client`, on the client-facing side, records the sender's address for the way back.
async fn shape(
    socket: Arc<UdpSocket>,
    shaper: Arc<Mutex<Shaper>>,
    out: mpsc::UnboundedSender<Timed>,
    client: Option<Arc<Mutex<Option<SocketAddr>>>>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else { continue };
        if let Some(client) = &client {
            *client.lock().unwrap() = Some(from);
        }
        let verdict = shaper.lock().unwrap().admit(Instant::now(), len);
        if let Verdict::DeliverAt(at) = verdict {
            if out.send((at, buf[..len].to_vec())).is_err() {
                return;
            }
        }
    }
}

enum Target {
    Fixed(SocketAddr),
    Client(Arc<Mutex<Option<SocketAddr>>>),
}

/// Sends each queued datagram at its delivery time (queued in delivery order: the link is FIFO).
async fn deliver(socket: Arc<UdpSocket>, mut queue: mpsc::UnboundedReceiver<Timed>, target: Target) {
    while let Some((at, datagram)) = queue.recv().await {
        tokio::time::sleep_until(at.into()).await;
        let to = match &target {
            Target::Fixed(addr) => *addr,
            Target::Client(client) => match *client.lock().unwrap() {
                Some(addr) => addr,
                None => continue,
            },
        };
        // A failed send is a datagram lost, which the transport above must handle anyway.
        let _ = socket.send_to(&datagram, to).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP echo server on loopback.
    async fn echo() -> SocketAddr {
        let s = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn round_trip_takes_both_delays_and_a_cut_stops_everything() {
        let server = echo().await;
        let link = LinkSpec { delay: Duration::from_millis(25), ..LinkSpec::ideal() };
        let relay = Relay::start(server, link.clone(), link, 1).await.unwrap();
        let client = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut buf = [0u8; 64];
        let mut fastest = Duration::MAX;
        for i in 0..10u8 {
            let t = Instant::now();
            client.send_to(&[i], relay.addr()).await.unwrap();
            let (n, _) = client.recv_from(&mut buf).await.unwrap();
            let rtt = t.elapsed();
            assert_eq!(&buf[..n], &[i]);
            assert!(rtt >= Duration::from_millis(50), "{rtt:?} under the emulated 50 ms");
            fastest = fastest.min(rtt);
        }
        // The timer rounds up to the millisecond, and a loaded machine adds scheduling delay to
        // some round trips, not (in 10 tries) to all.
        assert!(fastest < Duration::from_millis(60), "fastest round trip {fastest:?}");
        relay.cut_now(Some(Duration::from_millis(300)));
        client.send_to(&[9], relay.addr()).await.unwrap();
        let lost = tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf)).await;
        assert!(lost.is_err(), "a datagram crossed a cut");
        assert_eq!(relay.stats().up.dropped_cut, 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        client.send_to(&[10], relay.addr()).await.unwrap();
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &[10], "the link did not come back after the cut");
    }

    #[tokio::test]
    async fn measured_rate_matches_the_cap() {
        let sink = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let up = LinkSpec { rate_bps: Some(20_000_000), ..LinkSpec::ideal() };
        let relay = Relay::start(sink.local_addr().unwrap(), up, LinkSpec::ideal(), 1).await.unwrap();
        let client = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // 2 MB at 20 Mbit/s: 0.8 s, whatever the sender's pace.
        let (count, len) = (1700usize, 1200usize);
        let receive = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let (mut first, mut got) = (None, 0);
            while got < count {
                sink.recv_from(&mut buf).await.unwrap();
                first.get_or_insert_with(Instant::now);
                got += 1;
            }
            first.unwrap().elapsed()
        });
        for _ in 0..count {
            client.send_to(&[7u8; 1200], relay.addr()).await.unwrap();
        }
        let took = tokio::time::timeout(Duration::from_secs(10), receive).await.unwrap().unwrap();
        let mbit_s = ((count - 1) * len) as f64 * 8.0 / took.as_secs_f64() / 1e6;
        assert!((mbit_s - 20.0).abs() < 2.0, "measured {mbit_s:.2} Mbit/s through a 20 Mbit/s link");
    }
}
