//! Resumed-transfer benchmark (issue 18): a model downloaded over QUIC (mutual TLS, tensor
//! streams with SHA-256) through the link emulator (`fedtalent-link`), with the link cut for
//! 10 s once 90 % of the model's bytes crossed it. Four runs, one after the other, each on a
//! fresh relay and connection:
//! - `uncut`: the reference, what the model costs on the link without a cut;
//! - `cut-survived`: the federation's transport (60 s idle timeout) rides out the cut: QUIC
//!   resends what the cut dropped on the same connection;
//! - `cut-lost-resumed`: the connection dies in the cut (a 3 s idle timeout: a NAT or firewall
//!   that forgets the flow, a site whose connection drops), the receiver reconnects once the
//!   link is back and asks for the rest with what it kept ([`PartialSet::held`]), as a site
//!   agent does;
//! - `cut-lost-from-zero`: the same, asking for everything again (protocol 4's behaviour).
//!
//! Per run one JSON line: model bytes, the UDP payload bytes the link delivered towards the
//! receiver (`link_bytes`), `resent_share` = (link bytes - the uncut run's) / model bytes, the
//! tensor bytes the receiver got over all attempts, the attempts and the wall time.
//!
//! `cargo run -p fedtalent-protocol --example bench_resume [-- --mb 120 --mbit 100 --rtt-ms 20 --seed 1]`

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedtalent_certs::{
    client_config, client_endpoint, server_config, server_endpoint, transport_config, Allowlist, FederationCa, SiteKey,
};
use fedtalent_link::{LinkSpec, Relay};
use fedtalent_protocol::conn::{send_tensors_shared, SendStream};
use fedtalent_protocol::*;

#[path = "common/model.rs"]
mod common_model;
use common_model::model;

/// How long the link is cut, and at which share of the model's bytes.
const CUT: Duration = Duration::from_secs(10);
const CUT_AT: f64 = 0.9;

/// The coordinator's side: answers each `ModelRequest` with the model from where the request's
/// `held` ends; records the tensor bytes of every stream that completed.
async fn serve(endpoint: quinn::Endpoint, set: Arc<TensorSet>, sent: Arc<Mutex<Vec<u64>>>) {
    while let Some(incoming) = endpoint.accept().await {
        let (set, sent) = (set.clone(), sent.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                let Ok(Message::ModelRequest(request)) = read_frame(&mut recv, MAX_FRAME_BYTES).await else { return };
                let mut send = SendStream::Quic(send);
                let mut digests = TensorDigests::new(Transport::Native);
                if let Ok(s) = send_tensors_shared(&mut send, set.clone(), &mut digests, &request.held).await {
                    let _ = send.finish();
                    sent.lock().unwrap().push(s.bytes);
                }
            }
        });
    }
}

/// One attempt of the site's side: connect, ask for the model (with what it kept, if
/// `resume`), receive into `partial`.
async fn fetch(
    client: &quinn::Endpoint,
    to: SocketAddr,
    limits: &RecvLimits,
    partial: &mut PartialSet,
    resume: bool,
) -> Result<Received, String> {
    let conn = client.connect(to, "localhost").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let digest = limits.expected_digest.clone().expect("the model is announced");
    let held = if resume { partial.held(&digest) } else { Held::default() };
    let request = Message::ModelRequest(ModelRequest { digest, full: false, held });
    write_frame(&mut send, &request).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    recv_tensors_resumable(&mut recv, limits, partial).await.map_err(|e| e.to_string())
}

/// The configuration of one run.
struct Scenario {
    name: &'static str,
    cut: bool,
    /// The connection's idle timeout; `None`: the federation's transport as is (60 s).
    idle: Option<Duration>,
    resume: bool,
}

/// What one run measured.
struct Outcome {
    link_bytes: u64,
    received: Received,
    /// Tensor bytes of each completed stream the server sent.
    sent: Vec<u64>,
    secs: f64,
}

