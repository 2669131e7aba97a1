#!/usr/bin/env bash
# One prepared GPU run (#25), about 8 minutes on one H100/H200: bench/gpu.py's parts, the PPO iteration first in its
# own process (so its device peak is its own), then the measured peak and bandwidth, the 1B pretraining step and
# decoding; writes bench/gpu/{ppo,check,peak,train,decode}.json and bench/gpu/RESULTS.md. Commit bench/gpu/ afterwards.
#
#   bash bench/gpu.sh              # PYTHON=... picks the interpreter (default: .venv/bin/python, else python3)
set -uo pipefail  # no -e: a failed part is recorded in its JSON and the other parts still run
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
out="${OUT_DIR:-$here/gpu}"
cd "$here/.."
status=0
"$python" bench/gpu.py --parts=ppo --out-dir="$out" "$@" || status=1
"$python" bench/gpu.py --parts=check,peak,train,decode --out-dir="$out" "$@" || status=1
"$python" bench/gpu.py --report --out-dir="$out" || status=1
exit "$status"
