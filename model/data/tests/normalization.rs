//! nnU-Net v2's normalization schemes against numpy (tests/norm_oracle.py): the same input
//! channel, normalized by the scheme its channel name selects, agrees to 1e-5 relative.

mod common;

use fedtalent_data::{nonzero_mask, Normalization, NormalizationError, NormalizationScheme};
use fedtalent_vocab::CtNormalization;
use ndarray::Array3;
use serde_json::Value;

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn shape(oracle: &Value) -> (usize, usize, usize) {
    let s: Vec<usize> = oracle["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    (s[0], s[1], s[2])
}

fn ct_of(v: &Value) -> Option<CtNormalization> {
    let f = |k: &str| v[k].as_f64().unwrap() as f32;
    v.is_object().then(|| CtNormalization {
        clip_low: f("clip_low"),
        clip_high: f("clip_high"),
        mean: f("mean"),
        std: f("std"),
    })
}

/// nnU-Net's nonzero mask of the oracle's two brain-like channels, as ours computes it; the test
/// first checks it equals scipy's.
fn our_nonzero_mask(oracle: &Value) -> Array3<bool> {
    let channels: Vec<Array3<f32>> = oracle["nonzero_mask"]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Array3::from_shape_vec(shape(oracle), f32s(c)).unwrap())
        .collect();
    nonzero_mask(&channels)
}

#[test]
fn the_nonzero_mask_is_scipys_filled_union_of_nonzero_voxels() {
    let oracle = common::python_oracle("norm_oracle.py", &[]);
    let ours: Vec<bool> = our_nonzero_mask(&oracle).iter().copied().collect();
    let theirs: Vec<bool> =
        oracle["nonzero_mask"]["mask"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
    assert_eq!(ours, theirs);
    // The oracle's channels have a cavity (filled) and a zero voxel on the face (left out).
    let inside = theirs.iter().filter(|&&m| m).count();
    assert_eq!(inside, 99, "the box of 100 voxels minus the one on its face");
}

#[test]
fn every_scheme_matches_numpy() {
    let oracle = common::python_oracle("norm_oracle.py", &[]);
    let mask: Vec<bool> = our_nonzero_mask(&oracle).iter().copied().collect();
    let cases = oracle["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let scheme = NormalizationScheme::from_channel_name(case["channel_name"].as_str().unwrap());
        let use_mask = case["use_mask"].as_bool().unwrap();
        let norm = Normalization::new(scheme, ct_of(&case["ct"]), use_mask).unwrap();
        let mut voxels = f32s(&case["input"]);
        let result = norm.apply(&mut voxels, use_mask.then_some(&mask[..]));
        match case["expected"].is_null() {
            // numpy's nnU-Net asserts; we refuse with the values that broke the rule.
            true => {
                let err = result.unwrap_err();
                assert!(matches!(err, NormalizationError::NotRgb { .. }), "{name}: {err}");
                eprintln!("{name}: refused as nnU-Net asserts: {err}");
            }
            false => {
                result.unwrap_or_else(|e| panic!("{name}: {e}"));
                let expected = f32s(&case["expected"]);
                assert_eq!(voxels.len(), expected.len(), "{name}");
                let worst = voxels
                    .iter()
                    .zip(&expected)
                    .map(|(&a, &b)| ((a - b).abs() / b.abs().max(1.0)) as f64)
                    .fold(0.0, f64::max);
                assert!(worst <= 1e-5, "{name}: relative difference {worst:e} from numpy");
                eprintln!("{name} ({}): equal to numpy, worst relative difference {worst:.1e}", scheme.nnunet_class());
            }
        }
    }
}

/// The masked z-score changes only voxels inside the mask (the zero background stays zero, as
/// nnU-Net leaves it), and is the plain z-score of those voxels.
#[test]
fn masked_z_score_leaves_the_outside_untouched() {
    let oracle = common::python_oracle("norm_oracle.py", &[]);
    let mask = our_nonzero_mask(&oracle);
    let mut image = Array3::from_shape_vec(shape(&oracle), f32s(&oracle["nonzero_mask"]["channels"][0])).unwrap();
    let before = image.clone();
    Normalization::ZScore { use_mask: true }.apply_array(&mut image, Some(&mask)).unwrap();
    let mut inside: Vec<f32> = before.iter().zip(mask.iter()).filter(|(_, &m)| m).map(|(&v, _)| v).collect();
    Normalization::ZScore { use_mask: false }.apply(&mut inside, None).unwrap();
    let mut it = inside.into_iter();
    for ((&after, &was), &m) in image.iter().zip(before.iter()).zip(mask.iter()) {
        assert_eq!(after, if m { it.next().unwrap() } else { was });
    }
}
