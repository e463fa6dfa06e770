//! Scale with real training (issue 21): 10 real `site-agent run` processes of the tiny preset
//! against one `coordinator serve` on loopback, 3 rounds. Prints each round's open-to-commit
//! time and the coordinator's peak RSS and CPU seconds; asserts that every site took part in
//! every round and none was refused. (coordinator/tests/load.rs does 100 protocol-level sites.)
//! About 60 s on this 2-core machine beside other jobs; the figures are in README's Benchmarks.

use std::time::{Duration, Instant};

use fedtalent_tests::{process_usage, wait_child, Children, LocalFederation, Plan};

const SITES: usize = 10;
const ROUNDS: u32 = 3;

/// The phantom kinds, reused under new site names: each site still gets its own patients.
const KINDS: [&str; 6] = ["liver", "pancreas", "multiorgan", "kidney", "liver_novessels", "liver_wide"];

/// Ten sites of the tiny preset, three rounds of one local step, 3 phantom cases each (2 to
/// train, 1 to evaluate, which the sites do in the first and the last round only), one torch
/// thread per agent. Every round must count all ten sites: `min_sites` is ten, the deadline far
/// beyond what a round takes, and the metrics log must list each site in each round and no
/// refusal. `serve` stays up after the last round so that its usage can be read from /proc.
#[test]
fn ten_site_agents_three_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..SITES).map(|i| format!("site{i:02}")).collect();
    let sites: Vec<(&str, &str)> = names.iter().map(String::as_str).zip(KINDS.iter().copied().cycle()).collect();
    let plan = Plan {
        rounds: ROUNDS,
        local_steps: 1,
        min_sites: SITES as u32,
        deadline_s: 600,
        eval_every: ROUNDS,
        cases: 3,
        exit_when_done: false,
        torch_threads: Some(1),
        ..Plan::default()
    };
    let fed = LocalFederation::create_named(dir.path(), &sites, plan);
    let started = Instant::now();
    let mut procs = Children(vec![fed.spawn_coordinator()]);
    for site in &fed.sites {
        procs.0.push(fed.spawn_site(site, &["--quiet"]));
    }
    for (i, site) in fed.sites.iter().enumerate() {
        let status = wait_child(&mut procs.0[i + 1], Duration::from_secs(900), site);
        assert!(status.success(), "site {site} failed:\n{}\ncoordinator:\n{}", fed.log(site), fed.log("coordinator"));
    }
    let elapsed = started.elapsed();
    let coordinator = &mut procs.0[0];
    assert!(coordinator.try_wait().unwrap().is_none(), "serve exited:\n{}", fed.log("coordinator"));
    let usage = process_usage(coordinator.id());

    let rounds: Vec<serde_json::Value> = fed.metrics().into_iter().filter(|m| m["kind"] == "round").collect();
    eprintln!("{SITES} site agents, {ROUNDS} rounds: {elapsed:.1?} from starting serve to the last site's exit");
    for r in &rounds {
        eprintln!(
            "round {}: {} sites, open to commit {} ms, close {} ms (aggregation and checkpoint)",
            r["round"], r["sites"], r["wall_ms"], r["close_ms"]
        );
    }
    eprintln!("coordinator: peak RSS {:.0} MiB, CPU {:.1} s", usage.peak_rss_mib, usage.cpu_s);

    assert_eq!(fed.completed_rounds(), (1..=ROUNDS).collect::<Vec<_>>());
    assert_eq!(rounds.len(), ROUNDS as usize, "{rounds:?}");
    let site_lines: Vec<serde_json::Value> = fed.metrics().into_iter().filter(|m| m["n_cases"].is_u64()).collect();
    for (r, round) in rounds.iter().zip(1..) {
        assert_eq!(r["round"], round, "{r}");
        assert_eq!(r["sites"], SITES, "round {round}: not every site counted: {r}");
        assert_eq!(r["participation"]["expected"], serde_json::json!(names), "round {round}: {r}");
        assert_eq!(r["participation"]["refusals"], serde_json::json!([]), "round {round}: a site was refused: {r}");
        let mut reported: Vec<&str> =
            site_lines.iter().filter(|s| s["round"] == round).map(|s| s["site"].as_str().unwrap()).collect();
        reported.sort_unstable();
        assert_eq!(reported, names, "round {round}: the sites of its metrics lines");
        let contributions = fed.round_record(round)["contributions"].as_array().unwrap().len();
        assert_eq!(contributions, SITES, "round {round}: contributions in round.json");
    }
    let log = fed.log("coordinator");
    assert!(!log.contains("refused"), "the coordinator refused something:\n{log}");
}
