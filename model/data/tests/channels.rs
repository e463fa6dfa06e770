//! Multi-channel datasets: nnU-Net v2 `_0000 … _000K` files and MSD 4D images read as channels,
//! checked against dataset.json, and normalized per channel by scheme (CT with the federation's
//! statistics when cut, anything else z-scored per image when cached).

use std::path::{Path, PathBuf};

use fedtalent_data::*;
use fedtalent_vocab::{CtNormalization, InputChannels, NormalizationScheme};
use ndarray::Array3;

const SHAPE: [usize; 3] = [16, 36, 36];
const SPACING: [f64; 3] = [6.0, 5.0, 5.0];

fn sites(dir: &Path, kinds: Vec<SiteKind>) -> Vec<GeneratedSite> {
    generate_sites(dir, &SynthOptions { seed: 3, cases_per_site: 2, shape: SHAPE, sites: kinds }).unwrap()
}

fn config(dataset_dir: PathBuf, classes: &[fedtalent_vocab::ClassRegion], cache: &Path) -> SiteDataConfig {
    SiteDataConfig {
        dataset_dir,
        classes: classes.to_vec(),
        val_cases: ValCases::Count(0),
        cache_dir: cache.to_path_buf(),
        target_spacing: SPACING,
        label_interp: LabelInterp::Nearest,
        input_channels: None,
    }
}

fn preprocess_first(cfg: &SiteDataConfig) -> (Dataset, PreprocessedCase) {
    let ds = Dataset::open(cfg).unwrap();
    let case = preprocess_case(&ds.cases[0], &PreprocessOptions::from_dataset(&ds), &cfg.cache_dir).unwrap();
    (ds, case)
}

/// Mean and population std of `values` where `mask` holds.
fn masked_stats(values: &[f32], mask: &[bool]) -> (f64, f64) {
    let picked: Vec<f64> = values.iter().zip(mask).filter(|(_, &m)| m).map(|(&v, _)| v as f64).collect();
    let mean = picked.iter().sum::<f64>() / picked.len() as f64;
    let var = picked.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / picked.len() as f64;
    (mean, var.sqrt())
}

/// The nonzero mask of a case at the target spacing, as preprocessing derives it.
fn resampled_mask(case: &Case, channels: usize, shape: [usize; 3]) -> Vec<bool> {
    let image = read_case_image(&case.image, channels).unwrap();
    let bb = preprocess::nonzero_bbox(&image.channels);
    let cropped: Vec<Array3<f32>> = image
        .channels
        .iter()
        .map(|c| c.slice(ndarray::s![bb[0][0]..bb[0][1], bb[1][0]..bb[1][1], bb[2][0]..bb[2][1]]).to_owned())
        .collect();
    let mask = nonzero_mask(&cropped).mapv(u16::from);
    let axis = anisotropy_axis(image.spacing);
    resample_labels(&mask, shape, LabelInterp::PerLabelLinear, axis).iter().map(|&v| v != 0).collect()
}

#[test]
fn an_mr_site_is_two_z_scored_channels_normalized_within_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let mr = sites(dir.path(), vec![SiteKind::MrLiver]).remove(0);
    assert!(
        mr.test_image.ends_with("test_mr_000_0000.nii.gz")
            && mr.test_image.with_file_name("test_mr_000_0001.nii.gz").exists()
    );
    let cfg = config(mr.dataset_dir.clone(), &mr.classes, &dir.path().join("cache"));
    let report = check(&cfg);
    assert!(report.is_ok(), "{report}");
    assert!(report.to_string().contains("input channels: T1 (zscore), T2 (zscore)"), "{report}");

    let (ds, case) = preprocess_first(&cfg);
    assert_eq!(ds.channels, InputChannels::named(["T1", "T2"]));
    assert_eq!(case.meta.channels, vec![NormalizationScheme::ZScore; 2]);
    // The body fills about (30 cm / 37 cm)² of each slice: cropping leaves < 3/4, so masked.
    assert!(case.meta.masked_norm);
    let mask = resampled_mask(&ds.cases[0], 2, case.meta.shape);
    let n = mask.len();
    for (c, channel) in case.image().chunks(n).enumerate() {
        let (mean, std) = masked_stats(channel, &mask);
        assert!(mean.abs() < 1e-4 && (std - 1.0).abs() < 1e-4, "channel {c}: mean {mean}, std {std} in the mask");
    }
    // No CT channel: nothing for the federation's CT statistics, and the CT normalization given
    // to normalized_image touches nothing.
    assert_eq!(case.meta.histogram.total(), 0);
    let wild = CtNormalization { clip_low: -1.0, clip_high: 1.0, mean: 100.0, std: 0.01 };
    assert_eq!(case.normalized_image(&wild).as_slice().unwrap(), case.image());
}

