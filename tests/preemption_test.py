"""Preemption notices: SIGTERM (twice, the second while the save is written) at a step of each stage of the tiny
pipeline. Each time the run finishes the step in flight, saves it, exits with status 75 and says so, so no step
it printed is lost; the rerun resumes from exactly that step, and the final parameters equal the uninterrupted
run's bit for bit. (A notice that comes while a stage's last step or its evaluation runs lets the stage finish;
the run then stops before the next stage.) Between runs the saved checkpoint of the pretraining stage is
truncated and that of SFT bit-flipped: the rerun moves it aside with a warning and resumes from the one before,
and the final parameters are still the uninterrupted run's.
"""

import os
import re
import signal

import numpy as np
import pytest

from helpers import stage_runner

# Every module built on the shared tiny run goes to one pytest-xdist worker, so the run is built once.
pytestmark = pytest.mark.xdist_group("preemption")  # its module fixtures are built once, on one worker


DAMAGE = {"pretrain": "truncate", "sft": "bit_flip"}


def _damage(step_dir: str, how: str) -> None:
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if "checksums" not in f]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  if how == "truncate":
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2] ^= 0x20
  with open(path, "wb") as f:
    f.write(bytes(data))


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
      if previous[0] in DAMAGE and f"checkpoint {previous[1] + 1} in" in a.log:
        assert "is damaged" in a.log and "moved aside to" in a.log, a.log_tail
    m = re.search(rf"preempted: \[{stage}\] preemption notice: stopped after step (\d+), saved in ", a.log)
    if m is None:  # the notice was handled after the stage's last step: it finished, the next did not start
      assert re.search(r"preempted: preemption notice before stage \w+", a.log), a.log_tail
      assert os.path.exists(os.path.join(workdir, stage, "summary.json"))
      previous = None
      continue
    saved = int(m.group(1))
    printed = [int(x) for x in re.findall(rf"\[{stage}\] step (\d+)/{n} ", a.log)]
    assert saved == max(printed) >= step, (saved, printed)  # the step in flight finished and was saved
    assert str(saved) in os.listdir(os.path.join(workdir, stage, "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, stage, "summary.json"))
    previous = (stage, saved)
    if stage in DAMAGE and saved > 1:  # the checkpoint before it (save_every=1, max_to_keep=2) must take over
      _damage(os.path.join(workdir, stage, "checkpoints", str(saved)), DAMAGE[stage])
      previous = (stage, saved - 1)
  final = stage_runner.run_with_kill(workdir, (), None, cache_dir=cache)
  assert final.returncode == 0, final.log_tail
  if previous:
    assert f"[{previous[0]}] resumed from step {previous[1]} " in final.log, final.log_tail
  for stage in stage_runner.TRAINED_STAGES:
    want = stage_runner.load_params(os.path.join(ref_dir, stage, "params"))
    got = stage_runner.load_params(os.path.join(workdir, stage, "params"))
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{stage} {name}")
