//! A real MR volume with real labels: Debian's `mricron-data` ships the Colin27 T1 (`ch2.nii.gz`,
//! 181 × 217 × 181 at 1 mm) with the AAL and Brodmann atlases on the same grid. The package is
//! fetched at test time with apt (`apt-get download`, `dpkg-deb -x`) into a temporary folder and
//! never committed (the atlases carry their own terms); without apt or a reachable archive the
//! test says why and passes as skipped.
//!
//! Two label protocols on one image make a natural pair of conflicting sites: an AAL site
//! (hemispheres) and a Brodmann site (cortex) both pass `check` as T1 (z-score) datasets, train a
//! few pooled steps with MR normalization, and the model predicts the volume in its own geometry.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedtalent_data::ValCases;
use fedtalent_tests::{binary, run_ok, LocalFederation, Plan};
use fedtalent_vocab::ClassRegion;

/// The folder of mricron-data's templates, fetched into `dir`, or why it could not be.
fn fetch_mricron(dir: &Path) -> Result<PathBuf, String> {
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd.current_dir(dir).output().map_err(|e| format!("{what}: cannot start: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
    run(Command::new("timeout").args(["300", "apt-get", "download", "mricron-data"]), "apt-get download mricron-data")?;
    let deb = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or("apt-get download left no .deb")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg("x"), "dpkg-deb -x")?;
    let templates = dir.join("x/usr/share/mricron/templates");
    for file in ["ch2.nii.gz", "aal.nii.gz", "aal.nii.txt", "brodmann.nii.gz"] {
        if !templates.join(file).exists() {
            return Err(format!("the package has no {file} (another mricron-data layout?)"));
        }
    }
    Ok(templates)
}

/// An nnU-Net v2 dataset of one case: `image` as channel T1, `labels` as its label map, the
/// label names of dataset.json.
fn one_case_dataset(dir: &Path, image: &Path, labels: &Path, names: &[(String, u32)]) {
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy(image, dir.join("imagesTr/colin27_0000.nii.gz")).unwrap();
    std::fs::copy(labels, dir.join("labelsTr/colin27.nii.gz")).unwrap();
    let mut label_map = serde_json::Map::new();
    label_map.insert("background".into(), 0.into());
    for (name, value) in names {
        label_map.insert(name.clone(), (*value).into());
    }
    let json = serde_json::json!({
        "channel_names": {"0": "T1"}, "labels": label_map, "numTraining": 1, "file_ending": ".nii.gz",
    });
    std::fs::write(dir.join("dataset.json"), json.to_string()).unwrap();
}

/// `<dir>/<site>/site.toml` for `dataset` with `classes`, every case for training (the
/// harness's site config; it never joins, so there is no PKI).
fn site_toml(dir: &Path, site: &str, dataset: &Path, classes: Vec<ClassRegion>) -> PathBuf {
    let fed = LocalFederation { dir: dir.to_path_buf(), sites: Vec::new(), port: 1, plan: Plan::default() };
    let mut config = fed.site_config(site, dataset, classes);
    config.data.val_cases = ValCases::Count(0);
    let path = dir.join(site).join("site.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    config.write(&path).unwrap();
    path
}

/// AAL's labels (`aal.nii.txt`: index, name, code per line) and its classes: the regions of
/// each hemisphere (names ending in `_L`, `_R`) and the midline vermis (the others).
fn aal_labels(templates: &Path) -> (Vec<(String, u32)>, Vec<ClassRegion>) {
    let text = std::fs::read_to_string(templates.join("aal.nii.txt")).unwrap();
    let names: Vec<(String, u32)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.nth(1)?.to_string(), l.split_whitespace().next()?.parse().ok()?))
        })
        .collect();
    let side = |s: &str| names.iter().filter(|(n, _)| n.ends_with(s)).map(|(_, v)| *v).collect::<Vec<_>>();
    let (left, right) = (side("_L"), side("_R"));
    let midline = names.iter().map(|(_, v)| *v).filter(|v| !left.contains(v) && !right.contains(v)).collect();
    let classes = vec![
        ClassRegion { name: "left_hemisphere".into(), labels: left },
        ClassRegion { name: "right_hemisphere".into(), labels: right },
        ClassRegion { name: "vermis".into(), labels: midline },
    ];
    (names, classes)
}

#[test]
fn colin27_with_aal_and_brodmann_checks_trains_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let templates = match fetch_mricron(dir.path()) {
        Ok(t) => t,
        Err(why) => {
            eprintln!(
                "SKIPPED colin27_with_aal_and_brodmann_checks_trains_and_predicts: mricron-data unavailable: {why}"
            );
            return;
        }
    };
    let ch2 = templates.join("ch2.nii.gz");
    let (aal_names, aal_classes) = aal_labels(&templates);
    let aal = dir.path().join("Dataset901_AAL");
    one_case_dataset(&aal, &ch2, &templates.join("aal.nii.gz"), &aal_names);
    let brodmann_values: Vec<u32> = (1..=48).collect();
    let brodmann_names: Vec<(String, u32)> = brodmann_values.iter().map(|v| (format!("BA{v}"), *v)).collect();
    let brodmann = dir.path().join("Dataset902_Brodmann");
    one_case_dataset(&brodmann, &ch2, &templates.join("brodmann.nii.gz"), &brodmann_names);
    let cortex = vec![ClassRegion { name: "cortex".into(), labels: brodmann_values }];
    let sites = [site_toml(dir.path(), "aal", &aal, aal_classes), site_toml(dir.path(), "brodmann", &brodmann, cortex)];
    for site in &sites {
        let out = run_ok(Command::new(binary("site-agent")).args(["check", "--device", "cpu", "--config"]).arg(site));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("input channels: T1 (zscore)") && stdout.contains("no problems"), "{stdout}");
    }

    let out = dir.path().join("trained");
    let mut train = Command::new(binary("site-agent"));
    train.args(["train", "--device", "cpu", "--preset", "tiny", "--steps", "2", "--postprocess", "false"]);
    for site in &sites {
        train.arg("--site").arg(site);
    }
    run_ok(train.arg("--out").arg(&out));
    let masks = dir.path().join("masks");
    run_ok(
        Command::new(binary("site-agent"))
            .args(["predict", "--device", "cpu", "--model"])
            .arg(out.join("model"))
            .arg("--input")
            .arg(&ch2)
            .arg("--output")
            .arg(&masks),
    );
    for class in ["aal__left_hemisphere", "aal__right_hemisphere", "aal__vermis", "brodmann__cortex"] {
        let mask = fedtalent_data::read_label_nifti(masks.join(format!("ch2/{class}.nii.gz"))).unwrap();
        assert_eq!(mask.data.dim(), (181, 217, 181), "{class}");
    }
}
