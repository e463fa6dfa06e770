//! Preprocessing (crop, resample) and the site's on-disk cache of preprocessed cases.
//!
//! Every channel of a case is cropped to the case's nonzero region and resampled to the target
//! spacing together, then normalized (nnU-Net v1's order, the same for the cache, evaluation and
//! predict). CT channels are cached in HU and get the CT normalization when patches are cut (it is
//! a clip and an affine map per voxel): the federation's statistics arrive after the site has
//! computed its histogram, and may be refreshed, without re-preprocessing. Every other channel
//! is normalized per image ([`Normalization`]) before it is cached.
//!
//! Cache file: `FTPREP02`, u64 LE length of a JSON [`CaseMeta`], the JSON, zero padding to 64
//! bytes, the f32 LE image (channel after channel, each [z, y, x]), the u16 LE labels. Files are
//! memory-mapped so that workers read only the patches they cut. (`FTPREP01`, one CT channel, is
//! no longer read: its files carry an older cache key and are rebuilt and removed.)

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, ensure, Context, Result};
use ndarray::{s, Array3, Array4};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::case_image::read_case_image;
use crate::dataset::{Case, Dataset};
use crate::nifti_io::{read_label_nifti, ChannelImage, SpatialHeader};
use crate::normalization::{nonzero_mask, use_mask_for_norm, Normalization};
use crate::resample::{anisotropy_axis, resample, resample_labels, target_shape, Interp, LabelInterp};
use fedtalent_vocab::ClassRegion;
use fedtalent_vocab::{CtNormalization, HuHistogram, InputChannels, NormalizationScheme};

/// Bumped whenever the preprocessing changes what it writes, so old caches are not reused.
/// 2: channels (any count, per-channel normalization).
const PREPROCESS_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"FTPREP02";
/// Foreground locations kept per class for foreground-centred sampling (as nnU-Net).
const MAX_LOCATIONS_PER_CLASS: usize = 10_000;

/// What preprocessing needs besides the case files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessOptions {
    pub target_spacing: [f64; 3],
    pub label_interp: LabelInterp,
    pub classes: Vec<ClassRegion>,
    /// The dataset's input channels, each with its normalization.
    pub channels: InputChannels,
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
    /// What each cached channel holds: CT channels are in HU (normalized when cut), every other
    /// channel is already normalized by its scheme.
    pub channels: Vec<NormalizationScheme>,
    /// Whether z-scored channels were normalized within the nonzero mask (see [`use_mask_for_norm`]).
    pub masked_norm: bool,
    /// Per configured class, up to 10k voxel positions [z, y, x] (at the target spacing).
    pub class_locations: Vec<Vec<[u32; 3]>>,
    /// Foreground HU histogram of the CT channels at the original resolution (for the
    /// federation's statistics); empty without a CT channel.
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

    pub fn channels(&self) -> usize {
        self.meta.channels.len()
    }

    /// The cached image, [c, z, y, x] flattened: CT channels in HU, the others normalized.
    pub fn image(&self) -> &[f32] {
        bytemuck::cast_slice(&self.map[self.image_offset..self.label_offset])
    }

    /// The label map, [z, y, x] flattened.
    pub fn labels(&self) -> &[u16] {
        bytemuck::cast_slice(&self.map[self.label_offset..self.label_offset + 2 * self.voxels()])
    }

    /// The normalized image [c, z, y, x]: CT channels normalized with `norm`.
    pub fn normalized_image(&self, norm: &CtNormalization) -> Array4<f32> {
        let [z, y, x] = self.meta.shape;
        let n = self.voxels();
        let mut v = self.image().to_vec();
        for (channel, scheme) in v.chunks_mut(n).zip(&self.meta.channels) {
            if *scheme == NormalizationScheme::Ct {
                norm.apply_slice(channel);
            }
        }
        Array4::from_shape_vec((self.channels(), z, y, x), v).expect("shape")
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
        ensure!(!meta.channels.is_empty(), "{}: no channel", path.display());
        let label_offset = image_offset + 4 * n * meta.channels.len();
        ensure!(map.len() == label_offset + 2 * n, "{}: size does not match its shape", path.display());
        Ok(PreprocessedCase { meta, path: path.to_path_buf(), map, image_offset, label_offset })
    }
}

