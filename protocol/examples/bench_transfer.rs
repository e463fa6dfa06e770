//! Transfer benchmark: a 120 MB f32 model (the size of the `unet` preset) from a coordinator to 3
//! sites and back over QUIC (mutual TLS, tensor streams with SHA-256) on loopback, against plain
//! TCP moving the same bytes (no TLS, no digest) in the same run. Prints one JSON line:
//! - `quic_*_MBps`, `tcp_*_MBps` and their ratios, per direction (bytes delivered to all 3
//!   sites / wall time);
//! - `*_cpu_s_per_GB`: the process's CPU time per GB delivered, [down, up];
//! - `sender_digest_MBps`: the sender's one hashing pass, timed apart because the protocol
//!   announces a payload's digest before streaming it (the receivers' hashing is in the transfer);
//! - the single-core rates of SHA-256 and AES-256-GCM here, and `quic_ceiling_MBps`: what any
//!   QUIC stack could reach on these cores if each byte cost only what it cost TCP plus that
//!   cryptography, and `ceiling_ratio`, that ceiling over TCP's figure.
//!
//! On stderr: wall and CPU time per phase, and each connection's datagram size and losses.
//!
//! `--wan`: QUIC alone (and, for the loss-free conditions, the TLS-over-TCP fallback through a
//! `TcpRelay` of the same delay and rate, in the same run, one more JSON line with
//! `"transport":"tls-over-tcp"`; `--no-tcp` leaves it out), each site through its own emulated WAN link (`fedtalent-link`: delay,
//! random loss, a bottleneck rate behind a one-BDP drop-tail queue, a 1472-byte MTU) at the
//! conditions of issue 18, one JSON line per condition × congestion controller, with goodput as
//! a fraction of the link rate (see [`wan_sweep`]). `--cc newreno,cubic,bbr,rate-window` (default all),
//! `--conditions 0,1,2` (20 ms/0 %/200 Mbit/s, 80 ms/0.5 %/100, 150 ms/2 %/50; `3`: the relays
//! without limits, the CPU ceiling), `--sites N` (default 3), `--seed N`, `--warm-mb N`.
//!
//! `cargo run --release -p fedtalent-protocol --example bench_transfer [-- --bf16] [--mb N] [--wan ...]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use fedtalent_certs::{
    client_config, client_endpoint, server_config, server_endpoint, transport_config_with, Allowlist, Congestion,
    FederationCa, SiteKey, CONGESTION,
};
use fedtalent_link::{LinkSpec, LinkStats, Relay, TcpRelay, WAN_MTU};
use fedtalent_protocol::conn::{send_tensors_shared, Connection};
use fedtalent_protocol::quic::{recv_tensors_uni, send_tensors_uni};
use fedtalent_protocol::tcp::TcpConnection;
use fedtalent_protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "common/cc_trace.rs"]
mod cc_trace;
#[path = "common/model.rs"]
mod common_model;
use common_model::model;

const SITES: usize = 3;

/// CPU seconds (user + system) this process has used so far, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One timed direction: bytes delivered, wall time and the process's CPU time (all threads),
/// and (QUIC) each site's own completion time.
#[derive(Clone, Debug)]
struct Phase {
    bytes: f64,
    wall_s: f64,
    cpu_s: f64,
    sites_s: Vec<f64>,
}

impl Phase {
    fn mb_per_s(&self) -> f64 {
        self.bytes / self.wall_s / 1e6
    }
    /// CPU seconds spent per GB delivered.
    fn cpu_s_per_gb(&self) -> f64 {
        self.cpu_s / (self.bytes / 1e9)
    }
}

struct QuicResult {
    down: Phase,
    up: Phase,
    /// Sender-side hashing of the model (once; before the transfer, as in the protocol).
    digest_s: f64,
    /// Per site: the coordinator's and the site's connection statistics.
    paths: Vec<(quinn::PathStats, quinn::PathStats)>,
    /// Per site: what its emulated link did (empty on plain loopback).
    links: Vec<LinkStats>,
}

