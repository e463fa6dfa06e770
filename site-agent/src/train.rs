//! `site-agent train`: MultiTalent without a federation, on one or several local datasets.
//!
//! With one dataset this is the "site alone" baseline; with several, the paper's own setting
//! (one network, one head per dataset and class, the loss masked to each sample's dataset, datasets
//! sampled by sqrt(cases)), the pooled baseline a federation is measured against. It runs the same
//! trainer, loader, loss and poly schedule a site agent runs in a federation, checkpoints atomically
//! (a restart resumes where it stopped) and exports the same model folder as `coordinator export`.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fedtalent_data::PreprocessedCase;
use fedtalent_model::manifest::ModelManifest;
use fedtalent_model::{wire, Topology};
use fedtalent_vocab::{ClassRegion, CtNormalization, DiceMode, GlobalClass, HuHistogram};
use tracing::info;

use crate::config::SiteConfig;
use crate::device;
use crate::local::{self, LocalTrainer, StreamSpec, TrainerSpec};

#[derive(clap::Args)]
pub struct Args {
    /// A dataset's site.toml (its [site].name and [data]); repeat for pooled training.
    #[arg(long = "site", required = true)]
    sites: Vec<PathBuf>,
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Training steps (the poly schedule's horizon).
    #[arg(long)]
    steps: u64,
    #[arg(long, default_value_t = 2)]
    batch: u32,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// Seed of the network's initialisation and the batch stream.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 250)]
    checkpoint_every: u64,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output folder: `state/` (checkpoints) and `model/` (the exported model).
    #[arg(long)]
    out: PathBuf,
    /// Test mode: stop (without exporting) at the first checkpoint at or after this step.
    #[arg(long, hide = true)]
    stop_after_steps: Option<u64>,
}

/// A dataset of the run: its site's name, classes and preprocessed cases.
struct Source {
    site: String,
    classes: Vec<ClassRegion>,
    train: Vec<PreprocessedCase>,
    histogram: HuHistogram,
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.steps >= 1, "--steps must be at least 1");
    let device = device::parse(&args.device)?;
    let topology = Topology::preset(&args.preset).context("--preset")?;
    let sources = load_sources(&args.sites, topology.spacing)?;
    let classes = class_list(&sources);
    let norm = normalization(&sources);
    let regions: Vec<ClassRegion> = classes.iter().map(GlobalClass::region).collect();
    let datasets = sources
        .iter()
        .map(|s| classes.iter().enumerate().filter(|(_, c)| c.site == s.site).map(|(i, _)| i).collect())
        .collect();
    // The same initialisation as a federation's global model (the coordinator seeds 0).
    tch::manual_seed(args.seed as i64);
    let spec = TrainerSpec {
        preset: &args.preset,
        classes: &regions,
        datasets: Some(datasets),
        class_ids: classes.iter().map(|c| c.id.clone()).collect(),
        device,
        lr: args.lr,
        total_steps: args.steps,
        dice: DiceMode::Batch,
        site_decoder: None,
    };
    let mut trainer = LocalTrainer::open(spec, &args.out.join("state"))?;
    // A resumed run continues at its checkpoint's step (the schedule and the batch stream).
    trainer.trainer.step = trainer.state.global_step;
    // One dataset draws the stream its site draws in a federation; several, a stream of their own.
    let stream_name = if sources.len() == 1 { sources[0].site.clone() } else { "pooled".to_string() };
    let stream = StreamSpec {
        patch: topology.patch,
        batch: args.batch,
        norm,
        seed: local::stream_seed(args.seed, &stream_name),
        threads: 2,
        device,
        start: trainer.state.batches_drawn,
    };
    let mut loader = local::batch_loader(sources.into_iter().map(|s| s.train).collect(), stream)?;
    while trainer.trainer.step < args.steps {
        let start = trainer.trainer.step;
        let chunk = args.checkpoint_every.max(1).min(args.steps - start);
        let chunk_index = (start / args.checkpoint_every.max(1)) as u32 + 1;
        let loss = trainer.train(&mut loader, chunk as u32, start, args.steps, chunk_index)?;
        trainer.save(chunk_index)?;
        info!(step = trainer.trainer.step, total = args.steps, loss, "checkpoint written");
        if args.stop_after_steps.is_some_and(|s| trainer.trainer.step >= s && trainer.trainer.step < args.steps) {
            info!(step = trainer.trainer.step, "stopping as asked (resume by running again)");
            return Ok(());
        }
    }
    let dir = export(&trainer, &args.preset, norm, classes, &args.out.join("model"))?;
    println!("model exported to {}", dir.display());
    Ok(())
}

fn load_sources(paths: &[PathBuf], spacing: [f64; 3]) -> Result<Vec<Source>> {
    let mut sources: Vec<Source> = Vec::new();
    for path in paths {
        let config = SiteConfig::load(path)?;
        let site = config.site.name.clone();
        ensure!(!sources.iter().any(|s| s.site == site), "{}: site {site:?} given twice", path.display());
        let data = local::prepare_data(&config, spacing).with_context(|| format!("{}", path.display()))?;
        sources.push(Source {
            site,
            classes: config.data.classes.clone(),
            train: data.train,
            histogram: data.histogram,
        });
    }
    Ok(sources)
}

/// The classes of every dataset, in the order given, as a federation lists them.
fn class_list(sources: &[Source]) -> Vec<GlobalClass> {
    let mut classes = Vec::new();
    for s in sources {
        for c in &s.classes {
            classes.push(GlobalClass::new(classes.len() as u32, &s.site, c));
        }
    }
    classes
}

/// CT statistics from the merged foreground histograms (in f32, as a federation sends them).
fn normalization(sources: &[Source]) -> CtNormalization {
    let histograms: Vec<HuHistogram> = sources.iter().map(|s| s.histogram.clone()).collect();
    HuHistogram::merge(&histograms).ct_stats().unwrap_or(CtNormalization::PAPER)
}

fn export(
    trainer: &LocalTrainer,
    preset: &str,
    norm: CtNormalization,
    classes: Vec<GlobalClass>,
    dir: &Path,
) -> Result<PathBuf> {
    let net = &trainer.trainer.net;
    let digest = wire::model_digest(net, &trainer.selection);
    ModelManifest { digest, ..ModelManifest::of(net, preset, norm, classes) }.save(net, dir)?;
    Ok(dir.to_path_buf())
}
