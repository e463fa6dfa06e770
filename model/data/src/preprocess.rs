//! Preprocessing (crop, resample) and the site's on-disk cache of preprocessed cases.
//!
//! The cache stores images in HU at the target spacing; the CT normalization is applied when
//! patches are cut (it is a clip and an affine map per voxel). The federation's statistics arrive
//! after the site has computed its histogram, and may be refreshed, without re-preprocessing.
//!
//! Cache file: `FTPREP01`, u64 LE length of a JSON [`CaseMeta`], the JSON, zero padding to 64
//! bytes, the f32 LE image, the u16 LE labels. Files are memory-mapped so that workers read only
//! the patches they cut.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, ensure, Context, Result};
use ndarray::{s, Array3};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::dataset::{Case, Dataset};
use crate::nifti_io::{read_label_nifti, read_nifti, SpatialHeader};
use crate::resample::{anisotropy_axis, resample, resample_labels, target_shape, Interp, LabelInterp};
use fedtalent_vocab::ClassRegion;
use fedtalent_vocab::{CtNormalization, HuHistogram};

/// Bumped whenever the preprocessing changes what it writes, so old caches are not reused.
const PREPROCESS_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"FTPREP01";
/// Foreground locations kept per class for foreground-centred sampling (as nnU-Net).
const MAX_LOCATIONS_PER_CLASS: usize = 10_000;

/// What preprocessing needs besides the case files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessOptions {
    pub target_spacing: [f64; 3],
    pub label_interp: LabelInterp,
    pub classes: Vec<ClassRegion>,
}

/// Everything about a preprocessed case except its voxels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseMeta {
    pub id: String,
    /// Shape [z, y, x] at the target spacing.
    pub shape: [usize; 3],
    pub spacing: [f64; 3],
    pub original_shape: [usize; 3],
    pub original_spacing: [f64; 3],
    /// Crop of the original volume, per axis [start, end).
    pub crop: [[usize; 2]; 3],
    pub header: SpatialHeader,
    /// Per configured class, up to 10k voxel positions [z, y, x] (at the target spacing).
    pub class_locations: Vec<Vec<[u32; 3]>>,
    /// Foreground HU histogram at the original resolution (for the federation's statistics).
    pub histogram: HuHistogram,
}

/// A preprocessed case, memory-mapped from the cache.
pub struct PreprocessedCase {
    pub meta: CaseMeta,
    pub path: PathBuf,
    map: memmap2::Mmap,
    image_offset: usize,
    label_offset: usize,
}

impl std::fmt::Debug for PreprocessedCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreprocessedCase").field("meta", &self.meta.id).field("path", &self.path).finish()
    }
}

impl PreprocessedCase {
    fn voxels(&self) -> usize {
        self.meta.shape.iter().product()
    }

    /// The image in HU, [z, y, x] flattened.
    pub fn image(&self) -> &[f32] {
        bytemuck::cast_slice(&self.map[self.image_offset..self.image_offset + 4 * self.voxels()])
    }

    /// The label map, [z, y, x] flattened.
    pub fn labels(&self) -> &[u16] {
        bytemuck::cast_slice(&self.map[self.label_offset..self.label_offset + 2 * self.voxels()])
    }

    /// The normalized image as an array.
    pub fn normalized_image(&self, norm: &CtNormalization) -> Array3<f32> {
        let [z, y, x] = self.meta.shape;
        let v: Vec<f32> = self.image().iter().map(|&h| norm.apply(h)).collect();
        Array3::from_shape_vec((z, y, x), v).expect("shape")
    }

    pub fn label_array(&self) -> Array3<u16> {
        let [z, y, x] = self.meta.shape;
        Array3::from_shape_vec((z, y, x), self.labels().to_vec()).expect("shape")
    }

