//! Every NIfTI file nibabel ships (nibabel/tests/data), plus each again as a .hdr/.img pair, read
//! by fedtalent and by nibabel: the voxels and affine agree, or we refuse with a message that says
//! why. The per-file outcome is printed (`cargo test --test nibabel_corpus -- --nocapture`).

mod common;

use std::path::Path;

use fedtalent_data::{read_channel_files, read_header, read_image_info, read_nifti, read_nifti_channels, ChannelImage};
use serde_json::Value;

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// The first mismatch beyond `tol` (relative, as nifti_oracle.rs), or None.
fn mismatch(what: &str, ours: &[f64], theirs: &[f64], tol: f64) -> Option<String> {
    if ours.len() != theirs.len() {
        return Some(format!("{what}: {} values, nibabel {}", ours.len(), theirs.len()));
    }
    let (i, (a, b)) =
        ours.iter().zip(theirs).enumerate().find(|(_, (a, b))| (*a - *b).abs() > tol * (1.0 + b.abs()))?;
    Some(format!("{what}[{i}]: ours {a}, nibabel {b}"))
}

/// nibabel's voxels, volume after volume, each [z, y, x] in C order.
fn nibabel_volumes(entry: &Value) -> Vec<Vec<f64>> {
    let bytes = std::fs::read(entry["values_file"].as_str().unwrap()).unwrap();
    let values: Vec<f64> = bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    let volumes = entry["volumes"].as_u64().unwrap() as usize;
    values.chunks(values.len() / volumes).map(<[f64]>::to_vec).collect()
}

/// Compares what we read with nibabel: every channel, the affine, the spacing, and the 3D
/// readers (which must read a one-volume image and refuse a multi-volume one, saying so).
fn compare_readable(entry: &Value, path: &str) -> Result<String, String> {
    let image: ChannelImage = read_nifti_channels(path).map_err(|e| format!("we refused it: {e}"))?;
    let expected = nibabel_volumes(entry);
    let shape = usizes(&entry["shape"]);
    let [z, y, x] = image.shape();
    if [x, y, z] != shape[..3] || image.channels.len() != expected.len() {
        return Err(format!("shape {:?} x {} channels, nibabel {shape:?}", [x, y, z], image.channels.len()));
    }
    let affine: Vec<f64> = entry["affine"].as_array().unwrap().iter().flat_map(f64s).collect();
    let zooms = f64s(&entry["zooms"]);
    let mut problems: Vec<String> = [
        mismatch("affine", &image.affine.iter().flatten().copied().collect::<Vec<_>>(), &affine, 1e-5),
        mismatch("spacing", &image.spacing, &[zooms[2], zooms[1], zooms[0]], 1e-6),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (c, (ours, theirs)) in image.channels.iter().zip(&expected).enumerate() {
        let ours: Vec<f64> = ours.iter().map(|&v| v as f64).collect();
        problems.extend(mismatch(&format!("channel {c} voxels"), &ours, theirs, 1e-6));
    }
    problems.extend(check_3d_readers(path, expected.len()));
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(match expected.len() {
        1 => format!("read equal ({x}x{y}x{z})"),
        n => format!("read equal as {n} channels ({x}x{y}x{z}); the 3D readers refuse it as 4D"),
    })
}

fn check_3d_readers(path: &str, volumes: usize) -> Option<String> {
    let info = read_image_info(path).map_err(|e| e.to_string());
    if info.as_ref().map(|i| i.channels) != Ok(volumes) {
        return Some(format!("read_image_info: {info:?}"));
    }
    let (volume, header) = (read_nifti(path), read_header(path));
    if volumes == 1 {
        return match (volume, header) {
            (Ok(_), Ok(_)) => None,
            (v, h) => Some(format!("3D readers refused a one-volume image: {:?} / {:?}", v.err(), h.err())),
        };
    }
    let said_4d = |e: &dyn std::fmt::Display| {
        let e = e.to_string();
        e.contains(path)
            && e.contains(&format!("4D image with {volumes} volumes"))
            && e.contains("3D volume is expected")
    };
    match (volume, header) {
        (Err(v), Err(h)) if said_4d(&v) && said_4d(&h) => None,
        (v, h) => {
            Some(format!("3D readers did not refuse a {volumes}-volume image as 4D: {:?} / {:?}", v.err(), h.err()))
        }
    }
}

/// Files nibabel cannot read the voxels of, or that are not volumes: we must refuse them too, with
/// the reason in the message.
fn compare_refused(entry: &Value, path: &str) -> Result<String, String> {
    let must_say: &str = if let Some(words) = entry["must_refuse"].as_str() {
        words
    } else if entry["nib_class"] == "Cifti2Image" {
        "CIFTI-2"
    } else if entry["nib_error"].as_str().is_some_and(|e| e.contains("No such file")) {
        ".img"
    } else {
        return Err(format!("nibabel cannot read it ({}) and no refusal is expected", entry["nib_error"]));
    };
    match read_nifti_channels(path) {
        Ok(_) => Err(format!("we read it, but expected a refusal mentioning {must_say:?}")),
        Err(e) if e.to_string().contains(must_say) => Ok(format!("refused: {e}")),
        Err(e) => Err(format!("refused without mentioning {must_say:?}: {e}")),
    }
}

#[test]
fn every_nifti_file_nibabel_ships_reads_as_nibabel_reads_it_or_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = common::oracle(&["corpus", dir.path().to_str().unwrap()]);
    let entries = corpus["entries"].as_array().unwrap();
    let (mut equal, mut refused, mut failures) = (0, 0, Vec::new());
    for entry in entries {
        let (name, path) = (entry["name"].as_str().unwrap(), entry["path"].as_str().unwrap());
        let outcome =
            if entry["values_file"].is_string() { compare_readable(entry, path) } else { compare_refused(entry, path) };
        match &outcome {
            Ok(o) if o.starts_with("refused") => refused += 1,
            Ok(_) => equal += 1,
            Err(_) => failures.push(name.to_string()),
        }
        let path_for_display = Path::new(path).file_name().unwrap().to_string_lossy();
        eprintln!(
            "{name} [{}, {path_for_display}]: {}",
            entry["nib_class"].as_str().unwrap(),
            match outcome {
                Ok(o) => o,
                Err(e) => format!("MISMATCH: {e}"),
            }
        );
    }
    let skipped = corpus["skipped"].as_array().unwrap();
    for s in skipped {
        eprintln!("{}: skipped, not NIfTI ({})", s["name"].as_str().unwrap(), s["why"].as_str().unwrap());
    }
    eprintln!(
        "{} NIfTI files (shipped and derived): {equal} read equal to nibabel, {refused} refused with the reason, {} \
         mismatched; {} shipped files are not NIfTI",
        entries.len(),
        failures.len(),
        skipped.len()
    );
    assert!(failures.is_empty(), "mismatches with nibabel: {failures:?}");
    // The corpus must really contain what it is meant to cover.
    assert!(equal >= 17 && refused >= 6, "{equal} equal, {refused} refused");
}