/// How the sites reach the coordinator in a QUIC run.
struct QuicOpts {
    /// Each site through its own emulated link (the same spec both ways), or straight on loopback.
    link: Option<LinkSpec>,
    congestion: Congestion,
    seed: u64,
    sites: usize,
    /// Bytes per site of the untimed warm-up transfer.
    warm_bytes: usize,
    /// `--trace-cc`: the coordinator's controllers wrapped by [`cc_trace::TracedFactory`].
    trace: Option<Arc<cc_trace::TracedFactory>>,
}

/// Connections to `opts.sites` sites as (coordinator side, site side), each site through its own
/// relay when `opts.link` is set (the relays must outlive the connections).
async fn connect_sites(
    opts: &QuicOpts,
) -> (Vec<(quinn::Connection, quinn::Connection)>, Vec<quinn::Endpoint>, Vec<Relay>) {
    let ca = FederationCa::create("bench").unwrap();
    let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let names: Vec<String> = (0..opts.sites).map(|i| format!("site{i}")).collect();
    let transport = Arc::new(transport_config_with(opts.congestion));
    let mut cfg = server_config(ca.cert_pem(), &cert, &key, Allowlist::new(names.clone())).unwrap();
    match &opts.trace {
        Some(traced) => {
            let mut server_transport = transport_config_with(opts.congestion);
            server_transport.congestion_controller_factory(traced.clone());
            cfg.transport_config(Arc::new(server_transport));
        }
        None => {
            cfg.transport_config(transport.clone());
        }
    }
    let server = server_endpoint(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let (mut conns, mut endpoints, mut relays) = (Vec::new(), vec![server.clone()], Vec::new());
    for (i, name) in names.iter().enumerate() {
        let k = SiteKey::generate(name).unwrap();
        let c = ca.sign_site_csr(&k.csr_pem, 1).unwrap();
        let mut ep = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client = client_config(ca.cert_pem(), &c, &k.key_pem).unwrap();
        client.transport_config(transport.clone());
        ep.set_default_client_config(client);
        let target = match &opts.link {
            Some(link) => {
                let relay = Relay::start(addr, link.clone(), link.clone(), opts.seed + i as u64).await.unwrap();
                let a = relay.addr();
                relays.push(relay);
                a
            }
            None => addr,
        };
        let connecting = ep.connect(target, "localhost").unwrap();
        let incoming = server.accept().await.unwrap();
        let (cc, sc) = tokio::join!(connecting, incoming);
        conns.push((sc.unwrap(), cc.unwrap()));
        endpoints.push(ep);
    }
    (conns, endpoints, relays)
}

/// Streams `set` over every (sender, receiver) connection pair at once and times it: the
/// phase's wall and CPU time, and each pair's own completion time.
async fn quic_phase(
    pairs: &[(quinn::Connection, quinn::Connection)],
    set: &Arc<TensorSet>,
    digests: &TensorDigests,
) -> Phase {
    let limits = RecvLimits::for_manifest(set.manifest());
    let (t, c) = (Instant::now(), cpu_seconds());
    let mut tasks = Vec::new();
    for (send, recv) in pairs {
        let (send, recv, set, limits) = (send.clone(), recv.clone(), set.clone(), limits.clone());
        let mut digests = digests.clone();
        tasks.push(tokio::spawn(async move {
            let (a, b) = tokio::join!(send_tensors_uni(&send, set, &mut digests), recv_tensors_uni(&recv, &limits));
            assert_eq!(a.unwrap(), b.unwrap().1);
            t.elapsed().as_secs_f64()
        }));
    }
    let mut sites_s = Vec::new();
    for task in tasks {
        sites_s.push(task.await.unwrap());
    }
    let bytes = set.total_bytes() as f64 * pairs.len() as f64;
    Phase { bytes, wall_s: t.elapsed().as_secs_f64(), cpu_s: cpu_seconds() - c, sites_s }
}

async fn quic_run(set: Arc<TensorSet>, transport: Transport, opts: &QuicOpts) -> QuicResult {
    let (down_pairs, endpoints, relays) = connect_sites(opts).await;
    let up_pairs: Vec<_> = down_pairs.iter().map(|(sc, cc)| (cc.clone(), sc.clone())).collect();
    // Warm-up (lets MTU discovery and congestion control settle).
    let warm = Arc::new(model(opts.warm_bytes));
    quic_phase(&down_pairs, &warm, &TensorDigests::new(transport)).await;

    // In the protocol every payload is announced by its digest before it streams (the round
    // start names the global model's digest, computed once when the model is made; a site's
    // update header carries its payload digest), so a sender streams with its digests known.
    // That hashing is timed here on its own; the receivers' hashing is inside the transfer.
    let t = Instant::now();
    let mut digests = TensorDigests::new(transport);
    set.wire_digest_cached(&mut digests);
    let digest_s = t.elapsed().as_secs_f64();

    let down = quic_phase(&down_pairs, &set, &digests).await;
    let up = quic_phase(&up_pairs, &set, &digests).await;
    let paths = down_pairs.iter().map(|(sc, cc)| (sc.stats().path, cc.stats().path)).collect();
    if let Some(traced) = &opts.trace {
        eprintln!("cc phases: down {:?} up {:?} (s after the first connection)", down.sites_s, up.sites_s);
        cc_trace::print(traced);
    }
    let links = relays.iter().map(Relay::stats).collect();
    for (_, cc) in &down_pairs {
        cc.close(0u32.into(), b"");
    }
    for ep in endpoints {
        ep.wait_idle().await;
    }
    QuicResult { down, up, digest_s, paths, links }
}

fn print_paths(quic: &QuicResult) {
    for (i, (s, c)) in quic.paths.iter().enumerate() {
        eprintln!(
            "site{i}: coordinator→site mtu {} lost {} black holes {} rtt {:?}; site→coordinator mtu {} lost {} black holes {}",
            s.current_mtu, s.lost_packets, s.black_holes_detected, s.rtt, c.current_mtu, c.lost_packets, c.black_holes_detected
        );
    }
    for (i, l) in quic.links.iter().enumerate() {
        eprintln!("site{i} link: {l:?}");
    }
}

async fn tcp_run(total: usize) -> (Phase, Phase) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mut pairs = Vec::new();
    for _ in 0..SITES {
        let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        pairs.push((s.unwrap().0, c.unwrap()));
    }
    let data = Arc::new(vec![7u8; total]);
    let bytes = (total * SITES) as f64;
    let mut results = Vec::new();
    for dir in 0..2 {
        let (t, c) = (Instant::now(), cpu_seconds());
        let mut tasks = Vec::new();
        for (s, c) in pairs.drain(..) {
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                let (mut s, mut c) = (s, c);
                let (w, r) = if dir == 0 { (&mut s, &mut c) } else { (&mut c, &mut s) };
                let mut buf = vec![0u8; data.len()];
                let (a, b) = tokio::join!(w.write_all(&data), r.read_exact(&mut buf));
                a.unwrap();
                b.unwrap();
                (s, c)
            }));
        }
        for t in tasks {
            pairs.push(t.await.unwrap());
        }
        results.push(Phase { bytes, wall_s: t.elapsed().as_secs_f64(), cpu_s: cpu_seconds() - c, sites_s: vec![] });
    }
    let up = results.pop().unwrap();
    (results.pop().unwrap(), up)
}

