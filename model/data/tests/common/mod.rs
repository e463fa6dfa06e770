//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Runs the nibabel oracle script with `args` and parses its JSON output.
pub fn oracle(args: &[&str]) -> serde_json::Value {
    python_oracle("nib_oracle.py", args)
}

/// Runs `script` (in this crate's tests/) with the repository's venv Python and parses its JSON output.
pub fn python_oracle(script: &str, args: &[&str]) -> serde_json::Value {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    let script = root.join("model/data/tests").join(script);
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(out.status.success(), "oracle failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("oracle JSON")
}
