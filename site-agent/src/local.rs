//! What a site does on its own: preprocess its cases, train the backbone and its own heads,
//! evaluate the global model on its held-out cases, and keep its state across restarts.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use fedtalent_data::{
    BatchLoader, ClassRegion, Dataset, HuHistogram, LoaderOptions, PreprocessOptions, PreprocessedCase,
};
use fedtalent_model::infer::{sliding_window_probabilities, InferOptions};
use fedtalent_model::train::{Precision, TrainConfig, Trainer};
use fedtalent_model::{BatchTargets, ClassRegions, DiceMode, MultiTalentNet, Topology};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::config::SiteConfig;

const LOCAL_MODEL: &str = "local_model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const SITE_STATE: &str = "site_state.json";

/// The site's preprocessed cases.
pub struct LocalData {
    pub train: Vec<PreprocessedCase>,
    pub val: Vec<PreprocessedCase>,
    pub histogram: HuHistogram,
}

/// Opens the dataset and preprocesses (or loads from cache) every case at `spacing`. Cases that
/// fail are reported by name and left out.
pub fn prepare_data(config: &SiteConfig, spacing: [f64; 3]) -> Result<LocalData> {
    let mut data_config = config.data.clone();
    data_config.target_spacing = spacing;
    let dataset = Dataset::open(&data_config)?;
    let opts = PreprocessOptions::from_dataset(&dataset);
    let threads = config.site.threads;
    let started = Instant::now();
    let (train, failed_train) =
        fedtalent_data::preprocess_cases(&dataset.train_cases(), &opts, &data_config.cache_dir, threads);
    let (val, failed_val) =
        fedtalent_data::preprocess_cases(&dataset.val_cases(), &opts, &data_config.cache_dir, threads);
    for (case, e) in failed_train.iter().chain(&failed_val) {
        warn!(case = %case.id, "left out: {e:#}");
    }
    ensure!(!train.is_empty(), "{}: no usable training case", data_config.dataset_dir.display());
    let histogram = fedtalent_data::site_histogram(&train);
    info!(train = train.len(), val = val.len(), secs = started.elapsed().as_secs_f32(), "cases preprocessed");
    Ok(LocalData { train, val, histogram })
}

/// Persistent facts about the site's progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SiteState {
    pub last_round: u32,
    pub global_step: u64,
}

/// The site's network (backbone + its own heads), optimizer and state directory.
pub struct LocalTrainer {
    pub trainer: Trainer,
    pub regions: ClassRegions,
    /// Global class ids of the site's classes, in the order of the local heads.
    pub class_ids: Vec<String>,
    pub state: SiteState,
    /// Whether the network carries this site's own decoder (index 0).
    pub site_decoder: bool,
    state_dir: PathBuf,
}

pub struct TrainerSpec<'a> {
    pub preset: &'a str,
    pub classes: &'a [ClassRegion],
    pub class_ids: Vec<String>,
    pub device: Device,
    pub lr: f64,
    pub total_steps: u64,
    pub dice: DiceMode,
    /// FIRENet per-site decoders: the local network has one decoder (index 0), this site's.
    pub site_decoders: bool,
}

