//! Phantom sites through dataset check, preprocessing cache, batch loader and augmentation.

use std::collections::BTreeSet;
use std::path::Path;

use fedtalent_data::*;
use fedtalent_vocab::{ClassRegion, CtNormalization};
use tch::{Device, Kind, Tensor};

fn small_sites(dir: &Path, seed: u64) -> Vec<GeneratedSite> {
    let opts = SynthOptions {
        seed,
        cases_per_site: 3,
        shape: [16, 32, 32],
        sites: vec![SiteKind::Liver, SiteKind::MultiOrgan, SiteKind::LiverWide],
    };
    generate_sites(dir, &opts).unwrap()
}

fn config_for(site: &GeneratedSite, cache: &Path) -> SiteDataConfig {
    SiteDataConfig {
        dataset_dir: site.dataset_dir.clone(),
        classes: site.classes.clone(),
        val_cases: ValCases::Count(1),
        cache_dir: cache.to_path_buf(),
        target_spacing: [6.0, 4.0, 4.0],
        label_interp: LabelInterp::Nearest,
        input_channels: None,
    }
}

fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in walk(dir) {
        out.push((entry.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&entry).unwrap()));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn phantoms_are_deterministic_per_seed_and_vary_per_case() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    small_sites(a.path(), 11);
    small_sites(b.path(), 11);
    small_sites(c.path(), 12);
    let (fa, fb, fc) = (file_bytes(a.path()), file_bytes(b.path()), file_bytes(c.path()));
    assert_eq!(fa, fb, "same seed, same files");
    assert_ne!(fa, fc, "another seed, other files");
    let liver0 = read_nifti(a.path().join("Dataset001_liver/imagesTr/liver_000_0000.nii.gz")).unwrap();
    let liver1 = read_nifti(a.path().join("Dataset001_liver/imagesTr/liver_001_0000.nii.gz")).unwrap();
    assert_ne!(liver0.data, liver1.data);
    // A physical field of view (34-40 cm in-plane, 19-25 cm along z) divided into the grid.
    let (nz, ny, _) = liver0.data.dim();
    let (fov_z, fov_xy) = (liver0.spacing[0] * nz as f64, liver0.spacing[1] * ny as f64);
    assert!((190.0..=250.0).contains(&fov_z) && (340.0..=400.0).contains(&fov_xy), "fov {fov_z} x {fov_xy} mm");
    // CT-like: air, fat, soft tissue and bone are all present.
    let has = |lo: f32, hi: f32| liver0.data.iter().any(|&v| v >= lo && v <= hi);
    assert!(has(-1024.0, -950.0) && has(-130.0, -70.0) && has(40.0, 80.0) && has(600.0, 1200.0));
}

#[test]
fn sites_annotate_their_own_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let sites = small_sites(dir.path(), 1);
    let read = |p: &Path| read_label_nifti(p).unwrap().data;
    let liver = read(&sites[0].test_label);
    let multi = read(&sites[1].test_label);
    let wide = read(&sites[2].test_label);
    let count = |a: &ndarray::Array3<u16>, f: &dyn Fn(u16) -> bool| a.iter().filter(|&&v| f(v)).count();
    assert_eq!(count(&liver, &|v| v != 0), count(&multi, &|v| v == 1), "same liver extent");
    assert!(count(&wide, &|v| v != 0) > count(&liver, &|v| v != 0), "the wide protocol draws more");
    let labels: BTreeSet<u16> = multi.iter().cloned().collect();
    assert!(labels.is_subset(&BTreeSet::from([0, 1, 2, 3, 4])));
    assert!(labels.len() >= 4, "multi-organ test case shows its organs: {labels:?}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sites[0].dataset_dir.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(json["channel_names"]["0"], "CT");
    assert_eq!(json["numTraining"], 3);
    assert_eq!(json["file_ending"], ".nii.gz");
}

