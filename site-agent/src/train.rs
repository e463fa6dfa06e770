//! `site-agent train`: MultiTalent without a federation, on one or several local datasets.
//!
//! With one dataset this is the "site alone" baseline; with several, the paper's own setting
//! (one network, one head per dataset and class, the loss masked to each sample's dataset, datasets
//! sampled by sqrt(cases)), the pooled baseline a federation is measured against. It runs the same
//! trainer, loader, loss and poly schedule a site agent runs in a federation, checkpoints atomically
//! (a restart resumes where it stopped) and exports the same model folder as `coordinator export`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use fedtalent_data::PreprocessedCase;
use fedtalent_model::manifest::ModelManifest;
use fedtalent_model::{wire, Topology};
use fedtalent_vocab::{ClassRegion, CtNormalization, DiceMode, GlobalClass, HuHistogram, LocalOptimizer};
use tracing::{info, warn};

use crate::config::SiteConfig;
use crate::curves::LocalCurves;
use crate::device;
use crate::finetune::InitModel;
use crate::local::{self, LocalTrainer, StreamSpec, TrainerSpec};
use crate::postprocess;
use crate::predict::InferArgs;

#[derive(clap::Args)]
pub struct Args {
    /// A dataset's site.toml (its [site].name and [data]); repeat for pooled training.
    #[arg(long = "site", required = true)]
    sites: Vec<PathBuf>,
    /// Network preset (default tiny; with --init, the model's).
    #[arg(long)]
    preset: Option<String>,
    /// Training steps (the poly schedule's horizon).
    #[arg(long)]
    steps: u64,
    #[arg(long, default_value_t = 2)]
    batch: u32,
    /// The local optimizer: sgd (MultiTalent / nnU-Net) or adam (FIRENet).
    #[arg(long, default_value = "sgd")]
    optimizer: LocalOptimizer,
    /// Base learning rate (default: the optimizer's, 0.01 for sgd, 3e-4 for adam).
    #[arg(long)]
    lr: Option<f64>,
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
    /// Fine-tune this exported model instead of starting from scratch: its backbone, and the
    /// heads of the classes it already has (matched by id), are the starting point; new classes
    /// get fresh heads. Its preset, target spacing and CT normalization are kept.
    #[arg(long)]
    init: Option<PathBuf>,
    /// With --init: the first steps train the heads alone, the backbone frozen (MultiTalent's
    /// fine-tuning warms the heads up before unfreezing the network). Default: 10% of --steps.
    #[arg(long)]
    head_steps: Option<u64>,
    /// With --init: keep the model's other classes (untrained here), so that the fine-tuned
    /// model still predicts them; without, it has the datasets' classes only.
    #[arg(long)]
    keep_heads: bool,
    /// With --init of a model with per-site decoders: the site whose decoder the network starts
    /// from (default: the training site's own).
    #[arg(long)]
    decoder_from: Option<String>,
    /// After export, each site decides nnU-Net's post-processing of its classes on its
    /// validation cases (`site-agent postprocess`); `false` exports the raw model.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    postprocess: bool,
    /// No progress bar (logs only).
    #[arg(long)]
    quiet: bool,
    /// Also write the loss of every step as TensorBoard event files here.
    #[arg(long)]
    tensorboard: Option<PathBuf>,
    /// Test mode: stop (without exporting) at the first checkpoint at or after this step.
    #[arg(long, hide = true)]
    stop_after_steps: Option<u64>,
}

