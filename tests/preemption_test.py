"""Preemption notices: SIGTERM (twice, the second while the save is written) at a step of each stage of the tiny
pipeline. Each time the run saves the step it was on, exits with status 75 and says so; the rerun resumes from
that step (at most the step in flight is lost) and the final parameters equal the uninterrupted run's bit for bit.
"""

import os
import re
import signal

import numpy as np
import pytest

from helpers import stage_runner


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return stage_runner.shared_reference(tmp_path_factory)


def test_sigterm_in_every_stage_saves_exits_75_and_resumes_identically(reference, tmp_path):
  ref_dir, cache = reference
  workdir = str(tmp_path / "w")
  stage_runner.copy_workdir(os.path.join(ref_dir, "data"), os.path.join(workdir, "data"))
  rng = np.random.default_rng(7)
  previous = None  # (stage, step saved at its notice): the next run must resume it from exactly that step
  for stage in stage_runner.TRAINED_STAGES:
    n = stage_runner.STAGE_STEPS[stage]
    step = int(rng.integers(1, n))  # not the last step: the stage would finish anyway
    notice = stage_runner.Kill(rf"\[{stage}\] step {step}/{n} ", float(rng.uniform(0.0, 0.05)),
                               signals=(signal.SIGTERM, signal.SIGTERM), gap=0.05)
    a = stage_runner.run_with_kill(workdir, (), notice, cache_dir=cache)
    assert a.killed and a.returncode == stage_runner.PREEMPTED_EXIT, (stage, a.returncode, a.log_tail)
    if previous:
      assert f"[{previous[0]}] resumed from step {previous[1]} " in a.log, a.log_tail
    m = re.search(rf"preempted: \[{stage}\] preemption notice: stopped after step (\d+), saved in ", a.log)
    assert m, a.log_tail
    saved = int(m.group(1))
    assert step <= saved <= step + 1  # the step printed, or the one that was running when the notice came
    assert str(saved) in os.listdir(os.path.join(workdir, stage, "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, stage, "summary.json"))
    previous = (stage, saved)
  final = stage_runner.run_with_kill(workdir, (), None, cache_dir=cache)
  assert final.returncode == 0, final.log_tail
  assert f"[{previous[0]}] resumed from step {previous[1]} " in final.log, final.log_tail
  for stage in stage_runner.TRAINED_STAGES:
    want = stage_runner.load_params(os.path.join(ref_dir, stage, "params"))
    got = stage_runner.load_params(os.path.join(workdir, stage, "params"))
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{stage} {name}")
