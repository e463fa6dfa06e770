//! `site-agent evaluate`: per-class Dice and HD95 of an exported model on a labelled folder.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use fedtalent_model::metrics::evaluate_dataset;
use fedtalent_model::predict::Predictor;

/// Evaluate an exported model on a labelled nnU-Net v2 or MSD folder.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Exported model folder (model.json + model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled dataset folder (nnU-Net v2 or Medical Segmentation Decathlon layout).
    #[arg(long)]
    pub data: PathBuf,
    /// Whose classes to evaluate: the site that annotated this folder (its label values define
    /// the classes' regions). Default: the model's only site.
    #[arg(long)]
    pub site: Option<String>,
    /// Evaluate only these classes (index, id, name or site; repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Also write the evaluation (per class and per case) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub infer: crate::predict::InferArgs,
}

pub fn run(args: Args) -> Result<()> {
    let predictor = Predictor::load(&args.model, args.infer.options()?)?;
    let manifest = &predictor.manifest;
    let mut sites: Vec<&str> = Vec::new();
    for c in &manifest.classes {
        if !sites.contains(&c.site.as_str()) {
            sites.push(&c.site);
        }
    }
    let mut classes = predictor.select_classes(&args.classes)?;
    match &args.site {
        Some(site) => {
            if !sites.contains(&site.as_str()) {
                bail!("--site {site:?}: the model has no class of that site (sites: {})", sites.join(", "));
            }
            classes.retain(|&c| manifest.classes[c].site == *site);
            if classes.is_empty() {
                bail!("--site {site:?}: none of the selected classes belongs to it");
            }
        }
        None if args.classes.is_empty() && sites.len() > 1 => {
            bail!(
                "the model has classes of several sites ({}): pass --site (or --classes) to say whose labels {} holds",
                sites.join(", "),
                args.data.display()
            )
        }
        None => {}
    }
    let evaluation = evaluate_dataset(&predictor, &args.data, &classes)?;
    print!("{evaluation}");
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&evaluation)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
        }
        std::fs::write(path, json).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