/// A dataset of the run: its site's name, classes and preprocessed cases.
struct Source {
    site: String,
    classes: Vec<ClassRegion>,
    /// `[site].exclusive_classes`: its classes train as one softmax.
    exclusive: bool,
    train: Vec<PreprocessedCase>,
    histogram: HuHistogram,
    /// Its dataset's input channels.
    channels: fedtalent_vocab::InputChannels,
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.steps >= 1, "--steps must be at least 1");
    let device = device::parse(&args.device)?;
    let init = load_init(&args, device)?;
    let preset = match (&init, &args.preset) {
        (Some(init), Some(p)) if *p != init.manifest.preset => {
            bail!("--preset {p:?}: the --init model is a {:?} network", init.manifest.preset)
        }
        (Some(init), _) => init.manifest.preset.clone(),
        (None, p) => p.clone().unwrap_or_else(|| "tiny".to_string()),
    };
    let topology = Topology::preset(&preset).context("--preset")?;
    let sources = load_sources(&args.sites, topology.spacing)?;
    let channels = input_channels(&sources, init.as_ref().map(|i| &i.manifest))?;
    let exclusive_sites: Vec<String> = sources.iter().filter(|s| s.exclusive).map(|s| s.site.clone()).collect();
    let classes = match &init {
        Some(init) => init.class_list(class_list(&sources), args.keep_heads),
        None => class_list(&sources),
    };
    let norm = match &init {
        Some(init) => init.manifest.normalization,
        None => normalization(&sources),
    };
    let head_steps = match (&init, args.head_steps) {
        (None, Some(_)) => bail!("--head-steps needs --init (a model whose backbone is kept)"),
        (None, None) => 0,
        (Some(_), Some(h)) => h.min(args.steps),
        (Some(_), None) => args.steps / 10,
    };
    let regions: Vec<ClassRegion> = classes.iter().map(GlobalClass::region).collect();
    let datasets = sources
        .iter()
        .map(|s| {
            let annotated = |c: &GlobalClass| c.site == s.site && s.classes.iter().any(|r| r.name == c.name);
            classes.iter().enumerate().filter(|(_, c)| annotated(c)).map(|(i, _)| i).collect()
        })
        .collect();
    // The same initialisation as a federation's global model (the coordinator seeds 0).
    tch::manual_seed(args.seed as i64);
    let decoder_owner = init.as_ref().and_then(|i| i.decoder_site.as_ref()).map(|_| sources[0].site.clone());
    let spec = TrainerSpec {
        preset: &preset,
        classes: &regions,
        datasets: Some(datasets),
        class_ids: classes.iter().map(|c| c.id.clone()).collect(),
        channels: &channels,
        device,
        optimizer: args.optimizer,
        lr: args.lr.unwrap_or(args.optimizer.default_lr()),
        total_steps: args.steps,
        dice: DiceMode::Batch,
        exclusive: sources.iter().map(|s| s.exclusive).collect(),
        site_decoder: decoder_owner.as_deref(),
        // A model with per-site decoders brings its sites' own encoder stages along.
        site_encoder_stages: init.as_ref().map_or(0, |i| i.manifest.topology.site_encoder_stages),
    };
    let mut trainer = LocalTrainer::open(spec, &args.out.join("state"))?;
    trainer.curves = LocalCurves::new(args.quiet, args.tensorboard.as_deref())?;
    // A resumed run holds its own weights already; only a fresh one starts from the model.
    if let (Some(init), 0) = (&init, trainer.state.batches_drawn) {
        let net = &mut trainer.trainer.net;
        let took = init.transfer(net, &trainer.selection, decoder_owner.as_deref())?;
        info!(
            model = %args.init.as_ref().expect("init given").display(),
            heads = ?took.heads,
            fresh = ?took.fresh,
            decoder = ?init.decoder_site,
            head_steps,
            "fine-tuning from a model"
        );
    }
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
        let mut chunk = args.checkpoint_every.max(1).min(args.steps - start);
        // The heads-only phase ends at its own step, whatever the checkpoint interval.
        let heads_only = start < head_steps;
        if heads_only {
            chunk = chunk.min(head_steps - start);
        }
        let chunk_index = (start / args.checkpoint_every.max(1)) as u32 + 1;
        trainer.trainer.freeze_backbone(heads_only);
        let loss = trainer.train(&mut loader, chunk as u32, start, args.steps, chunk_index)?;
        trainer.trainer.freeze_backbone(false);
        trainer.save(chunk_index)?;
        trainer.curves.flush();
        info!(step = trainer.trainer.step, total = args.steps, loss, "checkpoint written");
        if args.stop_after_steps.is_some_and(|s| trainer.trainer.step >= s && trainer.trainer.step < args.steps) {
            info!(step = trainer.trainer.step, "stopping as asked (resume by running again)");
            return Ok(());
        }
    }
    let manifest = ModelManifest::of(&trainer.trainer.net, &preset, norm, classes).with_channels(channels);
    let manifest = ModelManifest { exclusive_sites, ..manifest };
    let dir = export(&trainer, manifest, &args.out.join("model"))?;
    println!("model exported to {}", dir.display());
    if args.postprocess {
        let infer = InferArgs { tta: false, device: args.device.clone(), tile_batch: 2 };
        for path in &args.sites {
            let config = SiteConfig::load(path)?;
            // The model is exported already: a site that cannot decide leaves it unprocessed.
            match postprocess::decide(&dir, &config, &infer) {
                Ok(decisions) => print!("{}", postprocess::table(&config.site.name, &decisions)),
                Err(e) => warn!(site = %config.site.name, "post-processing not decided: {e:#}"),
            }
        }
    }
    Ok(())
}

/// The --init model, with the flags that only make sense with one checked.
fn load_init(args: &Args, device: tch::Device) -> Result<Option<InitModel>> {
    let Some(dir) = &args.init else {
        ensure!(!args.keep_heads && args.decoder_from.is_none(), "--keep-heads and --decoder-from need --init");
        return Ok(None);
    };
    let sites: Vec<String> =
        args.sites.iter().map(|p| SiteConfig::load(p).map(|c| c.site.name)).collect::<Result<_>>()?;
    let init = InitModel::load(dir, device, &sites, args.decoder_from.as_deref())?;
    ensure!(
        !(args.keep_heads && init.decoder_site.is_some()),
        "--keep-heads: the model {} has per-site decoders, and the other sites' heads read decoders \
         this network does not have",
        dir.display()
    );
    Ok(Some(init))
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
            exclusive: config.site.exclusive_classes,
            train: data.train,
            histogram: data.histogram,
            channels: data.channels,
        });
    }
    Ok(sources)
}

/// The input channels of the run: every dataset's must be the first's (one network takes one
/// channel layout), and a --init model's too.
fn input_channels(sources: &[Source], init: Option<&ModelManifest>) -> Result<fedtalent_vocab::InputChannels> {
    let first = &sources[0];
    for s in &sources[1..] {
        s.channels.check_against(&first.channels).with_context(|| {
            format!("site {:?} cannot train with site {:?} ({})", s.site, first.site, first.channels)
        })?;
    }
    if let Some(model) = init {
        first.channels.check_against(&model.channels).with_context(|| {
            format!("site {:?} cannot fine-tune the --init model (channels: {})", first.site, model.channels)
        })?;
    }
    Ok(first.channels.clone())
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

fn export(trainer: &LocalTrainer, manifest: ModelManifest, dir: &Path) -> Result<PathBuf> {
    let net = &trainer.trainer.net;
    let digest = wire::model_digest(net, &trainer.selection);
    ModelManifest { digest, ..manifest }.save(net, dir)?;
    Ok(dir.to_path_buf())
}
