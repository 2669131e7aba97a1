#!/usr/bin/env bash
# Creates the peers' virtual environment (PyTorch CPU, Hugging Face transformers, TRL 0.19) for bench/.
#
#   bash bench/setup_peers.sh            # -> bench/.venv-peers
#   PEERS_VENV=/path bash bench/setup_peers.sh
#
# It is separate from the project's environment on purpose: the library never imports torch.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
python="${PEERS_PYTHON:-}"
if [[ -z "$python" ]]; then
  for cand in python3.11 /root/.pyenv/shims/python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then python="$cand"; break; fi
  done
fi
if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup_peers] creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$here/requirements-bench.txt"
"$venv/bin/python" - <<'PY'
import torch, transformers, trl
from trl import PPOConfig, PPOTrainer  # TRL >= 0.20 no longer ships these
print(f"[setup_peers] torch {torch.__version__} (cuda={torch.version.cuda}), transformers {transformers.__version__}, "
      f"trl {trl.__version__}: PPOTrainer importable")
PY
