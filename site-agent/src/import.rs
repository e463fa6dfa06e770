//! `site-agent import-nnunet`: an nnU-Net v1 checkpoint (the published MultiTalent weights,
//! or any Generic_UNet / FabiansUNet trained by nnU-Net v1) as a fedtalent model folder.

use std::path::PathBuf;

use anyhow::{anyhow, ensure, Context, Result};
use fedtalent_model::nnunet_import::{self, ImportSpec};
use fedtalent_vocab::{ClassRegion, CtNormalization, GlobalClass, InputChannels};

#[derive(clap::Args)]
pub struct Args {
    /// nnU-Net v1 checkpoint (`model_final_checkpoint.model`, a torch.save archive).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The preset whose network the checkpoint holds (unet: MultiTalent's Generic_UNet; resenc:
    /// its FabiansUNet).
    #[arg(long)]
    preset: String,
    /// One per output channel, in channel order: `SITE/NAME=LABELS`, e.g.
    /// `--class liver/liver=1,2 --class liver/liver_tumour=2` (the label values of SITE's label
    /// maps that form the class, as in a site config's `classes`).
    #[arg(long = "class", required = true)]
    classes: Vec<String>,
    /// CT normalization the network was trained with: `clip_low,clip_high,mean,std` in HU
    /// (default: the MultiTalent paper's).
    #[arg(long, value_delimiter = ',', num_args = 4)]
    normalization: Option<Vec<f32>>,
    /// The network's input channels in order, one flag each, named as the datasets name them
    /// (nnU-Net's `modalities` in its plans): `--channel T1 --channel T2`. Default: one CT channel.
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// The model folder to write (model.json + model.safetensors).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let classes = args
        .classes
        .iter()
        .enumerate()
        .map(|(i, spec)| parse_class(i as u32, spec).with_context(|| format!("--class {spec:?}")))
        .collect::<Result<Vec<_>>>()?;
    let normalization = match args.normalization.as_deref() {
        Some(&[clip_low, clip_high, mean, std]) => CtNormalization { clip_low, clip_high, mean, std },
        _ => CtNormalization::PAPER,
    };
    let channels = if args.channels.is_empty() { InputChannels::ct() } else { InputChannels::named(args.channels) };
    if let Some(problem) = channels.problems().first() {
        anyhow::bail!("--channel: {problem}");
    }
    let spec = ImportSpec { preset: &args.preset, classes, normalization, channels };
    let manifest = nnunet_import::import(&args.checkpoint, spec, &args.out)?;
    println!(
        "imported {} ({} preset, {} classes) into {}",
        args.checkpoint.display(),
        manifest.preset,
        manifest.classes.len(),
        args.out.display()
    );
    Ok(())
}

/// `SITE/NAME=1,2` as output channel `index`.
fn parse_class(index: u32, spec: &str) -> Result<GlobalClass> {
    let (id, labels) = spec.split_once('=').ok_or_else(|| anyhow!("expected SITE/NAME=LABELS"))?;
    let (site, name) = fedtalent_vocab::parse_class_id(id).ok_or_else(|| anyhow!("{id:?} is not SITE/NAME"))?;
    let labels = labels
        .split(',')
        .map(|l| l.trim().parse::<u32>().with_context(|| format!("label value {l:?}")))
        .collect::<Result<Vec<_>>>()?;
    ensure!(labels.iter().all(|&l| l > 0), "label values are > 0 (0 is background)");
    Ok(GlobalClass::new(index, site, &ClassRegion { name: name.to_string(), labels }))
}

#[cfg(test)]
mod tests {
    use super::parse_class;

    #[test]
    fn class_specs_parse_and_broken_ones_are_refused() {
        let c = parse_class(3, "liver/liver_tumour=2").unwrap();
        assert_eq!((c.index, c.id.as_str(), c.labels.as_slice()), (3, "liver/liver_tumour", &[2][..]));
        assert_eq!(parse_class(0, "liver/liver=1, 2").unwrap().labels, vec![1, 2]);
        for (spec, needle) in [
            ("liver/liver", "SITE/NAME=LABELS"),
            ("liver=1", "is not SITE/NAME"),
            ("/liver=1", "is not SITE/NAME"),
            ("liver/liver=one", "label value \"one\""),
            ("liver/liver=0,1", "0 is background"),
        ] {
            let err = format!("{:#}", parse_class(0, spec).unwrap_err());
            assert!(err.contains(needle), "{spec:?}: {err}");
        }
    }
}