#[test]
fn check_lists_every_problem_with_file_names() {
    let dir = tempfile::tempdir().unwrap();
    let sites = small_sites(dir.path(), 2);
    let cfg = config_for(&sites[0], &dir.path().join("cache"));
    let clean = check(&cfg);
    assert!(clean.is_ok(), "{clean}");
    assert_eq!(clean.valid_cases, 3);
    assert!(clean.classes.iter().all(|c| c.voxels > 0), "{clean}");

    let ds = &sites[0].dataset_dir;
    // 1: truncated gzip image
    let img0 = ds.join("imagesTr/liver_000_0000.nii.gz");
    let bytes = std::fs::read(&img0).unwrap();
    std::fs::write(&img0, &bytes[..bytes.len() / 2]).unwrap();
    // 2: label with the wrong shape, 3: label value outside the config
    let lab1 = ds.join("labelsTr/liver_001.nii.gz");
    let v = read_label_nifti(&lab1).unwrap();
    write_mask_nifti(&lab1, &ndarray::Array3::<u8>::zeros((4, 4, 4)), &v.header).unwrap();
    let lab2 = ds.join("labelsTr/liver_002.nii.gz");
    let mut l = read_label_nifti(&lab2).unwrap();
    l.data[[0, 0, 0]] = 5;
    write_mask_nifti(&lab2, &l.data.mapv(|x| x as u8), &l.header).unwrap();
    // 4: NaNs in an image (float file replacing case 2's image)
    let img2 = ds.join("imagesTr/liver_002_0000.nii.gz");
    let mut im = read_nifti(&img2).unwrap();
    im.data[[1, 1, 1]] = f32::NAN;
    nifti_io::write_f32_nifti(&img2, &im.data, &im.header).unwrap();
    // 5: a class using an undeclared label
    let mut bad_cfg = cfg.clone();
    bad_cfg.classes.push(ClassRegion { name: "ghost".into(), labels: vec![9] });

    let report = check(&bad_cfg);
    let text = report.to_string();
    assert_eq!(report.valid_cases, 0, "{text}");
    for needle in [
        "liver_000_0000.nii.gz: corrupt or truncated gzip",
        "liver_001.nii.gz: shape",
        "liver_002.nii.gz: label value 5",
        "liver_002_0000.nii.gz: 1 NaN",
        "class \"ghost\" uses label 9",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(report.problems.len(), 5, "{text}");
}

#[test]
fn msd_layout_and_deterministic_split() {
    let dir = tempfile::tempdir().unwrap();
    let sites = small_sites(dir.path(), 3);
    let v2 = &sites[0].dataset_dir;
    let msd = dir.path().join("Task03_Liver");
    std::fs::create_dir_all(msd.join("imagesTr")).unwrap();
    std::fs::create_dir_all(msd.join("labelsTr")).unwrap();
    let mut training = Vec::new();
    for i in 0..3 {
        let id = format!("liver_{i:03}");
        std::fs::copy(v2.join(format!("imagesTr/{id}_0000.nii.gz")), msd.join(format!("imagesTr/{id}.nii.gz")))
            .unwrap();
        std::fs::copy(v2.join(format!("labelsTr/{id}.nii.gz")), msd.join(format!("labelsTr/{id}.nii.gz"))).unwrap();
        training.push(
            serde_json::json!({"image": format!("./imagesTr/{id}.nii.gz"), "label": format!("./labelsTr/{id}.nii.gz")}),
        );
    }
    let json = serde_json::json!({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"}, "training": training});
    std::fs::write(msd.join("dataset.json"), json.to_string()).unwrap();
    let mut cfg = config_for(&sites[0], &dir.path().join("cache"));
    cfg.dataset_dir = msd.clone();
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(ds.layout, Layout::Msd);
    assert_eq!(ds.cases.len(), 3);
    assert!(check(&cfg).is_ok());
    let v2ds = Dataset::open(&config_for(&sites[0], &dir.path().join("cache"))).unwrap();
    assert_eq!(v2ds.layout, Layout::NnUNetV2);
    // Same ids, same split, whatever the layout.
    assert_eq!(
        ds.val_cases().iter().map(|c| &c.id).collect::<Vec<_>>(),
        v2ds.val_cases().iter().map(|c| &c.id).collect::<Vec<_>>()
    );
    assert_eq!(ds.train_cases().len(), 2);
    // The config parses from a site TOML's [data] section.
    let toml_text = r#"
        dataset_dir = "/data/liver"
        cache_dir = "/var/cache/fedtalent"
        val_cases = 0.25
        classes = [ { name = "liver", labels = [1, 2] }, { name = "liver_tumour", labels = [2] } ]
    "#;
    let parsed: SiteDataConfig = toml::from_str(toml_text).unwrap();
    assert_eq!(parsed.val_cases, ValCases::Fraction(0.25));
    assert_eq!(parsed.target_spacing, [1.5, 1.0, 1.0]);
}

#[test]
fn preprocessing_cache_is_reused_and_invalidated() {
    let dir = tempfile::tempdir().unwrap();
    let sites = small_sites(dir.path(), 4);
    let cache = dir.path().join("cache");
    let cfg = config_for(&sites[0], &cache);
    let ds = Dataset::open(&cfg).unwrap();
    let opts = preprocess::PreprocessOptions::from_dataset(&ds);
    let case = &ds.cases[0];
    let a = preprocess_case(case, &opts, &cache).unwrap();
    let src = read_nifti(&case.image).unwrap();
    // 16 slices at 1-5 mm to 3 mm, 32 at ~0.75 mm to 1.5 mm.
    assert_eq!(a.meta.shape, resample::target_shape(a.meta.original_shape, src.spacing, [6.0, 4.0, 4.0]));
    assert_eq!(a.meta.class_locations.len(), 2);
    assert!(!a.meta.class_locations[0].is_empty());
    assert!(a.meta.histogram.total() > 0);
    let labels: BTreeSet<u16> = a.labels().iter().cloned().collect();
    assert!(labels.is_subset(&BTreeSet::from([0, 1, 2])));
    let mtime = std::fs::metadata(&a.path).unwrap().modified().unwrap();
    let b = preprocess_case(case, &opts, &cache).unwrap();
    assert_eq!(a.path, b.path);
    assert_eq!(std::fs::metadata(&b.path).unwrap().modified().unwrap(), mtime, "cache reused");
    // A config change gives a new cache file and removes the stale one.
    let mut opts2 = opts.clone();
    opts2.target_spacing = [3.0, 2.0, 2.0];
    let c = preprocess_case(case, &opts2, &cache).unwrap();
    assert_ne!(c.path, a.path);
    assert!(!a.path.exists());
    // Touching the source file invalidates too.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let bytes = std::fs::read(&case.label).unwrap();
    std::fs::write(&case.label, bytes).unwrap();
    let d = preprocess_case(case, &opts2, &cache).unwrap();
    assert_ne!(d.path, c.path);
    // A corrupt case is skipped and reported.
    std::fs::write(&ds.cases[1].image, b"not a nifti at all").unwrap();
    let (ok, failed) = preprocess::preprocess_cases(&ds.cases, &opts, &cache, 2);
    assert_eq!(ok.len(), 2);
    assert_eq!(failed.len(), 1);
    assert!(format!("{:#}", failed[0].1).contains("liver_001_0000.nii.gz"));
    // The site histogram is the merge of its cases'.
    let h = preprocess::site_histogram(&ok);
    assert_eq!(h.total(), ok.iter().map(|c| c.meta.histogram.total()).sum::<u64>());
    let stats = h.ct_stats().unwrap();
    assert!(stats.clip_low < stats.mean && stats.mean < stats.clip_high && stats.std > 0.0);
}

#[test]
fn loader_delivers_batches_and_augmentation_keeps_labels() {
    let dir = tempfile::tempdir().unwrap();
    let sites = small_sites(dir.path(), 5);
    let cfg = config_for(&sites[1], &dir.path().join("cache"));
    let ds = Dataset::open(&cfg).unwrap();
    let opts = preprocess::PreprocessOptions::from_dataset(&ds);
    let norm = CtNormalization::PAPER;
    let load = |augment: Option<AugmentConfig>, seed: u64, threads: usize| {
        let (cases, failed) = preprocess::preprocess_cases(&ds.cases, &opts, &cfg.cache_dir, 2);
        assert!(failed.is_empty());
        let mut o = LoaderOptions::new([16, 24, 24], 2, norm, seed, threads, Device::Cpu);
        o.augment = augment;
        BatchLoader::new(cases, o).unwrap()
    };
    // Without augmentation, batches depend only on the seed, not on the thread count.
    let (mut l1, mut l3) = (load(None, 9, 1), load(None, 9, 3));
    for _ in 0..4 {
        let (a, b) = (l1.next_batch().unwrap(), l3.next_batch().unwrap());
        assert_eq!(a.image.size(), vec![2, 1, 16, 24, 24]);
        assert_eq!(a.labels.kind(), Kind::Int64);
        assert_eq!(a.case_ids, b.case_ids);
        assert!(a.image.equal(&b.image) && a.labels.equal(&b.labels));
    }
    // Every sample rotated and scaled (warped from its larger region on the device), then the
    // rest of the augmentation: patch-sized batches whose labels stay in the label set.
    let spatial = AugmentConfig { p_rotation: 1.0, p_scale: 1.0, ..AugmentConfig::default() };
    let mut aug = load(Some(spatial), 10, 2);
    let allowed = BTreeSet::from([0i64, 1, 2, 3, 4]);
    for _ in 0..10 {
        let b = aug.next_batch().unwrap();
        assert_eq!(b.image.size(), vec![2, 1, 16, 24, 24]);
        assert_eq!(b.labels.size(), vec![2, 1, 16, 24, 24]);
        assert_eq!(b.labels.kind(), Kind::Int64);
        let labels: Vec<i64> = Vec::try_from(b.labels.flatten(0, -1)).unwrap();
        let set: BTreeSet<i64> = labels.into_iter().collect();
        assert!(set.is_subset(&allowed), "{set:?}");
        assert!(b.image.isfinite().all().int64_value(&[]) == 1);
    }
}

#[test]
fn every_augmentation_keeps_shapes_and_label_sets() {
    let cfg = AugmentConfig {
        p_rotation: 1.0,
        p_scale: 1.0,
        p_noise: 1.0,
        p_blur: 1.0,
        p_brightness: 1.0,
        p_contrast: 1.0,
        p_low_res: 1.0,
        p_gamma_inverted: 1.0,
        p_gamma: 1.0,
        p_mirror_per_axis: 1.0,
        ..AugmentConfig::default()
    };
    let mut aug = Augmenter::new(cfg, 1);
    let shape = [3i64, 1, 12, 20, 16];
    let image = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(4, shape, (Kind::Int64, Device::Cpu)) * 3; // {0, 3, 6, 9}
    let (img, lab) = aug.apply(&image, &labels);
    assert_eq!(img.size(), shape.to_vec());
    assert_eq!(lab.size(), shape.to_vec());
    assert_eq!(lab.kind(), Kind::Int64);
    let set: BTreeSet<i64> = Vec::<i64>::try_from(lab.flatten(0, -1)).unwrap().into_iter().collect();
    assert!(set.is_subset(&BTreeSet::from([0, 3, 6, 9])), "{set:?}");
    assert!(!img.equal(&image), "augmentation changed the image");
    assert!(img.isfinite().all().int64_value(&[]) == 1);

    // Mirroring alone flips image and labels together along all axes.
    let mirror_only = AugmentConfig {
        p_rotation: 0.0,
        p_scale: 0.0,
        p_noise: 0.0,
        p_blur: 0.0,
        p_brightness: 0.0,
        p_contrast: 0.0,
        p_low_res: 0.0,
        p_gamma_inverted: 0.0,
        p_gamma: 0.0,
        p_mirror_per_axis: 1.0,
        ..AugmentConfig::default()
    };
    let (img, lab) = Augmenter::new(mirror_only, 2).apply(&image, &labels);
    assert!(img.equal(&image.flip([2, 3, 4])) && lab.equal(&labels.flip([2, 3, 4])));
}

/// Intensity transforms draw their parameter per channel (nnU-Net's per_channel): the two
/// channels of a sample get their own brightness factor, each applied to all of its channel.
#[test]
fn intensity_augmentation_draws_per_channel() {
    let brightness_only = AugmentConfig {
        p_rotation: 0.0,
        p_scale: 0.0,
        p_noise: 0.0,
        p_blur: 0.0,
        p_brightness: 1.0,
        p_contrast: 0.0,
        p_low_res: 0.0,
        p_gamma_inverted: 0.0,
        p_gamma: 0.0,
        p_mirror_per_axis: 0.0,
        ..AugmentConfig::default()
    };
    let shape = [3i64, 2, 4, 6, 6];
    let image = Tensor::ones(shape, (Kind::Float, Device::Cpu));
    let labels = Tensor::zeros(shape, (Kind::Int64, Device::Cpu)).narrow(1, 0, 1);
    let (img, _) = Augmenter::new(brightness_only, 5).apply(&image, &labels);
    for b in 0..shape[0] {
        let factor = |c: i64| img.get(b).get(c);
        for c in 0..shape[1] {
            let f = factor(c).flatten(0, -1);
            assert!(f.max().double_value(&[]) == f.min().double_value(&[]), "sample {b} channel {c}: not one factor");
        }
        let (f0, f1) = (factor(0).mean(Kind::Float).double_value(&[]), factor(1).mean(Kind::Float).double_value(&[]));
        assert!(f0 != 1.0 && f1 != 1.0 && f0 != f1, "sample {b}: channel factors {f0} and {f1}");
    }
}

#[test]
fn inference_images_map_back_to_the_original_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let sites = small_sites(dir.path(), 6);
    let ct = fedtalent_vocab::InputChannels::ct();
    let inf = load_for_inference(&sites[0].test_image, &ct, [6.0, 4.0, 4.0], &CtNormalization::PAPER).unwrap();
    let src = read_nifti(&sites[0].test_image).unwrap();
    assert_eq!(inf.original_shape, [src.data.dim().0, src.data.dim().1, src.data.dim().2]);
    let (c, z, y, x) = inf.image.dim();
    assert_eq!(c, 1);
    let probs = ndarray::Array4::from_elem((2, z, y, x), 0.75f32);
    let back = inf.probabilities_to_original(&probs, resample::Interp::Cubic);
    assert_eq!(back.dim(), (2, inf.original_shape[0], inf.original_shape[1], inf.original_shape[2]));
    assert!(back.iter().all(|&p| (p - 0.75).abs() < 1e-5 || p == 0.0));
}

/// Seeding: batch i is the same whether the stream starts at 0 or resumes at i (augmentation and
/// its torch noise included); another seed draws other batches; two datasets are both sampled.
#[test]
fn batch_streams_are_seeded_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let sites = small_sites(dir.path(), 4);
    let prepared = |site: usize| {
        let cfg = config_for(&sites[site], &dir.path().join("cache"));
        let ds = Dataset::open(&cfg).unwrap();
        let opts = preprocess::PreprocessOptions::from_dataset(&ds);
        let (cases, failed) = preprocess::preprocess_cases(&ds.cases, &opts, &cfg.cache_dir, 2);
        assert!(failed.is_empty());
        cases
    };
    let all_on = AugmentConfig { p_noise: 1.0, p_blur: 1.0, p_blur_per_channel: 1.0, ..AugmentConfig::default() };
    let load = |seed: u64, start: u64| {
        let mut o = LoaderOptions::new([16, 24, 24], 2, CtNormalization::PAPER, seed, 2, Device::Cpu);
        o.augment = Some(all_on.clone());
        o.start_index = start;
        BatchLoader::pooled(vec![prepared(0), prepared(1)], o).unwrap()
    };
    let mut from_start = load(5, 0);
    let batches: Vec<_> = (0..6).map(|_| from_start.next_batch().unwrap()).collect();
    // Torch's generator moved on meanwhile: the resumed stream must not depend on it.
    let _ = Tensor::randn([100], (Kind::Float, Device::Cpu));
    let mut resumed = load(5, 4);
    for b in &batches[4..] {
        let r = resumed.next_batch().unwrap();
        assert_eq!(r.case_ids, b.case_ids);
        assert!(r.image.equal(&b.image) && r.labels.equal(&b.labels), "a resumed stream drew another batch");
    }
    let mut other = load(6, 0);
    let o = other.next_batch().unwrap();
    assert!(!o.image.equal(&batches[0].image), "another seed drew the same batch");
    let datasets: BTreeSet<usize> = batches.iter().flat_map(|b| b.datasets.clone()).collect();
    assert_eq!(datasets, BTreeSet::from([0, 1]), "pooled sampling left a dataset out");
}

/// nnU-Net's oversampling: the last round(1/3 · batch) samples of every batch are centred on
/// foreground (one of two, one of three, two of four), never a coin per sample.
#[test]
fn foreground_samples_are_forced_per_batch() {
    use fedtalent_data::loader::forced_foreground;
    let count = |batch: usize| (0..batch).filter(|&s| forced_foreground(s, batch, 1.0 / 3.0)).count();
    assert_eq!([count(1), count(2), count(3), count(4), count(6)], [0, 1, 1, 1, 2]);
    assert!(forced_foreground(1, 2, 1.0 / 3.0) && !forced_foreground(0, 2, 1.0 / 3.0));
}
