//! End-to-end prediction on a phantom with a network whose output is known by construction, the
//! written masks checked with nibabel; bad inputs and bad model folders refused by name.

mod common;

use std::path::{Path, PathBuf};

use fedtalent_data::nifti_io::write_f32_nifti;
use fedtalent_data::{write_mask_nifti, SpatialHeader};
use fedtalent_model::infer::InferOptions;
use fedtalent_model::metrics::{dice, evaluate_dataset};
use fedtalent_model::predict::{case_name, Predictor};
use fedtalent_model::{ModelManifest, MultiTalentNet, Topology};
use fedtalent_vocab::{ClassRegion, CtNormalization, GlobalClass};
use ndarray::Array3;
use tch::{Device, Kind, Tensor};

const SHAPE: (usize, usize, usize) = (40, 100, 100);

fn affine() -> [[f64; 4]; 4] {
    // Flipped x and y (LPS-like), as CT usually is.
    [[-0.8, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, 20.0], [0.0, 0.0, 2.0, -30.0], [0.0, 0.0, 0.0, 1.0]]
}

/// Labels: 1 = a box, 2 = a smaller box inside it.
fn phantom_labels() -> Array3<u8> {
    Array3::from_shape_fn(SHAPE, |(z, y, x)| {
        if (18..22).contains(&z) && (40..50).contains(&y) && (40..50).contains(&x) {
            2
        } else if (14..26).contains(&z) && (30..60).contains(&y) && (35..65).contains(&x) {
            1
        } else {
            0
        }
    })
}

/// HU: air-like background, a bright object, and a zero band outside the field of view (x < 3)
/// that the crop to nonzero removes.
fn phantom_image(labels: &Array3<u8>) -> Array3<f32> {
    Array3::from_shape_fn(SHAPE, |(z, y, x)| {
        if x < 3 {
            0.0
        } else if labels[(z, y, x)] > 0 {
            100.0
        } else {
            -1000.0
        }
    })
}

fn set(net: &mut MultiTalentNet, name: &str, f: impl Fn(&Tensor)) {
    let p = net.params().iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no {name}")).tensor.shallow_clone();
    let t = Tensor::zeros(p.size(), (Kind::Float, Device::Cpu));
    f(&t);
    net.params_mut().copy_into(name, &t).unwrap();
}

/// A `tiny` network that thresholds intensity: only the full-resolution path carries one
/// channel (identity kernels), everything else is zero. After instance norm the object (a small
/// fraction of every tile) is positive and the background negative; the last norm's affine
/// (γ 10, β −1) and the head (50) turn that into confident logits. Class 0 ("organ") is this
/// detector; class 1 has a zero head: p = 0.5 everywhere, which p > 0.5 leaves empty.
fn write_model(dir: &Path) {
    // A patch large enough that the object stays a small fraction of every tile, which the
    // instance-norm threshold below relies on.
    let mut topology = Topology::preset("tiny").unwrap();
    topology.patch = [32, 64, 64];
    let mut net = MultiTalentNet::new(&topology, 2, Device::Cpu).unwrap();
    let names: Vec<String> = net.params().iter().map(|p| p.name.clone()).collect();
    for n in &names {
        set(&mut net, n, |_| {});
    }
    let centre = |t: &Tensor, out: i64, inp: i64| {
        let _ = t.get(out).get(inp).get(1).get(1).get(1).fill_(1.0);
    };
    set(&mut net, "conv_blocks_context.0.blocks.0.conv.weight", |t| centre(t, 0, 0));
    set(&mut net, "conv_blocks_context.0.blocks.1.conv.weight", |t| centre(t, 0, 0));
    set(&mut net, "conv_blocks_localization.2.0.blocks.0.conv.weight", |t| centre(t, 0, 8));
    set(&mut net, "conv_blocks_localization.2.1.blocks.0.conv.weight", |t| centre(t, 0, 0));
    for n in [
        "conv_blocks_context.0.blocks.0.instnorm.weight",
        "conv_blocks_context.0.blocks.1.instnorm.weight",
        "conv_blocks_localization.2.0.blocks.0.instnorm.weight",
    ] {
        set(&mut net, n, |t| {
            let _ = t.get(0).fill_(1.0);
        });
    }
    set(&mut net, "conv_blocks_localization.2.1.blocks.0.instnorm.weight", |t| {
        let _ = t.get(0).fill_(10.0);
    });
    set(&mut net, "conv_blocks_localization.2.1.blocks.0.instnorm.bias", |t| {
        let _ = t.get(0).fill_(-1.0);
    });
    set(&mut net, "seg_outputs.2.weight", |t| {
        let _ = t.get(0).get(0).fill_(50.0);
    });
    std::fs::create_dir_all(dir).unwrap();
    net.save(&dir.join("model.safetensors")).unwrap();
    let class = |index: u32, site: &str, name: &str, labels: Vec<u32>| {
        GlobalClass::new(index, site, &ClassRegion { name: name.into(), labels })
    };
    let manifest = ModelManifest {
        format: fedtalent_model::manifest::MANIFEST_FORMAT.into(),
        preset: "tiny".into(),
        patch: topology.patch,
        spacing: [2.0, 1.0, 1.0],
        topology,
        channels: fedtalent_vocab::InputChannels::ct(),
        normalization: CtNormalization { clip_low: -1000.0, clip_high: 100.0, mean: -450.0, std: 550.0 },
        classes: vec![class(0, "phantom", "organ", vec![1, 2]), class(1, "other", "core", vec![2])],
        round: 3,
        digest: "test".into(),
        weights: "model.safetensors".into(),
        largest_component: Vec::new(),
        exclusive_sites: Vec::new(),
    };
    manifest.write(dir).unwrap();
}