impl LocalTrainer {
    /// Builds the local trainer and restores heads, optimizer state and progress from `state_dir`.
    pub fn open(spec: TrainerSpec, state_dir: &Path) -> Result<Self> {
        let mut topo = Topology::preset(spec.preset)?;
        if spec.site_decoders {
            topo = topo.with_site_decoders(vec![(0..spec.classes.len() as i64).collect()])?;
        }
        let net = MultiTalentNet::new(&topo, spec.classes.len() as i64, spec.device)?;
        let precision = if spec.device.is_cuda() { Precision::Fp16 } else { Precision::Fp32 };
        let config = TrainConfig {
            base_lr: spec.lr,
            total_steps: spec.total_steps,
            precision,
            dice: spec.dice,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(net, config)?;
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let mut state = SiteState::default();
        let state_file = state_dir.join(SITE_STATE);
        if state_file.exists() {
            let text =
                std::fs::read_to_string(&state_file).with_context(|| format!("reading {}", state_file.display()))?;
            state = serde_json::from_str(&text).with_context(|| format!("parsing {}", state_file.display()))?;
            trainer.net.load(&state_dir.join(LOCAL_MODEL))?;
            trainer.optimizer.load(&state_dir.join(OPTIMIZER))?;
            info!(
                last_round = state.last_round,
                "resumed local heads and optimizer state from {}",
                state_dir.display()
            );
        }
        let labels: Vec<Vec<u32>> = spec.classes.iter().map(|c| c.labels.clone()).collect();
        Ok(Self {
            trainer,
            regions: ClassRegions::all_annotated(&labels),
            class_ids: spec.class_ids,
            state,
            site_decoder: spec.site_decoders,
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// What this site sends and receives: its heads and, with per-site decoders, its decoder.
    pub fn selection(&self, site: &str) -> fedtalent_model::wire::Selection {
        let decoders = if self.site_decoder { vec![(site.to_string(), 0)] } else { Vec::new() };
        fedtalent_model::wire::Selection { classes: self.rows(), decoders }
    }

    /// `(class id, local row)` of the site's heads.
    pub fn rows(&self) -> Vec<(String, i64)> {
        self.class_ids.iter().enumerate().map(|(i, id)| (id.clone(), i as i64)).collect()
    }

    /// Saves heads + backbone, optimizer state and progress (each file atomically; the state
    /// file last, so it never points at files that were not written).
    pub fn save(&mut self, round: u32) -> Result<()> {
        self.trainer.net.save(&self.state_dir.join(LOCAL_MODEL))?;
        self.trainer.optimizer.save(&self.state_dir.join(OPTIMIZER))?;
        self.state.last_round = round;
        self.state.global_step = self.trainer.step;
        let json = serde_json::to_string_pretty(&self.state)?;
        fedtalent_model::io::write_bytes_atomic(&self.state_dir.join(SITE_STATE), json.as_bytes())
    }

    /// Runs `steps` local steps starting at global step `step_offset`; returns the mean loss.
    pub fn train(
        &mut self,
        loader: &mut BatchLoader,
        steps: u32,
        step_offset: u64,
        total_steps: u64,
        round: u32,
    ) -> Result<f32> {
        self.trainer.step = step_offset;
        self.trainer.set_total_steps(total_steps);
        let bar = ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template("round {msg} [{bar:30}] {pos}/{len} steps, loss {prefix} ({eta})")
                .expect("valid template"),
        );
        bar.set_message(round.to_string());
        let mut sum = 0.0;
        let mut counted = 0u32;
        for _ in 0..steps {
            let batch = loader.next_batch()?;
            let refs: Vec<&ClassRegions> = (0..batch.image.size()[0]).map(|_| &self.regions).collect();
            let targets = BatchTargets::new(&refs, batch.image.device())?;
            let stats = self.trainer.train_step(&batch.image, &batch.labels, &targets)?;
            if !stats.skipped {
                sum += stats.loss;
                counted += 1;
            }
            bar.set_prefix(format!("{:.4}", stats.loss));
            bar.inc(1);
        }
        bar.finish_and_clear();
        ensure!(counted > 0, "round {round}: every step overflowed");
        Ok((sum / counted as f64) as f32)
    }

    /// Per-class Dice of the current network on `cases` (pooled over the cases), by class id.
    pub fn evaluate(
        &self,
        cases: &[PreprocessedCase],
        norm: &fedtalent_data::Normalization,
    ) -> Result<Vec<(String, f32)>> {
        let net = &self.trainer.net;
        let device = net.device();
        let opts = InferOptions { device, progress: false, ..InferOptions::default() };
        let classes = self.class_ids.len();
        let (mut tp, mut sums) = (vec![0f64; classes], vec![0f64; classes]);
        for case in cases {
            let image = case.normalized_image(norm);
            let [z, y, x] = case.meta.shape;
            let image =
                Tensor::from_slice(image.as_slice().expect("standard layout")).view([1, z as i64, y as i64, x as i64]);
            let probs = tch::no_grad(|| {
                sliding_window_probabilities(net, &image.to_device(device), net.topology().patch, &opts)
            })?;
            let pred = probs.gt(0.5).to_device(Device::Cpu);
            let labels = Tensor::from_slice(&case.labels().iter().map(|&l| l as i64).collect::<Vec<_>>())
                .view([1, 1, z as i64, y as i64, x as i64]);
            let targets = BatchTargets::new(&[&self.regions], Device::Cpu)?.targets(&labels)?.squeeze_dim(0).gt(0.5);
            for c in 0..classes {
                let (p, t) = (pred.get(c as i64), targets.get(c as i64));
                tp[c] += p.logical_and(&t).sum(Kind::Float).double_value(&[]);
                sums[c] += p.sum(Kind::Float).double_value(&[]) + t.sum(Kind::Float).double_value(&[]);
            }
        }
        Ok((0..classes)
            .map(|c| {
                let dice = if sums[c] > 0.0 { 2.0 * tp[c] / sums[c] } else { f64::NAN };
                (self.class_ids[c].clone(), dice as f32)
            })
            .collect())
    }
}

/// A training batch source over the site's cases.
pub fn batch_loader(
    data: &mut LocalData,
    patch: [i64; 3],
    batch: u32,
    norm: fedtalent_data::Normalization,
    seed: u64,
    threads: usize,
    device: Device,
) -> Result<BatchLoader> {
    let cases = std::mem::take(&mut data.train);
    let patch = patch.map(|p| p as usize);
    BatchLoader::new(cases, LoaderOptions::new(patch, batch as usize, norm, seed, threads, device))
}
