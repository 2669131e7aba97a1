"""Faults of multi-process runs (two run.py processes on 127.0.0.1, one CPU device each):

- a lost host: the coordinator (process 0) is killed with SIGKILL mid-training; the other must exit by itself,
  with an `error:` line, within the configured --host_timeout_s (plus slack), not wait forever on a collective;
- a preemption notice to one process only: both stop at the same step (JAX's preemption sync point), save it
  together and exit with status 75.
"""

import os
import re
import signal
import subprocess
import sys
import time

import portpicker
import pytest

from helpers import stage_runner

pytestmark = pytest.mark.xdist_group("multiprocess_faults")  # its module fixtures are built once, on one worker

HOST_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return stage_runner.shared_reference(tmp_path_factory)


def _start(reference, tmp_path, steps: int):
  """Two processes pretraining on a copy of the reference's data; returns (processes, log paths, workdir)."""
  ref_dir, cache = reference
  workdir = str(tmp_path / "w")
  stage_runner.copy_workdir(os.path.join(ref_dir, "data"), os.path.join(workdir, "data"))
  port = portpicker.pick_unused_port()
  logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
  procs = []
  for i in range(2):
    cmd = [sys.executable, stage_runner.RUN_PY, *stage_runner.TINY_FLAGS, "--experiment.stage=pretrain",
           f"--experiment.pretrain.train.steps={steps}", f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
           f"--host_timeout_s={HOST_TIMEOUT_S}"]
    procs.append(subprocess.Popen(cmd, env=stage_runner.subprocess_env(cache), cwd=stage_runner.ROOT,
                                  stdout=open(logs[i], "w"), stderr=subprocess.STDOUT))
  deadline = time.monotonic() + 300
  while "[pretrain] step 5/" not in open(logs[0]).read():
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
    time.sleep(0.2)
  return procs, logs, workdir


def test_the_survivor_of_a_lost_host_exits_with_an_error_in_bounded_time(reference, tmp_path):
  procs, logs, _ = _start(reference, tmp_path, steps=2000)
  try:
    procs[0].kill()
    lost = time.monotonic()
    try:
      procs[1].wait(timeout=HOST_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the survivor was still running {HOST_TIMEOUT_S + 60} s after its peer was lost")
    waited = time.monotonic() - lost
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = open(logs[1]).read()
  detail = f"returncode {procs[1].returncode} after {waited:.0f} s; log tail:\n{out[-3000:]}"
  assert procs[1].returncode != 0, detail
  # Either our one-line error, or JAX's coordination client aborting the process on the missed heartbeats.
  assert (any(line.startswith("error: ") for line in out.splitlines())
          or re.search(r"heartbeat|coordination service|UNAVAILABLE", out)), detail


def test_a_preemption_notice_to_one_process_stops_both_at_the_same_step(reference, tmp_path):
  procs, logs, workdir = _start(reference, tmp_path, steps=2000)
  try:
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=120)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [open(log).read() for log in logs]
  assert [p.returncode for p in procs] == [stage_runner.PREEMPTED_EXIT] * 2, [o[-2000:] for o in outs]
  steps = [re.search(r"preempted: \[pretrain\] preemption notice: stopped after step (\d+)", o) for o in outs]
  assert all(steps), [o[-2000:] for o in outs]
  assert steps[0].group(1) == steps[1].group(1)  # one step for every host: the sync point
  assert steps[0].group(1) in os.listdir(os.path.join(workdir, "pretrain", "checkpoints"))