    /// Opens a cache file, validating its structure.
    pub fn open(path: &Path) -> Result<PreprocessedCase> {
        let file = fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: cache files are written once to a temporary name and renamed into place; they
        // are never modified afterwards, so the mapping cannot change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        ensure!(map.len() >= 16 && &map[..8] == MAGIC, "{}: not a preprocessed-case file", path.display());
        let json_len = u64::from_le_bytes(map[8..16].try_into().unwrap()) as usize;
        ensure!(map.len() >= 16 + json_len, "{}: truncated metadata", path.display());
        let meta: CaseMeta = serde_json::from_slice(&map[16..16 + json_len])
            .with_context(|| format!("{}: bad metadata", path.display()))?;
        let image_offset = (16 + json_len).div_ceil(64) * 64;
        let n: usize = meta.shape.iter().product();
        let label_offset = image_offset + 4 * n;
        ensure!(map.len() == label_offset + 2 * n, "{}: size does not match its shape", path.display());
        Ok(PreprocessedCase { meta, path: path.to_path_buf(), map, image_offset, label_offset })
    }
}

/// Bounding box [start, end) per axis of the nonzero image voxels (nnU-Net's crop); the whole
/// volume if none.
pub fn nonzero_bbox(image: &Array3<f32>) -> [[usize; 2]; 3] {
    let (nz, ny, nx) = image.dim();
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for ((z, y, x), &v) in image.indexed_iter() {
        if v != 0.0 {
            for (a, i) in [z, y, x].into_iter().enumerate() {
                lo[a] = lo[a].min(i);
                hi[a] = hi[a].max(i + 1);
            }
        }
    }
    if lo[0] == usize::MAX {
        return [[0, nz], [0, ny], [0, nx]];
    }
    std::array::from_fn(|a| [lo[a], hi[a]])
}

fn crop<T: Clone>(a: &Array3<T>, bb: &[[usize; 2]; 3]) -> Array3<T> {
    a.slice(s![bb[0][0]..bb[0][1], bb[1][0]..bb[1][1], bb[2][0]..bb[2][1]]).to_owned()
}

/// Voxel positions per class, subsampled deterministically to at most 10k.
pub fn class_locations(labels: &Array3<u16>, classes: &[ClassRegion], seed: u64) -> Vec<Vec<[u32; 3]>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    classes
        .iter()
        .map(|class| {
            let all: Vec<[u32; 3]> = labels
                .indexed_iter()
                .filter(|(_, &l)| l != 0 && class.contains(l))
                .map(|((z, y, x), _)| [z as u32, y as u32, x as u32])
                .collect();
            if all.len() <= MAX_LOCATIONS_PER_CLASS {
                all
            } else {
                let mut idx = sample(&mut rng, all.len(), MAX_LOCATIONS_PER_CLASS).into_vec();
                idx.sort_unstable();
                idx.into_iter().map(|i| all[i]).collect()
            }
        })
        .collect()
}

/// Reads and validates a case: same shape, finite image, labels within the configured classes.
fn load_case(case: &Case, classes: &[ClassRegion]) -> Result<(crate::Volume<f32>, crate::Volume<u16>)> {
    let image = read_nifti(&case.image)?;
    let labels = read_label_nifti(&case.label)?;
    if image.data.dim() != labels.data.dim() {
        bail!(
            "{}: shape {:?} differs from the image's {:?}",
            case.label.display(),
            labels.data.dim(),
            image.data.dim()
        );
    }
    if let Some(i) = image.data.iter().position(|v| !v.is_finite()) {
        bail!("{}: NaN or infinite voxel at flat index {i}", case.image.display());
    }
    if let Some(&bad) = labels.data.iter().find(|&&l| l != 0 && !classes.iter().any(|c| c.contains(l))) {
        bail!("{}: label value {bad} belongs to no configured class", case.label.display());
    }
    Ok((image, labels))
}

fn seed_of(id: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    u64::from_le_bytes(d.as_ref()[..8].try_into().unwrap())
}

