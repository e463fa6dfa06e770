//! The batch source: background threads cut patches from memory-mapped preprocessed cases while
//! the device trains (a larger region around a patch that will be rotated or scaled, see
//! [`crate::spatial`]); the device warps those and runs the rest of the augmentation batched.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::augment::{AugmentConfig, Augmenter};
use crate::preprocess::PreprocessedCase;
use crate::sampler::{sample_region, CaseView, FOREGROUND_FRACTION};
use crate::spatial::SpatialTransform;
use fedtalent_vocab::CtNormalization;

/// A training batch on the device.
pub struct Batch {
    /// [B, C, Z, Y, X] float32 (C input channels).
    pub image: Tensor,
    /// [B, 1, Z, Y, X] int64 raw label values.
    pub labels: Tensor,
    /// Case id of each sample.
    pub case_ids: Vec<String>,
    /// Dataset (index into the loader's datasets) of each sample: which classes it annotates.
    pub datasets: Vec<usize>,
}

/// Settings of a [`BatchLoader`].
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    pub patch: [usize; 3],
    pub batch: usize,
    pub normalization: CtNormalization,
    pub seed: u64,
    pub threads: usize,
    pub device: Device,
    /// `None` switches augmentation off (tests, evaluation).
    pub augment: Option<AugmentConfig>,
    pub foreground_fraction: f64,
    /// Batches prepared ahead per thread.
    pub prefetch: usize,
    /// Index of the first batch: batch `i` is the same whenever it is drawn, so a loader started
    /// at the training step a site resumes from continues the stream where it stopped.
    pub start_index: u64,
}

impl LoaderOptions {
    pub fn new(
        patch: [usize; 3],
        batch: usize,
        normalization: CtNormalization,
        seed: u64,
        threads: usize,
        device: Device,
    ) -> Self {
        LoaderOptions {
            patch,
            batch,
            normalization,
            seed,
            threads,
            device,
            augment: Some(AugmentConfig::default()),
            foreground_fraction: FOREGROUND_FRACTION,
            prefetch: 2,
            start_index: 0,
        }
    }
}

/// A batch cut on the CPU (by the loader's threads), before it goes to the device: each sample's
/// patch, or the larger region its spatial transform samples from.
pub struct CpuBatch {
    index: u64,
    samples: Vec<CpuSample>,
}

/// One sample's region: the patch itself, or the larger context its spatial transform samples.
struct CpuSample {
    case_id: String,
    dataset: usize,
    region: [usize; 3],
    /// [c, z, y, x] flattened.
    image: Vec<f32>,
    channels: usize,
    /// i32, not the device's i64: half the bytes to cut and to copy to the device.
    labels: Vec<i32>,
    transform: Option<SpatialTransform>,
}

impl CpuSample {
    /// The sample on `device` as a [1, C, Z, Y, X] patch and [1, 1, Z, Y, X] labels: its region
    /// warped by its transform, or the region itself (then the patch) when it has none.
    fn to_device(&self, patch: [usize; 3], device: Device) -> (Tensor, Tensor) {
        let [z, y, x] = self.region.map(|r| r as i64);
        let image = Tensor::from_slice(&self.image).view([1, self.channels as i64, z, y, x]).to_device(device);
        let labels = Tensor::from_slice(&self.labels).view([1, 1, z, y, x]).to_device(device).to_kind(Kind::Int64);
        match &self.transform {
            Some(t) => t.warp(&image, &labels, patch),
            None => (image, labels),
        }
    }
}

/// Produces batches forever (until dropped). Batch `i` depends only on the seed and `i`, whatever
/// the number of threads; batches are delivered in order.
///
/// With several datasets (pooled MultiTalent training), each sample first draws its dataset with
/// probability proportional to sqrt(cases), the weighting the federation gives each site's
/// backbone, then a case of it uniformly.
pub struct BatchLoader {
    opts: LoaderOptions,
    rx: Option<Receiver<CpuBatch>>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pending: BTreeMap<u64, CpuBatch>,
    next_index: u64,
    augmenter: Option<Augmenter>,
}

/// The cases of each dataset and the cumulative sqrt(n) weights that choose among them.
struct Pool {
    datasets: Vec<Vec<PreprocessedCase>>,
    cumulative: Vec<f64>,
}

impl Pool {
    fn new(datasets: Vec<Vec<PreprocessedCase>>) -> Pool {
        let mut total = 0.0;
        let cumulative = datasets
            .iter()
            .map(|d| {
                total += (d.len() as f64).sqrt();
                total
            })
            .collect();
        Pool { datasets, cumulative }
    }

    /// A dataset (sqrt(n)-weighted; no draw when there is one) and a case of it.
    fn draw<R: Rng>(&self, rng: &mut R) -> (usize, &PreprocessedCase) {
        let d = if self.datasets.len() == 1 {
            0
        } else {
            let u = rng.gen_range(0.0..*self.cumulative.last().expect("a dataset"));
            self.cumulative.iter().position(|&c| u < c).unwrap_or(self.datasets.len() - 1)
        };
        let cases = &self.datasets[d];
        (d, &cases[rng.gen_range(0..cases.len())])
    }
}

/// Whether sample `s` of a batch of `batch` is centred on foreground: nnU-Net's rule, the last
/// round(fraction · batch) samples of every batch (one of two), not a coin per sample, so no batch
/// goes without foreground.
pub fn forced_foreground(s: usize, batch: usize, fraction: f64) -> bool {
    s as f64 >= (batch as f64 * (1.0 - fraction)).round()
}