/// The TLS-over-TCP fallback through the emulated link: `sites` sites, each through its own
/// [`TcpRelay`] (delay and rate of `link`; a byte-stream relay has no loss), with the
/// federation's mutual TLS and the request-stream multiplexer the coordinator and site agent
/// use. Down: each site opens a stream and the coordinator streams the model on it; up: each
/// site streams it on a stream of its own. Returns (down, up).
async fn tls_tcp_run(
    set: Arc<TensorSet>,
    transport: Transport,
    link: &LinkSpec,
    sites: usize,
    seed: u64,
) -> (Phase, Phase) {
    let ca = FederationCa::create("bench").unwrap();
    let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let names: Vec<String> = (0..sites).map(|i| format!("site{i}")).collect();
    let tls = fedtalent_certs::server_tls_config(ca.cert_pem(), &cert, &key, Allowlist::new(names.clone())).unwrap();
    let acceptor = fedtalent_certs::tcp_acceptor(tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (mut pairs, mut relays) = (Vec::new(), Vec::new());
    for (i, name) in names.iter().enumerate() {
        let k = SiteKey::generate(name).unwrap();
        let c = ca.sign_site_csr(&k.csr_pem, 1).unwrap();
        let client = fedtalent_certs::client_tls_config(ca.cert_pem(), &c, &k.key_pem, fedtalent_certs::ALPN).unwrap();
        let relay = TcpRelay::start(addr, link.clone(), link.clone(), seed + i as u64).await.unwrap();
        let connecting = fedtalent_certs::tcp_connect(relay.addr(), "localhost", Arc::new(client));
        let accepting = async {
            let (socket, remote) = listener.accept().await.unwrap();
            (fedtalent_certs::tcp_accept(&acceptor, socket).await.unwrap().0, remote)
        };
        let (client, (server, remote)) = tokio::join!(connecting, accepting);
        let server = Connection::Tcp(TcpConnection::server(server, remote));
        let client = Connection::Tcp(TcpConnection::client(client.unwrap(), relay.addr()));
        pairs.push((server, client));
        relays.push(relay);
    }
    let mut digests = TensorDigests::new(transport);
    set.wire_digest_cached(&mut digests);
    let limits = RecvLimits::for_manifest(set.manifest());
    let mut phases = Vec::new();
    for down in [true, false] {
        let (t, c) = (Instant::now(), cpu_seconds());
        let mut tasks = Vec::new();
        for (server, client) in &pairs {
            let (server, client, set, limits) = (server.clone(), client.clone(), set.clone(), limits.clone());
            let mut digests = digests.clone();
            tasks.push(tokio::spawn(async move {
                let (mut cs, mut cr) = client.open_bi().await.unwrap();
                cs.write_all(b"go").await.unwrap();
                let (mut ss, mut sr) = server.accept_bi().await.unwrap();
                let mut go = [0u8; 2];
                sr.read_exact(&mut go).await.unwrap();
                let (sent, got) = if down {
                    let sending = async {
                        let d = send_tensors_shared(&mut ss, set, &mut digests, &Held::default()).await.unwrap().digest;
                        ss.finish().unwrap();
                        d
                    };
                    tokio::join!(sending, recv_tensors_digest(&mut cr, &limits))
                } else {
                    let sending = async {
                        let d = send_tensors_shared(&mut cs, set, &mut digests, &Held::default()).await.unwrap().digest;
                        cs.finish().unwrap();
                        d
                    };
                    tokio::join!(sending, recv_tensors_digest(&mut sr, &limits))
                };
                assert_eq!(sent, got.unwrap().1);
                t.elapsed().as_secs_f64()
            }));
        }
        let mut sites_s = Vec::new();
        for task in tasks {
            sites_s.push(task.await.unwrap());
        }
        let bytes = set.total_bytes() as f64 * pairs.len() as f64;
        phases.push(Phase { bytes, wall_s: t.elapsed().as_secs_f64(), cpu_s: cpu_seconds() - c, sites_s });
    }
    let up = phases.pop().unwrap();
    (phases.pop().unwrap(), up)
}

/// Single-core rates (GB/s) of the per-byte cryptography a QUIC transfer cannot skip, on this
/// machine: the receiver's SHA-256 of the payload, and AES-256-GCM (what rustls negotiates
/// first) sealing at the sender and opening at the receiver, in 64 KB records like the
/// datagrams on loopback.
struct CryptoRates {
    sha256: f64,
    seal: f64,
    open: f64,
}

impl CryptoRates {
    fn measure(bytes: usize) -> CryptoRates {
        use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
        let mut buf = vec![0x3cu8; bytes];
        let gbps = |t: Instant| bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, &buf));
        let sha256 = gbps(t);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
        let nonce = |i: usize| {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&(i as u64).to_be_bytes());
            Nonce::assume_unique_for_key(n)
        };
        const RECORD: usize = 65_000;
        let t = Instant::now();
        let tags: Vec<_> = buf
            .chunks_mut(RECORD)
            .enumerate()
            .map(|(i, r)| key.seal_in_place_separate_tag(nonce(i), Aad::empty(), r).unwrap())
            .collect();
        let seal = gbps(t);
        let t = Instant::now();
        for ((i, r), tag) in buf.chunks_mut(RECORD).enumerate().zip(tags) {
            let mut sealed = Vec::with_capacity(r.len() + 16);
            sealed.extend_from_slice(r);
            sealed.extend_from_slice(tag.as_ref());
            std::hint::black_box(key.open_in_place(nonce(i), Aad::empty(), &mut sealed).unwrap());
        }
        let open = gbps(t);
        CryptoRates { sha256, seal, open }
    }

    /// Core-seconds per GB of that cryptography.
    fn cpu_s_per_gb(&self) -> f64 {
        1.0 / self.sha256 + 1.0 / self.seal + 1.0 / self.open
    }
}

