//! Histogram statistics, resampling and sampling on known data.

use std::collections::BTreeSet;

use fedtalent_data::resample::{anisotropy_axis, resample, resample_labels, target_shape, Interp, LabelInterp};
use fedtalent_data::sampler::{cut, sample_patch, CaseView};
use fedtalent_vocab::{CtNormalization, HuHistogram, NormalizationScheme};
use ndarray::Array3;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn hist_of(values: &[f32]) -> HuHistogram {
    let mut h = HuHistogram::default();
    for &v in values {
        h.add(v);
    }
    h
}

#[test]
fn percentiles_match_numpy_linear_interpolation() {
    // np.percentile(np.arange(1, 201), [0.5, 50, 99.5]) == [1.995, 100.5, 199.005]
    let values: Vec<f32> = (1..=200).map(|v| v as f32).collect();
    let h = hist_of(&values);
    assert!((h.percentile(0.5).unwrap() - 1.995).abs() < 1e-9);
    assert!((h.percentile(50.0).unwrap() - 100.5).abs() < 1e-9);
    assert!((h.percentile(99.5).unwrap() - 199.005).abs() < 1e-9);
}

#[test]
fn merged_histograms_equal_the_histogram_of_all_values() {
    let a: Vec<f32> = (0..500).map(|i| (i as f32 * 7.3).sin() * 300.0 - 50.0).collect();
    let b: Vec<f32> = (0..300).map(|i| 900.0 + i as f32).collect(); // disjoint, higher range
    let c: Vec<f32> = vec![-1000.0; 3];
    let merged = HuHistogram::merge(&[hist_of(&a), hist_of(&b), HuHistogram::default(), hist_of(&c)]);
    let all: Vec<f32> = a.iter().chain(&b).chain(&c).cloned().collect();
    assert_eq!(merged, hist_of(&all));
    assert_eq!(merged.total(), 803);
}

#[test]
fn ct_stats_use_percentiles_then_values_within_them() {
    // 1000 voxels at 0..=999 plus two outliers: the outliers fall outside [p0.5, p99.5].
    let mut values: Vec<f32> = (0..1000).map(|v| v as f32).collect();
    values.extend([-1000.0, 3000.0]);
    let stats = hist_of(&values).ct_stats().unwrap();
    let mut sorted: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let r = p / 100.0 * (sorted.len() - 1) as f64;
        let (lo, f) = (r.floor() as usize, r - r.floor());
        sorted[lo] + (sorted[(lo + 1).min(sorted.len() - 1)] - sorted[lo]) * f
    };
    // Computed in f64, stored as f32: equal up to the f32 rounding.
    let close = |stored: f32, exact: f64| (stored as f64 - exact).abs() <= exact.abs().max(1.0) * f32::EPSILON as f64;
    assert!(close(stats.clip_low, pct(0.5)), "{} vs {}", stats.clip_low, pct(0.5));
    assert!(close(stats.clip_high, pct(99.5)));
    let (low, high) = (stats.clip_low as f64, stats.clip_high as f64);
    let inside: Vec<f64> = sorted.iter().cloned().filter(|&v| v >= low && v <= high).collect();
    let mean = inside.iter().sum::<f64>() / inside.len() as f64;
    let std = (inside.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / inside.len() as f64).sqrt();
    assert!(close(stats.mean, mean), "{} vs {mean}", stats.mean);
    assert!(close(stats.std, std));
    // CtNormalization clips then standardizes.
    let n = CtNormalization { clip_low: -10.0, clip_high: 10.0, mean: 2.0, std: 4.0 };
    assert_eq!(n.apply(100.0), 2.0);
    assert_eq!(n.apply(-100.0), -3.0);
}

#[test]
fn foreground_histogram_counts_only_labelled_voxels() {
    let image = [10.0, 20.0, 30.4, f32::NAN, 50.0];
    let labels = [0u16, 1, 2, 1, 0];
    let h = HuHistogram::from_foreground(&image, &labels);
    assert_eq!(h.total(), 2);
    assert_eq!(h.min_hu, 20);
    assert_eq!(
        h.counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, _)| i as i32 + h.min_hu).collect::<Vec<_>>(),
        vec![20, 30]
    );
}

