//! Sites of other modalities than CT: a two-channel MR phantom site (T1, T2) passes `check`,
//! trains and predicts with per-image z-scoring; a site whose channels are not the federation's is
//! refused by name, before joining (`check`) and at registration.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fedtalent_tests::{binary, run_ok, wait_child, Children, LocalFederation, Plan};

fn small_plan() -> Plan {
    Plan { cases: 3, min_sites: 1, shape: [20, 40, 40], ..Plan::default() }
}

fn site_agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("site-agent"));
    cmd.args(args);
    cmd
}

/// The masks `predict` wrote for one case, by file name.
fn masks_of(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    names
}

#[test]
fn a_two_channel_mr_site_checks_trains_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::create(dir.path(), &["mr_liver"], small_plan());
    let site_toml = fed.site_dir("mr_liver").join("site.toml");
    let site = site_toml.to_str().unwrap();

    let checked = run_ok(&mut site_agent(&["check", "--device", "cpu", "--config", site]));
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(stdout.contains("input channels: T1 (zscore), T2 (zscore)") && stdout.contains("no problems"), "{stdout}");

    let out = dir.path().join("trained");
    run_ok(
        site_agent(&["train", "--site", site, "--device", "cpu", "--preset", "tiny", "--steps", "3", "--out"])
            .arg(&out),
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/model.json")).unwrap()).unwrap();
    assert_eq!(manifest["topology"]["in_channels"], 2, "{manifest}");
    assert_eq!(
        manifest["channels"],
        serde_json::json!([{"name": "T1", "normalization": "zscore"}, {"name": "T2", "normalization": "zscore"}])
    );

    // A folder with the case's two channel files is one input, named by its _0000 file.
    let test = dir.path().join("data/test");
    let input = dir.path().join("scans");
    std::fs::create_dir_all(&input).unwrap();
    for k in 0..2 {
        let name = format!("test_mr_000_{k:04}.nii.gz");
        std::fs::copy(test.join(&name), input.join(&name)).unwrap();
    }
    let masks = dir.path().join("masks");
    let model = out.join("model");
    let predicted = run_ok(
        site_agent(&["predict", "--device", "cpu", "--preview", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&masks),
    );
    let stdout = String::from_utf8_lossy(&predicted.stdout);
    assert_eq!(stdout.lines().filter(|l| l.contains("masks in")).count(), 1, "{stdout}");
    assert_eq!(
        masks_of(&masks.join("test_mr_000")),
        ["classes.json", "mr_liver__liver.nii.gz", "mr_liver__liver_tumour.nii.gz", "preview.png"],
        "{stdout}"
    );
    let mask = fedtalent_data::read_label_nifti(masks.join("test_mr_000/mr_liver__liver.nii.gz")).unwrap();
    let image = fedtalent_data::read_nifti(test.join("test_mr_000_0000.nii.gz")).unwrap();
    assert_eq!(mask.data.dim(), image.data.dim());

    // evaluate reads the labelled MR dataset's cases as channels too, and refuses a CT dataset
    // (same count would be possible, another modality never is) naming the channels.
    let evaluate = |data: &Path| {
        site_agent(&["evaluate", "--device", "cpu", "--site", "mr_liver", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(data)
            .output()
            .unwrap()
    };
    let evaluated = evaluate(&dir.path().join("data/Dataset001_mr_liver"));
    let stdout = String::from_utf8_lossy(&evaluated.stdout);
    assert!(evaluated.status.success() && stdout.contains("mr_liver/liver"), "{stdout}");
    let ct = LocalFederation::create(&dir.path().join("ct"), &["liver"], small_plan());
    let refused = evaluate(&ct.dir.join("data/Dataset001_liver"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("not the model's input channels")
            && stderr.contains("the dataset has 1 input channel(s) (CT) but the federation declares 2"),
        "{stderr}"
    );
    // The CT test image is not an input of this model: named `_0000`, it lacks its `_0001`.
    let refused = site_agent(&["predict", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(test.join("test_000_0000.nii.gz"))
        .arg("--output")
        .arg(&masks)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("test_000_0001.nii.gz: missing: 2 input channels are declared, one file each"),
        "{stderr}"
    );
}

#[test]
fn a_site_with_other_channels_is_refused_by_name() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // The federation declares one CT channel (the default); the MR site has T1 and T2.
    let plan = Plan { rounds: 1, local_steps: 2, ..small_plan() };
    let fed = LocalFederation::create(dir.path(), &["liver", "mr_liver"], plan);
    let site_toml = fed.site_dir("mr_liver").join("site.toml");

    // Told the federation's channels, `check` refuses before joining.
    let toml = std::fs::read_to_string(&site_toml).unwrap();
    let declared = toml.replace("[data]\n", "[data]\ninput_channels = [{ name = \"CT\", normalization = \"CT\" }]\n");
    assert_ne!(declared, toml, "no [data] section in {toml}");
    std::fs::write(&site_toml, declared).unwrap();
    let checked = site_agent(&["check", "--device", "cpu", "--config", site_toml.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&checked.stdout);
    let expected = "the dataset has 2 input channel(s) (T1 (zscore), T2 (zscore)) but the federation declares 1 (CT)";
    assert!(!checked.status.success() && stdout.contains(expected), "{stdout}");

    // Not told, it joins and the coordinator refuses it at registration, naming the channels.
    std::fs::write(&site_toml, toml).unwrap();
    let mut procs = Children(vec![fed.spawn_coordinator(), fed.spawn_site("mr_liver", &[])]);
    let status = wait_child(&mut procs.0[1], Duration::from_secs(120), "mr_liver");
    assert!(!status.success(), "the MR site was not refused:\n{}", fed.log("mr_liver"));
    let site_log = fed.log("mr_liver");
    assert!(site_log.contains("BadDataset") && site_log.contains(expected), "{site_log}");
    assert!(fed.log("coordinator").contains(expected), "{}", fed.log("coordinator"));
}