fn options() -> InferOptions {
    InferOptions { tile_batch: 4, progress: false, ..InferOptions::default() }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    image: PathBuf,
    label: PathBuf,
    labels: Array3<u8>,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = root.join("model");
    write_model(&model);
    let labels = phantom_labels();
    let header = SpatialHeader::from_affine(&affine());
    let image = root.join("case_007_0000.nii.gz");
    write_f32_nifti(&image, &phantom_image(&labels), &header).unwrap();
    let label = root.join("case_007.nii.gz");
    write_mask_nifti(&label, &labels, &header).unwrap();
    Fixture { _tmp: tmp, model, image, label, labels, root }
}

#[test]
fn predicts_the_phantom_and_writes_masks_that_nibabel_reads() {
    let f = fixture();
    let predictor = Predictor::load(&f.model, options()).unwrap();
    assert_eq!(predictor.select_classes(&[]).unwrap(), vec![0, 1]);
    assert_eq!(predictor.select_classes(&["phantom/organ".into()]).unwrap(), vec![0]);
    assert_eq!(predictor.select_classes(&["core,0".into()]).unwrap(), vec![1, 0]);
    assert!(predictor.select_classes(&["spleen".into()]).unwrap_err().to_string().contains("spleen"));

    let out = f.root.join("out");
    let written = predictor.predict_to(&f.image, &out, &[0, 1]).unwrap();
    assert_eq!(case_name(&f.image), "case_007");
    let organ = out.join("case_007/phantom__organ.nii.gz");
    let core = out.join("case_007/other__core.nii.gz");
    assert_eq!(written.iter().map(|w| w.file.clone()).collect::<Vec<_>>(), vec![organ.clone(), core.clone()]);
    assert!(out.join("case_007/classes.json").is_file());

    // Rust side: Dice of the organ against labels {1, 2}; the zero-head class is empty.
    let mask = fedtalent_data::read_label_nifti(&organ).unwrap().data.mapv(|v| v != 0);
    let truth = f.labels.mapv(|v| v != 0);
    let d = dice(&mask, &truth).unwrap();
    assert!(d > 0.9, "organ Dice {d}");
    assert_eq!(written[1].voxels, 0);
    assert!(written[0].voxels > 0);

    // nibabel: uint8, the input's shape and affine, the same Dice.
    let script = r#"
import sys, json, numpy as np, nibabel as nib
img, organ, core, lab = (nib.load(p) for p in sys.argv[1:5])
m, t = np.asarray(organ.dataobj), np.asarray(lab.dataobj) > 0
print(json.dumps({
  "dtype": [str(organ.get_data_dtype()), str(core.get_data_dtype())],
  "shape_ok": organ.shape == img.shape == core.shape,
  "affine_err": float(max(np.abs(organ.affine - img.affine).max(), np.abs(core.affine - img.affine).max())),
  "dice": float(2 * np.logical_and(m > 0, t).sum() / ((m > 0).sum() + t.sum())),
  "values": sorted(int(v) for v in np.unique(m)),
  "core_sum": int(np.asarray(core.dataobj).sum()),
}))
"#;
    let args = [&f.image, &organ, &core, &f.label].map(|p| p.to_string_lossy().to_string());
    let out = common::run_python(script, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["dtype"], serde_json::json!(["uint8", "uint8"]), "{v}");
    assert_eq!(v["shape_ok"], true, "{v}");
    assert!(v["affine_err"].as_f64().unwrap() < 1e-5, "{v}");
    assert!((v["dice"].as_f64().unwrap() - d).abs() < 1e-9, "{v}");
    assert_eq!(v["values"], serde_json::json!([0, 1]), "{v}");
    assert_eq!(v["core_sum"], 0, "{v}");

    // Mirroring (TTA) keeps the result.
    let tta = Predictor::load(&f.model, InferOptions { mirror: true, ..options() }).unwrap();
    let p = tta.predict(&f.image, &[0]).unwrap();
    let d_tta = dice(&p.masks[0].mapv(|v| v != 0), &truth).unwrap();
    assert!(d_tta > 0.9, "TTA Dice {d_tta}");
}