/// Preprocesses one case in memory: crop to nonzero, resample to the target spacing.
pub fn preprocess_in_memory(case: &Case, opts: &PreprocessOptions) -> Result<(CaseMeta, Array3<f32>, Array3<u16>)> {
    let (image, labels) = load_case(case, &opts.classes)?;
    let bb = nonzero_bbox(&image.data);
    let img = crop(&image.data, &bb);
    let lab = crop(&labels.data, &bb);
    let histogram = HuHistogram::from_foreground(img.as_slice().unwrap(), lab.as_slice().unwrap());
    let cropped_shape = [img.dim().0, img.dim().1, img.dim().2];
    let new_shape = target_shape(cropped_shape, image.spacing, opts.target_spacing);
    let axis = anisotropy_axis(image.spacing);
    let img = resample(img.view(), new_shape, Interp::Cubic, axis);
    let lab = resample_labels(&lab, new_shape, opts.label_interp, axis);
    let meta = CaseMeta {
        id: case.id.clone(),
        shape: new_shape,
        spacing: opts.target_spacing,
        original_shape: [image.data.dim().0, image.data.dim().1, image.data.dim().2],
        original_spacing: image.spacing,
        crop: bb,
        header: image.header,
        class_locations: class_locations(&lab, &opts.classes, seed_of(&case.id)),
        histogram,
    };
    Ok((meta, img, lab))
}

/// Cache key: preprocessing version, options, and the size and mtime of both source files.
pub fn cache_key(case: &Case, opts: &PreprocessOptions) -> Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&PREPROCESS_VERSION.to_le_bytes());
    ctx.update(&serde_json::to_vec(opts)?);
    for p in [&case.image, &case.label] {
        let m = fs::metadata(p).with_context(|| format!("{}: cannot stat", p.display()))?;
        let mtime = m.modified()?.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        ctx.update(p.to_string_lossy().as_bytes());
        ctx.update(&m.len().to_le_bytes());
        ctx.update(&mtime.to_le_bytes());
    }
    Ok(hex::encode(&ctx.finish().as_ref()[..8]))
}

/// Writes a case's cache file atomically, owner-only: it holds the site's images and labels.
fn write_cache(path: &Path, meta: &CaseMeta, image: &Array3<f32>, labels: &Array3<u16>) -> Result<()> {
    let json = serde_json::to_vec(meta)?;
    fedtalent_atomic::write_with(path, 0o600, |file| {
        let mut f = std::io::BufWriter::new(file);
        f.write_all(MAGIC)?;
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(&json)?;
        let pad = (16 + json.len()).div_ceil(64) * 64 - (16 + json.len());
        f.write_all(&vec![0u8; pad])?;
        for v in image.iter() {
            f.write_all(&v.to_le_bytes())?;
        }
        for v in labels.iter() {
            f.write_all(&v.to_le_bytes())?;
        }
        f.flush()
    })
    .with_context(|| format!("{}: cannot write the cache file", path.display()))
}

/// Returns the cached preprocessed case, preprocessing it first if the cache is missing or stale
/// (a different key); stale files of the same case are removed.
pub fn preprocess_case(case: &Case, opts: &PreprocessOptions, cache_dir: &Path) -> Result<PreprocessedCase> {
    fs::create_dir_all(cache_dir).with_context(|| format!("{}: cannot create cache dir", cache_dir.display()))?;
    let key = cache_key(case, opts)?;
    let path = cache_dir.join(format!("{}.{key}.ftp", case.id));
    if path.exists() {
        match PreprocessedCase::open(&path) {
            Ok(c) => return Ok(c),
            Err(e) => warn!("discarding unreadable cache file: {e:#}"),
        }
    }
    let (meta, image, labels) = preprocess_in_memory(case, opts)?;
    write_cache(&path, &meta, &image, &labels)?;
    remove_stale(cache_dir, &case.id, &path);
    info!(case = %case.id, shape = ?meta.shape, "preprocessed");
    PreprocessedCase::open(&path)
}

fn remove_stale(cache_dir: &Path, id: &str, keep: &Path) {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let is_same_case = name.strip_prefix(&format!("{id}.")).is_some_and(|rest| {
            rest.len() == 16 + 4 && rest.ends_with(".ftp") && rest[..16].chars().all(|c| c.is_ascii_hexdigit())
        });
        if is_same_case && p != keep {
            let _ = fs::remove_file(&p);
        }
    }
}

