//! Transfer benchmark: a 120 MB f32 model (the size of the `unet` preset) from a coordinator to 3
//! sites and back over QUIC (mutual TLS, tensor streams with SHA-256) on loopback, against plain
//! TCP moving the same bytes (no TLS, no digest) in the same run. Prints one JSON line.
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

async fn quic_run(set: Arc<TensorSet>, transport: Transport) -> (f64, f64) {
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
        let (a, b) = tokio::join!(send_tensors_uni(sc, &warm, &mut digests), recv_tensors_uni(cc, &wl));
        a.unwrap();
        b.unwrap();
    }

    let bytes = set.total_bytes() as f64 * SITES as f64;
    // Down: coordinator → every site. Like the coordinator, which hashes a new global model
    // once (its digest names the version) and streams it to every site without hashing again;
    // that one hashing pass is inside the timed window.
    let (t, c) = (Instant::now(), cpu_seconds());
    let mut digests = TensorDigests::new(transport);
    set.wire_digest_cached(&mut digests);
    let digests = Arc::new(digests);
    let mut tasks = Vec::new();
    for (sc, (_, cc)) in server_conns.iter().zip(&site_conns) {
        let (sc, cc, set, limits) = (sc.clone(), cc.clone(), set.clone(), limits.clone());
        let mut digests = (*digests).clone();
        tasks.push(tokio::spawn(async move {
            let (a, b) = tokio::join!(send_tensors_uni(&sc, &set, &mut digests), recv_tensors_uni(&cc, &limits));
            assert_eq!(a.unwrap(), b.unwrap().1);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let down = bytes / t.elapsed().as_secs_f64();
    eprintln!("quic down: {:.2} s wall, {:.2} s cpu", t.elapsed().as_secs_f64(), cpu_seconds() - c);
    // Up: every site → coordinator; each site hashes its own update once (as it streams).
    let (t, c) = (Instant::now(), cpu_seconds());
    let mut tasks = Vec::new();
    for (sc, (_, cc)) in server_conns.iter().zip(&site_conns) {
        let (sc, cc, set, limits) = (sc.clone(), cc.clone(), set.clone(), limits.clone());
        tasks.push(tokio::spawn(async move {
            let mut digests = TensorDigests::new(transport);
            let (a, b) = tokio::join!(send_tensors_uni(&cc, &set, &mut digests), recv_tensors_uni(&sc, &limits));
            assert_eq!(a.unwrap(), b.unwrap().1);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let up = bytes / t.elapsed().as_secs_f64();
    eprintln!("quic up: {:.2} s wall, {:.2} s cpu", t.elapsed().as_secs_f64(), cpu_seconds() - c);
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
    (down, up)
}

async fn tcp_run(total: usize) -> (f64, f64) {
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
        let t = Instant::now();
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
        results.push(bytes / t.elapsed().as_secs_f64());
    }
    (results[0], results[1])
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
    let (qd, qu) = rt.block_on(quic_run(set, transport));
    if args.iter().any(|a| a == "--quic-only") {
        // For profiling the QUIC path alone.
        println!("{{\"quic_down_MBps\":{:.1},\"quic_up_MBps\":{:.1}}}", qd / 1e6, qu / 1e6);
        return;
    }
    let (td, tu) = rt.block_on(tcp_run(total));
    let mbs = |x: f64| (x / 1e6 * 10.0).round() / 10.0;
    println!(
        "{{\"model_bytes\":{total},\"sites\":{SITES},\"transport\":\"{transport:?}\",\"threads\":{},\"quic_down_MBps\":{},\"quic_up_MBps\":{},\"tcp_down_MBps\":{},\"tcp_up_MBps\":{},\"ratio_down\":{:.3},\"ratio_up\":{:.3}}}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        mbs(qd), mbs(qu), mbs(td), mbs(tu), qd / td, qu / tu
    );
}
