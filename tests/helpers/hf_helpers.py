"""Running transformers itself from a test: the peers' environment (bench/.venv-peers, which `.ci/run` installs).

`transformers_outputs(jobs, tmp_path)` runs tests/helpers/hf_reference.py once over jobs ({model, inputs, kind})
and returns their outputs. Without the peers' environment the calling test is skipped, unless
RLHF_JAX_REQUIRE_PEERS is set (as `.ci/run` sets it): then it fails.
"""

import json
import os
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS_PYTHON = os.environ.get("RLHF_JAX_PEERS_PYTHON", os.path.join(ROOT, "bench", ".venv-peers", "bin", "python"))
REFERENCE_SCRIPT = os.path.join(ROOT, "tests", "helpers", "hf_reference.py")


def peers_python() -> str:
  if os.path.exists(PEERS_PYTHON):
    return PEERS_PYTHON
  if os.environ.get("RLHF_JAX_REQUIRE_PEERS"):  # .ci/run sets it: there the check must run, not skip
    pytest.fail(f"no peers' environment at {PEERS_PYTHON}; run bash bench/setup_peers.sh")
  pytest.skip(f"no peers' environment at {PEERS_PYTHON} (bash bench/setup_peers.sh makes it)")


def transformers_outputs(jobs, tmp_path):
  python = peers_python()
  for j, job in enumerate(jobs):
    job["out"] = str(tmp_path / f"out_{j}.npz")
  with open(tmp_path / "jobs.json", "w") as f:
    json.dump(jobs, f)
  proc = subprocess.run([python, REFERENCE_SCRIPT, "--jobs", str(tmp_path / "jobs.json")], capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [dict(np.load(job["out"])) for job in jobs]
