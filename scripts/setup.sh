#!/usr/bin/env bash
# Creates (idempotently) the repo-local Python venv that holds libtorch (torch==2.11.0 from PyPI,
# the exact version tch 0.24.0 links against) and the Python oracles the tests use.
# Prints nothing but progress; re-running it skips whatever is already in place.
set -euo pipefail
# No pip cache: the venv is made once, and a cached torch wheel would only hold gigabytes of disk.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python="${PYTHON:-python3}"

TORCH_VERSION="2.11.0"
# tensorboard: its event reader is the oracle of the TensorBoard event writer. threadpoolctl:
# batchgenerators' worker pool needs it (nnU-Net's data path, the peer of `scripts/bench.sh`'s
# data benchmark, which scripts/test.sh runs as a smoke), and its --no-deps install below leaves it out.
ORACLES=(nibabel numpy safetensors tensorboard threadpoolctl)

pip_install() {
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$@"
}

# torch from PyPI is the CUDA build: ~4 GB installed, most of it NVIDIA's libraries, which
# libtorch_cpu/libtorch_cuda name as NEEDED, so even a CPU-only machine must have them. One
# `pip install torch` downloads every wheel (~3 GB) before it unpacks any, and that peak once
# filled a CI machine's disk. So: torch without its requirements, then each requirement (the
# CUDA toolkit's extras one by one) in its own pip call, which keeps the peak near the installed
# size plus one wheel. triton (~0.6 GB) is left out: it serves only torch.compile, which neither
# the product nor the oracles use.
install_torch() {
  echo "setup: installing torch==$TORCH_VERSION (about 4 GB with NVIDIA's libraries, a few minutes;" \
    "$(df -h --output=avail "$repo" | tail -1 | tr -d ' ') free on this disk)"
  pip_install --no-warn-conflicts --no-deps "torch==$TORCH_VERSION"
  local requirement
  while IFS= read -r requirement; do
    pip_install --no-warn-conflicts "$requirement"
  done < <("$venv/bin/python" - <<'EOF'
import importlib.metadata as metadata
from pip._vendor.packaging.requirements import Requirement

for text in metadata.requires("torch") or []:
    req = Requirement(text)
    if req.name == "triton" or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    spec = str(req.specifier)
    for extra in sorted(req.extras) or [None]:
        print(f"{req.name}[{extra}]{spec}" if extra else f"{req.name}{spec}")
EOF
)
}

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv at $venv"
  "$python" -m venv "$venv"
fi

# What is missing, checked in one Python process (each import of torch costs seconds, and
# scripts/bench.sh runs this again after scripts/test.sh did): "torch" (absent or another
# version), the oracles' import names, "nnunet", "opacus"; everything when the check itself fails.
missing_all=" $("$venv/bin/python" - "$TORCH_VERSION" "${ORACLES[@]}" 2>/dev/null <<'EOF' || true
import contextlib, io, sys

def imports(stmt):
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnunet prints a citation notice
            exec(stmt, {})
        return True
    except Exception:
        return False

missing = [] if imports(f"import torch; assert torch.__version__.split('+')[0] == {sys.argv[1]!r}") else ["torch"]
missing += [m for m in sys.argv[2:] if not imports(f"import {m}")]
missing += [] if imports("import nnunet.network_architecture.generic_modular_residual_UNet") else ["nnunet"]
missing += [] if imports("import opacus.accountants.analysis.rdp") else ["opacus"]
print(*missing, "checked")
EOF
) "
[[ $missing_all == *" checked "* ]] || missing_all=" torch ${ORACLES[*]} nnunet opacus "
if [[ $missing_all == *" torch "* ]]; then
  install_torch
fi

missing=()
for pkg in "${ORACLES[@]}"; do
  [[ $missing_all != *" $pkg "* ]] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing oracles: ${missing[*]}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${missing[@]}"
fi
# nnU-Net v1's own network classes (Generic_UNet, FabiansUNet), the oracle of the checkpoint
# import. Without nnunet's declared requirements (SimpleITK, medpy, dicom2nifti, matplotlib,
# scikit-learn … for its pipelines): only what its network modules import.
NNUNET=(nnunet==1.7.1 batchgenerators==0.25.5)
NNUNET_IMPORTS=(scipy scikit-image pandas)
if [[ $missing_all == *" nnunet "* ]]; then
  echo "setup: installing the nnU-Net v1 oracle: ${NNUNET[*]}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "${NNUNET[@]}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${NNUNET_IMPORTS[@]}" 2>&1 \
    | grep -v "dependency resolver\|nnunet 1.7.1 requires" || true
fi
# Opacus, the oracle of the differential-privacy accountant (its RDP analysis is numpy and
# scipy; the package's other modules import torch, which is here): without its requirements.
if [[ $missing_all == *" opacus "* ]]; then
  echo "setup: installing the privacy accountant oracle: opacus==1.5.4"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps opacus==1.5.4
fi
echo "setup: venv ready ($("$venv/bin/python" -c 'import importlib.metadata as m; print("torch", m.version("torch"))'))"
