//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `model/tests/reference`: nnU-Net v1's reference layouts and the PyTorch reference network
/// (`torch_reference.py`), kept in the repository so that a clone anywhere can run the oracles.
pub fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

/// Runs a Python oracle script with the repo's venv and returns its stdout.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let python = repo_root().join(".venv/bin/python");
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONPATH", reference_dir())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (run scripts/setup.sh)", python.display()));
    assert!(out.status.success(), "python oracle failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `tensors` renamed with `prefix`, sharing their storage.
pub fn named(prefix: &str, tensors: &[(String, tch::Tensor)]) -> Vec<(String, tch::Tensor)> {
    tensors.iter().map(|(n, t)| (format!("{prefix}{n}"), t.shallow_clone())).collect()
}

/// The same named tensors, sharing their storage (an optimizer's view of the parameters).
pub fn shallow(tensors: &[(String, tch::Tensor)]) -> Vec<(String, tch::Tensor)> {
    named("", tensors)
}

/// Gives every parameter in `grads` that requires a gradient exactly that gradient: backward of
/// `Σ <p, g>` after the optimizer's `zero_grad`.
pub fn set_grads(
    opt: &mut fedtalent_model::optim::Optimizer,
    params: &[(String, tch::Tensor)],
    grads: &[(String, tch::Tensor)],
) {
    opt.zero_grad();
    let terms: Vec<tch::Tensor> = params
        .iter()
        .zip(grads)
        .filter(|((_, p), _)| p.requires_grad())
        .map(|((_, p), (_, g))| (p * g).sum(tch::Kind::Float))
        .collect();
    tch::Tensor::stack(&terms, 0).sum(tch::Kind::Float).backward();
}
