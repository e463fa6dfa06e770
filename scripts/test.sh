#!/usr/bin/env bash
# The README's test command: set up torch, build, lint, and run every test (CPU only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
. scripts/env.sh
# A whole-suite run builds every test binary once: incremental caches would only take disk
# (gigabytes for ~50 libtorch-linked binaries; CI once ran out of space while linking).
export CARGO_INCREMENTAL=0
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== build binaries (the end-to-end tests start them)"
cargo build --workspace --bins --quiet
echo "== cargo test"
# The tests run side by side and many start site agents and coordinators: far more torch threads
# than cores. libgomp's default spins at every barrier, and spinning threads then take the cores
# from the ones with work (measured: 68% of a `site-agent predict` beside two trainings spent
# spinning in libgomp). Passive waiting sleeps instead; it changes no result.
export OMP_WAIT_POLICY=PASSIVE
cargo test --workspace --quiet
echo "== benchmark smoke (scripts/bench.sh --smoke: every benchmark and its peer once, tiny shapes, no thresholds)"
# The dev-profile binaries and examples cargo test has just built; its figures are not
# performance figures. Fails when a benchmark or its peer produces none. About 2 minutes.
scripts/bench.sh --smoke --out "$PWD/target/bench-smoke"