#[test]
fn evaluates_a_labelled_folder() {
    let f = fixture();
    let ds = f.root.join("Dataset001_phantom");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(ds.join(sub)).unwrap();
    }
    std::fs::copy(&f.image, ds.join("imagesTr/case_007_0000.nii.gz")).unwrap();
    std::fs::copy(&f.label, ds.join("labelsTr/case_007.nii.gz")).unwrap();
    // A case whose label does not match its image is skipped by name, not used.
    std::fs::copy(&f.image, ds.join("imagesTr/case_008_0000.nii.gz")).unwrap();
    std::fs::write(ds.join("labelsTr/case_008.nii.gz"), b"not a nifti").unwrap();
    let json = serde_json::json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "core": 2}, "numTraining": 2, "file_ending": ".nii.gz"});
    std::fs::write(ds.join("dataset.json"), json.to_string()).unwrap();
    let predictor = Predictor::load(&f.model, options()).unwrap();
    let e = evaluate_dataset(&predictor, &ds, &[0, 1]).unwrap();
    assert_eq!(e.cases.len(), 1);
    assert_eq!(e.skipped.len(), 1);
    assert!(e.skipped[0].contains("case_008"), "{:?}", e.skipped);
    assert!(e.classes[0].mean_dice.unwrap() > 0.9, "{}", e);
    let hd = e.classes[0].mean_hd95_mm.unwrap();
    assert!(hd < 2.5, "organ HD95 {hd} mm");
    // The zero-head class predicts nothing against a nonempty core: Dice 0, HD95 undefined.
    assert_eq!(e.classes[1].mean_dice, Some(0.0));
    assert_eq!(e.classes[1].mean_hd95_mm, None);
    let table = e.to_string();
    assert!(table.contains("phantom/organ") && table.contains("other/core"), "{table}");
}

fn err_of(r: anyhow::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let f = fixture();
    let predictor = Predictor::load(&f.model, options()).unwrap();
    let out = f.root.join("out");
    let text = f.root.join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let e = err_of(predictor.predict_to(&text, &out, &[0]));
    assert!(e.contains("notes.txt") && e.contains("not a NIfTI"), "{e}");
    let garbage = f.root.join("garbage.nii.gz");
    std::fs::write(&garbage, b"definitely not gzip").unwrap();
    let e = err_of(predictor.predict_to(&garbage, &out, &[0]));
    assert!(e.contains("garbage.nii.gz"), "{e}");
    let empty = f.root.join("empty.nii");
    std::fs::write(&empty, b"").unwrap();
    let e = err_of(predictor.predict_to(&empty, &out, &[0]));
    assert!(e.contains("empty.nii") && e.contains("empty file"), "{e}");
    // A 4D (two-volume) image, written by nibabel.
    let four = f.root.join("four_d.nii.gz");
    common::run_python(
        "import sys, numpy as np, nibabel as nib; nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), sys.argv[1])",
        &[four.to_str().unwrap()],
    );
    let e = err_of(predictor.predict_to(&four, &out, &[0]));
    assert!(e.contains("four_d.nii.gz") && e.contains("3D"), "{e}");
    let e = err_of(fedtalent_model::predict::input_files(&f.root.join("missing.nii.gz"), 1));
    assert!(e.contains("missing.nii.gz"), "{e}");
    assert!(!out.join("notes").exists() && !out.join("empty").exists());
}

