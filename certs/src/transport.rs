//! QUIC transport tuning for model transfer, and the UDP endpoints that carry it.
//!
//! A round moves ~120 MB per site each way. quinn's defaults are made for web traffic: small
//! flow-control windows, and the kernel's default UDP socket buffers (~208 KiB), in which the
//! bursts of a fast sender overflow and are dropped (seen on loopback as `RcvbufErrors` in
//! /proc/net/snmp, ~0.5–2 % of packets, each loss halving the congestion window). Here: bigger
//! socket buffers and windows sized for a model.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Send and receive buffer asked of the kernel for every federation UDP socket (quic-go asks
/// for 7 MiB, bun's HTTP/3 and zquic 4–8 MiB, for the same reason). Linux grants at most twice `net.core.{r,w}mem_max` (often
/// 4 MiB), still ~20× its default. Measured on loopback with sender and receiver on the same
/// 2 cores (bench_transfer): no more drops, but ~10 % less throughput than the default buffers,
/// whose drops throttle the sender into a shorter queue; between two machines, where a drop
/// costs a round trip and halves the congestion window, the larger buffer is the safe side.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// QUIC transport parameters tuned for model transfer: large flow-control windows (so a
/// 100+ MB model is not throttled by the receiver), keep-alives and an idle timeout.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // 32 MiB per stream, 64 MiB per connection: on LAN/WAN these keep a single stream well above
    // 1 Gbit/s up to ~250 ms RTT.
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(60)).expect("60 s fits")));
    // Path-MTU discovery keeps quinn's default ceiling (1452-byte datagrams, what Ethernet
    // carries). Measured on loopback (bench_transfer, 2 cores): letting it climb to 9–64 KB
    // datagrams did not raise throughput (the transfer is bound by SHA-256 and AES-GCM, not by
    // packet count) and big datagrams made black-hole detection flap back to 1200 bytes.
    t
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
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, bind_udp(addr)?, runtime)
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
}
