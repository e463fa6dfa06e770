//! QUIC transport tuning for model transfer, and the UDP endpoints that carry it.
//!
//! A round moves ~120 MB per site each way. quinn's defaults are made for web traffic: small
//! flow-control windows, and the kernel's default UDP socket buffers (~208 KiB), in which the
//! bursts of a fast sender overflow and are dropped (seen on loopback as `RcvbufErrors` in
//! /proc/net/snmp, ~0.5–2 % of packets, each loss halving the congestion window). Here: bigger
//! socket buffers and windows sized for a model, and datagrams as large as the path carries.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use socket2::{Domain, Protocol, Socket, Type};

/// Send and receive buffer asked of the kernel for every federation UDP socket (quic-go asks
/// for 7 MiB, bun's HTTP/3 and zquic 4–8 MiB, for the same reason). Linux grants at most twice `net.core.{r,w}mem_max` (often
/// 4 MiB), still ~20× its default. Measured on loopback with sender and receiver on the same
/// 2 cores (bench_transfer): no more drops, but ~10 % less throughput than the default buffers,
/// whose drops throttle the sender into a shorter queue; between two machines, where a drop
/// costs a round trip and halves the congestion window, the larger buffer is the safe side.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// The congestion controllers quinn offers, and BBR's model on a delivery-rate estimate
/// ([`crate::RateWindow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    NewReno,
    Cubic,
    Bbr,
    RateWindow,
}

impl Congestion {
    pub const ALL: [Congestion; 4] = [Congestion::NewReno, Congestion::Cubic, Congestion::Bbr, Congestion::RateWindow];

    pub fn name(self) -> &'static str {
        match self {
            Congestion::NewReno => "newreno",
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::RateWindow => "rate-window",
        }
    }

    pub fn from_name(name: &str) -> Option<Congestion> {
        Congestion::ALL.into_iter().find(|c| c.name() == name)
    }

    pub fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::RateWindow => Arc::new(crate::RateWindowConfig),
        }
    }
}

/// The congestion controller of every federation connection (both ends: each controls what it
/// sends): [`crate::RateWindow`], BBR's model on a delivery-rate estimate, chosen by
/// measurement (issue 18; docs/transport-wan-rate-window-2026-12-06.txt).
///
/// `bench_transfer --wan`: each site through its own emulated link (fedtalent-link: one-way
/// delay RTT/2, random loss, bottleneck rate behind a one-BDP drop-tail queue, 1472-byte MTU),
/// 3 sites, 120 MB each way. Goodput as a fraction of each site's link rate, down / up, worst
/// site of 3 relay seeds, on this 2-core machine quiet (load 0.4-0.9), rate-window and quinn's
/// BBR side by side in each run; and the share of datagrams dropped at the bottleneck queue:
///
/// ```text
///                             rate-window            quinn BBR              target
///   20 ms, 0 %,   200 Mbit/s  0.967 / 0.931  4 %     0.506 / 0.907  38-48 %  >= 0.9
///   80 ms, 0.5 %, 100 Mbit/s  0.957 / 0.907  1 %     0.943 / 0.911  40-46 %  >= 0.8
///   150 ms, 2 %,   50 Mbit/s  0.905 / 0.897  0 %     0.814 / 0.907  45-46 %  >= 0.6
/// ```
///
/// Loss-based controllers (NewReno, Cubic) take every random loss for congestion and halve their
/// window: their rate is bounded by ~MSS/RTT·1.2/√p (Mathis et al.), 2.5 Mbit/s at 80 ms and
/// 0.5 %, 0.7 Mbit/s at 150 ms and 2 %, whatever the link (measured: 0.02 and 0.01 of the link,
/// docs/transport-wan-2026-12-06.txt). BBR's model (window from the delivered rate and the
/// minimum RTT, no halving on random loss) keeps a lossy hospital link at its rate. quinn's own
/// BBR overestimates the rate twice over (its samples are ack-to-ack rates of ack bursts: the
/// bottleneck drops ~45 % of what it sends, a burden on anyone sharing the uplink) and its
/// window sticks below the path for whole transfers on some connections (the 0.506 and 0.814
/// above: the first-connected site, 2 of 9 runs; 0.51 and 0.62 in earlier runs). A site on a
/// clean, shared link would be served as well by Cubic (0.95-0.97 at 20 ms without loss).
///
/// Flow-control windows were not varied: the largest bandwidth-delay product here is 1 MB
/// (80 ms × 100 Mbit/s), 32× under the 32 MiB stream window, so they never limited a transfer.
pub const CONGESTION: Congestion = Congestion::RateWindow;