/// The issue's WAN conditions: (round-trip ms, loss, Mbit/s per site link); a fourth, index 3,
/// is the CPU ceiling: the relays with a WAN MTU but no delay, loss or rate limit.
const WAN_CONDITIONS: [(u64, f64, f64); 3] = [(20, 0.0, 200.0), (80, 0.005, 100.0), (150, 0.02, 50.0)];

/// The value after `flag` in the command line, parsed.
fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    let i = args.iter().position(|a| a == flag)?;
    Some(args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{flag} needs a value")))
}

/// A comma-separated list after `flag`, each item parsed by `parse`.
fn list_arg<T>(args: &[String], flag: &str, parse: impl Fn(&str) -> Option<T>) -> Option<Vec<T>> {
    let list: String = arg(args, flag)?;
    Some(list.split(',').map(|item| parse(item).unwrap_or_else(|| panic!("{flag}: bad item {item}"))).collect())
}

/// The 1-minute load average (the machine is shared: figures are read next to it).
fn load1() -> f64 {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().next().and_then(|l| l.parse().ok()).unwrap_or(f64::NAN)
}

/// Condition `i` of [`WAN_CONDITIONS`] (or the ceiling) as a link, its rate in Mbit/s (`None`:
/// unlimited) and a label.
fn wan_condition(i: usize) -> (LinkSpec, Option<f64>, String) {
    let Some(&(rtt_ms, loss, mbit)) = WAN_CONDITIONS.get(i) else {
        return (LinkSpec { mtu: WAN_MTU, ..LinkSpec::ideal() }, None, "\"rtt_ms\":0,\"loss\":0".into());
    };
    let link = LinkSpec::wan(std::time::Duration::from_millis(rtt_ms), loss, mbit);
    (link, Some(mbit), format!("\"rtt_ms\":{rtt_ms},\"loss\":{loss}"))
}