#[test]
fn bad_model_folders_are_refused_by_name() {
    let f = fixture();
    let e = err_of(Predictor::load(&f.root, options()));
    assert!(e.contains("model.json") && e.contains(&f.root.display().to_string()), "{e}");
    // Weights of a 3-class network under a 2-class manifest.
    let other = f.root.join("model3");
    write_model(&other);
    MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 3, Device::Cpu)
        .unwrap()
        .save(&other.join("model.safetensors"))
        .unwrap();
    let e = err_of(Predictor::load(&other, options()));
    assert!(e.contains("model.safetensors") && e.contains("do not match") && e.contains("seg_outputs"), "{e}");
    std::fs::remove_file(other.join("model.safetensors")).unwrap();
    let e = err_of(Predictor::load(&other, options()));
    assert!(e.contains("missing"), "{e}");
    std::fs::write(other.join("model.json"), "{ not json").unwrap();
    let e = err_of(Predictor::load(&other, options()));
    assert!(e.contains("model.json"), "{e}");
}

/// The network thresholds intensity, so a bright blob away from the labelled object is
/// segmented too: a false positive that keeping the largest component removes. The decision is
/// taken on a labelled (validation) case, recorded in model.json, and `predict` applies it.
#[test]
fn post_processing_is_decided_on_validation_cases_and_applied_by_predict() {
    use fedtalent_model::postprocess::{connected_components, determine};
    let f = fixture();
    let mut image = phantom_image(&f.labels);
    for z in 30..34 {
        for y in 75..85 {
            for x in 75..85 {
                image[(z, y, x)] = 100.0;
            }
        }
    }
    let header = SpatialHeader::from_affine(&affine());
    let case = fedtalent_data::Case {
        id: "case_009".into(),
        image: f.root.join("case_009_0000.nii.gz"),
        label: f.label.clone(),
    };
    write_f32_nifti(&case.image, &image, &header).unwrap();
    let predictor = Predictor::load(&f.model, options()).unwrap();
    let raw = predictor.predict(&case.image, &[0]).unwrap().masks.remove(0);
    assert_eq!(connected_components(&raw).1.len(), 2, "the blob is predicted as a second component");

    let decisions = determine(&predictor, std::slice::from_ref(&case), &[0, 1]).unwrap();
    let organ = &decisions[0];
    assert!(organ.keep_largest && organ.dice_largest > organ.dice_raw, "{organ:?}");
    // Nothing predicted: both Dice 0, no strict improvement, left as predicted.
    assert!(!decisions[1].keep_largest, "{:?}", decisions[1]);

    let mut manifest = ModelManifest::read(&f.model).unwrap();
    manifest.largest_component = vec![organ.id.clone()];
    manifest.write(&f.model).unwrap();
    let predictor = Predictor::load(&f.model, options()).unwrap();
    let processed = predictor.predict(&case.image, &[0]).unwrap().masks.remove(0);
    assert_eq!(connected_components(&processed).1.len(), 1);
    let truth = f.labels.mapv(|l| l > 0);
    let d = dice(&processed.mapv(|v| v > 0), &truth).unwrap();
    assert!(d > 0.9 && d > dice(&raw.mapv(|v| v > 0), &truth).unwrap(), "Dice {d}");
    // The class it was not decided for is untouched.
    assert!(predictor.predict(&case.image, &[1]).unwrap().masks[0].iter().all(|&v| v == 0));
    // `evaluate` scores the post-processed masks and says so.
    let e = fedtalent_model::metrics::evaluate_cases(&predictor, &f.root, &[case], &[0, 1]).unwrap();
    assert!((e.classes[0].mean_dice.unwrap() - d).abs() < 1e-9, "{e}");
    assert!(e.to_string().contains(&format!("post-processed (largest component kept): {}", organ.id)), "{e}");
}