/// QUIC transport parameters tuned for model transfer: large flow-control windows (so a
/// 100+ MB model is not throttled by the receiver), keep-alives and an idle timeout.
pub fn transport_config() -> quinn::TransportConfig {
    transport_config_with(CONGESTION)
}

/// [`transport_config`] with another congestion controller (for the measurements that chose it).
pub fn transport_config_with(congestion: Congestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(congestion.factory());
    // 32 MiB per stream, 64 MiB per connection: on LAN/WAN these keep a single stream well above
    // 1 Gbit/s up to ~250 ms RTT.
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(60)).expect("60 s fits")));
    // Path-MTU discovery may climb to the largest UDP payload (quinn's default ceiling is 1452,
    // what Ethernet carries): it finds ~1450 bytes across the Internet, 9000 on a jumbo-frame
    // LAN and 64 KB on loopback, where a site and the coordinator share a host. Per-packet work
    // (headers, header protection, acks, syscalls) falls with the datagram count: on loopback
    // it doubles throughput (bench_transfer, 2 cores). Probes that the path drops cost nothing
    // but the probe; see [`GsoBoundedSocket`] for why larger datagrams need it.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// The largest UDP payload QUIC may use (the QUIC limit; IPv4 tops out at 65,507, which path-MTU
/// discovery finds by itself).
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// The largest GSO batch handed to the kernel in one send: Linux refuses (`EMSGSIZE`) a UDP
/// send whose IP packet before segmentation would exceed 64 KiB.
pub const MAX_GSO_BATCH_BYTES: usize = 64_000;

/// A UDP socket that never hands the kernel a GSO batch over [`MAX_GSO_BATCH_BYTES`].
///
/// quinn batches up to 10 datagrams into one GSO send whatever their size. With 1452-byte
/// datagrams that is 14.5 KB; once path-MTU discovery has grown them to 9–64 KB the batch is
/// 90–640 KB, the kernel refuses it with `EMSGSIZE`, and quinn-udp, which expects that error
/// only from MTU probes, drops it silently. The losses then look like an MTU black hole and
/// the datagram size collapses to 1200 bytes (measured: 20–60 lost packets and one black hole
/// per connection per 120 MB). This wrapper splits such a batch into sends of at most
/// [`MAX_GSO_BATCH_BYTES`], each still segmented by the kernel.
#[derive(Debug)]
pub struct GsoBoundedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl GsoBoundedSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> Self {
        GsoBoundedSocket { inner }
    }
}

/// The `(start, end)` byte ranges of `len` bytes of `segment`-byte datagrams, grouped so that
/// each range holds whole datagrams (the last may be short) and at most `max_batch` bytes, or
/// one datagram where a single one is larger.
pub fn gso_batches(len: usize, segment: usize, max_batch: usize) -> impl Iterator<Item = (usize, usize)> {
    let segment = segment.max(1);
    let step = (max_batch / segment).max(1) * segment;
    (0..len).step_by(step).map(move |start| (start, (start + step).min(len)))
}

