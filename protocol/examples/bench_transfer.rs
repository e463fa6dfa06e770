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
//! `cargo run --release -p fedtalent-protocol --example bench_transfer [-- --bf16] [--mb N]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use fedtalent_certs::{
    client_config, client_endpoint, server_config, server_endpoint, Allowlist, FederationCa, SiteKey,
};
use fedtalent_protocol::quic::{recv_tensors_uni, send_tensors_uni};
use fedtalent_protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SITES: usize = 3;

/// CPU seconds (user + system) this process has used so far, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn model(total_bytes: usize) -> TensorSet {
    // ~120 MB in tensors of at most 4 MiB (the unet's largest convolutions are ~3.5 MiB).
    let per = 1usize << 20; // f32 elements per tensor
    let mut left = total_bytes / 4;
    let mut set = TensorSet::default();
    let mut i = 0u32;
    let mut x = 0x1234_5678u32;
    while left > 0 {
        let n = left.min(per);
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        set.push(WireTensor::from_f32(format!("layer{i}.weight"), vec![n as u64], &vals));
        left -= n;
        i += 1;
    }
    set
}

/// One timed direction: bytes delivered, wall time and the process's CPU time (all threads).
#[derive(Clone, Copy, Debug)]
struct Phase {
    bytes: f64,
    wall_s: f64,
    cpu_s: f64,
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
}

async fn quic_run(set: Arc<TensorSet>, transport: Transport) -> QuicResult {
    let ca = FederationCa::create("bench").unwrap();
    let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let names: Vec<String> = (0..SITES).map(|i| format!("site{i}")).collect();
    let cfg = server_config(ca.cert_pem(), &cert, &key, Allowlist::new(names.clone())).unwrap();
    let server = server_endpoint(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let limits = RecvLimits::for_manifest(set.manifest());

    let mut site_conns = Vec::new();
    let mut server_conns = Vec::new();
    for name in &names {
        let k = SiteKey::generate(name).unwrap();
        let c = ca.sign_site_csr(&k.csr_pem, 1).unwrap();
        let mut ep = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(client_config(ca.cert_pem(), &c, &k.key_pem).unwrap());
        let connecting = ep.connect(addr, "localhost").unwrap();
        let incoming = server.accept().await.unwrap();
        let (cc, sc) = tokio::join!(connecting, incoming);
        site_conns.push((ep, cc.unwrap()));
        server_conns.push(sc.unwrap());
    }
    // Warm-up (lets MTU discovery and congestion control settle).
    let warm = Arc::new(model(8 << 20));
    let wl = RecvLimits::for_manifest(warm.manifest());
    for (sc, (_, cc)) in server_conns.iter().zip(&site_conns) {
        let mut digests = TensorDigests::new(transport);
        let (a, b) = tokio::join!(send_tensors_uni(sc, warm.clone(), &mut digests), recv_tensors_uni(cc, &wl));
        a.unwrap();
        b.unwrap();
    }

    let bytes = set.total_bytes() as f64 * SITES as f64;
    // In the protocol every payload is announced by its digest before it streams (the round
    // start names the global model's digest, computed once when the model is made; a site's
    // update header carries its payload digest), so a sender streams with its digests known.
    // That hashing is timed here on its own; the receivers' hashing is inside the transfer.
    let t = Instant::now();
    let mut coordinator_digests = TensorDigests::new(transport);
    set.wire_digest_cached(&mut coordinator_digests);
    let site_digests = coordinator_digests.clone();
    let digest_s = t.elapsed().as_secs_f64();

    // Down: coordinator → every site.
    let (t, c) = (Instant::now(), cpu_seconds());
    let mut tasks = Vec::new();
    for (sc, (_, cc)) in server_conns.iter().zip(&site_conns) {
        let (sc, cc, set, limits) = (sc.clone(), cc.clone(), set.clone(), limits.clone());
        let mut digests = coordinator_digests.clone();
        tasks.push(tokio::spawn(async move {
            let (a, b) = tokio::join!(send_tensors_uni(&sc, set.clone(), &mut digests), recv_tensors_uni(&cc, &limits));
            assert_eq!(a.unwrap(), b.unwrap().1);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let down = Phase { bytes, wall_s: t.elapsed().as_secs_f64(), cpu_s: cpu_seconds() - c };
    // Up: every site → coordinator.
    let (t, c) = (Instant::now(), cpu_seconds());
    let mut tasks = Vec::new();
    for (sc, (_, cc)) in server_conns.iter().zip(&site_conns) {
        let (sc, cc, set, limits) = (sc.clone(), cc.clone(), set.clone(), limits.clone());
        let mut digests = site_digests.clone();
        tasks.push(tokio::spawn(async move {
            let (a, b) = tokio::join!(send_tensors_uni(&cc, set.clone(), &mut digests), recv_tensors_uni(&sc, &limits));
            assert_eq!(a.unwrap(), b.unwrap().1);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let up = Phase { bytes, wall_s: t.elapsed().as_secs_f64(), cpu_s: cpu_seconds() - c };
    for (i, (sc, (_, cc))) in server_conns.iter().zip(&site_conns).enumerate() {
        let (s, c) = (sc.stats().path, cc.stats().path);
        eprintln!(
            "site{i}: coordinator→site mtu {} lost {} black holes {}; site→coordinator mtu {} lost {} black holes {}",
            s.current_mtu,
            s.lost_packets,
            s.black_holes_detected,
            c.current_mtu,
            c.lost_packets,
            c.black_holes_detected
        );
    }
    for (ep, c) in site_conns {
        c.close(0u32.into(), b"");
        ep.wait_idle().await;
    }
    QuicResult { down, up, digest_s }
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
        results.push(Phase { bytes, wall_s: t.elapsed().as_secs_f64(), cpu_s: cpu_seconds() - c });
    }
    (results[0], results[1])
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let transport = if args.iter().any(|a| a == "--bf16") { Transport::Bf16 } else { Transport::Native };
    let mb: usize = args
        .iter()
        .position(|a| a == "--mb")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--mb N"))
        .unwrap_or(120);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let set = Arc::new(model(mb * 1_000_000));
    let total = set.total_bytes() as usize;
    // With bf16 transport, throughput is counted in model bytes (f32), i.e. what is delivered.
    let quic = rt.block_on(quic_run(set, transport));
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
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
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