impl PreprocessOptions {
    pub fn from_dataset(ds: &Dataset) -> Self {
        PreprocessOptions {
            target_spacing: ds.config.target_spacing,
            label_interp: ds.config.label_interp,
            classes: ds.config.classes.clone(),
        }
    }
}

/// Preprocesses (or loads from cache) the given cases with up to `threads` threads. Cases that
/// fail are skipped and returned with their error, so the caller can log or refuse them.
pub fn preprocess_cases(
    cases: &[Case],
    opts: &PreprocessOptions,
    cache_dir: &Path,
    threads: usize,
) -> (Vec<PreprocessedCase>, Vec<(Case, anyhow::Error)>) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let r = preprocess_case(case, opts, cache_dir);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for (i, r) in results {
        match r {
            Ok(c) => ok.push(c),
            Err(e) => {
                warn!(case = %cases[i].id, "skipping case: {e:#}");
                failed.push((cases[i].clone(), e));
            }
        }
    }
    (ok, failed)
}

/// The site's foreground HU histogram over its preprocessed cases.
pub fn site_histogram(cases: &[PreprocessedCase]) -> HuHistogram {
    let parts: Vec<HuHistogram> = cases.iter().map(|c| c.meta.histogram.clone()).collect();
    HuHistogram::merge(&parts)
}

/// An image prepared for inference: normalized, cropped and resampled to the target spacing,
/// with what is needed to map predictions back to the original geometry.
pub struct InferenceImage {
    /// Normalized image at the target spacing, [z, y, x].
    pub image: Array3<f32>,
    pub original_shape: [usize; 3],
    pub original_spacing: [f64; 3],
    pub crop: [[usize; 2]; 3],
    pub header: SpatialHeader,
    pub affine: [[f64; 4]; 4],
}

/// Loads a raw image for inference (crop to nonzero, cubic resampling in HU, CT normalization).
pub fn load_for_inference(path: &Path, target_spacing: [f64; 3], norm: &CtNormalization) -> Result<InferenceImage> {
    let vol = read_nifti(path)?;
    if vol.data.iter().any(|v| !v.is_finite()) {
        bail!("{}: image contains NaN or infinite voxels", path.display());
    }
    let bb = nonzero_bbox(&vol.data);
    let img = crop(&vol.data, &bb);
    let shape = [img.dim().0, img.dim().1, img.dim().2];
    // Resample in HU, then normalize: the order of the training cache (nnU-Net's), so a case
    // predicted here looks exactly like the patches the network was trained on.
    let mut image = resample(
        img.view(),
        target_shape(shape, vol.spacing, target_spacing),
        Interp::Cubic,
        anisotropy_axis(vol.spacing),
    );
    image.mapv_inplace(|v| norm.apply(v));
    Ok(InferenceImage {
        image,
        original_shape: [vol.data.dim().0, vol.data.dim().1, vol.data.dim().2],
        original_spacing: vol.spacing,
        crop: bb,
        header: vol.header,
        affine: vol.affine,
    })
}

impl InferenceImage {
    /// Maps per-class probabilities [C, Z, Y, X] at the target spacing back to the original
    /// geometry: resample to the crop's shape, then place into the full volume (zeros outside).
    pub fn probabilities_to_original(&self, probs: &ndarray::Array4<f32>, interp: Interp) -> ndarray::Array4<f32> {
        let bb = self.crop;
        let crop_shape = [bb[0][1] - bb[0][0], bb[1][1] - bb[1][0], bb[2][1] - bb[2][0]];
        let r =
            crate::resample::resample_probabilities(probs, crop_shape, interp, anisotropy_axis(self.original_spacing));
        let [z, y, x] = self.original_shape;
        let mut out = ndarray::Array4::<f32>::zeros((probs.dim().0, z, y, x));
        out.slice_mut(s![.., bb[0][0]..bb[0][1], bb[1][0]..bb[1][1], bb[2][0]..bb[2][1]]).assign(&r);
        out
    }
}
