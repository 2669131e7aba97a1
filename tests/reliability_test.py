"""The non-finite guard: a planted NaN stops the stage naming the step and the metric, or skips that update.

`--experiment.guard.inject_nan_at_step=K` makes the loss of step K (counting from 0) NaN. With
guard.on_nonfinite="stop" the pretraining stage must exit non-zero with a message naming step K and the loss,
leave the last good checkpoint (step K: the state after K good updates) byte-for-byte intact, also when the run
is retried, and export nothing. With "skip" the resumed stage finishes, step K's update is dropped (the state
after it equals the state before it) and every parameter is finite. Runs `run.py` in subprocesses on the
tiny pipeline's generated data (tests/helpers/stage_runner.py).
"""

import json
import os

import numpy as np
import pytest

from helpers import stage_runner

# Every module built on the shared tiny run goes to one pytest-xdist worker, so the run is built once.
pytestmark = pytest.mark.xdist_group("reliability")  # its module fixtures are built once, on one worker

NAN_STEP = 4
_FLAGS = ("--experiment.stage=pretrain", f"--experiment.guard.inject_nan_at_step={NAN_STEP}",
          "--experiment.checkpoint.max_to_keep=20")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return stage_runner.shared_reference(tmp_path_factory)


def _state(workdir, step):
  """A checkpointed train state, flattened to numpy arrays."""
  return stage_runner.load_params(os.path.join(workdir, "pretrain", "checkpoints", str(step), "state"))


def test_planted_nan_stops_then_skips(reference, tmp_path):
  ref_dir, cache = reference
  w = str(tmp_path / "w")
  os.makedirs(w)
  stage_runner.copy_workdir(os.path.join(ref_dir, "data"), os.path.join(w, "data"))
  ckpt_dir = os.path.join(w, "pretrain", "checkpoints")

  # "stop": a clear error naming the step and the metric; the last good checkpoint is step NAN_STEP.
  proc = stage_runner.run(w, *_FLAGS, cache_dir=cache)
  assert proc.returncode != 0
  assert f"non-finite loss or gradient at step {NAN_STEP} (loss=nan" in proc.stderr, proc.stderr[-3000:]
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps == list(range(1, NAN_STEP + 1))
  assert not os.path.exists(os.path.join(w, "pretrain", "params"))
  assert not os.path.exists(os.path.join(w, "pretrain", "summary.json"))
  good = stage_runner.tree_digest(os.path.join(ckpt_dir, str(NAN_STEP)))
  before = _state(w, NAN_STEP)
  assert all(np.isfinite(v).all() for v in before.values() if v.dtype.kind == "f")

  # Retrying resumes from that checkpoint, meets the NaN again and still leaves the checkpoint untouched.
  proc = stage_runner.run(w, *_FLAGS, cache_dir=cache)
  assert proc.returncode != 0 and f"at step {NAN_STEP}" in proc.stderr, proc.stderr[-3000:]
  assert stage_runner.tree_digest(os.path.join(ckpt_dir, str(NAN_STEP))) == good

  # "skip": the stage finishes; the NaN step's update is dropped and logged, nothing non-finite is kept.
  proc = stage_runner.run(w, *_FLAGS, "--experiment.guard.on_nonfinite=skip", cache_dir=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"non-finite loss or gradient at step {NAN_STEP}" in proc.stderr and "update skipped" in proc.stderr
  assert stage_runner.tree_digest(os.path.join(ckpt_dir, str(NAN_STEP))) == good
  after = _state(w, NAN_STEP + 1)
  for name, value in before.items():
    if "step" in name:
      assert int(after[name]) == int(value) + 1, name  # the step counts, its update does not
    else:
      np.testing.assert_array_equal(after[name], value, err_msg=name)
  params = stage_runner.load_params(os.path.join(w, "pretrain", "params"))
  assert all(np.isfinite(v).all() for v in params.values())
  with open(os.path.join(w, "pretrain", "metrics.jsonl")) as f:
    rows = {r["step"]: r for r in map(json.loads, f)}
  assert sorted(rows) == list(range(1, stage_runner.STAGE_STEPS["pretrain"] + 1))
  assert rows[NAN_STEP + 1]["loss"] == "nan"
  assert all(isinstance(rows[s]["loss"], float) for s in rows if s != NAN_STEP + 1)
