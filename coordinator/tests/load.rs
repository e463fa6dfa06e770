//! Load (issue 21): 100 protocol-level sites (no training: each registers, long-polls, and
//! uploads the tiny preset's model back every round) against one `coordinator serve` process
//! on loopback, 3 rounds. Prints each round's wall and close time and the coordinator's peak
//! RSS and CPU seconds; asserts that every site took part in every round, none refused.

mod peer;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedtalent_certs::FederationCa;
use fedtalent_coordinator::metrics::{MetricsLine, RoundLine, SiteLine};
use fedtalent_coordinator::state::StateDir;
use fedtalent_coordinator::FederationConfig;
use peer::Peer;

const SITES: usize = 100;
const ROUNDS: u32 = 3;

/// How long the whole federation may take (about 10 s on 2 busy cores, debug build).
const FEDERATION_TIMEOUT: Duration = Duration::from_secs(300);

/// `coordinator serve` as a child process, killed on drop (a failing test leaves none behind).
struct Served {
    child: Child,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the coordinator process used, from /proc.
#[derive(Debug)]
struct Usage {
    peak_rss_mib: f64,
    cpu_s: f64,
}

impl Served {
    fn usage(&self) -> Usage {
        let proc = PathBuf::from(format!("/proc/{}", self.child.id()));
        let status = std::fs::read_to_string(proc.join("status")).expect("the coordinator is running");
        let hwm_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        // utime and stime, fields 14 and 15, follow the parenthesised command name; /proc
        // counts them in USER_HZ, 100 on Linux.
        let stat = std::fs::read_to_string(proc.join("stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Usage { peak_rss_mib: hwm_kib / 1024.0, cpu_s: ticks as f64 / 100.0 }
    }
}

fn site_names() -> Vec<String> {
    (0..SITES).map(|i| format!("site{i:03}")).collect()
}

/// `coordinator init` for `sites`, then the plan of this test: the tiny preset, [`ROUNDS`]
/// rounds, every site needed in every round, and `serve` kept running after the last round
/// (so that its usage can be read).
fn init_federation(dir: &Path, sites: &[String]) -> (PathBuf, SocketAddr) {
    let listen: SocketAddr = (Ipv4Addr::LOCALHOST, peer::free_port()).into();
    let init = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["init", "--name", "load", "--dir"])
        .arg(dir)
        .args(["--listen", &listen.to_string(), "--sites", &sites.join(",")])
        .output()
        .unwrap();
    assert!(init.status.success(), "coordinator init: {}", String::from_utf8_lossy(&init.stderr));
    let path = dir.join("federation.toml");
    let mut config: FederationConfig = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let plan = &mut config.plan;
    (plan.preset, plan.rounds, plan.local_steps, plan.eval_every) = ("tiny".into(), ROUNDS, 1, 1);
    (plan.min_sites, plan.round_deadline_s) = (SITES as u32, 600);
    config.federation.exit_when_done = false;
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    (path, listen)
}

fn serve(config: &Path, log: &Path) -> Served {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Served { child }
}

/// An honest site without training: joins, then sends each round's model back unchanged;
/// returns the rounds it was handed.
async fn run_site(peer: Peer) -> Vec<u32> {
    peer.join().await;
    let mut rounds = Vec::new();
    while let Some(work) = peer.next_work().await {
        let (accepted, reason) = peer.honest_update(&work).await;
        assert!(accepted, "site {}: the update of round {} was refused: {reason}", peer.site, work.round);
        rounds.push(work.round);
    }
    rounds
}

/// Site `i`'s own loopback address: the coordinator rate-limits handshakes per address, as it
/// would see 100 hospitals from 100 addresses.
fn address_of(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 2 + (i % 250) as u8))
}

/// Each round's line of the metrics log, with the megabytes its sites uploaded and downloaded.
fn round_lines(state: &Path) -> Vec<(RoundLine, f64, f64)> {
    let metrics = StateDir::open(state).unwrap().read_metrics().unwrap();
    let moved = |round: u32, bytes: fn(&SiteLine) -> u64| -> f64 {
        let sum: u64 = metrics
            .iter()
            .filter_map(|m| match m {
                MetricsLine::Site(s) if s.round == round => Some(bytes(s)),
                _ => None,
            })
            .sum();
        sum as f64 / 1e6
    };
    metrics
        .iter()
        .filter_map(|m| match m {
            MetricsLine::Round(r) => {
                Some((r.clone(), moved(r.round, |s| s.bytes_up), moved(r.round, |s| s.bytes_down)))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_sites_three_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let sites = site_names();
    let (config, listen) = init_federation(dir.path(), &sites);
    let pki = dir.path().join("pki");
    let ca =
        FederationCa::load(&pki.join(fedtalent_certs::CA_CERT_FILE), &pki.join(fedtalent_certs::CA_KEY_FILE)).unwrap();
    let log = dir.path().join("coordinator.log");
    let started = Instant::now();
    let served = serve(&config, &log);
    let mut running = tokio::task::JoinSet::new();
    for (i, site) in sites.iter().enumerate() {
        let peer = peer::connect(&ca, listen, site, address_of(i)).await;
        running.spawn(run_site(peer));
    }
    let all = tokio::time::timeout(FEDERATION_TIMEOUT, running.join_all()).await;
    let elapsed = started.elapsed();
    let usage = served.usage();
    let Ok(handed) = all else {
        panic!("the federation did not finish within {FEDERATION_TIMEOUT:?}; see {}", log.display())
    };
    let every_round: Vec<u32> = (1..=ROUNDS).collect();
    assert!(handed.iter().all(|rounds| *rounds == every_round), "a site missed a round: {handed:?}");
    let rounds = round_lines(&dir.path().join("state"));
    eprintln!("{SITES} sites, {ROUNDS} rounds: {elapsed:.1?} from starting serve to the last Finished");
    for (r, up, down) in &rounds {
        eprintln!(
            "round {}: {} sites, wall {} ms (open to commit), close {} ms (aggregation and checkpoint), {up:.0} MB up, {down:.0} MB down",
            r.round, r.sites, r.wall_ms, r.close_ms
        );
    }
    eprintln!("coordinator: peak RSS {:.0} MiB, CPU {:.1} s", usage.peak_rss_mib, usage.cpu_s);
    assert_eq!(rounds.len(), ROUNDS as usize, "{rounds:?}");
    for (r, _, _) in &rounds {
        let participation = r.participation.as_ref().expect("participation");
        assert_eq!(participation.expected, sites, "round {}", r.round);
        assert!(participation.refusals.is_empty(), "round {}: {:?}", r.round, participation.refusals);
        assert_eq!(r.sites, SITES, "round {}", r.round);
    }
}