fn make_cpu_batch(pool: &Pool, opts: &LoaderOptions, index: u64) -> CpuBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let samples = (0..opts.batch)
        .map(|s| {
            let (dataset, case) = pool.draw(&mut rng);
            let view = CaseView {
                shape: case.meta.shape,
                image: case.image(),
                channels: &case.meta.channels,
                labels: case.labels(),
                class_locations: &case.meta.class_locations,
            };
            let transform = opts.augment.as_ref().and_then(|c| SpatialTransform::draw(c, &mut rng));
            let region = transform.map_or(opts.patch, |t| t.source_size(opts.patch));
            let foreground = f64::from(u8::from(forced_foreground(s, opts.batch, opts.foreground_fraction)));
            let p = sample_region(&view, opts.patch, region, &opts.normalization, foreground, &mut rng);
            CpuSample {
                case_id: case.meta.id.clone(),
                dataset,
                region,
                image: p.image,
                channels: case.channels(),
                labels: p.labels.iter().map(|&l| i32::from(l)).collect(),
                transform,
            }
        })
        .collect();
    CpuBatch { index, samples }
}

fn worker(
    pool: Arc<Pool>,
    opts: LoaderOptions,
    counter: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tx: SyncSender<CpuBatch>,
) {
    while !stop.load(Ordering::Relaxed) {
        let index = counter.fetch_add(1, Ordering::Relaxed);
        let batch = make_cpu_batch(&pool, &opts, index);
        if tx.send(batch).is_err() {
            break; // the loader was dropped
        }
    }
}

impl BatchLoader {
    /// A loader over one dataset's cases.
    pub fn new(cases: Vec<PreprocessedCase>, opts: LoaderOptions) -> Result<BatchLoader> {
        Self::pooled(vec![cases], opts)
    }

    /// A loader over several datasets (see the type's doc for how samples choose one).
    pub fn pooled(datasets: Vec<Vec<PreprocessedCase>>, opts: LoaderOptions) -> Result<BatchLoader> {
        ensure!(!datasets.is_empty(), "no dataset to sample from");
        for (i, d) in datasets.iter().enumerate() {
            ensure!(!d.is_empty(), "dataset {i}: no preprocessed cases to sample from");
        }
        // Every sample of a batch feeds the same input filters: one channel layout for all.
        let layout = &datasets[0][0].meta.channels;
        if let Some(other) = datasets.iter().flatten().find(|c| &c.meta.channels != layout) {
            anyhow::bail!(
                "case {} has input channels {:?}, case {} {:?}: one network takes one channel layout",
                datasets[0][0].meta.id,
                layout,
                other.meta.id,
                other.meta.channels
            );
        }
        ensure!(opts.batch > 0 && opts.patch.iter().all(|&p| p > 0), "batch and patch must be positive");
        let pool = Arc::new(Pool::new(datasets));
        let threads = opts.threads.max(1);
        let (tx, rx) = sync_channel(opts.prefetch.max(1) * threads);
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(opts.start_index));
        let workers = (0..threads)
            .map(|t| {
                let (pool, opts, counter, stop, tx) =
                    (pool.clone(), opts.clone(), counter.clone(), stop.clone(), tx.clone());
                std::thread::Builder::new()
                    .name(format!("fedtalent-loader-{t}"))
                    .spawn(move || worker(pool, opts, counter, stop, tx))
                    .map_err(|e| anyhow!("cannot start loader thread: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let augmenter = opts.augment.clone().map(|c| Augmenter::new(c, opts.seed.wrapping_add(1)));
        let next_index = opts.start_index;
        Ok(BatchLoader { opts, rx: Some(rx), workers, stop, pending: BTreeMap::new(), next_index, augmenter })
    }

    /// The CPU stage alone: the next batch in order as cut by the loader threads (waits for it).
    /// [`BatchLoader::upload`] finishes it; [`BatchLoader::next_batch`] does both.
    pub fn next_cpu_batch(&mut self) -> Result<CpuBatch> {
        loop {
            if let Some(b) = self.pending.remove(&self.next_index) {
                self.next_index += 1;
                return Ok(b);
            }
            let rx = self.rx.as_ref().expect("receiver lives until drop");
            let b = rx.recv().map_err(|_| anyhow!("all loader threads stopped"))?;
            self.pending.insert(b.index, b);
        }
    }

    /// The next batch on the device (augmented unless switched off).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let cpu = self.next_cpu_batch()?;
        self.upload(cpu)
    }

    /// The device stage: copies a CPU batch to the device, warps its transformed samples onto
    /// the patch and applies the rest of the augmentation.
    pub fn upload(&mut self, cpu: CpuBatch) -> Result<Batch> {
        let (images, labels): (Vec<Tensor>, Vec<Tensor>) =
            cpu.samples.iter().map(|s| s.to_device(self.opts.patch, self.opts.device)).unzip();
        let (image, labels) = (Tensor::cat(&images, 0), Tensor::cat(&labels, 0));
        let (image, labels) = match &mut self.augmenter {
            Some(a) => a.apply_to_batch(cpu.index, &image, &labels),
            None => (image, labels),
        };
        debug_assert_eq!(labels.kind(), Kind::Int64);
        let datasets = cpu.samples.iter().map(|s| s.dataset).collect();
        Ok(Batch { image, labels, case_ids: cpu.samples.into_iter().map(|s| s.case_id).collect(), datasets })
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks workers waiting in `send`.
        self.rx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