/// `--wan`: QUIC through the link emulator, one JSON line per condition × controller. A
/// direction's `fraction` is the model's bytes / the time until the slowest site has them /
/// one site link's rate; `fraction_sites` the same per site (each site has its own link, so 3
/// sites at 200 Mbit/s move 600 Mbit/s in all); `mbit` the slowest site's goodput. The rate
/// counts UDP payload, so QUIC's own headers, acks and AEAD tags (~3 % at 1450-byte datagrams)
/// are inside the link rate.
fn wan_sweep(rt: &tokio::runtime::Runtime, set: Arc<TensorSet>, transport: Transport, args: &[String]) {
    let controllers = list_arg(args, "--cc", Congestion::from_name).unwrap_or(Congestion::ALL.to_vec());
    let conditions = list_arg(args, "--conditions", |c| c.parse().ok()).unwrap_or(vec![0, 1, 2]);
    let seed = arg(args, "--seed").unwrap_or(1);
    let sites = arg(args, "--sites").unwrap_or(SITES);
    let per_site = set.total_bytes() as f64;
    for &i in &conditions {
        let (link, mbit, label) = wan_condition(i);
        for &congestion in &controllers {
            let load = load1();
            let opts = QuicOpts {
                link: Some(link.clone()),
                congestion,
                seed,
                sites,
                warm_bytes: warm_bytes(args),
                trace: trace_cc(args, congestion),
            };
            let quic = rt.block_on(quic_run(set.clone(), transport, &opts));
            print_paths(&quic);
            let goodput = |t: f64| per_site * 8.0 / t / 1e6;
            let fraction = |t: f64| mbit.map(|m| r3(goodput(t) / m));
            let per_site_fractions = |p: &Phase| json_list(p.sites_s.iter().map(|&t| fraction(t)));
            let drops = |f: fn(&LinkStats) -> u64| quic.links.iter().map(f).collect::<Vec<_>>();
            let offered: u64 = quic.links.iter().map(|l| l.down.datagrams + l.up.datagrams).sum();
            let dropped: u64 = quic.links.iter().map(|l| l.down.dropped_queue + l.up.dropped_queue).sum();
            println!(
                "{{{label},\"link_mbit\":{},\"congestion\":\"{}\",\"model_bytes\":{},\"sites\":{sites},\
\"down_fraction\":{},\"up_fraction\":{},\"down_fraction_sites\":{},\"up_fraction_sites\":{},\
\"down_mbit\":{},\"up_mbit\":{},\"down_s\":{},\"up_s\":{},\"queue_drops\":{:?},\"loss_drops\":{:?},\"queue_drop_share\":{},\
\"load1_before\":{load},\"load1_after\":{}}}",
                mbit.map_or("null".into(), |m| m.to_string()),
                congestion.name(),
                set.total_bytes(),
                json_num(fraction(quic.down.wall_s)),
                json_num(fraction(quic.up.wall_s)),
                per_site_fractions(&quic.down),
                per_site_fractions(&quic.up),
                r1(goodput(quic.down.wall_s)),
                r1(goodput(quic.up.wall_s)),
                r3(quic.down.wall_s),
                r3(quic.up.wall_s),
                drops(|l| l.down.dropped_queue + l.up.dropped_queue),
                drops(|l| l.down.dropped_loss + l.up.dropped_loss),
                r3(dropped as f64 / offered as f64),
                load1(),
            );
        }
        // The TLS-over-TCP fallback over the same delay and rate, in the same run (a TCP relay
        // has no loss: only the loss-free conditions).
        if link.loss == 0.0 && !args.iter().any(|a| a == "--no-tcp") {
            let load = load1();
            let tcp_link = LinkSpec { mtu: usize::MAX, ..link.clone() };
            let (down, up) = rt.block_on(tls_tcp_run(set.clone(), transport, &tcp_link, sites, seed));
            let goodput = |t: f64| per_site * 8.0 / t / 1e6;
            let fraction = |t: f64| mbit.map(|m| r3(goodput(t) / m));
            let per_site_fractions = |p: &Phase| json_list(p.sites_s.iter().map(|&t| fraction(t)));
            println!(
                "{{{label},\"link_mbit\":{},\"transport\":\"tls-over-tcp\",\"model_bytes\":{},\"sites\":{sites},\
\"down_fraction\":{},\"up_fraction\":{},\"down_fraction_sites\":{},\"up_fraction_sites\":{},\
\"down_mbit\":{},\"up_mbit\":{},\"down_s\":{},\"up_s\":{},\"load1_before\":{load},\"load1_after\":{}}}",
                mbit.map_or("null".into(), |m| m.to_string()),
                set.total_bytes(),
                json_num(fraction(down.wall_s)),
                json_num(fraction(up.wall_s)),
                per_site_fractions(&down),
                per_site_fractions(&up),
                r1(goodput(down.wall_s)),
                r1(goodput(up.wall_s)),
                r3(down.wall_s),
                r3(up.wall_s),
                load1(),
            );
        }
    }
}