/// An Analyze 7.5 header shares NIfTI-1's size but has no magic; nibabel reads it as Analyze, and
/// we refuse it by name rather than guess its orientation.
#[test]
fn an_analyze_header_is_refused_as_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = common::oracle(&["corpus", dir.path().to_str().unwrap()]);
    let analyze: Vec<&Value> = corpus["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["nib_class"].as_str().is_some_and(|c| c.contains("Analyze")))
        .collect();
    assert!(!analyze.is_empty(), "nibabel ships analyze.hdr");
    for s in analyze {
        let err = read_nifti(s["path"].as_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("analyze.hdr") && err.contains("Analyze 7.5"), "{err}");
    }
}

/// nnU-Net's one-file-per-channel cases: channels stack in order, and a channel on another grid is
/// refused naming both files.
#[test]
fn channel_files_stack_in_order_and_must_share_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let cases = common::oracle(&["write", dir.path().to_str().unwrap()]);
    let path_of = |suffix: &str| {
        cases.as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).find(|p| p.ends_with(suffix)).unwrap()
    };
    // Two channels of one case: the same file twice, then a scaled copy through the 4D reader.
    let first = path_of("u8_sform.nii");
    let image = read_channel_files(&[first, first]).unwrap();
    let alone = read_nifti(first).unwrap();
    assert_eq!(image.channels.len(), 2);
    assert_eq!(image.channels[1], alone.data);
    assert_eq!(image.affine, alone.affine);

    let err = read_channel_files(&[first, path_of("i16_scaled_qform.nii.gz")]).unwrap_err().to_string();
    assert!(err.contains("i16_scaled_qform.nii.gz") && err.contains("u8_sform.nii") && err.contains("affine"), "{err}");
    let err = read_channel_files::<&str>(&[]).unwrap_err().to_string();
    assert!(err.contains("at least one channel file"), "{err}");
}
