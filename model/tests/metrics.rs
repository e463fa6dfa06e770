//! Dice and HD95 on hand-made masks with anisotropic spacing.

use fedtalent_model::metrics::{
    dice, hausdorff_percentile, hd95, overlap, percentile, squared_distance_transform, surface,
};
use ndarray::Array3;
use rand::{Rng, SeedableRng};

fn boxed(shape: (usize, usize, usize), z: (usize, usize), y: (usize, usize), x: (usize, usize)) -> Array3<bool> {
    Array3::from_shape_fn(shape, |(a, b, c)| {
        (z.0..z.1).contains(&a) && (y.0..y.1).contains(&b) && (x.0..x.1).contains(&c)
    })
}

#[test]
fn dice_of_boxes() {
    let shape = (8, 10, 12);
    let a = boxed(shape, (0, 4), (0, 5), (0, 6)); // 120 voxels
    let b = boxed(shape, (2, 6), (0, 5), (0, 6)); // 120 voxels, 60 shared
    assert_eq!(dice(&a, &b), Some(0.5));
    assert_eq!(dice(&a, &a), Some(1.0));
    let empty = Array3::from_elem(shape, false);
    assert_eq!(dice(&a, &empty), Some(0.0));
    assert_eq!(dice(&empty, &empty), None);
    assert_eq!(hd95(&a, &empty, [1.0; 3]), None);
    let o = overlap(&a, &b, [1.0; 3]);
    assert_eq!((o.pred_voxels, o.ref_voxels), (120, 120));
}

/// Two parallel lines along x, 2 voxels apart in z, with spacing (z 2.0, y 0.5, x 0.7) mm:
/// A (20 voxels) → B: every distance is 2·2.0 = 4 mm. B (30 voxels, 10 beyond A's end) → A:
/// 20 × 4 mm and sqrt(4² + (0.7k)²) for k = 1..10. numpy's 95th percentile of those 30 values
/// sits at rank 0.95·29 = 27.55, between k = 8 and k = 9.
#[test]
fn hd95_of_lines_with_anisotropic_spacing() {
    let spacing = [2.0, 0.5, 0.7];
    let shape = (6, 3, 40);
    let a = boxed(shape, (1, 2), (1, 2), (5, 25));
    let b = boxed(shape, (3, 4), (1, 2), (5, 35));
    let d = |k: f64| (16.0 + (0.7 * k) * (0.7 * k)).sqrt();
    let want = d(8.0) + 0.55 * (d(9.0) - d(8.0));
    let got = hd95(&a, &b, spacing).unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    assert!((got - 7.2012).abs() < 1e-3);
    // Symmetric, 100th percentile = the Hausdorff distance d(10), 0 for identical masks.
    assert!((hd95(&b, &a, spacing).unwrap() - want).abs() < 1e-9);
    assert!((hausdorff_percentile(&a, &b, spacing, 100.0).unwrap() - d(10.0)).abs() < 1e-9);
    assert_eq!(hd95(&a, &a, spacing), Some(0.0));
    assert_eq!(dice(&a, &b), Some(0.0));
}

/// Two single voxels: the distance between their centres in mm.
#[test]
fn hd95_of_two_voxels() {
    let shape = (6, 6, 6);
    let a = boxed(shape, (1, 2), (1, 2), (1, 2));
    let b = boxed(shape, (4, 5), (3, 4), (1, 2));
    let want = ((3.0f64 * 2.0).powi(2) + (2.0f64 * 0.5).powi(2)).sqrt();
    assert!((hd95(&a, &b, [2.0, 0.5, 0.7]).unwrap() - want).abs() < 1e-12);
}

#[test]
fn surface_of_a_box_is_its_shell() {
    let a = boxed((7, 7, 7), (1, 6), (1, 6), (1, 6));
    let s = surface(&a);
    assert_eq!(s.iter().filter(|&&v| v).count(), 125 - 27);
    // At the volume border the mask's border voxels are surface too.
    let full = Array3::from_elem((3, 3, 3), true);
    assert_eq!(surface(&full).iter().filter(|&&v| v).count(), 26);
}

#[test]
fn distance_transform_equals_brute_force() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let spacing = [2.5, 0.6, 1.1];
    for density in [0.01, 0.1, 0.5] {
        let sites = Array3::from_shape_fn((7, 9, 11), |_| rng.gen_bool(density));
        let pts: Vec<(usize, usize, usize)> = sites.indexed_iter().filter(|(_, &s)| s).map(|(i, _)| i).collect();
        let dt = squared_distance_transform(&sites, spacing);
        for ((z, y, x), &got) in dt.indexed_iter() {
            let want = pts
                .iter()
                .map(|&(a, b, c)| {
                    let dz = (z as f64 - a as f64) * spacing[0];
                    let dy = (y as f64 - b as f64) * spacing[1];
                    let dx = (x as f64 - c as f64) * spacing[2];
                    dz * dz + dy * dy + dx * dx
                })
                .fold(f64::INFINITY, f64::min);
            assert!(
                (got - want).abs() < 1e-9 || (got.is_infinite() && want.is_infinite()),
                "({z},{y},{x}): {got} vs {want}"
            );
        }
    }
}

#[test]
fn percentile_is_numpys_linear() {
    // numpy.percentile([1, 2, 3, 4, 10], 95) = 8.8
    assert!((percentile(&mut [10.0, 1.0, 3.0, 2.0, 4.0], 95.0) - 8.8).abs() < 1e-12);
    assert_eq!(percentile(&mut [5.0], 95.0), 5.0);
}
