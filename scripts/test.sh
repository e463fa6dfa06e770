#!/usr/bin/env bash
# The README's test command: set up torch, build, lint, and run every test (CPU only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
. scripts/env.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== build binaries (the end-to-end tests start them)"
cargo build --workspace --bins --quiet
echo "== cargo test"
cargo test --workspace --quiet
