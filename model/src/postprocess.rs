//! nnU-Net's post-processing, per sigmoid head: keep only the largest connected component of a
//! class's mask where that raised the class's Dice on validation cases (nnU-Net v1
//! `determine_postprocessing`: decided per class, applied only on a strict improvement, so a class
//! with several true components, e.g. tumours, keeps them all unless the validation says
//! otherwise). Each class is decided on the validation cases of the site that annotates it,
//! never on test data; the decision is stored in `model.json` (`largest_component`), so
//! `predict` and `evaluate` apply exactly what was decided.

use anyhow::{ensure, Context, Result};
use fedtalent_data::{read_label_nifti, Case};
use ndarray::Array3;
use serde::Serialize;

use crate::metrics::dice;
use crate::predict::Predictor;

/// Face (6-)connectivity, as scipy's `ndimage.label` default that nnU-Net uses.
const NEIGHBOURS: [[isize; 3]; 6] = [[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]];

/// Component label of every voxel of a binary mask (0 outside it, 1.. inside) and the size of
/// each component (`sizes[k - 1]` for label k).
pub fn connected_components(mask: &Array3<u8>) -> (Array3<u32>, Vec<usize>) {
    let (nz, ny, nx) = mask.dim();
    let mut labels = Array3::<u32>::zeros((nz, ny, nx));
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in ndarray::indices((nz, ny, nx)) {
        if mask[start] == 0 || labels[start] != 0 {
            continue;
        }
        let label = sizes.len() as u32 + 1;
        labels[start] = label;
        stack.push(start);
        let mut size = 0usize;
        while let Some((z, y, x)) = stack.pop() {
            size += 1;
            for [dz, dy, dx] in NEIGHBOURS {
                let (Some(z), Some(y), Some(x)) =
                    (z.checked_add_signed(dz), y.checked_add_signed(dy), x.checked_add_signed(dx))
                else {
                    continue;
                };
                if z < nz && y < ny && x < nx && mask[(z, y, x)] != 0 && labels[(z, y, x)] == 0 {
                    labels[(z, y, x)] = label;
                    stack.push((z, y, x));
                }
            }
        }
        sizes.push(size);
    }
    (labels, sizes)
}

/// Clears every voxel outside the mask's largest connected component (the first of equal
/// ones); returns how many voxels were cleared.
pub fn keep_largest_component(mask: &mut Array3<u8>) -> usize {
    let (labels, sizes) = connected_components(mask);
    let Some((largest, _)) = sizes.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0))) else {
        return 0;
    };
    let keep = largest as u32 + 1;
    let mut cleared = 0;
    ndarray::Zip::from(mask).and(&labels).for_each(|m, &l| {
        if l != 0 && l != keep {
            *m = 0;
            cleared += 1;
        }
    });
    cleared
}

/// What the validation cases said about one class.
#[derive(Clone, Debug, Serialize)]
pub struct ClassDecision {
    pub id: String,
    /// Mean Dice over the cases where it is defined, as predicted and with only the largest
    /// component kept.
    pub dice_raw: f64,
    pub dice_largest: f64,
    pub cases: usize,
    pub keep_largest: bool,
}

/// Decides, for each of `classes` (indices into the model's classes), whether keeping only the
/// largest component raises its mean Dice on `cases` (labelled with those classes' label sets).
pub fn determine(predictor: &Predictor, cases: &[Case], classes: &[usize]) -> Result<Vec<ClassDecision>> {
    ensure!(!cases.is_empty(), "no validation case to decide the post-processing on");
    let mut raw = vec![Vec::new(); classes.len()];
    let mut largest = vec![Vec::new(); classes.len()];
    for case in cases {
        let labels = read_label_nifti(&case.label)?;
        let prediction = predictor
            .predict_unprocessed(&case.image, classes)
            .with_context(|| format!("validation case {}", case.id))?;
        for (k, (&c, mask)) in classes.iter().zip(prediction.masks).enumerate() {
            ensure!(
                mask.dim() == labels.data.dim(),
                "{}: shape {:?} differs from the image's {:?}",
                case.label.display(),
                labels.data.dim(),
                mask.dim()
            );
            let region = &predictor.manifest.classes[c].labels;
            let reference = labels.data.mapv(|l| l != 0 && region.contains(&(l as u32)));
            let mut kept = mask.clone();
            keep_largest_component(&mut kept);
            if let (Some(r), Some(l)) =
                (dice(&mask.mapv(|v| v != 0), &reference), dice(&kept.mapv(|v| v != 0), &reference))
            {
                raw[k].push(r);
                largest[k].push(l);
            }
        }
    }
    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    Ok(classes
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let (dice_raw, dice_largest) = (mean(&raw[k]), mean(&largest[k]));
            ClassDecision {
                id: predictor.manifest.classes[c].id.clone(),
                dice_raw,
                dice_largest,
                cases: raw[k].len(),
                keep_largest: dice_largest > dice_raw,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(points: &[(usize, usize, usize)]) -> Array3<u8> {
        let mut m = Array3::zeros((4, 5, 6));
        for &p in points {
            m[p] = 1;
        }
        m
    }

    #[test]
    fn components_are_face_connected() {
        // Two voxels touching only at an edge are two components; a face-connected run is one.
        let m = mask(&[(0, 0, 0), (1, 1, 0), (3, 4, 3), (3, 4, 4), (3, 4, 5)]);
        let (labels, sizes) = connected_components(&m);
        assert_eq!(sizes, vec![1, 1, 3]);
        assert_eq!(labels[(3, 4, 3)], labels[(3, 4, 5)]);
        assert_ne!(labels[(0, 0, 0)], labels[(1, 1, 0)]);
        assert_eq!(labels[(2, 2, 2)], 0);
    }

    #[test]
    fn only_the_largest_component_is_kept() {
        let mut m = mask(&[(0, 0, 0), (2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 4, 5)]);
        assert_eq!(keep_largest_component(&mut m), 2);
        assert_eq!(m, mask(&[(2, 2, 2), (2, 2, 3), (2, 3, 3)]));
        let mut empty = mask(&[]);
        assert_eq!(keep_largest_component(&mut empty), 0);
        assert_eq!(empty, mask(&[]));
    }
}