#[test]
fn ct_and_mr_channels_of_one_case_get_their_own_normalization() {
    let dir = tempfile::tempdir().unwrap();
    let generated = sites(&dir.path().join("gen"), vec![SiteKind::Liver, SiteKind::MrLiver]);
    // One case of channels CT (the CT test image) and T2 (the MR test case's T2 on the same grid).
    let ds_dir = dir.path().join("Dataset009_mixed");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(ds_dir.join(sub)).unwrap();
    }
    std::fs::copy(&generated[0].test_image, ds_dir.join("imagesTr/mixed_000_0000.nii.gz")).unwrap();
    std::fs::copy(
        generated[1].test_image.with_file_name("test_mr_000_0001.nii.gz"),
        ds_dir.join("imagesTr/mixed_000_0001.nii.gz"),
    )
    .unwrap();
    std::fs::copy(&generated[0].test_label, ds_dir.join("labelsTr/mixed_000.nii.gz")).unwrap();
    let json = r#"{"channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "liver": 1, "liver_tumour": 2},
                   "numTraining": 1, "file_ending": ".nii.gz"}"#;
    std::fs::write(ds_dir.join("dataset.json"), json).unwrap();
    let cfg = config(ds_dir, &generated[0].classes, &dir.path().join("cache"));
    let (ds, case) = preprocess_first(&cfg);
    assert_eq!(ds.channels.schemes(), vec![NormalizationScheme::Ct, NormalizationScheme::ZScore]);

    let n: usize = case.meta.shape.iter().product();
    let (hu, t2) = case.image().split_at(n);
    // CT is cached in HU (the federation's statistics are applied when cut) ...
    assert!(hu.iter().cloned().fold(f32::INFINITY, f32::min) < -500.0, "the CT channel is not in HU");
    assert!(case.meta.histogram.total() > 0, "the CT channel's foreground histogram is missing");
    // ... and T2 is z-scored per image, within the mask both channels' nonzero voxels make.
    let (mean, std) = masked_stats(t2, &resampled_mask(&ds.cases[0], 2, case.meta.shape));
    assert!(mean.abs() < 1e-4 && (std - 1.0).abs() < 1e-4, "T2: mean {mean}, std {std}");
    let ct = CtNormalization { clip_low: -100.0, clip_high: 200.0, mean: 50.0, std: 25.0 };
    let normalized = case.normalized_image(&ct);
    let (ct_part, t2_part) = normalized.as_slice().unwrap().split_at(n);
    assert!(ct_part.iter().zip(hu).all(|(&v, &h)| v == ct.apply(h)));
    assert_eq!(t2_part, t2);
    // Patches cut for training normalize the same way.
    let view = sampler::CaseView {
        shape: case.meta.shape,
        image: case.image(),
        channels: &case.meta.channels,
        labels: case.labels(),
        class_locations: &case.meta.class_locations,
    };
    let (patch, _) = sampler::cut(&view, case.meta.shape, [0, 0, 0], &ct);
    assert_eq!(patch.as_slice(), normalized.as_slice().unwrap());
}

/// Writes a 4D float32 NIfTI of `volumes` (each [z, y, x]) along its 4th dimension.
fn write_4d(path: &Path, volumes: &[Array3<f32>], header: &SpatialHeader) {
    let (nz, ny, nx) = volumes[0].dim();
    let values: Vec<f32> = volumes.iter().flat_map(|v| v.iter().copied()).collect();
    let xyzt =
        ndarray17::Array4::from_shape_vec(ndarray17::ShapeBuilder::f((nx, ny, nz, volumes.len())), values).unwrap();
    let reference = nifti::NiftiHeader {
        pixdim: [
            header.pixdim[0] as f32,
            header.pixdim[1] as f32,
            header.pixdim[2] as f32,
            header.pixdim[3] as f32,
            1.0,
            1.0,
            1.0,
            1.0,
        ],
        sform_code: 1,
        srow_x: header.srow[0].map(|v| v as f32),
        srow_y: header.srow[1].map(|v| v as f32),
        srow_z: header.srow[2].map(|v| v as f32),
        ..Default::default()
    };
    nifti::writer::WriterOptions::new(path).reference_header(&reference).write_nifti(&xyzt).unwrap();
}