async fn run(scenario: &Scenario, set: &Arc<TensorSet>, link: &LinkSpec, cut_after: u64, seed: u64) -> Outcome {
    let ca = FederationCa::create("bench").unwrap();
    let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let mut transport = transport_config();
    if let Some(idle) = scenario.idle {
        transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle).unwrap()));
        transport.keep_alive_interval(Some(idle / 3));
    }
    let transport = Arc::new(transport);
    let mut server_cfg = server_config(ca.cert_pem(), &cert, &key, Allowlist::new(["site0"])).unwrap();
    server_cfg.transport_config(transport.clone());
    let server = server_endpoint(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(serve(server.clone(), set.clone(), sent.clone()));
    let relay = Arc::new(Relay::start(server.local_addr().unwrap(), link.clone(), link.clone(), seed).await.unwrap());
    let site = SiteKey::generate("site0").unwrap();
    let site_cert = ca.sign_site_csr(&site.csr_pem, 1).unwrap();
    let mut client = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut client_cfg = client_config(ca.cert_pem(), &site_cert, &site.key_pem).unwrap();
    client_cfg.transport_config(transport);
    client.set_default_client_config(client_cfg);

    if scenario.cut {
        let relay = relay.clone();
        tokio::spawn(async move {
            while relay.stats().down.delivered_bytes < cut_after {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            relay.cut_now(Some(CUT));
            eprintln!("  link cut for {CUT:?} after {} bytes", relay.stats().down.delivered_bytes);
        });
    }
    let limits = RecvLimits { expected_digest: Some(set.digest()), ..RecvLimits::for_manifest(set.manifest()) };
    let mut partial = PartialSet::default();
    let t = Instant::now();
    let received = loop {
        match fetch(&client, relay.addr(), &limits, &mut partial, scenario.resume).await {
            Ok(received) => break received,
            Err(e) => {
                eprintln!(
                    "  {:.1} s: attempt failed ({e}); kept {} bytes",
                    t.elapsed().as_secs_f64(),
                    partial.kept_bytes()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(received.set.digest(), set.digest(), "{}: the model arrived changed", scenario.name);
    let link_bytes = relay.stats().down.delivered_bytes;
    let sent = sent.lock().unwrap().clone();
    Outcome { link_bytes, received, sent, secs }
}

fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn load1() -> f64 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = arg(&args, "--mb").unwrap_or(120);
    let mbit: f64 = arg(&args, "--mbit").unwrap_or(100.0);
    let rtt = Duration::from_millis(arg(&args, "--rtt-ms").unwrap_or(20));
    let seed: u64 = arg(&args, "--seed").unwrap_or(1);
    let set = Arc::new(model(mb * 1_000_000));
    let model_bytes = set.total_bytes();
    let link = LinkSpec::wan(rtt, 0.0, mbit);
    let lost = Some(Duration::from_secs(3));
    let scenarios = [
        Scenario { name: "uncut", cut: false, idle: None, resume: true },
        Scenario { name: "cut-survived", cut: true, idle: None, resume: true },
        Scenario { name: "cut-lost-resumed", cut: true, idle: lost, resume: true },
        Scenario { name: "cut-lost-from-zero", cut: true, idle: lost, resume: false },
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut uncut_link = None;
    for scenario in &scenarios {
        let load_before = load1();
        // The cut comes at 90 % of what the uncut run put on the link.
        let cut_after = (uncut_link.unwrap_or(model_bytes) as f64 * CUT_AT) as u64;
        eprintln!("{}:", scenario.name);
        let o = rt.block_on(run(scenario, &set, &link, cut_after, seed));
        let reference = *uncut_link.get_or_insert(o.link_bytes);
        let resent = (o.link_bytes as f64 - reference as f64) / model_bytes as f64;
        println!(
            "{{\"run\":\"{}\",\"model_bytes\":{model_bytes},\"rtt_ms\":{},\"mbit_s\":{mbit},\"cut_s\":{},\"cut_at\":{CUT_AT},\
             \"idle_timeout_s\":{},\"link_bytes\":{},\"link_over_model\":{:.4},\"resent_share\":{:.4},\
             \"received_bytes\":{},\"attempts\":{},\"server_streams_completed_bytes\":{:?},\"wall_s\":{:.2},\
             \"load1_before\":{load_before},\"load1_after\":{}}}",
            scenario.name,
            rtt.as_millis(),
            if scenario.cut { CUT.as_secs() } else { 0 },
            scenario.idle.map_or(60, |d| d.as_secs()),
            o.link_bytes,
            o.link_bytes as f64 / model_bytes as f64,
            resent,
            o.received.received_bytes,
            o.received.attempts,
            o.sent,
            o.secs,
            load1(),
        );
    }
}
