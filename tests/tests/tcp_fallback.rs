//! The TLS-over-TCP fallback end to end (issue 18): a site whose network blocks UDP (its QUIC
//! packets go to a socket that never answers) tries QUIC, falls back to TLS over TCP after the
//! bounded wait, and trains every round beside a site on QUIC; the coordinator logs which
//! transport each site uses. Its TCP goes through a `TcpRelay` of 20 ms round trip and
//! 200 Mbit/s (fedtalent-link; a TCP relay has no packet loss).

use std::fs;
use std::net::UdpSocket;
use std::time::Duration;

use fedtalent_link::{LinkSpec, TcpRelay};
use fedtalent_tests::{wait_child, Children, LocalFederation, Plan};

/// Points `site`'s QUIC at `udp` and its TLS over TCP at `tcp`.
fn block_udp(fed: &LocalFederation, site: &str, udp: u16, tcp: std::net::SocketAddr) {
    let path = fed.site_dir(site).join("site.toml");
    let text = fs::read_to_string(&path).unwrap();
    let line = format!("coordinator = \"127.0.0.1:{}\"", fed.port);
    assert!(text.contains(&line), "{text}");
    let blocked = format!("coordinator = \"127.0.0.1:{udp}\"\ncoordinator_tcp = \"{tcp}\"");
    fs::write(&path, text.replace(&line, &blocked)).unwrap();
}

#[test]
fn a_site_behind_a_udp_blocking_firewall_falls_back_to_tcp_and_trains() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 2, local_steps: 2, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas"], plan);
    // A UDP socket that swallows every datagram: no handshake answer, no ICMP error either.
    let black_hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Its TCP crosses an emulated WAN link (the relay runs on a runtime of this test).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let link = LinkSpec::wan(Duration::from_millis(20), 0.0, 200.0);
    let coordinator: std::net::SocketAddr = format!("127.0.0.1:{}", fed.port).parse().unwrap();
    let relay = runtime.block_on(TcpRelay::start(coordinator, link.clone(), link, 1)).unwrap();
    block_udp(&fed, "pancreas", black_hole.local_addr().unwrap().port(), relay.addr());
    let mut procs =
        Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &[]), fed.spawn_site("pancreas", &[])]);
    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    for round in [1, 2] {
        let sites = fed.round_sites(round);
        assert_eq!(sites, vec!["liver", "pancreas"], "round {round}");
    }
    let log = fed.log("coordinator");
    let connected = |site: &str, transport: &str| {
        log.lines().any(|l| {
            l.contains("connected")
                && l.contains(&format!("site={site}"))
                && l.contains(&format!("transport={transport}"))
        })
    };
    assert!(connected("pancreas", "tcp"), "the UDP-blocked site is not shown on TCP:\n{log}");
    assert!(connected("liver", "quic"), "the other site is not shown on QUIC:\n{log}");
    assert!(!connected("pancreas", "quic"), "the UDP-blocked site got through on QUIC:\n{log}");
    let site_log = fed.log("pancreas");
    assert!(site_log.contains("trying TLS over TCP"), "no fallback logged by the site:\n{site_log}");
    let carried = relay.stats();
    assert!(carried.down_bytes > 0 && carried.up_bytes > 0, "the relay carried {carried:?}");
    drop(black_hole);
}