#[test]
fn msd_4d_images_are_read_as_channels_and_a_wrong_count_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mr = sites(&dir.path().join("gen"), vec![SiteKind::MrLiver]).remove(0);
    let ds_dir = dir.path().join("Task05_Phantom");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(ds_dir.join(sub)).unwrap();
    }
    let source = Dataset::open(&config(mr.dataset_dir.clone(), &mr.classes, dir.path())).unwrap();
    let mut training = Vec::new();
    for case in &source.cases {
        let image = read_case_image(&case.image, 2).unwrap();
        write_4d(&ds_dir.join(format!("imagesTr/{}.nii", case.id)), &image.channels, &image.header);
        std::fs::copy(&case.label, ds_dir.join(format!("labelsTr/{}.nii.gz", case.id))).unwrap();
        training.push(serde_json::json!({"image": format!("./imagesTr/{}.nii", case.id), "label": format!("./labelsTr/{}.nii.gz", case.id)}));
    }
    let json = serde_json::json!({"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "liver", "2": "liver_tumour"},
                                  "training": training});
    std::fs::write(ds_dir.join("dataset.json"), json.to_string()).unwrap();
    let cfg = config(ds_dir.clone(), &mr.classes, &dir.path().join("cache"));
    let report = check(&cfg);
    assert!(report.is_ok() && report.layout == Some(Layout::Msd), "{report}");
    // The 4D file preprocesses exactly as the two channel files it was made of.
    let (_, from_4d) = preprocess_first(&cfg);
    let (_, from_files) =
        preprocess_first(&config(mr.dataset_dir.clone(), &mr.classes, &dir.path().join("cache_files")));
    assert_eq!(from_4d.image(), from_files.image());

    // A third modality declared: each 4D image is refused naming its volume count.
    let json = json.to_string().replace(r#""1":"T2""#, r#""1":"T2","2":"ADC""#);
    std::fs::write(ds_dir.join("dataset.json"), json).unwrap();
    let report = check(&cfg);
    assert_eq!(report.problems.len(), source.cases.len(), "{report}");
    assert!(
        report.problems[0].to_string().contains("a 4D image with 2 volumes where 3 input channel(s) are declared"),
        "{report}"
    );
}

#[test]
fn a_missing_or_extra_channel_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mr = sites(dir.path(), vec![SiteKind::MrLiver]).remove(0);
    let cfg = config(mr.dataset_dir.clone(), &mr.classes, &dir.path().join("cache"));
    let images = mr.dataset_dir.join("imagesTr");
    let t2 = images.join("mr_liver_001_0001.nii.gz");
    std::fs::rename(&t2, images.join("elsewhere.nii.gz")).unwrap();
    assert_sole_problem(&cfg, "mr_liver_001_0001.nii.gz: missing: 2 input channels are declared");
    std::fs::rename(images.join("elsewhere.nii.gz"), &t2).unwrap();

    std::fs::copy(&t2, images.join("mr_liver_001_0002.nii.gz")).unwrap();
    assert_sole_problem(&cfg, "mr_liver_001_0002.nii.gz: a channel beyond the 2 input channels");
}

/// `check` finds exactly one problem, and it says `what`.
fn assert_sole_problem(cfg: &SiteDataConfig, what: &str) {
    let report = check(cfg);
    assert_eq!(report.problems.len(), 1, "{report}");
    assert!(report.problems[0].to_string().contains(what), "{report}");
}

#[test]
fn cached_single_channel_ct_cases_are_rebuilt_in_the_new_format() {
    let dir = tempfile::tempdir().unwrap();
    let ct = sites(dir.path(), vec![SiteKind::Liver]).remove(0);
    let cfg = config(ct.dataset_dir.clone(), &ct.classes, &dir.path().join("cache"));
    let (ds, case) = preprocess_first(&cfg);
    assert_eq!(case.meta.channels, vec![NormalizationScheme::Ct]);
    assert!(!case.meta.masked_norm, "CT is never normalized within a mask");
    // A file of the old format under a stale name (another key) is removed when the case is
    // preprocessed again, and a file with the old magic is never read as a case.
    let stale = cfg.cache_dir.join(format!("{}.0123456789abcdef.ftp", ds.cases[0].id));
    let mut old = std::fs::read(&case.path).unwrap();
    old[..8].copy_from_slice(b"FTPREP01");
    std::fs::write(&stale, &old).unwrap();
    assert!(PreprocessedCase::open(&stale).is_err());
    std::fs::remove_file(&case.path).unwrap();
    let again = preprocess_case(&ds.cases[0], &PreprocessOptions::from_dataset(&ds), &cfg.cache_dir).unwrap();
    assert!(!stale.exists(), "the stale cache file was kept");
    assert_eq!(again.image(), case.image());
}
