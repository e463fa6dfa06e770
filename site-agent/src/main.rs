//! `site-agent`: what runs at a hospital, next to its GPU and its dataset.

mod bench;
mod client;
mod curves;
pub use fedtalent_site_agent::config;
mod device;
mod evaluate;
mod finetune;
mod import;
mod local;
mod local_dp;
mod postprocess;
mod predict;
mod secagg;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fedtalent_model::{MultiTalentNet, Topology};

#[derive(Parser)]
#[command(name = "site-agent", version, about = "fedtalent site agent: local training, prediction, evaluation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this site's private key (0600) and a certificate request for the coordinator's operator.
    Keygen {
        #[arg(long)]
        site: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Validate the dataset and config; report classes, cases, spacing and the compute device.
    Check {
        /// The site's config (omit to check only the device).
        #[arg(long)]
        config: Option<PathBuf>,
        /// auto | cpu | cuda | cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Join the federation and train on each round.
    Run {
        #[arg(long, default_value = "site.toml")]
        config: PathBuf,
        /// Overrides [site].device.
        #[arg(long)]
        device: Option<String>,
        /// Stop after this many rounds in this run.
        #[arg(long)]
        max_rounds: Option<u32>,
        /// Test mode: send a deliberately broken update.
        #[arg(long, hide = true)]
        inject_fault: Option<client::Fault>,
        /// No progress bar (logs only), for service managers.
        #[arg(long)]
        quiet: bool,
        /// Also write local curves (loss per step and round, Dice per class) as TensorBoard event files here.
        #[arg(long)]
        tensorboard: Option<PathBuf>,
    },
    /// Write phantom CT datasets (nnU-Net v2 folders) for several sites with overlapping classes.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 6)]
        cases: usize,
        /// Volume shape z y x in voxels; the field of view is physical (34–40 cm in-plane), so
        /// this sets the spacing (96 512 512: clinical ~0.7 mm in-plane).
        #[arg(long, num_args = 3, default_values_t = [48, 128, 128])]
        shape: Vec<usize>,
        /// Also print each class's round-trip Dice ceiling at this target spacing (z y x, mm).
        #[arg(long, num_args = 3)]
        ceiling_spacing: Option<Vec<f64>>,
        /// liver, pancreas, multiorgan, kidney, liver_novessels, liver_wide (CT); mr_liver (MR: T1, T2)
        #[arg(long, value_delimiter = ',', default_value = "liver,pancreas,multiorgan")]
        sites: Vec<String>,
    },
    /// Parameter counts of a preset; with --save, a freshly initialised model as safetensors.
    ModelInfo {
        #[arg(long)]
        preset: String,
        #[arg(long)]
        classes: i64,
        #[arg(long)]
        save: Option<PathBuf>,
    },
    /// Import an nnU-Net v1 checkpoint (e.g. the published MultiTalent weights) as a model folder.
    ImportNnunet(import::Args),
    /// Train MultiTalent without a federation on one or several local datasets (alone / pooled).
    Train(train::Args),
    /// Segment NIfTI volumes with an exported model, one mask per class.
    Predict(predict::Args),
    /// Per-class Dice and HD95 (mm) of an exported model on a labelled folder.
    Evaluate(evaluate::Args),
    /// Decide post-processing (largest component per class) on this site's validation cases.
    Postprocess(postprocess::Args),
    /// Benchmarks (one JSON line each).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    fedtalent_data::alloc::keep_freed_memory();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a log redirected to a file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { site, dir } => {
            let (key, csr) = fedtalent_certs::write_keygen(&dir, &site)?;
            println!("private key (keep it here, mode 0600): {}", key.display());
            println!("certificate request (send to the coordinator's operator): {}", csr.display());
            let example = dir.join(format!("{site}.site.toml.example"));
            if !example.exists() {
                fedtalent_model::io::write_bytes_atomic(&example, config::template(&site).as_bytes())?;
                println!("example config: {}", example.display());
            }
            Ok(())
        }
        Command::Check { config, device } => check(config, &device),
        Command::Run { config, device, max_rounds, inject_fault, quiet, tensorboard } => {
            let config = config::SiteConfig::load(&config)?;
            let device = device::parse(device.as_deref().unwrap_or(&config.site.device))?;
            if let Some(threads) = config.site.torch_threads {
                tch::set_num_threads(threads as i32);
            }
            let options = client::RunOptions { device, fault: inject_fault, max_rounds, quiet, tensorboard };
            tokio::runtime::Runtime::new()?.block_on(client::run(config, options))
        }
        Command::Synth { out, seed, cases, shape, sites, ceiling_spacing } => {
            synth(out, seed, cases, &shape, &sites, ceiling_spacing.as_deref())
        }
        Command::ModelInfo { preset, classes, save } => model_info(&preset, classes, save),
        Command::ImportNnunet(args) => import::run(args),
        Command::Train(args) => train::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Postprocess(args) => postprocess::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