#[test]
fn linear_ramps_resample_exactly() {
    let (nz, ny, nx) = (7, 9, 11);
    let ramp = |z: f64, y: f64, x: f64| 3.0 * z - 2.0 * y + 0.5 * x + 7.0;
    let src = Array3::from_shape_fn((nz, ny, nx), |(z, y, x)| ramp(z as f64, y as f64, x as f64) as f32);
    for (shape, interp) in [([13, 5, 20], Interp::Cubic), ([4, 17, 6], Interp::Cubic), ([7, 18, 11], Interp::Linear)] {
        let out = resample(src.view(), shape, interp, None);
        assert_eq!(out.dim(), (shape[0], shape[1], shape[2]));
        for ((z, y, x), &v) in out.indexed_iter() {
            // Centre-aligned coordinate of output voxel o in input voxels.
            let c = |o: usize, n_in: usize, n_out: usize| (o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5;
            let (cz, cy, cx) = (c(z, nz, shape[0]), c(y, ny, shape[1]), c(x, nx, shape[2]));
            if interp == Interp::Linear && (cy < 0.0 || cy > (ny - 1) as f64) {
                continue; // linear clamps at the border by design (probabilities stay in range)
            }
            let want = ramp(cz, cy, cx);
            assert!((v as f64 - want).abs() < 1e-3, "{interp:?} {shape:?} at {z},{y},{x}: {v} vs {want}");
        }
    }
}

#[test]
fn anisotropic_spacing_uses_nearest_along_the_coarse_axis() {
    assert_eq!(anisotropy_axis([5.0, 0.8, 0.8]), Some(0));
    assert_eq!(anisotropy_axis([2.0, 0.8, 0.8]), None);
    assert_eq!(target_shape([10, 100, 100], [5.0, 0.8, 0.8], [1.5, 1.0, 1.0]), [33, 80, 80]);
    // Along z each output slice must equal one input slice (nearest), never a blend.
    let src = Array3::from_shape_fn((4, 3, 3), |(z, _, _)| (z * 100) as f32);
    let out = resample(src.view(), [12, 3, 3], Interp::Cubic, Some(0));
    let values: BTreeSet<i64> = out.iter().map(|&v| v.round() as i64).collect();
    assert_eq!(values, BTreeSet::from([0, 100, 200, 300]));
}

#[test]
fn label_resampling_keeps_the_label_set() {
    let labels = Array3::from_shape_fn((10, 12, 14), |(z, y, x)| {
        if (z as i32 - 5).pow(2) + (y as i32 - 6).pow(2) + (x as i32 - 7).pow(2) < 9 {
            7
        } else if x < 4 {
            2
        } else {
            0
        }
    });
    let input: BTreeSet<u16> = labels.iter().cloned().collect();
    for mode in [LabelInterp::Nearest, LabelInterp::PerLabelLinear] {
        for shape in [[20, 24, 28], [5, 7, 9], [10, 30, 5]] {
            let out = resample_labels(&labels, shape, mode, None);
            let got: BTreeSet<u16> = out.iter().cloned().collect();
            assert!(got.is_subset(&input), "{mode:?} {shape:?}: {got:?}");
            assert!(got.contains(&7) && got.contains(&2), "{mode:?} {shape:?} lost a label");
        }
    }
    // Doubling with per-label linear: every coarse voxel's 2x2x2 children keep its label in the interior.
    let out = resample_labels(&labels, [20, 24, 28], LabelInterp::PerLabelLinear, None);
    assert_eq!(out[[10, 12, 14]], 7);
    assert_eq!(out[[2, 2, 2]], 2);
}

fn toy_case() -> (Vec<f32>, Vec<u16>, Vec<Vec<[u32; 3]>>) {
    let shape = [20, 30, 30];
    let n = shape.iter().product();
    let image: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut labels = vec![0u16; n];
    let mut locs = vec![Vec::new(), Vec::new()];
    // Class 0: one voxel at a corner; class 1: a small block.
    labels[0] = 1;
    locs[0].push([0, 0, 0]);
    for z in 15..17 {
        for y in 20..22 {
            for x in 25..27 {
                labels[(z * 30 + y) * 30 + x] = 2;
                locs[1].push([z as u32, y as u32, x as u32]);
            }
        }
    }
    (image, labels, locs)
}

/// The toy case as the sampler sees it: one CT channel.
fn toy_view<'a>(image: &'a [f32], labels: &'a [u16], locs: &'a [Vec<[u32; 3]>]) -> CaseView<'a> {
    CaseView { shape: [20, 30, 30], image, channels: &[NormalizationScheme::Ct], labels, class_locations: locs }
}

#[test]
fn foreground_fraction_and_centring() {
    let (image, labels, locs) = toy_case();
    let case = toy_view(&image, &labels, &locs);
    let norm = CtNormalization { clip_low: -1e9, clip_high: 1e9, mean: 0.0, std: 1.0 };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (mut centred, mut with_fg) = (0usize, 0usize);
    let trials = 3000;
    for _ in 0..trials {
        let p = sample_patch(&case, [8, 8, 8], &norm, 1.0 / 3.0, &mut rng);
        if let Some(c) = p.centred_on {
            centred += 1;
            // The chosen voxel lies inside the patch and carries a foreground label there.
            let rel: Vec<i64> = (0..3).map(|a| c[a] as i64 - p.start[a]).collect();
            assert!(rel.iter().all(|&r| (0..8).contains(&r)), "{c:?} not in patch at {:?}", p.start);
            let idx = ((rel[0] * 8 + rel[1]) * 8 + rel[2]) as usize;
            assert_ne!(p.labels[idx], 0);
        }
        with_fg += p.labels.iter().any(|&l| l != 0) as usize;
    }
    let frac = centred as f64 / trials as f64;
    assert!((frac - 1.0 / 3.0).abs() < 0.03, "foreground-centred fraction {frac}");
    assert!(with_fg >= centred);
}

#[test]
fn small_cases_are_padded() {
    let (image, labels, locs) = toy_case();
    let case = toy_view(&image, &labels, &locs);
    let norm = CtNormalization { clip_low: -1e9, clip_high: 1e9, mean: 0.0, std: 1.0 };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..50 {
        let p = sample_patch(&case, [24, 16, 40], &norm, 0.5, &mut rng);
        assert_eq!(p.image.len(), 24 * 16 * 40);
        // z and x are smaller than the patch: the whole extent is inside, padding around it.
        assert!(p.start[0] <= 0 && p.start[0] >= -4 && p.start[2] <= 0 && p.start[2] >= -10);
        let voxels_inside = p.image.iter().zip(&p.labels).filter(|(&v, _)| v != 0.0).count();
        // (the case voxel (0, 0, 0) holds the value 0 itself)
        assert_eq!(voxels_inside, 20 * 16 * 30 - (p.start[1] == 0) as usize);
    }
    // Exact values where the patch overlaps the case, zeros elsewhere.
    let (img, lab) = cut(&case, [2, 2, 3], [-1, 0, 28], &norm);
    assert_eq!(img, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 28.0, 29.0, 0.0, 58.0, 59.0, 0.0]);
    assert_eq!(lab, vec![0; 12]);
}