/// The fixture's model with both classes of one site, `phantom`, whose classes are one softmax
/// when `exclusive`: class 0 the detector (head 50), class 1 the same detector at half strength
/// (head 25), so that as sigmoids both cover the object.
fn one_site_model(dir: &Path, exclusive: bool) {
    write_model(dir);
    let (mut manifest, mut net) = ModelManifest::load_model(dir, Device::Cpu).unwrap();
    set(&mut net, "seg_outputs.2.weight", |t| {
        let _ = t.get(0).get(0).fill_(50.0);
        let _ = t.get(1).get(0).fill_(25.0);
    });
    net.save(&dir.join(&manifest.weights)).unwrap();
    let class = |index: u32, name: &str, labels: Vec<u32>| {
        GlobalClass::new(index, "phantom", &ClassRegion { name: name.into(), labels })
    };
    manifest.classes = vec![class(0, "organ", vec![1]), class(1, "core", vec![2])];
    manifest.exclusive_sites = if exclusive { vec!["phantom".into()] } else { Vec::new() };
    manifest.write(dir).unwrap();
}

/// A site trained as one softmax is predicted by argmax: no voxel gets two of its classes
/// (where sigmoid thresholds give the object to both), the most probable class wins, and a
/// class selected alone is still decided against its whole site.
#[test]
fn an_exclusive_site_never_assigns_two_classes_to_a_voxel() {
    let f = fixture();
    let (sigmoid_dir, softmax_dir) = (f.root.join("sigmoid"), f.root.join("softmax"));
    one_site_model(&sigmoid_dir, false);
    one_site_model(&softmax_dir, true);
    let truth = f.labels.mapv(|v| v != 0);
    let both =
        |m: &[Array3<u8>]| ndarray::Zip::from(&m[0]).and(&m[1]).fold(0usize, |n, &a, &b| n + usize::from(a * b > 0));

    let sigmoid = Predictor::load(&sigmoid_dir, options()).unwrap().predict(&f.image, &[0, 1]).unwrap();
    assert!(both(&sigmoid.masks) > 1000, "the sigmoid heads should overlap on the object");

    let predictor = Predictor::load(&softmax_dir, options()).unwrap();
    let softmax = predictor.predict(&f.image, &[0, 1]).unwrap();
    assert_eq!(both(&softmax.masks), 0, "a voxel got two classes of an exclusive site");
    let d = dice(&softmax.masks[0].mapv(|v| v != 0), &truth).unwrap();
    assert!(d > 0.9, "organ (the stronger logit) Dice {d}");
    assert_eq!(softmax.masks[1].iter().map(|&v| v as u64).sum::<u64>(), 0, "core never beats organ");
    let alone = predictor.predict(&f.image, &[1]).unwrap();
    assert_eq!(alone.masks[0], softmax.masks[1], "core selected alone is decided against organ too");
    let (_, probs) = predictor.probabilities(&f.image, &[0, 1]).unwrap();
    let total = probs.sum_axis(ndarray::Axis(0));
    assert!(total.iter().all(|&p| p <= 1.0 + 1e-4), "softmax probabilities of a site sum to at most 1");
}

/// `masks_of` on random probabilities: at most one class of a group per voxel, the group's
/// winner is its argmax against the background; a class outside the group is thresholded.
#[test]
fn group_masks_are_the_argmax_against_the_background() {
    use fedtalent_model::predict::masks_of;
    tch::manual_seed(5);
    let logits = Tensor::randn([4, 6, 7, 8], (Kind::Float, Device::Cpu)) * 3.0;
    let group = Tensor::cat(&[logits.narrow(0, 0, 1).zeros_like(), logits.narrow(0, 1, 3)], 0).softmax(0, Kind::Float);
    let probs = Tensor::cat(&[logits.narrow(0, 0, 1).sigmoid(), group.narrow(0, 1, 3)], 0);
    let winner = group.argmax(0, false);
    let values = Vec::<f32>::try_from(probs.reshape([-1])).unwrap();
    let probs = ndarray::Array4::from_shape_vec((4, 6, 7, 8), values).unwrap();
    let masks = masks_of(&probs, &[vec![1, 2, 3]]);
    for k in 1..4 {
        let expected = Vec::<bool>::try_from(winner.eq(k).reshape([-1])).unwrap();
        let got: Vec<bool> = masks[k as usize].iter().map(|&v| v == 1).collect();
        assert_eq!(got, expected, "class {k}");
    }
    let sum = &masks[1] + &masks[2] + &masks[3];
    assert!(sum.iter().all(|&s| s <= 1));
    assert!(sum.iter().any(|&s| s == 0) && sum.iter().any(|&s| s == 1));
    assert_eq!(masks[0], probs.index_axis(ndarray::Axis(0), 0).mapv(|p| u8::from(p > 0.5)));
}
