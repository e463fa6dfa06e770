//! A userspace link emulator on loopback for tests and benchmarks (this machine has no netem):
//! a UDP relay between a client and a server with, per direction, one-way delay, jitter,
//! random loss, a bandwidth cap behind a bounded drop-tail queue, a WAN MTU and scheduled cuts,
//! deterministic per seed; and a TCP relay ([`TcpRelay`]) with delay, bandwidth and cuts for the
//! TLS-over-TCP fallback, which cannot emulate packet loss (see its docs).
//!
//! ```no_run
//! # async fn f(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use fedtalent_link::{LinkSpec, Relay};
//! use std::time::Duration;
//! let link = LinkSpec::wan(Duration::from_millis(80), 0.005, 100.0);
//! let relay = Relay::start(server, link.clone(), link, 7).await?;
//! // connect the client to relay.addr() instead of server
//! # Ok(()) }
//! ```
//!
//! What a userspace relay cannot be: the kernel's timers (tokio's 1 ms resolution) release
//! datagrams in bursts of up to a millisecond's worth; delivery *times* are computed exactly,
//! so rates and delays hold on average and to within ~1 ms per datagram. The relay shares the
//! CPU with the endpoints it connects: on a loaded machine a figure may be CPU-bound, not
//! link-bound (compare with an unlimited link in the same run).

mod relay;
mod shaper;
mod tcp;

pub use relay::{LinkStats, Relay};
pub use shaper::{Cut, DirectionStats, Drop, LinkSpec, Shaper, Verdict, WAN_MTU};
pub use tcp::{TcpLinkStats, TcpRelay};