/// Bounding box [start, end) per axis of the voxels nonzero in any channel (nnU-Net's crop); the
/// whole volume if none.
pub fn nonzero_bbox(channels: &[Array3<f32>]) -> [[usize; 2]; 3] {
    let (nz, ny, nx) = channels[0].dim();
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let nonzero = |i: (usize, usize, usize)| channels.iter().any(|c| c[i] != 0.0);
    for ((z, y, x), _) in channels[0].indexed_iter() {
        if nonzero((z, y, x)) {
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

/// Reads and validates a case: its declared channels, the labels' shape, finite voxels, labels
/// within the configured classes.
fn load_case(case: &Case, opts: &PreprocessOptions) -> Result<(ChannelImage, crate::Volume<u16>)> {
    let image = read_case_image(&case.image, opts.channels.len())?;
    let labels = read_label_nifti(&case.label)?;
    let [z, y, x] = image.shape();
    if (z, y, x) != labels.data.dim() {
        bail!("{}: shape {:?} differs from the image's {:?}", case.label.display(), labels.data.dim(), (z, y, x));
    }
    for (k, channel) in image.channels.iter().enumerate() {
        if let Some(i) = channel.iter().position(|v| !v.is_finite()) {
            bail!("{}: NaN or infinite voxel in channel {k} at flat index {i}", case.image.display());
        }
    }
    if let Some(&bad) = labels.data.iter().find(|&&l| l != 0 && !opts.classes.iter().any(|c| c.contains(l))) {
        bail!("{}: label value {bad} belongs to no configured class", case.label.display());
    }
    Ok((image, labels))
}

/// A case's channels cropped to its nonzero region, resampled to the target spacing and
/// normalized, CT channels only where `ct` is given.
struct PreparedChannels {
    /// [c, z, y, x] at the target spacing.
    image: Array4<f32>,
    crop: [[usize; 2]; 3],
    masked_norm: bool,
}

/// Crops, resamples (cubic, every channel on the same grid) and then normalizes a case's image:
/// the one order of the cache, evaluation and predict. The nonzero mask of a masked z-score is
/// taken before resampling and resampled like a label map (as nnU-Net v1 resamples its
/// "-1 outside the mask" segmentation: linearly, whatever the site's label interpolation), so the cubic kernel's ringing outside the anatomy does
/// not enter it. nnU-Net decides masking once per dataset from the median case; a federation has
/// no one dataset and predict sees one image, so the same 3/4 rule is applied per image.
fn prepare_channels(
    image: &ChannelImage,
    channels: &InputChannels,
    target_spacing: [f64; 3],
    ct: Option<&CtNormalization>,
) -> Result<PreparedChannels> {
    let bb = nonzero_bbox(&image.channels);
    let cropped: Vec<Array3<f32>> = image.channels.iter().map(|c| crop(c, &bb)).collect();
    let (z, y, x) = cropped[0].dim();
    let relative_size = (z * y * x) as f64 / image.channels[0].len().max(1) as f64;
    let masked_norm = channels.iter().any(|c| use_mask_for_norm(c.normalization, relative_size));
    let new_shape = target_shape([z, y, x], image.spacing, target_spacing);
    let axis = anisotropy_axis(image.spacing);
    let mask = masked_norm.then(|| {
        let mask = nonzero_mask(&cropped).mapv(u16::from);
        resample_labels(&mask, new_shape, LabelInterp::PerLabelLinear, axis).mapv(|v| v != 0)
    });
    let [nz, ny, nx] = new_shape;
    let mut out = Array4::<f32>::zeros((cropped.len(), nz, ny, nx));
    for ((channel, declared), mut slot) in cropped.iter().zip(channels.iter()).zip(out.outer_iter_mut()) {
        let mut resampled = resample(channel.view(), new_shape, Interp::Cubic, axis);
        let norm = match (declared.normalization, ct) {
            (NormalizationScheme::Ct, None) => None,
            (scheme, ct) => Some(Normalization::new(scheme, ct.copied(), masked_norm)?),
        };
        if let Some(norm) = norm {
            norm.apply_array(&mut resampled, mask.as_ref())
                .with_context(|| format!("channel {:?} ({})", declared.name, declared.normalization.channel_name()))?;
        }
        slot.assign(&resampled);
    }
    Ok(PreparedChannels { image: out, crop: bb, masked_norm })
}

/// The foreground HU histogram of a case's CT channels (cropped, at the original resolution).
fn ct_histogram(
    image: &ChannelImage,
    channels: &InputChannels,
    bb: &[[usize; 2]; 3],
    labels: &Array3<u16>,
) -> HuHistogram {
    let lab = crop(labels, bb);
    let parts: Vec<HuHistogram> = image
        .channels
        .iter()
        .zip(channels.iter())
        .filter(|(_, c)| c.normalization == NormalizationScheme::Ct)
        .map(|(channel, _)| {
            let img = crop(channel, bb);
            HuHistogram::from_foreground(img.as_slice().expect("owned"), lab.as_slice().expect("owned"))
        })
        .collect();
    HuHistogram::merge(&parts)
}

fn seed_of(id: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    u64::from_le_bytes(d.as_ref()[..8].try_into().unwrap())
}

/// Preprocesses one case in memory: crop to nonzero, resample to the target spacing, normalize
/// every channel but CT ([`prepare_channels`]).
pub fn preprocess_in_memory(case: &Case, opts: &PreprocessOptions) -> Result<(CaseMeta, Array4<f32>, Array3<u16>)> {
    let (image, labels) = load_case(case, opts)?;
    let prepared = prepare_channels(&image, &opts.channels, opts.target_spacing, None)
        .with_context(|| format!("{}: cannot normalize", case.image.display()))?;
    let bb = prepared.crop;
    let histogram = ct_histogram(&image, &opts.channels, &bb, &labels.data);
    let (_, z, y, x) = prepared.image.dim();
    let new_shape = [z, y, x];
    let lab = resample_labels(&crop(&labels.data, &bb), new_shape, opts.label_interp, anisotropy_axis(image.spacing));
    let meta = CaseMeta {
        id: case.id.clone(),
        shape: new_shape,
        spacing: opts.target_spacing,
        original_shape: image.shape(),
        original_spacing: image.spacing,
        crop: bb,
        header: image.header.clone(),
        channels: opts.channels.schemes(),
        masked_norm: prepared.masked_norm,
        class_locations: class_locations(&lab, &opts.classes, seed_of(&case.id)),
        histogram,
    };
    Ok((meta, prepared.image, lab))
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
fn write_cache(path: &Path, meta: &CaseMeta, image: &Array4<f32>, labels: &Array3<u16>) -> Result<()> {
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
            channels: ds.channels.clone(),
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
    /// Normalized image at the target spacing, [c, z, y, x].
    pub image: Array4<f32>,
    pub original_shape: [usize; 3],
    pub original_spacing: [f64; 3],
    pub crop: [[usize; 2]; 3],
    pub header: SpatialHeader,
    pub affine: [[f64; 4]; 4],
}

/// Loads a raw image for inference: its `channels` (one file, a 4D file, or `path` as channel 0's
/// `_0000` file, see [`crate::case_image`]), cropped to nonzero, resampled (cubic) and normalized
/// as training cases are ([`prepare_channels`]: the order of the training cache, so a case
/// predicted here looks exactly like the patches the network was trained on); CT channels with
/// `norm`.
pub fn load_for_inference(
    path: &Path,
    channels: &InputChannels,
    target_spacing: [f64; 3],
    norm: &CtNormalization,
) -> Result<InferenceImage> {
    let image = read_case_image(path, channels.len())?;
    for (k, channel) in image.channels.iter().enumerate() {
        if channel.iter().any(|v| !v.is_finite()) {
            bail!("{}: channel {k} contains NaN or infinite voxels", path.display());
        }
    }
    let prepared = prepare_channels(&image, channels, target_spacing, Some(norm))
        .with_context(|| format!("{}: cannot normalize", path.display()))?;
    Ok(InferenceImage {
        image: prepared.image,
        original_shape: image.shape(),
        original_spacing: image.spacing,
        crop: prepared.crop,
        header: image.header,
        affine: image.affine,
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
