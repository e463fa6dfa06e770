//! A model over QUIC with mutual TLS through the link emulator (issue 18): delay, jitter,
//! random loss, a bandwidth cap and a cut, with the transport configured as the federation
//! configures it. What arrives must be what was sent, digest and bytes.

use std::sync::Arc;
use std::time::Duration;

use fedtalent_certs::{
    client_config, client_endpoint, server_config, server_endpoint, Allowlist, FederationCa, SiteKey,
};
use fedtalent_link::{LinkSpec, Relay};
use fedtalent_protocol::quic::{recv_tensors_uni, send_tensors_uni};
use fedtalent_protocol::{RecvLimits, TensorDigests, TensorSet, Transport, WireTensor};

/// A seeded pseudo-random model of `tensors` tensors of 256 Ki f32 (1 MiB) each.
fn model(tensors: u32) -> TensorSet {
    let mut x = 0x9e37_79b9u32;
    let mut set = TensorSet::default();
    for i in 0..tensors {
        let vals: Vec<f32> = (0..1 << 18)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as f32 / u32::MAX as f32 - 0.5
            })
            .collect();
        set.push(WireTensor::from_f32(format!("layer{i}.weight"), vec![1 << 18], &vals));
    }
    set
}

/// A coordinator and one site, connected with mutual TLS through a relay shaping both
/// directions with `link`: (coordinator side, site side, site endpoint, relay).
async fn connect_through(link: LinkSpec) -> (quinn::Connection, quinn::Connection, quinn::Endpoint, Relay) {
    let ca = FederationCa::create("wan-test").unwrap();
    let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let cfg = server_config(ca.cert_pem(), &cert, &key, Allowlist::new(["site-a"])).unwrap();
    let server = server_endpoint(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let relay = Relay::start(server.local_addr().unwrap(), link.clone(), link, 18).await.unwrap();
    let site = SiteKey::generate("site-a").unwrap();
    let site_cert = ca.sign_site_csr(&site.csr_pem, 1).unwrap();
    let mut client = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config(ca.cert_pem(), &site_cert, &site.key_pem).unwrap());
    let connecting = client.connect(relay.addr(), "localhost").unwrap();
    let accepting = async { server.accept().await.unwrap().await };
    let (site_conn, coordinator_conn) = tokio::join!(connecting, accepting);
    (coordinator_conn.unwrap(), site_conn.unwrap(), client, relay)
}

/// Sends `set` from `from` to `to`; returns what arrived, checked against the sender's digest.
async fn transfer(from: &quinn::Connection, to: &quinn::Connection, set: &Arc<TensorSet>) -> TensorSet {
    let limits = RecvLimits::for_manifest(set.manifest());
    let mut digests = TensorDigests::new(Transport::Native);
    let (sent, received) =
        tokio::join!(send_tensors_uni(from, set.clone(), &mut digests), recv_tensors_uni(to, &limits));
    let (received, received_digest) = received.unwrap();
    assert_eq!(sent.unwrap(), received_digest, "the receiver's digest differs from the sender's");
    received
}

/// 40 ms round trip ± 2 ms jitter, 1 % loss each way, 50 Mbit/s behind a BDP queue.
fn lossy_wan() -> LinkSpec {
    LinkSpec { jitter: Duration::from_millis(2), ..LinkSpec::wan(Duration::from_millis(40), 0.01, 50.0) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_crosses_a_lossy_wan_intact_both_ways() {
    let (coordinator, site, endpoint, relay) = connect_through(lossy_wan()).await;
    let set = Arc::new(model(4));
    let down = tokio::time::timeout(Duration::from_secs(25), transfer(&coordinator, &site, &set)).await;
    assert!(down.expect("download over the emulated WAN took over 25 s") == *set, "download altered");
    let up = tokio::time::timeout(Duration::from_secs(25), transfer(&site, &coordinator, &set)).await;
    assert!(up.expect("upload over the emulated WAN took over 25 s") == *set, "upload altered");
    // The link did lose datagrams (so QUIC recovered them), and the path settled at a WAN size.
    let stats = relay.stats();
    assert!(stats.down.dropped_loss > 0 && stats.up.dropped_loss > 0, "{stats:?}");
    assert!(site.stats().path.current_mtu <= 1472, "{:?}", site.stats().path);
    site.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_survives_a_two_second_cut() {
    let (coordinator, site, endpoint, relay) = connect_through(lossy_wan()).await;
    let set = Arc::new(model(4));
    let transfer = transfer(&coordinator, &site, &set);
    let cut = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay.cut_now(Some(Duration::from_secs(2)));
    };
    let (received, ()) = tokio::time::timeout(Duration::from_secs(25), async { tokio::join!(transfer, cut) })
        .await
        .expect("transfer across a 2 s cut took over 25 s");
    assert!(received == *set, "download altered");
    let stats = relay.stats();
    assert!(stats.down.dropped_cut > 0, "the cut fell after the transfer: {stats:?}");
    site.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}
