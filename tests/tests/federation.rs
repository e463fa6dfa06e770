//! End-to-end federation on loopback: real `coordinator` and `site-agent` processes, real QUIC
//! with mutual TLS, real (tiny, CPU) training on phantom sites with overlapping class sets.

use std::time::Duration;

use fedtalent_tests::{tensor as get, wait_child, Children, LocalFederation, Plan};

/// Starts the coordinator and every site of `fed`, and waits until all of them exit
/// successfully (the coordinator within `timeout`, each site within a minute after it).
fn run_to_the_end(fed: &LocalFederation, timeout: Duration) {
    run_to_the_end_with(fed, timeout, &[], |_| Vec::new());
}

/// [`run_to_the_end`] with extra arguments of `coordinator serve` and of each `site-agent run`.
fn run_to_the_end_with(
    fed: &LocalFederation,
    timeout: Duration,
    coordinator: &[&str],
    site_args: impl Fn(&str) -> Vec<String>,
) {
    let mut procs = Children(vec![fed.spawn_coordinator_with(coordinator)]);
    for site in &fed.sites {
        let args = site_args(site);
        procs.0.push(fed.spawn_site(site, &args.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    let status = wait_child(&mut procs.0[0], timeout, "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    for (i, site) in fed.sites.iter().enumerate() {
        let status = wait_child(&mut procs.0[i + 1], Duration::from_secs(60), "site");
        assert!(status.success(), "site {site} failed:\n{}", fed.log(site));
    }
}

/// Three sites, four rounds: the aggregate is the sqrt(n)-weighted mean of the uploads, every
/// class's heads are its owner's upload, and the global model's Dice rises over the rounds.
/// What people look at is checked against the metrics log: progress.png, the HTML report and
/// the coordinator's and a site's TensorBoard curves (read by TensorBoard's own reader).
#[test]
fn three_sites_four_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 4, local_steps: 20, cases: 5, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas", "multiorgan"], plan);
    let (tb, tb_liver) = (dir.path().join("tb"), dir.path().join("tb-liver"));
    let liver_args = |site: &str| match site {
        "liver" => vec!["--quiet".to_string(), "--tensorboard".to_string(), tb_liver.display().to_string()],
        _ => vec!["--quiet".to_string()],
    };
    run_to_the_end_with(&fed, Duration::from_secs(900), &["--tensorboard", tb.to_str().unwrap()], liver_args);
    assert_eq!(fed.completed_rounds(), vec![1, 2, 3, 4]);
    check_the_curves(&fed, &tb, &tb_liver, 4, 20);
    check_the_preview(&fed);

    // Recompute the last round's aggregate from what each site uploaded (its saved local model).
    let uploads = fed.round_uploads(4);
    let (record, global, locals) = (&uploads.record, &uploads.global, &uploads.locals);
    let contributions = record["contributions"].as_array().unwrap();
    assert_eq!(contributions.len(), 3);
    for (c, w) in contributions.iter().zip(&uploads.weights) {
        assert!((c["weight"].as_f64().unwrap() - w).abs() < 1e-12, "weight of {}", c["site"]);
    }
    let checked = uploads.assert_weighted_mean(|name| !name.starts_with("seg_outputs"));
    assert!(checked > 40, "only {checked} backbone tensors compared");
    // Every class's heads are its owner's upload, at the class's index.
    let classes = record["classes"].as_array().unwrap();
    let sites: Vec<&str> = contributions.iter().map(|c| c["site"].as_str().unwrap()).collect();
    for class in classes {
        let site = class["site"].as_str().unwrap();
        let local = &locals[sites.iter().position(|s| *s == site).unwrap()];
        let local_row =
            classes.iter().filter(|c| c["site"] == site).position(|c| c["id"] == class["id"]).unwrap() as i64;
        for level in 0..3 {
            let name = format!("seg_outputs.{level}.weight");
            let ours = get(global, &name).get(class["index"].as_i64().unwrap());
            assert!(ours.equal(&get(local, &name).get(local_row)), "{name} of {}", class["id"]);
        }
    }

    // The round-time breakdown covers every round.
    let report = fedtalent_tests::run_ok(
        std::process::Command::new(fedtalent_tests::binary("coordinator"))
            .args(["report", "--config"])
            .arg(fed.config_path()),
    );
    let table = String::from_utf8_lossy(&report.stdout);
    assert_eq!(table.lines().filter(|l| l.trim_end().ends_with('%')).count(), 4, "{table}");

    // Dice of the global model, reported by the sites at the start of each round, rises from the
    // initial model (reported in round 1) to round 3's model (reported in round 4).
    let metrics = fed.metrics();
    let mean_dice = |round: u64| {
        let v: Vec<f64> =
            metrics.iter().filter(|m| m["round"].as_u64() == Some(round)).filter_map(|m| m["dice"].as_f64()).collect();
        assert!(!v.is_empty(), "no Dice reported in round {round}");
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (first, last) = (mean_dice(1), mean_dice(4));
    eprintln!("mean Dice of the global model: {first:.3} (initial) -> {last:.3} (round 3's model)");
    assert!(last > first + 0.02, "mean Dice did not rise: {first:.3} (initial model) -> {last:.3} (round 3's model)");
}

/// progress.png, `coordinator report --html` and the TensorBoard runs of a finished federation
/// of `rounds` rounds of `steps` local steps, against its metrics log.
fn check_the_curves(fed: &LocalFederation, tb: &std::path::Path, tb_site: &std::path::Path, rounds: u32, steps: u32) {
    let metrics = fed.metrics();
    // progress.png: a PNG of nnU-Net's size (width and height are IHDR's first fields).
    let png = std::fs::read(fed.state_dir().join("progress.png")).expect("state/progress.png");
    assert_eq!(&png[1..4], b"PNG");
    let size = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((size(16), size(20)), (1600, 1100));

    // The HTML report: one figure per plot, the Dice table's numbers the log's last ones.
    let html = fed.dir.join("report.html");
    fedtalent_tests::run_ok(
        std::process::Command::new(fedtalent_tests::binary("coordinator"))
            .args(["report", "--config"])
            .arg(fed.config_path())
            .arg("--html")
            .arg(&html),
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("src=\"data:image/svg+xml;base64,").count(), 4, "one embedded figure per plot");
    let dice: Vec<&serde_json::Value> = metrics.iter().filter(|m| m["dice"].is_f64()).collect();
    let last_model = dice.iter().map(|m| m["model_round"].as_u64().unwrap()).max().unwrap();
    let mut rows = 0;
    for m in dice.iter().filter(|m| m["model_round"].as_u64() == Some(last_model)) {
        let class = m["class"].as_str().unwrap();
        let shown = format!("{:.4}", m["dice"].as_f64().unwrap() as f32);
        let row = page.split("<tr>").find(|r| r.starts_with(&format!("<td class=\"name\">{class}</td>"))).unwrap();
        assert!(row.contains(&format!("<td>{shown}</td>")), "class {class}: {shown} not in {row}");
        rows += 1;
    }
    assert!(rows >= 8, "only {rows} classes in the Dice table");

    // The coordinator's TensorBoard run holds the log's numbers at their steps.
    let scalars = fedtalent_tests::tensorboard_scalars(tb);
    let at = |tag: &str, step: u64| -> f64 {
        let points = scalars.get(tag).unwrap_or_else(|| panic!("no {tag} in {:?}", scalars.keys()));
        points.iter().find(|p| p.0 == step as i64).unwrap_or_else(|| panic!("no {tag} at {step}")).1
    };
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    let mut checked = 0;
    for m in &metrics {
        let round = m["round"].as_u64().unwrap();
        if let Some(loss) = m["train_loss"].as_f64() {
            let site = m["site"].as_str().unwrap();
            assert!(same(at(&format!("loss/{site}"), round), loss as f32 as f64), "loss of {site} in round {round}");
            let bytes = m["bytes_up"].as_f64().unwrap();
            assert!(same(at(&format!("bytes_up/{site}"), round), bytes as f32 as f64));
            checked += 2;
        } else if let Some(d) = m["dice"].as_f64() {
            let tag = format!("dice/{}", m["class"].as_str().unwrap());
            assert!(same(at(&tag, m["model_round"].as_u64().unwrap()), d as f32 as f64), "{tag}");
            checked += 1;
        } else if m["kind"] == "round" {
            assert!(same(at("round_time/wall_s", round), (m["wall_ms"].as_f64().unwrap() / 1e3) as f32 as f64));
            assert_eq!(at("participation/reported", round), m["sites"].as_f64().unwrap());
            checked += 2;
        }
    }
    assert!(checked > 30, "only {checked} numbers compared");

    // The site's local run: the loss of every step, each round's mean loss, its classes' Dice.
    let local = fedtalent_tests::tensorboard_scalars(tb_site);
    assert!(local["loss/step"].len() >= (rounds * steps) as usize, "a loss per local step");
    assert_eq!(local["loss/round"].iter().map(|p| p.0).collect::<Vec<_>>(), (1..=rounds as i64).collect::<Vec<_>>());
    for m in metrics.iter().filter(|m| m["site"] == "liver" && m.get("train_loss").is_some()) {
        let round = m["round"].as_i64().unwrap();
        let mean = local["loss/round"].iter().find(|p| p.0 == round).unwrap().1;
        assert!(same(mean, m["train_loss"].as_f64().unwrap() as f32 as f64), "liver's loss of round {round}");
    }
    assert!(local.keys().any(|k| k.starts_with("dice/liver/")), "{:?}", local.keys());
}

/// `site-agent predict --preview` of the exported model on a phantom: a PNG beside the masks,
/// as wide as the three slices.
fn check_the_preview(fed: &LocalFederation) {
    let model = fed.dir.join("model");
    fed.export(&model);
    let image = fed.dir.join("data/Dataset001_liver/imagesTr/liver_000_0000.nii.gz");
    let masks = fed.dir.join("masks");
    fedtalent_tests::run_ok(
        std::process::Command::new(fedtalent_tests::binary("site-agent"))
            .args(["predict", "--device", "cpu", "--preview", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&image)
            .arg("--output")
            .arg(&masks),
    );
    let png = std::fs::read(masks.join("liver_000/preview.png")).expect("the preview beside the masks");
    assert_eq!(&png[1..4], b"PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert!(width > 3 * 200, "three slices side by side: {width} px");
}

/// Local DP (`noise = "sites"`): every site's upload is its change clipped to C plus noise of
/// std σ·C that it added itself, and the coordinator adds nothing: the global backbone is the
/// plain weighted mean of the uploads, and each upload's change from the round's start has the
/// sites' noise std. ε is reported as for central DP.
#[test]
fn sites_noise_their_own_changes_under_local_dp() {
    let dir = tempfile::tempdir().unwrap();
    let privacy =
        fedtalent_vocab::Privacy { noise: fedtalent_vocab::NoiseAt::Sites, ..fedtalent_vocab::Privacy::dp(0.002, 0.5) };
    let plan = Plan { rounds: 2, local_steps: 5, cases: 4, privacy: Some(privacy), ..Plan::default() };
    let sites = ["liver", "pancreas"];
    let fed = LocalFederation::create(dir.path(), &sites, plan);
    run_to_the_end(&fed, Duration::from_secs(600));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    let uploads = fed.round_uploads(2);
    let backbone = |name: &str| !name.starts_with("seg_outputs");
    assert!(uploads.assert_weighted_mean(backbone) > 10, "the coordinator changed the sites' noised mean");
    let before = fedtalent_tests::read_tensors(&fed.state_dir().join("rounds/round-000001/model.safetensors"));
    for (site, local) in sites.iter().zip(&uploads.locals) {
        let changes: Vec<tch::Tensor> = before
            .iter()
            .filter(|(n, _)| backbone(n))
            .map(|(n, t)| (fedtalent_tests::tensor(local, n) - t).to_kind(tch::Kind::Double).flatten(0, -1))
            .collect();
        let change = tch::Tensor::cat(&changes, 0);
        let std = f64::try_from(change.std(true)).unwrap();
        let expected = privacy.site_noise_std();
        assert!((std / expected - 1.0).abs() < 0.05, "{site}: change std {std}, the sites' noise is {expected}");
    }
    let spent = fed.round_privacy();
    let epsilon = spent.last().unwrap()["epsilon"].as_f64().unwrap();
    assert!((epsilon - privacy.epsilon(2)).abs() < 1e-9, "ε {epsilon}");
}

/// `[plan.privacy]` end to end: two sites, three planned rounds and an ε budget that two of
/// them fit. The federation stops after round 2; each round's metrics carry the accountant's ε;
/// the last global backbone is the previous one plus the weighted sum of the clipped changes
/// plus noise of the stated std (recomputed from the uploads); `coordinator status` prints ε.
#[test]
fn private_backbone_stops_at_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let privacy = fedtalent_vocab::Privacy::dp(0.05, 1.0);
    let budget = (privacy.epsilon(2) + privacy.epsilon(3)) / 2.0;
    let plan = Plan {
        rounds: 3,
        local_steps: 5,
        cases: 4,
        privacy: Some(fedtalent_vocab::Privacy { epsilon_budget: Some(budget), ..privacy }),
        ..Plan::default()
    };
    let sites = ["liver", "pancreas"];
    let fed = LocalFederation::create(dir.path(), &sites, plan);
    run_to_the_end(&fed, Duration::from_secs(600));
    assert_eq!(fed.completed_rounds(), vec![1, 2], "the budget allows two rounds");

    let spent = fed.round_privacy();
    assert_eq!(spent.len(), 2);
    for (round, p) in spent.iter().enumerate() {
        let epsilon = p["epsilon"].as_f64().unwrap_or_else(|| panic!("round {} has no ε: {p}", round + 1));
        assert!((epsilon - privacy.epsilon(round as u32 + 1)).abs() < 1e-9, "round {}: ε {epsilon}", round + 1);
    }
    let noise_std = spent[1]["noise_std"].as_f64().unwrap();
    let uploads = fed.round_uploads(2);
    let before = fedtalent_tests::read_tensors(&fed.state_dir().join("rounds/round-000001/model.safetensors"));
    uploads.assert_dp_noise(&before, 0.05, noise_std);

    let status = fedtalent_tests::run_ok(
        std::process::Command::new(fedtalent_tests::binary("coordinator"))
            .args(["status", "--config"])
            .arg(fed.config_path()),
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("{:.3}", privacy.epsilon(2))) && text.contains("differential privacy"), "{text}");
    let report = fedtalent_tests::run_ok(
        std::process::Command::new(fedtalent_tests::binary("coordinator"))
            .args(["report", "--config"])
            .arg(fed.config_path()),
    );
    let table = String::from_utf8_lossy(&report.stdout);
    assert!(table.contains("epsilon"), "{table}");
    let last = table.lines().rfind(|l| !l.trim().is_empty()).unwrap();
    assert!(last.trim_end().ends_with(&format!("{:.3}", privacy.epsilon(2))), "{table}");
}
