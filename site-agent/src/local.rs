//! What a site does on its own: preprocess its cases, train the backbone and its own heads,
//! evaluate the global model on its held-out cases, and keep its state across restarts.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use fedtalent_data::{BatchLoader, Dataset, LoaderOptions, PreprocessOptions, PreprocessedCase};
use fedtalent_model::infer::{sliding_window_probabilities, InferOptions};
use fedtalent_model::loss::exclusive_masks;
use fedtalent_model::optim::OptimizerConfig;
use fedtalent_model::train::{Precision, TrainConfig, Trainer};
use fedtalent_model::wire::Selection;
use fedtalent_model::{BatchTargets, ClassRegions, MultiTalentNet, Topology};
use fedtalent_vocab::{
    ClassRegion, CtNormalization, DiceMode, HuHistogram, LocalOptimizer, LocalPolicy, OptimizerState,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::config::SiteConfig;
use crate::curves::LocalCurves;

const LOCAL_MODEL: &str = "local_model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const SITE_STATE: &str = "site_state.json";

/// The site's preprocessed cases.
pub struct LocalData {
    pub train: Vec<PreprocessedCase>,
    pub val: Vec<PreprocessedCase>,
    pub histogram: HuHistogram,
    /// The input channels its dataset.json declares.
    pub channels: fedtalent_vocab::InputChannels,
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
    Ok(LocalData { train, val, histogram, channels: dataset.channels })
}

/// Persistent facts about the site's progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SiteState {
    pub last_round: u32,
    pub global_step: u64,
    /// Batches taken from the loader so far (local steps plus head warm-up steps): where the
    /// batch stream resumes after a restart.
    #[serde(default)]
    pub batches_drawn: u64,
}

/// The seed of a site's batch stream: the configured seed mixed with the site's name, so that
/// sites left at the default seed still draw different patches and augmentations.
pub fn stream_seed(seed: u64, site: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&seed.to_le_bytes());
    ctx.update(site.as_bytes());
    u64::from_le_bytes(ctx.finish().as_ref()[..8].try_into().expect("8 bytes"))
}

/// The site's network (backbone + its own heads), optimizer and state directory.
pub struct LocalTrainer {
    pub trainer: Trainer,
    /// Which classes of the network each dataset annotates (one dataset for a federated site;
    /// several for pooled training), indexed like the loader's datasets.
    pub regions: Vec<ClassRegions>,
    /// What of the network travels and where it lands: the global ids of its classes at the
    /// rows of the local heads and, with per-site decoders, the site's decoder (index 0).
    pub selection: Selection,
    pub state: SiteState,
    state_dir: PathBuf,
    /// The progress bar and the local TensorBoard curves.
    pub curves: LocalCurves,
}

pub struct TrainerSpec<'a> {
    pub preset: &'a str,
    /// Every class of the network, in row order.
    pub classes: &'a [ClassRegion],
    /// Rows (into `classes`) each dataset annotates; `None`: one dataset annotating all.
    pub datasets: Option<Vec<Vec<usize>>>,
    pub class_ids: Vec<String>,
    /// The network's input channels (its datasets' channels).
    pub channels: &'a fedtalent_vocab::InputChannels,
    pub device: Device,
    pub optimizer: LocalOptimizer,
    pub lr: f64,
    pub total_steps: u64,
    pub dice: DiceMode,
    /// Per dataset (in `datasets`' order, or the one dataset): its classes are mutually
    /// exclusive and trained as one softmax (`[site].exclusive_classes`).
    pub exclusive: Vec<bool>,
    /// FIRENet per-site decoders: the local network has one decoder (index 0), this site's.
    pub site_decoder: Option<&'a str>,
    /// With `site_decoder`: the deepest encoder stages that belong to it (`[plan].site_encoder_stages`).
    pub site_encoder_stages: usize,
}