impl AsyncUdpSocket for GsoBoundedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size.filter(|_| transmit.contents.len() > MAX_GSO_BATCH_BYTES) else {
            return self.inner.try_send(transmit);
        };
        // If a later part would block, the whole transmit is retried and the earlier parts go
        // out twice: QUIC discards duplicate packets, which is cheaper than the false loss
        // signal of dropping the rest.
        for (start, end) in gso_batches(transmit.contents.len(), segment, MAX_GSO_BATCH_BYTES) {
            let contents = &transmit.contents[start..end];
            self.inner.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A UDP socket bound to `addr` with [`UDP_BUFFER_BYTES`] send/receive buffers (as much as the
/// kernel grants).
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4 too where the address is the IPv6 wildcard, as a dual-stack server should.
        let _ = socket.set_only_v6(false);
    }
    // Only ever raise a buffer (a host may have larger defaults); failing to is not fatal: the
    // transfer is only slower.
    if socket.recv_buffer_size().is_ok_and(|size| size < UDP_BUFFER_BYTES) {
        if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER_BYTES) {
            tracing::debug!("UDP receive buffer of {UDP_BUFFER_BYTES} bytes refused: {e}");
        }
    }
    if socket.send_buffer_size().is_ok_and(|size| size < UDP_BUFFER_BYTES) {
        if let Err(e) = socket.set_send_buffer_size(UDP_BUFFER_BYTES) {
            tracing::debug!("UDP send buffer of {UDP_BUFFER_BYTES} bytes refused: {e}");
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let socket = Arc::new(GsoBoundedSocket::new(runtime.wrap_udp_socket(bind_udp(addr)?)?));
    let mut config = quinn::EndpointConfig::default();
    // Advertise that we accept datagrams as large as path-MTU discovery may send.
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("65,527 is QUIC's maximum");
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// The coordinator's QUIC endpoint, listening on `addr` (call inside a tokio runtime).
pub fn server_endpoint(config: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    endpoint(addr, Some(config))
}

/// A site's (or an admin's) QUIC endpoint, bound to `addr` (usually `0.0.0.0:0`); set its
/// client config before connecting. Call inside a tokio runtime.
pub fn client_endpoint(addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    endpoint(addr, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_get_enlarged_udp_buffers() {
        let s = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let granted = Socket::from(s).recv_buffer_size().unwrap();
        // The kernel default is ~208 KiB; anything granted above it shows the request took effect.
        assert!(granted > 256 << 10, "receive buffer {granted} bytes");
        let ep = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(ep.local_addr().unwrap().port() != 0);
    }

    #[test]
    fn gso_batches_hold_whole_datagrams_under_the_cap() {
        for (len, segment) in [(14_520, 1452), (90_000, 9000), (85_000, 9000), (655_000, 65_500), (100, 1452)] {
            let ranges: Vec<_> = gso_batches(len, segment, MAX_GSO_BATCH_BYTES).collect();
            // Contiguous, complete, and each a whole number of datagrams but the last.
            assert_eq!(ranges.first().unwrap().0, 0);
            assert_eq!(ranges.last().unwrap().1, len);
            for w in ranges.windows(2) {
                assert_eq!(w[0].1, w[1].0);
                assert_eq!((w[0].1 - w[0].0) % segment, 0);
            }
            for (start, end) in &ranges {
                assert!(end - start <= MAX_GSO_BATCH_BYTES.max(segment), "{len}/{segment}: {start}..{end}");
            }
        }
        assert_eq!(gso_batches(14_520, 1452, MAX_GSO_BATCH_BYTES).count(), 1);
        assert_eq!(
            gso_batches(90_000, 9000, MAX_GSO_BATCH_BYTES).collect::<Vec<_>>(),
            vec![(0, 63_000), (63_000, 90_000)]
        );
        assert_eq!(gso_batches(131_000, 65_500, MAX_GSO_BATCH_BYTES).count(), 2);
    }

    /// On loopback (MTU 64 KiB) path-MTU discovery must grow the datagrams past Ethernet's 1452
    /// bytes and keep them there through a bulk transfer: without [`GsoBoundedSocket`], the
    /// kernel refuses quinn's GSO batches of large datagrams, the losses read as a black hole
    /// and the size falls back to 1200.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_transfer_keeps_large_datagrams() {
        use crate::{client_config, server_config, Allowlist, FederationCa, SiteKey};
        let ca = FederationCa::create("mtu-test").unwrap();
        let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
        let cfg = server_config(ca.cert_pem(), &cert, &key, Allowlist::new(["site-a"])).unwrap();
        let server = server_endpoint(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let site = SiteKey::generate("site-a").unwrap();
        let site_cert = ca.sign_site_csr(&site.csr_pem, 1).unwrap();
        let mut client = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(ca.cert_pem(), &site_cert, &site.key_pem).unwrap());
        let connecting = client.connect(server.local_addr().unwrap(), "localhost").unwrap();
        let accepting = async { server.accept().await.unwrap().await };
        let (client_conn, server_conn) = tokio::join!(connecting, accepting);
        let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());

        const BYTES: usize = 48 << 20;
        let payload = vec![0x5au8; BYTES];
        let send = async {
            let mut s = client_conn.open_uni().await.unwrap();
            s.write_all(&payload).await.unwrap();
            s.finish().unwrap();
            s.stopped().await.unwrap();
        };
        let recv = async {
            let mut r = server_conn.accept_uni().await.unwrap();
            r.read_to_end(BYTES).await.unwrap()
        };
        let ((), received) = tokio::join!(send, recv);
        assert_eq!(received.len(), BYTES);

        let path = client_conn.stats().path;
        assert_eq!(path.black_holes_detected, 0, "{path:?}");
        assert!(path.current_mtu > 1452, "datagrams stayed at {} bytes: {path:?}", path.current_mtu);
        client_conn.close(0u32.into(), b"done");
        client.wait_idle().await;
    }
}
