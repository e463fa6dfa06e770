# Source this (`. scripts/env.sh`) to build by hand: it points torch-sys at the repo's venv.
# torch-sys runs `python` from PATH when VIRTUAL_ENV is set, so the venv's bin/ must come first.
_fedtalent_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$_fedtalent_root/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset _fedtalent_root
