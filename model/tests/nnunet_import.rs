//! nnU-Net v1 checkpoint import: a checkpoint written with nnU-Net 1.7.1's own network classes
//! and its `save_checkpoint` dict imports into a model folder whose network computes nnU-Net's
//! outputs; broken and foreign checkpoints are refused, naming what is wrong.

mod common;

use std::path::{Path, PathBuf};

use fedtalent_model::manifest::ModelManifest;
use fedtalent_model::nnunet_import::{self, ImportSpec};
use fedtalent_vocab::{ClassRegion, CtNormalization, GlobalClass, InputChannels};
use tch::{Device, Tensor};

/// Runs the oracle: (checkpoint, io file with the input `x` and nnU-Net's outputs `out{i}`).
fn nnunet_checkpoint(dir: &Path, preset: &str, classes: usize) -> (PathBuf, PathBuf) {
    nnunet_checkpoint_of(dir, preset, classes, 1)
}

/// [`nnunet_checkpoint`] of a network taking `channels` input channels (modalities).
fn nnunet_checkpoint_of(dir: &Path, preset: &str, classes: usize, channels: usize) -> (PathBuf, PathBuf) {
    let stem = format!("{preset}-{channels}ch");
    let (checkpoint, io) = (dir.join(format!("{stem}.model")), dir.join(format!("{stem}-io.safetensors")));
    let script = std::fs::read_to_string(common::reference_dir().join("nnunet_v1_checkpoint.py")).unwrap();
    let (classes, channels) = (classes.to_string(), channels.to_string());
    common::run_python(&script, &[preset, &classes, checkpoint.to_str().unwrap(), io.to_str().unwrap(), &channels]);
    (checkpoint, io)
}

fn classes(n: usize) -> Vec<GlobalClass> {
    (0..n)
        .map(|i| GlobalClass::new(i as u32, "site", &ClassRegion { name: format!("c{i}"), labels: vec![i as u32 + 1] }))
        .collect()
}

fn spec(preset: &str, n: usize) -> ImportSpec<'_> {
    ImportSpec { preset, classes: classes(n), normalization: CtNormalization::PAPER, channels: InputChannels::ct() }
}

/// Imports the oracle's checkpoint and compares our outputs with nnU-Net's, level by level.
fn imports_with_nnunet_outputs(preset: &str, classes: usize) {
    imports_with_nnunet_outputs_of(preset, classes, InputChannels::ct());
}

fn imports_with_nnunet_outputs_of(preset: &str, classes: usize, channels: InputChannels) {
    let dir = tempfile::tempdir().unwrap();
    let (checkpoint, io) = nnunet_checkpoint_of(dir.path(), preset, classes, channels.len());
    let model = dir.path().join("model");
    nnunet_import::import(&checkpoint, ImportSpec { channels: channels.clone(), ..spec(preset, classes) }, &model)
        .unwrap();
    let (manifest, net) = ModelManifest::load_model(&model, Device::Cpu).unwrap();
    assert_eq!(manifest.preset, preset);
    assert_eq!(manifest.classes.len(), classes);
    assert_eq!(manifest.channels, channels);
    let io: std::collections::HashMap<String, Tensor> =
        fedtalent_model::io::read_tensors(&io).unwrap().into_iter().collect();
    let ours = tch::no_grad(|| net.forward_ds(&io["x"]));
    let levels = io.len() - 1;
    assert!(levels >= 1 && levels <= ours.len(), "{levels} nnU-Net outputs, {} of ours", ours.len());
    for (i, mine) in ours.iter().take(levels).enumerate() {
        let theirs = &io[&format!("out{i}")];
        assert_eq!(mine.size(), theirs.size(), "level {i}");
        let diff = f64::try_from((mine - theirs).abs().max()).unwrap();
        let scale = f64::try_from(theirs.abs().max()).unwrap();
        assert!(diff <= 1e-4 * scale.max(1.0), "{preset} level {i}: max |diff| {diff} (scale {scale})");
    }
}

#[test]
fn generic_unet_checkpoint_imports_with_nnunet_outputs() {
    imports_with_nnunet_outputs("tiny", 3);
}

#[test]
fn fabians_unet_checkpoint_imports_with_nnunet_outputs() {
    imports_with_nnunet_outputs("resenc", 2);
}

/// A network nnU-Net trained on two modalities imports with its two channels, and is refused
/// as a one-channel CT network.
#[test]
fn a_two_modality_checkpoint_imports_with_its_channels() {
    imports_with_nnunet_outputs_of("tiny", 2, InputChannels::named(["T1", "T2"]));
    let dir = tempfile::tempdir().unwrap();
    let (checkpoint, _) = nnunet_checkpoint_of(dir.path(), "tiny", 2, 2);
    let err = import_error(&checkpoint, spec("tiny", 2));
    assert!(
        err.contains("conv_blocks_context.0.blocks.0.conv.weight takes 2 input channels, but 1 were given (CT)"),
        "{err}"
    );
}

fn import_error(checkpoint: &Path, spec: ImportSpec) -> String {
    let out = checkpoint.with_extension("imported");
    let err = format!("{:#}", nnunet_import::import(checkpoint, spec, &out).unwrap_err());
    assert!(!out.join("model.json").exists(), "{err}: a refused import wrote a model");
    err
}

#[test]
fn broken_and_foreign_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (checkpoint, _) = nnunet_checkpoint(dir.path(), "tiny", 3);
    let bytes = std::fs::read(&checkpoint).unwrap();

    let truncated = dir.path().join("truncated.model");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = import_error(&truncated, spec("tiny", 3));
    assert!(err.contains("truncated.model"), "{err}");

    let err = import_error(&checkpoint, spec("tiny", 2));
    assert!(err.contains("seg_outputs.0.weight has 3 output channels, but 2 classes"), "{err}");

    let err = import_error(&checkpoint, spec("unet", 3));
    assert!(err.contains("is not a \"unet\" network") && err.contains("tensor \""), "{err}");

    // A torch.save file that is no nnU-Net checkpoint, and one whose state dict lacks a tensor.
    let foreign = dir.path().join("foreign.pt");
    let missing = dir.path().join("missing.model");
    common::run_python(
        r#"
import sys, torch
torch.save({"weights": [1, 2, 3]}, sys.argv[1])
ck = torch.load(sys.argv[3], weights_only=False)
del ck["state_dict"]["conv_blocks_context.1.blocks.0.instnorm.bias"]
torch.save(ck, sys.argv[2])
"#,
        &[foreign.to_str().unwrap(), missing.to_str().unwrap(), checkpoint.to_str().unwrap()],
    );
    let err = import_error(&foreign, spec("tiny", 3));
    assert!(err.contains("no \"state_dict\""), "{err}");
    let err = import_error(&missing, spec("tiny", 3));
    assert!(err.contains("conv_blocks_context.1.blocks.0.instnorm.bias") && err.contains("missing"), "{err}");

    let not_zip = dir.path().join("legacy.model");
    std::fs::write(&not_zip, b"\x80\x02}q\x00.").unwrap();
    let err = import_error(&not_zip, spec("tiny", 3));
    assert!(err.contains("not a torch.save zip archive"), "{err}");
}
