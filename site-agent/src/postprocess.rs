//! `site-agent postprocess`: a site decides nnU-Net's post-processing for its own classes on its
//! own validation cases and records it in the model's `model.json` (other sites' decisions are
//! kept), along with whether its classes are one softmax (`[site].exclusive_classes`). Run by `site-agent train` and `coordinator simulate` at the end of training; a site
//! operator runs it on the model the federation distributed.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::Args as ClapArgs;
use fedtalent_data::Dataset;
use fedtalent_model::manifest::ModelManifest;
use fedtalent_model::postprocess::{determine, ClassDecision};
use fedtalent_model::predict::Predictor;

use crate::config::SiteConfig;

/// Decide post-processing (largest connected component per class) on this site's validation
/// cases and record it in the model folder's model.json.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Exported model folder (model.json + model.safetensors); its model.json is updated.
    #[arg(long)]
    pub model: PathBuf,
    /// The site's config: its name, dataset and validation split.
    #[arg(long, default_value = "site.toml")]
    pub config: PathBuf,
    #[command(flatten)]
    pub infer: crate::predict::InferArgs,
}

pub fn run(args: Args) -> Result<()> {
    let config = SiteConfig::load(&args.config)?;
    let decisions = decide(&args.model, &config, &args.infer)?;
    print!("{}", table(&config.site.name, &decisions));
    Ok(())
}

/// Decides the post-processing of `config`'s site's classes in the model at `model_dir` and
/// writes it into the model's manifest.
pub fn decide(model_dir: &Path, config: &SiteConfig, infer: &crate::predict::InferArgs) -> Result<Vec<ClassDecision>> {
    let site = &config.site.name;
    record_exclusive(model_dir, config)?;
    let predictor = Predictor::load(model_dir, infer.options()?)?;
    let classes: Vec<usize> =
        predictor.manifest.classes.iter().filter(|c| c.site == *site).map(|c| c.index as usize).collect();
    ensure!(!classes.is_empty(), "{}: the model has no class of site {site:?}", model_dir.display());
    let dataset = Dataset::open(&config.data)?;
    let cases = dataset.val_cases();
    ensure!(
        !cases.is_empty(),
        "site {site:?}: no validation cases in {} (set [data] val_cases)",
        config.data.dataset_dir.display()
    );
    let decisions = determine(&predictor, &cases, &classes).with_context(|| format!("site {site:?}"))?;
    // Re-read: another site may have recorded its decisions since this one loaded the model.
    let mut manifest = ModelManifest::read(model_dir)?;
    let ours = |id: &String| decisions.iter().any(|d| &d.id == id);
    manifest.largest_component.retain(|id| !ours(id));
    manifest.largest_component.extend(decisions.iter().filter(|d| d.keep_largest).map(|d| d.id.clone()));
    manifest.write(model_dir)?;
    Ok(decisions)
}

/// Records in the model's manifest whether this site's classes are one softmax
/// (`[site].exclusive_classes`): how they were trained is how they must be predicted, and only
/// the site knows (the federation's export does not). Done before deciding, so that the
/// decision is made on the predictions users will get.
fn record_exclusive(model_dir: &Path, config: &SiteConfig) -> Result<()> {
    let mut manifest = ModelManifest::read(model_dir)?;
    let site = &config.site.name;
    if manifest.exclusive_sites.contains(site) == config.site.exclusive_classes {
        return Ok(());
    }
    manifest.exclusive_sites.retain(|s| s != site);
    if config.site.exclusive_classes {
        manifest.exclusive_sites.push(site.clone());
    }
    manifest.write(model_dir)
}

/// The decisions as a table, one row per class.
pub fn table(site: &str, decisions: &[ClassDecision]) -> String {
    let mut out = format!("post-processing of site {site:?}, decided on its validation cases:\n");
    out += &format!("{:<32} {:>8} {:>14} {:>6}  decision\n", "class", "Dice", "largest comp.", "cases");
    for d in decisions {
        let decision = if d.keep_largest { "keep the largest component" } else { "as predicted" };
        out += &format!("{:<32} {:>8.3} {:>14.3} {:>6}  {decision}\n", d.id, d.dice_raw, d.dice_largest, d.cases);
    }
    out
}
