//! `site-agent train` against the federation: a one-site federation whose round-boundary policy
//! is neutral (momentum kept, no head warm-up) is the same training as `site-agent train` on that
//! site's data, and training is fully seeded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fedtalent_tests::{binary, read_tensors, run_ok, wait_child, Children, LocalFederation, Plan};
use fedtalent_vocab::{LocalPolicy, OptimizerState};

fn train(site_toml: &Path, steps: u32, seed: u64, out: &Path) -> PathBuf {
    train_with(site_toml, steps, seed, out, &[])
}

/// `site-agent train` of one site on the CPU for `steps` steps into `out`, with `extra` flags.
fn train_command(site_toml: &Path, steps: u32, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary("site-agent"));
    cmd.args(["train", "--site"]).arg(site_toml).args(["--device", "cpu", "--steps", &steps.to_string()]);
    cmd.args(extra).arg("--out").arg(out);
    cmd
}

/// `site-agent train` (tiny, checkpoints every 4 steps, no post-processing: these tests compare
/// weights) with `extra` flags; the model it exports.
fn train_with(site_toml: &Path, steps: u32, seed: u64, out: &Path, extra: &[&str]) -> PathBuf {
    let seed = seed.to_string();
    let flags =
        [&["--preset", "tiny", "--checkpoint-every", "4", "--seed", &seed, "--postprocess", "false"], extra].concat();
    run_ok(&mut train_command(site_toml, steps, out, &flags));
    out.join("model/model.safetensors")
}

/// Names of the tensors that differ between two saved models (all of them must exist in both).
fn differing(a: &Path, b: &Path) -> Vec<String> {
    let (a, b) = (read_tensors(a), read_tensors(b));
    assert_eq!(a.len(), b.len(), "the models have different tensor counts");
    a.iter().filter(|(name, t)| !t.equal(fedtalent_tests::tensor(&b, name))).map(|(name, _)| name.clone()).collect()
}

fn federate(dir: &Path, plan: Plan) -> (LocalFederation, PathBuf) {
    let fed = LocalFederation::create(dir, &["liver"], plan);
    let mut procs = Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &[])]);
    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    let status = wait_child(&mut procs.0[1], Duration::from_secs(60), "site");
    assert!(status.success(), "site failed:\n{}", fed.log("liver"));
    let model = dir.join("exported");
    fed.export(&model);
    (fed, model.join("model.safetensors"))
}

#[test]
fn one_site_federation_is_local_training_and_policies_change_it() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let neutral = LocalPolicy { optimizer_state: OptimizerState::Keep, head_warmup_steps: 0, final_heads_only: false };
    let plan =
        Plan { rounds: 3, local_steps: 4, min_sites: 1, eval_every: 2, cases: 3, local: neutral, ..Plan::default() };
    let (fed, federated) = federate(&dir.path().join("keep"), plan.clone());
    let alone = train(&fed.site_dir("liver").join("site.toml"), 12, 0, &dir.path().join("train"));
    let diff = differing(&federated, &alone);
    assert!(diff.is_empty(), "a neutral one-site federation and `site-agent train` differ in {diff:?}");

    // Resetting momentum at each round boundary is a different training: the policy is applied.
    let reset = Plan { local: LocalPolicy { optimizer_state: OptimizerState::Reset, ..neutral }, ..plan };
    let (_, federated_reset) = federate(&dir.path().join("reset"), reset);
    assert!(!differing(&federated_reset, &alone).is_empty(), "optimizer_state = \"reset\" changed nothing");
}

#[test]
fn training_is_fully_seeded() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::create(dir.path(), &["liver"], Plan { cases: 3, min_sites: 1, ..Plan::default() });
    let site = fed.site_dir("liver").join("site.toml");
    let a = train(&site, 6, 7, &dir.path().join("a"));
    let b = train(&site, 6, 7, &dir.path().join("b"));
    assert!(differing(&a, &b).is_empty(), "the same seed gave different weights");
    let c = train(&site, 6, 8, &dir.path().join("c"));
    assert!(!differing(&a, &c).is_empty(), "another seed gave the same weights");
}

/// `site-agent train` ends with the site deciding nnU-Net's post-processing of its classes on
/// its validation cases (a row per class); `site-agent postprocess` refuses a site the model has
/// no class of, by name.
#[test]
fn training_decides_the_post_processing_on_the_validation_cases() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { cases: 3, min_sites: 1, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas"], plan);
    let out = dir.path().join("liver");
    let flags = ["--preset", "tiny", "--seed", "1"];
    let done = run_ok(&mut train_command(&fed.site_dir("liver").join("site.toml"), 2, &out, &flags));
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(stdout.contains("post-processing of site \"liver\""), "{stdout}");
    for class in ["liver/liver ", "liver/liver_tumour "] {
        let decided = |l: &str| l.ends_with("as predicted") || l.ends_with("keep the largest component");
        assert!(stdout.lines().any(|l| l.starts_with(class) && decided(l)), "{class}: {stdout}");
    }
    let refused = Command::new(binary("site-agent"))
        .args(["postprocess", "--device", "cpu", "--model"])
        .arg(out.join("model"))
        .arg("--config")
        .arg(fed.site_dir("pancreas").join("site.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("no class of site \"pancreas\""), "{stderr}");
}