fn check(config: Option<PathBuf>, device: &str) -> Result<()> {
    let report = device::report(device)?;
    println!("{report}");
    let Some(path) = config else { return Ok(()) };
    let config = config::SiteConfig::load(&path)?;
    println!("site {:?}, coordinator {} ({})", config.site.name, config.site.coordinator, config.site.server_name);
    for (what, p) in
        [("CA certificate", &config.site.ca), ("certificate", &config.site.cert), ("private key", &config.site.key)]
    {
        if !p.exists() {
            println!("  missing {what}: {}", p.display());
        }
    }
    let data = fedtalent_data::check(&config.data);
    println!("{data}");
    if !data.is_ok() {
        bail!("{}: the dataset has problems (listed above)", config.data.dataset_dir.display());
    }
    Ok(())
}

fn synth(
    out: PathBuf,
    seed: u64,
    cases: usize,
    shape: &[usize],
    sites: &[String],
    ceiling_spacing: Option<&[f64]>,
) -> Result<()> {
    let kinds =
        sites.iter().map(|s| s.parse::<fedtalent_data::SiteKind>().context("--sites")).collect::<Result<Vec<_>>>()?;
    let opts = fedtalent_data::SynthOptions {
        seed,
        cases_per_site: cases,
        shape: [shape[0], shape[1], shape[2]],
        sites: kinds,
    };
    let sites = fedtalent_data::generate_sites(&out, &opts)?;
    for site in &sites {
        let classes: Vec<String> = site.classes.iter().map(|c| format!("{} {:?}", c.name, c.labels)).collect();
        println!("{:<18} {}  classes: {}", site.name, site.dataset_dir.display(), classes.join(", "));
    }
    // The class lists a site config needs, machine-readable for scripts and tests.
    let index = out.join("sites.json");
    fedtalent_model::io::write_bytes_atomic(&index, serde_json::to_string_pretty(&sites)?.as_bytes())?;
    println!("site list: {}", index.display());
    if let Some(s) = ceiling_spacing {
        let spacing = [s[0], s[1], s[2]];
        let ceilings = fedtalent_data::round_trip_ceiling(&opts, spacing);
        println!("round-trip Dice ceiling at {spacing:?} mm (ground truth -> target spacing -> back):");
        for c in &ceilings {
            println!("  {:<12} {:<16} {:.3}  ({} cases)", c.site, c.class, c.dice, c.cases);
        }
        let path = out.join("ceiling.json");
        fedtalent_model::io::write_bytes_atomic(&path, serde_json::to_string_pretty(&ceilings)?.as_bytes())?;
    }
    Ok(())
}

fn model_info(preset: &str, classes: i64, save: Option<PathBuf>) -> Result<()> {
    let net = MultiTalentNet::new(&Topology::preset(preset)?, classes, tch::Device::Cpu)?;
    let (total, backbone, per_class) = net.parameter_counts();
    println!("preset {preset}, {classes} classes");
    println!("  total parameters:     {total}");
    println!("  backbone parameters:  {backbone}");
    println!("  heads per class:      {per_class} (x {classes} = {})", per_class * classes);
    if let Some(path) = save {
        net.save(&path)?;
        println!("  saved (nnU-Net v1 tensor names): {}", path.display());
    }
    Ok(())
}
