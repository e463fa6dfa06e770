//! NIfTI reading and mask writing checked against nibabel.

mod common;

use fedtalent_data::{read_label_nifti, read_nifti, write_mask_nifti};

fn as_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn as_affine(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().flat_map(as_f64s).collect()
}

fn flat(a: &[[f64; 4]; 4]) -> Vec<f64> {
    a.iter().flatten().cloned().collect()
}

fn assert_close(what: &str, ours: &[f64], theirs: &[f64], tol: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}[{i}]: ours {a}, nibabel {b}");
    }
}

#[test]
fn reads_what_nibabel_reads() {
    let dir = tempfile::tempdir().unwrap();
    let cases = common::oracle(&["write", dir.path().to_str().unwrap()]);
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let path = case["path"].as_str().unwrap();
        let vol = read_nifti(path).unwrap_or_else(|e| panic!("{e}"));
        let shape_xyz: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let (z, y, x) = vol.data.dim();
        assert_eq!(vec![x, y, z], shape_xyz, "{path}: shape");
        let zooms = as_f64s(&case["zooms"]);
        assert_close(&format!("{path} spacing"), &vol.spacing, &[zooms[2], zooms[1], zooms[0]], 1e-6);
        assert_close(&format!("{path} affine"), &flat(&vol.affine), &as_affine(&case["affine"]), 1e-5);
        let ours: Vec<f64> = vol.data.iter().map(|&v| v as f64).collect();
        assert_close(&format!("{path} voxels"), &ours, &as_f64s(&case["values"]), 1e-6);
    }
}

#[test]
fn written_masks_keep_the_source_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let cases = common::oracle(&["write", dir.path().to_str().unwrap()]);
    let mut written = Vec::new();
    let mut expected = Vec::new();
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let src = read_nifti(case["path"].as_str().unwrap()).unwrap();
        let mask = src.data.mapv(|v| (v > 0.0) as u8);
        let ext = if i % 2 == 0 { "nii.gz" } else { "nii" };
        let out = dir.path().join(format!("mask{i}.{ext}"));
        write_mask_nifti(&out, &mask, &src.header).unwrap();
        written.push(out.to_str().unwrap().to_string());
        expected.push((case.clone(), mask));
    }
    let mut args = vec!["read"];
    args.extend(written.iter().map(|s| s.as_str()));
    let read = common::oracle(&args);
    for (got, (src, mask)) in read.as_array().unwrap().iter().zip(&expected) {
        let path = got["path"].as_str().unwrap();
        assert_eq!(got["dtype"], "uint8", "{path}");
        assert_eq!(got["shape"], src["shape"], "{path}");
        assert_eq!(got["sform_code"], src["sform_code"], "{path}");
        assert_eq!(got["qform_code"], src["qform_code"], "{path}");
        assert_close(&format!("{path} affine"), &as_affine(&got["affine"]), &as_affine(&src["affine"]), 1e-5);
        let ours: Vec<f64> = mask.iter().map(|&v| v as f64).collect();
        assert_close(&format!("{path} voxels"), &as_f64s(&got["values"]), &ours, 0.0);
        // And our own reader agrees with what we wrote.
        let back = read_label_nifti(path).unwrap();
        assert_eq!(back.data.mapv(|v| v as u8), *mask);
    }
}

#[test]
fn corrupt_files_are_reported_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = common::oracle(&["write", dir.path().to_str().unwrap()]);
    let gz =
        cases.as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).find(|p| p.ends_with(".gz")).unwrap();
    let bytes = std::fs::read(gz).unwrap();
    let truncated = dir.path().join("truncated.nii.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_nifti(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated.nii.gz") && err.contains("gzip"), "{err}");

    let plain = cases
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .find(|p| p.ends_with("i32_noform.nii"))
        .unwrap();
    let bytes = std::fs::read(plain).unwrap();
    let short = dir.path().join("short.nii");
    std::fs::write(&short, &bytes[..bytes.len() - 10]).unwrap();
    let err = read_nifti(&short).unwrap_err().to_string();
    assert!(err.contains("short.nii") && err.contains("truncated voxel data"), "{err}");

    let garbage = dir.path().join("garbage.nii");
    std::fs::write(&garbage, vec![7u8; 400]).unwrap();
    let err = read_nifti(&garbage).unwrap_err().to_string();
    assert!(err.contains("garbage.nii") && err.contains("not a NIfTI"), "{err}");

    // A float image read as labels: non-integer values are refused, naming the file.
    let float =
        cases.as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).find(|p| p.contains("f32_both")).unwrap();
    let err = read_label_nifti(float).unwrap_err().to_string();
    assert!(err.contains("f32_both") && err.contains("label value"), "{err}");
}