impl LocalTrainer {
    /// Builds the local trainer and restores heads, optimizer state and progress from `state_dir`.
    pub fn open(spec: TrainerSpec, state_dir: &Path) -> Result<Self> {
        let mut topo = Topology::preset(spec.preset)?;
        topo.in_channels = spec.channels.len() as i64;
        if spec.site_decoder.is_some() {
            topo = topo
                .with_site_decoders(vec![(0..spec.classes.len() as i64).collect()])
                .with_site_encoder_stages(spec.site_encoder_stages);
        }
        let net = MultiTalentNet::new(&topo, spec.classes.len() as i64, spec.device)?;
        let precision = if spec.device.is_cuda() { Precision::Fp16 } else { Precision::Fp32 };
        let config = TrainConfig {
            base_lr: spec.lr,
            total_steps: spec.total_steps,
            precision,
            dice: spec.dice,
            optimizer: OptimizerConfig::of(spec.optimizer),
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(net, config)?;
        // Owner-only: the site's heads, optimizer state and backbone live here.
        fedtalent_model::io::create_private_dir(state_dir)?;
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
        let regions = dataset_regions(spec.classes, spec.datasets, &spec.exclusive)?;
        Ok(Self {
            trainer,
            regions,
            selection: Selection::local(&spec.class_ids, spec.site_decoder),
            state,
            state_dir: state_dir.to_path_buf(),
            curves: LocalCurves::default(),
        })
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

    /// Prepares the round's local training on a freshly loaded global model: applies the
    /// optimizer-state policy, then re-fits the heads alone to the new backbone for
    /// `head_warmup_steps` steps (at the round's learning rate; the schedule does not advance).
    pub fn begin_round(&mut self, loader: &mut BatchLoader, policy: &LocalPolicy, step_offset: u64) -> Result<()> {
        if policy.optimizer_state == OptimizerState::Reset {
            self.trainer.optimizer.clear_state();
        }
        if policy.head_warmup_steps == 0 {
            return Ok(());
        }
        self.trainer.freeze_backbone(true);
        let warmed = (0..policy.head_warmup_steps).try_for_each(|_| {
            self.trainer.step = step_offset;
            self.step(loader).map(|_| ())
        });
        self.trainer.freeze_backbone(false);
        // The heads' warm-up momentum (or Adam moments) would otherwise kick the first full steps.
        if policy.optimizer_state == OptimizerState::Reset {
            self.trainer.optimizer.clear_state();
        }
        warmed
    }

    /// A federation round's local training: [`LocalTrainer::begin_round`], then `steps` steps
    /// (heads only in the last round when the policy says so); returns the mean loss.
    pub fn train_round(&mut self, loader: &mut BatchLoader, policy: &LocalPolicy, work: &RoundWork) -> Result<f32> {
        // `[plan].local_steps = 0` (the round benchmark): no training, the update is the model received.
        if work.steps == 0 {
            return Ok(0.0);
        }
        self.begin_round(loader, policy, work.step_offset)?;
        let heads_only = policy.final_heads_only && work.last;
        self.trainer.freeze_backbone(heads_only);
        let loss = self.train(loader, work.steps, work.step_offset, work.total_steps, work.round);
        self.trainer.freeze_backbone(false);
        loss
    }

    /// One training step on the loader's next batch, each sample masked to its dataset's classes.
    fn step(&mut self, loader: &mut BatchLoader) -> Result<fedtalent_model::train::StepStats> {
        let batch = loader.next_batch()?;
        self.state.batches_drawn += 1;
        let refs: Vec<&ClassRegions> = batch.datasets.iter().map(|&d| &self.regions[d]).collect();
        let targets = BatchTargets::new(&refs, batch.image.device())?;
        self.trainer.train_step(&batch.image, &batch.labels, &targets)
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
        let bar = self.curves.progress_bar(steps as u64, round);
        let mut sum = 0.0;
        let mut counted = 0u32;
        for _ in 0..steps {
            let stats = self.step(loader)?;
            if !stats.skipped {
                sum += stats.loss;
                counted += 1;
            }
            bar.set_prefix(format!("{:.4}", stats.loss));
            bar.inc(1);
            if !stats.skipped {
                self.curves.step(self.trainer.step, stats.loss);
            }
        }
        bar.finish_and_clear();
        ensure!(counted > 0, "round {round}: every step overflowed");
        Ok((sum / counted as f64) as f32)
    }

    /// Per-class Dice of the current network on `cases` (pooled over the cases), by class id.
    pub fn evaluate(&self, cases: &[PreprocessedCase], norm: &CtNormalization) -> Result<Vec<(String, f32)>> {
        let net = &self.trainer.net;
        let device = net.device();
        let class_ids: Vec<&str> = self.selection.class_ids().collect();
        let classes = class_ids.len();
        // A site of mutually exclusive classes predicts them as it trains them: one softmax.
        let exclusive = self.regions[0].exclusive;
        let softmax_groups = if exclusive { vec![(0..classes as i64).collect()] } else { Vec::new() };
        let opts = InferOptions { device, progress: false, softmax_groups, ..InferOptions::default() };
        let (mut tp, mut sums) = (vec![0f64; classes], vec![0f64; classes]);
        for case in cases {
            let image = case.normalized_image(norm);
            let [z, y, x] = case.meta.shape;
            let c = case.channels() as i64;
            let image =
                Tensor::from_slice(image.as_slice().expect("standard layout")).view([c, z as i64, y as i64, x as i64]);
            let probs = tch::no_grad(|| {
                sliding_window_probabilities(net, &image.to_device(device), net.topology().patch, &opts)
            })?;
            let pred = if exclusive { exclusive_masks(&probs, 0, true) } else { probs.gt(0.5) }.to_device(Device::Cpu);
            let labels = Tensor::from_slice(&case.labels().iter().map(|&l| l as i64).collect::<Vec<_>>())
                .view([1, 1, z as i64, y as i64, x as i64]);
            let targets = BatchTargets::new(&[&self.regions[0]], Device::Cpu)?.targets(&labels)?.squeeze_dim(0).gt(0.5);
            for c in 0..classes {
                let (p, t) = (pred.get(c as i64), targets.get(c as i64));
                tp[c] += p.logical_and(&t).sum(Kind::Float).double_value(&[]);
                sums[c] += p.sum(Kind::Float).double_value(&[]) + t.sum(Kind::Float).double_value(&[]);
            }
        }
        Ok((0..classes)
            .map(|c| {
                let dice = if sums[c] > 0.0 { 2.0 * tp[c] / sums[c] } else { f64::NAN };
                (class_ids[c].to_string(), dice as f32)
            })
            .collect())
    }
}

/// Which classes each dataset annotates (`rows`; `None`: one dataset annotating all), each
/// trained as one softmax where `exclusive` says so (indexed like the datasets).
fn dataset_regions(
    classes: &[ClassRegion],
    rows: Option<Vec<Vec<usize>>>,
    exclusive: &[bool],
) -> Result<Vec<ClassRegions>> {
    let labels: Vec<Vec<u32>> = classes.iter().map(|c| c.labels.clone()).collect();
    let datasets = match rows {
        None => vec![ClassRegions::all_annotated(&labels)],
        Some(rows) => rows
            .iter()
            .map(|rows| ClassRegions {
                regions: (0..labels.len()).map(|r| rows.contains(&r).then(|| labels[r].clone())).collect(),
                exclusive: false,
            })
            .collect(),
    };
    ensure!(
        exclusive.len() == datasets.len(),
        "{} exclusive-classes flags for {} datasets",
        exclusive.len(),
        datasets.len()
    );
    datasets
        .into_iter()
        .zip(exclusive)
        .map(|(d, &exclusive)| if exclusive { d.into_exclusive() } else { Ok(d) })
        .collect()
}

/// What a round asks of a site's training.
pub struct RoundWork {
    pub round: u32,
    pub steps: u32,
    /// Global step of the round's first step, and of the whole federation (the poly schedule).
    pub step_offset: u64,
    pub total_steps: u64,
    /// The federation's last round.
    pub last: bool,
}

/// How a batch stream is drawn.
pub struct StreamSpec {
    pub patch: [i64; 3],
    pub batch: u32,
    pub norm: CtNormalization,
    pub seed: u64,
    pub threads: usize,
    pub device: Device,
    /// The first batch's index (a resumed site continues its stream).
    pub start: u64,
}

/// A training batch source over the training cases of one or several datasets (pooled).
pub fn batch_loader(datasets: Vec<Vec<PreprocessedCase>>, spec: StreamSpec) -> Result<BatchLoader> {
    let patch = spec.patch.map(|p| p as usize);
    let mut opts = LoaderOptions::new(patch, spec.batch as usize, spec.norm, spec.seed, spec.threads, spec.device);
    opts.start_index = spec.start;
    BatchLoader::pooled(datasets, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, labels: &[u32]) -> ClassRegion {
        ClassRegion { name: name.into(), labels: labels.to_vec() }
    }

    /// `[site].exclusive_classes` reaches the loss per dataset; overlapping classes are refused.
    #[test]
    fn exclusive_datasets_train_as_one_softmax_and_overlaps_are_refused() {
        let classes = [class("kidney", &[1]), class("spleen", &[2]), class("liver", &[1, 2])];
        let rows = Some(vec![vec![0, 1], vec![2]]);
        let regions = dataset_regions(&classes, rows.clone(), &[true, false]).unwrap();
        assert_eq!(regions.iter().map(|r| r.exclusive).collect::<Vec<_>>(), [true, false]);
        assert_eq!(regions[0].regions, [Some(vec![1]), Some(vec![2]), None]);
        let all = dataset_regions(&classes, None, &[true]).unwrap_err().to_string();
        assert!(all.contains("label value 1"), "{all}");
        assert!(dataset_regions(&classes, rows, &[true]).is_err(), "one flag for two datasets");
    }
}
