"""The data order does not depend on the number of processes: run.py on two processes (127.0.0.1, one CPU device
each) trains on the same global batches as one process, through the real data pipeline, and a checkpoint two
processes wrote resumes on one, with the data continuing where it stopped.

The one-process reference is the tiny pipeline shared by the reliability tests (tests/helpers/stage_runner.py).
The two processes run data, pretrain and SFT on a copy of its generated data; their per-step training losses and
held-out losses must equal the reference's to a relative 1e-4 (two processes reduce in another order). Then a
workdir holding only the first half of their pretraining checkpoints (what a run stopped there leaves) is
resumed by one process: its final parameters must be the reference's.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from helpers import stage_runner

# Every module built on the shared tiny run goes to one pytest-xdist worker, so the run is built once.
pytestmark = pytest.mark.xdist_group("topology")  # its module fixtures are built once, on one worker

TIMEOUT_S = 420
STOP_AT = 4  # of stage_runner.STAGE_STEPS["pretrain"] = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return stage_runner.shared_reference(tmp_path_factory)


def _two_processes(workdir: str, cache: str, *flags: str) -> None:
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(2):
    log = open(os.path.join(os.path.dirname(workdir), f"process_{i}.log"), "w")
    logs.append(log)
    cmd = [sys.executable, stage_runner.RUN_PY, *stage_runner.TINY_FLAGS, *flags, f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, env=stage_runner.subprocess_env(cache), cwd=stage_runner.ROOT, stdout=log,
                                  stderr=subprocess.STDOUT))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1.0))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  report = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n" + open(log.name).read()[-3000:]
                     for i, (p, log) in enumerate(zip(procs, logs)))
  assert all(p.returncode == 0 for p in procs), report


def _rows(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_two_processes_train_on_the_global_batches_of_one(reference, tmp_path):
  ref_dir, cache = reference
  workdir = str(tmp_path / "two" / "w")
  stage_runner.copy_workdir(os.path.join(ref_dir, "data"), os.path.join(workdir, "data"))
  _two_processes(workdir, cache, "--experiment.stages=data", "--experiment.stages=pretrain",
                 "--experiment.stages=sft", "--experiment.checkpoint.max_to_keep=20")
  for stage in ("pretrain", "sft"):
    got, want = _rows(workdir, stage), _rows(ref_dir, stage)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4, err_msg=stage)
    with open(os.path.join(workdir, stage, "summary.json")) as f:
      got_summary = json.load(f)
    with open(os.path.join(ref_dir, stage, "summary.json")) as f:
      want_summary = json.load(f)
    np.testing.assert_allclose(got_summary["val_loss"], want_summary["val_loss"], rtol=1e-4, err_msg=stage)
    assert got_summary["val_tokens"] == want_summary["val_tokens"]  # the same held-out rows

  # Stopped after step STOP_AT on two processes, resumed on one.
  resumed = str(tmp_path / "resumed")
  stage_runner.copy_workdir(os.path.join(ref_dir, "data"), os.path.join(resumed, "data"))
  ckpts = os.path.join(workdir, "pretrain", "checkpoints")
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) <= STOP_AT:
      shutil.copytree(os.path.join(ckpts, name), os.path.join(resumed, "pretrain", "checkpoints", name))
  proc = stage_runner.run(resumed, "--experiment.stage=pretrain", cache_dir=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"[pretrain] resumed from step {STOP_AT} " in proc.stderr
  want = stage_runner.load_params(os.path.join(ref_dir, "pretrain", "params"))
  got = stage_runner.load_params(os.path.join(resumed, "pretrain", "params"))
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
