//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `../shared` beside the checkout (reference layouts, the PyTorch reference network).
pub fn shared_dir() -> PathBuf {
    repo_root().parent().unwrap().join("shared")
}

/// Runs a Python oracle script with the repo's venv and returns its stdout.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let python = repo_root().join(".venv/bin/python");
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONPATH", shared_dir().join("bench"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (run scripts/setup.sh)", python.display()));
    assert!(out.status.success(), "python oracle failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
