#!/usr/bin/env bash
# The one benchmark command: sets up the peers' environment if it is missing, then runs rlhf_jax and its peers
# (PyTorch/transformers, TRL 0.19) alternating, and writes bench/results.json and bench/RESULTS.md.
#
#   bash bench/run_all.sh                 # 3 rounds (about 15 minutes on a 2-core CPU)
#   ROUNDS=1 bash bench/run_all.sh --quick  # a fast smoke run (numbers are noisier)
#
# PYTHON (default: the README's .venv at the repository root, else python3) runs our side; PEERS_VENV picks the
# peers' venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
venv="${PEERS_VENV:-$here/.venv-peers}"
if ! "$venv/bin/python" -c "import torch, transformers, trl" >/dev/null 2>&1; then
  PEERS_VENV="$venv" bash "$here/setup_peers.sh"
fi
cd "$here/.."
exec "$python" bench/compare.py --rounds="${ROUNDS:-3}" --peers-python="$venv/bin/python" "$@"