/// A run stopped after a checkpoint resumes from it and ends where an uninterrupted run ends: the
/// batch stream, the schedule and the momentum all continue.
#[test]
fn train_resumes_from_its_checkpoint() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::create(dir.path(), &["liver"], Plan { cases: 3, min_sites: 1, ..Plan::default() });
    let site = fed.site_dir("liver").join("site.toml");
    let whole = train(&site, 8, 3, &dir.path().join("whole"));
    let resumed = dir.path().join("resumed");
    train_with(&site, 8, 3, &resumed, &["--stop-after-steps", "4"]);
    assert!(!resumed.join("model").exists(), "a stopped run exported a model");
    let again = train(&site, 8, 3, &resumed);
    let diff = differing(&whole, &again);
    assert!(diff.is_empty(), "the resumed run differs from the uninterrupted one in {diff:?}");
}

/// Whether a saved tensor is a per-class head (`seg_outputs.*`, rows = classes).
fn is_head(name: &str) -> bool {
    name.starts_with("seg_outputs.")
}

/// `site-agent train --init`: the heads-only phase leaves the backbone bit-identical to the
/// model's, the whole-network phase after it moves the backbone, and the classes the model
/// lacks get heads of their own (with `--keep-heads` the model's classes stay in the network).
#[test]
fn fine_tuning_trains_heads_first_then_the_network() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas"], Plan { cases: 3, ..Plan::default() });
    let (liver, pancreas) = (fed.site_dir("liver").join("site.toml"), fed.site_dir("pancreas").join("site.toml"));
    let pretrained = train(&liver, 4, 1, &dir.path().join("pretrained"));
    let model_dir = dir.path().join("pretrained/model");
    let init = ["--init", model_dir.to_str().unwrap()];
    let model = read_tensors(&pretrained);

    let heads_only = train_with(&liver, 3, 2, &dir.path().join("heads"), &[&init[..], &["--head-steps", "3"]].concat());
    let changed = differing(&pretrained, &heads_only);
    assert!(!changed.is_empty() && changed.iter().all(|n| is_head(n)), "heads-only steps changed {changed:?}");

    let whole = train_with(&liver, 3, 2, &dir.path().join("whole"), &[&init[..], &["--head-steps", "1"]].concat());
    let moved: Vec<String> = differing(&pretrained, &whole).into_iter().filter(|n| !is_head(n)).collect();
    assert!(!moved.is_empty(), "after the heads-only step the backbone did not train");

    // A new site's classes: two fresh rows alone, four with the model's liver classes kept.
    let rows = |path: &Path| fedtalent_tests::tensor(&read_tensors(path), "seg_outputs.0.weight").size()[0];
    let new_site = train_with(&pancreas, 2, 2, &dir.path().join("new"), &init);
    let kept = train_with(&pancreas, 2, 2, &dir.path().join("kept"), &[&init[..], &["--keep-heads"]].concat());
    assert_eq!((rows(&new_site), rows(&kept)), (2, 4));
    let manifest = std::fs::read_to_string(dir.path().join("kept/model/model.json")).unwrap();
    assert!(manifest.contains("liver/liver_tumour") && manifest.contains("pancreas/pancreas_tumour"), "{manifest}");
    // The backbone it starts from is the model's (the heads-only step is the default 10% = 0 of 2).
    let backbone_moved = |path: &Path| {
        let t = read_tensors(path);
        model.iter().filter(|(n, _)| !is_head(n)).any(|(n, v)| !v.equal(fedtalent_tests::tensor(&t, n)))
    };
    assert!(backbone_moved(&new_site), "fine-tuning did not train the backbone");
}

/// `--init` refuses what it cannot honour, naming the flag: another preset, flags without a model.
#[test]
fn fine_tuning_refuses_mismatched_requests() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::create(dir.path(), &["liver"], Plan { cases: 3, min_sites: 1, ..Plan::default() });
    let liver = fed.site_dir("liver").join("site.toml");
    train(&liver, 2, 1, &dir.path().join("pretrained"));
    let attempt = |extra: &[&str]| {
        let out = train_command(&liver, 2, &dir.path().join("refused"), extra).output().unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let model = dir.path().join("pretrained/model");
    let model = model.to_str().unwrap();
    assert!(attempt(&["--init", model, "--preset", "unet"]).contains("--preset \"unet\""));
    assert!(attempt(&["--head-steps", "1"]).contains("--head-steps needs --init"));
    assert!(attempt(&["--keep-heads"]).contains("need --init"));
    assert!(attempt(&["--init", model, "--decoder-from", "liver"]).contains("no per-site decoders"));
}