/// A JSON number, or `null`.
fn json_num(x: Option<f64>) -> String {
    x.map_or("null".into(), |x| x.to_string())
}

fn json_list(xs: impl Iterator<Item = Option<f64>>) -> String {
    format!("[{}]", xs.map(json_num).collect::<Vec<_>>().join(","))
}

/// `--warm-mb N` (default 8): the warm-up transfer per site before the timed ones.
fn warm_bytes(args: &[String]) -> usize {
    arg::<f64>(args, "--warm-mb").map_or(8 << 20, |mb| (mb * 1e6) as usize)
}

/// `--trace-cc`: a tracing wrapper around the coordinator's controllers.
fn trace_cc(args: &[String], congestion: Congestion) -> Option<Arc<cc_trace::TracedFactory>> {
    args.iter().any(|a| a == "--trace-cc").then(|| {
        Arc::new(cc_trace::TracedFactory {
            inner: congestion.factory(),
            traces: Default::default(),
            start: Instant::now(),
        })
    })
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let transport = if args.iter().any(|a| a == "--bf16") { Transport::Bf16 } else { Transport::Native };
    let mb: usize = arg(&args, "--mb").unwrap_or(120);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let set = Arc::new(model(mb * 1_000_000));
    if args.iter().any(|a| a == "--wan") {
        return wan_sweep(&rt, set, transport, &args);
    }
    let total = set.total_bytes() as usize;
    // With bf16 transport, throughput is counted in model bytes (f32), i.e. what is delivered.
    // `--cc NAME`: another congestion controller than the federation's.
    let congestion = arg::<String>(&args, "--cc").map_or(CONGESTION, |n| Congestion::from_name(&n).expect("--cc NAME"));
    let opts = QuicOpts {
        link: None,
        congestion,
        seed: 0,
        sites: SITES,
        warm_bytes: warm_bytes(&args),
        trace: trace_cc(&args, congestion),
    };
    let quic = rt.block_on(quic_run(set, transport, &opts));
    print_paths(&quic);
    let (qd, qu) = (quic.down, quic.up);
    eprintln!("quic down {qd:?}\nquic up {qu:?}");
    if args.iter().any(|a| a == "--quic-only") {
        // For profiling the QUIC path alone.
        println!("{{\"quic_down_MBps\":{:.1},\"quic_up_MBps\":{:.1}}}", qd.mb_per_s(), qu.mb_per_s());
        return;
    }
    let (td, tu) = rt.block_on(tcp_run(total));
    eprintln!("tcp down {td:?}\ntcp up {tu:?}");
    let crypto = CryptoRates::measure(total);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    // Ceiling estimate for any QUIC stack here: all cores busy, each byte costing what it cost
    // the TCP transfer (kernel copies, syscalls) plus the cryptography TCP skipped.
    // (With bf16 transport the cryptography covers half the model's bytes.)
    let wire_fraction = if transport == Transport::Bf16 { 0.5 } else { 1.0 };
    let ceiling = |tcp: &Phase| cores / (tcp.cpu_s_per_gb() + wire_fraction * crypto.cpu_s_per_gb()) * 1e3;
    println!(
        "{{\"model_bytes\":{total},\"sites\":{SITES},\"transport\":\"{transport:?}\",\"cores\":{cores},\
\"quic_down_MBps\":{},\"quic_up_MBps\":{},\"tcp_down_MBps\":{},\"tcp_up_MBps\":{},\
\"ratio_down\":{},\"ratio_up\":{},\
\"quic_cpu_s_per_GB\":[{},{}],\"tcp_cpu_s_per_GB\":[{},{}],\
\"sender_digest_MBps\":{},\"sha256_GBps\":{},\"aes256gcm_seal_GBps\":{},\"aes256gcm_open_GBps\":{},\
\"quic_ceiling_MBps\":[{},{}],\"ceiling_ratio\":[{},{}]}}",
        r1(qd.mb_per_s()),
        r1(qu.mb_per_s()),
        r1(td.mb_per_s()),
        r1(tu.mb_per_s()),
        r3(qd.mb_per_s() / td.mb_per_s()),
        r3(qu.mb_per_s() / tu.mb_per_s()),
        r3(qd.cpu_s_per_gb()),
        r3(qu.cpu_s_per_gb()),
        r3(td.cpu_s_per_gb()),
        r3(tu.cpu_s_per_gb()),
        r1(total as f64 / quic.digest_s / 1e6),
        r3(crypto.sha256),
        r3(crypto.seal),
        r3(crypto.open),
        r1(ceiling(&td)),
        r1(ceiling(&tu)),
        r3(ceiling(&td) / td.mb_per_s()),
        r3(ceiling(&tu) / tu.mb_per_s()),
    );
}
